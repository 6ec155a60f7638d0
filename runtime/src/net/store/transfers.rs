//! Transfers: this host's decision on each hop that came to it, committed or aborted.
//!
//! The commit of an arriving agent and the abort of an in-doubt transfer (a source asking
//! after losing the stream) are each decided in one redb transaction, so a transfer is either
//! committed or aborted, never both.

use super::agents::{AgentRecord, Resume, set_agent_in};
use super::blobs::{INLINE_IMAGE, Staged, inline, put_inline, unlink};
use super::schema::{ABORTED, COMMITTED, TRANSFERS, agent_key};
use super::{HostStore, StoreError, blocking};
use crate::context::AgentId;
use crate::net::messages::TransferStatus;
use redb::{ReadableDatabase, ReadableTable};

impl HostStore {
    /// What this host decided about the transfer (agent, seq), if anything.
    ///
    /// # Errors
    /// When the database fails.
    pub fn transfer(
        &self,
        agent: &AgentId,
        seq: u64,
    ) -> Result<Option<TransferStatus>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(TRANSFERS)?;
        let value = table.get(agent_key(agent, seq).as_slice())?;
        Ok(value.map(|v| match v.value() {
            COMMITTED => TransferStatus::Committed,
            _ => TransferStatus::Aborted,
        }))
    }

    /// The commit point of a hop: records that this host owns the agent, with its image
    /// (staged unless `staged` holds it already).
    ///
    /// # Errors
    /// [`StoreError::Aborted`] if a query aborted this transfer first.
    pub async fn commit_arrival(
        &self,
        agent: &AgentId,
        seq: u64,
        image: &[u8],
        staged: Option<Staged>,
    ) -> Result<(), StoreError> {
        // A file image is written, or renamed with its directory synced, off the workers.
        let publish = || match staged {
            Some(staged) => self.publish(staged),
            None => self.publish(self.stage_image(&[image])?),
        };
        let name = match image.len() > INLINE_IMAGE {
            true => blocking(publish)?,
            false => publish()?,
        };
        let (agent, inline) = (*agent, inline(&[image]));
        let record = AgentRecord::Resident {
            seq,
            image: name.clone(),
            resume: Resume::Arrived,
        };
        let stale = self
            .write(move |dir, txn| {
                put_inline(txn, &name, inline.as_deref())?;
                let mut transfers = txn.open_table(TRANSFERS)?;
                let key = agent_key(&agent, seq);
                let previous = transfers.get(key.as_slice())?.map(|v| v.value());
                match previous {
                    Some(ABORTED) => return Err(StoreError::Aborted),
                    Some(_) => {} // a repeated commit of the same transfer
                    None => {
                        transfers.insert(key.as_slice(), COMMITTED)?;
                    }
                }
                drop(transfers);
                set_agent_in(dir, txn, &agent, &record)
            })
            .await?;
        unlink(stale);
        Ok(())
    }

    /// Answers a query about (agent, seq): committed, or aborted from now on.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn resolve_transfer(
        &self,
        agent: &AgentId,
        seq: u64,
    ) -> Result<TransferStatus, StoreError> {
        let key = agent_key(agent, seq);
        self.write(move |_, txn| {
            let mut transfers = txn.open_table(TRANSFERS)?;
            let previous = transfers.get(key.as_slice())?.map(|v| v.value());
            match previous {
                Some(COMMITTED) => Ok(TransferStatus::Committed),
                _ => {
                    transfers.insert(key.as_slice(), ABORTED)?;
                    Ok(TransferStatus::Aborted)
                }
            }
        })
        .await
    }
}
