//! Messages reach agents wherever they are: once each, in order per sender, through hops,
//! parking and host restarts; and every message that cannot be delivered gets an error that
//! says why.

use agent_e2e::{Cluster, example_path, finish, json};
use agent_runtime::AgentId;
use agent_runtime::net::client::{ClientError, Mailer};
use agent_runtime::net::messages::Refusal;
use std::time::{Duration, Instant};

const SITES: [&str; 3] = ["siteA", "siteB", "siteC"];

fn three_hosts() -> Cluster {
    let up: &[&str] = &[];
    Cluster::start(&SITES, &[("siteA", up), ("siteB", up), ("siteC", up)])
}

/// Launches `example` on `site` as alice, detached; its id.
fn detach(cluster: &Cluster, example: &str, extra: &[&str], site: &str) -> String {
    let wasm = example_path(example);
    let mut args = vec!["launch", &wasm, "--detach"];
    args.extend(extra);
    let out = cluster.agent(&args, site, "alice");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `agent send` as `user` through `site`.
fn send(
    cluster: &Cluster,
    id: &str,
    message: &[&str],
    site: &str,
    user: &str,
) -> std::process::Output {
    let mut args = vec!["send", id];
    args.extend(message);
    cluster.agent(&args, site, user)
}

fn sent(out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn refused(out: &std::process::Output, why: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains(why),
        "expected `{why}`: {stderr}"
    );
}

/// The agent's status once it ended, asked of its home `site`.
fn ended(cluster: &Cluster, id: &str, site: &str, within: Duration) -> serde_json::Value {
    let deadline = Instant::now() + within;
    loop {
        let status = json(&cluster.agent(&["status", id, "--json"], site, "alice"));
        if status["state"] != "running" {
            return status;
        }
        assert!(Instant::now() < deadline, "agent did not end: {status:#}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `site`'s log says `what`.
fn logged(cluster: &Cluster, site: &str, what: &str, within: Duration) {
    let deadline = Instant::now() + within;
    while !cluster.log(site).contains(what) {
        assert!(
            Instant::now() < deadline,
            "{site} never logged `{what}`:\n{}",
            cluster.log(site)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_users_messages_reach_a_touring_agent_once_each_in_order() {
    let cluster = three_hosts();
    let id = detach(&cluster, "inbox", &["--hop", "siteB,siteC"], "siteA");
    sent(&send(&cluster, &id, &["m1"], "siteA", "alice"));
    sent(&send(
        &cluster,
        &id,
        &["--json", r#"{"n": 2}"#],
        "siteA",
        "alice",
    ));
    sent(&send(&cluster, &id, &["m3"], "siteA", "alice"));
    sent(&send(&cluster, &id, &["stop"], "siteA", "alice"));
    let status = ended(&cluster, &id, "siteA", Duration::from_secs(60));
    assert_eq!(status["state"], "finished", "{status:#}");
    assert_eq!(
        status["result"],
        serde_json::json!(["m1", {"n": 2}, "m3"]),
        "{status:#}"
    );
    assert_eq!(status["emits"], 3, "{status:#}");
    assert!(
        status["hops"].as_array().is_some_and(|h| !h.is_empty()),
        "{status:#}"
    );
    // It ended: a message to it now says so.
    refused(
        &send(&cluster, &id, &["late"], "siteA", "alice"),
        &format!("agent ended: {id}"),
    );
}

#[test]
fn a_thousand_messages_reach_an_agent_hopping_between_three_hosts() {
    let cluster = three_hosts();
    let id = detach(
        &cluster,
        "inbox",
        &[
            "--hop",
            "siteB,siteC,siteA",
            "--arg",
            "pause_ms=1",
            "--arg",
            "per_site=5",
        ],
        "siteA",
    );
    let agent: AgentId = id.parse().unwrap();
    const MESSAGES: u64 = 1000;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = cluster.client("siteA", "alice").await.unwrap();
        let mut mailer = Mailer::new();
        let numbers = (0..MESSAGES).map(|n| cbor(n.into()));
        for n in numbers.chain([cbor("stop".into())]) {
            // A full mailbox says so: the same message is sent again a little later.
            loop {
                match client.send_message(&mut mailer, agent, n.clone()).await {
                    Ok(()) => break,
                    Err(ClientError::Refused(Refusal::MailboxFull { .. })) => {
                        tokio::time::sleep(Duration::from_millis(20)).await
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        }
        client.close().await;
    });
    let status = ended(&cluster, &id, "siteA", Duration::from_secs(120));
    let expected: Vec<u64> = (0..MESSAGES).collect();
    assert_eq!(status["result"], serde_json::json!(expected), "{status:#}");
    let hops = status["hops"].as_array().map_or(0, Vec::len);
    assert!(
        hops >= 6,
        "the agent should have toured while it received: {hops} hops"
    );
}

/// A value as CBOR bytes, for messages sent through the library.
fn cbor(value: ciborium::Value) -> Vec<u8> {
    let mut bytes = Vec::new();
    ciborium::into_writer(&value, &mut bytes).unwrap();
    bytes
}

/// An agent waiting for a message on another host is parked there; a message wakes it,
/// also one sent while that host was down, once it is back.
#[test]
fn a_parked_agent_is_woken_by_a_message_across_a_restart_of_its_host() {
    let mut cluster = three_hosts();
    let id = detach(
        &cluster,
        "inbox",
        &["--hop", "siteB", "--arg", "rounds=1"],
        "siteA",
    );
    logged(
        &cluster,
        "siteB",
        "parked waiting for a message",
        Duration::from_secs(30),
    );
    // Its home says where it waits.
    let status = json(&cluster.agent(&["status", &id, "--json"], "siteA", "alice"));
    assert_eq!(status["waiting_on"], "siteB", "{status:#}");
    // The same words in JSON as in text: its life, and what it is doing.
    assert_eq!(
        (&status["state"], &status["activity"]),
        (&"running".into(), &"waiting".into()),
        "{status:#}"
    );
    let out = cluster.agent(&["status", &id], "siteA", "alice");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("waiting for a message on siteB (parked)"),
        "{text}"
    );
    let out = cluster.agent(&["list"], "siteA", "alice");
    assert!(String::from_utf8_lossy(&out.stdout).contains("running (waiting)"));
    sent(&send(&cluster, &id, &["first"], "siteA", "alice"));
    // Taken, and parked again once the wait is long.
    logged(&cluster, "siteB", "woke", Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(2));
    let parks = cluster
        .log("siteB")
        .matches("parked waiting for a message")
        .count();
    assert!(
        parks >= 2,
        "it should have parked again:\n{}",
        cluster.log("siteB")
    );
    cluster.kill("siteB");
    sent(&send(&cluster, &id, &["while down"], "siteA", "alice"));
    sent(&send(&cluster, &id, &["stop"], "siteA", "alice"));
    cluster.restart("siteB", &[]);
    let status = ended(&cluster, &id, "siteA", Duration::from_secs(60));
    assert_eq!(
        status["result"],
        serde_json::json!(["first", "while down"]),
        "{status:#}"
    );
    assert!(status["waiting_on"].is_null(), "{status:#}");
}

/// Once the agent's hop away from siteB committed, siteB may go for good: its messages wait
/// at its home, not on any host it left.
#[test]
fn messages_arrive_after_a_host_the_agent_left_is_gone_for_good() {
    let mut cluster = three_hosts();
    let id = detach(
        &cluster,
        "inbox",
        &["--hop", "siteB,siteC", "--arg", "rounds=1"],
        "siteA",
    );
    logged(
        &cluster,
        "siteC",
        "parked waiting for a message",
        Duration::from_secs(30),
    );
    cluster.kill("siteB");
    sent(&send(&cluster, &id, &["after"], "siteA", "alice"));
    sent(&send(&cluster, &id, &["stop"], "siteA", "alice"));
    let status = ended(&cluster, &id, "siteA", Duration::from_secs(60));
    assert_eq!(status["result"], serde_json::json!(["after"]), "{status:#}");
}

#[test]
fn messages_that_cannot_be_delivered_say_why() {
    let up: &[&str] = &[];
    let cluster = Cluster::start(
        &["siteA", "siteB"],
        &[("siteA", &["--mailbox", "2"]), ("siteB", up)],
    );
    let unknown = "0123456789abcdef0123456789abcdef";
    refused(
        &send(&cluster, unknown, &["hi"], "siteA", "alice"),
        &format!("no such agent: {unknown}"),
    );
    refused(
        &send(&cluster, "nothex", &["hi"], "siteA", "alice"),
        "is not an agent id",
    );
    refused(
        &send(&cluster, unknown, &["--json", "{nope"], "siteA", "alice"),
        "--json takes a JSON value",
    );
    // An agent that waits parked on siteB, and takes no message before it was woken.
    let id = detach(
        &cluster,
        "inbox",
        &["--hop", "siteB", "--arg", "rounds=1"],
        "siteA",
    );
    refused(
        &send(&cluster, &id, &["hi"], "siteA", "bob"),
        &format!("no agent {id} of yours here"),
    );
    let big = "x".repeat(agent_abi::MAX_MAIL + 1);
    refused(
        &send(&cluster, &id, &[&big], "siteA", "alice"),
        "a message may be at most",
    );
    // The host checks the size too, for clients that do not.
    let agent: AgentId = id.parse().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let too_large = rt.block_on(async {
        let client = cluster.client("siteA", "alice").await.unwrap();
        let body = vec![0x40; agent_abi::MAX_MAIL + 1];
        client.send_message(&mut Mailer::new(), agent, body).await
    });
    assert!(
        matches!(
            too_large,
            Err(ClientError::Refused(Refusal::MailTooLarge { .. }))
        ),
        "{too_large:?}"
    );
    // Its mailbox holds two messages; the agent takes none while siteB is down.
    let mut cluster = cluster;
    logged(
        &cluster,
        "siteB",
        "parked waiting for a message",
        Duration::from_secs(30),
    );
    cluster.kill("siteB");
    sent(&send(&cluster, &id, &["one"], "siteA", "alice"));
    sent(&send(&cluster, &id, &["two"], "siteA", "alice"));
    refused(
        &send(&cluster, &id, &["three"], "siteA", "alice"),
        "is full (2 messages)",
    );
    cluster.restart("siteB", &[]);
    // Room comes once the agent, back, took them and was stored.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = send(&cluster, &id, &["stop"], "siteA", "alice");
        if out.status.success() {
            break;
        }
        refused(&out, "is full (2 messages)");
        assert!(
            Instant::now() < deadline,
            "the mailbox never had room again:\n{}\n{}",
            cluster.log("siteA"),
            cluster.log("siteB")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = ended(&cluster, &id, "siteA", Duration::from_secs(60));
    assert_eq!(
        status["result"],
        serde_json::json!(["one", "two"]),
        "{status:#}"
    );
}

/// Scouts launched on two homes tour a site each and report to a coordinator by message;
/// the coordinator's result holds every site's findings.
#[test]
fn scouts_report_their_findings_to_a_coordinator_by_message() {
    let cluster = three_hosts();
    let coordinator = detach(&cluster, "scouts", &["--arg", "scouts=2"], "siteA");
    let wasm = example_path("scouts");
    let arg = format!("coordinator={coordinator}");
    let scout = |home: &str, site: &str| {
        let args = [
            "launch",
            &wasm,
            "--hop",
            site,
            "--arg",
            &arg,
            "--arg",
            "query=agent",
            "--json",
        ];
        let report = json(&cluster.agent(&args, home, "alice"));
        assert_eq!(report["ok"], true, "{report:#}");
    };
    scout("siteA", "siteB");
    // Launched on another home: its host finds the coordinator's home by asking.
    scout("siteC", "siteC");
    let status = ended(&cluster, &coordinator, "siteA", Duration::from_secs(60));
    assert_eq!(status["state"], "finished", "{status:#}");
    let found = status["result"].as_object().cloned().unwrap_or_default();
    let sites: Vec<&str> = found.keys().map(String::as_str).collect();
    assert_eq!(sites, ["siteB", "siteC"], "{status:#}");
    assert!(
        found
            .values()
            .all(|lines| lines.as_array().is_some_and(|l| !l.is_empty())),
        "{status:#}"
    );
    // A scout whose coordinator does not exist is told so.
    let args = [
        "launch",
        &wasm,
        "--hop",
        "siteB",
        "--arg",
        "coordinator=0123456789abcdef0123456789abcdef",
        "--json",
    ];
    let report = json(&cluster.agent(&args, "siteA", "alice"));
    let error = report["error"].as_str().unwrap_or_default();
    assert!(error.contains("no such agent"), "{report:#}");
}

/// The scout's host crashes right after the coordinator's home held its message, before the
/// scout went on: restarted, it sends the message again, and the coordinator takes it once.
#[test]
fn a_message_sent_again_after_its_senders_host_crashed_is_taken_once() {
    let up: &[&str] = &[];
    let mut cluster = Cluster::start(&SITES, &[("siteA", up), ("siteC", up)]);
    cluster.start_with("siteB", &[], &[("FAILPOINTS", "after-send=return")]);
    let coordinator = detach(&cluster, "scouts", &["--arg", "scouts=1"], "siteA");
    let wasm = example_path("scouts");
    let arg = format!("coordinator={coordinator}");
    let args = ["launch", &wasm, "--hop", "siteB", "--arg", &arg, "--json"];
    let launcher = cluster.spawn_agent(&args, "siteA", "alice");
    let status = cluster.wait_exit("siteB", Duration::from_secs(60));
    assert!(
        !status.success(),
        "siteB should have crashed after the send"
    );
    assert!(cluster.log("siteB").contains("crash point after-send"));
    cluster.restart("siteB", &[]);
    let report = json(&finish(launcher, Duration::from_secs(90)));
    assert_eq!(report["ok"], true, "{report:#}");
    let status = ended(&cluster, &coordinator, "siteA", Duration::from_secs(60));
    assert_eq!(status["state"], "finished", "{status:#}");
    // One report from siteB, not two: its lines once.
    let lines = status["result"]["siteB"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mut unique = lines.clone();
    unique.dedup();
    assert!(!lines.is_empty() && lines == unique, "{status:#}");
    assert_eq!(status["emits"], 1, "{status:#}");
}

/// The home crashes right after it stored a message for an agent parked waiting on the home
/// itself, before it woke the agent: started again, it wakes the agent, which takes it.
#[test]
fn an_agent_waiting_at_its_home_is_woken_when_the_home_starts_again() {
    let up: &[&str] = &[];
    let mut cluster = Cluster::start(&SITES, &[("siteB", up)]);
    cluster.start_with("siteA", &[], &[("FAILPOINTS", "home-after-post=return")]);
    let id = detach(&cluster, "inbox", &[], "siteA");
    logged(
        &cluster,
        "siteA",
        "parked waiting for a message",
        Duration::from_secs(30),
    );
    // The send may fail or succeed (it tries again once the home is back): the home held it.
    let sender = cluster.spawn_agent(&["send", &id, "held"], "siteA", "alice");
    let status = cluster.wait_exit("siteA", Duration::from_secs(30));
    assert!(
        !status.success(),
        "siteA should have crashed after the post"
    );
    cluster.restart("siteA", &[]);
    let _ = finish(sender, Duration::from_secs(60));
    sent(&send(&cluster, &id, &["stop"], "siteA", "alice"));
    let status = ended(&cluster, &id, "siteA", Duration::from_secs(60));
    assert_eq!(status["result"], serde_json::json!(["held"]), "{status:#}");
}

/// While its home is down, an agent's `recv_timeout` still times out: it tours on.
#[test]
fn a_wait_with_a_timeout_ends_on_time_while_the_home_is_down() {
    let mut cluster = three_hosts();
    let id = detach(&cluster, "inbox", &["--hop", "siteB,siteC"], "siteA");
    logged(&cluster, "siteC", "agent arrived", Duration::from_secs(30));
    cluster.kill("siteA");
    let arrivals = |cluster: &Cluster| {
        let logs = cluster.log("siteB") + &cluster.log("siteC");
        logs.matches("agent arrived").count()
    };
    let before = arrivals(&cluster);
    std::thread::sleep(Duration::from_secs(3));
    let after = arrivals(&cluster);
    assert!(
        after >= before + 4,
        "the agent should tour on while its home is down: {before} then {after} arrivals"
    );
    cluster.restart("siteA", &[]);
    sent(&send(&cluster, &id, &["stop"], "siteA", "alice"));
    let status = ended(&cluster, &id, "siteA", Duration::from_secs(60));
    assert_eq!(status["state"], "finished", "{status:#}");
    assert_eq!(status["result"], serde_json::json!([]), "{status:#}");
}

/// Three senders at once, each numbering its own messages: the agent takes every message
/// once, and each sender's in the order sent, however they interleave.
#[test]
fn messages_of_senders_at_once_are_taken_in_each_senders_order() {
    let cluster = three_hosts();
    let id = detach(
        &cluster,
        "inbox",
        &[
            "--hop",
            "siteB,siteC",
            "--arg",
            "per_site=3",
            "--arg",
            "quiet=true",
        ],
        "siteA",
    );
    let agent: AgentId = id.parse().unwrap();
    const EACH: u64 = 150;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let client = std::sync::Arc::new(cluster.client("siteA", "alice").await.unwrap());
        let mut senders = tokio::task::JoinSet::new();
        for sender in 0..3u64 {
            let client = client.clone();
            senders.spawn(async move {
                let mut mailer = Mailer::new();
                for n in 0..EACH {
                    let body = cbor(
                        vec![sender, n]
                            .into_iter()
                            .map(Into::into)
                            .collect::<Vec<ciborium::Value>>()
                            .into(),
                    );
                    loop {
                        match client.send_message(&mut mailer, agent, body.clone()).await {
                            Ok(()) => break,
                            Err(ClientError::Refused(Refusal::MailboxFull { .. })) => {
                                tokio::time::sleep(Duration::from_millis(20)).await
                            }
                            Err(e) => panic!("{e}"),
                        }
                    }
                }
            });
        }
        while let Some(done) = senders.join_next().await {
            done.unwrap();
        }
        let mut mailer = Mailer::new();
        client
            .send_message(&mut mailer, agent, cbor("stop".into()))
            .await
            .unwrap();
    });
    let status = ended(&cluster, &id, "siteA", Duration::from_secs(120));
    let taken: Vec<(u64, u64)> = status["result"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| (m[0].as_u64().unwrap(), m[1].as_u64().unwrap()))
        .collect();
    assert_eq!(taken.len() as u64, 3 * EACH, "{status:#}");
    for sender in 0..3 {
        let order: Vec<u64> = taken
            .iter()
            .filter(|(s, _)| *s == sender)
            .map(|(_, n)| *n)
            .collect();
        assert_eq!(
            order,
            (0..EACH).collect::<Vec<_>>(),
            "sender {sender}: {status:#}"
        );
    }
}

/// The mailboxes of one user's agents on their home hold at most `--user-mail-mib` of
/// messages together, whatever each mailbox's own room; room comes back as they take them.
#[test]
fn the_mailboxes_of_a_users_agents_hold_at_most_the_users_share_of_bytes() {
    let up: &[&str] = &[];
    let limits: &[&str] = &["--user-mail-mib", "1"];
    let mut cluster = Cluster::start(&["siteA", "siteB"], &[("siteA", limits), ("siteB", up)]);
    let waiting = ["--hop", "siteB", "--arg", "rounds=1", "--arg", "quiet=true"];
    let ids = [0, 1].map(|_| detach(&cluster, "inbox", &waiting, "siteA"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster
        .log("siteB")
        .matches("parked waiting for a message")
        .count()
        < 2
    {
        assert!(Instant::now() < deadline, "{}", cluster.log("siteB"));
        std::thread::sleep(Duration::from_millis(50));
    }
    // The agents take nothing while siteB is down.
    cluster.kill("siteB");
    let agents = ids.clone().map(|id| id.parse::<AgentId>().unwrap());
    let body = cbor(ciborium::Value::Bytes(vec![7; 60_000]));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let client = rt.block_on(cluster.client("siteA", "alice")).unwrap();
    let mut mailers = [Mailer::new(), Mailer::new()];
    let mut held = 0u64;
    let refusal = loop {
        let at = (held % 2) as usize;
        let sent = client.send_message(&mut mailers[at], agents[at], body.clone());
        match rt.block_on(sent) {
            Ok(()) => held += 1,
            Err(e) => break e,
        }
        assert!(held < 100, "no limit");
    };
    let refused = matches!(&refusal, ClientError::Refused(Refusal::UserMailFull { user, limit }) if user == "alice" && *limit == 1 << 20);
    assert!(refused, "{refusal}");
    // 1 MiB of ~60 KB messages, in two mailboxes that each hold 1,024.
    assert!((15..=17).contains(&held), "{held} messages held");
    let text = refusal.to_string();
    assert!(
        text.contains("the mailboxes of alice's agents on this host hold 1048576 bytes"),
        "{text}"
    );
    // Back, the agents take them: there is room again.
    cluster.restart("siteB", &[]);
    let deadline = Instant::now() + Duration::from_secs(60);
    let at = (held % 2) as usize;
    loop {
        let sent = client.send_message(&mut mailers[at], agents[at], body.clone());
        match rt.block_on(sent) {
            Ok(()) => break,
            Err(ClientError::Refused(Refusal::UserMailFull { .. })) => {
                assert!(Instant::now() < deadline, "no room came back");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("{e}"),
        }
    }
    rt.block_on(client.close());
    for id in &ids {
        sent(&cluster.agent(&["kill", id], "siteA", "alice"));
    }
}
