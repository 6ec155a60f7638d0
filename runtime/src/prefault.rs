//! Hints that map memory in one call before it is read or written page by page.
//!
//! The first touch of each 4 KiB page traps into the kernel: filling a large fresh buffer
//! page by page costs several times what a transparent huge page hint and one populating
//! `madvise` cost. These are hints only: where the kernel refuses them (other systems, older kernels, emulators) the
//! pages fault in on first touch as before, with the same bytes.

/// Regions smaller than this are left to fault in: the calls would cost more than they save.
const WORTH_IT: usize = 256 << 10;

/// A huge page: regions at least this large also ask for transparent huge pages.
const HUGE: usize = 2 << 20;

/// Maps every page of `memory` for reading, as reading it page by page would.
pub fn read(memory: &[u8]) {
    #[cfg(target_os = "linux")]
    // SAFETY: MADV_POPULATE_READ maps pages of this live region as a read would; it changes
    // no byte and no protection.
    unsafe {
        advise(memory.as_ptr(), memory.len(), &[libc::MADV_POPULATE_READ]);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = memory;
}

/// Maps every page of `region`, which is about to be written whole, for writing.
pub fn write(region: &mut [u8]) {
    #[cfg(target_os = "linux")]
    // SAFETY: MADV_HUGEPAGE and MADV_POPULATE_WRITE on a live region we hold mutably change
    // no byte's value (populating writes nothing visible) and no protection.
    unsafe {
        advise(
            region.as_mut_ptr(),
            region.len(),
            &[libc::MADV_HUGEPAGE, libc::MADV_POPULATE_WRITE],
        );
    }
    #[cfg(not(target_os = "linux"))]
    let _ = region;
}

/// Asks for transparent huge pages in `region`, which is about to be written whole but may
/// never be (bytes a peer announced): it faults in 2 MiB at a time as it is written, and
/// nothing is mapped ahead for bytes that do not come.
pub fn huge(region: &mut [u8]) {
    #[cfg(target_os = "linux")]
    // SAFETY: MADV_HUGEPAGE on a live region we hold mutably changes no byte's value and no
    // protection.
    unsafe {
        advise(region.as_mut_ptr(), region.len(), &[libc::MADV_HUGEPAGE]);
    }
    #[cfg(not(target_os = "linux"))]
    let _ = region;
}

/// An empty buffer with room for `capacity` bytes, mapped ahead for writing.
pub fn buffer(capacity: usize) -> Vec<u8> {
    let mut buf: Vec<u8> = Vec::with_capacity(capacity);
    #[cfg(target_os = "linux")]
    // SAFETY: the spare capacity is memory this Vec owns; the hints change no byte a reader
    // could see (it is uninitialised and nothing reads it) and no protection.
    unsafe {
        advise(
            buf.as_mut_ptr(),
            capacity,
            &[libc::MADV_HUGEPAGE, libc::MADV_POPULATE_WRITE],
        );
    }
    buf
}

/// Applies `advice` to the whole pages inside `len` bytes at `ptr`; huge page advice only to
/// regions of at least [`HUGE`]. Errors are ignored: the advice is a hint.
///
/// # Safety
/// `ptr..ptr + len` must be memory the caller may access, and every advice must leave its
/// contents and protection as they are.
#[cfg(target_os = "linux")]
unsafe fn advise(ptr: *const u8, len: usize, advice: &[libc::c_int]) {
    let page = crate::snapshot::PAGE_SIZE;
    let start = (ptr as usize).next_multiple_of(page);
    let end = (ptr as usize + len) / page * page;
    if end <= start || end - start < WORTH_IT {
        return;
    }
    for &a in advice {
        if a == libc::MADV_HUGEPAGE && end - start < HUGE {
            continue;
        }
        // SAFETY: within the caller's region, by this function's contract.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, a) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hinted_memory_keeps_its_bytes() {
        let mut buf = buffer(4 << 20);
        assert!(buf.capacity() >= 4 << 20 && buf.is_empty());
        buf.extend((0..4u32 << 20).map(|i| (i % 251) as u8));
        let copy = buf.clone();
        write(&mut buf[1..]);
        read(&buf[3..]);
        huge(&mut buf[5..]);
        assert_eq!(buf, copy, "a hint changed a byte");
    }
}
