//! The image a hop sends, and how it goes on the wire.

use crate::faults::crash_point;
use crate::image::{Encoded, InPlace};
use crate::net::wire::{WireError, write_blob_parts};
use std::sync::Arc;

/// The image of a hop: encoded into buffers of its own, or read in place from the memory of
/// the agent, which stays suspended until the hop ends.
pub(crate) enum Outgoing<'m> {
    /// Shared with the departure record and, for a base, the return cache.
    Encoded(Arc<Encoded>),
    /// A large image the return cache does not keep: its pages are never copied out whole.
    InPlace(InPlace<'m>),
}

impl Outgoing<'_> {
    /// Length of the image in bytes.
    pub(crate) fn len(&self) -> usize {
        match self {
            Outgoing::Encoded(e) => e.len(),
            Outgoing::InPlace(i) => i.len(),
        }
    }
}

/// Writes `image` as a length-prefixed blob; the crash point `point` sits half-way through
/// its body. A body of its own goes to quinn as it is; one read in place is copied into
/// quinn's buffers as flow control lets it go, so the copy overlaps the transfer.
pub(crate) async fn write_image(
    send: &mut quinn::SendStream,
    image: &Outgoing<'_>,
    point: &'static str,
) -> Result<(), WireError> {
    let image = match image {
        Outgoing::Encoded(e) => return write_blob_passing(send, e.head(), e.body(), point).await,
        Outgoing::InPlace(image) => image,
    };
    let stream = WireError::Write;
    let parts = image.parts();
    let Some((head, body)) = parts.split_first() else {
        return Ok(());
    };
    send.write_all(&(image.len() as u64).to_le_bytes())
        .await
        .map_err(stream)?;
    send.write_all(head).await.map_err(stream)?;
    let half = (image.len() - head.len()) / 2;
    let mut at = 0;
    for part in body {
        match half.checked_sub(at).filter(|&n| n < part.len()) {
            Some(n) => {
                send.write_all(&part[..n]).await.map_err(stream)?;
                crash_point(point);
                send.write_all(&part[n..]).await.map_err(stream)?;
            }
            None => send.write_all(part).await.map_err(stream)?,
        }
        at += part.len();
    }
    Ok(())
}

/// Writes a blob like [`write_blob_parts`]; the crash point `point` sits half-way through
/// its body.
pub(crate) async fn write_blob_passing(
    send: &mut quinn::SendStream,
    head: &[u8],
    body: &bytes::Bytes,
    point: &'static str,
) -> Result<(), WireError> {
    if !cfg!(feature = "failpoints") {
        return write_blob_parts(send, head, body.clone()).await;
    }
    let stream = WireError::Write;
    let (len, half) = ((head.len() + body.len()) as u64, body.len() / 2);
    send.write_all(&len.to_le_bytes()).await.map_err(stream)?;
    send.write_all(head).await.map_err(stream)?;
    send.write_chunk(body.slice(..half)).await.map_err(stream)?;
    crash_point(point);
    send.write_chunk(body.slice(half..)).await.map_err(stream)
}
