//! Writes large files around the page cache.
//!
//! A large agent's image is written and synced by both hosts of its hop. Through the page
//! cache that costs kernel CPU (copying into cache pages, then writing them back) taken from
//! the agent restored and running on the same cores meanwhile, and cache pages from other
//! files; `O_DIRECT` costs a fraction of it and finishes sooner. So files of at least [`DIRECT_MIN`] bytes go straight to the disk, through an aligned
//! bounce buffer; where the file system refuses `O_DIRECT` (tmpfs, some others) they are
//! written as before.

use std::fs::File;
use std::io::Write;
use std::path::Path;

/// Files smaller than this go through the page cache: a synchronous direct write costs a
/// device round trip each, and small files are cheap to cache.
pub const DIRECT_MIN: usize = 4 << 20;

/// Direct writes must start, and be sized, on this boundary (the largest logical block size
/// in use; 512 would do on most disks).
const ALIGN: usize = 4096;

/// Bytes handed to the disk per write.
const CHUNK: usize = 4 << 20;

/// Writes `parts`, one after the other, to `file`, which is empty and open for writing at
/// `path`; large files bypass the page cache when the file system allows. Does not sync.
///
/// # Errors
/// When a write fails.
pub fn write_parts(path: &Path, file: &mut File, parts: &[&[u8]]) -> std::io::Result<()> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    if total >= DIRECT_MIN
        && let Some(direct) = open_direct(path)
    {
        return write_direct(direct, file, parts, total);
    }
    parts.iter().try_for_each(|part| file.write_all(part))
}

#[cfg(target_os = "linux")]
fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

#[cfg(not(target_os = "linux"))]
fn open_direct(_: &Path) -> Option<File> {
    None
}

/// Copies `parts` through an aligned buffer to `direct`, whole blocks at a time; the last
/// partial block goes through `file`, the same file opened without `O_DIRECT`.
fn write_direct(
    mut direct: File,
    file: &mut File,
    parts: &[&[u8]],
    total: usize,
) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut raw = vec![0u8; CHUNK + ALIGN];
    let at = raw.as_ptr().align_offset(ALIGN).min(ALIGN);
    let buf = &mut raw[at..at + CHUNK];
    let (mut filled, mut written) = (0, 0u64);
    for part in parts {
        let mut part = *part;
        while !part.is_empty() {
            let n = part.len().min(CHUNK - filled);
            buf[filled..filled + n].copy_from_slice(&part[..n]);
            (filled, part) = (filled + n, &part[n..]);
            if filled == CHUNK {
                direct.write_all(buf)?;
                (written, filled) = (written + CHUNK as u64, 0);
            }
        }
    }
    let whole = filled / ALIGN * ALIGN;
    direct.write_all(&buf[..whole])?;
    file.write_all_at(&buf[whole..filled], written + whole as u64)?;
    debug_assert_eq!(written + filled as u64, total as u64);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u32).wrapping_mul(2654435761).to_le_bytes()[3] ^ seed)
            .collect()
    }

    #[test]
    fn parts_land_whole_and_in_order_whatever_their_sizes() {
        let dir = tempfile::tempdir().unwrap();
        // Below the threshold; one block exactly past it; a header, a body and a tail that
        // cross chunk and block boundaries.
        let cases: Vec<Vec<Vec<u8>>> = vec![
            vec![pattern(1000, 1)],
            vec![pattern(DIRECT_MIN, 2)],
            vec![pattern(77, 3), pattern(CHUNK * 2 + 5000, 4), pattern(3, 5)],
            vec![pattern(DIRECT_MIN + ALIGN, 6), Vec::new()],
        ];
        for (i, parts) in cases.iter().enumerate() {
            let path = dir.path().join(format!("f{i}"));
            let mut file = File::create(&path).unwrap();
            let slices: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
            write_parts(&path, &mut file, &slices).unwrap();
            file.sync_all().unwrap();
            let back = std::fs::read(&path).unwrap();
            assert_eq!(back, parts.concat(), "case {i}");
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_large_file_bypasses_the_page_cache_where_the_file_system_allows() {
        // Files in the working directory's file system (a disk, unlike /tmp on some hosts).
        let dir = tempfile::tempdir_in(env!("CARGO_MANIFEST_DIR")).unwrap();
        let path = dir.path().join("big");
        let mut file = File::create(&path).unwrap();
        let direct_ok = open_direct(&path).is_some();
        let data = pattern(DIRECT_MIN * 2 + 123, 9);
        write_parts(&path, &mut file, &[&data]).unwrap();
        file.sync_all().unwrap();
        if direct_ok {
            let reader = File::open(&path).unwrap();
            assert!(
                cached_pages(&reader, data.len()) <= 1,
                "only the tail block went through the page cache"
            );
        }
        assert_eq!(std::fs::read(&path).unwrap_or_default(), data);
    }

    /// Pages of the first `len` bytes of `file` that the page cache holds (`mincore`).
    #[cfg(target_os = "linux")]
    fn cached_pages(file: &File, len: usize) -> usize {
        use std::os::fd::AsRawFd;
        let page = 4096;
        let pages = len.div_ceil(page);
        // SAFETY: a shared read-only mapping of `len` bytes of an open file, unmapped below;
        // mincore only reads the mapping's residency into `vec`, which has one byte per page.
        unsafe {
            let map = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            );
            assert_ne!(map, libc::MAP_FAILED);
            let mut vec = vec![0u8; pages];
            let rc = libc::mincore(map, len, vec.as_mut_ptr());
            libc::munmap(map, len);
            assert_eq!(rc, 0);
            vec.iter().filter(|&&b| b & 1 == 1).count()
        }
    }
}
