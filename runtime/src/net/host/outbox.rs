//! The outbox: reports of agents' events to their home hosts, stored until acknowledged,
//! and the forwarding pointer an agent leaves.

use crate::context::AgentId;
use crate::faults::crash_point;
use crate::net::host::Host;
use crate::net::messages::{HopInfo, LaunchEvent, Request};
use crate::net::store::{AgentRecord, PendingReport};
use std::sync::Arc;
use std::time::Duration;

impl Host {
    /// The agent's hop to `to` committed there: leave a forwarding pointer and tell its home,
    /// unless it went home (the home recorded the hop when it committed it).
    pub(in crate::net) async fn forwarded(
        self: &Arc<Self>,
        agent: AgentId,
        home: String,
        hop: HopInfo,
    ) {
        let record = AgentRecord::Forwarded {
            seq: hop.seq,
            to: hop.to.clone(),
        };
        if hop.to == home {
            if let Err(e) = self.store.forward(&agent, &record, None).await {
                tracing::error!(%agent, "cannot record that the agent left: {e}");
            }
            return crash_point("source-after-forward");
        }
        let event = LaunchEvent::Moved(hop);
        if home == self.config.name {
            // The pointer and the new status in one write.
            self.note(&agent, event);
            let latest = self.latest_home(&agent);
            let saved = self.store.forward_home(&agent, &record, latest);
            let saved = saved.await;
            if let Err(e) = &saved {
                tracing::error!(%agent, "cannot record that the agent left: {e}");
            }
            self.tell(&agent, saved);
            return crash_point("source-after-forward");
        }
        let report = PendingReport { home, agent, event };
        match self.store.forward(&agent, &record, Some(&report)).await {
            Ok(()) => {
                // Before the outbox is woken: a crash here must leave the report unsent, or
                // it could reach the home before the crash as often as not.
                crash_point("source-after-forward");
                self.outbox.notify_one();
            }
            Err(e) => {
                // The report went with the failed transaction: keep it on its own.
                tracing::error!(%agent, "cannot record that the agent left: {e}");
                Box::pin(self.report(agent, report.home, report.event)).await;
                crash_point("source-after-forward");
            }
        }
    }

    /// Sends an event to the agent's home host (here, or a peer). A report to a peer is
    /// stored first and sent until the home acknowledges it, across restarts of either.
    pub(in crate::net) async fn report(
        self: &Arc<Self>,
        agent: AgentId,
        home: String,
        event: LaunchEvent,
    ) {
        if home == self.config.name {
            return self.deliver(&agent, event).await;
        }
        let report = PendingReport { home, agent, event };
        if let Err(e) = self.store.put_report(&report).await {
            tracing::error!(%agent, "cannot store a report for the home host: {e}");
        }
        self.outbox.notify_one();
    }

    /// Makes the store's commits that did not wait for the disk durable every
    /// [`crate::net::store::LAZY_SYNC`], and drops the instances kept for agents that did not come
    /// ([`crate::recycle`]).
    pub(in crate::net) async fn sync_lazily(self: Arc<Self>) {
        let mut every = tokio::time::interval(crate::net::store::LAZY_SYNC);
        while !self.stopping() {
            every.tick().await;
            let host = self.clone();
            let _ = tokio::task::spawn_blocking(move || host.modules.expire_idle()).await;
            if let Err(e) = self.store.sync_lazy().await {
                tracing::error!("cannot sync the store: {e}");
            }
        }
    }

    /// Delivers stored reports to their home hosts, retrying those that fail.
    pub(in crate::net) async fn deliver_reports(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(200);
        while !self.stopping() {
            let reports = self.store.reports().unwrap_or_else(|e| {
                tracing::error!("cannot read stored reports: {e}");
                Vec::new()
            });
            if reports.is_empty() {
                self.outbox.notified().await;
                continue;
            }
            let mut sending = tokio::task::JoinSet::new();
            for (key, report) in reports {
                let host = self.clone();
                sending.spawn(async move {
                    let request = Request::Report {
                        agent: report.agent,
                        event: report.event,
                    };
                    match host.peers.ask::<()>(&report.home, &request).await {
                        Ok(()) => host.store.remove_report(&key).await.is_ok(),
                        Err(e) => {
                            let (agent, home) = (report.agent, &report.home);
                            tracing::warn!(%agent, %home, "cannot report to the home host: {e}");
                            false
                        }
                    }
                });
            }
            let mut all_sent = true;
            while let Some(sent) = sending.join_next().await {
                all_sent &= sent.unwrap_or(false);
            }
            if all_sent {
                backoff = Duration::from_millis(200);
            } else {
                let _ = tokio::time::timeout(backoff, self.outbox.notified()).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}
