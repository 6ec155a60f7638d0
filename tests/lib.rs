//! Helpers for the end-to-end tests: real agents built from `examples/`, the real `agent`
//! binary, and runners over real corpora.

// These helpers run inside tests, where an unexpected error is a failing test; clippy's
// allowance for tests does not reach a library crate.
#![allow(clippy::unwrap_used)]

pub mod relay;

use agent_runtime::engine::new_engine;
use agent_runtime::runner::{Launch, LocalRunner, Migration, RunReport};
use agent_runtime::{Corpus, Limits, ModuleCache, Site};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The repository's root directory.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new(".."))
        .to_path_buf()
}

/// Builds every example agent once per test process and returns the module `name`.
pub fn example(name: &str) -> Vec<u8> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let manifest = repo().join("examples/Cargo.toml");
        let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args([
                "build",
                "--release",
                "--workspace",
                "--target",
                agent_runtime::builder::TARGET,
                "--manifest-path",
            ])
            .arg(&manifest)
            .status()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        if !status.success() {
            return Err(format!("building the examples failed: {status}"));
        }
        Ok(repo()
            .join("examples/target")
            .join(agent_runtime::builder::TARGET)
            .join("release"))
    });
    let dir = dir.as_ref().unwrap();
    let path = dir.join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// Builds the example agent `name` (once per process) and returns the path of its module.
pub fn example_path(name: &str) -> String {
    example(name);
    repo()
        .join("examples/target")
        .join(agent_runtime::builder::TARGET)
        .join("release")
        .join(format!("{name}.wasm"))
        .display()
        .to_string()
}

/// The JSON a CLI command printed on stdout; panics with both streams when there is none.
pub fn json(out: &std::process::Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON ({e}) in:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// Waits for a child process to exit, killing it after `within`; its output.
pub fn finish(mut child: std::process::Child, within: std::time::Duration) -> std::process::Output {
    let deadline = std::time::Instant::now() + within;
    while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    child.wait_with_output().unwrap()
}

/// The site names in a JSON list such as the search agent's `visited` or `skipped`
/// (`"siteB: why"` entries count as `siteB`).
pub fn site_names(value: &serde_json::Value) -> Vec<String> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str())
        .map(|s| s.split(':').next().unwrap_or(s).to_string())
        .collect()
}

/// The `agent` binary built by `cargo test --workspace` beside this test.
pub fn agent_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("AGENT_BIN") {
        return bin.into();
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("."));
    let bin = dir.join("agent");
    assert!(
        bin.is_file(),
        "{} is missing: run the tests with `cargo test --workspace`",
        bin.display()
    );
    bin
}

/// The three sites of the search example, with their corpora.
pub fn search_sites() -> Vec<Site> {
    ["siteA", "siteB", "siteC"]
        .iter()
        .map(|name| {
            let dir = repo().join("examples/search/sites").join(name);
            Site::new(name, Corpus::load(&dir).unwrap())
        })
        .collect()
}

/// A runner over the search sites with the given limits and no disk cache.
pub fn runner(limits: Limits) -> LocalRunner {
    let engine = new_engine().unwrap();
    let modules = ModuleCache::new(&engine, None).unwrap();
    LocalRunner::new(modules, search_sites(), limits)
}

/// A launch with this itinerary and these `key=value` arguments.
pub fn launch(itinerary: &[&str], args: &[(&str, &str)]) -> Launch {
    Launch {
        itinerary: itinerary.iter().map(|s| s.to_string()).collect(),
        args: args
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        owner: "test".into(),
    }
}

/// Runs a future to its end on a fresh current-thread tokio runtime.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// Runs an agent to its end on a fresh current-thread tokio runtime.
pub fn run(runner: &LocalRunner, wasm: &[u8], launch: Launch, migration: Migration) -> RunReport {
    block_on(runner.run(wasm, launch, migration, &mut |_| {})).unwrap()
}

/// The `agent-host` binary beside [`agent_bin`].
pub fn agent_host_bin() -> PathBuf {
    let bin = agent_bin().with_file_name("agent-host");
    assert!(
        bin.is_file(),
        "{} is missing: run the tests with `cargo test --workspace`",
        bin.display()
    );
    bin
}

/// Real `agent-host` processes on loopback with certificates from a fresh private CA.
pub struct Cluster {
    /// Holds certificates, data directories and logs.
    pub dir: tempfile::TempDir,
    /// Site name → address.
    pub addrs: BTreeMap<String, std::net::SocketAddr>,
    hosts: Vec<(String, std::process::Child)>,
    /// (from, to) → the address `from` uses for peer `to`, when not `to`'s own (a relay).
    routes: BTreeMap<(String, String), std::net::SocketAddr>,
    /// Whether each host is given every other as a `--peer` (else hosts find each other
    /// by membership, from their `--join` flags).
    static_peers: bool,
}

impl Cluster {
    /// Certificates for `sites` and users `alice` and `bob`; then starts the sites in `up`
    /// (each knows all of `sites` as peers), with the extra `serve` flags given per site.
    pub fn start(sites: &[&str], up: &[(&str, &[&str])]) -> Cluster {
        Cluster::start_peered(sites, up, true)
    }

    /// Like [`Cluster::start`], but no host is given its peers: each finds them through
    /// the `--join` flags in its extra flags.
    pub fn start_joining(sites: &[&str], up: &[(&str, &[&str])]) -> Cluster {
        Cluster::start_peered(sites, up, false)
    }

    fn start_peered(sites: &[&str], up: &[(&str, &[&str])], static_peers: bool) -> Cluster {
        use agent_runtime::net::certs::{self, Role, Validity};
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        certs::init_ca(&certs).unwrap();
        for site in sites {
            certs::issue(&certs, &certs, Role::Host, site, Validity::default()).unwrap();
        }
        for user in ["alice", "bob"] {
            certs::issue(&certs, &certs, Role::User, user, Validity::default()).unwrap();
        }
        let addrs: BTreeMap<String, std::net::SocketAddr> = sites
            .iter()
            .map(|s| {
                let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
                (s.to_string(), socket.local_addr().unwrap())
            })
            .collect();
        let mut cluster = Cluster {
            dir,
            addrs,
            hosts: Vec::new(),
            routes: BTreeMap::new(),
            static_peers,
        };
        for (site, extra) in up {
            cluster.spawn(site, extra);
        }
        for (site, _) in up {
            cluster.wait_ready(site);
        }
        cluster
    }

    /// The certificate directory.
    pub fn certs(&self) -> PathBuf {
        self.dir.path().join("certs")
    }

    fn spawn(&mut self, site: &str, extra: &[&str]) {
        self.spawn_with(site, extra, &[]);
    }

    fn spawn_with(&mut self, site: &str, extra: &[&str], env: &[(&str, &str)]) {
        let log = std::fs::File::create(self.dir.path().join(format!("{site}.log"))).unwrap();
        let mut cmd = Command::new(agent_host_bin());
        cmd.args([
            "serve",
            "--name",
            site,
            "--listen",
            &self.addrs[site].to_string(),
        ])
        .arg("--data-dir")
        .arg(self.dir.path().join(site))
        .arg("--certs")
        .arg(self.certs())
        .args(extra);
        let corpus = repo().join("examples/search/sites").join(site);
        if corpus.is_dir() {
            cmd.arg("--corpus").arg(corpus);
        }
        let peers = self.addrs.iter().filter(|_| self.static_peers);
        for (peer, addr) in peers.filter(|(p, _)| p.as_str() != site) {
            let addr = self
                .routes
                .get(&(site.to_string(), peer.clone()))
                .unwrap_or(addr);
            cmd.arg("--peer").arg(format!("{peer}={addr}"));
        }
        cmd.envs(env.iter().copied());
        let child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.hosts.push((site.to_string(), child));
    }

    /// `agent` CLI arguments that connect to `site` as `user`.
    pub fn conn_args(&self, site: &str, user: &str) -> Vec<String> {
        vec![
            "--host".into(),
            format!("{site}@{}", self.addrs[site]),
            "--certs".into(),
            self.certs().display().to_string(),
            "--user".into(),
            user.into(),
        ]
    }

    /// Runs the `agent` CLI with `args` followed by the connection to `site` as `user`.
    pub fn agent(&self, args: &[&str], site: &str, user: &str) -> std::process::Output {
        Command::new(agent_bin())
            .args(args)
            .args(self.conn_args(site, user))
            .output()
            .unwrap()
    }

    /// Starts the `agent` CLI like [`Cluster::agent`] without waiting for it.
    pub fn spawn_agent(&self, args: &[&str], site: &str, user: &str) -> std::process::Child {
        Command::new(agent_bin())
            .args(args)
            .args(self.conn_args(site, user))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn wait_ready(&self, site: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            let out = self.agent(&["list", "--json"], site, "alice");
            if out.status.success() {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "host {site} did not come up:\n{}\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.log(site)
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    /// Waits (a minute at most) until `site`'s log has `count` lines containing `text`.
    pub fn wait_for_log(&self, site: &str, text: &str, count: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while self.log(site).matches(text).count() < count {
            assert!(
                std::time::Instant::now() < deadline,
                "no {count} `{text}` in {site}'s log:\n{}",
                self.log(site)
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// A host's log so far.
    pub fn log(&self, site: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{site}.log"))).unwrap_or_default()
    }

    /// Stops a host with SIGTERM (a graceful shutdown) and returns its exit status.
    pub fn stop(&mut self, site: &str) -> std::process::ExitStatus {
        let index = self
            .hosts
            .iter()
            .position(|(s, _)| s == site)
            .unwrap_or_else(|| panic!("no host {site}"));
        let (_, mut child) = self.hosts.remove(index);
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "host {site} ignored SIGTERM:\n{}",
                self.log(site)
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// The process id of a running host.
    pub fn pid(&self, site: &str) -> u32 {
        self.hosts
            .iter()
            .find(|(s, _)| s == site)
            .map(|(_, c)| c.id())
            .unwrap_or_else(|| panic!("no host {site}"))
    }

    /// Kills a host with SIGKILL (like a power cut) and waits for it to be gone.
    pub fn kill(&mut self, site: &str) {
        let index = self
            .hosts
            .iter()
            .position(|(s, _)| s == site)
            .unwrap_or_else(|| panic!("no host {site}"));
        let (_, mut child) = self.hosts.remove(index);
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts a host again on the same address and data directory.
    pub fn restart(&mut self, site: &str, extra: &[&str]) {
        let old = self.log(site);
        self.spawn(site, extra);
        self.wait_ready(site);
        let _ = std::fs::write(
            self.dir.path().join(format!("{site}.before-restart.log")),
            old,
        );
    }

    /// Hosts for `sites` that all talk to each other through relays losing `loss_per_mille`
    /// of their packets and delaying each by `delay`; returns the relays with the cluster.
    pub fn start_lossy(
        sites: &[&str],
        loss_per_mille: u32,
        delay: std::time::Duration,
    ) -> (Cluster, Vec<relay::Relay>) {
        let mut cluster = Cluster::start(sites, &[]);
        let mut relays = Vec::new();
        for from in sites {
            for to in sites.iter().filter(|t| *t != from) {
                let relay = cluster.relay(from, to);
                relay.set_loss(loss_per_mille);
                relay.set_delay(delay);
                relays.push(relay);
            }
        }
        for site in sites {
            cluster.start_with(site, &[], &[]);
        }
        (cluster, relays)
    }

    /// Hosts for `sites`, with `site` set to abort at crash point `point`.
    pub fn start_crashing(sites: &[&str], site: &str, point: &str) -> Cluster {
        let up: &[&str] = &[];
        let others: Vec<(&str, &[&str])> = (sites.iter())
            .filter(|s| **s != site)
            .map(|s| (*s, up))
            .collect();
        let mut cluster = Cluster::start(sites, &others);
        let failpoint = format!("{point}=return");
        cluster.start_with(site, &[], &[("FAILPOINTS", &failpoint)]);
        cluster
    }

    /// Sends `from`'s traffic for peer `to` through a new relay (takes effect when `from`
    /// starts next).
    pub fn relay(&mut self, from: &str, to: &str) -> relay::Relay {
        let relay = relay::Relay::start(self.addrs[to]);
        self.routes
            .insert((from.to_string(), to.to_string()), relay.addr);
        relay
    }

    /// Starts a host that is not running, with extra environment variables (e.g.
    /// `FAILPOINTS`), and waits until it serves.
    pub fn start_with(&mut self, site: &str, extra: &[&str], env: &[(&str, &str)]) {
        self.spawn_with(site, extra, env);
        self.wait_ready(site);
    }

    /// Waits for a host process to exit on its own (e.g. at a crash point).
    pub fn wait_exit(
        &mut self,
        site: &str,
        within: std::time::Duration,
    ) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + within;
        loop {
            let index = self
                .hosts
                .iter()
                .position(|(s, _)| s == site)
                .unwrap_or_else(|| panic!("no host {site}"));
            if let Ok(Some(status)) = self.hosts[index].1.try_wait() {
                self.hosts.remove(index);
                return status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "host {site} is still running:\n{}",
                self.log(site)
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// The service calls agents made on `site`, as (agent, hop seq) in call order, read from
    /// its store: stop the host first.
    pub fn visits(&self, site: &str) -> Vec<(String, u64)> {
        let store = agent_runtime::net::store::HostStore::open(&self.dir.path().join(site))
            .unwrap_or_else(|e| panic!("store of {site}: {e}"));
        store
            .visits()
            .unwrap_or_else(|e| panic!("visits of {site}: {e}"))
            .into_iter()
            .map(|(agent, _, call)| (agent.to_string(), call.seq))
            .collect()
    }

    /// A library client of host `site`, connected as `user` (for drivers of many agents).
    ///
    /// # Errors
    /// When the certificates cannot be read or the host does not answer.
    pub async fn client(
        &self,
        site: &str,
        user: &str,
    ) -> anyhow::Result<agent_runtime::net::client::Client> {
        use agent_runtime::net::certs::{self, Role};
        use agent_runtime::net::client::{Client, HostAddr};
        let creds = agent_runtime::net::tls::Credentials::load(
            &certs::ca_files(&self.certs()).cert,
            &certs::files(&self.certs(), Role::User, user),
        )?;
        let host = HostAddr {
            name: site.into(),
            addr: self.addrs[site],
        };
        Client::connect(&host, &creds)
            .await
            .map_err(anyhow::Error::msg)
    }

    /// Whether a host process is still running.
    pub fn alive(&mut self, site: &str) -> bool {
        self.hosts
            .iter_mut()
            .any(|(s, c)| s == site && matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.hosts {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
