//! The clones scenario of the bench, with the fork example agent on nine hosts (siteA, the
//! home, and eight others): what a fork of a 1 MiB agent to eight sites costs, and the
//! speed-up of clones over one agent visiting N sites in turn when each site takes W ms.

use crate::{Row, stats};
use agent_runtime::net::client::Client;
use agent_runtime::net::messages::{AgentEnd, HopInfo, LaunchEvent};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The hosts of the scenario: the home first.
pub const SITES: [&str; 9] = [
    "siteA", "siteB", "siteC", "siteD", "siteE", "siteF", "siteG", "siteH", "siteI",
];

/// Service time per site in the speed-up figure.
const WORK_MS: u64 = 200;

/// One launch of the fork agent followed to its end: its children's first hops (their
/// creation), and the time from launch to the end of the whole family.
async fn fork(
    client: &Client,
    wasm: &[u8],
    sites: &[&str],
    args: &[(&str, &str)],
) -> anyhow::Result<(Vec<HopInfo>, Duration)> {
    let itinerary = sites.iter().map(|s| s.to_string()).collect();
    let args: BTreeMap<String, String> = (args.iter())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut made = Vec::new();
    let started = Instant::now();
    let last = client
        .launch(wasm, itinerary, args, &mut |event| {
            if let LaunchEvent::Child { event, .. } = event
                && let LaunchEvent::Moved(hop) = &**event
                && hop.seq == 1
            {
                made.push(hop.clone());
            }
        })
        .await
        .map_err(anyhow::Error::msg)?;
    let wall = started.elapsed();
    match last {
        LaunchEvent::Finished {
            outcome: AgentEnd::Finished(_),
            ..
        } => Ok((made, wall)),
        other => anyhow::bail!("the fork agent did not end well: {other:?}"),
    }
}

/// A 1 MiB agent on siteA forks into one child on each of the eight other hosts: the time
/// from the start of its clone until the last child runs (the children's clocks are siteA's:
/// one machine).
pub async fn fork_cost(client: &Client, wasm: &[u8], rounds: usize) -> anyhow::Result<Row> {
    // A first fork carries the module to every host; it is not counted.
    fork(client, wasm, &SITES[1..], &[("mib", "1")]).await?;
    let (mut eight, mut one) = (Vec::new(), Vec::new());
    for _ in 0..rounds.max(5) {
        eight.push(until_all_run(client, wasm, &SITES[1..]).await?);
        one.push(until_all_run(client, wasm, &SITES[1..2]).await?);
    }
    let (eight, one) = (stats(eight), stats(one));
    Ok(Row {
        figure: "fork: a 1 MiB agent cloned to 8 sites, until every child runs",
        target: "p50 ≤ 5 ms",
        measured: format!(
            "p50 {:.2} ms, p99 {:.2} ms (n={}); to 1 site: p50 {:.2} ms",
            eight.p50, eight.p99, eight.n, one.p50
        ),
        how: "fork agent with `mib=1` on siteA, children on siteB..siteI (and on siteB alone, \
              alternately); from the start of `ctx.clone_to` (parent frozen) to the last child \
              resumed on its host"
            .into(),
    })
}

/// Milliseconds from the start of a 1 MiB agent's clone to `sites` until its last child ran.
async fn until_all_run(client: &Client, wasm: &[u8], sites: &[&str]) -> anyhow::Result<f64> {
    let (made, _) = fork(client, wasm, sites, &[("mib", "1")]).await?;
    anyhow::ensure!(made.len() == sites.len(), "not every child was made");
    let began = made.iter().map(|h| h.frozen_at_us).min().unwrap_or(0);
    let last = made.iter().map(|h| h.resumed_at_us).max().unwrap_or(0);
    Ok(last.saturating_sub(began) as f64 / 1e3)
}

/// N sites that each take `WORK_MS` of service time: one agent visiting them in turn against
/// clones, one child per site, gathered by the parent; wall time from launch to the end of
/// the whole family, side by side, for N = 2, 4, 8.
pub async fn speedup(client: &Client, wasm: &[u8], rounds: usize) -> anyhow::Result<Row> {
    let work = WORK_MS.to_string();
    let work = work.as_str();
    let mut cells = Vec::new();
    for n in [2, 4, 8] {
        let sites = &SITES[1..=n];
        let (mut tour, mut clones) = (Vec::new(), Vec::new());
        for _ in 0..rounds.max(3) {
            let (toured, forked) = ([("tour", "true"), ("work_ms", work)], [("work_ms", work)]);
            tour.push(fork(client, wasm, sites, &toured).await?.1.as_secs_f64());
            clones.push(fork(client, wasm, sites, &forked).await?.1.as_secs_f64());
        }
        let (tour, clones) = (stats(tour).p50, stats(clones).p50);
        cells.push(format!(
            "N={n}: {:.2}× ({:.0} ms against {:.0} ms)",
            tour / clones,
            clones * 1e3,
            tour * 1e3
        ));
    }
    Ok(Row {
        figure: "speed-up of clones over a tour of N sites",
        target: "≥ 0.8 × N",
        measured: cells.join("; "),
        how: format!(
            "fork agent from siteA; each site's service takes {WORK_MS} ms (a wait on the \
             site, not CPU: the hosts share this machine's cores as separate machines would \
             not); medians of launch-to-end wall time, tour (`tour=true`) and clones run \
             alternately"
        ),
    })
}
