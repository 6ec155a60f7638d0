//! A UDP relay on loopback that the tests control: it forwards datagrams between hosts and
//! can drop a share of them, delay them, or cut the path, like a bad network between sites.
//!
//! A host reaches a peer through the relay by having the relay's address as that peer's
//! address; TLS still checks the peer's certificate name, so the relay sees only ciphertext.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the relay does to each datagram, changeable while it runs.
#[derive(Default)]
struct Faults {
    /// Datagrams dropped per thousand, both directions.
    loss_per_mille: AtomicU32,
    /// Extra delay per datagram, in microseconds.
    delay_us: AtomicU64,
    /// Drop everything.
    cut: AtomicBool,
    /// Cut the path once this many bytes went towards the target (0: never).
    cut_after_bytes: AtomicU64,
    /// How long such a cut lasts, in milliseconds.
    cut_for_ms: AtomicU64,
    /// Bytes forwarded towards the target.
    forwarded: AtomicU64,
    /// Datagrams dropped.
    dropped: AtomicU64,
    stop: AtomicBool,
    cut_until: Mutex<Option<Instant>>,
}

/// A running relay in front of one target address.
pub struct Relay {
    /// Where hosts send datagrams meant for the target.
    pub addr: SocketAddr,
    faults: Arc<Faults>,
}

impl Relay {
    /// Starts a relay in front of `target`.
    pub fn start(target: SocketAddr) -> Relay {
        let front = UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = front.local_addr().unwrap();
        let faults = Arc::new(Faults::default());
        let shared = faults.clone();
        std::thread::spawn(move || forward_front(front, target, shared));
        Relay { addr, faults }
    }

    /// Drops `per_mille` of every thousand datagrams, in both directions.
    pub fn set_loss(&self, per_mille: u32) {
        self.faults
            .loss_per_mille
            .store(per_mille, Ordering::SeqCst);
    }

    /// Delays every datagram by `delay`.
    pub fn set_delay(&self, delay: Duration) {
        let us = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.faults.delay_us.store(us, Ordering::SeqCst);
    }

    /// Cuts the path (`true`) or heals it.
    pub fn set_cut(&self, cut: bool) {
        self.faults.cut.store(cut, Ordering::SeqCst);
    }

    /// Cuts the path for `duration` once `bytes` more bytes went towards the target.
    pub fn cut_after(&self, bytes: u64, duration: Duration) {
        let at = self.faults.forwarded.load(Ordering::SeqCst) + bytes;
        let ms = u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        self.faults.cut_for_ms.store(ms, Ordering::SeqCst);
        self.faults.cut_after_bytes.store(at, Ordering::SeqCst);
    }

    /// Datagrams dropped so far.
    pub fn dropped(&self) -> u64 {
        self.faults.dropped.load(Ordering::SeqCst)
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.faults.stop.store(true, Ordering::SeqCst);
    }
}

impl Faults {
    /// Whether to pass a datagram of `len` bytes (`towards_target` tells the direction).
    fn pass(&self, rng: &mut u64, len: usize, towards_target: bool) -> bool {
        let now = Instant::now();
        if towards_target {
            let sent = self.forwarded.fetch_add(len as u64, Ordering::SeqCst) + len as u64;
            let at = self.cut_after_bytes.load(Ordering::SeqCst);
            if at != 0 && sent >= at {
                self.cut_after_bytes.store(0, Ordering::SeqCst);
                let ms = self.cut_for_ms.load(Ordering::SeqCst);
                if let Ok(mut until) = self.cut_until.lock() {
                    *until = Some(now + Duration::from_millis(ms));
                }
            }
        }
        let timed_cut = self
            .cut_until
            .lock()
            .map(|u| u.is_some_and(|t| now < t))
            .unwrap_or(false);
        // xorshift: enough randomness for dropping packets, and no dependency.
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        let lost = (*rng % 1000) < u64::from(self.loss_per_mille.load(Ordering::SeqCst));
        let pass = !(self.cut.load(Ordering::SeqCst) || timed_cut || lost);
        if !pass {
            self.dropped.fetch_add(1, Ordering::SeqCst);
        }
        let delay = self.delay_us.load(Ordering::SeqCst);
        if pass && delay > 0 {
            std::thread::sleep(Duration::from_micros(delay));
        }
        pass
    }
}

/// Datagrams from hosts to the target: one upstream socket per host address, so that the
/// target's answers can be sent back to the right host.
fn forward_front(front: UdpSocket, target: SocketAddr, faults: Arc<Faults>) {
    let _ = front.set_read_timeout(Some(Duration::from_millis(100)));
    let mut upstreams: HashMap<SocketAddr, UdpSocket> = HashMap::new();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; 65536];
    while !faults.stop.load(Ordering::SeqCst) {
        let Ok((len, from)) = front.recv_from(&mut buf) else {
            continue;
        };
        let upstream = upstreams.entry(from).or_insert_with(|| {
            let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
            let _ = socket.connect(target);
            let (back, front, faults) = (
                socket.try_clone().unwrap(),
                front.try_clone().unwrap(),
                faults.clone(),
            );
            std::thread::spawn(move || forward_back(back, front, from, faults));
            socket
        });
        if faults.pass(&mut rng, len, true) {
            let _ = upstream.send(&buf[..len]);
        }
    }
}

/// Datagrams from the target back to one host.
fn forward_back(upstream: UdpSocket, front: UdpSocket, host: SocketAddr, faults: Arc<Faults>) {
    let _ = upstream.set_read_timeout(Some(Duration::from_millis(100)));
    let mut rng = u64::from(host.port()) | 0x5555_0000_0000;
    let mut buf = vec![0u8; 65536];
    while !faults.stop.load(Ordering::SeqCst) {
        let Ok(len) = upstream.recv(&mut buf) else {
            continue;
        };
        if faults.pass(&mut rng, len, false) {
            let _ = front.send_to(&buf[..len], host);
        }
    }
}
