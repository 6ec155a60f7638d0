//! A running agent: a sandboxed wasmtime instance driven from safe point to safe point.
//!
//! [`AgentInstance::launch`] starts an agent, [`AgentInstance::poll`] runs it to its next safe
//! point, [`AgentInstance::capture`] takes an [`AgentImage`] there, and
//! [`AgentInstance::restore`] brings an image back to life in an instance holding the
//! module's initial memory, on any host, without running any initializer again, and
//! [`AgentInstance::retire`] resets the instance of an agent that left for the next one.

mod capture;
mod restore;
mod shell;

use crate::context::AgentContext;
use crate::image::{GlobalValue, ImageError};
use crate::limits::{LimitExceeded, Limits};
use crate::log::LogLine;
use crate::modules::AgentModule;
use crate::services::Site;
use crate::snapshot::PageRun;
use crate::state::AgentState;
use agent_abi::{Op, OpResult, Outcome, POLL_DONE, POLL_PENDING, export};
use std::sync::Arc;
use wasmtime::{AsContextMut, Instance, Memory, Store, Trap, TypedFunc, UpdateDeadline};

/// Where an agent stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// At a safe point, waiting for the host to complete this operation.
    Suspended(Op),
    /// Done: the agent reported how it ended.
    Finished(Outcome),
}

/// Why an agent stopped running (other than finishing).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AgentError {
    /// A resource limit stopped it.
    #[error(transparent)]
    Limit(#[from] LimitExceeded),
    /// The agent panicked.
    #[error("agent panicked: {0}")]
    Panicked(String),
    /// Recursion too deep.
    #[error("agent exhausted its stack ({} KiB)", crate::engine::MAX_WASM_STACK >> 10)]
    StackOverflow,
    /// The host killed it (its owner asked).
    #[error("agent killed by its owner")]
    Killed,
    /// Any other trap.
    #[error("agent trapped: {0}")]
    Trap(String),
    /// The agent returned an error.
    #[error("agent failed: {0}")]
    Failed(String),
    /// The agent did not follow the calling convention.
    #[error("agent broke the ABI: {0}")]
    Abi(String),
    /// An image could not be restored.
    #[error("cannot restore the agent: {0}")]
    Image(#[from] ImageError),
    /// The instance could not be created.
    #[error("cannot instantiate the agent: {0}")]
    Instantiate(String),
    /// It waits for something that cannot come where it runs (a message, in a local run).
    #[error("agent cannot go on: {0}")]
    Stuck(String),
}

/// One agent in its sandbox.
pub struct AgentInstance {
    store: Store<AgentState>,
    instance: Instance,
    memory: Memory,
    poll: TypedFunc<(), i32>,
    module: Arc<AgentModule>,
    /// The mutable globals right after instantiation, before any agent code ran: retiring
    /// writes them back.
    fresh_globals: Arc<[GlobalValue]>,
    /// What the last capture found, while the memory has not changed since: the runs of pages
    /// that differ from the initial memory, and the bytes of the pages ever touched. Retiring
    /// the instance then resets those runs without reading the page map again.
    captured: Option<(Vec<PageRun>, u64)>,
    /// Whether the agent stands at a safe point (launched, restored, or suspended by its
    /// last poll): only then is the instance retired for another agent.
    at_safe_point: bool,
}

impl AgentInstance {
    /// Instantiates `module` for a new agent and creates its task (`agent_start`).
    ///
    /// # Errors
    /// When instantiation or `agent_start` fails or hits a limit.
    pub async fn launch(
        module: Arc<AgentModule>,
        site: Arc<Site>,
        context: AgentContext,
        limits: &Limits,
    ) -> Result<AgentInstance, AgentError> {
        // No kept instance has less memory than the module starts with, so one taken here
        // has exactly that.
        let bytes = module.facts.memory_bytes;
        let mut agent = AgentInstance::kept_or_fresh(module, site, context, limits, bytes).await?;
        // wasi-libc reactors initialize themselves here; this runs once in an agent's life.
        if let Ok(init) = agent
            .instance
            .get_typed_func::<(), ()>(&mut agent.store, "_initialize")
        {
            init.call_async(&mut agent.store, ())
                .await
                .map_err(|e| agent.classify(e))?;
        }
        let start = agent
            .instance
            .get_typed_func::<(), ()>(&mut agent.store, export::START)
            .map_err(|e| AgentError::Abi(format!("{}: {e}", export::START)))?;
        start
            .call_async(&mut agent.store, ())
            .await
            .map_err(|e| agent.classify(e))?;
        Ok(agent)
    }

    /// Runs the agent until its next safe point or its end.
    ///
    /// # Errors
    /// [`AgentError`] when it traps, hits a limit or breaks the ABI; the instance must then be
    /// dropped.
    ///
    /// # Cancel safety
    /// Not cancel safe: dropping the future mid-poll leaves the agent in an unknown state.
    pub async fn poll(&mut self) -> Result<Step, AgentError> {
        self.captured = None;
        self.at_safe_point = false;
        let meter = self.store.data().meter.clone();
        meter.start();
        let result = meter.run(self.poll.call_async(&mut self.store, ())).await;
        self.store.data_mut().context.cpu_used_us += meter.in_slice().as_micros() as u64;
        set_checkpoint_request(self.store.as_context_mut(), false);
        match result.map_err(|e| self.classify(e))? {
            POLL_PENDING => match self.store.data().context.pending.clone() {
                Some(op) => {
                    self.at_safe_point = true;
                    Ok(Step::Suspended(op))
                }
                None => Err(AgentError::Abi(
                    "agent_poll returned pending without a host operation (an await on a future that is not the host's?)".into(),
                )),
            },
            POLL_DONE => match self.store.data_mut().outcome.take() {
                Some(outcome) => Ok(Step::Finished(outcome)),
                None => Err(AgentError::Abi("agent_poll returned done without reporting an outcome".into())),
            },
            other => Err(AgentError::Abi(format!("agent_poll returned {other}"))),
        }
    }

    /// Completes the pending operation: the agent reads `result` when polled next.
    pub fn complete(&mut self, result: OpResult) {
        let context = &mut self.store.data_mut().context;
        context.pending = None;
        context.result = Some(result);
    }

    /// Makes the agent wait on `op` again, its result taken back: a parked sleeper that a
    /// draining host moves sleeps the rest of its sleep where it goes.
    pub fn pend(&mut self, op: agent_abi::Op) {
        let context = &mut self.store.data_mut().context;
        context.pending = Some(op);
        context.result = None;
    }

    /// Flags other tasks use to kill the agent or ask it to checkpoint.
    pub fn flags(&self) -> Arc<crate::state::AgentFlags> {
        self.store.data().flags.clone()
    }

    /// Uses `flags` from now on: requests made of the agent before it was restored (a kill
    /// while it woke from parking) then reach it.
    pub fn adopt_flags(&mut self, flags: Arc<crate::state::AgentFlags>) {
        self.store.data_mut().flags = flags;
    }

    /// Asks the agent to suspend at its next `ctx.checkpoint()`.
    pub fn request_checkpoint(&mut self) {
        self.captured = None;
        set_checkpoint_request(self.store.as_context_mut(), true);
    }

    /// The agent's linear memory, as it stands between [`Self::poll`]s.
    pub fn memory(&self) -> &[u8] {
        self.memory.data(&self.store)
    }

    /// The runtime's record of the agent.
    pub fn context(&self) -> &AgentContext {
        &self.store.data().context
    }

    /// Mutable access to the record, e.g. to count a hop.
    pub fn context_mut(&mut self) -> &mut AgentContext {
        &mut self.store.data_mut().context
    }

    /// The site the agent runs on.
    pub fn site(&self) -> &Arc<Site> {
        &self.store.data().site
    }

    /// The module the agent runs.
    pub fn module(&self) -> &Arc<AgentModule> {
        &self.module
    }

    /// Size of the agent's linear memory in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.memory.data_size(&self.store) as u64
    }

    /// Lines logged since the last call, and how many were dropped for space.
    pub fn drain_log(&self) -> (Vec<LogLine>, u64) {
        self.store.data().log.drain()
    }

    /// Turns a wasmtime error into the reason the agent stopped.
    fn classify(&mut self, e: wasmtime::Error) -> AgentError {
        if let Some(limit) = e.downcast_ref::<LimitExceeded>() {
            return limit.clone().into();
        }
        if e.downcast_ref::<Killed>().is_some() {
            return AgentError::Killed;
        }
        if let Some(Outcome::Panicked(message)) = self.store.data_mut().outcome.take() {
            return AgentError::Panicked(message);
        }
        match e.downcast_ref::<Trap>() {
            Some(Trap::StackOverflow) => AgentError::StackOverflow,
            Some(trap) => AgentError::Trap(trap.to_string()),
            None => AgentError::Trap(e.root_cause().to_string()),
        }
    }
}

/// The trap cause of a killed agent.
#[derive(Debug, thiserror::Error)]
#[error("killed")]
struct Killed;

/// Called at every epoch tick while the agent runs: enforce the CPU budget, ask for a
/// checkpoint at the end of a slice, and let other tasks of the executor run.
fn on_epoch(
    mut store: wasmtime::StoreContextMut<'_, AgentState>,
) -> wasmtime::Result<UpdateDeadline> {
    let state = store.data_mut();
    if state.flags.kill.load(std::sync::atomic::Ordering::Relaxed) {
        return Err(Killed.into());
    }
    let in_slice = state.meter.in_slice();
    if state.context.cpu_used() + in_slice >= state.limits.cpu_budget {
        return Err(LimitExceeded::Cpu {
            budget: state.limits.cpu_budget,
        }
        .into());
    }
    let shutting_down = state
        .flags
        .checkpoint
        .load(std::sync::atomic::Ordering::Relaxed);
    let wanted = (in_slice >= state.limits.slice || shutting_down) && !state.checkpoint_requested;
    if wanted {
        set_checkpoint_request(store, true);
    }
    Ok(UpdateDeadline::Yield(1))
}

/// Sets or clears the host's wish for a checkpoint, and its mirror in the agent's memory.
/// The mirror's address comes from the agent: a bad one only fails to write into its own
/// memory, and the agent then misses the wish until it calls the host anyway.
fn set_checkpoint_request(mut store: wasmtime::StoreContextMut<'_, AgentState>, requested: bool) {
    let state = store.data_mut();
    state.checkpoint_requested = requested;
    if let (Some(address), Some(memory)) = (state.checkpoint_flag, state.memory) {
        let word = u32::from(requested).to_le_bytes();
        let _ = memory.write(&mut store, address as usize, &word);
    }
}
