//! Peer connections: accepting connections and streams, answering each request, and
//! asking peers.

use crate::context::AgentId;
use crate::net::budget::InFlight;
use crate::net::certs::{Identity, Role};
use crate::net::host::*;
use crate::net::messages::{AgentState, LaunchEvent, Request, StatusReply, TransferStatus};
use crate::net::quota::{HOST_STREAMS, HOST_WINDOW};
use crate::net::tls::{self};
use crate::net::wire::{drain_blob, read_msg, read_msg_charged, write_blob_repeated, write_msg};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The chunk a probe sends again and again.
pub(in crate::net) const PROBE_CHUNK: usize = 1 << 20;

/// One request's stream: its two halves and the charge of the bytes it brought.
pub(in crate::net) type Stream<'a> = (
    &'a mut quinn::SendStream,
    &'a mut quinn::RecvStream,
    &'a mut InFlight,
);

impl Host {
    pub(in crate::net) async fn accept_loop(self: Arc<Self>) {
        while let Some(incoming) = self.endpoint.accept().await {
            tokio::spawn(self.clone().serve_connection(incoming));
        }
    }

    /// Serves the streams of one connection. A user's connection counts against its
    /// quota, may open fewer streams than a host's, and charges what it sends to the user's
    /// budget as well as the host's.
    pub(in crate::net) async fn serve_connection(self: Arc<Self>, incoming: quinn::Incoming) {
        let conn = match incoming.await {
            Ok(c) => c,
            Err(e) => return tracing::info!("refused a connection: {e}"),
        };
        let peer = match tls::peer_identity(&conn) {
            Ok(id) => id,
            Err(e) => {
                tracing::warn!(remote = %conn.remote_address(), "no usable identity: {e}");
                return conn.close(1u32.into(), b"no usable certificate");
            }
        };
        // A request's first message is charged to its sender's budget only, so that bytes
        // filling the host's budget (images, modules) cannot stop `status` or `kill`.
        let (user, first, budgets) = match peer.role {
            Role::Host => {
                conn.set_max_concurrent_bi_streams(HOST_STREAMS.into());
                conn.set_receive_window(HOST_WINDOW.into());
                let host = vec![self.inflight.clone()];
                (None, host.clone(), host)
            }
            Role::User => match self.quotas.connect(&peer.name) {
                Ok(user) => {
                    let first = vec![user.inflight.clone()];
                    let budgets = vec![self.inflight.clone(), user.inflight.clone()];
                    (Some(user), first, budgets)
                }
                Err(over) => {
                    tracing::info!(%peer, "refused a connection: {over}");
                    return conn.close(2u32.into(), over.to_string().as_bytes());
                }
            },
        };
        while let Ok((send, recv)) = conn.accept_bi().await {
            let from = (peer.clone(), conn.rtt());
            let inflight = (InFlight::new(first.clone()), InFlight::new(budgets.clone()));
            tokio::spawn(self.clone().serve_stream(from, inflight, send, recv));
        }
        drop(user);
    }

    /// A connection to peer `site` ([`Peers::connect`]).
    pub(in crate::net) async fn connect(&self, site: &str) -> Result<quinn::Connection, String> {
        self.peers.connect(site).await.map_err(|e| e.to_string())
    }

    /// One request to peer `site` and its reply ([`Peers::ask`]).
    pub(in crate::net) async fn ask<T: serde::de::DeserializeOwned>(
        &self,
        site: &str,
        request: &Request,
    ) -> Result<T, String> {
        self.peers
            .ask(site, request)
            .await
            .map_err(|e| e.to_string())
    }

    /// Answers one request of `peer`, whose connection's round-trip time was `rtt`; what it
    /// sends is charged while it is held: its first message to `first`, the rest to
    /// `inflight`.
    pub(in crate::net) async fn serve_stream(
        self: Arc<Self>,
        (peer, rtt): (Identity, Duration),
        (mut first, mut inflight): (InFlight, InFlight),
        mut send: quinn::SendStream,
        mut recv: quinn::RecvStream,
    ) {
        let read = read_msg_charged(&mut recv, &mut first);
        let request: Request = match tokio::time::timeout(REQUEST_DEADLINE, read).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return tracing::info!(%peer, "bad request: {e}"),
            Err(_) => {
                let _ = recv.stop(1u32.into());
                return tracing::info!(%peer, "request not whole within {REQUEST_DEADLINE:?}");
            }
        };
        // The request's message is decoded: its bytes are no longer held.
        drop(first);
        let result = match request {
            Request::Launch { itinerary, args } => {
                let launch = (None, itinerary, args);
                self.serve_launch(&peer, launch, &mut send, &mut recv, &mut inflight)
                    .await
            }
            Request::LaunchHash {
                module,
                itinerary,
                args,
            } => {
                let launch = (Some(module), itinerary, args);
                self.serve_launch(&peer, launch, &mut send, &mut recv, &mut inflight)
                    .await
            }
            Request::Status { agent } => {
                let reply = self
                    .home_status(&agent, &peer)
                    .ok_or_else(|| format!("no agent {agent} of yours here"));
                write_msg(&mut send, &reply).await
            }
            Request::List => {
                let mut list: Vec<StatusReply> = match self.homes.lock() {
                    Ok(homes) => homes
                        .values()
                        .filter(|h| h.status.owner == peer.name)
                        .map(|h| h.status.clone())
                        .collect(),
                    Err(_) => Vec::new(),
                };
                list.sort_by_key(|a| (a.state != AgentState::Running, a.agent));
                write_msg(&mut send, &fit_list(list)).await
            }
            Request::Kill { agent } => {
                let reply = self.kill(&agent, &peer).await;
                write_msg(&mut send, &reply).await
            }
            Request::Hop(offer) => {
                // No later than when it was sent, by this host's clock: so a freeze measured
                // from it is a bound, as the source's own is (HopInfo::freeze_us).
                let now = Instant::now();
                let offered = (offer, now.checked_sub(rtt).unwrap_or(now));
                let stream = (&mut send, &mut recv, &mut inflight);
                self.serve_offer(&peer, offered, stream).await
            }
            Request::Query { agent, seq } => {
                let reply = match peer.role {
                    Role::Host => self.transfer_status(&agent, seq),
                    Role::User => Err("only hosts may query transfers".to_string()),
                };
                write_msg(&mut send, &reply).await
            }
            Request::Report { agent, event } => {
                // `SendModule` belongs to a launch stream, never to an agent's record.
                if peer.role == Role::Host && event != LaunchEvent::SendModule {
                    self.deliver_async(&agent, event).await;
                }
                write_msg(&mut send, &()).await
            }
            Request::Probe { to, bytes } => {
                let reply = match peer.role {
                    Role::User => self.probe(&to, bytes).await,
                    Role::Host => Err("only users ask for probes".to_string()),
                };
                write_msg(&mut send, &reply).await
            }
            Request::Sink => {
                let reply = match peer.role {
                    Role::Host => drain_blob(&mut recv, "probe", self.config.max_image)
                        .await
                        .map_err(|e| e.to_string()),
                    Role::User => Err("only hosts send probes".to_string()),
                };
                write_msg(&mut send, &reply).await
            }
        };
        if let Err(e) = result {
            tracing::info!(%peer, "stream ended: {e}");
        }
        let _ = send.finish();
    }

    /// What became of transfer (agent, seq) here, for its source.
    pub(in crate::net) fn transfer_status(
        &self,
        agent: &AgentId,
        seq: u64,
    ) -> Result<TransferStatus, String> {
        let receiving = self
            .receiving
            .lock()
            .is_ok_and(|r| r.contains_key(&(*agent, seq)));
        // A committed transfer is committed even while its stream is being answered: a source
        // that heard COMMITTED and asks at once must not hear IN PROGRESS.
        let committed = receiving
            && (self.store.transfer(agent, seq).ok().flatten()) == Some(TransferStatus::Committed);
        if receiving && !committed {
            return Ok(TransferStatus::InProgress);
        }
        (self.store.resolve_transfer(agent, seq)).map_err(|e| e.to_string())
    }

    /// Sends `bytes` of incompressible data to peer `to` over the connection hops use, the
    /// way an image travels (one blob, read by the peer as it comes); returns the µs it took.
    /// The data is one chunk sent again and again, so a probe of any size costs one chunk
    /// of memory; one probe runs at a time.
    pub(in crate::net) async fn probe(&self, to: &str, bytes: u64) -> Result<u64, String> {
        if !self.peers.knows(to) {
            return Err(format!("unknown site `{to}`"));
        }
        if bytes > self.config.max_image {
            return Err(format!(
                "a probe may send at most {} bytes (the largest image)",
                self.config.max_image
            ));
        }
        let Ok(_probing) = self.probing.try_acquire() else {
            return Err(format!(
                "another probe is running on {}; try again once it ended",
                self.config.name
            ));
        };
        let chunk = bytes::Bytes::from(incompressible(PROBE_CHUNK.min(bytes as usize)));
        let conn = self.connect(to).await?;
        let started = Instant::now();
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        write_msg(&mut send, &Request::Sink)
            .await
            .map_err(|e| e.to_string())?;
        write_blob_repeated(&mut send, chunk, bytes)
            .await
            .map_err(|e| e.to_string())?;
        let _ = send.finish();
        let received: Result<u64, String> = read_msg(&mut recv).await.map_err(|e| e.to_string())?;
        let elapsed = started.elapsed().as_micros() as u64;
        match received? {
            n if n == bytes => Ok(elapsed),
            n => Err(format!("{to} received {n} of {bytes} bytes")),
        }
    }
}
