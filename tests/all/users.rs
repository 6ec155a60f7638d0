//! Hostile or heavy users, and bad days, on real hosts: a user holding a valid certificate
//! cannot make a host hold memory for requests it never finishes, cannot take every agent
//! slot, and cannot get other users' agents charged for CPU they did not use; a dead peer
//! does not hold up traffic to live ones. Memory is read from `/proc/PID/status` (the peak,
//! `VmHWM`) and checked against a bound; no test asserts a duration.

use agent_e2e::{Cluster, block_on, example, example_path, finish, json, site_names};
use agent_runtime::net::client::Client;
use agent_runtime::net::messages::{LaunchEvent, Request};
use std::collections::BTreeMap;
use std::time::Duration;

/// The peak resident memory of process `pid`, in MiB.
fn peak_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("status of {pid}: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib >> 10)
        .unwrap_or_else(|| panic!("no VmHWM in {status}"))
}

fn no_args() -> BTreeMap<String, String> {
    BTreeMap::new()
}

fn args(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    (pairs.iter())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Launches `wasm` through `client` and follows it until it is launched or refused.
async fn start(
    client: &Client,
    wasm: &[u8],
    itinerary: &[&str],
    args: BTreeMap<String, String>,
) -> Result<LaunchEvent, String> {
    let itinerary = itinerary.iter().map(|s| s.to_string()).collect();
    let launched = |e: &LaunchEvent| matches!(e, LaunchEvent::Launched { .. });
    client
        .launch_until(wasm, itinerary, args, &mut |_| {}, &launched)
        .await
        .map_err(|e| e.to_string())
}

fn assert_launched(event: &Result<LaunchEvent, String>) {
    assert!(
        matches!(event, Ok(LaunchEvent::Launched { .. })),
        "{event:?}"
    );
}

fn refusal(event: &Result<LaunchEvent, String>) -> String {
    match event {
        Ok(LaunchEvent::Refused(why)) => why.clone(),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn probes_are_checked_before_they_cost_memory_and_stream_through_the_peer() {
    let cluster = Cluster::start(&["siteA", "siteB"], &[("siteA", &[]), ("siteB", &[])]);
    let (a, b) = (cluster.pid("siteA"), cluster.pid("siteB"));
    block_on(async {
        let client = std::sync::Arc::new(cluster.client("siteA", "alice").await?);
        let probes = |to: &'static str, n: usize| {
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..n {
                let client = client.clone();
                set.spawn(
                    async move { client.probe(to, 1 << 30).await.map_err(|e| e.to_string()) },
                );
            }
            set.join_all()
        };
        // Four probes of 1 GiB at once to a site nobody knows: each refused for that.
        for refused in probes("nowhere", 4).await {
            let why = refused.err().unwrap_or_default();
            assert!(why.contains("unknown site `nowhere`"), "{why}");
        }
        // Two of 1 GiB to a real peer: one runs, the other is told to wait for it.
        let results = probes("siteB", 2).await;
        assert_eq!(
            results.iter().filter(|r| r.is_ok()).count(),
            1,
            "{results:?}"
        );
        let busy = results.iter().find_map(|r| r.as_ref().err());
        assert!(
            busy.is_some_and(|e| e.contains("another probe is running")),
            "{results:?}"
        );
        anyhow::Ok(())
    })
    .unwrap();
    // A GiB went from siteA to siteB, one chunk at a time at both ends.
    let (peak_a, peak_b) = (peak_mib(a), peak_mib(b));
    assert!(peak_a < 256, "siteA peaked at {peak_a} MiB");
    assert!(peak_b < 256, "siteB peaked at {peak_b} MiB");
}

#[test]
fn the_cpu_budget_charges_an_agent_its_own_cpu_not_time_spent_waiting_for_a_thread() {
    let flags: &[&str] = &["--cpu-budget-secs", "1"];
    let cluster = Cluster::start(&["siteA"], &[("siteA", flags)]);
    let spin = example_path("spin");
    // Alice's spinners each want far more than the budget; ten of them share two cores.
    let spinners: Vec<_> = (0..10)
        .map(|_| {
            cluster.spawn_agent(
                &["launch", &spin, "--arg", "n=100000000", "--json"],
                "siteA",
                "alice",
            )
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    // Bob's agent needs a fraction of the budget in CPU, and several times it in waiting.
    let bob = cluster.agent(
        &["launch", &spin, "--arg", "n=3000000", "--json"],
        "siteA",
        "bob",
    );
    let report = json(&bob);
    assert_eq!(report["ok"], true, "{report:#}\n{}", cluster.log("siteA"));
    for child in spinners {
        let out = finish(child, Duration::from_secs(120));
        let report = json(&out);
        let error = report["error"].as_str().unwrap_or_default();
        assert!(error.contains("CPU budget of 1s exhausted"), "{report:#}");
    }
}

#[test]
fn a_dead_peer_holds_up_no_other_peer_and_once_down_fails_fast() {
    // siteC is a peer nobody runs.
    let cluster = Cluster::start(
        &["siteA", "siteB", "siteC"],
        &[("siteA", &[]), ("siteB", &[])],
    );
    let search = example_path("search");
    let to_dead: Vec<_> = (0..5)
        .map(|_| {
            cluster.spawn_agent(
                &[
                    "launch", &search, "--hop", "siteC", "--arg", "query=x", "--json",
                ],
                "siteA",
                "alice",
            )
        })
        .collect();
    // While those dial siteC, a hop to siteB goes through at once: all five are still
    // waiting for siteC when it has come and gone (each waits out the connect timeout).
    std::thread::sleep(Duration::from_secs(1));
    let live = cluster.agent(
        &[
            "launch",
            &search,
            "--hop",
            "siteB,siteA",
            "--arg",
            "query=x",
            "--json",
        ],
        "siteA",
        "bob",
    );
    let report = json(&live);
    assert_eq!(
        site_names(&report["result"]["visited"]),
        ["siteB", "siteA"],
        "{report:#}"
    );
    let mut to_dead = to_dead;
    let still: usize = to_dead
        .iter_mut()
        .map(|c| usize::from(matches!(c.try_wait(), Ok(None))))
        .sum();
    assert_eq!(still, 5, "the hop to siteB waited for the dials to siteC");
    for child in to_dead {
        let report = json(&finish(child, Duration::from_secs(60)));
        let skipped = report["result"]["skipped"][0].as_str().unwrap_or_default();
        assert!(skipped.contains("unreachable"), "{report:#}");
    }
    // Two failed dials in a row (the hops' and a redial's): siteC is down, and a hop to it
    // fails without a dial.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !cluster.log("siteA").contains("down: ") {
        assert!(
            std::time::Instant::now() < deadline,
            "{}",
            cluster.log("siteA")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let again = cluster.agent(
        &[
            "launch", &search, "--hop", "siteC", "--arg", "query=x", "--json",
        ],
        "siteA",
        "alice",
    );
    let report = json(&again);
    let skipped = report["result"]["skipped"][0].as_str().unwrap_or_default();
    assert!(skipped.contains("siteC is down"), "{report:#}");
}

#[test]
fn launches_count_against_max_agents_and_each_users_share() {
    let flags: &[&str] = &["--max-agents", "4", "--user-max-agents", "2"];
    let cluster = Cluster::start(&["siteA", "siteB"], &[("siteA", flags), ("siteB", &[])]);
    let spin = example("spin");
    let search = example_path("search");
    block_on(async {
        let alice = cluster.client("siteA", "alice").await?;
        let long = args(&[("n", "1000000000")]);
        for _ in 0..2 {
            let launched = start(&alice, &spin, &[], long.clone()).await;
            assert_launched(&launched);
        }
        let over = refusal(&start(&alice, &spin, &[], long.clone()).await);
        assert!(
            over.contains("user alice already runs 2 agents on siteA"),
            "{over}"
        );
        assert!(over.contains("user_max_agents"), "{over}");
        // Bob's agent still hops in from siteB, and back.
        let out = cluster.agent(
            &[
                "launch",
                &search,
                "--hop",
                "siteA,siteB",
                "--arg",
                "query=x",
                "--json",
            ],
            "siteB",
            "bob",
        );
        let report = json(&out);
        assert_eq!(
            site_names(&report["result"]["visited"]),
            ["siteA", "siteB"],
            "{report:#}"
        );
        // Bob fills the host; then nobody launches there.
        let bob = cluster.client("siteA", "bob").await?;
        for _ in 0..2 {
            let launched = start(&bob, &spin, &[], long.clone()).await;
            assert_launched(&launched);
        }
        let full = refusal(&start(&bob, &spin, &[], no_args()).await);
        assert!(full.contains("siteA is full: 4 agents running"), "{full}");
        assert!(full.contains("max_agents"), "{full}");
        anyhow::Ok(())
    })
    .unwrap();
}

#[test]
fn launches_made_at_once_get_no_more_places_than_the_users_share() {
    let flags: &[&str] = &["--user-max-agents", "3"];
    let cluster = Cluster::start(&["siteA"], &[("siteA", flags)]);
    let spin = std::sync::Arc::new(example("spin"));
    block_on(async {
        let alice = std::sync::Arc::new(cluster.client("siteA", "alice").await?);
        let mut launches = tokio::task::JoinSet::new();
        for _ in 0..20 {
            let (alice, spin) = (alice.clone(), spin.clone());
            launches.spawn(
                async move { start(&alice, &spin, &[], args(&[("n", "1000000000")])).await },
            );
        }
        let results = launches.join_all().await;
        let launched = (results.iter())
            .filter(|r| matches!(r, Ok(LaunchEvent::Launched { .. })))
            .count();
        assert_eq!(launched, 3, "{results:?}");
        anyhow::Ok(())
    })
    .unwrap();
}

#[test]
fn a_user_launching_faster_than_its_rate_is_refused_naming_the_quota() {
    let flags: &[&str] = &["--user-launches-per-sec", "3"];
    let cluster = Cluster::start(&["siteA"], &[("siteA", flags)]);
    let search = example("search");
    block_on(async {
        let alice = cluster.client("siteA", "alice").await?;
        let query = args(&[("query", "x")]);
        let mut refused = Vec::new();
        for _ in 0..10 {
            if let Ok(LaunchEvent::Refused(why)) = start(&alice, &search, &[], query.clone()).await
            {
                refused.push(why);
            }
        }
        assert!(!refused.is_empty(), "ten launches at once all went through");
        assert!(
            refused.iter().all(|w| w.contains("user_launches_per_sec")),
            "{refused:?}"
        );
        // Bob's allowance is his own.
        let bob = cluster.client("siteA", "bob").await?;
        let launched = start(&bob, &search, &[], query).await;
        assert_launched(&launched);
        anyhow::Ok(())
    })
    .unwrap();
}

#[test]
fn bytes_a_user_sends_are_bounded_per_user_and_connections_per_user_are_capped() {
    let flags: &[&str] = &["--user-connections", "3", "--user-launches-per-sec", "1000"];
    let cluster = Cluster::start(&["siteA"], &[("siteA", flags)]);
    let pid = cluster.pid("siteA");
    let before = peak_mib(pid);
    block_on(async {
        let mut conns = Vec::new();
        for _ in 0..3 {
            conns.push(cluster.client("siteA", "alice").await?);
        }
        // The fourth connection is refused once it asks anything.
        let fourth = cluster.client("siteA", "alice").await?;
        let why = fourth
            .list()
            .await
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(why.contains("user_connections"), "{why}");
        // On each connection, 200 launches that declare a 64 MiB module and send 1 MiB of
        // it; none ever finishes.
        let launch = Request::Launch {
            itinerary: Vec::new(),
            args: no_args(),
        };
        let mut streams = Vec::new();
        let mib = vec![0x5a_u8; 1 << 20];
        for conn in &conns {
            for _ in 0..200 {
                let (mut send, recv) = conn.open(&launch).await.map_err(anyhow::Error::msg)?;
                send.write_all(&(64u64 << 20).to_le_bytes()).await?;
                // Refused once over the budget: the host stops reading the stream.
                let _ = send.write_all(&mib).await;
                streams.push((send, recv));
            }
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        // Bob is served meanwhile.
        let bob = cluster.client("siteA", "bob").await?;
        assert_eq!(bob.list().await.map_err(anyhow::Error::msg)?.total, 0);
        drop(streams);
        for conn in conns.into_iter().chain([fourth, bob]) {
            conn.close().await;
        }
        anyhow::Ok(())
    })
    .unwrap();
    // 600 MiB were sent and 38 GiB declared; the host held at most the user's budget.
    let peak = peak_mib(pid);
    eprintln!("siteA peaked at {peak} MiB, from {before} MiB");
    assert!(
        peak < before + 250,
        "siteA went from {before} to {peak} MiB"
    );
    // And still launches for alice once those requests are gone.
    let out = cluster.agent(
        &[
            "launch",
            &example_path("search"),
            "--arg",
            "query=x",
            "--json",
        ],
        "siteA",
        "alice",
    );
    assert_eq!(json(&out)["ok"], true);
}

#[test]
fn many_launches_of_a_module_the_host_lacks_send_it_once() {
    // Room for three modules arriving at once: fifty arriving together would not fit.
    let flags: &[&str] = &["--user-inflight-mib", "1"];
    let cluster = Cluster::start(&["siteA"], &[("siteA", flags)]);
    let search = std::sync::Arc::new(example("search"));
    block_on(async {
        let alice = std::sync::Arc::new(cluster.client("siteA", "alice").await?);
        let mut launches = tokio::task::JoinSet::new();
        for _ in 0..50 {
            let (alice, search) = (alice.clone(), search.clone());
            launches
                .spawn(async move { start(&alice, &search, &[], args(&[("query", "x")])).await });
        }
        for launched in launches.join_all().await {
            assert_launched(&launched);
        }
        anyhow::Ok(())
    })
    .unwrap();
}

#[test]
fn a_request_that_stops_half_way_is_dropped_at_its_deadline() {
    let cluster = Cluster::start(&["siteA"], &[("siteA", &[])]);
    block_on(async {
        let alice = cluster.client("siteA", "alice").await?;
        let (mut send, mut recv) = alice.open_raw().await.map_err(anyhow::Error::msg)?;
        // A request message of 100 bytes, of which 10 come.
        send.write_all(&100u64.to_le_bytes()).await?;
        send.write_all(&[0xa1; 10]).await?;
        let answer = tokio::time::timeout(Duration::from_secs(120), recv.read_to_end(1024)).await;
        assert!(
            matches!(answer, Ok(Err(_)) | Ok(Ok(_))),
            "the host still waits for the request"
        );
        alice.close().await;
        anyhow::Ok(())
    })
    .unwrap();
    assert!(
        cluster
            .log("siteA")
            .contains("request not whole within 10s"),
        "{}",
        cluster.log("siteA")
    );
}

#[test]
fn one_user_flooding_a_host_does_not_stop_anothers_agent() {
    let flags: &[&str] = &["--user-max-agents", "8", "--cpu-budget-secs", "3"];
    let cluster = Cluster::start(&["siteA", "siteB"], &[("siteA", flags), ("siteB", &[])]);
    let spin = example("spin");
    let flood = block_on(async {
        let alice = cluster.client("siteA", "alice").await?;
        let mut refused = 0;
        for _ in 0..400 {
            let launched = start(&alice, &spin, &[], args(&[("n", "1000000000")])).await;
            if matches!(launched, Ok(LaunchEvent::Refused(_))) {
                refused += 1;
            }
        }
        anyhow::Ok(refused)
    })
    .unwrap();
    assert!(flood > 0, "400 launches of alice were all accepted");
    let out = cluster.agent(
        &[
            "launch",
            &example_path("search"),
            "--hop",
            "siteB,siteA",
            "--arg",
            "query=migration",
            "--json",
        ],
        "siteA",
        "bob",
    );
    let report = json(&out);
    assert_eq!(report["ok"], true, "{report:#}");
    assert_eq!(site_names(&report["result"]["visited"]), ["siteB", "siteA"]);
}
