//! Draining a host: every agent leaves at its next safe point for the least loaded host
//! that is up, parked ones too, and the host takes no new agent; once none is left, the host
//! stops (`agent-host drain`).
//!
//! A move is a hop the agent did not ask for, made with the same protocol and the same
//! guarantees. The agent's pending operation travels in its image and is performed where it
//! arrives (`AgentContext::first_step`); a sleeper parked here sleeps the rest of its sleep
//! there. A move that fails leaves the agent here to perform its operation; it tries again
//! at a later safe point.

use crate::context::AgentId;
use crate::instance::AgentInstance;
use crate::net::certs::{Identity, Role};
use crate::net::host::{Host, Start};
use crate::net::messages::{DrainStatus, Refusal, Reply, unix_ms};
use agent_abi::Op;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// How often a draining host looks for agents parked since, and whether it is empty.
const DRAIN_CHECK: Duration = Duration::from_millis(500);

/// How long a drained host waits for its homes to take the reports it holds.
pub const REPORTS_GRACE: Duration = Duration::from_secs(30);

impl Host {
    /// Whether this host is draining.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// `agent-host drain`, from `peer`: only the host itself (its own certificate) may ask.
    /// Starts draining once; says what is left each time.
    pub(in crate::net) fn drain_request(self: &Arc<Self>, peer: &Identity) -> Reply<DrainStatus> {
        if peer.role != Role::Host || peer.name != self.config.name {
            return Err(Refusal::NotOperator(self.config.name.clone()));
        }
        if !self.draining.swap(true, Ordering::SeqCst) {
            tracing::warn!("draining: agents leave at their next safe point, arrivals are refused");
            self.tell_load();
            for flags in self.residents.running_flags() {
                flags.checkpoint.store(true, Ordering::SeqCst);
            }
            tokio::spawn(self.clone().drain_parked());
        }
        Ok(self.drain_status())
    }

    fn drain_status(&self) -> DrainStatus {
        let stored = self.store.residents().map_or(u64::MAX, |r| r.len() as u64);
        let (running, parked) = (self.residents.running(), self.residents.parked());
        DrainStatus {
            running: running as u64,
            parked: parked as u64,
            // Departures whose outcome a restart is still asking the destination for: the
            // agent may yet be here.
            settling: stored.saturating_sub((running + parked) as u64),
        }
    }

    /// Wakes the parked agents to leave, again and again while any is left.
    async fn drain_parked(self: Arc<Self>) {
        while !self.stopping() {
            for id in self.residents.parked_ids() {
                self.wake(id);
            }
            tokio::time::sleep(DRAIN_CHECK).await;
        }
    }

    /// Resolves once the host drained: no agent runs or is parked here or is in a departure
    /// whose outcome is not known yet, and the reports of
    /// agents' hops and ends it holds reached their homes (or [`REPORTS_GRACE`] passed, for
    /// homes that are down: the reports stay stored for the host's next start).
    pub async fn drained(&self) {
        loop {
            if self.draining() && self.drain_status().is_empty() {
                break;
            }
            tokio::time::sleep(DRAIN_CHECK).await;
        }
        let unsent = || self.store.reports().map_or(0, |r| r.len());
        let grace = tokio::time::Instant::now() + REPORTS_GRACE;
        while unsent() > 0 && tokio::time::Instant::now() < grace {
            self.outbox.notify_one();
            tokio::time::sleep(DRAIN_CHECK).await;
        }
        if unsent() > 0 {
            tracing::warn!(
                reports = unsent(),
                "drained, with reports its homes did not take yet: they are sent after the next start"
            );
        }
    }

    /// A parked agent woken while the host drains: a sleeper waits on the rest of its sleep
    /// again, so that it moves with it; one waiting for a message moves with its wait.
    pub(in crate::net) fn start_to_leave(
        agent: &mut AgentInstance,
        until_ms: u64,
        start: Start,
    ) -> Start {
        match start {
            Start::Poll if agent.context().pending.is_none() => {
                let ms = until_ms.saturating_sub(unix_ms());
                agent.pend(Op::Sleep { ms });
                Start::Handle(Op::Sleep { ms })
            }
            start => start,
        }
    }

    /// Whether an agent at a safe point before `op` should leave: the host drains, and the
    /// operation is not one that moves or copies it anyway.
    pub(in crate::net) fn should_leave(&self, op: Option<&Op>) -> bool {
        self.draining() && !matches!(op, Some(Op::Hop { .. } | Op::Clone { .. }))
    }

    /// Where an agent leaving goes: the least loaded host that is up (this one, draining,
    /// never fits).
    pub(in crate::net) fn leave_to(&self) -> Option<String> {
        let place = agent_abi::Place::least_loaded();
        let site = self.membership.choose(&place)?;
        (site != self.config.name).then_some(site)
    }

    /// Agents left to move, for the log.
    pub(in crate::net) fn log_drain(&self, id: &AgentId, to: &str) {
        let left = self.drain_status();
        tracing::info!(agent = %id, to, running = left.running, parked = left.parked, "moved away");
    }
}
