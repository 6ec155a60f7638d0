//! Tests of the group commit with a table of its own, apart from the store.

use super::*;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};

const T: TableDefinition<u64, u64> = TableDefinition::new("t");

/// What a job of these tests fails with.
#[derive(Debug, thiserror::Error)]
enum TestError {
    #[error(transparent)]
    Batch(#[from] BatchError),
    #[error(transparent)]
    Db(#[from] redb::Error),
    #[error("the write refused")]
    Aborted,
}

fn db() -> (tempfile::TempDir, Database) {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::create(dir.path().join("db")).unwrap();
    (dir, db)
}

fn stored(db: &Database) -> Vec<(u64, u64)> {
    let txn = db.begin_read().unwrap();
    let Ok(table) = txn.open_table(T) else {
        return Vec::new();
    };
    let rows = table.iter().unwrap();
    rows.map(|r| r.map(|(k, v)| (k.value(), v.value())))
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Inserts `key` → `value` in `txn`.
fn put(txn: &WriteTransaction, key: u64, value: u64) -> Result<(), TestError> {
    let mut t = txn.open_table(T).map_err(redb::Error::from)?;
    t.insert(key, value).map_err(redb::Error::from)?;
    Ok(())
}

/// A write of `key` → `key + 1` that yields `key`.
fn insert(
    key: u64,
) -> impl FnMut(&(), &WriteTransaction) -> Result<u64, TestError> + Send + 'static {
    move |(), txn| {
        put(txn, key, key + 1)?;
        Ok(key)
    }
}

/// Runs `write` to its end on this thread, as a writer outside any async runtime would.
fn on_thread<F: std::future::Future>(write: F) -> F::Output {
    let runtime = tokio::runtime::Builder::new_current_thread().build();
    runtime.unwrap().block_on(write)
}

/// A job that writes `key` → `value`, then fails if `fail`.
fn job(ticket: u64, key: u64, value: u64, fail: bool) -> Job<()> {
    Job {
        ticket,
        durable: Durable::Now,
        wake: Arc::new(Notify::new()),
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
    let mut settled: Vec<(u64, bool)> = settled.iter().map(|(t, s)| (*t, s.is_ok())).collect();
    settled.sort();
    assert_eq!(settled, [(0, true), (1, true), (2, true)]);
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
                    let got = on_thread(batcher.write(&(), db, durable, move |(), txn| {
                        put(txn, key, key + 1)?;
                        if key % 7 == 0 {
                            return Err(TestError::Aborted);
                        }
                        Ok(key * 2)
                    }));
                    match got {
                        Ok(v) => assert_eq!(v, key * 2),
                        Err(TestError::Aborted) => assert_eq!(key % 7, 0),
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
        .unwrap();
    // 64 tasks and 2 threads, 20 writes each.
    let tasks: Vec<_> = (0..64u64)
        .map(|w| {
            let (batcher, db) = (batcher.clone(), db.clone());
            runtime.spawn(async move {
                for i in 0..20 {
                    let key = w * 1000 + i;
                    let got = batcher.write(&(), &db, Durable::Now, insert(key));
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
                    let got = on_thread(batcher.write(&(), db, Durable::Later, insert(key)));
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
        .unwrap();
    let write = batcher.write(&(), &db, Durable::Now, |(), _| Ok::<_, TestError>(()));
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
            on_thread(batcher.write(&(), &db, Durable::Now, move |(), _| {
                while !end.load(Ordering::Acquire) {
                    std::thread::yield_now();
                }
                Ok::<_, TestError>(())
            }))
        })
    };
    while !batcher.lock().leading {
        std::thread::yield_now();
    }
    // Two tasks queue their writes behind it; nothing runs them unless woken.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let spawn = |key: u64| {
        let (batcher, db) = (batcher.clone(), db.clone());
        runtime.spawn(async move { batcher.write(&(), &db, Durable::Now, insert(key)).await })
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
    let done = runtime
        .block_on(async { tokio::time::timeout(std::time::Duration::from_secs(10), second).await });
    assert!(
        matches!(done, Ok(Ok(Ok(2)))),
        "the second write was left waiting: {done:?}"
    );
    assert_eq!(stored(&db), [(2, 3)]);
}

#[test]
fn a_write_that_panics_leaves_no_writer_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let db = Arc::new(Database::create(dir.path().join("db")).unwrap());
    let batcher = Arc::new(Batcher::<()>::default());
    // The first writer leads, waits until a second write is queued behind its batch,
    // then panics.
    let first = {
        let (batcher, db) = (batcher.clone(), db.clone());
        std::thread::spawn(move || {
            let waiting = batcher.clone();
            let write = batcher.write(
                &(),
                &db,
                Durable::Now,
                move |(), _| -> Result<(), TestError> {
                    while waiting.lock().queue.is_empty() {
                        std::thread::yield_now();
                    }
                    panic!("a job's bug");
                },
            );
            let _ = on_thread(write);
        })
    };
    while !batcher.lock().leading {
        std::thread::yield_now();
    }
    let (done, finished) = std::sync::mpsc::channel();
    {
        let (batcher, db) = (batcher.clone(), db.clone());
        std::thread::spawn(move || {
            let write = batcher.write(&(), &db, Durable::Now, |(), txn| put(txn, 1, 2));
            let _ = done.send(on_thread(write));
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
