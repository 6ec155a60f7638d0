//! The agent image: a self-describing, versioned snapshot of an agent at a safe point.
//!
//! An image is a header ([`format`]: the format version, the module hash, memory size,
//! mutable globals as bits, the page runs, the agent context and the image's [`digest`]),
//! then a body: the carried pages ([`PageMap`]), compressed unless that gains too little
//! ([`compression`]). An image sent to a host that holds an earlier image of the same agent
//! may leave out the pages that host holds (see [`crate::base`]); its header then names them
//! and the body holds only the rest.
//!
//! [`AgentImage::encode`] writes an image; [`AgentImage::decode`] reads an untrusted one.

mod compression;
mod decode;
mod digest;
mod encode;
mod format;

pub use crate::globals::GlobalValue;
pub use compression::Compression;
pub use decode::{BasePages, DecodeOptions, Decoded, Verify};
pub use digest::Unverified;
pub use encode::{EncodeOptions, Encoded, InPlace, LeaveOut};
pub use format::{FORMAT_VERSION, Layout};

use crate::context::AgentContext;
use crate::modules::ModuleHash;
use crate::snapshot::{PageMap, PagesError};

/// An agent captured at a safe point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentImage {
    /// Hash of the (uninstrumented) module the agent runs.
    pub module: ModuleHash,
    /// Size of linear memory in bytes (a multiple of 64 KiB).
    pub memory_bytes: u64,
    /// Every mutable global of the module.
    pub globals: Vec<GlobalValue>,
    /// The pages that differ from the module's initial image.
    pub pages: PageMap,
    /// The runtime's record of the agent.
    pub context: AgentContext,
}

/// Bounds applied while decoding an untrusted image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ImageLimits {
    /// Largest memory an image may describe.
    pub max_memory: u64,
    /// Largest header, in bytes.
    pub max_header: usize,
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits {
            max_memory: 4 << 30,
            max_header: 4 << 20,
        }
    }
}

/// Why an image could not be read or used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    /// The bytes do not start with the image magic.
    #[error("not an agent image (bad magic)")]
    NotAnImage,
    /// The bytes end before the image does.
    #[error("truncated image: {0}")]
    Truncated(String),
    /// Bytes after the end of the image.
    #[error("{0} unexpected bytes after the end of the image")]
    TrailingBytes(u64),
    /// The image was written by a runtime with another format version.
    #[error("image format v{found} is not supported (this runtime reads v{supported})")]
    VersionSkew {
        /// Version in the image.
        found: u32,
        /// Version this runtime reads.
        supported: u32,
    },
    /// The header is larger than the limit.
    #[error("image header of {size} bytes exceeds the limit of {limit} bytes")]
    HeaderTooLarge {
        /// Declared size.
        size: u64,
        /// Limit.
        limit: u64,
    },
    /// The header is not valid CBOR for an image header.
    #[error("malformed image header: {0}")]
    BadHeader(String),
    /// The image describes more memory than allowed.
    #[error("image memory of {size} bytes exceeds the limit of {limit} bytes")]
    MemoryTooLarge {
        /// Declared size.
        size: u64,
        /// Limit.
        limit: u64,
    },
    /// The page runs do not fit the memory.
    #[error("bad page map: {0}")]
    BadPages(#[from] PagesError),
    /// The body could not be decompressed to the size the page map implies.
    #[error("corrupt image body: {0}")]
    CorruptBody(String),
    /// The image leaves out pages of a base image the reader does not hold.
    #[error("the image leaves out pages of the agent's image of hop {0}, which is not held here")]
    NeedsBase(u64),
    /// The content does not match the hash in the header.
    #[error("image hash mismatch: the image was corrupted or tampered with")]
    HashMismatch,
    /// The image belongs to another module.
    #[error("image is for module {image}, not {module}")]
    WrongModule {
        /// Module hash in the image.
        image: String,
        /// Module it was restored into.
        module: String,
    },
    /// The globals do not match the module's mutable globals.
    #[error("image globals do not match the module: {0}")]
    GlobalsMismatch(String),
}

#[cfg(test)]
mod tests;
