//! The store's redb tables, their keys and how their rows are encoded.
//!
//! Rows are CBOR, so that a field added with a default reads rows written before it. Nothing
//! is migrated: a table a newer host no longer writes (`home_hops`) is still read.

use super::StoreError;
use crate::context::AgentId;
use redb::{Database, ReadableTable, TableDefinition};
use serde::Serialize;
use std::path::Path;

/// Hop transfers this host decided, keyed (agent, seq): [`COMMITTED`] or [`ABORTED`].
pub(super) const TRANSFERS: TableDefinition<&[u8], u8> = TableDefinition::new("transfers");
/// Agent records, keyed by agent.
pub(super) const AGENTS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("agents");
/// Home records of agents launched here, keyed by agent.
pub(super) const HOME: TableDefinition<&[u8], &[u8]> = TableDefinition::new("home");
/// The hops of agents launched here, in the order written: n → (agent, hop). Apart from their
/// status, so that a hop costs the home one row, not a rewrite of all the hops before it; in
/// the order written, so that the hops a batch stores share a page or two instead of each
/// going to its agent's own page. Read only when the host starts.
pub(super) const HOME_HOP_LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("home_hop_log");
/// The same, keyed (agent, seq), as older hosts wrote them: read, no longer written.
pub(super) const HOME_HOPS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("home_hops");
/// The call journal, keyed (agent, call index).
pub(super) const CALLS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("calls");
/// Reports not yet acknowledged by their home hosts, keyed by the hash of their contents.
pub(super) const OUTBOX: TableDefinition<&[u8], &[u8]> = TableDefinition::new("outbox");
/// Messages held for agents launched here, keyed (agent, number in its mailbox).
pub(super) const MAIL: TableDefinition<&[u8], &[u8]> = TableDefinition::new("mail");
/// The mailboxes of agents launched here, keyed by agent.
pub(super) const MAILBOXES: TableDefinition<&[u8], &[u8]> = TableDefinition::new("mailboxes");
/// Small images, keyed by their file name.
pub(super) const IMAGES: TableDefinition<&str, &[u8]> = TableDefinition::new("images");

/// A transfer committed here.
pub(super) const COMMITTED: u8 = 1;
/// A transfer aborted here: a late commit of it fails.
pub(super) const ABORTED: u8 = 2;

/// Bytes of the database file redb may keep cached in memory. The records are small and read
/// rarely; redb's default cache would only make a host's memory grow with the number of
/// agents that ever passed through it.
const STORE_CACHE: usize = 16 << 20;

/// Opens (or creates) the database file under `dir` with every table; yields it and the key
/// of the next row of [`HOME_HOP_LOG`].
pub(super) fn open(dir: &Path) -> Result<(Database, u64), StoreError> {
    let path = dir.join("host.redb");
    let db = Database::builder()
        .set_cache_size(STORE_CACHE)
        .create(&path)
        .map_err(|source| StoreError::Open { path, source })?;
    let txn = db.begin_write()?;
    txn.open_table(TRANSFERS)?;
    txn.open_table(AGENTS)?;
    txn.open_table(HOME)?;
    txn.open_table(HOME_HOPS)?;
    let next_hop = match txn.open_table(HOME_HOP_LOG)?.last()? {
        Some((n, _)) => n.value().saturating_add(1),
        None => 0,
    };
    txn.open_table(CALLS)?;
    txn.open_table(OUTBOX)?;
    txn.open_table(IMAGES)?;
    txn.open_table(MAIL)?;
    txn.open_table(MAILBOXES)?;
    txn.commit()?;
    Ok((db, next_hop))
}

/// The key of a row about one hop (or one call) of `agent`: its id, then `seq` big-endian so
/// that an agent's rows are adjacent and in order.
pub(super) fn agent_key(agent: &AgentId, seq: u64) -> [u8; 24] {
    let mut key = [0u8; 24];
    key[..16].copy_from_slice(&agent.0);
    key[16..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// A row's encoding.
pub(super) fn cbor<T: Serialize>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    // Encoding into a Vec cannot fail for these plain data types.
    let _ = ciborium::into_writer(value, &mut out);
    out
}

/// A row decoded; the recursion limit keeps a damaged row from exhausting the stack.
pub(super) fn uncbor<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    Ok(ciborium::de::from_reader_with_recursion_limit(bytes, 32)?)
}
