//! Test agent that is CPU-bound: goes to the sites of its itinerary (if any), then counts
//! primes below `n` (default 100000) by trial division and calls `ctx.checkpoint()` every
//! `every` numbers (default 1000), so a host can stop it. With `movable=true` it allows its
//! host to move it at those checkpoints when the host is busy (`ctx.allow_moves`).

use agent_sdk::Context;
use serde::Serialize;

#[derive(Serialize)]
struct Report {
    n: u64,
    primes: u64,
    sum: u64,
    sqrt_sum_bits: u64,
}

fn is_prime(k: u64) -> bool {
    k >= 2
        && (2..)
            .take_while(|d| d * d <= k)
            .all(|d| !k.is_multiple_of(d))
}

async fn count(ctx: Context) -> Result<Report, String> {
    let n: u64 = ctx
        .arg("n")
        .map(|v| v.parse().map_err(|e| format!("bad n: {e}")))
        .transpose()?
        .unwrap_or(100_000);
    let every: u64 = ctx
        .arg("every")
        .map(|v| v.parse().map_err(|e| format!("bad every: {e}")))
        .transpose()?
        .unwrap_or(1000);
    for site in ctx.itinerary() {
        ctx.hop(&site).await.map_err(|e| e.to_string())?;
    }
    if ctx.arg("movable").as_deref() == Some("true") {
        ctx.allow_moves(true).await;
    }
    let (mut primes, mut sum, mut sqrt_sum) = (0u64, 0u64, 0f64);
    for k in 0..n {
        if is_prime(k) {
            primes += 1;
            sum += k;
            sqrt_sum += (k as f64).sqrt();
        }
        if every > 0 && k.is_multiple_of(every) {
            ctx.checkpoint().await;
        }
    }
    Ok(Report {
        n,
        primes,
        sum,
        sqrt_sum_bits: sqrt_sum.to_bits(),
    })
}

agent_sdk::agent!(count);
