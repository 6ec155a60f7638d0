//! The user's side: connect to a host with a user certificate and launch, inspect or kill
//! agents.

use super::certs::CertError;
use super::messages::{
    Family, LaunchEvent, ListReply, Post, PostFrom, Refusal, Reply, Request, StatusReply,
};
use super::tls::{self, Credentials, TlsError};
use super::wire::{WireError, read_msg, write_blob, write_msg};
use crate::context::AgentId;
use crate::modules::ModuleHash;
use std::collections::BTreeMap;
use std::net::SocketAddr;

/// The application close code of a host that found no usable identity in our certificate.
const NO_USABLE_CERTIFICATE: u32 = 1;

/// What went wrong talking to a host as a user.
///
/// Each message already says what its cause said, so print it with `Display` alone; the cause
/// is still there, as `source()`, for code that inspects it.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No UDP socket for the connection.
    #[error("cannot open a UDP socket: {0}")]
    Socket(#[source] std::io::Error),
    /// The credentials do not make a TLS configuration.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The connection could not be started (an address or name quinn cannot use).
    #[error(transparent)]
    Start(#[from] quinn::ConnectError),
    /// The connection could not be made: the host is unreachable, its certificate is not the
    /// one expected, or it speaks another version of the protocol.
    #[error("cannot connect to {host}: {}", tls::connect_error(source))]
    Connect {
        /// The host dialled.
        host: HostAddr,
        /// Why the handshake failed.
        #[source]
        source: quinn::ConnectionError,
    },
    /// Nothing answered at the address.
    #[error(
        "no answer from {0} within {timeout:?}: check that `agent-host serve` runs there, that \
         its --listen address is this one, and that UDP reaches it",
        timeout = crate::net::peers::CONNECT_TIMEOUT
    )]
    NoAnswer(HostAddr),
    /// The host closed the connection because it does not accept our certificate.
    #[error("the host refused our certificate: {0}")]
    CertificateRefused(#[source] quinn::ConnectionError),
    /// The host closed the connection for another reason (it is shutting down, or we have
    /// too many connections open to it).
    #[error("the host closed the connection: {0}")]
    Closed(#[source] quinn::ConnectionError),
    /// A stream could not be opened on a connection that is still up.
    #[error(transparent)]
    Open(quinn::ConnectionError),
    /// A message could not be written or read.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The host asked for the module's bytes twice in one launch.
    #[error("the host asked for the module again")]
    ModuleAskedTwice,
    /// The host answered and refused the request.
    #[error(transparent)]
    Refused(Refusal),
}

/// A `NAME@IP:PORT` that does not name a host.
#[derive(Debug, thiserror::Error)]
pub enum HostAddrError {
    /// No `@` between the name and the address.
    #[error("expected NAME@IP:PORT, got `{0}`")]
    Syntax(String),
    /// The part after `@` is not an IP address and port.
    #[error("bad address in `{text}`: {source}")]
    Address {
        /// The whole argument.
        text: String,
        /// Why the address does not parse.
        #[source]
        source: std::net::AddrParseError,
    },
    /// The name cannot be a site's name.
    #[error(transparent)]
    Name(#[from] CertError),
}

/// A host to talk to: its site name (checked against its certificate) and address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostAddr {
    /// Site name.
    pub name: String,
    /// UDP address.
    pub addr: SocketAddr,
}

impl std::str::FromStr for HostAddr {
    type Err = HostAddrError;

    /// Parses `NAME@IP:PORT`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, addr) = s
            .split_once('@')
            .ok_or_else(|| HostAddrError::Syntax(s.to_string()))?;
        let addr = addr.parse().map_err(|source| HostAddrError::Address {
            text: s.to_string(),
            source,
        })?;
        super::certs::check_name(name)?;
        Ok(HostAddr {
            name: name.to_string(),
            addr,
        })
    }
}

impl std::fmt::Display for HostAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.name, self.addr)
    }
}

/// A connection from a user to one host.
pub struct Client {
    conn: quinn::Connection,
    endpoint: quinn::Endpoint,
}

fn bind_addr(peer: SocketAddr) -> SocketAddr {
    match peer {
        SocketAddr::V4(a) if a.ip().is_loopback() => "127.0.0.1:0",
        SocketAddr::V4(_) => "0.0.0.0:0",
        SocketAddr::V6(_) => "[::]:0",
    }
    .parse()
    .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)))
}

impl Client {
    /// Connects to `host`.
    ///
    /// With TLS 1.3 the host may still reject our certificate after this returns; that shows
    /// on the first request.
    ///
    /// # Errors
    /// When the connection cannot be made or the host's certificate is not the one expected.
    pub async fn connect(host: &HostAddr, creds: &Credentials) -> Result<Client, ClientError> {
        let mut endpoint =
            quinn::Endpoint::client(bind_addr(host.addr)).map_err(ClientError::Socket)?;
        endpoint.set_default_client_config(tls::client_config(creds, true)?);
        let connecting = endpoint.connect(host.addr, &host.name)?;
        // As fast as hosts give up on each other: an address where nothing answers is the
        // commonest mistake, and waiting for QUIC's idle timeout would take 30 s.
        let conn = tokio::time::timeout(crate::net::peers::CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| ClientError::NoAnswer(host.clone()))?
            .map_err(|source| ClientError::Connect {
                host: host.clone(),
                source,
            })?;
        Ok(Client { conn, endpoint })
    }

    /// Opens a stream and sends `request` on it, for exchanges of more than one message.
    ///
    /// # Errors
    /// When the stream cannot be opened or written.
    pub async fn open(
        &self,
        request: &Request,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), ClientError> {
        let (mut send, recv) = self.open_raw().await?;
        write_msg(&mut send, request)
            .await
            .map_err(|e| self.explain(e))?;
        Ok((send, recv))
    }

    /// Turns a transport error into one that says what the host refused, when it closed the
    /// connection: a stream's error only echoes the close.
    fn explain(&self, e: impl Into<ClientError>) -> ClientError {
        match self.conn.close_reason() {
            Some(reason) if refuses_certificate(&reason) => ClientError::CertificateRefused(reason),
            Some(reason) => ClientError::Closed(reason),
            None => e.into(),
        }
    }

    async fn call<T: serde::de::DeserializeOwned>(
        &self,
        request: &Request,
    ) -> Result<T, ClientError> {
        let (mut send, mut recv) = self.open(request).await?;
        let _ = send.finish();
        read_msg(&mut recv).await.map_err(|e| self.explain(e))
    }

    /// Sends a request the host may refuse; its refusal becomes [`ClientError::Refused`].
    async fn call_refusable<T: serde::de::DeserializeOwned>(
        &self,
        request: &Request,
    ) -> Result<T, ClientError> {
        self.call::<Reply<T>>(request)
            .await?
            .map_err(ClientError::Refused)
    }

    /// Launches an agent and calls `on_event` for each event until it and every child it
    /// cloned finished (or it is refused). Returns the agent's own end. The module's bytes travel only if the host does
    /// not hold them yet.
    ///
    /// # Errors
    /// When the connection fails before the end.
    pub async fn launch(
        &self,
        wasm: &[u8],
        itinerary: Vec<String>,
        args: BTreeMap<String, String>,
        on_event: &mut (dyn FnMut(&LaunchEvent) + Send),
    ) -> Result<LaunchEvent, ClientError> {
        self.launch_until(wasm, itinerary, args, on_event, &|_| false)
            .await
    }

    /// Like [`Self::launch`], but stops following the agent after the first event for which
    /// `stop` is true, and returns that event; the agent runs on.
    ///
    /// # Errors
    /// When the connection fails before the end.
    pub async fn launch_until(
        &self,
        wasm: &[u8],
        itinerary: Vec<String>,
        args: BTreeMap<String, String>,
        on_event: &mut (dyn FnMut(&LaunchEvent) + Send),
        stop: &(dyn Fn(&LaunchEvent) -> bool + Sync),
    ) -> Result<LaunchEvent, ClientError> {
        let request = Request::LaunchHash {
            module: ModuleHash::of(wasm),
            itinerary,
            args,
        };
        let (mut send, mut recv) = self.open(&request).await?;
        let mut first = true;
        let mut family = Family::default();
        let mut end = None;
        loop {
            let event: LaunchEvent = read_msg(&mut recv).await.map_err(|e| self.explain(e))?;
            if event == LaunchEvent::SendModule {
                if !std::mem::take(&mut first) {
                    return Err(ClientError::ModuleAskedTwice);
                }
                write_blob(&mut send, wasm)
                    .await
                    .map_err(|e| self.explain(e))?;
                let _ = send.finish();
                continue;
            }
            first = false;
            let _ = send.finish();
            on_event(&event);
            let ended = family.note(&event);
            if stop(&event) {
                return Ok(event);
            }
            if matches!(
                event,
                LaunchEvent::Finished { .. } | LaunchEvent::Refused(_)
            ) {
                end = Some(event);
            }
            // The agent's own end is the launch's, once its children ended too.
            if ended && let Some(end) = end.take() {
                return Ok(end);
            }
        }
    }

    /// One of the user's agents.
    ///
    /// # Errors
    /// When the host does not know the agent as the user's, or the connection fails.
    pub async fn status(&self, agent: AgentId) -> Result<StatusReply, ClientError> {
        self.call_refusable(&Request::Status { agent }).await
    }

    /// The user's agents launched on this host (as many as fit in one reply, running ones
    /// first) and how many there are.
    ///
    /// # Errors
    /// When the connection fails.
    pub async fn list(&self) -> Result<ListReply, ClientError> {
        self.call(&Request::List).await
    }

    /// The hosts this host knows, itself first: their state, facts and last load.
    ///
    /// # Errors
    /// When the connection fails.
    pub async fn hosts(&self) -> Result<Vec<crate::cluster::HostView>, ClientError> {
        self.call(&Request::Hosts).await
    }

    /// Kills one of the user's agents, wherever it runs.
    ///
    /// # Errors
    /// When it is not the user's agent, not running, or the connection fails.
    pub async fn kill(&self, agent: AgentId) -> Result<(), ClientError> {
        self.call_refusable(&Request::Kill { agent }).await
    }

    /// Sends `body` (CBOR) to agent `to`, launched on this host, as message number `seq` of
    /// `mailer`'s session: the home holds it once, in order with the session's other
    /// messages to `to`, however often it is sent again ([`Mailer`]).
    ///
    /// # Errors
    /// When the host refuses it (no such agent, ended, not the user's, mailbox full,
    /// message too large) or the connection fails: then it may or may not be held, and
    /// sending it again through the same mailer holds it once.
    pub async fn send_message(
        &self,
        mailer: &mut Mailer,
        to: AgentId,
        body: Vec<u8>,
    ) -> Result<(), ClientError> {
        let seq = mailer.next.get(&to).map_or(1, |n| n + 1);
        let from = PostFrom::User {
            session: mailer.session,
        };
        let post = Post {
            to,
            from,
            seq,
            body,
        };
        self.call_refusable::<()>(&Request::Post(post)).await?;
        mailer.next.insert(to, seq);
        Ok(())
    }

    /// Asks the host to send `bytes` of incompressible data to its peer `to` the way an
    /// image travels; returns how long that took.
    ///
    /// # Errors
    /// When the peer is unknown or unreachable, `bytes` is larger than an image may be, or
    /// the connection fails.
    pub async fn probe(&self, to: &str, bytes: u64) -> Result<std::time::Duration, ClientError> {
        let request = Request::Probe {
            to: to.to_string(),
            bytes,
        };
        let micros: u64 = self.call_refusable(&request).await?;
        Ok(std::time::Duration::from_micros(micros))
    }

    /// Opens a stream and sends nothing on it (for tests of the host's checks).
    ///
    /// # Errors
    /// When the stream cannot be opened.
    pub async fn open_raw(&self) -> Result<(quinn::SendStream, quinn::RecvStream), ClientError> {
        self.conn
            .open_bi()
            .await
            .map_err(|e| self.explain(ClientError::Open(e)))
    }

    /// Sends a raw request (for tests of the host's checks).
    ///
    /// # Errors
    /// When the connection fails.
    pub async fn request<T: serde::de::DeserializeOwned>(
        &self,
        request: &Request,
    ) -> Result<T, ClientError> {
        self.call(request).await
    }

    /// Closes the connection politely.
    pub async fn close(self) {
        self.conn.close(0u32.into(), b"bye");
        self.endpoint.wait_idle().await;
    }
}

/// Whether a host closed the connection over our certificate: the TLS handshake's check of it
/// failed (a TLS alert), or the host found no identity in it.
fn refuses_certificate(reason: &quinn::ConnectionError) -> bool {
    // QUIC carries a TLS alert as 0x100 plus its number: bad_certificate (42) to
    // certificate_unknown (46), unknown_ca (48), access_denied (49), certificate_required (116).
    let is_tls_alert = |code: quinn::TransportErrorCode| {
        let code = u64::from(code);
        code & !0xff == 0x100 && matches!(code & 0xff, 42..=46 | 48 | 49 | 116)
    };
    match reason {
        quinn::ConnectionError::ConnectionClosed(close) => is_tls_alert(close.error_code),
        quinn::ConnectionError::TransportError(error) => is_tls_alert(error.code),
        quinn::ConnectionError::ApplicationClosed(close) => {
            close.error_code == NO_USABLE_CERTIFICATE.into()
        }
        _ => false,
    }
}

/// A user's session of messages: each receiver's messages are numbered in it, so that one
/// sent again over any connection is held once. Its session number is random, so that
/// sessions of one user never meet.
#[derive(Clone, Debug)]
pub struct Mailer {
    session: u64,
    next: std::collections::HashMap<AgentId, u64>,
}

impl Mailer {
    /// A new session.
    pub fn new() -> Mailer {
        let mut bytes = [0u8; 8];
        // As for agent ids: the operating system's generator fails only before it is seeded.
        getrandom::fill(&mut bytes).expect("the operating system's random generator failed");
        Mailer {
            session: u64::from_le_bytes(bytes),
            next: std::collections::HashMap::new(),
        }
    }
}

impl Default for Mailer {
    fn default() -> Self {
        Mailer::new()
    }
}
