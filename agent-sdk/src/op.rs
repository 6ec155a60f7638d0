//! Futures of the suspending host operations.
//!
//! Each future submits its operation on first poll and returns `Pending`, which makes
//! `agent_poll` return to the host with an empty Wasm stack: the safe point. The host completes
//! the operation (possibly on another machine, after a snapshot) and polls again; the future
//! then takes the result the host holds for it.

use crate::sys;
use agent_abi::{CallError, Cloned, EmitError, HopError, Op, OpResult, SendError, Sender, code};
use serde::de::DeserializeOwned;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

/// A submitted-or-not host operation.
#[derive(Debug)]
enum Pending {
    Ready(Op),
    Submitted,
}

impl Pending {
    fn poll(&mut self) -> Poll<OpResult> {
        match self {
            Pending::Ready(op) => {
                let mut bytes = Vec::new();
                if let Err(e) = ciborium::into_writer(op, &mut bytes) {
                    panic!("agent-sdk: could not encode {op:?}: {e}");
                }
                match sys::submit(&bytes) {
                    code::OK => {}
                    code::BUSY => {
                        panic!("agent-sdk: another host operation is pending; await one at a time")
                    }
                    code::TOO_LARGE => panic!(
                        "agent-sdk: operation of {} bytes exceeds the limit of {} bytes",
                        bytes.len(),
                        agent_abi::MAX_MESSAGE
                    ),
                    other => panic!("agent-sdk: host refused the operation (code {other})"),
                }
                *self = Pending::Submitted;
                Poll::Pending
            }
            Pending::Submitted => match sys::take() {
                None => Poll::Pending,
                Some(bytes) => match ciborium::from_reader(bytes.as_slice()) {
                    Ok(result) => Poll::Ready(result),
                    Err(e) => panic!("agent-sdk: host sent an unreadable operation result: {e}"),
                },
            },
        }
    }
}

fn mismatch(result: &OpResult) -> ! {
    panic!("agent-sdk: host answered with the result of another operation: {result:?}")
}

/// Future of [`Context::hop`](crate::Context::hop).
#[must_use = "a hop happens only when awaited"]
#[derive(Debug)]
pub struct Hop(Pending);

impl Hop {
    pub(crate) fn new(op: Op) -> Self {
        Hop(Pending::Ready(op))
    }
}

impl Future for Hop {
    type Output = Result<(), HopError>;

    fn poll(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
        self.0.poll().map(|result| match result {
            OpResult::Hop(r) => r,
            other => mismatch(&other),
        })
    }
}

/// Future of [`Context::call`](crate::Context::call).
#[must_use = "a service call happens only when awaited"]
#[derive(Debug)]
pub struct Call<Resp> {
    pending: Option<Pending>,
    encode_error: Option<String>,
    _resp: PhantomData<fn() -> Resp>,
}

impl<Resp> Call<Resp> {
    pub(crate) fn new(service: &str, request: Vec<u8>, encode_error: Option<String>) -> Self {
        let op = Op::Call {
            service: service.to_string(),
            request,
        };
        Call {
            pending: Some(Pending::Ready(op)),
            encode_error,
            _resp: PhantomData,
        }
    }
}

impl<Resp> Unpin for Call<Resp> {}

impl<Resp: DeserializeOwned> Future for Call<Resp> {
    type Output = Result<Resp, CallError>;

    fn poll(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(why) = self.encode_error.take() {
            return Poll::Ready(Err(CallError::BadRequest(why)));
        }
        let Some(pending) = self.pending.as_mut() else {
            panic!("agent-sdk: service call polled after it completed");
        };
        pending.poll().map(|result| {
            self.pending = None;
            match result {
                OpResult::Call(Ok(bytes)) => ciborium::from_reader(bytes.as_slice()).map_err(|e| {
                    CallError::BadRequest(format!("could not decode the response: {e}"))
                }),
                OpResult::Call(Err(e)) => Err(e),
                other => mismatch(&other),
            }
        })
    }
}

/// Future of [`Context::checkpoint`](crate::Context::checkpoint).
#[must_use = "a checkpoint happens only when awaited"]
#[derive(Debug)]
pub struct Checkpoint(Option<Pending>);

impl Checkpoint {
    #[inline]
    pub(crate) fn new(requested: bool) -> Self {
        Checkpoint(requested.then_some(Pending::Ready(Op::Checkpoint)))
    }
}

impl Future for Checkpoint {
    type Output = ();

    // Inlined so that a checkpoint the host did not ask for costs the caller a test.
    #[inline]
    fn poll(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
        match self.0.as_mut() {
            None => Poll::Ready(()),
            Some(pending) => suspend(pending),
        }
    }
}

/// The rare side of a checkpoint: the host asked, so the agent suspends.
#[cold]
#[inline(never)]
fn suspend(pending: &mut Pending) -> Poll<()> {
    pending.poll().map(|result| match result {
        OpResult::Checkpoint => (),
        other => mismatch(&other),
    })
}

/// Future of [`Context::allow_moves`](crate::Context::allow_moves).
#[must_use = "moves are allowed only once awaited"]
#[derive(Debug)]
pub struct AllowMoves(Pending);

impl AllowMoves {
    pub(crate) fn new(allow: bool) -> Self {
        AllowMoves(Pending::Ready(Op::AllowMoves { allow }))
    }
}

impl Future for AllowMoves {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
        self.0.poll().map(|result| match result {
            OpResult::AllowMoves => (),
            other => mismatch(&other),
        })
    }
}

/// Future of [`Context::sleep`](crate::Context::sleep).
#[must_use = "a sleep happens only when awaited"]
#[derive(Debug)]
pub struct Sleep(Pending);

impl Sleep {
    pub(crate) fn new(ms: u64) -> Self {
        Sleep(Pending::Ready(Op::Sleep { ms }))
    }
}

impl Future for Sleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<()> {
        self.0.poll().map(|result| match result {
            OpResult::Sleep => (),
            other => mismatch(&other),
        })
    }
}

/// Future of [`Context::emit`](crate::Context::emit).
#[must_use = "a value is emitted only when awaited"]
#[derive(Debug)]
pub struct Emit {
    pending: Option<Pending>,
    encode_error: Option<String>,
}

impl Emit {
    pub(crate) fn new(value: Vec<u8>, encode_error: Option<String>) -> Self {
        Emit {
            pending: Some(Pending::Ready(Op::Emit { value })),
            encode_error,
        }
    }
}

impl Future for Emit {
    type Output = Result<(), EmitError>;

    fn poll(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(why) = self.encode_error.take() {
            return Poll::Ready(Err(EmitError::BadValue(why)));
        }
        let Some(pending) = self.pending.as_mut() else {
            panic!("agent-sdk: emit polled after it completed");
        };
        pending.poll().map(|result| {
            self.pending = None;
            match result {
                OpResult::Emit(result) => result,
                other => mismatch(&other),
            }
        })
    }
}

/// Future of [`Context::send`](crate::Context::send).
#[must_use = "a message is sent only when awaited"]
#[derive(Debug)]
pub struct SendTo {
    pending: Option<Pending>,
    encode_error: Option<String>,
}

impl SendTo {
    pub(crate) fn new(to: &str, value: Vec<u8>, encode_error: Option<String>) -> Self {
        let op = Op::Send {
            to: to.to_string(),
            value,
        };
        SendTo {
            pending: Some(Pending::Ready(op)),
            encode_error,
        }
    }
}

impl Future for SendTo {
    type Output = Result<(), SendError>;

    fn poll(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(why) = self.encode_error.take() {
            return Poll::Ready(Err(SendError::BadValue(why)));
        }
        let Some(pending) = self.pending.as_mut() else {
            panic!("agent-sdk: send polled after it completed");
        };
        pending.poll().map(|result| {
            self.pending = None;
            match result {
                OpResult::Send(result) => result,
                other => mismatch(&other),
            }
        })
    }
}

/// Future of [`Context::recv_timeout`](crate::Context::recv_timeout) (and of
/// [`Context::recv`](crate::Context::recv), which waits without a timeout).
#[must_use = "a message is taken only when awaited"]
#[derive(Debug)]
pub struct Recv(Pending);

impl Recv {
    pub(crate) fn new(timeout_ms: Option<u64>) -> Self {
        Recv(Pending::Ready(Op::Recv { timeout_ms }))
    }
}

impl Future for Recv {
    type Output = Option<Message>;

    fn poll(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
        self.0.poll().map(|result| match result {
            OpResult::Recv(message) => message.map(|m| Message {
                from: m.from,
                body: m.body,
            }),
            other => mismatch(&other),
        })
    }
}

/// Future of [`Context::clone_to`](crate::Context::clone_to).
#[must_use = "an agent is cloned only when awaited"]
#[derive(Debug)]
pub struct CloneTo(Pending);

impl CloneTo {
    pub(crate) fn new(sites: Vec<String>) -> Self {
        CloneTo(Pending::Ready(Op::Clone { sites }))
    }
}

impl Future for CloneTo {
    type Output = Cloned;

    fn poll(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Self::Output> {
        self.0.poll().map(|result| match result {
            OpResult::Clone(cloned) => cloned,
            other => mismatch(&other),
        })
    }
}

/// A message taken from the agent's mailbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Who sent it: an agent (by id) or a user (`agent send`, by name).
    pub from: Sender,
    /// The message, CBOR-encoded.
    pub body: Vec<u8>,
}

impl Message {
    /// The message decoded as a `T` (what the sender passed to `send`: `agent send ID TEXT`
    /// sends a string, `--json VALUE` any JSON value).
    ///
    /// # Errors
    /// A [`BodyError`] when the message is not a `T`.
    pub fn body<T: DeserializeOwned>(&self) -> Result<T, BodyError> {
        ciborium::from_reader(self.body.as_slice()).map_err(|e| BodyError(e.to_string()))
    }

    /// The sender's agent id, if an agent sent it.
    pub fn from_agent(&self) -> Option<&str> {
        match &self.from {
            Sender::Agent(id) => Some(id),
            Sender::User(_) => None,
        }
    }
}

/// A message that is not of the type it was read as ([`Message::body`]), with the decoder's
/// words.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BodyError(String);

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the message is not of the type it was read as: {}",
            self.0
        )
    }
}

impl std::error::Error for BodyError {}
