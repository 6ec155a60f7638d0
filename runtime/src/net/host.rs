//! A host: one site that runs agents, serves users and hands agents to its peers over
//! mutually authenticated QUIC.
//!
//! Each agent runs as one tokio task that polls it from safe point to safe point and handles
//! its operations. A hop runs the source side of the protocol ([`super::hop::SourceHop`]); an
//! incoming OFFER runs the destination side ([`super::hop::decide_offer`], then validate,
//! store, COMMITTED). Events (hops, the result) go to the agent's home host, which streams them
//! to the launcher and answers `status`/`list`/`kill`.

use super::certs::{Identity, Role};
use super::hop::{DestView, SourceHop, SourceStep, decide_offer};
use super::messages::{
    HopInfo, LaunchEvent, Offer, OfferReply, Request, StatusReply, TransferReply, TransferStatus,
};
use super::store::{AgentRecord, HostStore};
use super::tls::{self, Credentials};
use super::wire::{WireError, read_blob, read_msg, write_blob, write_msg};
use crate::context::{AgentContext, AgentId, HopRecord};
use crate::image::{AgentImage, ImageLimits};
use crate::instance::{AgentInstance, Step};
use crate::limits::Limits;
use crate::modules::{AgentModule, ModuleCache, ModuleHash};
use crate::services::Site;
use crate::state::AgentFlags;
use agent_abi::{HopError, Op, OpResult, Outcome};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How long a host waits for a peer to answer a new connection (a down peer sends nothing).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How a host is set up.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// Site name (the DNS name in the host's certificate).
    pub name: String,
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Where the store and compiled modules live.
    pub data_dir: PathBuf,
    /// Known peers: site name → address.
    pub peers: BTreeMap<String, SocketAddr>,
    /// Limits for each agent.
    pub limits: Limits,
    /// Most agents running at once.
    pub max_agents: usize,
    /// Largest image accepted.
    pub max_image: u64,
    /// Largest module accepted.
    pub max_module: u64,
    /// Send UDP datagrams in GSO batches (off when a peer is a big-endian host under qemu).
    pub segmentation_offload: bool,
}

/// Why a host could not start.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct HostError(String);

fn err(e: impl std::fmt::Display) -> HostError {
    HostError(e.to_string())
}

/// A home host's record of one agent launched there.
struct HomeEntry {
    status: StatusReply,
    watchers: Vec<mpsc::UnboundedSender<LaunchEvent>>,
    /// The end, held back until the reports of all earlier hops arrived (they travel from
    /// other hosts and may overtake each other).
    held: Option<LaunchEvent>,
}

/// One running host.
pub struct Host {
    config: HostConfig,
    site: Arc<Site>,
    modules: ModuleCache,
    store: HostStore,
    endpoint: quinn::Endpoint,
    conns: tokio::sync::Mutex<HashMap<String, quinn::Connection>>,
    running: Mutex<HashMap<AgentId, Arc<AgentFlags>>>,
    homes: Mutex<HashMap<AgentId, HomeEntry>>,
    shutting_down: AtomicBool,
    idle: tokio::sync::Notify,
}

/// How an agent task starts.
enum Start {
    /// Poll it (a fresh launch, or its pending operation was completed).
    Poll,
    /// Handle its pending operation first (it was parked with one).
    Handle(Op),
}

impl Host {
    /// Opens the store, binds the endpoint and resumes agents that live here.
    ///
    /// # Errors
    /// When the store, certificates or socket cannot be set up.
    pub async fn start(
        config: HostConfig,
        creds: Credentials,
        site: Site,
    ) -> Result<Arc<Host>, HostError> {
        let engine = crate::engine::new_engine().map_err(err)?;
        let modules =
            ModuleCache::new(&engine, Some(config.data_dir.join("compiled"))).map_err(err)?;
        let store = HostStore::open(&config.data_dir).map_err(err)?;
        let server = tls::server_config(&creds, config.segmentation_offload).map_err(err)?;
        let mut endpoint = quinn::Endpoint::server(server, config.listen)
            .map_err(|e| HostError(format!("cannot listen on {}: {e}", config.listen)))?;
        endpoint.set_default_client_config(
            tls::client_config(&creds, config.segmentation_offload).map_err(err)?,
        );
        let homes = store
            .homes()
            .map_err(err)?
            .into_iter()
            .map(|status| {
                (
                    status.agent,
                    HomeEntry {
                        status,
                        watchers: Vec::new(),
                        held: None,
                    },
                )
            })
            .collect();
        let host = Arc::new(Host {
            config,
            site: Arc::new(site),
            modules,
            store,
            endpoint,
            conns: tokio::sync::Mutex::default(),
            running: Mutex::default(),
            homes: Mutex::new(homes),
            shutting_down: AtomicBool::new(false),
            idle: tokio::sync::Notify::new(),
        });
        host.resume_residents().await;
        tokio::spawn(host.clone().accept_loop());
        Ok(host)
    }

    /// The address the host listens on.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.endpoint.local_addr().ok()
    }

    /// The site name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Stops accepting work, parks every running agent at its next safe point, and closes.
    pub async fn shutdown(&self, grace: Duration) {
        self.shutting_down.store(true, Ordering::SeqCst);
        for flags in self.running_flags() {
            flags.checkpoint.store(true, Ordering::SeqCst);
        }
        let deadline = Instant::now() + grace;
        while !self.running_flags().is_empty() && Instant::now() < deadline {
            let _ = tokio::time::timeout(Duration::from_millis(50), self.idle.notified()).await;
        }
        let left = self.running_flags().len();
        if left > 0 {
            tracing::warn!(
                agents = left,
                "agents did not reach a safe point before shutdown"
            );
        }
        self.endpoint.close(0u32.into(), b"host shutting down");
        self.endpoint.wait_idle().await;
    }

    fn running_flags(&self) -> Vec<Arc<AgentFlags>> {
        self.running
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    async fn resume_residents(self: &Arc<Self>) {
        let residents = match self.store.residents() {
            Ok(r) => r,
            Err(e) => return tracing::error!("cannot list resident agents: {e}"),
        };
        for (id, record) in residents {
            let AgentRecord::Resident { image, parked, .. } = record else {
                continue;
            };
            match self.restore_stored(&image).await {
                Ok(mut agent) => {
                    let start = match (parked, agent.context().pending.clone()) {
                        (true, Some(op)) => Start::Handle(op),
                        _ => {
                            agent.complete(OpResult::Hop(Ok(())));
                            Start::Poll
                        }
                    };
                    tracing::info!(agent = %id, parked, "resuming agent");
                    self.spawn_agent(agent, start);
                }
                Err(e) => tracing::error!(agent = %id, "cannot resume agent: {e}"),
            }
        }
    }

    async fn restore_stored(self: &Arc<Self>, image: &str) -> Result<AgentInstance, String> {
        let bytes = self.store.image(image).map_err(|e| e.to_string())?;
        let image = AgentImage::decode(&bytes, &self.image_limits()).map_err(|e| e.to_string())?;
        let module = self.module(&image.module).await?;
        AgentInstance::restore(module, self.site.clone(), image, &self.config.limits)
            .await
            .map_err(|e| e.to_string())
    }

    fn image_limits(&self) -> ImageLimits {
        ImageLimits {
            max_memory: self.config.limits.max_memory,
            ..ImageLimits::default()
        }
    }

    /// An admitted module by hash, admitting it from the store if needed.
    async fn module(self: &Arc<Self>, hash: &ModuleHash) -> Result<Arc<AgentModule>, String> {
        if let Some(m) = self.modules.get(hash) {
            return Ok(m);
        }
        let bytes = self
            .store
            .module(hash)
            .ok_or_else(|| format!("module {hash} is not kept here"))?;
        self.admit(bytes).await
    }

    /// Admits (and compiles) a module off the async workers: compiling can take seconds,
    /// and the QUIC connections (keep-alives, acknowledgements) must keep being served.
    async fn admit(self: &Arc<Self>, wasm: Vec<u8>) -> Result<Arc<AgentModule>, String> {
        let host = self.clone();
        tokio::task::spawn_blocking(move || host.modules.admit(&wasm).map_err(|e| e.to_string()))
            .await
            .map_err(|e| format!("admission failed: {e}"))?
    }

    // ---- connections -------------------------------------------------------------------

    async fn accept_loop(self: Arc<Self>) {
        while let Some(incoming) = self.endpoint.accept().await {
            let host = self.clone();
            tokio::spawn(async move {
                let conn = match incoming.await {
                    Ok(c) => c,
                    Err(e) => return tracing::info!("refused a connection: {e}"),
                };
                let peer = match tls::peer_identity(&conn) {
                    Ok(id) => id,
                    Err(e) => {
                        tracing::warn!(remote = %conn.remote_address(), "no usable identity: {e}");
                        return conn.close(1u32.into(), b"no usable certificate");
                    }
                };
                while let Ok((send, recv)) = conn.accept_bi().await {
                    tokio::spawn(host.clone().serve_stream(peer.clone(), send, recv));
                }
            });
        }
    }

    /// A connection to peer `site`, reused while it lives.
    async fn connect(&self, site: &str) -> Result<quinn::Connection, String> {
        let addr = *self
            .config
            .peers
            .get(site)
            .ok_or_else(|| format!("unknown site `{site}`"))?;
        let mut conns = self.conns.lock().await;
        if let Some(conn) = conns.get(site).filter(|c| c.close_reason().is_none()) {
            return Ok(conn.clone());
        }
        let connecting = self
            .endpoint
            .connect(addr, site)
            .map_err(|e| e.to_string())?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| format!("no answer from {site} at {addr} within {CONNECT_TIMEOUT:?}"))?
            .map_err(|e| format!("cannot connect to {site} at {addr}: {e}"))?;
        match tls::peer_identity(&conn) {
            Ok(id) if id.role == Role::Host && id.name == site => {}
            Ok(id) => return Err(format!("{addr} is {id}, not host {site}")),
            Err(e) => return Err(e.to_string()),
        }
        conns.insert(site.to_string(), conn.clone());
        Ok(conn)
    }

    /// Sends one request to peer `site` and reads one reply.
    async fn ask<T: serde::de::DeserializeOwned>(
        &self,
        site: &str,
        request: &Request,
    ) -> Result<T, String> {
        let conn = self.connect(site).await?;
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        write_msg(&mut send, request)
            .await
            .map_err(|e| e.to_string())?;
        let _ = send.finish();
        read_msg(&mut recv).await.map_err(|e| e.to_string())
    }

    async fn serve_stream(
        self: Arc<Self>,
        peer: Identity,
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let request: Request = match read_msg(&mut recv).await {
            Ok(r) => r,
            Err(e) => return tracing::info!(%peer, "bad request: {e}"),
        };
        let result = match request {
            Request::Launch { itinerary, args } => {
                self.serve_launch(&peer, itinerary, args, &mut send, &mut recv)
                    .await
            }
            Request::Status { agent } => {
                let reply = self
                    .home_status(&agent, &peer)
                    .ok_or_else(|| format!("no agent {agent} of yours here"));
                write_msg(&mut send, &reply).await
            }
            Request::List => {
                let mut list: Vec<StatusReply> = match self.homes.lock() {
                    Ok(homes) => homes
                        .values()
                        .filter(|h| h.status.owner == peer.name)
                        .map(|h| h.status.clone())
                        .collect(),
                    Err(_) => Vec::new(),
                };
                list.sort_by_key(|a| a.agent);
                write_msg(&mut send, &list).await
            }
            Request::Kill { agent } => {
                let reply = self.kill(&agent, &peer).await;
                write_msg(&mut send, &reply).await
            }
            Request::Offer(offer) => self.serve_offer(&peer, offer, &mut send, &mut recv).await,
            Request::Query { agent, seq } => {
                let reply = match peer.role {
                    Role::Host => self
                        .store
                        .resolve_transfer(&agent, seq)
                        .map_err(|e| e.to_string()),
                    Role::User => Err("only hosts may query transfers".to_string()),
                };
                write_msg(&mut send, &reply).await
            }
            Request::Report { agent, event } => {
                if peer.role == Role::Host {
                    self.deliver(&agent, event);
                }
                write_msg(&mut send, &()).await
            }
        };
        if let Err(e) = result {
            tracing::info!(%peer, "stream ended: {e}");
        }
        let _ = send.finish();
    }

    // ---- users -------------------------------------------------------------------------

    async fn serve_launch(
        self: &Arc<Self>,
        peer: &Identity,
        itinerary: Vec<String>,
        args: BTreeMap<String, String>,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
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
        let wasm = read_blob(recv, "module", self.config.max_module).await?;
        let module = match self.admit(wasm.clone()).await {
            Ok(m) => m,
            Err(e) => {
                return write_msg(send, &LaunchEvent::Refused(format!("module refused: {e}")))
                    .await;
            }
        };
        if let Err(e) = self.store.put_module(&module.hash, &wasm) {
            return write_msg(
                send,
                &LaunchEvent::Refused(format!("cannot keep the module: {e}")),
            )
            .await;
        }
        let context = AgentContext::new(&self.config.name, &peer.name, itinerary, args);
        let id = context.agent_id;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let status = StatusReply {
            agent: id,
            owner: peer.name.clone(),
            site: self.config.name.clone(),
            state: "running".into(),
            hops: Vec::new(),
            result: None,
            error: None,
        };
        let _ = self.store.put_home(&status);
        if let Ok(mut homes) = self.homes.lock() {
            homes.insert(
                id,
                HomeEntry {
                    status,
                    watchers: vec![tx],
                    held: None,
                },
            );
        }
        write_msg(
            send,
            &LaunchEvent::Launched {
                agent: id,
                module: module.hash,
                site: self.config.name.clone(),
            },
        )
        .await?;
        match AgentInstance::launch(module, self.site.clone(), context, &self.config.limits).await {
            Ok(agent) => self.spawn_agent(agent, Start::Poll),
            Err(e) => self.deliver(
                &id,
                LaunchEvent::Finished {
                    site: self.config.name.clone(),
                    hops: 0,
                    outcome: Err(e.to_string()),
                },
            ),
        }
        // Stream events until the end; if the user goes away the agent runs on.
        while let Some(event) = rx.recv().await {
            let last = matches!(event, LaunchEvent::Finished { .. });
            if write_msg(send, &event).await.is_err() || last {
                break;
            }
        }
        Ok(())
    }

    fn home_status(&self, agent: &AgentId, peer: &Identity) -> Option<StatusReply> {
        let homes = self.homes.lock().ok()?;
        homes
            .get(agent)
            .filter(|h| h.status.owner == peer.name)
            .map(|h| h.status.clone())
    }

    async fn kill(&self, agent: &AgentId, peer: &Identity) -> Result<(), String> {
        if peer.role == Role::User && self.home_status(agent, peer).is_none() {
            return Err(format!("no agent {agent} of yours here"));
        }
        if let Some(flags) = self.running.lock().ok().and_then(|m| m.get(agent).cloned()) {
            flags.kill.store(true, Ordering::SeqCst);
            return Ok(());
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

    /// Records an event of an agent launched here and passes it to its watchers.
    fn deliver(self: &Arc<Self>, agent: &AgentId, event: LaunchEvent) {
        let Ok(mut homes) = self.homes.lock() else {
            return;
        };
        let Some(entry) = homes.get_mut(agent) else {
            return tracing::warn!(%agent, "event for an agent not launched here");
        };
        let reported = entry.status.hops.len() as u64;
        if let LaunchEvent::Finished { hops, .. } = &event
            && reported < *hops
        {
            entry.held = Some(event);
            // A report may be lost for good (its host died): do not hold the end forever.
            let (host, agent) = (self.clone(), *agent);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_secs(5)).await;
                host.release_held(&agent);
            });
            return;
        }
        Self::record(entry, event, &self.store);
        let reported = entry.status.hops.len() as u64;
        if let Some(LaunchEvent::Finished { hops, .. }) = &entry.held
            && *hops <= reported
            && let Some(held) = entry.held.take()
        {
            Self::record(entry, held, &self.store);
        }
    }

    fn release_held(&self, agent: &AgentId) {
        let Ok(mut homes) = self.homes.lock() else {
            return;
        };
        if let Some(entry) = homes.get_mut(agent)
            && let Some(held) = entry.held.take()
        {
            Self::record(entry, held, &self.store);
        }
    }

    fn record(entry: &mut HomeEntry, event: LaunchEvent, store: &HostStore) {
        match &event {
            LaunchEvent::Moved(hop) => {
                entry.status.site = hop.to.clone();
                entry.status.hops.push(hop.clone());
            }
            LaunchEvent::Finished { site, outcome, .. } => {
                entry.status.site = site.clone();
                entry.status.state = match outcome {
                    Ok(_) => "finished".into(),
                    Err(e) if e.contains("killed") => "killed".into(),
                    Err(_) => "failed".into(),
                };
                match outcome {
                    Ok(bytes) => match crate::runner::cbor_to_json(bytes) {
                        Ok(json) => entry.status.result = Some(json.to_string()),
                        Err(e) => entry.status.error = Some(e),
                    },
                    Err(e) => entry.status.error = Some(e.clone()),
                }
            }
            _ => {}
        }
        let _ = store.put_home(&entry.status);
        entry.watchers.retain(|w| w.send(event.clone()).is_ok());
    }

    /// Sends an event to the agent's home host (here, or a peer).
    fn report(self: &Arc<Self>, agent: AgentId, home: String, event: LaunchEvent) {
        if home == self.config.name {
            return self.deliver(&agent, event);
        }
        let host = self.clone();
        tokio::spawn(async move {
            for attempt in 0..5u32 {
                match host
                    .ask::<()>(
                        &home,
                        &Request::Report {
                            agent,
                            event: event.clone(),
                        },
                    )
                    .await
                {
                    Ok(()) => return,
                    Err(e) => tracing::warn!(%agent, %home, attempt, "cannot report to home: {e}"),
                }
                tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
            }
        });
    }

    // ---- running agents ----------------------------------------------------------------

    fn spawn_agent(self: &Arc<Self>, agent: AgentInstance, start: Start) {
        let id = agent.context().agent_id;
        if let Ok(mut running) = self.running.lock() {
            running.insert(id, agent.flags());
        }
        if self.shutting_down.load(Ordering::SeqCst) {
            agent.flags().checkpoint.store(true, Ordering::SeqCst);
        }
        tokio::spawn(self.clone().drive(agent, start));
    }

    fn forget_running(&self, id: &AgentId) {
        if let Ok(mut running) = self.running.lock() {
            running.remove(id);
        }
        self.idle.notify_waiters();
    }

    async fn drive(self: Arc<Self>, mut agent: AgentInstance, start: Start) {
        let id = agent.context().agent_id;
        let home = agent.context().home.clone();
        let mut next = start;
        loop {
            let op = match next {
                Start::Handle(op) => op,
                Start::Poll => {
                    let step = agent.poll().await;
                    let (lines, dropped) = agent.drain_log();
                    for line in lines {
                        tracing::info!(agent = %id, source = ?line.source, "{}", line.text);
                    }
                    if dropped > 0 {
                        tracing::warn!(agent = %id, dropped, "agent log lines dropped");
                    }
                    match step {
                        Ok(Step::Suspended(op)) => op,
                        Ok(Step::Finished(outcome)) => {
                            let outcome = match outcome {
                                Outcome::Ok(bytes) => Ok(bytes),
                                Outcome::Err(why) => {
                                    Err(crate::AgentError::Failed(why).to_string())
                                }
                                Outcome::Panicked(why) => {
                                    Err(crate::AgentError::Panicked(why).to_string())
                                }
                            };
                            let hops = agent.context().trace.len() as u64;
                            return self.finish(id, home, hops, outcome);
                        }
                        Err(e) => {
                            let hops = agent.context().trace.len() as u64;
                            return self.finish(id, home, hops, Err(e.to_string()));
                        }
                    }
                }
            };
            if self.shutting_down.load(Ordering::SeqCst) {
                return self.park(agent);
            }
            next = Start::Poll;
            match op {
                Op::Hop { site } if site == self.config.name => {
                    agent.complete(OpResult::Hop(Ok(())))
                }
                Op::Hop { site } => match self.send_agent(&mut agent, &site).await {
                    Ok(info) => {
                        let _ = self.store.set_agent(
                            &id,
                            &AgentRecord::Forwarded {
                                seq: info.seq,
                                to: site,
                            },
                        );
                        self.forget_running(&id);
                        return self.report(id, home, LaunchEvent::Moved(info));
                    }
                    Err(error) => {
                        tracing::info!(agent = %id, "hop failed: {error}");
                        self.report(
                            id,
                            home.clone(),
                            LaunchEvent::HopFailed {
                                site: self.config.name.clone(),
                                error: error.to_string(),
                            },
                        );
                        agent.complete(OpResult::Hop(Err(error)));
                    }
                },
                Op::Call { service, request } => {
                    let result = self
                        .site
                        .call(&service, &request)
                        .map(serde_bytes::ByteBuf::from);
                    agent.complete(OpResult::Call(result));
                }
                Op::Checkpoint => agent.complete(OpResult::Checkpoint),
            }
        }
    }

    fn finish(
        self: &Arc<Self>,
        id: AgentId,
        home: String,
        hops: u64,
        outcome: Result<Vec<u8>, String>,
    ) {
        let _ = self.store.remove_agent(&id);
        self.forget_running(&id);
        self.report(
            id,
            home,
            LaunchEvent::Finished {
                site: self.config.name.clone(),
                hops,
                outcome,
            },
        );
    }

    /// Stores the agent at its safe point, pending operation included, to resume on restart.
    fn park(self: &Arc<Self>, mut agent: AgentInstance) {
        let id = agent.context().agent_id;
        let seq = agent.context().hop_seq;
        let stored = agent
            .capture()
            .encode()
            .map_err(|e| e.to_string())
            .and_then(|bytes| self.store.put_image(&bytes).map_err(|e| e.to_string()))
            .and_then(|image| {
                self.store
                    .set_agent(
                        &id,
                        &AgentRecord::Resident {
                            seq,
                            image,
                            parked: true,
                        },
                    )
                    .map_err(|e| e.to_string())
            });
        match stored {
            Ok(()) => tracing::info!(agent = %id, "parked"),
            Err(e) => tracing::error!(agent = %id, "cannot park agent: {e}"),
        }
        self.forget_running(&id);
    }

    /// The source side of a hop. `Ok`: the destination owns the agent. `Err`: it stays here.
    async fn send_agent(&self, agent: &mut AgentInstance, site: &str) -> Result<HopInfo, HopError> {
        let frozen = Instant::now();
        if !self.config.peers.contains_key(site) {
            return Err(HopError::UnknownSite(site.to_string()));
        }
        let from = self.config.name.clone();
        // Each attempt gets its own sequence number, so a retry never meets an aborted one.
        agent.context_mut().hop_seq += 1;
        let seq = agent.context().hop_seq;
        let mut image = agent.capture();
        image.context.trace.push(HopRecord {
            seq,
            from: from.clone(),
            to: site.to_string(),
        });
        let bytes = image.encode().map_err(|e| HopError::Unreachable {
            site: site.into(),
            reason: e.to_string(),
        })?;
        let module = agent.module().clone();
        let wasm = self.store.module(&module.hash).unwrap_or_default();
        let offer = Offer {
            agent: image.context.agent_id,
            seq,
            module: module.hash,
            module_bytes: wasm.len() as u64,
            memory_bytes: image.memory_bytes,
            image_bytes: bytes.len() as u64,
            abi: agent_abi::ABI_VERSION,
            owner: image.context.owner.clone(),
            home: image.context.home.clone(),
        };
        let mut hop = SourceHop::offered(site);
        let mut streams = None;
        let reply = async {
            let conn = self.connect(site).await?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            write_msg(&mut send, &Request::Offer(offer.clone()))
                .await
                .map_err(|e| e.to_string())?;
            let reply: OfferReply = read_msg(&mut recv).await.map_err(|e| e.to_string())?;
            streams = Some((send, recv));
            Ok(reply)
        }
        .await;
        let mut step = hop.on_offer_reply(reply);
        let mut module_sent = 0u64;
        let mut backoff = Duration::from_millis(100);
        loop {
            step = match step {
                SourceStep::Transfer {
                    module: need_module,
                } => {
                    let sent = match streams.as_mut() {
                        Some((send, _)) => {
                            let mut result = Ok(());
                            if need_module {
                                module_sent = wasm.len() as u64;
                                result = write_blob(send, &wasm).await;
                            }
                            if result.is_ok() {
                                result = write_blob(send, &bytes).await;
                            }
                            result.map_err(|e| e.to_string())
                        }
                        None => Err("no stream".to_string()),
                    };
                    hop.on_sent(sent)
                }
                SourceStep::AwaitVerdict => {
                    let verdict = match streams.as_mut() {
                        Some((_, recv)) => read_msg::<TransferReply>(recv)
                            .await
                            .map_err(|e| e.to_string()),
                        None => Err("no stream".to_string()),
                    };
                    hop.on_verdict(verdict)
                }
                SourceStep::Query => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    let status: Result<Result<TransferStatus, String>, String> = self
                        .ask(
                            site,
                            &Request::Query {
                                agent: offer.agent,
                                seq,
                            },
                        )
                        .await;
                    hop.on_query_reply(status.and_then(|s| s))
                }
                SourceStep::Resume(error) => return Err(error),
                SourceStep::Forget => {
                    return Ok(HopInfo {
                        seq,
                        from,
                        from_arch: std::env::consts::ARCH.to_string(),
                        to: site.to_string(),
                        image_bytes: bytes.len() as u64,
                        module_bytes: module_sent,
                        freeze_us: frozen.elapsed().as_micros() as u64,
                    });
                }
            };
        }
    }

    /// The destination side of a hop.
    async fn serve_offer(
        self: &Arc<Self>,
        peer: &Identity,
        offer: Offer,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
    ) -> Result<(), WireError> {
        let status = self.store.transfer(&offer.agent, offer.seq).ok().flatten();
        let view = DestView {
            committed: status == Some(TransferStatus::Committed),
            aborted: status == Some(TransferStatus::Aborted),
            has_module: self.modules.get(&offer.module).is_some()
                || self.store.module(&offer.module).is_some(),
            agents: self.running.lock().map(|r| r.len()).unwrap_or(0),
            max_agents: if self.shutting_down.load(Ordering::SeqCst) {
                0
            } else {
                self.config.max_agents
            },
            max_memory: self.config.limits.max_memory,
            max_image: self.config.max_image,
            max_module: self.config.max_module,
        };
        let reply = decide_offer(&offer, peer, &view);
        write_msg(send, &reply).await?;
        let OfferReply::Accept { need_module } = reply else {
            if let OfferReply::Refuse(why) = &reply {
                tracing::info!(agent = %offer.agent, %peer, "refused offer: {why}");
            }
            return Ok(());
        };
        let wasm = if need_module {
            Some(read_blob(recv, "module", self.config.max_module).await?)
        } else {
            None
        };
        let image = read_blob(recv, "image", self.config.max_image).await?;
        match self.receive(&offer, wasm, &image).await {
            Ok(mut agent) => {
                write_msg(send, &TransferReply::Committed).await?;
                tracing::info!(agent = %offer.agent, from = %peer, seq = offer.seq, "agent arrived");
                agent.complete(OpResult::Hop(Ok(())));
                self.spawn_agent(agent, Start::Poll);
                Ok(())
            }
            Err(why) => {
                tracing::warn!(agent = %offer.agent, %peer, "refused transfer: {why}");
                write_msg(send, &TransferReply::Refused(why)).await
            }
        }
    }

    /// Validates an arriving agent fully (by restoring it), then commits it durably.
    async fn receive(
        self: &Arc<Self>,
        offer: &Offer,
        wasm: Option<Vec<u8>>,
        bytes: &[u8],
    ) -> Result<AgentInstance, String> {
        let module = match wasm {
            Some(wasm) => {
                if ModuleHash::of(&wasm) != offer.module {
                    return Err("the module bytes do not match the offered hash".into());
                }
                let module = self
                    .admit(wasm.clone())
                    .await
                    .map_err(|e| format!("module refused: {e}"))?;
                self.store
                    .put_module(&module.hash, &wasm)
                    .map_err(|e| e.to_string())?;
                module
            }
            None => self.module(&offer.module).await?,
        };
        let image = AgentImage::decode(bytes, &self.image_limits()).map_err(|e| e.to_string())?;
        if image.context.agent_id != offer.agent
            || image.context.hop_seq != offer.seq
            || image.module != offer.module
        {
            return Err("the image does not match the offer".into());
        }
        let agent = AgentInstance::restore(module, self.site.clone(), image, &self.config.limits)
            .await
            .map_err(|e| e.to_string())?;
        self.store
            .commit_arrival(&offer.agent, offer.seq, bytes)
            .map_err(|e| e.to_string())?;
        Ok(agent)
    }
}
