//! An agent's mailbox as its home keeps it: which messages it holds, what each sender sent
//! last, and where the agent waits for the next one. Plain data and decisions, no I/O: the
//! home's post office ([`crate::net::host`]) stores it and acts on what it decides.
//!
//! Each sender numbers its messages to one receiver 1, 2, 3, ...; the mailbox accepts only
//! the next number from each sender, says "held already" to one it accepted before (a sender
//! that did not hear the answer sends it again), and gives each message it accepts the next
//! number of the mailbox. A message that bears the number of the last one held but other
//! contents is a new one: its sender gave up on the last one without learning that it was
//! held, and numbered the next the same. The receiver takes messages in that order: so each message is
//! delivered once, and in order per sender.

use crate::context::AgentId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Who sent a message, as its receiver's mailbox tells senders apart.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum SenderKey {
    /// An agent: its numbers travel with it.
    Agent(AgentId),
    /// One run of `agent send` by a user: its numbers live as long as the run.
    User {
        /// The user's certificate name.
        name: String,
        /// The run's random number.
        session: u64,
    },
}

/// The last message accepted from one sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// The sender's number of it.
    pub seq: u64,
    /// The mailbox's number of it.
    pub n: u64,
    /// A digest of its contents ([`digest`]).
    #[serde(default)]
    pub digest: u64,
}

/// The digest of a message's contents a [`Mark`] keeps.
pub fn digest(body: &[u8]) -> u64 {
    let hash = blake3::hash(body);
    let mut first = [0u8; 8];
    first.copy_from_slice(&hash.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// Where an agent waits, parked, for a message numbered after `after`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Waiter {
    /// The host it is parked on.
    pub site: String,
    /// The last message it took.
    pub after: u64,
}

/// The sessions of users a mailbox remembers: a user's `agent send` is one session, and
/// only its own retries need its mark.
pub const USER_SESSIONS_KEPT: usize = 64;

/// Messages a mailbox holds at most unless its host is set otherwise.
pub const DEFAULT_MAILBOX: u64 = 1024;

/// One agent's mailbox at its home.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxRow {
    /// The number of the last message accepted.
    pub last: u64,
    /// Messages up to this number were taken by a stored state of the agent: they are gone.
    pub taken: u64,
    /// The last message accepted from each sender.
    pub senders: BTreeMap<SenderKey, Mark>,
    /// Where the agent is parked waiting, if it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiter: Option<Waiter>,
    /// Bytes of the messages held, as stored.
    #[serde(default)]
    pub bytes: u64,
}

/// What a mailbox made of a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accepted {
    /// A new message: its number in the mailbox.
    New(u64),
    /// One accepted before (sent again): held already.
    Again,
}

/// Why a mailbox turned a message down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Declined {
    /// It holds `limit` messages.
    Full {
        /// Messages it holds at most.
        limit: u64,
    },
    /// The sender skipped numbers: it must send number `expected` first.
    Gap {
        /// The number it must send next.
        expected: u64,
    },
}

impl MailboxRow {
    /// Messages held: accepted and not yet taken by a stored state of the agent.
    pub fn held(&self) -> u64 {
        self.last - self.taken
    }

    /// Accepts message `seq` of `sender`, whose contents have `digest`, if it is the
    /// sender's next one and there is room for it among at most `limit` held messages.
    pub fn accept(
        &mut self,
        sender: &SenderKey,
        (seq, digest): (u64, u64),
        limit: u64,
    ) -> Result<Accepted, Declined> {
        let last = self.senders.get(sender).copied();
        let sent = last.map_or(0, |m| m.seq);
        let renumbered = last.is_some_and(|m| m.seq == seq && m.digest != digest);
        if seq <= sent && !renumbered {
            return Ok(Accepted::Again);
        }
        if seq != sent + 1 && !renumbered {
            return Err(Declined::Gap { expected: sent + 1 });
        }
        if self.held() >= limit {
            return Err(Declined::Full { limit });
        }
        self.last += 1;
        let mark = Mark {
            seq,
            n: self.last,
            digest,
        };
        self.senders.insert(sender.clone(), mark);
        if matches!(sender, SenderKey::User { .. }) {
            self.forget_old_sessions();
        }
        Ok(Accepted::New(self.last))
    }

    /// The agent's stored state took messages up to `n`: they may go. `false` if that
    /// changes nothing.
    pub fn take(&mut self, n: u64) -> bool {
        let n = n.min(self.last);
        let newer = n > self.taken;
        self.taken = self.taken.max(n);
        newer
    }

    /// Whether a message after `after` is held.
    pub fn has_after(&self, after: u64) -> bool {
        self.last > after
    }

    /// Keeps the marks of the [`USER_SESSIONS_KEPT`] latest user sessions.
    fn forget_old_sessions(&mut self) {
        let users = || {
            self.senders
                .iter()
                .filter(|(k, _)| matches!(k, SenderKey::User { .. }))
        };
        let over = users().count().saturating_sub(USER_SESSIONS_KEPT);
        if over == 0 {
            return;
        }
        let mut oldest: Vec<(u64, SenderKey)> = users().map(|(k, m)| (m.n, k.clone())).collect();
        oldest.sort();
        for (_, key) in oldest.into_iter().take(over) {
            self.senders.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent(byte: u8) -> SenderKey {
        SenderKey::Agent(AgentId([byte; 16]))
    }

    #[test]
    fn each_message_is_numbered_once_in_the_order_of_its_sender() {
        let mut mailbox = MailboxRow::default();
        let (a, b) = (agent(1), agent(2));
        assert_eq!(mailbox.accept(&a, (1, 0), 10), Ok(Accepted::New(1)));
        assert_eq!(mailbox.accept(&b, (1, 0), 10), Ok(Accepted::New(2)));
        assert_eq!(mailbox.accept(&a, (1, 0), 10), Ok(Accepted::Again));
        assert_eq!(
            mailbox.accept(&a, (3, 0), 10),
            Err(Declined::Gap { expected: 2 })
        );
        assert_eq!(mailbox.accept(&a, (2, 0), 10), Ok(Accepted::New(3)));
        assert_eq!(mailbox.held(), 3);
    }

    /// A sender that gave up on a message it did not learn was held numbers its next one
    /// the same: other contents under that number are a new message, the same are not.
    #[test]
    fn a_new_message_under_the_last_ones_number_is_held_too() {
        let mut mailbox = MailboxRow::default();
        let a = agent(1);
        assert_eq!(mailbox.accept(&a, (1, 11), 10), Ok(Accepted::New(1)));
        assert_eq!(mailbox.accept(&a, (1, 11), 10), Ok(Accepted::Again));
        assert_eq!(mailbox.accept(&a, (1, 22), 10), Ok(Accepted::New(2)));
        assert_eq!(mailbox.accept(&a, (1, 22), 10), Ok(Accepted::Again));
        assert_eq!(mailbox.accept(&a, (2, 33), 10), Ok(Accepted::New(3)));
        // An older number is held already, whatever it carries.
        assert_eq!(mailbox.accept(&a, (1, 44), 10), Ok(Accepted::Again));
    }

    #[test]
    fn a_full_mailbox_declines_new_messages_until_some_are_taken() {
        let mut mailbox = MailboxRow::default();
        let a = agent(1);
        assert_eq!(mailbox.accept(&a, (1, 0), 2), Ok(Accepted::New(1)));
        assert_eq!(mailbox.accept(&a, (2, 0), 2), Ok(Accepted::New(2)));
        assert_eq!(
            mailbox.accept(&a, (3, 0), 2),
            Err(Declined::Full { limit: 2 })
        );
        // One held already is still known as such.
        assert_eq!(mailbox.accept(&a, (2, 0), 2), Ok(Accepted::Again));
        assert!(mailbox.take(1));
        assert!(!mailbox.take(1));
        assert_eq!(mailbox.accept(&a, (3, 0), 2), Ok(Accepted::New(3)));
        // Taking more than was accepted takes what there is.
        mailbox.take(99);
        assert_eq!(mailbox.held(), 0);
    }

    #[test]
    fn old_user_sessions_are_forgotten_but_agents_are_not() {
        let mut mailbox = MailboxRow::default();
        let a = agent(7);
        assert_eq!(mailbox.accept(&a, (1, 0), 1000), Ok(Accepted::New(1)));
        for session in 0..(USER_SESSIONS_KEPT as u64 + 5) {
            let user = SenderKey::User {
                name: "alice".into(),
                session,
            };
            assert!(matches!(
                mailbox.accept(&user, (1, 0), 1000),
                Ok(Accepted::New(_))
            ));
        }
        assert_eq!(mailbox.senders.len(), USER_SESSIONS_KEPT + 1);
        assert!(mailbox.senders.contains_key(&a));
        let first = SenderKey::User {
            name: "alice".into(),
            session: 0,
        };
        assert!(!mailbox.senders.contains_key(&first));
    }

    #[test]
    fn a_row_reads_back_as_it_was_stored() {
        let mut mailbox = MailboxRow::default();
        mailbox.accept(&agent(3), (1, 0), 10).unwrap();
        let user = SenderKey::User {
            name: "bob".into(),
            session: 9,
        };
        mailbox.accept(&user, (1, 0), 10).unwrap();
        mailbox.waiter = Some(Waiter {
            site: "siteB".into(),
            after: 1,
        });
        let mut bytes = Vec::new();
        ciborium::into_writer(&mailbox, &mut bytes).unwrap();
        let read: MailboxRow = ciborium::from_reader(bytes.as_slice()).unwrap();
        assert_eq!(read, mailbox);
    }
}
