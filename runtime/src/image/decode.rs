//! Decoding an untrusted image. Images arrive from other hosts and from disk, so every field
//! is hostile: sizes are bounded before allocation, runs are checked against the memory size,
//! decompression cannot exceed the size the runs imply, and the digest must match.

use super::compression::inflate;
use super::digest::{Unverified, check_digest};
use super::format::{FORMAT_VERSION, WireHeader, read_header};
use super::{AgentImage, ImageError, ImageLimits};
use crate::snapshot::{PAGE_SIZE, PageMap, PagesError};

/// How to decode an image ([`AgentImage::decode`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct DecodeOptions<'a> {
    /// Bounds on what the image may describe.
    pub limits: ImageLimits,
    /// This host's earlier image of the agent, whose pages an image may leave out.
    pub base: Option<BasePages<'a>>,
    /// When the digest is checked.
    pub verify: Verify,
}

impl DecodeOptions<'_> {
    /// Decoding within `limits` an image that stands alone, checking its digest.
    pub fn new(limits: ImageLimits) -> Self {
        DecodeOptions {
            limits,
            ..DecodeOptions::default()
        }
    }
}

/// When a decoded image's digest is checked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Verify {
    /// Before the image is returned.
    #[default]
    Now,
    /// Later, by [`Unverified::check`]: a host resumes a large arriving agent before hashing
    /// its pages, and checks them before it commits the hop (docs/protocol.md).
    Later,
}

/// The pages of an earlier image of an agent, held by the reader: an image that leaves them
/// out is filled in from them.
#[derive(Clone, Copy, Debug)]
pub struct BasePages<'a> {
    /// Hop sequence number of the image the pages come from.
    pub seq: u64,
    /// The pages.
    pub pages: &'a PageMap,
}

/// A decoded image.
pub struct Decoded {
    /// The image.
    pub image: AgentImage,
    /// Whether pages were filled in from the base.
    pub filled_in: bool,
    /// What checks the digest, when decoded with [`Verify::Later`].
    pub unverified: Option<Unverified>,
}

impl AgentImage {
    /// Decodes an untrusted image; the pages of a body sent raw are lent from `bytes` (a
    /// shared buffer, or a vector it takes over), not copied. The digest covers the whole image, so pages filled in
    /// from a base that differs from the sender's view fail it.
    ///
    /// # Errors
    /// An [`ImageError`] naming the first problem found; nothing is allocated beyond the
    /// limits before the sizes are checked. [`ImageError::NeedsBase`] when the image leaves
    /// out pages of a base other than `options.base`; with [`Verify::Later`], never
    /// [`ImageError::HashMismatch`].
    pub fn decode(
        bytes: impl Into<bytes::Bytes>,
        options: &DecodeOptions,
    ) -> Result<Decoded, ImageError> {
        let (image, filled_in, claimed) = decode_unchecked(&bytes.into(), options)?;
        let unverified = match options.verify {
            Verify::Now => {
                check_digest(&image, &claimed)?;
                None
            }
            Verify::Later => Some(Unverified::new(image.clone(), claimed)),
        };
        Ok(Decoded {
            image,
            filled_in,
            unverified,
        })
    }
}

/// Decodes an image, all but the digest; yields whether pages were filled in from the base
/// and the digest its header claims.
fn decode_unchecked(
    shared: &bytes::Bytes,
    options: &DecodeOptions,
) -> Result<(AgentImage, bool, [u8; 32]), ImageError> {
    let (header, body_at) = read_header(shared, options.limits.max_header)?;
    check_header(&header, &options.limits)?;
    let pages = PageMap::check(&header.runs, header.memory_bytes)?;
    let (base, left_out) = match &header.base {
        None => (None, 0),
        Some(wanted) => {
            let base = options
                .base
                .filter(|b| b.seq == wanted.seq)
                .ok_or(ImageError::NeedsBase(wanted.seq))?;
            let left = PageMap::check(&wanted.runs, header.memory_bytes)
                .map_err(|e| PagesError::LeftOut(Box::new(e)))?;
            (Some(base), left.min(pages))
        }
    };
    let body = &shared[body_at..];
    check_body_len(body, header.body_bytes)?;
    // The runs fix the uncompressed size, so a decompression bomb stops at that size.
    let expected = ((pages - left_out) * PAGE_SIZE as u64) as usize;
    let data = match header.raw {
        // Its size was checked against the header's, and that against the runs below.
        true => shared.slice(body_at..),
        false => inflate(body, expected)?.into(),
    };
    if data.len() != expected {
        return Err(ImageError::CorruptBody(format!(
            "{} bytes of pages, the page map needs {expected}",
            data.len()
        )));
    }
    let (pages, filled_in) = match (base, header.base) {
        (Some(base), Some(wanted)) => (
            PageMap::fill_in(header.runs, &wanted.runs, &data, base.pages)?,
            true,
        ),
        _ => (
            PageMap {
                runs: header.runs,
                data,
            },
            false,
        ),
    };
    let image = AgentImage {
        module: header.module,
        memory_bytes: header.memory_bytes,
        globals: header.globals,
        pages,
        context: header.context,
    };
    Ok((image, filled_in, header.hash))
}

/// Checks the format version and the memory size a header claims.
fn check_header(header: &WireHeader, limits: &ImageLimits) -> Result<(), ImageError> {
    if header.format != FORMAT_VERSION {
        return Err(ImageError::VersionSkew {
            found: header.format,
            supported: FORMAT_VERSION,
        });
    }
    if header.memory_bytes > limits.max_memory {
        return Err(ImageError::MemoryTooLarge {
            size: header.memory_bytes,
            limit: limits.max_memory,
        });
    }
    if !header
        .memory_bytes
        .is_multiple_of(crate::admission::WASM_PAGE)
    {
        return Err(ImageError::BadHeader(format!(
            "memory size {} is not whole Wasm pages",
            header.memory_bytes
        )));
    }
    Ok(())
}

/// Checks that `body` is as long as the header says, no more and no less.
fn check_body_len(body: &[u8], claimed: u64) -> Result<(), ImageError> {
    match (body.len() as u64).cmp(&claimed) {
        std::cmp::Ordering::Less => Err(ImageError::Truncated(format!(
            "body of {claimed} bytes, {} present",
            body.len()
        ))),
        std::cmp::Ordering::Greater => Err(ImageError::TrailingBytes(body.len() as u64 - claimed)),
        std::cmp::Ordering::Equal => Ok(()),
    }
}
