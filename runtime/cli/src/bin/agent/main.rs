//! `agent`: the user's and agent author's command line.

mod agents;
mod connection;
mod demo;
mod format;
mod launch;
mod local;
mod new;
mod send;

use agent_runtime::builder;
use anyhow::Context as _;
use clap::{Parser, Subcommand};
use connection::Connection;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

/// How `agent` exits, shown by `--help`.
const EXIT_STATUS: &str = "Exit status: 0 when the command succeeded (for run and launch: the \
agent returned Ok); 1 when the agent ended in an error or failed (run, launch); 2 when the \
command could not do its work: bad arguments, a module or launch refused, a host that cannot \
be reached, a missing certificate.";

/// Build and run WebAssembly mobile agents.
#[derive(Parser)]
#[command(version, about, long_about = None, after_help = EXIT_STATUS)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make a new agent crate in PATH that builds and runs as it is:
    /// `agent new hello && agent run $(agent build hello) --sites a,b`.
    New(new::NewArgs),
    /// Build an agent crate for wasm32-wasip1 (release); prints the module's path last.
    Build {
        /// Directory of the agent crate.
        crate_dir: PathBuf,
    },
    /// Run an agent on in-process virtual sites; every hop goes through a real snapshot,
    /// encode, decode and restore into an instance reset to the module's initial memory. A
    /// clone's children run beside their parent.
    #[command(after_help = EXIT_STATUS)]
    Run(RunArgs),
    /// Launch an agent on a host (its home) and follow it across hosts until it ends, printing
    /// its hops and the values it emits as they come, and its clones' children as they start
    /// and end (followed until they ended too).
    #[command(after_help = EXIT_STATUS)]
    Launch(LaunchArgs),
    /// Show one of your agents.
    Status {
        /// The agent's id.
        id: agent_runtime::AgentId,
        #[command(flatten)]
        conn: Connection,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List your agents launched on a host.
    List {
        #[command(flatten)]
        conn: Connection,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the hosts a host knows (itself first): address, state (up, suspect, down), CPU
    /// architecture, cores, and the load it last told (agents running and parked, CPU use,
    /// free memory). Hosts find each other by gossip: see docs/cluster.md.
    Hosts {
        #[command(flatten)]
        conn: Connection,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop one of your agents, wherever it runs, and every child it cloned.
    Kill {
        /// The agent's id.
        id: agent_runtime::AgentId,
        #[command(flatten)]
        conn: Connection,
    },
    /// Send a message to one of your agents, wherever it is: it takes it with `ctx.recv()`,
    /// once, in order with your other messages. Give the agent's home host (where it was
    /// launched) as --host.
    Send {
        /// The agent's id.
        id: agent_runtime::AgentId,
        /// The message, sent as a string.
        #[arg(required_unless_present = "json")]
        text: Option<String>,
        /// The message as a JSON value instead (the agent decodes it as any serde type).
        #[arg(long, value_name = "VALUE", conflicts_with = "text")]
        json: Option<String>,
        #[command(flatten)]
        conn: Connection,
    },
    /// Measure the link between a host and one of its peers: the host sends incompressible
    /// data to the peer the way an agent's image travels.
    Probe {
        /// The peer to send to.
        #[arg(long)]
        to: String,
        /// How much to send, in MiB.
        #[arg(long, default_value_t = 64)]
        mib: u64,
        #[command(flatten)]
        conn: Connection,
    },
    /// Start three real hosts on loopback and send the search agent across them.
    Demo(demo::DemoArgs),
}

#[derive(clap::Args)]
struct LaunchArgs {
    /// The agent module (.wasm).
    module: PathBuf,
    /// Sites to visit, comma-separated (the agent's itinerary): names, or places such as
    /// `any` and `least-loaded:arch=aarch64`. Without it the itinerary is empty: the agent
    /// starts on the host and goes only where its own code sends it.
    #[arg(long, value_delimiter = ',', value_name = "SITES")]
    hop: Vec<String>,
    /// Argument for the agent, repeatable.
    #[arg(long = "arg", value_name = "KEY=VALUE", value_parser = parse_kv)]
    args: Vec<(String, String)>,
    #[command(flatten)]
    conn: Connection,
    /// Print one JSON object with the result, the hops, the values emitted in order, and the
    /// children cloned.
    #[arg(long)]
    json: bool,
    /// Print only the result (or the error): no hops as they happen, no hop table.
    #[arg(long, short, conflicts_with = "json")]
    quiet: bool,
    /// Return once the home host started the agent, printing its id; it runs on (follow it
    /// with `agent status ID`).
    #[arg(long)]
    detach: bool,
}

#[derive(clap::Args)]
pub struct RunArgs {
    /// The agent module (.wasm).
    pub module: PathBuf,
    /// Sites to create and give the agent as its itinerary, comma-separated. The agent
    /// starts on one more site, `home`, and hops from there.
    #[arg(long, value_delimiter = ',', required = true)]
    pub sites: Vec<String>,
    /// Directory of site corpora: site X serves the documents under DIR/X/ (a site without
    /// a folder there has no documents).
    #[arg(long)]
    pub data: Option<PathBuf>,
    /// Sites of the itinerary that cannot be reached, comma-separated: a hop to one fails as
    /// when its host is down, to try how the agent copes.
    #[arg(long, value_delimiter = ',', value_name = "SITES")]
    pub unreachable: Vec<String>,
    /// Argument for the agent, repeatable.
    #[arg(long = "arg", value_name = "KEY=VALUE", value_parser = parse_kv)]
    pub args: Vec<(String, String)>,
    /// Also migrate at every safe point (service calls, checkpoints), not only on hops.
    #[arg(long)]
    pub migrate_every_safe_point: bool,
    /// Most memory the agent may use, in MiB.
    #[arg(long, default_value_t = 256)]
    pub max_memory_mib: u64,
    /// CPU budget of the agent, in seconds.
    #[arg(long, default_value_t = 60.0)]
    pub cpu_budget: f64,
    /// Where compiled modules are kept [default: ~/.cache/agent-runtime/modules].
    #[arg(long, conflicts_with = "no_disk_cache")]
    pub cache_dir: Option<PathBuf>,
    /// Keep compiled modules in memory only.
    #[arg(long)]
    pub no_disk_cache: bool,
    /// Print one JSON object with the result, the hops and the values emitted instead of text.
    #[arg(long)]
    pub json: bool,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected KEY=VALUE, got `{s}`")),
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::New(args) => new::new(&args).map(|dir| {
            eprintln!(
                "made {0}: try `agent run $(agent build {0}) --sites siteA,siteB`",
                dir.display()
            );
            ExitCode::SUCCESS
        }),
        Command::Build { crate_dir } => builder::build(&crate_dir)
            .map(|path| {
                println!("{}", path.display());
                ExitCode::SUCCESS
            })
            .map_err(anyhow::Error::from),
        Command::Run(args) => local::run(args),
        Command::Launch(args) => launch(args),
        Command::Status { id, conn, json } => {
            block_on(agents::status(&conn, id, json)).map(|()| ExitCode::SUCCESS)
        }
        Command::List { conn, json } => {
            block_on(agents::list(&conn, json)).map(|()| ExitCode::SUCCESS)
        }
        Command::Hosts { conn, json } => {
            block_on(agents::hosts(&conn, json)).map(|()| ExitCode::SUCCESS)
        }
        Command::Kill { id, conn } => block_on(agents::kill(&conn, id)).map(|()| ExitCode::SUCCESS),
        Command::Send {
            id,
            text,
            json,
            conn,
        } => send::body(text.as_deref(), json.as_deref())
            .and_then(|body| block_on(send::send(&conn, id, body)))
            .map(|()| ExitCode::SUCCESS),
        Command::Probe { to, mib, conn } => {
            block_on(agents::probe(&conn, &to, mib)).map(|()| ExitCode::SUCCESS)
        }
        Command::Demo(args) => demo::run(args),
    };
    result.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        ExitCode::from(2)
    })
}

fn block_on<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

fn launch(args: LaunchArgs) -> anyhow::Result<ExitCode> {
    let wasm = std::fs::read(&args.module)
        .with_context(|| format!("cannot read {}", args.module.display()))?;
    let submission = launch::Submission {
        wasm: &wasm,
        itinerary: args.hop,
        args: args.args.into_iter().collect::<BTreeMap<_, _>>(),
    };
    if args.detach {
        return block_on(launch::launch_detached(&args.conn, submission, args.json));
    }
    let show = match (args.json, args.quiet) {
        (true, _) => launch::Show::Json,
        (false, true) => launch::Show::Quiet,
        (false, false) => launch::Show::Text,
    };
    block_on(launch::launch(&args.conn, submission, show)).map(|(code, _)| code)
}
