//! `agent build`: compile an agent crate to a `.wasm` module with cargo.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The target agents are built for.
pub const TARGET: &str = "wasm32-wasip1";

/// Why an agent crate could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// No `Cargo.toml` in the directory.
    #[error("{0} has no Cargo.toml: give the directory of an agent crate")]
    NotACrate(PathBuf),
    /// The Rust target is missing.
    #[error("the {TARGET} target is not installed; install it with: rustup target add {TARGET}")]
    MissingTarget,
    /// cargo could not be started.
    #[error("cannot run cargo: {0}")]
    Cargo(std::io::Error),
    /// cargo reported errors.
    #[error("cargo build failed ({0}); see the errors above")]
    Failed(String),
    /// The module built could not be read back.
    #[error("cannot read the module built, {0}: {1}")]
    Read(PathBuf, std::io::Error),
    /// The module built is not an agent (the `agent!` macro is missing, say).
    #[error("{path}: {reason}")]
    NotAnAgent {
        /// The module built.
        path: PathBuf,
        /// What admission says.
        reason: crate::admission::AdmissionError,
    },
    /// The crate produced no Wasm module.
    #[error("{0} built no .wasm: add `[lib] crate-type = [\"cdylib\"]` to its Cargo.toml")]
    NoModule(PathBuf),
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

/// Whether the Rust standard library for [`TARGET`] is installed.
pub fn target_installed() -> bool {
    let Ok(out) = Command::new(std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into()))
        .args(["--print", "sysroot"])
        .output()
    else {
        return false;
    };
    let sysroot = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Path::new(&sysroot)
        .join("lib/rustlib")
        .join(TARGET)
        .join("lib")
        .is_dir()
}

/// Builds the agent crate in `dir` (release, [`TARGET`]) and returns the module's path.
/// cargo's progress and diagnostics go to stderr.
///
/// # Errors
/// [`BuildError`] saying what to do.
pub fn build(dir: &Path) -> Result<PathBuf, BuildError> {
    let manifest = dir.join("Cargo.toml");
    if !manifest.is_file() {
        return Err(BuildError::NotACrate(dir.to_path_buf()));
    }
    if !target_installed() {
        return Err(BuildError::MissingTarget);
    }
    let mut child = cargo()
        .args([
            "build",
            "--release",
            "--target",
            TARGET,
            "--message-format=json-render-diagnostics",
            "--manifest-path",
        ])
        .arg(&manifest)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(BuildError::Cargo)?;
    let wanted = manifest.canonicalize().unwrap_or(manifest.clone());
    let mut module = None;
    if let Some(stdout) = child.stdout.take() {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
                continue;
            };
            let own = msg["manifest_path"]
                .as_str()
                .is_some_and(|p| Path::new(p) == wanted);
            if msg["reason"] == "compiler-artifact" && own {
                let mut files = msg["filenames"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|f| f.as_str());
                if let Some(wasm) = files.rfind(|f| f.ends_with(".wasm")) {
                    module = Some(PathBuf::from(wasm));
                }
            }
        }
    }
    let status = child.wait().map_err(BuildError::Cargo)?;
    if !status.success() {
        return Err(BuildError::Failed(status.to_string()));
    }
    let module = module.ok_or_else(|| BuildError::NoModule(dir.to_path_buf()))?;
    // What a host would refuse is said now, not at the first launch.
    let wasm = std::fs::read(&module).map_err(|e| BuildError::Read(module.clone(), e))?;
    crate::admission::inspect(&wasm).map_err(|reason| BuildError::NotAnAgent {
        path: module.clone(),
        reason,
    })?;
    Ok(module)
}
