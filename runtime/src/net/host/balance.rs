//! The transfer and selection policies: a host running more agents per core than its
//! threshold, while another host that is up runs at least one per core fewer, asks its
//! running agents to stop at their next checkpoint; those that allow it
//! (`ctx.allow_moves(true)`) move to a less loaded host (the location policy of
//! [`crate::cluster::place`]), as many as would halve the gap each second.

use crate::instance::AgentInstance;
use crate::net::host::Host;
use agent_abi::{Op, Place};
use std::sync::atomic::Ordering;

/// Agents per core above which a host moves agents that allow it (`--balance-above`).
pub const DEFAULT_BALANCE_ABOVE: f64 = 2.0;

/// The gap, in agents per core, worth a move: less and agents would go back and forth.
const WORTH_A_MOVE: f64 = 1.0;

impl Host {
    /// Once per load period: allows the moves that would halve the gap between this host and
    /// the least loaded other, when this one is over its threshold, and asks the running
    /// agents to stop at their next checkpoint.
    pub(in crate::net) fn balance(&self) {
        let above = self.config.balance_above;
        let (lightest, cores) = self.membership.lightest();
        let mine = self.residents.running() as f64 / f64::from(cores.max(1));
        let moves = match lightest {
            Some(other) if above > 0.0 && mine > above && mine - other >= WORTH_A_MOVE => {
                ((mine - other) / 2.0 * f64::from(cores)).floor().max(1.0) as u32
            }
            _ => 0,
        };
        self.moves_left.store(moves, Ordering::SeqCst);
        if moves > 0 {
            tracing::debug!(
                mine,
                ?lightest,
                moves,
                "balancing: asking agents to checkpoint"
            );
            for flags in self.residents.running_flags() {
                flags.checkpoint.store(true, Ordering::SeqCst);
            }
        }
    }

    /// Where the agent, at a checkpoint, moves to balance the load, if it should: it
    /// allows moves, one of this period's is left, and a less loaded host than this one is
    /// chosen.
    pub(in crate::net) fn balance_to(&self, agent: &AgentInstance) -> Option<String> {
        let context = agent.context();
        if !context.movable || !matches!(context.pending, Some(Op::Checkpoint)) {
            return None;
        }
        let taken = (self.moves_left)
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        taken.ok()?;
        let site = self.membership.choose(&Place::least_loaded())?;
        (site != self.config.name).then_some(site)
    }
}
