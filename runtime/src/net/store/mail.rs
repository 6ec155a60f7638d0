//! Mailboxes: the messages a home holds for the agents launched there, and each mailbox's
//! row ([`MailboxRow`]).

use super::schema::{MAIL, MAILBOXES, agent_key, cbor, uncbor};
use super::{HostStore, StoreError};
use crate::context::AgentId;
use crate::net::mailbox::MailboxRow;
use agent_abi::Message;
use redb::{ReadableDatabase, ReadableTable, WriteTransaction};

/// The bytes a message takes in the store, as a mailbox counts them.
pub fn mail_size(message: &Message) -> u64 {
    cbor(message).len() as u64
}

impl HostStore {
    /// Stores a mailbox's row and, if given, message `n` of it, in one durable write.
    ///
    /// # Errors
    /// When the database fails: neither is stored.
    pub async fn put_mail(
        &self,
        agent: &AgentId,
        row: &MailboxRow,
        message: Option<(u64, &Message)>,
    ) -> Result<(), StoreError> {
        let (agent, row) = (*agent, cbor(row));
        let message = message.map(|(n, m)| (agent_key(&agent, n), cbor(m)));
        self.write(move |_, txn| {
            if let Some((key, message)) = &message {
                (txn.open_table(MAIL)?).insert(key.as_slice(), message.as_slice())?;
            }
            (txn.open_table(MAILBOXES)?).insert(agent.0.as_slice(), row.as_slice())?;
            Ok(())
        })
        .await
    }

    /// Stores a mailbox's row and drops its messages up to `row.taken`, without waiting for
    /// the disk: a crash brings back messages the agent took already, which it skips.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn take_mail(&self, agent: &AgentId, row: &MailboxRow) -> Result<(), StoreError> {
        let (agent, taken, row) = (*agent, row.taken, cbor(row));
        self.write_lazily(move |_, txn| {
            drop_mail(txn, &agent, taken)?;
            (txn.open_table(MAILBOXES)?).insert(agent.0.as_slice(), row.as_slice())?;
            Ok(())
        })
        .await
    }

    /// Drops a mailbox and every message in it (its agent ended), without waiting for the
    /// disk: a crash brings them back, and the next end of the agent reported drops them.
    ///
    /// # Errors
    /// When the database fails.
    pub async fn remove_mailbox(&self, agent: &AgentId) -> Result<(), StoreError> {
        let agent = *agent;
        self.write_lazily(move |_, txn| {
            drop_mail(txn, &agent, u64::MAX)?;
            (txn.open_table(MAILBOXES)?).remove(agent.0.as_slice())?;
            Ok(())
        })
        .await
    }

    /// Messages of `agent` numbered after `after`, in order: at most `count`, and no more
    /// than `bytes` of stored messages (but always the first).
    ///
    /// # Errors
    /// When the database fails or a message does not decode.
    pub fn mail_after(
        &self,
        agent: &AgentId,
        after: u64,
        count: usize,
        bytes: usize,
    ) -> Result<Vec<Message>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(MAIL)?;
        let (first, last) = (
            agent_key(agent, after.saturating_add(1)),
            agent_key(agent, u64::MAX),
        );
        let mut out: Vec<Message> = Vec::new();
        let mut size = 0;
        for entry in table.range(first.as_slice()..=last.as_slice())? {
            let (_, v) = entry?;
            size += v.value().len();
            if out.len() == count || (!out.is_empty() && size > bytes) {
                break;
            }
            out.push(uncbor(v.value())?);
        }
        Ok(out)
    }

    /// Bytes of the messages of `agent` numbered after `after` up to `upto`.
    ///
    /// # Errors
    /// When the database fails.
    pub fn mail_bytes(&self, agent: &AgentId, after: u64, upto: u64) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(MAIL)?;
        let (first, last) = (
            agent_key(agent, after.saturating_add(1)),
            agent_key(agent, upto),
        );
        let mut bytes = 0;
        for entry in table.range(first.as_slice()..=last.as_slice())? {
            bytes += entry?.1.value().len() as u64;
        }
        Ok(bytes)
    }

    /// Every mailbox stored here.
    ///
    /// # Errors
    /// When the database fails or a row does not decode.
    pub fn mailboxes(&self) -> Result<Vec<(AgentId, MailboxRow)>, StoreError> {
        let txn = self.db.begin_read()?;
        let mut out = Vec::new();
        for entry in txn.open_table(MAILBOXES)?.iter()? {
            let (k, v) = entry?;
            let Ok(id) = <[u8; 16]>::try_from(k.value()) else {
                continue;
            };
            out.push((AgentId(id), uncbor(v.value())?));
        }
        Ok(out)
    }
}

/// Drops the messages of `agent` numbered up to `upto`.
fn drop_mail(txn: &WriteTransaction, agent: &AgentId, upto: u64) -> Result<(), StoreError> {
    let (first, last) = (agent_key(agent, 0), agent_key(agent, upto));
    let mut table = txn.open_table(MAIL)?;
    table.retain_in(first.as_slice()..=last.as_slice(), |_, _| false)?;
    Ok(())
}
