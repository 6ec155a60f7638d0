//! `agent launch`: submit an agent to its home host and follow it, across hosts, to its end.

use crate::connection::{Connection, client_error};
use crate::format::{HopView, arrow, hop_table, hop_views, human_bytes, reused, wake_time};
use agent_runtime::AgentId;
use agent_runtime::net::client::ClientError;
use agent_runtime::net::messages::{AgentState, HopInfo, LaunchEvent, StatusReply};
use agent_runtime::runner::cbor_to_json;
use anyhow::bail;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::process::ExitCode;

/// What to launch: the module, its itinerary and its arguments.
pub struct Submission<'a> {
    /// The module's bytes.
    pub wasm: &'a [u8],
    /// Sites to visit.
    pub itinerary: Vec<String>,
    /// Arguments for the agent.
    pub args: BTreeMap<String, String>,
}

/// `agent launch --json`. Fields in alphabetical order, as the keys always came out.
#[derive(Serialize)]
struct LaunchView<'a> {
    agent: Option<String>,
    /// The children it cloned, in the order made, with how each ended.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    children: Vec<ChildView>,
    /// What the agent emitted, in order.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    emitted: Vec<serde_json::Value>,
    error: Option<String>,
    hops: Vec<HopView<'a>>,
    ok: bool,
    result: Option<serde_json::Value>,
}

/// A child in `agent launch --json`.
#[derive(Clone, Serialize)]
struct ChildView {
    agent: String,
    error: Option<String>,
    ok: Option<bool>,
    parent: String,
    result: Option<serde_json::Value>,
    site: String,
}

/// The children a launcher heard of, in the order made.
#[derive(Default)]
struct Children(Vec<ChildView>);

impl Children {
    /// Notes a clone of `parent`, or the end of a child.
    fn note(&mut self, parent: String, event: &LaunchEvent) {
        match event {
            LaunchEvent::Cloning { children, .. } => {
                for child in children {
                    let agent = child.agent.to_string();
                    if !self.0.iter().any(|c| c.agent == agent) {
                        self.0.push(ChildView {
                            agent,
                            error: None,
                            ok: None,
                            parent: parent.clone(),
                            result: None,
                            site: child.site.clone(),
                        });
                    }
                }
            }
            LaunchEvent::Child { agent, event } => {
                let agent = agent.to_string();
                if let LaunchEvent::Finished { site, .. } = &**event
                    && let Some(child) = self.0.iter_mut().find(|c| c.agent == agent)
                {
                    let ending = Ending::of(event);
                    child.ok = Some(ending.ok);
                    child.result = ending.result;
                    child.error = ending.error;
                    child.site = site.clone();
                }
                self.note(agent, event);
            }
            _ => {}
        }
    }
}

/// `agent launch --detach --json`.
#[derive(Serialize)]
struct DetachedView<'a> {
    agent: String,
    site: &'a str,
}

/// How an agent ended, as its launcher learnt it.
struct Ending {
    ok: bool,
    result: Option<serde_json::Value>,
    error: Option<String>,
    /// The home refused the launch: the agent never ran.
    refused: bool,
}

impl Ending {
    fn failed(error: String) -> Ending {
        Ending {
            ok: false,
            result: None,
            error: Some(error),
            refused: false,
        }
    }

    /// How an agent ended, from its last event.
    fn of(last: &LaunchEvent) -> Ending {
        match last {
            LaunchEvent::Finished { outcome, .. } => match outcome.result().map(cbor_to_json) {
                Some(Ok(v)) => Ending {
                    ok: true,
                    result: Some(v),
                    error: None,
                    refused: false,
                },
                Some(Err(e)) => Ending::failed(e.to_string()),
                None => Ending::failed(outcome.error().unwrap_or_default()),
            },
            LaunchEvent::Refused(why) => Ending {
                refused: true,
                ..Ending::failed(format!("launch refused: {why}"))
            },
            other => Ending::failed(format!("unexpected end: {other:?}")),
        }
    }

    /// How an agent ended, from its home's record of it.
    fn of_status(status: &StatusReply) -> anyhow::Result<Ending> {
        let result = (status.result.as_deref())
            .map(serde_json::from_str)
            .transpose()?;
        Ok(Ending {
            ok: status.state == AgentState::Finished,
            result,
            error: status.error.clone(),
            refused: false,
        })
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
            Ok(status) if status.state != AgentState::Running => return Ok(status),
            Ok(_) => {}
            // The home answered that it has no such agent of ours: waiting will not help.
            Err(ClientError::Refused(why)) => bail!("{why}"),
            Err(_) => {}
        }
    }
}

/// Launches the agent and returns once its home host started it; prints its id.
pub async fn launch_detached(
    conn: &Connection,
    submission: Submission<'_>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let client = conn.connect().await?;
    let started = |e: &LaunchEvent| matches!(e, LaunchEvent::Launched { .. });
    let Submission {
        wasm,
        itinerary,
        args,
    } = submission;
    let last = client
        .launch_until(wasm, itinerary, args, &mut |_| {}, &started)
        .await
        .map_err(client_error);
    client.close().await;
    match last? {
        LaunchEvent::Launched { agent, site, .. } => {
            if json {
                let view = DetachedView {
                    agent: agent.to_string(),
                    site: &site,
                };
                println!("{}", serde_json::to_string_pretty(&view)?);
            } else {
                eprintln!(
                    "launched agent {agent} on {site}; follow it with `agent status {agent}`"
                );
                println!("{agent}");
            }
            Ok(ExitCode::SUCCESS)
        }
        other => {
            let error = Ending::of(&other).error;
            bail!("{}", error.unwrap_or_else(|| format!("{other:?}")))
        }
    }
}

/// Where the launcher tells its user what happens: a spinner's lines on a terminal, plain
/// lines on stderr otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    terminal: bool,
}

impl Progress {
    fn new(json: bool) -> Progress {
        let terminal = std::io::stderr().is_terminal();
        let bar = (terminal && !json).then(|| {
            let bar = indicatif::ProgressBar::new_spinner();
            let style = indicatif::ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner());
            bar.set_style(style);
            bar.enable_steady_tick(std::time::Duration::from_millis(100));
            bar.set_message("submitting the agent");
            bar
        });
        Progress { bar, terminal }
    }

    fn say(&self, line: String) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    /// Shows one event: its line, and where the agent is now on the spinner.
    fn show(&self, event: &LaunchEvent, hops: usize) {
        if let Some(line) = event_line(event, self.terminal) {
            self.say(line);
        }
        if let Some(bar) = &self.bar {
            let where_now = match event {
                LaunchEvent::Launched { site, .. }
                | LaunchEvent::HopFailed { site, .. }
                | LaunchEvent::Sleeping { site, .. }
                | LaunchEvent::Finished { site, .. } => site.as_str(),
                LaunchEvent::Moved(hop) => hop.to.as_str(),
                LaunchEvent::Refused(_)
                | LaunchEvent::SendModule
                | LaunchEvent::Emitted { .. }
                | LaunchEvent::Cloning { .. }
                | LaunchEvent::Child { .. } => {
                    return;
                }
            };
            bar.set_message(format!("agent on {where_now}, {hops} hops"));
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// An emitted value as JSON (`null` when it has no JSON form).
fn emitted(value: &[u8]) -> serde_json::Value {
    cbor_to_json(value).unwrap_or_default()
}

/// The line that tells the user of an event, if it has one.
fn event_line(event: &LaunchEvent, terminal: bool) -> Option<String> {
    Some(match event {
        LaunchEvent::Launched {
            agent,
            site,
            module,
        } => format!(
            "launched agent {agent} on {site} (module {})",
            &module.to_string()[..12]
        ),
        LaunchEvent::Moved(hop) => format!(
            "hop {}: {} {} {}  image {}{}  module {}  freeze {:.2} ms",
            hop.seq,
            hop.from,
            arrow(terminal),
            hop.to,
            human_bytes(hop.image_bytes),
            reused(hop),
            human_bytes(hop.module_bytes),
            hop.freeze_us as f64 / 1e3
        ),
        LaunchEvent::HopFailed { site, error } => format!("hop failed on {site}: {error}"),
        LaunchEvent::Sleeping { site, until_ms, .. } => format!(
            "asleep on {site} {} (parked: stored, memory freed)",
            wake_time(*until_ms)
        ),
        // Said once, as the error the command ends with.
        LaunchEvent::Refused(_) => return None,
        LaunchEvent::Finished { site, .. } => format!("agent ended on {site}"),
        LaunchEvent::Emitted { value, .. } => format!("emitted: {}", emitted(value)),
        LaunchEvent::Cloning { site, children } => {
            let each: Vec<String> = (children.iter())
                .map(|c| format!("{} {} {}", short(&c.agent), arrow(terminal), c.site))
                .collect();
            format!(
                "cloned on {site} into {} children: {}",
                children.len(),
                each.join(", ")
            )
        }
        LaunchEvent::Child { agent, event } => {
            let line = match &**event {
                LaunchEvent::Finished { site, .. } => {
                    let ending = Ending::of(event);
                    match (ending.result, ending.error) {
                        (Some(v), _) => format!("ended on {site}: {v}"),
                        (None, Some(e)) => format!("failed on {site}: {e}"),
                        (None, None) => format!("ended on {site}"),
                    }
                }
                other => event_line(other, terminal)?,
            };
            format!("  child {}: {line}", short(agent))
        }
        LaunchEvent::SendModule => return None,
    })
}

/// The first digits of an agent's id, enough to tell a launch's children apart.
fn short(agent: &AgentId) -> String {
    agent.to_string()[..8].to_string()
}

/// Launches the agent and follows it to its end; prints the hop table and the result, and
/// returns the exit code and the result.
pub async fn launch(
    conn: &Connection,
    submission: Submission<'_>,
    show: Show,
) -> anyhow::Result<(ExitCode, Option<serde_json::Value>)> {
    let client = conn.connect().await?;
    let progress = Progress::new(show != Show::Text);
    let mut hops: Vec<HopInfo> = Vec::new();
    let mut launched: Option<String> = None;
    let mut values = Vec::new();
    let mut children = Children::default();
    let mut on_event = |event: &LaunchEvent| {
        let parent = launched.clone().unwrap_or_default();
        children.note(parent, event);
        match event {
            LaunchEvent::Moved(hop) => hops.push(hop.clone()),
            LaunchEvent::Emitted { value, .. } => values.push(emitted(value)),
            LaunchEvent::Launched { agent, .. } => launched = Some(agent.to_string()),
            _ => {}
        }
        if show == Show::Text {
            progress.show(event, hops.len());
        }
    };
    let Submission {
        wasm,
        itinerary,
        args,
    } = submission;
    let last = client.launch(wasm, itinerary, args, &mut on_event).await;
    progress.finish();
    let ending = match (last, &launched) {
        (Ok(last), _) => {
            client.close().await;
            Ending::of(&last)
        }
        // The agent runs on without its launcher: follow it through its home's record.
        (Err(e), Some(agent)) => {
            eprintln!("lost the stream from the home host ({e}); following agent {agent}");
            let status = follow(conn, agent).await?;
            hops = status.hops.clone();
            Ending::of_status(&status)?
        }
        (Err(e), None) => return Err(client_error(e)),
    };
    // Reports of hops come from different hosts and may arrive out of order.
    hops.sort_by_key(|h| h.seq);
    print_ending(launched, &ending, (&hops, values, children.0), show)?;
    let code = match (ending.ok, ending.refused) {
        (true, _) => ExitCode::SUCCESS,
        (false, true) => ExitCode::from(2),
        (false, false) => ExitCode::FAILURE,
    };
    Ok((code, ending.result))
}

/// What `agent launch` prints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Show {
    /// Each event as it comes, then the hop table and the result.
    Text,
    /// Only the result (stdout) or the error (stderr).
    Quiet,
    /// One JSON object at the end.
    Json,
}

/// Prints how the agent ended: one JSON object, or the hop table and the result.
fn print_ending(
    agent: Option<String>,
    ending: &Ending,
    (hops, emitted, children): (&[HopInfo], Vec<serde_json::Value>, Vec<ChildView>),
    show: Show,
) -> anyhow::Result<()> {
    if show == Show::Json {
        let view = LaunchView {
            agent,
            children,
            emitted,
            error: ending.error.clone(),
            hops: hop_views(hops),
            ok: ending.ok,
            result: ending.result.clone(),
        };
        println!("{}", serde_json::to_string_pretty(&view)?);
        return Ok(());
    }
    if !hops.is_empty() && show == Show::Text {
        eprintln!("{}", hop_table(hops));
    }
    match (&ending.result, &ending.error) {
        (Some(v), _) => println!("{}", serde_json::to_string_pretty(v)?),
        (None, Some(e)) => eprintln!("error: {e}"),
        (None, None) => {}
    }
    Ok(())
}
