//! Forks into one child per site of its itinerary and hears from each: the agent of the clone
//! tests and the fork benchmark.
//!
//! Arguments: `mib=N` carries N MiB of data into the children (each returns its checksum, so
//! a child proves it inherited its parent's memory); `wait=true` keeps the parent and each
//! child waiting for a message after the children reported (until a user sends one, or kills
//! the agent); `patience_secs=N` is how long the parent waits for its children (default 60);
//! `from=SITE` hops there before it forks. For the speed-up benchmark, `work_ms=W` makes each
//! child spend W ms on its site before it reports (a service that takes that long), and
//! `tour=true` visits the sites one after another instead, spending W ms on each.

use agent_sdk::{Cloned, Context};
use serde::Serialize;
use std::time::Duration;

#[derive(Serialize)]
struct Report {
    /// The child's index, or `None` in the parent.
    child: Option<u32>,
    site: String,
    /// Checksum of the data carried.
    sum: u64,
    /// In the parent: the children made, and the indexes of those that reported.
    children: Vec<String>,
    reported: Vec<u32>,
    errors: Vec<String>,
}

fn checksum(data: &[u8]) -> u64 {
    (data.iter().enumerate()).fold(0u64, |sum, (i, b)| {
        sum.wrapping_mul(31).wrapping_add(u64::from(*b) ^ i as u64)
    })
}

async fn fork(ctx: Context) -> Result<Report, String> {
    let number = |name: &str, default: u64| match ctx.arg(name) {
        Some(v) => v
            .parse::<u64>()
            .map_err(|e| format!("bad --arg {name}={v}: {e}")),
        None => Ok(default),
    };
    let mib = number("mib", 0)?;
    let patience = Duration::from_secs(number("patience_secs", 60)?);
    let wait = ctx.arg("wait").as_deref() == Some("true");
    let work = Duration::from_millis(number("work_ms", 0)?);
    let data: Vec<u8> = (0..mib << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
    let mut report = Report {
        child: None,
        site: ctx.site(),
        sum: checksum(&data),
        children: Vec::new(),
        reported: Vec::new(),
        errors: Vec::new(),
    };
    if ctx.arg("tour").as_deref() == Some("true") {
        for site in ctx.itinerary() {
            ctx.hop(&site).await.map_err(|e| e.to_string())?;
            ctx.sleep(work).await;
            report.reported.push(report.reported.len() as u32);
        }
        return Ok(report);
    }
    if let Some(site) = ctx.arg("from") {
        ctx.hop(&site).await.map_err(|e| e.to_string())?;
        report.site = site;
    }
    match ctx.clone_to(&ctx.itinerary()).await {
        Cloned::Child {
            index,
            site,
            parent,
        } => {
            report.child = Some(index);
            report.site = site;
            // Computed again here: the data came with the child's memory.
            report.sum = checksum(&data);
            if !work.is_zero() {
                ctx.sleep(work).await;
            }
            ctx.send(&parent, &index).await.map_err(|e| e.to_string())?;
        }
        Cloned::Parent(children) => {
            for child in children {
                match child {
                    Ok(id) => report.children.push(id),
                    Err(e) => report.errors.push(e.to_string()),
                }
            }
            let heard = ctx.gather::<u32>(&report.children, patience).await;
            report.reported = (heard.answers.into_iter())
                .filter_map(|(_, index)| index.ok())
                .collect();
            report.reported.sort_unstable();
        }
    }
    if wait {
        ctx.recv().await;
    }
    Ok(report)
}

agent_sdk::agent!(fork);
