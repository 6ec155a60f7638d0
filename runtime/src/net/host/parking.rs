//! Parking: an agent asleep for long is stored and its memory freed; an alarm wakes it.

use crate::context::AgentId;
use crate::instance::AgentInstance;
use crate::net::host::{Host, Start};
use crate::net::messages::{AgentEnd, LaunchEvent, Refusal, Reply, Request, unix_ms};
use crate::net::store::{AgentRecord, Resume};
use crate::state::AgentFlags;
use agent_abi::OpResult;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// How long a host waits before it tries again to wake an agent whose image it could not
/// restore (it stays parked meanwhile, and a kill still reaches it).
pub(in crate::net) const WAKE_RETRY: Duration = Duration::from_secs(30);

/// How long a due agent whose owner runs as many agents as a user may stays parked before it
/// tries again.
pub(in crate::net) const WAKE_DEFERRED: Duration = Duration::from_secs(1);

/// Parked agents restored at once.
pub(in crate::net) const WAKING_AT_ONCE: usize = 4;

/// How parking an agent went.
enum Parking {
    /// Stored, its instance freed, its alarm set.
    Parked,
    /// Killed meanwhile: it ended.
    Ended,
    /// Not stored (its owner's quota, or the store failed): it waits in memory.
    InMemory,
}

/// Sleeps `ms` unless the agent is killed meanwhile; `false` if it was.
pub(in crate::net) async fn sleep_unless_killed(flags: &AgentFlags, ms: u64) -> bool {
    let sleep = tokio::time::sleep(Duration::from_millis(ms.min(1 << 40)));
    tokio::select! {
        () = sleep => !flags.kill.load(Ordering::SeqCst),
        () = flags.killed.cancelled() => false,
    }
}

impl Host {
    /// Parks an agent that sleeps `ms`: stores it with its sleep completed, frees its instance
    /// and sets an alarm. `false` when it could not be stored (it then sleeps in memory).
    pub(in crate::net) async fn park_asleep(
        self: &Arc<Self>,
        agent: &mut AgentInstance,
        ms: u64,
    ) -> bool {
        let until_ms = unix_ms().saturating_add(ms);
        // Completed in the image: when it is due, it is polled.
        agent.complete(OpResult::Sleep);
        match self.park_until(agent, until_ms, false).await {
            Parking::InMemory => return false,
            Parking::Ended => return true,
            Parking::Parked => {}
        }
        let context = agent.context();
        let id = context.agent_id;
        tracing::info!(agent = %id, until_ms, "parked asleep");
        let event = LaunchEvent::Sleeping {
            site: self.config.name.clone(),
            seq: context.hop_seq,
            until_ms,
        };
        self.report(id, context.home.clone(), event).await;
        true
    }

    /// Parks an agent that waits for a message: stores it with its `recv` pending, frees its
    /// instance, sets an alarm for the end of its wait (`until_ms`) and tells its home where
    /// it waits, which wakes it when a message comes. `false` when it could not be stored (it
    /// then waits in memory).
    pub(in crate::net) async fn park_waiting(
        self: &Arc<Self>,
        agent: &mut AgentInstance,
        until_ms: u64,
    ) -> bool {
        let context = agent.context();
        let (id, home) = (context.agent_id, context.home.clone());
        let after = context.received + context.inbox.len() as u64;
        match self.park_until(agent, until_ms, true).await {
            Parking::InMemory => return false,
            Parking::Ended => return true,
            Parking::Parked => {}
        }
        tracing::info!(agent = %id, "parked waiting for a message");
        // Parked first, then its home told: a message that comes after the home heard wakes
        // it, and one that came before is "ready" here. A home that cannot be told wakes it
        // too: it then waits in memory, asking its home again.
        let ready = match home == self.config.name {
            true => self.await_mail(&id, after, &home).await,
            false => {
                let wait = Request::Await { agent: id, after };
                let asked = self.peers.ask::<Reply<bool>>(&home, &wait).await;
                asked.unwrap_or_else(|e| Err(Refusal::Unreachable(e.to_string())))
            }
        };
        if ready != Ok(false) {
            self.wake(id);
        }
        true
    }

    /// Stores `agent` at its safe point to be woken at `until_ms` (and, if it waits for a
    /// `mail`, by a message), frees its instance and sets its alarm: into `parked` and out of
    /// `running` at once, so that a kill finds it in one of them.
    async fn park_until(
        self: &Arc<Self>,
        agent: &mut AgentInstance,
        until_ms: u64,
        mail: bool,
    ) -> Parking {
        let context = agent.context();
        let (id, owner) = (context.agent_id, context.owner.clone());
        let (home, hops) = (context.home.clone(), context.hops());
        let parked = self.residents.counts(&owner).parked;
        if parked >= self.quotas.limits().parked {
            tracing::info!(agent = %id, %owner, parked, "staying in memory: its owner has as many agents parked here as a user may (user_max_parked)");
            return Parking::InMemory;
        }
        let resume = Resume::Wake {
            until_ms,
            home: home.clone(),
            hops,
            owner: owner.clone(),
            mail,
        };
        if let Err(e) = self.keep(agent, resume).await {
            tracing::warn!(agent = %id, "staying in memory: {e}");
            return Parking::InMemory;
        }
        let flags = agent.flags();
        if !(self.residents).park(id, &flags, &owner, || self.alarm(id, until_ms)) {
            self.finish(id, home, hops, AgentEnd::Killed).await;
            return Parking::Ended;
        }
        self.trimmer.freed();
        Parking::Parked
    }

    /// Sets the alarm of a parked agent (one whose record says [`Resume::Wake`]).
    pub(in crate::net) fn set_alarm(self: &Arc<Self>, id: AgentId, owner: &str, until_ms: u64) {
        (self.residents).set_alarm(id, owner, || self.alarm(id, until_ms));
    }

    /// A task that wakes agent `id` at `until_ms`. Call with the residents locked, and put
    /// the handle there before unlocking: the task may be due at once.
    pub(in crate::net) fn alarm(
        self: &Arc<Self>,
        id: AgentId,
        until_ms: u64,
    ) -> tokio::task::AbortHandle {
        let host = self.clone();
        let task = tokio::spawn(async move {
            // By the wall clock, which a parked agent's deadline is stored in; rechecked at
            // least hourly so that a long sleep follows a clock that was set.
            loop {
                let now = unix_ms();
                if now >= until_ms {
                    break;
                }
                tokio::time::sleep(Duration::from_millis((until_ms - now).min(3_600_000))).await;
            }
            host.wake(id);
        });
        task.abort_handle()
    }

    /// Wakes a parked agent (its alarm rang).
    pub(in crate::net) fn wake(self: &Arc<Self>, id: AgentId) {
        // Its own task: an alarm stays small, whatever restoring takes.
        tokio::spawn(self.clone().wake_parked(id));
    }

    /// Restores a parked agent from its stored image and polls it; a few at a time and only
    /// while there is room, so that a host whose agents all fell due together (it was down,
    /// or they slept alike) does not restore them all at once.
    pub(in crate::net) async fn wake_parked(self: Arc<Self>, id: AgentId) {
        let Ok(_permit) = self.waking.acquire().await else {
            return;
        };
        if let Some(owner) = self.residents.parked_owner(&id)
            && self.residents.counts(&owner).running >= self.quotas.limits().running
        {
            // Its owner runs as many agents here as a user may: it stays parked a while
            // longer, and the other users' agents that are due wake meanwhile.
            let again = unix_ms().saturating_add(WAKE_DEFERRED.as_millis() as u64);
            return self.set_alarm(id, &owner, again);
        }
        self.room_to_run().await;
        if self.stopping() {
            return; // it stays parked: the next start sets its alarm again
        }
        // Running from now on (its flags stand in until it is restored), unless a kill took
        // it out of `parked` first.
        let flags = Arc::<AgentFlags>::default();
        let Some(owner) = self.residents.wake(id, flags.clone()) else {
            return;
        };
        let (image, home, hops, waiting, until_ms) = match self.store.agent(&id) {
            Ok(Some(AgentRecord::Resident {
                image,
                resume:
                    Resume::Wake {
                        home,
                        hops,
                        mail,
                        until_ms,
                        ..
                    },
                ..
            })) => (image, home, hops, mail.then_some(until_ms), until_ms),
            other => {
                tracing::error!(agent = %id, "no parked image to wake: {other:?}");
                return self.forget_running(&id);
            }
        };
        match self.restore_stored(&image).await {
            Ok(mut agent) => {
                agent.adopt_flags(flags);
                tracing::info!(agent = %id, "woke");
                let mut start = match (waiting, agent.context().pending.clone()) {
                    (Some(until_ms), Some(op)) => Start::Waiting(op, until_ms),
                    _ => Start::Poll,
                };
                if self.draining() {
                    start = Host::start_to_leave(&mut agent, until_ms, start);
                }
                self.spawn_agent(agent, start);
            }
            Err(e) => {
                tracing::error!(agent = %id, "cannot wake, trying again in {WAKE_RETRY:?}: {e}");
                let again = unix_ms().saturating_add(WAKE_RETRY.as_millis() as u64);
                let parked = (self.residents).park(id, &flags, &owner, || self.alarm(id, again));
                if !parked {
                    self.finish(id, home, hops, AgentEnd::Killed).await;
                }
            }
        }
    }

    /// Ends a parked agent that was killed: its alarm is cancelled, its record removed.
    pub(in crate::net) async fn kill_parked(
        self: &Arc<Self>,
        id: AgentId,
        alarm: tokio::task::AbortHandle,
    ) -> Reply<()> {
        alarm.abort();
        match self.store.agent(&id) {
            Ok(Some(AgentRecord::Resident {
                resume: Resume::Wake { home, hops, .. },
                ..
            })) => {
                self.finish(id, home, hops, AgentEnd::Killed).await;
                Ok(())
            }
            other => Err(Refusal::Store(format!(
                "no parked record of agent {id}: {other:?}"
            ))),
        }
    }
}
