//! Encoding an image: its header, then its body of pages, compressed unless a sample shows
//! zstd would gain too little; a body sent as it is shares the pages rather than copying them.

use super::AgentImage;
use super::compression::{Compression, incompressible};
use super::digest::Digest;
use super::format::LeftOut;
use crate::snapshot::PageRun;

/// How to encode an image ([`AgentImage::encode`]).
#[derive(Clone, Debug, Default)]
pub struct EncodeOptions {
    /// How hard to compress the body, by where the image goes.
    pub compression: Compression,
    /// Pages the reader holds already, which the body leaves out; `None`: the image stands
    /// alone.
    pub leave_out: Option<LeaveOut>,
}

/// Pages an image leaves out because its reader holds them in its image of the agent at hop
/// `base_seq` ([`crate::base`]).
#[derive(Clone, Debug)]
pub struct LeaveOut {
    pub(crate) base_seq: u64,
    /// The pages left out.
    pub(crate) runs: Vec<PageRun>,
    /// The other carried pages, in order: the body in place of the image's pages.
    pub(crate) rest: bytes::Bytes,
}

/// An encoded image in two parts, which read one after the other are its bytes: the prefix
/// and header, then the body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encoded {
    head: Vec<u8>,
    body: bytes::Bytes,
}

impl Encoded {
    /// Length of the encoded image in bytes.
    pub fn len(&self) -> usize {
        self.head.len() + self.body.len()
    }

    /// Whether it has no bytes (never true of an encoded image).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The prefix and header, then the body.
    pub fn parts(&self) -> [&[u8]; 2] {
        [&self.head, &self.body]
    }

    /// The prefix and header.
    pub fn head(&self) -> &[u8] {
        &self.head
    }

    /// The body, shared.
    pub fn body(&self) -> &bytes::Bytes {
        &self.body
    }

    /// The image in one buffer, mapped ahead for writing.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = crate::prefault::buffer(self.len());
        out.extend_from_slice(&self.head);
        out.extend_from_slice(&self.body);
        out
    }
}

/// An encoded image whose body is read where it lies: the pages of a suspended agent's
/// memory, which must not change while the image is in use (sent, stored). A large agent's
/// hop then sends and stores its pages without first copying them into a fresh buffer.
#[derive(Clone, Debug)]
pub struct InPlace<'m> {
    head: Vec<u8>,
    pages: Vec<&'m [u8]>,
}

impl InPlace<'_> {
    /// Length of the encoded image in bytes.
    pub fn len(&self) -> usize {
        self.head.len() + self.pages.iter().map(|p| p.len()).sum::<usize>()
    }

    /// Whether it has no bytes (never true of an encoded image).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The prefix and header, then each run of pages: read one after the other, the image.
    pub fn parts(&self) -> Vec<&[u8]> {
        std::iter::once(&self.head[..])
            .chain(self.pages.iter().copied())
            .collect()
    }
}

impl AgentImage {
    /// Encodes the image for the wire or disk. A body sent raw is the pages themselves,
    /// shared, so that a large agent is not copied once more to be sent or stored.
    ///
    /// # Errors
    /// When zstd fails to compress (out of memory).
    pub fn encode(&self, options: EncodeOptions) -> std::io::Result<Encoded> {
        let (pages, base) = match options.leave_out {
            None => (self.pages.data.clone(), None),
            Some(leave) => (
                leave.rest,
                Some(LeftOut {
                    seq: leave.base_seq,
                    runs: leave.runs,
                }),
            ),
        };
        let raw = incompressible(&[&pages])?;
        let body = match raw {
            true => pages,
            false => options.compression.compress(&pages)?.into(),
        };
        let head = self.head(body.len(), self.digest(), base, raw);
        Ok(Encoded { head, body })
    }

    /// Encodes this image once per context of `contexts`, each with that context in its own:
    /// the pages are compressed and hashed once for all, and the bodies shared (a clone's
    /// children, which differ only in their contexts).
    ///
    /// # Errors
    /// When zstd fails to compress (out of memory).
    pub fn encode_each(
        &self,
        contexts: Vec<crate::context::AgentContext>,
    ) -> std::io::Result<Vec<Encoded>> {
        let pages = self.pages.data.clone();
        let raw = incompressible(&[&pages])?;
        let body: bytes::Bytes = match raw {
            true => pages,
            false => Compression::default().compress(&pages)?.into(),
        };
        let mut hashed = Digest::new(&self.module, self.memory_bytes, &self.pages.runs);
        hashed.pages(&self.pages.data);
        let mut each = self.clone();
        let mut encoded = Vec::with_capacity(contexts.len());
        for context in contexts {
            each.context = context;
            let digest = hashed.clone().finish(&each.globals, &each.context);
            let head = each.head(body.len(), digest, None, raw);
            encoded.push(Encoded {
                head,
                body: body.clone(),
            });
        }
        Ok(encoded)
    }

    /// Encodes the image without copying its pages, which lie in `memory` at the runs of
    /// `self.pages` (whose data is not read): for an agent that stays suspended while the image
    /// is sent and stored. `None` when the pages are worth compressing, or `memory` does not
    /// hold them; the caller then copies them out ([`crate::snapshot::PageMap::gather`]) and
    /// uses [`AgentImage::encode`].
    ///
    /// # Errors
    /// When zstd fails to compress the sample it judges the pages by (out of memory).
    pub fn encode_in_place<'m>(&self, memory: &'m [u8]) -> std::io::Result<Option<InPlace<'m>>> {
        let mut pages = Vec::with_capacity(self.pages.runs.len());
        for run in &self.pages.runs {
            match memory.get(run.bytes()) {
                Some(run) => pages.push(run),
                None => return Ok(None),
            }
        }
        if !incompressible(&pages)? {
            return Ok(None);
        }
        let mut digest = Digest::new(&self.module, self.memory_bytes, &self.pages.runs);
        for run in &pages {
            digest.pages(run);
        }
        let hash = digest.finish(&self.globals, &self.context);
        let body_bytes = pages.iter().map(|p| p.len()).sum();
        let head = self.head(body_bytes, hash, None, true);
        Ok(Some(InPlace { head, pages }))
    }
}
