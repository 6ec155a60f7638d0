//! The mission's agent: visits every site of its itinerary, searches each site's documents for
//! `--arg query=WORDS`, carries the hits in its heap and brings them all home.
//!
//! With `--arg parallel=true` it clones itself to every site instead: each child searches its
//! site and sends its hits to the parent, which returns them all, in itinerary order (the same
//! report as a visit one after another).
//!
//! A site that cannot be reached is skipped and reported, not fatal.

use agent_sdk::services::{CORPUS, CorpusQuery, CorpusReply};
use agent_sdk::{Cloned, Context};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// One matching line, with the site it was found on.
#[derive(Serialize, Deserialize)]
struct Hit {
    site: String,
    doc: String,
    line: u32,
    text: String,
}

#[derive(Serialize)]
struct Report {
    query: String,
    visited: Vec<String>,
    skipped: Vec<String>,
    hits: Vec<Hit>,
    /// Sites where more lines matched than `--arg limit` (default 20) let through.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    truncated: Vec<String>,
    /// A child's: the parent it sent its hits to.
    #[serde(skip_serializing_if = "Option::is_none")]
    sent_to: Option<String>,
}

/// What one site gave.
#[derive(Serialize, Deserialize)]
struct Found {
    hits: Vec<Hit>,
    /// More lines matched than the limit let through.
    truncated: bool,
}

impl Report {
    fn add(&mut self, site: String, found: Found) {
        if found.truncated {
            self.truncated.push(site.clone());
        }
        self.visited.push(site);
        self.hits.extend(found.hits);
    }
}

/// The hits of `query` on the site the agent is on.
async fn search_here(ctx: &Context, query: &str, limit: u32) -> Result<Found, String> {
    let site = ctx.site();
    let request = CorpusQuery {
        query: query.to_string(),
        limit,
    };
    let reply: CorpusReply =
        (ctx.call(CORPUS, &request).await).map_err(|e| format!("search on {site} failed: {e}"))?;
    match reply.truncated {
        true => ctx.log(format!(
            "{} hits on {site}, and more: raise --arg limit={limit} to see them",
            reply.hits.len()
        )),
        false => ctx.log(format!("{} hits on {site}", reply.hits.len())),
    }
    let hits = (reply.hits.into_iter())
        .map(|h| Hit {
            site: site.clone(),
            doc: h.doc,
            line: h.line,
            text: h.text,
        })
        .collect();
    Ok(Found {
        hits,
        truncated: reply.truncated,
    })
}

/// One child per site at once; the parent gathers their hits.
async fn parallel(ctx: Context, mut report: Report, limit: u32) -> Result<Report, String> {
    let sites = ctx.itinerary();
    let children = match ctx.clone_to(&sites).await {
        Cloned::Child { parent, site, .. } => {
            let found = search_here(&ctx, &report.query, limit).await;
            let sent = ctx.send(&parent, &found).await;
            sent.map_err(|e| format!("cannot send the hits to {parent}: {e}"))?;
            report.visited.push(site);
            report.sent_to = Some(parent);
            return Ok(report);
        }
        Cloned::Parent(children) => children,
    };
    // Per site, its child's id.
    let mut slots = Vec::new();
    for (site, child) in sites.iter().zip(children) {
        if let Err(e) = &child {
            report.skipped.push(format!("{site}: {e}"));
        }
        slots.push(child.ok());
    }
    let ids: Vec<String> = slots.iter().flatten().cloned().collect();
    let patience = Duration::from_secs(match ctx.arg("patience_secs") {
        Some(s) => s
            .parse()
            .map_err(|e| format!("bad --arg patience_secs={s}: {e}"))?,
        None => 300,
    });
    let mut gathered = ctx.gather::<Result<Found, String>>(&ids, patience).await;
    // In itinerary order, whatever order the children answered in.
    for (site, child) in sites.iter().zip(slots) {
        let Some(child) = child else { continue };
        let at = gathered.answers.iter().position(|(id, _)| *id == child);
        match at.map(|at| gathered.answers.remove(at).1) {
            Some(Ok(Ok(found))) => report.add(site.clone(), found),
            Some(Ok(Err(e))) => report.skipped.push(format!("{site}: {e}")),
            Some(Err(e)) => report.skipped.push(format!("{site}: bad answer: {e}")),
            None => report
                .skipped
                .push(format!("{site}: no answer from {child}")),
        }
    }
    Ok(report)
}

async fn search(ctx: Context) -> Result<Report, String> {
    let query = ctx
        .arg("query")
        .ok_or("missing argument: --arg query=WORDS")?;
    let limit = match ctx.arg("limit") {
        Some(l) => l.parse().map_err(|e| format!("bad --arg limit={l}: {e}"))?,
        None => 20,
    };
    let mut report = Report {
        query: query.clone(),
        visited: Vec::new(),
        skipped: Vec::new(),
        hits: Vec::new(),
        truncated: Vec::new(),
        sent_to: None,
    };
    if ctx.arg("parallel").as_deref() == Some("true") {
        return parallel(ctx, report, limit).await;
    }
    for site in ctx.itinerary() {
        if let Err(e) = ctx.hop(&site).await {
            ctx.warn(format!("skipping {site}: {e}"));
            report.skipped.push(format!("{site}: {e}"));
            continue;
        }
        let found = search_here(&ctx, &query, limit).await?;
        report.add(ctx.site(), found);
    }
    Ok(report)
}

agent_sdk::agent!(search);
