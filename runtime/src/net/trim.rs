//! Giving freed heap memory back to the system.
//!
//! A host allocates and frees at a high rate (instances, images, streams) on many threads,
//! while parked agents leave small long-lived records behind. glibc's allocator keeps the
//! freed memory around them in each thread's arena: parked agents then cost several times
//! their records in resident memory. Trimming returns whole free pages inside the arenas.

use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// How long the trimmer waits after the first release it hears of, so that a burst of
/// departures is trimmed once.
const SETTLE: Duration = Duration::from_secs(1);

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
                waiting.freed.notified().await;
                tokio::time::sleep(SETTLE).await;
                let _ = tokio::task::spawn_blocking(trim).await;
            }
        });
        trimmer
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
