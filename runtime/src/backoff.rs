//! Exponential back-off: how long to wait before trying again, doubling up to a ceiling.

use std::time::Duration;

/// Waits that double from `first` up to `most`.
#[derive(Clone, Debug)]
pub struct Backoff {
    first: Duration,
    next: Duration,
    most: Duration,
}

impl Backoff {
    /// Starts at `first`, doubles after each wait, never above `most`.
    pub const fn new(first: Duration, most: Duration) -> Backoff {
        Backoff {
            first,
            next: first,
            most,
        }
    }

    /// The wait before the next try.
    pub fn wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = (wait * 2).min(self.most);
        wait
    }

    /// Back to the first wait (a try succeeded).
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_up_to_the_ceiling_and_start_again_after_a_reset() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let waits: Vec<u128> = (0..4).map(|_| b.wait().as_millis()).collect();
        assert_eq!(waits, [100, 200, 350, 350]);
        b.reset();
        assert_eq!(b.wait(), Duration::from_millis(100));
    }
}
