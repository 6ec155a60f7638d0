//! The `agent` command line, run as a real process on real agents.

use agent_e2e::{agent_bin, example, example_path, repo};
use std::process::Command;

fn search_wasm() -> std::path::PathBuf {
    example("search"); // builds the examples workspace once
    repo().join("examples/target/wasm32-wasip1/release/search.wasm")
}

#[test]
fn agent_build_prints_the_module_path_last() {
    let out = Command::new(agent_bin())
        .arg("build")
        .arg(repo().join("examples/search"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let path = stdout.lines().last().unwrap_or_default();
    assert!(path.ends_with("search.wasm"), "{stdout}");
    assert!(std::fs::read(path).is_ok_and(|b| b.starts_with(b"\0asm")));
}

#[test]
fn agent_build_explains_a_directory_that_is_not_a_crate() {
    let out = Command::new(agent_bin())
        .arg("build")
        .arg(repo().join("docs"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("has no Cargo.toml: give the directory of an agent crate"),
        "{stderr}"
    );
}

#[test]
fn agent_run_searches_three_sites_and_prints_hops_and_hits() {
    let cache = tempfile::tempdir().unwrap();
    let out = Command::new(agent_bin())
        .arg("run")
        .arg(search_wasm())
        .args([
            "--sites",
            "siteA,siteB,siteC",
            "--arg",
            "query=migration",
            "--cache-dir",
        ])
        .arg(cache.path())
        .arg("--data")
        .arg(repo().join("examples/search/sites"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    for hop in ["home -> siteA", "siteA -> siteB", "siteB -> siteC"] {
        assert!(stderr.contains(hop), "missing `{hop}` in:\n{stderr}");
    }
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for site in ["siteA", "siteB", "siteC"] {
        assert!(
            value["hits"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|h| h["site"] == site),
            "no hit on {site}"
        );
    }
}

#[test]
fn agent_run_json_reports_failure_with_a_nonzero_exit() {
    let out = Command::new(agent_bin())
        .arg("run")
        .arg(search_wasm())
        .args(["--sites", "siteA", "--json", "--no-disk-cache"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(value["ok"], false);
    assert_eq!(
        value["error"],
        "agent failed: missing argument: --arg query=WORDS"
    );
}

#[test]
fn agent_run_refuses_a_module_that_is_not_an_agent_and_a_missing_corpus() {
    let dir = tempfile::tempdir().unwrap();
    let bogus = dir.path().join("bogus.wasm");
    std::fs::write(&bogus, b"\0asm\x01\0\0\0").unwrap();
    let out = Command::new(agent_bin())
        .arg("run")
        .arg(&bogus)
        .args(["--sites", "a", "--no-disk-cache"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("module refused: not an agent: the module has no `agent-abi` section"),
        "{stderr}"
    );

    let out = Command::new(agent_bin())
        .arg("run")
        .arg(search_wasm())
        .args(["--sites", "nowhere", "--no-disk-cache", "--data"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot load the corpus of site nowhere"),
        "{stderr}"
    );
}

#[test]
fn agent_build_says_how_to_install_a_missing_target() {
    // A rustc whose sysroot lacks wasm32-wasip1 (`true` prints no sysroot at all).
    let out = Command::new(agent_bin())
        .arg("build")
        .arg(repo().join("examples/search"))
        .env("RUSTC", "true")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("the wasm32-wasip1 target is not installed; install it with: rustup target add wasm32-wasip1"),
        "{stderr}"
    );
}

#[test]
fn agent_run_prints_what_the_agent_emits_and_json_lists_it_in_order() {
    let run = |json: bool| {
        let mut cmd = Command::new(agent_bin());
        cmd.arg("run").arg(example_path("progress"));
        cmd.args(["--sites", "siteA,siteB", "--arg", "rounds=2"]);
        if json {
            cmd.arg("--json");
        }
        cmd.output().unwrap()
    };
    let out = run(false);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains(r#"[siteB] emitted: {"n":3,"site":"siteB"}"#),
        "{stderr}"
    );
    let out = run(true);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let sites: Vec<&str> = (report["emitted"].as_array().into_iter().flatten())
        .map(|v| v["site"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        sites,
        ["home", "siteA", "siteB", "siteA", "siteB"],
        "{report:#}"
    );
    assert_eq!(report["result"]["emitted"], 5, "{report:#}");
}

/// A local run of one agent has no one to exchange messages with: a send says the receiver
/// does not exist, a wait with a timeout times out, and a wait without one ends the run.
#[test]
fn agent_run_says_no_message_can_come_in_a_local_run() {
    let run = |wasm: &str, args: &[&str]| {
        let out = Command::new(agent_bin())
            .arg("run")
            .arg(wasm)
            .args(args)
            .args(["--json", "--no-disk-cache"])
            .output()
            .unwrap();
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (out.status.code(), report)
    };
    // The inbox tours twice (its waits time out), then waits for good.
    let inbox = example_path("inbox");
    let (code, report) = run(&inbox, &["--sites", "a,b", "--arg", "rounds=2"]);
    assert_eq!(code, Some(1), "{report:#}");
    assert_eq!(
        report["hops"].as_array().map(Vec::len),
        Some(4),
        "{report:#}"
    );
    assert_eq!(
        report["error"],
        "agent cannot go on: it waits for a message, and no other agent of this local run can send one"
    );
    let scouts = example_path("scouts");
    let nobody = "coordinator=0123456789abcdef0123456789abcdef";
    let (code, report) = run(&scouts, &["--sites", "a", "--arg", nobody]);
    assert_eq!(code, Some(1), "{report:#}");
    let error = report["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("no such agent: 0123456789abcdef0123456789abcdef"),
        "{report:#}"
    );
}
