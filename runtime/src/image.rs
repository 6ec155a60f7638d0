//! The agent image: a self-describing, versioned snapshot of an agent at a safe point.
//!
//! Wire layout: `MAGIC` (8 bytes) | header length (u32 LE) | CBOR header | zstd body.
//! The header holds the format version, the module hash, memory size, mutable globals (as bits),
//! the page runs, the agent context and a BLAKE3 hash of the canonical (uncompressed) image.
//! The body is the carried pages ([`PageMap`]) compressed with zstd. An image sent to a host
//! that holds an earlier image of the same agent may leave out the pages that host holds
//! (see [`crate::base`]); its header then names them and the body holds only the rest.
//!
//! Images arrive from other hosts and from disk, so [`AgentImage::decode`] treats every field as
//! hostile: sizes are bounded before allocation, runs are checked against the memory size,
//! decompression cannot exceed the size the runs imply, and the hash must match.

use crate::admission::GlobalKind;
use crate::context::AgentContext;
use crate::modules::ModuleHash;
use crate::snapshot::{PAGE_SIZE, PageMap, PageRun, PagesError};
use serde::{Deserialize, Serialize};

/// Version of the image format this runtime writes and reads.
pub const FORMAT_VERSION: u32 = 1;

const MAGIC: [u8; 8] = *b"AGNTIMG\0";
/// zstd level of images that travel. zstd's fast levels (below 1) leave literals
/// uncompressed: for the benchmark agent's five changed pages, level -3 gave a tenth more
/// bytes than level 1 (4.4 against 4.0 KiB) and 2-4% more hops per second, where compressing
/// had been 5% of the hosts' CPU.
const TRAVEL_LEVEL: i32 = -3;

/// zstd level of images kept where they were made (a launch, a parked agent), which may stay
/// on disk for days: at level -3 a parked agent's image no longer fit a 4 KiB page of the
/// store, which grew by 15.4 KiB per parked agent against 8.9.
const KEEP_LEVEL: i32 = 1;
const RECURSION_LIMIT: usize = 32;

/// The value of one mutable global.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GlobalValue {
    /// Global index in the module.
    pub index: u32,
    /// Its type.
    pub kind: GlobalKind,
    /// Its value's bits (floats keep their exact bit pattern, NaN payloads included).
    pub bits: u64,
}

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
/// memory, which must not change while the image is in use (sent, stored). A 256 MiB agent's
/// hop then sends and stores its pages without first copying them into a fresh buffer (≈ 60
/// ms on the benchmark VM, and up to 360 ms when the VM had taken that memory back).
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

/// The header as it appears on the wire.
#[derive(Serialize, Deserialize)]
struct WireHeader {
    format: u32,
    abi: u32,
    module: ModuleHash,
    memory_bytes: u64,
    globals: Vec<GlobalValue>,
    runs: Vec<PageRun>,
    body_bytes: u64,
    #[serde(with = "serde_bytes")]
    hash: [u8; 32],
    context: AgentContext,
    /// Pages of `runs` the body leaves out because the reader holds them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    base: Option<LeftOut>,
    /// The body is the pages as they are: zstd could not shrink a sample of them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    raw: bool,
}

/// The pages an image leaves out: the reader takes them from its base image of hop `seq`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct LeftOut {
    seq: u64,
    runs: Vec<PageRun>,
}

/// Pages of at least this many bytes are hashed on all cores: a 256 MiB body took 170 ms
/// on one core of the benchmark machine, on the critical path of both ends of a hop.
const PARALLEL_DIGEST: usize = 1 << 20;

/// An image's digest, fed in its canonical order: format, module, memory size and runs, then
/// the pages (in as many pieces as they come), then the globals and the context.
struct Digest(blake3::Hasher);

impl Digest {
    fn new(module: &ModuleHash, memory_bytes: u64, runs: &[PageRun]) -> Self {
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

    fn pages(&mut self, data: &[u8]) {
        if data.len() >= PARALLEL_DIGEST {
            self.0.update_rayon(data);
        } else {
            self.0.update(data);
        }
    }

    fn finish(mut self, globals: &[GlobalValue], context: &AgentContext) -> [u8; 32] {
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

/// A decoded image whose digest is not checked yet ([`AgentImage::decode_unverified`]).
pub struct Unverified {
    image: AgentImage,
    claimed: [u8; 32],
}

impl Unverified {
    /// Hashes the image and compares the digest with the one its header claims.
    ///
    /// # Errors
    /// [`ImageError::HashMismatch`] when they differ.
    pub fn check(&self) -> Result<(), ImageError> {
        check_digest(&self.image, &self.claimed)
    }
}

/// Whether `image` hashes to the digest its header `claimed`.
fn check_digest(image: &AgentImage, claimed: &[u8; 32]) -> Result<(), ImageError> {
    match image.digest() == *claimed {
        true => Ok(()),
        false => Err(ImageError::HashMismatch),
    }
}

impl AgentImage {
    /// BLAKE3 over the canonical image: memory size, runs, pages, globals and context.
    pub fn digest(&self) -> [u8; 32] {
        let mut digest = Digest::new(&self.module, self.memory_bytes, &self.pages.runs);
        digest.pages(&self.pages.data);
        digest.finish(&self.globals, &self.context)
    }

    /// Encodes the image for the wire or disk, in one buffer.
    ///
    /// # Errors
    /// When zstd fails to compress (out of memory).
    pub fn encode(&self) -> std::io::Result<Vec<u8>> {
        self.encode_parts().map(|e| e.to_vec())
    }

    /// Encodes the image as [`AgentImage::encode`] does, in two parts: a body sent raw is the
    /// pages themselves, shared, so that a 256 MiB agent is not copied once more to be sent
    /// or stored.
    ///
    /// # Errors
    /// When zstd fails to compress (out of memory).
    pub fn encode_parts(&self) -> std::io::Result<Encoded> {
        self.write(self.pages.data.clone(), None, &TRAVEL)
    }

    /// Encodes the image as [`AgentImage::encode_parts`] does, compressed harder: for an image
    /// kept on disk where it was made (a launch, a parked agent), not sent.
    ///
    /// # Errors
    /// When zstd fails to compress (out of memory).
    pub fn encode_to_keep(&self) -> std::io::Result<Encoded> {
        self.write(self.pages.data.clone(), None, &KEEP)
    }

    /// Encodes the image leaving out the pages of `left_out`, which the reader holds in its
    /// image of the agent at hop `base_seq`; `body` holds the other carried pages in order.
    pub(crate) fn encode_leaving_out(
        &self,
        base_seq: u64,
        left_out: Vec<PageRun>,
        body: bytes::Bytes,
    ) -> std::io::Result<Encoded> {
        let base = LeftOut {
            seq: base_seq,
            runs: left_out,
        };
        self.write(body, Some(base), &TRAVEL)
    }

    fn write(
        &self,
        pages: bytes::Bytes,
        base: Option<LeftOut>,
        zstd: &'static std::thread::LocalKey<Zstd>,
    ) -> std::io::Result<Encoded> {
        let raw = incompressible(&[&pages])?;
        let body = match raw {
            true => pages,
            false => compress(&pages, zstd)?.into(),
        };
        let head = self.head(body.len(), self.digest(), base, raw);
        Ok(Encoded { head, body })
    }

    /// Encodes the image without copying its pages, which lie in `memory` at the runs of
    /// `self.pages` (whose data is not read): for an agent that stays suspended while the image
    /// is sent and stored. `None` when the pages are worth compressing; the caller then copies
    /// them out ([`PageMap::gather`]) and encodes as usual.
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

    /// The prefix and header of an image whose body holds `body_bytes` bytes.
    fn head(&self, body_bytes: usize, hash: [u8; 32], base: Option<LeftOut>, raw: bool) -> Vec<u8> {
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
        let mut head = Vec::with_capacity(12 + cbor.len());
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
        let len = prefix.get(8..12)?.try_into().ok()?;
        (prefix.starts_with(&MAGIC)).then(|| 12 + u32::from_le_bytes(len) as usize)
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

    /// Decodes and verifies an untrusted image.
    ///
    /// # Errors
    /// An [`ImageError`] naming the first problem found; nothing is allocated beyond the
    /// limits before the sizes are checked.
    pub fn decode(bytes: &[u8], limits: &ImageLimits) -> Result<AgentImage, ImageError> {
        AgentImage::decode_shared(&bytes::Bytes::copy_from_slice(bytes), limits)
    }

    /// Decodes and verifies an untrusted image held in a shared buffer, as
    /// [`AgentImage::decode`] does; the pages of a body sent raw are lent from `bytes`, not
    /// copied.
    ///
    /// # Errors
    /// As [`AgentImage::decode`].
    pub fn decode_shared(
        bytes: &bytes::Bytes,
        limits: &ImageLimits,
    ) -> Result<AgentImage, ImageError> {
        AgentImage::decode_against(bytes, limits, None).map(|(image, _)| image)
    }

    /// Decodes and verifies an untrusted image that may leave out pages of `base`, this
    /// host's earlier image of the agent; says whether pages were filled in from `base`. The
    /// digest covers the whole image, so pages filled in from a base that differs from the
    /// sender's view fail it.
    ///
    /// # Errors
    /// As [`AgentImage::decode`]; [`ImageError::NeedsBase`] when the image leaves out pages of
    /// a base image other than `base`.
    pub fn decode_against(
        shared: &bytes::Bytes,
        limits: &ImageLimits,
        base: Option<&crate::base::Base>,
    ) -> Result<(AgentImage, bool), ImageError> {
        let (image, filled_in, claimed) = AgentImage::decode_unchecked(shared, limits, base)?;
        check_digest(&image, &claimed)?;
        Ok((image, filled_in))
    }

    /// Decodes an untrusted image that stands alone (it leaves out no pages) as
    /// [`AgentImage::decode_against`] does, all but the digest: the [`Unverified`] returned
    /// with it checks that later. A host resumes a large arriving agent before hashing its
    /// pages, and checks them before it commits the hop (docs/protocol.md).
    ///
    /// # Errors
    /// As [`AgentImage::decode_against`], but for [`ImageError::HashMismatch`].
    pub fn decode_unverified(
        shared: &bytes::Bytes,
        limits: &ImageLimits,
    ) -> Result<(AgentImage, Unverified), ImageError> {
        let (image, _, claimed) = AgentImage::decode_unchecked(shared, limits, None)?;
        let unverified = Unverified {
            image: image.clone(),
            claimed,
        };
        Ok((image, unverified))
    }

    /// Decodes an image as [`AgentImage::decode_against`] does, all but the digest; yields
    /// the digest its header claims.
    fn decode_unchecked(
        shared: &bytes::Bytes,
        limits: &ImageLimits,
        base: Option<&crate::base::Base>,
    ) -> Result<(AgentImage, bool, [u8; 32]), ImageError> {
        let (header, body_at) = read_header(shared, limits.max_header)?;
        if header.format != FORMAT_VERSION {
            return Err(ImageError::VersionSkew {
                found: header.format,
                supported: FORMAT_VERSION,
            });
        }
        if header.memory_bytes > limits.max_memory {
            return Err(ImageError::MemoryTooLarge {
                size: header.memory_bytes,
                limit: limits.max_memory,
            });
        }
        if !header
            .memory_bytes
            .is_multiple_of(crate::admission::WASM_PAGE)
        {
            return Err(ImageError::BadHeader(format!(
                "memory size {} is not whole Wasm pages",
                header.memory_bytes
            )));
        }
        let pages =
            PageMap::check(&header.runs, header.memory_bytes).map_err(ImageError::BadPages)?;
        let (base, left_out) = match &header.base {
            None => (None, 0),
            Some(wanted) => {
                let base = base
                    .filter(|b| b.seq() == wanted.seq)
                    .ok_or(ImageError::NeedsBase(wanted.seq))?;
                let left = PageMap::check(&wanted.runs, header.memory_bytes)
                    .map_err(|e| PagesError::LeftOut(Box::new(e)))?;
                (Some(base), left.min(pages))
            }
        };
        let body = &shared[body_at..];
        match (body.len() as u64).cmp(&header.body_bytes) {
            std::cmp::Ordering::Less => {
                return Err(ImageError::Truncated(format!(
                    "body of {} bytes, {} present",
                    header.body_bytes,
                    body.len()
                )));
            }
            std::cmp::Ordering::Greater => {
                return Err(ImageError::TrailingBytes(
                    body.len() as u64 - header.body_bytes,
                ));
            }
            std::cmp::Ordering::Equal => {}
        }
        // The runs fix the uncompressed size, so a decompression bomb stops at that size.
        let expected = ((pages - left_out) * PAGE_SIZE as u64) as usize;
        let data = match header.raw {
            // Its size was checked against the header's, and that against the runs below.
            true => shared.slice(body_at..),
            false => inflate(body, expected)?.into(),
        };
        if data.len() != expected {
            return Err(ImageError::CorruptBody(format!(
                "{} bytes of pages, the page map needs {expected}",
                data.len()
            )));
        }
        let (pages, filled_in) = match (base, header.base) {
            (Some(base), Some(wanted)) => (
                PageMap::fill_in(header.runs, &wanted.runs, &data, base.pages())
                    .map_err(ImageError::BadPages)?,
                true,
            ),
            _ => (
                PageMap {
                    runs: header.runs,
                    data,
                },
                false,
            ),
        };
        let image = AgentImage {
            module: header.module,
            memory_bytes: header.memory_bytes,
            globals: header.globals,
            pages,
            context: header.context,
        };
        Ok((image, filled_in, header.hash))
    }
}

/// Reads the fixed prefix and the CBOR header of an untrusted image; yields the header and
/// where the body starts. The header's fields are not checked here.
fn read_header(bytes: &[u8], max_header: usize) -> Result<(WireHeader, usize), ImageError> {
    if bytes.len() < MAGIC.len() + 4 {
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
    len.copy_from_slice(&bytes[8..12]);
    let head_len = u64::from(u32::from_le_bytes(len));
    if head_len > max_header as u64 {
        return Err(ImageError::HeaderTooLarge {
            size: head_len,
            limit: max_header as u64,
        });
    }
    let rest = &bytes[12..];
    let Some(head) = rest.get(..head_len as usize) else {
        return Err(ImageError::Truncated(format!(
            "header of {head_len} bytes, {} present",
            rest.len()
        )));
    };
    let header = ciborium::de::from_reader_with_recursion_limit(head, RECURSION_LIMIT)
        .map_err(|e| ImageError::BadHeader(e.to_string()))?;
    Ok((header, 12 + head_len as usize))
}

thread_local! {
    // zstd contexts are costly to set up (more than compressing a small agent's pages), so
    // each thread keeps one of each.
    static TRAVEL: Zstd = std::cell::RefCell::new(zstd::bulk::Compressor::new(TRAVEL_LEVEL));
    static KEEP: Zstd = std::cell::RefCell::new(zstd::bulk::Compressor::new(KEEP_LEVEL));
    static DECOMPRESSOR: std::cell::RefCell<std::io::Result<zstd::bulk::Decompressor<'static>>> =
        std::cell::RefCell::new(zstd::bulk::Decompressor::new());
}

/// A thread's zstd compression context for one level.
type Zstd = std::cell::RefCell<std::io::Result<zstd::bulk::Compressor<'static>>>;

/// Compresses pages with this thread's context `zstd` ([`TRAVEL`] or [`KEEP`]).
fn compress(data: &[u8], zstd: &'static std::thread::LocalKey<Zstd>) -> std::io::Result<Vec<u8>> {
    zstd.with(|c| match c.borrow_mut().as_mut() {
        Ok(c) => c.compress(data),
        Err(e) => Err(std::io::Error::other(e.to_string())),
    })
}

/// Bodies at least this large are sampled before they are compressed.
const SAMPLED: usize = 1 << 20;

/// A sample: this many pages spread evenly over the body.
const SAMPLE_PAGES: usize = 16;

/// Whether zstd would gain too little on `pages` to be worth its time, judged from a sample
/// of pages spread over them (compressing 256 MiB of incompressible pages took 250 ms and
/// decompressing them 200 ms on this project's benchmark VM, for nothing).
fn incompressible(pages: &[&[u8]]) -> std::io::Result<bool> {
    let len: usize = pages.iter().map(|p| p.len()).sum();
    if len < SAMPLED {
        return Ok(false);
    }
    let stride = len / PAGE_SIZE / SAMPLE_PAGES * PAGE_SIZE;
    let mut sample = Vec::with_capacity(SAMPLE_PAGES * PAGE_SIZE);
    // Parts hold whole pages, so a sampled page never straddles two.
    let page_at = |mut at: usize| {
        for part in pages {
            match part.get(at..at + PAGE_SIZE) {
                Some(page) => return page,
                None => at = at.saturating_sub(part.len()),
            }
        }
        &[]
    };
    for i in 0..SAMPLE_PAGES {
        sample.extend_from_slice(page_at(i * stride));
    }
    // Saving less than a quarter does not pay for compressing and decompressing every page
    // on a fast link; a few compressible pages (stack, data) among noise save less.
    Ok(compress(&sample, &TRAVEL)?.len() > sample.len() / 4 * 3)
}

/// Most memory reserved for the pages before any has been decompressed.
const FIRST_RESERVE: usize = 16 << 20;

/// Decompresses `body`, which should hold `expected` bytes; never more than one byte past that.
///
/// Memory grows with what the body really holds, not with what the header claims: a header
/// that announces gigabytes of pages over a body of a few bytes must not cost an allocation of
/// the claimed size (that aborts the process where address space is limited). Up to
/// [`FIRST_RESERVE`] bytes are decompressed in one call into a buffer of the exact size; larger
/// images are streamed into a buffer that grows as pages come out.
fn inflate(body: &[u8], expected: usize) -> Result<Vec<u8>, ImageError> {
    use std::io::Read;
    let corrupt = |e: std::io::Error| ImageError::CorruptBody(e.to_string());
    if expected <= FIRST_RESERVE {
        return DECOMPRESSOR
            .with(|d| match d.borrow_mut().as_mut() {
                Ok(d) => d.decompress(body, expected),
                Err(e) => Err(std::io::Error::other(e.to_string())),
            })
            .map_err(corrupt);
    }
    let decoder = zstd::stream::read::Decoder::with_buffer(body).map_err(corrupt)?;
    let mut data = Vec::with_capacity(FIRST_RESERVE);
    decoder
        .take(expected as u64 + 1)
        .read_to_end(&mut data)
        .map_err(corrupt)?;
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::AgentContext;

    fn image() -> AgentImage {
        let mut data = vec![0u8; 3 * PAGE_SIZE];
        data.iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = (i * 7 % 251) as u8);
        let mut context = AgentContext::new(
            "home",
            "alice",
            vec!["a".into(), "b".into()],
            Default::default(),
        );
        context.pending = Some(agent_abi::Op::Hop { site: "b".into() });
        AgentImage {
            module: ModuleHash([7; 32]),
            memory_bytes: 4 << 16,
            globals: vec![
                GlobalValue {
                    index: 0,
                    kind: GlobalKind::I32,
                    bits: 65536,
                },
                GlobalValue {
                    index: 3,
                    kind: GlobalKind::F64,
                    bits: f64::NAN.to_bits() | 5,
                },
            ],
            pages: PageMap {
                runs: vec![
                    PageRun { start: 1, count: 2 },
                    PageRun {
                        start: 40,
                        count: 1,
                    },
                ],
                data: data.into(),
            },
            context,
        }
    }

    /// Encodes `image` after letting the test tamper with its header.
    fn encode_with(
        image: &AgentImage,
        body: Option<Vec<u8>>,
        tamper: impl FnOnce(&mut WireHeader),
    ) -> Vec<u8> {
        let body = body.unwrap_or_else(|| {
            zstd::bulk::compress(&image.pages.data, TRAVEL_LEVEL).unwrap_or_default()
        });
        let mut header = WireHeader {
            format: FORMAT_VERSION,
            abi: agent_abi::ABI_VERSION,
            module: image.module,
            memory_bytes: image.memory_bytes,
            globals: image.globals.clone(),
            runs: image.pages.runs.clone(),
            body_bytes: body.len() as u64,
            hash: image.digest(),
            context: image.context.clone(),
            base: None,
            raw: false,
        };
        tamper(&mut header);
        let mut head = Vec::new();
        ciborium::into_writer(&header, &mut head).unwrap_or_default();
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&(head.len() as u32).to_le_bytes());
        out.extend_from_slice(&head);
        out.extend_from_slice(&body);
        out
    }

    fn decode(bytes: &[u8]) -> Result<AgentImage, ImageError> {
        AgentImage::decode(bytes, &ImageLimits::default())
    }

    #[test]
    fn round_trip_keeps_everything_bit_for_bit() {
        let img = image();
        let bytes = img.encode().unwrap_or_default();
        assert_eq!(decode(&bytes), Ok(img.clone()));
        assert_eq!(
            bytes,
            encode_with(&img, None, |_| {}),
            "the test encoder matches the real one"
        );
    }

    #[test]
    fn an_image_kept_is_compressed_harder_and_reads_the_same() {
        // Pages like a small agent's: text, small integers and zeros.
        let mut img = image();
        let text = b"let mut x = vec![0u32; 16]; x[3] = 7; // state of the search ";
        let data: Vec<u8> = (0..3 * PAGE_SIZE)
            .map(|i| match i % 256 < 64 {
                true => text[i % text.len()],
                false => (i % 7) as u8 * u8::from(i % 3 == 0),
            })
            .collect();
        img.pages.data = data.into();
        let travels = img.encode().unwrap_or_default();
        let kept = img.encode_to_keep().map(|e| e.to_vec()).unwrap_or_default();
        assert!(
            kept.len() < travels.len(),
            "{} !< {}",
            kept.len(),
            travels.len()
        );
        assert_eq!(decode(&kept), Ok(img.clone()));
        assert_eq!(decode(&travels), Ok(img));
    }

    /// The header of encoded image `bytes`.
    fn header_of(bytes: &[u8]) -> Option<WireHeader> {
        let len = u32::from_le_bytes(bytes.get(8..12)?.try_into().ok()?) as usize;
        ciborium::from_reader(bytes.get(12..12 + len)?).ok()
    }

    /// An image of `pages` pages of pseudo-random (incompressible) bytes.
    fn noisy(pages: u32) -> AgentImage {
        let mut img = image();
        let data = crate::net::host::incompressible(pages as usize * PAGE_SIZE);
        img.memory_bytes = u64::from(pages).next_multiple_of(16) * PAGE_SIZE as u64;
        img.pages = PageMap {
            runs: vec![PageRun {
                start: 0,
                count: pages,
            }],
            data: data.into(),
        };
        img
    }

    #[test]
    fn an_image_read_in_place_is_byte_for_byte_the_image_copied_out() {
        // Noise with zero pages between runs, and a run in the last pages of the memory.
        let mut memory = crate::net::host::incompressible(600 * PAGE_SIZE);
        memory.resize(640 * PAGE_SIZE, 0);
        memory[640 * PAGE_SIZE - 1] = 7;
        for hole in [0, 3, 4, 100, 599] {
            memory[hole * PAGE_SIZE..(hole + 1) * PAGE_SIZE].fill(0);
        }
        let mut img = image();
        img.memory_bytes = memory.len() as u64;
        img.pages = PageMap::capture(&memory, &crate::snapshot::InitialImage::default());
        assert_eq!(img.pages.runs.len(), 4, "{:?}", img.pages.runs);
        let copied = img.encode().unwrap_or_default();

        let mut runs_only = img.clone();
        runs_only.pages.data = bytes::Bytes::new();
        let Ok(Some(in_place)) = runs_only.encode_in_place(&memory) else {
            panic!("2.3 MiB of noise is read in place")
        };
        assert_eq!(in_place.len(), copied.len());
        assert!(in_place.parts().concat() == copied, "the encodings differ");
        assert_eq!(decode(&in_place.parts().concat()), Ok(img.clone()));

        // Pages worth compressing are left to be copied out and compressed.
        let plain: Vec<u8> = memory.iter().map(|b| b & 1).collect();
        assert!(matches!(runs_only.encode_in_place(&plain), Ok(None)));
        // As are runs the memory does not hold.
        assert!(matches!(
            runs_only.encode_in_place(&memory[..639 * PAGE_SIZE]),
            Ok(None)
        ));
    }

    #[test]
    fn incompressible_pages_travel_raw_and_compressible_ones_compressed() {
        let mut img = noisy(512);
        // A heap of noise above a stack and data of zeros, as in the benchmark agent.
        let mut data = img.pages.data.to_vec();
        data[..16 * PAGE_SIZE].fill(0);
        img.pages.data = data.into();
        let bytes = img.encode().unwrap_or_default();
        assert!(
            header_of(&bytes).is_some_and(|h| h.raw),
            "2 MiB of noise is sent raw"
        );
        assert_eq!(decode(&bytes), Ok(img.clone()));

        let mut tampered = bytes.clone();
        if let Some(b) = tampered.last_mut() {
            *b ^= 1;
        }
        assert_eq!(decode(&tampered), Err(ImageError::HashMismatch));
        let short = &bytes[..bytes.len() - 1];
        assert!(matches!(decode(short), Err(ImageError::Truncated(_))));

        let mut plain = img.clone();
        plain.pages.data = plain.pages.data.iter().map(|b| b & 1).collect();
        let bytes = plain.encode().unwrap_or_default();
        assert!(header_of(&bytes).is_some_and(|h| !h.raw));
        assert!(bytes.len() < plain.pages.data.len() / 2);
        assert_eq!(decode(&bytes), Ok(plain));
    }

    #[test]
    fn a_raw_body_is_lent_from_the_buffer_it_was_decoded_from() {
        let img = noisy(512);
        let bytes = bytes::Bytes::from(img.encode().unwrap_or_default());
        assert!(header_of(&bytes).is_some_and(|h| h.raw));
        let decoded = AgentImage::decode_shared(&bytes, &ImageLimits::default());
        let pages = decoded.map(|d| d.pages.data).unwrap_or_default();
        assert_eq!(pages, img.pages.data);
        let lent = bytes.as_ptr_range();
        assert!(
            lent.contains(&pages.as_ptr()),
            "the pages were copied out of the buffer"
        );
    }

    #[test]
    fn an_image_encoded_in_parts_shares_its_raw_pages_and_reads_as_the_whole() {
        let img = noisy(512);
        let parts = img.encode_parts().unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(parts.to_vec(), img.encode().unwrap_or_default());
        assert_eq!(parts.len(), parts.head().len() + parts.body().len());
        assert_eq!(
            parts.body().as_ptr(),
            img.pages.data.as_ptr(),
            "the pages were copied to be encoded"
        );
        // A compressed body is the compressor's own: it reads back the same.
        let small = image();
        let parts = small.encode_parts().unwrap_or_else(|e| panic!("{e}"));
        assert_ne!(parts.body().as_ptr(), small.pages.data.as_ptr());
        assert_eq!(decode(&parts.parts().concat()), Ok(small));
    }

    #[test]
    fn the_claimed_digest_is_the_header_hash_of_an_image_that_stands_alone() {
        let img = image();
        let bytes = img.encode().unwrap_or_default();
        assert_eq!(AgentImage::claimed_digest(&bytes), Some(img.digest()));
        // Read without checking: a tampered body still shows the header's claim.
        let mut tampered = bytes.clone();
        if let Some(b) = tampered.last_mut() {
            *b ^= 1;
        }
        assert_eq!(AgentImage::claimed_digest(&tampered), Some(img.digest()));
        for junk in [
            &b""[..],
            b"AGNTIMG\0",
            b"AGNTIMG\0\xff\xff\xff\xff",
            &bytes[..20],
            b"not an image",
        ] {
            assert_eq!(AgentImage::claimed_digest(junk), None);
        }
        // An image that leaves out pages claims the whole image's digest: it has none of its own.
        let partial = img
            .encode_leaving_out(
                1,
                vec![PageRun { start: 1, count: 1 }],
                img.pages.data.slice(PAGE_SIZE..),
            )
            .map(|e| e.to_vec())
            .unwrap_or_default();
        assert!(header_of(&partial).is_some_and(|h| h.base.is_some()));
        assert_eq!(AgentImage::claimed_digest(&partial), None);
    }

    #[test]
    fn every_truncation_is_a_clear_error() {
        let bytes = image().encode().unwrap_or_default();
        for len in 0..bytes.len() {
            match decode(&bytes[..len]) {
                Err(
                    ImageError::Truncated(_) | ImageError::NotAnImage | ImageError::BadHeader(_),
                ) => {}
                other => panic!("prefix of {len} bytes gave {other:?}"),
            }
        }
        assert!(matches!(
            decode(&bytes[..100]),
            Err(ImageError::Truncated(_))
        ));
    }

    #[test]
    fn bad_images_are_refused_with_the_exact_error() {
        let img = image();
        let good = img.encode().unwrap_or_default();
        assert_eq!(decode(b"GIF89a......"), Err(ImageError::NotAnImage));

        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(decode(&trailing), Err(ImageError::TrailingBytes(1)));

        let mut huge = good.clone();
        huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(
            decode(&huge),
            Err(ImageError::HeaderTooLarge {
                size: u64::from(u32::MAX),
                limit: 4 << 20
            })
        );

        let mut garbage = good.clone();
        garbage[12..20].fill(0xff);
        assert!(matches!(decode(&garbage), Err(ImageError::BadHeader(_))));

        assert_eq!(
            decode(&encode_with(&img, None, |h| h.format = 2)),
            Err(ImageError::VersionSkew {
                found: 2,
                supported: FORMAT_VERSION
            })
        );
        assert_eq!(
            AgentImage::decode(
                &good,
                &ImageLimits {
                    max_memory: 1 << 16,
                    ..ImageLimits::default()
                }
            ),
            Err(ImageError::MemoryTooLarge {
                size: 4 << 16,
                limit: 1 << 16
            })
        );
        assert!(matches!(
            decode(&encode_with(&img, None, |h| h.memory_bytes = 1000)),
            Err(ImageError::BadHeader(_))
        ));
        assert!(matches!(
            decode(&encode_with(&img, None, |h| h.runs[1].start = 64)),
            Err(ImageError::BadPages(_))
        ));
        assert!(matches!(
            decode(&encode_with(&img, None, |h| h.runs.push(PageRun {
                start: 41,
                count: 1
            }))),
            Err(ImageError::CorruptBody(_))
        ));
        // The header's hash no longer matches a changed global or context.
        assert_eq!(
            decode(&encode_with(&img, None, |h| h.globals[0].bits += 1)),
            Err(ImageError::HashMismatch)
        );
        assert_eq!(
            decode(&encode_with(&img, None, |h| h.context.hop_seq = 9)),
            Err(ImageError::HashMismatch)
        );
        // A changed page byte (compressed body still valid).
        let mut other = img.pages.data.to_vec();
        other[5] ^= 1;
        let body = zstd::bulk::compress(&other, 1).unwrap_or_default();
        assert_eq!(
            decode(&encode_with(&img, Some(body), |_| {})),
            Err(ImageError::HashMismatch)
        );
        // Flipped bits in the compressed body.
        let mut flipped = good.clone();
        let at = flipped.len() - 3;
        flipped[at] ^= 0x55;
        assert!(matches!(
            decode(&flipped),
            Err(ImageError::CorruptBody(_) | ImageError::HashMismatch)
        ));
    }

    #[test]
    fn a_tiny_body_claiming_a_huge_memory_allocates_nothing_of_that_size() {
        // Found while fuzzing image_decode (by reading the decoder; libFuzzer without a
        // sanitizer does not see allocations): the decoder reserved the whole claimed size
        // before looking at the body, 4 GiB under the default limits for an image of 288 bytes
        // (fuzz/corpus/image_decode/1fc32f0157b223298b414adbcdb020ab8300efa7). Here 1 TiB: that
        // allocation failed and aborted the process.
        let img = image();
        let limits = ImageLimits {
            max_memory: 1 << 40,
            ..ImageLimits::default()
        };
        let pages = ((1u64 << 40) / PAGE_SIZE as u64) as u32;
        for body in [
            vec![0u8],
            vec![],
            zstd::bulk::compress(b"x", 1).unwrap_or_default(),
        ] {
            let bytes = encode_with(&img, Some(body), |h| {
                h.memory_bytes = 1 << 40;
                h.runs = vec![PageRun {
                    start: 0,
                    count: pages,
                }];
            });
            assert!(matches!(
                AgentImage::decode(&bytes, &limits),
                Err(ImageError::CorruptBody(_))
            ));
        }
    }

    #[test]
    fn an_image_larger_than_the_first_reserve_round_trips() {
        let pages = FIRST_RESERVE / PAGE_SIZE + 3;
        let mut img = image();
        img.memory_bytes = ((pages as u64 * PAGE_SIZE as u64) / crate::admission::WASM_PAGE + 1)
            * crate::admission::WASM_PAGE;
        img.pages = PageMap {
            runs: vec![PageRun {
                start: 0,
                count: pages as u32,
            }],
            data: (0..pages * PAGE_SIZE)
                .map(|i| (i * 13 % 241) as u8)
                .collect::<Vec<u8>>()
                .into(),
        };
        let bytes = img.encode().unwrap_or_default();
        assert_eq!(decode(&bytes), Ok(img.clone()));
        // One page short or one page too many in the body.
        for data in [
            img.pages.data[PAGE_SIZE..].to_vec(),
            [&img.pages.data[..], &[0u8; PAGE_SIZE][..]].concat(),
        ] {
            let body = zstd::bulk::compress(&data, TRAVEL_LEVEL).unwrap_or_default();
            assert!(matches!(
                decode(&encode_with(&img, Some(body), |_| {})),
                Err(ImageError::CorruptBody(_))
            ));
        }
    }

    #[test]
    fn an_image_decoded_unverified_is_the_image_and_its_check_catches_tampering() {
        let limits = ImageLimits::default();
        for img in [noisy(1024), image()] {
            let bytes = bytes::Bytes::from(img.encode().unwrap_or_default());
            let (decoded, unverified) =
                AgentImage::decode_unverified(&bytes, &limits).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(decoded, img);
            assert_eq!(unverified.check(), Ok(()));
        }

        // A page changed on the way decodes, and fails its check.
        let img = noisy(1024);
        let mut tampered = img.encode().unwrap_or_default();
        if let Some(b) = tampered.last_mut() {
            *b ^= 1;
        }
        let tampered = bytes::Bytes::from(tampered);
        let (_, unverified) =
            AgentImage::decode_unverified(&tampered, &limits).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(unverified.check(), Err(ImageError::HashMismatch));
        assert_eq!(
            AgentImage::decode_against(&tampered, &limits, None),
            Err(ImageError::HashMismatch)
        );

        // The digest covers the context too: a header naming another agent over the same
        // pages and digest fails its check.
        let forged = encode_with(&img, None, |header| {
            header.context.agent_id = crate::context::AgentId::random();
        });
        let forged = bytes::Bytes::from(forged);
        let (_, unverified) =
            AgentImage::decode_unverified(&forged, &limits).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(unverified.check(), Err(ImageError::HashMismatch));
    }

    #[test]
    fn a_decompression_bomb_stops_at_the_size_the_page_map_implies() {
        let img = image();
        let bomb = zstd::bulk::compress(&vec![0u8; 256 << 20], 3).unwrap_or_default();
        assert!(bomb.len() < 64 << 10, "the bomb is small on the wire");
        assert!(matches!(
            decode(&encode_with(&img, Some(bomb), |_| {})),
            Err(ImageError::CorruptBody(_))
        ));
    }
}
