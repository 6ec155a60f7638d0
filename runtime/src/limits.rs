//! Per-agent resource limits and their enforcement inside the sandbox.

use std::time::Duration;

/// What one agent may use on a host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most linear memory, in bytes.
    pub max_memory: u64,
    /// Total CPU time over the agent's life (carried with it from host to host).
    pub cpu_budget: Duration,
    /// After this much CPU in one go the host asks the agent to stop at its next checkpoint.
    pub slice: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_memory: 256 << 20,
            cpu_budget: Duration::from_secs(60),
            slice: Duration::from_millis(50),
        }
    }
}

/// A limit the agent ran into; carried as the trap's cause so it can be reported precisely.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LimitExceeded {
    /// The agent tried to grow its memory past [`Limits::max_memory`].
    #[error(
        "memory limit of {} exceeded: the agent asked to grow its memory to {}",
        mib(*limit),
        mib(*wanted)
    )]
    Memory {
        /// The limit in bytes.
        limit: u64,
        /// The size asked for, in bytes.
        wanted: u64,
    },
    /// The agent used up [`Limits::cpu_budget`].
    #[error("CPU budget of {budget:?} exhausted")]
    Cpu {
        /// The budget.
        budget: Duration,
    },
}

/// `bytes` in MiB, with two decimals unless whole: a limit of 256 MiB and a request for
/// 256 MiB and one page must not read alike.
fn mib(bytes: u64) -> String {
    match bytes % (1 << 20) {
        0 => format!("{} MiB", bytes >> 20),
        _ => format!("{:.2} MiB", bytes as f64 / f64::from(1 << 20)),
    }
}

/// Refuses memory growth past the limit with an error (a trap), not a silent `-1`, so the
/// launcher learns why the agent stopped.
#[derive(Debug)]
pub(crate) struct MemoryLimiter {
    pub(crate) max_memory: u64,
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let wanted = desired as u64;
        if wanted > self.max_memory {
            return Err(LimitExceeded::Memory {
                limit: self.max_memory,
                wanted,
            }
            .into());
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Tables are fixed at instantiation (admission refuses table writes); this bounds the
        // initial size only.
        Ok(desired <= 1 << 20)
    }
}
