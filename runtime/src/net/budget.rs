//! Budgets of bytes a host holds for requests that are still arriving.
//!
//! A frame's length is declared by its sender, so memory is never taken from it alone: a
//! frame is charged as its bytes come, against the host's budget and its sender's, and a
//! charge that does not fit is refused at once (the request fails with [`WireError::Busy`];
//! nothing waits for room, and nothing aborts on a failed allocation).

use super::wire::WireError;
use std::sync::Arc;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes that may be held at once by the frames charged to it.
#[derive(Debug)]
pub struct Budget {
    permits: Arc<Semaphore>,
    bytes: u64,
    /// Whose budget it is, for the refusal: "this host", "user alice".
    whose: String,
}

impl Budget {
    /// A budget of `bytes` (capped at what a semaphore can count).
    pub fn new(whose: impl Into<String>, bytes: u64) -> Arc<Budget> {
        let bytes = bytes.min(Semaphore::MAX_PERMITS as u64);
        Arc::new(Budget {
            permits: Arc::new(Semaphore::new(bytes as usize)),
            bytes,
            whose: whose.into(),
        })
    }

    /// Bytes charged to it now.
    pub fn held(&self) -> u64 {
        self.bytes - self.permits.available_permits() as u64
    }
}

/// What the frames of one request hold: charges against each of its budgets, released
/// together when the request is done with their bytes (or dropped).
#[derive(Debug, Default)]
pub struct InFlight {
    budgets: Vec<Arc<Budget>>,
    held: Vec<Option<OwnedSemaphorePermit>>,
}

impl InFlight {
    /// Charges against each of `budgets`.
    pub fn new(budgets: Vec<Arc<Budget>>) -> InFlight {
        let held = budgets.iter().map(|_| None).collect();
        InFlight { budgets, held }
    }

    /// Charges `bytes` more to every budget.
    ///
    /// # Errors
    /// [`WireError::Busy`] naming the first budget that has no room; nothing more is charged.
    pub fn take(&mut self, bytes: usize) -> Result<(), WireError> {
        if bytes == 0 || self.budgets.is_empty() {
            return Ok(());
        }
        let mut taken = Vec::with_capacity(self.budgets.len());
        for budget in &self.budgets {
            let permit = u32::try_from(bytes)
                .ok()
                .and_then(|n| budget.permits.clone().try_acquire_many_owned(n).ok());
            match permit {
                Some(permit) => taken.push(permit),
                None => {
                    return Err(WireError::Busy {
                        whose: budget.whose.clone(),
                        limit: budget.bytes,
                    });
                }
            }
        }
        for (held, permit) in self.held.iter_mut().zip(taken) {
            match held {
                Some(held) => held.merge(permit),
                None => *held = Some(permit),
            }
        }
        Ok(())
    }

    /// Bytes charged so far.
    pub fn charged(&self) -> u64 {
        (self.held.iter().flatten().next()).map_or(0, |p| p.num_permits() as u64)
    }

    /// Gives back everything charged: the bytes are no longer held for this request.
    pub fn release(&mut self) {
        self.held.iter_mut().for_each(|h| *h = None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_charge_over_any_budget_is_refused_naming_it_and_takes_nothing() {
        let host = Budget::new("this host", 100);
        let user = Budget::new("user alice", 10);
        let mut request = InFlight::new(vec![host.clone(), user.clone()]);
        assert!(request.take(8).is_ok());
        let err = request.take(8).err().map(|e| e.to_string());
        assert!(
            err.as_deref().is_some_and(|e| e.contains("user alice")),
            "{err:?}"
        );
        assert_eq!((host.held(), user.held(), request.charged()), (8, 8, 8));
        request.release();
        assert_eq!((host.held(), user.held()), (0, 0));
    }

    #[test]
    fn charges_are_given_back_when_the_request_is_dropped() {
        let host = Budget::new("this host", 100);
        {
            let mut a = InFlight::new(vec![host.clone()]);
            let mut b = InFlight::new(vec![host.clone()]);
            assert!(a.take(60).is_ok());
            assert!(b.take(60).is_err());
            assert!(b.take(40).is_ok());
            assert_eq!(host.held(), 100);
        }
        assert_eq!(host.held(), 0);
    }

    #[test]
    fn a_request_with_no_budgets_is_not_limited() {
        let mut free = InFlight::default();
        assert!(free.take(usize::MAX).is_ok());
        assert_eq!(free.charged(), 0);
    }
}
