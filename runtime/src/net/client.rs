//! The user's side: connect to a host with a user certificate and launch, inspect or kill
//! agents.

use super::messages::{LaunchEvent, ListReply, Reply, Request, StatusReply};
use super::tls::{self, Credentials};
use super::wire::{read_msg, write_blob, write_msg};
use crate::context::AgentId;
use crate::modules::ModuleHash;
use std::collections::BTreeMap;
use std::net::SocketAddr;

/// A host to talk to: its site name (checked against its certificate) and address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostAddr {
    /// Site name.
    pub name: String,
    /// UDP address.
    pub addr: SocketAddr,
}

impl std::str::FromStr for HostAddr {
    type Err = String;

    /// Parses `NAME@IP:PORT`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (name, addr) = s
            .split_once('@')
            .ok_or_else(|| format!("expected NAME@IP:PORT, got `{s}`"))?;
        let addr = addr
            .parse()
            .map_err(|e| format!("bad address in `{s}`: {e}"))?;
        super::certs::check_name(name).map_err(|e| e.to_string())?;
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
    pub async fn connect(host: &HostAddr, creds: &Credentials) -> Result<Client, String> {
        let mut endpoint = quinn::Endpoint::client(bind_addr(host.addr))
            .map_err(|e| format!("cannot open a UDP socket: {e}"))?;
        endpoint
            .set_default_client_config(tls::client_config(creds, true).map_err(|e| e.to_string())?);
        let conn = endpoint
            .connect(host.addr, &host.name)
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| format!("cannot connect to {host}: {}", tls::connect_error(&e)))?;
        Ok(Client { conn, endpoint })
    }

    /// Opens a stream and sends `request` on it, for exchanges of more than one message.
    ///
    /// # Errors
    /// When the stream cannot be opened or written.
    pub async fn open(
        &self,
        request: &Request,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), String> {
        let (mut send, recv) = self
            .conn
            .open_bi()
            .await
            .map_err(|e| self.explain(e.to_string()))?;
        write_msg(&mut send, request)
            .await
            .map_err(|e| self.explain(e.to_string()))?;
        Ok((send, recv))
    }

    /// Turns a transport error into one that says what the host refused, when it did.
    fn explain(&self, e: String) -> String {
        match self.conn.close_reason() {
            Some(reason) if reason.to_string().contains("certificate") => {
                format!("the host refused our certificate: {reason}")
            }
            Some(reason) => format!("the host closed the connection: {reason}"),
            None => e,
        }
    }

    async fn call<T: serde::de::DeserializeOwned>(&self, request: &Request) -> Result<T, String> {
        let (mut send, mut recv) = self.open(request).await?;
        let _ = send.finish();
        read_msg(&mut recv)
            .await
            .map_err(|e| self.explain(e.to_string()))
    }

    /// Launches an agent and calls `on_event` for each event until it finishes (or is
    /// refused). Returns the last event. The module's bytes travel only if the host does
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
    ) -> Result<LaunchEvent, String> {
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
    ) -> Result<LaunchEvent, String> {
        let request = Request::LaunchHash {
            module: ModuleHash::of(wasm),
            itinerary,
            args,
        };
        let (mut send, mut recv) = self.open(&request).await?;
        let mut first = true;
        loop {
            let event: LaunchEvent = read_msg(&mut recv)
                .await
                .map_err(|e| self.explain(e.to_string()))?;
            if event == LaunchEvent::SendModule {
                if !std::mem::take(&mut first) {
                    return Err("the host asked for the module again".into());
                }
                write_blob(&mut send, wasm)
                    .await
                    .map_err(|e| self.explain(e.to_string()))?;
                let _ = send.finish();
                continue;
            }
            first = false;
            let _ = send.finish();
            on_event(&event);
            if stop(&event)
                || matches!(
                    event,
                    LaunchEvent::Finished { .. } | LaunchEvent::Refused(_)
                )
            {
                return Ok(event);
            }
        }
    }

    /// One of the user's agents.
    ///
    /// # Errors
    /// When the host does not know the agent as the user's, or the connection fails.
    pub async fn status(&self, agent: AgentId) -> Result<StatusReply, String> {
        let reply = self
            .call::<Reply<StatusReply>>(&Request::Status { agent })
            .await?;
        reply.map_err(|refused| refused.to_string())
    }

    /// The user's agents launched on this host (as many as fit in one reply, running ones
    /// first) and how many there are.
    ///
    /// # Errors
    /// When the connection fails.
    pub async fn list(&self) -> Result<ListReply, String> {
        self.call(&Request::List).await
    }

    /// Kills one of the user's agents, wherever it runs.
    ///
    /// # Errors
    /// When it is not the user's agent, not running, or the connection fails.
    pub async fn kill(&self, agent: AgentId) -> Result<(), String> {
        let reply = self.call::<Reply<()>>(&Request::Kill { agent }).await?;
        reply.map_err(|refused| refused.to_string())
    }

    /// Asks the host to send `bytes` of incompressible data to its peer `to` the way an
    /// image travels; returns how long that took.
    ///
    /// # Errors
    /// When the peer is unknown or unreachable, `bytes` is larger than an image may be, or
    /// the connection fails.
    pub async fn probe(&self, to: &str, bytes: u64) -> Result<std::time::Duration, String> {
        let request = Request::Probe {
            to: to.to_string(),
            bytes,
        };
        let reply = self.call::<Reply<u64>>(&request).await?;
        let micros = reply.map_err(|refused| refused.to_string())?;
        Ok(std::time::Duration::from_micros(micros))
    }

    /// Opens a stream and sends nothing on it (for tests of the host's checks).
    ///
    /// # Errors
    /// When the stream cannot be opened.
    pub async fn open_raw(&self) -> Result<(quinn::SendStream, quinn::RecvStream), String> {
        self.conn
            .open_bi()
            .await
            .map_err(|e| self.explain(e.to_string()))
    }

    /// Sends a raw request (for tests of the host's checks).
    ///
    /// # Errors
    /// When the connection fails.
    pub async fn request<T: serde::de::DeserializeOwned>(
        &self,
        request: &Request,
    ) -> Result<T, String> {
        self.call(request).await
    }

    /// Closes the connection politely.
    pub async fn close(self) {
        self.conn.close(0u32.into(), b"bye");
        self.endpoint.wait_idle().await;
    }
}
