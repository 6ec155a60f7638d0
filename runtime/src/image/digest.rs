//! An image's digest: BLAKE3 over the canonical image, the same whether the pages were
//! compressed, sent raw, read in place or filled in from a base.

use super::format::FORMAT_VERSION;
use super::{AgentImage, GlobalValue, ImageError};
use crate::context::AgentContext;
use crate::modules::ModuleHash;
use crate::snapshot::PageRun;

/// Pages of at least this many bytes are hashed on all cores: hashing a large body on one
/// core is on the critical path of both ends of a hop.
const PARALLEL_DIGEST: usize = 1 << 20;

/// An image's digest, fed in its canonical order: format, module, memory size and runs, then
/// the pages (in as many pieces as they come), then the globals and the context.
#[derive(Clone)]
pub(super) struct Digest(blake3::Hasher);

impl Digest {
    pub(super) fn new(module: &ModuleHash, memory_bytes: u64, runs: &[PageRun]) -> Self {
        let mut h = blake3::Hasher::new();
        h.update(&FORMAT_VERSION.to_le_bytes());
        h.update(&module.0);
        h.update(&memory_bytes.to_le_bytes());
        for run in runs {
            h.update(&run.start.to_le_bytes());
            h.update(&run.count.to_le_bytes());
        }
        Digest(h)
    }

    pub(super) fn pages(&mut self, data: &[u8]) {
        if data.len() >= PARALLEL_DIGEST {
            self.0.update_rayon(data);
        } else {
            self.0.update(data);
        }
    }

    pub(super) fn finish(mut self, globals: &[GlobalValue], context: &AgentContext) -> [u8; 32] {
        for g in globals {
            self.0.update(&g.index.to_le_bytes());
            self.0.update(&[g.kind as u8]);
            self.0.update(&g.bits.to_le_bytes());
        }
        let mut cbor = Vec::new();
        // Encoding into a Vec cannot fail for this plain data type.
        let _ = ciborium::into_writer(context, &mut cbor);
        self.0.update(&cbor);
        *self.0.finalize().as_bytes()
    }
}

impl AgentImage {
    /// BLAKE3 over the canonical image: memory size, runs, pages, globals and context.
    pub fn digest(&self) -> [u8; 32] {
        let mut digest = Digest::new(&self.module, self.memory_bytes, &self.pages.runs);
        digest.pages(&self.pages.data);
        digest.finish(&self.globals, &self.context)
    }
}

/// A decoded image whose digest is not checked yet ([`super::Verify::Later`]).
pub struct Unverified {
    image: AgentImage,
    claimed: [u8; 32],
}

impl Unverified {
    /// `image`, whose header claims the digest `claimed`.
    pub(super) fn new(image: AgentImage, claimed: [u8; 32]) -> Self {
        Unverified { image, claimed }
    }

    /// Hashes the image and compares the digest with the one its header claims.
    ///
    /// # Errors
    /// [`ImageError::HashMismatch`] when they differ.
    pub fn check(&self) -> Result<(), ImageError> {
        check_digest(&self.image, &self.claimed)
    }
}

/// Whether `image` hashes to the digest its header `claimed`.
pub(super) fn check_digest(image: &AgentImage, claimed: &[u8; 32]) -> Result<(), ImageError> {
    match image.digest() == *claimed {
        true => Ok(()),
        false => Err(ImageError::HashMismatch),
    }
}
