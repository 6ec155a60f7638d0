//! The user's commands: launch an agent on a host and follow it; status, list, kill.

use agent_runtime::AgentId;
use agent_runtime::net::certs::{self, Role};
use agent_runtime::net::client::{Client, ClientError, HostAddr};
use agent_runtime::net::messages::{Asleep, HopInfo, LaunchEvent, StatusReply, unix_ms};
use agent_runtime::net::tls::Credentials;
use agent_runtime::runner::cbor_to_json;
use anyhow::{Context as _, bail};
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// How to reach a host as a user.
#[derive(clap::Args, Clone)]
pub struct Connection {
    /// The host: its site name and UDP address.
    #[arg(
        long,
        value_name = "NAME@ADDR",
        default_value = "localhost@127.0.0.1:4433"
    )]
    pub host: HostAddr,
    /// Directory with ca.crt and user-NAME.crt/.key.
    #[arg(long, default_value = "agent-host-data/certs")]
    pub certs: PathBuf,
    /// User name (the certificate to use) [default: the only user certificate in --certs].
    #[arg(long)]
    pub user: Option<String>,
}

impl Connection {
    fn credentials(&self) -> anyhow::Result<Credentials> {
        let user = match &self.user {
            Some(u) => u.clone(),
            None => only_user(&self.certs)?,
        };
        let files = certs::files(&self.certs, Role::User, &user);
        Credentials::load(&certs::ca_files(&self.certs).cert, &files).with_context(|| {
            format!("no user certificate for {user} in {} (make one with `agent-host certs issue --dir DIR --user {user}`)", self.certs.display())
        })
    }

    /// Connects as the user.
    pub async fn connect(&self) -> anyhow::Result<Client> {
        let creds = self.credentials()?;
        Client::connect(&self.host, &creds)
            .await
            .map_err(anyhow::Error::msg)
    }
}

fn only_user(dir: &Path) -> anyhow::Result<String> {
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))?;
    let users: Vec<String> = entries
        .flatten()
        .filter_map(|e| {
            e.file_name().to_str().and_then(|n| {
                n.strip_prefix("user-")?
                    .strip_suffix(".crt")
                    .map(str::to_string)
            })
        })
        .collect();
    match users.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!("no user certificate in {}", dir.display()),
        many => bail!(
            "several user certificates in {} ({}): choose one with --user",
            dir.display(),
            many.join(", ")
        ),
    }
}

/// Whether an agent's last event says it succeeded, its result, and its error.
fn outcome_of(last: &LaunchEvent) -> (bool, Option<serde_json::Value>, Option<String>) {
    match last {
        LaunchEvent::Finished {
            outcome: Ok(bytes), ..
        } => match cbor_to_json(bytes) {
            Ok(v) => (true, Some(v), None),
            Err(e) => (false, None, Some(e)),
        },
        LaunchEvent::Finished {
            outcome: Err(e), ..
        } => (false, None, Some(e.clone())),
        LaunchEvent::Refused(why) => (false, None, Some(format!("launch refused: {why}"))),
        other => (false, None, Some(format!("unexpected end: {other:?}"))),
    }
}

/// Asks the home host for the agent's record until it is no longer running, reconnecting as
/// often as needed (the home may be restarting).
async fn follow(conn: &Connection, agent: &str) -> anyhow::Result<StatusReply> {
    let id: AgentId = agent.parse().map_err(anyhow::Error::msg)?;
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let Ok(client) = conn.connect().await else {
            continue;
        };
        let status = client.status(id).await;
        client.close().await;
        match status {
            Ok(status) if status.state != "running" => return Ok(status),
            Ok(_) => {}
            // The home answered that it has no such agent of ours: waiting will not help.
            Err(ClientError::Refused(why)) => bail!("{why}"),
            Err(_) => {}
        }
    }
}

/// Launches `wasm` and returns once its home host started it; prints its id.
pub async fn launch_detached(
    conn: &Connection,
    wasm: &[u8],
    itinerary: Vec<String>,
    args: BTreeMap<String, String>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let client = conn.connect().await?;
    let started = |e: &LaunchEvent| matches!(e, LaunchEvent::Launched { .. });
    let last = client
        .launch_until(wasm, itinerary, args, &mut |_| {}, &started)
        .await
        .map_err(anyhow::Error::msg);
    client.close().await;
    match last? {
        LaunchEvent::Launched { agent, site, .. } => {
            if json {
                let out = serde_json::json!({ "agent": agent.to_string(), "site": site });
                println!("{}", serde_json::to_string_pretty(&out)?);
            } else {
                eprintln!(
                    "launched agent {agent} on {site}; follow it with `agent status {agent}`"
                );
                println!("{agent}");
            }
            Ok(ExitCode::SUCCESS)
        }
        other => {
            let (_, _, error) = outcome_of(&other);
            bail!("{}", error.unwrap_or_else(|| format!("{other:?}")))
        }
    }
}

/// Launches `wasm` and follows it to its end; prints the hop table and the result.
pub async fn launch(
    conn: &Connection,
    wasm: &[u8],
    itinerary: Vec<String>,
    args: BTreeMap<String, String>,
    json: bool,
) -> anyhow::Result<(ExitCode, Option<serde_json::Value>)> {
    let client = conn.connect().await?;
    let terminal = std::io::stderr().is_terminal();
    // On a terminal a spinner shows where the agent is; otherwise plain lines only.
    let progress = (terminal && !json).then(|| {
        let bar = indicatif::ProgressBar::new_spinner();
        let style = indicatif::ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner());
        bar.set_style(style);
        bar.enable_steady_tick(std::time::Duration::from_millis(100));
        bar.set_message("submitting the agent");
        bar
    });
    let say = |line: String| match &progress {
        Some(bar) => bar.println(line),
        None => eprintln!("{line}"),
    };
    let mut hops: Vec<HopInfo> = Vec::new();
    let mut launched: Option<String> = None;
    let mut on_event = |event: &LaunchEvent| {
        match event {
            LaunchEvent::Moved(hop) => hops.push(hop.clone()),
            LaunchEvent::Launched { agent, .. } => launched = Some(agent.to_string()),
            _ => {}
        }
        if json {
            return;
        }
        let where_now = match event {
            LaunchEvent::Launched { site, .. }
            | LaunchEvent::HopFailed { site, .. }
            | LaunchEvent::Sleeping { site, .. }
            | LaunchEvent::Finished { site, .. } => site.clone(),
            LaunchEvent::Moved(hop) => hop.to.clone(),
            LaunchEvent::Refused(_) | LaunchEvent::SendModule => String::new(),
        };
        match event {
            LaunchEvent::Launched {
                agent,
                site,
                module,
            } => {
                say(format!(
                    "launched agent {agent} on {site} (module {})",
                    &module.to_string()[..12]
                ));
            }
            LaunchEvent::Moved(hop) => {
                let arrow = if terminal { "\u{2192}" } else { "->" };
                say(format!(
                    "hop {}: {} {arrow} {}  image {}{}  module {}  freeze {:.2} ms",
                    hop.seq,
                    hop.from,
                    hop.to,
                    human_bytes(hop.image_bytes),
                    reused(hop),
                    human_bytes(hop.module_bytes),
                    hop.freeze_us as f64 / 1e3
                ));
            }
            LaunchEvent::HopFailed { site, error } => say(format!("hop failed on {site}: {error}")),
            LaunchEvent::Sleeping { site, until_ms, .. } => say(format!(
                "asleep on {site} {} (parked: stored, memory freed)",
                wake_time(*until_ms)
            )),
            LaunchEvent::Refused(why) => say(format!("launch refused: {why}")),
            LaunchEvent::Finished { site, .. } => say(format!("agent ended on {site}")),
            LaunchEvent::SendModule => {}
        }
        if let Some(bar) = &progress {
            bar.set_message(format!("agent on {where_now}, {} hops", hops.len()));
        }
    };
    let last = client
        .launch(wasm, itinerary, args, &mut on_event)
        .await
        .map_err(anyhow::Error::msg);
    if let Some(bar) = &progress {
        bar.finish_and_clear();
    }
    let (agent_ok, result, error) = match (last, &launched) {
        (Ok(last), _) => {
            client.close().await;
            outcome_of(&last)
        }
        // The agent runs on without its launcher: follow it through its home's record.
        (Err(e), Some(agent)) => {
            eprintln!("lost the stream from the home host ({e}); following agent {agent}");
            let status = follow(conn, agent).await?;
            hops = status.hops.clone();
            let result = status
                .result
                .as_deref()
                .map(serde_json::from_str)
                .transpose()?;
            (status.state == "finished", result, status.error)
        }
        (Err(e), None) => return Err(e),
    };
    // Reports of hops come from different hosts and may arrive out of order.
    hops.sort_by_key(|h| h.seq);
    if json {
        let out = serde_json::json!({
            "agent": launched,
            "ok": agent_ok,
            "result": result,
            "error": error,
            "hops": hops.iter().map(hop_json).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        if !hops.is_empty() {
            eprintln!("{}", hop_table(&hops));
        }
        match (&result, &error) {
            (Some(v), _) => println!("{}", serde_json::to_string_pretty(v)?),
            (None, Some(e)) => eprintln!("error: {e}"),
            (None, None) => {}
        }
    }
    Ok((
        if agent_ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
        result,
    ))
}

fn hop_json(h: &HopInfo) -> serde_json::Value {
    serde_json::json!({
        "seq": h.seq, "from": h.from, "from_arch": h.from_arch, "to": h.to,
        "image_bytes": h.image_bytes, "module_bytes": h.module_bytes, "freeze_us": h.freeze_us,
        "committed_us": h.committed_us, "pages_reused": h.pages_reused, "base_list_bytes": h.base_list_bytes,
    })
}

/// What a return visit saved: the pages the destination already held.
fn reused(h: &HopInfo) -> String {
    match h.pages_reused {
        0 => String::new(),
        n => format!(
            " ({} held there)",
            human_bytes(n * agent_runtime::snapshot::PAGE_SIZE as u64)
        ),
    }
}

/// The hop table: from, to, bytes moved and freeze time (suspended on the source until
/// resumed on the destination).
pub fn hop_table(hops: &[HopInfo]) -> String {
    let mut out = format!(
        "{:>3}  {:<10} {:<8} {:<10} {:>10} {:>10} {:>10}\n",
        "hop", "from", "arch", "to", "image", "module", "freeze"
    );
    for h in hops {
        out.push_str(&format!(
            "{:>3}  {:<10} {:<8} {:<10} {:>10} {:>10} {:>7.2} ms{}\n",
            h.seq,
            h.from,
            h.from_arch,
            h.to,
            human_bytes(h.image_bytes),
            human_bytes(h.module_bytes),
            h.freeze_us as f64 / 1e3,
            reused(h)
        ));
    }
    out.pop();
    out
}

/// Bytes for people: B, KiB or MiB.
pub fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// When a sleeping agent wakes: the UTC time of day and how far that is from now.
fn wake_time(until_ms: u64) -> String {
    let now = unix_ms();
    let at = time::OffsetDateTime::from_unix_timestamp((until_ms / 1000) as i64)
        .map(|t| format!("{:02}:{:02}:{:02} UTC", t.hour(), t.minute(), t.second()))
        .unwrap_or_else(|_| "in the far future".into());
    let left = until_ms.saturating_sub(now) as f64 / 1e3;
    format!("until {at} (in {left:.1} s)")
}

/// A sleep the home host heard of, if the agent is still due to wake from it.
fn asleep(s: &StatusReply) -> Option<&Asleep> {
    let now = unix_ms();
    s.sleeping
        .as_ref()
        .filter(|a| s.state == "running" && a.until_ms > now)
}

fn print_status(s: &StatusReply) {
    let path: Vec<&str> = std::iter::once(
        s.hops
            .first()
            .map(|h| h.from.as_str())
            .unwrap_or(s.site.as_str()),
    )
    .chain(s.hops.iter().map(|h| h.to.as_str()))
    .collect();
    let state = if asleep(s).is_some() {
        "sleeping"
    } else {
        s.state.as_str()
    };
    println!(
        "{}  {:<9} on {:<10} owner {:<10} path {}",
        s.agent,
        state,
        s.site,
        s.owner,
        path.join(" -> ")
    );
}

/// `agent status ID`.
pub async fn status(conn: &Connection, agent: AgentId, json: bool) -> anyhow::Result<()> {
    let client = conn.connect().await?;
    let s = client.status(agent).await.map_err(anyhow::Error::msg)?;
    client.close().await;
    if json {
        println!("{}", serde_json::to_string_pretty(&status_json(&s))?);
    } else {
        print_status(&s);
        if let Some(sleep) = asleep(&s) {
            println!("asleep on {} {}", sleep.site, wake_time(sleep.until_ms));
        }
        if !s.hops.is_empty() {
            println!("{}", hop_table(&s.hops));
        }
        if let Some(result) = &s.result {
            println!("result: {result}");
        }
        if let Some(error) = &s.error {
            println!("error: {error}");
        }
    }
    Ok(())
}

fn status_json(s: &StatusReply) -> serde_json::Value {
    serde_json::json!({
        "agent": s.agent.to_string(), "owner": s.owner, "site": s.site, "state": s.state,
        "hops": s.hops.iter().map(hop_json).collect::<Vec<_>>(),
        "result": s.result.as_deref().and_then(|r| serde_json::from_str::<serde_json::Value>(r).ok()),
        "error": s.error,
        "sleeping_until_ms": asleep(s).map(|a| a.until_ms),
    })
}

/// `agent list`.
pub async fn list(conn: &Connection, json: bool) -> anyhow::Result<()> {
    let client = conn.connect().await?;
    let reply = client.list().await.map_err(anyhow::Error::msg)?;
    client.close().await;
    let all = &reply.agents;
    if reply.total > all.len() as u64 {
        eprintln!(
            "showing {} of your {} agents on {} (running ones first)",
            all.len(),
            reply.total,
            conn.host
        );
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&all.iter().map(status_json).collect::<Vec<_>>())?
        );
    } else if all.is_empty() {
        eprintln!("no agents of yours on {}", conn.host);
    } else {
        all.iter().for_each(print_status);
    }
    Ok(())
}

/// `agent kill ID`.
pub async fn kill(conn: &Connection, agent: AgentId) -> anyhow::Result<()> {
    let client = conn.connect().await?;
    let result = client.kill(agent).await.map_err(anyhow::Error::msg);
    client.close().await;
    result?;
    eprintln!("asked agent {agent} to stop");
    Ok(())
}

/// `agent probe`: how fast the host's link to a peer carries an image's worth of bytes.
pub async fn probe(conn: &Connection, to: &str, mib: u64) -> anyhow::Result<()> {
    let client = conn.connect().await?;
    let result = client
        .probe(to, mib << 20)
        .await
        .map_err(anyhow::Error::msg);
    client.close().await;
    let took = result?;
    let rate = (mib as f64) / took.as_secs_f64().max(1e-9);
    println!("{mib} MiB to {to} in {took:.2?} ({rate:.0} MiB/s)");
    Ok(())
}
