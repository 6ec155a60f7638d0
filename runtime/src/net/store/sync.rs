//! The store's former names, kept until the host moves to the async API; then this file goes.
//!
//! The `*_async` names forward to the async writes that replaced them. The `*_blocking` ones
//! are for callers that are not async yet: they wait for the write on the calling thread,
//! after leaving the async worker ([`blocking`]) when there is one.

use super::{
    AgentRecord, CallEntry, HomeWrite, HostStore, PendingReport, ReportKey, Staged, StoreError,
    blocking,
};
use crate::context::AgentId;
use crate::net::messages::{StatusReply, TransferStatus};
use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

/// Runs `write` to its end on this thread.
fn wait<F: Future>(write: F) -> F::Output {
    struct Unpark(std::thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
    }
    blocking(|| {
        let waker = Waker::from(Arc::new(Unpark(std::thread::current())));
        let mut context = Context::from_waker(&waker);
        let mut write = pin!(write);
        loop {
            if let Poll::Ready(out) = write.as_mut().poll(&mut context) {
                return out;
            }
            std::thread::park();
        }
    })
}

impl HostStore {
    /// [`HostStore::set_agent`], waiting on this thread.
    pub(crate) fn set_agent_blocking(
        &self,
        agent: &AgentId,
        record: &AgentRecord,
    ) -> Result<(), StoreError> {
        wait(self.set_agent(agent, record))
    }

    /// [`HostStore::resolve_transfer`], waiting on this thread.
    pub(crate) fn resolve_transfer_blocking(
        &self,
        agent: &AgentId,
        seq: u64,
    ) -> Result<TransferStatus, StoreError> {
        wait(self.resolve_transfer(agent, seq))
    }

    /// [`HostStore::put_home_latest`], waiting on this thread.
    pub(crate) fn put_home_latest_blocking<T: Send + 'static>(
        &self,
        latest: impl Fn() -> Option<(HomeWrite, T)> + Send + 'static,
    ) -> Result<Option<T>, StoreError> {
        wait(self.put_home_latest(latest))
    }

    /// [`HostStore::put_report`], waiting on this thread.
    pub(crate) fn put_report_blocking(
        &self,
        report: &PendingReport,
    ) -> Result<ReportKey, StoreError> {
        wait(self.put_report(report))
    }

    /// [`HostStore::sync_lazy`], waiting on this thread.
    pub(crate) fn sync_lazy_blocking(&self) -> Result<(), StoreError> {
        wait(self.sync_lazy())
    }

    /// [`HostStore::remove_agent`], waiting on this thread.
    pub(crate) fn remove_agent_blocking(&self, agent: &AgentId) -> Result<(), StoreError> {
        wait(self.remove_agent(agent))
    }

    /// [`HostStore::put_call`], waiting on this thread.
    pub(crate) fn put_call_blocking(
        &self,
        agent: &AgentId,
        index: u64,
        entry: &CallEntry,
    ) -> Result<(), StoreError> {
        wait(self.put_call(agent, index, entry))
    }

    /// [`HostStore::keep_agent`], waiting on this thread.
    pub(crate) fn keep_agent_blocking(
        &self,
        agent: &AgentId,
        image: &[&[u8]],
        make: impl FnOnce(String) -> AgentRecord,
    ) -> Result<String, StoreError> {
        wait(self.keep_agent(agent, image, make))
    }

    /// [`HostStore::put_home`].
    pub(crate) async fn put_home_async(&self, status: &StatusReply) -> Result<(), StoreError> {
        self.put_home(status).await
    }

    /// [`HostStore::put_home_latest`].
    pub(crate) async fn put_home_latest_async<T: Send + 'static>(
        &self,
        latest: impl Fn() -> Option<(HomeWrite, T)> + Send + 'static,
    ) -> Result<Option<T>, StoreError> {
        self.put_home_latest(latest).await
    }

    /// [`HostStore::forward`].
    pub(crate) async fn forward_async(
        &self,
        agent: &AgentId,
        record: &AgentRecord,
        report: Option<&PendingReport>,
    ) -> Result<(), StoreError> {
        self.forward(agent, record, report).await
    }

    /// [`HostStore::forward_home`].
    pub(crate) async fn forward_home_async<T: Send + 'static>(
        &self,
        agent: &AgentId,
        record: &AgentRecord,
        latest: impl Fn() -> Option<(HomeWrite, T)> + Send + 'static,
    ) -> Result<Option<T>, StoreError> {
        self.forward_home(agent, record, latest).await
    }

    /// [`HostStore::remove_agent`].
    pub(crate) async fn remove_agent_async(&self, agent: &AgentId) -> Result<(), StoreError> {
        self.remove_agent(agent).await
    }

    /// [`HostStore::put_report`].
    pub(crate) async fn put_report_async(
        &self,
        report: &PendingReport,
    ) -> Result<ReportKey, StoreError> {
        self.put_report(report).await
    }

    /// [`HostStore::keep_agent`].
    pub(crate) async fn keep_agent_async(
        &self,
        agent: &AgentId,
        image: &[&[u8]],
        make: impl FnOnce(String) -> AgentRecord,
    ) -> Result<String, StoreError> {
        self.keep_agent(agent, image, make).await
    }

    /// [`HostStore::commit_arrival`].
    pub(crate) async fn commit_arrival_async(
        &self,
        agent: &AgentId,
        seq: u64,
        image: &[u8],
        staged: Option<Staged>,
    ) -> Result<(), StoreError> {
        self.commit_arrival(agent, seq, image, staged).await
    }
}
