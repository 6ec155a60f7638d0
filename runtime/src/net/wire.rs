//! Framing on QUIC streams: length-prefixed CBOR messages and length-prefixed byte blobs.
//!
//! Every length is checked against a limit before anything is allocated, and decoding is
//! bounded, so a hostile peer gets an error, never a panic or an unbounded allocation.

use super::budget::InFlight;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Largest control message.
pub const MAX_MESSAGE: usize = 4 << 20;

/// Deepest nesting of CBOR arrays and maps a message may have.
const RECURSION_LIMIT: usize = 32;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Writing to the stream failed.
    #[error("stream: {0}")]
    Write(#[from] quinn::WriteError),
    /// Reading from the stream failed.
    #[error("stream: {0}")]
    Read(#[from] quinn::ReadError),
    /// Reading a frame's length or message failed.
    #[error("stream: {0}")]
    ReadExact(#[from] quinn::ReadExactError),
    /// The stream ended before the frame did.
    #[error("stream: {what} ended at {read} of {len} bytes")]
    Ended {
        /// What was being read.
        what: &'static str,
        /// Bytes read.
        read: u64,
        /// The frame's length.
        len: u64,
    },
    /// A frame larger than allowed.
    #[error("{what} of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// What was being read.
        what: &'static str,
        /// Declared size.
        size: u64,
        /// Limit.
        limit: u64,
    },
    /// A message that does not decode.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The bytes already arriving for this host, or from this sender, fill its budget.
    #[error("busy: {whose} already has {} MiB arriving, its most; try again once earlier requests are done", limit >> 20)]
    Busy {
        /// Whose budget is full ("this host", "user alice").
        whose: String,
        /// The budget in bytes.
        limit: u64,
    },
    /// Memory for a frame's bytes could not be had.
    #[error("no memory for {what} of {size} bytes")]
    NoMemory {
        /// What was being read.
        what: &'static str,
        /// Its declared size.
        size: u64,
    },
    /// The frame did not arrive whole in time.
    #[error("{what} did not arrive within {within:?}")]
    Late {
        /// What was being read.
        what: &'static str,
        /// The deadline.
        within: std::time::Duration,
    },
}

/// Writes one CBOR message.
///
/// # Errors
/// When the stream fails.
pub async fn write_msg<T: Serialize>(
    send: &mut quinn::SendStream,
    msg: &T,
) -> Result<(), WireError> {
    let mut bytes = Vec::new();
    ciborium::into_writer(msg, &mut bytes).map_err(|e| WireError::Malformed(e.to_string()))?;
    write_blob(send, &bytes).await
}

/// Reads one CBOR message of at most [`MAX_MESSAGE`] bytes: the answer to a request this
/// side made, charged to no budget.
///
/// # Errors
/// When the stream fails, the frame is too large, or it does not decode as `T`.
///
/// # Cancel safety
/// Not cancel safe: a partly read frame is lost.
pub async fn read_msg<T: DeserializeOwned>(recv: &mut quinn::RecvStream) -> Result<T, WireError> {
    read_msg_charged(recv, &mut InFlight::default()).await
}

/// Reads one CBOR message as [`read_msg`] does, charging its bytes to `inflight` as they
/// come: for what a peer or user sends unasked.
///
/// # Errors
/// As [`read_msg`], and when its bytes do not fit the budget.
///
/// # Cancel safety
/// Not cancel safe: a partly read frame is lost.
pub async fn read_msg_charged<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    inflight: &mut InFlight,
) -> Result<T, WireError> {
    let bytes = read_blob(recv, "message", MAX_MESSAGE as u64, inflight).await?;
    decode_msg(&bytes)
}

/// Decodes one CBOR message from the bytes of a frame, as [`read_msg`] does after reading it.
///
/// The bytes come from a peer, so decoding is bounded: nesting deeper than 32 levels is refused
/// instead of recursing further. The frame's length limit is the caller's business
/// ([`read_msg`] applies [`MAX_MESSAGE`]).
///
/// # Errors
/// [`WireError::Malformed`] when the bytes are not valid CBOR for a `T`.
pub fn decode_msg<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    ciborium::de::from_reader_with_recursion_limit(bytes, RECURSION_LIMIT)
        .map_err(|e| WireError::Malformed(e.to_string()))
}

/// Writes a length-prefixed blob.
///
/// # Errors
/// When the stream fails.
pub async fn write_blob(send: &mut quinn::SendStream, bytes: &[u8]) -> Result<(), WireError> {
    send.write_all(&(bytes.len() as u64).to_le_bytes()).await?;
    Ok(send.write_all(bytes).await?)
}

/// Writes a length-prefixed blob given in two parts, `head` then `body`: the body is handed
/// to the stream shared, not copied into it.
///
/// # Errors
/// When the stream fails.
pub async fn write_blob_parts(
    send: &mut quinn::SendStream,
    head: &[u8],
    body: bytes::Bytes,
) -> Result<(), WireError> {
    let len = (head.len() + body.len()) as u64;
    send.write_all(&len.to_le_bytes()).await?;
    send.write_all(head).await?;
    Ok(send.write_chunk(body).await?)
}

/// Writes a length-prefixed blob of `len` bytes made of `chunk` repeated (the last one cut
/// short): a blob of any size from one chunk's memory.
///
/// # Errors
/// When the stream fails, or `chunk` is empty while `len` is not.
pub async fn write_blob_repeated(
    send: &mut quinn::SendStream,
    chunk: bytes::Bytes,
    len: u64,
) -> Result<(), WireError> {
    send.write_all(&len.to_le_bytes()).await?;
    let mut left = len;
    while left > 0 {
        if chunk.is_empty() {
            return Err(WireError::Malformed("a blob of an empty chunk".into()));
        }
        let piece = chunk.slice(..(chunk.len() as u64).min(left) as usize);
        left -= piece.len() as u64;
        send.write_chunk(piece).await?;
    }
    Ok(())
}

/// Reads a length-prefixed blob of at most `limit` bytes, its memory taken (and charged to
/// `inflight`) as its bytes come, never from its declared length.
///
/// # Errors
/// When the stream fails, the blob is larger than `limit`, or its bytes do not fit the budget.
pub async fn read_blob(
    recv: &mut quinn::RecvStream,
    what: &'static str,
    limit: u64,
    inflight: &mut InFlight,
) -> Result<Vec<u8>, WireError> {
    let mut blob = Blob::start(recv, what, limit).await?;
    blob.read_to(recv, blob.len(), inflight).await?;
    Ok(blob.into_bytes())
}

/// Reads a blob as [`read_blob`] does, into the buffer `buffer` gives for its length: the
/// whole length is charged to `inflight` before the buffer is taken.
///
/// # Errors
/// As [`read_blob`].
pub async fn read_blob_into(
    recv: &mut quinn::RecvStream,
    what: &'static str,
    limit: u64,
    inflight: &mut InFlight,
    buffer: impl FnOnce(usize) -> Vec<u8>,
) -> Result<Vec<u8>, WireError> {
    let mut blob = Blob::start_into(recv, what, limit, inflight, buffer).await?;
    blob.read_to(recv, blob.len(), inflight).await?;
    Ok(blob.into_bytes())
}

/// Reads a length-prefixed blob of at most `limit` bytes and drops its bytes as they come;
/// returns how many came.
///
/// # Errors
/// When the stream fails or ends early, or the blob is larger than `limit`.
pub async fn drain_blob(
    recv: &mut quinn::RecvStream,
    what: &'static str,
    limit: u64,
) -> Result<u64, WireError> {
    let len = read_len(recv, what, limit).await?;
    let mut read = 0;
    while read < len {
        let want = usize::try_from(len - read).unwrap_or(usize::MAX);
        match recv.read_chunk(want, true).await {
            Ok(Some(chunk)) => read += chunk.bytes.len() as u64,
            Ok(None) => {
                return Err(WireError::Ended { what, read, len });
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(read)
}

async fn read_len(
    recv: &mut quinn::RecvStream,
    what: &'static str,
    limit: u64,
) -> Result<u64, WireError> {
    let mut len = [0u8; 8];
    recv.read_exact(&mut len).await?;
    let size = u64::from_le_bytes(len);
    if size > limit {
        return Err(WireError::TooLarge { what, size, limit });
    }
    Ok(size)
}

/// A length-prefixed blob being read, for readers that act on its bytes as they come.
pub struct Blob {
    bytes: Vec<u8>,
    what: &'static str,
    len: usize,
    read: usize,
    /// The buffer was sized (and charged) for the whole blob up front.
    sized: bool,
}

impl Blob {
    /// Reads the length of a blob of at most `limit` bytes; its memory is taken as its bytes
    /// come.
    ///
    /// # Errors
    /// As [`read_blob`].
    pub async fn start(
        recv: &mut quinn::RecvStream,
        what: &'static str,
        limit: u64,
    ) -> Result<Blob, WireError> {
        let len = read_len(recv, what, limit).await? as usize;
        Ok(Blob {
            bytes: Vec::new(),
            what,
            len,
            read: 0,
            sized: false,
        })
    }

    /// Reads the length of a blob of at most `limit` bytes, charges all of it to `inflight`,
    /// and takes a buffer for it from `buffer` (given the length; made that length if it is
    /// not): for large images, whose reader writes them on as they come.
    ///
    /// # Errors
    /// As [`read_blob`].
    pub async fn start_into(
        recv: &mut quinn::RecvStream,
        what: &'static str,
        limit: u64,
        inflight: &mut InFlight,
        buffer: impl FnOnce(usize) -> Vec<u8>,
    ) -> Result<Blob, WireError> {
        let len = read_len(recv, what, limit).await? as usize;
        inflight.take(len)?;
        let mut bytes = buffer(len);
        bytes.resize(len, 0);
        Ok(Blob {
            bytes,
            what,
            len,
            read: 0,
            sized: true,
        })
    }

    /// Reads on until `upto` bytes of the blob (or all of it, if fewer) have come, charging
    /// what comes to `inflight` unless the buffer was charged whole.
    ///
    /// # Errors
    /// When the stream fails or ends first, or the bytes do not fit the budget.
    pub async fn read_to(
        &mut self,
        recv: &mut quinn::RecvStream,
        upto: usize,
        inflight: &mut InFlight,
    ) -> Result<(), WireError> {
        let upto = upto.min(self.len);
        if self.sized {
            if upto > self.read {
                recv.read_exact(&mut self.bytes[self.read..upto])
                    .await
                    .map_err(stream)?;
                self.read = upto;
            }
            return Ok(());
        }
        while self.read < upto {
            let chunk = match recv.read_chunk(upto - self.read, true).await {
                Ok(Some(chunk)) => chunk.bytes,
                Ok(None) => {
                    return Err(WireError::Ended {
                        what: self.what,
                        read: self.read as u64,
                        len: self.len as u64,
                    });
                }
                Err(e) => return Err(e.into()),
            };
            inflight.take(chunk.len())?;
            self.bytes
                .try_reserve(chunk.len())
                .map_err(|_| WireError::NoMemory {
                    what: self.what,
                    size: self.len as u64,
                })?;
            self.bytes.extend_from_slice(&chunk);
            self.read += chunk.len();
        }
        Ok(())
    }

    /// The bytes that have come.
    pub fn arrived(&self) -> &[u8] {
        &self.bytes[..self.read]
    }

    /// The blob's length.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the blob has no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The blob's bytes: all of them once read whole (a buffer sized up front holds
    /// whatever it held where bytes have not come).
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

fn stream(e: quinn::ReadExactError) -> WireError {
    WireError::ReadExact(e)
}
