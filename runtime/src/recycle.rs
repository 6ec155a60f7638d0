//! Instances of agents that left, kept for the next agents of the same module.
//!
//! Making a fresh instance (a store, a memory mapped and the module's data written into it)
//! and unmapping the one an agent left is a large part of a small agent's hop. An instance
//! whose agent left at a hop is reset to the module's initial memory and globals and kept here; the next
//! agent of that module launched, or arriving with at least as much memory, takes it. The
//! instances kept by all modules of a host share one budget (a count, and resident memory),
//! and one unused for [`KEEP_FOR`] is dropped.

use crate::globals::GlobalValue;
use crate::state::AgentState;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wasmtime::{Instance, Memory, Store, TypedFunc};

/// An instance without its agent: made fresh, or left by an agent and reset to what
/// instantiation left (then kept by its module, in an [`Idle`], for the next agent of it).
pub(crate) struct Shell {
    pub(crate) store: Store<AgentState>,
    pub(crate) instance: Instance,
    pub(crate) memory: Memory,
    pub(crate) poll: TypedFunc<(), i32>,
    /// The mutable globals right after instantiation, before any agent code ran.
    pub(crate) fresh_globals: Arc<[GlobalValue]>,
}

/// How long a kept instance waits for an agent before it is dropped.
pub const KEEP_FOR: Duration = Duration::from_secs(30);

/// Memory the instances kept by all modules of one host may hold, in bytes of the pages
/// their agents touched (a small agent's memory is mostly a stack it barely uses) plus
/// [`OVERHEAD`] each.
pub const BUDGET: u64 = 64 << 20;

/// What a kept instance is charged beyond the pages of memory its agent touched: its store,
/// its mappings, and the touched part of the fiber stack its store keeps.
pub const OVERHEAD: u64 = 64 << 10;

/// Most instances the modules of one host keep: each holds a fiber stack (2 MiB of address
/// space, of which deep recursion may have touched up to 1 MiB) and a few mappings that the
/// budget cannot see.
pub const MAX_KEPT: u64 = 256;

/// Only instances of at most this much memory are kept: an agent arriving with more takes
/// longer to move than to instantiate, and a large instance would hold its memory unused.
pub const KEEP_UP_TO: u64 = 8 << 20;

/// Bytes of memory, and instances, the kept instances of a host may still take.
#[derive(Debug)]
pub struct Budget {
    left: Mutex<(u64, u64)>,
}

impl Budget {
    /// A budget of `bytes` over at most `count` items.
    pub fn new(bytes: u64, count: u64) -> Arc<Budget> {
        Arc::new(Budget {
            left: Mutex::new((bytes, count)),
        })
    }

    fn reserve(&self, bytes: u64) -> bool {
        let Ok(mut left) = self.left.lock() else {
            return false;
        };
        match (left.0.checked_sub(bytes), left.1.checked_sub(1)) {
            (Some(b), Some(c)) => {
                *left = (b, c);
                true
            }
            _ => false,
        }
    }

    fn release(&self, bytes: u64) {
        if let Ok(mut left) = self.left.lock() {
            *left = (left.0 + bytes, left.1 + 1);
        }
    }

    /// Bytes and items left.
    pub fn left(&self) -> (u64, u64) {
        self.left.lock().map_or((0, 0), |l| *l)
    }
}

/// Kept items (instances), each with the size of its memory.
#[derive(Debug)]
pub struct Idle<T> {
    kept: Mutex<Vec<Kept<T>>>,
    budget: Arc<Budget>,
}

#[derive(Debug)]
struct Kept<T> {
    bytes: u64,
    resident: u64,
    since: Instant,
    item: T,
}

impl<T> Idle<T> {
    /// An empty pool drawing on `budget`.
    pub fn new(budget: Arc<Budget>) -> Idle<T> {
        Idle {
            kept: Mutex::default(),
            budget,
        }
    }

    /// Whether an item of `bytes` of memory may be kept at all ([`KEEP_UP_TO`]): one that may
    /// not need not be made ready for keeping.
    pub fn keeps(&self, bytes: u64) -> bool {
        bytes <= KEEP_UP_TO
    }

    /// Keeps `item`, of `bytes` of memory of which it holds `resident`, unless it is too
    /// large or the budget is spent (then it is dropped).
    pub fn put(&self, bytes: u64, resident: u64, item: T) {
        if !self.keeps(bytes) || !self.budget.reserve(resident) {
            return;
        }
        match self.kept.lock() {
            Ok(mut kept) => kept.push(Kept {
                bytes,
                resident,
                since: Instant::now(),
                item,
            }),
            Err(_) => self.budget.release(resident),
        }
    }

    /// The most recently kept item of at most `bytes` of memory, with its size.
    pub fn take(&self, bytes: u64) -> Option<(u64, T)> {
        let taken = {
            let mut kept = self.kept.lock().ok()?;
            let at = kept.iter().rposition(|k| k.bytes <= bytes)?;
            kept.remove(at)
        };
        self.budget.release(taken.resident);
        Some((taken.bytes, taken.item))
    }

    /// Drops the items kept for `age` or longer.
    pub fn expire(&self, age: Duration) {
        let old: Vec<Kept<T>> = match self.kept.lock() {
            Ok(mut kept) => {
                let (old, young) = std::mem::take(&mut *kept)
                    .into_iter()
                    .partition(|k| k.since.elapsed() >= age);
                *kept = young;
                old
            }
            Err(_) => return,
        };
        // Dropped outside the lock: dropping an instance unmaps its memory.
        for k in old {
            self.budget.release(k.resident);
        }
    }

    /// How many items are kept.
    pub fn len(&self) -> usize {
        self.kept.lock().map_or(0, |k| k.len())
    }

    /// Whether none is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T> Drop for Idle<T> {
    fn drop(&mut self) {
        if let Ok(kept) = self.kept.get_mut() {
            kept.iter().for_each(|k| self.budget.release(k.resident));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_the_newest_that_fits_within_the_budget() {
        let budget = Budget::new(3 << 20, 10);
        let idle = Idle::new(budget.clone());
        idle.put(1 << 20, 1 << 20, "a");
        idle.put(2 << 20, 2 << 20, "b");
        // The budget is spent: this one is dropped.
        idle.put(1 << 20, 1 << 20, "c");
        assert_eq!(idle.len(), 2);
        // Too large to keep at all.
        let other = Idle::new(Budget::new(u64::MAX, 10));
        other.put(KEEP_UP_TO + 1, 4096, "huge");
        assert!(other.is_empty());

        assert_eq!(idle.take(1 << 20), Some((1 << 20, "a")));
        assert_eq!(idle.take(1 << 20), None, "b has more memory than asked");
        assert_eq!(idle.take(8 << 20), Some((2 << 20, "b")));
        // Taking gave the budget back. What an item holds counts, not its size.
        idle.put(4 << 20, 1 << 20, "d");
        idle.put(1 << 20, 2 << 20, "e");
        idle.put(1 << 20, 1, "f");
        assert_eq!(idle.len(), 2);
        assert_eq!(idle.take(8 << 20), Some((1 << 20, "e")));
        assert_eq!(idle.take(8 << 20), Some((4 << 20, "d")));
        assert!(idle.is_empty());
        assert_eq!(budget.left(), (3 << 20, 10));
    }

    #[test]
    fn no_more_items_are_kept_than_the_budget_counts() {
        let budget = Budget::new(u64::MAX / 2, 2);
        let idle = Idle::new(budget.clone());
        for item in 0..3 {
            idle.put(1 << 20, 1, item);
        }
        assert_eq!(idle.len(), 2);
        assert_eq!(idle.take(1 << 20), Some((1 << 20, 1)));
        idle.put(1 << 20, 1, 3);
        assert_eq!(idle.len(), 2);
        assert_eq!(budget.left().1, 0);
    }

    #[test]
    fn expired_items_go_and_give_their_budget_back() {
        let budget = Budget::new(4 << 20, 10);
        let idle = Idle::new(budget.clone());
        idle.put(1 << 20, 1 << 20, 1);
        idle.put(1 << 20, 1 << 20, 2);
        idle.expire(Duration::from_secs(60));
        assert_eq!(idle.len(), 2);
        idle.expire(Duration::ZERO);
        assert!(idle.is_empty());
        assert_eq!(budget.left(), (4 << 20, 10));
        // A pool dropped with items in it gives their budget back too.
        let other = Idle::new(budget.clone());
        other.put(2 << 20, 2 << 20, 3);
        drop(other);
        assert_eq!(budget.left(), (4 << 20, 10));
    }
}
