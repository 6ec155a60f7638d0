//! Hostile agents on a real host: each is stopped with a clear error for its launcher, while
//! a well-behaved agent launched beside them finishes, and the host goes on serving.

use agent_e2e::{Cluster, example_path, finish};
use std::process::Output;
use std::time::Duration;

fn report(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "no JSON ({e}):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn hostile_agents_get_clear_errors_and_the_host_keeps_serving_others() {
    let flags: &[&str] = &["--max-memory-mib", "64", "--cpu-budget-secs", "2"];
    let cluster = Cluster::start(&["siteA"], &[("siteA", flags)]);
    let hostile = example_path("hostile");
    let search = example_path("search");
    // A module that imports a function this host does not offer.
    let dir = tempfile::tempdir().unwrap();
    let foreign = dir.path().join("foreign.wasm");
    let text = r#"(module (import "agent_v1" "fork" (func)) (memory (export "memory") 1)
        (func (export "agent_start")) (func (export "agent_poll") (result i32) i32.const 1)
        (@custom "agent-abi" "\01\00\00\00"))"#;
    std::fs::write(&foreign, wat::parse_str(text).unwrap()).unwrap();
    let foreign = foreign.display().to_string();

    // (mode, words its launcher's error must contain)
    let cases: [(&str, &[&str]); 5] = [
        ("bomb", &["memory", "64"]),
        ("loop", &["CPU"]),
        ("recurse", &["trapped"]),
        ("bigcall", &["refused the call", "exceeds the host's limit"]),
        ("flood", &[]),
    ];
    let mut running = Vec::new();
    for (mode, _) in &cases {
        let arg = format!("mode={mode}");
        let child = cluster.spawn_agent(
            &["launch", &hostile, "--arg", &arg, "--json"],
            "siteA",
            "alice",
        );
        running.push(child);
    }
    let good = cluster.spawn_agent(
        &["launch", &search, "--arg", "query=migration", "--json"],
        "siteA",
        "bob",
    );
    let refused = cluster.agent(&["launch", &foreign, "--json"], "siteA", "alice");

    for ((mode, words), child) in cases.iter().zip(running) {
        let out = finish(child, Duration::from_secs(120));
        let value = report(&out);
        if words.is_empty() {
            assert_eq!(value["ok"], true, "{mode}: {value}");
            continue;
        }
        assert_eq!(value["ok"], false, "{mode}: {value}");
        let error = value["error"].as_str().unwrap_or_default();
        for word in *words {
            assert!(error.contains(word), "{mode}: `{error}` lacks `{word}`");
        }
    }
    let good = report(&finish(good, Duration::from_secs(120)));
    assert_eq!(good["ok"], true, "{good}");
    assert_eq!(
        refused.status.code(),
        Some(2),
        "a refused launch did not run"
    );
    let refused = report(&refused);
    let error = refused["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("launch refused") && error.contains("fork"),
        "{error}"
    );
    assert!(
        cluster.log("siteA").contains("agent log lines dropped"),
        "the flood was not cut"
    );
    // Still serving.
    let again = cluster.agent(
        &["launch", &search, "--arg", "query=host", "--json"],
        "siteA",
        "bob",
    );
    assert_eq!(report(&again)["ok"], true);
}
