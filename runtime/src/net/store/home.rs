//! Home records: what the home host of an agent launched there knows of it, and its hops.

use super::agents::{AgentRecord, forwarding};
use super::blobs::unlink;
use super::schema::{HOME, HOME_HOP_LOG, HOME_HOPS, agent_key, cbor, uncbor};
use super::{HostStore, StoreError};
use crate::context::AgentId;
use crate::net::messages::{HopInfo, LaunchEvent, StatusReply};
use redb::{ReadOnlyTable, ReadableDatabase, ReadableTable, WriteTransaction};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// A home's stored record of one agent launched there: its status, and an end that came
/// before the reports of all its hops and is held back until they do (kept here so that the
/// home can acknowledge it, and a restart still holds it). Stored as the status's own
/// fields plus `held_end`, so that a row holding a bare status reads too.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HomeRow {
    /// What `status` answers.
    #[serde(flatten)]
    pub status: StatusReply,
    /// The held end, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_end: Option<LaunchEvent>,
}

/// A write of a home record ([`HostStore::put_home_latest`]): the row, and hops to store apart
/// from it. Reading the record back ([`HostStore::homes`]) gives the row's hops and all those
/// stored apart, so the row need not hold the hops stored before.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HomeWrite {
    /// The row.
    pub row: HomeRow,
    /// Hops to store apart. One stored twice (two writes of the agent's status raced) is read
    /// back once.
    pub hops: Vec<HopInfo>,
}

/// A home record as [`HostStore::homes`] reads it back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredHome {
    /// The record, with every hop stored of its agent.
    pub row: HomeRow,
    /// The hops (by seq) that only the record's row holds (the older layout kept them in the
    /// row): to be stored apart with the agent's next write.
    pub inline: Vec<u64>,
}

impl HostStore {
    /// Saves `status` as the home record of its agent, with no held end.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn put_home(&self, status: &StatusReply) -> Result<(), StoreError> {
        self.put_homes(std::slice::from_ref(status)).await
    }

    /// Stores the home records of new agents (a clone's children) in one write.
    ///
    /// # Errors
    /// When the database fails: none is stored.
    pub async fn put_homes(&self, statuses: &[StatusReply]) -> Result<(), StoreError> {
        let rows: Vec<(AgentId, Vec<u8>)> = (statuses.iter())
            .map(|status| {
                let row = HomeRow {
                    status: status.clone(),
                    held_end: None,
                };
                (status.agent, cbor(&row))
            })
            .collect();
        self.write(move |_, txn| {
            let mut table = txn.open_table(HOME)?;
            for (agent, row) in &rows {
                table.insert(agent.0.as_slice(), row.as_slice())?;
            }
            Ok(())
        })
        .await
    }

    /// Saves the home record `latest` yields inside the write transaction (nothing if it
    /// yields none), and returns the tag that came with it. `latest` may be called more than
    /// once (a batch is applied again when another write in it fails); the last call's record
    /// is stored. Computing the record inside the transaction lets writers racing on one
    /// agent store ever newer statuses, never an older one last.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn put_home_latest<T: Send + 'static>(
        &self,
        latest: impl Fn() -> Option<(HomeWrite, T)> + Send + 'static,
    ) -> Result<Option<T>, StoreError> {
        self.write(home_latest(latest, self.next_hop.clone())).await
    }

    /// [`HostStore::forward`] for an agent launched here, with no report: its home record, as
    /// `latest` yields it ([`HostStore::put_home_latest`]), goes in the same write, which
    /// waits for the disk as a home record's does. Yields the tag that came with it.
    ///
    /// # Errors
    /// When the database fails: neither is stored.
    pub async fn forward_home<T: Send + 'static>(
        &self,
        agent: &AgentId,
        record: &AgentRecord,
        latest: impl Fn() -> Option<(HomeWrite, T)> + Send + 'static,
    ) -> Result<Option<T>, StoreError> {
        let (mut forward, mut home) = (
            forwarding(agent, record, None),
            home_latest(latest, self.next_hop.clone()),
        );
        let both =
            move |dir: &Path, txn: &WriteTransaction| Ok((forward(dir, txn)?, home(dir, txn)?));
        let (stale, tag) = self.write(both).await?;
        unlink(stale);
        Ok(tag)
    }

    /// Home records of agents launched here, with the hops stored apart from them.
    ///
    /// # Errors
    /// When the database fails.
    pub fn homes(&self) -> Result<Vec<StoredHome>, StoreError> {
        let txn = self.db.begin_read()?;
        let mut logged: HashMap<AgentId, Vec<HopInfo>> = HashMap::new();
        for entry in txn.open_table(HOME_HOP_LOG)?.iter()? {
            let (_, v) = entry?;
            let (agent, hop): (AgentId, HopInfo) = uncbor(v.value())?;
            logged.entry(agent).or_default().push(hop);
        }
        let table = txn.open_table(HOME)?;
        let keyed = txn.open_table(HOME_HOPS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (_, v) = entry?;
            let mut row: HomeRow = uncbor(v.value())?;
            // Rows of the older layout hold their hops themselves.
            let inline = row.status.hops.iter().map(|h| h.seq).collect();
            let agent = row.status.agent;
            row.status.hops.extend(keyed_hops(&keyed, &agent)?);
            row.status
                .hops
                .extend(logged.remove(&agent).unwrap_or_default());
            row.status.hops.sort_by_key(|h| h.seq);
            row.status.hops.dedup_by_key(|h| h.seq);
            out.push(StoredHome { row, inline });
        }
        Ok(out)
    }
}

/// The hops of `agent` in [`HOME_HOPS`], as older hosts stored them.
fn keyed_hops(
    keyed: &ReadOnlyTable<&[u8], &[u8]>,
    agent: &AgentId,
) -> Result<Vec<HopInfo>, StoreError> {
    let (first, last) = (agent_key(agent, 0), agent_key(agent, u64::MAX));
    let mut hops = Vec::new();
    for hop in keyed.range(first.as_slice()..=last.as_slice())? {
        let (_, v) = hop?;
        hops.push(uncbor(v.value())?);
    }
    Ok(hops)
}

/// The write of [`HostStore::put_home_latest`]. `next_hop` draws the keys of the hop log.
fn home_latest<T>(
    latest: impl Fn() -> Option<(HomeWrite, T)> + Send + 'static,
    next_hop: Arc<AtomicU64>,
) -> impl FnMut(&Path, &WriteTransaction) -> Result<Option<T>, StoreError> + Send + 'static {
    move |_, txn| {
        let Some((HomeWrite { row, hops }, tag)) = latest() else {
            return Ok(None);
        };
        let agent = row.status.agent;
        (txn.open_table(HOME)?).insert(agent.0.as_slice(), cbor(&row).as_slice())?;
        if !hops.is_empty() {
            let mut table = txn.open_table(HOME_HOP_LOG)?;
            for hop in &hops {
                // A key drawn by a transaction that is then dropped is never used: a gap.
                let n = next_hop.fetch_add(1, Ordering::Relaxed);
                table.insert(n, cbor(&(agent, hop)).as_slice())?;
            }
        }
        Ok(Some(tag))
    }
}
