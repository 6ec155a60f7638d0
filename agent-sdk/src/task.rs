//! The agent's one task and the executor the host drives through `agent_start`/`agent_poll`.
//!
//! The task is a boxed future held in a static, so its whole state machine lives in linear
//! memory and travels with a snapshot. It is polled with a no-op waker: the host, not a waker,
//! decides when to poll again (after it completed the operation the agent submitted).

use crate::{Context, sys};
use agent_abi::{Outcome, POLL_DONE, POLL_PENDING};
use std::cell::RefCell;
use std::fmt::Display;
use std::future::Future;
use std::pin::Pin;
use std::task::{Poll, Waker};

pub use crate::sys::checkpoint_flag_address;

type Task = Pin<Box<dyn Future<Output = ()>>>;

thread_local! {
    static TASK: RefCell<Option<Task>> = const { RefCell::new(None) };
}

/// Creates the agent's task from its `async fn`. Called once, by `agent_start`.
#[doc(hidden)]
pub fn start<F, Fut, T, E>(agent: F)
where
    F: FnOnce(Context) -> Fut + 'static,
    Fut: Future<Output = Result<T, E>> + 'static,
    T: serde::Serialize,
    E: Display,
{
    std::panic::set_hook(Box::new(|info| {
        let message = match info.payload().downcast_ref::<&str>() {
            Some(s) => (*s).to_string(),
            None => info
                .payload()
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_default(),
        };
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        report(&Outcome::Panicked(format!("{message}{at}")));
    }));
    let task: Task = Box::pin(async move {
        let outcome = match agent(Context::new()).await {
            Ok(value) => {
                let mut bytes = Vec::new();
                match ciborium::into_writer(&value, &mut bytes) {
                    Ok(()) => Outcome::Ok(bytes),
                    Err(e) => Outcome::Err(format!("could not encode the agent's result: {e}")),
                }
            }
            Err(e) => Outcome::Err(e.to_string()),
        };
        report(&outcome);
    });
    TASK.with(|t| *t.borrow_mut() = Some(task));
}

/// Polls the agent's task once. Called by `agent_poll`.
#[doc(hidden)]
pub fn poll() -> i32 {
    // Take the task out while polling so a re-entrant poll cannot alias it.
    let Some(mut task) = TASK.with(|t| t.borrow_mut().take()) else {
        panic!(
            "agent-sdk: agent_poll called without a task (agent_start not run, or agent already finished)"
        );
    };
    let mut cx = std::task::Context::from_waker(Waker::noop());
    match task.as_mut().poll(&mut cx) {
        Poll::Ready(()) => POLL_DONE,
        Poll::Pending => {
            TASK.with(|t| *t.borrow_mut() = Some(task));
            POLL_PENDING
        }
    }
}

fn report(outcome: &Outcome) {
    let mut bytes = Vec::new();
    if ciborium::into_writer(outcome, &mut bytes).is_ok() {
        sys::finish(&bytes);
    }
}
