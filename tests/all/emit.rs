//! Values an agent emits (`ctx.emit`) reach its launcher once each and in order, wherever the
//! agent is when it emits them, and when its host crashes after its home held a value.

use agent_e2e::{Cluster, example_path, finish, json};
use std::time::Duration;

const SITES: [&str; 3] = ["siteA", "siteB", "siteC"];

/// The values the launcher printed, as (number, site).
fn emitted(report: &serde_json::Value) -> Vec<(u64, String)> {
    let values = report["emitted"].as_array().into_iter().flatten();
    values
        .map(|v| {
            let site = v["site"].as_str().unwrap_or_default().to_string();
            (v["n"].as_u64().unwrap_or_default(), site)
        })
        .collect()
}

/// What the progress agent emits, launched on siteA with the itinerary siteB, siteC.
fn tour(rounds: usize) -> Vec<(u64, String)> {
    let sites = std::iter::once("siteA").chain(["siteB", "siteC"].repeat(rounds));
    (1..).zip(sites.map(str::to_string)).collect()
}

/// `agent launch` of the progress agent on a tour of siteB and siteC, `rounds` times.
fn tour_launch<'a>(wasm: &'a str, rounds: &'a str) -> [&'a str; 7] {
    [
        "launch",
        wasm,
        "--hop",
        "siteB,siteC",
        "--arg",
        rounds,
        "--json",
    ]
}

#[test]
fn an_agents_values_reach_its_launcher_once_each_in_order_as_it_hops() {
    let up: &[&str] = &[];
    let cluster = Cluster::start(&SITES, &[("siteA", up), ("siteB", up), ("siteC", up)]);
    let wasm = example_path("progress");
    let report = json(&cluster.agent(&tour_launch(&wasm, "rounds=3"), "siteA", "alice"));
    assert_eq!(report["ok"], true, "{report:#}");
    assert_eq!(emitted(&report), tour(3), "{report:#}");
    assert_eq!(report["result"]["emitted"], 7, "{report:#}");
    let agent = report["agent"].as_str().unwrap_or_default();
    let status = json(&cluster.agent(&["status", agent, "--json"], "siteA", "alice"));
    assert_eq!(status["emits"], 7, "{status:#}");
    // Without `--json`, each value is printed as it comes.
    let args = ["launch", &wasm, "--hop", "siteB"];
    let out = cluster.agent(&args, "siteA", "alice");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(r#"emitted: {"n":2,"site":"siteB"}"#),
        "{stderr}"
    );
}

/// siteB crashes right after the home held the value the agent emitted there, before the
/// agent went on: restarted, siteB runs the agent from its arrival again, and the value it
/// emits again is the same one, which the home already holds.
#[test]
fn a_value_emitted_again_after_its_host_crashed_reaches_the_launcher_once() {
    let up: &[&str] = &[];
    let mut cluster = Cluster::start(&SITES, &[("siteA", up), ("siteC", up)]);
    cluster.start_with("siteB", &[], &[("FAILPOINTS", "after-emit=return")]);
    let wasm = example_path("progress");
    let launcher = cluster.spawn_agent(&tour_launch(&wasm, "rounds=2"), "siteA", "alice");
    let status = cluster.wait_exit("siteB", Duration::from_secs(60));
    assert!(
        !status.success(),
        "siteB should have crashed after the emit"
    );
    assert!(cluster.log("siteB").contains("crash point after-emit"));
    cluster.restart("siteB", &[]);
    let out = finish(launcher, Duration::from_secs(90));
    let report = json(&out);
    assert_eq!(report["ok"], true, "{report:#}");
    assert_eq!(emitted(&report), tour(2), "{report:#}");
    assert_eq!(report["result"]["emitted"], 5, "{report:#}");
}
