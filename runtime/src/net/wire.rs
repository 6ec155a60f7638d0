//! Framing on QUIC streams: length-prefixed CBOR messages and length-prefixed byte blobs.
//!
//! Every length is checked against a limit before anything is allocated, and decoding is
//! bounded, so a hostile peer gets an error, never a panic or an unbounded allocation.

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Largest control message.
pub const MAX_MESSAGE: usize = 4 << 20;

/// Deepest nesting of CBOR arrays and maps a message may have.
const RECURSION_LIMIT: usize = 32;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The stream failed or ended early.
    #[error("stream: {0}")]
    Stream(String),
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

/// Reads one CBOR message of at most [`MAX_MESSAGE`] bytes.
///
/// # Errors
/// When the stream fails, the frame is too large, or it does not decode as `T`.
///
/// # Cancel safety
/// Not cancel safe: a partly read frame is lost.
pub async fn read_msg<T: DeserializeOwned>(recv: &mut quinn::RecvStream) -> Result<T, WireError> {
    let bytes = read_blob(recv, "message", MAX_MESSAGE as u64).await?;
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
    send.write_all(&(bytes.len() as u64).to_le_bytes())
        .await
        .map_err(|e| WireError::Stream(e.to_string()))?;
    send.write_all(bytes)
        .await
        .map_err(|e| WireError::Stream(e.to_string()))
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
    let stream = |e: quinn::WriteError| WireError::Stream(e.to_string());
    let len = (head.len() + body.len()) as u64;
    send.write_all(&len.to_le_bytes()).await.map_err(stream)?;
    send.write_all(head).await.map_err(stream)?;
    send.write_chunk(body).await.map_err(stream)
}

/// Reads a length-prefixed blob of at most `limit` bytes.
///
/// # Errors
/// When the stream fails or the blob is larger than `limit`.
pub async fn read_blob(
    recv: &mut quinn::RecvStream,
    what: &'static str,
    limit: u64,
) -> Result<Vec<u8>, WireError> {
    read_blob_into(recv, what, limit, super::spare::fresh).await
}

/// Reads a blob as [`read_blob`] does, into the buffer `buffer` gives for its length.
///
/// # Errors
/// As [`read_blob`].
pub async fn read_blob_into(
    recv: &mut quinn::RecvStream,
    what: &'static str,
    limit: u64,
    buffer: impl FnOnce(usize) -> Vec<u8>,
) -> Result<Vec<u8>, WireError> {
    let mut blob = Blob::start(recv, what, limit, buffer).await?;
    blob.read_to(recv, blob.len()).await?;
    Ok(blob.into_bytes())
}

/// A length-prefixed blob being read, for readers that act on its bytes as they come.
pub struct Blob {
    bytes: Vec<u8>,
    read: usize,
}

impl Blob {
    /// Reads the length of a blob of at most `limit` bytes, and takes a buffer for it from
    /// `buffer` (given the length; made that length if it is not).
    ///
    /// # Errors
    /// As [`read_blob`].
    pub async fn start(
        recv: &mut quinn::RecvStream,
        what: &'static str,
        limit: u64,
        buffer: impl FnOnce(usize) -> Vec<u8>,
    ) -> Result<Blob, WireError> {
        let mut len = [0u8; 8];
        recv.read_exact(&mut len).await.map_err(stream)?;
        let size = u64::from_le_bytes(len);
        if size > limit {
            return Err(WireError::TooLarge { what, size, limit });
        }
        let mut bytes = buffer(size as usize);
        bytes.resize(size as usize, 0);
        Ok(Blob { bytes, read: 0 })
    }

    /// Reads on until `upto` bytes of the blob (or all of it, if fewer) have come.
    ///
    /// # Errors
    /// When the stream fails or ends first.
    pub async fn read_to(
        &mut self,
        recv: &mut quinn::RecvStream,
        upto: usize,
    ) -> Result<(), WireError> {
        let upto = upto.min(self.bytes.len());
        if upto > self.read {
            recv.read_exact(&mut self.bytes[self.read..upto])
                .await
                .map_err(stream)?;
            self.read = upto;
        }
        Ok(())
    }

    /// The bytes that have come.
    pub fn arrived(&self) -> &[u8] {
        &self.bytes[..self.read]
    }

    /// The blob's length.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether the blob has no bytes.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The whole blob's bytes (those not read yet are whatever the buffer held).
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

fn stream(e: quinn::ReadExactError) -> WireError {
    WireError::Stream(e.to_string())
}
