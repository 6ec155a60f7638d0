use crate::base::{Base, WORTH_A_BASE};
use crate::context::{AgentContext, AgentId, FirstStep};
use crate::faults::crash_point;
use crate::image::{AgentImage, DecodeOptions, EncodeOptions, ImageError, Unverified, Verify};
use crate::instance::AgentInstance;
use crate::modules::ModuleHash;
use crate::net::budget::InFlight;
use crate::net::certs::{Identity, Role};
use crate::net::hop::arriving::Arriving;
use crate::net::hop::machine::WORTH_PREPARING;
use crate::net::hop::offer::{DestView, decide_offer, offer_binding};
use crate::net::host::{AdmitError, Host, RestoreError, Start, Stream};
use crate::net::messages::{
    Departed, HopInfo, LaunchEvent, Offer, OfferReply, TransferReply, TransferStatus, unix_us,
};
use crate::net::residents::Reserved;
use crate::net::store::StoreError;
use crate::net::wire::{Blob, WireError, read_blob, read_blob_into, read_msg_charged, write_msg};
use crate::{AgentError, AgentModule};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

/// Counts a transfer (agent, seq) as being received here ([`Host::receiving`]) while it lives.
pub(in crate::net) struct Receiving {
    host: Arc<Host>,
    key: (AgentId, u64),
}

impl Receiving {
    pub(in crate::net) fn start(host: &Arc<Host>, key: (AgentId, u64)) -> Self {
        if let Ok(mut receiving) = host.receiving.lock() {
            *receiving.entry(key).or_default() += 1;
        }
        Receiving {
            host: host.clone(),
            key,
        }
    }
}

impl Drop for Receiving {
    fn drop(&mut self) {
        if let Ok(mut receiving) = self.host.receiving.lock() {
            match receiving.get_mut(&self.key) {
                Some(n) if *n > 1 => *n -= 1,
                _ => drop(receiving.remove(&self.key)),
            }
        }
    }
}

/// Largest header the destination reads ahead for [`Host::prepare`]; a larger one is
/// read with the body and checked by decoding.
pub(in crate::net) const MAX_HEADER_SEEN: usize = 1 << 20;

/// How many bytes of a large image are read before what came is written into its instance.
pub(in crate::net) const ARRIVING_PIECE: usize = 4 << 20;

impl Host {
    /// Starts making an instance ready for the agent whose image begins with `head`, when
    /// its header agrees with the offer ([`AgentInstance::prepare`]).
    pub(in crate::net) fn prepare(
        self: &Arc<Self>,
        offer: &Offer,
        head: &[u8],
    ) -> Option<Arriving> {
        let layout = AgentImage::layout(head, &self.image_limits())?;
        if layout.memory_bytes != offer.memory_bytes {
            return None;
        }
        let (host, hash) = (self.clone(), offer.module);
        let context = AgentContext::new(&offer.home, &offer.owner, Vec::new(), BTreeMap::new());
        let (memory_bytes, runs) = (layout.memory_bytes, layout.runs.clone());
        let preparing = tokio::spawn(async move {
            let module = host.module(&hash).await?;
            let (site, limits) = (host.site.clone(), &host.config.limits);
            let prepared =
                AgentInstance::prepare(module, site, context, memory_bytes, runs, limits);
            Ok(prepared.await?)
        });
        Some(Arriving::new(layout, preparing))
    }

    /// Reads a large image whose module this host holds, making its instance ready once its
    /// header has come and writing its pages into it as they come ([`Arriving`]).
    pub(in crate::net) async fn read_arriving(
        self: &Arc<Self>,
        offer: &Offer,
        recv: &mut quinn::RecvStream,
        inflight: &mut InFlight,
        buffer: impl FnOnce(usize) -> Vec<u8>,
    ) -> Result<(Vec<u8>, Option<Arriving>), WireError> {
        let limit = self.config.max_image;
        let mut blob = Blob::start_into(recv, "image", limit, inflight, buffer).await?;
        let (mut arriving, mut wanted) = (None, 12);
        while blob.arrived().len() < wanted.min(blob.len()) {
            blob.read_to(recv, wanted, inflight).await?;
            let seen = blob.arrived();
            match AgentImage::head_len(seen) {
                Some(n) if n > 12 + MAX_HEADER_SEEN => break,
                Some(n) if n <= seen.len() => arriving = self.prepare(offer, seen),
                Some(n) => wanted = n,
                None => break,
            }
        }
        while blob.arrived().len() < blob.len() {
            blob.read_to(recv, blob.arrived().len() + ARRIVING_PIECE, inflight)
                .await?;
            if let Some(arriving) = &mut arriving {
                arriving.keep_up(blob.arrived()).await;
            }
        }
        Ok((blob.into_bytes(), arriving))
    }

    /// The destination side of a hop; `offered` is no later than when the offer was sent.
    pub(in crate::net) async fn serve_offer(
        self: &Arc<Self>,
        peer: &Identity,
        (offer, offered): (Offer, Instant),
        stream: Stream<'_>,
    ) -> Result<(), WireError> {
        if peer.role != Role::Host {
            // Refused for who sent it, before anything is looked up.
            let refused = decide_offer(&offer, peer, &DestView::default());
            self.metrics.hop_in("refused");
            return write_msg(stream.0, &refused).await;
        }
        let status = self.store.transfer(&offer.agent, offer.seq).ok().flatten();
        let view = DestView {
            committed: status == Some(TransferStatus::Committed),
            aborted: status == Some(TransferStatus::Aborted),
            has_module: self.modules.get(&offer.module).is_some()
                || self.store.module(&offer.module).is_some(),
            agents: self.residents.running(),
            owner_agents: self.residents.counts(&offer.owner).running,
            max_owner_agents: self.quotas.limits().running,
            max_agents: if self.stopping() {
                0
            } else {
                self.config.max_agents
            },
            max_memory: self.config.limits.max_memory,
            max_image: self.config.max_image,
            max_module: self.config.max_module,
            draining: self.draining(),
        };
        let mut reply = decide_offer(&offer, peer, &view);
        // A place for the agent, held until it is enrolled at its commit (or the transfer
        // ends): offers decided meanwhile count it.
        let mut place = None;
        if matches!(reply, OfferReply::Accept { .. }) {
            match self.reserve(&offer.owner) {
                Ok(held) => place = Some(held),
                Err(over) => reply = OfferReply::Refuse(over.to_string()),
            }
        }
        // Held from the answer to the end of the transfer: the image may leave out its pages.
        let mut held = None;
        if let OfferReply::Accept { base, .. } = &mut reply {
            let binding = offer_binding(&offer);
            held = (self.bases.lock().ok())
                .and_then(|b| b.get(&offer.agent))
                .filter(|b| b.serves(&binding) && b.seq() < offer.seq)
                .filter(|_| offer.image_bytes >= WORTH_A_BASE);
            *base = held.as_ref().map(|b| b.list().clone());
        }
        let receiving = (matches!(reply, OfferReply::Accept { .. }))
            .then(|| Receiving::start(self, (offer.agent, offer.seq)));
        let answer = (&reply, offered, (receiving, place));
        (self.receive_offered(peer, &offer, answer, held.as_deref(), stream)).await
    }

    /// The destination side after the decision on the offer (`reply`, when the offer was
    /// sent, and the count of it as being received if accepted): answer it, and if it was
    /// accepted, receive, validate, commit and start the agent.
    pub(in crate::net) async fn receive_offered(
        self: &Arc<Self>,
        peer: &Identity,
        offer: &Offer,
        (reply, offered, (receiving, place)): (&OfferReply, Instant, Held<'_>),
        base: Option<&Base>,
        (send, recv, inflight): Stream<'_>,
    ) -> Result<(), WireError> {
        write_msg(send, reply).await?;
        let OfferReply::Accept { need_module, .. } = *reply else {
            if let OfferReply::Refuse(why) = reply {
                tracing::info!(agent = %offer.agent, %peer, "refused offer: {why}");
                self.metrics.hop_in("refused");
            }
            return Ok(());
        };
        crash_point("dest-after-offer");
        let arrival = Arrival {
            peer,
            offer,
            offered,
            base,
            started: Instant::now(),
        };
        let read = self.read_transfer(offer, need_module, recv, inflight).await;
        let (image, wasm, filling) = read.inspect_err(|_| self.metrics.hop_in("failed"))?;
        arrival.phase("image read");
        crash_point("dest-mid-image");
        // An image that must stand alone (no base was offered) is what gets stored: a large
        // one is written and synced while it is checked and restored. Dropped unnamed, the
        // file goes too.
        let image = self.spare.lend(image);
        let staging =
            (base.is_none() && image.len() > crate::net::store::INLINE_IMAGE).then(|| {
                let (host, image) = (self.clone(), image.clone());
                tokio::task::spawn_blocking(move || host.store.stage_image(&[&image]))
            });
        let (mut agent, whole, unverified) =
            match self.receive(offer, wasm, &image, base, filling).await {
                Ok(arrived) => arrived,
                Err(why) => {
                    self.metrics.hop_in("failed");
                    return arrival.refuse(send, receiving, why).await;
                }
            };
        // It runs while DEPARTED comes and the commit is made; a commit that fails, or a
        // stream that breaks first, drops it before it did anything seen.
        let (verdict, committed) = tokio::sync::oneshot::channel();
        let flags = agent.flags();
        let start = match agent.context().first_step() {
            FirstStep::Complete(result) => {
                agent.complete(result);
                Start::Arrived(committed, None)
            }
            FirstStep::Perform(op) => Start::Arrived(committed, Some(op)),
        };
        self.spawn_agent(agent, start);
        let resumed = (Instant::now(), unix_us());
        arrival.phase("resumed");
        let checking = unverified.map(|u| tokio::task::spawn_blocking(move || u.check()));
        let departed = read_msg_charged::<Departed>(recv, inflight).await;
        let departed = departed.inspect_err(|_| self.metrics.hop_in("failed"))?;
        arrival.phase("departed");
        crash_point("dest-before-commit");
        let stored = whole.as_deref().unwrap_or(&image[..]);
        let commit = self
            .commit(offer, &departed, stored, (staging, checking))
            .await;
        arrival.phase("committed");
        if let Err(why) = commit {
            let _ = verdict.send(false);
            self.metrics.hop_in("failed");
            return arrival.refuse(send, receiving, why).await;
        }
        self.metrics.hop_in("committed");
        // Before the agent is let go, so that a crash here leaves it where the commit did.
        crash_point("dest-after-commit");
        self.enroll(offer.agent, &offer.owner, flags);
        // Counted as running now: offers decided from here on count it once.
        drop(place);
        if let Ok(mut bases) = self.bases.lock() {
            bases.remove(&offer.agent);
        }
        let answered = self.arrived(&arrival, departed, resumed, send).await;
        let _ = verdict.send(true);
        answered
    }

    /// Reads what the source sends after the acceptance: the image (into the buffer of the
    /// last large one, if kept) and the module if it was asked for. A large agent's instance
    /// is made ready and written while its body travels, once its header has come (not when
    /// its module has just come: it was being admitted meanwhile).
    async fn read_transfer(
        self: &Arc<Self>,
        offer: &Offer,
        need_module: bool,
        recv: &mut quinn::RecvStream,
        inflight: &mut InFlight,
    ) -> Result<(Vec<u8>, Option<Vec<u8>>, Option<Arriving>), WireError> {
        // The module comes first, unless the image followed the offer at once.
        let early = match offer.image_follows {
            true => Some(read_blob(recv, "image", self.config.max_image, inflight).await?),
            false => None,
        };
        let buffer = |len: usize| self.spare.take(len);
        let wasm = match need_module {
            true => {
                let wasm = read_blob(recv, "module", self.config.max_module, inflight).await?;
                crash_point("dest-mid-module");
                Some(wasm)
            }
            false => None,
        };
        let (image, filling) = match early {
            Some(image) => (image, None),
            None if wasm.is_none() && offer.image_bytes >= WORTH_PREPARING => {
                self.read_arriving(offer, recv, inflight, buffer).await?
            }
            None => {
                let limit = self.config.max_image;
                let read = read_blob_into(recv, "image", limit, inflight, buffer);
                (read.await?, None)
            }
        };
        Ok((image, wasm, filling))
    }

    /// Makes an arrival durable once DEPARTED names its hop and a large image, hashed while
    /// the agent ran, proved whole. One that failed to stage is staged again by the commit,
    /// which reports the error.
    async fn commit(
        &self,
        offer: &Offer,
        departed: &Departed,
        stored: &[u8],
        (staging, checking): (Option<Staging>, Option<Checking>),
    ) -> Result<(), ArrivalError> {
        let staged = match staging {
            Some(task) => task.await.ok().and_then(Result::ok),
            None => None,
        };
        let checked = match checking {
            Some(task) => task.await.map(|c| c.map_err(ArrivalError::Invalid)),
            None => Ok(Ok(())),
        };
        if departed.seq != offer.seq {
            return Err(ArrivalError::OtherHop(departed.seq));
        }
        checked??;
        let (agent, seq) = (&offer.agent, offer.seq);
        Ok((self.store.commit_arrival(agent, seq, stored, staged)).await?)
    }

    /// The arrival is durable: answer COMMITTED, and record a hop into the agent's home here.
    async fn arrived(
        self: &Arc<Self>,
        arrival: &Arrival<'_>,
        departed: Departed,
        (resumed, resumed_at_us): (Instant, u64),
        send: &mut quinn::SendStream,
    ) -> Result<(), WireError> {
        let (offer, peer) = (arrival.offer, arrival.peer);
        // It has arrived once the commit is durable, whether or not the answer reaches the
        // source.
        tracing::info!(agent = %offer.agent, from = %peer, seq = offer.seq, "agent arrived");
        let ran_us = resumed.elapsed().as_micros() as u64;
        let reply = TransferReply::Committed {
            ran_us,
            resumed_at_us,
        };
        let answered = write_msg(send, &reply).await;
        let answered_at = Instant::now();
        if let Some(sent) = departed.home
            && offer.home == self.config.name
        {
            // The source's time until it sent the offer plus ours since then.
            let since_offer = |at: Instant| {
                let ours = at.duration_since(arrival.offered).as_micros() as u64;
                sent.offered_us.saturating_add(ours)
            };
            let info = HopInfo {
                seq: offer.seq,
                from: peer.name.clone(),
                from_arch: sent.from_arch,
                to: self.config.name.clone(),
                image_bytes: sent.image_bytes,
                memory_bytes: offer.memory_bytes,
                module_bytes: sent.module_bytes,
                base_list_bytes: arrival.base.map_or(0, |b| b.list().wire_bytes()),
                pages_reused: sent.pages_reused,
                freeze_us: since_offer(resumed),
                committed_us: since_offer(answered_at),
                frozen_at_us: sent.frozen_at_us,
                resumed_at_us,
            };
            // Stored before the agent is let go: a write it makes next (its end, a sleep, a
            // departure) must not be durable before its hop home is, or a crash of the home
            // in between would lose the hop. (A crash before this write leaves the agent
            // `Arrived`: a restart records the hop then.)
            (self.deliver(&offer.agent, LaunchEvent::Moved(info))).await;
        }
        answered
    }

    /// Validates an arriving agent fully, by restoring it; yields it and, when pages were
    /// filled in from a base, the whole image to store in place of the bytes that came.
    pub(in crate::net) async fn receive(
        self: &Arc<Self>,
        offer: &Offer,
        wasm: Option<Vec<u8>>,
        bytes: &bytes::Bytes,
        base: Option<&Base>,
        arriving: Option<Arriving>,
    ) -> Result<(AgentInstance, Option<Vec<u8>>, Option<Unverified>), ArrivalError> {
        let started = Instant::now();
        let module = match wasm {
            Some(wasm) => self.arriving_module(offer, wasm).await?,
            None => self.module(&offer.module).await?,
        };
        let (image, filled_in, unverified) = self.decode_arrival(offer, bytes, base)?;
        let phase = |name: &str| super::phase(false, offer.seq, started, name);
        phase("decoded");
        // What is stored must stand alone: the base may be gone when the store is read.
        let whole = match filled_in {
            true => Some(
                (image.encode(EncodeOptions::default()))
                    .map_err(ArrivalError::Encode)?
                    .to_vec(),
            ),
            false => None,
        };
        let ready = match arriving {
            Some(arriving) => arriving.finish(bytes).await,
            None => None,
        };
        let (restored, how) = match ready {
            Some((ready, Some(runs))) if runs == image.pages.runs => (
                AgentInstance::restore_written(ready, image),
                "restored into the instance written as it came",
            ),
            Some((ready, None)) => (
                AgentInstance::restore_into(ready, image),
                "restored into the instance made ready",
            ),
            // Not prepared, preparing failed, or written by other runs (decoding read the
            // same header, so never): a restore from scratch.
            _ => {
                let site = self.site.clone();
                let restored = AgentInstance::restore(module, site, image, &self.config.limits);
                (restored.await, "restored")
            }
        };
        let agent = restored?;
        phase(how);
        Ok((agent, whole, unverified))
    }

    /// Admits and keeps the module an arrival brought.
    async fn arriving_module(
        self: &Arc<Self>,
        offer: &Offer,
        wasm: Vec<u8>,
    ) -> Result<Arc<AgentModule>, ArrivalError> {
        if ModuleHash::of(&wasm) != offer.module {
            return Err(ArrivalError::OtherModule);
        }
        let module = (self.admit(wasm.clone()).await).map_err(ArrivalError::ModuleRefused)?;
        self.store.put_module(&module.hash, &wasm)?;
        Ok(module)
    }

    /// Decodes an arriving image, filling in pages from `base`, and checks it is the offered
    /// agent's. A large image that stands alone is hashed once the agent runs, before the
    /// commit: it comes back unverified.
    fn decode_arrival(
        &self,
        offer: &Offer,
        bytes: &bytes::Bytes,
        base: Option<&Base>,
    ) -> Result<(AgentImage, bool, Option<Unverified>), ArrivalError> {
        let limits = self.image_limits();
        let options = DecodeOptions {
            base: base.map(Base::as_base_pages),
            verify: match base.is_none() && bytes.len() as u64 >= WORTH_PREPARING {
                true => Verify::Later,
                false => Verify::Now,
            },
            ..DecodeOptions::new(limits)
        };
        let (decoded, unverified) = match AgentImage::decode(bytes.clone(), &options) {
            Ok(d) => (Ok((d.image, d.filled_in)), d.unverified),
            Err(e) => (Err(e), None),
        };
        if let (Err(ImageError::HashMismatch), Some(base)) = (&decoded, base) {
            // Pages filled in from the base made a wrong image (a hash collision, or a base
            // the source did not see): the next offer gets no list and sends every page.
            if let Ok(mut bases) = self.bases.lock() {
                bases.remove_seq(&offer.agent, base.seq());
            }
        }
        let (image, filled_in) = decoded?;
        if image.context.agent_id != offer.agent
            || image.context.hop_seq != offer.seq
            || image.module != offer.module
            || image.context.owner != offer.owner
            || image.context.home != offer.home
        {
            return Err(ArrivalError::NotTheOffer);
        }
        Ok((image, filled_in, unverified))
    }
}

/// What an accepted transfer holds until it ends: its count as being received, and the place
/// for its agent until the agent is enrolled.
type Held<'a> = (Option<Receiving>, Option<Reserved<'a>>);

/// A large image being written to the store while it is checked.
type Staging = tokio::task::JoinHandle<Result<crate::net::store::Staged, StoreError>>;

/// A large image's pages being hashed while the agent runs.
type Checking = tokio::task::JoinHandle<Result<(), ImageError>>;

/// One accepted transfer at the destination.
struct Arrival<'a> {
    peer: &'a Identity,
    offer: &'a Offer,
    /// No later than when the offer was sent, by this host's clock.
    offered: Instant,
    base: Option<&'a Base>,
    started: Instant,
}

impl Arrival<'_> {
    fn phase(&self, name: &str) {
        super::phase(false, self.offer.seq, self.started, name);
    }

    /// Refuses the transfer: the source still owns the agent.
    async fn refuse(
        &self,
        send: &mut quinn::SendStream,
        receiving: Option<Receiving>,
        why: ArrivalError,
    ) -> Result<(), WireError> {
        let (agent, peer) = (self.offer.agent, self.peer);
        tracing::warn!(%agent, %peer, "refused transfer: {why}");
        // A query once the source has the answer must not hear IN PROGRESS.
        drop(receiving);
        write_msg(send, &TransferReply::Refused(why.to_string())).await
    }
}

/// Why an arriving agent was refused.
#[derive(Debug, thiserror::Error)]
pub(in crate::net) enum ArrivalError {
    /// The module bytes are not those offered.
    #[error("the module bytes do not match the offered hash")]
    OtherModule,
    /// Admission refused the module.
    #[error("module refused: {0}")]
    ModuleRefused(#[source] AdmitError),
    /// The module it needs is not here, or not admitted.
    #[error(transparent)]
    Module(#[from] RestoreError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The image does not decode.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// A large image's pages do not match its digest.
    #[error("invalid image: {0}")]
    Invalid(#[source] ImageError),
    /// The image is not the offered agent's.
    #[error("the image does not match the offer")]
    NotTheOffer,
    /// The whole image could not be encoded to be stored.
    #[error("{0}")]
    Encode(#[source] std::io::Error),
    /// The agent could not be restored.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// DEPARTED named another hop.
    #[error("DEPARTED names hop {0}")]
    OtherHop(u64),
    /// A task checking the image failed.
    #[error("{0}")]
    Task(#[from] tokio::task::JoinError),
}
