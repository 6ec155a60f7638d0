//! Home records: what an agent's home host knows of it (status, hops, held end), who
//! watches it, and how each event is stored before the watchers hear of it.

use crate::context::AgentId;
use crate::instance::AgentInstance;
use crate::net::certs::Identity;
use crate::net::host::Host;
use crate::net::messages::{AgentState, Asleep, HopInfo, LaunchEvent, ListReply, StatusReply};
use crate::net::store::{HomeRow, HomeWrite};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// How long a home host holds an agent's end back for reports of its earlier hops.
pub(in crate::net) const HOLD_END: Duration = Duration::from_secs(15);

/// A home host's record of one agent launched there.
pub(in crate::net) struct HomeEntry {
    pub(in crate::net) status: StatusReply,
    pub(in crate::net) watchers: Vec<mpsc::UnboundedSender<LaunchEvent>>,
    /// The end, held back until the reports of all earlier hops arrived (they travel from
    /// other hosts and may overtake each other).
    pub(in crate::net) held: Option<LaunchEvent>,
    /// Events recorded so far; the status holds all of them.
    pub(in crate::net) records: u64,
    /// Hops that no stored record may hold yet (the store keeps hops apart from the status),
    /// with the number of the event that recorded each.
    pub(in crate::net) unstored_hops: Vec<(u64, u64)>,
    /// Events a durably stored status holds.
    pub(in crate::net) stored: u64,
    /// Events recorded but not yet heard by the watchers, with their number: they hear of
    /// one once a stored status holds it.
    pub(in crate::net) unheard: Vec<(u64, LaunchEvent)>,
}

impl HomeEntry {
    pub(in crate::net) fn new(
        status: StatusReply,
        watchers: Vec<mpsc::UnboundedSender<LaunchEvent>>,
    ) -> Self {
        HomeEntry {
            status,
            watchers,
            held: None,
            records: 0,
            unstored_hops: Vec::new(),
            stored: 0,
            unheard: Vec::new(),
        }
    }

    /// Applies `event` to the status in memory, or holds it back if it is an end that
    /// overtook reports of earlier hops.
    pub(in crate::net) fn note(&mut self, event: LaunchEvent) -> Noted {
        let reported = self.status.hops.len() as u64;
        if let LaunchEvent::Finished { hops, .. } = &event
            && reported < *hops
        {
            self.held = Some(event);
            return Noted::Held;
        }
        self.record(event);
        let reported = self.status.hops.len() as u64;
        if let Some(LaunchEvent::Finished { hops, .. }) = &self.held
            && *hops <= reported
            && let Some(held) = self.held.take()
        {
            self.record(held);
        }
        // Also when the event was already recorded: told again (its reporter timed out
        // waiting), it is acknowledged only once a stored status holds it.
        match self.records > self.stored {
            true => Noted::Unsaved,
            false => Noted::Saved,
        }
    }

    /// Applies an event to the home status in memory; [`Host::save_home`] stores it.
    pub(in crate::net) fn record(&mut self, event: LaunchEvent) {
        match &event {
            LaunchEvent::Moved(hop) => {
                let hops = &mut self.status.hops;
                let at = hops.partition_point(|h| h.seq < hop.seq);
                if hops.get(at).is_some_and(|h| h.seq == hop.seq) {
                    return; // the same hop reported twice (a host restarted)
                }
                let slept_later = (self.status.sleeping.as_ref()).is_some_and(|s| s.seq > hop.seq);
                if at == hops.len() && !slept_later {
                    self.status.site = hop.to.clone();
                }
                hops.insert(at, hop.clone());
                self.unstored_hops.push((self.records + 1, hop.seq));
                if self
                    .status
                    .sleeping
                    .as_ref()
                    .is_some_and(|s| s.seq < hop.seq)
                {
                    self.status.sleeping = None;
                }
            }
            LaunchEvent::Sleeping {
                site,
                seq,
                until_ms,
            } => {
                // A report of a later hop, or of the end, may have overtaken this one.
                if self.status.state != AgentState::Running
                    || self.status.hops.last().is_some_and(|h| h.seq > *seq)
                {
                    return;
                }
                self.status.site = site.clone();
                self.status.sleeping = Some(Asleep {
                    site: site.clone(),
                    seq: *seq,
                    until_ms: *until_ms,
                });
            }
            // Told again (its host crashed before the agent went on): held already.
            LaunchEvent::Emitted { seq, .. } if *seq <= self.status.emits => return,
            LaunchEvent::Emitted { seq, .. } => self.status.emits = *seq,
            LaunchEvent::Cloning { children, .. } => {
                for child in children {
                    if !self.status.children.contains(&child.agent) {
                        self.status.children.push(child.agent);
                    }
                }
            }
            LaunchEvent::Finished { site, outcome, .. } => {
                self.status.site = site.clone();
                self.status.sleeping = None;
                self.status.state = outcome.state();
                match outcome.result().map(crate::runner::cbor_to_json) {
                    Some(Ok(json)) => self.status.result = Some(json.to_string()),
                    Some(Err(e)) => self.status.error = Some(e.to_string()),
                    None => self.status.error = outcome.error(),
                }
            }
            _ => {}
        }
        self.records += 1;
        self.unheard.push((self.records, event));
    }

    /// What the store is given of it: the status but for its hops, and the hops it may lack.
    pub(in crate::net) fn row(&self) -> HomeWrite {
        let s = &self.status;
        let status = StatusReply {
            agent: s.agent,
            owner: s.owner.clone(),
            site: s.site.clone(),
            state: s.state,
            hops: Vec::new(),
            result: s.result.clone(),
            error: s.error.clone(),
            emits: s.emits,
            sleeping: s.sleeping.clone(),
            waiting_on: None,
            parent: s.parent,
            children: s.children.clone(),
        };
        let hops = (self.unstored_hops.iter())
            .filter_map(|(_, seq)| s.hops.binary_search_by_key(seq, |h| h.seq).ok())
            .map(|at| s.hops[at].clone())
            .collect();
        let row = HomeRow {
            status,
            held_end: self.held.clone(),
        };
        HomeWrite { row, hops }
    }

    /// A stored status holds the events up to record `upto`: the watchers hear of them.
    pub(in crate::net) fn saved(&mut self, upto: u64) {
        self.stored = self.stored.max(upto);
        self.unstored_hops.retain(|(n, _)| *n > upto);
        self.tell(upto);
    }

    /// Tells the watchers, in order, the events up to record `upto`.
    pub(in crate::net) fn tell(&mut self, upto: u64) {
        let later = self.unheard.iter().position(|(n, _)| *n > upto);
        let heard: Vec<_> = self
            .unheard
            .drain(..later.unwrap_or(self.unheard.len()))
            .collect();
        for (_, event) in heard {
            // A child's watchers are its parent's launcher's: they hear whose event it is.
            let event = match self.status.parent {
                Some(_) => LaunchEvent::Child {
                    agent: self.status.agent,
                    event: Box::new(event),
                },
                None => event,
            };
            self.watchers.retain(|w| w.send(event.clone()).is_ok());
        }
    }
}

/// What became of an event told to an agent's home.
#[derive(Debug, PartialEq)]
pub(in crate::net) enum Noted {
    /// The status holds it, and a stored status may not yet: store it before saying so.
    Unsaved,
    /// A stored status holds it.
    Saved,
    /// An end held back until earlier hops are reported. Stored with the status before it
    /// is acknowledged, so that a restart of the home still holds it.
    Held,
}

/// Bytes of records a list reply carries at most, so that it fits in one message.
pub(in crate::net) const LIST_BYTES: usize = crate::net::wire::MAX_MESSAGE / 2;

/// The first records of `all` that fit in [`LIST_BYTES`], and how many there are.
pub(in crate::net) fn fit_list(all: Vec<StatusReply>) -> ListReply {
    let total = all.len() as u64;
    let mut bytes = 0;
    let agents = all
        .into_iter()
        .take_while(|status| {
            let mut out = Vec::new();
            let size = ciborium::into_writer(status, &mut out).map_or(usize::MAX, |()| out.len());
            bytes = size.saturating_add(bytes);
            bytes <= LIST_BYTES
        })
        .collect();
    ListReply { agents, total }
}

impl Host {
    /// Records a new agent of `owner` launched here, watched by `watcher`.
    pub(in crate::net) async fn add_home(
        &self,
        id: AgentId,
        owner: &str,
        watcher: mpsc::UnboundedSender<LaunchEvent>,
    ) {
        let status = StatusReply::new(id, owner, &self.config.name);
        let _ = self.store.put_home(&status).await;
        if let Ok(mut homes) = self.homes.lock() {
            homes.insert(id, HomeEntry::new(status, vec![watcher]));
        }
    }

    /// Drops the watchers of an agent that went away.
    pub(in crate::net) fn forget_gone_watchers(&self, id: &AgentId) {
        if let Ok(mut homes) = self.homes.lock()
            && let Some(entry) = homes.get_mut(id)
        {
            entry.watchers.retain(|w| !w.is_closed());
            entry.watchers.shrink_to_fit();
        }
    }

    /// The records of the agents `owner` launched here, running ones first, each group by id.
    pub(in crate::net) fn home_list(&self, owner: &str) -> Vec<StatusReply> {
        let mut list: Vec<StatusReply> = match self.homes.lock() {
            Ok(homes) => (homes.values())
                .filter(|h| h.status.owner == owner)
                .map(|h| h.status.clone())
                .collect(),
            Err(_) => Vec::new(),
        };
        list.sort_by_key(|a| (a.state != AgentState::Running, a.agent));
        for status in list.iter_mut().filter(|s| s.state == AgentState::Running) {
            status.waiting_on = self.post.waiting_on(&status.agent);
        }
        list
    }

    /// The site an agent launched here was last seen on.
    pub(in crate::net) fn home_site(&self, agent: &AgentId) -> Option<String> {
        let homes = self.homes.lock().ok()?;
        homes.get(agent).map(|e| e.status.site.clone())
    }

    /// Records the hop that brought `agent` back to its home here, from its trace, in case
    /// this host stopped between committing that hop and storing the agent's status (a hop
    /// into its home is not reported by its source). What only the source knew reads 0; a
    /// hop the status holds is not recorded again.
    pub(in crate::net) async fn came_home(self: &Arc<Self>, agent: &AgentInstance) {
        let context = agent.context();
        let Some(last) = (context.trace.last())
            .filter(|h| h.seq == context.hop_seq && context.home == self.config.name)
        else {
            return;
        };
        let info = HopInfo {
            seq: last.seq,
            from: last.from.clone(),
            to: last.to.clone(),
            memory_bytes: agent.memory().len() as u64,
            ..HopInfo::default()
        };
        let agent = context.agent_id;
        self.deliver(&agent, LaunchEvent::Moved(info)).await;
    }

    pub(in crate::net) fn home_status(
        &self,
        agent: &AgentId,
        peer: &Identity,
    ) -> Option<StatusReply> {
        let homes = self.homes.lock().ok()?;
        let mut status = (homes.get(agent))
            .filter(|h| h.status.owner == peer.name)
            .map(|h| h.status.clone())?;
        status.waiting_on = self.post.waiting_on(agent);
        Some(status)
    }

    /// Records an event of an agent launched here and passes it to its watchers.
    pub(in crate::net) async fn deliver(self: &Arc<Self>, agent: &AgentId, event: LaunchEvent) {
        let ended = matches!(event, LaunchEvent::Finished { .. });
        if self.note(agent, event) {
            self.save_home(agent).await;
        }
        if ended {
            self.close_mailbox(agent).await;
        }
    }

    /// Applies an event of an agent launched here to its home status in memory; whether
    /// there is a new status to store. A report told twice (its host restarted) changes
    /// nothing and is not stored again.
    pub(in crate::net) fn note(self: &Arc<Self>, agent: &AgentId, event: LaunchEvent) -> bool {
        let Ok(mut homes) = self.homes.lock() else {
            return false;
        };
        let Some(entry) = homes.get_mut(agent) else {
            tracing::warn!(%agent, "event for an agent not launched here");
            return false;
        };
        match entry.note(event) {
            Noted::Unsaved => true,
            Noted::Saved => false,
            Noted::Held => {
                tracing::info!(
                    %agent,
                    "the end came before reports of earlier hops: held for up to {HOLD_END:?}"
                );
                self.release_held_later(*agent);
                // Stored before it is acknowledged: its reporter forgets it then.
                true
            }
        }
    }

    /// Records the held end of `agent` after [`HOLD_END`] if the reports it waits for have
    /// not come by then: a report may be lost for good (its host died).
    pub(in crate::net) fn release_held_later(self: &Arc<Self>, agent: AgentId) {
        let host = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(HOLD_END).await;
            host.release_held(&agent).await;
        });
    }

    async fn release_held(self: &Arc<Self>, agent: &AgentId) {
        if let Ok(mut homes) = self.homes.lock()
            && let Some(entry) = homes.get_mut(agent)
            && let Some(held) = entry.held.take()
        {
            entry.record(held);
        } else {
            return;
        }
        self.save_home(agent).await;
    }

    /// Stores the agent's home status as it is now, then tells the watchers the events it
    /// holds. The status is read inside the write transaction, so writes of one agent's
    /// status, which the store makes one at a time, store ever newer ones; and no write waits
    /// for the disk with `homes` locked, so the statuses of many agents share one sync.
    pub(in crate::net) async fn save_home(self: &Arc<Self>, agent: &AgentId) {
        let saved = self.store.put_home_latest(self.latest_home(agent)).await;
        self.tell(agent, saved);
    }

    /// The agent's home status as it is when the store's transaction reads it, with the
    /// number of events it holds.
    pub(in crate::net) fn latest_home(
        self: &Arc<Self>,
        agent: &AgentId,
    ) -> impl Fn() -> Option<(HomeWrite, u64)> + Send + 'static {
        let (host, id) = (self.clone(), *agent);
        move || {
            let homes = host.homes.lock().ok()?;
            homes.get(&id).map(|e| (e.row(), e.records))
        }
    }

    /// Tells the agent's watchers the events its home status held when `saved`.
    pub(in crate::net) fn tell(
        &self,
        agent: &AgentId,
        saved: Result<Option<u64>, crate::net::store::StoreError>,
    ) {
        let Ok(mut homes) = self.homes.lock() else {
            return;
        };
        let Some(entry) = homes.get_mut(agent) else {
            return;
        };
        match saved {
            Ok(Some(upto)) => entry.saved(upto),
            Ok(None) => {}
            Err(e) => {
                // The event happened all the same: its watchers hear of it.
                tracing::error!(%agent, "cannot store the home record: {e}");
                entry.tell(u64::MAX);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::messages::AgentEnd;

    fn entry() -> HomeEntry {
        HomeEntry {
            status: StatusReply::new(AgentId([1; 16]), "alice", "siteA"),
            watchers: Vec::new(),
            held: None,
            records: 0,
            unstored_hops: Vec::new(),
            stored: 0,
            unheard: Vec::new(),
        }
    }

    fn moved(seq: u64, to: &str) -> LaunchEvent {
        LaunchEvent::Moved(HopInfo {
            seq,
            from: "siteA".into(),
            from_arch: "x86_64".into(),
            to: to.into(),
            ..HopInfo::default()
        })
    }

    fn sleeping(seq: u64, site: &str) -> LaunchEvent {
        LaunchEvent::Sleeping {
            site: site.into(),
            seq,
            until_ms: 42,
        }
    }

    #[test]
    fn a_list_of_many_agents_fits_in_one_message() {
        let many: Vec<StatusReply> = (0..20_000u32)
            .map(|i| {
                let mut status = entry().status;
                status.agent.0[..4].copy_from_slice(&i.to_le_bytes());
                status.hops = (1..=3)
                    .map(|seq| match moved(seq, "siteB") {
                        LaunchEvent::Moved(hop) => hop,
                        _ => unreachable!(),
                    })
                    .collect();
                status
            })
            .collect();
        let reply = fit_list(many.clone());
        assert_eq!(reply.total, 20_000);
        assert!(!reply.agents.is_empty() && reply.agents.len() < many.len());
        assert_eq!(reply.agents[..], many[..reply.agents.len()]);
        let mut bytes = Vec::new();
        ciborium::into_writer(&reply, &mut bytes).unwrap();
        assert!(bytes.len() <= crate::net::wire::MAX_MESSAGE);
        // A short list is whole.
        let few = fit_list(many[..10].to_vec());
        assert_eq!((few.agents.len(), few.total), (10, 10));
    }

    #[test]
    fn watchers_hear_events_in_order_once_a_stored_status_holds_them() {
        let mut home = entry();
        let (tx, mut rx) = mpsc::unbounded_channel();
        home.watchers.push(tx);
        for seq in 1..=3 {
            home.record(moved(seq, "siteB"));
        }
        home.record(moved(2, "siteB")); // told twice: recorded once
        assert_eq!(home.records, 3);
        let heard = |rx: &mut mpsc::UnboundedReceiver<LaunchEvent>| {
            std::iter::from_fn(|| rx.try_recv().ok())
                .map(|e| match e {
                    LaunchEvent::Moved(hop) => hop.seq,
                    other => panic!("{other:?}"),
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(heard(&mut rx), Vec::<u64>::new(), "nothing stored yet");
        home.saved(2);
        assert_eq!(heard(&mut rx), [1, 2]);
        home.saved(1); // an older save that finished late
        assert_eq!(heard(&mut rx), Vec::<u64>::new());
        home.saved(3);
        assert_eq!(heard(&mut rx), [3]);
        assert!(home.unheard.is_empty());
    }

    #[test]
    fn a_value_emitted_again_is_held_once_and_heard_once() {
        let mut home = entry();
        let (tx, mut rx) = mpsc::unbounded_channel();
        home.watchers.push(tx);
        let emitted = |seq: u64| LaunchEvent::Emitted {
            seq,
            value: vec![seq as u8],
        };
        for seq in [1, 2, 2, 1, 3] {
            home.note(emitted(seq));
        }
        assert_eq!((home.status.emits, home.records), (3, 3));
        home.saved(3);
        let heard: Vec<u64> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|e| match e {
                LaunchEvent::Emitted { seq, .. } => seq,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(heard, [1, 2, 3]);
        // Told again once stored: acknowledged at once, changing nothing.
        assert_eq!(home.note(emitted(2)), Noted::Saved);
    }

    #[test]
    fn a_report_told_again_is_acknowledged_only_once_a_stored_status_holds_it() {
        let mut home = entry();
        assert_eq!(home.note(moved(1, "siteB")), Noted::Unsaved);
        // Its reporter timed out while the first save was under way, and tells it again.
        assert_eq!(home.note(moved(1, "siteB")), Noted::Unsaved);
        home.saved(1);
        assert_eq!(home.note(moved(1, "siteB")), Noted::Saved);
        assert_eq!(home.records, 1);

        // An end that overtook the report of its last hop waits for it.
        let end = LaunchEvent::Finished {
            site: "siteB".into(),
            hops: 2,
            outcome: AgentEnd::Finished(Vec::new()),
        };
        assert_eq!(home.note(end.clone()), Noted::Held);
        // What the store keeps holds it, so that it is acknowledged only once stored.
        assert_eq!(home.row().row.held_end, Some(end));
        assert_eq!(home.row().row.status.state.as_str(), "running");
        assert_eq!(home.note(moved(2, "siteA")), Noted::Unsaved);
        assert!(home.held.is_none() && home.row().row.held_end.is_none());
        assert_eq!(home.status.state.as_str(), "finished");
        home.saved(home.records);
        assert_eq!(home.note(moved(2, "siteA")), Noted::Saved);
    }

    #[test]
    fn a_sleep_is_shown_until_a_later_hop_and_never_over_one() {
        // In order: asleep on siteB after hop 1, then hop 2 to siteC ends the sleep.
        let mut home = entry();
        home.record(moved(1, "siteB"));
        home.record(sleeping(1, "siteB"));
        assert_eq!(home.status.sleeping.as_ref().map(|s| s.seq), Some(1));
        assert_eq!(home.status.site, "siteB");
        home.record(moved(2, "siteC"));
        assert_eq!(home.status.sleeping, None);
        assert_eq!(home.status.site, "siteC");

        // The report of hop 2 overtook that of the sleep before it: the sleep is old news.
        let mut home = entry();
        home.record(moved(1, "siteB"));
        home.record(moved(2, "siteC"));
        home.record(sleeping(1, "siteB"));
        assert_eq!(home.status.sleeping, None);
        assert_eq!(home.status.site, "siteC");

        // An earlier hop reported after the sleep leaves the sleep standing.
        let mut home = entry();
        home.record(sleeping(2, "siteC"));
        home.record(moved(1, "siteB"));
        assert_eq!(home.status.sleeping.as_ref().map(|s| s.seq), Some(2));
        assert_eq!(home.status.site, "siteC");

        // The end clears it.
        let end = LaunchEvent::Finished {
            site: "siteC".into(),
            hops: 2,
            outcome: AgentEnd::Finished(Vec::new()),
        };
        home.record(end);
        assert_eq!(home.status.sleeping, None);
        // A report of the sleep that arrives after the end changes nothing.
        home.record(sleeping(2, "siteB"));
        assert_eq!(home.status.sleeping, None);
        assert_eq!(home.status.site, "siteC");
    }
}
