//! The host's UDP socket, with kernel buffers deep enough for bulk transfers.
//!
//! The default receive buffer (`net.core.rmem_default`) holds less than a millisecond of a
//! large image arriving: when the host's threads are busy a moment longer (hashing, mapping
//! memory), the kernel drops datagrams (`RcvbufErrors` in `/proc/net/snmp`), QUIC's congestion
//! control takes each loss for congestion and halves its rate, and the transfer takes up to
//! twice as long as it could (BENCHMARKS.md).

use std::net::{SocketAddr, UdpSocket};

/// The kernel buffer a host asks for each way: more of a fast transfer than a busy receiver
/// stalls for, so that no datagram is dropped meanwhile (BENCHMARKS.md). The kernel caps it
/// at `net.core.rmem_max` and `net.core.wmem_max`; raise those for the full depth.
pub const BUFFER_BYTES: usize = 32 << 20;

/// Binds a UDP socket on `addr` with [`BUFFER_BYTES`] of kernel buffer asked for each way.
///
/// # Errors
/// When the socket cannot be made or bound; a buffer the kernel refuses is only logged.
pub fn bind(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if let Err(e) = socket.set_recv_buffer_size(BUFFER_BYTES) {
        tracing::warn!("cannot enlarge the UDP receive buffer: {e}");
    }
    if let Err(e) = socket.set_send_buffer_size(BUFFER_BYTES) {
        tracing::warn!("cannot enlarge the UDP send buffer: {e}");
    }
    socket.bind(&addr.into())?;
    let (recv, send) = (socket.recv_buffer_size()?, socket.send_buffer_size()?);
    // Linux reports twice what it grants (it counts its bookkeeping).
    if recv < BUFFER_BYTES {
        tracing::info!(
            "UDP receive buffer {} KiB of the {} KiB asked (net.core.rmem_max caps it)",
            recv >> 10,
            BUFFER_BYTES >> 10
        );
    }
    tracing::debug!(recv, send, "UDP buffers");
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_socket_gets_more_than_the_default_receive_buffer() {
        let socket =
            bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap_or_else(|e| panic!("bind: {e}"));
        let default = UdpSocket::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("bind: {e}"));
        let (ours, theirs) = (
            socket2::SockRef::from(&socket).recv_buffer_size(),
            socket2::SockRef::from(&default).recv_buffer_size(),
        );
        let (ours, theirs) = (ours.unwrap(), theirs.unwrap());
        // Equal only where rmem_max is no larger than rmem_default.
        let max = std::fs::read_to_string("/proc/sys/net/core/rmem_max")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok());
        match max {
            Some(max) if max * 2 > theirs => assert!(ours > theirs, "{ours} vs {theirs}"),
            _ => assert!(ours >= theirs),
        }
        assert!(socket.local_addr().is_ok_and(|a| a.port() != 0));
    }
}
