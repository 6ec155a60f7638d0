//! The wasmtime engine every agent of a host runs on, and the epoch clock that slices CPU time.

use crate::stacks::StackPool;
use std::sync::Arc;
use std::thread;
use std::time::Duration;
use wasmtime::{Config, Engine};

/// How often the epoch advances; the granularity of CPU accounting and preemption.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Most Wasm stack an agent may use; deeper recursion traps with a stack overflow.
pub const MAX_WASM_STACK: usize = 1 << 20;

/// Builds the host's engine and starts its epoch clock.
///
/// NaN canonicalization is on so an agent that stores a NaN carries the same bits whichever
/// CPU architecture computed it; epoch interruption lets the host bound and slice CPU use.
/// Fiber stacks are reused across instances ([`StackPool`]).
///
/// # Errors
/// When wasmtime rejects the configuration (for example on an unsupported CPU).
pub fn new_engine() -> wasmtime::Result<Engine> {
    let mut config = Config::new();
    config
        .epoch_interruption(true)
        .cranelift_nan_canonicalization(true)
        .wasm_memory64(false)
        .max_wasm_stack(MAX_WASM_STACK)
        .async_stack_size(MAX_WASM_STACK + (1 << 20))
        .with_host_stack(Arc::new(StackPool::default()));
    let engine = Engine::new(&config)?;
    let weak = engine.weak();
    // The clock holds only a weak handle: it stops once the last engine clone is dropped.
    thread::Builder::new()
        .name("agent-epoch".into())
        .spawn(move || {
            while let Some(engine) = weak.upgrade() {
                engine.increment_epoch();
                drop(engine);
                thread::sleep(EPOCH_TICK);
            }
        })
        .map_err(|e| wasmtime::Error::msg(format!("could not start the epoch clock: {e}")))?;
    Ok(engine)
}
