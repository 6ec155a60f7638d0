//! Write mobile agents in Rust: one `async fn` that hops between hosts and resumes where it
//! stopped.
//!
//! An agent is an ordinary `async fn` taking a [`Context`]. Every `.await` on a host operation
//! ([`Context::hop`], [`Context::call`], [`Context::checkpoint`], [`Context::sleep`]) is a
//! *safe point*: the host may snapshot the agent's memory there, ship it to another host (of
//! any CPU architecture) and resume it on the line after the `.await`. Everything the agent keeps in local variables,
//! on its heap or in statics travels with it; nothing host-side does (open files, clocks).
//!
//! ```no_run
//! use agent_sdk::{Context, services::{CorpusQuery, CorpusReply, CORPUS}};
//!
//! async fn run(ctx: Context) -> Result<Vec<String>, String> {
//!     let mut found = Vec::new();
//!     for site in ctx.itinerary() {
//!         if let Err(e) = ctx.hop(&site).await {
//!             ctx.log(format!("skipping {site}: {e}"));
//!             continue;
//!         }
//!         let query = CorpusQuery { query: ctx.arg("query").unwrap_or_default(), limit: 10 };
//!         let reply: CorpusReply = ctx.call(CORPUS, &query).await.map_err(|e| e.to_string())?;
//!         found.extend(reply.hits.into_iter().map(|h| format!("{site}: {}", h.text)));
//!     }
//!     Ok(found)
//! }
//!
//! agent_sdk::agent!(run);
//! ```
//!
//! Build it as a `cdylib` for `wasm32-wasip1` (`agent build CRATE_DIR` does that) and run it
//! with `agent run AGENT.wasm --sites siteA,siteB`.
//!
//! # Rules for agents
//! - Await one host operation at a time (no `join!` of two host operations).
//! - Get host facts from the [`Context`], never from WASI environment variables: those are
//!   captured once and travel unchanged.
//! - Do not compare monotonic clock readings across hops; each host has its own clock.

#![warn(missing_docs)]

mod op;
mod sys;
#[doc(hidden)]
pub mod task;

pub use agent_abi::services;
pub use agent_abi::{
    CallError, CloneError, Cloned, EmitError, HopError, Pick, Place, SendError, Sender,
};
pub use op::{
    AllowMoves, BodyError, Call, Checkpoint, CloneTo, Emit, Hop, Message, Recv, SendTo, Sleep,
};

use agent_abi::{AgentInfo, Op};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;

/// What [`Context::gather`] collected.
#[derive(Debug)]
pub struct Gathered<T> {
    /// Each child that answered, in the order they did, with its first message decoded.
    pub answers: Vec<(String, Result<T, BodyError>)>,
    /// The children that sent nothing in time.
    pub missing: Vec<String>,
    /// Every other message taken meanwhile.
    pub others: Vec<Message>,
}

/// Exports the entry points that let a host run `$agent` as a mobile agent.
///
/// `$agent` is an `async fn(Context) -> Result<T, E>` where `T: Serialize` (delivered to the
/// launcher as the agent's result) and `E: Display` (reported as the agent's failure).
///
/// ```no_run
/// async fn run(ctx: agent_sdk::Context) -> Result<String, String> {
///     Ok(format!("hello from {}", ctx.site()))
/// }
/// agent_sdk::agent!(run);
/// ```
#[macro_export]
macro_rules! agent {
    ($agent:path) => {
        #[unsafe(no_mangle)]
        pub extern "C" fn agent_start() {
            $crate::task::start($agent)
        }

        #[unsafe(no_mangle)]
        pub extern "C" fn agent_poll() -> i32 {
            $crate::task::poll()
        }

        #[unsafe(no_mangle)]
        pub extern "C" fn agent_checkpoint_flag() -> i32 {
            $crate::task::checkpoint_flag_address()
        }
    };
}

/// The agent's handle on the runtime: where it is, what it was asked, and the host operations.
///
/// A `Context` holds no state of its own; every query asks the host the agent runs on *now*,
/// so after a hop [`Context::site`] names the new host.
#[derive(Clone, Copy, Debug)]
pub struct Context {
    _private: (),
}

impl Context {
    pub(crate) fn new() -> Self {
        Context { _private: () }
    }

    fn info(&self) -> AgentInfo {
        let bytes = sys::context();
        ciborium::from_reader(bytes.as_slice())
            .unwrap_or_else(|e| panic!("agent-sdk: host sent an unreadable context: {e}"))
    }

    /// The site (host) the agent runs on now.
    ///
    /// ```no_run
    /// # async fn f(ctx: agent_sdk::Context) {
    /// ctx.log(format!("running on {}", ctx.site()));
    /// # }
    /// ```
    pub fn site(&self) -> String {
        self.info().site
    }

    /// The site where the agent was launched; its result is delivered there.
    pub fn home(&self) -> String {
        self.info().home
    }

    /// The agent's id, unique across hosts (hex).
    pub fn agent_id(&self) -> String {
        self.info().agent_id
    }

    /// Number of hops completed so far.
    pub fn hops(&self) -> u64 {
        self.info().hops
    }

    /// The sites the launcher asked the agent to visit, in order (`--hop a,b` or `--sites a,b`).
    ///
    /// ```no_run
    /// # async fn f(ctx: agent_sdk::Context) {
    /// for site in ctx.itinerary() {
    ///     let _ = ctx.hop(&site).await;
    /// }
    /// # }
    /// ```
    pub fn itinerary(&self) -> Vec<String> {
        self.info().itinerary
    }

    /// All launch arguments (`--arg key=value`).
    pub fn args(&self) -> BTreeMap<String, String> {
        self.info().args
    }

    /// One launch argument.
    ///
    /// ```no_run
    /// # fn f(ctx: agent_sdk::Context) {
    /// let rounds: u32 = ctx.arg("rounds").and_then(|r| r.parse().ok()).unwrap_or(3);
    /// # }
    /// ```
    pub fn arg(&self, key: &str) -> Option<String> {
        self.info().args.remove(key)
    }

    /// Moves the agent to a site, named (`"siteB"`) or chosen by the host ([`Place`]: any
    /// other host that is up, or a lightly loaded one, of an architecture or offering a
    /// service); the future completes on the destination, where [`Context::site`] names it.
    ///
    /// # Errors
    /// A [`HopError`] when the hop did not happen (unknown site, no host fits the place,
    /// refused, unreachable); the agent then still runs where it was and may try elsewhere.
    ///
    /// ```no_run
    /// # async fn f(ctx: agent_sdk::Context) {
    /// use agent_sdk::Place;
    /// match ctx.hop("siteB").await {
    ///     Ok(()) => assert_eq!(ctx.site(), "siteB"),
    ///     Err(e) => ctx.log(format!("staying on {}: {e}", ctx.site())),
    /// }
    /// let _ = ctx.hop(Place::least_loaded().arch("aarch64")).await;
    /// # }
    /// ```
    pub fn hop(&self, to: impl Into<String>) -> Hop {
        Hop::new(Op::Hop { site: to.into() })
    }

    /// Calls a service of the current host with a request and decodes its response.
    ///
    /// # Errors
    /// A [`CallError`] when the host lacks the service, the request or response exceeds the
    /// host's limit, or the service fails.
    ///
    /// ```no_run
    /// use agent_sdk::services::{HostInfo, HOST_INFO};
    /// # async fn f(ctx: agent_sdk::Context) -> Result<(), agent_sdk::CallError> {
    /// let info: HostInfo = ctx.call(HOST_INFO, &()).await?;
    /// ctx.log(format!("{} runs on {}", info.site, info.arch));
    /// # Ok(()) }
    /// ```
    pub fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        service: &str,
        request: &Req,
    ) -> Call<Resp> {
        let mut bytes = Vec::new();
        let encoded = ciborium::into_writer(request, &mut bytes);
        Call::new(service, bytes, encoded.err().map(|e| e.to_string()))
    }

    /// A safe point where the host may stop the agent (to move or park it).
    ///
    /// Costs one load from the agent's own memory when the host has not asked (it is inlined
    /// into the caller); CPU-bound agents should call it in their loops so hosts can balance
    /// load or drain without waiting for them.
    ///
    /// ```no_run
    /// # async fn f(ctx: agent_sdk::Context) {
    /// let mut sum = 0u64;
    /// for i in 0..1_000_000u64 {
    ///     sum = sum.wrapping_add(i * i);
    ///     if i % 10_000 == 0 {
    ///         ctx.checkpoint().await;
    ///     }
    /// }
    /// # }
    /// ```
    #[inline]
    pub fn checkpoint(&self) -> Checkpoint {
        Checkpoint::new(sys::checkpoint_requested())
    }

    /// Allows the host to move the agent, at its checkpoints ([`Context::checkpoint`]), to a
    /// less loaded host when its own is busy (`false` forbids it again). The agent then goes
    /// on where it was moved, as after a hop: [`Context::site`] says where. Meant for work
    /// that can run anywhere, such as a long computation that checkpoints now and then.
    ///
    /// ```no_run
    /// # async fn f(ctx: agent_sdk::Context) {
    /// ctx.allow_moves(true).await;
    /// for chunk in 0..1000 {
    ///     // ... compute ...
    ///     ctx.checkpoint().await; // where the host may move it
    /// }
    /// # }
    /// ```
    pub fn allow_moves(&self, allow: bool) -> AllowMoves {
        AllowMoves::new(allow)
    }

    /// Waits at least `duration` (rounded up to whole milliseconds). Nothing of the agent runs
    /// meanwhile, so a host parks an agent that sleeps long: it stores the agent's image and
    /// frees its memory until it is due, across restarts of the host.
    ///
    /// ```no_run
    /// # async fn f(ctx: agent_sdk::Context) {
    /// use std::time::Duration;
    /// for _ in 0..3 {
    ///     ctx.log("polling the site");
    ///     ctx.sleep(Duration::from_secs(60)).await;
    /// }
    /// # }
    /// ```
    pub fn sleep(&self, duration: std::time::Duration) -> Sleep {
        let ms = duration.as_nanos().div_ceil(1_000_000);
        Sleep::new(u64::try_from(ms).unwrap_or(u64::MAX))
    }

    /// Tells whoever launched the agent `value`, as it goes: `agent launch` prints it, and
    /// its launcher hears the agent's values in the order emitted, each once, wherever the
    /// agent is when it emits them. A safe point: it completes once the agent's home holds
    /// the value.
    ///
    /// # Errors
    /// An [`EmitError`] when the value cannot be encoded or is larger than
    /// [`agent_abi::MAX_EMIT`].
    ///
    /// ```no_run
    /// # async fn f(ctx: agent_sdk::Context) -> Result<(), agent_sdk::EmitError> {
    /// ctx.emit(&format!("searching {}", ctx.site())).await?;
    /// # Ok(()) }
    /// ```
    pub fn emit<T: Serialize>(&self, value: &T) -> Emit {
        let mut bytes = Vec::new();
        let encoded = ciborium::into_writer(value, &mut bytes);
        Emit::new(bytes, encoded.err().map(|e| e.to_string()))
    }

    /// Sends `message` to agent `to` (its id, 32 hex digits, as [`Context::agent_id`] gives
    /// it): the receiver takes it with [`Context::recv`], once, in order with this agent's
    /// other messages to it, wherever either of them goes. Only agents of the same owner may
    /// message each other. A safe point: it completes once the receiver's home holds the
    /// message.
    ///
    /// # Errors
    /// A [`SendError`] that says why nothing was sent: an unknown or ended receiver, one of
    /// another owner, a full mailbox, a message larger than [`agent_abi::MAX_MAIL`].
    ///
    /// ```no_run
    /// # async fn f(ctx: agent_sdk::Context) -> Result<(), agent_sdk::SendError> {
    /// let coordinator = ctx.arg("coordinator").unwrap_or_default();
    /// ctx.send(&coordinator, &("found", ctx.site())).await?;
    /// # Ok(()) }
    /// ```
    pub fn send<T: Serialize>(&self, to: &str, message: &T) -> SendTo {
        let mut bytes = Vec::new();
        let encoded = ciborium::into_writer(message, &mut bytes);
        SendTo::new(to, bytes, encoded.err().map(|e| e.to_string()))
    }

    /// Takes the next message from this agent's mailbox, waiting as long as it takes for one.
    /// A safe point: a host parks an agent that waits long (stores it and frees its memory)
    /// and wakes it when a message comes, across restarts of the host.
    ///
    /// ```no_run
    /// # async fn f(ctx: agent_sdk::Context) {
    /// let message = ctx.recv().await;
    /// let text: Option<String> = message.body().ok();
    /// # }
    /// ```
    pub fn recv(&self) -> impl Future<Output = Message> {
        let recv = Recv::new(None);
        async move {
            match recv.await {
                Some(message) => message,
                None => panic!("agent-sdk: the host ended a wait without a timeout"),
            }
        }
    }

    /// Like [`Context::recv`], but waits at most `timeout`: `None` if no message came.
    pub fn recv_timeout(&self, timeout: std::time::Duration) -> Recv {
        let ms = timeout.as_nanos().div_ceil(1_000_000);
        Recv::new(Some(u64::try_from(ms).unwrap_or(u64::MAX)))
    }

    /// Forks the agent: one child starts on each of `sites`, a copy of this agent as it is
    /// at this `.await` (memory, stack, arguments), with an id and a mailbox of its own. The
    /// same future completes in the parent, with each child's id or why none was created
    /// there ([`Cloned::Parent`], in the order of `sites`), and in each child, with its index
    /// and site ([`Cloned::Child`]). Each child is created once, even when a host crashes
    /// while they are made. Children report with [`Context::send`];
    /// [`Context::gather`] collects one message from each.
    ///
    /// ```no_run
    /// # async fn f(ctx: agent_sdk::Context) -> Result<(), String> {
    /// use agent_sdk::Cloned;
    /// use std::time::Duration;
    /// match ctx.clone_to(&ctx.itinerary()).await {
    ///     Cloned::Child { parent, site, .. } => {
    ///         ctx.send(&parent, &format!("hello from {site}")).await.map_err(|e| e.to_string())?;
    ///     }
    ///     Cloned::Parent(children) => {
    ///         let ids: Vec<String> = children.into_iter().filter_map(Result::ok).collect();
    ///         let heard = ctx.gather::<String>(&ids, Duration::from_secs(60)).await;
    ///         ctx.log(format!("{} children answered", heard.answers.len()));
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn clone_to<S: AsRef<str>>(&self, sites: &[S]) -> CloneTo {
        CloneTo::new(sites.iter().map(|s| s.as_ref().to_string()).collect())
    }

    /// Takes messages until each of `children` (agent ids, as [`Context::clone_to`] gave
    /// them) sent one, or until no message came for `patience`. Each child's first message
    /// is decoded as a `T`; messages from anyone else, and later ones from the children,
    /// are kept in [`Gathered::others`], in the order taken.
    pub async fn gather<T: DeserializeOwned>(
        &self,
        children: &[String],
        patience: std::time::Duration,
    ) -> Gathered<T> {
        let mut gathered = Gathered {
            answers: Vec::new(),
            missing: children.to_vec(),
            others: Vec::new(),
        };
        while !gathered.missing.is_empty() {
            let Some(message) = self.recv_timeout(patience).await else {
                break;
            };
            let child = (message.from_agent())
                .and_then(|from| gathered.missing.iter().position(|c| c == from));
            match child {
                Some(at) => {
                    let id = gathered.missing.remove(at);
                    gathered.answers.push((id, message.body()));
                }
                None => gathered.others.push(message),
            }
        }
        gathered
    }

    /// Writes a line to the host's log for this agent.
    pub fn log(&self, line: impl AsRef<str>) {
        sys::log(agent_abi::level::INFO, line.as_ref());
    }

    /// Writes a warning line to the host's log for this agent.
    pub fn warn(&self, line: impl AsRef<str>) {
        sys::log(agent_abi::level::WARN, line.as_ref());
    }
}
