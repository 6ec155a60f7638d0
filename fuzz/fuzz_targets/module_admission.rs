//! Agent modules arrive from users and other hosts: admission must judge any bytes and return.
//! (Compiling with wasmtime comes after admission and is too slow to fuzz here.)
#![no_main]

use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOCATOR: agent_runtime_fuzz::Capped = agent_runtime_fuzz::Capped;

fuzz_target!(|data: &[u8]| {
    let _ = agent_runtime::admission::inspect(data);
});
