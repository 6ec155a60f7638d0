//! How the commands show hops, sizes and times to people, and the JSON views of hops.
//!
//! The table and the units are written by hand: their exact layout is what users and the
//! end-to-end tests read, and table or size crates lay them out differently.

use agent_runtime::net::messages::{HopInfo, unix_ms};
use serde::Serialize;

/// One hop as `--json` prints it. Fields in alphabetical order, as the keys always came out.
#[derive(Serialize)]
pub struct HopView<'a> {
    base_list_bytes: u64,
    committed_us: u64,
    freeze_us: u64,
    from: &'a str,
    from_arch: &'a str,
    image_bytes: u64,
    module_bytes: u64,
    pages_reused: u64,
    seq: u64,
    to: &'a str,
}

impl<'a> From<&'a HopInfo> for HopView<'a> {
    fn from(h: &'a HopInfo) -> Self {
        HopView {
            base_list_bytes: h.base_list_bytes,
            committed_us: h.committed_us,
            freeze_us: h.freeze_us,
            from: &h.from,
            from_arch: &h.from_arch,
            image_bytes: h.image_bytes,
            module_bytes: h.module_bytes,
            pages_reused: h.pages_reused,
            seq: h.seq,
            to: &h.to,
        }
    }
}

/// The JSON views of `hops`.
pub fn hop_views(hops: &[HopInfo]) -> Vec<HopView<'_>> {
    hops.iter().map(HopView::from).collect()
}

/// What a return visit saved: the pages the destination already held.
pub fn reused(h: &HopInfo) -> String {
    match h.pages_reused {
        0 => String::new(),
        n => format!(
            " ({} held there)",
            human_bytes(n * agent_runtime::snapshot::PAGE_SIZE as u64)
        ),
    }
}

/// The hop table: from, to, bytes moved and freeze time (suspended on the source until
/// resumed on the destination).
pub fn hop_table(hops: &[HopInfo]) -> String {
    let mut out = format!(
        "{:>3}  {:<10} {:<8} {:<10} {:>10} {:>10} {:>10}\n",
        "hop", "from", "arch", "to", "image", "module", "freeze"
    );
    for h in hops {
        out.push_str(&format!(
            "{:>3}  {:<10} {:<8} {:<10} {:>10} {:>10} {:>7.2} ms{}\n",
            h.seq,
            h.from,
            h.from_arch,
            h.to,
            human_bytes(h.image_bytes),
            human_bytes(h.module_bytes),
            h.freeze_us as f64 / 1e3,
            reused(h)
        ));
    }
    out.pop();
    out
}

/// Bytes for people: B, KiB or MiB.
pub fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// When a sleeping agent wakes: the UTC time of day and how far that is from now.
pub fn wake_time(until_ms: u64) -> String {
    let now = unix_ms();
    let at = time::OffsetDateTime::from_unix_timestamp((until_ms / 1000) as i64)
        .map(|t| format!("{:02}:{:02}:{:02} UTC", t.hour(), t.minute(), t.second()))
        .unwrap_or_else(|_| "in the far future".into());
    let left = until_ms.saturating_sub(now) as f64 / 1e3;
    format!("until {at} (in {left:.1} s)")
}

/// The arrow between two sites: a real one on a terminal, ASCII in logs and pipes.
pub fn arrow(terminal: bool) -> &'static str {
    if terminal { "\u{2192}" } else { "->" }
}
