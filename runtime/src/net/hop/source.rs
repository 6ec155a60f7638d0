use crate::base::{Base, BaseList, Binding, WORTH_A_BASE, encode_against};
use crate::context::{AgentId, HopRecord};
use crate::faults::crash_point;
use crate::image::Encoded;
use crate::instance::AgentInstance;
use crate::net::hop::machine::{SourceHop, SourceStep};
use crate::net::hop::outgoing::{Outgoing, write_blob_passing, write_image};
use crate::net::host::*;
use crate::net::messages::{
    Departed, HopInfo, Offer, OfferReply, Request, SentHome, TransferReply, TransferStatus, unix_us,
};
use crate::net::store::AgentRecord;
use crate::net::wire::{read_msg, write_msg};
use crate::snapshot::{PAGE_SIZE, PageMap};
use agent_abi::HopError;
use std::sync::Arc;
use std::time::{Duration, Instant};

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
        let (frozen, frozen_at_us) = (Instant::now(), unix_us());
        if !self.config.peers.contains_key(site) {
            return Err(HopError::UnknownSite(site.to_string()).into());
        }
        let from = self.config.name.clone();
        // Each attempt gets its own sequence number, so a retry never meets an aborted one.
        agent.context_mut().hop_seq += 1;
        let seq = agent.context().hop_seq;
        let mut image = agent.capture_in_place();
        image.context.record_hop(HopRecord {
            seq,
            from: from.clone(),
            to: site.to_string(),
        });
        let unreachable = |reason: String| HopError::Unreachable {
            site: site.into(),
            reason,
        };
        let phase = |name: &str| {
            tracing::debug!(
                seq,
                phase = name,
                us = frozen.elapsed().as_micros() as u64,
                "hop out"
            )
        };
        phase("captured");
        // The agent stays suspended until the hop ends, so its memory can be read where it
        // lies. A large image the return cache would not keep is sent and stored from there;
        // any other is copied out (the base keeps its pages, and a small one costs little).
        let memory = agent.memory();
        let in_place = match self.bases.lock().is_ok_and(|b| b.fits(&image.pages)) {
            false if image.pages.pages() * PAGE_SIZE as u64 >= WORTH_PREPARING => image
                .encode_in_place(memory)
                .map_err(|e| unreachable(e.to_string()))?,
            _ => None,
        };
        let bytes = match in_place {
            Some(image) => Outgoing::InPlace(image),
            None => {
                image.pages = PageMap::gather(memory, std::mem::take(&mut image.pages.runs));
                let encoded = image.encode_parts();
                Outgoing::Encoded(Arc::new(encoded.map_err(|e| unreachable(e.to_string()))?))
            }
        };
        phase("encoded");
        // The departure is recorded while the offer and the image travel: it must be durable
        // before DEPARTED is sent, since the destination commits only after DEPARTED. Once it
        // is, a restart asks the destination, which aborts a transfer it never committed.
        // A large image is recorded once it has been sent, as the destination stores its copy
        // once it has come: on the VMs we measure on, writing to the disk slows a transfer
        // alongside by half (BENCHMARKS.md), and the destination resumes the agent before
        // DEPARTED anyway, so only the commit waits for the record.
        let record_later = bytes.len() as u64 >= WORTH_PREPARING;
        let mut recording = match &bytes {
            Outgoing::Encoded(full) if !record_later => {
                Some(self.record_departure(image.context.agent_id, seq, site, full))
            }
            _ => None,
        };
        let module = agent.module().clone();
        let known =
            (self.peer_modules.lock()).is_ok_and(|k| k.contains(&(site.into(), module.hash)));
        let offer = Offer {
            agent: image.context.agent_id,
            seq,
            module: module.hash,
            module_bytes: module.size as u64,
            memory_bytes: image.memory_bytes,
            image_bytes: bytes.len() as u64,
            abi: agent_abi::ABI_VERSION,
            owner: image.context.owner.clone(),
            home: image.context.home.clone(),
            image_follows: known && (bytes.len() as u64) < WORTH_A_BASE,
        };
        // Hashed while the offer travels and kept before the image leaves: an agent that
        // comes straight back finds its pages here.
        let mut base_task = (offer.image_bytes >= WORTH_A_BASE)
            .then(|| self.hash_base(seq, &image.pages, offer_binding(&offer)))
            .flatten();
        let mut hop = SourceHop::offered(site);
        let mut streams = None;
        let mut offered = Duration::ZERO;
        let reply = async {
            let conn = self.connect(site).await?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            offered = frozen.elapsed();
            write_msg(&mut send, &Request::Hop(offer.clone()))
                .await
                .map_err(|e| e.to_string())?;
            if offer.image_follows {
                write_image(&mut send, &bytes, "source-mid-image")
                    .await
                    .map_err(|e| e.to_string())?;
            }
            let reply: OfferReply = read_msg(&mut recv).await.map_err(|e| e.to_string())?;
            streams = Some((send, recv));
            Ok(reply)
        }
        .await;
        phase("offer answered");
        let mut reply = reply;
        let base = match &mut reply {
            Ok(OfferReply::Accept { base, .. }) => base.take(),
            _ => None,
        };
        if let Ok(OfferReply::Accept {
            need_module: false, ..
        }) = &reply
            && let Ok(mut known) = self.peer_modules.lock()
        {
            known.insert((site.to_string(), module.hash));
        }
        let mut step = hop.on_offer_reply(reply);
        let mut module_sent = 0u64;
        let mut own_base = None;
        // What is sent, when it is not the whole image: the pages the destination lacks.
        let mut partial = None;
        let mut pages_reused = 0;
        let mut backoff = Duration::from_millis(100);
        // Set once the departure is recorded: from then on a restart asks the destination.
        let mut departure = None;
        let mut unrecorded = None;
        // How long the agent had run on the destination when it answered COMMITTED.
        let mut ran_there = Duration::ZERO;
        let mut resumed_there = 0;
        loop {
            if record_later
                && departure.is_none()
                && unrecorded.is_none()
                && matches!(step, SourceStep::Confirm)
            {
                match &bytes {
                    Outgoing::Encoded(full) => {
                        recording = Some(self.record_departure(offer.agent, seq, site, full));
                    }
                    // Not a task of its own: the pages stay borrowed from the agent.
                    Outgoing::InPlace(full) => {
                        match crate::net::store::blocking(|| {
                            self.keep_departure(offer.agent, seq, site, &full.parts())
                        }) {
                            Ok(image) => departure = Some(image),
                            Err(e) => {
                                tracing::error!(seq, "cannot record the departure: {e}");
                                unrecorded = Some(e);
                            }
                        }
                        phase("departure recorded");
                    }
                }
            }
            // Any step but sending the image waits for the record.
            if !matches!(step, SourceStep::Transfer { .. })
                && let Some(recording) = recording.take()
            {
                let recorded = recording
                    .await
                    .unwrap_or_else(|e| Err(format!("the departure task failed: {e}")));
                match recorded {
                    Ok(image) => departure = Some(image),
                    Err(e) => {
                        tracing::error!(seq, "cannot record the departure: {e}");
                        unrecorded = Some(e);
                    }
                }
                phase("departure recorded");
            }
            step = match step {
                SourceStep::Transfer {
                    module: need_module,
                } => {
                    crash_point("source-after-offer");
                    if let Some(task) = base_task.take()
                        && let Ok(kept) = task.await
                    {
                        let kept = Arc::new(kept);
                        if let Ok(mut bases) = self.bases.lock() {
                            bases.insert(offer.agent, kept.clone());
                        }
                        own_base = Some(kept);
                        phase("base kept");
                    }
                    if let Some(list) = &base {
                        let own = own_base.as_deref();
                        let encoded = crate::net::store::blocking(|| {
                            // Pages read in place are copied out to be encoded against the list.
                            if image.pages.data.is_empty() {
                                let runs = std::mem::take(&mut image.pages.runs);
                                image.pages = PageMap::gather(memory, runs);
                            }
                            encode_against(&image, list, own)
                        });
                        match encoded {
                            Ok(Some((encoded, reused))) => {
                                partial = Some(Outgoing::Encoded(Arc::new(encoded)));
                                pages_reused = reused;
                            }
                            Ok(None) => {}
                            Err(e) => tracing::warn!(seq, "sending the whole image: {e}"),
                        }
                        phase("encoded against the destination's pages");
                    }
                    let sent = match streams.as_mut() {
                        Some((send, _)) => {
                            let mut result = Ok(());
                            if need_module {
                                // Read only when the destination lacks it: most hops go to
                                // hosts that have it.
                                let wasm = self.store.module(&module.hash).unwrap_or_default();
                                module_sent = wasm.len() as u64;
                                let wasm = bytes::Bytes::from(wasm);
                                result =
                                    write_blob_passing(send, &[], &wasm, "source-mid-module").await;
                            }
                            if result.is_ok() && !offer.image_follows {
                                let wire = partial.as_ref().unwrap_or(&bytes);
                                result = write_image(send, wire, "source-mid-image").await;
                            }
                            result.map_err(|e| e.to_string())
                        }
                        None => Err("no stream".to_string()),
                    };
                    phase("sent");
                    hop.on_sent(sent)
                }
                SourceStep::Confirm => match (&unrecorded, streams.as_mut()) {
                    // Dropping the streams tells the destination; it never commits.
                    (Some(why), _) => hop.on_unrecorded(why),
                    (None, Some((send, _))) => {
                        crash_point("source-before-departed");
                        // The home records a hop into it itself, from what it is told here.
                        let home = (site == offer.home).then(|| SentHome {
                            from_arch: std::env::consts::ARCH.to_string(),
                            image_bytes: partial.as_ref().unwrap_or(&bytes).len() as u64,
                            module_bytes: module_sent,
                            pages_reused,
                            frozen_at_us,
                            offered_us: offered.as_micros() as u64,
                        });
                        let sent = write_msg(send, &Departed { seq, home }).await;
                        hop.on_confirmed(sent.map_err(|e| e.to_string()))
                    }
                    (None, None) => hop.on_confirmed(Err("no stream".into())),
                },
                SourceStep::AwaitVerdict => {
                    let verdict = match streams.as_mut() {
                        Some((_, recv)) => {
                            let read = read_msg::<TransferReply>(recv);
                            tokio::time::timeout(VERDICT_TIMEOUT, read)
                                .await
                                .map_err(|_| "no verdict yet".to_string())
                                .and_then(|v| v.map_err(|e| e.to_string()))
                        }
                        None => Err("no stream".to_string()),
                    };
                    phase("verdict");
                    if let Ok(TransferReply::Committed {
                        ran_us,
                        resumed_at_us,
                    }) = &verdict
                    {
                        ran_there = Duration::from_micros(*ran_us);
                        resumed_there = *resumed_at_us;
                    }
                    hop.on_verdict(verdict)
                }
                SourceStep::Query => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    let status: Result<Result<TransferStatus, String>, String> = self
                        .ask(
                            site,
                            &Request::Query {
                                agent: offer.agent,
                                seq,
                            },
                        )
                        .await;
                    hop.on_query_reply(status.and_then(|s| s))
                }
                SourceStep::Resume(error) => {
                    // It stays: a base is for an agent that left.
                    if let Ok(mut bases) = self.bases.lock() {
                        bases.remove_seq(&offer.agent, seq);
                    }
                    return Err(HopFailure { error, departure });
                }
                SourceStep::Forget => {
                    if let Ok(mut known) = self.peer_modules.lock() {
                        known.insert((site.to_string(), module.hash));
                    }
                    let info = HopInfo {
                        seq,
                        from,
                        from_arch: std::env::consts::ARCH.to_string(),
                        to: site.to_string(),
                        image_bytes: partial.as_ref().unwrap_or(&bytes).len() as u64,
                        memory_bytes: offer.memory_bytes,
                        module_bytes: module_sent,
                        base_list_bytes: base.as_ref().map_or(0, BaseList::wire_bytes),
                        pages_reused,
                        freeze_us: frozen.elapsed().saturating_sub(ran_there).as_micros() as u64,
                        committed_us: frozen.elapsed().as_micros() as u64,
                        frozen_at_us,
                        resumed_at_us: resumed_there,
                    };
                    return Ok(info);
                }
            };
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

    /// Stores the departure image and record of hop `seq` to `to`, off the async workers;
    /// yields the image's name.
    pub(in crate::net) fn record_departure(
        self: &Arc<Self>,
        id: AgentId,
        seq: u64,
        to: &str,
        bytes: &Arc<Encoded>,
    ) -> tokio::task::JoinHandle<Result<String, String>> {
        let (host, bytes, to) = (self.clone(), bytes.clone(), to.to_string());
        if bytes.len() > crate::net::store::INLINE_IMAGE {
            return tokio::task::spawn_blocking(move || {
                host.keep_departure(id, seq, &to, &bytes.parts())
            });
        }
        tokio::spawn(async move {
            let parts = bytes.parts();
            let kept = (host.store)
                .keep_agent_async(&id, &parts, departing(seq, &to))
                .await;
            kept.map_err(|e| e.to_string())
        })
    }

    /// Stores the departure image (`parts`, read one after the other) and record of hop `seq`
    /// to `to`; yields the image's name.
    pub(in crate::net) fn keep_departure(
        &self,
        id: AgentId,
        seq: u64,
        to: &str,
        parts: &[&[u8]],
    ) -> Result<String, String> {
        (self.store)
            .keep_agent(&id, parts, departing(seq, to))
            .map_err(|e| e.to_string())
    }
}
