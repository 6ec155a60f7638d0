//! How an image's body is compressed: with zstd, at a level chosen by where the image goes,
//! or not at all when a sample of the pages shows zstd would gain too little.

use super::ImageError;
use crate::snapshot::PAGE_SIZE;

/// How hard an image's body is compressed, by where it goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Compression {
    /// Sent to another host: compressing is on the critical path of the hop, so a fast level
    /// that leaves literals alone.
    #[default]
    Travel,
    /// Kept where it was made (a launch, a parked agent), maybe on disk for days: a level
    /// that keeps small images within a page of the store.
    Keep,
}

/// zstd level of images that travel. The fast levels (below 1) leave literals uncompressed.
const TRAVEL_LEVEL: i32 = -3;

/// zstd level of images kept where they were made.
const KEEP_LEVEL: i32 = 1;

thread_local! {
    // zstd contexts are costly to set up (more than compressing a small agent's pages), so
    // each thread keeps one of each.
    static TRAVEL: Zstd = std::cell::RefCell::new(zstd::bulk::Compressor::new(TRAVEL_LEVEL));
    static KEEP: Zstd = std::cell::RefCell::new(zstd::bulk::Compressor::new(KEEP_LEVEL));
    static DECOMPRESSOR: std::cell::RefCell<std::io::Result<zstd::bulk::Decompressor<'static>>> =
        std::cell::RefCell::new(zstd::bulk::Decompressor::new());
}

/// A thread's zstd compression context for one level.
type Zstd = std::cell::RefCell<std::io::Result<zstd::bulk::Compressor<'static>>>;

impl Compression {
    /// This thread's context for the level.
    fn context(self) -> &'static std::thread::LocalKey<Zstd> {
        match self {
            Compression::Travel => &TRAVEL,
            Compression::Keep => &KEEP,
        }
    }

    /// The zstd level.
    #[cfg(test)]
    pub(super) const fn level(self) -> i32 {
        match self {
            Compression::Travel => TRAVEL_LEVEL,
            Compression::Keep => KEEP_LEVEL,
        }
    }

    /// Compresses `data` with this thread's context for the level.
    ///
    /// # Errors
    /// When zstd fails (out of memory).
    pub(super) fn compress(self, data: &[u8]) -> std::io::Result<Vec<u8>> {
        self.context().with(|c| match c.borrow_mut().as_mut() {
            Ok(c) => c.compress(data),
            Err(e) => Err(std::io::Error::other(e.to_string())),
        })
    }
}

/// Bodies at least this large are sampled before they are compressed.
const SAMPLED: usize = 1 << 20;

/// A sample: this many pages spread evenly over the body.
const SAMPLE_PAGES: usize = 16;

/// Whether zstd would gain too little on `pages` to be worth its time, judged from a sample
/// of pages spread over them: compressing and decompressing a large body of noise costs
/// both ends of a hop time for nothing.
pub(super) fn incompressible(pages: &[&[u8]]) -> std::io::Result<bool> {
    let len: usize = pages.iter().map(|p| p.len()).sum();
    if len < SAMPLED {
        return Ok(false);
    }
    let stride = len / PAGE_SIZE / SAMPLE_PAGES * PAGE_SIZE;
    let mut sample = Vec::with_capacity(SAMPLE_PAGES * PAGE_SIZE);
    // Parts hold whole pages, so a sampled page never straddles two.
    let page_at = |mut at: usize| {
        for part in pages {
            match part.get(at..at + PAGE_SIZE) {
                Some(page) => return page,
                None => at = at.saturating_sub(part.len()),
            }
        }
        &[]
    };
    for i in 0..SAMPLE_PAGES {
        sample.extend_from_slice(page_at(i * stride));
    }
    // Saving less than a quarter does not pay for compressing and decompressing every page
    // on a fast link; a few compressible pages (stack, data) among noise save less.
    Ok(Compression::Travel.compress(&sample)?.len() > sample.len() / 4 * 3)
}

/// Most memory reserved for the pages before any has been decompressed.
pub(super) const FIRST_RESERVE: usize = 16 << 20;

/// Decompresses `body`, which should hold `expected` bytes; never more than one byte past that.
///
/// Memory grows with what the body really holds, not with what the header claims: a header
/// that announces gigabytes of pages over a body of a few bytes must not cost an allocation of
/// the claimed size (that aborts the process where address space is limited). Up to
/// [`FIRST_RESERVE`] bytes are decompressed in one call into a buffer of the exact size; larger
/// images are streamed into a buffer that grows as pages come out.
pub(super) fn inflate(body: &[u8], expected: usize) -> Result<Vec<u8>, ImageError> {
    use std::io::Read;
    let corrupt = |e: std::io::Error| ImageError::CorruptBody(e.to_string());
    if expected <= FIRST_RESERVE {
        return DECOMPRESSOR
            .with(|d| match d.borrow_mut().as_mut() {
                Ok(d) => d.decompress(body, expected),
                Err(e) => Err(std::io::Error::other(e.to_string())),
            })
            .map_err(corrupt);
    }
    let decoder = zstd::stream::read::Decoder::with_buffer(body).map_err(corrupt)?;
    let mut data = Vec::with_capacity(FIRST_RESERVE);
    decoder
        .take(expected as u64 + 1)
        .read_to_end(&mut data)
        .map_err(corrupt)?;
    Ok(data)
}
