//! Group commit: the writes of many threads applied in one redb transaction.
//!
//! redb runs one write transaction at a time, and each costs the same fixed work whatever it
//! holds (a page allocator, the table roots flushed, checksums, and a disk sync when it is
//! durable). With many agents hopping at once a host writes thousands of small records a
//! second, so a writer queues its write as a job and waits: whichever waiting writer finds
//! no batch under way leads the next one. It takes every queued job, applies them in order in
//! one transaction, commits it once (durably if any of them asked), and wakes the others. A
//! lone writer leads at once and pays what a transaction of its own would.
//!
//! A writer on an async worker waits as a task ([`Batcher::write_async`]): only the one that
//! leads a batch leaves its worker for a thread (and hands its other tasks on), where one
//! writer in a thread of its own each, hundreds at a time with many agents in flight, cost
//! the host its time in thread switches. A batch that ends wakes the waiting threads, the
//! tasks whose writes it held, and the writer queued first behind it, to lead the next: when
//! it woke every waiting task, those queued behind woke for nothing (0.8 times per write,
//! measured with 200 agents in flight).
//!
//! A job that fails may have written part of its change, so the transaction is dropped and the
//! others are applied again without it: each job is all or nothing, as if it had its own
//! transaction. Jobs are applied in the order they were queued.

use super::store::StoreError;
use redb::{Database, Durability, WriteTransaction};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};

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
    /// Wakes the task waiting for the job; `None` when a thread waits (on the condvar).
    wake: Option<Arc<tokio::sync::Notify>>,
}

/// Writes waiting for a batch, and how the batches they went in ended.
struct State<C: ?Sized> {
    queue: Vec<Job<C>>,
    /// A writer is applying a batch.
    leading: bool,
    next_ticket: u64,
    /// Jobs whose batch ended: `Err` when its commit failed (the job's own error, if it
    /// failed, is in its result).
    settled: HashMap<u64, Result<(), String>>,
    /// Writes whose waiting task was dropped while their batch was under way: their outcome
    /// is not kept, since nobody will ask for it.
    abandoned: HashSet<u64>,
}

/// The group commit of one database; `C` is what jobs are given besides the transaction.
pub(crate) struct Batcher<C: ?Sized> {
    state: Mutex<State<C>>,
    /// Wakes writers waiting in a thread when a batch ends (tasks have a `Job::wake` each).
    ended: Condvar,
    /// A commit did not wait for the disk and no durable commit has covered it yet.
    lazy: AtomicBool,
    /// Transactions committed: fewer than the writes when writers meet in batches.
    commits: AtomicU64,
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
            ended: Condvar::new(),
            lazy: AtomicBool::new(false),
            commits: AtomicU64::new(0),
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

    /// Transactions committed so far.
    #[cfg(test)]
    pub(crate) fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }

    /// Applies `work` to `db` in the next batch and returns its result once the batch is
    /// committed (and durable, for [`Durable::Now`]). `work` may run more than once, each
    /// time in a fresh transaction, when another job of its batch failed; only the last run's
    /// result is returned. It runs on whichever writer's thread leads the batch.
    ///
    /// # Errors
    /// What `work` returned, or the commit's failure.
    pub(crate) fn write<T: Send + 'static>(
        &self,
        context: &C,
        db: &Database,
        durable: Durable,
        work: impl FnMut(&C, &WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (ticket, result) = self.enqueue(durable, work, None);
        let mut state = self.lock();
        loop {
            if let Some(settled) = state.settled.remove(&ticket) {
                drop(state);
                return outcome(settled, &result);
            }
            match take_lead(&mut state) {
                Some(jobs) => {
                    drop(state);
                    self.lead(context, db, jobs);
                    state = self.lock();
                }
                None => {
                    state = (self.ended.wait(state)).unwrap_or_else(PoisonError::into_inner);
                }
            }
        }
    }

    /// Applies `work` as [`Batcher::write`] does, waiting as a task: the caller's worker
    /// goes on with other tasks meanwhile, and leaves for a thread only to lead a batch.
    /// Dropped before it returns, the write is taken off the queue if it is still there (a
    /// write whose batch is under way is applied all the same).
    ///
    /// # Errors
    /// As [`Batcher::write`].
    pub(crate) async fn write_async<T: Send + 'static>(
        &self,
        context: &C,
        db: &Database,
        durable: Durable,
        work: impl FnMut(&C, &WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError>
    where
        C: Sync,
    {
        // A wake that comes while the task is not waiting is kept for its next wait.
        let wake = Arc::new(tokio::sync::Notify::new());
        let (ticket, result) = self.enqueue(durable, work, Some(wake.clone()));
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
                Some(jobs) => super::store::blocking(|| self.lead(context, db, jobs)),
                None => wake.notified().await,
            }
        }
    }

    /// Queues `work`; returns its ticket and where its result will be.
    fn enqueue<T: Send + 'static>(
        &self,
        durable: Durable,
        mut work: impl FnMut(&C, &WriteTransaction) -> Result<T, StoreError> + Send + 'static,
        wake: Option<Arc<tokio::sync::Notify>>,
    ) -> (u64, Outcome<T>) {
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
            wakes: jobs.iter().filter_map(|j| j.wake.clone()).collect(),
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
        settled: &mut Vec<(u64, Result<(), String>)>,
    ) {
        while !jobs.is_empty() {
            let durable = jobs.iter().any(|j| j.durable == Durable::Now);
            let txn = match db.begin_write() {
                Ok(mut txn) => match durable {
                    true => Ok(txn),
                    false => (txn.set_durability(Durability::None).map(|()| txn))
                        .map_err(|e| e.to_string()),
                },
                Err(e) => Err(e.to_string()),
            };
            let txn = match txn {
                Ok(txn) => txn,
                Err(e) => return fail_all(jobs, &e, settled),
            };
            let failed = jobs.iter_mut().position(|job| !(job.work)(context, &txn));
            if let Some(at) = failed {
                // Whatever the failed job wrote goes with the transaction.
                let _ = txn.abort();
                settled.push((jobs.remove(at).ticket, Ok(())));
                continue;
            }
            match txn.commit() {
                Ok(()) => {
                    self.lazy.store(!durable, Ordering::Release);
                    self.commits.fetch_add(1, Ordering::Relaxed);
                    settled.extend(jobs.into_iter().map(|j| (j.ticket, Ok(()))));
                }
                Err(e) => fail_all(jobs, &e.to_string(), settled),
            }
            return;
        }
    }
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
            wake_next(self.batcher, next);
        } else if at.is_none() && state.settled.remove(&self.ticket).is_none() {
            state.abandoned.insert(self.ticket);
        }
    }
}

/// Where a queued write's result is kept by its job.
type Outcome<T> = Arc<Mutex<Option<Result<T, StoreError>>>>;

/// The queued jobs, when no batch is under way: the caller leads the next one.
fn take_lead<C: ?Sized>(state: &mut State<C>) -> Option<Vec<Job<C>>> {
    if state.leading {
        return None;
    }
    state.leading = true;
    Some(std::mem::take(&mut state.queue))
}

/// Who is woken to lead the next batch.
enum Next {
    Nobody,
    Task(Arc<tokio::sync::Notify>),
    Thread,
}

/// The writer to wake to lead the next batch, when none is under way and writes are queued:
/// the one whose write was queued first.
fn next_leader<C: ?Sized>(state: &State<C>) -> Next {
    match (state.leading, state.queue.first()) {
        (false, Some(job)) => job.wake.clone().map_or(Next::Thread, Next::Task),
        _ => Next::Nobody,
    }
}

/// Wakes the writer [`next_leader`] chose.
fn wake_next<C: ?Sized>(batcher: &Batcher<C>, next: Next) {
    match next {
        Next::Task(task) => task.notify_one(),
        Next::Thread => batcher.ended.notify_all(),
        Next::Nobody => {}
    }
}

/// A write's result once its batch has ended (`settled`).
fn outcome<T>(settled: Result<(), String>, result: &Outcome<T>) -> Result<T, StoreError> {
    settled.map_err(StoreError::Db)?;
    let outcome = result.lock().unwrap_or_else(PoisonError::into_inner).take();
    outcome.unwrap_or_else(|| Err(StoreError::Db("the write never ran".into())))
}

fn fail_all<C: ?Sized>(jobs: Vec<Job<C>>, why: &str, settled: &mut Vec<(u64, Result<(), String>)>) {
    settled.extend(jobs.into_iter().map(|j| (j.ticket, Err(why.to_string()))));
}

/// The role of the writer applying a batch. Dropping it settles the batch and wakes the
/// writers waiting for it and the next batch's leader, also when a job panicked, so that
/// nobody waits for a batch that ended.
struct Leading<'a, C: ?Sized> {
    batcher: &'a Batcher<C>,
    tickets: Vec<u64>,
    /// The tasks waiting for the batch's writes.
    wakes: Vec<Arc<tokio::sync::Notify>>,
    settled: Vec<(u64, Result<(), String>)>,
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
                state
                    .settled
                    .insert(*ticket, Err("a write in its batch panicked".into()));
            }
        }
        let next = next_leader(&state);
        drop(state);
        // The next leader first: it is scheduled before the tasks this batch lets go on.
        wake_next(self.batcher, next);
        self.batcher.ended.notify_all();
        for task in self.wakes.drain(..) {
            task.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{ReadableDatabase, ReadableTable, TableDefinition};

    const T: TableDefinition<u64, u64> = TableDefinition::new("t");

    fn db() -> (tempfile::TempDir, Database) {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let db = Database::create(dir.path().join("db")).unwrap_or_else(|e| panic!("{e}"));
        (dir, db)
    }

    fn stored(db: &Database) -> Vec<(u64, u64)> {
        let txn = db.begin_read().unwrap_or_else(|e| panic!("{e}"));
        let Ok(table) = txn.open_table(T) else {
            return Vec::new();
        };
        let rows = table.iter().unwrap_or_else(|e| panic!("{e}"));
        rows.map(|r| r.map(|(k, v)| (k.value(), v.value())))
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// A write of `key` → `key + 1` that yields `key`.
    fn insert(
        key: u64,
    ) -> impl FnMut(&(), &WriteTransaction) -> Result<u64, StoreError> + Send + 'static {
        move |(), txn| {
            let mut t = txn
                .open_table(T)
                .map_err(|e| StoreError::Db(e.to_string()))?;
            t.insert(key, key + 1)
                .map_err(|e| StoreError::Db(e.to_string()))?;
            Ok(key)
        }
    }

    /// A job that writes `key` → `value`, then fails if `fail`.
    fn job(ticket: u64, key: u64, value: u64, fail: bool) -> Job<()> {
        Job {
            ticket,
            durable: Durable::Now,
            wake: None,
            work: Box::new(move |(), txn| {
                let inserted = match txn.open_table(T) {
                    Ok(mut t) => t.insert(key, value).is_ok(),
                    Err(_) => false,
                };
                inserted && !fail
            }),
        }
    }

    #[test]
    fn a_failed_write_leaves_nothing_and_the_rest_of_its_batch_commits() {
        let (_dir, db) = db();
        let batcher = Batcher::<()>::default();
        let mut settled = Vec::new();
        let jobs = vec![
            job(0, 1, 10, false),
            job(1, 2, 20, true),
            job(2, 3, 30, false),
        ];
        batcher.apply(&(), &db, jobs, &mut settled);
        settled.sort();
        assert_eq!(settled, [(0, Ok(())), (1, Ok(())), (2, Ok(()))]);
        // Job 1 wrote its key before it failed: the key is not stored.
        assert_eq!(stored(&db), [(1, 10), (3, 30)]);
        assert_eq!(batcher.commits(), 1, "one transaction for the jobs left");
    }

    #[test]
    fn writers_that_meet_share_transactions_and_each_gets_its_own_result() {
        let (_dir, db) = db();
        let batcher = Batcher::<()>::default();
        const WRITERS: u64 = 8;
        const EACH: u64 = 50;
        std::thread::scope(|s| {
            for w in 0..WRITERS {
                let (batcher, db) = (&batcher, &db);
                s.spawn(move || {
                    for i in 0..EACH {
                        let key = w * 1000 + i;
                        let durable = if i % 2 == 0 {
                            Durable::Now
                        } else {
                            Durable::Later
                        };
                        let got = batcher.write(&(), db, durable, move |(), txn| {
                            let mut t = txn
                                .open_table(T)
                                .map_err(|e| StoreError::Db(e.to_string()))?;
                            t.insert(key, key + 1)
                                .map_err(|e| StoreError::Db(e.to_string()))?;
                            if key % 7 == 0 {
                                return Err(StoreError::Aborted);
                            }
                            Ok(key * 2)
                        });
                        match got {
                            Ok(v) => assert_eq!(v, key * 2),
                            Err(StoreError::Aborted) => assert_eq!(key % 7, 0),
                            Err(e) => panic!("{e}"),
                        }
                    }
                });
            }
        });
        let want: Vec<(u64, u64)> = (0..WRITERS)
            .flat_map(|w| (0..EACH).map(move |i| w * 1000 + i))
            .filter(|k| k % 7 != 0)
            .map(|k| (k, k + 1))
            .collect();
        assert_eq!(stored(&db), want);
        assert!(
            batcher.commits() < WRITERS * EACH,
            "{} commits for {} writes",
            batcher.commits(),
            WRITERS * EACH
        );
    }

    #[test]
    fn writers_waiting_as_tasks_and_as_threads_share_transactions_and_none_is_left_waiting() {
        let (_dir, db) = db();
        let (batcher, db) = (Arc::new(Batcher::<()>::default()), Arc::new(db));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        // 64 tasks and 2 threads, 20 writes each.
        let tasks: Vec<_> = (0..64u64)
            .map(|w| {
                let (batcher, db) = (batcher.clone(), db.clone());
                runtime.spawn(async move {
                    for i in 0..20 {
                        let key = w * 1000 + i;
                        let got = batcher.write_async(&(), &db, Durable::Now, insert(key));
                        assert_eq!(got.await.ok(), Some(key));
                    }
                })
            })
            .collect();
        std::thread::scope(|s| {
            for w in 64..66u64 {
                let (batcher, db) = (&batcher, &db);
                s.spawn(move || {
                    for i in 0..20 {
                        let key = w * 1000 + i;
                        let got = batcher.write(&(), db, Durable::Later, insert(key));
                        assert_eq!(got.ok(), Some(key));
                    }
                });
            }
        });
        runtime.block_on(async {
            for task in tasks {
                let done = tokio::time::timeout(std::time::Duration::from_secs(60), task).await;
                assert!(
                    matches!(done, Ok(Ok(()))),
                    "a task was left waiting: {done:?}"
                );
            }
        });
        assert_eq!(stored(&db).len(), 66 * 20);
        assert!(batcher.commits() < 66 * 20, "{} commits", batcher.commits());
    }

    #[test]
    fn a_task_dropped_while_its_write_is_queued_takes_the_write_off_the_queue() {
        let (_dir, db) = db();
        let batcher = Batcher::<()>::default();
        batcher.lock().leading = true; // a batch is under way: the write waits in the queue
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        let write = batcher.write_async(&(), &db, Durable::Now, |(), _| Ok(()));
        let waited = runtime.block_on(async {
            tokio::time::timeout(std::time::Duration::from_millis(20), write).await
        });
        assert!(
            waited.is_err(),
            "the write cannot settle while a batch is under way"
        );
        let state = batcher.lock();
        assert!(state.queue.is_empty(), "the dropped write is still queued");
        assert!(state.settled.is_empty() && state.abandoned.is_empty());
    }

    #[test]
    fn a_task_woken_to_lead_the_next_batch_and_then_dropped_hands_the_lead_on() {
        let (_dir, db) = db();
        let (batcher, db) = (Arc::new(Batcher::<()>::default()), Arc::new(db));
        // A thread leads a batch until told to end it.
        let end = Arc::new(AtomicBool::new(false));
        let leader = {
            let (batcher, db, end) = (batcher.clone(), db.clone(), end.clone());
            std::thread::spawn(move || {
                batcher.write(&(), &db, Durable::Now, move |(), _| {
                    while !end.load(Ordering::Acquire) {
                        std::thread::yield_now();
                    }
                    Ok(())
                })
            })
        };
        while !batcher.lock().leading {
            std::thread::yield_now();
        }
        // Two tasks queue their writes behind it; nothing runs them unless woken.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap_or_else(|e| panic!("{e}"));
        let spawn = |key: u64| {
            let (batcher, db) = (batcher.clone(), db.clone());
            runtime.spawn(async move {
                batcher
                    .write_async(&(), &db, Durable::Now, insert(key))
                    .await
            })
        };
        let (first, second) = (spawn(1), spawn(2));
        runtime.block_on(async {
            while batcher.lock().queue.len() < 2 {
                tokio::task::yield_now().await;
            }
        });
        // The batch ends and wakes the first task to lead the next one, which is dropped
        // before it runs.
        end.store(true, Ordering::Release);
        let led = leader
            .join()
            .unwrap_or_else(|_| panic!("the leader panicked"));
        assert!(led.is_ok(), "{led:?}");
        first.abort();
        let done = runtime.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(10), second).await
        });
        assert!(
            matches!(done, Ok(Ok(Ok(2)))),
            "the second write was left waiting: {done:?}"
        );
        assert_eq!(stored(&db), [(2, 3)]);
    }

    #[test]
    fn a_write_that_panics_leaves_no_writer_waiting() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let db =
            Arc::new(Database::create(dir.path().join("db")).unwrap_or_else(|e| panic!("{e}")));
        let batcher = Arc::new(Batcher::<()>::default());
        // The first writer leads, waits until a second write is queued behind its batch,
        // then panics.
        let first = {
            let (batcher, db) = (batcher.clone(), db.clone());
            std::thread::spawn(move || {
                let waiting = batcher.clone();
                let _ = batcher.write(&(), &db, Durable::Now, move |(), _| -> Result<(), _> {
                    while waiting.lock().queue.is_empty() {
                        std::thread::yield_now();
                    }
                    panic!("a job's bug");
                });
            })
        };
        while !batcher.lock().leading {
            std::thread::yield_now();
        }
        let (done, finished) = std::sync::mpsc::channel();
        {
            let (batcher, db) = (batcher.clone(), db.clone());
            std::thread::spawn(move || {
                let _ = done.send(batcher.write(&(), &db, Durable::Now, |(), txn| {
                    let mut t = txn
                        .open_table(T)
                        .map_err(|e| StoreError::Db(e.to_string()))?;
                    t.insert(1, 2).map_err(|e| StoreError::Db(e.to_string()))?;
                    Ok(())
                }));
            });
        }
        assert!(
            first.join().is_err(),
            "the first writer's panic reaches its caller"
        );
        let second = finished.recv_timeout(std::time::Duration::from_secs(30));
        assert!(matches!(second, Ok(Ok(()))), "{second:?}");
        assert_eq!(stored(&db), [(1, 2)]);
    }
}
