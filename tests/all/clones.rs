//! Clones: an agent forks into children on other hosts, each created once, and its launcher
//! sees the tree.

use agent_e2e::{Cluster, agent_bin, example_path, json, repo};
use std::process::Command;
use std::time::{Duration, Instant};

const SITES: [&str; 3] = ["siteA", "siteB", "siteC"];

fn three_hosts(extra: &[&str]) -> Cluster {
    Cluster::start(
        &SITES,
        &[("siteA", extra), ("siteB", extra), ("siteC", extra)],
    )
}

/// `agent launch --json` of the search agent as alice through `home`, with `args`.
fn search(cluster: &Cluster, home: &str, args: &[&str]) -> serde_json::Value {
    let wasm = example_path("search");
    let mut line = vec!["launch", &wasm, "--hop", "siteA,siteB,siteC", "--json"];
    for arg in args {
        line.extend(["--arg", arg]);
    }
    let out = cluster.agent(&line, home, "alice");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    json(&out)
}

/// The sites a report visited.
fn visited(report: &serde_json::Value) -> Vec<String> {
    (report["visited"].as_array().into_iter().flatten())
        .filter_map(|v| v.as_str().map(String::from))
        .collect()
}

#[test]
fn a_parallel_search_clones_to_every_site_and_returns_what_a_tour_returns() {
    let cluster = three_hosts(&[]);
    let tour = search(&cluster, "siteA", &["query=migration"]);
    let parallel = search(&cluster, "siteA", &["query=migration", "parallel=true"]);
    // The same hits, in the same order, as one agent visiting each site in turn.
    assert_eq!(parallel["result"]["hits"], tour["result"]["hits"]);
    assert_eq!(visited(&parallel["result"]), SITES);
    assert!(!tour["result"]["hits"].as_array().unwrap().is_empty());
    // The launcher saw three children, each on its site, each ended well.
    let children = parallel["children"].as_array().unwrap();
    assert_eq!(children.len(), 3, "{parallel:#}");
    for (child, site) in children.iter().zip(SITES) {
        assert_eq!(child["site"], site, "{child:#}");
        assert_eq!(child["ok"], true, "{child:#}");
        assert_eq!(child["parent"], parallel["agent"], "{child:#}");
        assert_eq!(visited(&child["result"]), [site]);
        assert_ne!(child["agent"], parallel["agent"]);
    }
    // The parent stayed home: it never hopped.
    assert_eq!(parallel["hops"].as_array().unwrap().len(), 0);

    // The home knows the tree.
    let id = parallel["agent"].as_str().unwrap();
    let status = json(&cluster.agent(&["status", id, "--json"], "siteA", "alice"));
    assert_eq!(status["children"].as_array().unwrap().len(), 3);
    let child = children[1]["agent"].as_str().unwrap();
    let status = json(&cluster.agent(&["status", child, "--json"], "siteA", "alice"));
    assert_eq!(status["parent"], id);
    assert_eq!(status["state"], "finished");
    assert_eq!(status["hops"][0]["from"], "siteA");
    assert_eq!(status["hops"][0]["to"], "siteB");
}

#[test]
fn a_child_that_cannot_be_made_is_an_error_for_its_site_and_the_others_go_on() {
    // siteC is known to the others but down.
    let up: &[&str] = &[];
    let cluster = Cluster::start(&SITES, &[("siteA", up), ("siteB", up)]);
    let wasm = example_path("search");
    let out = cluster.agent(
        &[
            "launch",
            &wasm,
            "--hop",
            "siteA,siteB,siteC,nowhere",
            "--json",
            "--arg",
            "query=migration",
            "--arg",
            "parallel=true",
        ],
        "siteA",
        "alice",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let report = json(&out);
    assert_eq!(visited(&report["result"]), ["siteA", "siteB"]);
    let skipped = report["result"]["skipped"].to_string();
    assert!(
        skipped.contains("siteC: site `siteC` unreachable"),
        "{skipped}"
    );
    assert!(
        skipped.contains("nowhere: unknown site `nowhere`"),
        "{skipped}"
    );
    // The child that never was is shown as such; an unknown site made no child at all.
    let children = report["children"].as_array().unwrap();
    assert_eq!(children.len(), 3, "{report:#}");
    assert_eq!(children[2]["ok"], false);
    assert!(children[2]["error"].to_string().contains("not created"));
}

#[test]
fn too_many_children_is_an_error_in_the_agent() {
    let cluster = three_hosts(&["--max-children", "2"]);
    let report = search(&cluster, "siteA", &["query=migration", "parallel=true"]);
    let skipped = report["result"]["skipped"].to_string();
    assert!(
        skipped.contains("an agent may have 2 children in all"),
        "{skipped}"
    );
    assert!(visited(&report["result"]).is_empty());
    assert!(report["children"].as_array().is_none_or(|c| c.is_empty()));
}

#[test]
fn the_owners_live_agents_are_capped_at_the_home() {
    let cluster = three_hosts(&["--user-live-agents", "3"]);
    let report = search(&cluster, "siteA", &["query=migration", "parallel=true"]);
    let skipped = report["result"]["skipped"].to_string();
    assert!(
        skipped.contains("the owner has 3 live agents launched from this agent's home"),
        "{skipped}"
    );
}

/// `agent launch FLAG` of the fork agent as alice through siteA, to `sites`, with `args`.
fn fork(cluster: &Cluster, sites: &str, args: &[&str], flag: &str) -> std::process::Output {
    let wasm = example_path("fork");
    let mut line = vec!["launch", &wasm, "--hop", sites, flag];
    for arg in args {
        line.extend(["--arg", arg]);
    }
    cluster.agent(&line, "siteA", "alice")
}

#[test]
fn children_inherit_their_parents_memory_and_report_to_it() {
    let cluster = three_hosts(&[]);
    // Two children on one site, one on the parent's own site.
    let out = fork(&cluster, "siteB,siteC,siteC,siteA", &["mib=2"], "--json");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = json(&out);
    let parent = &report["result"];
    assert_eq!(
        parent["reported"],
        serde_json::json!([0, 1, 2, 3]),
        "{report:#}"
    );
    let children = report["children"].as_array().unwrap();
    let ids: Vec<&serde_json::Value> = children.iter().map(|c| &c["agent"]).collect();
    assert_eq!(
        parent["children"]
            .as_array()
            .unwrap()
            .iter()
            .collect::<Vec<_>>(),
        ids
    );
    for (index, (child, site)) in children
        .iter()
        .zip(["siteB", "siteC", "siteC", "siteA"])
        .enumerate()
    {
        assert_eq!(child["result"]["child"], index, "{child:#}");
        assert_eq!(child["result"]["site"], site);
        assert_eq!(
            child["result"]["sum"], parent["sum"],
            "the child's memory is its parent's"
        );
    }
}

#[test]
fn killing_a_parent_kills_its_children() {
    let cluster = three_hosts(&[]);
    let out = fork(&cluster, "siteB,siteC", &["wait=true"], "--detach");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let status = status_until(&cluster, &id, "two children", |s| {
        s["children"].as_array().is_some_and(|c| c.len() == 2)
    });
    let children = status["children"].as_array().unwrap().clone();
    // Once they reported to the parent, they wait for a message, parked.
    for child in &children {
        let child = child.as_str().unwrap();
        status_until(&cluster, child, "waiting", |s| s["waiting_on"].is_string());
    }
    let out = cluster.agent(&["kill", &id], "siteA", "alice");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for agent in children.iter().chain([&serde_json::json!(id)]) {
        let agent = agent.as_str().unwrap();
        status_until(&cluster, agent, "killed", |s| s["state"] == "killed");
    }
}

/// The status of `agent` at its home siteA once `done` holds of it (`what`), within 30 s.
fn status_until(
    cluster: &Cluster,
    agent: &str,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = json(&cluster.agent(&["status", agent, "--json"], "siteA", "alice"));
        if done(&status) {
            return status;
        }
        assert!(Instant::now() < deadline, "not {what}: {status:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `agent run --json` of `example` on virtual sites.
fn run_locally(example: &str, args: &[&str]) -> (Option<i32>, serde_json::Value) {
    let out = Command::new(agent_bin())
        .arg("run")
        .arg(example_path(example))
        .args(args)
        .args(["--json", "--no-disk-cache", "--data"])
        .arg(repo().join("examples/search/sites"))
        .output()
        .unwrap();
    let report = serde_json::from_slice(&out.stdout).unwrap_or_default();
    (out.status.code(), report)
}

#[test]
fn agent_run_runs_clones_beside_their_parent_on_its_virtual_sites() {
    let sites = ["--sites", "siteA,siteB,siteC", "--arg", "query=migration"];
    let (code, tour) = run_locally("search", &sites);
    assert_eq!(code, Some(0), "{tour:#}");
    let parallel = [&sites[..], &["--arg", "parallel=true"]].concat();
    let (code, report) = run_locally("search", &parallel);
    assert_eq!(code, Some(0), "{report:#}");
    assert_eq!(report["result"]["hits"], tour["result"]["hits"]);
    let children = report["children"].as_array().unwrap();
    assert_eq!(children.len(), 3, "{report:#}");
    for child in children {
        assert_eq!(child["parent"], report["agent_id"]);
        assert_eq!(child["ok"], true, "{child:#}");
    }
    // Children that wait for a message no one sends end the run, as their parent does.
    let (code, report) = run_locally("fork", &["--sites", "siteA,siteB", "--arg", "wait=true"]);
    assert_eq!(code, Some(1), "{report:#}");
    assert_eq!(report["result"], serde_json::Value::Null);
    let children = report["children"].as_array().unwrap();
    assert_eq!(children.len(), 2, "{report:#}");
    for child in children {
        let error = child["error"].as_str().unwrap_or_default();
        assert!(
            error.contains("no other agent of this local run"),
            "{child:#}"
        );
    }
}
