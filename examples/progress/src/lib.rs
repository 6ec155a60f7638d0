//! Tours its itinerary `rounds` times (default 1) and tells its launcher where it is at each
//! site it reaches, with `ctx.emit`: `agent launch` prints each value as it comes. Its result
//! is how many values it emitted, and the sites in the order it reached them.

use agent_sdk::Context;
use serde::Serialize;

/// One value the agent emits.
#[derive(Serialize)]
struct At {
    /// Its number, from 1.
    n: u64,
    /// Where the agent is.
    site: String,
}

#[derive(Serialize)]
struct Report {
    emitted: u64,
    sites: Vec<String>,
}

async fn tour(ctx: Context) -> Result<Report, String> {
    let rounds: u64 = ctx
        .arg("rounds")
        .map(|v| v.parse().map_err(|e| format!("bad rounds: {e}")))
        .transpose()?
        .unwrap_or(1);
    let mut sites = Vec::new();
    for site in std::iter::once(None).chain((0..rounds).flat_map(|_| ctx.itinerary()).map(Some)) {
        if let Some(site) = site {
            ctx.hop(&site).await.map_err(|e| e.to_string())?;
        }
        sites.push(ctx.site());
        let at = At {
            n: sites.len() as u64,
            site: ctx.site(),
        };
        ctx.emit(&at).await.map_err(|e| e.to_string())?;
    }
    Ok(Report {
        emitted: sites.len() as u64,
        sites,
    })
}

agent_sdk::agent!(tour);
