//! Draining a host (`agent-host drain`): its agents leave at their next safe point for the
//! other hosts, parked sleepers too (sleeping the rest of their sleep there); the host stops
//! once empty, and no agent is lost or run twice.

use agent_e2e::{Cluster, agent_host_bin, example_path, finish, json};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

const SITES: [&str; 3] = ["siteA", "siteB", "siteC"];

/// Primes below `n` and their sum, as the spin agent counts them (a sieve, not its way).
pub fn primes_below(n: u64) -> (u64, u64) {
    let mut composite = vec![false; n as usize];
    let (mut count, mut sum) = (0, 0);
    for k in 2..n {
        if !composite[k as usize] {
            count += 1;
            sum += k;
            let mut m = k * k;
            while m < n {
                composite[m as usize] = true;
                m += k;
            }
        }
    }
    (count, sum)
}

fn launch(cluster: &Cluster, wasm: &str, args: &[&str]) -> Child {
    let mut all = vec!["launch", wasm, "--hop", "siteB", "--json"];
    for arg in args {
        all.extend(["--arg", arg]);
    }
    cluster.spawn_agent(&all, "siteA", "alice")
}

fn drain(cluster: &Cluster, site: &str) -> std::process::Output {
    Command::new(agent_host_bin())
        .args([
            "drain",
            "--name",
            site,
            "--listen",
            &cluster.addrs[site].to_string(),
        ])
        .arg("--certs")
        .arg(cluster.certs())
        .output()
        .unwrap()
}

/// Waits until every host sees the others up.
fn wait_for_membership(cluster: &Cluster) {
    let all_up: Vec<(&str, &str)> = SITES.iter().map(|s| (*s, "up")).collect();
    for site in SITES {
        crate::cluster::wait_for(cluster, site, &all_up, Duration::from_secs(30));
    }
}

const N: u64 = 3_000_000;

/// Busy agents (counting primes, checkpointing) and parked sleepers, all on siteB.
fn busy_site_b(cluster: &Cluster) -> (Vec<Child>, Vec<Child>, Instant) {
    let (spin, bench) = (example_path("spin"), example_path("bench"));
    let n = format!("n={N}");
    let started = Instant::now();
    let spinners = (0..3)
        .map(|_| launch(cluster, &spin, &[&n, "every=200"]))
        .collect();
    let sleepers = (0..2)
        .map(|_| launch(cluster, &bench, &["dirty_kib=64", "sleep_ms=6000"]))
        .collect();
    cluster.wait_for_log("siteB", "parked asleep", 2);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let list = json(&cluster.agent(&["list", "--json"], "siteA", "alice"));
        let on_b = (list.as_array().into_iter().flatten())
            .filter(|a| a["site"] == "siteB")
            .count();
        if on_b == 5 {
            break;
        }
        assert!(Instant::now() < deadline, "not all on siteB: {list}");
        std::thread::sleep(Duration::from_millis(50));
    }
    (spinners, sleepers, started)
}

/// Each launch ended well, and each spinner's count is right (none ran twice from a stale
/// state, none was lost); where each went from siteB, if it left, as its launcher heard.
fn check_ends(
    cluster: &Cluster,
    spinners: Vec<Child>,
    sleepers: Vec<Child>,
    started: Instant,
) -> Vec<Option<String>> {
    (check_reports(cluster, spinners, sleepers, started).iter())
        .map(left_site_b)
        .collect()
}

/// Where the agent of `report` (a launch's or a status) went from siteB, if it left.
fn left_site_b(report: &serde_json::Value) -> Option<String> {
    let hops = report["hops"].as_array().cloned().unwrap_or_default();
    let away = hops.iter().find(|h| h["from"] == "siteB");
    away.map(|h| h["to"].as_str().unwrap_or("").to_string())
}

/// Each launch ended well, and each spinner's count is right; the launches' reports.
fn check_reports(
    cluster: &Cluster,
    spinners: Vec<Child>,
    sleepers: Vec<Child>,
    started: Instant,
) -> Vec<serde_json::Value> {
    let (primes, sum) = primes_below(N);
    let mut reports = Vec::new();
    for child in spinners.into_iter().chain(sleepers) {
        let out = finish(child, Duration::from_secs(120));
        if out.stdout.is_empty() {
            let logs: String = (SITES.iter())
                .map(|s| format!("--- {s}\n{}", cluster.log(s)))
                .collect();
            panic!(
                "a launch did not end: {}\n{logs}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let report = json(&out);
        assert_eq!(report["ok"], true, "{report}");
        if report["result"]["n"].as_u64() == Some(N) {
            assert_eq!(report["result"]["primes"], primes, "{report}");
            assert_eq!(report["result"]["sum"], sum, "{report}");
        }
        reports.push(report);
    }
    // The sleepers slept their whole sleep, partly where they went.
    assert!(started.elapsed() >= Duration::from_secs(6));
    reports
}

#[test]
fn draining_a_busy_host_moves_every_agent_away_and_loses_none() {
    let up: &[&str] = &[];
    let mut cluster = Cluster::start(&SITES, &[("siteA", up), ("siteB", up), ("siteC", up)]);
    wait_for_membership(&cluster);
    let (spinners, sleepers, started) = busy_site_b(&cluster);

    let drained = drain(&cluster, "siteB");
    let said = String::from_utf8_lossy(&drained.stderr);
    assert!(drained.status.success(), "{said}\n{}", cluster.log("siteB"));
    assert!(said.contains("drained"), "{said}");
    cluster.wait_exit("siteB", Duration::from_secs(30));
    // The others no longer take it for a host that takes agents.
    let moved_to = check_ends(&cluster, spinners, sleepers, started);
    let elsewhere = |s: &Option<String>| matches!(s.as_deref(), Some("siteA" | "siteC"));
    assert!(moved_to.iter().all(elsewhere), "{moved_to:?}");
    let log = cluster.log("siteB");
    assert_eq!(log.matches("moved away").count(), 5, "{log}");
}

#[test]
fn a_host_that_crashes_while_draining_drains_after_its_restart_and_loses_none() {
    let up: &[&str] = &[];
    let mut cluster = Cluster::start(&SITES, &[("siteA", up), ("siteC", up)]);
    // siteB sends agents away only when it drains: it crashes right after the first of
    // them committed at its destination, before it forgot it.
    let crash = [("FAILPOINTS", "source-after-committed=return")];
    cluster.start_with("siteB", &[], &crash);
    wait_for_membership(&cluster);
    let (spinners, sleepers, started) = busy_site_b(&cluster);

    let lost = drain(&cluster, "siteB");
    let said = String::from_utf8_lossy(&lost.stderr);
    assert!(!lost.status.success(), "{said}\n{}", cluster.log("siteB"));
    assert!(said.contains("lost siteB while it drained"), "{said}");
    cluster.wait_exit("siteB", Duration::from_secs(30));
    assert!(
        cluster
            .log("siteB")
            .contains("crash point source-after-committed")
    );
    // Restarted, it resumes the agents left (not the one that left); drained again, it
    // lets them go.
    cluster.restart("siteB", &[]);
    let drained = drain(&cluster, "siteB");
    let said = String::from_utf8_lossy(&drained.stderr);
    assert!(drained.status.success(), "{said}\n{}", cluster.log("siteB"));
    cluster.wait_exit("siteB", Duration::from_secs(30));
    // Some may have ended on siteB between its restart and the second drain. The move that
    // committed before the crash is reported by siteB after its restart, before it stopped
    // (a drained host hands its homes the reports it holds): perhaps after the launcher
    // heard the agent's end (a home holds an end 15 s for earlier hops), but the home's
    // record of the agent has it.
    let reports = check_reports(&cluster, spinners, sleepers, started);
    let ids: Vec<String> = (reports.iter())
        .map(|r| r["agent"].as_str().unwrap_or_default().to_string())
        .collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let statuses: Vec<serde_json::Value> = (ids.iter())
            .map(|id| json(&cluster.agent(&["status", id, "--json"], "siteA", "alice")))
            .collect();
        if statuses.iter().any(|s| left_site_b(s).is_some()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no move from siteB recorded: {statuses:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
