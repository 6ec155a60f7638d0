//! The outbox: events on their way to agents' home hosts, kept until acknowledged.

use super::schema::{OUTBOX, cbor, uncbor};
use super::{HostStore, StoreError};
use crate::context::AgentId;
use crate::net::messages::LaunchEvent;
use redb::{ReadableDatabase, ReadableTable};
use serde::{Deserialize, Serialize};

/// An event on its way to an agent's home host, kept until the home acknowledged it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingReport {
    /// The home host.
    pub home: String,
    /// The agent.
    pub agent: AgentId,
    /// What happened.
    pub event: LaunchEvent,
}

/// The key of a pending report: the hash of its contents, so keeping it twice keeps one.
pub type ReportKey = [u8; 32];

impl HostStore {
    /// Keeps a report until [`HostStore::remove_report`]; returns its key.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn put_report(&self, report: &PendingReport) -> Result<ReportKey, StoreError> {
        let (key, bytes) = report_row(report);
        self.write(move |_, txn| {
            (txn.open_table(OUTBOX)?).insert(key.as_slice(), bytes.as_slice())?;
            Ok(key)
        })
        .await
    }

    /// Forgets a report the home acknowledged, without waiting for the disk: a crash before
    /// the next sync only makes it sent again, and the home keeps one of each.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn remove_report(&self, key: &ReportKey) -> Result<(), StoreError> {
        let key = *key;
        self.write_lazily(move |_, txn| {
            txn.open_table(OUTBOX)?.remove(key.as_slice())?;
            Ok(())
        })
        .await
    }

    /// Reports not yet acknowledged by their home hosts.
    ///
    /// # Errors
    /// When the database fails or a report does not decode.
    pub fn reports(&self) -> Result<Vec<(ReportKey, PendingReport)>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(OUTBOX)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (k, v) = entry?;
            let Ok(key) = ReportKey::try_from(k.value()) else {
                continue;
            };
            out.push((key, uncbor(v.value())?));
        }
        Ok(out)
    }
}

/// A report's row in the outbox: its key (the hash of its encoding) and its encoding.
pub(super) fn report_row(report: &PendingReport) -> (ReportKey, Vec<u8>) {
    let bytes = cbor(report);
    (*blake3::hash(&bytes).as_bytes(), bytes)
}
