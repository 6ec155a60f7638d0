//! What the fuzz targets share: an allocator that makes one huge allocation a crash.
//!
//! Without a sanitizer libFuzzer cannot see allocations (`-malloc_limit_mb` needs the
//! sanitizers' malloc hooks), and a reservation of gigabytes costs no memory until it is
//! touched, so `-rss_limit_mb` misses it too. Yet a host that reserves what a hostile header
//! claims aborts where address space is limited. Each target installs [`Capped`]:
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOCATOR: agent_runtime_fuzz::Capped = agent_runtime_fuzz::Capped;
//! ```

use std::alloc::{GlobalAlloc, Layout, System};

/// Largest single allocation a target may make. Inputs stay under 4 KiB (libFuzzer's default
/// `-max_len`), and nothing legitimate decoded from them comes near this.
pub const MAX_ALLOCATION: usize = 1 << 30;

/// The system allocator, aborting (a crash libFuzzer records) on any allocation larger than
/// [`MAX_ALLOCATION`].
pub struct Capped;

fn check(size: usize) {
    if size > MAX_ALLOCATION {
        // No panic (unwinding out of an allocator is undefined) and no formatting that could
        // allocate: a fixed message, then abort.
        eprintln!("fuzz: a single allocation of more than 1 GiB");
        std::process::abort();
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Capped {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        // SAFETY: the caller upholds `GlobalAlloc::alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        check(layout.size());
        // SAFETY: the caller upholds `GlobalAlloc::alloc_zeroed`'s contract.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller upholds `GlobalAlloc::dealloc`'s contract.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        check(new_size);
        // SAFETY: the caller upholds `GlobalAlloc::realloc`'s contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}
