//! Group commit: the writes of many tasks applied in one redb transaction.
//!
//! redb runs one write transaction at a time, and each costs the same fixed work whatever it
//! holds (page allocation, table roots, checksums, and a disk sync when it is durable). A
//! host with many agents hopping at once writes many small records, so a writer queues its
//! write as a job and waits: whichever waiting writer finds no batch under way leads the next
//! one. It takes every queued job, applies them in order in one transaction, commits it once
//! (durably if any of them asked), and wakes the others. A lone writer leads at once and pays
//! what a transaction of its own would.
//!
//! Writers wait as tasks: only the one that leads a batch leaves its async worker for a
//! thread ([`blocking`]), so a host does not spend a thread per waiting writer. A batch that
//! ends wakes the tasks whose writes it held and the writer queued first behind it, to lead
//! the next; waking every queued writer would wake most of them for nothing.
//!
//! A job that fails may have written part of its change, so the transaction is dropped and the
//! others are applied again without it: each job is all or nothing, as if it had its own
//! transaction. Jobs are applied in the order they were queued.
//!
//! This module knows nothing of what the store keeps: jobs bring their own error type, which
//! only has to take in a [`BatchError`].

use redb::{Database, Durability, WriteTransaction};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use tokio::sync::Notify;

/// Runs blocking work without stalling the async runtime: on a multi-threaded tokio runtime
/// the worker hands its other tasks on while this one waits for the disk. Elsewhere (a
/// current-thread runtime, a plain thread) it just runs `work`.
pub(crate) fn blocking<T>(work: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current() {
        Ok(h) if h.runtime_flavor() == RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

/// Why a batch did not commit a write, whatever the write itself did.
#[derive(Clone, Debug, thiserror::Error)]
pub enum BatchError {
    /// The batch's transaction could not begin, be set up or commit. Every write of the batch
    /// gets the same error, hence shared.
    #[error("{0}")]
    Commit(#[source] Arc<redb::Error>),
    /// Another write of the batch panicked while the batch was applied.
    #[error("a write in its batch panicked")]
    Panicked,
    /// The batch ended without running the write (a bug of the batcher).
    #[error("the write never ran")]
    NeverRan,
}

impl BatchError {
    fn commit(e: impl Into<redb::Error>) -> BatchError {
        BatchError::Commit(Arc::new(e.into()))
    }
}

/// Whether a write must be on disk before its writer goes on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Durable {
    /// Return once the write is durable.
    Now,
    /// Return once it is committed; the next durable commit covers it, and a crash before
    /// then loses it. For records a restart rebuilds, or that are safe to repeat.
    Later,
}

/// A queued write: applies its change to the transaction and keeps its own result; `false`
/// when it failed.
type Work<C> = Box<dyn FnMut(&C, &WriteTransaction) -> bool + Send>;

struct Job<C: ?Sized> {
    ticket: u64,
    durable: Durable,
    work: Work<C>,
    /// Wakes the task waiting for the job.
    wake: Arc<Notify>,
}

/// How a job's batch ended: `Err` when the batch failed (the job's own error, if it failed,
/// is in its result).
type Settled = Result<(), BatchError>;

/// Writes waiting for a batch, and how the batches they went in ended.
struct State<C: ?Sized> {
    queue: Vec<Job<C>>,
    /// A writer is applying a batch.
    leading: bool,
    next_ticket: u64,
    /// Jobs whose batch ended.
    settled: HashMap<u64, Settled>,
    /// Writes whose waiting task was dropped while their batch was under way: their outcome
    /// is not kept, since nobody will ask for it.
    abandoned: HashSet<u64>,
}

/// The group commit of one database; `C` is what jobs are given besides the transaction.
pub(crate) struct Batcher<C: ?Sized> {
    state: Mutex<State<C>>,
    /// A commit did not wait for the disk and no durable commit has covered it yet.
    lazy: AtomicBool,
    /// Transactions committed: fewer than the writes when writers meet in batches.
    commits: AtomicU64,
    /// How long each durable commit took (the host's metrics read it).
    durations: prometheus_client::metrics::histogram::Histogram,
}

impl<C: ?Sized> Default for Batcher<C> {
    fn default() -> Self {
        Batcher {
            state: Mutex::new(State {
                queue: Vec::new(),
                leading: false,
                next_ticket: 0,
                settled: HashMap::new(),
                abandoned: HashSet::new(),
            }),
            lazy: AtomicBool::new(false),
            commits: AtomicU64::new(0),
            durations: crate::net::metrics::seconds(),
        }
    }
}

impl<C: ?Sized> Batcher<C> {
    fn lock(&self) -> MutexGuard<'_, State<C>> {
        // Only plain bookkeeping runs under the lock, so a panic cannot leave it half done.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a commit that did not wait for the disk is not yet covered by a durable one;
    /// clears it.
    pub(crate) fn take_lazy(&self) -> bool {
        self.lazy.swap(false, Ordering::AcqRel)
    }

    /// Whether a commit that did not wait for the disk is not yet covered by a durable one.
    #[cfg(test)]
    pub(crate) fn lazy_pending(&self) -> bool {
        self.lazy.load(Ordering::Acquire)
    }

    /// How long durable commits took, for the host's metrics.
    pub(crate) fn durations(&self) -> prometheus_client::metrics::histogram::Histogram {
        self.durations.clone()
    }

    /// Transactions committed so far.
    #[cfg(test)]
    pub(crate) fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Applies `work` to `db` in the next batch and returns its result once the batch is
    /// committed (and durable, for [`Durable::Now`]). `work` may run more than once, each
    /// time in a fresh transaction, when another job of its batch failed; only the last run's
    /// result is returned. It runs on whichever writer leads the batch, off the async workers.
    ///
    /// # Errors
    /// What `work` returned, or the batch's failure.
    ///
    /// # Cancel safety
    /// Dropped before it returns, the write is taken off the queue if it is still there (a
    /// write whose batch is under way is applied all the same).
    pub(crate) async fn write<T, E>(
        &self,
        context: &C,
        db: &Database,
        durable: Durable,
        work: impl FnMut(&C, &WriteTransaction) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: From<BatchError> + Send + 'static,
        C: Sync,
    {
        // A wake that comes while the task is not waiting is kept for its next wait.
        let wake = Arc::new(Notify::new());
        let (ticket, result) = self.enqueue(durable, work, wake.clone());
        let mut waiting = Waiting {
            batcher: self,
            ticket,
            done: false,
        };
        loop {
            let jobs = {
                let mut state = self.lock();
                if let Some(settled) = state.settled.remove(&ticket) {
                    drop(state);
                    waiting.done = true;
                    return outcome(settled, &result);
                }
                take_lead(&mut state)
            };
            match jobs {
                Some(jobs) => blocking(|| self.lead(context, db, jobs)),
                None => wake.notified().await,
            }
        }
    }

    /// Queues `work`; returns its ticket and where its result will be.
    fn enqueue<T: Send + 'static, E: Send + 'static>(
        &self,
        durable: Durable,
        mut work: impl FnMut(&C, &WriteTransaction) -> Result<T, E> + Send + 'static,
        wake: Arc<Notify>,
    ) -> (u64, Outcome<T, E>) {
        let result = Arc::new(Mutex::new(None));
        let kept = result.clone();
        let work: Work<C> = Box::new(move |context, txn| {
            let outcome = work(context, txn);
            let ok = outcome.is_ok();
            *kept.lock().unwrap_or_else(PoisonError::into_inner) = Some(outcome);
            ok
        });
        let mut state = self.lock();
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        state.queue.push(Job {
            ticket,
            durable,
            work,
            wake,
        });
        (ticket, result)
    }

    /// Applies a batch of `jobs` as its leader; settles them and wakes their writers and the
    /// next batch's leader when done, even if a job panicked.
    fn lead(&self, context: &C, db: &Database, jobs: Vec<Job<C>>) {
        let mut lead = Leading {
            batcher: self,
            tickets: jobs.iter().map(|j| j.ticket).collect(),
            wakes: jobs.iter().map(|j| j.wake.clone()).collect(),
            settled: Vec::new(),
        };
        self.apply(context, db, jobs, &mut lead.settled);
    }

    /// Applies a batch, dropping failed jobs and applying the rest again, then commits it.
    fn apply(
        &self,
        context: &C,
        db: &Database,
        mut jobs: Vec<Job<C>>,
        settled: &mut Vec<(u64, Settled)>,
    ) {
        while !jobs.is_empty() {
            let durable = jobs.iter().any(|j| j.durable == Durable::Now);
            let txn = match begin(db, durable) {
                Ok(txn) => txn,
                Err(e) => return fail_all(jobs, e, settled),
            };
            let failed = jobs.iter_mut().position(|job| !(job.work)(context, &txn));
            if let Some(at) = failed {
                // Whatever the failed job wrote goes with the transaction.
                let _ = txn.abort();
                settled.push((jobs.remove(at).ticket, Ok(())));
                continue;
            }
            let started = std::time::Instant::now();
            match txn.commit() {
                Ok(()) => {
                    if durable {
                        self.durations.observe(started.elapsed().as_secs_f64());
                    }
                    self.lazy.store(!durable, Ordering::Release);
                    self.commits.fetch_add(1, Ordering::Relaxed);
                    settled.extend(jobs.into_iter().map(|j| (j.ticket, Ok(()))));
                }
                Err(e) => fail_all(jobs, BatchError::commit(e), settled),
            }
            return;
        }
    }
}

/// Begins a batch's transaction; one that need not be durable does not sync the disk.
fn begin(db: &Database, durable: bool) -> Result<WriteTransaction, BatchError> {
    let mut txn = db.begin_write().map_err(BatchError::commit)?;
    if !durable {
        (txn.set_durability(Durability::None)).map_err(BatchError::commit)?;
    }
    Ok(txn)
}

/// A task waiting for its write. Dropped before the write settled (the task was cancelled),
/// it takes the write off the queue (and, if it was first there, wakes the next in its place
/// to lead), or has its batch's leader forget its outcome.
struct Waiting<'a, C: ?Sized> {
    batcher: &'a Batcher<C>,
    ticket: u64,
    done: bool,
}

impl<C: ?Sized> Drop for Waiting<'_, C> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut state = self.batcher.lock();
        let at = state.queue.iter().position(|job| job.ticket == self.ticket);
        if let Some(at) = at {
            state.queue.remove(at);
        }
        if at == Some(0) {
            // It may have been woken to lead the next batch: another must then.
            let next = next_leader(&state);
            drop(state);
            wake(next);
        } else if at.is_none() && state.settled.remove(&self.ticket).is_none() {
            state.abandoned.insert(self.ticket);
        }
    }
}

/// Where a queued write's result is kept by its job.
type Outcome<T, E> = Arc<Mutex<Option<Result<T, E>>>>;

/// The queued jobs, when no batch is under way: the caller leads the next one.
fn take_lead<C: ?Sized>(state: &mut State<C>) -> Option<Vec<Job<C>>> {
    if state.leading {
        return None;
    }
    state.leading = true;
    Some(std::mem::take(&mut state.queue))
}

/// The writer to wake to lead the next batch, when none is under way and writes are queued:
/// the one whose write was queued first.
fn next_leader<C: ?Sized>(state: &State<C>) -> Option<Arc<Notify>> {
    match (state.leading, state.queue.first()) {
        (false, Some(job)) => Some(job.wake.clone()),
        _ => None,
    }
}

/// Wakes the writer [`next_leader`] chose, if any.
fn wake(next: Option<Arc<Notify>>) {
    if let Some(task) = next {
        task.notify_one();
    }
}

/// A write's result once its batch has ended (`settled`).
fn outcome<T, E: From<BatchError>>(settled: Settled, result: &Outcome<T, E>) -> Result<T, E> {
    settled?;
    let outcome = result.lock().unwrap_or_else(PoisonError::into_inner).take();
    outcome.unwrap_or_else(|| Err(BatchError::NeverRan.into()))
}

fn fail_all<C: ?Sized>(jobs: Vec<Job<C>>, why: BatchError, settled: &mut Vec<(u64, Settled)>) {
    settled.extend(jobs.into_iter().map(|j| (j.ticket, Err(why.clone()))));
}

/// The role of the writer applying a batch. Dropping it settles the batch and wakes the
/// writers waiting for it and the next batch's leader, also when a job panicked, so that
/// nobody waits for a batch that ended.
struct Leading<'a, C: ?Sized> {
    batcher: &'a Batcher<C>,
    tickets: Vec<u64>,
    /// The tasks waiting for the batch's writes.
    wakes: Vec<Arc<Notify>>,
    settled: Vec<(u64, Settled)>,
}

impl<C: ?Sized> Drop for Leading<'_, C> {
    fn drop(&mut self) {
        let mut state = self.batcher.lock();
        state.leading = false;
        for (ticket, outcome) in self.settled.drain(..) {
            if !state.abandoned.remove(&ticket) {
                state.settled.insert(ticket, outcome);
            }
        }
        for ticket in &self.tickets {
            if !state.settled.contains_key(ticket) && !state.abandoned.remove(ticket) {
                state.settled.insert(*ticket, Err(BatchError::Panicked));
            }
        }
        let next = next_leader(&state);
        drop(state);
        // The next leader first: it is scheduled before the tasks this batch lets go on.
        wake(next);
        for task in self.wakes.drain(..) {
            task.notify_one();
        }
    }
}

#[cfg(test)]
mod tests;
