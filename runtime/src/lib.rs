//! Host runtime for WebAssembly mobile agents.
//!
//! An agent is a Wasm module built with `agent-sdk`. The path of one hop reads in order:
//! - [`modules`] admits the code segment: [`admission`] refuses what cannot be snapshotted,
//!   [`instrument`] exports hidden globals, then it compiles once and caches by hash;
//! - [`instance`] runs the agent in a sandbox ([`limits`], [`host_abi`] imports, [`services`])
//!   until a safe point, where the Wasm stack is empty;
//! - [`snapshot`] and [`image`] capture memory and globals into a portable, verified image;
//! - [`instance::AgentInstance::restore`] resumes the image in an instance holding the module's
//!   initial memory, anywhere: a fresh one, or one an agent left, reset ([`recycle`]).
//!
//! An agent returning to a host it left sends only the pages that host does not hold
//! ([`base`]).
//!
//! [`runner`] drives that loop across in-process virtual sites.

pub mod admission;
pub mod backoff;
pub mod base;
pub mod builder;
pub mod cluster;
pub mod context;
pub mod cpu;
mod direct;
pub mod driver;
pub mod engine;
pub mod faults;
pub mod globals;
mod host_abi;
pub mod image;
pub mod instance;
pub mod instrument;
pub mod limits;
pub mod log;
pub mod modules;
pub mod net;
pub mod prefault;
pub mod recycle;
pub mod runner;
pub mod services;
pub mod snapshot;
pub mod stacks;
pub(crate) mod state;
pub mod touched;

pub use context::{AgentContext, AgentId};
pub use image::{AgentImage, ImageError, ImageLimits};
pub use instance::{AgentError, AgentInstance, Step};
pub use limits::{LimitExceeded, Limits};
pub use modules::{AgentModule, ModuleCache, ModuleHash};
pub use services::{Corpus, Site};
pub use state::AgentFlags;
