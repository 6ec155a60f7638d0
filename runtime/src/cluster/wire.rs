//! How hosts name each other in the membership protocol, and its messages: the sender's
//! own load record (length-prefixed CBOR), then the protocol's message in CBOR.

use bytes::{Buf, BufMut};
use foca::{Header, Member};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::sync::Arc;

/// A host as the membership protocol knows it: its site name (the name in its
/// certificate), the address it is reached at, and which start of the host this is.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HostId {
    /// Site name (shared: the protocol compares and copies identities often).
    pub name: Arc<str>,
    /// Where its peers reach it.
    pub addr: SocketAddr,
    /// Grows with each start (the start's Unix time in ms) and each rejoin after being
    /// declared down, so that the newest start of a host wins over what others remember.
    pub start: u64,
}

impl foca::Identity for HostId {
    type Addr = Arc<str>;

    fn renew(&self) -> Option<Self> {
        Some(HostId {
            start: self.start.wrapping_add(1),
            ..self.clone()
        })
    }

    fn addr(&self) -> Arc<str> {
        self.name.clone()
    }

    fn win_addr_conflict(&self, other: &Self) -> bool {
        self.start > other.start
    }
}

/// Largest membership message: one UDP datagram's worth, as SWIM assumes.
pub const MAX_MESSAGE: usize = 1400;

/// Room in each message for the sender's record, its length prefix included; the protocol
/// fills the rest.
pub const RECORD_ROOM: usize = 400;

/// Why a membership message could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// Not CBOR of the expected shape.
    #[error("bad membership message: {0}")]
    Decode(String),
    /// Could not be encoded.
    #[error("cannot encode a membership message: {0}")]
    Encode(String),
    /// No room left in the message for the item.
    #[error("no room for the item")]
    Full,
    /// The record's length prefix is missing or says more than the message holds.
    #[error("bad membership message: the record's length runs past its end")]
    Truncated,
}

/// The CBOR codec of membership messages.
#[derive(Clone, Copy, Debug, Default)]
pub struct Cbor;

fn put<T: Serialize>(item: &T, mut buf: impl BufMut) -> Result<(), CodecError> {
    let mut bytes = Vec::new();
    ciborium::into_writer(item, &mut bytes).map_err(|e| CodecError::Encode(e.to_string()))?;
    // Foca needs a buffer left clean when an item does not fit.
    if buf.remaining_mut() < bytes.len() {
        return Err(CodecError::Full);
    }
    buf.put_slice(&bytes);
    Ok(())
}

fn take<T: serde::de::DeserializeOwned>(buf: impl Buf) -> Result<T, CodecError> {
    // The reader consumes exactly the item's bytes, leaving the next item in `buf`.
    ciborium::from_reader(buf.reader()).map_err(|e| CodecError::Decode(e.to_string()))
}

impl foca::Codec<HostId> for Cbor {
    type Error = CodecError;

    fn encode_header(
        &mut self,
        header: &Header<HostId>,
        buf: impl BufMut,
    ) -> Result<(), Self::Error> {
        put(header, buf)
    }

    fn decode_header(&mut self, buf: impl Buf) -> Result<Header<HostId>, Self::Error> {
        take(buf)
    }

    fn encode_member(
        &mut self,
        member: &Member<HostId>,
        buf: impl BufMut,
    ) -> Result<(), Self::Error> {
        put(member, buf)
    }

    fn decode_member(&mut self, buf: impl Buf) -> Result<Member<HostId>, Self::Error> {
        take(buf)
    }
}

/// One message: the sender's `record`, then the protocol's `swim` message.
pub fn frame(record: &[u8], swim: &[u8]) -> bytes::Bytes {
    // Records are encoded within RECORD_ROOM ([`super::Cluster`]).
    debug_assert!(record.len() < RECORD_ROOM);
    let mut data = Vec::with_capacity(2 + record.len() + swim.len());
    data.put_u16(record.len() as u16);
    data.put_slice(record);
    data.put_slice(swim);
    data.into()
}

/// A message's record and protocol message.
///
/// # Errors
/// When the record's length prefix is missing or too long.
pub fn unframe(data: &[u8]) -> Result<(&[u8], &[u8]), CodecError> {
    let (len, rest) = data.split_first_chunk::<2>().ok_or(CodecError::Truncated)?;
    let len = usize::from(u16::from_be_bytes(*len));
    if len > rest.len() {
        return Err(CodecError::Truncated);
    }
    Ok(rest.split_at(len))
}

/// The sender named in a membership message, read without the rest: a host checks it
/// against the certificate of the connection the message came on.
///
/// # Errors
/// When the message is not framed or its protocol part does not start with a header.
pub fn sender(data: &[u8]) -> Result<HostId, CodecError> {
    let (_, swim) = unframe(data)?;
    swim_sender(swim)
}

/// The sender named in the protocol part of a message (see [`unframe`]).
///
/// # Errors
/// When it does not start with a header.
pub fn swim_sender(mut swim: &[u8]) -> Result<HostId, CodecError> {
    let header: Header<HostId> = take(&mut swim)?;
    Ok(header.src)
}

#[cfg(test)]
mod tests {
    use super::*;
    use foca::Codec;

    #[test]
    fn items_read_back_one_at_a_time_and_a_full_buffer_stays_clean() {
        let id = |n: &str| HostId {
            name: n.into(),
            addr: "127.0.0.1:1".parse().expect("addr"),
            start: 7,
        };
        let mut buf = Vec::new();
        let (a, b) = (Member::alive(id("a")), Member::down(id("b")));
        Cbor.encode_member(&a, &mut buf).expect("a");
        Cbor.encode_member(&b, &mut buf).expect("b");
        let mut rest = &buf[..];
        assert_eq!(Cbor.decode_member(&mut rest).expect("a"), a);
        assert_eq!(Cbor.decode_member(&mut rest).expect("b"), b);
        assert!(rest.is_empty());

        let mut small = [0u8; 4];
        let mut slot = &mut small[..];
        assert!(matches!(
            Cbor.encode_member(&a, &mut slot),
            Err(CodecError::Full)
        ));
        assert_eq!(small, [0; 4]);
        assert!(sender(&[0, 0, 0xff, 0x00]).is_err());
        assert!(matches!(unframe(&[0]), Err(CodecError::Truncated)));
        assert!(matches!(unframe(&[0, 3, 1, 2]), Err(CodecError::Truncated)));
        let framed = frame(b"rec", b"swim");
        assert_eq!(
            unframe(&framed).expect("framed"),
            (&b"rec"[..], &b"swim"[..])
        );
    }
}
