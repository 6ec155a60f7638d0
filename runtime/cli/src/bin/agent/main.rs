//! `agent`: the user's and agent author's command line.

mod demo;
mod user;

use agent_runtime::builder;
use agent_runtime::engine::new_engine;
use agent_runtime::log::LogSource;
use agent_runtime::runner::{HopReport, Launch, LocalRunner, Migration, RunEvent};
use agent_runtime::{Corpus, Limits, ModuleCache, Site};
use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use user::human_bytes;

/// Build and run WebAssembly mobile agents.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build an agent crate for wasm32-wasip1 (release); prints the module's path last.
    Build {
        /// Directory of the agent crate.
        crate_dir: PathBuf,
    },
    /// Run an agent on in-process virtual sites; every hop goes through a real snapshot,
    /// encode, decode and restore into an instance reset to the module's initial memory.
    Run(RunArgs),
    /// Launch an agent on a host (its home) and follow it across hosts until it ends.
    Launch(LaunchArgs),
    /// Show one of your agents.
    Status {
        /// The agent's id.
        id: agent_runtime::AgentId,
        #[command(flatten)]
        conn: user::Connection,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List your agents launched on a host.
    List {
        #[command(flatten)]
        conn: user::Connection,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop one of your agents, wherever it runs.
    Kill {
        /// The agent's id.
        id: agent_runtime::AgentId,
        #[command(flatten)]
        conn: user::Connection,
    },
    /// Measure the link between a host and one of its peers: the host sends incompressible
    /// data to the peer the way an agent's image travels.
    Probe {
        /// The peer to send to.
        #[arg(long)]
        to: String,
        /// How much to send, in MiB.
        #[arg(long, default_value_t = 64)]
        mib: u64,
        #[command(flatten)]
        conn: user::Connection,
    },
    /// Start three real hosts on loopback and send the search agent across them.
    Demo(demo::DemoArgs),
}

#[derive(clap::Args)]
struct LaunchArgs {
    /// The agent module (.wasm).
    module: PathBuf,
    /// Sites to visit, comma-separated (the agent's itinerary).
    #[arg(long, value_delimiter = ',')]
    hop: Vec<String>,
    /// Argument for the agent, repeatable.
    #[arg(long = "arg", value_name = "KEY=VALUE", value_parser = parse_kv)]
    args: Vec<(String, String)>,
    #[command(flatten)]
    conn: user::Connection,
    /// Print one JSON object with the result and the hops.
    #[arg(long)]
    json: bool,
    /// Return once the home host started the agent, printing its id; it runs on (follow it
    /// with `agent status ID`).
    #[arg(long)]
    detach: bool,
}

#[derive(clap::Args)]
struct RunArgs {
    /// The agent module (.wasm).
    module: PathBuf,
    /// Sites to create and give the agent as its itinerary, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    sites: Vec<String>,
    /// Directory of site corpora: site X serves the documents under DIR/X/.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Argument for the agent, repeatable.
    #[arg(long = "arg", value_name = "KEY=VALUE", value_parser = parse_kv)]
    args: Vec<(String, String)>,
    /// Also migrate at every safe point (service calls, checkpoints), not only on hops.
    #[arg(long)]
    migrate_every_safe_point: bool,
    /// Most memory the agent may use, in MiB.
    #[arg(long, default_value_t = 256)]
    max_memory_mib: u64,
    /// CPU budget of the agent, in seconds.
    #[arg(long, default_value_t = 60.0)]
    cpu_budget: f64,
    /// Where compiled modules are kept [default: ~/.cache/agent-runtime/modules].
    #[arg(long, conflicts_with = "no_disk_cache")]
    cache_dir: Option<PathBuf>,
    /// Keep compiled modules in memory only.
    #[arg(long)]
    no_disk_cache: bool,
    /// Print one JSON object with the result and the hops instead of text.
    #[arg(long)]
    json: bool,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got `{s}`")),
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Build { crate_dir } => builder::build(&crate_dir)
            .map(|path| {
                println!("{}", path.display());
                ExitCode::SUCCESS
            })
            .map_err(anyhow::Error::from),
        Command::Run(args) => run(args),
        Command::Launch(args) => launch(args),
        Command::Status { id, conn, json } => {
            block_on(user::status(&conn, id, json)).map(|()| ExitCode::SUCCESS)
        }
        Command::List { conn, json } => {
            block_on(user::list(&conn, json)).map(|()| ExitCode::SUCCESS)
        }
        Command::Kill { id, conn } => block_on(user::kill(&conn, id)).map(|()| ExitCode::SUCCESS),
        Command::Probe { to, mib, conn } => {
            block_on(user::probe(&conn, &to, mib)).map(|()| ExitCode::SUCCESS)
        }
        Command::Demo(args) => demo::run(args),
    };
    result.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        ExitCode::from(2)
    })
}

fn block_on<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

fn launch(args: LaunchArgs) -> anyhow::Result<ExitCode> {
    let wasm = std::fs::read(&args.module)
        .with_context(|| format!("cannot read {}", args.module.display()))?;
    let launch_args = args.args.into_iter().collect::<BTreeMap<_, _>>();
    if args.detach {
        return block_on(user::launch_detached(
            &args.conn,
            &wasm,
            args.hop,
            launch_args,
            args.json,
        ));
    }
    block_on(user::launch(
        &args.conn,
        &wasm,
        args.hop,
        launch_args,
        args.json,
    ))
    .map(|(code, _)| code)
}

fn default_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))?;
    Some(base.join("agent-runtime").join("modules"))
}

fn load_sites(names: &[String], data: Option<&Path>) -> anyhow::Result<Vec<Site>> {
    let mut sites = Vec::new();
    for name in names {
        if name.is_empty() || name.contains(['/', '\\']) || name == ".." {
            bail!("bad site name `{name}`");
        }
        let corpus = match data {
            Some(dir) => Corpus::load(&dir.join(name))
                .with_context(|| format!("cannot load the corpus of site {name}"))?,
            None => Corpus::empty(),
        };
        sites.push(Site::new(name, corpus));
    }
    Ok(sites)
}

fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let wasm = std::fs::read(&args.module)
        .with_context(|| format!("cannot read {}", args.module.display()))?;
    if !(args.cpu_budget.is_finite() && args.cpu_budget > 0.0) {
        bail!("--cpu-budget must be a positive number of seconds");
    }
    let limits = Limits {
        max_memory: args.max_memory_mib << 20,
        cpu_budget: Duration::from_secs_f64(args.cpu_budget),
        ..Limits::default()
    };
    let sites = load_sites(&args.sites, args.data.as_deref())?;
    let engine = new_engine().map_err(|e| anyhow::anyhow!("cannot start wasmtime: {e}"))?;
    let cache_dir = if args.no_disk_cache {
        None
    } else {
        args.cache_dir.clone().or_else(default_cache_dir)
    };
    let runner = LocalRunner::new(ModuleCache::new(&engine, cache_dir)?, sites, limits);
    let launch = Launch {
        itinerary: args.sites.clone(),
        args: args.args.iter().cloned().collect::<BTreeMap<_, _>>(),
        owner: whoami(),
    };
    let migration = if args.migrate_every_safe_point {
        Migration::EverySafePoint
    } else {
        Migration::OnlyHops
    };

    let json = args.json;
    let color = std::io::stderr().is_terminal();
    let mut on_event = move |event: &RunEvent| {
        if json {
            return;
        }
        match event {
            RunEvent::Moved(hop) => eprintln!("{}", hop_line(hop, color)),
            RunEvent::HopFailed { site, error } => eprintln!("hop failed on {site}: {error}"),
            RunEvent::Log { site, line } => {
                let tag = match line.source {
                    LogSource::Stdout => "stdout",
                    LogSource::Stderr => "stderr",
                    LogSource::Agent(agent_abi::level::ERROR) => "error",
                    LogSource::Agent(agent_abi::level::WARN) => "warn",
                    LogSource::Agent(_) => "log",
                };
                eprintln!("  [{site}] {tag}: {}", line.text);
            }
            RunEvent::LogDropped { lines } => {
                eprintln!("  ({lines} log lines dropped: the agent logs too much)")
            }
        }
    };
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = tokio.block_on(runner.run(&wasm, launch, migration, &mut on_event))?;

    if json {
        let out = serde_json::json!({
            "agent_id": report.agent_id,
            "ok": report.outcome.is_ok(),
            "result": report.outcome.as_ref().ok(),
            "error": report.outcome.as_ref().err().map(|e| e.to_string()),
            "site": report.site,
            "safe_points": report.safe_points,
            "cpu_ms": report.cpu.as_secs_f64() * 1e3,
            "hops": report.moves.iter().map(|h| serde_json::json!({
                "seq": h.seq, "from": h.from, "to": h.to, "requested": h.requested,
                "image_bytes": h.image_bytes, "memory_bytes": h.memory_bytes, "pages": h.pages,
                "capture_us": h.capture.as_micros() as u64, "restore_us": h.restore.as_micros() as u64,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        let hops = report.moves.iter().filter(|h| h.requested).count();
        let moves = report.moves.len() - hops;
        eprintln!(
            "agent {} ended on {} after {hops} hops{} and {} safe points, {:.1} ms CPU",
            report.agent_id,
            report.site,
            if moves > 0 {
                format!(" (+{moves} migrations in place)")
            } else {
                String::new()
            },
            report.safe_points,
            report.cpu.as_secs_f64() * 1e3
        );
        match &report.outcome {
            Ok(value) => println!("{}", serde_json::to_string_pretty(value)?),
            Err(e) => eprintln!("error: {e}"),
        }
    }
    Ok(if report.outcome.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn hop_line(hop: &HopReport, color: bool) -> String {
    let what = if hop.requested { "hop" } else { "migrate" };
    let arrow = if color { "\u{2192}" } else { "->" };
    format!(
        "{what} {:>3}  {:>8} {arrow} {:<8}  image {:>9}  memory {:>9} ({} pages carried)  capture {:.2} ms  restore {:.2} ms",
        hop.seq,
        hop.from,
        hop.to,
        human_bytes(hop.image_bytes as u64),
        human_bytes(hop.memory_bytes),
        hop.pages,
        hop.capture.as_secs_f64() * 1e3,
        hop.restore.as_secs_f64() * 1e3,
    )
}

fn whoami() -> String {
    std::env::var("USER").unwrap_or_else(|_| "local".into())
}
