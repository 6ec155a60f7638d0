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
    assert!(value.get("truncated").is_none(), "{value}");

    // With one hit allowed per site, the report says where more matched.
    let out = Command::new(agent_bin())
        .arg("run")
        .arg(search_wasm())
        .args([
            "--sites",
            "siteA,siteB",
            "--arg",
            "query=migration",
            "--arg",
            "limit=1",
        ])
        .arg("--cache-dir")
        .arg(cache.path())
        .arg("--data")
        .arg(repo().join("examples/search/sites"))
        .output()
        .unwrap();
    let value: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // siteA has six matching lines, siteB one.
    assert_eq!(value["truncated"], serde_json::json!(["siteA"]), "{value}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("raise --arg limit=1"), "{stderr}");
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
    assert_eq!(
        stderr.matches("not an agent").count(),
        1,
        "said twice: {stderr}"
    );

    // A site without a folder under --data is a site without documents; one made
    // unreachable is skipped by the search agent, as a host that is down would be.
    let out = Command::new(agent_bin())
        .arg("run")
        .arg(search_wasm())
        .args(["--sites", "nowhere,gone", "--unreachable", "gone", "--json"])
        .args(["--arg", "query=x", "--no-disk-cache", "--data"])
        .arg(dir.path())
        .output()
        .unwrap();
    let report = agent_e2e::json(&out);
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["result"]["visited"], serde_json::json!(["nowhere"]));
    let skipped = report["result"]["skipped"].to_string();
    assert!(
        skipped.contains("gone: ") && skipped.contains("unreachable"),
        "{report}"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("site nowhere has no documents"), "{stderr}");

    // A site made unreachable must be one of the run's sites.
    let out = Command::new(agent_bin())
        .arg("run")
        .arg(search_wasm())
        .args(["--sites", "a", "--unreachable", "b", "--no-disk-cache"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--unreachable b: not one of the --sites"),
        "{stderr}"
    );

    // A file where the site's folder should be is still an error.
    std::fs::write(dir.path().join("nowhere"), b"not a folder").unwrap();
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

/// `agent new` makes a crate that builds and runs at once, in a directory of its own; the
/// same crate without its `agent!` line fails at `agent build`, saying the macro is missing.
#[test]
fn a_new_agent_builds_and_runs_and_one_without_its_macro_fails_at_build() {
    example("search"); // the examples' target dir holds the SDK built for wasm32-wasip1
    let dir = tempfile::tempdir().unwrap();
    let agent = |args: &[&str]| {
        Command::new(agent_bin())
            .current_dir(dir.path())
            // Shares the SDK and its dependencies the examples built.
            .env("CARGO_TARGET_DIR", repo().join("examples/target"))
            .args(args)
            .output()
            .unwrap()
    };
    let made = agent(&["new", "e2e-first-agent"]);
    assert!(made.status.success(), "{made:?}");
    let taken = agent(&["new", "e2e-first-agent"]);
    assert_eq!(taken.status.code(), Some(2), "{taken:?}");
    assert!(String::from_utf8_lossy(&taken.stderr).contains("already exists"));
    let bad_name = agent(&["new", "1st"]);
    assert_eq!(bad_name.status.code(), Some(2), "{bad_name:?}");

    let built = agent(&["build", "e2e-first-agent"]);
    let stderr = String::from_utf8_lossy(&built.stderr);
    assert!(built.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&built.stdout);
    let module = stdout.lines().last().unwrap_or_default().to_string();
    let cache = dir.path().join("cache");
    let run = agent(&[
        "run",
        &module,
        "--sites",
        "a,b",
        "--json",
        "--cache-dir",
        cache.to_str().unwrap(),
    ]);
    let report = agent_e2e::json(&run);
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["hops"].as_array().map(Vec::len), Some(2), "{report}");
    let result = report["result"].to_string();
    assert!(result.contains("a (") && result.contains("b ("), "{report}");

    let lib = dir.path().join("e2e-first-agent/src/lib.rs");
    let source = std::fs::read_to_string(&lib).unwrap();
    std::fs::write(&lib, source.replace("agent_sdk::agent!(tour);", "")).unwrap();
    let unmarked = agent(&["build", "e2e-first-agent"]);
    assert_eq!(unmarked.status.code(), Some(2), "{unmarked:?}");
    let stderr = String::from_utf8_lossy(&unmarked.stderr);
    assert!(stderr.contains("agent_sdk::agent!"), "{stderr}");
    assert_eq!(stderr.matches("not an agent").count(), 1, "{stderr}");
}
