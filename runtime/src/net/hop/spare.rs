//! The receive buffer of a large arriving image, kept for the next one.
//!
//! A large image is read into a buffer of its size. A fresh buffer costs a page fault and
//! a cleared page for each of its pages (on a VM, the hypervisor may have to back them
//! again too), on the same cores that carry the transfer: the benchmark's hops read their
//! images more slowly than a bare transfer of the same bytes (BENCHMARKS.md). A host keeps
//! the buffer of its last large arrival, so the next one writes into pages already mapped,
//! and gives it back to the system once it has gone unused for [`KEEP_FOR`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

/// How long a kept buffer waits for the next large arrival before it is freed.
pub const KEEP_FOR: Duration = Duration::from_secs(30);

/// At most one kept receive buffer, for reads of at least `min` bytes.
pub struct Spare {
    /// Smaller reads get a fresh buffer and give it back to the system: a small image must
    /// not hold a large buffer, nor a small buffer stand in for a large one.
    min: usize,
    kept: Mutex<Option<Vec<u8>>>,
    /// Counts buffers given back, so that a timer knows whether its buffer is still the one
    /// kept.
    returns: AtomicU64,
}

impl Spare {
    /// Keeps buffers for reads of at least `min` bytes.
    pub fn new(min: usize) -> Spare {
        Spare {
            min,
            kept: Mutex::default(),
            returns: AtomicU64::default(),
        }
    }

    /// A buffer of `len` bytes to read into: the kept one when the read is large and the
    /// buffer large enough, else a fresh one. Its bytes are whatever the last image left.
    pub fn take(&self, len: usize) -> Vec<u8> {
        if len < self.min {
            return fresh(len);
        }
        let kept = self.kept.lock().ok().and_then(|mut k| k.take());
        match kept {
            Some(mut buf) if buf.capacity() >= len => {
                // Within the capacity: zeros are written only past the last image's length.
                buf.resize(len, 0);
                buf
            }
            _ => fresh(len),
        }
    }

    /// `buf` as shared bytes; a large one is kept again once the last of them is dropped.
    pub fn lend(self: &Arc<Self>, buf: Vec<u8>) -> bytes::Bytes {
        if buf.len() < self.min {
            return bytes::Bytes::from(buf);
        }
        bytes::Bytes::from_owner(Lent {
            buf,
            home: Arc::downgrade(self),
        })
    }

    /// Keeps `buf` unless a larger one is kept, and frees it after [`KEEP_FOR`] unused.
    fn put(self: &Arc<Self>, buf: Vec<u8>) {
        let Ok(mut kept) = self.kept.lock() else {
            return;
        };
        if kept
            .as_ref()
            .is_some_and(|k| k.capacity() >= buf.capacity())
        {
            return;
        }
        // Without a runtime to free it later, it is not kept.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        *kept = Some(buf);
        let nth = self.returns.fetch_add(1, Ordering::SeqCst) + 1;
        let spare = Arc::downgrade(self);
        runtime.spawn(async move {
            tokio::time::sleep(KEEP_FOR).await;
            if let Some(spare) = spare.upgrade() {
                spare.free_unless_returned_since(nth);
            }
        });
    }

    /// Frees the kept buffer if no buffer was given back after the `nth`.
    fn free_unless_returned_since(&self, nth: u64) {
        if self.returns.load(Ordering::SeqCst) == nth
            && let Ok(mut kept) = self.kept.lock()
        {
            kept.take();
        }
    }

    /// Bytes of the buffer kept now.
    #[cfg(test)]
    fn kept_bytes(&self) -> usize {
        (self.kept.lock().ok())
            .and_then(|k| k.as_ref().map(Vec::capacity))
            .unwrap_or(0)
    }
}

/// A fresh buffer of `len` zero bytes, backed by huge pages where they are worth it.
pub fn fresh(len: usize) -> Vec<u8> {
    let mut bytes = vec![0u8; len];
    crate::prefault::huge(&mut bytes);
    bytes
}

/// A buffer lent out as [`bytes::Bytes`]: it goes back to its [`Spare`] when dropped.
struct Lent {
    buf: Vec<u8>,
    home: Weak<Spare>,
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        if let Some(spare) = self.home.upgrade() {
            spare.put(std::mem::take(&mut self.buf));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_lent_buffer_comes_back_for_the_next_read_and_goes_after_a_while_unused() {
        let spare = Arc::new(Spare::new(4096));
        let mut first = spare.take(1 << 20);
        first[..4].copy_from_slice(b"page");
        let at = first.as_ptr();
        let shared = spare.lend(first);
        let slice = shared.slice(0..4);
        drop(shared);
        assert_eq!(spare.kept_bytes(), 0, "kept while a share is alive");
        assert_eq!(&slice[..], b"page");
        drop(slice);
        assert_eq!(spare.kept_bytes(), 1 << 20);

        // A smaller read reuses it; a larger one gets a fresh buffer.
        let second = spare.take(4096);
        assert_eq!((second.as_ptr(), second.len()), (at, 4096));
        let third = spare.take(2 << 20);
        assert_ne!(third.as_ptr(), at);
        assert_eq!(third.len(), 2 << 20);
        assert!(third.iter().all(|&b| b == 0));

        // A read below the minimum neither takes the kept buffer nor is kept.
        let small = spare.take(4095);
        assert_ne!(small.as_ptr(), at);
        assert_eq!(small.len(), 4095);
        drop(spare.lend(small));

        // The larger of two returned buffers is the one kept.
        drop(spare.lend(second));
        drop(spare.lend(third));
        assert_eq!(spare.kept_bytes(), 2 << 20);
        drop(spare.lend(fresh(4096)));
        assert_eq!(spare.kept_bytes(), 2 << 20);

        // Grown back within its capacity, a reused buffer has the length asked.
        let again = spare.take(3 << 19);
        assert_eq!(again.len(), 3 << 19);
        drop(spare.lend(again));

        tokio::time::sleep(KEEP_FOR / 2).await;
        assert_eq!(spare.kept_bytes(), 2 << 20, "freed while recently returned");
        tokio::time::sleep(KEEP_FOR).await;
        assert_eq!(spare.kept_bytes(), 0, "kept though unused");
    }
}
