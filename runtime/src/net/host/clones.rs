//! Clones: one agent forks into children on other sites, each created exactly once.
//!
//! The parent's host stores the parent with its clone pending before anything else, so that a
//! restart makes the same clone again; the children's ids come from the parent's id and the
//! clone's number, so a clone made again names the same children, and a destination that
//! committed one answers ALREADY COMMITTED. The home records the children before they exist
//! (they report to it as soon as they run), and the parent goes on once every child was
//! created or refused, stored again with the answer.

use crate::context::{AgentId, HopRecord};
use crate::faults::crash_point;
use crate::image::AgentImage;
use crate::instance::AgentInstance;
use crate::net::certs::{Identity, Role};
use crate::net::host::homes::HomeEntry;
use crate::net::host::{Host, Start};
use crate::net::messages::TransferStatus;
use crate::net::messages::{
    AgentEnd, AgentState, ChildStart, HopInfo, LaunchEvent, Refusal, Reply, Request, StatusReply,
};
use crate::net::store::Resume;
use agent_abi::{CloneError, HopError};
use std::sync::Arc;

/// Children an agent may create in all, unless its host says otherwise.
pub const DEFAULT_MAX_CHILDREN: u64 = 64;

/// What became of each child a clone asked for, in the order of its sites.
pub(in crate::net) type Outcomes = Vec<Result<String, CloneError>>;

/// Whether a host can be asked to take a child: this one, or a peer.
pub(in crate::net) fn known_site(host: &Host, site: &str) -> bool {
    site == host.config.name || host.config.peers.contains_key(site)
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

    /// Creates `children` of the stored `agent`, all at once, and writes what became of each
    /// into `outcomes` (at its index).
    pub(in crate::net) async fn make_children(
        self: &Arc<Self>,
        agent: &mut AgentInstance,
        children: &[ChildStart],
        outcomes: &mut Outcomes,
    ) {
        let image = agent.capture();
        let module = agent.module().clone();
        let round = agent.context().clones + 1;
        let mut making = tokio::task::JoinSet::new();
        for child in children {
            let mut image = image.clone();
            image.context = image.context.child(round, child.index, &child.site);
            image.context.hop_seq = 1;
            image.context.record_hop(HopRecord {
                seq: 1,
                from: self.config.name.clone(),
                to: child.site.clone(),
            });
            let (host, module, child) = (self.clone(), module.clone(), child.clone());
            making.spawn(async move {
                let made = match child.site == host.config.name {
                    true => host.child_here(image, &child).await,
                    false => host.send_child(image, module, &child.site).await,
                };
                (child, made)
            });
        }
        let home = agent.context().home.clone();
        while let Some(made) = making.join_next().await {
            let Ok((child, made)) = made else { continue };
            let outcome = match made {
                Ok(hop) => {
                    crash_point("clone-after-child");
                    // A child that went to its home was recorded there by its arrival.
                    if hop.to != home || hop.to == self.config.name {
                        self.report(child.agent, home.clone(), LaunchEvent::Moved(hop))
                            .await;
                    }
                    Ok(child.agent.to_string())
                }
                Err(error) => {
                    tracing::warn!(child = %child.agent, site = %child.site, "no child: {error}");
                    let end = AgentEnd::Broken(format!("not created: {error}"));
                    self.report(child.agent, home.clone(), self.ended(0, end))
                        .await;
                    Err(CloneError::Site(error))
                }
            };
            if let Some(slot) = outcomes.get_mut(child.index as usize) {
                *slot = outcome;
            }
        }
    }

    /// Starts a child on this host: committed like an arrival, so that a clone made again
    /// finds it.
    async fn child_here(
        self: &Arc<Self>,
        image: AgentImage,
        child: &ChildStart,
    ) -> Result<HopInfo, HopError> {
        let site = self.config.name.clone();
        let info = HopInfo {
            seq: 1,
            from: site.clone(),
            from_arch: std::env::consts::ARCH.to_string(),
            to: site.clone(),
            memory_bytes: image.memory_bytes,
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
        let bytes = (image.encode(Default::default())).map_err(|e| refused(e.to_string()))?;
        let module = self.module(&image.module).await;
        let module = module.map_err(|e| refused(e.to_string()))?;
        let restored =
            AgentInstance::restore(module, self.site.clone(), image, &self.config.limits).await;
        let mut agent = restored.map_err(|e| refused(e.to_string()))?;
        let bytes = bytes.to_vec();
        (self
            .store
            .commit_arrival(&child.agent, 1, &bytes, None)
            .await)
            .map_err(|e| refused(e.to_string()))?;
        agent.complete(agent.context().arrived());
        self.spawn_agent(agent, Start::Poll);
        drop(place);
        Ok(info)
    }

    /// Home side: records `children` of `parent` (a clone made again records none twice),
    /// then tells the parent's watchers. Refused when the owner would have more live agents
    /// launched here than it may.
    pub(in crate::net) async fn add_children(
        self: &Arc<Self>,
        parent: &AgentId,
        children: Vec<ChildStart>,
        from: &str,
    ) -> Reply<()> {
        let limit = self.quotas.limits().agents;
        let added = {
            let mut homes = (self.homes.lock()).map_err(|_| Refusal::NoSuchAgent(*parent))?;
            let entry = homes.get(parent).ok_or(Refusal::NoSuchAgent(*parent))?;
            if entry.status.state != AgentState::Running {
                return Err(Refusal::Ended(*parent));
            }
            let (owner, watchers) = (entry.status.owner.clone(), entry.watchers.clone());
            let new: Vec<&ChildStart> = (children.iter())
                .filter(|c| !homes.contains_key(&c.agent))
                .collect();
            let live = (homes.values())
                .filter(|h| h.status.owner == owner && h.status.state == AgentState::Running)
                .count();
            if !new.is_empty() && live + new.len() > limit {
                let (user, limit) = (owner, limit as u64);
                return Err(Refusal::TooManyAgents { user, limit });
            }
            let mut added = Vec::new();
            for child in new {
                let status = StatusReply {
                    parent: Some(*parent),
                    ..StatusReply::new(child.agent, &owner, &child.site)
                };
                homes.insert(
                    child.agent,
                    HomeEntry::new(status.clone(), watchers.clone()),
                );
                added.push(status);
            }
            added
        };
        for status in &added {
            if let Err(e) = self.store.put_home(status).await {
                tracing::error!(agent = %status.agent, "cannot record a child: {e}");
            }
        }
        let site = from.to_string();
        (self.deliver(parent, LaunchEvent::Cloning { site, children })).await;
        crash_point("home-after-children");
        Ok(())
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

    /// Asks the parent's home to record `children` (here, if it is this host).
    pub(in crate::net) async fn register_children(
        self: &Arc<Self>,
        parent: AgentId,
        home: &str,
        children: &[ChildStart],
    ) -> Result<Reply<()>, String> {
        if home == self.config.name {
            let name = self.config.name.clone();
            return Ok(self.add_children(&parent, children.to_vec(), &name).await);
        }
        let request = Request::Children {
            parent,
            children: children.to_vec(),
        };
        (self.peers.ask::<Reply<()>>(home, &request).await).map_err(|e| e.to_string())
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
