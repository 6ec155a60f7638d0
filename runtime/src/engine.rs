//! The wasmtime engine every agent of a host runs on, and the epoch clock that slices CPU time.

use std::thread;
use std::time::Duration;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// How often the epoch advances; the granularity of CPU accounting and preemption.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Most Wasm stack an agent may use; deeper recursion traps with a stack overflow.
pub const MAX_WASM_STACK: usize = 1 << 20;

/// Builds the host's engine and starts its epoch clock.
///
/// NaN canonicalization is on so an agent that stores a NaN carries the same bits whichever
/// CPU architecture computed it; epoch interruption lets the host bound and slice CPU use.
///
/// # Errors
/// When wasmtime rejects the configuration (for example on an unsupported CPU).
pub fn new_engine() -> wasmtime::Result<Engine> {
    start(base_config())
}

/// Most instances a pool holds: each slot reserves a 32-bit memory's 4 GiB of address space
/// (so that bounds checks stay in the guard pages), and 4096 of them, 16 TiB, leave most of a
/// 47-bit address space to the rest of the process.
pub const MAX_POOL_SLOTS: usize = 4096;

/// Builds a host's engine with a pool of `slots` instances whose memories may grow to
/// `max_memory` bytes: instantiating reuses a slot's mappings, stack and tables instead of
/// mapping and unmapping them, which on a busy host costs the kernel more than the agent.
///
/// # Errors
/// When wasmtime rejects the configuration, or cannot reserve the pool's address space.
pub fn new_pooled_engine(slots: u32, max_memory: u64) -> wasmtime::Result<Engine> {
    let mut pool = PoolingAllocationConfig::new();
    pool.total_core_instances(slots)
        .total_memories(slots)
        .total_tables(slots)
        .total_stacks(slots)
        .max_memory_size(usize::try_from(max_memory).unwrap_or(usize::MAX))
        // Small agents are reset with a memset of what they touched, not a madvise.
        .linear_memory_keep_resident(KEEP_RESIDENT)
        .table_keep_resident(KEEP_RESIDENT);
    let mut config = base_config();
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    start(config)
}

/// Bytes of a freed slot's memory and table reset by writing zeros instead of a system call.
const KEEP_RESIDENT: usize = 64 << 10;

fn base_config() -> Config {
    let mut config = Config::new();
    config
        .epoch_interruption(true)
        .cranelift_nan_canonicalization(true)
        .wasm_memory64(false)
        .max_wasm_stack(MAX_WASM_STACK)
        .async_stack_size(MAX_WASM_STACK + (1 << 20));
    config
}

fn start(config: Config) -> wasmtime::Result<Engine> {
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
