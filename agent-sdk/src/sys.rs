//! The raw host imports, wrapped into safe functions that move bytes across the sandbox.

use agent_abi::code;
use std::sync::atomic::{AtomicU32, Ordering};

#[cfg(target_arch = "wasm32")]
mod raw {
    #[link(wasm_import_module = "agent_v1")]
    unsafe extern "C" {
        pub fn context(ptr: *mut u8, cap: usize) -> i32;
        pub fn submit(ptr: *const u8, len: usize) -> i32;
        pub fn take(ptr: *mut u8, cap: usize) -> i32;
        pub fn checkpoint_requested() -> i32;
        pub fn log(level: i32, ptr: *const u8, len: usize);
        pub fn finish(ptr: *const u8, len: usize) -> i32;
    }
}

/// Outside a Wasm host there is nothing to call: say so instead of failing to link.
#[cfg(not(target_arch = "wasm32"))]
#[allow(clippy::missing_safety_doc)]
mod raw {
    fn outside() -> ! {
        panic!(
            "agent-sdk: host functions exist only inside an agent host (build with --target wasm32-wasip1)"
        )
    }
    pub unsafe fn context(_: *mut u8, _: usize) -> i32 {
        outside()
    }
    pub unsafe fn submit(_: *const u8, _: usize) -> i32 {
        outside()
    }
    pub unsafe fn take(_: *mut u8, _: usize) -> i32 {
        outside()
    }
    pub unsafe fn checkpoint_requested() -> i32 {
        outside()
    }
    pub unsafe fn log(_: i32, _: *const u8, _: usize) {
        outside()
    }
    pub unsafe fn finish(_: *const u8, _: usize) -> i32 {
        outside()
    }
}

// The ABI version travels in a custom section so hosts can check it before running anything.
#[cfg(target_arch = "wasm32")]
#[unsafe(link_section = "agent-abi")]
#[used]
static ABI_VERSION: [u8; 4] = agent_abi::ABI_VERSION.to_le_bytes();

/// Calls a `(ptr, cap) -> len` import, growing the buffer until the bytes fit.
fn read_with(mut call: impl FnMut(*mut u8, usize) -> i32) -> Result<Vec<u8>, i32> {
    let mut buf = vec![0u8; 256];
    loop {
        let n = call(buf.as_mut_ptr(), buf.len());
        let Ok(len) = usize::try_from(n) else {
            return Err(n);
        };
        if len <= buf.len() {
            buf.truncate(len);
            return Ok(buf);
        }
        buf.resize(len, 0);
    }
}

pub(crate) fn context() -> Vec<u8> {
    // SAFETY: the host writes at most `cap` bytes at `ptr`, which points into `buf`.
    read_with(|ptr, cap| unsafe { raw::context(ptr, cap) })
        .unwrap_or_else(|code| panic!("agent-sdk: host refused context (code {code})"))
}

pub(crate) fn submit(op: &[u8]) -> i32 {
    // SAFETY: the host only reads `len` bytes at `ptr`.
    unsafe { raw::submit(op.as_ptr(), op.len()) }
}

/// The completed operation's result, or `None` while the host has not completed it.
pub(crate) fn take() -> Option<Vec<u8>> {
    // SAFETY: as in `context`.
    match read_with(|ptr, cap| unsafe { raw::take(ptr, cap) }) {
        Ok(bytes) => Some(bytes),
        Err(code::NO_RESULT) => None,
        Err(code) => panic!("agent-sdk: host refused the operation result (code {code})"),
    }
}

/// Set to 1 by the host when it wants a checkpoint (see `agent_abi::export::CHECKPOINT_FLAG`):
/// reading it costs a load, where asking the host costs a call out of the sandbox.
static CHECKPOINT_FLAG: AtomicU32 = AtomicU32::new(0);

/// The address of the checkpoint flag in linear memory, for the `agent!` macro's export.
#[doc(hidden)]
pub fn checkpoint_flag_address() -> i32 {
    // Linear memory addresses are 32 bits; outside Wasm this is never called by a host.
    std::ptr::from_ref(&CHECKPOINT_FLAG) as usize as i32
}

#[inline]
pub(crate) fn checkpoint_requested() -> bool {
    // SAFETY: no pointers.
    CHECKPOINT_FLAG.load(Ordering::Relaxed) != 0 && unsafe { raw::checkpoint_requested() != 0 }
}

pub(crate) fn log(level: i32, line: &str) {
    // SAFETY: the host only reads `len` bytes at `ptr`.
    unsafe { raw::log(level, line.as_ptr(), line.len()) }
}

pub(crate) fn finish(outcome: &[u8]) -> i32 {
    // SAFETY: the host only reads `len` bytes at `ptr`.
    unsafe { raw::finish(outcome.as_ptr(), outcome.len()) }
}
