//! Soak run (by hand, not in CI): keeps many search agents hopping among three real hosts for
//! a while, then checks that every agent launched ended exactly once and that each site's
//! call journal holds exactly the visits each agent's result lists. Prints a Markdown report
//! with host memory (RSS) over time.
//!
//! `scripts/soak [AGENTS] [MINUTES] [HOPS]` (defaults 1000, 10, 30).

use agent_e2e::{Cluster, example};
use agent_runtime::net::messages::{AgentEnd, LaunchEvent};
use agent_runtime::runner::cbor_to_json;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

const SITES: [&str; 3] = ["siteA", "siteB", "siteC"];

/// How one launched agent ended, as its launcher saw it.
enum Ending {
    /// Finished with a result: the sites it searched, in order.
    Visited(Vec<String>),
    /// Finished with an error.
    Failed(String),
    /// The stream broke before the end.
    Lost(String),
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// `text` without its terminal colour codes.
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().find(|c| c.is_ascii_alphabetic());
        } else {
            out.push(c);
        }
    }
    out
}

fn arg(index: usize, default: u64) -> u64 {
    std::env::args()
        .nth(index)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    let (agents, minutes, hops) = (arg(1, 1000), arg(2, 10), arg(3, 30));
    // The CLI and host binaries sit beside this one.
    if let Ok(exe) = std::env::current_exe() {
        // SAFETY: no other thread exists yet, so nothing reads the environment concurrently.
        unsafe { std::env::set_var("AGENT_BIN", exe.with_file_name("agent")) };
    }
    let wasm = example("search");
    // One user (the soak) launches as fast as agents end.
    let max = [
        "--max-agents",
        "100000",
        "--user-launches-per-sec",
        "1000000",
    ];
    let mut cluster = Cluster::start(&SITES, &[("siteA", &max), ("siteB", &max), ("siteC", &max)]);
    let pids: Vec<u32> = SITES.iter().map(|s| cluster.pid(s)).collect();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(minutes * 60);

    let stop_sampling = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop_sampling.clone();
        let pids = pids.clone();
        std::thread::spawn(move || {
            let mut rows = Vec::new();
            let mut next = Instant::now();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if Instant::now() >= next {
                    let rss: Vec<f64> = pids.iter().map(|p| rss_mib(*p)).collect();
                    rows.push((started.elapsed().as_secs(), rss));
                    next += Duration::from_secs(30);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            rows
        })
    };

    let runtime = tokio::runtime::Runtime::new()?;
    let endings: HashMap<String, Ending> = runtime
        .block_on(async {
            // A launcher's stream stays open while it follows its agent, and a user's
            // connection may have 256 open at once: one connection per 200 agents.
            let mut clients = Vec::new();
            for _ in 0..agents.div_ceil(200).max(1) {
                clients.push(Arc::new(cluster.client("siteA", "alice").await?));
            }
            let wasm = Arc::new(wasm);
            let slots = Arc::new(tokio::sync::Semaphore::new(agents as usize));
            let mut tasks = tokio::task::JoinSet::new();
            let mut launched = 0u64;
            while Instant::now() < deadline {
                let Ok(permit) = slots.clone().acquire_owned().await else {
                    break;
                };
                // Each agent tours the three sites, starting at a different one.
                let itinerary: Vec<String> = (0..hops)
                    .map(|i| SITES[((launched + i + 1) % 3) as usize].to_string())
                    .collect();
                let client = clients[(launched % clients.len() as u64) as usize].clone();
                let nth = launched;
                launched += 1;
                let wasm = wasm.clone();
                tasks.spawn(async move {
                    let args = BTreeMap::from([
                        ("query".to_string(), "migration".to_string()),
                        ("limit".to_string(), "1".to_string()),
                    ]);
                    // Until the host names the agent (a launch it never started has no id).
                    let mut id = format!("(launch {nth}, never started)");
                    let last = client
                        .launch(&wasm, itinerary, args, &mut |event| {
                            if let LaunchEvent::Launched { agent, .. } = event {
                                id = agent.to_string();
                            }
                        })
                        .await;
                    drop(permit);
                    let ending = match last {
                        Ok(LaunchEvent::Finished {
                            outcome: AgentEnd::Finished(bytes),
                            ..
                        }) => match cbor_to_json(&bytes) {
                            Ok(v) => Ending::Visited(
                                v["visited"]
                                    .as_array()
                                    .into_iter()
                                    .flatten()
                                    .filter_map(|s| s.as_str().map(str::to_string))
                                    .collect(),
                            ),
                            Err(e) => Ending::Failed(e.to_string()),
                        },
                        Ok(other) => Ending::Failed(format!("{other:?}")),
                        Err(e) => Ending::Lost(e.to_string()),
                    };
                    (id, ending)
                });
            }
            eprintln!("soak: {launched} agents launched; waiting for those still touring");
            let mut endings = HashMap::new();
            let grace = tokio::time::sleep(Duration::from_secs(300));
            tokio::pin!(grace);
            loop {
                tokio::select! {
                    next = tasks.join_next() => match next {
                        Some(Ok((id, ending))) => { endings.insert(id, ending); }
                        Some(Err(e)) => eprintln!("soak: a launcher task failed: {e}"),
                        None => break,
                    },
                    () = &mut grace => {
                        eprintln!("soak: {} agents never ended", tasks.len());
                        break;
                    }
                }
            }
            let still = tasks.len() as u64;
            anyhow::Ok((endings, launched, still))
        })
        .map(|(endings, launched, still)| {
            println!("launched: {launched}, still running at the end: {still}");
            endings
        })?;
    stop_sampling.store(true, std::sync::atomic::Ordering::SeqCst);
    let rss = sampler.join().unwrap_or_default();
    let elapsed = started.elapsed();
    for s in SITES {
        cluster.stop(s);
        // Why requests were refused or failed, by how often.
        let mut why: BTreeMap<String, usize> = BTreeMap::new();
        for line in cluster.log(s).lines() {
            let plain = strip_ansi(line);
            let noted = [
                "refused",
                "bad request",
                "stream ended",
                "not whole",
                "busy",
            ];
            if noted.iter().any(|n| plain.contains(n)) {
                let text = plain.split_once(": ").map_or(&*plain, |(_, t)| t);
                *why.entry(text.chars().take(120).collect()).or_default() += 1;
            }
        }
        let mut why: Vec<(String, usize)> = why.into_iter().collect();
        why.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
        for (text, n) in why.iter().take(5) {
            println!("{s}: {n} x {text}");
        }
        // What held each host's memory, as it logged every minute.
        for line in cluster.log(s).lines().filter(|l| l.contains("rss_mib")) {
            let plain = strip_ansi(line);
            println!(
                "{s}: {}",
                plain.split_once(" memory ").map_or(&*plain, |(_, l)| l)
            );
        }
    }

    // Journals: agent → site → visits recorded.
    let mut journal: HashMap<String, BTreeMap<String, usize>> = HashMap::new();
    for s in SITES {
        for (agent, _) in cluster.visits(s) {
            *journal
                .entry(agent)
                .or_default()
                .entry(s.to_string())
                .or_default() += 1;
        }
    }
    let (mut finished, mut failed, mut lost, mut duplicated, mut missing, mut hops_done) =
        (0, 0, 0, 0, 0, 0usize);
    for (id, ending) in &endings {
        match ending {
            Ending::Visited(visited) => {
                finished += 1;
                hops_done += visited.len();
                let mut want: BTreeMap<String, usize> = BTreeMap::new();
                for v in visited {
                    *want.entry(v.clone()).or_default() += 1;
                }
                let got = journal.get(id).cloned().unwrap_or_default();
                for s in SITES {
                    let (w, g) = (
                        want.get(s).copied().unwrap_or(0),
                        got.get(s).copied().unwrap_or(0),
                    );
                    if g > w {
                        duplicated += 1;
                        eprintln!("soak: agent {id} has {g} visits on {s}, its result lists {w}");
                    } else if g < w {
                        missing += 1;
                        eprintln!("soak: agent {id} has {g} visits on {s}, its result lists {w}");
                    }
                }
            }
            Ending::Failed(e) => {
                failed += 1;
                eprintln!("soak: agent {id} failed: {e}");
            }
            Ending::Lost(e) => {
                lost += 1;
                eprintln!("soak: agent {id} lost its launcher stream: {e}");
            }
        }
    }
    println!("\n## Soak: {agents} agents in flight, {hops} stops each, {minutes} min\n");
    println!("| figure | value |\n|---|---|");
    println!("| agents ended with a result | {finished} |");
    println!("| agents ended with an error | {failed} |");
    println!("| agents lost (no end seen) | {lost} |");
    println!("| agents with a duplicated visit | {duplicated} |");
    println!("| agents with a visit missing from a journal | {missing} |");
    println!("| stops made (searches) | {hops_done} |");
    println!(
        "| stops per second | {:.0} |",
        hops_done as f64 / elapsed.as_secs_f64()
    );
    println!(
        "\n| time (s) | siteA RSS (MiB) | siteB RSS (MiB) | siteC RSS (MiB) |\n|---|---|---|---|"
    );
    for (t, r) in rss {
        println!("| {t} | {:.0} | {:.0} | {:.0} |", r[0], r[1], r[2]);
    }
    Ok(())
}
