//! One hop of an agent between hosts, in the style of quinn-proto: [`machine`] owns the
//! order of a hop's steps and every decision, without I/O; [`source`] and [`destination`]
//! are the thin async drivers that perform what it says on the host's side and feed the
//! results back. The buffers an image travels in live here too: [`outgoing`] (what a source
//! sends), [`arriving`] (a large image written into its instance as it comes) and
//! [`spare`] (a receive buffer kept for the next large arrival).

pub(crate) mod arriving;
pub(in crate::net) mod destination;
pub mod machine;
pub mod offer;
pub(crate) mod outgoing;
pub(in crate::net) mod source;
pub(crate) mod spare;

pub use machine::{Plan, SourceHop, SourceStep};
pub use offer::{DestView, decide_offer};

/// Logs that hop `seq` reached phase `name` on this host's side of it (`out` on the source),
/// with the µs since that side began.
fn phase(out: bool, seq: u64, since: std::time::Instant, name: &str) {
    let us = since.elapsed().as_micros() as u64;
    match out {
        true => tracing::debug!(seq, phase = name, us, "hop out"),
        false => tracing::debug!(seq, phase = name, us, "hop in"),
    }
}
