//! The host ABI between an agent (built with `agent-sdk`) and a host (`agent-runtime`).
//!
//! Both sides depend on this crate, so import names, operation codes and message types are
//! defined once and cannot drift. Everything that crosses the sandbox boundary is either a
//! plain integer or CBOR bytes of the types below.
//!
//! # The calling convention
//! The module exports [`export::START`] (create the agent's task) and [`export::POLL`] (poll it
//! once). `agent_poll` returns [`POLL_PENDING`] after the agent submitted exactly one suspending
//! [`Op`] through [`import::SUBMIT`], or [`POLL_DONE`] after it reported its [`Outcome`] through
//! [`import::FINISH`]. When `agent_poll` returns, the Wasm stack is empty: that is the safe point
//! where a host may snapshot the agent. The host then completes the operation and polls again;
//! the SDK reads the [`OpResult`] through [`import::TAKE`].
//!
//! Calls that return bytes take `(ptr, cap)` and return the full length: when that is larger
//! than `cap` nothing was written and the caller retries with a larger buffer. Negative returns
//! are the error codes in [`code`].

#![warn(missing_docs)]

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Version of this ABI. A host refuses modules built for a version outside
/// [`MIN_ABI_VERSION`]`..=ABI_VERSION`.
///
/// Version 2 added [`export::CHECKPOINT_FLAG`]: the agent reads a word of its own memory at each
/// `checkpoint()` and calls the host only when the host has set it. Version 3 added
/// [`Op::Sleep`], version 4 [`Op::Emit`], version 5 [`Op::Send`] and [`Op::Recv`], version 6
/// [`Op::Clone`].
pub const ABI_VERSION: u32 = 7;

/// Oldest ABI version a host still runs (version 1 agents ask the host at every checkpoint).
pub const MIN_ABI_VERSION: u32 = 1;

/// Name of the custom section in which the SDK records [`ABI_VERSION`] (4 bytes, little-endian).
pub const ABI_SECTION: &str = "agent-abi";

/// Wasm import module under which the host offers the functions of [`import`].
pub const IMPORT_MODULE: &str = "agent_v1";

/// Names of the host functions an agent may import from [`IMPORT_MODULE`].
pub mod import {
    /// `context(ptr: i32, cap: i32) -> i32`: CBOR [`AgentInfo`](crate::AgentInfo).
    pub const CONTEXT: &str = "context";
    /// `submit(ptr: i32, len: i32) -> i32`: submit one CBOR [`Op`](crate::Op); 0 or an error code.
    pub const SUBMIT: &str = "submit";
    /// `take(ptr: i32, cap: i32) -> i32`: CBOR [`OpResult`](crate::OpResult) of the completed op.
    pub const TAKE: &str = "take";
    /// `checkpoint_requested() -> i32`: 1 when the host wants the agent to stop at a safe point.
    pub const CHECKPOINT_REQUESTED: &str = "checkpoint_requested";
    /// `log(level: i32, ptr: i32, len: i32)`: one UTF-8 log line.
    pub const LOG: &str = "log";
    /// `finish(ptr: i32, len: i32) -> i32`: the agent's CBOR [`Outcome`](crate::Outcome).
    pub const FINISH: &str = "finish";
    /// Every import name, for hosts that check a module's imports.
    pub const ALL: [&str; 6] = [CONTEXT, SUBMIT, TAKE, CHECKPOINT_REQUESTED, LOG, FINISH];
}

/// Names of the functions an agent module exports.
pub mod export {
    /// `agent_start()`: create the agent's task (never run again after a restore).
    pub const START: &str = "agent_start";
    /// `agent_poll() -> i32`: poll the task once; [`POLL_PENDING`](crate::POLL_PENDING) or
    /// [`POLL_DONE`](crate::POLL_DONE).
    pub const POLL: &str = "agent_poll";
    /// The agent's linear memory.
    pub const MEMORY: &str = "memory";
    /// `agent_checkpoint_flag() -> i32` (ABI 2): the address of a 4-byte little-endian word in
    /// linear memory that the host sets to 1 when it wants the agent to stop at its next
    /// checkpoint and back to 0 when it resumes it. A pure function: the host may call it
    /// before `agent_start`.
    pub const CHECKPOINT_FLAG: &str = "agent_checkpoint_flag";
}

/// `agent_poll` result: the agent submitted an operation and waits for its result.
pub const POLL_PENDING: i32 = 0;
/// `agent_poll` result: the agent finished and reported its outcome.
pub const POLL_DONE: i32 = 1;

/// Negative return codes of the imports.
pub mod code {
    /// The call succeeded.
    pub const OK: i32 = 0;
    /// A pointer/length pair lies outside the agent's memory.
    pub const BAD_POINTER: i32 = -1;
    /// The bytes could not be decoded as the expected CBOR message.
    pub const BAD_MESSAGE: i32 = -2;
    /// The message is larger than [`MAX_MESSAGE`](crate::MAX_MESSAGE).
    pub const TOO_LARGE: i32 = -3;
    /// An operation is already pending: an agent awaits one host operation at a time.
    pub const BUSY: i32 = -4;
    /// No completed operation result is waiting to be taken.
    pub const NO_RESULT: i32 = -5;
}

/// Largest message (operation, result, outcome) that crosses the sandbox, in bytes.
pub const MAX_MESSAGE: usize = 4 << 20;
/// Largest log line kept; longer lines are cut.
pub const MAX_LOG_LINE: usize = 16 << 10;

/// What the host tells the agent about itself and the host it runs on now.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// The agent's id (hex).
    pub agent_id: String,
    /// The site (host) the agent runs on now.
    pub site: String,
    /// The site where the agent was launched.
    pub home: String,
    /// Number of completed hops.
    pub hops: u64,
    /// The sites the launcher asked the agent to visit, in order.
    pub itinerary: Vec<String>,
    /// Arguments given at launch (`--arg k=v`).
    pub args: BTreeMap<String, String>,
}

/// A suspending host operation. The agent is at a safe point while it is pending.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Move the agent to `site` and resume it there.
    Hop {
        /// Destination site name.
        site: String,
    },
    /// Call one of the current host's services with a CBOR request.
    Call {
        /// Service name, e.g. [`services::CORPUS`].
        service: String,
        /// CBOR-encoded request.
        #[serde(with = "serde_bytes")]
        request: Vec<u8>,
    },
    /// Stop here if the host asked for it; resume at once otherwise.
    Checkpoint,
    /// Resume after at least `ms` milliseconds. A host may park a sleeping agent: store its
    /// image and free its memory until it is due.
    Sleep {
        /// How long, in milliseconds.
        ms: u64,
    },
    /// Tell whoever launched the agent a value (CBOR), in order with its other values. It
    /// completes once the agent's home holds the value.
    Emit {
        /// CBOR-encoded value.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    /// Send a message (CBOR) to agent `to`. It completes once the receiver's home holds the
    /// message: it is then delivered exactly once, in order with this agent's other messages
    /// to `to`, wherever `to` goes.
    Send {
        /// The receiver's id (32 hex digits).
        to: String,
        /// CBOR-encoded message.
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    /// Take the next message from the agent's mailbox, waiting for one if it is empty: at
    /// most `timeout_ms` milliseconds when given. A host may park a waiting agent and wake
    /// it when a message comes.
    Recv {
        /// How long to wait at most; `None`: until a message comes.
        timeout_ms: Option<u64>,
    },
    /// Fork the agent: one child on each of `sites`, each a copy of the agent as it is now
    /// (memory and stack) with an id and a mailbox of its own. The parent goes on where it
    /// is once every child was created or refused.
    Clone {
        /// Where the children start, one child per entry (a site may repeat).
        sites: Vec<String>,
    },
    /// Allow (or forbid again) the host to move the agent, at its checkpoints, to a less
    /// loaded host when its own host is busy. Completes at once.
    AllowMoves {
        /// Whether moves are allowed from now on.
        allow: bool,
    },
}

/// The result of a completed [`Op`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpResult {
    /// Result of [`Op::Hop`]: on error the agent is still where it was.
    Hop(Result<(), HopError>),
    /// Result of [`Op::Call`]: the CBOR-encoded response.
    Call(Result<serde_bytes::ByteBuf, CallError>),
    /// Result of [`Op::Checkpoint`].
    Checkpoint,
    /// Result of [`Op::Sleep`].
    Sleep,
    /// Result of [`Op::Emit`].
    Emit(Result<(), EmitError>),
    /// Result of [`Op::Send`].
    Send(Result<(), SendError>),
    /// Result of [`Op::Recv`]: the next message, or `None` when the wait timed out.
    Recv(Option<Message>),
    /// Result of [`Op::Clone`]: what the parent learns, or what each child learns.
    Clone(Cloned),
    /// Result of [`Op::AllowMoves`].
    AllowMoves,
}

/// What [`Op::Clone`] returns: the same operation completes once in the parent and once in
/// each child.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cloned {
    /// In the parent: per site asked for, in order, the child's id (32 hex digits) or why no
    /// child was created there.
    Parent(Vec<Result<String, CloneError>>),
    /// In a child.
    Child {
        /// Its place in the list of sites its parent asked for, from 0.
        index: u32,
        /// The site it started on.
        site: String,
        /// Its parent's id.
        parent: String,
    },
}

/// Why a child was not created. The parent goes on either way.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CloneError {
    /// The site could not take the child: unknown, refused, or unreachable.
    Site(HopError),
    /// The agent would have more children than its host allows one agent.
    TooManyChildren {
        /// Children an agent may have, in all.
        limit: u64,
    },
    /// The owner would have more live agents launched from the agent's home than it allows.
    OwnerFull {
        /// Live agents a user may have there.
        limit: u64,
    },
}

impl std::fmt::Display for CloneError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloneError::Site(e) => write!(f, "{e}"),
            CloneError::TooManyChildren { limit } => {
                write!(f, "an agent may have {limit} children in all on this host")
            }
            CloneError::OwnerFull { limit } => write!(
                f,
                "the owner has {limit} live agents launched from this agent's home, the most allowed"
            ),
        }
    }
}

impl std::error::Error for CloneError {}

/// A message taken from an agent's mailbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Who sent it.
    pub from: Sender,
    /// The CBOR-encoded message.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

/// Who sent a message.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Sender {
    /// An agent, by id (32 hex digits).
    Agent(String),
    /// A user (`agent send`), by the name in their certificate.
    User(String),
}

impl std::fmt::Display for Sender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sender::Agent(id) => write!(f, "agent {id}"),
            Sender::User(name) => write!(f, "user {name}"),
        }
    }
}

/// Why a message was not sent. Nothing was delivered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SendError {
    /// The message could not be encoded, or `to` is not an agent id.
    BadValue(String),
    /// The encoded message is larger than the limit.
    TooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// No host knows an agent of that id.
    NoSuchAgent(String),
    /// The agent has ended: it takes no more messages.
    Ended(String),
    /// The agent belongs to another owner.
    NotYours(String),
    /// The agent's mailbox holds as many messages as its home allows; try again later.
    Full {
        /// Messages a mailbox holds at most.
        limit: u64,
    },
    /// The mailboxes of the receiver's owner's agents at its home hold as many bytes of
    /// messages as its home allows a user's; try again later.
    OwnerFull {
        /// The bytes they may hold.
        limit: u64,
    },
    /// The receiver's home could not be reached for a while. The message may have been
    /// held: send it again, before any other to the same receiver, and it is taken once.
    Unreachable(String),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::BadValue(why) => write!(f, "cannot send: {why}"),
            SendError::TooLarge { limit } => {
                write!(f, "message exceeds the limit of {limit} bytes")
            }
            SendError::NoSuchAgent(id) => write!(f, "no such agent: {id}"),
            SendError::Ended(id) => write!(f, "agent ended: {id}"),
            SendError::NotYours(id) => {
                write!(
                    f,
                    "agent {id} belongs to another owner: only its owner's agents may message it"
                )
            }
            SendError::Full { limit } => {
                write!(
                    f,
                    "the receiver's mailbox is full ({limit} messages); try again later"
                )
            }
            SendError::OwnerFull { limit } => write!(
                f,
                "the mailboxes of the receiver's owner hold {limit} bytes of messages at its home, the most allowed; try again later"
            ),
            SendError::Unreachable(why) => write!(f, "the receiver's home is unreachable: {why}"),
        }
    }
}

impl std::error::Error for SendError {}

/// Largest message, encoded, that an agent or user may send.
pub const MAX_MAIL: usize = 64 << 10;

/// Why a value was not emitted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EmitError {
    /// The value could not be encoded.
    BadValue(String),
    /// The value is larger than [`MAX_EMIT`].
    TooLarge {
        /// The limit in bytes.
        limit: u64,
    },
}

impl std::fmt::Display for EmitError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EmitError::BadValue(why) => write!(f, "cannot encode the value: {why}"),
            EmitError::TooLarge { limit } => {
                write!(f, "value exceeds the limit of {limit} bytes")
            }
        }
    }
}

impl std::error::Error for EmitError {}

/// Largest emitted value, encoded: it travels to the agent's home and on to its launcher.
pub const MAX_EMIT: usize = 64 << 10;

/// Why a hop did not happen. The agent keeps running on the site it was on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HopError {
    /// No site of that name is known to the host.
    UnknownSite(String),
    /// The destination refused the agent.
    Refused {
        /// Destination site.
        site: String,
        /// The destination's reason.
        reason: String,
    },
    /// The destination could not be reached or the transfer failed before its commit point.
    Unreachable {
        /// Destination site.
        site: String,
        /// What failed.
        reason: String,
    },
}

impl std::fmt::Display for HopError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HopError::UnknownSite(site) => write!(f, "unknown site `{site}`"),
            HopError::Refused { site, reason } => {
                write!(f, "site `{site}` refused the agent: {reason}")
            }
            HopError::Unreachable { site, reason } => {
                write!(f, "site `{site}` unreachable: {reason}")
            }
        }
    }
}

impl std::error::Error for HopError {}

/// Why a service call failed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CallError {
    /// The current host offers no service of that name.
    UnknownService(String),
    /// The service could not decode the request.
    BadRequest(String),
    /// The request or response exceeded the host's limit.
    TooLarge {
        /// The limit in bytes.
        limit: u64,
    },
    /// The service failed.
    Failed(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::UnknownService(s) => write!(f, "this host offers no service `{s}`"),
            CallError::BadRequest(why) => write!(f, "bad request: {why}"),
            CallError::TooLarge { limit } => {
                write!(f, "message exceeds the host's limit of {limit} bytes")
            }
            CallError::Failed(why) => write!(f, "service failed: {why}"),
        }
    }
}

impl std::error::Error for CallError {}

/// How an agent ended, reported through [`import::FINISH`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The agent returned `Ok`: its CBOR-encoded value.
    Ok(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The agent returned `Err`: the error's display text.
    Err(String),
    /// The agent panicked: the panic message (the module then traps).
    Panicked(String),
}

/// Log levels for [`import::LOG`].
pub mod level {
    /// Errors.
    pub const ERROR: i32 = 1;
    /// Warnings.
    pub const WARN: i32 = 2;
    /// Information.
    pub const INFO: i32 = 3;
    /// Debugging detail.
    pub const DEBUG: i32 = 4;
}

/// Services a host may offer, called with [`Op::Call`].
pub mod services {
    use serde::{Deserialize, Serialize};

    /// Full-text search over the site's documents.
    pub const CORPUS: &str = "corpus";
    /// Facts about the host.
    pub const HOST_INFO: &str = "host-info";

    /// Request to [`CORPUS`]: lines containing every word of `query` (case-insensitive).
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct CorpusQuery {
        /// Words to look for.
        pub query: String,
        /// Most hits wanted.
        pub limit: u32,
    }

    /// One matching line of a document.
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct CorpusHit {
        /// Document path relative to the site's corpus directory.
        pub doc: String,
        /// Line number, from 1.
        pub line: u32,
        /// The line's text.
        pub text: String,
    }

    /// Response of [`CORPUS`].
    #[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct CorpusReply {
        /// Hits in document order.
        pub hits: Vec<CorpusHit>,
        /// True when more lines matched than were returned.
        pub truncated: bool,
    }

    /// Response of [`HOST_INFO`].
    #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
    pub struct HostInfo {
        /// Site name.
        pub site: String,
        /// CPU architecture of the host (`std::env::consts::ARCH`).
        pub arch: String,
        /// Operating system of the host.
        pub os: String,
        /// Runtime version.
        pub runtime: String,
        /// Number of documents in the site's corpus.
        pub documents: u64,
    }
}

/// A destination chosen by the host instead of named by the agent: `ctx.hop(Place::any())`
/// or, in an itinerary, `--hop any,least-loaded:arch=aarch64`. Travels as the site string
/// of [`Op::Hop`] (see [`Place::parse`]), so an itinerary mixes names and places.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Place {
    /// How to choose among the hosts that fit.
    pub pick: Pick,
    /// Only hosts of this CPU architecture (as Rust names it: `x86_64`, `aarch64`, `s390x`).
    pub arch: Option<String>,
    /// Only hosts that offer this service.
    pub service: Option<String>,
}

/// How a [`Place`] chooses among the hosts that fit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Pick {
    /// Any other host that is up, at random (`any`).
    #[default]
    Any,
    /// The less loaded of two hosts drawn at random, this one included (`least-loaded`): the
    /// agent stays where it is when this host wins.
    LeastLoaded,
}

impl Place {
    /// Any other host that is up.
    pub fn any() -> Place {
        Place::default()
    }

    /// A lightly loaded host, possibly this one.
    pub fn least_loaded() -> Place {
        Place {
            pick: Pick::LeastLoaded,
            ..Place::default()
        }
    }

    /// Only hosts of CPU architecture `arch`.
    pub fn arch(mut self, arch: &str) -> Place {
        self.arch = Some(arch.to_string());
        self
    }

    /// Only hosts offering `service`.
    pub fn service(mut self, service: &str) -> Place {
        self.service = Some(service.to_string());
        self
    }

    /// Reads a place: `any` or `least-loaded`, then any of `:arch=A` and `:service=S`.
    /// `None` when `s` is a site's name (names never contain `:` and never are `any` or
    /// `least-loaded`); `Some(Err)` names what is wrong with a place written badly.
    pub fn parse(s: &str) -> Option<Result<Place, String>> {
        let mut parts = s.split(':');
        let pick = match parts.next()? {
            "any" => Pick::Any,
            "least-loaded" => Pick::LeastLoaded,
            _ if s.contains(':') => {
                return Some(Err(format!(
                    "`{s}`: a place starts with `any` or `least-loaded`"
                )));
            }
            _ => return None,
        };
        let mut place = Place {
            pick,
            ..Place::default()
        };
        for part in parts {
            match part.split_once('=') {
                Some(("arch", a)) if !a.is_empty() => place.arch = Some(a.to_string()),
                Some(("service", v)) if !v.is_empty() => place.service = Some(v.to_string()),
                _ => {
                    return Some(Err(format!(
                        "`{s}`: `{part}` is not `arch=ARCH` or `service=NAME`"
                    )));
                }
            }
        }
        Some(Ok(place))
    }
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.pick {
            Pick::Any => "any",
            Pick::LeastLoaded => "least-loaded",
        })?;
        if let Some(arch) = &self.arch {
            write!(f, ":arch={arch}")?;
        }
        if let Some(service) = &self.service {
            write!(f, ":service={service}")?;
        }
        Ok(())
    }
}

impl From<Place> for String {
    fn from(place: Place) -> String {
        place.to_string()
    }
}

#[cfg(test)]
mod place_tests {
    use super::*;

    #[test]
    fn places_read_back_what_they_write_and_names_are_not_places() {
        for place in [
            Place::any(),
            Place::least_loaded().arch("aarch64"),
            Place::any().service("corpus").arch("s390x"),
        ] {
            assert_eq!(Place::parse(&place.to_string()), Some(Ok(place.clone())));
        }
        assert_eq!(Place::parse("siteB"), None);
        assert_eq!(Place::parse("anyhost"), None);
        assert!(matches!(Place::parse("any:cpu=x"), Some(Err(e)) if e.contains("cpu=x")));
        assert!(matches!(Place::parse("siteB:arch=x"), Some(Err(_))));
        assert!(matches!(Place::parse("any:arch="), Some(Err(_))));
    }
}
