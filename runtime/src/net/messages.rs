//! The messages hosts and users exchange. One QUIC bidirectional stream per request.

use crate::base::BaseList;
use crate::context::AgentId;
use crate::modules::ModuleHash;
use serde::{Deserialize, Serialize};

pub use crate::net::end::{AgentEnd, AgentState};
use std::collections::BTreeMap;

/// The first message on every stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// User → home host: run a new agent; the module follows as a blob. Answered with
    /// [`LaunchEvent`]s until [`LaunchEvent::Finished`].
    Launch {
        /// Sites to visit.
        itinerary: Vec<String>,
        /// `--arg` values.
        args: BTreeMap<String, String>,
    },
    /// User → home host: like [`Request::Launch`], but the module is named by its hash and
    /// sent only if the host holds no module of that hash: then the host first answers
    /// [`LaunchEvent::SendModule`] and reads it as a blob. A user launching many agents of
    /// one module sends its bytes once per host, not once per agent.
    LaunchHash {
        /// The module's hash.
        module: ModuleHash,
        /// Sites to visit.
        itinerary: Vec<String>,
        /// `--arg` values.
        args: BTreeMap<String, String>,
    },
    /// User → home host: one agent's record. Answered with [`StatusReply`].
    Status {
        /// The agent.
        agent: AgentId,
    },
    /// User → home host: the user's agents. Answered with [`ListReply`].
    List,
    /// User → home host, or home host → current host: stop an agent. Answered with
    /// [`Reply<()>`].
    Kill {
        /// The agent.
        agent: AgentId,
    },
    /// Host → host: phase 1 of a hop. Answered with [`OfferReply`].
    Hop(Offer),
    /// Host → host: what became of a transfer whose answer was lost. Answered with
    /// [`Reply<TransferStatus>`].
    Query {
        /// The agent.
        agent: AgentId,
        /// The hop sequence number of the transfer.
        seq: u64,
    },
    /// Host → home host: something happened to one of its agents. Answered with `()`.
    Report {
        /// The agent.
        agent: AgentId,
        /// What happened.
        event: LaunchEvent,
    },
    /// User → host: send `bytes` of incompressible data to peer `to` the way an image
    /// travels, and say how long it took (µs). Answered with [`Reply<u64>`]. The
    /// baseline a hop's transfer is measured against.
    Probe {
        /// The peer.
        to: String,
        /// How many bytes.
        bytes: u64,
    },
    /// Host → host: a probe's data follows as a blob; read and drop it. Answered with
    /// [`Reply<u64>`] (the bytes received).
    Sink,
    /// User → home host, or the host of a sending agent → the receiver's home host: a
    /// message for an agent launched there. Answered with [`Reply<()>`] once the home holds
    /// it (or held it already: it was sent again).
    Post(Post),
    /// Host → home host: the messages of `agent` numbered after `after`, waiting up to
    /// `wait_ms` for one if there is none; a stored state of the agent took those up to
    /// `taken`, which the home may drop. Answered with
    /// [`Reply<Fetched>`](crate::net::host::Fetched).
    Fetch {
        /// The agent.
        agent: AgentId,
        /// The last message it took or holds.
        after: u64,
        /// The last message a stored state of it took.
        taken: u64,
        /// How long to wait for one, in milliseconds.
        wait_ms: u64,
    },
    /// Host → home host: `agent` is parked on the asking host waiting for a message after
    /// `after`, and its stored state took those up to there: send [`Request::Wake`] when
    /// one comes. Answered with [`Reply<bool>`]: `true` when one is there already (wake it
    /// now).
    Await {
        /// The agent.
        agent: AgentId,
        /// The last message it took or holds.
        after: u64,
    },
    /// Home host → host: a message came for `agent`, which waits parked here. Answered with
    /// [`Reply<()>`].
    Wake {
        /// The agent.
        agent: AgentId,
    },
    /// Host → home host: `parent`, on the asking host, is about to create `children`: record
    /// them (again, if the clone is made again after a crash). Answered with [`Reply<()>`]
    /// once the home's records of them are durable.
    Children {
        /// The parent.
        parent: AgentId,
        /// The clone's number among the parent's: the children's ids derive from it.
        round: u64,
        /// What the parent clones into.
        children: Vec<ChildStart>,
    },
    /// Host → host: one message of the membership protocol (`crate::cluster`), from the
    /// host the connection's certificate names. Answered with [`Reply<()>`].
    Gossip {
        /// The message.
        data: serde_bytes::ByteBuf,
    },
    /// User or host → host: the hosts it knows, itself first. Answered with
    /// `Vec<`[`HostView`](crate::cluster::HostView)`>`.
    Hosts,
    /// The host itself (its own certificate: `agent-host drain`) → host: move every agent
    /// away and stop once none is left. Answered with [`Reply<DrainStatus>`]; asked again,
    /// it says what is left.
    Drain,
}

/// What a draining host has left.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainStatus {
    /// Agents running (or arriving).
    pub running: u64,
    /// Agents parked.
    pub parked: u64,
    /// Agents whose departure's outcome is still being asked (after a restart).
    pub settling: u64,
}

impl DrainStatus {
    /// Whether nothing is left.
    pub fn is_empty(&self) -> bool {
        self.running == 0 && self.parked == 0 && self.settling == 0
    }
}

/// Who of a launched agent's family still runs, as its launcher hears of them: a launch is
/// followed until the agent and every descendant it made ended.
#[derive(Debug, Default)]
pub struct Family {
    ended: bool,
    running: std::collections::BTreeSet<AgentId>,
    gone: std::collections::BTreeSet<AgentId>,
}

impl Family {
    /// Notes `event`; whether the agent and all its descendants ended.
    pub fn note(&mut self, event: &LaunchEvent) -> bool {
        match event {
            LaunchEvent::Finished { .. } | LaunchEvent::Refused(_) => self.ended = true,
            LaunchEvent::Cloning { children, .. } => self.started(children),
            LaunchEvent::Child { agent, event } => match &**event {
                LaunchEvent::Finished { .. } => {
                    self.running.remove(agent);
                    self.gone.insert(*agent);
                }
                LaunchEvent::Cloning { children, .. } => self.started(children),
                _ => {}
            },
            _ => {}
        }
        self.ended && self.running.is_empty()
    }

    /// A clone heard again (made again after a crash) does not bring back a child that ended.
    fn started(&mut self, children: &[ChildStart]) {
        let new = children.iter().map(|c| c.agent);
        self.running.extend(new.filter(|c| !self.gone.contains(c)));
    }
}

/// One child a clone creates.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChildStart {
    /// The child's id.
    pub agent: AgentId,
    /// Its place in the sites its parent asked for.
    pub index: u32,
    /// The site it starts on.
    pub site: String,
}

/// A message for an agent, to its home host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Post {
    /// The receiver.
    pub to: AgentId,
    /// The sender.
    pub from: PostFrom,
    /// The sender's number of this message to `to`: 1, 2, 3, ...
    pub seq: u64,
    /// The CBOR-encoded message.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

/// Who sends a [`Post`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PostFrom {
    /// An agent, vouched for by the host it runs on (hosts only).
    Agent {
        /// The agent.
        id: AgentId,
        /// Its owner.
        owner: String,
    },
    /// The asking user, in one run of `agent send` (users only).
    User {
        /// The run's random number.
        session: u64,
    },
}

/// Phase 1 of a hop: what the destination needs to decide before any state moves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    /// The agent.
    pub agent: AgentId,
    /// Hop sequence number the agent will have on the destination.
    pub seq: u64,
    /// Its module.
    pub module: ModuleHash,
    /// Module size in bytes.
    pub module_bytes: u64,
    /// Its memory size.
    pub memory_bytes: u64,
    /// Image size in bytes.
    pub image_bytes: u64,
    /// The source host's agent ABI version (a destination runs only agents of its own).
    pub abi: u32,
    /// Who owns it.
    pub owner: String,
    /// Where it was launched.
    pub home: String,
    /// The image follows the offer at once, before the answer (then the module, if asked
    /// for): the source does so for images too small to be worth a page list, to a host it
    /// knows holds the module, so the hop does not wait a round trip.
    #[serde(default)]
    pub image_follows: bool,
}

/// The destination's answer to an [`Offer`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OfferReply {
    /// Send the module (if `need_module`) and then the image.
    Accept {
        /// The destination lacks the module.
        need_module: bool,
        /// The pages the destination holds of the agent from an earlier stay: the image may
        /// leave out those that did not change.
        #[serde(default)]
        base: Option<BaseList>,
    },
    /// No: the agent stays on the source.
    Refuse(String),
    /// This exact transfer (agent, seq) was already committed here.
    AlreadyCommitted,
}

/// The source's last word of phase 2, after the image: its departure record is durable, so
/// the destination may commit. The image travels while that record is being written; a
/// destination that never hears this never commits, so a source that crashed before its
/// record was durable (and will resume the agent itself) cannot meet the agent elsewhere.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Departed {
    /// The hop sequence number of the transfer.
    pub seq: u64,
    /// What the source sent, when the destination is the agent's home: the home records the
    /// hop itself once it committed it, so the source sends it no report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home: Option<SentHome>,
}

/// What a source tells the agent's home about a hop into it ([`Departed::home`]): the part of
/// [`HopInfo`] only the source knows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentHome {
    /// CPU architecture of the source.
    pub from_arch: String,
    /// Image bytes sent.
    pub image_bytes: u64,
    /// Module bytes sent.
    pub module_bytes: u64,
    /// Pages the image left out because the home held them.
    pub pages_reused: u64,
    /// When the source suspended the agent, in µs since the Unix epoch by its clock.
    pub frozen_at_us: u64,
    /// Microseconds from the suspension until the source sent the offer.
    pub offered_us: u64,
}

/// Phase 3: the destination's verdict after receiving the image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransferReply {
    /// The image is stored durably: the destination owns the agent now.
    Committed {
        /// Microseconds the agent had run on the destination (it resumes before the commit;
        /// its first operation waits for it).
        ran_us: u64,
        /// When it resumed there, in µs since the Unix epoch by the destination's clock.
        resumed_at_us: u64,
    },
    /// The image was refused; the source still owns the agent.
    Refused(String),
}

/// What a destination knows of a transfer, answering [`Request::Query`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransferStatus {
    /// Committed: the destination owns the agent.
    Committed,
    /// Never committed, and now it never will be: the source still owns the agent.
    Aborted,
    /// The destination is still receiving or validating it: ask again.
    InProgress,
}

/// One hop as reported to the launcher. The default (all 0) is a hop nothing is known of
/// yet: a host recording one after a restart fills in what it still knows.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HopInfo {
    /// Hop sequence number after the hop.
    pub seq: u64,
    /// Source site.
    pub from: String,
    /// CPU architecture of the source (empty when not known: recorded after a restart).
    pub from_arch: String,
    /// Destination site.
    pub to: String,
    /// Image bytes sent.
    pub image_bytes: u64,
    /// The agent's linear memory size.
    #[serde(default)]
    pub memory_bytes: u64,
    /// Module bytes sent (0 when the destination had it).
    pub module_bytes: u64,
    /// Bytes of the list of pages the destination held from an earlier stay of the agent,
    /// sent with its acceptance (0 when it held none).
    #[serde(default)]
    pub base_list_bytes: u64,
    /// Pages the image left out because the destination held them.
    #[serde(default)]
    pub pages_reused: u64,
    /// Microseconds the agent did not run: from its suspension on the source until the
    /// destination resumed it. Measured on the source as `committed_us` less the time the
    /// destination says the agent had run when it sent COMMITTED, so the one-way delay of that
    /// answer counts as frozen: an upper bound, with no clocks compared. A hop into the
    /// agent's home is measured there: the source's time until it sent the offer
    /// ([`SentHome::offered_us`]) plus the home's from the offer's arrival less the
    /// connection's round-trip time until it resumed the agent. 0 when not known (recorded
    /// after a restart).
    pub freeze_us: u64,
    /// Microseconds from suspension on the source until COMMITTED reached it (for a hop into
    /// the agent's home, until the home sent it, measured as `freeze_us` is).
    #[serde(default)]
    pub committed_us: u64,
    /// When the source suspended the agent, in µs since the Unix epoch by the source's clock.
    #[serde(default)]
    pub frozen_at_us: u64,
    /// When the destination resumed it, by the destination's clock (0 if unknown). Only
    /// hosts that share a clock (one machine, as in the benchmark) give an exact freeze as
    /// `resumed_at_us - frozen_at_us`.
    #[serde(default)]
    pub resumed_at_us: u64,
}

/// Progress of an agent, streamed to its launcher and reported to its home host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LaunchEvent {
    /// The home host admitted and started the agent.
    Launched {
        /// Its id.
        agent: AgentId,
        /// Its module.
        module: ModuleHash,
        /// The home site.
        site: String,
    },
    /// The launch was refused (bad module, limits).
    Refused(String),
    /// Answer to [`Request::LaunchHash`] when the host holds no module of that hash: send
    /// it as a blob. Only ever the first message of a launch stream; never stored.
    SendModule,
    /// The agent moved.
    Moved(HopInfo),
    /// A hop the agent asked for did not happen; it continues where it was.
    HopFailed {
        /// Where it is.
        site: String,
        /// Why.
        error: String,
    },
    /// The agent sleeps: parked on `site` (its image stored, its memory freed) until it is due.
    Sleeping {
        /// Where it sleeps.
        site: String,
        /// Its hop sequence number, to order this against reports of its hops.
        seq: u64,
        /// When it wakes, in milliseconds since the Unix epoch.
        until_ms: u64,
    },
    /// The agent emitted a value for its launcher (`ctx.emit`).
    Emitted {
        /// Its number among the agent's values, from 1: the home holds each once, in order.
        seq: u64,
        /// CBOR of the value.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    /// The agent ended.
    Finished {
        /// Where it ended.
        site: String,
        /// Hops it made, so the home can wait for reports of hops still on their way.
        hops: u64,
        /// How it ended.
        #[serde(deserialize_with = "crate::net::end::read_stored")]
        outcome: AgentEnd,
    },
    /// The agent, on `site`, is creating children: each is its home's agent from now on.
    Cloning {
        /// Where the parent is.
        site: String,
        /// The children.
        children: Vec<ChildStart>,
    },
    /// An event of a child (or a later descendant) of the agent, passed to its watchers.
    Child {
        /// The child.
        agent: AgentId,
        /// What happened to it.
        event: Box<LaunchEvent>,
    },
}

/// Why a host refused a request, carried over the wire: callers match on the kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    /// The home host has no agent of that id launched by the asker.
    #[error("no agent {0} of yours here")]
    NotYours(AgentId),
    /// The agent is not running anywhere this host knows of.
    #[error("agent {0} is not running")]
    NotRunning(AgentId),
    /// A request only hosts may make.
    #[error("only hosts {0}")]
    OnlyHosts(String),
    /// A request only users may make.
    #[error("only users {0}")]
    OnlyUsers(String),
    /// Only the host itself may ask for this.
    #[error("only host {0} itself (its own certificate) may drain it")]
    NotOperator(String),
    /// A membership message that is malformed, too large, or not from its sender.
    #[error("bad membership message: {0}")]
    BadGossip(String),
    /// A site this host has no address for.
    #[error("unknown site `{0}`")]
    UnknownSite(String),
    /// A probe larger than the largest image.
    #[error("a probe may send at most {max} bytes (the largest image)")]
    ProbeTooLarge {
        /// The largest image, in bytes.
        max: u64,
    },
    /// Another probe is running on the host.
    #[error("another probe is running on {0}; try again once it ended")]
    Probing(String),
    /// A peer received less of a probe than was sent.
    #[error("{site} received {received} of {sent} bytes")]
    Short {
        /// The peer.
        site: String,
        /// Bytes it received.
        received: u64,
        /// Bytes sent.
        sent: u64,
    },
    /// A peer the request needed could not be asked, or its stream broke.
    #[error("{0}")]
    Unreachable(String),
    /// The host's store failed.
    #[error("{0}")]
    Store(String),
    /// No host knows an agent of that id.
    #[error("no such agent: {0}")]
    NoSuchAgent(AgentId),
    /// The agent ended: it takes no more messages.
    #[error("agent ended: {0}")]
    Ended(AgentId),
    /// The agent's mailbox holds as many messages as its home allows.
    #[error("the mailbox of agent {agent} is full ({limit} messages); try again once it took some")]
    MailboxFull {
        /// The agent.
        agent: AgentId,
        /// Messages a mailbox holds at most.
        limit: u64,
    },
    /// The mailboxes of a user's agents launched on this host hold as many bytes as a
    /// user's may.
    #[error(
        "the mailboxes of {user}'s agents on this host hold {limit} bytes of messages, the most a user's may (user_mail_mib); try again once they took some"
    )]
    UserMailFull {
        /// The agents' owner.
        user: String,
        /// The bytes they may hold.
        limit: u64,
    },
    /// A message larger than a home takes.
    #[error("a message may be at most {limit} bytes")]
    MailTooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// A sender skipped numbers.
    #[error("message out of order: the next one from this sender is number {expected}")]
    OutOfOrder {
        /// The number expected.
        expected: u64,
    },
    /// A user's live agents launched from this home are as many as it allows.
    #[error(
        "{user} has {limit} live agents launched from this host, the most a user may (user_live_agents)"
    )]
    TooManyAgents {
        /// The user.
        user: String,
        /// Live agents a user may have.
        limit: u64,
    },
}

/// A host's answer to a request that may be refused.
pub type Reply<T> = Result<T, Refusal>;

/// An agent's record on its home host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReply {
    /// The agent.
    pub agent: AgentId,
    /// Its owner.
    pub owner: String,
    /// Where it was last seen.
    pub site: String,
    /// Where it is in its life.
    pub state: AgentState,
    /// Hops so far.
    pub hops: Vec<HopInfo>,
    /// The result as JSON text, once it finished.
    pub result: Option<String>,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// Values it emitted so far.
    #[serde(default)]
    pub emits: u64,
    /// The last time it was parked asleep, unless it moved or ended since. Still `running`: it
    /// may have woken since (compare `until_ms` with the clock).
    #[serde(default)]
    pub sleeping: Option<Asleep>,
    /// The site it is parked on waiting for a message, if it is. Known from its mailbox, not
    /// stored with the status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_on: Option<String>,
    /// The agent it was cloned from, if it is a child.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<AgentId>,
    /// The children it cloned, in the order made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<AgentId>,
}

impl StatusReply {
    /// The record of a new agent of `owner` that runs on `site`.
    pub fn new(agent: AgentId, owner: &str, site: &str) -> StatusReply {
        StatusReply {
            agent,
            owner: owner.to_string(),
            site: site.to_string(),
            state: AgentState::Running,
            hops: Vec::new(),
            result: None,
            error: None,
            emits: 0,
            sleeping: None,
            waiting_on: None,
            parent: None,
            children: Vec::new(),
        }
    }
}

/// The user's agents on their home host: as many as fit in one message, running ones first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListReply {
    /// Their records, running agents first, each group by id.
    pub agents: Vec<StatusReply>,
    /// How many agents the user has there in all.
    pub total: u64,
}

/// Milliseconds since the Unix epoch (0 if the clock is before it): the clock of sleeps.
pub fn unix_ms() -> u64 {
    unix_us() / 1000
}

/// Microseconds since the Unix epoch, by this host's clock.
pub fn unix_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A sleep of an agent, as its home host last heard of it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Asleep {
    /// Where it sleeps.
    pub site: String,
    /// Its hop sequence number when it went to sleep.
    pub seq: u64,
    /// When it wakes, in milliseconds since the Unix epoch.
    pub until_ms: u64,
}
