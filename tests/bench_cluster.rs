//! The gossip scenario of the bench: membership and placement of 1,000 simulated hosts in
//! virtual time (the hosts' own code, without I/O): how fast a join and a failure become
//! known to every host, what the gossip costs each host, and how evenly agents launched on
//! few hosts spread.

use crate::{Row, stats};
use agent_abi::Place;
use agent_runtime::cluster::sim::Sim;
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use std::time::Duration;

/// Hosts simulated (`BENCH_HOSTS=N` for another number).
fn hosts() -> u32 {
    std::env::var("BENCH_HOSTS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1000)
}

const STEP: Duration = Duration::from_millis(100);

/// Agents launched per host in the placement figure, and how many hosts launch them.
const AGENTS_PER_HOST: u32 = 20;
const LAUNCHERS: usize = 10;

struct Round {
    join: f64,
    failure: f64,
    bytes_per_host_sec: f64,
    max_over_mean: f64,
    /// The same launch placed by two choices on true loads, as the reference.
    ideal_max_over_mean: f64,
}

fn round(seed: u64) -> anyhow::Result<Round> {
    let hosts = hosts();
    let n = hosts as usize;
    let mut sim = Sim::new(hosts, seed);
    sim.start(None);
    // Each host knows one seed: one of those started before it.
    for i in 1..n {
        sim.start(Some((i * 7919 + seed as usize) % i));
        if i % 50 == 0 {
            let next = sim.now() + Duration::from_millis(100);
            sim.run_until(next);
        }
    }
    let everyone = |s: &Sim| (0..n).all(|i| s.seen_up(i) == hosts - 1);
    let formed = sim
        .run_while(STEP, Duration::from_secs(600), everyone)
        .ok_or_else(|| anyhow::anyhow!("the hosts did not all see each other in 600 s"))?;
    eprintln!("bench: {hosts} simulated hosts all see each other after {formed:.1?} (virtual)");

    let bytes = sim.bytes;
    let quiet = Duration::from_secs(30);
    let until = sim.now() + quiet;
    sim.run_until(until);
    let bytes_per_host_sec = (sim.bytes - bytes) as f64 / f64::from(hosts) / quiet.as_secs_f64();

    let late = sim.start(Some(n / 2));
    let join = sim
        .run_while(STEP, Duration::from_secs(120), |s| s.seen_up(late) == hosts)
        .ok_or_else(|| anyhow::anyhow!("a join was not known by all in 120 s"))?;

    let dead = n / 3;
    sim.kill(dead);
    let failure = sim
        .run_while(STEP, Duration::from_secs(120), |s| {
            s.seen_up_by_live(dead) == 0
        })
        .ok_or_else(|| anyhow::anyhow!("a failure was not known by all in 120 s"))?;

    // Launches at 200 agents a second from a few hosts, each placing least-loaded; beside
    // them, the same number placed by two choices on the true counts.
    let live: Vec<usize> = (0..=n).filter(|&i| i != dead).collect();
    let agents = AGENTS_PER_HOST * live.len() as u32;
    let mut reference = vec![0u32; live.len()];
    let mut rng = SmallRng::seed_from_u64(seed);
    for k in 0..agents {
        sim.place(k as usize % LAUNCHERS, &Place::least_loaded());
        let next = sim.now() + Duration::from_millis(5);
        sim.run_until(next);
        let (a, b) = (
            rng.random_range(0..live.len()),
            rng.random_range(0..live.len()),
        );
        let lighter = if reference[a] <= reference[b] { a } else { b };
        reference[lighter] += 1;
    }
    let max = live.iter().map(|&i| sim.agents[i]).max().unwrap_or(0);
    let ideal_max = reference.iter().copied().max().unwrap_or(0);
    let mean = f64::from(AGENTS_PER_HOST);
    Ok(Round {
        join: join.as_secs_f64(),
        failure: failure.as_secs_f64(),
        bytes_per_host_sec,
        max_over_mean: f64::from(max) / mean,
        ideal_max_over_mean: f64::from(ideal_max) / mean,
    })
}

/// The rows of the gossip scenario.
pub fn simulation(rounds: usize) -> anyhow::Result<Vec<Row>> {
    let runs = (0..rounds as u64)
        .map(round)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let pick = |f: fn(&Round) -> f64| stats(runs.iter().map(f).collect());
    let (join, failure, bytes, spread, ideal) = (
        pick(|r| r.join),
        pick(|r| r.failure),
        pick(|r| r.bytes_per_host_sec),
        pick(|r| r.max_over_mean),
        pick(|r| r.ideal_max_over_mean),
    );
    let how = |what: &str| {
        format!(
            "{} hosts simulated in virtual time (links 0.5–2 ms), each started knowing \
             one earlier host; {what}; median of {} runs (min, max)",
            hosts(),
            join.n
        )
    };
    Ok(vec![
        Row {
            figure: "a join known by all of 1,000 hosts",
            target: "≤ 10 s",
            measured: format!("**{:.1} s** ({:.1}, {:.1})", join.p50, join.min, join.max),
            how: how("a new host joins through one; time until every host has it up"),
        },
        Row {
            figure: "a failure known by all of 1,000 hosts",
            target: "≤ 15 s",
            measured: format!(
                "**{:.1} s** ({:.1}, {:.1})",
                failure.p50, failure.min, failure.max
            ),
            how: how("one host stops answering; time until no live host has it up"),
        },
        Row {
            figure: "gossip bytes per host per second, 1,000 hosts",
            target: "—",
            measured: format!(
                "**{:.0} B/s** ({:.0}, {:.0})",
                bytes.p50, bytes.min, bytes.max
            ),
            how: how("bytes of membership messages sent by all hosts over 30 s, ÷ hosts ÷ 30"),
        },
        Row {
            figure: "spread of a skewed launch, 1,000 hosts: max ÷ mean agents per host \
                     (gossiped loads; true loads)",
            target: "—",
            measured: format!(
                "**{:.2}** ({:.2}, {:.2}); {:.2}",
                spread.p50, spread.min, spread.max, ideal.p50
            ),
            how: how(&format!(
                "{AGENTS_PER_HOST} agents per live host launched on {LAUNCHERS} of the hosts \
                 at 200 a second, each placed `least-loaded` on the loads the launcher heard; \
                 beside it, the same count placed by two choices on the true counts"
            )),
        },
    ])
}
