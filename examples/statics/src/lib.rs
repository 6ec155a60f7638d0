//! Test agent whose state lives in statics, thread-locals, atomics, a `OnceLock`, floats and
//! boxed closures (function pointers through the funcref table): all must survive every hop.
//!
//! Argument: `rounds` (default 6).

use agent_sdk::Context;
use serde::Serialize;
use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

static COUNTER: AtomicU32 = AtomicU32::new(7);
static SIGNED: AtomicI64 = AtomicI64::new(-3);
static NAMES: Mutex<Vec<String>> = Mutex::new(Vec::new());
static FLOATS: Mutex<(f32, f64)> = Mutex::new((0.5, -1.25));
static BORN_ON: OnceLock<String> = OnceLock::new();
static mut TABLE: [u16; 512] = [0; 512];
/// Boxed closures: calling them after a hop goes through the funcref table.
type Step = Box<dyn Fn(u64) -> u64 + Send>;
static STEPS: Mutex<Vec<Step>> = Mutex::new(Vec::new());

thread_local! {
    static LOCAL: Cell<u64> = const { Cell::new(1) };
}

#[derive(Serialize)]
struct Report {
    counter: u32,
    signed: i64,
    names: Vec<String>,
    f32_bits: u32,
    f64_bits: u64,
    born_on: String,
    table_sum: u64,
    local: u64,
    closures: Vec<u64>,
    map: BTreeMap<String, u64>,
}

async fn mutate(ctx: Context) -> Result<Report, String> {
    let rounds: u32 = ctx
        .arg("rounds")
        .map(|r| r.parse().map_err(|e| format!("bad rounds: {e}")))
        .transpose()?
        .unwrap_or(6);
    BORN_ON.get_or_init(|| ctx.site());
    let itinerary = ctx.itinerary();
    let mut map = BTreeMap::new();
    for round in 0..rounds {
        COUNTER.fetch_add(round * 3 + 1, Ordering::Relaxed);
        SIGNED.fetch_sub(i64::from(round) * 1_000_000_007, Ordering::Relaxed);
        NAMES
            .lock()
            .map_err(|e| e.to_string())?
            .push(format!("round-{round}@{}", ctx.site()));
        {
            let mut f = FLOATS.lock().map_err(|e| e.to_string())?;
            f.0 = f.0 * 1.5 + round as f32 / 3.0;
            f.1 = f.1 / 7.0 - f64::from(round).sqrt();
        }
        // SAFETY: single-threaded agent; no reference to TABLE outlives this block.
        unsafe {
            let table = &mut *std::ptr::addr_of_mut!(TABLE);
            for (i, slot) in table.iter_mut().enumerate() {
                *slot = slot.wrapping_add((i as u16).wrapping_mul(round as u16 + 1));
            }
        }
        LOCAL.with(|l| l.set(l.get().wrapping_mul(31).wrapping_add(u64::from(round))));
        let k = u64::from(round);
        STEPS
            .lock()
            .map_err(|e| e.to_string())?
            .push(if round % 2 == 0 {
                Box::new(move |x| x * 3 + k)
            } else {
                Box::new(move |x| x ^ (k << 8))
            });
        map.insert(format!("key{round}"), k * k);
        match itinerary.get(round as usize % itinerary.len().max(1)) {
            Some(site) => ctx.hop(site).await.map_err(|e| e.to_string())?,
            None => ctx.checkpoint().await,
        }
    }
    let f = *FLOATS.lock().map_err(|e| e.to_string())?;
    // SAFETY: as above.
    let table_sum = unsafe {
        (*std::ptr::addr_of!(TABLE))
            .iter()
            .map(|v| u64::from(*v))
            .sum()
    };
    let closures = STEPS
        .lock()
        .map_err(|e| e.to_string())?
        .iter()
        .map(|step| step(1000))
        .collect();
    Ok(Report {
        counter: COUNTER.load(Ordering::Relaxed),
        signed: SIGNED.load(Ordering::Relaxed),
        names: NAMES.lock().map_err(|e| e.to_string())?.clone(),
        f32_bits: f.0.to_bits(),
        f64_bits: f.1.to_bits(),
        born_on: BORN_ON.get().cloned().unwrap_or_default(),
        table_sum,
        local: LOCAL.with(Cell::get),
        closures,
        map,
    })
}

agent_sdk::agent!(mutate);
