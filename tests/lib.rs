//! Helpers for the end-to-end tests: real agents built from `examples/`, the real `agent`
//! binary, and runners over real corpora.

use agent_runtime::engine::new_engine;
use agent_runtime::runner::{Launch, LocalRunner, Migration, RunReport};
use agent_runtime::{Corpus, Limits, ModuleCache, Site};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The repository's root directory.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new(".."))
        .to_path_buf()
}

/// Builds every example agent once per test process and returns the module `name`.
pub fn example(name: &str) -> Vec<u8> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let manifest = repo().join("examples/Cargo.toml");
        let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .args([
                "build",
                "--release",
                "--workspace",
                "--target",
                agent_runtime::builder::TARGET,
                "--manifest-path",
            ])
            .arg(&manifest)
            .status()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        if !status.success() {
            return Err(format!("building the examples failed: {status}"));
        }
        Ok(repo()
            .join("examples/target")
            .join(agent_runtime::builder::TARGET)
            .join("release"))
    });
    let dir = dir.as_ref().unwrap_or_else(|e| panic!("{e}"));
    let path = dir.join(format!("{name}.wasm"));
    std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The `agent` binary built by `cargo test --workspace` beside this test.
pub fn agent_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("AGENT_BIN") {
        return bin.into();
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("."));
    let bin = dir.join("agent");
    assert!(
        bin.is_file(),
        "{} is missing: run the tests with `cargo test --workspace`",
        bin.display()
    );
    bin
}

/// The three sites of the search example, with their corpora.
pub fn search_sites() -> Vec<Site> {
    ["siteA", "siteB", "siteC"]
        .iter()
        .map(|name| {
            let dir = repo().join("examples/search/sites").join(name);
            Site::new(name, Corpus::load(&dir).unwrap_or_else(|e| panic!("{e}")))
        })
        .collect()
}

/// A runner over the search sites with the given limits and no disk cache.
pub fn runner(limits: Limits) -> LocalRunner {
    let engine = new_engine().unwrap_or_else(|e| panic!("{e}"));
    let modules = ModuleCache::new(&engine, None).unwrap_or_else(|e| panic!("{e}"));
    LocalRunner::new(modules, search_sites(), limits)
}

/// A launch with this itinerary and these `key=value` arguments.
pub fn launch(itinerary: &[&str], args: &[(&str, &str)]) -> Launch {
    Launch {
        itinerary: itinerary.iter().map(|s| s.to_string()).collect(),
        args: args
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        owner: "test".into(),
    }
}

/// Runs an agent to its end on a fresh current-thread tokio runtime.
pub fn run(runner: &LocalRunner, wasm: &[u8], launch: Launch, migration: Migration) -> RunReport {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    rt.block_on(runner.run(wasm, launch, migration, &mut |_| {}))
        .unwrap_or_else(|e| panic!("{e}"))
}
