//! Hostile agents are stopped by the limits with a clear error, and the runner stays healthy.

use agent_e2e::{block_on, example, launch, run, runner, search_sites};
use agent_runtime::engine::new_pooled_engine;
use agent_runtime::runner::{LocalRunner, Migration};
use agent_runtime::{AgentContext, AgentError, AgentInstance, LimitExceeded, Limits, ModuleCache};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

fn error_of(limits: Limits, mode: &str) -> AgentError {
    let r = runner(limits);
    let report = run(
        &r,
        &example("hostile"),
        launch(&[], &[("mode", mode)]),
        Migration::OnlyHops,
    );
    let error = report
        .outcome
        .expect_err("the hostile agent must not succeed");
    // The same runner still runs a well-behaved agent.
    let ok = run(
        &r,
        &example("search"),
        launch(&["siteA"], &[("query", "host")]),
        Migration::OnlyHops,
    );
    assert!(
        ok.outcome.is_ok(),
        "runner unhealthy after {mode}: {:?}",
        ok.outcome
    );
    error
}

#[test]
fn a_memory_bomb_hits_the_memory_limit() {
    let limits = Limits {
        max_memory: 32 << 20,
        ..Limits::default()
    };
    match error_of(limits, "bomb") {
        AgentError::Limit(LimitExceeded::Memory { limit, wanted }) => {
            assert_eq!(limit, 32 << 20);
            assert!(wanted > limit);
        }
        other => panic!("expected the memory limit, got {other}"),
    }
    let message = AgentError::Limit(LimitExceeded::Memory {
        limit: 32 << 20,
        wanted: 33 << 20,
    })
    .to_string();
    assert_eq!(
        message,
        "memory limit of 32 MiB exceeded: the agent asked for 33 MiB"
    );
}

#[test]
fn an_infinite_loop_without_safe_points_exhausts_the_cpu_budget() {
    let budget = Duration::from_millis(300);
    let limits = Limits {
        cpu_budget: budget,
        ..Limits::default()
    };
    assert_eq!(
        error_of(limits, "loop"),
        AgentError::Limit(LimitExceeded::Cpu { budget })
    );
}

#[test]
fn an_infinite_loop_with_checkpoints_exhausts_the_cpu_budget_too() {
    let budget = Duration::from_millis(300);
    let limits = Limits {
        cpu_budget: budget,
        slice: Duration::from_millis(20),
        ..Limits::default()
    };
    assert_eq!(
        error_of(limits, "spin"),
        AgentError::Limit(LimitExceeded::Cpu { budget })
    );
}

#[test]
fn deep_recursion_panics_and_failures_are_reported() {
    // Rust keeps its data stack in linear memory: deep recursion runs off its bottom (an
    // out-of-bounds access) or exhausts the Wasm stack, whichever comes first.
    match error_of(Limits::default(), "recurse") {
        AgentError::StackOverflow => {}
        AgentError::Trap(why) => assert_eq!(why, "wasm trap: out of bounds memory access"),
        other => panic!("expected a stack overflow, got {other}"),
    }
    match error_of(Limits::default(), "panic") {
        AgentError::Panicked(message) => assert!(
            message.starts_with("the agent gave up on purpose at "),
            "{message}"
        ),
        other => panic!("expected a panic, got {other}"),
    }
    assert_eq!(
        error_of(Limits::default(), "fail"),
        AgentError::Failed("the agent failed on purpose".into())
    );
}

#[test]
fn a_pool_of_two_slots_gives_them_back_and_refuses_a_third_agent_at_once_clearly() {
    let limits = Limits {
        max_memory: 64 << 20,
        ..Limits::default()
    };
    let engine = new_pooled_engine(2, limits.max_memory).unwrap_or_else(|e| panic!("{e}"));
    let modules = ModuleCache::new(&engine, None).unwrap_or_else(|e| panic!("{e}"));
    let module = modules
        .admit(&example("search"))
        .unwrap_or_else(|e| panic!("{e}"));
    let site = Arc::new(search_sites().remove(0));
    let start = || {
        let context = AgentContext::new("siteA", "test", Vec::new(), BTreeMap::new());
        AgentInstance::launch(module.clone(), site.clone(), context, &limits)
    };
    block_on(async {
        let first = start().await.unwrap_or_else(|e| panic!("{e}"));
        let _second = start().await.unwrap_or_else(|e| panic!("{e}"));
        let error = start().await.err().map(|e| e.to_string());
        let error = error.unwrap_or_else(|| panic!("a third instance fitted in two slots"));
        assert!(
            error.starts_with("cannot instantiate the agent") && error.contains("limit"),
            "{error}"
        );
        drop(first);
        start()
            .await
            .unwrap_or_else(|e| panic!("a freed slot was not reused: {e}"));
    });
    // Every hop restores the agent into a new instance: a run of many hops needs the slots
    // its earlier instances gave back.
    let runner = LocalRunner::new(modules, search_sites(), limits);
    for _ in 0..3 {
        let report = run(
            &runner,
            &example("search"),
            launch(&["siteA", "siteB", "siteC"], &[("query", "host")]),
            Migration::EverySafePoint,
        );
        assert!(report.outcome.is_ok(), "{:?}", report.outcome);
    }
}
