//! The one driver of an agent's operations, for the local runner and the host alike: it polls
//! the agent to its next safe point, passes on what it logged, and hands its operation to the
//! [`Place`] it runs in. What differs between places (a hop through an image in memory or over
//! QUIC, a journaled service call, a sleep that parks) is the place's; the order is the
//! driver's.

use crate::context::AgentId;
use crate::instance::{AgentError, AgentInstance, Step};
use crate::log::LogLine;
use agent_abi::{CallError, EmitError, MAX_EMIT, MAX_MAIL, Op, OpResult, Outcome, SendError};
use std::future::Future;

/// The answer to a service call.
pub type CallAnswer = Result<serde_bytes::ByteBuf, CallError>;

/// Where a drive starts.
pub enum Start {
    /// Poll the agent (a fresh launch, or its pending operation was completed).
    Poll,
    /// Perform its pending operation first (it was stored with one).
    Handle(Op),
}

/// What becomes of an agent after its place acted.
pub enum Flow {
    /// It goes on: poll it (its operation is completed).
    Go(AgentInstance),
    /// The drive ends here: the agent left, was stored, or ended (the place saw to it).
    Stop,
}

/// What a place does with an agent's operations. Each method is called at a safe point.
pub trait Place: Send {
    /// Before each poll.
    fn before_poll(&mut self, _agent: &mut AgentInstance) {}

    /// After each poll, before its step is acted on: `false` drops the agent unseen (an
    /// arrival whose commit failed).
    fn polled(&mut self) -> impl Future<Output = bool> + Send {
        async { true }
    }

    /// What the agent logged.
    fn log(&mut self, agent: &AgentInstance, lines: Vec<LogLine>, dropped: u64);

    /// Before an operation takes effect: a place that stops here (shutting down, the agent
    /// was killed) sees to the agent.
    fn before_op(&mut self, agent: AgentInstance) -> impl Future<Output = Flow> + Send {
        async { Flow::Go(agent) }
    }

    /// `ctx.hop(site)`.
    fn hop(&mut self, agent: AgentInstance, site: String) -> impl Future<Output = Flow> + Send;

    /// A service call; its answer completes the operation.
    fn call(
        &mut self,
        agent: &mut AgentInstance,
        call: (&str, &[u8]),
    ) -> impl Future<Output = CallAnswer> + Send;

    /// `ctx.sleep(ms)`.
    fn sleep(&mut self, agent: AgentInstance, ms: u64) -> impl Future<Output = Flow> + Send;

    /// `ctx.emit(value)`, of at most [`MAX_EMIT`] bytes: the place completes it once the
    /// value is told.
    fn emit(&mut self, agent: AgentInstance, value: Vec<u8>) -> impl Future<Output = Flow> + Send;

    /// `ctx.send(to, value)`, of at most [`MAX_MAIL`] bytes and to an agent id that parses:
    /// the place completes it once the receiver's home holds the message, or with an error.
    fn send(
        &mut self,
        agent: AgentInstance,
        to: AgentId,
        value: Vec<u8>,
    ) -> impl Future<Output = Flow> + Send;

    /// `ctx.recv()` (no timeout) or `ctx.recv_timeout(ms)`: the place completes it with the
    /// agent's next message, or `None` once the timeout passed.
    fn recv(
        &mut self,
        agent: AgentInstance,
        timeout_ms: Option<u64>,
    ) -> impl Future<Output = Flow> + Send;

    /// `ctx.clone_to(sites)`: the place completes it in the parent once every child was
    /// created or refused.
    fn clone_to(
        &mut self,
        agent: AgentInstance,
        sites: Vec<String>,
    ) -> impl Future<Output = Flow> + Send;

    /// After an operation was performed here (not after a hop away).
    fn after_op(&mut self, agent: AgentInstance) -> impl Future<Output = Flow> + Send {
        async { Flow::Go(agent) }
    }

    /// The agent ended: it returned, or the runtime stopped it.
    fn end(
        &mut self,
        agent: AgentInstance,
        end: Result<Outcome, AgentError>,
    ) -> impl Future<Output = ()> + Send;
}

/// Drives `agent` in `place` from `start` until it ends or leaves.
pub async fn drive<P: Place>(mut agent: AgentInstance, place: &mut P, start: Start) {
    let mut next = start;
    loop {
        let op = match next {
            Start::Handle(op) => op,
            Start::Poll => {
                place.before_poll(&mut agent);
                let step = agent.poll().await;
                if !place.polled().await {
                    return;
                }
                let (lines, dropped) = agent.drain_log();
                place.log(&agent, lines, dropped);
                match step {
                    Ok(Step::Suspended(op)) => op,
                    Ok(Step::Finished(outcome)) => return place.end(agent, Ok(outcome)).await,
                    Err(e) => return place.end(agent, Err(e)).await,
                }
            }
        };
        next = Start::Poll;
        let Flow::Go(ready) = place.before_op(agent).await else {
            return;
        };
        agent = ready;
        let performed = match op {
            // A hop that failed leaves the agent here with its error; after one that
            // succeeded it runs on elsewhere.
            Op::Hop { site } => place.hop(agent, site).await,
            Op::Call { service, request } => {
                let answer = place.call(&mut agent, (&service, &request)).await;
                agent.complete(OpResult::Call(answer));
                place.after_op(agent).await
            }
            Op::Checkpoint => {
                agent.complete(OpResult::Checkpoint);
                place.after_op(agent).await
            }
            Op::AllowMoves { allow } => {
                agent.context_mut().movable = allow;
                agent.complete(OpResult::AllowMoves);
                place.after_op(agent).await
            }
            Op::Sleep { ms } => match place.sleep(agent, ms).await {
                Flow::Go(agent) => place.after_op(agent).await,
                Flow::Stop => return,
            },
            Op::Emit { value } if value.len() > MAX_EMIT => {
                let limit = MAX_EMIT as u64;
                agent.complete(OpResult::Emit(Err(EmitError::TooLarge { limit })));
                place.after_op(agent).await
            }
            Op::Emit { value } => match place.emit(agent, value).await {
                Flow::Go(agent) => place.after_op(agent).await,
                Flow::Stop => return,
            },
            Op::Send { to, value } => {
                let to = match to.parse::<AgentId>() {
                    Ok(_) if value.len() > MAX_MAIL => Err(SendError::TooLarge {
                        limit: MAX_MAIL as u64,
                    }),
                    Ok(to) => Ok(to),
                    Err(why) => Err(SendError::BadValue(why)),
                };
                let sent = match to {
                    Ok(to) => place.send(agent, to, value).await,
                    Err(e) => {
                        agent.complete(OpResult::Send(Err(e)));
                        Flow::Go(agent)
                    }
                };
                match sent {
                    Flow::Go(agent) => place.after_op(agent).await,
                    Flow::Stop => return,
                }
            }
            Op::Recv { timeout_ms } => match place.recv(agent, timeout_ms).await {
                Flow::Go(agent) => place.after_op(agent).await,
                Flow::Stop => return,
            },
            Op::Clone { sites } => match place.clone_to(agent, sites).await {
                Flow::Go(agent) => place.after_op(agent).await,
                Flow::Stop => return,
            },
        };
        agent = match performed {
            Flow::Go(agent) => agent,
            Flow::Stop => return,
        };
    }
}
