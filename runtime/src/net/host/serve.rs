//! Peer connections: accepting connections and streams, answering each request, and
//! asking peers.

use crate::context::AgentId;
use crate::net::budget::InFlight;
use crate::net::certs::{Identity, Role};
use crate::net::host::{Host, REQUEST_DEADLINE, fit_list, incompressible};
use crate::net::mailbox::SenderKey;
use crate::net::messages::{LaunchEvent, PostFrom, Refusal, Reply, Request, TransferStatus};
use crate::net::quota::{HOST_STREAMS, HOST_WINDOW};
use crate::net::tls::{self};
use crate::net::wire::{
    WireError, drain_blob, read_msg, read_msg_charged, write_blob_repeated, write_msg,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The longest a fetch waits for a message: well within the time a peer waits for an answer
/// ([`crate::net::host::ASK_TIMEOUT`]).
pub(in crate::net) const FETCH_WAIT_MOST: Duration = Duration::from_secs(2);

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
            Err(e) => {
                self.metrics.connection("handshake_failed");
                return tracing::info!("refused a connection: {e}");
            }
        };
        let peer = match tls::peer_identity(&conn) {
            Ok(id) => id,
            Err(e) => {
                self.metrics.connection("no_identity");
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
                    self.metrics.connection("over_quota");
                    tracing::info!(%peer, "refused a connection: {over}");
                    return conn.close(2u32.into(), over.to_string().as_bytes());
                }
            },
        };
        self.metrics.connection("accepted");
        while let Ok((send, recv)) = conn.accept_bi().await {
            let from = (peer.clone(), conn.rtt(), conn.remote_address());
            let inflight = (InFlight::new(first.clone()), InFlight::new(budgets.clone()));
            tokio::spawn(self.clone().serve_stream(from, inflight, send, recv));
        }
        drop(user);
    }

    /// Answers one request of `peer`, whose connection's round-trip time was `rtt`; what it
    /// sends is charged while it is held: its first message to `first`, the rest to
    /// `inflight`.
    pub(in crate::net) async fn serve_stream(
        self: Arc<Self>,
        (peer, rtt, remote): (Identity, Duration, std::net::SocketAddr),
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
        let stream = (&mut send, &mut recv, &mut inflight);
        let result = match request {
            Request::Launch { itinerary, args } => {
                let launch = (None, itinerary, args);
                self.serve_launch(&peer, launch, stream).await
            }
            Request::LaunchHash {
                module,
                itinerary,
                args,
            } => {
                let launch = (Some(module), itinerary, args);
                self.serve_launch(&peer, launch, stream).await
            }
            Request::Hop(offer) => {
                // No later than when it was sent, by this host's clock: so a freeze measured
                // from it is a bound, as the source's own is (HopInfo::freeze_us).
                let now = Instant::now();
                let offered = (offer, now.checked_sub(rtt).unwrap_or(now));
                self.serve_offer(&peer, offered, stream).await
            }
            Request::Gossip { data } => {
                let reply = self.gossip_in(&peer, remote, &data);
                if let Err(why) = &reply {
                    tracing::info!(%peer, "refused a membership message: {why}");
                }
                write_msg(&mut send, &reply).await
            }
            request => self.answer(&peer, request, stream.0, stream.1).await,
        };
        if let Err(e) = result {
            tracing::info!(%peer, "stream ended: {e}");
        }
        let _ = send.finish();
    }

    /// Answers a request that is one message each way.
    async fn answer(
        self: &Arc<Self>,
        peer: &Identity,
        request: Request,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
    ) -> Result<(), WireError> {
        let only_hosts = |what: &str| Refusal::OnlyHosts(what.to_string());
        let only_users = |what: &str| Refusal::OnlyUsers(what.to_string());
        match request {
            Request::Status { agent } => {
                let reply = (self.home_status(&agent, peer)).ok_or(Refusal::NotYours(agent));
                write_msg(send, &reply).await
            }
            Request::List => write_msg(send, &fit_list(self.home_list(&peer.name))).await,
            Request::Kill { agent } => write_msg(send, &self.kill_tree(&agent, peer).await).await,
            Request::Query { agent, seq } => {
                let reply = match peer.role {
                    Role::Host => self.transfer_status(&agent, seq).await,
                    Role::User => Err(only_hosts("may query transfers")),
                };
                write_msg(send, &reply).await
            }
            Request::Report { agent, event } => {
                // `SendModule` belongs to a launch stream, never to an agent's record; a
                // clone's children are recorded by `Children`, and their events are passed to
                // their parent's launcher by the home itself.
                let own = !matches!(
                    event,
                    LaunchEvent::SendModule
                        | LaunchEvent::Cloning { .. }
                        | LaunchEvent::Child { .. }
                );
                if peer.role == Role::Host && own {
                    self.deliver(&agent, event).await;
                }
                write_msg(send, &()).await
            }
            Request::Probe { to, bytes } => {
                let reply = match peer.role {
                    Role::User => self.probe(&to, bytes).await,
                    Role::Host => Err(only_users("ask for probes")),
                };
                write_msg(send, &reply).await
            }
            Request::Sink => {
                let reply = match peer.role {
                    Role::Host => (drain_blob(recv, "probe", self.config.max_image).await)
                        .map_err(|e| Refusal::Unreachable(e.to_string())),
                    Role::User => Err(only_hosts("send probes")),
                };
                write_msg(send, &reply).await
            }
            Request::Post(post) => {
                let reply = match (peer.role, &post.from) {
                    (Role::User, &PostFrom::User { session }) => {
                        let name = peer.name.clone();
                        let sender = SenderKey::User { name, session };
                        self.post(post, sender, &peer.name).await
                    }
                    (Role::Host, PostFrom::Agent { id, owner }) => {
                        let (sender, owner) = (SenderKey::Agent(*id), owner.clone());
                        self.post(post, sender, &owner).await
                    }
                    (Role::User, _) => Err(only_hosts("post for agents")),
                    (Role::Host, _) => Err(only_users("post as users")),
                };
                write_msg(send, &reply).await
            }
            Request::Fetch {
                agent,
                after,
                taken,
                wait_ms,
            } => {
                let reply = match peer.role {
                    Role::Host => {
                        let wait = Duration::from_millis(wait_ms).min(FETCH_WAIT_MOST);
                        self.fetch_mail(&agent, (after, taken), wait).await
                    }
                    Role::User => Err(only_hosts("fetch messages")),
                };
                write_msg(send, &reply).await
            }
            Request::Await { agent, after } => {
                let reply = match peer.role {
                    Role::Host => self.await_mail(&agent, after, &peer.name).await,
                    Role::User => Err(only_hosts("wait for messages")),
                };
                write_msg(send, &reply).await
            }
            Request::Wake { agent } => {
                let reply = match peer.role {
                    Role::Host => {
                        self.wake_for_mail(&agent);
                        Ok(())
                    }
                    Role::User => Err(only_hosts("wake agents")),
                };
                write_msg(send, &reply).await
            }
            Request::Children {
                parent,
                round,
                children,
            } => {
                let reply = match peer.role {
                    Role::Host => (self.add_children((&parent, round), children, &peer.name)).await,
                    Role::User => Err(only_hosts("clone agents")),
                };
                write_msg(send, &reply).await
            }
            Request::Hosts => write_msg(send, &self.membership.hosts()).await,
            Request::Drain => write_msg(send, &self.drain_request(peer)).await,
            Request::Launch { .. }
            | Request::LaunchHash { .. }
            | Request::Hop(_)
            | Request::Gossip { .. } => Ok(()),
        }
    }

    /// What became of transfer (agent, seq) here, for its source.
    pub(in crate::net) async fn transfer_status(
        &self,
        agent: &AgentId,
        seq: u64,
    ) -> Reply<TransferStatus> {
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
        let resolved = self.store.resolve_transfer(agent, seq).await;
        resolved.map_err(|e| Refusal::Store(e.to_string()))
    }

    /// Sends `bytes` of incompressible data to peer `to` over the connection hops use, the
    /// way an image travels (one blob, read by the peer as it comes); returns the µs it took.
    /// The data is one chunk sent again and again, so a probe of any size costs one chunk
    /// of memory; one probe runs at a time.
    pub(in crate::net) async fn probe(&self, to: &str, bytes: u64) -> Reply<u64> {
        if !self.peers.knows(to) {
            return Err(Refusal::UnknownSite(to.to_string()));
        }
        if bytes > self.config.max_image {
            let max = self.config.max_image;
            return Err(Refusal::ProbeTooLarge { max });
        }
        let Ok(_probing) = self.probing.try_acquire() else {
            return Err(Refusal::Probing(self.config.name.clone()));
        };
        let chunk = bytes::Bytes::from(incompressible(PROBE_CHUNK.min(bytes as usize)));
        let unreachable = |e: &dyn std::fmt::Display| Refusal::Unreachable(e.to_string());
        let conn = self.peers.connect(to).await.map_err(|e| unreachable(&e))?;
        let started = Instant::now();
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| unreachable(&e))?;
        let sent = async {
            write_msg(&mut send, &Request::Sink).await?;
            write_blob_repeated(&mut send, chunk, bytes).await?;
            let _ = send.finish();
            read_msg::<Reply<u64>>(&mut recv).await
        };
        let received = sent.await.map_err(|e| unreachable(&e))??;
        let elapsed = started.elapsed().as_micros() as u64;
        match received {
            n if n == bytes => Ok(elapsed),
            received => Err(Refusal::Short {
                site: to.to_string(),
                received,
                sent: bytes,
            }),
        }
    }
}
