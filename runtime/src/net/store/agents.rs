//! Agent records: where each agent this host knows of is, and the image it goes on from.

use super::blobs::{Stale, put_inline, remove_image, unlink};
use super::calls::forget_answers;
use super::reports::{PendingReport, report_row};
use super::schema::{AGENTS, OUTBOX, cbor, uncbor};
use super::{HostStore, StoreError};
use crate::context::AgentId;
use agent_abi::HopError;
use redb::{ReadableDatabase, ReadableTable, WriteTransaction};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Where an agent this host knows of is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentRecord {
    /// It lives here; `image` is its last stored safe point.
    Resident {
        /// Hop sequence number.
        seq: u64,
        /// Image file name.
        image: String,
        /// How to go on from the image after a restart.
        resume: Resume,
    },
    /// It is leaving for `to` at hop `seq`: whether it left is the destination's to say.
    /// `image` is the departure image, to resume from if the transfer was aborted.
    Departing {
        /// Hop sequence number of the hop under way.
        seq: u64,
        /// Destination site.
        to: String,
        /// Image file name.
        image: String,
    },
    /// It left for `to` at hop `seq`: a forwarding pointer.
    Forwarded {
        /// Hop sequence number of the hop that moved it away.
        seq: u64,
        /// Where it went.
        to: String,
    },
}

impl AgentRecord {
    /// The image file the record names, if any.
    pub fn image(&self) -> Option<&str> {
        match self {
            AgentRecord::Resident { image, .. } | AgentRecord::Departing { image, .. } => {
                Some(image)
            }
            AgentRecord::Forwarded { .. } => None,
        }
    }
}

/// How a resident agent goes on from its stored image when its host starts again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Resume {
    /// Poll it: it was just launched (no operation pending).
    Poll,
    /// Handle its pending operation: a shutdown parked it at a safe point.
    Handle,
    /// Its hop here succeeded: it arrived with this image.
    Arrived,
    /// Its hop away failed with this error: it stays here.
    HopFailed(HopError),
    /// It sleeps until `until_ms` (milliseconds since the Unix epoch); its sleep is already
    /// completed in the image, so at that time it is polled. Its home and hop count are here
    /// so that a kill can report its end without reading the image.
    Wake {
        /// When it is due.
        until_ms: u64,
        /// Its home host.
        home: String,
        /// Hops it made so far.
        hops: u64,
        /// Its owner, counted against the owner's quota of parked agents (empty in records
        /// that lack it).
        #[serde(default, skip_serializing_if = "String::is_empty")]
        owner: String,
        /// It waits for a message (its `recv` is pending, not completed): a message wakes it
        /// too, and `until_ms` is the end of its wait.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        mail: bool,
    },
}

impl HostStore {
    /// Sets an agent's record.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn set_agent(&self, agent: &AgentId, record: &AgentRecord) -> Result<(), StoreError> {
        let (agent, record) = (*agent, record.clone());
        unlink(
            self.write(move |dir, txn| set_agent_in(dir, txn, &agent, &record))
                .await?,
        );
        Ok(())
    }

    /// Records that an agent left for good (its destination's commit is durable) with
    /// `record`, and keeps `report` for its home, in one transaction that does not wait for
    /// the disk. A crash before the next sync loses both: the departure record is back, and
    /// the restart asks the destination and reports again (a home keeps one report of a hop).
    ///
    /// # Errors
    /// When the database fails.
    pub async fn forward(
        &self,
        agent: &AgentId,
        record: &AgentRecord,
        report: Option<&PendingReport>,
    ) -> Result<(), StoreError> {
        let stale = (self.write_lazily(forwarding(agent, record, report))).await?;
        if stale.is_some() {
            // The departure record names that file until the commit is durable.
            self.sync().await?;
        }
        unlink(stale);
        Ok(())
    }

    /// Stores `image` durably, then the record `make` builds around its file name; returns
    /// that name. `image` is its bytes in parts, as [`HostStore::stage_image`] takes them.
    ///
    /// The parts may be borrowed from a suspended agent's memory (a departure image read in
    /// place): a large image is written to its file here, off the async workers (in
    /// `tokio::task::block_in_place`), so that the caller need not copy it out to hand it to
    /// a task of its own.
    ///
    /// # Errors
    /// When the file or the database fails.
    pub async fn keep_agent(
        &self,
        agent: &AgentId,
        image: &[&[u8]],
        make: impl FnOnce(String) -> AgentRecord,
    ) -> Result<String, StoreError> {
        let (name, inline) = self.stage_published(image)?;
        let record = make(name.clone());
        let (agent, kept) = (*agent, name.clone());
        let stale = self
            .write(move |dir, txn| {
                put_inline(txn, &kept, inline.as_deref())?;
                set_agent_in(dir, txn, &agent, &record)
            })
            .await?;
        unlink(stale);
        Ok(name)
    }

    /// Forgets an agent that ended here: its record, its image and the answers to its calls.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn remove_agent(&self, agent: &AgentId) -> Result<(), StoreError> {
        let agent = *agent;
        let stale = self
            .write(move |dir, txn| {
                let old = (txn.open_table(AGENTS)?.remove(agent.0.as_slice())?)
                    .map(|v| uncbor::<AgentRecord>(v.value()))
                    .transpose()?;
                let stale = drop_old_image(dir, txn, old, None)?;
                forget_answers(txn, &agent)?;
                Ok(stale)
            })
            .await?;
        unlink(stale);
        Ok(())
    }

    /// An agent's record.
    ///
    /// # Errors
    /// When the database fails or the record does not decode.
    pub fn agent(&self, agent: &AgentId) -> Result<Option<AgentRecord>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(AGENTS)?;
        let value = table.get(agent.0.as_slice())?;
        value.map(|v| uncbor(v.value())).transpose()
    }

    /// Every agent that lives here or is leaving (to resume after a restart).
    ///
    /// # Errors
    /// When the database fails.
    pub fn residents(&self) -> Result<Vec<(AgentId, AgentRecord)>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(AGENTS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (k, v) = entry?;
            let Ok(id) = <[u8; 16]>::try_from(k.value()) else {
                continue;
            };
            let record: AgentRecord = uncbor(v.value())?;
            if !matches!(record, AgentRecord::Forwarded { .. }) {
                out.push((AgentId(id), record));
            }
        }
        Ok(out)
    }
}

/// The write of [`HostStore::forward`]: the agent's new record, and the report if any.
pub(super) fn forwarding(
    agent: &AgentId,
    record: &AgentRecord,
    report: Option<&PendingReport>,
) -> impl FnMut(&Path, &WriteTransaction) -> Result<Stale, StoreError> + Send + use<> {
    let report = report.map(report_row);
    let (agent, record) = (*agent, record.clone());
    move |dir, txn| {
        if let Some((key, bytes)) = &report {
            (txn.open_table(OUTBOX)?).insert(key.as_slice(), bytes.as_slice())?;
        }
        set_agent_in(dir, txn, &agent, &record)
    }
}

/// Sets an agent's record in `txn`; yields the image file it no longer needs.
pub(super) fn set_agent_in(
    dir: &Path,
    txn: &WriteTransaction,
    agent: &AgentId,
    record: &AgentRecord,
) -> Result<Stale, StoreError> {
    let old = (txn.open_table(AGENTS)?)
        .insert(agent.0.as_slice(), cbor(record).as_slice())?
        .map(|v| uncbor::<AgentRecord>(v.value()))
        .transpose()?;
    let stale = drop_old_image(dir, txn, old, Some(record))?;
    if matches!(record, AgentRecord::Forwarded { .. }) {
        forget_answers(txn, agent)?;
    }
    Ok(stale)
}

/// Drops the image of the record `old` unless `new` names it too.
fn drop_old_image(
    dir: &Path,
    txn: &WriteTransaction,
    old: Option<AgentRecord>,
    new: Option<&AgentRecord>,
) -> Result<Stale, StoreError> {
    match old.as_ref().and_then(AgentRecord::image) {
        Some(old) if new.and_then(AgentRecord::image) != Some(old) => remove_image(dir, txn, old),
        _ => Ok(None),
    }
}
