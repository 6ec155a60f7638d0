//! The call journal: each service call an agent made here, with its answer.
//!
//! An agent that re-runs from its last stored image after a crash gets the recorded answers,
//! so each call takes effect once. The rows outlive their answers: they are also the site's
//! record of visits.

use super::schema::{CALLS, agent_key, cbor, uncbor};
use super::{HostStore, StoreError};
use crate::context::AgentId;
use agent_abi::CallError;
use redb::{ReadableDatabase, ReadableTable, WriteTransaction};
use serde::{Deserialize, Serialize};

/// One service call in the journal: a visit of an agent to this site.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallEntry {
    /// The agent's hop sequence number when it called.
    pub seq: u64,
    /// The service.
    pub service: String,
    /// BLAKE3 of the request, to notice an agent that does not replay the same calls.
    #[serde(with = "serde_bytes")]
    pub request: [u8; 32],
    /// The answer; dropped once the agent left or ended (it can no longer replay).
    pub answer: Option<Result<serde_bytes::ByteBuf, CallError>>,
}

impl HostStore {
    /// The journal's entry for call `index` of `agent`, if it made that call here.
    ///
    /// # Errors
    /// When the database fails or the entry does not decode.
    pub fn call(&self, agent: &AgentId, index: u64) -> Result<Option<CallEntry>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(CALLS)?;
        let value = table.get(agent_key(agent, index).as_slice())?;
        value.map(|v| uncbor(v.value())).transpose()
    }

    /// Records call `index` of `agent` with its answer, before the agent sees the answer.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn put_call(
        &self,
        agent: &AgentId,
        index: u64,
        entry: &CallEntry,
    ) -> Result<(), StoreError> {
        let (key, entry) = (agent_key(agent, index), cbor(entry));
        self.write(move |_, txn| {
            (txn.open_table(CALLS)?).insert(key.as_slice(), entry.as_slice())?;
            Ok(())
        })
        .await
    }

    /// Every call agents made here, in (agent, call index) order: the site's visits.
    ///
    /// # Errors
    /// When the database fails or an entry does not decode.
    pub fn visits(&self) -> Result<Vec<(AgentId, u64, CallEntry)>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(CALLS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (k, v) = entry?;
            let key = k.value();
            let (Ok(id), Ok(index)) = (
                <[u8; 16]>::try_from(&key[..16.min(key.len())]),
                <[u8; 8]>::try_from(&key[16.min(key.len())..]),
            ) else {
                continue;
            };
            out.push((AgentId(id), u64::from_be_bytes(index), uncbor(v.value())?));
        }
        Ok(out)
    }
}

/// Drops the answers recorded for `agent` (it left or ended), keeping its visits.
pub(super) fn forget_answers(txn: &WriteTransaction, agent: &AgentId) -> Result<(), StoreError> {
    let (start, end) = (agent_key(agent, 0), agent_key(agent, u64::MAX));
    let mut table = txn.open_table(CALLS)?;
    let mut updates = Vec::new();
    for entry in table.range(start.as_slice()..=end.as_slice())? {
        let (k, v) = entry?;
        let mut call: CallEntry = uncbor(v.value())?;
        if call.answer.take().is_some() {
            updates.push((k.value().to_vec(), call));
        }
    }
    for (key, call) in updates {
        table.insert(key.as_slice(), cbor(&call).as_slice())?;
    }
    Ok(())
}
