//! `agent demo`: three real `agent-host` processes on loopback, certificates made for the
//! occasion, and the search agent sent across them.

use crate::connection::Connection;
use crate::launch::{self, Submission};
use agent_runtime::builder;
use agent_runtime::net::certs::{self, Role, Validity};
use anyhow::{Context as _, bail};
use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

const SITES: [&str; 3] = ["siteA", "siteB", "siteC"];

/// Options of `agent demo`.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// Words the search agent looks for.
    #[arg(long, default_value = "migration")]
    query: String,
    /// The search agent's crate.
    #[arg(long, default_value = "examples/search")]
    agent: PathBuf,
    /// Directory holding one corpus directory per site (siteA, siteB, siteC).
    #[arg(long, default_value = "examples/search/sites")]
    sites: PathBuf,
}

/// Host processes that are stopped when dropped.
struct Hosts(Vec<(String, Child)>);

impl Drop for Hosts {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for (name, child) in &mut self.0 {
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if matches!(child.try_wait(), Ok(None)) {
                eprintln!("host {name} did not stop; killing it");
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

fn free_port() -> anyhow::Result<SocketAddr> {
    // The OS picks a free port; the host binds it a moment later.
    Ok(UdpSocket::bind("127.0.0.1:0")?.local_addr()?)
}

fn agent_host_bin() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name("agent-host");
    if !bin.is_file() {
        bail!(
            "{} is missing: build it with `cargo build --bins`",
            bin.display()
        );
    }
    Ok(bin)
}

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let host_bin = agent_host_bin()?;
    for site in SITES {
        let dir = args.sites.join(site);
        if !dir.is_dir() {
            bail!(
                "no corpus directory {} (run the demo from the repository root, or give --sites)",
                dir.display()
            );
        }
    }
    eprintln!("building {} ...", args.agent.display());
    let wasm_path = builder::build(&args.agent)?;
    let wasm = std::fs::read(&wasm_path)
        .with_context(|| format!("cannot read {}", wasm_path.display()))?;

    let work = tempfile::tempdir()?;
    let certs_dir = work.path().join("certs");
    make_certs(&certs_dir)?;
    let addrs: BTreeMap<&str, SocketAddr> = SITES
        .iter()
        .map(|s| Ok((*s, free_port()?)))
        .collect::<anyhow::Result<_>>()?;
    let mut hosts = Hosts(Vec::new());
    for site in SITES {
        let child = spawn_host(
            &host_bin,
            work.path(),
            &certs_dir,
            &args.sites,
            site,
            &addrs,
        )?;
        hosts.0.push((site.to_string(), child));
    }
    let connections: Vec<Connection> = SITES
        .iter()
        .map(|s| Connection {
            host: agent_runtime::net::client::HostAddr {
                name: s.to_string(),
                addr: addrs[s],
            },
            certs: certs_dir.clone(),
            user: Some("demo".into()),
        })
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        for conn in &connections {
            wait_ready(conn, &mut hosts).await?;
        }
        eprintln!(
            "three hosts up: {}",
            SITES
                .iter()
                .map(|s| format!("{s}@{}", addrs[s]))
                .collect::<Vec<_>>()
                .join(", ")
        );
        search(&connections[0], &wasm, &args.query).await
    })
}

/// A private CA, a certificate for each site and one for the user `demo`, in `dir`.
fn make_certs(dir: &Path) -> anyhow::Result<()> {
    certs::init_ca(dir)?;
    for site in SITES {
        certs::issue(dir, dir, Role::Host, site, Validity::default())?;
    }
    certs::issue(dir, dir, Role::User, "demo", Validity::default())?;
    eprintln!(
        "made a private CA and certificates for {} and user demo in {}",
        SITES.join(", "),
        dir.display()
    );
    Ok(())
}

/// Sends the search agent from `home` across the sites and says how many hits it brought.
async fn search(home: &Connection, wasm: &[u8], query: &str) -> anyhow::Result<ExitCode> {
    let submission = Submission {
        wasm,
        itinerary: vec![
            "siteB".to_string(),
            "siteC".to_string(),
            "siteA".to_string(),
        ],
        args: BTreeMap::from([("query".to_string(), query.to_string())]),
    };
    let (code, result) = launch::launch(home, submission, launch::Show::Text).await?;
    if let Some(hits) = result.as_ref().and_then(|r| r["hits"].as_array()) {
        eprintln!(
            "{} hits for `{query}` from {} sites",
            hits.len(),
            SITES.len()
        );
    }
    Ok(code)
}

fn spawn_host(
    bin: &Path,
    work: &Path,
    certs_dir: &Path,
    sites: &Path,
    site: &str,
    addrs: &BTreeMap<&str, SocketAddr>,
) -> anyhow::Result<Child> {
    let log = std::fs::File::create(work.join(format!("{site}.log")))?;
    let mut cmd = Command::new(bin);
    cmd.arg("serve")
        .args(["--name", site, "--listen", &addrs[site].to_string()])
        .arg("--data-dir")
        .arg(work.join(site))
        .arg("--certs")
        .arg(certs_dir)
        .arg("--corpus")
        .arg(sites.join(site));
    for (peer, addr) in addrs.iter().filter(|(p, _)| **p != site) {
        cmd.arg("--peer").arg(format!("{peer}={addr}"));
    }
    cmd.stdout(Stdio::null()).stderr(log);
    cmd.spawn()
        .with_context(|| format!("cannot start {}", bin.display()))
}

async fn wait_ready(conn: &Connection, hosts: &mut Hosts) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let last_error = match conn.connect().await {
            Ok(client) => match client.list().await {
                Ok(_) => {
                    client.close().await;
                    return Ok(());
                }
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        if Instant::now() > deadline {
            bail!("host {} did not come up: {last_error}", conn.host);
        }
        for (name, child) in &mut hosts.0 {
            if let Ok(Some(status)) = child.try_wait() {
                bail!("host {name} exited ({status}) before it was ready");
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
