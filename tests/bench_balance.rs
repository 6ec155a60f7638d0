//! The balance scenario of the bench: 400 CPU-bound agents (the spin example, allowing
//! moves) launched on one host of four, with balancing on and off. Each host is held to an
//! equal share of the machine's CPU (two hosts pinned to each core), so the ideal makespan
//! is the agents' CPU time divided by the cores. Reports where the agents ended (max ÷ mean
//! agents per host) and the makespan against the ideal.

use crate::{Row, stats};
use agent_e2e::{Cluster, example};
use agent_runtime::net::client::Client;
use agent_runtime::net::messages::{AgentEnd, LaunchEvent};
use futures_util::future::join_all;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

const SITES: [&str; 4] = ["siteA", "siteB", "siteC", "siteD"];
const AGENTS: usize = 400;
/// Primes counted up to by each agent: about a third of a second of CPU on this VM.
const N: &str = "2000000";

/// Pins every thread of host `pid` to `cpu`.
fn pin(pid: u32, cpu: usize) -> anyhow::Result<()> {
    let status = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
        .output()?;
    anyhow::ensure!(status.status.success(), "taskset: {status:?}");
    Ok(())
}

/// One launch followed to its end; the site it ended on.
async fn one(client: &Client, wasm: &[u8], movable: bool) -> anyhow::Result<String> {
    let args: BTreeMap<String, String> = [
        ("n", N),
        ("every", "200"),
        ("movable", if movable { "true" } else { "false" }),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    let mut site = "siteA".to_string();
    let end = client
        .launch(wasm, Vec::new(), args, &mut |event| {
            if let LaunchEvent::Moved(hop) = event {
                site = hop.to.clone();
            }
        })
        .await
        .map_err(anyhow::Error::msg)?;
    match end {
        LaunchEvent::Finished {
            outcome: AgentEnd::Finished(_),
            ..
        } => Ok(site),
        other => anyhow::bail!("a spin agent did not end well: {other:?}"),
    }
}

struct Run {
    per_host: BTreeMap<String, usize>,
    makespan: Duration,
}

/// 400 agents on siteA of four hosts pinned two to a core; `balance_above` for every host.
fn run(wasm: &[u8], balance_above: &str, runtime: &tokio::runtime::Runtime) -> anyhow::Result<Run> {
    let flags: [&str; 8] = [
        "--max-agents",
        "100000",
        "--user-launches-per-sec",
        "1000000",
        "--balance-above",
        balance_above,
        "--user-max-agents",
        "100000",
    ];
    let up: Vec<(&str, &[&str])> = SITES.iter().map(|s| (*s, &flags[..])).collect();
    let cluster = Cluster::start(&SITES, &up);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (i, site) in SITES.iter().enumerate() {
        pin(cluster.pid(site), i % cores)?;
    }
    // Membership and first loads known everywhere.
    std::thread::sleep(Duration::from_secs(3));
    runtime.block_on(async {
        // Two users: one connection carries at most 256 launches at once.
        let alice = cluster.client("siteA", "alice").await?;
        let bob = cluster.client("siteA", "bob").await?;
        // The module is sent once, before the clock starts.
        one(&alice, wasm, false).await?;
        let movable = balance_above != "0";
        let started = Instant::now();
        let launches = (0..AGENTS).map(|i| {
            let client = if i % 2 == 0 { &alice } else { &bob };
            one(client, wasm, movable)
        });
        let ends = join_all(launches).await;
        let makespan = started.elapsed();
        let mut per_host: BTreeMap<String, usize> =
            SITES.iter().map(|s| (s.to_string(), 0)).collect();
        for end in ends {
            *per_host.entry(end?).or_default() += 1;
        }
        anyhow::Ok(Run { per_host, makespan })
    })
}

/// CPU time of one spin agent alone on a host of its own core.
fn one_alone(wasm: &[u8], runtime: &tokio::runtime::Runtime) -> anyhow::Result<Duration> {
    let cluster = Cluster::start(&["siteA"], &[("siteA", &[])]);
    pin(cluster.pid("siteA"), 0)?;
    runtime.block_on(async {
        let client = cluster.client("siteA", "alice").await?;
        one(&client, wasm, false).await?;
        let mut times = Vec::new();
        for _ in 0..5 {
            let started = Instant::now();
            one(&client, wasm, false).await?;
            times.push(started.elapsed().as_secs_f64());
        }
        Ok(Duration::from_secs_f64(stats(times).p50))
    })
}

/// The rows of the balance scenario.
pub fn balance(rounds: usize) -> anyhow::Result<Vec<Row>> {
    let wasm = example("spin");
    let runtime = tokio::runtime::Runtime::new()?;
    let alone = one_alone(&wasm, &runtime)?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let ideal = alone.as_secs_f64() * AGENTS as f64 / cores as f64;
    let mut rows = Vec::new();
    for (name, above) in [("on", "2"), ("off", "0")] {
        let runs = (0..rounds.min(3))
            .map(|_| run(&wasm, above, &runtime))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let spread: Vec<f64> = (runs.iter())
            .map(|r| {
                let max = r.per_host.values().copied().max().unwrap_or(0) as f64;
                max / (AGENTS as f64 / SITES.len() as f64)
            })
            .collect();
        let spans: Vec<f64> = runs
            .iter()
            .map(|r| r.makespan.as_secs_f64() / ideal)
            .collect();
        let last = runs
            .last()
            .map(|r| format!("{:?}", r.per_host))
            .unwrap_or_default();
        let (spread, spans) = (stats(spread), stats(spans));
        let how = format!(
            "{AGENTS} spin agents (n={N}, checkpoint every 200, `allow_moves` when on) launched \
             at once on siteA of four hosts, two pinned to each of the {cores} cores (taskset); \
             balancing {name} (`--balance-above {above}`); ideal = {AGENTS} × {:.3} s (one \
             agent alone) ÷ {cores} cores = {ideal:.1} s; median of {} runs; last run's agents \
             per host: {last}",
            alone.as_secs_f64(),
            spread.n
        );
        rows.push(Row {
            figure: if name == "on" {
                "balancing on: max ÷ mean agents per host; makespan ÷ ideal"
            } else {
                "balancing off: max ÷ mean agents per host; makespan ÷ ideal"
            },
            target: "≤ 1.25; ≤ 1.3 (on)",
            measured: format!("**{:.2}**; **{:.2}**", spread.p50, spans.p50),
            how,
        });
    }
    Ok(rows)
}
