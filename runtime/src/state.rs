//! The host-side state of one running agent: what its store holds besides Wasm.

use crate::context::AgentContext;
use crate::cpu::CpuMeter;
use crate::limits::{Limits, MemoryLimiter};
use crate::log::{LogSink, LogSource};
use crate::services::Site;
use agent_abi::Outcome;
use std::sync::Arc;
use wasmtime::Memory;
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::p1::WasiP1Ctx;

/// The data of an agent's wasmtime store.
pub struct AgentState {
    /// WASI preview 1, with no arguments, environment or preopened directories.
    pub(crate) wasi: WasiP1Ctx,
    pub(crate) limiter: MemoryLimiter,
    pub(crate) limits: Limits,
    /// Travels with the agent.
    pub(crate) context: AgentContext,
    /// The site the agent runs on now.
    pub(crate) site: Arc<Site>,
    /// The agent's memory, set right after instantiation.
    pub(crate) memory: Option<Memory>,
    /// Set by the agent through `finish`.
    pub(crate) outcome: Option<Outcome>,
    pub(crate) log: LogSink,
    /// The host wants the agent to stop at its next `checkpoint()`.
    pub(crate) checkpoint_requested: bool,
    /// Where the agent keeps its checkpoint flag in its memory (ABI 2), mirroring
    /// `checkpoint_requested` so the agent need not call the host to read it.
    pub(crate) checkpoint_flag: Option<u32>,
    /// CPU time of the call into the agent under way ([`crate::cpu`]).
    pub(crate) meter: Arc<CpuMeter>,
    /// Requests from outside the agent's task (kill, checkpoint).
    pub(crate) flags: Arc<AgentFlags>,
}

/// Requests to a running agent from other tasks of the host, honoured at the next epoch tick
/// (kill) or the next `ctx.checkpoint()` (checkpoint).
#[derive(Debug, Default)]
pub struct AgentFlags {
    /// Stop the agent for good (read by the epoch callback while it runs).
    pub kill: std::sync::atomic::AtomicBool,
    /// Stop the agent at its next checkpoint.
    pub checkpoint: std::sync::atomic::AtomicBool,
    /// Cancelled with the kill: wakes what waits on the agent's behalf (a sleep).
    pub killed: tokio_util::sync::CancellationToken,
}

impl AgentFlags {
    /// Kills the agent: it stops at its next epoch tick, and a sleep of it ends at once.
    pub fn kill(&self) {
        self.kill.store(true, std::sync::atomic::Ordering::SeqCst);
        self.killed.cancel();
    }
}

impl AgentState {
    pub(crate) fn new(context: AgentContext, site: Arc<Site>, limits: &Limits) -> AgentState {
        let log = LogSink::default();
        let wasi = WasiCtxBuilder::new()
            .stdout(log.stream(LogSource::Stdout))
            .stderr(log.stream(LogSource::Stderr))
            .build_p1();
        AgentState {
            wasi,
            limiter: MemoryLimiter {
                max_memory: limits.max_memory,
            },
            limits: limits.clone(),
            context,
            site,
            memory: None,
            outcome: None,
            log,
            checkpoint_requested: false,
            checkpoint_flag: None,
            meter: Arc::default(),
            flags: Arc::default(),
        }
    }
}
