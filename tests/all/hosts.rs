//! Separate `agent-host` processes hand agents to each other over mutually authenticated
//! QUIC; users drive them with the real `agent` CLI.

use agent_e2e::{Cluster, block_on, example, finish, json, repo};
use agent_runtime::ModuleHash;
use agent_runtime::net::client::Client;
use agent_runtime::net::messages::{LaunchEvent, Request};
use agent_runtime::net::wire::{read_msg, write_blob};
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn search_wasm() -> String {
    example("search");
    repo()
        .join("examples/target/wasm32-wasip1/release/search.wasm")
        .display()
        .to_string()
}

fn hits_by_site(value: &serde_json::Value) -> std::collections::BTreeSet<String> {
    value["result"]["hits"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|h| h["site"].as_str().map(str::to_string))
        .collect()
}

/// The id of `user`'s first agent on `site`, once it shows up.
fn first_agent(cluster: &Cluster, site: &str, user: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list = json(&cluster.agent(&["list", "--json"], site, user));
        if let Some(id) = list[0]["agent"].as_str() {
            return id.to_string();
        }
        assert!(Instant::now() < deadline, "the agent never showed up");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the home of agent `id` (siteA) reports it on `site`.
fn wait_until_on(cluster: &Cluster, id: &str, site: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while json(&cluster.agent(&["status", id, "--json"], "siteA", "alice"))["site"] != site {
        assert!(Instant::now() < deadline, "the agent never reached {site}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_search_agent_visits_three_host_processes_and_a_second_launch_sends_no_module() {
    let up: &[&str] = &[];
    let cluster = Cluster::start(
        &["siteA", "siteB", "siteC"],
        &[("siteA", up), ("siteB", up), ("siteC", up)],
    );
    let wasm = search_wasm();
    let launch = [
        "launch",
        &wasm,
        "--hop",
        "siteB,siteC,siteA",
        "--arg",
        "query=migration",
        "--json",
    ];
    let out = cluster.agent(&launch, "siteA", "alice");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        cluster.log("siteB")
    );
    let first = json(&out);
    assert_eq!(first["ok"], true);
    assert_eq!(
        hits_by_site(&first).into_iter().collect::<Vec<_>>(),
        ["siteA", "siteB", "siteC"]
    );
    assert_eq!(
        first["result"]["visited"],
        serde_json::json!(["siteB", "siteC", "siteA"])
    );
    let path: Vec<(String, String)> = first["hops"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|h| {
            (
                h["from"].as_str().unwrap_or("").into(),
                h["to"].as_str().unwrap_or("").into(),
            )
        })
        .collect();
    assert_eq!(
        path,
        [
            ("siteA".into(), "siteB".into()),
            ("siteB".into(), "siteC".into()),
            ("siteC".into(), "siteA".into())
        ]
    );
    let module_bytes: Vec<u64> = first["hops"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|h| h["module_bytes"].as_u64().unwrap_or(u64::MAX))
        .collect();
    assert!(
        module_bytes[0] > 0 && module_bytes[1] > 0,
        "siteB and siteC lacked the module: {module_bytes:?}"
    );
    assert_eq!(
        module_bytes[2], 0,
        "siteA had the module (it was launched there)"
    );
    // The hop home is recorded by the home from what its source told it with DEPARTED:
    // it has the source's facts and a freeze time as the others do.
    for hop in first["hops"].as_array().into_iter().flatten() {
        assert_eq!(hop["from_arch"], std::env::consts::ARCH, "{hop}");
        assert!(hop["image_bytes"].as_u64() > Some(0), "{hop}");
        assert!(hop["freeze_us"].as_u64() > Some(0), "{hop}");
        assert!(
            hop["committed_us"].as_u64() >= hop["freeze_us"].as_u64(),
            "{hop}"
        );
    }

    let again = json(&cluster.agent(&launch, "siteA", "bob"));
    assert_eq!(again["ok"], true);
    let resent: Vec<u64> = again["hops"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|h| h["module_bytes"].as_u64().unwrap_or(u64::MAX))
        .collect();
    assert_eq!(
        resent,
        [0, 0, 0],
        "no host that has the module gets its bytes again"
    );
    assert_eq!(again["result"], first["result"]);

    // --quiet: the result alone on stdout, nothing of the hops on stderr.
    let quiet = [
        "launch",
        &wasm,
        "--hop",
        "siteB",
        "--arg",
        "query=migration",
        "-q",
    ];
    let out = cluster.agent(&quiet, "siteA", "alice");
    assert!(out.status.success(), "{out:?}");
    let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(result["visited"], serde_json::json!(["siteB"]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("siteA") && !stderr.contains("hop"),
        "{stderr}"
    );
}

#[test]
fn unknown_and_down_sites_are_hop_errors_the_agent_skips() {
    let up: &[&str] = &[];
    let cluster = Cluster::start(
        &["siteA", "siteB", "siteC"],
        &[("siteA", up), ("siteB", up)],
    );
    let wasm = search_wasm();
    let out = cluster.agent(
        &[
            "launch",
            &wasm,
            "--hop",
            "siteB,atlantis,siteC,siteA",
            "--arg",
            "query=host",
            "--json",
        ],
        "siteA",
        "alice",
    );
    let value = json(&out);
    assert!(out.status.success(), "{value}");
    assert_eq!(
        value["result"]["visited"],
        serde_json::json!(["siteB", "siteA"])
    );
    let skipped: Vec<String> = value["result"]["skipped"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect();
    assert_eq!(skipped.len(), 2, "{skipped:?}");
    assert_eq!(skipped[0], "atlantis: unknown site `atlantis`");
    assert!(
        skipped[1].starts_with("siteC: site `siteC` unreachable: no answer from siteC"),
        "{}",
        skipped[1]
    );
    // The agent's `ctx.warn` is a warning in the host's log, which a file gets without
    // colour codes.
    let log = cluster.log("siteB");
    let warned = log.lines().find(|l| l.contains("skipping atlantis"));
    assert!(warned.is_some_and(|l| l.contains(" WARN ")), "{log}");
    assert!(!log.contains('\u{1b}'), "colour codes in a log file");
}

#[test]
fn a_refusing_destination_leaves_the_agent_running_on_the_source() {
    let small: &[&str] = &["--max-memory-mib", "1"];
    let up: &[&str] = &[];
    let cluster = Cluster::start(
        &["siteA", "siteB", "siteC"],
        &[("siteA", up), ("siteB", small), ("siteC", up)],
    );
    let wasm = search_wasm();
    let out = cluster.agent(
        &[
            "launch",
            &wasm,
            "--hop",
            "siteB,siteC",
            "--arg",
            "query=host",
            "--json",
        ],
        "siteA",
        "alice",
    );
    let value = json(&out);
    assert!(out.status.success(), "{value}");
    assert_eq!(value["result"]["visited"], serde_json::json!(["siteC"]));
    let skipped = value["result"]["skipped"][0].as_str().unwrap_or_default();
    assert!(
        skipped.starts_with("siteB: site `siteB` refused the agent: the agent needs 1.1 MiB of memory; this host allows 1.0 MiB"),
        "{skipped}"
    );
    assert_eq!(
        value["hops"][0]["from"], "siteA",
        "the agent left from where it was refused"
    );
}

#[test]
fn users_see_and_kill_only_their_own_agents() {
    let up: &[&str] = &[];
    let cluster = Cluster::start(&["siteA"], &[("siteA", up)]);
    example("spin");
    let wasm = repo()
        .join("examples/target/wasm32-wasip1/release/spin.wasm")
        .display()
        .to_string();
    let launch = cluster.spawn_agent(
        &["launch", &wasm, "--arg", "n=4000000000", "--json"],
        "siteA",
        "alice",
    );
    let id = first_agent(&cluster, "siteA", "alice");
    assert_eq!(
        json(&cluster.agent(&["list", "--json"], "siteA", "bob")),
        serde_json::json!([])
    );
    for cmd in ["status", "kill"] {
        let out = cluster.agent(&[cmd, &id], "siteA", "bob");
        assert_eq!(out.status.code(), Some(2));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(&format!("no agent {id} of yours here"))
        );
    }
    let out = cluster.agent(&["kill", &id], "siteA", "alice");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = launch.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(json(&out)["error"], "agent killed by its owner");
    assert_eq!(
        json(&cluster.agent(&["status", &id, "--json"], "siteA", "alice"))["state"],
        "killed"
    );
}

/// Stops the home host while a CPU-bound agent runs (SIGTERM, or SIGKILL like a power cut),
/// starts it again, and checks that the launcher, which follows the agent through the
/// restart, gets the result an uninterrupted run computes.
fn stop_while_running_and_resume(graceful: bool) {
    let up: &[&str] = &[];
    let mut cluster = Cluster::start(&["siteA"], &[("siteA", up)]);
    example("spin");
    let path = repo().join("examples/target/wasm32-wasip1/release/spin.wasm");
    let wasm = path.display().to_string();
    let args = [("n", "12000000"), ("every", "20000")];
    let launch = cluster.spawn_agent(
        &[
            "launch",
            &wasm,
            "--arg",
            "n=12000000",
            "--arg",
            "every=20000",
            "--json",
        ],
        "siteA",
        "alice",
    );
    let id = first_agent(&cluster, "siteA", "alice");
    std::thread::sleep(Duration::from_millis(500));
    if graceful {
        let status = cluster.stop("siteA");
        assert!(status.success(), "exit {status}:\n{}", cluster.log("siteA"));
        assert!(
            cluster.log("siteA").contains("parked"),
            "{}",
            cluster.log("siteA")
        );
    } else {
        cluster.kill("siteA");
    }
    cluster.restart("siteA", up);
    let out = finish(launch, Duration::from_secs(90));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(&format!("following agent {id}")),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = json(&out);
    assert_eq!(report["ok"], true, "{report}\n{}", cluster.log("siteA"));
    let log = cluster.log("siteA");
    let resumed = log.lines().find(|l| l.contains("resuming agent"));
    let how = if graceful { "Handle" } else { "Poll" };
    assert!(resumed.is_some_and(|l| l.contains(how)), "{log}");
    let status = json(&cluster.agent(&["status", &id, "--json"], "siteA", "alice"));
    assert_eq!(status["state"], "finished", "{status}");
    // The stopped and resumed agent computed exactly what an uninterrupted run computes.
    let runner = agent_e2e::runner(agent_runtime::Limits::default());
    let still = agent_e2e::run(
        &runner,
        &example("spin"),
        agent_e2e::launch(&[], &args),
        agent_runtime::runner::Migration::OnlyHops,
    );
    assert_eq!(Some(&report["result"]), still.outcome.as_ref().ok());
    assert_eq!(Some(&status["result"]), still.outcome.as_ref().ok());
}

#[test]
fn sigterm_parks_running_agents_and_a_restart_resumes_them() {
    stop_while_running_and_resume(true);
}

#[test]
fn sigkill_loses_no_running_agent_a_restart_runs_it_from_its_last_stored_image() {
    stop_while_running_and_resume(false);
}

#[test]
fn a_bare_agent_host_serve_is_a_working_development_host() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .unwrap();
    let mut host = Command::new(agent_e2e::agent_host_bin())
        .args(["serve", "--listen", &port.to_string()])
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = host.stdout.take().expect("no stdout");
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
    let hint = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| l.strip_prefix("connect with: ").map(str::to_string))
        .expect("no `connect with:` line");
    // The printed command works as printed (with a real module in place of AGENT.wasm).
    let wasm = search_wasm();
    let words: Vec<String> = hint
        .split_whitespace()
        .skip(1)
        .map(|w| {
            if w == "AGENT.wasm" {
                wasm.clone()
            } else {
                w.to_string()
            }
        })
        .collect();
    let out = Command::new(agent_e2e::agent_bin())
        .args(&words)
        .args(["--arg", "query=anything", "--json"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let _ = host.kill();
    let _ = host.wait();
    assert!(
        out.status.success(),
        "{hint}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        json(&out)["result"]["visited"],
        serde_json::json!(["localhost"])
    );
    assert!(dir.path().join("agent-host-data/certs/ca.key").is_file());
}

#[test]
fn a_host_configured_by_a_toml_file_takes_part_in_hops() {
    let up: &[&str] = &[];
    let cluster = Cluster::start(&["siteA", "siteB"], &[("siteA", up)]);
    let config = cluster.dir.path().join("siteB.toml");
    let text = format!(
        "name = \"siteB\"\nlisten = \"{}\"\ndata_dir = \"{}\"\ncerts = \"{}\"\ncorpus = \"{}\"\nmax_agents = 10\n\n[peers]\nsiteA = \"{}\"\n",
        cluster.addrs["siteB"],
        cluster.dir.path().join("siteB").display(),
        cluster.certs().display(),
        repo().join("examples/search/sites/siteB").display(),
        cluster.addrs["siteA"],
    );
    std::fs::write(&config, text).unwrap();
    let mut host = Command::new(agent_e2e::agent_host_bin())
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cluster.agent(&["list"], "siteB", "alice").status.success() {
        assert!(
            Instant::now() < deadline,
            "the configured host did not come up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let wasm = search_wasm();
    // Launched on siteB: it reaches siteA through siteB's [peers] table and comes back.
    let out = cluster.agent(
        &[
            "launch",
            &wasm,
            "--hop",
            "siteA,siteB",
            "--arg",
            "query=host",
            "--json",
        ],
        "siteB",
        "alice",
    );
    let _ = host.kill();
    let _ = host.wait();
    let value = json(&out);
    assert_eq!(
        value["result"]["visited"],
        serde_json::json!(["siteA", "siteB"]),
        "{value}"
    );

    let bad = cluster.dir.path().join("bad.toml");
    std::fs::write(&bad, "name = \"x\"\nlisten_port = 4\n").unwrap();
    let out = Command::new(agent_e2e::agent_host_bin())
        .arg("serve")
        .arg("--config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad config") && stderr.contains("unknown field `listen_port`"),
        "{stderr}"
    );
}

#[test]
fn kill_follows_the_agent_to_the_host_it_runs_on() {
    let up: &[&str] = &[];
    let cluster = Cluster::start(&["siteA", "siteB"], &[("siteA", up), ("siteB", up)]);
    example("spin");
    let wasm = repo()
        .join("examples/target/wasm32-wasip1/release/spin.wasm")
        .display()
        .to_string();
    let launch = cluster.spawn_agent(
        &[
            "launch",
            &wasm,
            "--hop",
            "siteB",
            "--arg",
            "n=4000000000",
            "--json",
        ],
        "siteA",
        "alice",
    );
    let id = first_agent(&cluster, "siteA", "alice");
    wait_until_on(&cluster, &id, "siteB");
    let out = cluster.agent(&["kill", &id], "siteA", "alice");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = launch.wait_with_output().unwrap();
    let value = json(&out);
    assert_eq!(value["error"], "agent killed by its owner");
    assert_eq!(value["hops"][0]["to"], "siteB");
    let status = json(&cluster.agent(&["status", &id, "--json"], "siteA", "alice"));
    assert_eq!(
        (status["state"].as_str(), status["site"].as_str()),
        (Some("killed"), Some("siteB"))
    );
}

#[test]
fn an_agent_ending_while_its_home_is_down_reaches_its_launcher_after_both_hosts_restart() {
    let up: &[&str] = &[];
    let mut cluster = Cluster::start(&["siteA", "siteB"], &[("siteA", up), ("siteB", up)]);
    example("spin");
    let path = repo().join("examples/target/wasm32-wasip1/release/spin.wasm");
    let wasm = path.display().to_string();
    let launch = cluster.spawn_agent(
        &[
            "launch",
            &wasm,
            "--hop",
            "siteB",
            "--arg",
            "n=3000000",
            "--json",
        ],
        "siteA",
        "alice",
    );
    let id = first_agent(&cluster, "siteA", "alice");
    wait_until_on(&cluster, &id, "siteB");
    cluster.kill("siteA");
    let deadline = Instant::now() + Duration::from_secs(60);
    // The agent ends on siteB while its home is down, and siteB keeps its report.
    while !cluster
        .log("siteB")
        .contains("cannot report to the home host")
    {
        assert!(Instant::now() < deadline, "{}", cluster.log("siteB"));
        std::thread::sleep(Duration::from_millis(100));
    }
    // siteB goes down too before it could deliver: the report survives in its store.
    cluster.kill("siteB");
    cluster.restart("siteA", up);
    cluster.restart("siteB", up);

    let report = json(&finish(launch, Duration::from_secs(60)));
    assert_eq!(report["ok"], true, "{report}\n{}", cluster.log("siteB"));
    assert_eq!(report["result"]["n"], 3000000);
    let status = json(&cluster.agent(&["status", &id, "--json"], "siteA", "alice"));
    assert_eq!(
        (status["state"].as_str(), status["site"].as_str()),
        (Some("finished"), Some("siteB"))
    );
}

#[test]
fn a_probe_measures_the_link_to_a_peer_and_bad_probes_are_refused() {
    let cluster = Cluster::start(&["siteA", "siteB"], &[("siteA", &[]), ("siteB", &[])]);
    let out = cluster.agent(&["probe", "--to", "siteB", "--mib", "4"], "siteA", "alice");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.starts_with("4 MiB to siteB in "),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = cluster.agent(&["probe", "--to", "nowhere"], "siteA", "alice");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("unknown site `nowhere`"),
        "{err}"
    );
    // More than the largest image a host accepts (1 GiB).
    let out = cluster.agent(
        &["probe", "--to", "siteB", "--mib", "2048"],
        "siteA",
        "alice",
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("at most"), "{err}");
    // The host serves on.
    let out = cluster.agent(&["probe", "--to", "siteB", "--mib", "1"], "siteA", "alice");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The first answer of `client`'s host to a launch of `wasm` by hash, with the streams.
async fn launch_by_hash(
    client: &Client,
    wasm: &[u8],
) -> (quinn::SendStream, quinn::RecvStream, LaunchEvent) {
    let mut args = BTreeMap::new();
    args.insert("query".to_string(), "migration".to_string());
    let launch = Request::LaunchHash {
        module: ModuleHash::of(wasm),
        itinerary: Vec::new(),
        args,
    };
    let (send, mut recv) = client.open(&launch).await.unwrap();
    let first = read_msg(&mut recv).await.unwrap();
    (send, recv, first)
}

/// Launches `wasm` by hash on a host that must ask for the module, sends `sent` when asked,
/// and returns the host's answer.
async fn launch_sending(client: &Client, wasm: &[u8], sent: &[u8]) -> LaunchEvent {
    let (mut send, mut recv, first) = launch_by_hash(client, wasm).await;
    assert_eq!(first, LaunchEvent::SendModule);
    write_blob(&mut send, sent).await.unwrap();
    read_msg(&mut recv).await.unwrap()
}

#[test]
fn a_launch_sends_the_module_only_to_a_host_that_lacks_it() {
    let cluster = Cluster::start(&["siteA"], &[("siteA", &[])]);
    let wasm = example("search");
    block_on(async {
        let client = cluster.client("siteA", "alice").await.unwrap();
        // Other bytes than the module named: refused, and nothing of them is kept.
        let answer = launch_sending(&client, &wasm, &example("bench")).await;
        assert!(
            matches!(&answer, LaunchEvent::Refused(why) if why.contains("not the one named")),
            "{answer:?}"
        );

        // Asked for again; sent; launched.
        let answer = launch_sending(&client, &wasm, &wasm).await;
        assert!(
            matches!(&answer, LaunchEvent::Launched { module, .. } if *module == ModuleHash::of(&wasm)),
            "{answer:?}"
        );

        // Held now: the next launch starts at once, without the module.
        let (_send, _recv, first) = launch_by_hash(&client, &wasm).await;
        assert!(matches!(first, LaunchEvent::Launched { .. }), "{first:?}");

        // Compiled but no longer kept (its file lost): asked for again, so that an agent
        // launched here can be restored after a restart; then kept again.
        let kept = (cluster.dir.path().join("siteA/modules"))
            .join(format!("{}.wasm", ModuleHash::of(&wasm)));
        std::fs::remove_file(&kept).unwrap_or_else(|e| panic!("{}: {e}", kept.display()));
        let answer = launch_sending(&client, &wasm, &wasm).await;
        assert!(matches!(answer, LaunchEvent::Launched { .. }), "{answer:?}");
        assert!(kept.is_file(), "the module is kept again");

        // The library's launch does the same and its caller never sees the request.
        let mut seen = Vec::new();
        let last = client
            .launch(&wasm, Vec::new(), BTreeMap::new(), &mut |e| {
                seen.push(e.clone())
            })
            .await
            .unwrap();
        assert!(matches!(last, LaunchEvent::Finished { .. }), "{last:?}");
        assert!(!seen.contains(&LaunchEvent::SendModule), "{seen:?}");
    });
}
