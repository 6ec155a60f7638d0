//! Test agent that misbehaves on purpose, to show hosts contain it. `--arg mode=`:
//! - `bomb`: allocates without end (stopped by the memory limit);
//! - `loop`: loops forever without a safe point (stopped by the CPU budget);
//! - `spin`: loops forever, with checkpoints (stopped by the CPU budget at a safe point);
//! - `recurse`: unbounded recursion (stopped by the Wasm stack limit);
//! - `panic`: panics with a message;
//! - `fail`: returns an error;
//! - `bigcall`: sends a 2 MiB request to the corpus service (refused as too large);
//! - `flood`: logs `--arg lines=N` (default 100000) lines of 1 KiB without pausing, then ends.

use agent_sdk::Context;
use agent_sdk::services::{CORPUS, CorpusQuery, CorpusReply};
use std::hint::black_box;

fn recurse(depth: u64) -> u64 {
    if depth == u64::MAX {
        return 0;
    }
    let local = [depth; 16];
    black_box(&local);
    recurse(black_box(depth + 1)) + local[3]
}

async fn misbehave(ctx: Context) -> Result<u64, String> {
    match ctx.arg("mode").as_deref() {
        Some("bomb") => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![1u8; 1 << 20]);
                black_box(&hoard);
            }
        }
        Some("loop") => {
            let mut x = 0u64;
            loop {
                x = black_box(x.wrapping_add(1));
            }
        }
        Some("spin") => {
            let mut x = 0u64;
            loop {
                x = black_box(x.wrapping_add(1));
                if x.is_multiple_of(100_000) {
                    ctx.checkpoint().await;
                }
            }
        }
        Some("recurse") => Ok(recurse(0)),
        Some("panic") => panic!("the agent gave up on purpose"),
        Some("fail") => Err("the agent failed on purpose".to_string()),
        Some("bigcall") => {
            let query = CorpusQuery {
                query: "x".repeat(2 << 20),
                limit: 1,
            };
            let reply: CorpusReply = ctx
                .call(CORPUS, &query)
                .await
                .map_err(|e| format!("the host refused the call: {e}"))?;
            Ok(reply.hits.len() as u64)
        }
        Some("flood") => {
            let lines: u64 = ctx
                .arg("lines")
                .and_then(|l| l.parse().ok())
                .unwrap_or(100_000);
            let line = "z".repeat(1024);
            for _ in 0..lines {
                ctx.log(line.as_str());
            }
            Ok(lines)
        }
        other => Err(format!(
            "unknown mode {other:?}: use bomb, loop, spin, recurse, panic, fail, bigcall or flood"
        )),
    }
}

agent_sdk::agent!(misbehave);
