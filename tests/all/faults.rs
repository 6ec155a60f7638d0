//! A host crashes (aborts, like a power cut) at each named crash point of the hop protocol
//! and starts again from its data directory: every agent finishes exactly once, with one
//! result for its launcher and one recorded visit per site it stayed on.
//!
//! The agent is the search agent launched on siteA with the itinerary siteB, siteC, siteA;
//! the last test moves a 12 MiB bench agent instead.

use agent_e2e::{Cluster, example_path, finish, json, site_names};
use std::time::{Duration, Instant};

const SITES: [&str; 3] = ["siteA", "siteB", "siteC"];

/// What the launcher and the sites' journals must show after the crash and the restart.
struct Expect {
    /// Sites the agent searched, in order.
    visited: &'static [&'static str],
    /// Sites it skipped because the hop there was aborted.
    skipped: &'static [&'static str],
    /// Hop seqs the launcher saw (an aborted attempt uses up its seq).
    hops: &'static [u64],
    /// For each site, the hop seqs of the calls journaled there.
    visits: [&'static [u64]; 3],
}

/// The hop to siteB was aborted: the agent stayed on siteA and went on to siteC.
const B_ABORTED: Expect = Expect {
    visited: &["siteC", "siteA"],
    skipped: &["siteB"],
    hops: &[2, 3],
    visits: [&[3], &[], &[2]],
};

/// The hop from siteB to siteC was aborted: the agent stayed on siteB and went home.
const C_ABORTED: Expect = Expect {
    visited: &["siteB", "siteA"],
    skipped: &["siteC"],
    hops: &[1, 3],
    visits: [&[3], &[1], &[]],
};

/// Every hop happened, once.
const ALL_HOPS: Expect = Expect {
    visited: &["siteB", "siteC", "siteA"],
    skipped: &[],
    hops: &[1, 2, 3],
    visits: [&[3], &[1], &[2]],
};

/// A source that crashes before DEPARTED may or may not have made its departure durable (the
/// record is written while the image travels). If it had, the restarted source asks and the
/// hop to siteC is aborted; if not, it goes on from the agent's arrival on siteB, whose
/// journaled search is replayed, and makes the same hop again.
const EITHER: &[&Expect] = &[&C_ABORTED, &ALL_HOPS];

/// Launches the search agent with `site` set to abort at `point`, restarts `site` after the
/// crash, and checks the outcome against the one of `outcomes` with the sites it visited.
fn crash_and_recover(site: &str, point: &str, outcomes: &[&Expect]) {
    let wasm = example_path("search");
    let mut cluster = Cluster::start_crashing(&SITES, site, point);

    let launch = [
        "launch",
        &wasm,
        "--hop",
        "siteB,siteC,siteA",
        "--arg",
        "query=migration",
        "--json",
    ];
    let launcher = cluster.spawn_agent(&launch, "siteA", "alice");
    restart_after_crash(&mut cluster, site, point);

    let out = finish(launcher, Duration::from_secs(90));
    let logs = || {
        SITES
            .iter()
            .map(|s| format!("--- {s}\n{}", cluster.log(s)))
            .collect::<String>()
    };
    let report = launcher_report(&out, &logs);
    assert_eq!(report["ok"], true, "{report:#}\n{}", logs());
    let visited = site_names(&report["result"]["visited"]);
    let Some(expect) = outcomes.iter().find(|e| e.visited == visited) else {
        panic!(
            "no outcome expected visits {visited:?}: {report:#}\n{}",
            logs()
        );
    };
    assert_eq!(
        site_names(&report["result"]["skipped"]),
        expect.skipped,
        "{report:#}"
    );
    let hops: Vec<u64> = report["hops"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| h["seq"].as_u64())
        .collect();
    assert_eq!(
        hops,
        expect.hops,
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        logs()
    );

    let agent = report["agent"].as_str().unwrap_or_default().to_string();
    for s in SITES {
        cluster.stop(s);
    }
    for (s, want) in SITES.iter().zip(expect.visits) {
        let seqs: Vec<u64> = cluster
            .visits(s)
            .into_iter()
            .filter(|(a, _)| *a == agent)
            .map(|(_, seq)| seq)
            .collect();
        assert_eq!(seqs, want, "visits recorded on {s}");
    }
}

#[test]
fn destination_crashes_after_accepting_the_offer() {
    crash_and_recover("siteB", "dest-after-offer", &[&B_ABORTED]);
}

#[test]
fn destination_crashes_with_the_module_received() {
    crash_and_recover("siteB", "dest-mid-module", &[&B_ABORTED]);
}

#[test]
fn destination_crashes_with_the_image_received_but_not_stored() {
    crash_and_recover("siteB", "dest-mid-image", &[&B_ABORTED]);
}

#[test]
fn destination_crashes_after_committing_before_answering() {
    crash_and_recover("siteB", "dest-after-commit", &[&ALL_HOPS]);
}

#[test]
fn source_crashes_after_the_offer_is_accepted() {
    crash_and_recover("siteB", "source-after-offer", EITHER);
}

#[test]
fn source_crashes_half_way_through_the_module() {
    crash_and_recover("siteB", "source-mid-module", EITHER);
}

#[test]
fn source_crashes_half_way_through_the_image() {
    crash_and_recover("siteB", "source-mid-image", EITHER);
}

#[test]
fn source_crashes_with_the_departure_durable_before_confirming_it() {
    crash_and_recover("siteB", "source-before-departed", &[&C_ABORTED]);
}

#[test]
fn destination_crashes_running_the_agent_before_committing_it() {
    crash_and_recover("siteB", "dest-before-commit", &[&B_ABORTED]);
}

#[test]
fn source_crashes_after_the_commit_before_cleaning_up() {
    crash_and_recover("siteB", "source-after-committed", &[&ALL_HOPS]);
}

#[test]
fn source_crashes_after_its_forward_was_committed_but_not_synced() {
    crash_and_recover("siteB", "source-after-forward", &[&ALL_HOPS]);
}

#[test]
fn a_host_crashes_after_a_service_call_and_the_agent_replays_it_from_the_journal() {
    crash_and_recover("siteC", "after-call", &[&ALL_HOPS]);
}

/// A large image's departure is recorded only once the image has been sent; it must still be
/// durable before DEPARTED. The source crashes right before DEPARTED: restarted, it finds the
/// record and asks, the destination (which never heard DEPARTED) aborts, and the agent fails
/// its hop on the source. Had the record not been durable, the restarted source would have
/// gone on from the agent's launch instead of asking.
#[test]
fn a_large_agent_s_source_crashes_before_confirming_with_its_departure_durable() {
    large_source_crashes_before_confirming(&[]);
}

/// As above, on a source that keeps no pages for a return visit: the image is then sent and
/// its departure recorded from the suspended agent's memory, never copied out.
#[test]
fn a_large_agent_s_departure_recorded_from_its_memory_is_durable_before_confirming() {
    large_source_crashes_before_confirming(&["--return-cache-mib", "0"]);
}

/// The agent hops once siteA → siteB; siteA, started with `source_args`, crashes right
/// before DEPARTED and is restarted.
fn large_source_crashes_before_confirming(source_args: &[&str]) {
    let wasm = example_path("bench");
    let up: &[&str] = &[];
    let mut cluster = Cluster::start(&["siteA", "siteB"], &[("siteB", up)]);
    cluster.start_with(
        "siteA",
        source_args,
        &[("FAILPOINTS", "source-before-departed=return")],
    );
    // 12 MiB of incompressible heap: a raw image past the size recorded after it is sent.
    let launch = [
        "launch",
        &wasm,
        "--hop",
        "siteB",
        "--arg",
        "dirty_kib=12288",
        "--arg",
        "hops=1",
        "--json",
    ];
    let launcher = cluster.spawn_agent(&launch, "siteA", "alice");
    restart_after_crash(&mut cluster, "siteA", "source-before-departed");
    let out = finish(launcher, Duration::from_secs(90));
    assert!(
        cluster
            .log("siteA")
            .contains("asking where a departing agent is"),
        "restarted, siteA found no departure record:\n{}",
        cluster.log("siteA")
    );
    let logs = || {
        format!(
            "--- siteA\n{}--- siteB\n{}",
            cluster.log("siteA"),
            cluster.log("siteB")
        )
    };
    let report = launcher_report(&out, &logs);
    assert_eq!(
        report["ok"],
        false,
        "the hop was aborted: {report:#}\n{}",
        logs()
    );
    let error = report["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("siteB") && error.contains("aborted"),
        "{report:#}\n{}",
        logs()
    );
}

/// The launcher's JSON report, or a panic showing its output and the hosts' `logs`.
fn launcher_report(out: &std::process::Output, logs: &dyn Fn() -> String) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no result ({e}):\n{}\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            logs()
        )
    })
}

/// Waits for `site` to crash at `point` (and nowhere else), then starts it again.
fn restart_after_crash(cluster: &mut Cluster, site: &str, point: &str) {
    let status = cluster.wait_exit(site, Duration::from_secs(60));
    assert!(!status.success(), "{site} should have crashed at {point}");
    assert!(
        cluster.log(site).contains(&format!("crash point {point}")),
        "{site} crashed elsewhere:\n{}",
        cluster.log(site)
    );
    cluster.restart(site, &[]);
}

/// The agent's end reaches its home before the report of its last hop (that hop's source
/// crashed right after it), and the home is killed while it holds that end back: restarted,
/// it still holds it, and records it once the hop is reported. Before, the home acknowledged
/// a held end without storing it, and its reporter forgot it: the agent stayed `running`.
#[test]
fn an_end_held_back_by_its_home_survives_a_crash_of_the_home() {
    let wasm = example_path("search");
    let up: &[&str] = &[];
    let mut cluster = Cluster::start(&SITES, &[("siteA", up), ("siteC", up)]);
    cluster.start_with(
        "siteB",
        &[],
        &[("FAILPOINTS", "source-after-forward=return")],
    );
    let launch = [
        "launch",
        &wasm,
        "--hop",
        "siteB,siteC",
        "--arg",
        "query=migration",
        "--detach",
        "--json",
    ];
    let out = cluster.agent(&launch, "siteA", "alice");
    let agent = json(&out)["agent"].as_str().unwrap_or_default().to_string();
    assert!(
        !agent.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cluster.wait_exit("siteB", Duration::from_secs(60));

    // siteC runs the agent to its end and reports it; siteA has not heard of hop 2.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cluster.log("siteA").contains("held for up to") {
        assert!(
            Instant::now() < deadline,
            "siteA never held the end:\n{}\n--- siteC\n{}\n--- siteB\n{}",
            cluster.log("siteA"),
            cluster.log("siteC"),
            cluster.log("siteB")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Time for siteC to hear the acknowledgement and forget its report.
    std::thread::sleep(Duration::from_secs(1));
    cluster.kill("siteA");
    cluster.restart("siteA", &[]);
    cluster.restart("siteB", &[]);

    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let status = json(&cluster.agent(&["status", &agent, "--json"], "siteA", "alice"));
        if status["state"] != "running" {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the end was lost: {status:#}\n--- siteA\n{}\n--- siteC\n{}",
            cluster.log("siteA"),
            cluster.log("siteC")
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(status["state"], "finished", "{status:#}");
    assert_eq!(status["site"], "siteC", "{status:#}");
    assert_eq!(
        site_names(&status["result"]["visited"]),
        ["siteB", "siteC"],
        "{status:#}"
    );
}

/// A hop into the agent's home is recorded by the home, not reported by its source. The home
/// crashes once it committed that hop, before it stored the agent's status: restarted, it
/// records the hop from the agent's trace, and the agent's status holds both hops. Without
/// that, the end waits for a report that never comes and the status lacks the hop home.
#[test]
fn a_hop_home_is_recorded_when_the_home_crashes_right_after_committing_it() {
    let wasm = example_path("search");
    let up: &[&str] = &[];
    let mut cluster = Cluster::start(&SITES, &[("siteB", up), ("siteC", up)]);
    cluster.start_with("siteA", &[], &[("FAILPOINTS", "dest-after-commit=return")]);
    let launch = [
        "launch",
        &wasm,
        "--hop",
        "siteB,siteA",
        "--arg",
        "query=migration",
        "--detach",
        "--json",
    ];
    let out = cluster.agent(&launch, "siteA", "alice");
    let agent = json(&out)["agent"].as_str().unwrap_or_default().to_string();
    assert!(
        !agent.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    restart_after_crash(&mut cluster, "siteA", "dest-after-commit");

    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        let status = json(&cluster.agent(&["status", &agent, "--json"], "siteA", "alice"));
        if status["state"] != "running" {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the agent never ended: {status:#}\n--- siteA\n{}",
            cluster.log("siteA")
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(status["state"], "finished", "{status:#}");
    let path: Vec<(&str, &str)> = (status["hops"].as_array().into_iter().flatten())
        .map(|h| {
            let site = |k: &str| h[k].as_str().unwrap_or_default();
            (site("from"), site("to"))
        })
        .collect();
    assert_eq!(
        path,
        [("siteA", "siteB"), ("siteB", "siteA")],
        "{status:#}\n--- siteA\n{}",
        cluster.log("siteA")
    );
}
