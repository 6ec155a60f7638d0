//! Hosts that find each other: membership by gossip from one seed each, failure detection,
//! and agents asking for a place instead of a site.

use agent_e2e::{Cluster, example_path, json, site_names};
use std::time::{Duration, Instant};

const SITES: [&str; 4] = ["siteA", "siteB", "siteC", "siteD"];

/// `site`'s view of the hosts: name → state.
fn states(cluster: &Cluster, site: &str) -> Vec<(String, String)> {
    let out = cluster.agent(&["hosts", "--json"], site, "alice");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hosts = json(&out);
    let all = hosts.as_array().cloned().unwrap_or_default();
    all.iter()
        .map(|h| {
            let name = h["name"].as_str().unwrap_or("").to_string();
            (name, h["state"].as_str().unwrap_or("").to_string())
        })
        .collect()
}

/// Waits until `site` sees each host in `want` (name, state), within `within`.
pub fn wait_for(cluster: &Cluster, site: &str, want: &[(&str, &str)], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let seen = states(cluster, site);
        let holds = want.iter().all(|(name, state)| {
            seen.iter()
                .any(|(n, s)| n == name && s.eq_ignore_ascii_case(state))
        });
        if holds {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{site} sees {seen:?}, not {want:?}\n{}",
            cluster.log(site)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn joining() -> Cluster {
    let certs_free = Cluster::start_joining(&SITES, &[]);
    let seed = |site: &str, by_name: bool| {
        let addr = certs_free.addrs[site];
        match by_name {
            true => format!("{site}@{addr}"),
            false => addr.to_string(),
        }
    };
    // A chain: each host knows only the one before it, by address or by name.
    let joins = [
        ("siteB", seed("siteA", false)),
        ("siteC", seed("siteB", true)),
        ("siteD", seed("siteC", false)),
    ];
    let mut cluster = certs_free;
    cluster.start_with("siteA", &[], &[]);
    for (site, seed) in &joins {
        cluster.start_with(site, &["--join", seed], &[]);
    }
    cluster
}

#[test]
fn hosts_knowing_one_seed_each_find_all_the_others_and_see_a_killed_one_down() {
    let mut cluster = joining();
    let all_up: Vec<(&str, &str)> = SITES.iter().map(|s| (*s, "up")).collect();
    for site in SITES {
        wait_for(&cluster, site, &all_up, Duration::from_secs(30));
    }
    // Each lists itself first, with its facts and, soon, its load.
    let out = cluster.agent(&["hosts", "--json"], "siteC", "alice");
    let hosts = json(&out);
    assert_eq!(hosts[0]["name"], "siteC");
    assert_eq!(hosts[0]["facts"]["arch"], std::env::consts::ARCH);
    assert!(hosts[0]["load"]["free_mib"].as_u64() > Some(0), "{hosts}");
    let table = cluster.agent(&["hosts"], "siteA", "alice");
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("siteD") && table.contains("up"), "{table}");

    cluster.kill("siteD");
    let down = [("siteD", "down"), ("siteA", "up"), ("siteB", "up")];
    for site in ["siteA", "siteB", "siteC"] {
        wait_for(&cluster, site, &down, Duration::from_secs(30));
    }

    // Agents asking for any host go to the live ones only, and say where they went.
    let search = example_path("search");
    for _ in 0..3 {
        let out = cluster.agent(
            &[
                "launch",
                &search,
                "--hop",
                "any,any,any",
                "--arg",
                "query=migration",
                "--json",
            ],
            "siteA",
            "alice",
        );
        let report = json(&out);
        assert_eq!(report["ok"], true, "{report}");
        let visited = site_names(&report["result"]["visited"]);
        assert_eq!(visited.len(), 3, "{report}");
        assert!(!visited.iter().any(|s| s == "siteD"), "{report}");
        for hop in report["hops"].as_array().into_iter().flatten() {
            assert_ne!(hop["from"], hop["to"], "`any` never stays: {hop}");
        }
    }

    // A place no host fits is an error the agent sees; a restarted host comes back up.
    let out = cluster.agent(
        &[
            "launch",
            &search,
            "--hop",
            "any:arch=no-such-arch",
            "--arg",
            "query=x",
            "--json",
        ],
        "siteA",
        "alice",
    );
    let report = json(&out);
    let skipped = report["result"]["skipped"].to_string();
    assert!(skipped.contains("no host that is up fits"), "{report}");
    let seed = format!("siteA@{}", cluster.addrs["siteA"]);
    cluster.start_with("siteD", &["--join", &seed], &[]);
    let back = [("siteD", "up")];
    for site in ["siteB", "siteC"] {
        wait_for(&cluster, site, &back, Duration::from_secs(30));
    }
}

#[test]
fn a_host_whose_seed_does_not_answer_serves_alone_and_says_why() {
    // Nothing answers at siteB's seed: it serves alone, says why in its log, and keeps
    // trying.
    let cluster = Cluster::start_joining(&["siteA", "siteB"], &[]);
    let mut cluster = cluster;
    let nowhere = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = nowhere.local_addr().unwrap().to_string();
    cluster.start_with("siteB", &["--join", &addr], &[]);
    let hosts = states(&cluster, "siteB");
    assert_eq!(hosts, [("siteB".to_string(), "up".to_string())]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cluster.log("siteB").contains("cannot join through it") {
        assert!(Instant::now() < deadline, "{}", cluster.log("siteB"));
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `count` spin agents launched on siteA that stay there unless moved; their reports.
fn spin_on_site_a(cluster: &Cluster, count: usize, movable: bool) -> Vec<serde_json::Value> {
    let spin = example_path("spin");
    let movable = format!("movable={movable}");
    let n = format!("n={N}");
    let args = [
        "launch",
        &spin,
        "--arg",
        &n,
        "--arg",
        "every=200",
        "--arg",
        &movable,
        "--json",
    ];
    let children: Vec<_> = (0..count)
        .map(|_| cluster.spawn_agent(&args, "siteA", "alice"))
        .collect();
    let (primes, sum) = crate::drain::primes_below(N);
    children
        .into_iter()
        .map(|child| {
            let report = json(&agent_e2e::finish(child, Duration::from_secs(180)));
            assert_eq!(report["ok"], true, "{report}");
            assert_eq!(report["result"]["primes"], primes, "{report}");
            assert_eq!(report["result"]["sum"], sum, "{report}");
            report
        })
        .collect()
}

const N: u64 = 2_000_000;

#[test]
fn a_busy_host_moves_the_agents_that_allow_it_to_less_loaded_hosts() {
    let up: &[&str] = &[];
    let three = ["siteA", "siteB", "siteC"];
    let cluster = Cluster::start(&three, &[("siteA", up), ("siteB", up), ("siteC", up)]);
    let all_up: Vec<(&str, &str)> = three.iter().map(|s| (*s, "up")).collect();
    wait_for(&cluster, "siteA", &all_up, Duration::from_secs(30));

    // Agents that do not allow it stay on siteA, however busy it is.
    let kept = spin_on_site_a(&cluster, 8, false);
    for report in &kept {
        assert_eq!(report["hops"], serde_json::json!([]), "{report}");
    }
    // Those that allow it spread from the busy siteA to the idle hosts, and their counts
    // come out the same.
    let moved = spin_on_site_a(&cluster, 8, true);
    let left: Vec<String> = (moved.iter())
        .filter_map(|r| r["hops"][0]["to"].as_str().map(str::to_string))
        .collect();
    assert!(left.len() >= 2, "only {left:?} moved");
    assert!(
        left.iter().all(|s| s == "siteB" || s == "siteC"),
        "{left:?}"
    );
    assert!(cluster.log("siteA").contains("moved to balance the load"));
}
