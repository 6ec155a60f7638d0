//! Tests of the store through its public API, and of what it leaves on disk.

use super::schema::{HOME, HOME_HOP_LOG, HOME_HOPS, agent_key, cbor};
use super::*;
use crate::context::AgentId;
use crate::image::AgentImage;
use crate::modules::ModuleHash;
use crate::net::messages::{HopInfo, LaunchEvent, StatusReply, TransferStatus};
use redb::ReadableDatabase;

#[tokio::test]
async fn a_transfer_is_committed_or_aborted_never_both() {
    let dir = tempfile::tempdir().unwrap();
    let store = HostStore::open(dir.path()).unwrap();
    let agent = AgentId([5; 16]);
    assert_eq!(store.transfer(&agent, 1).ok().flatten(), None);
    store
        .commit_arrival(&agent, 1, b"image one", None)
        .await
        .unwrap();
    assert_eq!(
        store.resolve_transfer(&agent, 1).await.ok(),
        Some(TransferStatus::Committed)
    );
    store
        .commit_arrival(&agent, 1, b"image one", None)
        .await
        .unwrap_or_else(|e| panic!("repeated commit: {e}"));

    assert_eq!(
        store.resolve_transfer(&agent, 2).await.ok(),
        Some(TransferStatus::Aborted)
    );
    assert!(matches!(
        store.commit_arrival(&agent, 2, b"late image", None).await,
        Err(StoreError::Aborted)
    ));
    assert_eq!(
        store.transfer(&agent, 2).ok().flatten(),
        Some(TransferStatus::Aborted)
    );
}

fn home_status(n: u64) -> StatusReply {
    StatusReply::new(AgentId([9; 16]), "alice", &format!("site{n}"))
}

#[tokio::test]
async fn a_held_end_is_kept_with_the_home_status_and_old_records_read_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let end = LaunchEvent::Finished {
        site: "siteC".into(),
        hops: 2,
        outcome: crate::net::messages::AgentEnd::Finished(vec![0xf5]),
    };
    let held = HomeRow {
        status: home_status(1),
        held_end: Some(end),
    };
    {
        let store = HostStore::open(dir.path()).unwrap();
        let row = HomeWrite {
            row: held.clone(),
            hops: Vec::new(),
        };
        store
            .put_home_latest(move || Some((row.clone(), ())))
            .await
            .unwrap();
    }
    let store = HostStore::open(dir.path()).unwrap();
    assert_eq!(rows(&store), [held]);

    // A record stored as a bare status, without `held_end`.
    let old = home_status(2);
    store
        .write(move |_, txn| {
            (txn.open_table(HOME)?).insert([9u8; 16].as_slice(), cbor(&old).as_slice())?;
            Ok(())
        })
        .await
        .unwrap();
    let read = HomeRow {
        status: home_status(2),
        held_end: None,
    };
    assert_eq!(rows(&store), [read]);
}

/// The home records stored, without what [`HostStore::homes`] tells of their hops.
fn rows(store: &HostStore) -> Vec<HomeRow> {
    let homes = store.homes().unwrap();
    homes.into_iter().map(|home| home.row).collect()
}

/// Rows of the hop log, counted.
fn logged(store: &HostStore) -> usize {
    use redb::ReadableTableMetadata;
    let txn = store.db.begin_read().unwrap();
    let table = txn.open_table(HOME_HOP_LOG).unwrap();
    table.len().unwrap() as usize
}

/// A record reads back with every hop of its agent: those its row holds (the older layout),
/// those in the `home_hops` table keyed by agent, and those logged; only the first are to be
/// stored apart again.
#[tokio::test]
async fn a_home_record_reads_back_with_the_hops_stored_apart_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let hop = |seq: u64| HopInfo {
        seq,
        from: "siteA".into(),
        to: "siteB".into(),
        image_bytes: 4000 + seq,
        freeze_us: seq,
        ..HopInfo::default()
    };
    let mut old = home_status(1);
    old.hops = vec![hop(1)];
    let write = |status: StatusReply, hops: Vec<HopInfo>| {
        let write = HomeWrite {
            row: HomeRow {
                status,
                held_end: None,
            },
            hops,
        };
        move || Some((write.clone(), ()))
    };
    let agent = old.agent;
    {
        let store = HostStore::open(dir.path()).unwrap();
        (store.put_home_latest(write(old.clone(), Vec::new())))
            .await
            .unwrap();
        // Hop 2 in the `home_hops` table, keyed by agent.
        (store.write(move |_, txn| {
            let mut table = txn.open_table(HOME_HOPS)?;
            let key = agent_key(&agent, 2);
            table.insert(key.as_slice(), cbor(&hop(2)).as_slice())?;
            Ok(())
        }))
        .await
        .unwrap();
        let read = store.homes().unwrap();
        assert_eq!(read.len(), 1);
        assert_eq!(
            read[0].inline,
            [1],
            "the row's own hop is to be stored apart"
        );
        let mut want = old.clone();
        want.hops = vec![hop(1), hop(2)];
        assert_eq!(read[0].row.status, want);
        for (status, hops) in [
            (home_status(2), vec![hop(1), hop(3)]),
            (home_status(3), vec![hop(4)]),
        ] {
            (store.put_home_latest(write(status, hops)).await).unwrap();
        }
    }
    let store = HostStore::open(dir.path()).unwrap();
    let mut want = home_status(3);
    want.hops = vec![hop(1), hop(2), hop(3), hop(4)];
    let read = store.homes().unwrap();
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].row.status, want);
    assert!(read[0].inline.is_empty(), "{:?}", read[0].inline);
    // The log goes on after the last key the store held.
    assert_eq!(logged(&store), 3);
    (store.put_home_latest(write(home_status(4), vec![hop(5)])))
        .await
        .unwrap();
    assert_eq!(logged(&store), 4);
    assert_eq!(rows(&store)[0].status.hops.len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn home_writes_racing_each_other_leave_the_latest_status() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(HostStore::open(dir.path()).unwrap());
    // The status in memory, changed by each writer before it stores whatever is latest.
    let latest = Arc::new(std::sync::Mutex::new(0u64));
    let status = |n: u64| HomeRow {
        status: home_status(n),
        held_end: None,
    };
    let write = move |n: u64| HomeWrite {
        row: status(n),
        hops: Vec::new(),
    };
    let writers: Vec<_> = (0..4)
        .map(|_| {
            let (store, latest) = (store.clone(), latest.clone());
            tokio::spawn(async move {
                for _ in 0..50 {
                    *latest.lock().unwrap() += 1;
                    let latest = latest.clone();
                    store
                        .put_home_latest(move || {
                            let n = *latest.lock().ok()?;
                            Some((write(n), n))
                        })
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for writer in writers {
        writer.await.unwrap();
    }
    assert_eq!(rows(&store), [status(200)]);
}

#[tokio::test]
async fn a_forward_keeps_its_report_and_removes_a_departure_file_only_once_durable() {
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentId([7; 16]);
    let large = vec![7u8; INLINE_IMAGE + 1];
    let report = PendingReport {
        home: "siteA".into(),
        agent,
        event: LaunchEvent::HopFailed {
            site: "siteB".into(),
            error: "test".into(),
        },
    };
    {
        let store = HostStore::open(dir.path()).unwrap();
        store
            .keep_agent(&agent, &[&large], |image| AgentRecord::Departing {
                seq: 3,
                to: "siteC".into(),
                image,
            })
            .await
            .unwrap();
        let forwarded = AgentRecord::Forwarded {
            seq: 3,
            to: "siteC".into(),
        };
        store
            .forward(&agent, &forwarded, Some(&report))
            .await
            .unwrap();
    }
    // Reopened (a clean close syncs, so this shows what was committed, not what a crash
    // keeps; the fault test `source-after-forward` crashes for real): the pointer and the
    // report are there, the departure's file is gone.
    let store = HostStore::open(dir.path()).unwrap();
    let images = std::fs::read_dir(dir.path().join("images")).map(Iterator::count);
    assert_eq!(images.ok(), Some(0));
    assert_eq!(
        store.agent(&agent).ok().flatten(),
        Some(AgentRecord::Forwarded {
            seq: 3,
            to: "siteC".into()
        })
    );
    let reports = store.reports().unwrap_or_default();
    assert_eq!(
        reports.iter().map(|(_, r)| r).collect::<Vec<_>>(),
        [&report]
    );
    // Acknowledged: gone at once; the next lazy sync makes it so on disk.
    (store.remove_report(&reports[0].0).await).unwrap();
    assert!(store.reports().unwrap_or_default().is_empty());
    assert!(store.batch.lazy_pending());
    store.sync_lazy().await.unwrap();
    assert!(!store.batch.lazy_pending());
    drop(store);
    let store = HostStore::open(dir.path()).unwrap();
    assert!(store.reports().unwrap_or_default().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_all_commit_and_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Arc::new(HostStore::open(dir.path()).unwrap());
        let writers: Vec<_> = (0..8u8)
            .map(|w| {
                let store = store.clone();
                tokio::spawn(async move {
                    for index in 0..25 {
                        let entry = CallEntry {
                            seq: 1,
                            service: "corpus".into(),
                            request: [w; 32],
                            answer: None,
                        };
                        store.put_call(&AgentId([w; 16]), index, &entry).await?;
                    }
                    Ok::<(), StoreError>(())
                })
            })
            .collect();
        for writer in writers {
            let written = writer.await.unwrap_or_else(|_| panic!("writer panicked"));
            assert!(written.is_ok(), "{written:?}");
        }
    }
    let store = HostStore::open(dir.path()).unwrap();
    assert_eq!(store.visits().unwrap_or_default().len(), 8 * 25);
}

#[tokio::test]
async fn records_and_images_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let agent = AgentId([6; 16]);
    {
        let store = HostStore::open(dir.path()).unwrap();
        store
            .commit_arrival(&agent, 4, b"the image", None)
            .await
            .unwrap();
    }
    let store = HostStore::open(dir.path()).unwrap();
    let residents = store.residents().unwrap_or_default();
    let Some((id, AgentRecord::Resident { seq, image, .. })) = residents.first().cloned() else {
        panic!("no resident after reopen: {residents:?}");
    };
    assert_eq!((id, seq), (agent, 4));
    assert_eq!(store.image(&image).ok().as_deref(), Some(&b"the image"[..]));
    store
        .set_agent(
            &agent,
            &AgentRecord::Forwarded {
                seq: 5,
                to: "b".into(),
            },
        )
        .await
        .unwrap();
    assert!(
        store.image(&image).is_err(),
        "the image of an agent that left is deleted"
    );
    assert!(store.residents().unwrap_or_default().is_empty());
}

#[tokio::test]
async fn a_staged_image_is_a_file_only_once_committed_and_leftovers_go_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    let files = || {
        let mut names: Vec<String> = std::fs::read_dir(&images)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let big = vec![7u8; INLINE_IMAGE + 1];
    let agent = AgentId([8; 16]);
    {
        let store = HostStore::open(dir.path()).unwrap();
        let dropped = store.stage_image(&[&big]).unwrap();
        assert_eq!(files().len(), 1, "a large image is written when staged");
        drop(dropped);
        assert!(
            files().is_empty(),
            "an image dropped unnamed leaves no file"
        );

        let staged = store.stage_image(&[&big]).unwrap();
        store
            .commit_arrival(&agent, 1, &big, Some(staged))
            .await
            .unwrap();
        let image = match store.agent(&agent) {
            Ok(Some(AgentRecord::Resident { image, .. })) => image,
            other => panic!("not resident: {other:?}"),
        };
        assert_eq!(files(), vec![image.clone()]);
        assert_eq!(store.image(&image).ok(), Some(big.clone()));
        // What a crash between writing and naming a file leaves.
        let left = store.stage_image(&[&big]).unwrap();
        std::mem::forget(left);
        assert_eq!(files().len(), 2);
    }
    let store = HostStore::open(dir.path()).unwrap();
    let residents = store.residents().unwrap_or_default();
    assert_eq!(residents.len(), 1);
    let named = residents
        .first()
        .and_then(|(_, r)| r.image())
        .map(String::from);
    assert_eq!(
        files(),
        named.into_iter().collect::<Vec<_>>(),
        "the leftover is gone"
    );
}

#[tokio::test]
async fn an_image_file_is_named_by_the_digest_its_header_claims() {
    use crate::snapshot::{PAGE_SIZE, PageMap, PageRun};
    let dir = tempfile::tempdir().unwrap();
    let store = HostStore::open(dir.path()).unwrap();
    let pages = (INLINE_IMAGE / PAGE_SIZE + 2) as u32;
    let image = AgentImage {
        module: ModuleHash([3; 32]),
        memory_bytes: u64::from(pages).next_multiple_of(16) * PAGE_SIZE as u64,
        globals: Vec::new(),
        pages: PageMap {
            runs: vec![PageRun {
                start: 0,
                count: pages,
            }],
            data: crate::net::host::incompressible(pages as usize * PAGE_SIZE).into(),
        },
        context: crate::context::AgentContext::new("h", "o", Vec::new(), Default::default()),
    };
    let bytes = (image.encode(Default::default()).unwrap()).to_vec();
    assert!(bytes.len() > INLINE_IMAGE, "large enough for a file");
    let staged = store.stage_image(&[&bytes]).unwrap();
    let digest = blake3::Hash::from(image.digest()).to_hex();
    assert_eq!(staged.name, format!("{digest}.img"));
    // Given in the parts it was encoded in, it is the same file under the same name.
    let parts = image.encode(Default::default()).unwrap();
    let again = store.stage_image(&parts.parts()).unwrap();
    assert_eq!(again.name, staged.name);
    let written = |s: &Staged| s.file.as_ref().and_then(|f| std::fs::read(f).ok());
    assert_eq!(written(&again), Some(bytes.clone()));
    assert_eq!(written(&again), written(&staged));
    let junk: [&[u8]; 2] = [b"not an ", b"image"];
    let other = store.stage_image(&junk).unwrap();
    assert_eq!(
        other.name,
        format!("{}.img", blake3::hash(b"not an image").to_hex())
    );
}
