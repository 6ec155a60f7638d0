//! The source side of a hop: the I/O that [`SourceHop`] asks for, from the agent's capture
//! to the forwarding pointer.

use crate::base::{Base, BaseList, Binding, encode_against};
use crate::context::{AgentId, HopRecord};
use crate::faults::crash_point;
use crate::image::{AgentImage, EncodeOptions, Encoded};
use crate::instance::AgentInstance;
use crate::modules::AgentModule;
use crate::net::hop::machine::{Plan, SourceHop, SourceStep};
use crate::net::hop::offer::offer_binding;
use crate::net::hop::outgoing::{Outgoing, write_blob_passing, write_image};
use crate::net::host::{Host, VERDICT_TIMEOUT};
use crate::net::messages::{
    Departed, HopInfo, Offer, OfferReply, Reply, Request, SentHome, TransferReply, TransferStatus,
    unix_us,
};
use crate::net::peers::PeerError;
use crate::net::store::{AgentRecord, StoreError};
use crate::net::wire::{WireError, read_msg, write_msg};
use crate::snapshot::{PAGE_SIZE, PageMap};
use agent_abi::HopError;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why an exchange of a hop with its destination failed.
#[derive(Debug, thiserror::Error)]
pub(in crate::net) enum LinkError {
    /// No connection to the destination.
    #[error(transparent)]
    Peer(Box<PeerError>),
    /// The stream failed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The stream could not be opened.
    #[error("{0}")]
    Connection(#[from] quinn::ConnectionError),
    /// The destination's verdict did not come in time.
    #[error("no verdict yet")]
    NoVerdict,
    /// The destination refused the query.
    #[error(transparent)]
    Refused(#[from] crate::net::messages::Refusal),
    /// The hop's streams are gone.
    #[error("no stream")]
    NoStream,
}

impl From<PeerError> for LinkError {
    fn from(error: PeerError) -> LinkError {
        LinkError::Peer(Box::new(error))
    }
}

/// Why the departure record could not be made durable.
#[derive(Debug, thiserror::Error)]
pub(in crate::net) enum RecordError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The task writing it failed.
    #[error("the departure task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Why a hop did not happen, and the departure image recorded before it failed, if any.
pub(in crate::net) struct HopFailure {
    pub(in crate::net) error: HopError,
    pub(in crate::net) departure: Option<String>,
}

impl From<HopError> for HopFailure {
    fn from(error: HopError) -> HopFailure {
        HopFailure {
            error,
            departure: None,
        }
    }
}

/// Builds the departure record of hop `seq` to `to` around the image's name.
pub(in crate::net) fn departing(seq: u64, to: &str) -> impl FnOnce(String) -> AgentRecord + '_ {
    move |image| AgentRecord::Departing {
        seq,
        to: to.to_string(),
        image,
    }
}

impl Host {
    /// The source side of a hop. `Ok`: the destination owns the agent. `Err`: it stays here.
    pub(in crate::net) async fn send_agent(
        self: &Arc<Self>,
        agent: &mut AgentInstance,
        site: &str,
    ) -> Result<HopInfo, HopFailure> {
        let ended = self.try_send_agent(agent, site).await;
        self.count_hop_out(&ended);
        ended
    }

    async fn try_send_agent(
        self: &Arc<Self>,
        agent: &mut AgentInstance,
        site: &str,
    ) -> Result<HopInfo, HopFailure> {
        let (frozen, frozen_at_us) = (Instant::now(), unix_us());
        if !self.peers.knows(site) {
            return Err(HopError::UnknownSite(site.to_string()).into());
        }
        // The agent stays suspended until the hop ends, so its memory can be read where it lies.
        let module = agent.module().clone();
        let mut out = self.pack(agent, site, module, (frozen, frozen_at_us))?;
        let mut hop = SourceHop::planned(site, out.plan);
        if out.plan.record_early
            && let Outgoing::Encoded(full) = &out.bytes
        {
            let id = out.offer.agent;
            out.recording = Some(self.record_departure(id, out.seq, site, full));
        }
        let reply = out.offer_to(self, site).await;
        out.phase("offer answered");
        let step = hop.on_offer_reply(reply);
        self.drive_hop(&mut out, site, hop, step).await
    }

    /// Counts a hop from here for the host's metrics.
    fn count_hop_out(&self, ended: &Result<HopInfo, HopFailure>) {
        let us = Duration::from_micros;
        match ended {
            Ok(info) => self.metrics.hop_out(
                "committed",
                Some((
                    us(info.freeze_us),
                    us(info.committed_us),
                    info.image_bytes,
                    info.module_bytes,
                )),
            ),
            Err(failure) => self.metrics.hop_out(
                match failure.error {
                    HopError::UnknownSite(_) => "unknown_site",
                    HopError::Refused { .. } => "refused",
                    HopError::Unreachable { .. } => "unreachable",
                },
                None,
            ),
        }
    }

    /// Sends a new child of an agent of `module` to `site`: `image` is the parent's, with
    /// the child's context, and `encoded` its bytes; frozen when the clone began. Its "departure" is durable already: the parent's host stored
    /// the parent with its clone pending, and makes the same child again after a crash.
    pub(in crate::net) async fn send_child(
        self: &Arc<Self>,
        (image, encoded): (AgentImage, Encoded),
        module: Arc<AgentModule>,
        site: &str,
        (frozen, frozen_at_us): (Instant, u64),
    ) -> Result<HopInfo, HopError> {
        if !self.peers.knows(site) {
            self.metrics.hop_out("unknown_site", None);
            return Err(HopError::UnknownSite(site.to_string()));
        }
        let bytes = Outgoing::Encoded(Arc::new(encoded));
        let known = self.peer_has(site, &module);
        let plan = Plan {
            keep_base: false,
            ..Plan::new(bytes.len() as u64, known, false)
        };
        let offer = offer_of(&image, &module, bytes.len() as u64, plan);
        let mut out = Outbound::new(
            (frozen, frozen_at_us),
            image,
            (&[], bytes),
            (offer, plan),
            module,
        );
        let mut hop = SourceHop::recorded(site, plan);
        let reply = out.offer_to(self, site).await;
        let step = hop.on_offer_reply(reply);
        // A child's move counts as a hop from here, as it counts as one where it arrives.
        let ended = self.drive_hop(&mut out, site, hop, step).await;
        self.count_hop_out(&ended);
        ended.map_err(|f| f.error)
    }

    /// Performs the steps of `hop` from `step` on until it ends: `Ok` once the destination
    /// owns the agent.
    async fn drive_hop(
        self: &Arc<Self>,
        out: &mut Outbound<'_>,
        site: &str,
        mut hop: SourceHop,
        mut step: SourceStep,
    ) -> Result<HopInfo, HopFailure> {
        loop {
            step = match step {
                SourceStep::Transfer { module } => {
                    crash_point("source-after-offer");
                    let sent = out.transfer(self, module).await;
                    out.phase("sent");
                    hop.on_sent(sent)
                }
                SourceStep::Record => {
                    let recorded = out.record(self, site).await;
                    out.phase("departure recorded");
                    hop.on_recorded(recorded)
                }
                SourceStep::Confirm => {
                    crash_point("source-before-departed");
                    hop.on_confirmed(out.confirm(site).await)
                }
                SourceStep::AwaitVerdict => {
                    let verdict = out.verdict().await;
                    out.phase("verdict");
                    hop.on_verdict(verdict)
                }
                SourceStep::Query => {
                    tokio::time::sleep(hop.query_pause()).await;
                    let query = Request::Query {
                        agent: out.offer.agent,
                        seq: out.seq,
                    };
                    let status = self.peers.ask::<Reply<TransferStatus>>(site, &query).await;
                    hop.on_query_reply(status.map_err(LinkError::from).and_then(|s| Ok(s?)))
                }
                SourceStep::Resume(error) => {
                    // It stays: a base is for an agent that left.
                    if let Ok(mut bases) = self.bases.lock() {
                        bases.remove_seq(&out.offer.agent, out.seq);
                    }
                    let departure = out.departure.take();
                    return Err(HopFailure { error, departure });
                }
                SourceStep::Forget => {
                    self.peer_holds(site, &out.module);
                    return Ok(out.info(&self.config.name, site));
                }
            };
        }
    }

    /// Captures the agent for hop `seq + 1` to `site` and encodes its image: in place, or
    /// copied out ([`Plan::in_place`]).
    fn pack<'a>(
        self: &Arc<Self>,
        agent: &'a mut AgentInstance,
        site: &str,
        module: Arc<AgentModule>,
        (frozen, frozen_at_us): (Instant, u64),
    ) -> Result<Outbound<'a>, HopFailure> {
        let unreachable = |reason: String| HopError::Unreachable {
            site: site.into(),
            reason,
        };
        // Each attempt gets its own sequence number, so a retry never meets an aborted one.
        agent.context_mut().hop_seq += 1;
        let seq = agent.context().hop_seq;
        let from = self.config.name.clone();
        let mut image = agent.capture_in_place();
        image.context.record_hop(HopRecord {
            seq,
            from,
            to: site.to_string(),
        });
        let phase = |name: &str| super::phase(true, seq, frozen, name);
        phase("captured");
        let memory = agent.memory();
        let base_fits = self.bases.lock().is_ok_and(|b| b.fits(&image.pages));
        let carried = image.pages.pages() * PAGE_SIZE as u64;
        let in_place = match Plan::in_place(carried, base_fits) {
            true => (image.encode_in_place(memory)).map_err(|e| unreachable(e.to_string()))?,
            false => None,
        };
        let bytes = match in_place {
            Some(image) => Outgoing::InPlace(image),
            None => {
                image.pages = PageMap::gather(memory, std::mem::take(&mut image.pages.runs));
                let encoded = image.encode(EncodeOptions::default());
                Outgoing::Encoded(Arc::new(encoded.map_err(|e| unreachable(e.to_string()))?))
            }
        };
        phase("encoded");
        let known = self.peer_has(site, &module);
        let plan = Plan::new(bytes.len() as u64, known, base_fits);
        let offer = offer_of(&image, &module, bytes.len() as u64, plan);
        // Hashed while the offer travels and kept before the image leaves: an agent that
        // comes straight back finds its pages here.
        let base_task = (plan.keep_base)
            .then(|| self.hash_base(seq, &image.pages, offer_binding(&offer)))
            .flatten();
        let mut out = Outbound::new(
            (frozen, frozen_at_us),
            image,
            (memory, bytes),
            (offer, plan),
            module,
        );
        out.base_task = base_task;
        Ok(out)
    }

    /// Whether peer `site` said it holds `module`.
    fn peer_has(&self, site: &str, module: &AgentModule) -> bool {
        (self.peer_modules.lock()).is_ok_and(|k| k.contains(&(site.into(), module.hash)))
    }

    /// Peer `site` holds `module`: a small image of it is sent with the offer from now on.
    fn peer_holds(&self, site: &str, module: &AgentModule) {
        if let Ok(mut known) = self.peer_modules.lock() {
            known.insert((site.to_string(), module.hash));
        }
    }

    /// Starts hashing the pages an agent leaves with at hop `seq` into its base, off the
    /// async workers, unless the return cache could not keep them.
    pub(in crate::net) fn hash_base(
        &self,
        seq: u64,
        pages: &PageMap,
        binding: Binding,
    ) -> Option<tokio::task::JoinHandle<Base>> {
        if !self.bases.lock().is_ok_and(|b| b.fits(pages)) {
            return None;
        }
        let pages = pages.clone();
        Some(tokio::task::spawn_blocking(move || {
            Base::new(seq, pages, binding)
        }))
    }

    /// Stores the departure image and record of hop `seq` to `to` as a task of its own;
    /// yields the image's name.
    pub(in crate::net) fn record_departure(
        self: &Arc<Self>,
        id: AgentId,
        seq: u64,
        to: &str,
        bytes: &Arc<Encoded>,
    ) -> tokio::task::JoinHandle<Result<String, StoreError>> {
        let (host, bytes, to) = (self.clone(), bytes.clone(), to.to_string());
        tokio::spawn(async move { host.keep_departure(id, seq, &to, &bytes.parts()).await })
    }

    /// Stores the departure image (`parts`, read one after the other) and record of hop `seq`
    /// to `to`; yields the image's name.
    pub(in crate::net) async fn keep_departure(
        &self,
        id: AgentId,
        seq: u64,
        to: &str,
        parts: &[&[u8]],
    ) -> Result<String, StoreError> {
        (self.store)
            .keep_agent(&id, parts, departing(seq, to))
            .await
    }
}

/// The offer of hop `image.context.hop_seq` of an agent of `module` whose image takes
/// `image_bytes`.
fn offer_of(image: &AgentImage, module: &AgentModule, image_bytes: u64, plan: Plan) -> Offer {
    Offer {
        agent: image.context.agent_id,
        seq: image.context.hop_seq,
        module: module.hash,
        module_bytes: module.size as u64,
        memory_bytes: image.memory_bytes,
        image_bytes,
        abi: agent_abi::ABI_VERSION,
        owner: image.context.owner.clone(),
        home: image.context.home.clone(),
        image_follows: plan.image_follows,
    }
}

/// One hop on its way out: what the driver holds between the machine's steps.
struct Outbound<'a> {
    seq: u64,
    /// When the agent was suspended, by the monotonic clock and in µs since the Unix epoch.
    frozen: Instant,
    frozen_at_us: u64,
    plan: Plan,
    image: AgentImage,
    /// The agent's memory, which its image's pages may still point into.
    memory: &'a [u8],
    /// The whole image.
    bytes: Outgoing<'a>,
    offer: Offer,
    module: Arc<AgentModule>,
    /// The pages the agent leaves with, being hashed into a base for its return.
    base_task: Option<tokio::task::JoinHandle<Base>>,
    own_base: Option<Arc<Base>>,
    /// The pages the destination holds of the agent from an earlier stay.
    base: Option<BaseList>,
    /// What is sent when it is not the whole image: the pages the destination lacks.
    partial: Option<Outgoing<'a>>,
    pages_reused: u64,
    module_sent: u64,
    streams: Option<(quinn::SendStream, quinn::RecvStream)>,
    /// From the suspension until the offer was sent.
    offered: Duration,
    /// The departure record being written.
    recording: Option<tokio::task::JoinHandle<Result<String, StoreError>>>,
    /// The departure image, once recorded: from then on a restart asks the destination.
    departure: Option<String>,
    /// How long the agent had run on the destination when it answered COMMITTED.
    ran_there: Duration,
    resumed_there: u64,
}

impl<'a> Outbound<'a> {
    /// Hop `image.context.hop_seq`, frozen at `frozen`, whose image is `bytes`, with pages
    /// that may still lie in `memory`.
    fn new(
        frozen: (Instant, u64),
        image: AgentImage,
        (memory, bytes): (&'a [u8], Outgoing<'a>),
        (offer, plan): (Offer, Plan),
        module: Arc<AgentModule>,
    ) -> Outbound<'a> {
        Outbound {
            seq: image.context.hop_seq,
            frozen: frozen.0,
            frozen_at_us: frozen.1,
            plan,
            image,
            memory,
            bytes,
            offer,
            module,
            base_task: None,
            own_base: None,
            base: None,
            partial: None,
            pages_reused: 0,
            module_sent: 0,
            streams: None,
            offered: Duration::ZERO,
            recording: None,
            departure: None,
            ran_there: Duration::ZERO,
            resumed_there: 0,
        }
    }

    fn phase(&self, name: &str) {
        super::phase(true, self.seq, self.frozen, name);
    }

    /// What travels: the pages the destination lacks, or the whole image.
    fn sent(&self) -> &Outgoing<'_> {
        self.partial.as_ref().unwrap_or(&self.bytes)
    }

    /// Sends the offer (and the image, if it follows) and reads the answer.
    async fn offer_to(&mut self, host: &Host, site: &str) -> Result<OfferReply, LinkError> {
        let conn = host.peers.connect(site).await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        self.offered = self.frozen.elapsed();
        write_msg(&mut send, &Request::Hop(self.offer.clone())).await?;
        if self.offer.image_follows {
            write_image(&mut send, &self.bytes, "source-mid-image").await?;
        }
        let mut reply: OfferReply = read_msg(&mut recv).await?;
        self.streams = Some((send, recv));
        if let OfferReply::Accept { base, need_module } = &mut reply {
            self.base = base.take();
            if !*need_module {
                host.peer_holds(site, &self.module);
            }
        }
        Ok(reply)
    }

    /// Keeps the base, encodes the image against the destination's pages if it listed any,
    /// and sends the module (if `need_module`) and the image (unless it followed the offer).
    async fn transfer(&mut self, host: &Host, need_module: bool) -> Result<(), LinkError> {
        if let Some(task) = self.base_task.take()
            && let Ok(kept) = task.await
        {
            let kept = Arc::new(kept);
            if let Ok(mut bases) = host.bases.lock() {
                bases.insert(self.offer.agent, kept.clone());
            }
            self.own_base = Some(kept);
            self.phase("base kept");
        }
        if self.base.is_some() {
            self.encode_against_list();
        }
        let Some((send, _)) = self.streams.as_mut() else {
            return Err(LinkError::NoStream);
        };
        if need_module {
            // Read only when the destination lacks it: most hops go to hosts that have it.
            let wasm = host.store.module(&self.module.hash).unwrap_or_default();
            self.module_sent = wasm.len() as u64;
            let wasm = bytes::Bytes::from(wasm);
            write_blob_passing(send, &[], &wasm, "source-mid-module").await?;
        }
        if !self.offer.image_follows {
            let wire = self.partial.as_ref().unwrap_or(&self.bytes);
            write_image(send, wire, "source-mid-image").await?;
        }
        Ok(())
    }

    /// Encodes only the pages the destination lacks, from its list.
    fn encode_against_list(&mut self) {
        let Some(list) = &self.base else { return };
        let (image, memory, own) = (&mut self.image, self.memory, self.own_base.as_deref());
        let encoded = crate::net::store::blocking(|| {
            // Pages read in place are copied out to be encoded against the list.
            if image.pages.data.is_empty() {
                let runs = std::mem::take(&mut image.pages.runs);
                image.pages = PageMap::gather(memory, runs);
            }
            encode_against(image, list, own)
        });
        match encoded {
            Ok(Some((encoded, reused))) => {
                self.partial = Some(Outgoing::Encoded(Arc::new(encoded)));
                self.pages_reused = reused;
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(seq = self.seq, "sending the whole image: {e}"),
        }
        self.phase("encoded against the destination's pages");
    }

    /// Makes the departure record durable: waits for the one being written, or writes it
    /// now (a large image's, once it was sent).
    async fn record(&mut self, host: &Arc<Host>, site: &str) -> Result<(), RecordError> {
        let (id, seq) = (self.offer.agent, self.seq);
        let recorded = match (self.recording.take(), &self.bytes) {
            (Some(task), _) => task.await?,
            (None, Outgoing::Encoded(full)) => host.record_departure(id, seq, site, full).await?,
            // Not a task of its own: the pages stay borrowed from the agent.
            (None, Outgoing::InPlace(full)) => {
                host.keep_departure(id, seq, site, &full.parts()).await
            }
        };
        match recorded {
            Ok(image) => {
                self.departure = Some(image);
                Ok(())
            }
            Err(e) => {
                tracing::error!(seq, "cannot record the departure: {e}");
                Err(e.into())
            }
        }
    }

    /// Sends DEPARTED; a hop into the agent's home says what the home records of it.
    async fn confirm(&mut self, site: &str) -> Result<(), LinkError> {
        // The home records a hop into it itself, from what it is told here.
        let home = (site == self.offer.home).then(|| SentHome {
            from_arch: std::env::consts::ARCH.to_string(),
            image_bytes: self.sent().len() as u64,
            module_bytes: self.module_sent,
            pages_reused: self.pages_reused,
            frozen_at_us: self.frozen_at_us,
            offered_us: self.offered.as_micros() as u64,
        });
        let Some((send, _)) = self.streams.as_mut() else {
            return Err(LinkError::NoStream);
        };
        let departed = Departed {
            seq: self.seq,
            home,
        };
        Ok(write_msg(send, &departed).await?)
    }

    /// Reads the destination's verdict, for at most [`VERDICT_TIMEOUT`].
    async fn verdict(&mut self) -> Result<TransferReply, LinkError> {
        let Some((_, recv)) = self.streams.as_mut() else {
            return Err(LinkError::NoStream);
        };
        let read = read_msg::<TransferReply>(recv);
        let verdict = (tokio::time::timeout(VERDICT_TIMEOUT, read).await)
            .map_err(|_| LinkError::NoVerdict)??;
        if let TransferReply::Committed {
            ran_us,
            resumed_at_us,
        } = &verdict
        {
            self.ran_there = Duration::from_micros(*ran_us);
            self.resumed_there = *resumed_at_us;
        }
        Ok(verdict)
    }

    /// The hop as it is reported to the agent's home.
    fn info(&self, from: &str, site: &str) -> HopInfo {
        let elapsed = self.frozen.elapsed();
        HopInfo {
            seq: self.seq,
            from: from.to_string(),
            from_arch: std::env::consts::ARCH.to_string(),
            to: site.to_string(),
            image_bytes: self.sent().len() as u64,
            memory_bytes: self.offer.memory_bytes,
            module_bytes: self.module_sent,
            base_list_bytes: self.base.as_ref().map_or(0, BaseList::wire_bytes),
            pages_reused: self.pages_reused,
            freeze_us: elapsed.saturating_sub(self.ran_there).as_micros() as u64,
            committed_us: elapsed.as_micros() as u64,
            frozen_at_us: self.frozen_at_us,
            resumed_at_us: self.resumed_there,
        }
    }
}
