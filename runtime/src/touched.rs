//! Which pages of a memory were ever touched, as the kernel's page map says.
//!
//! A capture compares every page of the agent's memory with the module's initial image. A
//! page the kernel holds neither in memory nor in swap was never touched since it was mapped:
//! it reads as zeros (anonymous memory) or as the file it maps (the module's initial image,
//! which wasmtime maps copy-on-write). So it cannot differ, and need not be read, nor mapped
//! to be read, which would cost a small agent's hop more than the scan itself.
//! `/proc/self/pagemap` tells, one `u64` per page.
//!
//! The page map is trusted only once it has answered right about pages just written and left
//! alone: under an emulator (`qemu-user` runs the heterogeneity test's hosts) it may describe
//! the emulator's own pages, or in the other byte order, and skipping a page that changed
//! would lose the agent's state.

/// The size of the pages this reports on (the page map's granularity is the kernel's page,
/// a multiple of it).
const PAGE: usize = crate::snapshot::PAGE_SIZE;

/// For each [`PAGE`] of `memory`, whether it may have been touched since it was mapped:
/// `false` only for a page the kernel holds neither in memory nor in swap. `None` where the
/// kernel does not say (not Linux, the page map unreadable): then every page may have been.
pub fn pages(memory: &[u8]) -> Option<Vec<bool>> {
    #[cfg(target_os = "linux")]
    return linux::pages(memory);
    #[cfg(not(target_os = "linux"))]
    {
        let _ = memory;
        None
    }
}

#[cfg(target_os = "linux")]
mod linux {
    use super::PAGE;
    use std::fs::File;
    use std::os::unix::fs::FileExt;
    use std::sync::OnceLock;

    /// Bits of a page map entry: the page is in memory, or in swap.
    pub(super) const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;

    pub(super) fn pages(memory: &[u8]) -> Option<Vec<bool>> {
        static PAGEMAP: OnceLock<Option<(File, usize)>> = OnceLock::new();
        let (map, host) = PAGEMAP.get_or_init(trusted).as_ref()?;
        read(map, *host, memory)
    }

    /// Pages of the probe, and those of them written.
    pub(super) const PROBE: usize = 16;
    pub(super) const WRITTEN: [usize; 6] = [0, 2, 5, 6, 11, 13];

    /// The page map and the kernel's page size, if the map describes a fresh mapping exactly:
    /// each written page present and not swapped, with the bits the kernel keeps zero clear,
    /// each other page an empty entry, and `mincore` (which an emulator translates) agreeing.
    /// Read in the wrong byte order (a big-endian guest of a little-endian kernel, where the
    /// host may see page frame numbers), a written page's entry passes with a chance of 1 in
    /// 64; all six together, about 1 in 7·10¹⁰.
    fn trusted() -> Option<(File, usize)> {
        let map = File::open("/proc/self/pagemap").ok()?;
        // SAFETY: sysconf has no preconditions.
        let host = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok()?;
        if host == 0 || host % PAGE != 0 {
            return None;
        }
        let len = PROBE * host;
        let mut entries = [0u8; PROBE * 8];
        let mut resident = [0u8; PROBE];
        // SAFETY: a new private anonymous mapping that nothing else refers to; it is written
        // and queried only within its length, then unmapped.
        let answered = unsafe {
            let probe = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if probe == libc::MAP_FAILED {
                return None;
            }
            for page in WRITTEN {
                probe.cast::<u8>().add(page * host).write_volatile(1);
            }
            let first = (probe as usize / host * 8) as u64;
            let read = map.read_exact_at(&mut entries, first).is_ok();
            let listed = libc::mincore(probe, len, resident.as_mut_ptr().cast()) == 0;
            libc::munmap(probe, len);
            read && listed
        };
        let entries: Vec<u64> = entries
            .chunks_exact(8)
            .map(|e| u64::from_ne_bytes(e.try_into().unwrap_or_default()))
            .collect();
        let right = describes_probe(&entries, &resident);
        if !(answered && right) {
            tracing::debug!("the kernel's page map is not trusted here: captures read every page");
        }
        (answered && right).then_some((map, host))
    }

    /// Whether the page map's `entries` and `mincore`'s `resident` bytes for the probe
    /// describe it: [`WRITTEN`] pages present and not swapped, with the bits the kernel keeps
    /// zero clear, every other page an empty entry and not resident.
    pub(super) fn describes_probe(entries: &[u64], resident: &[u8]) -> bool {
        const KEPT_ZERO: u64 = 0b1_1111 << 58; // bits 58-60 zero, 61 file/shared, 62 swapped
        entries.len() == PROBE
            && resident.len() == PROBE
            && entries
                .iter()
                .zip(resident)
                .enumerate()
                .all(|(page, (&entry, &r))| match WRITTEN.contains(&page) {
                    true => entry & PRESENT != 0 && entry & KEPT_ZERO == 0 && r & 1 == 1,
                    false => entry == 0 && r & 1 == 0,
                })
    }

    /// Reads the entries of `memory`'s pages from `map`, for pages of `host` bytes.
    fn read(map: &File, host: usize, memory: &[u8]) -> Option<Vec<bool>> {
        if memory.is_empty() {
            return None;
        }
        let start = memory.as_ptr() as usize;
        let (first, last) = (start / host, (start + memory.len() - 1) / host);
        let mut entries = vec![0u8; (last - first + 1) * 8];
        map.read_exact_at(&mut entries, (first * 8) as u64).ok()?;
        let touched = |host_page: usize| {
            let at = (host_page - first) * 8;
            let entry = entries.get(at..at + 8).and_then(|e| e.try_into().ok());
            entry.is_none_or(|e| u64::from_ne_bytes(e) & (PRESENT | SWAPPED) != 0)
        };
        // A page of the slice may straddle two of the kernel's when the slice is not aligned.
        let pages = memory.len().div_ceil(PAGE);
        Some(
            (0..pages)
                .map(|i| {
                    let from = start + i * PAGE;
                    let to = (from + PAGE).min(start + memory.len()) - 1;
                    (from / host..=to / host).any(touched)
                })
                .collect(),
        )
    }
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    /// `pages` fresh anonymous pages, unmapped when dropped.
    struct Fresh(*mut u8, usize);

    impl Fresh {
        fn new(pages: usize) -> Fresh {
            let len = pages * PAGE;
            // SAFETY: a new private anonymous mapping; nothing else refers to it.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(ptr, libc::MAP_FAILED);
            Fresh(ptr.cast(), len)
        }

        fn bytes(&mut self) -> &mut [u8] {
            // SAFETY: the mapping is live, readable and writable, and borrowed mutably once.
            unsafe { std::slice::from_raw_parts_mut(self.0, self.1) }
        }
    }

    impl Drop for Fresh {
        fn drop(&mut self) {
            // SAFETY: the mapping made in `new`, no longer borrowed.
            unsafe { libc::munmap(self.0.cast(), self.1) };
        }
    }

    #[test]
    fn only_pages_written_or_read_are_touched() {
        let mut fresh = Fresh::new(16);
        let memory = fresh.bytes();
        memory[3 * PAGE + 5] = 1;
        memory[7 * PAGE] = 2;
        let read = std::hint::black_box(memory[11 * PAGE + 100]);
        assert_eq!(read, 0);
        let Some(touched) = pages(memory) else {
            panic!(
                "the kernel's page map is unreadable here, or answered wrongly about fresh pages"
            );
        };
        let which: Vec<usize> = (0..16).filter(|&i| touched[i]).collect();
        assert_eq!(which, [3, 7, 11]);
        // A slice that does not start on a page: its pages straddle the kernel's.
        let shifted = pages(&memory[100..9 * PAGE]).unwrap_or_default();
        let which: Vec<usize> = (0..shifted.len()).filter(|&i| shifted[i]).collect();
        assert_eq!(which, [2, 3, 6, 7]);
    }

    #[test]
    fn a_capture_skips_untouched_pages_and_finds_every_changed_one() {
        let mut fresh = Fresh::new(64);
        let memory = fresh.bytes();
        memory[2 * PAGE] = 1;
        memory[3 * PAGE + 4095] = 1;
        memory[40 * PAGE + 9] = 7;
        memory[41 * PAGE] = 7;
        memory[41 * PAGE] = 0; // touched, but back to zero
        let _ = std::hint::black_box(memory[50 * PAGE]); // read only
        let runs = crate::snapshot::PageMap::changed_runs(memory, &Default::default());
        let pages: Vec<u32> = crate::snapshot::indices(&runs).collect();
        assert_eq!(pages, [2, 3, 40]);
    }

    #[test]
    fn a_page_map_read_in_the_wrong_byte_order_is_not_trusted() {
        use linux::{PRESENT, PROBE, WRITTEN, describes_probe};
        let exclusive = 1 << 56;
        let resident: Vec<u8> = (0..PROBE).map(|p| u8::from(WRITTEN.contains(&p))).collect();
        // As a kernel shows it to an unprivileged process (no frame numbers), and to root.
        for frame in [0, 0x12_3456] {
            let entries: Vec<u64> = (0..PROBE)
                .map(|p| match WRITTEN.contains(&p) {
                    true => PRESENT | exclusive | (frame + p as u64),
                    false => 0,
                })
                .collect();
            assert!(describes_probe(&entries, &resident));
            let swapped: Vec<u64> = entries.iter().map(|e| e.swap_bytes()).collect();
            assert!(!describes_probe(&swapped, &resident), "frame {frame:#x}");
        }
        // A frame whose low byte looks like the flags in the wrong order, on one page only.
        let entries: Vec<u64> = (0..PROBE)
            .map(|p| match (WRITTEN.contains(&p), p) {
                (true, 0) => (PRESENT | exclusive | 0x81).swap_bytes(),
                (true, _) => (PRESENT | exclusive | 0x12_3400).swap_bytes(),
                (false, _) => 0,
            })
            .collect();
        assert!(!describes_probe(&entries, &resident));
        // mincore disagreeing (an emulator's page map describing other pages).
        let mut elsewhere = resident.clone();
        elsewhere[1] = 1;
        let genuine: Vec<u64> = (0..PROBE)
            .map(|p| u64::from(WRITTEN.contains(&p)) * (PRESENT | exclusive))
            .collect();
        assert!(!describes_probe(&genuine, &elsewhere));
    }
}
