//! What the agents of one local run share: a run starts with one agent, and its clones run
//! beside it in the same process. They send each other messages through one post, their
//! events reach the one launcher, and a new child waits here until the run starts it.

use super::{RunEvent, RunReport};
use crate::context::AgentId;
use crate::instance::AgentInstance;
use agent_abi::{Message, SendError, Sender};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Mutex;
use tokio::sync::Notify;

/// The agents of one run.
pub(super) struct Family<'e> {
    on_event: Mutex<&'e mut (dyn FnMut(&RunEvent) + Send)>,
    post: Mutex<Post>,
    /// Woken when a message is posted or an agent ends.
    posted: Notify,
    born: Mutex<Vec<Born>>,
    /// Woken when a child was born.
    births: Notify,
}

/// The mailboxes of the agents of a run.
#[derive(Default)]
struct Post {
    boxes: BTreeMap<AgentId, VecDeque<Message>>,
    running: BTreeSet<AgentId>,
    /// Agents waiting for a message with no timeout: they send nothing until one comes.
    waiting: BTreeSet<AgentId>,
}

/// A child made by a clone, ready to run, with its report so far.
pub(super) struct Born {
    pub(super) agent: AgentInstance,
    pub(super) report: RunReport,
}

/// What a receiver found.
pub(super) enum Taken {
    /// A message.
    Message(Message),
    /// None yet, and another agent of the run may still send one.
    Wait,
    /// None, and every other agent of the run ended or waits for a message itself: none
    /// can come.
    Alone,
}

impl<'e> Family<'e> {
    /// A run whose first agent is `root`, reporting to `on_event`.
    pub(super) fn new(root: AgentId, on_event: &'e mut (dyn FnMut(&RunEvent) + Send)) -> Self {
        let post = Post {
            running: BTreeSet::from([root]),
            ..Post::default()
        };
        Family {
            on_event: Mutex::new(on_event),
            post: Mutex::new(post),
            posted: Notify::new(),
            born: Mutex::new(Vec::new()),
            births: Notify::new(),
        }
    }

    /// Tells the launcher `event`.
    pub(super) fn tell(&self, event: &RunEvent) {
        if let Ok(mut on_event) = self.on_event.lock() {
            on_event(event);
        }
    }

    /// A child was made: it runs once the run starts it.
    pub(super) fn born(&self, born: Born) {
        if let Ok(mut post) = self.post.lock() {
            post.running.insert(born.agent.context().agent_id);
        }
        if let Ok(mut all) = self.born.lock() {
            all.push(born);
        }
        self.births.notify_one();
    }

    /// The children born since last asked.
    pub(super) fn newborn(&self) -> Vec<Born> {
        self.born
            .lock()
            .map(|mut b| b.drain(..).collect())
            .unwrap_or_default()
    }

    /// Waits until a child is born.
    pub(super) async fn birth(&self) {
        self.births.notified().await;
    }

    /// Posts `body` from `from` to `to`, an agent of this run that still runs.
    pub(super) fn send(&self, from: AgentId, to: AgentId, body: Vec<u8>) -> Result<(), SendError> {
        let Ok(mut post) = self.post.lock() else {
            return Err(SendError::NoSuchAgent(to.to_string()));
        };
        if !post.running.contains(&to) {
            return Err(match post.boxes.contains_key(&to) {
                true => SendError::Ended(to.to_string()),
                false => SendError::NoSuchAgent(to.to_string()),
            });
        }
        let message = Message {
            from: Sender::Agent(from.to_string()),
            body,
        };
        post.boxes.entry(to).or_default().push_back(message);
        drop(post);
        self.posted.notify_waiters();
        Ok(())
    }

    /// Takes the next message of `agent`.
    fn take(&self, agent: AgentId) -> Taken {
        let Ok(mut post) = self.post.lock() else {
            return Taken::Alone;
        };
        if let Some(message) = post.boxes.get_mut(&agent).and_then(VecDeque::pop_front) {
            return Taken::Message(message);
        }
        let may_send = |a: &&AgentId| **a != agent && !post.waiting.contains(*a);
        match post.running.iter().any(|a| may_send(&a)) {
            true => Taken::Wait,
            false => Taken::Alone,
        }
    }

    /// Marks `agent` as waiting with no timeout (or no longer), and wakes the others that
    /// wait: they may now be the last who could send.
    fn waits(&self, agent: AgentId, waiting: bool) {
        if let Ok(mut post) = self.post.lock() {
            match waiting {
                true => post.waiting.insert(agent),
                false => post.waiting.remove(&agent),
            };
        }
        self.posted.notify_waiters();
    }

    /// The next message of `agent`, waiting until `deadline` at most (`None`: as long as
    /// another agent of the run runs).
    pub(super) async fn recv(
        &self,
        agent: AgentId,
        deadline: Option<tokio::time::Instant>,
    ) -> Taken {
        if deadline.is_none() {
            self.waits(agent, true);
        }
        let taken = self.wait_for(agent, deadline).await;
        if deadline.is_none() {
            self.waits(agent, false);
        }
        taken
    }

    async fn wait_for(&self, agent: AgentId, deadline: Option<tokio::time::Instant>) -> Taken {
        loop {
            // Armed before looking, so that a message posted meanwhile wakes it.
            let posted = self.posted.notified();
            match self.take(agent) {
                Taken::Wait => {}
                Taken::Alone if deadline.is_some() => {}
                taken => return taken,
            }
            match deadline {
                Some(at) => {
                    tokio::select! {
                        () = posted => {}
                        () = tokio::time::sleep_until(at) => return self.take_now(agent),
                    }
                }
                None => posted.await,
            }
        }
    }

    /// The next message of `agent` if one is there.
    fn take_now(&self, agent: AgentId) -> Taken {
        match self.take(agent) {
            Taken::Message(m) => Taken::Message(m),
            _ => Taken::Wait,
        }
    }

    /// `agent` ended: it takes no more messages, and those waiting for it learn so.
    pub(super) fn ended(&self, agent: AgentId) {
        if let Ok(mut post) = self.post.lock() {
            post.running.remove(&agent);
            post.boxes.entry(agent).or_default().clear();
        }
        self.posted.notify_waiters();
    }
}
