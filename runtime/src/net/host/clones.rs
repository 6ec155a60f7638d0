//! Clones: one agent forks into children on other sites, each created exactly once.
//!
//! The parent's host stores the parent with its clone pending before anything else, so that a
//! restart makes the same clone again; the children's ids come from the parent's id and the
//! clone's number, so a clone made again names the same children, and a destination that
//! committed one answers ALREADY COMMITTED. The home records the children before they exist
//! (they report to it as soon as they run), and the parent goes on once every child was
//! created or refused, stored again with the answer.

use crate::backoff::Backoff;
use crate::context::{AgentContext, AgentId};
use crate::faults::crash_point;
use crate::image::{AgentImage, Encoded};
use crate::instance::AgentInstance;
use crate::net::certs::{Identity, Role};
use crate::net::host::homes::HomeEntry;
use crate::net::host::{Host, Start};
use crate::net::messages::TransferStatus;
use crate::net::messages::{
    AgentEnd, AgentState, ChildStart, HopInfo, LaunchEvent, Refusal, Reply, Request, StatusReply,
    unix_us,
};
use crate::net::peers::PeerError;
use crate::net::residents::Found;
use crate::net::store::Resume;
use agent_abi::{CloneError, HopError};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Children an agent may create in all, unless its host says otherwise.
pub const DEFAULT_MAX_CHILDREN: u64 = 64;

/// What became of each child a clone asked for, in the order of its sites.
pub(in crate::net) type Outcomes = Vec<Result<String, CloneError>>;

/// The launchers that follow an agent.
type Watchers = Vec<tokio::sync::mpsc::UnboundedSender<LaunchEvent>>;

/// Whether a host can be asked to take a child: this one, or a peer.
pub(in crate::net) fn known_site(host: &Host, site: &str) -> bool {
    site == host.config.name || host.peers.knows(site)
}

impl Host {
    /// The children of the next clone of `agent`, one per site this host knows.
    pub(in crate::net) fn children_of(
        &self,
        agent: &AgentInstance,
        sites: &[String],
    ) -> Vec<ChildStart> {
        let context = agent.context();
        let round = context.clones + 1;
        (sites.iter().enumerate())
            .filter(|(_, site)| known_site(self, site))
            .map(|(index, site)| ChildStart {
                agent: context.agent_id.child(round, index as u32),
                index: index as u32,
                site: site.clone(),
            })
            .collect()
    }

    /// Creates `children` of the stored `agent`, all at once, and writes into `outcomes` (at
    /// each one's index) what became of each; yields those not made, with why, for the caller
    /// to report once the parent is stored with its answer. `redo`: the clone is being made
    /// again after a restart, so a child whose site cannot be reached now may have been made
    /// before: its site settles it. `None` if this host began to shut down meanwhile (the
    /// parent, stored with its clone pending, makes it again on restart).
    pub(in crate::net) async fn make_children(
        self: &Arc<Self>,
        agent: &mut AgentInstance,
        children: &[ChildStart],
        (outcomes, redo): (&mut Outcomes, bool),
        frozen: (Instant, u64),
    ) -> Option<Vec<(ChildStart, HopError)>> {
        let module = agent.module().clone();
        let round = agent.context().clones + 1;
        let home = agent.context().home.clone();
        let mut image = agent.capture();
        let contexts: Vec<AgentContext> = (children.iter())
            .map(|c| (image.context).child(round, c.index, (&self.config.name, &c.site)))
            .collect();
        // One body for all: the children differ only in their contexts.
        let encoded = match image.encode_each(contexts.clone()) {
            Ok(encoded) => encoded,
            Err(e) => {
                let why = |c: &ChildStart| HopError::Unreachable {
                    site: c.site.clone(),
                    reason: format!("cannot encode the child: {e}"),
                };
                return Some(children.iter().map(|c| (c.clone(), why(c))).collect());
            }
        };
        let mut making = FuturesUnordered::new();
        for ((child, context), encoded) in children.iter().zip(contexts).zip(encoded) {
            image.context = context;
            let image = image.clone();
            let module = module.clone();
            making.push(async move {
                let made = match child.site == self.config.name {
                    true => Some(self.child_here((image, encoded), child, frozen).await),
                    false => {
                        let sent = self.send_child((image, encoded), module, &child.site, frozen);
                        match (sent.await, redo) {
                            (Err(HopError::Unreachable { .. }), true) => {
                                self.settle_child(child).await
                            }
                            (sent, _) => Some(sent),
                        }
                    }
                };
                (child, made)
            });
        }
        let mut not_made = Vec::new();
        let mut stopped = false;
        while let Some((child, made)) = making.next().await {
            match made {
                Some(Ok(hop)) => {
                    crash_point("clone-after-child");
                    self.metrics.clone_made();
                    // Told again if the home recorded it already (its arrival there): it
                    // holds each hop once.
                    (self.report(child.agent, home.clone(), LaunchEvent::Moved(hop))).await;
                    if let Some(slot) = outcomes.get_mut(child.index as usize) {
                        *slot = Ok(child.agent.to_string());
                    }
                }
                Some(Err(error)) => {
                    tracing::warn!(child = %child.agent, site = %child.site, "no child: {error}");
                    if let Some(slot) = outcomes.get_mut(child.index as usize) {
                        *slot = Err(CloneError::Site(error.clone()));
                    }
                    not_made.push((child.clone(), error));
                }
                None => stopped = true,
            }
        }
        (!stopped).then_some(not_made)
    }

    /// A child of a clone made again could not be sent to its site: asks the site whether an
    /// earlier attempt made it, until it answers. `None` if this host began to shut down.
    async fn settle_child(&self, child: &ChildStart) -> Option<Result<HopInfo, HopError>> {
        let mut pause = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let query = Request::Query {
            agent: child.agent,
            seq: 1,
        };
        loop {
            let status = self.peers.ask::<Reply<TransferStatus>>(&child.site, &query);
            match status.await {
                Ok(Ok(TransferStatus::Committed)) => {
                    return Some(Ok(HopInfo {
                        seq: 1,
                        from: self.config.name.clone(),
                        to: child.site.clone(),
                        ..HopInfo::default()
                    }));
                }
                Ok(Ok(TransferStatus::Aborted)) => {
                    return Some(Err(HopError::Unreachable {
                        site: child.site.clone(),
                        reason: "the child was never made there".into(),
                    }));
                }
                Ok(Ok(TransferStatus::InProgress)) | Ok(Err(_)) | Err(_) => {}
            }
            tokio::select! {
                () = tokio::time::sleep(pause.wait()) => {}
                () = self.stopping.cancelled() => return None,
            }
        }
    }

    /// Tells the parent's home that each child of `not_made` was never made, and why.
    pub(in crate::net) async fn not_made(
        self: &Arc<Self>,
        home: &str,
        not_made: Vec<(ChildStart, HopError)>,
    ) {
        for (child, error) in not_made {
            let end = LaunchEvent::Finished {
                site: child.site.clone(),
                hops: 0,
                outcome: AgentEnd::Broken(format!("not created: {error}")),
            };
            (self.report(child.agent, home.to_string(), end)).await;
        }
    }

    /// Starts a child on this host: committed like an arrival, so that a clone made again
    /// finds it.
    async fn child_here(
        self: &Arc<Self>,
        (image, encoded): (AgentImage, Encoded),
        child: &ChildStart,
        (frozen, frozen_at_us): (Instant, u64),
    ) -> Result<HopInfo, HopError> {
        let site = self.config.name.clone();
        let mut info = HopInfo {
            seq: 1,
            from: site.clone(),
            from_arch: std::env::consts::ARCH.to_string(),
            to: site.clone(),
            memory_bytes: image.memory_bytes,
            frozen_at_us,
            ..HopInfo::default()
        };
        let status = self.store.transfer(&child.agent, 1).ok().flatten();
        if status == Some(TransferStatus::Committed) {
            return Ok(info);
        }
        let refused = |reason: String| HopError::Refused {
            site: site.clone(),
            reason,
        };
        let place = self
            .reserve(&image.context.owner)
            .map_err(|over| refused(over.to_string()))?;
        let module = self.module(&image.module).await;
        let module = module.map_err(|e| refused(e.to_string()))?;
        let restored =
            AgentInstance::restore(module, self.site.clone(), image, &self.config.limits).await;
        let mut agent = restored.map_err(|e| refused(e.to_string()))?;
        let bytes = encoded.to_vec();
        (self
            .store
            .commit_arrival(&child.agent, 1, &bytes, None)
            .await)
            .map_err(|e| refused(e.to_string()))?;
        agent.complete(agent.context().arrived());
        self.spawn_agent(agent, Start::Poll);
        drop(place);
        info.resumed_at_us = unix_us();
        info.committed_us = frozen.elapsed().as_micros() as u64;
        info.freeze_us = info.committed_us;
        Ok(info)
    }

    /// Home side: records `children` of clone `round` of `parent` (a clone made again records
    /// none twice) durably, then tells the parent's watchers. Refused when the owner would
    /// have more live agents launched here than it may. A child is known here only once its
    /// record is durable: one asked for again meanwhile is written again, and answered once
    /// that write is.
    pub(in crate::net) async fn add_children(
        self: &Arc<Self>,
        (parent, round): (&AgentId, u64),
        children: Vec<ChildStart>,
        from: &str,
    ) -> Reply<()> {
        if children
            .iter()
            .any(|c| c.agent != parent.child(round, c.index))
        {
            return Err(Refusal::NotYours(*parent));
        }
        let (added, watchers) = self.new_children(parent, &children)?;
        if let Err(e) = self.store.put_homes(&added).await {
            // Not recorded, not made: the parent hears why.
            tracing::error!(%parent, "cannot record the children: {e}");
            return Err(Refusal::Store(e.to_string()));
        }
        if let Ok(mut homes) = self.homes.lock() {
            for status in added {
                let id = status.agent;
                (homes.entry(id)).or_insert_with(|| HomeEntry::new(status, watchers.clone()));
                // Known as the parent's at once: a kill of the parent finds it.
                if let Some(entry) = homes.get_mut(parent)
                    && !entry.status.children.contains(&id)
                {
                    entry.status.children.push(id);
                }
            }
        }
        let site = from.to_string();
        (self.deliver(parent, LaunchEvent::Cloning { site, children })).await;
        crash_point("home-after-children");
        Ok(())
    }

    /// The records of those of `children` of `parent` not known here yet, within the owner's
    /// live agents, and the parent's watchers.
    fn new_children(
        &self,
        parent: &AgentId,
        children: &[ChildStart],
    ) -> Reply<(Vec<StatusReply>, Watchers)> {
        let limit = self.quotas.limits().agents;
        let homes = (self.homes.lock()).map_err(|_| Refusal::NoSuchAgent(*parent))?;
        let entry = homes.get(parent).ok_or(Refusal::NoSuchAgent(*parent))?;
        if entry.status.state != AgentState::Running {
            return Err(Refusal::Ended(*parent));
        }
        let owner = &entry.status.owner;
        let new: Vec<StatusReply> = (children.iter())
            .filter(|c| !homes.contains_key(&c.agent))
            .map(|c| StatusReply {
                parent: Some(*parent),
                ..StatusReply::new(c.agent, owner, &c.site)
            })
            .collect();
        let live = (homes.values())
            .filter(|h| &h.status.owner == owner && h.status.state == AgentState::Running)
            .count();
        if !new.is_empty() && live + new.len() > limit {
            let (user, limit) = (owner.clone(), limit as u64);
            return Err(Refusal::TooManyAgents { user, limit });
        }
        Ok((new, entry.watchers.clone()))
    }

    /// An agent's descendants that its home here knows, each before its own children.
    pub(in crate::net) fn descendants(&self, agent: &AgentId) -> Vec<AgentId> {
        let Ok(homes) = self.homes.lock() else {
            return Vec::new();
        };
        let mut found = Vec::new();
        let mut next = vec![*agent];
        while let Some(id) = next.pop() {
            for child in homes
                .get(&id)
                .map(|h| h.status.children.clone())
                .unwrap_or_default()
            {
                if !found.contains(&child) {
                    found.push(child);
                    next.push(child);
                }
            }
        }
        found
    }

    /// Kills an agent launched here for its owner, and all its descendants that still run.
    pub(in crate::net) async fn kill_tree(
        self: &Arc<Self>,
        agent: &AgentId,
        peer: &Identity,
    ) -> Reply<()> {
        let killed = self.kill(agent, peer).await;
        if peer.role != Role::User || matches!(killed, Err(Refusal::NotYours(_))) {
            return killed;
        }
        for child in self.descendants(agent) {
            let running = (self.homes.lock().ok())
                .and_then(|h| h.get(&child).map(|e| e.status.state == AgentState::Running));
            if running == Some(true)
                && let Err(e) = self.kill(&child, peer).await
            {
                tracing::warn!(%child, "cannot kill a child: {e}");
            }
        }
        killed
    }

    /// Kills the children of a parent killed while they were made, where they started.
    pub(in crate::net) async fn kill_children(&self, children: &[ChildStart], made: &Outcomes) {
        let made = children
            .iter()
            .filter(|c| made.get(c.index as usize).is_some_and(Result::is_ok));
        for child in made {
            let killed = match child.site == self.config.name {
                true => !matches!(self.residents.kill(&child.agent), Found::Absent),
                false => {
                    let kill = Request::Kill { agent: child.agent };
                    let asked = self.peers.ask::<Reply<()>>(&child.site, &kill).await;
                    matches!(asked, Ok(Ok(())))
                }
            };
            if !killed {
                tracing::warn!(child = %child.agent, site = %child.site, "cannot kill a child");
            }
        }
    }

    /// Asks the parent's home to record `children` of its clone `round` (here, if it is this
    /// host).
    pub(in crate::net) async fn register_children(
        self: &Arc<Self>,
        (parent, round): (AgentId, u64),
        home: &str,
        children: &[ChildStart],
    ) -> Result<Reply<()>, PeerError> {
        if home == self.config.name {
            let name = self.config.name.clone();
            let children = children.to_vec();
            return Ok(self.add_children((&parent, round), children, &name).await);
        }
        let request = Request::Children {
            parent,
            round,
            children: children.to_vec(),
        };
        self.peers.ask::<Reply<()>>(home, &request).await
    }

    /// What a clone to `sites` says before any child is made: an unknown site is an error,
    /// every other site gets `error` until its child is made.
    pub(in crate::net) fn unmade(&self, sites: &[String], error: CloneError) -> Outcomes {
        (sites.iter())
            .map(|site| match known_site(self, site) {
                true => Err(error.clone()),
                false => Err(CloneError::Site(HopError::UnknownSite(site.clone()))),
            })
            .collect()
    }

    /// Stores the parent once its clone completed, so that a restart goes on after it.
    pub(in crate::net) async fn keep_cloned(&self, agent: &mut AgentInstance) {
        if let Err(e) = self.keep(agent, Resume::Poll).await {
            let id = agent.context().agent_id;
            tracing::warn!(agent = %id, "cannot store the agent after its clone: {e}");
        }
    }
}
