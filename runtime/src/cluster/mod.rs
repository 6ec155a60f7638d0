//! Which hosts there are, which are up, how busy each is, and where an agent asking for a
//! [`Place`] goes.
//!
//! Membership is SWIM (foca): each host probes a random peer every period, asks others to
//! probe it when it stays silent, suspects it, and declares it down if it does not refute
//! the suspicion in time; what changed rides on the protocol's own messages. Every message
//! a host sends also carries its own [`Record`] (its facts and load), the way MOSIX spread
//! loads: each host hears the loads of the hosts it talks to (in a quiet cluster, the one it
//! probes each second and those probing it), at a cost per message that does not grow with
//! the cluster, where spreading every record to every host would cost each host in
//! proportion to the hosts. A record is taken only from the host it describes. This module
//! does no I/O: the host delivers messages and timers and carries out the [`Output`]s, so a
//! simulation runs the very same code with virtual time (`cluster` bench, tests below).

pub mod load;
pub mod place;
pub mod sim;
pub mod wire;

use agent_abi::Place;
use foca::{AccumulatingRuntime, Foca, NoCustomBroadcast, OwnedNotification, State, Timer};
use load::{Book, Facts, Known, Load, Record};
use place::Candidate;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;
use wire::{Cbor, CodecError, HostId, MAX_MESSAGE, RECORD_ROOM};

/// A load older than this is not trusted for placement (the host counts as idle).
pub const STALE: Duration = Duration::from_secs(30);

/// Something the host must do for the membership protocol.
#[derive(Debug)]
pub enum Output {
    /// Send `data` to host `to`.
    Send {
        /// The host.
        to: HostId,
        /// One membership message.
        data: bytes::Bytes,
    },
    /// Hand `timer` back to [`Cluster::timer`] after `after`.
    Timer {
        /// When.
        after: Duration,
        /// What.
        timer: Timer<HostId>,
    },
    /// A host is up (newly known, or back).
    Up(HostId),
    /// A host was declared down.
    Down(HostId),
    /// A host started again: what was open to its earlier run is dead.
    Restarted(HostId),
}

/// What went wrong in the membership protocol.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The protocol refused a message or an operation.
    #[error("membership: {0}")]
    Protocol(#[from] foca::Error),
    /// The message is not framed as membership messages are.
    #[error("membership: {0}")]
    Message(#[from] CodecError),
    /// The sender's record could not be read.
    #[error("membership: bad load record: {0}")]
    Record(String),
    /// A record of one host in a message from another.
    #[error("membership: {sender} sent a load record of {host}")]
    Forged {
        /// Who sent the message.
        sender: String,
        /// The host the record claims to describe.
        host: String,
    },
}

/// A host's state as this host sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostState {
    /// Answering.
    Up,
    /// Silent lately: declared down unless it answers soon.
    Suspect,
    /// Declared down.
    Down,
}

impl std::fmt::Display for HostState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HostState::Up => "up",
            HostState::Suspect => "suspect",
            HostState::Down => "down",
        })
    }
}

/// One host as `agent hosts` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HostView {
    /// Site name.
    pub name: String,
    /// Where peers reach it.
    pub addr: SocketAddr,
    /// Up, suspect or down.
    pub state: HostState,
    /// Its facts, once a record of it came.
    pub facts: Option<Facts>,
    /// Its last load, if any came.
    pub load: Option<Load>,
    /// How old that load is, in ms.
    pub load_age_ms: Option<u64>,
}

/// Membership, load records and placement for one host.
pub struct Cluster {
    foca: Foca<HostId, Cbor, SmallRng, NoCustomBroadcast>,
    runtime: AccumulatingRuntime<HostId>,
    book: Book,
    /// This host's record, and its encoding that each message carries.
    record: Record,
    encoded: Vec<u8>,
    /// Agents sent to each host since its record of that version.
    sent: BTreeMap<String, (u64, u32)>,
    rng: SmallRng,
}

/// The protocol's settings for a cluster of about `hosts` hosts: memberlist's LAN
/// defaults (probe each second, gossip five times a second), with suspicion lasting three
/// periods per decade of hosts, so that a failure is known within seconds.
pub fn settings(hosts: u32) -> foca::Config {
    let hosts = NonZeroU32::new(hosts.max(2)).unwrap_or(NonZeroU32::MIN);
    let mut config = foca::Config::new_lan(hosts);
    let decades = f64::from(hosts.get()).log10().max(1.0);
    config.suspect_to_down_after = config.probe_period.mul_f64(3.0 * decades);
    config.max_packet_size =
        std::num::NonZeroUsize::new(MAX_MESSAGE - RECORD_ROOM).unwrap_or(config.max_packet_size);
    config
}

impl Cluster {
    /// A cluster of one, `me`, until it joins others; `seed` seeds its random choices.
    pub fn new(me: HostId, facts: Facts, config: foca::Config, seed: u64) -> Cluster {
        let record = Record {
            host: me.name.to_string(),
            version: me.start,
            facts,
            load: Load::default(),
        };
        let foca = Foca::new(me, config, SmallRng::seed_from_u64(seed), Cbor);
        let mut cluster = Cluster {
            foca,
            runtime: AccumulatingRuntime::new(),
            book: Book::default(),
            record,
            encoded: Vec::new(),
            sent: BTreeMap::new(),
            rng: SmallRng::seed_from_u64(seed.rotate_left(32) ^ 0x5eed),
        };
        cluster.encode_record();
        cluster
    }

    /// Encodes this host's record for the messages to come. Services that would not fit in
    /// [`RECORD_ROOM`] are left out (the built-in ones are a few short names).
    fn encode_record(&mut self) {
        let mut record = self.record.clone();
        loop {
            self.encoded.clear();
            let written = ciborium::into_writer(&record, &mut self.encoded);
            if written.is_ok() && self.encoded.len() + 2 <= RECORD_ROOM {
                return;
            }
            if record.facts.services.pop().is_none() {
                self.encoded.clear();
                return;
            }
        }
    }

    /// This host.
    pub fn me(&self) -> &HostId {
        self.foca.identity()
    }

    /// Asks `seed` to let this host in (its `start` may be 0 when unknown).
    ///
    /// # Errors
    /// When the message cannot be made.
    pub fn join(&mut self, seed: HostId) -> Result<(), ClusterError> {
        Ok(self.foca.announce(seed, &mut self.runtime)?)
    }

    /// Takes one message from a peer, at `now_ms`.
    ///
    /// # Errors
    /// When the message is malformed or not for this host.
    pub fn receive(&mut self, data: &[u8], now_ms: u64) -> Result<(), ClusterError> {
        let (record, swim) = wire::unframe(data)?;
        let sender = wire::swim_sender(swim)?;
        let record: Record =
            ciborium::from_reader(record).map_err(|e| ClusterError::Record(e.to_string()))?;
        if record.host != *sender.name {
            return Err(ClusterError::Forged {
                sender: sender.name.to_string(),
                host: record.host,
            });
        }
        self.foca.handle_data(swim, &mut self.runtime)?;
        if record.host != *self.me().name {
            self.book.take(record, now_ms);
        }
        Ok(())
    }

    /// Takes back a timer an [`Output::Timer`] asked for.
    ///
    /// # Errors
    /// When the protocol fails to act on it.
    pub fn timer(&mut self, timer: Timer<HostId>) -> Result<(), ClusterError> {
        Ok(self.foca.handle_timer(timer, &mut self.runtime)?)
    }

    /// Sets this host's `load`, carried by every message from now on.
    pub fn tell_load(&mut self, load: Load) {
        if load != self.record.load {
            self.record.load = load;
            self.record.version += 1;
            self.encode_record();
        }
    }

    /// What to do next, in order.
    pub fn outputs(&mut self) -> Vec<Output> {
        let mut out = Vec::new();
        while let Some((to, data)) = self.runtime.to_send() {
            let data = wire::frame(&self.encoded, &data);
            out.push(Output::Send { to, data });
        }
        while let Some((after, timer)) = self.runtime.to_schedule() {
            out.push(Output::Timer { after, timer });
        }
        while let Some(note) = self.runtime.to_notify() {
            match note {
                OwnedNotification::MemberUp(id) => out.push(Output::Up(id)),
                OwnedNotification::MemberDown(id) => out.push(Output::Down(id)),
                OwnedNotification::Rename(old, id) => {
                    if old.start != id.start {
                        out.push(Output::Restarted(id.clone()));
                    }
                    out.push(Output::Up(id));
                }
                _ => {}
            }
        }
        out
    }

    /// Whether no other host is up (or suspect).
    pub fn alone(&self) -> bool {
        self.foca.num_members() == 0
    }

    /// Whether `name` is this host or a host that is up.
    pub fn is_up(&self, name: &str) -> bool {
        *self.me().name == *name || self.foca.iter_members().any(|m| &*m.id().name == name)
    }

    /// Every host known, this one first, then by name.
    pub fn hosts(&self, now_ms: u64) -> Vec<HostView> {
        let mine = self.mine(now_ms);
        let view = |id: &HostId, state| {
            let known = Self::known(&self.book, &self.me().name, &mine, &id.name);
            HostView {
                name: id.name.to_string(),
                addr: id.addr,
                state,
                facts: known.map(|k| k.record.facts.clone()),
                load: known.map(|k| k.record.load),
                load_age_ms: known.map(|k| now_ms.saturating_sub(k.at_ms)),
            }
        };
        let mut others: Vec<HostView> = self
            .foca
            .iter_membership_state()
            .map(|m| {
                let state = match m.state() {
                    State::Alive => HostState::Up,
                    State::Suspect => HostState::Suspect,
                    State::Down => HostState::Down,
                };
                view(m.id(), state)
            })
            .collect();
        others.sort_by(|a, b| a.name.cmp(&b.name));
        let mut all = vec![view(self.me(), HostState::Up)];
        all.extend(others);
        all
    }

    /// The lowest load (agents per core) of the other hosts that are up and take agents,
    /// among those whose load is fresh.
    pub fn lightest(&self, now_ms: u64) -> Option<f64> {
        let records = self.book.records();
        let stale = STALE.as_millis() as u64;
        (self.foca.iter_members())
            .filter_map(|m| records.get(&*m.id().name))
            .filter(|k| now_ms.saturating_sub(k.at_ms) < stale && !k.record.load.draining)
            .map(|k| k.record.load.per_core(k.record.facts.cores))
            .min_by(f64::total_cmp)
    }

    /// This host's own record, as though just come.
    fn mine(&self, now_ms: u64) -> Known {
        Known {
            record: self.record.clone(),
            at_ms: now_ms,
        }
    }

    /// The newest record of host `name` in `book`, or `mine` when it is this host, `me`.
    fn known<'a>(book: &'a Book, me: &str, mine: &'a Known, name: &str) -> Option<&'a Known> {
        match name == me {
            true => Some(mine),
            false => book.get(name),
        }
    }

    /// This host's cores.
    pub fn cores(&self) -> u32 {
        self.record.facts.cores
    }

    /// The host an agent here asking for `place` goes to (this one, for `least-loaded`,
    /// when it wins), counted as sent there; `None` when no host that is up fits.
    pub fn choose(&mut self, place: &Place, now_ms: u64) -> Option<String> {
        let mine = self.mine(now_ms);
        let stale = STALE.as_millis() as u64;
        let me = self.me().name.to_string();
        let mut names = vec![me.clone()];
        names.extend(self.foca.iter_members().map(|m| m.id().name.to_string()));
        let candidates: Vec<Candidate<'_>> = names
            .iter()
            .map(|name| {
                let known = Self::known(&self.book, &me, &mine, name);
                let fresh = known.filter(|k| now_ms.saturating_sub(k.at_ms) < stale);
                let sent = match (self.sent.get(name), known) {
                    (Some((version, n)), Some(k)) if k.record.version == *version => *n,
                    (Some((_, n)), None) => *n,
                    _ => 0,
                };
                Candidate {
                    name,
                    facts: known.map(|k| &k.record.facts),
                    load: fresh.map(|k| k.record.load),
                    sent,
                }
            })
            .collect();
        let chosen = place::choose(place, &me, &candidates, &mut self.rng)?.to_string();
        if chosen != me {
            let version = self.book.get(&chosen).map_or(0, |k| k.record.version);
            let entry = self.sent.entry(chosen.clone()).or_insert((version, 0));
            if entry.0 != version {
                *entry = (version, 0);
            }
            entry.1 += 1;
        }
        Some(chosen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, seed: u64) -> Cluster {
        let me = HostId {
            name: name.into(),
            addr: SocketAddr::from(([127, 0, 0, 1], 4433)),
            start: 1,
        };
        let facts = Facts {
            arch: "s390x".into(),
            cores: 2,
            services: (0..100)
                .map(|i| format!("a-long-service-name-{i}"))
                .collect(),
        };
        Cluster::new(me, facts, settings(3), seed)
    }

    fn first_message(cluster: &mut Cluster) -> bytes::Bytes {
        (cluster.outputs().into_iter())
            .find_map(|o| match o {
                Output::Send { data, .. } => Some(data),
                _ => None,
            })
            .expect("a message")
    }

    #[test]
    fn each_message_carries_its_sender_s_record_and_no_other_host_s() {
        let (mut a, mut b) = (host("a", 1), host("b", 2));
        b.tell_load(Load {
            running: 5,
            ..Load::default()
        });
        b.join(a.me().clone()).expect("join");
        let data = first_message(&mut b);
        // Services that do not fit are left out; the message stays within bounds.
        assert!(data.len() <= MAX_MESSAGE, "{} bytes", data.len());
        a.receive(&data, 10).expect("b's message");
        let seen = a.hosts(10);
        let b_seen = seen.iter().find(|h| h.name == "b").expect("b known");
        assert_eq!(b_seen.load.map(|l| l.running), Some(5));
        assert_eq!(
            b_seen.facts.as_ref().map(|f| f.arch.as_str()),
            Some("s390x")
        );
        assert!(
            b_seen
                .facts
                .as_ref()
                .is_some_and(|f| !f.services.is_empty())
        );

        // b's message with a record of c in it.
        let (_, swim) = wire::unframe(&data).expect("framed");
        let forged = Record {
            host: "c".into(),
            version: 99,
            facts: Facts::default(),
            load: Load::default(),
        };
        let mut record = Vec::new();
        ciborium::into_writer(&forged, &mut record).expect("encode");
        let refused = a.receive(&wire::frame(&record, swim), 20);
        assert!(
            matches!(&refused, Err(ClusterError::Forged { sender, host }) if sender == "b" && host == "c"),
            "{refused:?}"
        );
        assert!(a.book.get("c").is_none());
        assert!(matches!(
            a.receive(&[0, 9, 1], 20),
            Err(ClusterError::Message(_))
        ));
        assert!(matches!(
            a.receive(&wire::frame(b"not a record", swim), 20),
            Err(ClusterError::Record(_))
        ));
    }
}
