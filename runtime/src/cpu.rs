//! CPU time of an agent's own execution, as the operating system counts it for the threads
//! that run it: time an agent waits for a worker thread, or for the host, is not charged.
//!
//! An agent runs inside a future that wasmtime polls on whichever worker thread tokio picks
//! (its fiber may yield at an epoch tick and go on elsewhere), so the meter reads the
//! polling thread's CPU clock around every poll, and the epoch callback, which runs inside a
//! poll, adds the part of the poll under way.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

/// CPU time the calling thread has used so far, in nanoseconds.
pub fn thread_cpu_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec for the call to fill in.
    let ok = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) } == 0;
    match ok {
        true => (now.tv_sec as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(now.tv_nsec as u64),
        false => 0,
    }
}

/// CPU time spent in one slice of an agent (one call into it), read from inside it too.
#[derive(Debug, Default)]
pub struct CpuMeter {
    /// Nanoseconds of the slice's polls that ended.
    spent: AtomicU64,
    /// The polling thread's CPU clock when the poll under way began (0: none is).
    poll_began: AtomicU64,
}

impl CpuMeter {
    /// Starts a new slice.
    pub fn start(&self) {
        self.spent.store(0, Ordering::Relaxed);
        self.poll_began.store(0, Ordering::Relaxed);
    }

    /// CPU time of the slice so far; called from inside a poll, it counts that poll up to now.
    pub fn in_slice(&self) -> Duration {
        let began = self.poll_began.load(Ordering::Relaxed);
        let running = match began {
            0 => 0,
            began => thread_cpu_ns().saturating_sub(began),
        };
        Duration::from_nanos(self.spent.load(Ordering::Relaxed).saturating_add(running))
    }

    /// Polls `future` to its end, charging this meter the CPU time of each poll.
    pub async fn run<F: Future>(&self, future: F) -> F::Output {
        Metered {
            inner: Box::pin(future),
            meter: self,
        }
        .await
    }
}

struct Metered<'a, F> {
    inner: Pin<Box<F>>,
    meter: &'a CpuMeter,
}

impl<F: Future> Future for Metered<'_, F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let began = thread_cpu_ns().max(1);
        self.meter.poll_began.store(began, Ordering::Relaxed);
        let polled = self.inner.as_mut().poll(cx);
        let spent = thread_cpu_ns().saturating_sub(began);
        self.meter.poll_began.store(0, Ordering::Relaxed);
        self.meter.spent.fetch_add(spent, Ordering::Relaxed);
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spin(for_ns: u64) {
        let start = thread_cpu_ns();
        while thread_cpu_ns() - start < for_ns {
            std::hint::black_box(0u64);
        }
    }

    #[tokio::test]
    async fn time_spent_waiting_is_not_charged_and_time_spinning_is() {
        let meter = CpuMeter::default();
        meter.start();
        meter
            .run(async {
                tokio::time::sleep(Duration::from_millis(200)).await;
                spin(20_000_000);
            })
            .await;
        let charged = meter.in_slice();
        assert!(charged >= Duration::from_millis(20), "{charged:?}");
        assert!(charged < Duration::from_millis(150), "{charged:?}");
    }

    #[tokio::test]
    async fn a_reading_from_inside_a_poll_counts_that_poll_so_far() {
        let meter = CpuMeter::default();
        meter.start();
        let inside = meter
            .run(async {
                spin(10_000_000);
                meter.in_slice()
            })
            .await;
        assert!(inside >= Duration::from_millis(10), "{inside:?}");
        meter.start();
        assert_eq!(meter.in_slice(), Duration::ZERO);
    }
}
