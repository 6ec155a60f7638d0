//! Restoring images: the wrong module or wrong globals are refused, and compiled code is kept
//! on disk so a restart does not compile again.

use agent_e2e::block_on;
use agent_e2e::{example, search_sites};
use agent_runtime::engine::new_engine;
use agent_runtime::instance::{AgentInstance, Step};
use agent_runtime::{AgentContext, AgentError, ImageError, Limits, ModuleCache};
use std::sync::Arc;

#[test]
fn an_image_only_restores_into_its_own_module() {
    let engine = new_engine().unwrap();
    let cache = ModuleCache::new(&engine, None).unwrap();
    let heap = cache.admit(&example("heap")).unwrap();
    let spin = cache.admit(&example("spin")).unwrap();
    let site = Arc::new(search_sites().remove(0));
    let limits = Limits::default();
    block_on(async {
        let context = AgentContext::new("home", "test", vec![], Default::default());
        let mut agent = AgentInstance::launch(heap.clone(), site.clone(), context, &limits)
            .await
            .unwrap();
        agent.request_checkpoint();
        assert!(matches!(
            agent.poll().await,
            Ok(Step::Suspended(agent_abi::Op::Checkpoint))
        ));
        let image = agent.capture();

        let wrong =
            AgentInstance::restore(spin.clone(), site.clone(), image.clone(), &limits).await;
        assert!(matches!(
            wrong,
            Err(AgentError::Image(ImageError::WrongModule { .. }))
        ));

        let mut bad_globals = image.clone();
        bad_globals.globals.pop();
        let wrong = AgentInstance::restore(heap.clone(), site.clone(), bad_globals, &limits).await;
        assert!(matches!(
            wrong,
            Err(AgentError::Image(ImageError::GlobalsMismatch(_)))
        ));

        let mut outside = image.clone();
        outside.pages.runs.push(agent_runtime::snapshot::PageRun {
            start: (image.memory_bytes / 4096) as u32,
            count: 1,
        });
        outside.pages.data = [&outside.pages.data[..], &[1u8; 4096]].concat().into();
        let wrong = AgentInstance::restore(heap.clone(), site.clone(), outside, &limits).await;
        assert!(matches!(
            wrong,
            Err(AgentError::Image(ImageError::BadPages(_)))
        ));

        let small = Limits {
            max_memory: 1 << 20,
            ..Limits::default()
        };
        let wrong = AgentInstance::restore(heap.clone(), site.clone(), image.clone(), &small).await;
        assert!(
            matches!(wrong, Err(AgentError::Limit(_))),
            "{wrong:?}",
            wrong = wrong.err()
        );

        // An instance made ready before the image came refuses another module's image.
        let prepare = |module: &Arc<agent_runtime::AgentModule>| {
            let context = AgentContext::new("elsewhere", "test", vec![], Default::default());
            let runs = image.pages.runs.clone();
            AgentInstance::prepare(
                module.clone(),
                site.clone(),
                context,
                image.memory_bytes,
                runs,
                &limits,
            )
        };
        let ready = prepare(&spin).await.unwrap();
        assert!(matches!(
            AgentInstance::restore_into(ready, image.clone()),
            Err(AgentError::Image(ImageError::WrongModule { .. }))
        ));
        // Into its own, the image takes the prepared instance's place and context.
        let ready = prepare(&heap).await.unwrap();
        let prepared = AgentInstance::restore_into(ready, image.clone()).unwrap();
        assert_eq!(prepared.context().agent_id, image.context.agent_id);
        assert_eq!(prepared.context().home, "home");
        // Its pages written a piece at a time as they would arrive, then restored without them.
        let mut ready = prepare(&heap).await.unwrap();
        let (runs, body) = (&image.pages.runs, &image.pages.data);
        for (n, part) in body.chunks(5000).enumerate() {
            ready.write_pages(runs, n * 5000, part);
        }
        let written = AgentInstance::restore_written(ready, image.clone()).unwrap();
        assert!(!body.is_empty() && written.memory() == prepared.memory());

        // The untouched image still restores and finishes, the same either way.
        let fresh = AgentInstance::restore(heap, site.clone(), image, &limits)
            .await
            .unwrap();
        let mut outcomes = Vec::new();
        assert!(fresh.memory() == prepared.memory());
        for mut agent in [fresh, prepared, written] {
            agent.complete(agent_abi::OpResult::Checkpoint);
            outcomes.push(loop {
                match agent.poll().await {
                    Ok(Step::Suspended(_)) => agent.complete(agent_abi::OpResult::Checkpoint),
                    Ok(Step::Finished(outcome)) => break outcome,
                    Err(e) => panic!("{e}"),
                }
            });
        }
        assert!(
            matches!(outcomes[0], agent_abi::Outcome::Ok(_)),
            "{outcomes:?}"
        );
        assert_eq!(outcomes[0], outcomes[1]);
        assert_eq!(outcomes[0], outcomes[2]);
    });
}

#[test]
fn compiled_code_is_loaded_from_disk_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = example("spin");
    let engine = new_engine().unwrap();
    let first = ModuleCache::new(&engine, Some(dir.path().to_path_buf())).unwrap();
    first.admit(&wasm).unwrap();
    first.admit(&wasm).unwrap();
    assert_eq!((first.stats().compiled, first.stats().hits), (1, 1));

    let engine = new_engine().unwrap();
    let restarted = ModuleCache::new(&engine, Some(dir.path().to_path_buf())).unwrap();
    restarted.admit(&wasm).unwrap();
    assert_eq!(
        (
            restarted.stats().compiled,
            restarted.stats().loaded_from_disk
        ),
        (0, 1)
    );

    // A damaged file is noticed and the module compiled again.
    for entry in std::fs::read_dir(dir.path()).unwrap().flatten() {
        let mut bytes = std::fs::read(entry.path()).unwrap_or_default();
        let at = bytes.len() / 2;
        bytes[at] ^= 0xff;
        std::fs::write(entry.path(), bytes).unwrap();
    }
    let again = ModuleCache::new(&engine, Some(dir.path().to_path_buf())).unwrap();
    again.admit(&wasm).unwrap();
    assert_eq!(
        (again.stats().compiled, again.stats().loaded_from_disk),
        (1, 0)
    );
}

#[test]
fn a_module_importing_what_the_host_lacks_is_refused() {
    let engine = new_engine().unwrap();
    let cache = ModuleCache::new(&engine, None).unwrap();
    let wasm = wat_module(r#"(import "wasi_snapshot_preview1" "teleport" (func))"#);
    match cache.admit(&wasm) {
        Err(agent_runtime::admission::AdmissionError::Link(why)) => {
            assert!(why.contains("teleport"), "{why}")
        }
        other => panic!("expected a link error, got {other:?}"),
    }
}

fn wat_module(import: &str) -> Vec<u8> {
    let text = format!(
        r#"(module {import} (memory (export "memory") 1)
            (func (export "agent_start")) (func (export "agent_poll") (result i32) i32.const 1)
            (@custom "agent-abi" "\01\00\00\00"))"#
    );
    wat::parse_str(&text).unwrap()
}

#[test]
fn agents_of_one_new_module_arriving_at_once_compile_it_once() {
    let engine = new_engine().unwrap();
    let cache = Arc::new(ModuleCache::new(&engine, None).unwrap());
    let wasm = Arc::new(example("spin"));
    let admissions: Vec<_> = (0..4)
        .map(|_| {
            let (cache, wasm) = (cache.clone(), wasm.clone());
            std::thread::spawn(move || cache.admit(&wasm).map(|m| m.hash))
        })
        .collect();
    for admission in admissions {
        let admitted = admission.join().expect("admission panicked");
        assert!(admitted.is_ok(), "{admitted:?}");
    }
    let stats = cache.stats();
    assert_eq!((stats.compiled, stats.hits), (1, 3), "{stats:?}");
}

#[test]
fn a_checkpoint_flag_export_that_never_returns_is_stopped_by_the_cpu_budget() {
    // The host calls `agent_checkpoint_flag` when it instantiates an agent, also to restore
    // one that arrives: a hostile module must not hold the host there.
    let text = r#"(module (memory (export "memory") 1)
        (func (export "agent_start")) (func (export "agent_poll") (result i32) i32.const 1)
        (func (export "agent_checkpoint_flag") (result i32) (loop $l (br $l)) i32.const 0)
        (@custom "agent-abi" "\02\00\00\00"))"#;
    let wasm = wat::parse_str(text).unwrap();
    let engine = new_engine().unwrap();
    let cache = ModuleCache::new(&engine, None).unwrap();
    let module = cache.admit(&wasm).unwrap();
    let site = Arc::new(search_sites().remove(0));
    let context = AgentContext::new("siteA", "test", Vec::new(), Default::default());
    let limits = Limits {
        cpu_budget: std::time::Duration::from_millis(300),
        ..Limits::default()
    };
    let launched = block_on(AgentInstance::launch(module, site, context, &limits));
    match launched {
        Err(AgentError::Limit(limit)) => assert!(limit.to_string().contains("CPU"), "{limit}"),
        Err(other) => panic!("expected the CPU budget to stop it, got {other}"),
        Ok(_) => panic!("a module whose flag export never returns was launched"),
    }
}

/// `wasm` admitted by a cache of its own.
fn admitted(wasm: &[u8]) -> Arc<agent_runtime::AgentModule> {
    let engine = new_engine().unwrap();
    let cache = ModuleCache::new(&engine, None).unwrap();
    cache.admit(wasm).unwrap()
}

/// Runs `agent` to its next safe point, asking it to stop at its next checkpoint.
async fn to_safe_point(agent: &mut AgentInstance) {
    agent.request_checkpoint();
    match agent.poll().await {
        Ok(Step::Suspended(_)) => {}
        other => panic!("expected a safe point, got {other:?}"),
    }
}

/// Runs a restored agent to its end.
async fn to_end(mut agent: AgentInstance) -> agent_abi::Outcome {
    loop {
        agent.complete(agent_abi::OpResult::Checkpoint);
        match agent.poll().await {
            Ok(Step::Suspended(_)) => {}
            Ok(Step::Finished(outcome)) => return outcome,
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn an_instance_left_at_a_hop_is_reset_before_another_agent_is_restored_into_it() {
    let heap = admitted(&example("heap"));
    let site = Arc::new(search_sites().remove(0));
    let limits = Limits::default();
    let args = |pairs: &[(&str, &str)]| {
        let args = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        AgentContext::new("home", "test", vec![], args.collect())
    };
    block_on(async {
        // A: 64 KiB of random heap, then it leaves.
        let context = args(&[("steps", "2"), ("chunk_kib", "64")]);
        let mut a = AgentInstance::launch(heap.clone(), site.clone(), context, &limits)
            .await
            .unwrap();
        to_safe_point(&mut a).await;
        let image_a = a.capture();
        // It runs on after the capture and writes its second chunk before it leaves: those
        // pages too must not reach B.
        a.complete(agent_abi::OpResult::Checkpoint);
        to_safe_point(&mut a).await;
        // B: more memory (a 2 MiB buffer of zeros) but 4 KiB chunks, so that most pages A
        // wrote are pages B never wrote.
        let context = args(&[("steps", "3"), ("chunk_kib", "4"), ("zero_mib", "2")]);
        let mut b = AgentInstance::launch(heap.clone(), site.clone(), context, &limits)
            .await
            .unwrap();
        to_safe_point(&mut b).await;
        let image_b = b.capture();
        assert!(image_b.memory_bytes > image_a.memory_bytes);
        drop(b);

        assert_eq!(heap.idle_instances(), 0);
        a.retire();
        assert_eq!(heap.idle_instances(), 1, "A's instance is kept");
        let reused = AgentInstance::restore(heap.clone(), site.clone(), image_b.clone(), &limits)
            .await
            .unwrap();
        assert_eq!(heap.idle_instances(), 0, "B was restored into A's instance");
        let fresh = AgentInstance::restore(heap.clone(), site.clone(), image_b.clone(), &limits)
            .await
            .unwrap();
        // Nothing of A is left: the memory is B's, byte for byte, as in a fresh instance.
        assert!(reused.memory() == fresh.memory(), "A's pages leaked into B");
        assert_eq!(reused.context().agent_id, fresh.context().agent_id);

        let (reused, fresh) = (to_end(reused).await, to_end(fresh).await);
        assert!(matches!(fresh, agent_abi::Outcome::Ok(_)), "{fresh:?}");
        assert_eq!(reused, fresh);

        // An instance with more memory than an image is not used for it: memory.size would
        // differ.
        let b = AgentInstance::restore(heap.clone(), site.clone(), image_b, &limits)
            .await
            .unwrap();
        b.retire();
        assert_eq!(heap.idle_instances(), 1);
        let a = AgentInstance::restore(heap.clone(), site.clone(), image_a, &limits)
            .await
            .unwrap();
        assert_eq!(heap.idle_instances(), 1, "a fresh instance was made");
        assert!(matches!(to_end(a).await, agent_abi::Outcome::Ok(_)));
    });
}

#[test]
fn an_instance_of_a_module_with_passive_data_is_not_reused() {
    let site = Arc::new(search_sites().remove(0));
    let limits = Limits::default();
    // `data.drop` would empty the segment for good in that instance.
    for (items, kept) in [("", 1), (r#"(data "passive")"#, 0)] {
        let module = admitted(&wat_module(items));
        assert_eq!(module.facts.passive_data, kept == 0);
        block_on(async {
            let context = AgentContext::new("home", "test", vec![], Default::default());
            let agent = AgentInstance::launch(module.clone(), site.clone(), context, &limits)
                .await
                .unwrap();
            agent.retire();
        });
        assert_eq!(module.idle_instances(), kept, "{items}");
    }
}

#[test]
fn a_launch_takes_an_instance_an_agent_left_and_runs_as_in_a_fresh_one() {
    let heap = admitted(&example("heap"));
    let site = Arc::new(search_sites().remove(0));
    let limits = Limits::default();
    let context = || {
        let args = [("steps", "2"), ("chunk_kib", "1")];
        let args = args.iter().map(|(k, v)| (k.to_string(), v.to_string()));
        AgentContext::new("home", "test", vec![], args.collect())
    };
    block_on(async {
        let launch = || AgentInstance::launch(heap.clone(), site.clone(), context(), &limits);
        let mut left = launch().await.unwrap();
        to_safe_point(&mut left).await;
        assert_eq!(left.memory_bytes(), heap.facts.memory_bytes, "memory grew");
        left.retire();
        assert_eq!(heap.idle_instances(), 1);
        let mut reused = launch().await.unwrap();
        assert_eq!(
            heap.idle_instances(),
            0,
            "the launch took the kept instance"
        );
        let mut fresh = launch().await.unwrap();
        to_safe_point(&mut reused).await;
        to_safe_point(&mut fresh).await;
        let (reused, fresh) = (to_end(reused).await, to_end(fresh).await);
        assert!(matches!(fresh, agent_abi::Outcome::Ok(_)), "{fresh:?}");
        assert_eq!(reused, fresh);
    });
}

#[test]
fn a_kept_instance_has_its_globals_back_and_one_whose_agent_failed_is_not_kept() {
    // Its start traps unless the global reads as instantiated, then changes it.
    let wasm = wat::parse_str(
        r#"(module (memory (export "memory") 1) (global $g (mut i32) (i32.const 0))
            (func (export "agent_start")
                (if (global.get $g) (then unreachable)) (global.set $g (i32.const 1)))
            (func (export "agent_poll") (result i32) i32.const 1)
            (@custom "agent-abi" "\01\00\00\00"))"#,
    )
    .unwrap();
    let module = admitted(&wasm);
    let site = Arc::new(search_sites().remove(0));
    let limits = Limits::default();
    let context = || AgentContext::new("home", "test", vec![], Default::default());
    block_on(async {
        let launch = || AgentInstance::launch(module.clone(), site.clone(), context(), &limits);
        let first = launch().await.unwrap();
        first.retire();
        assert_eq!(module.idle_instances(), 1);
        let mut second = launch().await.expect("the global leaked");
        assert_eq!(module.idle_instances(), 0);
        // Its poll breaks the ABI (done without an outcome): not at a safe point, not kept.
        assert!(matches!(second.poll().await, Err(AgentError::Abi(_))));
        second.retire();
        assert_eq!(module.idle_instances(), 0);
    });
}
