//! The messages scenario of the bench: latency of one message to a stationary agent on the
//! other host, durable messages per second to many agents, and messages to an agent that hops
//! without pause. Each uses the inbox example agent.

use crate::{Row, stats};
use agent_runtime::AgentId;
use agent_runtime::net::client::{Client, ClientError, Mailer};
use agent_runtime::net::messages::{LaunchEvent, Refusal};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// An inbox agent followed from its launch: its id, and its events as they come with the
/// instant each arrived.
struct Followed {
    agent: AgentId,
    events: mpsc::UnboundedReceiver<(Instant, LaunchEvent)>,
}

impl Followed {
    async fn launch(
        client: &Arc<Client>,
        wasm: &Arc<Vec<u8>>,
        hop: &[&str],
        args: &[(&str, &str)],
    ) -> anyhow::Result<Followed> {
        let (tx, mut events) = mpsc::unbounded_channel();
        let (client, wasm) = (client.clone(), wasm.clone());
        let itinerary = hop.iter().map(|s| s.to_string()).collect();
        let args: BTreeMap<String, String> = args
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        tokio::spawn(async move {
            let mut on_event = |e: &LaunchEvent| {
                let _ = tx.send((Instant::now(), e.clone()));
            };
            let _ = client.launch(&wasm, itinerary, args, &mut on_event).await;
        });
        loop {
            match events.recv().await {
                Some((_, LaunchEvent::Launched { agent, .. })) => {
                    return Ok(Followed { agent, events });
                }
                Some((_, LaunchEvent::SendModule)) => {}
                other => anyhow::bail!("the inbox agent did not start: {other:?}"),
            }
        }
    }

    /// Waits for the next event that `want` picks.
    async fn next<T>(
        &mut self,
        mut want: impl FnMut(&LaunchEvent) -> Option<T>,
    ) -> anyhow::Result<(Instant, T)> {
        loop {
            let Some((at, event)) = self.events.recv().await else {
                anyhow::bail!("the agent's events stopped");
            };
            if let LaunchEvent::Finished { outcome, .. } = &event {
                anyhow::bail!("the agent ended early: {outcome:?}");
            }
            if let Some(t) = want(&event) {
                return Ok((at, t));
            }
        }
    }

    /// The next value it emitted, as a number.
    async fn emitted(&mut self) -> anyhow::Result<(Instant, u64)> {
        self.next(|e| match e {
            LaunchEvent::Emitted { value, .. } => {
                ciborium::from_reader::<u64, _>(value.as_slice()).ok()
            }
            _ => None,
        })
        .await
    }
}

fn cbor(value: ciborium::Value) -> Vec<u8> {
    let mut bytes = Vec::new();
    // Encoding a plain value into a Vec does not fail.
    let _ = ciborium::into_writer(&value, &mut bytes);
    bytes
}

/// Sends one message, again while the mailbox is full.
async fn send(
    client: &Client,
    mailer: &mut Mailer,
    to: AgentId,
    body: Vec<u8>,
) -> anyhow::Result<()> {
    loop {
        match client.send_message(mailer, to, body.clone()).await {
            Ok(()) => return Ok(()),
            Err(ClientError::Refused(Refusal::MailboxFull { .. })) => {
                tokio::time::sleep(Duration::from_millis(5)).await
            }
            Err(e) => anyhow::bail!("{e}"),
        }
    }
}

/// Latency of one message from the user, through the agent's home (siteA), to the agent
/// waiting on siteB, and back to the user as the value the agent emits on taking it.
pub async fn latency(
    client: &Arc<Client>,
    wasm: &Arc<Vec<u8>>,
    rounds: usize,
) -> anyhow::Result<Row> {
    let mut agent = Followed::launch(client, wasm, &["siteB"], &[("rounds", "1")]).await?;
    agent
        .next(|e| matches!(e, LaunchEvent::Moved(_)).then_some(()))
        .await?;
    let mut mailer = Mailer::new();
    let mut took = Vec::new();
    for n in 0..(200 * rounds as u64) {
        let sent = Instant::now();
        send(client, &mut mailer, agent.agent, cbor(n.into())).await?;
        let (at, echoed) = agent.emitted().await?;
        anyhow::ensure!(echoed == n, "message {n} came back as {echoed}");
        took.push(at.duration_since(sent).as_secs_f64() * 1e3);
    }
    send(client, &mut mailer, agent.agent, cbor("stop".into())).await?;
    let s = stats(took);
    Ok(Row {
        figure: "one message, user → agent waiting on the other host, and its echo back",
        target: "≤ 1 ms p50, ≤ 5 ms p99 (one way)",
        measured: format!("**{:.2} ms** p50, {:.2} ms p99 (round trip)", s.p50, s.p99),
        how: format!(
            "{} messages one after another to an inbox agent waiting on siteB (home siteA): from \
             the send until its emitted echo reached the user, so a round trip: user → siteA \
             (held durably) → siteB (fetched) and back (emitted, held durably at siteA) → user",
            s.n
        ),
    })
}

/// Durable messages per second from the user, through siteA, to many agents waiting on
/// siteB: from the first send until every agent took all of its messages and ended.
pub async fn throughput(
    client: &Arc<Client>,
    wasm: &Arc<Vec<u8>>,
    rounds: usize,
) -> anyhow::Result<Row> {
    let (agents, each) = (100, 200u64);
    let mut rates = Vec::new();
    for _ in 0..rounds {
        let mut followed = Vec::new();
        for _ in 0..agents {
            let args = [("rounds", "1"), ("quiet", "true")];
            followed.push(Followed::launch(client, wasm, &["siteB"], &args).await?);
        }
        for agent in &mut followed {
            agent
                .next(|e| matches!(e, LaunchEvent::Moved(_)).then_some(()))
                .await?;
        }
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for mut agent in followed {
            let client = client.clone();
            tasks.spawn(async move {
                let mut mailer = Mailer::new();
                for n in 0..each {
                    send(&client, &mut mailer, agent.agent, cbor(n.into())).await?;
                }
                send(&client, &mut mailer, agent.agent, cbor("stop".into())).await?;
                loop {
                    match agent.events.recv().await {
                        Some((_, LaunchEvent::Finished { .. })) => return anyhow::Ok(()),
                        Some(_) => {}
                        None => anyhow::bail!("the agent's events stopped"),
                    }
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        rates.push((agents as u64 * (each + 1)) as f64 / started.elapsed().as_secs_f64());
    }
    let s = stats(rates);
    Ok(Row {
        figure: "durable messages per second between two hosts, many agents",
        target: "≥ 20,000",
        measured: format!("**{:.0}** (min {:.0}, max {:.0})", s.p50, s.min, s.max),
        how: format!(
            "{agents} inbox agents waiting on siteB, home siteA; {each} messages each sent at \
             once from one user connection, one sender task per agent; messages ÷ wall time from \
             the first send until every agent took them all and ended; median of {} rounds",
            s.n
        ),
    })
}

/// Messages to an agent that hops siteA ⇄ siteB without pause, taking one message at each
/// site: every message taken once, in order; their latency against a hop's time to commit.
pub async fn hopping(
    client: &Arc<Client>,
    wasm: &Arc<Vec<u8>>,
    rounds: usize,
) -> anyhow::Result<Row> {
    let args = [("pause_ms", "0"), ("per_site", "1")];
    let mut agent = Followed::launch(client, wasm, &["siteB", "siteA"], &args).await?;
    let mut mailer = Mailer::new();
    let count = 200 * rounds as u64;
    let mut took = Vec::new();
    let mut commits = Vec::new();
    for n in 0..count {
        let sent = Instant::now();
        send(client, &mut mailer, agent.agent, cbor(n.into())).await?;
        let (at, echoed) = agent
            .next(|e| match e {
                LaunchEvent::Emitted { value, .. } => {
                    ciborium::from_reader::<u64, _>(value.as_slice()).ok()
                }
                LaunchEvent::Moved(hop) => {
                    commits.push(hop.committed_us as f64 / 1e3);
                    None
                }
                _ => None,
            })
            .await?;
        anyhow::ensure!(
            echoed == n,
            "message {n} came back as {echoed}: lost, doubled or out of order"
        );
        took.push(at.duration_since(sent).as_secs_f64() * 1e3);
    }
    send(client, &mut mailer, agent.agent, cbor("stop".into())).await?;
    let result = agent.next(|_| None::<()>).await;
    // The agent ends after "stop": its end is the error `next` reports.
    let _ = result;
    let (s, c) = (stats(took), stats(commits));
    Ok(Row {
        figure: "messages to an agent hopping siteA ⇄ siteB without pause",
        target: "0 lost, 0 doubled; p99 ≤ 2 × a hop's time to commit",
        measured: format!(
            "0 lost, 0 doubled of {}; **{:.2} ms** p99 (p50 {:.2}) against a hop's commit p50 {:.2} ms, p99 {:.2} ms ({} hops)",
            s.n, s.p99, s.p50, c.p50, c.p99, c.n
        ),
        how: "one message at a time, each echoed (emitted) by the agent when it takes it: from \
              the send until the echo reached the user; a hop's time to commit from the Moved \
              events of the same run"
            .into(),
    })
}
