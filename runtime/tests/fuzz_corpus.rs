//! The fuzz targets' corpora as regression tests: every input the fuzzers kept (the crashes they
//! found included, once fixed) goes through exactly what its target runs, and must come back,
//! refused or accepted, without a panic. See fuzz/README.md.

use agent_runtime::image::{AgentImage, DecodeOptions, ImageLimits};
use agent_runtime::net::messages::{
    LaunchEvent, OfferReply, Request, StatusReply, TransferReply, TransferStatus,
};
use agent_runtime::net::wire::decode_msg;
use std::path::{Path, PathBuf};

/// Runs `check` on every file in `fuzz/corpus/<target>/`.
fn each_input(target: &str, check: impl Fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()));
    files.sort();
    assert!(
        !files.is_empty(),
        "the corpus {} is empty: the test would pass without testing anything",
        dir.display()
    );
    for file in &files {
        let data =
            std::fs::read(file).unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        // A panic names the input, so it can be run again with `cargo fuzz run TARGET FILE`.
        eprintln!("{target}: {}", file.display());
        check(&data);
    }
}

/// Same as fuzz/fuzz_targets/image_decode.rs.
#[test]
fn image_decode() {
    each_input("image_decode", |data| {
        let _ = AgentImage::decode(data.to_vec(), &DecodeOptions::new(ImageLimits::default()));
    });
}

/// Same as fuzz/fuzz_targets/wire_message.rs.
#[test]
fn wire_message() {
    each_input("wire_message", |data| {
        let _ = decode_msg::<Request>(data);
        let _ = decode_msg::<OfferReply>(data);
        let _ = decode_msg::<TransferReply>(data);
        let _ = decode_msg::<TransferStatus>(data);
        let _ = decode_msg::<LaunchEvent>(data);
        let _ = decode_msg::<StatusReply>(data);
    });
}

/// Same as fuzz/fuzz_targets/module_admission.rs.
#[test]
fn module_admission() {
    each_input("module_admission", |data| {
        let _ = agent_runtime::admission::inspect(data);
    });
}
