//! Which pages of a memory were ever touched, as the kernel's page map says.
//!
//! A capture compares every page of the agent's memory with the module's initial image. A
//! page the kernel holds neither in memory nor in swap was never touched since it was mapped:
//! it reads as zeros (anonymous memory) or as the file it maps (the module's initial image,
//! which wasmtime maps copy-on-write). So it cannot differ, and need not be read, nor mapped
//! to be read: mapping a small agent's 1 MiB memory ahead for the scan took 4.7% of the
//! samples of the hops-per-second benchmark. `/proc/self/pagemap` tells, one `u64` per page.
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
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;

    pub(super) fn pages(memory: &[u8]) -> Option<Vec<bool>> {
        static PAGEMAP: OnceLock<Option<(File, usize)>> = OnceLock::new();
        let (map, host) = PAGEMAP.get_or_init(trusted).as_ref()?;
        read(map, *host, memory)
    }

    /// The page map and the kernel's page size, if the map tells which of eight fresh pages
    /// were written.
    fn trusted() -> Option<(File, usize)> {
        let map = File::open("/proc/self/pagemap").ok()?;
        // SAFETY: sysconf has no preconditions.
        let host = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).ok()?;
        if host == 0 || host % PAGE != 0 {
            return None;
        }
        let len = 8 * host;
        // SAFETY: a new private anonymous mapping that nothing else refers to; it is written
        // and read only within its length, then unmapped.
        let answer = unsafe {
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
            let probe = probe.cast::<u8>();
            for page in [0, 2, 5] {
                probe.add(page * host).write_volatile(1);
            }
            let answer = read(&map, host, std::slice::from_raw_parts(probe, len));
            libc::munmap(probe.cast(), len);
            answer
        };
        let written: Vec<bool> = (0..len / PAGE)
            .map(|i| [0, 2, 5].contains(&(i * PAGE / host)))
            .collect();
        (answer? == written).then_some((map, host))
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
}
