//! A coordinator and its scouts, one module in two roles.
//!
//! - **Coordinator** (`--arg scouts=N`): waits for the findings of N scouts, sent to it as
//!   messages, and returns them all, by site.
//! - **Scout** (`--arg coordinator=ID --arg query=WORDS`): tours its itinerary, searches each
//!   site's corpus, and sends the coordinator what it found at each site as it goes; then a
//!   last message that it is done.
//!
//! ```text
//! agent launch scouts.wasm --arg scouts=2 --detach                 # prints ID
//! agent launch scouts.wasm --hop siteB --arg coordinator=ID --arg query=agent
//! agent launch scouts.wasm --hop siteC --arg coordinator=ID --arg query=agent
//! agent status ID --json                                           # every hit, by site
//! ```

use agent_sdk::Context;
use agent_sdk::services::{CORPUS, CorpusQuery, CorpusReply};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What a scout tells its coordinator.
#[derive(Serialize, Deserialize)]
enum Report {
    /// The lines found at one site.
    Found { site: String, lines: Vec<String> },
    /// The scout toured every site.
    Done,
}

async fn scouts(ctx: Context) -> Result<BTreeMap<String, Vec<String>>, String> {
    match (ctx.arg("scouts"), ctx.arg("coordinator")) {
        (Some(n), None) => {
            coordinate(&ctx, n.parse().map_err(|e| format!("bad scouts: {e}"))?).await
        }
        (None, Some(coordinator)) => scout(&ctx, &coordinator).await.map(|()| BTreeMap::new()),
        _ => Err("give --arg scouts=N (coordinator) or --arg coordinator=ID (scout)".into()),
    }
}

/// Gathers what `scouts` scouts find, until each said it is done.
async fn coordinate(ctx: &Context, scouts: u32) -> Result<BTreeMap<String, Vec<String>>, String> {
    let mut found: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut done = 0;
    while done < scouts {
        let message = ctx.recv().await;
        match message.body::<Report>().map_err(|e| e.to_string())? {
            Report::Found { site, lines } => {
                ctx.emit(&format!("{} lines from {site}", lines.len()))
                    .await
                    .map_err(|e| e.to_string())?;
                found.entry(site).or_default().extend(lines);
            }
            Report::Done => done += 1,
        }
    }
    Ok(found)
}

/// Searches each site of the itinerary and reports to `coordinator`.
async fn scout(ctx: &Context, coordinator: &str) -> Result<(), String> {
    let query = ctx.arg("query").unwrap_or_else(|| "agent".into());
    for site in ctx.itinerary() {
        ctx.hop(&site).await.map_err(|e| e.to_string())?;
        let request = CorpusQuery {
            query: query.clone(),
            limit: 20,
        };
        let reply: CorpusReply = ctx
            .call(CORPUS, &request)
            .await
            .map_err(|e| e.to_string())?;
        let lines = reply
            .hits
            .into_iter()
            .map(|h| format!("{}:{}: {}", h.doc, h.line, h.text))
            .collect();
        let report = Report::Found {
            site: ctx.site(),
            lines,
        };
        ctx.send(coordinator, &report)
            .await
            .map_err(|e| e.to_string())?;
    }
    ctx.send(coordinator, &Report::Done)
        .await
        .map_err(|e| e.to_string())
}

agent_sdk::agent!(scouts);
