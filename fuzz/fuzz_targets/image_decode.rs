//! Agent images arrive from other hosts and from disk: decoding any bytes must return.
#![no_main]

use agent_runtime::image::{AgentImage, DecodeOptions, ImageLimits};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOCATOR: agent_runtime_fuzz::Capped = agent_runtime_fuzz::Capped;

fuzz_target!(|data: &[u8]| {
    let _ = AgentImage::decode(data.to_vec(), &DecodeOptions::new(ImageLimits::default()));
});
