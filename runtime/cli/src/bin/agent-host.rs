//! `agent-host`: the operator's command: run a host, make certificates.

use agent_runtime::net::certs::{self, Role, Validity};
use agent_runtime::net::client::{Client, HostAddr};
use agent_runtime::net::host::{DEFAULT_BALANCE_ABOVE, DEFAULT_MAX_CHILDREN};
use agent_runtime::net::host::{Host, HostConfig, Seed};
use agent_runtime::net::mailbox::DEFAULT_MAILBOX;
use agent_runtime::net::messages::{DrainStatus, Reply, Request};
use agent_runtime::net::quota::UserLimits;
use agent_runtime::net::tls::Credentials;
use agent_runtime::{Corpus, Limits, Site};
use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// jemalloc rather than glibc's allocator: a host allocates and frees on many threads at
/// once, and side by side it made hops per second 6–14% higher and a parked agent cost less
/// memory (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Run a WebAssembly mobile-agent host, and make the certificates hosts and users need.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run a host. With no options at all: a local development host named `localhost` on
    /// 127.0.0.1:4433, with development certificates generated in ./agent-host-data/certs.
    Serve(Box<ServeArgs>),
    /// Drain a running host: every agent on it leaves at its next safe point for the least
    /// loaded host that is up (parked ones too, sleeping the rest of their sleep there),
    /// launches and arriving agents are refused, and the host stops once none is left.
    /// Takes the host's own settings (its --config, or --name, --listen and --certs) and
    /// speaks to it with its own certificate; prints what is left until it is empty. The host
    /// stays the home of the agents launched on it: their reports wait for it to return.
    Drain(Box<ServeArgs>),
    /// Create a private CA and issue host and user certificates.
    #[command(subcommand)]
    Certs(CertsCommand),
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create a private CA in DIR (ca.crt, ca.key with mode 0600).
    Init {
        /// Directory for the CA.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Issue a host or user certificate signed by the CA in DIR.
    Issue {
        /// Directory holding the CA; the certificate is written there too unless --out.
        #[arg(long)]
        dir: PathBuf,
        /// Issue a host certificate for this site name.
        #[arg(long, conflicts_with = "user", required_unless_present = "user")]
        host: Option<String>,
        /// Issue a user certificate for this user name.
        #[arg(long)]
        user: Option<String>,
        /// Where to write the certificate and key.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Days of validity.
        #[arg(long, default_value_t = 825)]
        days: i64,
    },
}

#[derive(clap::Args, Default)]
struct ServeArgs {
    /// TOML file with any of the options below (command-line options win).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Site name; must match the DNS name in the host certificate.
    #[arg(long)]
    name: Option<String>,
    /// UDP address to listen on.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Directory for the store and compiled modules.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Directory with ca.crt and host-NAME.crt/.key.
    #[arg(long)]
    certs: Option<PathBuf>,
    /// A peer host known from the start, repeatable. Membership finds the others.
    #[arg(long = "peer", value_name = "NAME=ADDR", value_parser = parse_peer)]
    peers: Vec<(String, SocketAddr)>,
    /// A host to join the cluster through, repeatable: its address (its name is read from
    /// its certificate) or NAME@ADDR. The hosts it knows, and those they know, become
    /// peers; `agent hosts` lists them.
    #[arg(long = "join", value_name = "ADDR|NAME@ADDR")]
    join: Vec<Seed>,
    /// The address peers reach this host at, when it is not the one it listens on (say,
    /// listening on 0.0.0.0). By default peers use the address they see it connect from.
    #[arg(long)]
    advertise: Option<SocketAddr>,
    /// Directory of documents this site's corpus service searches.
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// Serve Prometheus metrics on http://ADDR/metrics (off by default; use a loopback or
    /// private address: the page has no authentication).
    #[arg(long, value_name = "ADDR")]
    metrics: Option<SocketAddr>,
    /// Most memory per agent, in MiB (default 256).
    #[arg(long)]
    max_memory_mib: Option<u64>,
    /// CPU time each agent may use in its whole life, on all hosts together, in seconds
    /// (default 60).
    #[arg(long)]
    cpu_budget_secs: Option<u64>,
    /// Most agents running at once (default 1000). Launches and arriving hops over it are
    /// refused; parked agents due to wake wait for room.
    #[arg(long)]
    max_agents: Option<usize>,
    /// Most agents one user may run here at once (default three quarters of --max-agents).
    #[arg(long)]
    user_max_agents: Option<usize>,
    /// Most agents one user may have parked asleep here (default 10000); past it, the
    /// user's sleeping agents wait in memory and count as running.
    #[arg(long)]
    user_max_parked: Option<usize>,
    /// Launches per second one user may make here, on average (default 100; as many may
    /// come at once).
    #[arg(long)]
    user_launches_per_sec: Option<f64>,
    /// Connections one user may have open to this host at once (default 32).
    #[arg(long)]
    user_connections: Option<usize>,
    /// MiB of requests that may be arriving at once from one user (default 72: a module
    /// of the largest size and two messages).
    #[arg(long)]
    user_inflight_mib: Option<u64>,
    /// MiB of messages the mailboxes of one user's agents launched here may hold together
    /// (default 256); past it, messages to them are refused until they take some.
    #[arg(long)]
    user_mail_mib: Option<u64>,
    /// MiB of requests and images that may be arriving at once from everyone (default
    /// 1536: the largest image and half a GiB more).
    #[arg(long)]
    max_inflight_mib: Option<u64>,
    /// Send UDP datagrams one by one, not in GSO batches: needed when a peer is a big-endian
    /// host under qemu-user.
    #[arg(long)]
    no_segmentation_offload: bool,
    /// Memory for the pages of agents that left, in MiB (default 256): an agent that comes
    /// back sends only the pages that changed. 0 keeps none.
    #[arg(long)]
    return_cache_mib: Option<u64>,
    /// Messages an agent's mailbox holds at most, at its home (default 1024): a message to a
    /// full mailbox is refused with an error saying so, and the sender tries again later.
    #[arg(long)]
    mailbox: Option<u64>,
    /// Children an agent running here may create in all with `ctx.clone_to` (default 64);
    /// past it, the clone fails in the agent with an error saying so.
    #[arg(long)]
    max_children: Option<u64>,
    /// Live agents one user may have launched from this host, clones included, wherever they
    /// run (default 4 × max_agents); past it, a clone fails in the agent with an error.
    #[arg(long)]
    user_live_agents: Option<usize>,
    /// Agents per core above which this host moves agents that allow it
    /// (`ctx.allow_moves(true)`) to less loaded hosts at their checkpoints (default 2; 0
    /// never moves them).
    #[arg(long)]
    balance_above: Option<f64>,
}

/// The TOML configuration file.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    name: Option<String>,
    listen: Option<SocketAddr>,
    data_dir: Option<PathBuf>,
    certs: Option<PathBuf>,
    #[serde(default)]
    peers: BTreeMap<String, SocketAddr>,
    #[serde(default)]
    join: Vec<String>,
    advertise: Option<SocketAddr>,
    corpus: Option<PathBuf>,
    metrics: Option<SocketAddr>,
    max_memory_mib: Option<u64>,
    cpu_budget_secs: Option<u64>,
    max_agents: Option<usize>,
    user_max_agents: Option<usize>,
    user_max_parked: Option<usize>,
    user_launches_per_sec: Option<f64>,
    user_connections: Option<usize>,
    user_inflight_mib: Option<u64>,
    user_mail_mib: Option<u64>,
    max_inflight_mib: Option<u64>,
    segmentation_offload: Option<bool>,
    return_cache_mib: Option<u64>,
    mailbox: Option<u64>,
    max_children: Option<u64>,
    user_live_agents: Option<usize>,
    balance_above: Option<f64>,
}

/// `n` MiB in bytes, or an error naming the setting when that does not fit.
fn mib(n: u64, setting: &str) -> anyhow::Result<u64> {
    n.checked_mul(1 << 20)
        .ok_or_else(|| anyhow::anyhow!("{setting} = {n} is too large"))
}

fn parse_peer(s: &str) -> Result<(String, SocketAddr), String> {
    let (name, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=ADDR, got `{s}`"))?;
    certs::check_name(name).map_err(|e| e.to_string())?;
    Ok((
        name.to_string(),
        addr.parse()
            .map_err(|e| format!("bad address `{addr}`: {e}"))?,
    ))
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a terminal, not in a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    // Crash points for the fault-injection tests; nothing in normal builds.
    let _faults = agent_runtime::faults::setup();
    let cli = Cli::parse();
    let result = match cli.command.unwrap_or(Command::Serve(Box::default())) {
        Command::Serve(args) => serve(*args),
        Command::Drain(args) => drain(*args),
        Command::Certs(cmd) => certs_command(cmd),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn certs_command(cmd: CertsCommand) -> anyhow::Result<()> {
    match cmd {
        CertsCommand::Init { dir } => {
            let files = certs::init_ca(&dir)?;
            println!(
                "created CA {} (key {}, keep it private)",
                files.cert.display(),
                files.key.display()
            );
        }
        CertsCommand::Issue {
            dir,
            host,
            user,
            out,
            days,
        } => {
            let (role, name) = match (host, user) {
                (Some(h), _) => (Role::Host, h),
                (None, Some(u)) => (Role::User, u),
                (None, None) => bail!("give --host NAME or --user NAME"),
            };
            let validity = Validity {
                until: time::Duration::days(days),
                ..Validity::default()
            };
            let files = certs::issue(&dir, out.as_deref().unwrap_or(&dir), role, &name, validity)?;
            println!(
                "issued {role} certificate {} (key {})",
                files.cert.display(),
                files.key.display()
            );
        }
    }
    Ok(())
}

impl FileConfig {
    /// These settings with the command line's options laid over them: options win.
    fn overridden_by(self, args: ServeArgs) -> FileConfig {
        let mut peers = self.peers;
        peers.extend(args.peers);
        let mut join = self.join;
        join.extend(args.join.iter().map(|seed| match &seed.name {
            Some(name) => format!("{name}@{}", seed.addr),
            None => seed.addr.to_string(),
        }));
        FileConfig {
            join,
            advertise: args.advertise.or(self.advertise),
            name: args.name.or(self.name),
            listen: args.listen.or(self.listen),
            data_dir: args.data_dir.or(self.data_dir),
            certs: args.certs.or(self.certs),
            peers,
            corpus: args.corpus.or(self.corpus),
            metrics: args.metrics.or(self.metrics),
            max_memory_mib: args.max_memory_mib.or(self.max_memory_mib),
            cpu_budget_secs: args.cpu_budget_secs.or(self.cpu_budget_secs),
            max_agents: args.max_agents.or(self.max_agents),
            user_max_agents: args.user_max_agents.or(self.user_max_agents),
            user_max_parked: args.user_max_parked.or(self.user_max_parked),
            user_launches_per_sec: args.user_launches_per_sec.or(self.user_launches_per_sec),
            user_connections: args.user_connections.or(self.user_connections),
            user_inflight_mib: args.user_inflight_mib.or(self.user_inflight_mib),
            user_mail_mib: args.user_mail_mib.or(self.user_mail_mib),
            max_inflight_mib: args.max_inflight_mib.or(self.max_inflight_mib),
            segmentation_offload: match args.no_segmentation_offload {
                true => Some(false),
                false => self.segmentation_offload,
            },
            return_cache_mib: args.return_cache_mib.or(self.return_cache_mib),
            mailbox: args.mailbox.or(self.mailbox),
            max_children: args.max_children.or(self.max_children),
            user_live_agents: args.user_live_agents.or(self.user_live_agents),
            balance_above: args.balance_above.or(self.balance_above),
        }
    }
}

/// A host's settings: its file's, with the command line's laid over them; its name, data
/// directory and certificate directory (defaults filled in).
fn settings(args: ServeArgs) -> anyhow::Result<(FileConfig, String, PathBuf, PathBuf)> {
    let file: FileConfig = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("bad config {}", path.display()))?
        }
        None => FileConfig::default(),
    };
    let settings = file.overridden_by(args);
    let name = (settings.name.clone()).unwrap_or_else(|| "localhost".into());
    certs::check_name(&name)?;
    let data_dir = (settings.data_dir.clone()).unwrap_or_else(|| PathBuf::from("agent-host-data"));
    let certs_dir = (settings.certs.clone()).unwrap_or_else(|| data_dir.join("certs"));
    Ok((settings, name, data_dir, certs_dir))
}

/// The host's own credentials.
fn host_credentials(name: &str, certs_dir: &Path) -> anyhow::Result<Credentials> {
    let ca = certs::ca_files(certs_dir).cert;
    let own = certs::files(certs_dir, Role::Host, name);
    // Say which file is missing, and how it is made.
    if !ca.exists() {
        bail!(
            "{} is missing: copy the CA's certificate (ca.crt, not its key) there",
            ca.display()
        );
    }
    for file in [&own.cert, &own.key] {
        if !file.exists() {
            bail!(
                "no host certificate for {name}: {} is missing (make it with `agent-host certs \
                 issue --dir CA_DIR --host {name} --out {}`)",
                file.display(),
                certs_dir.display()
            );
        }
    }
    Credentials::load(&ca, &own).with_context(|| {
        format!(
            "cannot load the certificates of {name} in {}",
            certs_dir.display()
        )
    })
}

fn drain(args: ServeArgs) -> anyhow::Result<()> {
    let (settings, name, _, certs_dir) = settings(args)?;
    let creds = host_credentials(&name, &certs_dir)?;
    let mut addr = (settings.listen).unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 4433)));
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let host = HostAddr {
        name: name.clone(),
        addr,
    };
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        let client = Client::connect(&host, &creds).await.map_err(anyhow::Error::msg)?;
        let mut last = None;
        loop {
            let left = client.request::<Reply<DrainStatus>>(&Request::Drain).await;
            let left = match left {
                Ok(reply) => reply.map_err(anyhow::Error::msg)?,
                // It stopped between two questions, once empty.
                Err(e) if last.is_some() && e.to_string().contains("shutting down") => break,
                Err(e) => bail!("lost {name} while it drained: {e} (see its log; a restart resumes the agents left and `drain` goes on)"),
            };
            if last != Some(left) {
                eprintln!(
                    "{name}: {} agents running, {} parked, {} in departures being settled",
                    left.running, left.parked, left.settling
                );
            }
            if left.is_empty() {
                break;
            }
            last = Some(left);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        eprintln!("{name} is drained and stops");
        anyhow::Ok(())
    })
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let dev = args.config.is_none()
        && args.name.is_none()
        && args.certs.is_none()
        && args.data_dir.is_none();
    let (settings, name, data_dir, certs_dir) = settings(args)?;
    if dev && !certs::ca_files(&certs_dir).cert.exists() {
        make_dev_certs(&certs_dir, &name)?;
    }
    let creds = host_credentials(&name, &certs_dir)?;
    let corpus = match &settings.corpus {
        Some(dir) => Corpus::load(dir)
            .with_context(|| format!("cannot load the corpus {}", dir.display()))?,
        None => Corpus::empty(),
    };
    let documents = corpus.len();
    let metrics = settings.metrics;
    let config = host_config(settings, name.clone(), data_dir)?;
    let site = Site::new(&name, corpus);
    run_host(
        config,
        creds,
        (site, documents),
        (dev.then_some(&certs_dir), metrics),
    )
}

/// The host's configuration from its settings, with the defaults for what they leave out.
fn host_config(s: FileConfig, name: String, data_dir: PathBuf) -> anyhow::Result<HostConfig> {
    let limits = Limits {
        max_memory: mib(s.max_memory_mib.unwrap_or(256), "max_memory_mib")?,
        cpu_budget: match s.cpu_budget_secs {
            Some(secs) => std::time::Duration::from_secs(secs),
            None => Limits::default().cpu_budget,
        },
        ..Limits::default()
    };
    let max_agents = s.max_agents.unwrap_or(1000);
    let (max_image, max_module) = (1 << 30, 64 << 20);
    let user_limits = user_limits(&s, UserLimits::for_host(max_agents, max_module))?;
    Ok(HostConfig {
        name,
        listen: (s.listen).unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 4433))),
        data_dir,
        limits,
        max_agents,
        max_image,
        max_module,
        max_inflight: match s.max_inflight_mib {
            Some(n) => mib(n, "max_inflight_mib")?,
            None => max_image + (512 << 20),
        },
        user_limits,
        segmentation_offload: s.segmentation_offload.unwrap_or(true),
        return_cache: mib(s.return_cache_mib.unwrap_or(256), "return_cache_mib")?,
        mailbox: match s.mailbox.unwrap_or(DEFAULT_MAILBOX) {
            0 => anyhow::bail!("mailbox = 0 would refuse every message; give 1 or more"),
            n => n,
        },
        max_children: s.max_children.unwrap_or(DEFAULT_MAX_CHILDREN),
        balance_above: match s.balance_above.unwrap_or(DEFAULT_BALANCE_ABOVE) {
            n if n.is_finite() && n >= 0.0 => n,
            n => anyhow::bail!("balance_above = {n}: give a number of agents per core, 0 or more"),
        },
        join: (s.join.iter())
            .map(|j| j.parse::<Seed>().map_err(|e| anyhow::anyhow!("join: {e}")))
            .collect::<anyhow::Result<_>>()?,
        advertise: s.advertise,
        peers: s.peers,
    })
}

/// What one user may use of the host: the settings, or else `defaults`.
fn user_limits(s: &FileConfig, defaults: UserLimits) -> anyhow::Result<UserLimits> {
    let limits = UserLimits {
        connections: s.user_connections.unwrap_or(defaults.connections),
        inflight: match s.user_inflight_mib {
            Some(n) => mib(n, "user_inflight_mib")?,
            None => defaults.inflight,
        },
        running: s.user_max_agents.unwrap_or(defaults.running),
        parked: s.user_max_parked.unwrap_or(defaults.parked),
        launches_per_sec: s.user_launches_per_sec.unwrap_or(defaults.launches_per_sec),
        mail: match s.user_mail_mib {
            Some(n) => mib(n, "user_mail_mib")?,
            None => defaults.mail,
        },
        agents: s.user_live_agents.unwrap_or(defaults.agents),
    };
    if limits.launches_per_sec.is_nan() || limits.launches_per_sec <= 0.0 {
        bail!("user_launches_per_sec must be above 0");
    }
    Ok(limits)
}

/// Runs the host until a signal stops it. A development host (`dev_certs`) also says how to
/// connect to it.
fn run_host(
    config: HostConfig,
    creds: Credentials,
    (site, documents): (Site, usize),
    (dev_certs, metrics): (Option<&Path>, Option<SocketAddr>),
) -> anyhow::Result<()> {
    let (name, listen) = (config.name.clone(), config.listen);
    // Without its background threads jemalloc gives freed pages back only when the thread
    // that freed them allocates again: a host whose load moved elsewhere kept them.
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::warn!("the allocator keeps freed memory until it is used again: {e}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        // Its message names the cause already: as a chain `{:#}` would print it twice.
        // Bound before the host starts: an address that cannot be served stops nothing.
        let metrics = match metrics {
            Some(at) => Some(
                (tokio::net::TcpListener::bind(at).await)
                    .with_context(|| format!("cannot serve metrics on {at}"))?,
            ),
            None => None,
        };
        let started = Host::start(config, creds, site).await;
        let host = started.map_err(anyhow::Error::msg)?;
        let addr = host.local_addr().unwrap_or(listen);
        tracing::info!(site = %name, %addr, arch = std::env::consts::ARCH, documents, "host ready");
        println!("host {name} listening on {addr} ({documents} documents)");
        if let Some(certs_dir) = dev_certs {
            println!(
                "connect with: agent launch AGENT.wasm --hop {name} --host {name}@{addr} --certs {}",
                certs_dir.display()
            );
        }
        if let Some(listener) = metrics {
            if let Ok(at) = listener.local_addr() {
                tracing::info!("metrics on http://{at}/metrics");
            }
            let host = host.clone();
            tokio::spawn(async move {
                if let Err(e) = agent_runtime::net::admin::serve(host, listener).await {
                    tracing::warn!("metrics no longer served: {e}");
                }
            });
        }
        tokio::spawn(log_memory(host.clone()));
        tokio::select! {
            () = wait_for_signal() => {
                tracing::info!("shutting down: parking agents at their next safe point");
            }
            () = host.drained() => tracing::info!("drained: no agent is left; stopping"),
        }
        host.shutdown(Duration::from_secs(10)).await;
        anyhow::Ok(())
    })
}

fn make_dev_certs(dir: &Path, name: &str) -> anyhow::Result<()> {
    certs::init_ca(dir)?;
    certs::issue(dir, dir, Role::Host, name, Validity::default())?;
    let user = std::env::var("USER")
        .ok()
        .filter(|u| certs::check_name(u).is_ok())
        .unwrap_or_else(|| "dev".into());
    certs::issue(dir, dir, Role::User, &user, Validity::default())?;
    println!(
        "generated development certificates in {} (CA, host {name}, user {user})",
        dir.display()
    );
    Ok(())
}

/// How often a host logs what holds its memory.
const MEMORY_LOG_EVERY: Duration = Duration::from_secs(60);

/// Logs, every [`MEMORY_LOG_EVERY`], the process's resident memory beside what the allocator
/// holds and what the host keeps: the rest is agents' linear memories and fiber stacks
/// (mapped by wasmtime, not allocated) and code.
async fn log_memory(host: std::sync::Arc<Host>) {
    use tikv_jemalloc_ctl::{epoch, stats};
    let mib = |bytes: usize| bytes >> 20;
    loop {
        tokio::time::sleep(MEMORY_LOG_EVERY).await;
        let held = host.memory();
        let _ = epoch::advance();
        let rss_kib = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                let line = s.lines().find(|l| l.starts_with("VmRSS:"))?.to_owned();
                line.split_whitespace().nth(1)?.parse::<usize>().ok()
            })
            .unwrap_or(0);
        tracing::info!(
            rss_mib = rss_kib >> 10,
            allocated_mib = stats::allocated::read().map_or(0, mib),
            allocator_resident_mib = stats::resident::read().map_or(0, mib),
            running = held.running,
            parked = held.parked,
            homes = held.homes,
            return_cache_mib = held.return_cache >> 20,
            kept = held.kept,
            kept_mib = held.kept_bytes >> 20,
            inflight_mib = held.inflight >> 20,
            "memory"
        );
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return ctrl_c.await.unwrap_or(()),
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
