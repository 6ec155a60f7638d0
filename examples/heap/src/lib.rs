//! Test agent with a large, growing heap: each step appends a chunk of pseudo-random bytes,
//! then reaches a safe point (a hop along its itinerary, or a checkpoint). At the end it
//! re-hashes everything it carried and reports whether the heap survived intact.
//!
//! Arguments: `steps` (default 8), `chunk_kib` (default 256), `zero_mib` (a mostly-zero buffer
//! of that many MiB kept alive across the safe points, default 0).

use agent_sdk::Context;
use serde::Serialize;

#[derive(Serialize)]
struct Report {
    steps: u32,
    bytes: u64,
    checksum: u64,
    intact: bool,
    zero_buffer_sum: u64,
    sites: Vec<String>,
}

fn arg(ctx: &Context, key: &str, default: u64) -> Result<u64, String> {
    match ctx.arg(key) {
        Some(v) => v.parse().map_err(|e| format!("bad --arg {key}={v}: {e}")),
        None => Ok(default),
    }
}

fn fnv(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

fn chunk(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn grow(ctx: Context) -> Result<Report, String> {
    let steps = arg(&ctx, "steps", 8)? as u32;
    let chunk_len = (arg(&ctx, "chunk_kib", 256)? << 10) as usize;
    let zero_len = (arg(&ctx, "zero_mib", 0)? << 20) as usize;
    let itinerary = ctx.itinerary();

    let mut zeros = vec![0u8; zero_len];
    for (i, at) in (0..zeros.len()).step_by(1 << 20).enumerate() {
        zeros[at] = i as u8;
    }
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    let mut running = 0xcbf2_9ce4_8422_2325u64;
    let mut sites = vec![ctx.site()];
    for step in 0..steps {
        let c = chunk(u64::from(step), chunk_len);
        running = fnv(running, &c);
        chunks.push(c);
        if itinerary.is_empty() {
            ctx.checkpoint().await;
        } else {
            let site = &itinerary[step as usize % itinerary.len()];
            ctx.hop(site).await.map_err(|e| e.to_string())?;
            sites.push(ctx.site());
        }
    }
    let rehashed = chunks
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, c| fnv(h, c));
    let regenerated = (0..steps).fold(0xcbf2_9ce4_8422_2325u64, |h, s| {
        fnv(h, &chunk(u64::from(s), chunk_len))
    });
    Ok(Report {
        steps,
        bytes: chunks.iter().map(|c| c.len() as u64).sum(),
        checksum: rehashed,
        intact: rehashed == running && rehashed == regenerated,
        zero_buffer_sum: zeros.iter().map(|b| u64::from(*b)).sum(),
        sites,
    })
}

agent_sdk::agent!(grow);
