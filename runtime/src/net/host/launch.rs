//! What users ask of an agent's home: launch (with the module sent once per user and host),
//! and kill.

use crate::context::{AgentContext, AgentId};
use crate::instance::AgentInstance;
use crate::modules::{AgentModule, ModuleHash};
use crate::net::budget::InFlight;
use crate::net::certs::{Identity, Role};
use crate::net::host::{AdmitError, Host, MODULE_DEADLINE, Start, Stream};
use crate::net::messages::{AgentEnd, Family, LaunchEvent, Refusal, Reply, Request};
use crate::net::quota::OverQuota;
use crate::net::residents::{Found, Full, Reserved};
use crate::net::store::{AgentRecord, Resume, StoreError};
use crate::net::wire::{WireError, read_blob, write_msg};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
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

/// Why a launch's module was not taken.
#[derive(Debug, thiserror::Error)]
pub(in crate::net) enum ModuleRefused {
    /// The bytes sent are not those of the hash the launcher named.
    #[error("the module sent is not the one named (hash {0})")]
    NotNamed(ModuleHash),
    /// Admission refused it.
    #[error("module refused: {0}")]
    Refused(#[source] AdmitError),
    /// The store could not keep it.
    #[error("cannot keep the module: {0}")]
    NotKept(#[source] StoreError),
}

impl Host {
    /// Launches an agent of the module named (or sent) with its itinerary and arguments, and
    /// streams its events to the launcher until it ends.
    pub(in crate::net) async fn serve_launch(
        self: &Arc<Self>,
        peer: &Identity,
        (known, itinerary, args): (Option<ModuleHash>, Vec<String>, BTreeMap<String, String>),
        (send, recv, inflight): Stream<'_>,
    ) -> Result<(), WireError> {
        // Counted by a reason of a few kinds, the message says the rest.
        let refused = |kind: &str, why: String| {
            self.metrics.launch(kind);
            LaunchEvent::Refused(why)
        };
        if peer.role != Role::User {
            let why = format!("only users launch agents, and {peer} is not a user");
            return write_msg(send, &refused("refused_not_a_user", why)).await;
        }
        if self.stopping() {
            let why = "the host is shutting down".into();
            return write_msg(send, &refused("refused_stopping", why)).await;
        }
        if self.draining() {
            let why = "the host is draining: launch on another host".into();
            return write_msg(send, &refused("refused_draining", why)).await;
        }
        // A place for the agent, held from here until it runs (or the launch fails).
        let place = match self.may_launch(&peer.name) {
            Ok(place) => place,
            Err(over) => {
                tracing::info!(%peer, "refused a launch: {over}");
                return write_msg(send, &refused("refused_over_limit", over.to_string())).await;
            }
        };
        let read = self.launch_module(&peer.name, known, send, recv, inflight);
        let module = match tokio::time::timeout(MODULE_DEADLINE, read).await {
            Ok(Ok(Ok(module))) => module,
            Ok(Ok(Err(no))) => {
                return write_msg(send, &refused("refused_module", no.to_string())).await;
            }
            Err(_) => {
                let late = WireError::Late {
                    what: "module",
                    within: MODULE_DEADLINE,
                };
                let _ = write_msg(send, &refused("refused_late", late.to_string())).await;
                return Err(late);
            }
            Ok(Err(e)) => {
                // Told, in case the stream still carries it (a budget was full, say).
                let why = format!("the module was not received: {e}");
                let _ = write_msg(send, &refused("refused_module_lost", why)).await;
                return Err(e);
            }
        };
        // The module is admitted and stored: its bytes are no longer held for the launch.
        inflight.release();
        let context = AgentContext::new(&self.config.name, &peer.name, itinerary, args);
        let id = context.agent_id;
        let (tx, rx) = mpsc::unbounded_channel();
        self.add_home(id, &peer.name, tx).await;
        match self.launch_agent(module.clone(), context).await {
            Ok(agent) => {
                self.spawn_agent(agent, Start::Poll);
                // The agent is counted as running: its place goes before the launcher hears
                // of it, so that its next launch never finds both counted.
                drop(place);
                // Said once the agent is stored: a detached launcher may leave at this point.
                // Its events wait in `rx` until this is written.
                self.metrics.launch("launched");
                let launched = LaunchEvent::Launched {
                    agent: id,
                    module: module.hash,
                    site: self.config.name.clone(),
                };
                write_msg(send, &launched).await?;
            }
            Err(end) => {
                drop(place);
                self.metrics.launch("failed_to_start");
                self.deliver(&id, self.ended(0, end)).await;
            }
        }
        self.stream_events(id, send, rx).await
    }

    /// Starts the agent of a launch and stores it: from then on a crash of this host does
    /// not lose it.
    async fn launch_agent(
        self: &Arc<Self>,
        module: Arc<AgentModule>,
        context: AgentContext,
    ) -> Result<AgentInstance, AgentEnd> {
        let (site, limits) = (self.site.clone(), &self.config.limits);
        let launched = AgentInstance::launch(module, site, context, limits).await;
        let mut agent = launched.map_err(|e| AgentEnd::from(&e))?;
        match self.keep(&mut agent, Resume::Poll).await {
            Ok(()) => Ok(agent),
            Err(e) => Err(AgentEnd::Broken(e.to_string())),
        }
    }

    /// Streams an agent's events to its launcher until its end; if the launcher goes away
    /// the agent runs on. A launcher that stops reading frees its stream at once (it may
    /// launch thousands).
    async fn stream_events(
        &self,
        id: AgentId,
        send: &mut quinn::SendStream,
        mut rx: mpsc::UnboundedReceiver<LaunchEvent>,
    ) -> Result<(), WireError> {
        let mut family = Family::default();
        loop {
            let event = tokio::select! {
                event = rx.recv() => event,
                _ = send.stopped() => None,
            };
            let Some(event) = event else { break };
            let last = family.note(&event);
            if write_msg(send, &event).await.is_err() || last {
                break;
            }
        }
        // The channel's buffer would otherwise stay with the home record until the next event.
        drop(rx);
        self.forget_gone_watchers(&id);
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
    ) -> Result<Result<Arc<AgentModule>, ModuleRefused>, WireError> {
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
    ) -> Result<Result<Arc<AgentModule>, ModuleRefused>, WireError> {
        let wasm = read_blob(recv, "module", self.config.max_module, inflight).await?;
        if let Some(hash) = known
            && ModuleHash::of(&wasm) != hash
        {
            return Ok(Err(ModuleRefused::NotNamed(hash)));
        }
        let module = match self.admit(wasm.clone()).await {
            Ok(m) => m,
            Err(e) => return Ok(Err(ModuleRefused::Refused(e))),
        };
        Ok(match self.store.put_module(&module.hash, &wasm) {
            Ok(()) => Ok(module),
            Err(e) => Err(ModuleRefused::NotKept(e)),
        })
    }

    pub(in crate::net) async fn kill(
        self: &Arc<Self>,
        agent: &AgentId,
        peer: &Identity,
    ) -> Reply<()> {
        if peer.role == Role::User && self.home_status(agent, peer).is_none() {
            return Err(Refusal::NotYours(*agent));
        }
        match self.residents.kill(agent) {
            Found::Running => return Ok(()),
            Found::Parked(alarm) => return self.kill_parked(*agent, alarm).await,
            Found::Absent => {}
        }
        // Follow the agent: the home knows its last site, a host it left has a pointer.
        let next = match self.store.agent(agent).ok().flatten() {
            Some(AgentRecord::Forwarded { to, .. }) => Some(to),
            _ => self.home_site(agent),
        };
        match next {
            Some(site) if site != self.config.name => {
                let kill = Request::Kill { agent: *agent };
                let asked = Box::pin(self.peers.ask::<Reply<()>>(&site, &kill)).await;
                asked.map_err(|e| Refusal::Unreachable(e.to_string()))?
            }
            _ => Err(Refusal::NotRunning(*agent)),
        }
    }
}
