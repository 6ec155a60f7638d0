//! Messages flow to a touring agent while a host crashes at each crash point of the hop
//! protocol (and of the post office), or while a tenth of all packets between hosts are
//! lost: every message is taken once, in order.

use agent_e2e::{Cluster, example_path, json};
use agent_runtime::AgentId;
use agent_runtime::net::certs::{self, Role};
use agent_runtime::net::client::{Client, ClientError, HostAddr, Mailer};
use agent_runtime::net::messages::Refusal;
use agent_runtime::net::tls::Credentials;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const SITES: [&str; 3] = ["siteA", "siteB", "siteC"];

/// Messages each run sends, and the pause between two.
const MESSAGES: u64 = 40;
const GAP: Duration = Duration::from_millis(15);

/// A user's sender of numbered messages to one agent, on a thread of its own: it connects
/// again when its host went away, and sends the message it was sending again, which the
/// home holds once.
struct Sender {
    certs: PathBuf,
    host: HostAddr,
}

impl Sender {
    fn new(cluster: &Cluster, site: &str) -> Sender {
        Sender {
            certs: cluster.certs(),
            host: HostAddr {
                name: site.into(),
                addr: cluster.addrs[site],
            },
        }
    }

    /// Sends 0, 1, ... `MESSAGES - 1` and then "stop".
    fn send_all(self, to: AgentId) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            rt.block_on(self.run(to));
        })
    }

    async fn run(self, to: AgentId) {
        let creds = Credentials::load(
            &certs::ca_files(&self.certs).cert,
            &certs::files(&self.certs, Role::User, "alice"),
        )
        .unwrap();
        let mut mailer = Mailer::new();
        let mut client: Option<Client> = None;
        let deadline = Instant::now() + Duration::from_secs(120);
        let bodies = (0..MESSAGES).map(|n| cbor(n.into()));
        for body in bodies.chain([cbor("stop".into())]) {
            loop {
                assert!(Instant::now() < deadline, "messages still not held");
                let c = match client.take() {
                    Some(c) => c,
                    None => match Client::connect(&self.host, &creds).await {
                        Ok(c) => c,
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    },
                };
                match c.send_message(&mut mailer, to, body.clone()).await {
                    Ok(()) => {
                        client = Some(c);
                        break;
                    }
                    Err(ClientError::Refused(Refusal::MailboxFull { .. })) => client = Some(c),
                    Err(ClientError::Refused(other)) => panic!("message refused: {other}"),
                    // The connection went (its host crashed): the same message again.
                    Err(_) => {}
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(GAP).await;
        }
    }
}

fn cbor(value: ciborium::Value) -> Vec<u8> {
    let mut bytes = Vec::new();
    ciborium::into_writer(&value, &mut bytes).unwrap();
    bytes
}

/// The inbox agent, launched on siteA: three rounds of siteB, siteC, siteA, taking at most
/// two messages at each site, then waiting where it is.
fn launch_inbox(cluster: &Cluster) -> AgentId {
    let wasm = example_path("inbox");
    let args = [
        "launch",
        &wasm,
        "--hop",
        "siteB,siteC,siteA",
        "--arg",
        "per_site=2",
        "--arg",
        "pause_ms=20",
        "--arg",
        "rounds=3",
        "--detach",
    ];
    let out = cluster.agent(&args, "siteA", "alice");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// The agent ended, and took every message once, in order.
fn took_all_in_order(cluster: &Cluster, agent: AgentId, context: &str) {
    let id = agent.to_string();
    let deadline = Instant::now() + Duration::from_secs(90);
    let logs = || {
        SITES
            .iter()
            .map(|s| format!("--- {s}\n{}", cluster.log(s)))
            .collect::<String>()
    };
    let status = loop {
        let out = cluster.agent(&["status", &id, "--json"], "siteA", "alice");
        if out.status.success() {
            let status = json(&out);
            if status["state"] != "running" {
                break status;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{context}: the agent did not end\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let expected: Vec<u64> = (0..MESSAGES).collect();
    assert_eq!(
        status["result"],
        serde_json::json!(expected),
        "{context}: {status:#}\n{}",
        logs()
    );
}

/// Crashes `site` at `point` while messages flow, restarts it, and checks the messages.
fn crash_while_messages_flow(site: &str, point: &str) {
    let mut cluster = Cluster::start_crashing(&SITES, site, point);
    let agent = launch_inbox(&cluster);
    let sending = Sender::new(&cluster, "siteA").send_all(agent);
    let status = cluster.wait_exit(site, Duration::from_secs(60));
    assert!(!status.success(), "{site} should have crashed at {point}");
    let crashed = format!("crash point {point}");
    assert!(
        cluster.log(site).contains(&crashed),
        "{}",
        cluster.log(site)
    );
    cluster.restart(site, &[]);
    sending.join().unwrap();
    took_all_in_order(&cluster, agent, point);
}

// The crash points where a hop meets the mailbox: an arrival that took messages and was
// never committed (the source goes on from before it took them), one that was, a departure
// in doubt, and the home's own points. The rest of the hop's points are in faults.rs.

#[test]
fn messages_flow_while_the_destination_crashes_mid_image() {
    crash_while_messages_flow("siteB", "dest-mid-image");
}

#[test]
fn messages_flow_while_the_destination_crashes_before_its_commit() {
    crash_while_messages_flow("siteB", "dest-before-commit");
}

#[test]
fn messages_flow_while_the_destination_crashes_after_its_commit() {
    crash_while_messages_flow("siteB", "dest-after-commit");
}

#[test]
fn messages_flow_while_the_source_crashes_before_departed() {
    crash_while_messages_flow("siteB", "source-before-departed");
}

#[test]
fn messages_flow_while_the_source_crashes_after_committed() {
    crash_while_messages_flow("siteB", "source-after-committed");
}

#[test]
fn messages_flow_while_a_host_crashes_after_the_agent_emitted_one() {
    crash_while_messages_flow("siteB", "after-emit");
}

#[test]
fn messages_flow_while_the_home_crashes_after_holding_one() {
    crash_while_messages_flow("siteA", "home-after-post");
}

#[test]
fn messages_are_taken_once_in_order_while_a_tenth_of_all_packets_are_lost() {
    let (cluster, relays) = Cluster::start_lossy(&SITES, 100, Duration::from_micros(200));
    let agent = launch_inbox(&cluster);
    Sender::new(&cluster, "siteA")
        .send_all(agent)
        .join()
        .unwrap();
    took_all_in_order(&cluster, agent, "lossy");
    let dropped: u64 = relays.iter().map(|r| r.dropped()).sum();
    assert!(dropped > 0, "the relays dropped nothing");
}
