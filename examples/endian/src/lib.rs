//! Test agent for heterogeneous hosts: everything endianness could break, carried across
//! every hop of its itinerary and checked at the end. At each site it writes integers and
//! floats of every width into its heap, grows a large buffer, fills a `HashMap` and strings;
//! after the last hop it re-reads everything, recomputes what it expects, and reports digests
//! that must equal those of a run without migration.

use agent_sdk::Context;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

#[derive(Serialize)]
struct Report {
    stops: u32,
    ints_ok: bool,
    floats_ok: bool,
    buffer_bytes: u64,
    buffer_digest: u64,
    map_digest: u64,
    text: String,
    f64_bits: Vec<u64>,
    f32_bits: Vec<u32>,
}

/// Everything the agent writes at stop `k`.
#[derive(Clone, PartialEq)]
struct Values {
    u8s: u8,
    i16s: i16,
    u32s: u32,
    i64s: i64,
    u128s: u128,
    f32s: f32,
    f64s: f64,
}

fn values(k: u32) -> Values {
    let k64 = u64::from(k) + 1;
    Values {
        u8s: (k64 * 37) as u8,
        i16s: -((k64 * 1013) as i16),
        u32s: 0xdead_beef ^ (k * 0x0101_0101),
        i64s: -(0x0123_4567_89ab_cdef_i64 / k64 as i64),
        u128s: 0x0011_2233_4455_6677_8899_aabb_ccdd_eeff_u128.rotate_left(k * 7),
        f32s: 1.0 / (k as f32 + 3.0),
        f64s: std::f64::consts::PI.powi(k as i32 + 1) * -1e-3,
    }
}

fn fnv(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Fills `n` bytes for stop `k` with a mix of little- and big-endian encodings.
fn fill(buffer: &mut Vec<u8>, k: u32, n: usize) {
    let mut x = u64::from(k).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let end = (k as usize + 1) * n;
    while buffer.len() < end {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        buffer.extend_from_slice(&x.to_le_bytes());
        buffer.extend_from_slice(&(x as u32).to_be_bytes());
    }
    buffer.truncate(end);
}

async fn tour(ctx: Context) -> Result<Report, String> {
    let kib: usize = ctx
        .arg("kib")
        .map(|v| v.parse().map_err(|e| format!("bad kib: {e}")))
        .transpose()?
        .unwrap_or(256);
    let mut stops: Vec<Values> = Vec::new();
    let mut buffer: Vec<u8> = Vec::new();
    let mut map: HashMap<String, (u64, f64)> = HashMap::new();
    let mut text = String::new();
    let mut itinerary = ctx.itinerary();
    itinerary.insert(0, ctx.site()); // also a stop at home, before the first hop
    for (k, site) in itinerary.iter().enumerate() {
        let k = k as u32;
        if k > 0 {
            ctx.hop(site).await.map_err(|e| e.to_string())?;
        }
        let info: agent_sdk::services::HostInfo = ctx
            .call(agent_sdk::services::HOST_INFO, &())
            .await
            .map_err(|e| e.to_string())?;
        ctx.log(format!("stop {k} on {} ({})", info.site, info.arch));
        stops.push(values(k));
        fill(&mut buffer, k, kib << 10);
        for i in 0..200u64 {
            let key = format!("stop{k}-key{i}");
            map.insert(
                key,
                (
                    i.wrapping_mul(u64::from(k) + 7).rotate_left(k),
                    (i as f64).sqrt() / f64::from(k + 1),
                ),
            );
        }
        text.push_str(&format!("{k}:ünïcødé✓;"));
    }
    let ints_ok = stops.iter().enumerate().all(|(k, v)| {
        let w = values(k as u32);
        v.u8s == w.u8s
            && v.i16s == w.i16s
            && v.u32s == w.u32s
            && v.i64s == w.i64s
            && v.u128s == w.u128s
    });
    let floats_ok = stops.iter().enumerate().all(|(k, v)| {
        v.f32s.to_bits() == values(k as u32).f32s.to_bits()
            && v.f64s.to_bits() == values(k as u32).f64s.to_bits()
    });
    // Iterate the map in key order: its hash seed differs between runs, its contents must not.
    let sorted: BTreeMap<&String, &(u64, f64)> = map.iter().collect();
    let map_digest = sorted
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, (k, (a, b))| {
            fnv(
                fnv(fnv(h, k.as_bytes()), &a.to_le_bytes()),
                &b.to_bits().to_le_bytes(),
            )
        });
    Ok(Report {
        stops: stops.len() as u32,
        ints_ok,
        floats_ok,
        buffer_bytes: buffer.len() as u64,
        buffer_digest: fnv(0xcbf2_9ce4_8422_2325, &buffer),
        map_digest,
        text,
        f64_bits: stops.iter().map(|v| v.f64s.to_bits()).collect(),
        f32_bits: stops.iter().map(|v| v.f32s.to_bits()).collect(),
    })
}

agent_sdk::agent!(tour);
