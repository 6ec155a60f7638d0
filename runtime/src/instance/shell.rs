//! Where an agent's instance comes from and where it goes: made fresh, or taken from those
//! its module keeps ([`crate::recycle`]); reset and given back when its agent leaves.

use super::capture::read_globals;
use super::restore::write_globals;
use super::{AgentError, AgentInstance, on_epoch};
use crate::context::AgentContext;
use crate::instrument::MEMORY_EXPORT;
use crate::limits::{LimitExceeded, Limits};
use crate::modules::AgentModule;
use crate::recycle::Shell;
use crate::services::Site;
use crate::state::AgentState;
use agent_abi::export;
use std::sync::Arc;
use wasmtime::Store;

impl AgentInstance {
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

    /// An instance of `module` for the agent of `context`, whose memory will be
    /// `memory_bytes`: one an agent of the module left with no more memory than that, or a
    /// fresh one.
    pub(super) async fn kept_or_fresh(
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

    pub(super) async fn instantiate(
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
}
