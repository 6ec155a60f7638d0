//! The post office. A message for an agent goes to the agent's home, which holds it in the
//! agent's mailbox ([`MailboxRow`]) until a stored state of the agent took it; the host the
//! agent runs on fetches its messages from there, and a home wakes an agent parked waiting
//! for one. The home is the one place that knows an agent's messages, wherever the agent is:
//! nothing is held by, or forwarded through, a host the agent left (docs/messaging.md).

use crate::backoff::Backoff;
use crate::context::AgentId;
use crate::faults::crash_point;
use crate::net::host::Host;
use crate::net::mailbox::{Accepted, Declined, MailboxRow, SenderKey, Waiter, digest};
use crate::net::messages::{AgentState, Post, PostFrom, Refusal, Reply, Request};
use crate::net::store::{AgentRecord, Resume, mail_size};
use agent_abi::{MAX_MAIL, Message, Sender};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Messages one fetch returns at most, and the bytes they may take (the first always comes).
pub(in crate::net) const FETCH_COUNT: usize = 64;
pub(in crate::net) const FETCH_BYTES: usize = 256 << 10;

/// Homes of receivers a host remembers for its sending agents; past it, it forgets them all.
const HOMES_REMEMBERED: usize = 10_000;

/// The first pause before a home tries again to wake a waiting agent, and the longest.
const WAKE_FIRST: Duration = Duration::from_millis(100);
const WAKE_MOST: Duration = Duration::from_secs(5);

/// What a fetch gives an agent's host: messages, and how many its mailbox holds at most, so
/// that the host stores the agent often enough for its home to make room.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Fetched {
    /// The messages, in order.
    pub mail: Vec<Message>,
    /// Messages the agent's mailbox holds at most.
    pub limit: u64,
}

/// One mailbox in memory. Its lock is held across the mailbox's store writes, so that
/// messages are stored in the order they are numbered.
#[derive(Default)]
pub(in crate::net) struct Slot {
    held: tokio::sync::Mutex<Held>,
    /// Notified when a message was stored: fetches that wait hear of it.
    arrived: tokio::sync::Notify,
}

#[derive(Default)]
struct Held {
    row: MailboxRow,
    /// The agent ended and its mailbox is gone.
    closed: bool,
}

/// The mailboxes of agents launched here, and what this host knows of other homes.
#[derive(Default)]
pub(in crate::net) struct PostOffice {
    boxes: Mutex<HashMap<AgentId, Arc<Slot>>>,
    /// Agents a task is waking, and where.
    waking: Mutex<HashSet<(AgentId, Waiter)>>,
    /// The home hosts of agents that agents here sent messages to.
    homes_of: Mutex<HashMap<AgentId, String>>,
    /// Bytes the mailboxes of each user's agents hold.
    owners: Mutex<HashMap<String, u64>>,
    /// Where agents are parked waiting, as their mailboxes say, for `agent status`.
    waiting: Mutex<HashMap<AgentId, String>>,
}

impl PostOffice {
    /// The mailboxes stored here.
    pub(in crate::net) fn load(rows: Vec<(AgentId, MailboxRow)>) -> PostOffice {
        let boxes = rows.into_iter().map(|(agent, row)| {
            let held = Held { row, closed: false };
            let slot = Slot {
                held: tokio::sync::Mutex::new(held),
                arrived: tokio::sync::Notify::new(),
            };
            (agent, Arc::new(slot))
        });
        PostOffice {
            boxes: Mutex::new(boxes.collect()),
            ..PostOffice::default()
        }
    }

    /// The mailbox of `agent`, made empty if it has none yet.
    fn slot(&self, agent: &AgentId) -> Option<Arc<Slot>> {
        let mut boxes = self.boxes.lock().ok()?;
        Some(boxes.entry(*agent).or_default().clone())
    }

    /// Counts `bytes` more against `owner`, unless that passes `limit`.
    fn charge(&self, owner: &str, bytes: u64, limit: u64) -> bool {
        let Ok(mut owners) = self.owners.lock() else {
            return false;
        };
        let held = owners.entry(owner.to_string()).or_default();
        if held.saturating_add(bytes) > limit {
            return false;
        }
        *held += bytes;
        true
    }

    /// Counts `bytes` less against `owner`.
    fn refund(&self, owner: &str, bytes: u64) {
        if let Ok(mut owners) = self.owners.lock()
            && let Some(held) = owners.get_mut(owner)
        {
            *held = held.saturating_sub(bytes);
            if *held == 0 {
                owners.remove(owner);
            }
        }
    }

    /// The site `agent` is parked on waiting for a message, if it is.
    pub(in crate::net) fn waiting_on(&self, agent: &AgentId) -> Option<String> {
        self.waiting.lock().ok()?.get(agent).cloned()
    }

    /// Notes where `agent` waits now (nowhere: `None`), as its mailbox's row says.
    fn note_waiter(&self, agent: &AgentId, waiter: Option<&Waiter>) {
        if let Ok(mut waiting) = self.waiting.lock() {
            match waiter {
                Some(w) => waiting.insert(*agent, w.site.clone()),
                None => waiting.remove(agent),
            };
        }
    }

    /// The mailbox of `agent`, if it has one.
    fn get(&self, agent: &AgentId) -> Option<Arc<Slot>> {
        self.boxes.lock().ok()?.get(agent).cloned()
    }

    fn home_of(&self, agent: &AgentId) -> Option<String> {
        self.homes_of.lock().ok()?.get(agent).cloned()
    }

    fn remember_home(&self, agent: AgentId, home: &str) {
        if let Ok(mut homes) = self.homes_of.lock() {
            if homes.len() >= HOMES_REMEMBERED {
                homes.clear();
            }
            homes.insert(agent, home.to_string());
        }
    }
}

impl Host {
    /// Whether `agent` was launched here, by whom, and whether it still runs.
    fn homed(&self, agent: &AgentId) -> Option<(String, bool)> {
        let homes = self.homes.lock().ok()?;
        let status = &homes.get(agent)?.status;
        Some((status.owner.clone(), status.state == AgentState::Running))
    }

    /// The mailbox of an agent launched here that still runs; given an `owner`, only if the
    /// agent is theirs.
    fn mailbox(&self, agent: &AgentId, owner: Option<&str>) -> Reply<Arc<Slot>> {
        let (theirs, running) = self.homed(agent).ok_or(Refusal::NoSuchAgent(*agent))?;
        if owner.is_some_and(|owner| owner != theirs) {
            return Err(Refusal::NotYours(*agent));
        }
        if !running {
            return Err(Refusal::Ended(*agent));
        }
        self.post.slot(agent).ok_or(Refusal::NoSuchAgent(*agent))
    }

    /// Home side: takes a message for an agent launched here from `sender`, who acts for
    /// `owner`, and holds it durably. A message held already (sent again) is acknowledged
    /// again and not held twice.
    pub(in crate::net) async fn post(
        self: &Arc<Self>,
        post: Post,
        sender: SenderKey,
        owner: &str,
    ) -> Reply<()> {
        let to = post.to;
        if post.body.len() > MAX_MAIL {
            let limit = MAX_MAIL as u64;
            return Err(Refusal::MailTooLarge { limit });
        }
        let slot = self.mailbox(&to, Some(owner))?;
        let mut held = slot.held.lock().await;
        if held.closed {
            return Err(Refusal::Ended(to));
        }
        let mut row = held.row.clone();
        let numbered = (post.seq, digest(&post.body));
        let n = match row.accept(&sender, numbered, self.config.mailbox) {
            Ok(Accepted::Again) => return Ok(()),
            Ok(Accepted::New(n)) => n,
            Err(Declined::Full { limit }) => return Err(Refusal::MailboxFull { agent: to, limit }),
            Err(Declined::Gap { expected }) => return Err(Refusal::OutOfOrder { expected }),
        };
        let from = match &post.from {
            PostFrom::Agent { id, .. } => Sender::Agent(id.to_string()),
            PostFrom::User { .. } => Sender::User(owner.to_string()),
        };
        let message = Message {
            from,
            body: post.body,
        };
        let size = mail_size(&message);
        let limit = self.quotas.limits().mail;
        if !self.post.charge(owner, size, limit) {
            let user = owner.to_string();
            return Err(Refusal::UserMailFull { user, limit });
        }
        row.bytes += size;
        let stored = self.store.put_mail(&to, &row, Some((n, &message))).await;
        if let Err(e) = stored {
            self.post.refund(owner, size);
            return Err(Refusal::Store(e.to_string()));
        }
        crash_point("home-after-post");
        self.metrics.message();
        let waiter = row.waiter.clone();
        held.row = row;
        drop(held);
        slot.arrived.notify_waiters();
        if let Some(waiter) = waiter.filter(|w| n > w.after) {
            self.wake_waiter(to, waiter);
        }
        Ok(())
    }

    /// Home side: the messages of `agent` after number `after`, waiting up to `wait` for one
    /// if there is none; its stored state took those up to `taken`, which go.
    pub(in crate::net) async fn fetch_mail(
        &self,
        agent: &AgentId,
        (after, taken): (u64, u64),
        wait: Duration,
    ) -> Reply<Fetched> {
        let slot = self.mailbox(agent, None)?;
        // An agent that fetches runs: it waits nowhere.
        self.taken(agent, &slot, taken.min(after), true).await?;
        let limit = self.config.mailbox;
        let read = || {
            let mail = (self.store).mail_after(agent, after, FETCH_COUNT, FETCH_BYTES);
            let mail = mail.map_err(|e| Refusal::Store(e.to_string()))?;
            Ok(Fetched { mail, limit })
        };
        let fetched = read()?;
        if !fetched.mail.is_empty() || wait.is_zero() {
            return Ok(fetched);
        }
        let arrived = slot.arrived.notified();
        tokio::pin!(arrived);
        arrived.as_mut().enable();
        let fetched = read()?;
        if !fetched.mail.is_empty() {
            return Ok(fetched);
        }
        tokio::select! {
            () = arrived => {}
            () = tokio::time::sleep(wait) => {}
            () = self.stopping.cancelled() => {}
        }
        read()
    }

    /// Home side: a stored state of `agent` took its messages up to `taken`: they go; and
    /// if it `runs`, it waits nowhere.
    async fn taken(&self, agent: &AgentId, slot: &Slot, taken: u64, runs: bool) -> Reply<()> {
        let mut held = slot.held.lock().await;
        if held.closed {
            return Err(Refusal::Ended(*agent));
        }
        let upto = taken.min(held.row.last);
        let mut changed = false;
        if upto > held.row.taken {
            let after = held.row.taken;
            let freed = self.store.mail_bytes(agent, after, upto).unwrap_or(0);
            held.row.take(upto);
            held.row.bytes = held.row.bytes.saturating_sub(freed);
            if let Some((owner, _)) = self.homed(agent) {
                self.post.refund(&owner, freed);
            }
            changed = true;
        }
        if runs && held.row.waiter.is_some() {
            held.row.waiter = None;
            self.post.note_waiter(agent, None);
            changed = true;
        }
        if changed && let Err(e) = self.store.take_mail(agent, &held.row).await {
            tracing::warn!(%agent, "cannot record what the agent took: {e}");
        }
        Ok(())
    }

    /// Home side: `agent` is parked on `site` waiting for a message after `after` (its
    /// stored state took those up to there); `true` if one is here already.
    pub(in crate::net) async fn await_mail(
        self: &Arc<Self>,
        agent: &AgentId,
        after: u64,
        site: &str,
    ) -> Reply<bool> {
        let slot = self.mailbox(agent, None)?;
        self.taken(agent, &slot, after, false).await?;
        let mut held = slot.held.lock().await;
        if held.closed {
            return Err(Refusal::Ended(*agent));
        }
        if held.row.has_after(after) {
            return Ok(true);
        }
        let mut row = held.row.clone();
        row.waiter = Some(Waiter {
            site: site.to_string(),
            after,
        });
        let stored = self.store.put_mail(agent, &row, None).await;
        stored.map_err(|e| Refusal::Store(e.to_string()))?;
        self.post.note_waiter(agent, row.waiter.as_ref());
        held.row = row;
        Ok(false)
    }

    /// Home side: the agent ended: its mailbox and the messages in it go.
    pub(in crate::net) async fn close_mailbox(&self, agent: &AgentId) {
        let slot = self
            .post
            .boxes
            .lock()
            .ok()
            .and_then(|mut b| b.remove(agent));
        let Some(slot) = slot else { return };
        let mut held = slot.held.lock().await;
        held.closed = true;
        self.post.note_waiter(agent, None);
        if let Some((owner, _)) = self.homed(agent) {
            self.post.refund(&owner, held.row.bytes);
        }
        if let Err(e) = self.store.remove_mailbox(agent).await {
            tracing::warn!(%agent, "cannot drop the mailbox of an agent that ended: {e}");
        }
    }

    /// Home side, when the host starts: mailboxes of agents that ended go, and agents that
    /// wait for messages that came are woken.
    pub(in crate::net) async fn reopen_mailboxes(self: &Arc<Self>) {
        let boxes: Vec<(AgentId, Arc<Slot>)> = match self.post.boxes.lock() {
            Ok(boxes) => boxes.iter().map(|(a, s)| (*a, s.clone())).collect(),
            Err(_) => return,
        };
        for (agent, slot) in boxes {
            // Counted first, so that closing the mailbox of an agent that ended takes back
            // what was counted.
            let homed = self.homed(&agent);
            let held = slot.held.lock().await;
            if let Some((owner, _)) = &homed {
                self.post.charge(owner, held.row.bytes, u64::MAX);
            }
            self.post.note_waiter(&agent, held.row.waiter.as_ref());
            let waiter = (held.row.waiter.clone()).filter(|w| held.row.has_after(w.after));
            drop(held);
            match homed {
                Some((_, true)) => {
                    if let Some(waiter) = waiter {
                        self.wake_waiter(agent, waiter);
                    }
                }
                _ => self.close_mailbox(&agent).await,
            }
        }
    }

    /// Home side: wakes an agent parked on `waiter.site` waiting for a message, trying again
    /// until that host answers or the agent no longer waits there (it woke, fetched or
    /// waits elsewhere: a host it left may be gone for good); then forgets where it waited.
    fn wake_waiter(self: &Arc<Self>, agent: AgentId, waiter: Waiter) {
        let key = (agent, waiter.clone());
        if !(self.post.waking.lock()).is_ok_and(|mut w| w.insert(key.clone())) {
            return;
        }
        let host = self.clone();
        tokio::spawn(async move {
            let mut pause = Backoff::new(WAKE_FIRST, WAKE_MOST);
            while host.waits_at(&agent, &waiter).await && !host.stopping() {
                let Err(e) = host.wake_at(agent, &waiter.site).await else {
                    host.forget_waiter(&agent, &waiter).await;
                    break;
                };
                let site = &waiter.site;
                tracing::warn!(%agent, %site, "cannot wake an agent waiting for a message: {e}");
                tokio::select! {
                    () = tokio::time::sleep(pause.wait()) => {}
                    () = host.stopping.cancelled() => break,
                }
            }
            let _ = host.post.waking.lock().map(|mut w| w.remove(&key));
        });
    }

    /// Whether the home still has `agent` waiting as `waiter` says.
    async fn waits_at(&self, agent: &AgentId, waiter: &Waiter) -> bool {
        let slot = self.post.get(agent);
        match slot {
            Some(slot) => slot.held.lock().await.row.waiter.as_ref() == Some(waiter),
            None => false,
        }
    }

    /// Tells `site` that a message came for `agent`.
    async fn wake_at(self: &Arc<Self>, agent: AgentId, site: &str) -> Reply<()> {
        if site == self.config.name {
            self.wake_for_mail(&agent);
            return Ok(());
        }
        let wake = Request::Wake { agent };
        let asked = self.peers.ask::<Reply<()>>(site, &wake).await;
        asked.map_err(|e| Refusal::Unreachable(e.to_string()))?
    }

    /// The agent was woken where `waiter` says: unless it waits again, it waits nowhere.
    async fn forget_waiter(&self, agent: &AgentId, waiter: &Waiter) {
        let slot = self.post.get(agent);
        let Some(slot) = slot else { return };
        let mut held = slot.held.lock().await;
        if held.row.waiter.as_ref() == Some(waiter) {
            let mut row = held.row.clone();
            row.waiter = None;
            if self.store.put_mail(agent, &row, None).await.is_ok() {
                self.post.note_waiter(agent, None);
                held.row = row;
            }
        }
    }

    /// An agent's host: a message came for `agent`; if it is parked here waiting for one,
    /// it wakes.
    pub(in crate::net) fn wake_for_mail(self: &Arc<Self>, agent: &AgentId) {
        let waiting = matches!(
            self.store.agent(agent),
            Ok(Some(AgentRecord::Resident {
                resume: Resume::Wake { mail: true, .. },
                ..
            }))
        );
        if waiting && self.residents.parked_owner(agent).is_some() {
            self.wake(*agent);
        }
    }

    /// An agent's host: sends a message of one of its agents (of `owner`) to agent `to` at
    /// its home, found by asking this host, then `hint` (the sender's own home), then every
    /// peer; the home found is remembered.
    pub(in crate::net) async fn post_to_home(
        self: &Arc<Self>,
        post: &Post,
        owner: &str,
        hint: &str,
    ) -> Reply<()> {
        let (to, from) = match &post.from {
            PostFrom::Agent { id, .. } => (post.to, SenderKey::Agent(*id)),
            PostFrom::User { .. } => return Err(Refusal::OnlyUsers("post as users".into())),
        };
        let mut homes: Vec<String> = Vec::new();
        homes.extend(self.post.home_of(&to));
        homes.push(self.config.name.clone());
        homes.push(hint.to_string());
        homes.extend(self.peers.names());
        let mut tried = HashSet::new();
        let mut unreachable = None;
        for home in homes {
            if !tried.insert(home.clone()) {
                continue;
            }
            let posted = match home == self.config.name {
                true => self.post(post.clone(), from.clone(), owner).await,
                false => {
                    let request = Request::Post(post.clone());
                    match self.peers.ask::<Reply<()>>(&home, &request).await {
                        Ok(reply) => reply,
                        Err(e) => {
                            unreachable = Some(Refusal::Unreachable(format!("{home}: {e}")));
                            continue;
                        }
                    }
                }
            };
            if !matches!(posted, Err(Refusal::NoSuchAgent(_))) {
                self.post.remember_home(to, &home);
                return posted;
            }
        }
        // A home that could not be asked may be the one: the sender tries again later.
        Err(unreachable.unwrap_or(Refusal::NoSuchAgent(to)))
    }
}
