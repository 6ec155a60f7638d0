//! Giving freed heap memory back to the system.
//!
//! A host allocates and frees at a high rate (instances, images, streams) on many threads,
//! while parked agents leave small long-lived records behind. The `agent-host` binary's own
//! allocations go to jemalloc, which gives freed pages back by itself; what is allocated
//! through glibc (C libraries such as zstd, and programs that embed the host without
//! jemalloc) stays in glibc's per-thread arenas around those records: parked agents then cost
//! several times their records in resident memory. Trimming returns whole free pages inside
//! the arenas.

use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// How long the heap must go without a release before it is trimmed, so that a burst of
/// departures is trimmed once, after it.
const SETTLE: Duration = Duration::from_secs(1);

/// How long releases may keep coming before the heap is trimmed anyway. A busy host frees
/// instances all the time, and trimming it every second cost it CPU (BENCHMARKS.md).
const AT_MOST: Duration = Duration::from_secs(15);

/// Trims the heap some time after agents' instances were freed.
#[derive(Default)]
pub struct Trimmer {
    freed: Notify,
}

impl Trimmer {
    /// Starts the task that trims after releases.
    pub fn start() -> Arc<Trimmer> {
        let trimmer = Arc::new(Trimmer::default());
        let waiting = trimmer.clone();
        tokio::spawn(async move {
            loop {
                waiting.settled().await;
                let _ = tokio::task::spawn_blocking(trim).await;
            }
        });
        trimmer
    }

    /// Returns once releases were heard and then none for `SETTLE`, or `AT_MOST` after the
    /// first of them.
    async fn settled(&self) {
        self.freed.notified().await;
        let deadline = tokio::time::Instant::now() + AT_MOST;
        while let Ok(()) = tokio::time::timeout(SETTLE, self.freed.notified()).await {
            if tokio::time::Instant::now() >= deadline {
                return;
            }
        }
    }

    /// Says that an agent's instance was freed.
    pub fn freed(&self) {
        self.freed.notify_one();
    }
}

/// Returns the free pages of every arena to the system.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only walks the allocator's own free lists under its locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Other allocators give memory back on their own.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_trimmed_a_quiet_second_after_it() {
        let trimmer = Arc::new(Trimmer::default());
        let started = Instant::now();
        let releasing = trimmer.clone();
        tokio::spawn(async move {
            for _ in 0..20 {
                releasing.freed();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        trimmer.settled().await;
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(1_900) + SETTLE,
            "{waited:?}"
        );
        assert!(waited < AT_MOST, "{waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn releases_that_never_stop_are_trimmed_at_most_apart() {
        let trimmer = Arc::new(Trimmer::default());
        let releasing = trimmer.clone();
        tokio::spawn(async move {
            loop {
                releasing.freed();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        for _ in 0..3 {
            let started = Instant::now();
            trimmer.settled().await;
            let waited = started.elapsed();
            assert!(waited >= AT_MOST && waited < AT_MOST + SETTLE, "{waited:?}");
        }
    }
}
