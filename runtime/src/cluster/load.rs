//! What each host tells the others about itself: its fixed facts and its load, as a
//! versioned record that rides on every membership message it sends, each host's newest
//! one winning.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What does not change while a host runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Facts {
    /// CPU architecture, as Rust names it (`x86_64`, `aarch64`, `s390x`).
    pub arch: String,
    /// Cores agents run on.
    pub cores: u32,
    /// Services agents may call there.
    pub services: Vec<String>,
}

/// How busy a host is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Load {
    /// Agents with an instance in memory.
    pub running: u32,
    /// Agents ready to run but waiting for a thread (beyond the cores' worth).
    pub runnable: u32,
    /// CPU the host used since its last record, in thousandths of one core.
    pub cpu_permille: u32,
    /// Memory the machine has available, in MiB.
    pub free_mib: u64,
    /// Agents parked asleep (stored, no memory held).
    pub parked: u32,
    /// Whether the host is draining: it takes no agents.
    pub draining: bool,
}

impl Load {
    /// Agents per core: what placement compares. Parked agents cost no CPU.
    pub fn per_core(&self, cores: u32) -> f64 {
        f64::from(self.running.saturating_add(self.runnable)) / f64::from(cores.max(1))
    }
}

/// One host's facts and load, as it last told them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The host.
    pub host: String,
    /// Grows with each change of the host's load, across its restarts (it starts from the
    /// start's time), so that the newest record wins when messages cross.
    pub version: u64,
    /// What does not change.
    pub facts: Facts,
    /// How busy it was.
    pub load: Load,
}

/// A record as a host holds it: when it came (ms, the holder's clock).
#[derive(Clone, Debug, PartialEq)]
pub struct Known {
    /// The record.
    pub record: Record,
    /// When it arrived here.
    pub at_ms: u64,
}

/// The newest record of each host heard from.
#[derive(Clone, Debug, Default)]
pub struct Book {
    records: BTreeMap<String, Known>,
}

impl Book {
    /// Every host's newest record.
    pub fn records(&self) -> &BTreeMap<String, Known> {
        &self.records
    }

    /// One host's newest record.
    pub fn get(&self, host: &str) -> Option<&Known> {
        self.records.get(host)
    }

    /// Keeps `record`, come at `now_ms`, unless a newer one of its host is known; a record
    /// of the same version refreshes its age (the host said it again).
    pub fn take(&mut self, record: Record, now_ms: u64) {
        match self.records.get_mut(&record.host) {
            Some(known) if known.record.version > record.version => {}
            Some(known) => {
                known.at_ms = now_ms;
                if known.record.version < record.version {
                    known.record = record;
                }
            }
            None => {
                let host = record.host.clone();
                self.records.insert(
                    host,
                    Known {
                        record,
                        at_ms: now_ms,
                    },
                );
            }
        }
    }
}
