//! Which hosts there are, which are up, how busy each is, and where an agent asking for a
//! [`Place`] goes.
//!
//! Membership is SWIM (foca): each host probes a random peer every period, asks others to
//! probe it when it stays silent, suspects it, and declares it down if it does not refute
//! the suspicion in time; what changed rides on the protocol's own messages. Each host's
//! [`Record`] (its facts and load) rides along the same way. This module does no I/O: the
//! host delivers messages and timers and carries out the [`Output`]s, so a simulation runs
//! the very same code with virtual time (`cluster` bench, tests below).

pub mod load;
pub mod place;
pub mod sim;
pub mod wire;

use agent_abi::Place;
use foca::{AccumulatingRuntime, Foca, OwnedNotification, State, Timer};
use load::{Book, Facts, Load, Record};
use place::Candidate;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::time::Duration;
use wire::{Cbor, HostId, MAX_MESSAGE};

/// A host refreshes its record at least this often, so that one that joined later learns
/// the loads of hosts whose load does not move.
pub const REFRESH: Duration = Duration::from_secs(10);

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
    /// Our own record could not be encoded.
    #[error("membership: cannot encode a load record: {0}")]
    Encode(String),
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
    foca: Foca<HostId, Cbor, SmallRng, Book>,
    runtime: AccumulatingRuntime<HostId>,
    book: Book,
    facts: Facts,
    /// The last load told, and when.
    told: Option<(Load, u64)>,
    version: u64,
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
        std::num::NonZeroUsize::new(MAX_MESSAGE).unwrap_or(config.max_packet_size);
    config
}

impl Cluster {
    /// A cluster of one, `me`, until it joins others; `seed` seeds its random choices.
    pub fn new(me: HostId, facts: Facts, config: foca::Config, seed: u64) -> Cluster {
        let book = Book::default();
        let version = me.start;
        let foca = Foca::with_custom_broadcast(
            me,
            config,
            SmallRng::seed_from_u64(seed),
            Cbor,
            book.clone(),
        );
        Cluster {
            foca,
            runtime: AccumulatingRuntime::new(),
            book,
            facts,
            told: None,
            version,
            sent: BTreeMap::new(),
            rng: SmallRng::seed_from_u64(seed.rotate_left(32) ^ 0x5eed),
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
        self.book.set_now(now_ms);
        Ok(self.foca.handle_data(data, &mut self.runtime)?)
    }

    /// Takes back a timer an [`Output::Timer`] asked for.
    ///
    /// # Errors
    /// When the protocol fails to act on it.
    pub fn timer(&mut self, timer: Timer<HostId>) -> Result<(), ClusterError> {
        Ok(self.foca.handle_timer(timer, &mut self.runtime)?)
    }

    /// Tells the others this host's `load` when it moved enough since the last record, or
    /// the last is [`REFRESH`] old; whether a record was made.
    ///
    /// # Errors
    /// When the record cannot be encoded.
    pub fn tell_load(&mut self, load: Load, now_ms: u64) -> Result<bool, ClusterError> {
        let due = self.told.as_ref().is_none_or(|(told, at)| {
            load.moved_from(told, self.facts.cores)
                || now_ms.saturating_sub(*at) >= REFRESH.as_millis() as u64
        });
        if !due {
            return Ok(false);
        }
        self.version = (self.version + 1).max(now_ms);
        let record = Record {
            host: self.me().name.to_string(),
            version: self.version,
            facts: self.facts.clone(),
            load,
        };
        let mut data = Vec::new();
        ciborium::into_writer(&record, &mut data)
            .map_err(|e| ClusterError::Encode(e.to_string()))?;
        self.book.set_now(now_ms);
        self.foca.add_broadcast(&data)?;
        self.told = Some((load, now_ms));
        Ok(true)
    }

    /// What to do next, in order.
    pub fn outputs(&mut self) -> Vec<Output> {
        let mut out = Vec::new();
        while let Some((to, data)) = self.runtime.to_send() {
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

    /// Whether `name` is this host or a host that is up.
    pub fn is_up(&self, name: &str) -> bool {
        *self.me().name == *name || self.foca.iter_members().any(|m| &*m.id().name == name)
    }

    /// Every host known, this one first, then by name.
    pub fn hosts(&self, now_ms: u64) -> Vec<HostView> {
        let records = self.book.records();
        let view = |id: &HostId, state| {
            let known = records.get(&*id.name);
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

    /// This host's cores.
    pub fn cores(&self) -> u32 {
        self.facts.cores
    }

    /// The host an agent here asking for `place` goes to (this one, for `least-loaded`,
    /// when it wins), counted as sent there; `None` when no host that is up fits.
    pub fn choose(&mut self, place: &Place, now_ms: u64) -> Option<String> {
        let records = self.book.records();
        let stale = STALE.as_millis() as u64;
        let me = self.me().name.to_string();
        let mut names = vec![me.clone()];
        names.extend(self.foca.iter_members().map(|m| m.id().name.to_string()));
        let candidates: Vec<Candidate<'_>> = names
            .iter()
            .map(|name| {
                let known = records.get(name);
                let fresh = known.filter(|k| now_ms.saturating_sub(k.at_ms) < stale || *name == me);
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
            let version = records.get(&chosen).map_or(0, |k| k.record.version);
            let entry = self.sent.entry(chosen.clone()).or_insert((version, 0));
            if entry.0 != version {
                *entry = (version, 0);
            }
            entry.1 += 1;
        }
        Some(chosen)
    }
}
