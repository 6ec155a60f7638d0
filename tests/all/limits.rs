//! Hostile agents are stopped by the limits with a clear error, and the runner stays healthy.

use agent_e2e::{example, launch, run, runner};
use agent_runtime::runner::Migration;
use agent_runtime::{AgentError, LimitExceeded, Limits};
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
        "memory limit of 32 MiB exceeded: the agent asked to grow its memory to 33 MiB"
    );
    // One page over the limit does not read as the limit itself.
    let message = LimitExceeded::Memory {
        limit: 256 << 20,
        wanted: (256 << 20) + (64 << 10),
    }
    .to_string();
    assert!(message.ends_with("to 256.06 MiB"), "{message}");
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
