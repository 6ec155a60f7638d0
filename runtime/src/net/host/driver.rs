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
use crate::net::host::{Host, PARK_AFTER, Start, sleep_unless_killed};
use crate::net::messages::{AgentEnd, LaunchEvent, Request};
use crate::net::store::{AgentRecord, CallEntry, Resume, StoreError};
use agent_abi::{OpResult, Outcome};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

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
const TELL_FIRST: Duration = Duration::from_millis(100);
const TELL_MOST: Duration = Duration::from_secs(5);

/// One agent running on a host.
struct OnHost {
    host: Arc<Host>,
    id: AgentId,
    home: String,
    /// An arrival runs before its commit is durable, but nothing it does takes effect before:
    /// its first operation, or its end, waits for this verdict.
    uncommitted: Option<tokio::sync::oneshot::Receiver<bool>>,
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
            tokio::select! {
                () = tokio::time::sleep(pause.wait()) => {}
                () = flags.killed.cancelled() => return false,
                () = host.stopping.cancelled() => return false,
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
            tracing::info!(agent = %self.id, source = ?line.source, "{}", line.text);
        }
        if dropped > 0 {
            tracing::warn!(agent = %self.id, dropped, "agent log lines dropped");
        }
    }

    async fn before_op(&mut self, agent: AgentInstance) -> Flow {
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
        Flow::Go(agent)
    }

    async fn hop(&mut self, mut agent: AgentInstance, site: String) -> Flow {
        if site == self.host.config.name {
            agent.complete(OpResult::Hop(Ok(())));
            return Flow::Go(agent);
        }
        match self.host.send_agent(&mut agent, &site).await {
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
            return match self.host.stopping() {
                // Stored with its emit pending: the next start tells it again.
                true => {
                    self.host.park(agent).await;
                    Flow::Stop
                }
                false => {
                    self.end_with(agent.context().hops(), AgentEnd::Killed)
                        .await;
                    Flow::Stop
                }
            };
        }
        crash_point("after-emit");
        agent.context_mut().emits = seq;
        agent.complete(OpResult::Emit(Ok(())));
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

impl Host {
    /// Runs `agent` here from `start` until it ends, leaves or is stored.
    pub(in crate::net) async fn drive(self: Arc<Self>, agent: AgentInstance, start: Start) {
        let context = agent.context();
        let (start, uncommitted) = match start {
            Start::Arrived(committed) => (driver::Start::Poll, Some(committed)),
            Start::Poll => (driver::Start::Poll, None),
            Start::Handle(op) => (driver::Start::Handle(op), None),
        };
        let mut place = OnHost {
            id: context.agent_id,
            home: context.home.clone(),
            host: self,
            uncommitted,
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
