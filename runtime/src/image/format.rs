//! The wire layout of an image: `MAGIC` (8 bytes) | header length (u32 LE) | CBOR header |
//! body, and what may be read of a header before the image is decoded.

use super::{AgentImage, GlobalValue, ImageError, ImageLimits};
use crate::context::AgentContext;
use crate::modules::ModuleHash;
use crate::snapshot::PageRun;
use serde::{Deserialize, Serialize};

/// Version of the image format this runtime writes and reads.
pub const FORMAT_VERSION: u32 = 1;

pub(super) const MAGIC: [u8; 8] = *b"AGNTIMG\0";

/// Bytes before the CBOR header: the magic and the header's length.
const PREFIX: usize = MAGIC.len() + 4;

/// Deepest nesting the CBOR reader follows: a header nests a few levels, a hostile one more.
const RECURSION_LIMIT: usize = 32;

/// The header as it appears on the wire.
#[derive(Serialize, Deserialize)]
pub(super) struct WireHeader {
    pub(super) format: u32,
    pub(super) abi: u32,
    pub(super) module: ModuleHash,
    pub(super) memory_bytes: u64,
    pub(super) globals: Vec<GlobalValue>,
    pub(super) runs: Vec<PageRun>,
    pub(super) body_bytes: u64,
    #[serde(with = "serde_bytes")]
    pub(super) hash: [u8; 32],
    pub(super) context: AgentContext,
    /// Pages of `runs` the body leaves out because the reader holds them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) base: Option<LeftOut>,
    /// The body is the pages as they are: zstd could not shrink a sample of them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub(super) raw: bool,
}

/// The pages an image leaves out: the reader takes them from its base image of hop `seq`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct LeftOut {
    pub(super) seq: u64,
    pub(super) runs: Vec<PageRun>,
}

/// How an image's header says its memory and body are laid out ([`AgentImage::layout`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Size of linear memory in bytes.
    pub memory_bytes: u64,
    /// The carried pages.
    pub runs: Vec<PageRun>,
    /// Where the body starts in the image's bytes.
    pub body_at: usize,
    /// Whether the body is the pages as they are (not compressed).
    pub raw: bool,
}

impl AgentImage {
    /// The prefix and header of this image, whose body holds `body_bytes` bytes.
    pub(super) fn head(
        &self,
        body_bytes: usize,
        hash: [u8; 32],
        base: Option<LeftOut>,
        raw: bool,
    ) -> Vec<u8> {
        let header = WireHeader {
            format: FORMAT_VERSION,
            abi: agent_abi::ABI_VERSION,
            module: self.module,
            memory_bytes: self.memory_bytes,
            globals: self.globals.clone(),
            runs: self.pages.runs.clone(),
            body_bytes: body_bytes as u64,
            hash,
            context: self.context.clone(),
            base,
            raw,
        };
        let mut cbor = Vec::new();
        // Encoding into a Vec cannot fail for this plain data type.
        let _ = ciborium::into_writer(&header, &mut cbor);
        let mut head = Vec::with_capacity(PREFIX + cbor.len());
        head.extend_from_slice(&MAGIC);
        head.extend_from_slice(&(cbor.len() as u32).to_le_bytes());
        head.extend_from_slice(&cbor);
        head
    }

    /// The digest an encoded image's header claims, read without checking the image: what a
    /// store names the image's file by (the digest is a hash of everything the image holds, so
    /// hashing all its bytes again for a name would only repeat that work). `None` when
    /// `bytes` do not start with a readable header.
    pub fn claimed_digest(bytes: &[u8]) -> Option<[u8; 32]> {
        read_header(bytes, ImageLimits::default().max_header)
            .ok()
            // An image that leaves out pages claims the digest of the whole image it stands for.
            .filter(|(h, _)| h.base.is_none())
            .map(|(h, _)| h.hash)
    }

    /// How many bytes an encoded image's prefix and header take, read from its first 12
    /// bytes: what to read before [`AgentImage::layout`] can say anything. `None` when
    /// `prefix` does not start an image.
    pub fn head_len(prefix: &[u8]) -> Option<usize> {
        let len = prefix.get(MAGIC.len()..PREFIX)?.try_into().ok()?;
        (prefix.starts_with(&MAGIC)).then(|| PREFIX + u32::from_le_bytes(len) as usize)
    }

    /// What the header at the start of `bytes` claims of the memory and the body, unchecked:
    /// enough to make an instance ready, and to write a raw body's pages into it, while the
    /// body travels; decoding then checks it all. `None` for an image that leaves out pages
    /// (filled in from a base, not sent) or a header that does not read.
    pub fn layout(bytes: &[u8], limits: &ImageLimits) -> Option<Layout> {
        let (header, body_at) = read_header(bytes, limits.max_header).ok()?;
        (header.base.is_none() && header.memory_bytes <= limits.max_memory).then_some(Layout {
            memory_bytes: header.memory_bytes,
            runs: header.runs,
            body_at,
            raw: header.raw,
        })
    }
}

/// Reads the fixed prefix and the CBOR header of an untrusted image; yields the header and
/// where the body starts. The header's fields are not checked here.
pub(super) fn read_header(
    bytes: &[u8],
    max_header: usize,
) -> Result<(WireHeader, usize), ImageError> {
    if bytes.len() < PREFIX {
        return Err(
            if bytes.starts_with(&MAGIC[..bytes.len().min(MAGIC.len())]) {
                ImageError::Truncated(format!(
                    "{} bytes, shorter than the fixed prefix",
                    bytes.len()
                ))
            } else {
                ImageError::NotAnImage
            },
        );
    }
    if bytes[..MAGIC.len()] != MAGIC {
        return Err(ImageError::NotAnImage);
    }
    let mut len = [0u8; 4];
    len.copy_from_slice(&bytes[MAGIC.len()..PREFIX]);
    let head_len = u64::from(u32::from_le_bytes(len));
    if head_len > max_header as u64 {
        return Err(ImageError::HeaderTooLarge {
            size: head_len,
            limit: max_header as u64,
        });
    }
    let rest = &bytes[PREFIX..];
    let Some(head) = rest.get(..head_len as usize) else {
        return Err(ImageError::Truncated(format!(
            "header of {head_len} bytes, {} present",
            rest.len()
        )));
    };
    let header = ciborium::de::from_reader_with_recursion_limit(head, RECURSION_LIMIT)
        .map_err(|e| ImageError::BadHeader(e.to_string()))?;
    Ok((header, PREFIX + head_len as usize))
}
