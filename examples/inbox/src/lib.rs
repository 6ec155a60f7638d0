//! Tours its itinerary round after round, taking the messages sent to it at each site, until
//! it receives the text "stop". It emits each message it takes (`agent launch` prints them),
//! and its result is every message but "stop", in the order it took them.
//!
//! A site it cannot hop to is skipped. `--arg pause_ms=N` (default 10) is how long it waits for messages at each site;
//! `--arg per_site=N` takes at most N messages at each site before it goes on (default: all
//! there are); `--arg rounds=N` ends the tour after N rounds; `--arg quiet=true` emits nothing. With no itinerary, or after its rounds, it
//! stays where it is and waits (parked, if long) for each message.
//!
//! ```text
//! agent launch inbox.wasm --hop siteB,siteC --detach     # prints ID
//! agent send ID hello; agent send ID --json '{"n": 2}'; agent send ID stop
//! agent status ID --json                                 # result: ["hello", {"n": 2}]
//! ```

use agent_sdk::{Context, Message};
use ciborium::Value;
use std::time::Duration;

/// "stop", or the message's value.
fn read(message: &Message) -> Result<Option<Value>, String> {
    let value: Value = message
        .body()
        .map_err(|e| format!("unreadable message: {e}"))?;
    Ok((value.as_text() != Some("stop")).then_some(value))
}

async fn inbox(ctx: Context) -> Result<Vec<Value>, String> {
    let pause_ms: u64 = match ctx.arg("pause_ms") {
        Some(v) => v.parse().map_err(|e| format!("bad pause_ms: {e}"))?,
        None => 10,
    };
    let per_site: usize = match ctx.arg("per_site") {
        Some(v) => v.parse().map_err(|e| format!("bad per_site: {e}"))?,
        None => usize::MAX,
    };
    let rounds: u64 = match ctx.arg("rounds") {
        Some(v) => v.parse().map_err(|e| format!("bad rounds: {e}"))?,
        None => u64::MAX,
    };
    let quiet = ctx.arg("quiet").is_some_and(|v| v == "true");
    let itinerary = ctx.itinerary();
    // No itinerary, no rounds: an empty round would never end.
    let rounds = if itinerary.is_empty() { 0 } else { rounds };
    let tour = (0..rounds).flat_map(|_| itinerary.iter());
    let mut kept = Vec::new();
    for site in tour.map(Some).chain(std::iter::repeat(None)) {
        // A site it cannot reach is skipped: it goes on touring from where it is.
        if let Some(site) = site
            && let Err(e) = ctx.hop(site).await
        {
            ctx.warn(format!("skipping {site}: {e}"));
        }
        // On tour: what came while it travelled, then what comes while it pauses here.
        let taken = match site {
            Some(_) => ctx.recv_timeout(Duration::from_millis(pause_ms)).await,
            None => Some(ctx.recv().await),
        };
        let mut next = taken;
        let mut here = 0;
        while let Some(message) = next {
            let Some(value) = read(&message)? else {
                return Ok(kept);
            };
            if !quiet {
                ctx.emit(&value).await.map_err(|e| e.to_string())?;
            }
            kept.push(value);
            here += 1;
            next = match (site, here < per_site) {
                (Some(_), false) => None,
                _ => ctx.recv_timeout(Duration::ZERO).await,
            };
        }
    }
    Ok(kept)
}

agent_sdk::agent!(inbox);
