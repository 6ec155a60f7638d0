//! Connections to peer hosts: one cached connection per peer, each dialled in a slot of its
//! own so that a dial to one peer never holds up traffic to another.
//!
//! Requests for a peer that arrive while it is being dialled share that dial's outcome
//! rather than dialling again one after another. A peer whose dials failed [`DOWN_AFTER`]
//! times in a row is down: requests for it fail at once, while a background task dials it
//! until it answers again (one miss alone may be a lost packet, so it is tried once more).

use super::certs::Role;
use super::messages::Request;
use super::tls;
use super::wire::{read_msg, write_msg};
use crate::backoff::Backoff;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// How long a host waits for a peer to answer a new connection (a down peer sends nothing).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// How long a host waits for the answer to a request to a peer. A peer that crashed leaves
/// the connection to it silent until the idle timeout; giving up sooner and reconnecting
/// reaches the peer as soon as it is back.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// Failed dials in a row after which a peer is down and requests for it fail at once.
pub const DOWN_AFTER: u32 = 2;

/// Pause of the background redial after a failed dial, doubled up to [`REDIAL_MAX`].
const REDIAL_FIRST: Duration = Duration::from_millis(500);
const REDIAL_MAX: Duration = Duration::from_secs(5);

/// Why one dial of a peer failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DialError {
    /// This host closed its endpoint.
    #[error("this host is shutting down")]
    Stopping,
    /// The endpoint could not start the dial.
    #[error(transparent)]
    Start(#[from] quinn::ConnectError),
    /// Nothing answered in time.
    #[error("no answer from {site} at {addr} within {CONNECT_TIMEOUT:?}")]
    Silent {
        /// The site dialled.
        site: String,
        /// Its address.
        addr: SocketAddr,
    },
    /// The connection failed (the handshake, say).
    #[error("cannot connect to {site} at {addr}: {}", tls::connect_error(source))]
    Connect {
        /// The site dialled.
        site: String,
        /// Its address.
        addr: SocketAddr,
        /// What failed.
        source: quinn::ConnectionError,
    },
    /// Another host, or a user, answered at the address.
    #[error("{addr} is {found}, not host {site}")]
    NotThatHost {
        /// The site dialled.
        site: String,
        /// Its address.
        addr: SocketAddr,
        /// Who answered.
        found: super::certs::Identity,
    },
    /// The peer's certificate names no usable identity.
    #[error(transparent)]
    Identity(Arc<super::certs::CertError>),
    /// The slot of the peer's connection was poisoned by a panic.
    #[error("the connection slot of {0} is poisoned")]
    Poisoned(String),
}

/// Why a request to a peer got no answer.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    /// The stream could not be opened.
    #[error(transparent)]
    Open(#[from] quinn::ConnectionError),
    /// The stream failed.
    #[error(transparent)]
    Wire(#[from] super::wire::WireError),
    /// No answer came in time.
    #[error("no answer from {0} within {ASK_TIMEOUT:?}")]
    Silent(String),
}

/// Why a peer could not be reached or asked.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// No address is known for the site.
    #[error("unknown site `{0}`")]
    Unknown(String),
    /// Its last dials failed; it is being dialled in the background.
    #[error("{site} is down (no connection since {}s ago: {last}); it is being dialled again", since.as_secs())]
    Down {
        /// The site.
        site: String,
        /// How long ago the first of the failed dials began.
        since: Duration,
        /// Why the last dial failed.
        last: DialError,
    },
    /// A dial failed.
    #[error(transparent)]
    Dial(#[from] DialError),
    /// The request failed or got no answer in time.
    #[error(transparent)]
    Ask(#[from] AskError),
}

/// The peers of one host: those configured, and those membership found.
pub struct Peers {
    endpoint: quinn::Endpoint,
    addrs: Mutex<BTreeMap<String, SocketAddr>>,
    /// Peers whose address the operator gave: membership never changes those (the
    /// operator may route a peer through a relay, say).
    fixed: std::collections::BTreeSet<String>,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
}

/// One peer's connection and the state of its dials.
#[derive(Default)]
struct Slot {
    /// Held by the one task dialling the peer.
    dialling: tokio::sync::Mutex<()>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    conn: Option<quinn::Connection>,
    /// Dials ended so far: a task that waited for a dial uses its outcome.
    dials: u64,
    /// Failed dials in a row, when the first began, and why the last failed.
    failed: u32,
    failing_since: Option<Instant>,
    last_error: Option<DialError>,
    redialling: bool,
}

impl State {
    fn live(&self) -> Option<quinn::Connection> {
        self.conn.clone().filter(|c| c.close_reason().is_none())
    }

    fn down(&self, site: &str) -> Option<PeerError> {
        let last = self
            .last_error
            .clone()
            .filter(|_| self.failed >= DOWN_AFTER)?;
        Some(PeerError::Down {
            site: site.to_string(),
            since: self.failing_since.map_or(Duration::ZERO, |t| t.elapsed()),
            last,
        })
    }

    /// Why the last dial failed, for a task that waited for it.
    fn failure(&self, site: &str) -> PeerError {
        match (self.down(site), &self.last_error) {
            (Some(down), _) => down,
            (None, Some(last)) => PeerError::Dial(last.clone()),
            (None, None) => PeerError::Dial(DialError::Poisoned(site.to_string())),
        }
    }
}

impl Peers {
    /// The peers at `addrs`, dialled from `endpoint`.
    pub fn new(endpoint: quinn::Endpoint, addrs: BTreeMap<String, SocketAddr>) -> Peers {
        Peers {
            endpoint,
            fixed: addrs.keys().cloned().collect(),
            addrs: Mutex::new(addrs),
            slots: Mutex::default(),
        }
    }

    /// Whether `site` is a known peer.
    pub fn knows(&self, site: &str) -> bool {
        self.addrs.lock().is_ok_and(|a| a.contains_key(site))
    }

    /// The names of the peers.
    pub fn names(&self) -> Vec<String> {
        self.addrs
            .lock()
            .map(|a| a.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Where `site` is reached from now on (unless the operator said where).
    pub fn learn(&self, site: &str, addr: SocketAddr) {
        if self.fixed.contains(site) {
            return;
        }
        if let Ok(mut addrs) = self.addrs.lock()
            && addrs.insert(site.to_string(), addr) != Some(addr)
        {
            tracing::debug!(peer = site, %addr, "address learned");
        }
    }

    /// Where `site` is reached, unless an address is known already.
    pub fn learn_if_unknown(&self, site: &str, addr: SocketAddr) {
        if let Ok(mut addrs) = self.addrs.lock() {
            addrs.entry(site.to_string()).or_insert(addr);
        }
    }

    /// The name of the host at `addr`, read from its certificate (which must be a host's
    /// from our CA); the connection is kept for the requests that follow.
    ///
    /// # Errors
    /// When nothing answers or the certificate is not a host's.
    pub async fn learn_name(&self, addr: SocketAddr) -> Result<String, DialError> {
        let connecting = self
            .endpoint
            .connect(addr, tls::ANY_HOST)
            .map_err(|e| match e {
                quinn::ConnectError::EndpointStopping => DialError::Stopping,
                e => DialError::Start(e),
            })?;
        let site = format!("the host at {addr}");
        let conn = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Err(_) => return Err(DialError::Silent { site, addr }),
            Ok(Err(source)) => return Err(DialError::Connect { site, addr, source }),
            Ok(Ok(conn)) => conn,
        };
        let identity = tls::peer_identity(&conn).map_err(|e| DialError::Identity(Arc::new(e)))?;
        if identity.role != Role::Host {
            return Err(DialError::NotThatHost {
                site,
                addr,
                found: identity,
            });
        }
        self.learn(&identity.name, addr);
        let slot = self.slot(&identity.name);
        if let Ok(mut state) = slot.state.lock()
            && state.live().is_none()
        {
            state.conn = Some(conn);
        }
        Ok(identity.name)
    }

    fn slot(&self, site: &str) -> Arc<Slot> {
        match self.slots.lock() {
            Ok(mut slots) => slots.entry(site.to_string()).or_default().clone(),
            Err(_) => Arc::default(),
        }
    }

    /// A connection to peer `site`, reused while it lives.
    ///
    /// # Errors
    /// When the site is unknown, down, or the dial fails.
    ///
    /// # Cancel safety
    /// Cancel safe: a dial given up half-way counts for nothing.
    pub async fn connect(&self, site: &str) -> Result<quinn::Connection, PeerError> {
        self.connect_counted(site, true).await
    }

    /// Like [`Peers::connect`]; a failed dial that is not `counted` does not count towards
    /// the peer being down: membership's messages, sent to peers whether or not anyone else
    /// needs them, must not make a peer that was unreachable for a while look down (and
    /// fail hops at once) after it is back.
    async fn connect_counted(
        &self,
        site: &str,
        counted: bool,
    ) -> Result<quinn::Connection, PeerError> {
        let addr = self
            .addrs
            .lock()
            .ok()
            .and_then(|a| a.get(site).copied())
            .ok_or_else(|| PeerError::Unknown(site.to_string()))?;
        let slot = self.slot(site);
        let seen = {
            let state = slot.state.lock().map_err(|_| poisoned(site))?;
            if let Some(conn) = state.live() {
                return Ok(conn);
            }
            if let Some(down) = state.down(site) {
                return Err(down);
            }
            state.dials
        };
        let _dialling = slot.dialling.lock().await;
        {
            // A dial that ended while this task waited for its turn answers for it too.
            let state = slot.state.lock().map_err(|_| poisoned(site))?;
            if let Some(conn) = state.live() {
                return Ok(conn);
            }
            if state.dials != seen {
                return Err(state.failure(site));
            }
        }
        let dialled = dial(&self.endpoint, site, addr).await;
        if !counted && dialled.is_err() {
            return Ok(dialled?);
        }
        let redial = settle(&slot, site, &dialled);
        if redial {
            let (endpoint, slot) = (self.endpoint.clone(), Arc::downgrade(&slot));
            tokio::spawn(redial_until_up(endpoint, slot, site.to_string(), addr));
        }
        Ok(dialled?)
    }

    /// Sends one request to peer `site` and reads one reply, within [`ASK_TIMEOUT`]; on
    /// failure the connection is forgotten so that the next request connects afresh.
    ///
    /// # Errors
    /// When the peer cannot be reached, or gives no well-formed answer in time.
    pub async fn ask<T: serde::de::DeserializeOwned>(
        &self,
        site: &str,
        request: &Request,
    ) -> Result<T, PeerError> {
        self.ask_counted(site, request, true).await
    }

    /// Like [`Peers::ask`], but a failed dial does not count towards the peer being down
    /// (see [`Peers::connect_counted`]).
    pub async fn ask_quietly<T: serde::de::DeserializeOwned>(
        &self,
        site: &str,
        request: &Request,
    ) -> Result<T, PeerError> {
        self.ask_counted(site, request, false).await
    }

    async fn ask_counted<T: serde::de::DeserializeOwned>(
        &self,
        site: &str,
        request: &Request,
        counted: bool,
    ) -> Result<T, PeerError> {
        let conn = self.connect_counted(site, counted).await?;
        let reply = exchange(&conn, site, request).await;
        if reply.is_err() {
            self.forget(site, &conn);
        }
        Ok(reply?)
    }

    /// Forgets the cached connection to `site`, whichever it is (the peer restarted), and
    /// the failed dials to its earlier run.
    pub fn forget_connection(&self, site: &str) {
        let slot = self.slot(site);
        if let Ok(mut state) = slot.state.lock() {
            state.conn = None;
            state.failed = 0;
            state.failing_since = None;
        }
    }

    /// Forgets the cached connection to `site` if it is still `conn`. It is not closed: a
    /// transfer on it may still finish if the path was only cut for a while.
    pub fn forget(&self, site: &str, conn: &quinn::Connection) {
        let slot = self.slot(site);
        if let Ok(mut state) = slot.state.lock()
            && state
                .conn
                .as_ref()
                .is_some_and(|c| c.stable_id() == conn.stable_id())
        {
            state.conn = None;
        }
    }
}

/// One request and its reply on `conn`, within [`ASK_TIMEOUT`].
async fn exchange<T: serde::de::DeserializeOwned>(
    conn: &quinn::Connection,
    site: &str,
    request: &Request,
) -> Result<T, AskError> {
    let exchange = async {
        let (mut send, mut recv) = conn.open_bi().await?;
        write_msg(&mut send, request).await?;
        let _ = send.finish();
        Ok::<T, AskError>(read_msg(&mut recv).await?)
    };
    tokio::time::timeout(ASK_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| Err(AskError::Silent(site.to_string())))
}

fn poisoned(site: &str) -> PeerError {
    PeerError::Dial(DialError::Poisoned(site.to_string()))
}

/// Dials `site` at `addr` once and checks that the host there is that site.
async fn dial(
    endpoint: &quinn::Endpoint,
    site: &str,
    addr: SocketAddr,
) -> Result<quinn::Connection, DialError> {
    let connecting = endpoint.connect(addr, site).map_err(|e| match e {
        quinn::ConnectError::EndpointStopping => DialError::Stopping,
        e => DialError::Start(e),
    })?;
    let site = site.to_string();
    let conn = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Err(_) => return Err(DialError::Silent { site, addr }),
        Ok(Err(source)) => return Err(DialError::Connect { site, addr, source }),
        Ok(Ok(conn)) => conn,
    };
    let identity = tls::peer_identity(&conn).map_err(|e| DialError::Identity(Arc::new(e)))?;
    match identity {
        id if id.role == Role::Host && id.name == site => Ok(conn),
        found => Err(DialError::NotThatHost { site, addr, found }),
    }
}

/// Records a dial's outcome in the slot; whether a background redial should start.
fn settle(slot: &Slot, site: &str, dialled: &Result<quinn::Connection, DialError>) -> bool {
    let Ok(mut state) = slot.state.lock() else {
        return false;
    };
    state.dials += 1;
    match dialled {
        Ok(conn) => {
            if state.failed > 0 {
                tracing::info!(peer = site, "reachable again");
            }
            state.conn = Some(conn.clone());
            state.failed = 0;
            state.failing_since = None;
            false
        }
        Err(e) => {
            state.failed += 1;
            state.failing_since.get_or_insert_with(Instant::now);
            state.last_error = Some(e.clone());
            if state.failed == DOWN_AFTER {
                tracing::warn!(peer = site, "down: {e}");
            }
            !std::mem::replace(&mut state.redialling, true)
        }
    }
}

/// Dials a peer whose dial failed, with growing pauses, until it answers (or the host, and
/// so the slot, is gone, or the endpoint stops).
async fn redial_until_up(
    endpoint: quinn::Endpoint,
    slot: Weak<Slot>,
    site: String,
    addr: SocketAddr,
) {
    let mut pause = Backoff::new(REDIAL_FIRST, REDIAL_MAX);
    loop {
        tokio::time::sleep(pause.wait()).await;
        let Some(slot) = slot.upgrade() else { return };
        let _dialling = slot.dialling.lock().await;
        let up = slot
            .state
            .lock()
            .map_or(true, |s| s.live().is_some() || s.failed == 0);
        let done = up || {
            let dialled = dial(&endpoint, &site, addr).await;
            settle(&slot, &site, &dialled);
            dialled
                .as_ref()
                .map_or_else(|e| matches!(e, DialError::Stopping), |_| true)
        };
        if done {
            // Still holding the dial: no dial can fail between this and a new redial's start.
            if let Ok(mut state) = slot.state.lock() {
                state.redialling = false;
            }
            return;
        }
    }
}
