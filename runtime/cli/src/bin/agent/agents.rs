//! The user's views of agents already launched: `agent status`, `list`, `kill`, and `probe`.

use crate::connection::{Connection, client_error};
use crate::format::{HopView, hop_table, hop_views, wake_time};
use agent_runtime::AgentId;
use agent_runtime::net::messages::{AgentState, Asleep, StatusReply, unix_ms};
use serde::Serialize;

/// One agent as `--json` prints it. Fields in alphabetical order, as the keys always came out.
#[derive(Serialize)]
struct StatusView<'a> {
    agent: String,
    /// The children it cloned, in the order made.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    children: Vec<String>,
    /// Values it emitted so far.
    emits: u64,
    error: &'a Option<String>,
    hops: Vec<HopView<'a>>,
    owner: &'a str,
    /// The agent it was cloned from.
    #[serde(skip_serializing_if = "Option::is_none")]
    parent: Option<String>,
    result: Option<serde_json::Value>,
    site: &'a str,
    sleeping_until_ms: Option<u64>,
    /// Its life: running, finished, failed or killed (the text output's first word).
    state: &'a str,
    /// What a running agent is doing: computing (`running`), `sleeping` or `waiting` for a
    /// message (the text output's word in parentheses).
    #[serde(skip_serializing_if = "Option::is_none")]
    activity: Option<&'static str>,
    /// The site it is parked on waiting for a message.
    #[serde(skip_serializing_if = "Option::is_none")]
    waiting_on: Option<&'a str>,
}

impl<'a> From<&'a StatusReply> for StatusView<'a> {
    fn from(s: &'a StatusReply) -> Self {
        StatusView {
            agent: s.agent.to_string(),
            children: s.children.iter().map(AgentId::to_string).collect(),
            emits: s.emits,
            error: &s.error,
            hops: hop_views(&s.hops),
            owner: &s.owner,
            parent: s.parent.map(|p| p.to_string()),
            // A result that is not JSON shows as null, as it always did.
            result: (s.result.as_deref()).and_then(|r| serde_json::from_str(r).ok()),
            site: &s.site,
            sleeping_until_ms: asleep(s).map(|a| a.until_ms),
            state: s.state.as_str(),
            activity: activity(s),
            waiting_on: s.waiting_on.as_deref(),
        }
    }
}

/// What a running agent is doing; `None` once it ended.
fn activity(s: &StatusReply) -> Option<&'static str> {
    if s.state != AgentState::Running {
        None
    } else if asleep(s).is_some() {
        Some("sleeping")
    } else if s.waiting_on.is_some() {
        Some("waiting")
    } else {
        Some("running")
    }
}

/// A sleep the home host heard of, if the agent is still due to wake from it.
fn asleep(s: &StatusReply) -> Option<&Asleep> {
    let now = unix_ms();
    s.sleeping
        .as_ref()
        .filter(|a| s.state == AgentState::Running && a.until_ms > now)
}

/// One line per agent: its id, state, where it is, its owner and the path it took.
fn print_status(s: &StatusReply) {
    let path: Vec<&str> = std::iter::once(
        s.hops
            .first()
            .map(|h| h.from.as_str())
            .unwrap_or(s.site.as_str()),
    )
    .chain(s.hops.iter().map(|h| h.to.as_str()))
    .collect();
    let state = match activity(s) {
        Some("running") | None => s.state.as_str().to_string(),
        Some(doing) => format!("{} ({doing})", s.state.as_str()),
    };
    println!(
        "{}  {:<19} on {:<10} owner {:<10} path {}",
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
    let s = client.status(agent).await.map_err(client_error)?;
    let mut children = Vec::new();
    if !json {
        for child in &s.children {
            children.push(client.status(*child).await.map_err(client_error)?);
        }
    }
    client.close().await;
    if json {
        println!("{}", serde_json::to_string_pretty(&StatusView::from(&s))?);
        return Ok(());
    }
    print_status(&s);
    if let Some(parent) = &s.parent {
        println!("cloned from {parent}");
    }
    if !children.is_empty() {
        println!("children:");
        children.iter().for_each(print_status);
    }
    if let Some(sleep) = asleep(&s) {
        println!("asleep on {} {}", sleep.site, wake_time(sleep.until_ms));
    }
    if let Some(site) = &s.waiting_on {
        println!("waiting for a message on {site} (parked)");
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
    Ok(())
}

/// `agent list`.
pub async fn list(conn: &Connection, json: bool) -> anyhow::Result<()> {
    let client = conn.connect().await?;
    let reply = client.list().await.map_err(client_error)?;
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
        let views: Vec<StatusView<'_>> = all.iter().map(StatusView::from).collect();
        println!("{}", serde_json::to_string_pretty(&views)?);
    } else if all.is_empty() {
        eprintln!("no agents of yours on {}", conn.host);
    } else {
        all.iter().for_each(print_status);
    }
    Ok(())
}

/// `agent hosts`.
pub async fn hosts(conn: &Connection, json: bool) -> anyhow::Result<()> {
    let client = conn.connect().await?;
    let hosts = client.hosts().await.map_err(client_error);
    client.close().await;
    let hosts = hosts?;
    if json {
        println!("{}", serde_json::to_string_pretty(&hosts)?);
        return Ok(());
    }
    println!(
        "{:<16} {:<22} {:<8} {:<8} {:>5} {:>7} {:>7} {:>6} {:>9}  AGE",
        "HOST", "ADDRESS", "STATE", "ARCH", "CORES", "RUNNING", "PARKED", "CPU%", "FREE MIB"
    );
    for h in &hosts {
        let facts = h.facts.as_ref();
        let arch = facts.map_or("?", |f| f.arch.as_str());
        let cores = facts.map_or("?".into(), |f| f.cores.to_string());
        let (running, parked, cpu, free) = match &h.load {
            Some(l) => (
                l.running.to_string(),
                l.parked.to_string(),
                format!("{:.0}", f64::from(l.cpu_permille) / 10.0),
                l.free_mib.to_string(),
            ),
            None => ("?".into(), "?".into(), "?".into(), "?".into()),
        };
        let age = h
            .load_age_ms
            .map_or("-".into(), |ms| format!("{:.1}s", ms as f64 / 1000.0));
        let draining = match h.load.is_some_and(|l| l.draining) {
            true => " (draining)",
            false => "",
        };
        println!(
            "{:<16} {:<22} {:<8} {:<8} {:>5} {:>7} {:>7} {:>6} {:>9}  {age}{draining}",
            h.name,
            h.addr.to_string(),
            h.state.to_string(),
            arch,
            cores,
            running,
            parked,
            cpu,
            free
        );
    }
    Ok(())
}

/// `agent kill ID`.
pub async fn kill(conn: &Connection, agent: AgentId) -> anyhow::Result<()> {
    let client = conn.connect().await?;
    let result = client.kill(agent).await.map_err(client_error);
    client.close().await;
    result?;
    eprintln!("asked agent {agent} to stop");
    Ok(())
}

/// `agent probe`: how fast the host's link to a peer carries an image's worth of bytes.
pub async fn probe(conn: &Connection, to: &str, mib: u64) -> anyhow::Result<()> {
    let client = conn.connect().await?;
    let result = client.probe(to, mib << 20).await.map_err(client_error);
    client.close().await;
    let took = result?;
    let rate = (mib as f64) / took.as_secs_f64().max(1e-9);
    println!("{mib} MiB to {to} in {took:.2?} ({rate:.0} MiB/s)");
    Ok(())
}
