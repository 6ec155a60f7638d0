//! The threads agents run on, apart from the threads that serve the network.
//!
//! An agent runs on a worker thread for up to an epoch tick at a time, and CPU-bound agents
//! keep every worker of their runtime busy. Were requests served on those workers, each would
//! wait behind every ready agent at each of its awaits, and one user's spinning agents would
//! make every other user's `list`, launch or hop slow. On their own runtime, agents share the
//! cores with the network side through the operating system's scheduler instead.

use std::future::Future;
use tokio::runtime::{Builder, Runtime};
use tokio::task::JoinHandle;

/// A runtime of its own for agents' tasks.
pub struct AgentExecutor {
    /// Always `Some` until dropped.
    runtime: Option<Runtime>,
}

impl AgentExecutor {
    /// Starts one worker thread per core.
    ///
    /// # Errors
    /// When the threads cannot be started.
    pub fn new() -> std::io::Result<AgentExecutor> {
        let runtime = Builder::new_multi_thread()
            .thread_name("agent-worker")
            .enable_all()
            .build()?;
        Ok(AgentExecutor {
            runtime: Some(runtime),
        })
    }

    /// Tasks waiting in the shared queue for a thread: agents ready to run that no core
    /// runs now.
    pub fn queued(&self) -> usize {
        self.runtime
            .as_ref()
            .map_or(0, |r| r.metrics().global_queue_depth())
    }

    /// Runs `task` on the agents' threads.
    pub fn spawn<F>(&self, task: F) -> Option<JoinHandle<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.runtime.as_ref().map(|r| r.spawn(task))
    }
}

impl Drop for AgentExecutor {
    fn drop(&mut self) {
        // Dropped from async code (the host's last handle goes in some task): a runtime can
        // only be let go there without waiting for its tasks.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn tasks_run_on_the_agents_threads_and_the_executor_drops_in_async_code() {
        let executor = AgentExecutor::new().map_err(|e| e.to_string());
        let Ok(executor) = executor else {
            panic!("{executor:?}", executor = executor.err())
        };
        let name = executor.spawn(async { std::thread::current().name().map(str::to_string) });
        let name = match name {
            Some(task) => task.await.ok().flatten(),
            None => None,
        };
        assert_eq!(name.as_deref(), Some("agent-worker"));
        drop(executor);
    }
}
