//! The agent driver on a host: the host as the [`Place`] an agent runs in, with the journal
//! of service calls, storing an agent at a safe point, and the end of an agent.

use crate::AgentFlags;
use crate::backoff::Backoff;
use crate::context::AgentId;
use crate::driver::{self, CallAnswer, Flow, Place};
use crate::faults::crash_point;
use crate::image::{Compression, EncodeOptions, Encoded};
use crate::instance::{AgentError, AgentInstance};
use crate::log::LogLine;
use crate::net::host::clones::Outcomes;
use crate::net::host::{ASK_TIMEOUT, Fetched, Host, PARK_AFTER, Start, sleep_unless_killed};
use crate::net::messages::{
    AgentEnd, ChildStart, LaunchEvent, Post, PostFrom, Refusal, Reply, Request, unix_ms, unix_us,
};
use crate::net::store::{AgentRecord, CallEntry, Resume, StoreError};
use agent_abi::{CloneError, Cloned, HopError, Message, OpResult, Outcome, SendError};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Why an agent could not be stored at its safe point.
#[derive(Debug, thiserror::Error)]
pub enum KeepError {
    /// Its image could not be encoded.
    #[error(transparent)]
    Encode(#[from] std::io::Error),
    /// The store failed.
    #[error("cannot store the agent: {0}")]
    Store(#[from] StoreError),
}

/// What [`Host::keep`] stores of `agent`: its id, its image at its safe point, and how to make
/// the record that names the image.
fn kept(
    agent: &mut AgentInstance,
    resume: Resume,
) -> Result<(AgentId, Encoded, impl FnOnce(String) -> AgentRecord), std::io::Error> {
    let id = agent.context().agent_id;
    let seq = agent.context().hop_seq;
    let keep = EncodeOptions {
        compression: Compression::Keep,
        ..EncodeOptions::default()
    };
    let bytes = agent.capture().encode(keep)?;
    let record = move |image| AgentRecord::Resident { seq, image, resume };
    Ok((id, bytes, record))
}

/// The first pause before an agent's host tells its home again, and the longest.
/// After a move away failed or found no host, the agent performs its operations here this
/// long before it tries again.
const MOVE_RETRY: Duration = Duration::from_secs(1);

const TELL_FIRST: Duration = Duration::from_millis(100);
const TELL_MOST: Duration = Duration::from_secs(5);

/// How long an agent's host tries to reach a receiver's home before `send` fails.
const SEND_PATIENCE: Duration = Duration::from_secs(30);

/// How long past a `recv_timeout`'s deadline a fetch from its home may take.
const FETCH_GRACE: Duration = Duration::from_millis(100);

/// An agent is stored again once it took this part of its mailbox's room since it last was.
const KEEP_TAKEN_PART: u64 = 4;

/// One agent running on a host.
struct OnHost {
    host: Arc<Host>,
    id: AgentId,
    home: String,
    /// An arrival runs before its commit is durable, but nothing it does takes effect before:
    /// its first operation, or its end, waits for this verdict.
    uncommitted: Option<tokio::sync::oneshot::Receiver<bool>>,
    /// A move away (the host drains) failed or had nowhere to go: not again before this.
    next_move: Option<Instant>,
    /// The messages a stored state of the agent took: its home may drop them.
    taken: u64,
    /// Messages its mailbox holds at most, as its home last said.
    limit: u64,
    /// The end of the wait of a `recv` it was parked in (ms since the Unix epoch).
    waited_until: Option<u64>,
    /// It starts with a clone pending, stored before a restart: the clone is made again.
    redo_clone: bool,
}

impl OnHost {
    /// Tells the agent's home `event` and waits until the home holds it, trying again while
    /// the home cannot be reached: the agent goes on only then, so its values reach the home
    /// in order and none waits on a host the agent left. `false` if the agent was killed, or
    /// this host began to shut down, meanwhile.
    async fn tell_home(&self, event: LaunchEvent, flags: &AgentFlags) -> bool {
        let host = &self.host;
        if self.home == host.config.name {
            host.deliver(&self.id, event).await;
            return true;
        }
        let report = Request::Report {
            agent: self.id,
            event,
        };
        let mut pause = Backoff::new(TELL_FIRST, TELL_MOST);
        loop {
            let told = host.peers.ask::<()>(&self.home, &report).await;
            let Err(e) = told else { return true };
            let home = &self.home;
            tracing::warn!(agent = %self.id, %home, "cannot tell the home host: {e}");
            if !self.pause(pause.wait(), flags).await {
                return false;
            }
        }
    }

    /// Asks the agent's home for its messages after `after`, waiting for one until
    /// `deadline` (ms since the Unix epoch) at most [`PARK_AFTER`] at a time, and again while
    /// the home cannot be reached, until the deadline: then there are none. `None` if the
    /// agent was killed, or this host began to shut down, meanwhile; a refusal if its home
    /// says it ended or does not know it (no message can come).
    async fn fetch(
        &mut self,
        after: u64,
        deadline: u64,
        flags: &AgentFlags,
    ) -> Option<Result<Vec<Message>, Refusal>> {
        let host = self.host.clone();
        let mut pause = Backoff::new(TELL_FIRST, TELL_MOST);
        loop {
            let left = deadline.saturating_sub(unix_ms());
            let wait_ms = left.min(PARK_AFTER.as_millis() as u64);
            let fetched = match self.home == host.config.name {
                true => {
                    let wait = Duration::from_millis(wait_ms);
                    let fetch = host.fetch_mail(&self.id, (after, self.taken), wait);
                    tokio::select! {
                        fetched = fetch => Ok(fetched),
                        () = flags.killed.cancelled() => return None,
                    }
                }
                false => {
                    let fetch = Request::Fetch {
                        agent: self.id,
                        after,
                        taken: self.taken,
                        wait_ms,
                    };
                    // A home that does not answer (it is down, and dialling it takes seconds)
                    // does not hold the agent past its deadline.
                    let asked = host.peers.ask::<Reply<Fetched>>(&self.home, &fetch);
                    let patience = match deadline {
                        u64::MAX => ASK_TIMEOUT,
                        _ => Duration::from_millis(left) + FETCH_GRACE,
                    };
                    tokio::select! {
                        asked = tokio::time::timeout(patience, asked) => match asked {
                            Ok(asked) => asked,
                            Err(_) => return Some(Ok(Vec::new())),
                        },
                        () = flags.killed.cancelled() => return None,
                    }
                }
            };
            let e = match fetched {
                Ok(Ok(fetched)) => {
                    self.limit = fetched.limit;
                    return Some(Ok(fetched.mail));
                }
                Ok(Err(gone @ (Refusal::Ended(_) | Refusal::NoSuchAgent(_)))) => {
                    return Some(Err(gone));
                }
                Ok(Err(refusal)) => refusal.to_string(),
                Err(unreachable) => unreachable.to_string(),
            };
            let home = &self.home;
            tracing::warn!(agent = %self.id, %home, "cannot fetch messages: {e}");
            let left = deadline.saturating_sub(unix_ms());
            if left == 0 {
                return Some(Ok(Vec::new()));
            }
            let wait = pause.wait().min(Duration::from_millis(left));
            if !self.pause(wait, flags).await {
                return None;
            }
        }
    }

    /// Sends `post` to its receiver's home, and again while it cannot be reached, for at
    /// most [`SEND_PATIENCE`]. `None` if the agent was killed, or this host began to shut
    /// down, meanwhile.
    async fn post(&self, post: &Post, owner: &str, flags: &AgentFlags) -> Option<Reply<()>> {
        let host = &self.host;
        let mut pause = Backoff::new(TELL_FIRST, TELL_MOST);
        let patience = tokio::time::Instant::now() + SEND_PATIENCE;
        loop {
            let posted = host.post_to_home(post, owner, &self.home);
            let posted = tokio::select! {
                posted = posted => posted,
                () = flags.killed.cancelled() => return None,
            };
            match posted {
                Err(Refusal::Unreachable(e)) | Err(Refusal::Store(e))
                    if tokio::time::Instant::now() < patience =>
                {
                    tracing::warn!(agent = %self.id, to = %post.to, "cannot send a message yet: {e}");
                }
                other => return Some(other),
            }
            if !self.pause(pause.wait(), flags).await {
                return None;
            }
        }
    }

    /// Waits `wait` before trying again; `false` if the agent was killed, or this host began
    /// to shut down, meanwhile.
    async fn pause(&self, wait: Duration, flags: &AgentFlags) -> bool {
        tokio::select! {
            () = tokio::time::sleep(wait) => true,
            () = flags.killed.cancelled() => false,
            () = self.host.stopping.cancelled() => false,
        }
    }

    /// The agent stops at a wait that was cut short: stored with its operation pending if
    /// this host is shutting down, ended if it was killed.
    async fn cut_short(&self, agent: AgentInstance) -> Flow {
        match self.host.stopping() {
            true => self.host.park(agent).await,
            false => {
                self.end_with(agent.context().hops(), AgentEnd::Killed)
                    .await
            }
        }
        Flow::Stop
    }

    /// Sends the agent to `site` (a hop it asked for, or a move); `Stop` once it is there,
    /// else it stays here (a hop's error completes its operation).
    async fn go_to(&mut self, mut agent: AgentInstance, site: &str) -> Flow {
        match self.host.send_agent(&mut agent, site).await {
            Ok(info) => {
                crash_point("source-after-committed");
                self.host.forget_running(&self.id);
                agent.retire();
                (self.host.forwarded(self.id, self.home.clone(), info)).await;
                Flow::Stop
            }
            Err(failure) => {
                let departure = failure.departure.as_deref();
                (self.host.hop_failed(&mut agent, departure, failure.error)).await;
                Flow::Go(agent)
            }
        }
    }

    /// Moves the agent away from a draining host before its operation takes effect there;
    /// with nowhere to go, or when the move fails, it stays and tries again a while later.
    async fn leave(&mut self, agent: AgentInstance) -> Flow {
        let Some(site) = self.host.leave_to() else {
            self.next_move = Some(Instant::now() + MOVE_RETRY);
            return Flow::Go(agent);
        };
        match self.go_to(agent, &site).await {
            Flow::Stop => {
                self.host.log_drain(&self.id, &site);
                Flow::Stop
            }
            Flow::Go(agent) => {
                self.next_move = Some(Instant::now() + MOVE_RETRY);
                Flow::Go(agent)
            }
        }
    }

    async fn end_with(&self, hops: u64, end: AgentEnd) {
        let host = &self.host;
        (host.finish(self.id, self.home.clone(), hops, end)).await;
    }
}

impl Place for OnHost {
    async fn polled(&mut self) -> bool {
        if let Some(committed) = self.uncommitted.take()
            && committed.await != Ok(true)
        {
            tracing::info!(agent = %self.id, "dropped an arrival that was never committed");
            return false;
        }
        true
    }

    fn log(&mut self, _agent: &AgentInstance, lines: Vec<LogLine>, dropped: u64) {
        for line in lines {
            line.trace(&self.id);
        }
        if dropped > 0 {
            tracing::warn!(agent = %self.id, dropped, "agent log lines dropped");
        }
    }

    async fn before_op(&mut self, mut agent: AgentInstance) -> Flow {
        // An arrival moved before its operation took effect performs it only once its
        // commit is durable (one polled first waited in `polled`).
        if !self.polled().await {
            return Flow::Stop;
        }
        if self.host.stopping() {
            self.host.park(agent).await;
            return Flow::Stop;
        }
        // A kill that reached the agent between epoch ticks (one made while it woke from
        // parking, say) ends it before its operation takes effect.
        if agent.flags().kill.load(Ordering::SeqCst) {
            self.end_with(agent.context().hops(), AgentEnd::Killed)
                .await;
            return Flow::Stop;
        }
        let may_move = self.next_move.is_none_or(|at| Instant::now() >= at);
        if may_move && self.host.should_leave(agent.context().pending.as_ref()) {
            return self.leave(agent).await;
        }
        if let Some(site) = self.host.balance_to(&agent) {
            match self.go_to(agent, &site).await {
                Flow::Stop => {
                    tracing::info!(agent = %self.id, to = site, "moved to balance the load");
                    return Flow::Stop;
                }
                Flow::Go(stays) => agent = stays,
            }
        }
        if matches!(agent.context().pending, Some(agent_abi::Op::Checkpoint))
            && !self.host.draining()
        {
            // Asked to stop here to balance the load (or not moved): on with no more stops.
            agent.flags().checkpoint.store(false, Ordering::SeqCst);
        }
        Flow::Go(agent)
    }

    async fn hop(&mut self, mut agent: AgentInstance, site: String) -> Flow {
        // A place is chosen now, and again if the hop is made again after a crash: until
        // the departure is durable no destination commits, so a new choice is as good.
        let site = match agent_abi::Place::parse(&site) {
            None => site,
            Some(Ok(place)) => match self.host.membership.choose(&place) {
                Some(chosen) => chosen,
                None => {
                    let reason = "no host that is up fits".to_string();
                    let error = HopError::Unreachable { site, reason };
                    agent.complete(OpResult::Hop(Err(error)));
                    return Flow::Go(agent);
                }
            },
            Some(Err(bad)) => {
                agent.complete(OpResult::Hop(Err(HopError::UnknownSite(bad))));
                return Flow::Go(agent);
            }
        };
        if site == self.host.config.name {
            agent.complete(OpResult::Hop(Ok(())));
            return Flow::Go(agent);
        }
        self.go_to(agent, &site).await
    }

    async fn call(
        &mut self,
        agent: &mut AgentInstance,
        (service, request): (&str, &[u8]),
    ) -> CallAnswer {
        self.host.call(agent, service, request).await
    }

    async fn sleep(&mut self, mut agent: AgentInstance, ms: u64) -> Flow {
        if Duration::from_millis(ms) >= PARK_AFTER && self.host.park_asleep(&mut agent, ms).await {
            return Flow::Stop;
        }
        if !sleep_unless_killed(&agent.flags(), ms).await {
            self.end_with(agent.context().hops(), AgentEnd::Killed)
                .await;
            return Flow::Stop;
        }
        agent.complete(OpResult::Sleep);
        Flow::Go(agent)
    }

    async fn emit(&mut self, mut agent: AgentInstance, value: Vec<u8>) -> Flow {
        // Numbered from the agent's image, so that one told again after a crash is the same.
        let seq = agent.context().emits + 1;
        let event = LaunchEvent::Emitted { seq, value };
        if !self.tell_home(event, &agent.flags()).await {
            // Stored with its emit pending if the host stops: the next start tells it again.
            return self.cut_short(agent).await;
        }
        crash_point("after-emit");
        agent.context_mut().emits = seq;
        agent.complete(OpResult::Emit(Ok(())));
        Flow::Go(agent)
    }

    async fn send(&mut self, mut agent: AgentInstance, to: AgentId, body: Vec<u8>) -> Flow {
        // Numbered from the agent's image, so that one sent again after a crash is the same.
        let context = agent.context();
        let seq = context.sent.get(&to).map_or(1, |n| n + 1);
        let owner = context.owner.clone();
        let from = PostFrom::Agent {
            id: self.id,
            owner: owner.clone(),
        };
        let post = Post {
            to,
            from,
            seq,
            body,
        };
        let Some(posted) = self.post(&post, &owner, &agent.flags()).await else {
            return self.cut_short(agent).await;
        };
        crash_point("after-send");
        if posted.is_ok() {
            agent.context_mut().sent.insert(to, seq);
        }
        agent.complete(OpResult::Send(posted.map_err(|e| send_error(&to, e))));
        Flow::Go(agent)
    }

    async fn recv(&mut self, mut agent: AgentInstance, timeout_ms: Option<u64>) -> Flow {
        let deadline = (self.waited_until.take())
            .or_else(|| timeout_ms.map(|ms| unix_ms().saturating_add(ms)))
            .unwrap_or(u64::MAX);
        loop {
            let context = agent.context_mut();
            if !context.inbox.is_empty() {
                let message = context.inbox.remove(0);
                context.received += 1;
                agent.complete(OpResult::Recv(Some(message)));
                return self.keep_taken(agent).await;
            }
            let after = context.received;
            let mail = match self.fetch(after, deadline, &agent.flags()).await {
                Some(Ok(mail)) => mail,
                Some(Err(gone)) => {
                    // Its home holds no mailbox for it: no message can come, ever.
                    tracing::error!(agent = %self.id, "the agent's home says: {gone}; it stops");
                    let hops = agent.context().hops();
                    self.end_with(hops, AgentEnd::Killed).await;
                    return Flow::Stop;
                }
                None => return self.cut_short(agent).await,
            };
            if !mail.is_empty() {
                agent.context_mut().inbox = mail;
                continue;
            }
            if unix_ms() >= deadline {
                agent.complete(OpResult::Recv(None));
                return Flow::Go(agent);
            }
            if self.host.park_waiting(&mut agent, deadline).await {
                return Flow::Stop;
            }
        }
    }

    async fn clone_to(&mut self, mut agent: AgentInstance, sites: Vec<String>) -> Flow {
        let host = self.host.clone();
        let redo = std::mem::take(&mut self.redo_clone);
        let children = host.children_of(&agent, &sites);
        let limit = host.config.max_children;
        let wanted = (agent.context().children).saturating_add(children.len() as u64);
        // (With no site this host knows, each site's error is that it is unknown.)
        let (outcomes, not_made) = if children.is_empty() || wanted > limit {
            (
                host.unmade(&sites, CloneError::TooManyChildren { limit }),
                Vec::new(),
            )
        } else {
            match self
                .make_children(&mut agent, &children, &sites, redo)
                .await
            {
                Some(made) => made,
                None => {
                    if !host.stopping() {
                        // Killed: the children its home may have recorded were never made.
                        let why = |c: &ChildStart| HopError::Unreachable {
                            site: c.site.clone(),
                            reason: "its parent was killed first".into(),
                        };
                        let never = children.iter().map(|c| (c.clone(), why(c))).collect();
                        host.not_made(&self.home, never).await;
                    }
                    return self.cut_short(agent).await;
                }
            }
        };
        if agent.flags().kill.load(Ordering::SeqCst) {
            // Killed while its children were being made: they go too.
            host.kill_children(&children, &outcomes).await;
        }
        let made = outcomes.iter().filter(|o| o.is_ok()).count() as u64;
        let context = agent.context_mut();
        context.clones += 1;
        context.children += made;
        agent.complete(OpResult::Clone(Cloned::Parent(outcomes)));
        if !children.is_empty() {
            host.keep_cloned(&mut agent).await;
        }
        // Only now final: until the parent was stored with its answer, a restart would have
        // made the clone again, and these children perhaps with it.
        host.not_made(&self.home, not_made).await;
        Flow::Go(agent)
    }

    async fn end(&mut self, agent: AgentInstance, end: Result<Outcome, AgentError>) {
        let end = match end {
            Ok(outcome) => AgentEnd::from(outcome),
            Err(e) => AgentEnd::from(&e),
        };
        self.end_with(agent.context().hops(), end).await;
    }
}

impl OnHost {
    /// Makes `children` of the agent, one per site of `sites` this host knows: stores the
    /// agent with its clone pending (a restart makes the same children again), has its home
    /// record them, then creates them all at once (`redo`: again, after a restart). What
    /// became of each site's child, and the children not made; `None` if the agent was
    /// killed, or this host began to shut down, before they were made.
    async fn make_children(
        &self,
        agent: &mut AgentInstance,
        children: &[ChildStart],
        sites: &[String],
        redo: bool,
    ) -> Option<(Outcomes, Vec<(ChildStart, HopError)>)> {
        let frozen = (std::time::Instant::now(), unix_us());
        let host = &self.host;
        let unreachable = |reason: String| {
            CloneError::Site(HopError::Unreachable {
                site: host.config.name.clone(),
                reason,
            })
        };
        let refused = |error| Some((host.unmade(sites, error), Vec::new()));
        if let Err(e) = host.keep(agent, Resume::Handle).await {
            return refused(unreachable(format!("cannot store the parent: {e}")));
        }
        let stored_us = frozen.0.elapsed().as_micros() as u64;
        crash_point("clone-after-keep");
        let round = agent.context().clones + 1;
        let registered = self.register(round, children, &agent.flags()).await?;
        let registered_us = frozen.0.elapsed().as_micros() as u64;
        match registered {
            Ok(()) => {}
            Err(Refusal::TooManyAgents { limit, .. }) => {
                return refused(CloneError::OwnerFull { limit });
            }
            Err(other) => return refused(unreachable(format!("its home: {other}"))),
        }
        crash_point("clone-after-register");
        // A kill that came while the home recorded them: none is made.
        if agent.flags().kill.load(Ordering::SeqCst) {
            return None;
        }
        let mut outcomes = host.unmade(sites, unreachable("not made".into()));
        let made = host.make_children(agent, children, (&mut outcomes, redo), frozen);
        let not_made = made.await?;
        let made_us = frozen.0.elapsed().as_micros() as u64;
        let (agent, n) = (self.id, children.len());
        tracing::info!(%agent, children = n, stored_us, registered_us, made_us, "cloned");
        Some((outcomes, not_made))
    }

    /// Asks the agent's home to record `children`, and again while it cannot be reached.
    /// `None` if the agent was killed, or this host began to shut down, meanwhile.
    async fn register(
        &self,
        round: u64,
        children: &[ChildStart],
        flags: &AgentFlags,
    ) -> Option<Reply<()>> {
        let mut pause = Backoff::new(TELL_FIRST, TELL_MOST);
        loop {
            match (self
                .host
                .register_children((self.id, round), &self.home, children))
            .await
            {
                Ok(reply) => return Some(reply),
                Err(e) => {
                    let home = &self.home;
                    tracing::warn!(agent = %self.id, %home, "cannot record children at the home: {e}");
                }
            }
            if !self.pause(pause.wait(), flags).await {
                return None;
            }
        }
    }

    /// After the agent took a message: once it took a [`KEEP_TAKEN_PART`] of its room since its last stored
    /// state, it is stored again, so that its home may drop them and its mailbox has room.
    async fn keep_taken(&mut self, mut agent: AgentInstance) -> Flow {
        let received = agent.context().received;
        let every = (self.limit / KEEP_TAKEN_PART).max(1);
        if received - self.taken >= every {
            match self.host.keep(&mut agent, Resume::Poll).await {
                Ok(()) => self.taken = received,
                Err(e) => tracing::warn!(agent = %self.id, "cannot store the agent: {e}"),
            }
        }
        Flow::Go(agent)
    }
}

/// What an agent is told of a message its receiver's home refused.
fn send_error(to: &AgentId, refusal: Refusal) -> SendError {
    let to = to.to_string();
    match refusal {
        Refusal::NoSuchAgent(_) => SendError::NoSuchAgent(to),
        Refusal::Ended(_) => SendError::Ended(to),
        Refusal::NotYours(_) => SendError::NotYours(to),
        Refusal::MailboxFull { limit, .. } => SendError::Full { limit },
        Refusal::MailTooLarge { limit } => SendError::TooLarge { limit },
        Refusal::UserMailFull { limit, .. } => SendError::OwnerFull { limit },
        other => SendError::Unreachable(other.to_string()),
    }
}

impl Host {
    /// Runs `agent` here from `start` until it ends, leaves or is stored.
    pub(in crate::net) async fn drive(self: Arc<Self>, agent: AgentInstance, start: Start) {
        let context = agent.context();
        let redo_clone = matches!(&start, Start::Handle(agent_abi::Op::Clone { .. }));
        let (start, uncommitted, waited_until) = match start {
            Start::Arrived(committed, None) => (driver::Start::Poll, Some(committed), None),
            Start::Arrived(committed, Some(op)) => {
                (driver::Start::Handle(op), Some(committed), None)
            }
            Start::Poll => (driver::Start::Poll, None, None),
            Start::Handle(op) => (driver::Start::Handle(op), None, None),
            Start::Waiting(op, until_ms) => (driver::Start::Handle(op), None, Some(until_ms)),
        };
        let mut place = OnHost {
            id: context.agent_id,
            home: context.home.clone(),
            // An agent starts here from a stored state: an arrival's is its committed image.
            taken: context.received,
            limit: self.config.mailbox,
            host: self,
            uncommitted,
            waited_until,
            redo_clone,
            next_move: None,
        };
        driver::drive(agent, &mut place, start).await;
    }

    /// Answers a service call once: an agent re-running from an older image after a crash gets
    /// the journaled answer instead of calling again.
    pub(in crate::net) async fn call(
        self: &Arc<Self>,
        agent: &mut AgentInstance,
        service: &str,
        request: &[u8],
    ) -> Result<serde_bytes::ByteBuf, agent_abi::CallError> {
        let id = agent.context().agent_id;
        let index = agent.context().calls;
        agent.context_mut().calls += 1;
        let digest = *blake3::hash(request).as_bytes();
        match self.store.call(&id, index) {
            Ok(Some(CallEntry {
                request,
                answer: Some(answer),
                ..
            })) if request == digest => return answer,
            Ok(Some(_)) => {
                tracing::warn!(agent = %id, index, "the agent did not repeat its call; calling again")
            }
            Ok(None) => {}
            Err(e) => tracing::error!(agent = %id, "call journal: {e}"),
        }
        let answer = self
            .site
            .call(service, request)
            .map(serde_bytes::ByteBuf::from);
        let entry = CallEntry {
            seq: agent.context().hop_seq,
            service: service.to_string(),
            request: digest,
            answer: Some(answer.clone()),
        };
        if let Err(e) = self.store.put_call(&id, index, &entry).await {
            tracing::error!(agent = %id, "cannot journal a call: {e}");
        }
        crash_point("after-call");
        answer
    }

    /// Stores the agent's image at its current safe point as its resident record.
    pub(in crate::net) async fn keep(
        &self,
        agent: &mut AgentInstance,
        resume: Resume,
    ) -> Result<(), KeepError> {
        let (id, bytes, record) = kept(agent, resume)?;
        let parts = bytes.parts();
        self.store.keep_agent(&id, &parts, record).await?;
        Ok(())
    }

    /// Stores the agent at its safe point, pending operation included, to resume on restart.
    pub(in crate::net) async fn park(self: &Arc<Self>, mut agent: AgentInstance) {
        let id = agent.context().agent_id;
        match self.keep(&mut agent, Resume::Handle).await {
            Ok(()) => tracing::info!(agent = %id, "parked"),
            Err(e) => tracing::error!(agent = %id, "cannot park agent: {e}"),
        }
        self.forget_running(&id);
    }

    /// How an agent running here ends: its record goes, its home hears of it.
    pub(in crate::net) async fn finish(
        self: &Arc<Self>,
        id: AgentId,
        home: String,
        hops: u64,
        end: AgentEnd,
    ) {
        let _ = self.store.remove_agent(&id).await;
        self.forget_running(&id);
        self.report(id, home, self.ended(hops, end)).await;
    }

    /// The event of an agent's end here.
    pub(in crate::net) fn ended(&self, hops: u64, outcome: AgentEnd) -> LaunchEvent {
        LaunchEvent::Finished {
            site: self.config.name.clone(),
            hops,
            outcome,
        }
    }
}
