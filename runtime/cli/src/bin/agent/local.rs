//! `agent run`: an agent on in-process virtual sites, every hop through a real snapshot.

use crate::RunArgs;
use crate::format::{arrow, human_bytes};
use agent_runtime::engine::new_engine;
use agent_runtime::log::LogSource;
use agent_runtime::runner::{HopReport, Launch, LocalRunner, Migration, RunEvent, RunReport};
use agent_runtime::{Corpus, Limits, ModuleCache, Site};
use anyhow::{Context as _, bail};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// `agent run --json`. Fields in alphabetical order, as the keys always came out.
#[derive(Serialize)]
struct RunView<'a> {
    agent_id: &'a str,
    /// Every descendant it cloned, in the order they ended.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    children: Vec<RunView<'a>>,
    cpu_ms: f64,
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    emitted: &'a [serde_json::Value],
    error: Option<String>,
    hops: Vec<MoveView<'a>>,
    ok: bool,
    /// The agent a child was cloned from.
    #[serde(skip_serializing_if = "Option::is_none")]
    parent: Option<&'a str>,
    result: Option<&'a serde_json::Value>,
    safe_points: u64,
    site: &'a str,
}

/// One move of `agent run --json`: a hop or a migration in place.
#[derive(Serialize)]
struct MoveView<'a> {
    capture_us: u64,
    from: &'a str,
    image_bytes: usize,
    memory_bytes: u64,
    pages: u64,
    requested: bool,
    restore_us: u64,
    seq: u64,
    to: &'a str,
}

impl<'a> From<&'a RunReport> for RunView<'a> {
    fn from(report: &'a RunReport) -> Self {
        RunView {
            agent_id: &report.agent_id,
            children: report.children.iter().map(RunView::from).collect(),
            cpu_ms: report.cpu.as_secs_f64() * 1e3,
            emitted: &report.emitted,
            error: report.outcome.as_ref().err().map(|e| e.to_string()),
            hops: report.moves.iter().map(MoveView::from).collect(),
            ok: report.outcome.is_ok(),
            parent: report.parent.as_deref(),
            result: report.outcome.as_ref().ok(),
            safe_points: report.safe_points,
            site: &report.site,
        }
    }
}

impl<'a> From<&'a HopReport> for MoveView<'a> {
    fn from(h: &'a HopReport) -> Self {
        MoveView {
            capture_us: h.capture.as_micros() as u64,
            from: &h.from,
            image_bytes: h.image_bytes,
            memory_bytes: h.memory_bytes,
            pages: h.pages,
            requested: h.requested,
            restore_us: h.restore.as_micros() as u64,
            seq: h.seq,
            to: &h.to,
        }
    }
}

/// `agent run`.
pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let wasm = std::fs::read(&args.module)
        .with_context(|| format!("cannot read {}", args.module.display()))?;
    let runner = runner(&args)?;
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
        if !json {
            print_event(event, color);
        }
    };
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = tokio.block_on(runner.run(&wasm, launch, migration, &mut on_event))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&RunView::from(&report))?);
    } else {
        print_report(&report)?;
    }
    Ok(if report.outcome.is_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The runner with its sites, limits and module cache, from the command line.
fn runner(args: &RunArgs) -> anyhow::Result<LocalRunner> {
    if !(args.cpu_budget.is_finite() && args.cpu_budget > 0.0) {
        bail!("--cpu-budget must be a positive number of seconds");
    }
    let limits = Limits {
        max_memory: args.max_memory_mib << 20,
        cpu_budget: Duration::from_secs_f64(args.cpu_budget),
        ..Limits::default()
    };
    let sites = load_sites(&args.sites, args.data.as_deref())?;
    if let Some(stray) = (args.unreachable.iter()).find(|s| !args.sites.contains(s)) {
        bail!("--unreachable {stray}: not one of the --sites");
    }
    let engine = new_engine().map_err(|e| anyhow::anyhow!("cannot start wasmtime: {e}"))?;
    let cache_dir = if args.no_disk_cache {
        None
    } else {
        args.cache_dir.clone().or_else(default_cache_dir)
    };
    Ok(
        LocalRunner::new(ModuleCache::new(&engine, cache_dir)?, sites, limits)
            .with_unreachable(args.unreachable.iter().cloned()),
    )
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
        let corpus = match data.map(|dir| dir.join(name)) {
            Some(dir) if dir.exists() => Corpus::load(&dir)
                .with_context(|| format!("cannot load the corpus of site {name}"))?,
            Some(dir) => {
                eprintln!(
                    "site {name} has no documents: {} does not exist",
                    dir.display()
                );
                Corpus::empty()
            }
            None => Corpus::empty(),
        };
        sites.push(Site::new(name, corpus));
    }
    Ok(sites)
}

/// One line on stderr for what happened to the agent.
fn print_event(event: &RunEvent, color: bool) {
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
        RunEvent::Emitted { site, value } => eprintln!("  [{site}] emitted: {value}"),
        RunEvent::LogDropped { lines } => {
            eprintln!("  ({lines} log lines dropped: the agent logs too much)")
        }
        RunEvent::Cloned { site, children } => {
            let each: Vec<String> = (children.iter())
                .map(|(id, to)| format!("{} {} {to}", &id[..8], arrow(color)))
                .collect();
            eprintln!(
                "cloned on {site} into {} children: {}",
                children.len(),
                each.join(", ")
            );
        }
        RunEvent::Child { agent, event } => {
            eprint!("  child {}: ", &agent[..8.min(agent.len())]);
            print_event(event, color);
        }
    }
}

/// Where the agent ended and what it cost on stderr; its result on stdout.
fn print_report(report: &RunReport) -> anyhow::Result<()> {
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
    for child in &report.children {
        let ended = match &child.outcome {
            Ok(value) => format!("ended on {}: {value}", child.site),
            Err(e) => format!("failed on {}: {e}", child.site),
        };
        eprintln!("child {} {ended}", child.agent_id);
    }
    match &report.outcome {
        Ok(value) => println!("{}", serde_json::to_string_pretty(value)?),
        Err(e) => eprintln!("error: {e}"),
    }
    Ok(())
}

fn hop_line(hop: &HopReport, color: bool) -> String {
    let what = if hop.requested { "hop" } else { "migrate" };
    format!(
        "{what} {:>3}  {:>8} {} {:<8}  image {:>9}  memory {:>9} ({} pages carried)  capture {:.2} ms  restore {:.2} ms",
        hop.seq,
        hop.from,
        arrow(color),
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
