//! What each host tells the others about itself: its fixed facts and its load, spread with
//! the membership gossip as versioned records, each host's newest one winning.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

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

    /// Whether `self` differs from `before` enough to tell everyone: a host sends a record
    /// when its load moved by a quarter of a core's worth of agents (and at least one), or
    /// when it starts or stops draining; otherwise it refreshes now and then. Small changes
    /// would cost every host bytes without changing any choice.
    pub fn moved_from(&self, before: &Load, cores: u32) -> bool {
        let (now, was) = (self.per_core(cores), before.per_core(cores));
        let step = (0.25_f64).max(1.0 / f64::from(cores.max(1)));
        self.draining != before.draining || (now - was).abs() >= step
    }
}

/// One host's facts and load, as it last told them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The host.
    pub host: String,
    /// Grows with each record the host makes, across its restarts (it starts from the
    /// time), so that the newest record wins wherever records meet.
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

/// The newest record of each host, shared between the membership protocol (which receives
/// them) and placement (which reads them).
#[derive(Clone, Debug, Default)]
pub struct Book {
    inner: Arc<Mutex<BookInner>>,
}

#[derive(Debug, Default)]
struct BookInner {
    records: BTreeMap<String, Known>,
    now_ms: u64,
}

/// Why a record could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// Not CBOR of a record.
    #[error("bad load record: {0}")]
    Decode(String),
}

/// A record's identity in the gossip: a newer version of a host's record replaces its older
/// ones still being spread.
#[derive(Debug)]
pub struct Key {
    host: String,
    version: u64,
}

impl foca::Invalidates for Key {
    fn invalidates(&self, other: &Self) -> bool {
        self.host == other.host && self.version >= other.version
    }
}

impl Book {
    /// The clock for records arriving from now on.
    pub fn set_now(&self, now_ms: u64) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.now_ms = now_ms;
        }
    }

    /// Every host's newest record.
    pub fn records(&self) -> BTreeMap<String, Known> {
        self.inner
            .lock()
            .map(|inner| inner.records.clone())
            .unwrap_or_default()
    }

    /// One host's newest record.
    pub fn get(&self, host: &str) -> Option<Known> {
        self.inner.lock().ok()?.records.get(host).cloned()
    }

    /// Keeps `record` if it is newer than what is known of its host.
    fn take(&self, record: Record) -> Option<Key> {
        let mut inner = self.inner.lock().ok()?;
        let at_ms = inner.now_ms;
        if inner
            .records
            .get(&record.host)
            .is_some_and(|k| k.record.version >= record.version)
        {
            return None;
        }
        let key = Key {
            host: record.host.clone(),
            version: record.version,
        };
        inner
            .records
            .insert(record.host.clone(), Known { record, at_ms });
        Some(key)
    }
}

impl<T> foca::BroadcastHandler<T> for Book {
    type Key = Key;
    type Error = RecordError;

    fn receive_item(
        &mut self,
        data: &[u8],
        _sender: Option<&T>,
    ) -> Result<Option<Key>, RecordError> {
        let record: Record =
            ciborium::from_reader(data).map_err(|e| RecordError::Decode(e.to_string()))?;
        Ok(self.take(record))
    }
}
