//! Benchmark agent (see `tests/bench.rs`): shapes its memory, then hops or checkpoints as told.
//!
//! Arguments (all optional):
//! - `dirty_kib`: bytes of incompressible heap written at the start and carried (default 0);
//! - `reserve_mib`: memory reserved but never written (default 0);
//! - `hops`: hops to make, cycling through the itinerary (default: the itinerary once);
//! - `rewrite_kib`: bytes of the dirty heap rewritten before each hop (default 0);
//! - `sleep_ms`: how long to sleep after the hops (default 0: no sleep);
//! - `checkpoints`: `ctx.checkpoint()` calls to make at the end (default 0);
//! - `spins`: empty loop turns to make at the end, the baseline for `checkpoints` (default 0).

use agent_sdk::Context;
use serde::Serialize;
use std::hint::black_box;

#[derive(Serialize)]
struct Report {
    hops: u64,
    dirty: u64,
    checksum: u64,
}

fn arg(ctx: &Context, key: &str, default: u64) -> Result<u64, String> {
    match ctx.arg(key) {
        Some(v) => v.parse().map_err(|e| format!("bad --arg {key}={v}: {e}")),
        None => Ok(default),
    }
}

/// Fills `buf` with xorshift bytes: incompressible, so zstd cannot hide a page.
fn scramble(buf: &mut [u8], seed: u64) {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for word in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        word.copy_from_slice(&bytes[..word.len()]);
    }
}

async fn bench(ctx: Context) -> Result<Report, String> {
    let itinerary = ctx.itinerary();
    let hops = arg(&ctx, "hops", itinerary.len() as u64)?;
    let mut dirty = vec![0u8; (arg(&ctx, "dirty_kib", 0)? << 10) as usize];
    scramble(&mut dirty, 1);
    let reserve = vec![0u8; (arg(&ctx, "reserve_mib", 0)? << 20) as usize];
    let rewrite = ((arg(&ctx, "rewrite_kib", 0)? << 10) as usize).min(dirty.len());
    for i in 0..hops {
        if rewrite > 0 {
            let at = (i as usize * rewrite) % dirty.len();
            let end = (at + rewrite).min(dirty.len());
            scramble(&mut dirty[at..end], i + 2);
        }
        if let Some(site) = itinerary.get(i as usize % itinerary.len().max(1)) {
            ctx.hop(site).await.map_err(|e| e.to_string())?;
        }
    }
    let sleep_ms = arg(&ctx, "sleep_ms", 0)?;
    if sleep_ms > 0 {
        ctx.sleep(std::time::Duration::from_millis(sleep_ms)).await;
    }
    for _ in 0..arg(&ctx, "checkpoints", 0)? {
        ctx.checkpoint().await;
    }
    for i in 0..arg(&ctx, "spins", 0)? {
        black_box(i);
    }
    // The reserve is only touched at its ends: folding a GiB would dwarf what is measured.
    let reserve_ends = [reserve.first(), reserve.last()].map(|b| b.copied().unwrap_or(0));
    let checksum = dirty
        .iter()
        .chain(reserve_ends.iter())
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
        });
    Ok(Report {
        hops,
        dirty: dirty.len() as u64,
        checksum,
    })
}

agent_sdk::agent!(bench);
