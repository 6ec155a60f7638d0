//! What users ask of an agent's home: launch (with the module sent once per user and host),
//! and kill.

use crate::context::{AgentContext, AgentId};
use crate::instance::AgentInstance;
use crate::modules::{AgentModule, ModuleHash};
use crate::net::budget::InFlight;
use crate::net::certs::{Identity, Role};
use crate::net::host::*;
use crate::net::messages::{AgentEnd, AgentState, LaunchEvent, Request, StatusReply};
use crate::net::quota::OverQuota;
use crate::net::residents::{Found, Full, Reserved};
use crate::net::store::{AgentRecord, Resume};
use crate::net::wire::{WireError, read_blob, write_msg};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::sync::mpsc;

/// The queues of launches sending a module, by user and module ([`UploadTurn`]).
pub(in crate::net) type Uploads = HashMap<(String, ModuleHash), Arc<tokio::sync::Mutex<()>>>;

/// A launch's place in the queue of those sending one module ([`Host::launch_module`]). The
/// queue's entry goes with its last member, however that one ends (a deadline may drop it).
pub(in crate::net) struct UploadTurn<'a> {
    host: &'a Host,
    key: (String, ModuleHash),
    turn: Option<Arc<tokio::sync::Mutex<()>>>,
}

impl<'a> UploadTurn<'a> {
    pub(in crate::net) fn new(host: &'a Host, key: (String, ModuleHash)) -> Self {
        let turn = match host.uploads.lock() {
            Ok(mut uploads) => uploads.entry(key.clone()).or_default().clone(),
            Err(_) => Arc::default(),
        };
        UploadTurn {
            host,
            key,
            turn: Some(turn),
        }
    }

    /// Waits until the launches before this one are done.
    pub(in crate::net) async fn wait(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
        match &self.turn {
            Some(turn) => Some(turn.lock().await),
            None => None,
        }
    }
}

impl Drop for UploadTurn<'_> {
    fn drop(&mut self) {
        drop(self.turn.take());
        if let Ok(mut uploads) = self.host.uploads.lock()
            && uploads
                .get(&self.key)
                .is_some_and(|t| Arc::strong_count(t) == 1)
        {
            uploads.remove(&self.key);
        }
    }
}

impl Host {
    /// Launches an agent of the module named (or sent) with its itinerary and arguments, and
    /// streams its events to the launcher until it ends.
    pub(in crate::net) async fn serve_launch(
        self: &Arc<Self>,
        peer: &Identity,
        (known, itinerary, args): (Option<ModuleHash>, Vec<String>, BTreeMap<String, String>),
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
        inflight: &mut InFlight,
    ) -> Result<(), WireError> {
        if peer.role != Role::User {
            return write_msg(
                send,
                &LaunchEvent::Refused(format!(
                    "only users launch agents, and {peer} is not a user"
                )),
            )
            .await;
        }
        if self.shutting_down.load(Ordering::SeqCst) {
            return write_msg(
                send,
                &LaunchEvent::Refused("the host is shutting down".into()),
            )
            .await;
        }
        // A place for the agent, held from here until it runs (or the launch fails).
        let place = match self.may_launch(&peer.name) {
            Ok(place) => place,
            Err(over) => {
                tracing::info!(%peer, "refused a launch: {over}");
                return write_msg(send, &LaunchEvent::Refused(over.to_string())).await;
            }
        };
        let read = self.launch_module(&peer.name, known, send, recv, inflight);
        let module = match tokio::time::timeout(MODULE_DEADLINE, read).await {
            Ok(Ok(Ok(module))) => module,
            Ok(Ok(Err(refused))) => return write_msg(send, &LaunchEvent::Refused(refused)).await,
            Ok(Err(e)) => {
                // Told, in case the stream still carries it (a budget was full, say).
                let why = format!("the module was not received: {e}");
                let _ = write_msg(send, &LaunchEvent::Refused(why)).await;
                return Err(e);
            }
            Err(_) => {
                let late = WireError::Late {
                    what: "module",
                    within: MODULE_DEADLINE,
                };
                let _ = write_msg(send, &LaunchEvent::Refused(late.to_string())).await;
                return Err(late);
            }
        };
        // The module is admitted and stored: its bytes are no longer held for the launch.
        inflight.release();
        let context = AgentContext::new(&self.config.name, &peer.name, itinerary, args);
        let id = context.agent_id;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let status = StatusReply {
            agent: id,
            owner: peer.name.clone(),
            site: self.config.name.clone(),
            state: AgentState::Running,
            hops: Vec::new(),
            result: None,
            error: None,
            sleeping: None,
        };
        let _ = self.store.put_home_async(&status).await;
        if let Ok(mut homes) = self.homes.lock() {
            homes.insert(id, HomeEntry::new(status, vec![tx]));
        }
        let launched = match AgentInstance::launch(
            module.clone(),
            self.site.clone(),
            context,
            &self.config.limits,
        )
        .await
        {
            // From here on a crash of this host does not lose the agent.
            Ok(mut agent) => match self.keep_async(&mut agent, Resume::Poll).await {
                Ok(()) => Ok(agent),
                Err(e) => Err(AgentEnd::Broken(e.to_string())),
            },
            Err(e) => Err(AgentEnd::from(&e)),
        };
        match launched {
            Ok(agent) => {
                // Said once the agent is stored: a detached launcher may leave at this point.
                let said = write_msg(
                    send,
                    &LaunchEvent::Launched {
                        agent: id,
                        module: module.hash,
                        site: self.config.name.clone(),
                    },
                )
                .await;
                self.spawn_agent(agent, Start::Poll);
                said?;
            }
            Err(e) => self.deliver(
                &id,
                LaunchEvent::Finished {
                    site: self.config.name.clone(),
                    hops: 0,
                    outcome: e,
                },
            ),
        }
        // The agent runs (and is counted as running) or has ended.
        drop(place);
        // Stream events until the end; if the user goes away the agent runs on. A launcher
        // that stops reading frees its stream at once (it may launch thousands).
        loop {
            let event = tokio::select! {
                event = rx.recv() => event,
                _ = send.stopped() => None,
            };
            let Some(event) = event else { break };
            let last = matches!(event, LaunchEvent::Finished { .. });
            if write_msg(send, &event).await.is_err() || last {
                break;
            }
        }
        // The channel's buffer would otherwise stay with the home record until the next event.
        drop(rx);
        if let Ok(mut homes) = self.homes.lock()
            && let Some(entry) = homes.get_mut(&id)
        {
            entry.watchers.retain(|w| !w.is_closed());
            entry.watchers.shrink_to_fit();
        }
        Ok(())
    }

    /// A place for an agent `user` launches here now: within its launch rate and its share
    /// of running agents, and the host not full.
    pub(in crate::net) fn may_launch(&self, user: &str) -> Result<Reserved<'_>, OverQuota> {
        let place = self.reserve(user)?;
        self.quotas.launch(user)?;
        Ok(place)
    }

    /// A place for one more running agent of `user`, within the host's and the user's limits.
    pub(in crate::net) fn reserve(&self, user: &str) -> Result<Reserved<'_>, OverQuota> {
        let (most, most_each) = (self.config.max_agents, self.quotas.limits().running);
        let site = self.config.name.clone();
        (self.residents.reserve(user, most, most_each)).map_err(|full| match full {
            Full::Host(running) => OverQuota::HostFull { site, running },
            Full::Owner(running) => OverQuota::Running {
                user: user.to_string(),
                site,
                running,
            },
        })
    }

    /// The module of a launch: the one held here under the hash `known` names, or else the
    /// one the launcher sends (asked for with [`LaunchEvent::SendModule`] when it named a
    /// hash), admitted and stored. The inner error says why the launch is refused.
    pub(in crate::net) async fn launch_module(
        self: &Arc<Self>,
        user: &str,
        known: Option<ModuleHash>,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
        inflight: &mut InFlight,
    ) -> Result<Result<Arc<AgentModule>, String>, WireError> {
        let Some(hash) = known else {
            return self.receive_module(None, recv, inflight).await;
        };
        if let Some(module) = self.held_module(&hash).await {
            return Ok(Ok(module));
        }
        // One launch of a user at a time sends a module this host lacks; the user's launches
        // of it that come meanwhile wait for it instead of all sending it at once. (Per user:
        // one user's slow upload holds up no other user's.)
        let turn = UploadTurn::new(self, (user.to_string(), hash));
        let _turn = turn.wait().await;
        if let Some(module) = self.held_module(&hash).await {
            return Ok(Ok(module));
        }
        write_msg(send, &LaunchEvent::SendModule).await?;
        self.receive_module(known, recv, inflight).await
    }

    /// The module of hash `hash` if this host holds it. Held means kept, not only compiled:
    /// the agent must be restorable after a restart (a hop that admitted a module and then
    /// failed to keep it leaves it compiled only).
    pub(in crate::net) async fn held_module(
        self: &Arc<Self>,
        hash: &ModuleHash,
    ) -> Option<Arc<AgentModule>> {
        match self.store.has_module(hash) {
            true => self.module(hash).await.ok(),
            false => None,
        }
    }

    /// Reads a launcher's module (of hash `known`, if it named one), admits and stores it.
    pub(in crate::net) async fn receive_module(
        self: &Arc<Self>,
        known: Option<ModuleHash>,
        recv: &mut quinn::RecvStream,
        inflight: &mut InFlight,
    ) -> Result<Result<Arc<AgentModule>, String>, WireError> {
        let wasm = read_blob(recv, "module", self.config.max_module, inflight).await?;
        if let Some(hash) = known
            && ModuleHash::of(&wasm) != hash
        {
            return Ok(Err(format!(
                "the module sent is not the one named (hash {hash})"
            )));
        }
        let module = match self.admit(wasm.clone()).await {
            Ok(m) => m,
            Err(e) => return Ok(Err(format!("module refused: {e}"))),
        };
        Ok(match self.store.put_module(&module.hash, &wasm) {
            Ok(()) => Ok(module),
            Err(e) => Err(format!("cannot keep the module: {e}")),
        })
    }

    pub(in crate::net) async fn kill(
        self: &Arc<Self>,
        agent: &AgentId,
        peer: &Identity,
    ) -> Result<(), String> {
        if peer.role == Role::User && self.home_status(agent, peer).is_none() {
            return Err(format!("no agent {agent} of yours here"));
        }
        match self.residents.kill(agent) {
            Found::Running => return Ok(()),
            Found::Parked(alarm) => return self.kill_parked(*agent, alarm),
            Found::Absent => {}
        }
        // Follow the agent: the home knows its last site, a host it left has a pointer.
        let next = match self.store.agent(agent).ok().flatten() {
            Some(AgentRecord::Forwarded { to, .. }) => Some(to),
            _ => self
                .homes
                .lock()
                .ok()
                .and_then(|h| h.get(agent).map(|e| e.status.site.clone())),
        };
        match next {
            Some(site) if site != self.config.name => {
                Box::pin(self.ask::<Result<(), String>>(&site, &Request::Kill { agent: *agent }))
                    .await?
            }
            _ => Err(format!("agent {agent} is not running")),
        }
    }
}
