//! Benchmarks (by hand, not in CI): real `agent-host` processes on loopback, the `bench`
//! example agent, and the baselines they are compared with, all measured in one run.
//! Prints a Markdown report: the environment, then one row per figure with its target.
//!
//! `scripts/bench [ROUNDS] [SCENARIO...]` (release build; ROUNDS repeats each measured
//! scenario, default 5; scenarios: checkpoint memcpy freeze throughput messages large sparse
//! return restart parked clones gossip balance, default all). `BENCH_PARKED=N` parks N agents instead of 100,000;
//! `BENCH_AGENTS=N` puts N agents in flight in `throughput` instead of 200, `BENCH_HOPS=N` makes
//! each hop N times instead of 20.

#[path = "bench_balance.rs"]
mod balance;
#[path = "bench_clones.rs"]
mod clones;
#[path = "bench_cluster.rs"]
mod gossip;
#[path = "bench_messages.rs"]
mod messages;

use agent_e2e::{Cluster, example, launch, repo, runner};
use agent_runtime::Limits;
use agent_runtime::net::client::Client;
use agent_runtime::net::messages::{AgentEnd, HopInfo, LaunchEvent};
use agent_runtime::runner::Migration;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Flags of both hosts: room for the 1 GiB and 256 MiB agents, and for one user (the bench) to
/// launch and park as fast and as many as it can.
const HOST_FLAGS: [&str; 8] = [
    "--max-memory-mib",
    "2048",
    "--max-agents",
    "100000",
    "--user-launches-per-sec",
    "1000000",
    "--user-max-parked",
    "1000000",
];

/// Order statistics of a sample.
struct Stats {
    min: f64,
    p50: f64,
    p99: f64,
    max: f64,
    n: usize,
}

fn stats(mut v: Vec<f64>) -> Stats {
    v.sort_by(f64::total_cmp);
    let at = |q: f64| {
        v.get(((v.len().max(1) - 1) as f64 * q).round() as usize)
            .copied()
    };
    Stats {
        min: at(0.0).unwrap_or(f64::NAN),
        p50: at(0.5).unwrap_or(f64::NAN),
        p99: at(0.99).unwrap_or(f64::NAN),
        max: at(1.0).unwrap_or(f64::NAN),
        n: v.len(),
    }
}

/// One row of the report.
struct Row {
    figure: &'static str,
    target: &'static str,
    measured: String,
    how: String,
}

fn rounds() -> usize {
    std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5)
}

fn main() -> anyhow::Result<()> {
    // The CLI and host binaries sit beside this one.
    if let Ok(exe) = std::env::current_exe() {
        // SAFETY: no other thread exists yet, so nothing reads the environment concurrently.
        unsafe { std::env::set_var("AGENT_BIN", exe.with_file_name("agent")) };
    }
    let rounds = rounds();
    let chosen: Vec<String> = std::env::args().skip(2).collect();
    let run = |name: &str| chosen.is_empty() || chosen.iter().any(|c| c == name);
    let wasm = example("bench");
    let mut rows = Vec::new();
    if run("checkpoint") {
        rows.push(checkpoint(&wasm, rounds));
    }
    if run("memcpy") {
        rows.push(memcpy(rounds));
    }
    if run("gossip") {
        rows.extend(gossip::simulation(rounds)?);
    }
    if run("balance") {
        rows.extend(balance::balance(rounds)?);
    }
    // Scenarios that start hosts of their own (or none) need not the two below.
    let standalone = ["gossip", "balance"];
    if !chosen.is_empty() && chosen.iter().all(|c| standalone.contains(&c.as_str())) {
        print_report(&rows, rounds);
        return Ok(());
    }

    let up: [(&str, &[&str]); 2] = [("siteA", &HOST_FLAGS), ("siteB", &HOST_FLAGS)];
    let mut cluster = Cluster::start(&["siteA", "siteB"], &up);
    eprintln!(
        "bench: hosts siteA (pid {}) and siteB (pid {})",
        cluster.pid("siteA"),
        cluster.pid("siteB")
    );
    let runtime = tokio::runtime::Runtime::new()?;
    let bench = runtime.block_on(Bench::connect(&cluster, wasm))?;
    if run("freeze") {
        rows.extend(runtime.block_on(bench.freeze(rounds))?);
    }
    if run("throughput") {
        rows.push(runtime.block_on(bench.throughput(rounds))?);
    }
    if run("messages") {
        let inbox = Arc::new(example("inbox"));
        let client = &bench.client;
        rows.push(runtime.block_on(messages::latency(client, &inbox, rounds))?);
        rows.push(runtime.block_on(messages::throughput(client, &inbox, rounds))?);
        rows.push(runtime.block_on(messages::hopping(client, &inbox, rounds))?);
    }
    if run("large") {
        rows.push(runtime.block_on(bench.large(rounds))?);
    }
    if run("sparse") {
        rows.push(runtime.block_on(bench.sparse())?);
    }
    if run("return") {
        rows.push(runtime.block_on(bench.return_visit())?);
    }
    if run("restart") {
        // A restarted destination loads the compiled module from disk instead of compiling it.
        cluster.stop("siteB");
        cluster.restart("siteB", &HOST_FLAGS);
        rows.push(runtime.block_on(bench.after_restart())?);
    }
    if run("parked") {
        let count = env_count("BENCH_PARKED", 100_000);
        let data = cluster.dir.path().join("siteA");
        rows.push(runtime.block_on(bench.parked(count, cluster.pid("siteA"), &data))?);
        // Its parked agents' alarms are set from their records; no image is read.
        cluster.stop("siteA");
        let started = Instant::now();
        cluster.restart("siteA", &HOST_FLAGS);
        let ready = started.elapsed();
        rows.push(Row {
            figure: "restart of a host with the parked agents above",
            target: "—",
            measured: format!(
                "serving after {:.1} s, resident {} MiB",
                ready.as_secs_f64(),
                rss(cluster.pid("siteA"))? >> 20
            ),
            how: "siteA stopped (SIGTERM) and started again on its data directory; time until \
                  it answers `agent list`"
                .into(),
        });
    }
    if run("clones") {
        // Nine hosts of their own, so that each child has a host.
        let up: Vec<(&str, &[&str])> = (clones::SITES.iter())
            .map(|s| (*s, &HOST_FLAGS[..]))
            .collect();
        let nine = Cluster::start(&clones::SITES, &up);
        let fork = example("fork");
        let client = runtime.block_on(nine.client("siteA", "alice"))?;
        rows.push(runtime.block_on(clones::fork_cost(&client, &fork, rounds))?);
        rows.push(runtime.block_on(clones::speedup(&client, &fork, rounds))?);
        keep_logs(&nine, &clones::SITES, "clones-");
    }
    for site in ["siteA", "siteB"] {
        cluster.stop(site);
    }
    keep_logs(&cluster, &["siteA", "siteB"], "");
    print_report(&rows, rounds);
    Ok(())
}

/// BENCH_LOGS=DIR keeps the logs of `sites`, their names after `prefix`
/// (RUST_LOG=agent_runtime=debug logs hop phases).
fn keep_logs(cluster: &Cluster, sites: &[&str], prefix: &str) {
    let Some(dir) = std::env::var_os("BENCH_LOGS") else {
        return;
    };
    for site in sites {
        let log = format!("{site}.log");
        let to = std::path::Path::new(&dir).join(format!("{prefix}{log}"));
        // A log that cannot be kept must not cost the table the run measured.
        let kept = std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::copy(cluster.dir.path().join(&log), &to));
        if let Err(e) = kept {
            eprintln!("bench: cannot keep {} ({e})", to.display());
        }
    }
}

/// `ctx.checkpoint()` when the host has not asked, in-process: N checkpoints against N
/// empty loop turns of the same agent, the difference divided by N.
fn checkpoint(wasm: &[u8], rounds: usize) -> Row {
    const N: u64 = 10_000_000;
    let limits = Limits {
        slice: Duration::from_secs(3600),
        ..Limits::default()
    };
    let runner = runner(limits);
    let time = |key: &str| {
        let n = N.to_string();
        let started = Instant::now();
        let report = agent_e2e::run(
            &runner,
            wasm,
            launch(&[], &[(key, n.as_str())]),
            Migration::OnlyHops,
        );
        assert!(report.outcome.is_ok(), "bench agent failed: {report:?}");
        started.elapsed().as_secs_f64()
    };
    time("spins"); // compiles the module
    // Each round's difference, of two runs side by side: min and max of separate series
    // paired a fast run with a slow one and could cross.
    let per_checkpoint: Vec<f64> = (0..rounds)
        .map(|_| {
            let with = time("checkpoints");
            (with - time("spins")) / N as f64 * 1e9
        })
        .collect();
    let d = stats(per_checkpoint);
    Row {
        figure: "`ctx.checkpoint()` when the host has not asked",
        target: "≤ 20 ns",
        measured: format!("**{:.1} ns** (min {:.1}, max {:.1})", d.p50, d.min, d.max),
        how: format!(
            "in-process runner: {N} checkpoints vs {N} empty loop turns of the same agent, \
             one after the other, {} rounds: median of (difference ÷ {N})",
            d.n
        ),
    }
}

/// Copying 256 MiB in this process: the floor any move of that much state stands on.
fn memcpy(rounds: usize) -> Row {
    let from = vec![7u8; 256 << 20];
    let mut to = vec![0u8; 256 << 20];
    let mut took = Vec::new();
    for _ in 0..rounds {
        let started = Instant::now();
        to.copy_from_slice(std::hint::black_box(&from));
        took.push(started.elapsed().as_secs_f64() * 1e3);
        std::hint::black_box(&to);
    }
    let s = stats(took);
    Row {
        figure: "baseline: memcpy of 256 MiB",
        target: "—",
        measured: format!("{:.1} ms (min {:.1}, max {:.1})", s.p50, s.min, s.max),
        how: format!("`copy_from_slice` in the bench process, median of {}", s.n),
    }
}

/// A connection to the home host siteA and the bench agent's bytes.
struct Bench {
    client: Arc<Client>,
    wasm: Arc<Vec<u8>>,
}

/// What one launch saw: its hops, its memory at the end and its wall time.
struct Trip {
    hops: Vec<HopInfo>,
    memory: u64,
    wall: Duration,
}

impl Bench {
    async fn connect(cluster: &Cluster, wasm: Vec<u8>) -> anyhow::Result<Bench> {
        Ok(Bench {
            client: Arc::new(cluster.client("siteA", "alice").await?),
            wasm: Arc::new(wasm),
        })
    }

    /// Launches the bench agent from siteA and follows it to its end.
    async fn trip(&self, itinerary: &[&str], args: &[(&str, u64)]) -> anyhow::Result<Trip> {
        trip(&self.client, &self.wasm, itinerary, args).await
    }

    /// Freeze of hops between the two hosts, module cached: an agent whose memory is about
    /// 1 MiB (its state a few pages), then one carrying 1 MiB of incompressible heap. The
    /// first hop of the run is the cold one (the destination compiles the module).
    async fn freeze(&self, rounds: usize) -> anyhow::Result<Vec<Row>> {
        let hops = 100 * rounds as u64;
        let mut rows = Vec::new();
        for (dirty_kib, figure) in [
            (0, "freeze of one hop, 1 MiB agent, module cached"),
            (
                1024,
                "freeze of one hop, 1 MiB of incompressible heap, module cached",
            ),
        ] {
            let trip = self
                .trip(
                    &["siteB", "siteA"],
                    &[("dirty_kib", dirty_kib), ("hops", hops + 1)],
                )
                .await?;
            let warm = stats(
                trip.hops
                    .iter()
                    .filter(|h| h.module_bytes == 0)
                    .map(|h| h.resumed_at_us.saturating_sub(h.frozen_at_us) as f64 / 1e3)
                    .collect(),
            );
            let bound = stats(
                trip.hops
                    .iter()
                    .filter(|h| h.module_bytes == 0)
                    .map(|h| h.freeze_us as f64 / 1e3)
                    .collect(),
            );
            let committed = stats(
                trip.hops
                    .iter()
                    .filter(|h| h.module_bytes == 0)
                    .map(|h| h.committed_us as f64 / 1e3)
                    .collect(),
            );
            let image = trip.hops.last().map_or(0, |h| h.image_bytes);
            rows.push(Row {
                figure,
                target: if dirty_kib == 0 {
                    "p50 ≤ 1 ms, p99 ≤ 5 ms"
                } else {
                    "—"
                },
                measured: format!(
                    "**p50 {:.2} ms, p99 {:.2} ms** (min {:.2}, max {:.2}); bound without a \
                     shared clock p50 {:.2} ms, p99 {:.2} ms; until COMMITTED p50 {:.2} ms, \
                     p99 {:.2} ms",
                    warm.p50,
                    warm.p99,
                    warm.min,
                    warm.max,
                    bound.p50,
                    bound.p99,
                    committed.p50,
                    committed.p99
                ),
                how: format!(
                    "{} hops siteA⇄siteB of the bench agent (memory {} KiB, image {:.1} KiB): \
                     from suspension on the source until the destination resumed it, by the \
                     clock the two hosts share (`resumed_at_us - frozen_at_us`); the bound is \
                     what a host reports with no shared clock (its time until COMMITTED less \
                     the time the agent had run there). The agent's next hop waits for the \
                     commit: until COMMITTED is that wait, seen from the source",
                    warm.n,
                    trip.memory >> 10,
                    image as f64 / 1024.0
                ),
            });
            if let Some(first) = trip.hops.first().filter(|h| h.module_bytes > 0) {
                rows.push(Row {
                    figure: "cold hop (destination compiles the module)",
                    target: "compile once per host",
                    measured: format!("{:.1} ms", first.freeze_us as f64 / 1e3),
                    how: format!(
                        "the first hop of the run above ({} KiB module sent and compiled)",
                        first.module_bytes >> 10
                    ),
                });
            }
        }
        Ok(rows)
    }

    /// Many small agents in flight at once, each bouncing between the two hosts.
    async fn throughput(&self, rounds: usize) -> anyhow::Result<Row> {
        // BENCH_AGENTS=N: agents in flight, to see how throughput depends on them.
        let agents = env_count("BENCH_AGENTS", 200);
        // BENCH_HOPS=N: hops each agent makes instead of 20 (a long trip's home record grows).
        let hops_each = env_count("BENCH_HOPS", 20) as u64;
        let mut rates = Vec::new();
        for _ in 0..rounds {
            let started = Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..agents {
                let (client, wasm) = (self.client.clone(), self.wasm.clone());
                tasks.spawn(async move {
                    trip(&client, &wasm, &["siteB", "siteA"], &[("hops", hops_each)]).await
                });
            }
            let mut hops = 0;
            while let Some(done) = tasks.join_next().await {
                hops += done??.hops.len();
            }
            rates.push(hops as f64 / started.elapsed().as_secs_f64());
        }
        let s = stats(rates);
        Ok(Row {
            figure: "hops per second between two hosts, many small agents",
            target: "≥ 5,000",
            measured: format!("**{:.0}** (min {:.0}, max {:.0})", s.p50, s.min, s.max),
            how: format!(
                "{agents} agents launched at once, {hops_each} hops each siteA⇄siteB; hops ÷ wall \
                 time from the first launch to the last end; median of {} rounds",
                s.n
            ),
        })
    }

    /// A 256 MiB incompressible agent's hop against a bare transfer of as many bytes over
    /// the same mTLS QUIC connection between the same two processes, alternating.
    async fn large(&self, rounds: usize) -> anyhow::Result<Row> {
        const MIB: u64 = 256;
        let (mut hop, mut bare, mut image) = (Vec::new(), Vec::new(), 0);
        for _ in 0..rounds {
            let took = self
                .client
                .probe("siteB", MIB << 20)
                .await
                .map_err(anyhow::Error::msg)?;
            bare.push(took.as_secs_f64() * 1e3);
            let trip = self
                .trip(&["siteB"], &[("dirty_kib", MIB << 10), ("hops", 1)])
                .await?;
            let info = trip.hops.first().ok_or_else(|| anyhow::anyhow!("no hop"))?;
            hop.push(info.freeze_us as f64 / 1e3);
            image = info.image_bytes;
        }
        let (h, b) = (stats(hop), stats(bare));
        Ok(Row {
            figure: "hop of 256 MiB dirty incompressible heap ÷ bare mTLS QUIC transfer",
            target: "≤ 1.3×",
            measured: format!(
                "**{:.2}×** (hop p50 {:.0} ms, min {:.0}, max {:.0}; bare p50 {:.0} ms, min {:.0}, max {:.0})",
                h.p50 / b.p50,
                h.p50,
                h.min,
                h.max,
                b.p50,
                b.min,
                b.max
            ),
            how: format!(
                "hop freeze (image {} MiB) vs `agent probe` of {MIB} MiB siteA→siteB on the \
                 hosts' own connection, alternating, median of {} each",
                image >> 20,
                h.n
            ),
        })
    }

    /// Bytes on the wire for an agent with 1 GiB of memory of which 8 MiB were written.
    async fn sparse(&self) -> anyhow::Result<Row> {
        let trip = self
            .trip(
                &["siteB"],
                &[("dirty_kib", 8 << 10), ("reserve_mib", 1016), ("hops", 1)],
            )
            .await?;
        let info = trip.hops.first().ok_or_else(|| anyhow::anyhow!("no hop"))?;
        Ok(Row {
            figure: "bytes on the wire, 1 GiB memory of which 8 MiB written",
            target: "≤ 10 MiB",
            measured: format!(
                "**{:.2} MiB** (freeze {:.0} ms)",
                info.image_bytes as f64 / (1 << 20) as f64,
                info.freeze_us as f64 / 1e3
            ),
            how: "image bytes of one hop siteA→siteB; 8 MiB incompressible + 1016 MiB \
                  reserved and never written"
                .into(),
        })
    }

    /// An agent coming back to a host it visited: bytes sent ÷ bytes it changed since.
    async fn return_visit(&self) -> anyhow::Result<Row> {
        const REWRITE_KIB: u64 = 256;
        let trip = self
            .trip(
                &["siteB", "siteA"],
                &[
                    ("dirty_kib", 8 << 10),
                    ("rewrite_kib", REWRITE_KIB),
                    ("hops", 4),
                ],
            )
            .await?;
        let returns: Vec<f64> = trip
            .hops
            .get(2..)
            .unwrap_or_default()
            .iter()
            .map(|h| (h.image_bytes + h.base_list_bytes) as f64 / (REWRITE_KIB << 10) as f64)
            .collect();
        let full = trip.hops.first().map_or(0, |h| h.image_bytes);
        let s = stats(returns);
        Ok(Row {
            figure: "return visit: bytes on the wire ÷ bytes changed since it left",
            target: "≈ 1",
            measured: format!("**{:.1}** (min {:.1}, max {:.1})", s.p50, s.min, s.max),
            how: format!(
                "8 MiB incompressible agent rewriting {REWRITE_KIB} KiB before each hop \
                 siteA⇄siteB; hops 3 and 4 go back to hosts it left: (image bytes + the \
                 destination's page-hash list) ÷ {REWRITE_KIB} KiB; the first hop's image is \
                 {:.1} MiB ({:.0} ms wall)",
                full as f64 / (1 << 20) as f64,
                trip.wall.as_secs_f64() * 1e3
            ),
        })
    }

    /// Agents launched on siteA that sleep a day there: each is parked (stored, instance
    /// freed). siteA's resident memory after the first tenth against after all of them.
    async fn parked(&self, count: usize, pid: u32, data: &std::path::Path) -> anyhow::Result<Row> {
        const IN_FLIGHT: usize = 64;
        let count = count.max(2_000);
        let warm = count / 10;
        let started = Instant::now();
        self.park(warm, IN_FLIGHT).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (before, disk_before) = (rss(pid)?, disk_usage(data));
        self.park(count - warm, IN_FLIGHT).await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (after, disk_after) = (rss(pid)?, disk_usage(data));
        let wall = started.elapsed();
        let each = after.saturating_sub(before) as f64 / (count - warm) as f64;
        let per_agent = |after: u64, before: u64| {
            after.saturating_sub(before) as f64 / (count - warm) as f64 / 1024.0
        };
        let written = per_agent(disk_after.0, disk_before.0);
        let length = per_agent(disk_after.1, disk_before.1);
        Ok(Row {
            figure: "parked agents per host, memory each beyond its stored image",
            target: "100,000 at ≤ 8 KiB each",
            measured: format!(
                "**{count} parked, {:.2} KiB each** (siteA resident {} → {} MiB)",
                each / 1024.0,
                before >> 20,
                after >> 20
            ),
            how: format!(
                "bench agent launched on siteA, `ctx.sleep` of a day there ({IN_FLIGHT} \
                 launches in flight, {:.0} parked/s); growth of siteA's VmRSS from {warm} \
                 parked to {count} ÷ {} (the first {warm} fill caches and tables); the store \
                 grew {written:.1} KiB per agent written on disk ({length:.1} KiB of file \
                 length, which jumps as redb doubles its file)",
                count as f64 / wall.as_secs_f64(),
                count - warm,
            ),
        })
    }

    /// Launches `count` agents that park asleep on siteA, `in_flight` at a time; each
    /// launch is followed until the agent is parked.
    async fn park(&self, count: usize, in_flight: usize) -> anyhow::Result<()> {
        let args: BTreeMap<String, String> = [("sleep_ms".to_string(), "86400000".to_string())]
            .into_iter()
            .collect();
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..count {
            if i >= in_flight
                && let Some(done) = tasks.join_next().await
            {
                done??;
            }
            let (client, wasm, args) = (self.client.clone(), self.wasm.clone(), args.clone());
            tasks.spawn(async move {
                let asleep = |e: &LaunchEvent| matches!(e, LaunchEvent::Sleeping { .. });
                let last = client
                    .launch_until(&wasm, Vec::new(), args, &mut |_| {}, &asleep)
                    .await
                    .map_err(anyhow::Error::msg)?;
                match last {
                    LaunchEvent::Sleeping { .. } => Ok(()),
                    other => Err(anyhow::anyhow!("the agent did not park: {other:?}")),
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        Ok(())
    }

    /// The first hop to a destination that restarted: it has the module and its compiled code
    /// on disk, so nothing is sent or compiled.
    async fn after_restart(&self) -> anyhow::Result<Row> {
        let trip = self
            .trip(&["siteB", "siteA"], &[("dirty_kib", 1024), ("hops", 2)])
            .await?;
        let first = trip.hops.first().ok_or_else(|| anyhow::anyhow!("no hop"))?;
        let second = trip.hops.get(1).map_or(0, |h| h.freeze_us);
        Ok(Row {
            figure: "first hop to a restarted host",
            target: "compiled code loaded from disk",
            measured: format!(
                "{:.1} ms, module bytes sent {} (hop back {:.1} ms)",
                first.freeze_us as f64 / 1e3,
                first.module_bytes,
                second as f64 / 1e3
            ),
            how: "siteB stopped and started again on its data directory, then one hop there \
                  of the 1 MiB agent"
                .into(),
        })
    }
}

/// Resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS for pid {pid}"))?;
    Ok(kib << 10)
}

/// Bytes of the files under `dir`: (written, as blocks the disk holds; length). redb grows
/// its file by doubling it, so its length jumps and says little about one agent's share.
fn disk_usage(dir: &std::path::Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (0, 0);
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => disk_usage(&e.path()),
            Ok(m) => (m.blocks() * 512, m.len()),
            Err(_) => (0, 0),
        })
        .fold((0, 0), |(w, l), (dw, dl)| (w + dw, l + dl))
}

async fn trip(
    client: &Client,
    wasm: &[u8],
    itinerary: &[&str],
    args: &[(&str, u64)],
) -> anyhow::Result<Trip> {
    let args: BTreeMap<String, String> = args
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let itinerary = itinerary.iter().map(|s| s.to_string()).collect();
    let mut hops = Vec::new();
    let started = Instant::now();
    let last = client
        .launch(wasm, itinerary, args, &mut |event| {
            if let LaunchEvent::Moved(info) = event {
                hops.push(info.clone());
            }
        })
        .await
        .map_err(anyhow::Error::msg)?;
    match last {
        LaunchEvent::Finished {
            outcome: AgentEnd::Finished(_),
            hops: n,
            ..
        } if n == hops.len() as u64 => {}
        other => anyhow::bail!("the bench agent did not end well: {other:?}"),
    }
    hops.sort_by_key(|h| h.seq);
    Ok(Trip {
        memory: hops.last().map_or(0, |h| h.memory_bytes),
        hops,
        wall: started.elapsed(),
    })
}

fn print_report(rows: &[Row], rounds: usize) {
    println!("## Results\n");
    println!("| figure | target | measured | how |");
    println!("|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} |",
            r.figure, r.target, r.measured, r.how
        );
    }
    println!("\n## Environment\n");
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpu
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map_or("unknown", |m| m.trim_start_matches([' ', '\t', ':']));
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("- CPU: {model}, {cores} cores available");
    println!("- OS: {}", std::env::consts::OS);
    for (name, version) in locked_versions(&["wasmtime", "quinn", "rustls", "redb", "zstd"]) {
        println!("- {name} {version}");
    }
    println!("- rounds: {rounds} (`scripts/bench {rounds}`), release build, loopback UDP");
}

/// Versions of `crates` in the workspace's Cargo.lock.
fn locked_versions(crates: &[&str]) -> Vec<(String, String)> {
    let lock = std::fs::read_to_string(repo().join("Cargo.lock")).unwrap_or_default();
    let mut out = Vec::new();
    let mut name = None;
    for line in lock.lines() {
        if let Some(n) = line.strip_prefix("name = ") {
            name = Some(n.trim_matches('"').to_string());
        } else if let (Some(v), Some(n)) = (line.strip_prefix("version = "), name.take())
            && crates.contains(&n.as_str())
        {
            out.push((n, v.trim_matches('"').to_string()));
        }
    }
    out
}

/// The count the environment variable `name` sets, or `default`.
fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}
