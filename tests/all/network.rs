//! Bad networks between hosts, made by relays on loopback: packet loss, a cut path, and a
//! path cut in the middle of a transfer. Hops complete or fail cleanly; no agent is lost and
//! no visit happens twice.

use agent_e2e::relay::Relay;
use agent_e2e::{Cluster, example_path, site_names};
use std::time::Duration;

const SITES: [&str; 3] = ["siteA", "siteB", "siteC"];

/// Launches the search agent on siteA for siteB, siteC, siteA and returns its JSON report.
fn launch(cluster: &Cluster) -> serde_json::Value {
    let wasm = example_path("search");
    let args = [
        "launch",
        &wasm,
        "--hop",
        "siteB,siteC,siteA",
        "--arg",
        "query=migration",
        "--json",
    ];
    let out = cluster.agent(&args, "siteA", "alice");
    let logs: String = SITES
        .iter()
        .map(|s| format!("--- {s}\n{}", cluster.log(s)))
        .collect();
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no result ({e}):\n{}\n{logs}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(report["ok"], true, "{report:#}\n{logs}");
    report
}

/// Stops the hosts and checks that each site recorded exactly one visit of the agent if it
/// is in `visited`, and none otherwise.
fn assert_visits_once(cluster: &mut Cluster, report: &serde_json::Value) {
    let agent = report["agent"].as_str().unwrap_or_default().to_string();
    let visited = site_names(&report["result"]["visited"]);
    for s in SITES {
        cluster.stop(s);
    }
    for s in SITES {
        let visits = cluster
            .visits(s)
            .into_iter()
            .filter(|(a, _)| *a == agent)
            .count();
        let want = usize::from(visited.iter().any(|v| v == s));
        assert_eq!(visits, want, "visits on {s} ({report:#})");
    }
}

#[test]
fn hops_complete_or_fail_cleanly_while_a_tenth_of_all_packets_are_lost() {
    let (mut cluster, relays) = Cluster::start_lossy(&SITES, 100, Duration::from_micros(200));
    let report = launch(&cluster);
    let mut seen = site_names(&report["result"]["visited"]);
    seen.extend(site_names(&report["result"]["skipped"]));
    seen.sort();
    assert_eq!(seen, SITES, "every site is visited or skipped: {report:#}");
    assert!(
        relays.iter().map(Relay::dropped).sum::<u64>() > 0,
        "the relays dropped nothing"
    );
    assert_visits_once(&mut cluster, &report);
}

#[test]
fn a_cut_path_fails_the_hop_cleanly_and_works_again_once_healed() {
    let mut cluster = Cluster::start(&SITES, &[]);
    let relay = cluster.relay("siteA", "siteB");
    relay.set_cut(true);
    for s in SITES {
        cluster.start_with(s, &[], &[]);
    }
    let cut = launch(&cluster);
    assert_eq!(site_names(&cut["result"]["visited"]), ["siteC", "siteA"]);
    assert_eq!(site_names(&cut["result"]["skipped"]), ["siteB"]);
    let skipped = cut["result"]["skipped"][0].as_str().unwrap_or_default();
    assert!(skipped.contains("unreachable"), "{skipped}");

    relay.set_cut(false);
    let healed = launch(&cluster);
    assert_eq!(
        site_names(&healed["result"]["visited"]),
        ["siteB", "siteC", "siteA"]
    );
    assert_visits_once(&mut cluster, &healed);
}

#[test]
fn a_path_cut_during_the_transfer_delays_the_hop_and_it_happens_once() {
    let mut cluster = Cluster::start(&SITES, &[]);
    let relay = cluster.relay("siteA", "siteB");
    for s in SITES {
        cluster.start_with(s, &[], &[]);
    }
    // The module (about 300 KiB) is on its way when the cut starts; it lasts longer than the
    // source waits for a verdict, so the source also has to ask through the cut.
    relay.cut_after(100_000, Duration::from_secs(7));
    let report = launch(&cluster);
    assert!(relay.dropped() > 0, "the cut never happened");
    assert_eq!(
        site_names(&report["result"]["visited"]),
        ["siteB", "siteC", "siteA"],
        "{report:#}"
    );
    let seqs: Vec<u64> = report["hops"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| h["seq"].as_u64())
        .collect();
    assert_eq!(seqs, [1, 2, 3]);
    assert_visits_once(&mut cluster, &report);
}
