//! Sleeping agents between real hosts: a long `ctx.sleep` parks the agent (stored, its
//! instance freed) on the host it sleeps on; it wakes there on time, after a crash of that host
//! too, and a kill ends it without waking it.

use agent_e2e::{Cluster, example_path, finish, json};
use std::time::{Duration, Instant};

/// `agent launch` arguments of the bench agent: one hop to siteB, 64 KiB of heap, then a
/// sleep of `sleep_ms` there.
fn launch_args(wasm: &str, sleep_ms: &str) -> Vec<String> {
    [
        "launch",
        wasm,
        "--hop",
        "siteB",
        "--arg",
        "dirty_kib=64",
        "--arg",
        &format!("sleep_ms={sleep_ms}"),
        "--json",
    ]
    .map(str::to_string)
    .to_vec()
}

fn launch(cluster: &Cluster, sleep_ms: &str) -> serde_json::Value {
    let wasm = example_path("bench");
    let args = launch_args(&wasm, sleep_ms);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = cluster.agent(&args, "siteA", "alice");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.log("siteB")
    );
    json(&out)
}

/// The id of alice's only agent launched on siteA.
fn only_agent(cluster: &Cluster) -> String {
    let list = json(&cluster.agent(&["list", "--json"], "siteA", "alice"));
    let agents = list.as_array().cloned().unwrap_or_default();
    assert_eq!(agents.len(), 1, "{list}");
    agents[0]["agent"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in {list}"))
        .to_string()
}

#[test]
fn a_long_sleep_parks_the_agent_and_it_wakes_where_it_slept() {
    let cluster = Cluster::start(&["siteA", "siteB"], &[("siteA", &[]), ("siteB", &[])]);
    let awake = launch(&cluster, "0");
    assert!(!cluster.log("siteB").contains("parked asleep"));

    // Shorter than the host's parking threshold: the agent waits in memory.
    launch(&cluster, "200");
    assert!(!cluster.log("siteB").contains("parked asleep"));

    let started = Instant::now();
    let slept = launch(&cluster, "1500");
    assert!(started.elapsed() >= Duration::from_millis(1500));
    let log = cluster.log("siteB");
    assert_eq!(log.matches("parked asleep").count(), 1, "{log}");
    assert_eq!(log.matches("woke").count(), 1, "{log}");
    // It hopped once, slept on siteB and ended there with the same state as without sleeping.
    assert_eq!(slept["result"], awake["result"]);
    assert_eq!(slept["hops"].as_array().map(Vec::len), Some(1));
}

#[test]
fn a_parked_agent_wakes_after_its_host_crashed() {
    let mut cluster = Cluster::start(&["siteA", "siteB"], &[("siteA", &[]), ("siteB", &[])]);
    let wasm = example_path("bench");
    let args = launch_args(&wasm, "4000");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let launcher = cluster.spawn_agent(&args, "siteA", "alice");
    cluster.wait_for_log("siteB", "parked asleep", 1);

    // The home host heard of the sleep.
    let id = only_agent(&cluster);
    let status = json(&cluster.agent(&["status", &id, "--json"], "siteA", "alice"));
    assert!(status["sleeping_until_ms"].as_u64().is_some(), "{status}");
    assert_eq!(status["activity"], "sleeping", "{status}");
    assert_eq!(status["site"], "siteB", "{status}");

    cluster.kill("siteB");
    cluster.restart("siteB", &[]);
    let out = finish(launcher, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.log("siteB")
    );
    let ended = json(&out);
    assert_eq!(ended["result"]["hops"], 1, "{ended}");
    assert_eq!(cluster.log("siteB").matches("woke").count(), 1);
}

#[test]
fn killing_a_parked_agent_ends_it_without_waking_it() {
    let cluster = Cluster::start(&["siteA", "siteB"], &[("siteA", &[]), ("siteB", &[])]);
    let wasm = example_path("bench");
    let mut args = launch_args(&wasm, "600000");
    args.push("--detach".into());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // Detached: the launcher returns with the id once the home started the agent.
    let launched = json(&cluster.agent(&args, "siteA", "alice"));
    let id = launched["agent"]
        .as_str()
        .unwrap_or_else(|| panic!("no id in {launched}"))
        .to_string();
    assert_eq!(launched["site"], "siteA");
    cluster.wait_for_log("siteB", "parked asleep", 1);
    assert_eq!(only_agent(&cluster), id);

    let killed = cluster.agent(&["kill", &id], "siteA", "alice");
    assert!(
        killed.status.success(),
        "{}",
        String::from_utf8_lossy(&killed.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        let status = json(&cluster.agent(&["status", &id, "--json"], "siteA", "alice"));
        if status["state"] != "running" || Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status["state"], "killed", "{status}");
    assert!(
        status["error"]
            .as_str()
            .is_some_and(|e| e.contains("killed")),
        "{status}"
    );
    assert!(status["sleeping_until_ms"].is_null(), "{status}");
    assert!(!cluster.log("siteB").contains("woke"));
    // Killed once: a second kill finds nothing to stop.
    let again = cluster.agent(&["kill", &id], "siteA", "alice");
    assert!(!again.status.success());
}
