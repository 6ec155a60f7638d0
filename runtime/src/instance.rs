//! A running agent: a sandboxed wasmtime instance driven from safe point to safe point.
//!
//! [`AgentInstance::launch`] starts an agent, [`AgentInstance::poll`] runs it to its next safe
//! point, [`AgentInstance::capture`] takes an [`AgentImage`] there, and
//! [`AgentInstance::restore`] brings an image back to life in an instance holding the
//! module's initial memory, on any host, without running any initializer again, and
//! [`AgentInstance::retire`] resets the instance of an agent that left for the next one.

use crate::context::AgentContext;
use crate::image::{AgentImage, GlobalValue, ImageError};
use crate::instrument::{MEMORY_EXPORT, global_export};
use crate::limits::{LimitExceeded, Limits};
use crate::log::LogLine;
use crate::modules::AgentModule;
use crate::services::Site;
use crate::snapshot::{PageMap, PageRun, PagesError};
use crate::state::AgentState;
use crate::{admission::GlobalKind, admission::WASM_PAGE};
use agent_abi::{Op, OpResult, Outcome, POLL_DONE, POLL_PENDING, export};
use std::sync::Arc;
use wasmtime::{AsContextMut, Instance, Memory, Store, Trap, TypedFunc, UpdateDeadline, Val};

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
}

/// An instance without its agent: made fresh, or left by an agent and reset to what
/// instantiation left (then kept by its module, [`crate::recycle`], for the next agent of it).
pub(crate) struct Shell {
    store: Store<AgentState>,
    instance: Instance,
    memory: Memory,
    poll: TypedFunc<(), i32>,
    /// The mutable globals right after instantiation, before any agent code ran.
    fresh_globals: Arc<[GlobalValue]>,
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

    /// Restores an agent from `image` into an instance of `module` on `site`: one an agent
    /// of it left ([`AgentInstance::retire`]) with no more memory than the image, or a
    /// fresh one.
    ///
    /// The instance holds the module's initial memory; the image's pages and globals are
    /// written over it. No initializer runs.
    ///
    /// # Errors
    /// [`AgentError::Image`] when the image does not fit the module; limit errors when its
    /// memory exceeds `limits`.
    pub async fn restore(
        module: Arc<AgentModule>,
        site: Arc<Site>,
        image: AgentImage,
        limits: &Limits,
    ) -> Result<AgentInstance, AgentError> {
        if image.module != module.hash {
            return Err(ImageError::WrongModule {
                image: image.module.to_string(),
                module: module.hash.to_string(),
            }
            .into());
        }
        check_globals(&image.globals, &module.facts.globals)?;
        let (context, bytes) = (image.context.clone(), image.memory_bytes);
        let agent = AgentInstance::kept_or_fresh(module, site, context, limits, bytes).await?;
        agent.fill(image, false)
    }

    /// Ends this instance, whose agent left at a hop: when its module allows, its memory and
    /// mutable globals are reset to what instantiation left and the module keeps it for the
    /// next agent of it ([`crate::recycle`]); otherwise it is dropped.
    ///
    /// Call only between [`Self::poll`]s. An instance whose agent is not at a safe point (its
    /// last poll failed, or never ended) is dropped.
    pub fn retire(mut self) {
        let bytes = self.memory_bytes();
        if self.module.facts.passive_data || !self.module.idle.keeps(bytes) || !self.at_safe_point {
            return;
        }
        // Globals too: a module may keep an allocator's pointer or any other state in them.
        let fresh = self.fresh_globals.clone();
        if write_globals(&self.instance, &mut self.store, &fresh).is_err() {
            return;
        }
        // Every page that differs from the initial memory, found as a capture finds them.
        let (runs, resident) = match self.captured.take() {
            Some(captured) => captured,
            None => self.changed(),
        };
        let initial = &self.module.facts.initial;
        initial.reset(&runs, self.memory.data_mut(&mut self.store));
        let AgentInstance {
            store,
            instance,
            memory,
            poll,
            module,
            fresh_globals,
            ..
        } = self;
        let shell = Shell {
            store,
            instance,
            memory,
            poll,
            fresh_globals,
        };
        module
            .idle
            .put(bytes, resident + crate::recycle::OVERHEAD, shell);
    }

    /// The runs of pages of the memory that differ from the module's initial memory, and the
    /// bytes of the pages ever touched (all of them where the kernel does not say).
    fn changed(&self) -> (Vec<PageRun>, u64) {
        let memory = self.memory();
        let touched = crate::touched::pages(memory);
        let resident = touched.as_ref().map_or(memory.len() as u64, |t| {
            t.iter().filter(|&&t| t).count() as u64 * crate::snapshot::PAGE_SIZE as u64
        });
        let initial = &self.module.facts.initial;
        (
            PageMap::changed_runs_touched(memory, initial, touched),
            resident,
        )
    }

    /// An instance of `module` for the agent of `context`, whose memory will be
    /// `memory_bytes`: one an agent of the module left with no more memory than that, or a
    /// fresh one.
    async fn kept_or_fresh(
        module: Arc<AgentModule>,
        site: Arc<Site>,
        context: AgentContext,
        limits: &Limits,
        memory_bytes: u64,
    ) -> Result<AgentInstance, AgentError> {
        // A kept instance as large as that grows no memory, so the limiter would not see it:
        // memory over the limit goes to a fresh instance, whose growth is refused.
        let kept = match memory_bytes <= limits.max_memory {
            true => module.idle.take(memory_bytes),
            false => None,
        };
        match kept {
            Some((_, shell)) => Ok(AgentInstance::enter(module, shell, site, context, limits)),
            None => AgentInstance::instantiate(module, site, context, limits).await,
        }
    }

    /// The agent of `context` in `shell`, kept after another agent left: a fresh state in
    /// its store.
    fn enter(
        module: Arc<AgentModule>,
        mut shell: Shell,
        site: Arc<Site>,
        context: AgentContext,
        limits: &Limits,
    ) -> AgentInstance {
        let mut state = AgentState::new(context, site, limits);
        state.memory = Some(shell.memory);
        // The flag's address is the module's, found when the instance was made.
        state.checkpoint_flag = shell.store.data().checkpoint_flag;
        *shell.store.data_mut() = state;
        shell.store.set_epoch_deadline(1);
        AgentInstance::assemble(module, shell)
    }

    /// The agent instance of `shell`, at a safe point with nothing captured yet.
    fn assemble(module: Arc<AgentModule>, shell: Shell) -> AgentInstance {
        let Shell {
            store,
            instance,
            memory,
            poll,
            fresh_globals,
        } = shell;
        AgentInstance {
            store,
            instance,
            memory,
            poll,
            module,
            fresh_globals,
            captured: None,
            at_safe_point: true,
        }
    }

    /// A fresh instance of `module` for an agent arriving with `memory_bytes` of memory, of
    /// which the pages of `runs` will be written: made, grown and mapped while its image is
    /// still on the way, so that restoring it ([`AgentInstance::restore_into`]) only copies.
    /// Mapping fresh memory is most of a large restore on the VMs we run on (see
    /// [`crate::prefault`]). `context` stands in for the image's until then. Mapped ahead
    /// on a thread of its own, the memory is ready before most of a large image has come;
    /// left to be mapped by the writes of the pages as they arrive, it slowed the transfer
    /// (BENCHMARKS.md).
    ///
    /// # Errors
    /// As [`AgentInstance::restore`], for the sizes given.
    pub async fn prepare(
        module: Arc<AgentModule>,
        site: Arc<Site>,
        context: AgentContext,
        memory_bytes: u64,
        runs: Vec<PageRun>,
        limits: &Limits,
    ) -> Result<AgentInstance, AgentError> {
        let mut agent = AgentInstance::instantiate(module, site, context, limits).await?;
        agent.grow_to(memory_bytes)?;
        PageMap::check(&runs, agent.memory.data_size(&agent.store) as u64)
            .map_err(ImageError::BadPages)?;
        // Mapping blocks for as long as the kernel takes: off the async workers.
        let mapped = tokio::task::spawn_blocking(move || {
            let memory = agent.memory.data_mut(&mut agent.store);
            for run in &runs {
                if let Some(region) = memory.get_mut(run.bytes()) {
                    crate::prefault::write(region);
                }
            }
            agent
        });
        mapped
            .await
            .map_err(|e| AgentError::Instantiate(format!("mapping its memory: {e}")))
    }

    /// Restores an agent from `image` into `prepared`, an instance [`AgentInstance::prepare`]
    /// made of the same module that nothing has run in since.
    ///
    /// # Errors
    /// As [`AgentInstance::restore`].
    pub fn restore_into(
        prepared: AgentInstance,
        image: AgentImage,
    ) -> Result<AgentInstance, AgentError> {
        AgentInstance::restore_prepared(prepared, image, false)
    }

    /// Restores an agent from `image` into `prepared` as [`AgentInstance::restore_into`]
    /// does, but for its pages: [`AgentInstance::write_pages`] wrote them already, from the
    /// body `image` was decoded from, laid out by the same runs.
    ///
    /// # Errors
    /// As [`AgentInstance::restore`].
    pub fn restore_written(
        prepared: AgentInstance,
        image: AgentImage,
    ) -> Result<AgentInstance, AgentError> {
        AgentInstance::restore_prepared(prepared, image, true)
    }

    /// Writes `part`, the bytes at `from..` of a raw image body laying out the pages of
    /// `runs`, into the memory of this instance made by [`AgentInstance::prepare`] with the
    /// same runs: a large image is written as it arrives.
    pub fn write_pages(&mut self, runs: &[PageRun], from: usize, part: &[u8]) {
        self.captured = None;
        PageMap::write_part(runs, from, part, self.memory.data_mut(&mut self.store));
    }

    fn restore_prepared(
        mut prepared: AgentInstance,
        image: AgentImage,
        written: bool,
    ) -> Result<AgentInstance, AgentError> {
        if image.module != prepared.module.hash {
            return Err(ImageError::WrongModule {
                image: image.module.to_string(),
                module: prepared.module.hash.to_string(),
            }
            .into());
        }
        check_globals(&image.globals, &prepared.module.facts.globals)?;
        // The CPU instantiating took counts against the agent, as it does in a restore.
        let spent = prepared.context().cpu_used_us;
        *prepared.context_mut() = image.context.clone();
        prepared.context_mut().cpu_used_us += spent;
        prepared.fill(image, written)
    }

    /// Grows memory to `memory_bytes`, which must be at least its size.
    fn grow_to(&mut self, memory_bytes: u64) -> Result<(), AgentError> {
        let current = self.memory.data_size(&self.store) as u64;
        if memory_bytes < current {
            return Err(ImageError::BadPages(PagesError::SmallerThanInitial {
                memory: memory_bytes,
                initial: current,
            })
            .into());
        }
        if memory_bytes > current {
            self.memory
                .grow(&mut self.store, (memory_bytes - current) / WASM_PAGE)
                .map_err(|e| self.classify(e))?;
        }
        Ok(())
    }

    /// Writes the pages (unless `written` already) and globals of `image` over this fresh
    /// (or prepared) instance.
    fn fill(mut self, image: AgentImage, written: bool) -> Result<AgentInstance, AgentError> {
        let AgentImage {
            memory_bytes,
            globals,
            pages,
            ..
        } = image;
        self.grow_to(memory_bytes)?;
        // Checked again here: this instance's memory, not the header, bounds the writes.
        PageMap::check(&pages.runs, self.memory.data_size(&self.store) as u64)
            .map_err(ImageError::BadPages)?;
        self.captured = None;
        if !written {
            pages.apply(self.memory.data_mut(&mut self.store));
        }
        write_globals(&self.instance, &mut self.store, &globals)?;
        self.at_safe_point = true;
        Ok(self)
    }

    async fn instantiate(
        module: Arc<AgentModule>,
        site: Arc<Site>,
        context: AgentContext,
        limits: &Limits,
    ) -> Result<AgentInstance, AgentError> {
        let mut store = Store::new(
            module.pre.module().engine(),
            AgentState::new(context, site, limits),
        );
        store.limiter(|s| &mut s.limiter);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(on_epoch);
        let instance = match module.pre.instantiate_async(&mut store).await {
            Ok(instance) => instance,
            Err(e) => {
                return Err(match e.downcast::<LimitExceeded>() {
                    Ok(limit) => limit.into(),
                    Err(e) => AgentError::Instantiate(format!("{e:#}")),
                });
            }
        };
        let memory = instance
            .get_memory(&mut store, MEMORY_EXPORT)
            .ok_or_else(|| AgentError::Abi("the instrumented module exports no memory".into()))?;
        store.data_mut().memory = Some(memory);
        let fresh_globals = read_globals(&instance, &mut store, &module.facts.globals).into();
        if let Ok(flag) = instance.get_typed_func::<(), i32>(&mut store, export::CHECKPOINT_FLAG) {
            // Agent code: its CPU counts against the agent's budget, so a function that never
            // returns cannot hold a host (a destination restoring it) for longer than that.
            let meter = store.data().meter.clone();
            meter.start();
            let address = meter.run(flag.call_async(&mut store, ())).await;
            store.data_mut().context.cpu_used_us += meter.in_slice().as_micros() as u64;
            let address = address.map_err(|e| match e.downcast::<LimitExceeded>() {
                Ok(limit) => AgentError::Limit(limit),
                Err(e) => AgentError::Abi(format!("{}: {e}", export::CHECKPOINT_FLAG)),
            })?;
            store.data_mut().checkpoint_flag = Some(address as u32);
        }
        let poll = instance
            .get_typed_func::<(), i32>(&mut store, export::POLL)
            .map_err(|e| AgentError::Abi(format!("{}: {e}", export::POLL)))?;
        let shell = Shell {
            store,
            instance,
            memory,
            poll,
            fresh_globals,
        };
        Ok(AgentInstance::assemble(module, shell))
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

    /// Captures the agent at its current safe point.
    ///
    /// Call only between [`Self::poll`]s, when the Wasm stack is empty.
    pub fn capture(&mut self) -> AgentImage {
        let mut image = self.capture_in_place();
        let runs = std::mem::take(&mut image.pages.runs);
        image.pages = PageMap::gather(self.memory(), runs);
        image
    }

    /// Captures the agent as [`Self::capture`] does, but leaves its pages where they lie: the
    /// image's page map holds their runs and no data. They are read from [`Self::memory`],
    /// which stays as it is until the agent runs again.
    pub fn capture_in_place(&mut self) -> AgentImage {
        let (runs, resident) = self.changed();
        self.captured = Some((runs.clone(), resident));
        let pages = PageMap {
            runs,
            data: bytes::Bytes::new(),
        };
        let globals = read_globals(&self.instance, &mut self.store, &self.module.facts.globals);
        AgentImage {
            module: self.module.hash,
            memory_bytes: self.memory.data_size(&self.store) as u64,
            globals,
            pages,
            context: self.store.data().context.clone(),
        }
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

/// The values of the module's mutable globals (`kinds`) in `instance`.
fn read_globals(
    instance: &Instance,
    store: &mut Store<AgentState>,
    kinds: &[(u32, GlobalKind)],
) -> Vec<GlobalValue> {
    let mut globals = Vec::with_capacity(kinds.len());
    for (index, kind) in kinds {
        let bits = match instance
            .get_global(&mut *store, &global_export(*index))
            .map(|g| g.get(&mut *store))
        {
            Some(Val::I32(v)) => u64::from(v as u32),
            Some(Val::I64(v)) => v as u64,
            Some(Val::F32(v)) => u64::from(v),
            Some(Val::F64(v)) => v,
            _ => 0, // admission guarantees every mutable global is exported with its kind
        };
        globals.push(GlobalValue {
            index: *index,
            kind: *kind,
            bits,
        });
    }
    globals
}

/// Sets the mutable globals of `instance` to `globals`.
fn write_globals(
    instance: &Instance,
    store: &mut Store<AgentState>,
    globals: &[GlobalValue],
) -> Result<(), AgentError> {
    for g in globals {
        let global = instance
            .get_global(&mut *store, &global_export(g.index))
            .ok_or_else(|| AgentError::Abi(format!("global {} is not exported", g.index)))?;
        let value = match g.kind {
            GlobalKind::I32 => Val::I32(g.bits as u32 as i32),
            GlobalKind::I64 => Val::I64(g.bits as i64),
            GlobalKind::F32 => Val::F32(g.bits as u32),
            GlobalKind::F64 => Val::F64(g.bits),
        };
        global
            .set(&mut *store, value)
            .map_err(|e| AgentError::Abi(format!("global {}: {e}", g.index)))?;
    }
    Ok(())
}

fn check_globals(image: &[GlobalValue], module: &[(u32, GlobalKind)]) -> Result<(), ImageError> {
    let found: Vec<(u32, GlobalKind)> = image.iter().map(|g| (g.index, g.kind)).collect();
    if found != module {
        return Err(ImageError::GlobalsMismatch(format!(
            "image has {found:?}, module has {module:?}"
        )));
    }
    Ok(())
}
