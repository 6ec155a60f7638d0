//! A host: one site that runs agents, serves users and hands agents to its peers over
//! mutually authenticated QUIC.
//!
//! Each agent runs as one task ([`driver`]) that polls it from safe point to safe point and
//! performs its operations. A hop runs the source side of the protocol
//! ([`crate::net::hop`]); an incoming offer runs its destination side. Events (hops, the end)
//! go to the agent's home host ([`outbox`], [`homes`]), which streams them to the launcher and
//! answers `status`, `list` and `kill` ([`launch`], [`serve`]).

mod balance;
pub(in crate::net) mod clones;
mod drain;
mod driver;
mod homes;
mod launch;
mod outbox;
mod parking;
mod post;
mod recovery;
mod serve;

pub use balance::DEFAULT_BALANCE_ABOVE;
pub use clones::DEFAULT_MAX_CHILDREN;
pub(in crate::net) use homes::fit_list;
pub(in crate::net) use parking::sleep_unless_killed;
pub use post::Fetched;
pub(in crate::net) use serve::Stream;

use crate::net::hop::machine::WORTH_PREPARING;
use homes::HomeEntry;
use launch::Uploads;
use parking::WAKING_AT_ONCE;
use post::PostOffice;

use crate::base::BaseCache;
use crate::cluster::wire::HostId;
use crate::context::AgentId;
use crate::image::{AgentImage, DecodeOptions, ImageLimits};
use crate::instance::AgentInstance;
use crate::limits::Limits;
use crate::modules::{AgentModule, ModuleCache, ModuleHash};
use crate::net::budget::Budget;
use crate::net::executor::AgentExecutor;
use crate::net::gossip::{self, Membership};
use crate::net::hop::spare::Spare;
use crate::net::metrics::Metrics;
use crate::net::peers::Peers;
use crate::net::quota::{Quotas, UserLimits};
use crate::net::residents::Residents;
use crate::net::store::{HostStore, StoreError};
use crate::net::tls::{self, Credentials};
use crate::net::trim::Trimmer;
use crate::services::Site;
use crate::state::AgentFlags;
use crate::{AgentError, ImageError};
use agent_abi::Op;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use crate::net::peers::{ASK_TIMEOUT, CONNECT_TIMEOUT};

/// How long a request's first message may take to arrive whole.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

/// How long a launch's module may take to arrive whole.
pub const MODULE_DEADLINE: Duration = Duration::from_secs(60);

/// How long a source waits for the destination's verdict before it asks instead: the
/// verdict's stream dies with a crashed destination only at the idle timeout, while a query
/// reaches the destination once it is back (and says "in progress" while it is just slow).
pub const VERDICT_TIMEOUT: Duration = Duration::from_secs(5);

/// Sleeps at least this long park the agent (stored, memory freed); shorter ones wait in
/// memory, where parking would cost more than it frees.
pub const PARK_AFTER: Duration = Duration::from_secs(1);

/// Why a module could not be admitted.
#[derive(Debug, thiserror::Error)]
pub enum AdmitError {
    /// The module was refused.
    #[error(transparent)]
    Refused(#[from] crate::admission::AdmissionError),
    /// The task admitting it failed.
    #[error("admission failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Why a stored agent, or a module it needs, could not be brought back.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] crate::net::store::StoreError),
    /// The image is not one.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The module is not in the store.
    #[error("module {0} is not kept here")]
    NoModule(ModuleHash),
    /// The module was not admitted.
    #[error(transparent)]
    Admit(#[from] AdmitError),
    /// The agent could not be restored.
    #[error(transparent)]
    Agent(#[from] AgentError),
}

/// How a host is set up.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// Site name (the DNS name in the host's certificate).
    pub name: String,
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// Where the store and compiled modules live.
    pub data_dir: PathBuf,
    /// Peers known from the start: site name → address. Membership finds the others.
    pub peers: BTreeMap<String, SocketAddr>,
    /// Hosts to join the cluster through (`--join`).
    pub join: Vec<Seed>,
    /// The address peers reach this host at, when not the one it listens on (a wildcard).
    pub advertise: Option<SocketAddr>,
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
    /// Messages an agent's mailbox holds at most (at its home).
    pub mailbox: u64,
    /// Children an agent running here may have created in all.
    pub max_children: u64,
    /// Agents per core above which agents that allow it move to less loaded hosts at their
    /// checkpoints (0: never).
    pub balance_above: f64,
}

/// A host to join the cluster through: its address, and its name when given (`NAME@ADDR`;
/// otherwise the name is read from its certificate).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seed {
    /// Its name, if known.
    pub name: Option<String>,
    /// Its address.
    pub addr: SocketAddr,
}

impl std::str::FromStr for Seed {
    type Err = String;

    fn from_str(s: &str) -> Result<Seed, String> {
        let (name, addr) = match s.split_once('@') {
            Some((name, addr)) => {
                crate::net::certs::check_name(name).map_err(|e| e.to_string())?;
                (Some(name.to_string()), addr)
            }
            None => (None, s),
        };
        let addr = addr
            .parse()
            .map_err(|e| format!("`{s}`: expected ADDR or NAME@ADDR ({e})"))?;
        Ok(Seed { name, addr })
    }
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
pub enum HostError {
    /// The Wasm engine could not be made.
    #[error("cannot make the Wasm engine: {0}")]
    Engine(#[source] wasmtime::Error),
    /// The module cache could not be set up.
    #[error(transparent)]
    Modules(#[from] crate::modules::CacheError),
    /// The store could not be opened or read.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The certificates make no TLS configuration.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The UDP socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// What failed.
        source: std::io::Error,
    },
    /// The threads agents run on could not be started.
    #[error("cannot start the threads agents run on: {0}")]
    Threads(#[source] std::io::Error),
}

/// One running host.
pub struct Host {
    pub(in crate::net) config: HostConfig,
    pub(in crate::net) site: Arc<Site>,
    pub(in crate::net) modules: ModuleCache,
    pub(in crate::net) store: HostStore,
    pub(in crate::net) endpoint: quinn::Endpoint,
    pub(in crate::net) peers: Peers,
    /// Agents running here, and those parked asleep (only their alarm is in memory, their
    /// image is in the store).
    pub(in crate::net) residents: Residents,
    /// What each user has of this host.
    pub(in crate::net) quotas: Arc<Quotas>,
    /// Bytes of requests arriving, from everyone.
    pub(in crate::net) inflight: Arc<Budget>,
    /// One probe at a time: they measure the link, and would share it.
    pub(in crate::net) probing: tokio::sync::Semaphore,
    /// Modules being sent by launchers: each user sends each one once at a time.
    pub(in crate::net) uploads: Mutex<Uploads>,
    /// The threads agents run on, apart from those serving requests.
    pub(in crate::net) executor: AgentExecutor,
    /// Permits to restore parked agents that are due.
    pub(in crate::net) waking: tokio::sync::Semaphore,
    /// Transfers (agent, seq) this host accepted and has not decided yet, and how many: a
    /// source that restarted before its departure was durable offers the same hop again.
    pub(in crate::net) receiving: Mutex<HashMap<(AgentId, u64), usize>>,
    /// Agents launched here. No store write may be made while it is locked: a home record's
    /// write locks it inside the write transaction ([`Host::save_home`]).
    pub(in crate::net) homes: Mutex<HashMap<AgentId, HomeEntry>>,
    /// Pages of agents that left, for their return visits.
    pub(in crate::net) bases: Mutex<BaseCache>,
    /// (peer, module) pairs a peer said it holds: a small image is sent to it with the offer.
    /// Modules are stored durably, so the knowledge holds; a peer that lost one asks for it.
    pub(in crate::net) peer_modules: Mutex<std::collections::HashSet<(String, ModuleHash)>>,
    /// Cancelled when the host shuts down.
    pub(in crate::net) stopping: CancellationToken,
    /// The tasks that run agents, for shutdown to wait for.
    pub(in crate::net) agents: TaskTracker,
    /// Wakes the task that delivers stored reports to home hosts.
    pub(in crate::net) outbox: tokio::sync::Notify,
    /// Gives the memory of agents that left this host's memory back to the system.
    pub(in crate::net) trimmer: Arc<Trimmer>,
    /// The receive buffer of the last large arrival, for the next one.
    pub(in crate::net) spare: Arc<Spare>,
    /// The mailboxes of agents launched here.
    pub(in crate::net) post: PostOffice,
    /// The other hosts: which are up, how loaded, where agents asking for a place go.
    pub(in crate::net) membership: Membership,
    /// Every agent leaves at its next safe point and none is taken (`agent-host drain`).
    pub(in crate::net) draining: std::sync::atomic::AtomicBool,
    /// Agents that may still move away this second to balance the load.
    pub(in crate::net) moves_left: std::sync::atomic::AtomicU32,
    /// What operators' monitoring reads (`--metrics`).
    pub(in crate::net) metrics: Metrics,
}

/// How an agent task starts.
pub(in crate::net) enum Start {
    /// Poll it (a fresh launch, or its pending operation was completed).
    Poll,
    /// Handle its pending operation first (it was parked with one).
    Handle(Op),
    /// Handle its pending `recv` (it was parked waiting for a message), whose wait ends at
    /// `until_ms` (milliseconds since the Unix epoch).
    Waiting(Op, u64),
    /// Start an agent that arrived but whose commit is still being made (`true` once it
    /// is durable, `false` or dropped if it never will be): poll it, or perform its
    /// operation when it was moved before that took effect.
    Arrived(tokio::sync::oneshot::Receiver<bool>, Option<Op>),
}

impl Host {
    /// The host's metrics as Prometheus text, its agents counted now.
    pub fn metrics_text(&self) -> String {
        let (running, parked) = (self.residents.running(), self.residents.parked());
        self.metrics.agents(running, parked);
        self.metrics.text()
    }

    /// Opens the store, binds the endpoint and resumes agents that live here.
    ///
    /// # Errors
    /// When the store, certificates or socket cannot be set up.
    pub async fn start(
        config: HostConfig,
        creds: Credentials,
        site: Site,
    ) -> Result<Arc<Host>, HostError> {
        let engine = crate::engine::new_engine().map_err(HostError::Engine)?;
        let modules = ModuleCache::new(&engine, Some(config.data_dir.join("compiled")))?;
        let store = HostStore::open(&config.data_dir)?;
        let endpoint = endpoint(&config, &creds)?;
        let homes: HashMap<AgentId, HomeEntry> = store
            .homes()?
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
        let post = PostOffice::load(store.mailboxes()?);
        let bases = Mutex::new(BaseCache::new(config.return_cache));
        let peers = Peers::new(endpoint.clone(), config.peers.clone());
        let quotas = Quotas::new(config.user_limits.clone());
        let inflight = Budget::new("this host", config.max_inflight);
        let me = HostId {
            name: config.name.as_str().into(),
            addr: advertised(&config, &endpoint),
            start: crate::net::messages::unix_us() / 1000,
        };
        let membership = Membership::new(me, gossip::facts(site.services()));
        let metrics = Metrics::new(store.commit_durations());
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
            executor: AgentExecutor::new().map_err(HostError::Threads)?,
            waking: tokio::sync::Semaphore::new(WAKING_AT_ONCE),
            receiving: Mutex::default(),
            peer_modules: Mutex::default(),
            homes: Mutex::new(homes),
            stopping: CancellationToken::new(),
            agents: TaskTracker::new(),
            outbox: tokio::sync::Notify::new(),
            trimmer: Trimmer::start(),
            spare: Arc::new(Spare::new(WORTH_PREPARING as usize)),
            post,
            membership,
            metrics,
            draining: Default::default(),
            moves_left: Default::default(),
        });
        for agent in held {
            host.release_held_later(agent);
        }
        // Residents first: a home wakes the agents parked here waiting for a message that
        // came, and must find them parked.
        host.resume_residents().await;
        host.reopen_mailboxes().await;
        tokio::spawn(host.clone().accept_loop());
        tokio::spawn(host.clone().deliver_reports());
        tokio::spawn(host.clone().sync_lazily());
        tokio::spawn(host.clone().run_membership());
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
        self.stopping.cancel();
        // Parked agents stay stored; the next start sets their alarms again.
        self.residents.stop_alarms();
        for flags in self.residents.running_flags() {
            flags.checkpoint.store(true, Ordering::SeqCst);
        }
        // Every agent task ends, and every place held for a launch or an arrival is given up.
        self.agents.close();
        let settled = async {
            self.agents.wait().await;
            self.residents.until_running(|running| running == 0).await;
        };
        let _ = tokio::time::timeout(grace, settled).await;
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

    pub(in crate::net) fn image_limits(&self) -> ImageLimits {
        ImageLimits {
            max_memory: self.config.limits.max_memory,
            ..ImageLimits::default()
        }
    }

    /// An admitted module by hash, admitting it from the store if needed.
    pub(in crate::net) async fn module(
        self: &Arc<Self>,
        hash: &ModuleHash,
    ) -> Result<Arc<AgentModule>, RestoreError> {
        if let Some(m) = self.modules.get(hash) {
            return Ok(m);
        }
        let bytes = (self.store.module(hash)).ok_or(RestoreError::NoModule(*hash))?;
        Ok(self.admit(bytes).await?)
    }

    /// Admits (and compiles) a module off the async workers: compiling can take seconds,
    /// and the QUIC connections (keep-alives, acknowledgements) must keep being served.
    pub(in crate::net) async fn admit(
        self: &Arc<Self>,
        wasm: Vec<u8>,
    ) -> Result<Arc<AgentModule>, AdmitError> {
        let host = self.clone();
        Ok(tokio::task::spawn_blocking(move || host.modules.admit(&wasm)).await??)
    }

    pub(in crate::net) fn spawn_agent(self: &Arc<Self>, agent: AgentInstance, start: Start) {
        if !matches!(start, Start::Arrived(..)) {
            let context = agent.context();
            self.enroll(context.agent_id, &context.owner, agent.flags());
        }
        let drive = self.agents.track_future(self.clone().drive(agent, start));
        if self.executor.spawn(drive).is_none() {
            tracing::error!("no threads to run agents on");
        }
    }

    /// Whether the host is shutting down.
    pub(in crate::net) fn stopping(&self) -> bool {
        self.stopping.is_cancelled()
    }

    /// Waits until fewer agents run here than the host's most, or it shuts down.
    pub(in crate::net) async fn room_to_run(&self) {
        let most = self.config.max_agents;
        tokio::select! {
            () = self.residents.until_running(|running| running < most) => {}
            () = self.stopping.cancelled() => {}
        }
    }

    /// Makes a running agent known: to kill, to shutdown and to the count of agents. An
    /// arrival is enrolled once it is committed (two uncommitted arrivals of one agent may
    /// meet, when its source restarted and offered the hop again).
    pub(in crate::net) fn enroll(&self, id: AgentId, owner: &str, flags: Arc<AgentFlags>) {
        if self.stopping() {
            flags.checkpoint.store(true, Ordering::SeqCst);
        }
        self.residents.enroll(id, owner, flags);
    }

    pub(in crate::net) fn forget_running(&self, id: &AgentId) {
        self.residents.forget(id);
        self.trimmer.freed();
    }

    pub(in crate::net) async fn restore_stored(
        self: &Arc<Self>,
        image: &str,
    ) -> Result<AgentInstance, RestoreError> {
        let bytes = self.store.image(image)?;
        let image = AgentImage::decode(bytes, &DecodeOptions::new(self.image_limits()))?.image;
        let module = self.module(&image.module).await?;
        let limits = &self.config.limits;
        Ok(AgentInstance::restore(module, self.site.clone(), image, limits).await?)
    }
}

/// The host's QUIC endpoint: it serves with `creds` and dials its peers with them.
fn endpoint(config: &HostConfig, creds: &Credentials) -> Result<quinn::Endpoint, HostError> {
    let gso = config.segmentation_offload;
    let server = tls::server_config(creds, gso)?;
    let addr = config.listen;
    let listen = |source| HostError::Listen { addr, source };
    let socket = crate::net::socket::bind(addr).map_err(listen)?;
    let runtime = Arc::new(quinn::TokioRuntime);
    let config_ = quinn::EndpointConfig::default();
    let mut endpoint =
        quinn::Endpoint::new(config_, Some(server), socket, runtime).map_err(listen)?;
    endpoint.set_default_client_config(tls::client_config(creds, gso)?);
    Ok(endpoint)
}

/// Where peers reach this host: `advertise` when set, else the address it listens on (a
/// wildcard one is replaced by the address each peer sees it connect from).
fn advertised(config: &HostConfig, endpoint: &quinn::Endpoint) -> SocketAddr {
    let listening = endpoint.local_addr().unwrap_or(config.listen);
    config.advertise.unwrap_or(listening)
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
