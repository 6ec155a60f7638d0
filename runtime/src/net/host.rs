//! A host: one site that runs agents, serves users and hands agents to its peers over
//! mutually authenticated QUIC.
//!
//! Each agent runs as one tokio task that polls it from safe point to safe point and handles
//! its operations. A hop runs the source side of the protocol ([`super::hop::SourceHop`]); an
//! incoming OFFER runs the destination side ([`super::hop::decide_offer`], then validate,
//! store, COMMITTED). Events (hops, the result) go to the agent's home host, which streams them
//! to the launcher and answers `status`/`list`/`kill`.

use super::arriving::Arriving;
use super::budget::{Budget, InFlight};
use super::certs::{Identity, Role};
use super::executor::AgentExecutor;
use super::hop::{DestView, SourceHop, SourceStep, decide_offer};
use super::messages::{
    Asleep, Departed, HopInfo, LaunchEvent, ListReply, Offer, OfferReply, Request, SentHome,
    StatusReply, TransferReply, TransferStatus, unix_ms, unix_us,
};
use super::outgoing::{Outgoing, write_blob_passing, write_image};
use super::peers::Peers;
use super::quota::{HOST_STREAMS, HOST_WINDOW, OverQuota, Quotas, UserLimits};
use super::residents::{Found, Full, Reserved, Residents};
use super::spare::Spare;
use super::store::{AgentRecord, CallEntry, HomeRow, HomeWrite, HostStore, PendingReport, Resume};
use super::tls::{self, Credentials};
use super::trim::Trimmer;
use super::wire::{
    Blob, WireError, drain_blob, read_blob, read_blob_into, read_msg, read_msg_charged,
    write_blob_repeated, write_msg,
};
use crate::base::{Base, BaseCache, BaseList, Binding, WORTH_A_BASE, encode_against};
use crate::context::{AgentContext, AgentId, HopRecord};
use crate::faults::crash_point;
use crate::image::{
    AgentImage, Compression, DecodeOptions, EncodeOptions, Encoded, ImageError, ImageLimits,
    Unverified, Verify,
};
use crate::instance::{AgentError, AgentInstance, Step};
use crate::limits::Limits;
use crate::modules::{AgentModule, ModuleCache, ModuleHash};
use crate::services::Site;
use crate::snapshot::{PAGE_SIZE, PageMap};
use crate::state::AgentFlags;
use agent_abi::{HopError, Op, OpResult, Outcome};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

pub use super::peers::{ASK_TIMEOUT, CONNECT_TIMEOUT};

/// How long a request's first message may take to arrive whole.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

/// How long a launch's module may take to arrive whole.
pub const MODULE_DEADLINE: Duration = Duration::from_secs(60);

/// How long a source waits for the destination's verdict before it asks instead: the
/// verdict's stream dies with a crashed destination only at the idle timeout, while a query
/// reaches the destination once it is back (and says "in progress" while it is just slow).
pub const VERDICT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a home host holds an agent's end back for reports of its earlier hops.
const HOLD_END: Duration = Duration::from_secs(15);

/// Sleeps at least this long park the agent (stored, memory freed); shorter ones wait in
/// memory, where parking would cost more than it frees.
pub const PARK_AFTER: Duration = Duration::from_secs(1);

/// How long a host waits before it tries again to wake an agent whose image it could not
/// restore (it stays parked meanwhile, and a kill still reaches it).
const WAKE_RETRY: Duration = Duration::from_secs(30);

/// How long a due agent whose owner runs as many agents as a user may stays parked before it
/// tries again.
const WAKE_DEFERRED: Duration = Duration::from_secs(1);

/// Parked agents restored at once.
const WAKING_AT_ONCE: usize = 4;

/// The chunk a probe sends again and again.
const PROBE_CHUNK: usize = 1 << 20;

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
    /// Bytes of memory for the pages of agents that left, so that one coming back sends only
    /// what changed (0: keep none).
    pub return_cache: u64,
    /// Bytes of requests arriving at once, from all peers and users together.
    pub max_inflight: u64,
    /// What each user may take of this host.
    pub user_limits: UserLimits,
}

/// What a host holds in memory ([`Host::memory`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct HostMemory {
    /// Agents running (each with its instance: linear memory and fiber stack).
    pub running: usize,
    /// Agents parked asleep (an alarm each; their images are in the store).
    pub parked: usize,
    /// Agents launched here, whose records stay in memory.
    pub homes: usize,
    /// Bytes of pages kept for agents' return visits.
    pub return_cache: u64,
    /// Instances kept for the next agents of their modules, and their bytes.
    pub kept: u64,
    /// Bytes those kept instances hold.
    pub kept_bytes: u64,
    /// Bytes of requests arriving.
    pub inflight: u64,
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
    /// Events recorded so far; the status holds all of them.
    records: u64,
    /// Hops that no stored record may hold yet (the store keeps hops apart from the status),
    /// with the number of the event that recorded each.
    unstored_hops: Vec<(u64, u64)>,
    /// Events a durably stored status holds.
    stored: u64,
    /// Events recorded but not yet heard by the watchers, with their number: they hear of
    /// one once a stored status holds it.
    unheard: Vec<(u64, LaunchEvent)>,
}

impl HomeEntry {
    fn new(status: StatusReply, watchers: Vec<mpsc::UnboundedSender<LaunchEvent>>) -> Self {
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
    fn note(&mut self, event: LaunchEvent) -> Noted {
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
    fn record(&mut self, event: LaunchEvent) {
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
                if self.status.state != "running"
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
            LaunchEvent::Finished { site, outcome, .. } => {
                self.status.site = site.clone();
                self.status.sleeping = None;
                self.status.state = match outcome {
                    Ok(_) => "finished".into(),
                    Err(e) if e.contains("killed") => "killed".into(),
                    Err(_) => "failed".into(),
                };
                match outcome {
                    Ok(bytes) => match crate::runner::cbor_to_json(bytes) {
                        Ok(json) => self.status.result = Some(json.to_string()),
                        Err(e) => self.status.error = Some(e),
                    },
                    Err(e) => self.status.error = Some(e.clone()),
                }
            }
            _ => {}
        }
        self.records += 1;
        self.unheard.push((self.records, event));
    }

    /// What the store is given of it: the status but for its hops, and the hops it may lack.
    fn row(&self) -> HomeWrite {
        let s = &self.status;
        let status = StatusReply {
            agent: s.agent,
            owner: s.owner.clone(),
            site: s.site.clone(),
            state: s.state.clone(),
            hops: Vec::new(),
            result: s.result.clone(),
            error: s.error.clone(),
            sleeping: s.sleeping.clone(),
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
    fn saved(&mut self, upto: u64) {
        self.stored = self.stored.max(upto);
        self.unstored_hops.retain(|(n, _)| *n > upto);
        self.tell(upto);
    }

    /// Tells the watchers, in order, the events up to record `upto`.
    fn tell(&mut self, upto: u64) {
        let later = self.unheard.iter().position(|(n, _)| *n > upto);
        let heard: Vec<_> = self
            .unheard
            .drain(..later.unwrap_or(self.unheard.len()))
            .collect();
        for (_, event) in heard {
            self.watchers.retain(|w| w.send(event.clone()).is_ok());
        }
    }
}

/// What became of an event told to an agent's home.
#[derive(Debug, PartialEq)]
enum Noted {
    /// The status holds it, and a stored status may not yet: store it before saying so.
    Unsaved,
    /// A stored status holds it.
    Saved,
    /// An end held back until earlier hops are reported. Stored with the status before it
    /// is acknowledged, so that a restart of the home still holds it.
    Held,
}

/// One running host.
pub struct Host {
    config: HostConfig,
    site: Arc<Site>,
    modules: ModuleCache,
    store: HostStore,
    endpoint: quinn::Endpoint,
    peers: Peers,
    /// Agents running here, and those parked asleep (only their alarm is in memory, their
    /// image is in the store).
    residents: Residents,
    /// What each user has of this host.
    quotas: Arc<Quotas>,
    /// Bytes of requests arriving, from everyone.
    inflight: Arc<Budget>,
    /// One probe at a time: they measure the link, and would share it.
    probing: tokio::sync::Semaphore,
    /// Modules being sent by launchers: each user sends each one once at a time.
    uploads: Mutex<Uploads>,
    /// The threads agents run on, apart from those serving requests.
    executor: AgentExecutor,
    /// Permits to restore parked agents that are due.
    waking: tokio::sync::Semaphore,
    /// Transfers (agent, seq) this host accepted and has not decided yet, and how many: a
    /// source that restarted before its departure was durable offers the same hop again.
    receiving: Mutex<HashMap<(AgentId, u64), usize>>,
    /// Agents launched here. No store write may be made while it is locked: a home record's
    /// write locks it inside the write transaction ([`Host::save_home`]).
    homes: Mutex<HashMap<AgentId, HomeEntry>>,
    /// Pages of agents that left, for their return visits.
    bases: Mutex<BaseCache>,
    /// (peer, module) pairs a peer said it holds: a small image is sent to it with the offer.
    /// Modules are stored durably, so the knowledge holds; a peer that lost one asks for it.
    peer_modules: Mutex<std::collections::HashSet<(String, ModuleHash)>>,
    shutting_down: AtomicBool,
    idle: tokio::sync::Notify,
    /// Wakes the task that delivers stored reports to home hosts.
    outbox: tokio::sync::Notify,
    /// Gives the memory of agents that left this host's memory back to the system.
    trimmer: Arc<Trimmer>,
    /// The receive buffer of the last large arrival, for the next one.
    spare: Arc<Spare>,
}

/// The queues of launches sending a module, by user and module ([`UploadTurn`]).
type Uploads = HashMap<(String, ModuleHash), Arc<tokio::sync::Mutex<()>>>;

/// A launch's place in the queue of those sending one module ([`Host::launch_module`]). The
/// queue's entry goes with its last member, however that one ends (a deadline may drop it).
struct UploadTurn<'a> {
    host: &'a Host,
    key: (String, ModuleHash),
    turn: Option<Arc<tokio::sync::Mutex<()>>>,
}

impl<'a> UploadTurn<'a> {
    fn new(host: &'a Host, key: (String, ModuleHash)) -> Self {
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
    async fn wait(&self) -> Option<tokio::sync::MutexGuard<'_, ()>> {
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

/// One request's stream: its two halves and the charge of the bytes it brought.
type Stream<'a> = (
    &'a mut quinn::SendStream,
    &'a mut quinn::RecvStream,
    &'a mut InFlight,
);

/// How an agent task starts.
enum Start {
    /// Poll it (a fresh launch, or its pending operation was completed).
    Poll,
    /// Handle its pending operation first (it was parked with one).
    Handle(Op),
    /// Poll an agent that arrived but whose commit is still being made: `true` once it is
    /// durable, `false` (or dropped) if it never will be.
    Arrived(tokio::sync::oneshot::Receiver<bool>),
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
        let listen =
            |e: std::io::Error| HostError(format!("cannot listen on {}: {e}", config.listen));
        let socket = super::socket::bind(config.listen).map_err(listen)?;
        let runtime = Arc::new(quinn::TokioRuntime);
        let mut endpoint = quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(server),
            socket,
            runtime,
        )
        .map_err(listen)?;
        endpoint.set_default_client_config(
            tls::client_config(&creds, config.segmentation_offload).map_err(err)?,
        );
        let homes: HashMap<AgentId, HomeEntry> = store
            .homes()
            .map_err(err)?
            .into_iter()
            .map(|home| {
                let mut entry = HomeEntry::new(home.row.status, Vec::new());
                entry.held = home.row.held_end;
                // A row from before hops were stored apart holds its hops: they go apart with
                // the agent's next write.
                entry.unstored_hops = home.inline.iter().map(|seq| (0, *seq)).collect();
                (entry.status.agent, entry)
            })
            .collect();
        let held: Vec<AgentId> = (homes.iter())
            .filter(|(_, entry)| entry.held.is_some())
            .map(|(id, _)| *id)
            .collect();
        let bases = Mutex::new(BaseCache::new(config.return_cache));
        let peers = Peers::new(endpoint.clone(), config.peers.clone());
        let quotas = Quotas::new(config.user_limits.clone());
        let inflight = Budget::new("this host", config.max_inflight);
        let host = Arc::new(Host {
            config,
            bases,
            site: Arc::new(site),
            modules,
            store,
            endpoint,
            peers,
            residents: Residents::default(),
            quotas,
            inflight,
            probing: tokio::sync::Semaphore::new(1),
            uploads: Mutex::default(),
            executor: AgentExecutor::new().map_err(err)?,
            waking: tokio::sync::Semaphore::new(WAKING_AT_ONCE),
            receiving: Mutex::default(),
            peer_modules: Mutex::default(),
            homes: Mutex::new(homes),
            shutting_down: AtomicBool::new(false),
            idle: tokio::sync::Notify::new(),
            outbox: tokio::sync::Notify::new(),
            trimmer: Trimmer::start(),
            spare: Arc::new(Spare::new(WORTH_PREPARING as usize)),
        });
        for agent in held {
            host.release_held_later(agent);
        }
        host.resume_residents().await;
        tokio::spawn(host.clone().accept_loop());
        tokio::spawn(host.clone().deliver_reports());
        tokio::spawn(host.clone().sync_lazily());
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

    /// What this host holds in memory, by what holds it (for its log).
    pub fn memory(&self) -> HostMemory {
        let (kept_bytes, kept) = self.modules.kept();
        HostMemory {
            running: self.residents.running(),
            parked: self.residents.parked(),
            homes: self.homes.lock().map_or(0, |h| h.len()),
            return_cache: self.bases.lock().map_or(0, |b| b.used()),
            kept,
            kept_bytes,
            inflight: self.inflight.held(),
        }
    }

    /// Stops accepting work, parks every running agent at its next safe point, and closes.
    pub async fn shutdown(&self, grace: Duration) {
        self.shutting_down.store(true, Ordering::SeqCst);
        // Parked agents stay stored; the next start sets their alarms again.
        self.residents.stop_alarms();
        for flags in self.residents.running_flags() {
            flags.checkpoint.store(true, Ordering::SeqCst);
        }
        let deadline = Instant::now() + grace;
        while self.residents.running() > 0 && Instant::now() < deadline {
            let _ = tokio::time::timeout(Duration::from_millis(50), self.idle.notified()).await;
        }
        let left = self.residents.running();
        if left > 0 {
            tracing::warn!(
                agents = left,
                "agents did not reach a safe point before shutdown"
            );
        }
        self.endpoint.close(0u32.into(), b"host shutting down");
        self.endpoint.wait_idle().await;
    }

    /// Goes on with every agent the store says lives here, each from its last stored image;
    /// a departure that was under way is settled by asking its destination.
    async fn resume_residents(self: &Arc<Self>) {
        let residents = match self.store.residents() {
            Ok(r) => r,
            Err(e) => return tracing::error!("cannot list resident agents: {e}"),
        };
        for (id, record) in residents {
            match record {
                AgentRecord::Resident {
                    resume:
                        Resume::Wake {
                            until_ms, owner, ..
                        },
                    ..
                } => self.set_alarm(id, &owner, until_ms),
                AgentRecord::Resident { image, resume, .. } => {
                    match self.restore_stored(&image).await {
                        Ok(mut agent) => {
                            tracing::info!(agent = %id, ?resume, "resuming agent");
                            let start = match resume {
                                // (Sleeping agents got an alarm above.)
                                Resume::Poll | Resume::Wake { .. } => Start::Poll,
                                Resume::Handle => match agent.context().pending.clone() {
                                    Some(op) => Start::Handle(op),
                                    None => Start::Poll,
                                },
                                Resume::Arrived => {
                                    self.came_home(&agent).await;
                                    agent.complete(OpResult::Hop(Ok(())));
                                    Start::Poll
                                }
                                Resume::HopFailed(error) => {
                                    forget_failed_hop(&mut agent);
                                    agent.complete(OpResult::Hop(Err(error)));
                                    Start::Poll
                                }
                            };
                            self.spawn_agent(agent, start);
                        }
                        Err(e) => tracing::error!(agent = %id, "cannot resume agent: {e}"),
                    }
                }
                AgentRecord::Departing { seq, to, image } => {
                    tokio::spawn(self.clone().settle_departure(id, seq, to, image));
                }
                AgentRecord::Forwarded { .. } => {}
            }
        }
    }

    /// Records the hop that brought `agent` back to its home here, from its trace, in case
    /// this host stopped between committing that hop and storing the agent's status (a hop
    /// into its home is not reported by its source). What only the source knew reads 0; a
    /// hop the status holds is not recorded again.
    async fn came_home(self: &Arc<Self>, agent: &AgentInstance) {
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
        self.deliver_async(&agent, LaunchEvent::Moved(info)).await;
    }

    /// A hop this host was making when it stopped: the destination alone knows whether it
    /// committed, so ask it (until it answers) and go on from there.
    async fn settle_departure(self: Arc<Self>, id: AgentId, seq: u64, to: String, image: String) {
        tracing::info!(agent = %id, seq, %to, "asking where a departing agent is");
        let mut hop = SourceHop::departed(&to);
        let mut step = SourceStep::Query;
        let mut backoff = Duration::from_millis(100);
        while step == SourceStep::Query && !self.shutting_down.load(Ordering::SeqCst) {
            let status: Result<Result<TransferStatus, String>, String> =
                self.ask(&to, &Request::Query { agent: id, seq }).await;
            step = hop.on_query_reply(status.and_then(|s| s));
            if step == SourceStep::Query {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
        let decoded = self
            .store
            .image(&image)
            .map_err(|e| e.to_string())
            .and_then(|bytes| {
                let image_len = bytes.len() as u64;
                AgentImage::decode(bytes, &DecodeOptions::new(self.image_limits()))
                    .map(|decoded| (image_len, decoded.image))
                    .map_err(|e| e.to_string())
            });
        let (image_bytes, stored) = match decoded {
            Ok(d) => d,
            Err(e) => return tracing::error!(agent = %id, "cannot read departure image: {e}"),
        };
        let home = stored.context.home.clone();
        match step {
            SourceStep::Forget => {
                let info = HopInfo {
                    seq,
                    from: self.config.name.clone(),
                    from_arch: std::env::consts::ARCH.to_string(),
                    to,
                    image_bytes,
                    memory_bytes: stored.memory_bytes,
                    ..HopInfo::default()
                };
                self.forwarded(id, home, info).await;
            }
            SourceStep::Resume(error) => {
                let mut agent = match self.restore_stored(&image).await {
                    Ok(agent) => agent,
                    Err(e) => return tracing::error!(agent = %id, "cannot resume: {e}"),
                };
                forget_failed_hop(&mut agent);
                self.hop_failed(&mut agent, Some(&image), error);
                self.spawn_agent(agent, Start::Poll);
            }
            _ => {} // shutting down: the record stays, the next start asks again
        }
    }

    /// A hop away failed after its departure was recorded: the agent stays, and on a restart
    /// it goes on from the departure image with the same error.
    /// Without `departure` (nothing was recorded or sent) the stored record stays as it was.
    fn hop_failed(
        self: &Arc<Self>,
        agent: &mut AgentInstance,
        departure: Option<&str>,
        error: HopError,
    ) {
        let id = agent.context().agent_id;
        if let Some(image) = departure {
            let record = AgentRecord::Resident {
                seq: agent.context().hop_seq,
                image: image.to_string(),
                resume: Resume::HopFailed(error.clone()),
            };
            if let Err(e) = self.store.set_agent(&id, &record) {
                tracing::error!(agent = %id, "cannot record the failed hop: {e}");
            }
        }
        tracing::info!(agent = %id, "hop failed: {error}");
        self.report(
            id,
            agent.context().home.clone(),
            LaunchEvent::HopFailed {
                site: self.config.name.clone(),
                error: error.to_string(),
            },
        );
        agent.complete(OpResult::Hop(Err(error)));
    }

    async fn restore_stored(self: &Arc<Self>, image: &str) -> Result<AgentInstance, String> {
        let bytes = self.store.image(image).map_err(|e| e.to_string())?;
        let image = AgentImage::decode(bytes, &DecodeOptions::new(self.image_limits()))
            .map_err(|e| e.to_string())?
            .image;
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
            tokio::spawn(self.clone().serve_connection(incoming));
        }
    }

    /// Serves the streams of one connection. A user's connection counts against its
    /// quota, may open fewer streams than a host's, and charges what it sends to the user's
    /// budget as well as the host's.
    async fn serve_connection(self: Arc<Self>, incoming: quinn::Incoming) {
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
        // A request's first message is charged to its sender's budget only, so that bytes
        // filling the host's budget (images, modules) cannot stop `status` or `kill`.
        let (user, first, budgets) = match peer.role {
            Role::Host => {
                conn.set_max_concurrent_bi_streams(HOST_STREAMS.into());
                conn.set_receive_window(HOST_WINDOW.into());
                let host = vec![self.inflight.clone()];
                (None, host.clone(), host)
            }
            Role::User => match self.quotas.connect(&peer.name) {
                Ok(user) => {
                    let first = vec![user.inflight.clone()];
                    let budgets = vec![self.inflight.clone(), user.inflight.clone()];
                    (Some(user), first, budgets)
                }
                Err(over) => {
                    tracing::info!(%peer, "refused a connection: {over}");
                    return conn.close(2u32.into(), over.to_string().as_bytes());
                }
            },
        };
        while let Ok((send, recv)) = conn.accept_bi().await {
            let from = (peer.clone(), conn.rtt());
            let inflight = (InFlight::new(first.clone()), InFlight::new(budgets.clone()));
            tokio::spawn(self.clone().serve_stream(from, inflight, send, recv));
        }
        drop(user);
    }

    /// A connection to peer `site` ([`Peers::connect`]).
    async fn connect(&self, site: &str) -> Result<quinn::Connection, String> {
        self.peers.connect(site).await.map_err(|e| e.to_string())
    }

    /// One request to peer `site` and its reply ([`Peers::ask`]).
    async fn ask<T: serde::de::DeserializeOwned>(
        &self,
        site: &str,
        request: &Request,
    ) -> Result<T, String> {
        self.peers
            .ask(site, request)
            .await
            .map_err(|e| e.to_string())
    }

    /// Answers one request of `peer`, whose connection's round-trip time was `rtt`; what it
    /// sends is charged while it is held: its first message to `first`, the rest to
    /// `inflight`.
    async fn serve_stream(
        self: Arc<Self>,
        (peer, rtt): (Identity, Duration),
        (mut first, mut inflight): (InFlight, InFlight),
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let read = read_msg_charged(&mut recv, &mut first);
        let request: Request = match tokio::time::timeout(REQUEST_DEADLINE, read).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return tracing::info!(%peer, "bad request: {e}"),
            Err(_) => {
                let _ = recv.stop(1u32.into());
                return tracing::info!(%peer, "request not whole within {REQUEST_DEADLINE:?}");
            }
        };
        // The request's message is decoded: its bytes are no longer held.
        drop(first);
        let result = match request {
            Request::Launch { itinerary, args } => {
                let launch = (None, itinerary, args);
                self.serve_launch(&peer, launch, &mut send, &mut recv, &mut inflight)
                    .await
            }
            Request::LaunchHash {
                module,
                itinerary,
                args,
            } => {
                let launch = (Some(module), itinerary, args);
                self.serve_launch(&peer, launch, &mut send, &mut recv, &mut inflight)
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
                list.sort_by_key(|a| (a.state != "running", a.agent));
                write_msg(&mut send, &fit_list(list)).await
            }
            Request::Kill { agent } => {
                let reply = self.kill(&agent, &peer).await;
                write_msg(&mut send, &reply).await
            }
            Request::Hop(offer) => {
                // No later than when it was sent, by this host's clock: so a freeze measured
                // from it is a bound, as the source's own is (HopInfo::freeze_us).
                let now = Instant::now();
                let offered = (offer, now.checked_sub(rtt).unwrap_or(now));
                let stream = (&mut send, &mut recv, &mut inflight);
                self.serve_offer(&peer, offered, stream).await
            }
            Request::Query { agent, seq } => {
                let reply = match peer.role {
                    Role::Host => self.transfer_status(&agent, seq),
                    Role::User => Err("only hosts may query transfers".to_string()),
                };
                write_msg(&mut send, &reply).await
            }
            Request::Report { agent, event } => {
                // `SendModule` belongs to a launch stream, never to an agent's record.
                if peer.role == Role::Host && event != LaunchEvent::SendModule {
                    self.deliver_async(&agent, event).await;
                }
                write_msg(&mut send, &()).await
            }
            Request::Probe { to, bytes } => {
                let reply = match peer.role {
                    Role::User => self.probe(&to, bytes).await,
                    Role::Host => Err("only users ask for probes".to_string()),
                };
                write_msg(&mut send, &reply).await
            }
            Request::Sink => {
                let reply = match peer.role {
                    Role::Host => drain_blob(&mut recv, "probe", self.config.max_image)
                        .await
                        .map_err(|e| e.to_string()),
                    Role::User => Err("only hosts send probes".to_string()),
                };
                write_msg(&mut send, &reply).await
            }
        };
        if let Err(e) = result {
            tracing::info!(%peer, "stream ended: {e}");
        }
        let _ = send.finish();
    }

    /// What became of transfer (agent, seq) here, for its source.
    fn transfer_status(&self, agent: &AgentId, seq: u64) -> Result<TransferStatus, String> {
        let receiving = self
            .receiving
            .lock()
            .is_ok_and(|r| r.contains_key(&(*agent, seq)));
        // A committed transfer is committed even while its stream is being answered: a source
        // that heard COMMITTED and asks at once must not hear IN PROGRESS.
        let committed = receiving
            && (self.store.transfer(agent, seq).ok().flatten()) == Some(TransferStatus::Committed);
        if receiving && !committed {
            return Ok(TransferStatus::InProgress);
        }
        (self.store.resolve_transfer(agent, seq)).map_err(|e| e.to_string())
    }

    /// Sends `bytes` of incompressible data to peer `to` over the connection hops use, the
    /// way an image travels (one blob, read by the peer as it comes); returns the µs it took.
    /// The data is one chunk sent again and again, so a probe of any size costs one chunk
    /// of memory; one probe runs at a time.
    async fn probe(&self, to: &str, bytes: u64) -> Result<u64, String> {
        if !self.peers.knows(to) {
            return Err(format!("unknown site `{to}`"));
        }
        if bytes > self.config.max_image {
            return Err(format!(
                "a probe may send at most {} bytes (the largest image)",
                self.config.max_image
            ));
        }
        let Ok(_probing) = self.probing.try_acquire() else {
            return Err(format!(
                "another probe is running on {}; try again once it ended",
                self.config.name
            ));
        };
        let chunk = bytes::Bytes::from(incompressible(PROBE_CHUNK.min(bytes as usize)));
        let conn = self.connect(to).await?;
        let started = Instant::now();
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        write_msg(&mut send, &Request::Sink)
            .await
            .map_err(|e| e.to_string())?;
        write_blob_repeated(&mut send, chunk, bytes)
            .await
            .map_err(|e| e.to_string())?;
        let _ = send.finish();
        let received: Result<u64, String> = read_msg(&mut recv).await.map_err(|e| e.to_string())?;
        let elapsed = started.elapsed().as_micros() as u64;
        match received? {
            n if n == bytes => Ok(elapsed),
            n => Err(format!("{to} received {n} of {bytes} bytes")),
        }
    }

    // ---- users -------------------------------------------------------------------------

    /// Launches an agent of the module named (or sent) with its itinerary and arguments, and
    /// streams its events to the launcher until it ends.
    async fn serve_launch(
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
            state: "running".into(),
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
            Ok(mut agent) => self
                .keep_async(&mut agent, Resume::Poll)
                .await
                .map(|()| agent),
            Err(e) => Err(e.to_string()),
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
                    outcome: Err(e),
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
    fn may_launch(&self, user: &str) -> Result<Reserved<'_>, OverQuota> {
        let place = self.reserve(user)?;
        self.quotas.launch(user)?;
        Ok(place)
    }

    /// A place for one more running agent of `user`, within the host's and the user's limits.
    fn reserve(&self, user: &str) -> Result<Reserved<'_>, OverQuota> {
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
    async fn launch_module(
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
    async fn held_module(self: &Arc<Self>, hash: &ModuleHash) -> Option<Arc<AgentModule>> {
        match self.store.has_module(hash) {
            true => self.module(hash).await.ok(),
            false => None,
        }
    }

    /// Reads a launcher's module (of hash `known`, if it named one), admits and stores it.
    async fn receive_module(
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

    fn home_status(&self, agent: &AgentId, peer: &Identity) -> Option<StatusReply> {
        let homes = self.homes.lock().ok()?;
        homes
            .get(agent)
            .filter(|h| h.status.owner == peer.name)
            .map(|h| h.status.clone())
    }

    async fn kill(self: &Arc<Self>, agent: &AgentId, peer: &Identity) -> Result<(), String> {
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

    /// Records an event of an agent launched here and passes it to its watchers.
    fn deliver(self: &Arc<Self>, agent: &AgentId, event: LaunchEvent) {
        if self.note(agent, event) {
            self.save_home(agent);
        }
    }

    /// [`Host::deliver`], waiting for the store as a task.
    async fn deliver_async(self: &Arc<Self>, agent: &AgentId, event: LaunchEvent) {
        if self.note(agent, event) {
            self.save_home_async(agent).await;
        }
    }

    /// Applies an event of an agent launched here to its home status in memory; whether
    /// there is a new status to store. A report told twice (its host restarted) changes
    /// nothing and is not stored again.
    fn note(self: &Arc<Self>, agent: &AgentId, event: LaunchEvent) -> bool {
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
    fn release_held_later(self: &Arc<Self>, agent: AgentId) {
        let host = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(HOLD_END).await;
            host.release_held(&agent);
        });
    }

    fn release_held(self: &Arc<Self>, agent: &AgentId) {
        if let Ok(mut homes) = self.homes.lock()
            && let Some(entry) = homes.get_mut(agent)
            && let Some(held) = entry.held.take()
        {
            entry.record(held);
        } else {
            return;
        }
        self.save_home(agent);
    }

    /// Stores the agent's home status as it is now, then tells the watchers the events it
    /// holds. The status is read inside the write transaction, so writes of one agent's
    /// status, which the store makes one at a time, store ever newer ones; and no write waits
    /// for the disk with `homes` locked, so the statuses of many agents share one sync.
    fn save_home(self: &Arc<Self>, agent: &AgentId) {
        let saved = self.store.put_home_latest(self.latest_home(agent));
        self.tell(agent, saved);
    }

    /// [`Host::save_home`], waiting for the store as a task.
    async fn save_home_async(self: &Arc<Self>, agent: &AgentId) {
        let saved = self
            .store
            .put_home_latest_async(self.latest_home(agent))
            .await;
        self.tell(agent, saved);
    }

    /// The agent's home status as it is when the store's transaction reads it, with the
    /// number of events it holds.
    fn latest_home(
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
    fn tell(&self, agent: &AgentId, saved: Result<Option<u64>, super::store::StoreError>) {
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

    /// The agent's hop to `to` committed there: leave a forwarding pointer and tell its home,
    /// unless it went home (the home recorded the hop when it committed it).
    async fn forwarded(self: &Arc<Self>, agent: AgentId, home: String, hop: HopInfo) {
        let record = AgentRecord::Forwarded {
            seq: hop.seq,
            to: hop.to.clone(),
        };
        if hop.to == home {
            if let Err(e) = self.store.forward_async(&agent, &record, None).await {
                tracing::error!(%agent, "cannot record that the agent left: {e}");
            }
            return crash_point("source-after-forward");
        }
        let event = LaunchEvent::Moved(hop);
        if home == self.config.name {
            // The pointer and the new status in one write.
            self.note(&agent, event);
            let latest = self.latest_home(&agent);
            let saved = self.store.forward_home_async(&agent, &record, latest);
            let saved = saved.await;
            if let Err(e) = &saved {
                tracing::error!(%agent, "cannot record that the agent left: {e}");
            }
            self.tell(&agent, saved);
            return crash_point("source-after-forward");
        }
        let report = PendingReport { home, agent, event };
        match self
            .store
            .forward_async(&agent, &record, Some(&report))
            .await
        {
            Ok(()) => self.outbox.notify_one(),
            Err(e) => {
                // The report went with the failed transaction: keep it on its own.
                tracing::error!(%agent, "cannot record that the agent left: {e}");
                self.report(agent, report.home, report.event);
            }
        }
        crash_point("source-after-forward");
    }

    /// [`Host::finish`], waiting for the store as a task: how an agent running here ends.
    async fn finish_async(
        self: &Arc<Self>,
        id: AgentId,
        home: String,
        hops: u64,
        outcome: Result<Vec<u8>, String>,
    ) {
        let _ = self.store.remove_agent_async(&id).await;
        self.forget_running(&id);
        self.report_async(id, home, self.ended(hops, outcome)).await;
    }

    /// Sends an event to the agent's home host (here, or a peer). A report to a peer is
    /// stored first and sent until the home acknowledges it, across restarts of either.
    fn report(self: &Arc<Self>, agent: AgentId, home: String, event: LaunchEvent) {
        if home == self.config.name {
            return self.deliver(&agent, event);
        }
        let report = PendingReport { home, agent, event };
        if let Err(e) = self.store.put_report(&report) {
            tracing::error!(%agent, "cannot store a report for the home host: {e}");
        }
        self.outbox.notify_one();
    }

    /// [`Host::report`], waiting for the store as a task.
    async fn report_async(self: &Arc<Self>, agent: AgentId, home: String, event: LaunchEvent) {
        if home == self.config.name {
            return self.deliver_async(&agent, event).await;
        }
        let report = PendingReport { home, agent, event };
        if let Err(e) = self.store.put_report_async(&report).await {
            tracing::error!(%agent, "cannot store a report for the home host: {e}");
        }
        self.outbox.notify_one();
    }

    /// Makes the store's commits that did not wait for the disk durable every
    /// [`super::store::LAZY_SYNC`], and drops the instances kept for agents that did not come
    /// ([`crate::recycle`]).
    async fn sync_lazily(self: Arc<Self>) {
        let mut every = tokio::time::interval(super::store::LAZY_SYNC);
        while !self.shutting_down.load(Ordering::SeqCst) {
            every.tick().await;
            let host = self.clone();
            let synced = tokio::task::spawn_blocking(move || {
                host.modules.expire_idle();
                host.store.sync_lazy()
            })
            .await;
            if let Ok(Err(e)) = synced {
                tracing::error!("cannot sync the store: {e}");
            }
        }
    }

    /// Delivers stored reports to their home hosts, retrying those that fail.
    async fn deliver_reports(self: Arc<Self>) {
        let mut backoff = Duration::from_millis(200);
        while !self.shutting_down.load(Ordering::SeqCst) {
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
                    match host.ask::<()>(&report.home, &request).await {
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

    // ---- running agents ----------------------------------------------------------------

    fn spawn_agent(self: &Arc<Self>, agent: AgentInstance, start: Start) {
        if !matches!(start, Start::Arrived(_)) {
            let context = agent.context();
            self.enroll(context.agent_id, &context.owner, agent.flags());
        }
        if self
            .executor
            .spawn(self.clone().drive(agent, start))
            .is_none()
        {
            tracing::error!("no threads to run agents on");
        }
    }

    /// Makes a running agent known: to kill, to shutdown and to the count of agents. An
    /// arrival is enrolled once it is committed (two uncommitted arrivals of one agent may
    /// meet, when its source restarted and offered the hop again).
    fn enroll(&self, id: AgentId, owner: &str, flags: Arc<AgentFlags>) {
        if self.shutting_down.load(Ordering::SeqCst) {
            flags.checkpoint.store(true, Ordering::SeqCst);
        }
        self.residents.enroll(id, owner, flags);
    }

    fn forget_running(&self, id: &AgentId) {
        self.residents.forget(id);
        self.idle.notify_waiters();
        self.trimmer.freed();
    }

    async fn drive(self: Arc<Self>, mut agent: AgentInstance, start: Start) {
        let id = agent.context().agent_id;
        let home = agent.context().home.clone();
        // An arrival runs before its commit is durable, but nothing it does takes effect
        // before: its first operation, or its end, waits for the verdict.
        let (mut next, mut uncommitted) = match start {
            Start::Arrived(committed) => (Start::Poll, Some(committed)),
            start => (start, None),
        };
        loop {
            let op = match next {
                Start::Handle(op) => op,
                Start::Arrived(_) | Start::Poll => {
                    let step = agent.poll().await;
                    if let Some(committed) = uncommitted.take()
                        && committed.await != Ok(true)
                    {
                        return tracing::info!(agent = %id, "dropped an arrival that was never committed");
                    }
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
                            let hops = agent.context().hops();
                            return self.finish_async(id, home, hops, outcome).await;
                        }
                        Err(e) => {
                            let hops = agent.context().hops();
                            return self.finish_async(id, home, hops, Err(e.to_string())).await;
                        }
                    }
                }
            };
            if self.shutting_down.load(Ordering::SeqCst) {
                return self.park(agent);
            }
            // A kill that reached the agent between epoch ticks (one made while it woke from
            // parking, say) ends it before its operation takes effect.
            if agent.flags().kill.load(Ordering::SeqCst) {
                let hops = agent.context().hops();
                return self
                    .finish_async(id, home, hops, Err(AgentError::Killed.to_string()))
                    .await;
            }
            next = Start::Poll;
            match op {
                Op::Hop { site } if site == self.config.name => {
                    agent.complete(OpResult::Hop(Ok(())))
                }
                Op::Hop { site } => match self.send_agent(&mut agent, &site).await {
                    Ok(info) => {
                        crash_point("source-after-committed");
                        self.forget_running(&id);
                        agent.retire();
                        return self.forwarded(id, home, info).await;
                    }
                    Err(failure) => {
                        self.hop_failed(&mut agent, failure.departure.as_deref(), failure.error)
                    }
                },
                Op::Call { service, request } => {
                    let answer = self.call(&mut agent, &service, &request);
                    agent.complete(OpResult::Call(answer));
                }
                Op::Checkpoint => agent.complete(OpResult::Checkpoint),
                Op::Sleep { ms } => {
                    if Duration::from_millis(ms) >= PARK_AFTER && self.park_asleep(&mut agent, ms) {
                        return;
                    }
                    if !sleep_unless_killed(&agent.flags(), ms).await {
                        let hops = agent.context().hops();
                        return self
                            .finish_async(id, home, hops, Err(AgentError::Killed.to_string()))
                            .await;
                    }
                    agent.complete(OpResult::Sleep);
                }
            }
        }
    }

    /// Parks an agent that sleeps `ms`: stores it with its sleep completed, frees its instance
    /// and sets an alarm. `false` when it could not be stored (it then sleeps in memory).
    fn park_asleep(self: &Arc<Self>, agent: &mut AgentInstance, ms: u64) -> bool {
        let id = agent.context().agent_id;
        let owner = agent.context().owner.clone();
        let parked = self.residents.counts(&owner).parked;
        if parked >= self.quotas.limits().parked {
            tracing::info!(agent = %id, %owner, parked, "sleeping in memory: its owner has as many agents parked here as a user may (user_max_parked)");
            return false;
        }
        let until_ms = unix_ms().saturating_add(ms);
        let (home, hops) = (agent.context().home.clone(), agent.context().hops());
        agent.complete(OpResult::Sleep);
        let resume = Resume::Wake {
            until_ms,
            home: home.clone(),
            hops,
            owner: owner.clone(),
        };
        if let Err(e) = super::store::blocking(|| self.keep(agent, resume)) {
            // The sleep stays completed: the agent sleeps in memory and then goes on.
            tracing::warn!(agent = %id, "sleeping in memory: {e}");
            return false;
        }
        // Into `parked` and out of `running` at once, so that a kill finds it in one of them.
        let flags = agent.flags();
        let parked = (self.residents).park(id, &flags, &owner, || self.alarm(id, until_ms));
        if !parked {
            self.finish(id, home, hops, Err(AgentError::Killed.to_string()));
            return true;
        }
        self.idle.notify_waiters();
        self.trimmer.freed();
        tracing::info!(agent = %id, until_ms, "parked asleep");
        let event = LaunchEvent::Sleeping {
            site: self.config.name.clone(),
            seq: agent.context().hop_seq,
            until_ms,
        };
        self.report(id, home, event);
        true
    }

    /// Sets the alarm of a parked agent (one whose record says [`Resume::Wake`]).
    fn set_alarm(self: &Arc<Self>, id: AgentId, owner: &str, until_ms: u64) {
        (self.residents).set_alarm(id, owner, || self.alarm(id, until_ms));
    }

    /// A task that wakes agent `id` at `until_ms`. Call with the residents locked, and put
    /// the handle there before unlocking: the task may be due at once.
    fn alarm(self: &Arc<Self>, id: AgentId, until_ms: u64) -> tokio::task::AbortHandle {
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
    fn wake(self: &Arc<Self>, id: AgentId) {
        // Its own task: an alarm stays small, whatever restoring takes.
        tokio::spawn(self.clone().wake_parked(id));
    }

    /// Restores a parked agent from its stored image and polls it; a few at a time and only
    /// while there is room, so that a host whose agents all fell due together (it was down,
    /// or they slept alike) does not restore them all at once.
    async fn wake_parked(self: Arc<Self>, id: AgentId) {
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
        while self.residents.running() >= self.config.max_agents
            && !self.shutting_down.load(Ordering::SeqCst)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if self.shutting_down.load(Ordering::SeqCst) {
            return; // it stays parked: the next start sets its alarm again
        }
        // Running from now on (its flags stand in until it is restored), unless a kill took
        // it out of `parked` first.
        let flags = Arc::<AgentFlags>::default();
        let Some(owner) = self.residents.wake(id, flags.clone()) else {
            return;
        };
        let (image, home, hops) = match self.store.agent(&id) {
            Ok(Some(AgentRecord::Resident {
                image,
                resume: Resume::Wake { home, hops, .. },
                ..
            })) => (image, home, hops),
            other => {
                tracing::error!(agent = %id, "no parked image to wake: {other:?}");
                return self.forget_running(&id);
            }
        };
        match self.restore_stored(&image).await {
            Ok(mut agent) => {
                agent.adopt_flags(flags);
                tracing::info!(agent = %id, "woke");
                self.spawn_agent(agent, Start::Poll);
            }
            Err(e) => {
                tracing::error!(agent = %id, "cannot wake, trying again in {WAKE_RETRY:?}: {e}");
                let again = unix_ms().saturating_add(WAKE_RETRY.as_millis() as u64);
                let parked = (self.residents).park(id, &flags, &owner, || self.alarm(id, again));
                if !parked {
                    self.finish(id, home, hops, Err(AgentError::Killed.to_string()));
                }
            }
        }
    }

    /// Ends a parked agent that was killed: its alarm is cancelled, its record removed.
    fn kill_parked(
        self: &Arc<Self>,
        id: AgentId,
        alarm: tokio::task::AbortHandle,
    ) -> Result<(), String> {
        alarm.abort();
        match self.store.agent(&id) {
            Ok(Some(AgentRecord::Resident {
                resume: Resume::Wake { home, hops, .. },
                ..
            })) => {
                self.finish(id, home, hops, Err(AgentError::Killed.to_string()));
                Ok(())
            }
            other => Err(format!("no parked record of agent {id}: {other:?}")),
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
        self.report(id, home, self.ended(hops, outcome));
    }

    /// The event of an agent's end here.
    fn ended(&self, hops: u64, outcome: Result<Vec<u8>, String>) -> LaunchEvent {
        LaunchEvent::Finished {
            site: self.config.name.clone(),
            hops,
            outcome,
        }
    }

    /// Answers a service call once: an agent re-running from an older image after a crash gets
    /// the journaled answer instead of calling again.
    fn call(
        self: &Arc<Self>,
        agent: &mut AgentInstance,
        service: &str,
        request: &[u8],
    ) -> Result<serde_bytes::ByteBuf, agent_abi::CallError> {
        let id = agent.context().agent_id;
        let index = agent.context().calls;
        agent.context_mut().calls += 1;
        let digest = *blake3::hash(request).as_bytes();
        match self.store.call(&id, index) {
            Ok(Some(CallEntry {
                request,
                answer: Some(answer),
                ..
            })) if request == digest => return answer,
            Ok(Some(_)) => {
                tracing::warn!(agent = %id, index, "the agent did not repeat its call; calling again")
            }
            Ok(None) => {}
            Err(e) => tracing::error!(agent = %id, "call journal: {e}"),
        }
        let answer = self
            .site
            .call(service, request)
            .map(serde_bytes::ByteBuf::from);
        let entry = CallEntry {
            seq: agent.context().hop_seq,
            service: service.to_string(),
            request: digest,
            answer: Some(answer.clone()),
        };
        if let Err(e) = self.store.put_call(&id, index, &entry) {
            tracing::error!(agent = %id, "cannot journal a call: {e}");
        }
        crash_point("after-call");
        answer
    }

    /// Stores the agent's image at its current safe point as its resident record.
    fn keep(&self, agent: &mut AgentInstance, resume: Resume) -> Result<(), String> {
        let (id, bytes, record) = kept(agent, resume)?;
        let kept = self.store.keep_agent(&id, &bytes.parts(), record);
        kept.map(drop)
            .map_err(|e| format!("cannot store the agent: {e}"))
    }

    /// [`Host::keep`], waiting for the store as a task.
    async fn keep_async(&self, agent: &mut AgentInstance, resume: Resume) -> Result<(), String> {
        let (id, bytes, record) = kept(agent, resume)?;
        let parts = bytes.parts();
        let kept = self.store.keep_agent_async(&id, &parts, record).await;
        kept.map(drop)
            .map_err(|e| format!("cannot store the agent: {e}"))
    }

    /// Stores the agent at its safe point, pending operation included, to resume on restart.
    fn park(self: &Arc<Self>, mut agent: AgentInstance) {
        let id = agent.context().agent_id;
        match self.keep(&mut agent, Resume::Handle) {
            Ok(()) => tracing::info!(agent = %id, "parked"),
            Err(e) => tracing::error!(agent = %id, "cannot park agent: {e}"),
        }
        self.forget_running(&id);
    }

    /// The source side of a hop. `Ok`: the destination owns the agent. `Err`: it stays here.
    async fn send_agent(
        self: &Arc<Self>,
        agent: &mut AgentInstance,
        site: &str,
    ) -> Result<HopInfo, HopFailure> {
        let (frozen, frozen_at_us) = (Instant::now(), unix_us());
        if !self.config.peers.contains_key(site) {
            return Err(HopError::UnknownSite(site.to_string()).into());
        }
        let from = self.config.name.clone();
        // Each attempt gets its own sequence number, so a retry never meets an aborted one.
        agent.context_mut().hop_seq += 1;
        let seq = agent.context().hop_seq;
        let mut image = agent.capture_in_place();
        image.context.record_hop(HopRecord {
            seq,
            from: from.clone(),
            to: site.to_string(),
        });
        let unreachable = |reason: String| HopError::Unreachable {
            site: site.into(),
            reason,
        };
        let phase = |name: &str| {
            tracing::debug!(
                seq,
                phase = name,
                us = frozen.elapsed().as_micros() as u64,
                "hop out"
            )
        };
        phase("captured");
        // The agent stays suspended until the hop ends, so its memory can be read where it
        // lies. A large image the return cache would not keep is sent and stored from there;
        // any other is copied out (the base keeps its pages, and a small one costs little).
        let memory = agent.memory();
        let in_place = match self.bases.lock().is_ok_and(|b| b.fits(&image.pages)) {
            false if image.pages.pages() * PAGE_SIZE as u64 >= WORTH_PREPARING => image
                .encode_in_place(memory)
                .map_err(|e| unreachable(e.to_string()))?,
            _ => None,
        };
        let bytes = match in_place {
            Some(image) => Outgoing::InPlace(image),
            None => {
                image.pages = PageMap::gather(memory, std::mem::take(&mut image.pages.runs));
                let encoded = image.encode(EncodeOptions::default());
                Outgoing::Encoded(Arc::new(encoded.map_err(|e| unreachable(e.to_string()))?))
            }
        };
        phase("encoded");
        // The departure is recorded while the offer and the image travel: it must be durable
        // before DEPARTED is sent, since the destination commits only after DEPARTED. Once it
        // is, a restart asks the destination, which aborts a transfer it never committed.
        // A large image is recorded once it has been sent, as the destination stores its copy
        // once it has come: on the VMs we measure on, writing to the disk slows a transfer
        // alongside by half (BENCHMARKS.md), and the destination resumes the agent before
        // DEPARTED anyway, so only the commit waits for the record.
        let record_later = bytes.len() as u64 >= WORTH_PREPARING;
        let mut recording = match &bytes {
            Outgoing::Encoded(full) if !record_later => {
                Some(self.record_departure(image.context.agent_id, seq, site, full))
            }
            _ => None,
        };
        let module = agent.module().clone();
        let known =
            (self.peer_modules.lock()).is_ok_and(|k| k.contains(&(site.into(), module.hash)));
        let offer = Offer {
            agent: image.context.agent_id,
            seq,
            module: module.hash,
            module_bytes: module.size as u64,
            memory_bytes: image.memory_bytes,
            image_bytes: bytes.len() as u64,
            abi: agent_abi::ABI_VERSION,
            owner: image.context.owner.clone(),
            home: image.context.home.clone(),
            image_follows: known && (bytes.len() as u64) < WORTH_A_BASE,
        };
        // Hashed while the offer travels and kept before the image leaves: an agent that
        // comes straight back finds its pages here.
        let mut base_task = (offer.image_bytes >= WORTH_A_BASE)
            .then(|| self.hash_base(seq, &image.pages, offer_binding(&offer)))
            .flatten();
        let mut hop = SourceHop::offered(site);
        let mut streams = None;
        let mut offered = Duration::ZERO;
        let reply = async {
            let conn = self.connect(site).await?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            offered = frozen.elapsed();
            write_msg(&mut send, &Request::Hop(offer.clone()))
                .await
                .map_err(|e| e.to_string())?;
            if offer.image_follows {
                write_image(&mut send, &bytes, "source-mid-image")
                    .await
                    .map_err(|e| e.to_string())?;
            }
            let reply: OfferReply = read_msg(&mut recv).await.map_err(|e| e.to_string())?;
            streams = Some((send, recv));
            Ok(reply)
        }
        .await;
        phase("offer answered");
        let mut reply = reply;
        let base = match &mut reply {
            Ok(OfferReply::Accept { base, .. }) => base.take(),
            _ => None,
        };
        if let Ok(OfferReply::Accept {
            need_module: false, ..
        }) = &reply
            && let Ok(mut known) = self.peer_modules.lock()
        {
            known.insert((site.to_string(), module.hash));
        }
        let mut step = hop.on_offer_reply(reply);
        let mut module_sent = 0u64;
        let mut own_base = None;
        // What is sent, when it is not the whole image: the pages the destination lacks.
        let mut partial = None;
        let mut pages_reused = 0;
        let mut backoff = Duration::from_millis(100);
        // Set once the departure is recorded: from then on a restart asks the destination.
        let mut departure = None;
        let mut unrecorded = None;
        // How long the agent had run on the destination when it answered COMMITTED.
        let mut ran_there = Duration::ZERO;
        let mut resumed_there = 0;
        loop {
            if record_later
                && departure.is_none()
                && unrecorded.is_none()
                && matches!(step, SourceStep::Confirm)
            {
                match &bytes {
                    Outgoing::Encoded(full) => {
                        recording = Some(self.record_departure(offer.agent, seq, site, full));
                    }
                    // Not a task of its own: the pages stay borrowed from the agent.
                    Outgoing::InPlace(full) => {
                        match super::store::blocking(|| {
                            self.keep_departure(offer.agent, seq, site, &full.parts())
                        }) {
                            Ok(image) => departure = Some(image),
                            Err(e) => {
                                tracing::error!(seq, "cannot record the departure: {e}");
                                unrecorded = Some(e);
                            }
                        }
                        phase("departure recorded");
                    }
                }
            }
            // Any step but sending the image waits for the record.
            if !matches!(step, SourceStep::Transfer { .. })
                && let Some(recording) = recording.take()
            {
                let recorded = recording
                    .await
                    .unwrap_or_else(|e| Err(format!("the departure task failed: {e}")));
                match recorded {
                    Ok(image) => departure = Some(image),
                    Err(e) => {
                        tracing::error!(seq, "cannot record the departure: {e}");
                        unrecorded = Some(e);
                    }
                }
                phase("departure recorded");
            }
            step = match step {
                SourceStep::Transfer {
                    module: need_module,
                } => {
                    crash_point("source-after-offer");
                    if let Some(task) = base_task.take()
                        && let Ok(kept) = task.await
                    {
                        let kept = Arc::new(kept);
                        if let Ok(mut bases) = self.bases.lock() {
                            bases.insert(offer.agent, kept.clone());
                        }
                        own_base = Some(kept);
                        phase("base kept");
                    }
                    if let Some(list) = &base {
                        let own = own_base.as_deref();
                        let encoded = super::store::blocking(|| {
                            // Pages read in place are copied out to be encoded against the list.
                            if image.pages.data.is_empty() {
                                let runs = std::mem::take(&mut image.pages.runs);
                                image.pages = PageMap::gather(memory, runs);
                            }
                            encode_against(&image, list, own)
                        });
                        match encoded {
                            Ok(Some((encoded, reused))) => {
                                partial = Some(Outgoing::Encoded(Arc::new(encoded)));
                                pages_reused = reused;
                            }
                            Ok(None) => {}
                            Err(e) => tracing::warn!(seq, "sending the whole image: {e}"),
                        }
                        phase("encoded against the destination's pages");
                    }
                    let sent = match streams.as_mut() {
                        Some((send, _)) => {
                            let mut result = Ok(());
                            if need_module {
                                // Read only when the destination lacks it: most hops go to
                                // hosts that have it.
                                let wasm = self.store.module(&module.hash).unwrap_or_default();
                                module_sent = wasm.len() as u64;
                                let wasm = bytes::Bytes::from(wasm);
                                result =
                                    write_blob_passing(send, &[], &wasm, "source-mid-module").await;
                            }
                            if result.is_ok() && !offer.image_follows {
                                let wire = partial.as_ref().unwrap_or(&bytes);
                                result = write_image(send, wire, "source-mid-image").await;
                            }
                            result.map_err(|e| e.to_string())
                        }
                        None => Err("no stream".to_string()),
                    };
                    phase("sent");
                    hop.on_sent(sent)
                }
                SourceStep::Confirm => match (&unrecorded, streams.as_mut()) {
                    // Dropping the streams tells the destination; it never commits.
                    (Some(why), _) => hop.on_unrecorded(why),
                    (None, Some((send, _))) => {
                        crash_point("source-before-departed");
                        // The home records a hop into it itself, from what it is told here.
                        let home = (site == offer.home).then(|| SentHome {
                            from_arch: std::env::consts::ARCH.to_string(),
                            image_bytes: partial.as_ref().unwrap_or(&bytes).len() as u64,
                            module_bytes: module_sent,
                            pages_reused,
                            frozen_at_us,
                            offered_us: offered.as_micros() as u64,
                        });
                        let sent = write_msg(send, &Departed { seq, home }).await;
                        hop.on_confirmed(sent.map_err(|e| e.to_string()))
                    }
                    (None, None) => hop.on_confirmed(Err("no stream".into())),
                },
                SourceStep::AwaitVerdict => {
                    let verdict = match streams.as_mut() {
                        Some((_, recv)) => {
                            let read = read_msg::<TransferReply>(recv);
                            tokio::time::timeout(VERDICT_TIMEOUT, read)
                                .await
                                .map_err(|_| "no verdict yet".to_string())
                                .and_then(|v| v.map_err(|e| e.to_string()))
                        }
                        None => Err("no stream".to_string()),
                    };
                    phase("verdict");
                    if let Ok(TransferReply::Committed {
                        ran_us,
                        resumed_at_us,
                    }) = &verdict
                    {
                        ran_there = Duration::from_micros(*ran_us);
                        resumed_there = *resumed_at_us;
                    }
                    hop.on_verdict(verdict)
                }
                SourceStep::Query => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
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
                SourceStep::Resume(error) => {
                    // It stays: a base is for an agent that left.
                    if let Ok(mut bases) = self.bases.lock() {
                        bases.remove_seq(&offer.agent, seq);
                    }
                    return Err(HopFailure { error, departure });
                }
                SourceStep::Forget => {
                    if let Ok(mut known) = self.peer_modules.lock() {
                        known.insert((site.to_string(), module.hash));
                    }
                    let info = HopInfo {
                        seq,
                        from,
                        from_arch: std::env::consts::ARCH.to_string(),
                        to: site.to_string(),
                        image_bytes: partial.as_ref().unwrap_or(&bytes).len() as u64,
                        memory_bytes: offer.memory_bytes,
                        module_bytes: module_sent,
                        base_list_bytes: base.as_ref().map_or(0, BaseList::wire_bytes),
                        pages_reused,
                        freeze_us: frozen.elapsed().saturating_sub(ran_there).as_micros() as u64,
                        committed_us: frozen.elapsed().as_micros() as u64,
                        frozen_at_us,
                        resumed_at_us: resumed_there,
                    };
                    return Ok(info);
                }
            };
        }
    }

    /// Starts hashing the pages an agent leaves with at hop `seq` into its base, off the
    /// async workers, unless the return cache could not keep them.
    fn hash_base(
        &self,
        seq: u64,
        pages: &PageMap,
        binding: Binding,
    ) -> Option<tokio::task::JoinHandle<Base>> {
        if !self.bases.lock().is_ok_and(|b| b.fits(pages)) {
            return None;
        }
        let pages = pages.clone();
        Some(tokio::task::spawn_blocking(move || {
            Base::new(seq, pages, binding)
        }))
    }

    /// Stores the departure image and record of hop `seq` to `to`, off the async workers;
    /// yields the image's name.
    fn record_departure(
        self: &Arc<Self>,
        id: AgentId,
        seq: u64,
        to: &str,
        bytes: &Arc<Encoded>,
    ) -> tokio::task::JoinHandle<Result<String, String>> {
        let (host, bytes, to) = (self.clone(), bytes.clone(), to.to_string());
        if bytes.len() > super::store::INLINE_IMAGE {
            return tokio::task::spawn_blocking(move || {
                host.keep_departure(id, seq, &to, &bytes.parts())
            });
        }
        tokio::spawn(async move {
            let parts = bytes.parts();
            let kept = (host.store)
                .keep_agent_async(&id, &parts, departing(seq, &to))
                .await;
            kept.map_err(|e| e.to_string())
        })
    }

    /// Stores the departure image (`parts`, read one after the other) and record of hop `seq`
    /// to `to`; yields the image's name.
    fn keep_departure(
        &self,
        id: AgentId,
        seq: u64,
        to: &str,
        parts: &[&[u8]],
    ) -> Result<String, String> {
        (self.store)
            .keep_agent(&id, parts, departing(seq, to))
            .map_err(|e| e.to_string())
    }

    /// Starts making an instance ready for the agent whose image begins with `head`, when
    /// its header agrees with the offer ([`AgentInstance::prepare`]).
    fn prepare(self: &Arc<Self>, offer: &Offer, head: &[u8]) -> Option<Arriving> {
        let layout = AgentImage::layout(head, &self.image_limits())?;
        if layout.memory_bytes != offer.memory_bytes {
            return None;
        }
        let (host, hash) = (self.clone(), offer.module);
        let context = AgentContext::new(&offer.home, &offer.owner, Vec::new(), BTreeMap::new());
        let (memory_bytes, runs) = (layout.memory_bytes, layout.runs.clone());
        let preparing = tokio::spawn(async move {
            let module = host.module(&hash).await?;
            let (site, limits) = (host.site.clone(), &host.config.limits);
            AgentInstance::prepare(module, site, context, memory_bytes, runs, limits)
                .await
                .map_err(|e| e.to_string())
        });
        Some(Arriving::new(layout, preparing))
    }

    /// Reads a large image whose module this host holds, making its instance ready once its
    /// header has come and writing its pages into it as they come ([`Arriving`]).
    async fn read_arriving(
        self: &Arc<Self>,
        offer: &Offer,
        recv: &mut quinn::RecvStream,
        inflight: &mut InFlight,
        buffer: impl FnOnce(usize) -> Vec<u8>,
    ) -> Result<(Vec<u8>, Option<Arriving>), WireError> {
        let limit = self.config.max_image;
        let mut blob = Blob::start_into(recv, "image", limit, inflight, buffer).await?;
        let (mut arriving, mut wanted) = (None, 12);
        while blob.arrived().len() < wanted.min(blob.len()) {
            blob.read_to(recv, wanted, inflight).await?;
            let seen = blob.arrived();
            match AgentImage::head_len(seen) {
                Some(n) if n > 12 + MAX_HEADER_SEEN => break,
                Some(n) if n <= seen.len() => arriving = self.prepare(offer, seen),
                Some(n) => wanted = n,
                None => break,
            }
        }
        while blob.arrived().len() < blob.len() {
            blob.read_to(recv, blob.arrived().len() + ARRIVING_PIECE, inflight)
                .await?;
            if let Some(arriving) = &mut arriving {
                arriving.keep_up(blob.arrived()).await;
            }
        }
        Ok((blob.into_bytes(), arriving))
    }

    /// The destination side of a hop; `offered` is no later than when the offer was sent.
    async fn serve_offer(
        self: &Arc<Self>,
        peer: &Identity,
        (offer, offered): (Offer, Instant),
        stream: Stream<'_>,
    ) -> Result<(), WireError> {
        if peer.role != Role::Host {
            // Refused for who sent it, before anything is looked up.
            let refused = decide_offer(&offer, peer, &DestView::default());
            return write_msg(stream.0, &refused).await;
        }
        let status = self.store.transfer(&offer.agent, offer.seq).ok().flatten();
        let view = DestView {
            committed: status == Some(TransferStatus::Committed),
            aborted: status == Some(TransferStatus::Aborted),
            has_module: self.modules.get(&offer.module).is_some()
                || self.store.module(&offer.module).is_some(),
            agents: self.residents.running(),
            owner_agents: self.residents.counts(&offer.owner).running,
            max_owner_agents: self.quotas.limits().running,
            max_agents: if self.shutting_down.load(Ordering::SeqCst) {
                0
            } else {
                self.config.max_agents
            },
            max_memory: self.config.limits.max_memory,
            max_image: self.config.max_image,
            max_module: self.config.max_module,
        };
        let mut reply = decide_offer(&offer, peer, &view);
        // A place for the agent, held until it is enrolled at its commit (or the transfer
        // ends): offers decided meanwhile count it.
        let mut place = None;
        if matches!(reply, OfferReply::Accept { .. }) {
            match self.reserve(&offer.owner) {
                Ok(held) => place = Some(held),
                Err(over) => reply = OfferReply::Refuse(over.to_string()),
            }
        }
        // Held from the answer to the end of the transfer: the image may leave out its pages.
        let mut held = None;
        if let OfferReply::Accept { base, .. } = &mut reply {
            let binding = offer_binding(&offer);
            held = (self.bases.lock().ok())
                .and_then(|b| b.get(&offer.agent))
                .filter(|b| b.serves(&binding) && b.seq() < offer.seq)
                .filter(|_| offer.image_bytes >= WORTH_A_BASE);
            *base = held.as_ref().map(|b| b.list().clone());
        }
        let receiving = (matches!(reply, OfferReply::Accept { .. }))
            .then(|| Receiving::start(self, (offer.agent, offer.seq)));
        let answer = (&reply, offered, receiving);
        let received = (self.receive_offered(peer, &offer, answer, held.as_deref(), stream)).await;
        drop(place);
        received
    }

    /// The destination side after the decision on the offer (`reply`, when the offer was
    /// sent, and the count of it as being received if accepted): answer it, and if it was
    /// accepted, receive, validate, commit and start the agent.
    async fn receive_offered(
        self: &Arc<Self>,
        peer: &Identity,
        offer: &Offer,
        (reply, offered, receiving): (&OfferReply, Instant, Option<Receiving>),
        base: Option<&Base>,
        (send, recv, inflight): Stream<'_>,
    ) -> Result<(), WireError> {
        write_msg(send, reply).await?;
        let OfferReply::Accept { need_module, .. } = *reply else {
            if let OfferReply::Refuse(why) = reply {
                tracing::info!(agent = %offer.agent, %peer, "refused offer: {why}");
            }
            return Ok(());
        };
        crash_point("dest-after-offer");
        // The module comes first, unless the image followed the offer at once.
        let arriving = Instant::now();
        let early = match offer.image_follows {
            true => Some(read_blob(recv, "image", self.config.max_image, inflight).await?),
            false => None,
        };
        // A large image is read into the buffer of the last one, if it is kept.
        let buffer = |len: usize| self.spare.take(len);
        let wasm = if need_module {
            let wasm = read_blob(recv, "module", self.config.max_module, inflight).await?;
            crash_point("dest-mid-module");
            Some(wasm)
        } else {
            None
        };
        // A large agent's instance is made ready and written while its body travels, once
        // its header has come (not when its module has just come: it was being admitted
        // meanwhile).
        let (image, filling) = match early {
            Some(image) => (image, None),
            None if wasm.is_none() && offer.image_bytes >= WORTH_PREPARING => {
                self.read_arriving(offer, recv, inflight, buffer).await?
            }
            None => {
                let limit = self.config.max_image;
                let read = read_blob_into(recv, "image", limit, inflight, buffer);
                (read.await?, None)
            }
        };
        let phase = |name: &str| {
            let us = arriving.elapsed().as_micros() as u64;
            tracing::debug!(seq = offer.seq, phase = name, us, "hop in");
        };
        phase("image read");
        crash_point("dest-mid-image");
        // An image that must stand alone (no base was offered) is what gets stored: a large
        // one is written and synced while it is checked and restored. Dropped unnamed, the
        // file goes too.
        let image = self.spare.lend(image);
        let staging = (base.is_none() && image.len() > super::store::INLINE_IMAGE).then(|| {
            let (host, image) = (self.clone(), image.clone());
            tokio::task::spawn_blocking(move || host.store.stage_image(&[&image]))
        });
        let arrival = self.receive(offer, wasm, &image, base, filling);
        let (mut agent, whole, unverified) = match arrival.await {
            Ok(arrival) => arrival,
            Err(why) => {
                tracing::warn!(agent = %offer.agent, %peer, "refused transfer: {why}");
                // A query once the source has the answer must not hear IN PROGRESS.
                drop(receiving);
                return write_msg(send, &TransferReply::Refused(why)).await;
            }
        };
        // It runs while DEPARTED comes and the commit is made; a commit that fails, or a
        // stream that breaks first, drops it before it did anything seen.
        let (verdict, committed) = tokio::sync::oneshot::channel();
        let flags = agent.flags();
        agent.complete(OpResult::Hop(Ok(())));
        self.spawn_agent(agent, Start::Arrived(committed));
        let (resumed, resumed_at_us) = (Instant::now(), unix_us());
        phase("resumed");
        let checking = unverified.map(|u| tokio::task::spawn_blocking(move || u.check()));
        let departed: Departed = read_msg_charged(recv, inflight).await?;
        phase("departed");
        crash_point("dest-before-commit");
        let stored = whole.as_deref().unwrap_or(&image[..]);
        // One that failed to stage is staged again by the commit, which reports the error.
        let staged = match staging {
            Some(task) => task.await.ok().and_then(Result::ok),
            None => None,
        };
        let checked = match checking {
            Some(task) => task
                .await
                .map_err(|e| e.to_string())
                .and_then(|checked| checked.map_err(|e| format!("invalid image: {e}"))),
            None => Ok(()),
        };
        let commit = match (departed.seq == offer.seq, checked) {
            (true, Ok(())) => (self.store)
                .commit_arrival_async(&offer.agent, offer.seq, stored, staged)
                .await
                .map_err(|e| e.to_string()),
            (false, _) => Err(format!("DEPARTED names hop {}", departed.seq)),
            (true, Err(why)) => Err(why),
        };
        phase("committed");
        match commit {
            Ok(()) => {
                // Before the agent is let go, so that a crash here leaves it where the commit did.
                crash_point("dest-after-commit");
                self.enroll(offer.agent, &offer.owner, flags);
                if let Ok(mut bases) = self.bases.lock() {
                    bases.remove(&offer.agent);
                }
                // It has arrived once the commit is durable, whether or not the answer reaches
                // the source.
                tracing::info!(agent = %offer.agent, from = %peer, seq = offer.seq, "agent arrived");
                let ran_us = resumed.elapsed().as_micros() as u64;
                let reply = TransferReply::Committed {
                    ran_us,
                    resumed_at_us,
                };
                let answered = write_msg(send, &reply).await;
                let answered_at = Instant::now();
                if let Some(sent) = departed.home
                    && offer.home == self.config.name
                {
                    // The source's time until it sent the offer plus ours since then.
                    let since_offer = |at: Instant| {
                        let ours = at.duration_since(offered).as_micros() as u64;
                        sent.offered_us.saturating_add(ours)
                    };
                    let info = HopInfo {
                        seq: offer.seq,
                        from: peer.name.clone(),
                        from_arch: sent.from_arch,
                        to: self.config.name.clone(),
                        image_bytes: sent.image_bytes,
                        memory_bytes: offer.memory_bytes,
                        module_bytes: sent.module_bytes,
                        base_list_bytes: base.map_or(0, |b| b.list().wire_bytes()),
                        pages_reused: sent.pages_reused,
                        freeze_us: since_offer(resumed),
                        committed_us: since_offer(answered_at),
                        frozen_at_us: sent.frozen_at_us,
                        resumed_at_us,
                    };
                    // Stored before the agent is let go: a write it makes next (its end, a
                    // sleep, a departure) must not be durable before its hop home is, or a
                    // crash of the home in between would lose the hop. (A crash before this
                    // write leaves the agent `Arrived`: a restart records the hop then.)
                    self.deliver_async(&offer.agent, LaunchEvent::Moved(info))
                        .await;
                }
                let _ = verdict.send(true);
                answered
            }
            Err(why) => {
                let _ = verdict.send(false);
                tracing::warn!(agent = %offer.agent, %peer, "refused transfer: {why}");
                drop(receiving);
                write_msg(send, &TransferReply::Refused(why)).await
            }
        }
    }

    /// Validates an arriving agent fully, by restoring it; yields it and, when pages were
    /// filled in from a base, the whole image to store in place of the bytes that came.
    async fn receive(
        self: &Arc<Self>,
        offer: &Offer,
        wasm: Option<Vec<u8>>,
        bytes: &bytes::Bytes,
        base: Option<&Base>,
        arriving: Option<Arriving>,
    ) -> Result<(AgentInstance, Option<Vec<u8>>, Option<Unverified>), String> {
        let started = Instant::now();
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
        // A large image that stands alone is hashed once the agent runs, before the commit.
        let options = DecodeOptions {
            base: base.map(Base::as_base_pages),
            verify: match base.is_none() && bytes.len() as u64 >= WORTH_PREPARING {
                true => Verify::Later,
                false => Verify::Now,
            },
            ..DecodeOptions::new(self.image_limits())
        };
        let (decoded, unverified) = match AgentImage::decode(bytes.clone(), &options) {
            Ok(d) => (Ok((d.image, d.filled_in)), d.unverified),
            Err(e) => (Err(e), None),
        };
        if let (Err(ImageError::HashMismatch), Some(base)) = (&decoded, base) {
            // Pages filled in from the base made a wrong image (a hash collision, or a base
            // the source did not see): the next offer gets no list and sends every page.
            if let Ok(mut bases) = self.bases.lock() {
                bases.remove_seq(&offer.agent, base.seq());
            }
        }
        let (image, filled_in) = decoded.map_err(|e| e.to_string())?;
        if image.context.agent_id != offer.agent
            || image.context.hop_seq != offer.seq
            || image.module != offer.module
            || image.context.owner != offer.owner
            || image.context.home != offer.home
        {
            return Err("the image does not match the offer".into());
        }
        let phase = |name: &str| {
            tracing::debug!(
                seq = offer.seq,
                phase = name,
                us = started.elapsed().as_micros() as u64,
                "hop in"
            )
        };
        phase("decoded");
        // What is stored must stand alone: the base may be gone when the store is read.
        let whole = match filled_in {
            true => Some(
                (image
                    .encode(EncodeOptions::default())
                    .map_err(|e| e.to_string())?)
                .to_vec(),
            ),
            false => None,
        };
        let ready = match arriving {
            Some(arriving) => arriving.finish(bytes).await,
            None => None,
        };
        let (restored, how) = match ready {
            Some((ready, Some(runs))) if runs == image.pages.runs => (
                AgentInstance::restore_written(ready, image),
                "restored into the instance written as it came",
            ),
            Some((ready, None)) => (
                AgentInstance::restore_into(ready, image),
                "restored into the instance made ready",
            ),
            // Not prepared, preparing failed, or written by other runs (decoding read the
            // same header, so never): a restore from scratch.
            _ => {
                let site = self.site.clone();
                let restored = AgentInstance::restore(module, site, image, &self.config.limits);
                (restored.await, "restored")
            }
        };
        let agent = restored.map_err(|e| e.to_string())?;
        phase(how);
        Ok((agent, whole, unverified))
    }
}

/// Counts a transfer (agent, seq) as being received here ([`Host::receiving`]) while it lives.
struct Receiving {
    host: Arc<Host>,
    key: (AgentId, u64),
}

impl Receiving {
    fn start(host: &Arc<Host>, key: (AgentId, u64)) -> Self {
        if let Ok(mut receiving) = host.receiving.lock() {
            *receiving.entry(key).or_default() += 1;
        }
        Receiving {
            host: host.clone(),
            key,
        }
    }
}

impl Drop for Receiving {
    fn drop(&mut self) {
        if let Ok(mut receiving) = self.host.receiving.lock() {
            match receiving.get_mut(&self.key) {
                Some(n) if *n > 1 => *n -= 1,
                _ => drop(receiving.remove(&self.key)),
            }
        }
    }
}

/// Images at least this large have their instance made ready while they travel, and their
/// pages hashed once the agent runs (before the commit), not before it resumes: below it a
/// restore costs less than the task would, and hashing is quick. Their receive buffer is
/// kept for the next one ([`Spare`]).
const WORTH_PREPARING: u64 = 8 << 20;

/// Largest header the destination reads ahead for [`Host::prepare`]; a larger one is
/// read with the body and checked by decoding.
const MAX_HEADER_SEEN: usize = 1 << 20;

/// How many bytes of a large image are read before what came is written into its instance.
const ARRIVING_PIECE: usize = 4 << 20;

/// Bytes of records a list reply carries at most, so that it fits in one message.
const LIST_BYTES: usize = super::wire::MAX_MESSAGE / 2;

/// The first records of `all` that fit in [`LIST_BYTES`], and how many there are.
fn fit_list(all: Vec<StatusReply>) -> ListReply {
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

/// What an offer says of the agent that a base must match to serve it.
fn offer_binding(offer: &Offer) -> Binding {
    Binding {
        module: offer.module,
        owner: offer.owner.clone(),
        home: offer.home.clone(),
    }
}

/// A departure image already counts the hop it was made for; when that hop failed, the agent
/// resumed from the image must not.
fn forget_failed_hop(agent: &mut AgentInstance) {
    let seq = agent.context().hop_seq;
    if agent.context().trace.last().is_some_and(|h| h.seq == seq) {
        agent.context_mut().trace.pop();
    }
}

/// Why a hop did not happen, and the departure image recorded before it failed, if any.
struct HopFailure {
    error: HopError,
    departure: Option<String>,
}

impl From<HopError> for HopFailure {
    fn from(error: HopError) -> HopFailure {
        HopFailure {
            error,
            departure: None,
        }
    }
}

/// `len` xorshift bytes: data no compressor or cache can make smaller.
pub(crate) fn incompressible(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Sleeps `ms` unless the agent is killed meanwhile (checked every 100 ms); `false` if it was.
async fn sleep_unless_killed(flags: &AgentFlags, ms: u64) -> bool {
    let until = tokio::time::Instant::now() + Duration::from_millis(ms.min(1 << 40));
    while tokio::time::Instant::now() < until {
        if flags.kill.load(Ordering::SeqCst) {
            return false;
        }
        tokio::time::sleep_until(
            until.min(tokio::time::Instant::now() + Duration::from_millis(100)),
        )
        .await;
    }
    !flags.kill.load(Ordering::SeqCst)
}

/// Builds the departure record of hop `seq` to `to` around the image's name.
fn departing(seq: u64, to: &str) -> impl FnOnce(String) -> AgentRecord + '_ {
    move |image| AgentRecord::Departing {
        seq,
        to: to.to_string(),
        image,
    }
}

/// What [`Host::keep`] stores of `agent`: its id, its image at its safe point, and how to make
/// the record that names the image.
fn kept(
    agent: &mut AgentInstance,
    resume: Resume,
) -> Result<
    (
        AgentId,
        crate::image::Encoded,
        impl FnOnce(String) -> AgentRecord,
    ),
    String,
> {
    let id = agent.context().agent_id;
    let seq = agent.context().hop_seq;
    let bytes = agent
        .capture()
        .encode(EncodeOptions {
            compression: Compression::Keep,
            ..EncodeOptions::default()
        })
        .map_err(|e| e.to_string())?;
    let record = move |image| AgentRecord::Resident { seq, image, resume };
    Ok((id, bytes, record))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> HomeEntry {
        HomeEntry {
            status: StatusReply {
                agent: AgentId([1; 16]),
                owner: "alice".into(),
                site: "siteA".into(),
                state: "running".into(),
                hops: Vec::new(),
                result: None,
                error: None,
                sleeping: None,
            },
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
        ciborium::into_writer(&reply, &mut bytes).unwrap_or_else(|e| panic!("{e}"));
        assert!(bytes.len() <= super::super::wire::MAX_MESSAGE);
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
            outcome: Ok(Vec::new()),
        };
        assert_eq!(home.note(end.clone()), Noted::Held);
        // What the store keeps holds it, so that it is acknowledged only once stored.
        assert_eq!(home.row().row.held_end, Some(end));
        assert_eq!(home.row().row.status.state, "running");
        assert_eq!(home.note(moved(2, "siteA")), Noted::Unsaved);
        assert!(home.held.is_none() && home.row().row.held_end.is_none());
        assert_eq!(home.status.state, "finished");
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
            outcome: Ok(Vec::new()),
        };
        home.record(end);
        assert_eq!(home.status.sleeping, None);
        // A report of the sleep that arrives after the end changes nothing.
        home.record(sleeping(2, "siteB"));
        assert_eq!(home.status.sleeping, None);
        assert_eq!(home.status.site, "siteC");
    }
}
