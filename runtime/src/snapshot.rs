//! Memory as a page map: which 4 KiB pages differ from the module's initial image.
//!
//! A fresh instance starts with exactly the initial image (data segments over zeros), and an
//! instance kept after its agent left is reset to it ([`crate::recycle`]). So an image need
//! only carry pages that differ from it: a mostly-zero heap costs almost nothing, and restoring
//! leaves the omitted pages right without touching them.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Granularity of the page map.
pub const PAGE_SIZE: usize = 4096;

/// Why a page map (from an untrusted image) cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PagesError {
    /// A run is empty, out of order, or past the end of the memory.
    #[error(
        "page run {start}+{count} is empty, out of order or outside the memory of {limit} pages"
    )]
    BadRun {
        /// First page of the run.
        start: u32,
        /// Pages in the run.
        count: u32,
        /// Pages in the memory.
        limit: u64,
    },
    /// The body holds fewer pages than the runs not left out.
    #[error("the body ends early")]
    BodyEndsEarly,
    /// A page left out of the body is not in the base it should come from.
    #[error("left-out page {0} is not in the base")]
    NotInBase(u32),
    /// A page left out of the body is not among the carried pages.
    #[error("left-out page {0} is not carried")]
    NotCarried(u32),
    /// The runs of pages left out are malformed.
    #[error("left-out pages: {0}")]
    LeftOut(#[source] Box<PagesError>),
    /// The memory is smaller than the module starts with.
    #[error("memory of {memory} bytes is smaller than the module's initial {initial}")]
    SmallerThanInitial {
        /// Size of the image's memory.
        memory: u64,
        /// Size of the module's initial memory.
        initial: u64,
    },
}

/// The memory of a freshly instantiated module: non-zero pages only.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InitialImage {
    pages: BTreeMap<u32, Box<[u8]>>,
}

impl InitialImage {
    /// Writes a data segment's bytes at `offset`, as instantiation does.
    pub(crate) fn write(&mut self, offset: u64, bytes: &[u8]) {
        let mut at = offset as usize;
        let mut rest = bytes;
        while !rest.is_empty() {
            let page = (at / PAGE_SIZE) as u32;
            let within = at % PAGE_SIZE;
            let n = rest.len().min(PAGE_SIZE - within);
            let buf = self
                .pages
                .entry(page)
                .or_insert_with(|| vec![0u8; PAGE_SIZE].into_boxed_slice());
            buf[within..within + n].copy_from_slice(&rest[..n]);
            at += n;
            rest = &rest[n..];
        }
    }

    /// Writes the pages of `runs` in `memory` back to their content right after
    /// instantiation. Pages of `runs` outside `memory` are skipped.
    pub(crate) fn reset(&self, runs: &[PageRun], memory: &mut [u8]) {
        for index in indices(runs) {
            let at = index as usize * PAGE_SIZE;
            let Some(page) = memory.get_mut(at..at + PAGE_SIZE) else {
                continue;
            };
            match self.page(index) {
                Some(initial) => page.copy_from_slice(initial),
                None => page.fill(0),
            }
        }
    }

    /// Content of page `index` right after instantiation (`None`: all zero).
    fn page(&self, index: u32) -> Option<&[u8]> {
        self.pages.get(&index).map(|p| &p[..])
    }
}

/// A run of consecutive pages carried in an image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRun {
    /// First page index.
    pub start: u32,
    /// Number of pages.
    pub count: u32,
}

impl PageRun {
    /// The bytes of memory the run covers.
    pub fn bytes(&self) -> std::ops::Range<usize> {
        self.start as usize * PAGE_SIZE..(self.start as usize + self.count as usize) * PAGE_SIZE
    }
}

/// Captures of at least this many bytes are copied on all cores, [`COPY_PIECE`] at a time:
/// most of a large capture is the kernel clearing the fresh buffer's pages as they are first
/// written, several times the copy itself, and that clearing goes as fast as the threads that fault.
const PARALLEL_COPY: usize = 16 << 20;
const COPY_PIECE: usize = 4 << 20;

/// The pages of `runs` (of `total` bytes) laid end to end, copied out of `memory` by a task
/// per piece of the buffer.
fn gather_on_all_cores(memory: &[u8], runs: &[PageRun], total: usize) -> Vec<u8> {
    // Zeroed by the kernel as it maps it (no memset), in huge pages.
    let mut data = vec![0u8; total];
    crate::prefault::huge(&mut data);
    let starts: Vec<usize> = runs
        .iter()
        .scan(0, |at, run| {
            let start = *at;
            *at += run.bytes().len();
            Some(start)
        })
        .collect();
    let (starts, memory) = (&starts, memory);
    rayon_core::scope(|scope| {
        for (i, piece) in data.chunks_mut(COPY_PIECE).enumerate() {
            scope.spawn(move |_| gather_piece(piece, i * COPY_PIECE, memory, runs, starts));
        }
    });
    data
}

/// Fills `piece` with the bytes at offset `at` of the pages of `runs` laid end to end, where
/// run `i` begins at `starts[i]`.
fn gather_piece(piece: &mut [u8], at: usize, memory: &[u8], runs: &[PageRun], starts: &[usize]) {
    let mut run = starts
        .partition_point(|&start| start <= at)
        .saturating_sub(1);
    let mut done = 0;
    while done < piece.len() {
        let (Some(r), Some(&start)) = (runs.get(run), starts.get(run)) else {
            break;
        };
        let from = r.bytes();
        let skip = at + done - start;
        let n = (from.len() - skip).min(piece.len() - done);
        let to = &mut piece[done..done + n];
        to.copy_from_slice(&memory[from.start + skip..from.start + skip + n]);
        done += n;
        run += 1;
    }
}

/// The pages of a memory that differ from the initial image, in page order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageMap {
    /// Runs of carried pages, sorted, not overlapping.
    pub runs: Vec<PageRun>,
    /// The carried pages' bytes, concatenated in run order: shared, so that an image decoded
    /// from a buffer lends its pages instead of copying them, and a base keeps them by count.
    pub data: bytes::Bytes,
}

impl PageMap {
    /// Compares `memory` with `initial` page by page and keeps the pages that differ
    /// (`memory` mapped as [`PageMap::changed_runs`] requires).
    ///
    /// The runs are found first and the pages copied after, into a buffer of the exact size
    /// mapped ahead: growing it page by page cost reallocations and a fault per page.
    pub fn capture(memory: &[u8], initial: &InitialImage) -> PageMap {
        let runs = PageMap::changed_runs(memory, initial);
        PageMap::gather(memory, runs)
    }

    /// The runs of pages of `memory` that differ from `initial`, without copying them: what
    /// an image read in place needs ([`crate::image::InPlace`]). A large memory is scanned
    /// on all cores, [`COPY_PIECE`] at a time.
    ///
    /// Pages the kernel says were never touched are not read ([`crate::touched`]); where it
    /// does not say, the memory is mapped ahead in one call and every page read. So `memory`
    /// must be mapped as an agent's linear memory is: every page never touched holds zeros,
    /// or what `initial` holds for it.
    pub fn changed_runs(memory: &[u8], initial: &InitialImage) -> Vec<PageRun> {
        PageMap::changed_runs_touched(memory, initial, crate::touched::pages(memory))
    }

    /// [`PageMap::changed_runs`], given what [`crate::touched::pages`] said of `memory`.
    pub fn changed_runs_touched(
        memory: &[u8],
        initial: &InitialImage,
        touched: Option<Vec<bool>>,
    ) -> Vec<PageRun> {
        if touched.is_none() {
            crate::prefault::read(memory);
        }
        let touched = touched.as_deref();
        if memory.len() < PARALLEL_COPY {
            return scan(memory, 0, initial, touched);
        }
        let mut pieces: Vec<Vec<PageRun>> = vec![Vec::new(); memory.len().div_ceil(COPY_PIECE)];
        rayon_core::scope(|scope| {
            for (i, (piece, runs)) in memory.chunks(COPY_PIECE).zip(&mut pieces).enumerate() {
                let first = i * COPY_PIECE / PAGE_SIZE;
                let touched = touched.and_then(|t| t.get(first..));
                scope.spawn(move |_| *runs = scan(piece, first as u32, initial, touched));
            }
        });
        let mut runs: Vec<PageRun> = Vec::new();
        for run in pieces.into_iter().flatten() {
            match runs.last_mut() {
                Some(last) if last.start + last.count == run.start => last.count += run.count,
                _ => runs.push(run),
            }
        }
        runs
    }

    /// The pages of `runs` copied out of `memory`, which holds them.
    pub fn gather(memory: &[u8], runs: Vec<PageRun>) -> PageMap {
        let total = runs.iter().map(|r| r.bytes().len()).sum();
        let data = if total >= PARALLEL_COPY {
            gather_on_all_cores(memory, &runs, total)
        } else {
            let mut data = crate::prefault::buffer(total);
            for run in &runs {
                data.extend_from_slice(&memory[run.bytes()]);
            }
            data
        };
        PageMap {
            runs,
            data: data.into(),
        }
    }

    /// Number of pages carried.
    pub fn pages(&self) -> u64 {
        self.runs.iter().map(|r| u64::from(r.count)).sum()
    }

    /// Writes the carried pages into `memory`, which holds the initial image.
    ///
    /// The runs must have been checked against `memory.len()` (see [`PageMap::check`]).
    pub fn apply(&self, memory: &mut [u8]) {
        let mut at = 0;
        for run in &self.runs {
            let len = run.bytes().len();
            if let (Some(region), Some(pages)) =
                (memory.get_mut(run.bytes()), self.data.get(at..at + len))
            {
                crate::prefault::write(region);
                region.copy_from_slice(pages);
            }
            at += len;
        }
    }

    /// Writes `part`, the bytes at `from..` of a body that lays out the pages of `runs` end
    /// to end, where those pages go in `memory`: a body can be applied piece by piece as it
    /// arrives. The runs must have been checked against `memory.len()`; bytes past the
    /// runs' pages are left out.
    pub fn write_part(runs: &[PageRun], from: usize, part: &[u8], memory: &mut [u8]) {
        let (mut at, to) = (0, from + part.len());
        for run in runs {
            let range = run.bytes();
            let (start, end) = (at, at + range.len());
            at = end;
            if end <= from {
                continue;
            }
            if start >= to {
                break;
            }
            let (lo, hi) = (start.max(from), end.min(to));
            let target = range.start + (lo - start)..range.start + (hi - start);
            if let (Some(region), Some(bytes)) =
                (memory.get_mut(target), part.get(lo - from..hi - from))
            {
                region.copy_from_slice(bytes);
            }
        }
    }

    /// The carried pages with their indices, in page order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &[u8])> {
        indices(&self.runs).zip(self.data.chunks_exact(PAGE_SIZE))
    }

    /// Rebuilds the pages of `runs` from `body` (the pages not in `left_out`, in order) and
    /// `base` (every page in `left_out`). The runs must have been checked (see
    /// [`PageMap::check`]) and `body` must hold exactly the pages not left out.
    ///
    /// # Errors
    /// When a left-out page is not among the runs or not in `base`.
    pub(crate) fn fill_in(
        runs: Vec<PageRun>,
        left_out: &[PageRun],
        body: &[u8],
        base: &PageMap,
    ) -> Result<PageMap, PagesError> {
        // Sized by what is at hand, not by the (untrusted) runs.
        let mut data = Vec::with_capacity(body.len() + base.data.len());
        let mut left = indices(left_out).peekable();
        let mut held = base.iter().peekable();
        let mut sent = body.chunks_exact(PAGE_SIZE);
        for index in indices(&runs) {
            if left.next_if_eq(&index).is_none() {
                data.extend_from_slice(sent.next().ok_or(PagesError::BodyEndsEarly)?);
                continue;
            }
            while held.next_if(|(i, _)| *i < index).is_some() {}
            match held.next_if(|(i, _)| *i == index) {
                Some((_, page)) => data.extend_from_slice(page),
                None => return Err(PagesError::NotInBase(index)),
            }
        }
        if let Some(index) = left.next() {
            return Err(PagesError::NotCarried(index));
        }
        Ok(PageMap {
            runs,
            data: data.into(),
        })
    }

    /// Checks that the runs are sorted, disjoint, inside a memory of `memory_bytes` and match
    /// the amount of data. Runs come from untrusted images.
    ///
    /// # Errors
    /// [`PagesError::BadRun`] naming the first run that does not fit.
    pub fn check(runs: &[PageRun], memory_bytes: u64) -> Result<u64, PagesError> {
        let limit = memory_bytes / PAGE_SIZE as u64;
        let mut next = 0u64;
        let mut pages = 0u64;
        for run in runs {
            let start = u64::from(run.start);
            let end = start + u64::from(run.count);
            if run.count == 0 || start < next || end > limit {
                return Err(PagesError::BadRun {
                    start: run.start,
                    count: run.count,
                    limit,
                });
            }
            next = end;
            pages += u64::from(run.count);
        }
        Ok(pages)
    }
}

/// The runs of pages of `memory` (whose first page is page `first`) that differ from
/// `initial`, among those `touched` (indexed from `first`; `None`: all) says may.
fn scan(
    memory: &[u8],
    first: u32,
    initial: &InitialImage,
    touched: Option<&[bool]>,
) -> Vec<PageRun> {
    let mut runs = Vec::new();
    for (i, (index, page)) in (first..).zip(memory.chunks(PAGE_SIZE)).enumerate() {
        if touched.is_some_and(|t| t.get(i) == Some(&false)) {
            continue; // as it was mapped: zeros, or the initial image
        }
        let unchanged = match initial.page(index) {
            Some(init) => page == init,
            None => is_zero(page),
        };
        if !unchanged {
            push_index(&mut runs, index);
        }
    }
    runs
}

/// Every page index of `runs`, in order.
pub(crate) fn indices(runs: &[PageRun]) -> impl Iterator<Item = u32> + '_ {
    runs.iter()
        .flat_map(|r| r.start..r.start.saturating_add(r.count))
}

/// Adds page `index` to `runs`, extending the last run when it is the next page.
pub(crate) fn push_index(runs: &mut Vec<PageRun>, index: u32) {
    match runs.last_mut() {
        Some(run) if run.start + run.count == index => run.count += 1,
        _ => runs.push(PageRun {
            start: index,
            count: 1,
        }),
    }
}

fn is_zero(page: &[u8]) -> bool {
    // An OR-reduction without early exit vectorizes well: this dominates capture of big memories.
    page.iter().fold(0u8, |acc, b| acc | b) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_written_in_any_pieces_is_the_body_applied_whole() {
        let runs = vec![
            PageRun { start: 1, count: 2 },
            PageRun { start: 4, count: 1 },
            PageRun { start: 7, count: 3 },
        ];
        let body: Vec<u8> = (0..6 * PAGE_SIZE).map(|i| (i % 251) as u8 + 1).collect();
        let map = PageMap {
            runs: runs.clone(),
            data: body.clone().into(),
        };
        let mut whole = vec![0u8; 10 * PAGE_SIZE];
        map.apply(&mut whole);
        for piece in [
            1,
            7,
            PAGE_SIZE - 1,
            PAGE_SIZE,
            3 * PAGE_SIZE + 5,
            body.len(),
        ] {
            let mut memory = vec![0u8; 10 * PAGE_SIZE];
            for (n, part) in body.chunks(piece).enumerate() {
                PageMap::write_part(&runs, n * piece, part, &mut memory);
            }
            assert!(memory == whole, "pieces of {piece} bytes");
        }
        // Bytes past the runs' pages go nowhere.
        let mut memory = whole.clone();
        PageMap::write_part(&runs, body.len(), &[9; 64], &mut memory);
        assert!(memory == whole);
    }

    #[test]
    fn capture_skips_zero_and_initial_pages_and_apply_restores() {
        let mut initial = InitialImage::default();
        initial.write(PAGE_SIZE as u64 - 2, b"data!");
        let mut memory = vec![0u8; 8 * PAGE_SIZE];
        memory[PAGE_SIZE - 2..PAGE_SIZE + 3].copy_from_slice(b"data!");
        let map = PageMap::capture(&memory, &initial);
        assert_eq!(
            map.pages(),
            0,
            "memory equal to the initial image carries nothing"
        );

        memory[5 * PAGE_SIZE] = 9; // a dirty zero page
        memory[6 * PAGE_SIZE + 7] = 1;
        memory[PAGE_SIZE..PAGE_SIZE + 3].fill(0); // a cleared data page must be carried
        let map = PageMap::capture(&memory, &initial);
        assert_eq!(
            map.runs,
            vec![
                PageRun { start: 1, count: 1 },
                PageRun { start: 5, count: 2 }
            ]
        );
        assert_eq!(PageMap::check(&map.runs, memory.len() as u64), Ok(3));

        let mut fresh = vec![0u8; 8 * PAGE_SIZE];
        fresh[PAGE_SIZE - 2..PAGE_SIZE + 3].copy_from_slice(b"data!");
        map.apply(&mut fresh);
        assert_eq!(fresh, memory);
    }

    #[test]
    fn a_large_capture_copied_on_all_cores_holds_the_same_bytes() {
        // Runs of odd sizes on both sides of piece boundaries, and one across several pieces.
        let pages = (PARALLEL_COPY + 3 * COPY_PIECE) / PAGE_SIZE;
        let mut memory = vec![0u8; pages * PAGE_SIZE];
        for (i, page) in memory.chunks_mut(PAGE_SIZE).enumerate() {
            if i % 7 != 3 && !(1000..1300).contains(&i) {
                page.fill((i % 251) as u8 | 1);
                page[i % PAGE_SIZE] = (i / 251) as u8;
            }
        }
        let map = PageMap::capture(&memory, &InitialImage::default());
        assert_eq!(
            map.runs,
            scan(&memory, 0, &InitialImage::default(), None),
            "the runs found on all cores are not those of one pass (runs across pieces are joined)"
        );
        assert!(
            map.data.len() >= PARALLEL_COPY,
            "too small to be copied in parallel"
        );
        let serial: Vec<u8> = map
            .runs
            .iter()
            .flat_map(|r| &memory[r.bytes()])
            .copied()
            .collect();
        assert!(
            map.data == serial,
            "a piece was copied from the wrong place"
        );
        let mut restored = vec![0u8; memory.len()];
        map.apply(&mut restored);
        assert!(restored == memory);
    }

    #[test]
    fn check_rejects_bad_runs() {
        let run = |start, count| PageRun { start, count };
        assert!(PageMap::check(&[run(0, 0)], 1 << 20).is_err());
        assert!(PageMap::check(&[run(3, 1), run(2, 1)], 1 << 20).is_err());
        assert!(PageMap::check(&[run(250, 7)], 1 << 20).is_err());
        assert!(PageMap::check(&[run(u32::MAX, u32::MAX)], 1 << 20).is_err());
        assert_eq!(PageMap::check(&[run(0, 2), run(2, 254)], 1 << 20), Ok(256));
    }
}
