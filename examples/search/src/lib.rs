//! The mission's agent: visits every site of its itinerary, searches each site's documents for
//! `--arg query=WORDS`, carries the hits in its heap and brings them all home.
//!
//! A site that cannot be reached is skipped and reported, not fatal.

use agent_sdk::Context;
use agent_sdk::services::{CORPUS, CorpusQuery, CorpusReply};
use serde::Serialize;

/// One matching line, with the site it was found on.
#[derive(Serialize)]
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
    };
    for site in ctx.itinerary() {
        if let Err(e) = ctx.hop(&site).await {
            ctx.warn(format!("skipping {site}: {e}"));
            report.skipped.push(format!("{site}: {e}"));
            continue;
        }
        let reply: CorpusReply = ctx
            .call(
                CORPUS,
                &CorpusQuery {
                    query: query.clone(),
                    limit,
                },
            )
            .await
            .map_err(|e| format!("search on {site} failed: {e}"))?;
        ctx.log(format!("{} hits on {site}", reply.hits.len()));
        report.visited.push(ctx.site());
        report.hits.extend(reply.hits.into_iter().map(|h| Hit {
            site: site.clone(),
            doc: h.doc,
            line: h.line,
            text: h.text,
        }));
    }
    Ok(report)
}

agent_sdk::agent!(search);
