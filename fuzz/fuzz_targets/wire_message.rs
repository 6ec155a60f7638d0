//! Protocol messages arrive from peers and users: decoding any frame as any message must return.
#![no_main]

use agent_runtime::net::messages::{
    LaunchEvent, OfferReply, Request, StatusReply, TransferReply, TransferStatus,
};
use agent_runtime::net::wire::decode_msg;
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOCATOR: agent_runtime_fuzz::Capped = agent_runtime_fuzz::Capped;

fuzz_target!(|data: &[u8]| {
    let _ = decode_msg::<Request>(data);
    let _ = decode_msg::<OfferReply>(data);
    let _ = decode_msg::<TransferReply>(data);
    let _ = decode_msg::<TransferStatus>(data);
    let _ = decode_msg::<LaunchEvent>(data);
    let _ = decode_msg::<StatusReply>(data);
});
