//! The agent context: everything about an agent that is not its memory and globals, and that
//! travels with it in every image (identity, itinerary, budgets, the pending operation).

use agent_abi::{Cloned, Message, Op, OpResult};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// A 128-bit agent id, unique across hosts.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AgentId(#[serde(with = "serde_bytes")] pub [u8; 16]);

impl AgentId {
    /// A fresh random id: 128 bits from the operating system's generator, so that ids made
    /// on any number of hosts at once do not meet.
    pub fn random() -> AgentId {
        let mut bytes = [0u8; 16];
        // Linux's getrandom(2) fails only before the kernel's generator is seeded at boot, or
        // with an invalid buffer; neither can happen to a running host.
        getrandom::fill(&mut bytes).expect("the operating system's random generator failed");
        AgentId(bytes)
    }

    /// The id of child `index` of this agent's clone number `round`: the same every time the
    /// clone is made again (after a crash), so that a destination knows a child it holds.
    pub fn child(&self, round: u64, index: u32) -> AgentId {
        let mut hasher = blake3::Hasher::new_derive_key("wasm-agents child id v1");
        hasher.update(&self.0);
        hasher.update(&round.to_le_bytes());
        hasher.update(&index.to_le_bytes());
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
        AgentId(bytes)
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl std::str::FromStr for AgentId {
    type Err = String;

    /// Parses 32 hex digits.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("`{s}` is not an agent id (32 hex digits)");
        if s.len() != 32 || !s.is_ascii() {
            return Err(bad());
        }
        let mut bytes = [0u8; 16];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(AgentId(bytes))
    }
}

impl fmt::Debug for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AgentId({self})")
    }
}

/// One completed hop, as recorded in the agent's trace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HopRecord {
    /// Hop sequence number after the hop.
    pub seq: u64,
    /// Source site.
    pub from: String,
    /// Destination site.
    pub to: String,
}

/// The runtime's record of an agent, carried in its image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentContext {
    /// The agent's id.
    pub agent_id: AgentId,
    /// Hop sequence number: the epoch of ownership, incremented by every hop.
    pub hop_seq: u64,
    /// Site where the agent was launched.
    pub home: String,
    /// Who launched it.
    pub owner: String,
    /// Sites the launcher asked it to visit.
    pub itinerary: Vec<String>,
    /// Launch arguments.
    pub args: BTreeMap<String, String>,
    /// CPU time used so far, in microseconds, on all hosts together.
    pub cpu_used_us: u64,
    /// The operation the agent waits for, if any.
    pub pending: Option<Op>,
    /// The result of that operation, once the host completed it and until the agent takes it.
    pub result: Option<OpResult>,
    /// The last hops done, at most [`TRACE_KEPT`] ([`AgentContext::record_hop`]).
    pub trace: Vec<HopRecord>,
    /// Hops done before those in `trace`: an image does not grow with every hop. Left out
    /// while 0: a parked agent's image is a few bytes under one 4 KiB page of the store.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub hops_before: u64,
    /// Service calls made so far: the index of the next call in a host's call journal.
    #[serde(default)]
    pub calls: u64,
    /// Values emitted and held by the agent's home: the next one is number `emits + 1`, so a
    /// value emitted again after a crash is known as the same one.
    #[serde(default)]
    pub emits: u64,
    /// Messages the agent took: the next one is number `received + 1` of its mailbox.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub received: u64,
    /// Messages fetched from the agent's home and not taken yet, numbered from
    /// `received + 1`: they travel with it, and its home holds them until a stored state of
    /// the agent took them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inbox: Vec<Message>,
    /// The number of the last message the agent sent to each receiver: one sent again after
    /// a crash is known to the receiver's mailbox as the same.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sent: BTreeMap<AgentId, u64>,
    /// Clones made so far: the next one is number `clones + 1`, which names its children.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub clones: u64,
    /// Children created so far, over all clones.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub children: u64,
    /// The agent allows its host to move it at its checkpoints (`ctx.allow_moves`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub movable: bool,
    /// For a child, where it comes from: its clone completes with this on arrival.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub child_of: Option<ChildOf>,
}

/// A child's place among its parent's children.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildOf {
    /// The parent.
    pub parent: AgentId,
    /// Its place in the sites its parent asked for, from 0.
    pub index: u32,
    /// The site it starts on.
    pub site: String,
}

impl AgentContext {
    /// The context of a newly launched agent.
    pub fn new(
        home: &str,
        owner: &str,
        itinerary: Vec<String>,
        args: BTreeMap<String, String>,
    ) -> AgentContext {
        AgentContext {
            agent_id: AgentId::random(),
            hop_seq: 0,
            home: home.to_string(),
            owner: owner.to_string(),
            itinerary,
            args,
            cpu_used_us: 0,
            pending: None,
            result: None,
            trace: Vec::new(),
            hops_before: 0,
            calls: 0,
            emits: 0,
            received: 0,
            inbox: Vec::new(),
            sent: BTreeMap::new(),
            clones: 0,
            children: 0,
            child_of: None,
            movable: false,
        }
    }

    /// The context of child `index` of clone `round`, made on `from` to start on `site`: a
    /// copy of this one with an id, a mailbox and journals of its own, whose trace holds its
    /// one hop so far, its creation.
    pub fn child(&self, round: u64, index: u32, (from, site): (&str, &str)) -> AgentContext {
        let creation = HopRecord {
            seq: 1,
            from: from.to_string(),
            to: site.to_string(),
        };
        // A new agent's context, with what a child inherits: its launch (home, owner,
        // itinerary, arguments), the clone it is stopped in, and whether it may be moved.
        let (itinerary, args) = (self.itinerary.clone(), self.args.clone());
        AgentContext {
            agent_id: self.agent_id.child(round, index),
            hop_seq: 1,
            trace: vec![creation],
            pending: self.pending.clone(),
            result: self.result.clone(),
            movable: self.movable,
            child_of: Some(ChildOf {
                parent: self.agent_id,
                index,
                site: site.to_string(),
            }),
            ..AgentContext::new(&self.home, &self.owner, itinerary, args)
        }
    }

    /// What the operation an agent arrived with returns on its destination: a hop's success,
    /// or for a new child, its place among its parent's children.
    pub fn arrived(&self) -> OpResult {
        match (&self.pending, &self.child_of) {
            (Some(Op::Clone { .. }), Some(of)) => OpResult::Clone(Cloned::Child {
                index: of.index,
                site: of.site.clone(),
                parent: of.parent.to_string(),
            }),
            _ => OpResult::Hop(Ok(())),
        }
    }

    /// What an agent that arrived does first on its destination: its operation completes
    /// there (a hop, a new child's clone, a checkpoint), or, for an agent its host moved
    /// away before its operation took effect (a drain), the operation is performed there.
    pub fn first_step(&self) -> FirstStep {
        match &self.pending {
            None | Some(Op::Hop { .. }) => FirstStep::Complete(OpResult::Hop(Ok(()))),
            Some(Op::Clone { .. }) if self.child_of.is_some() => {
                FirstStep::Complete(self.arrived())
            }
            Some(Op::Checkpoint) => FirstStep::Complete(OpResult::Checkpoint),
            Some(op) => FirstStep::Perform(op.clone()),
        }
    }

    /// CPU time used so far.
    pub fn cpu_used(&self) -> Duration {
        Duration::from_micros(self.cpu_used_us)
    }

    /// Hops done so far.
    pub fn hops(&self) -> u64 {
        self.hops_before + self.trace.len() as u64
    }

    /// Records a hop in the trace, which keeps the last [`TRACE_KEPT`].
    pub fn record_hop(&mut self, hop: HopRecord) {
        self.trace.push(hop);
        let over = self.trace.len().saturating_sub(TRACE_KEPT);
        self.trace.drain(..over);
        self.hops_before += over as u64;
    }
}

/// What an agent that arrived does first ([`AgentContext::first_step`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FirstStep {
    /// Its operation completes with this result; then it runs on.
    Complete(OpResult),
    /// Its operation is performed here.
    Perform(Op),
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Hop records an agent's trace keeps. Every image carries the trace and every hop encodes,
/// decodes and copies it: a whole one made long-travelled agents' hops dearer (BENCHMARKS.md).
pub const TRACE_KEPT: usize = 32;

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(seq: u64) -> HopRecord {
        HopRecord {
            seq,
            from: "siteA".into(),
            to: "siteB".into(),
        }
    }

    /// A child inherits its parent's launch and pending clone, and nothing of its journals,
    /// mailbox or trace; its id is the same every time it is made.
    #[test]
    fn an_arrival_completes_what_moves_it_and_performs_what_it_was_moved_before() {
        let mut context = AgentContext::new("a", "alice", Vec::new(), BTreeMap::new());
        let first = |pending: Option<Op>, context: &mut AgentContext| {
            context.pending = pending;
            context.first_step()
        };
        let hop = Some(Op::Hop { site: "b".into() });
        assert_eq!(
            first(hop, &mut context),
            FirstStep::Complete(OpResult::Hop(Ok(())))
        );
        let checkpoint = Some(Op::Checkpoint);
        assert_eq!(
            first(checkpoint, &mut context),
            FirstStep::Complete(OpResult::Checkpoint)
        );
        let sleep = Op::Sleep { ms: 5 };
        assert_eq!(
            first(Some(sleep.clone()), &mut context),
            FirstStep::Perform(sleep)
        );
        let clone = Op::Clone {
            sites: vec!["b".into()],
        };
        assert_eq!(
            first(Some(clone.clone()), &mut context),
            FirstStep::Perform(clone)
        );
    }

    #[test]
    fn a_child_starts_its_own_journals_and_keeps_its_parents_launch() {
        let args = BTreeMap::from([("query".to_string(), "x".to_string())]);
        let mut parent = AgentContext::new("siteA", "alice", vec!["siteB".into()], args);
        (parent.calls, parent.emits, parent.received, parent.clones) = (3, 2, 5, 1);
        parent.sent.insert(AgentId([7; 16]), 4);
        parent.record_hop(hop(1));
        parent.pending = Some(Op::Clone {
            sites: vec!["siteB".into()],
        });
        let child = parent.child(2, 0, ("siteA", "siteB"));
        assert_eq!(child.agent_id, parent.agent_id.child(2, 0));
        assert_ne!(child.agent_id, parent.agent_id.child(2, 1));
        assert_eq!(
            (child.home.as_str(), child.owner.as_str()),
            ("siteA", "alice")
        );
        assert_eq!(
            (&child.itinerary, &child.args),
            (&parent.itinerary, &parent.args)
        );
        assert_eq!(child.pending, parent.pending);
        assert_eq!(
            (child.calls, child.emits, child.received, child.clones),
            (0, 0, 0, 0)
        );
        assert!(child.sent.is_empty());
        assert_eq!((child.hop_seq, child.hops()), (1, 1));
        assert_eq!(
            child.arrived(),
            OpResult::Clone(Cloned::Child {
                index: 0,
                site: "siteB".into(),
                parent: parent.agent_id.to_string(),
            })
        );
    }

    /// The trace keeps the last hops and counts all of them; a failed hop's record, popped
    /// (the host's `forget_failed_hop`), leaves the count as it was.
    #[test]
    fn the_trace_keeps_the_last_hops_and_counts_them_all() {
        let mut context = AgentContext::new("siteA", "alice", Vec::new(), BTreeMap::new());
        let many = TRACE_KEPT as u64 + 10;
        for seq in 1..=many {
            context.record_hop(hop(seq));
        }
        assert_eq!(context.hops(), many);
        assert_eq!(context.trace.len(), TRACE_KEPT);
        assert_eq!(context.trace.first().map(|h| h.seq), Some(11));
        assert_eq!(context.trace.last(), Some(&hop(many)));

        context.record_hop(hop(many + 1));
        context.trace.pop();
        assert_eq!(context.hops(), many);

        // A context from before the cap (no `hops_before`) reads with its whole trace.
        let mut old = ciborium::Value::serialized(&context).unwrap();
        if let ciborium::Value::Map(fields) = &mut old {
            fields.retain(|(k, _)| k.as_text() != Some("hops_before"));
        }
        let read: AgentContext = old.deserialized().unwrap();
        assert_eq!(read.hops(), read.trace.len() as u64);
    }
}
