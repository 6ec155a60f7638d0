//! `agent new`: a new agent crate that builds and runs as it is.

use anyhow::{Context as _, bail};
use std::path::{Path, PathBuf};

/// Where the SDK was when this command was built: a crate made here depends on it by path.
const SDK_AT_BUILD: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../agent-sdk");

#[derive(clap::Args)]
pub struct NewArgs {
    /// Directory to make; its last part is the crate's name (letters, digits, `-`, `_`).
    pub path: PathBuf,
    /// The agent-sdk directory to depend on [default: the one this command was built from].
    #[arg(long, value_name = "DIR")]
    pub sdk: Option<PathBuf>,
}

/// Makes the crate; returns its directory.
pub fn new(args: &NewArgs) -> anyhow::Result<PathBuf> {
    let name = crate_name(&args.path)?;
    if args.path.exists()
        && args
            .path
            .read_dir()
            .map_or(true, |mut d| d.next().is_some())
    {
        bail!(
            "{} already exists and is not an empty directory",
            args.path.display()
        );
    }
    let sdk = sdk_dir(args.sdk.as_deref())?;
    let src = args.path.join("src");
    std::fs::create_dir_all(&src).with_context(|| format!("cannot create {}", src.display()))?;
    let files = [
        (args.path.join("Cargo.toml"), cargo_toml(&name, &sdk)),
        (src.join("lib.rs"), LIB_RS.replace("{name}", &name)),
        (
            args.path.join("README.md"),
            README
                .replace("{name}", &name)
                .replace("{dir}", &args.path.display().to_string()),
        ),
        (args.path.join(".gitignore"), "/target\n".to_string()),
    ];
    for (path, text) in files {
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(args.path.clone())
}

/// The crate's name: the directory's last part, if cargo would take it.
fn crate_name(path: &Path) -> anyhow::Result<String> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default()
        .to_string();
    let valid = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && name.starts_with(|c: char| c.is_ascii_alphabetic());
    if !valid {
        bail!(
            "`{name}` cannot name a crate: use letters, digits, `-` and `_`, starting with a letter"
        );
    }
    Ok(name)
}

fn sdk_dir(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let dir = given.unwrap_or(Path::new(SDK_AT_BUILD));
    let found = dir
        .join("Cargo.toml")
        .is_file()
        .then(|| dir.canonicalize().ok())
        .flatten();
    match (found, given) {
        (Some(dir), _) => Ok(dir),
        (None, Some(_)) => bail!("{} is not the agent-sdk crate's directory", dir.display()),
        (None, None) => bail!(
            "the agent-sdk sources are no longer at {}, where this command was built: give their \
             directory with --sdk DIR",
            dir.display()
        ),
    }
}

fn cargo_toml(name: &str, sdk: &Path) -> String {
    // TOML basic strings escape backslashes and quotes; a path has no other specials.
    let sdk = sdk
        .display()
        .to_string()
        .replace('\\', "\\\\")
        .replace('"', "\\\"");
    format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2024"
publish = false

# An agent is a Wasm module: `agent build .` compiles it for wasm32-wasip1.
[lib]
crate-type = ["cdylib"]

[dependencies]
agent-sdk = {{ path = "{sdk}" }}

[profile.release]
opt-level = "s"
debug = false

# A workspace of its own, so that it builds wherever it is made.
[workspace]
"#
    )
}

const LIB_RS: &str = r#"//! {name}: visits each site of its itinerary, asks each host what it is, and brings the
//! answers home. Every `.await` on `ctx` is a point where the host may move the agent; it
//! resumes on the next line, on the next host, with its variables intact.

use agent_sdk::Context;
use agent_sdk::services::{HOST_INFO, HostInfo};

async fn tour(ctx: Context) -> Result<Vec<String>, String> {
    let mut seen = Vec::new();
    for site in ctx.itinerary() {
        match ctx.hop(&site).await {
            Ok(()) => {
                let info: HostInfo = ctx.call(HOST_INFO, &()).await.map_err(|e| e.to_string())?;
                seen.push(format!("{} ({}, {} documents)", info.site, info.arch, info.documents));
            }
            Err(e) => ctx.warn(format!("skipping {site}: {e}")),
        }
    }
    // The result goes to whoever launched the agent.
    Ok(seen)
}

// The agent's entry: without this line the module is not an agent.
agent_sdk::agent!(tour);
"#;

const README: &str = r#"# {name}

A mobile agent. Build it and run it on two virtual sites:

```sh
agent run $(agent build {dir}) --sites siteA,siteB
```

Or launch it on real hosts (see the runtime's README): `agent launch $(agent build {dir}) --hop siteA,siteB`.
The SDK's guide (agent-sdk/README.md) lists what `ctx` offers.
"#;
