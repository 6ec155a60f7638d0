//! Fiber stacks kept mapped for the next instance.
//!
//! Every agent runs on a fiber stack of its own (its host calls are async). wasmtime maps a
//! fresh stack for each instance and unmaps it when the instance goes: on a host where agents
//! hop in and out thousands of times a second, mapping, protecting, faulting in and unmapping
//! stacks takes a noticeable share of the CPU. Here a stack an instance gave back is
//! kept, up to [`KEEP`] of them, and handed to the next instance as it is.
//!
//! A reused stack holds what its last agent's host calls left on it. wasmtime asks for a
//! zeroed stack only when configured to (`async_stack_zeroing`, off by default, as in its own
//! pooling allocator): Wasm code cannot read below its own frames, so the bytes are not
//! visible to the next agent. When asked, the stack is emptied before it is handed out.

use std::ops::Range;
use std::sync::{Arc, Mutex};
use wasmtime::{StackCreator, StackMemory};

/// Most idle stacks kept. Each holds its touched pages (tens of KiB for an agent's host calls)
/// and [`crate::engine::MAX_WASM_STACK`]-sized address space.
pub const KEEP: usize = 256;

/// Hands out fiber stacks, reusing those instances gave back.
#[derive(Default)]
pub struct StackPool {
    idle: Arc<Mutex<Vec<Mapping>>>,
}

// SAFETY: every stack handed out is a private mapping of `size` read-write bytes, page aligned,
// with a guard page below it, used by one fiber at a time (a stack is pooled only once wasmtime
// dropped it), and zero filled when wasmtime asks for that.
unsafe impl StackCreator for StackPool {
    fn new_stack(&self, size: usize, zeroed: bool) -> wasmtime::Result<Box<dyn StackMemory>> {
        let reused = {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            let at = idle.iter().rposition(|m| m.size == size);
            at.map(|at| idle.swap_remove(at))
        };
        let mapping = match reused {
            Some(mapping) => {
                if zeroed {
                    mapping.empty()?;
                }
                mapping
            }
            None => Mapping::new(size)?,
        };
        Ok(Box::new(PooledStack {
            mapping: Some(mapping),
            idle: self.idle.clone(),
        }))
    }
}

/// A stack in use; given back to the pool when wasmtime drops it.
struct PooledStack {
    mapping: Option<Mapping>,
    idle: Arc<Mutex<Vec<Mapping>>>,
}

impl PooledStack {
    fn mapping(&self) -> &Mapping {
        self.mapping
            .as_ref()
            .expect("a stack in use has its mapping")
    }
}

impl Drop for PooledStack {
    fn drop(&mut self) {
        if let Some(mapping) = self.mapping.take() {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            if idle.len() < KEEP {
                idle.push(mapping);
            }
        }
    }
}

// SAFETY: see `StackPool`'s `StackCreator`: the ranges below describe the mapping exactly.
unsafe impl StackMemory for PooledStack {
    fn top(&self) -> *mut u8 {
        let m = self.mapping();
        // SAFETY: one past the end of the mapping, which is guard + size bytes long.
        unsafe { m.base.add(m.guard + m.size) }
    }

    fn range(&self) -> Range<usize> {
        let m = self.mapping();
        let bottom = m.base as usize + m.guard;
        bottom..bottom + m.size
    }

    fn guard_range(&self) -> Range<*mut u8> {
        let m = self.mapping();
        // SAFETY: the guard page is the first page of the mapping.
        m.base..unsafe { m.base.add(m.guard) }
    }
}

/// A private anonymous mapping: one inaccessible guard page, then `size` read-write bytes.
struct Mapping {
    base: *mut u8,
    guard: usize,
    size: usize,
}

// SAFETY: the mapping is owned by this value alone; the raw pointer is just its address.
unsafe impl Send for Mapping {}
// SAFETY: as above; `&Mapping` only reads the address and sizes.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(size: usize) -> wasmtime::Result<Mapping> {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .map_err(|_| wasmtime::Error::msg("the system page size is unknown"))?;
        let size = size.div_ceil(page) * page;
        let len = size + page;
        // SAFETY: a fresh private mapping at an address the kernel picks; nothing aliases it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(wasmtime::Error::msg(format!(
                "could not map a {} KiB fiber stack: {}",
                len >> 10,
                std::io::Error::last_os_error()
            )));
        }
        let mapping = Mapping {
            base: base.cast(),
            guard: page,
            size,
        };
        // SAFETY: the range lies inside the mapping just made; the guard page stays PROT_NONE.
        let made = unsafe {
            libc::mprotect(
                base.cast::<u8>().add(page).cast(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        if made != 0 {
            return Err(wasmtime::Error::msg(format!(
                "could not make a fiber stack writable: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(mapping)
    }

    /// Gives the stack's pages back to the kernel: they read as zeros when next touched.
    fn empty(&self) -> wasmtime::Result<()> {
        // SAFETY: the range is this mapping's read-write part, which no fiber uses now.
        let done = unsafe {
            libc::madvise(
                self.base.add(self.guard).cast(),
                self.size,
                libc::MADV_DONTNEED,
            )
        };
        if done != 0 {
            return Err(wasmtime::Error::msg(format!(
                "could not empty a fiber stack: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`, which nothing uses any more.
        unsafe {
            libc::munmap(self.base.cast(), self.guard + self.size);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_and_read(stack: &dyn StackMemory) -> u8 {
        let range = stack.range();
        let last = (range.end - 1) as *mut u8;
        // SAFETY: the byte lies inside the stack's read-write range, which this test owns.
        unsafe {
            let before = last.read();
            last.write(0xA5);
            before
        }
    }

    #[test]
    fn a_returned_stack_is_handed_out_again_and_emptied_when_asked() {
        let pool = StackPool::default();
        let first = pool.new_stack(64 << 10, false).expect("stack");
        assert_eq!(first.top() as usize, first.range().end);
        assert_eq!(first.guard_range().end as usize, first.range().start);
        assert_eq!(write_and_read(&*first), 0, "a fresh stack is zero filled");
        let top = first.top();
        drop(first);

        let again = pool.new_stack(64 << 10, false).expect("stack");
        assert_eq!(again.top(), top, "the returned stack is reused");
        assert_eq!(write_and_read(&*again), 0xA5, "kept as it was");
        drop(again);

        let zeroed = pool.new_stack(64 << 10, true).expect("stack");
        assert_eq!(zeroed.top(), top);
        assert_eq!(
            write_and_read(&*zeroed),
            0,
            "emptied when a zeroed stack is asked for"
        );

        let other = pool.new_stack(128 << 10, false).expect("stack");
        assert_ne!(
            other.top(),
            top,
            "a stack of another size is not handed out"
        );
        assert_eq!(other.range().len(), 128 << 10);
    }

    #[test]
    fn at_most_keep_stacks_are_kept() {
        let pool = StackPool::default();
        let stacks: Vec<_> = (0..KEEP + 8)
            .map(|_| pool.new_stack(16 << 10, false).expect("stack"))
            .collect();
        drop(stacks);
        assert_eq!(pool.idle.lock().expect("pool").len(), KEEP);
    }
}
