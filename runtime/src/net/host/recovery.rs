//! Recovery after a restart: agents that live here go on from their stored images, and
//! departures that were under way are settled by asking their destinations.

use crate::context::{AgentId, FirstStep};
use crate::image::{AgentImage, DecodeOptions};
use crate::instance::AgentInstance;
use crate::net::hop::machine::{SourceHop, SourceStep};
use crate::net::hop::source::LinkError;
use crate::net::host::{Host, RestoreError, Start};
use crate::net::messages::{HopInfo, LaunchEvent, Reply, Request, TransferStatus};
use crate::net::store::{AgentRecord, Resume};
use agent_abi::{HopError, Op, OpResult};
use std::sync::Arc;

/// A departure image already counts the hop it was made for; when that hop failed, the agent
/// resumed from the image must not.
pub(in crate::net) fn forget_failed_hop(agent: &mut AgentInstance) {
    let seq = agent.context().hop_seq;
    if agent.context().trace.last().is_some_and(|h| h.seq == seq) {
        agent.context_mut().trace.pop();
    }
}

impl Host {
    /// Goes on with every agent the store says lives here, each from its last stored image;
    /// a departure that was under way is settled by asking its destination.
    pub(in crate::net) async fn resume_residents(self: &Arc<Self>) {
        let residents = match self.store.residents() {
            Ok(r) => r,
            Err(e) => return tracing::error!("cannot list resident agents: {e}"),
        };
        for (id, record) in residents {
            match record {
                AgentRecord::Resident {
                    resume:
                        Resume::Wake {
                            until_ms, owner, ..
                        },
                    ..
                } => self.set_alarm(id, &owner, until_ms),
                AgentRecord::Resident { image, resume, .. } => {
                    match self.restore_stored(&image).await {
                        Ok(mut agent) => {
                            tracing::info!(agent = %id, ?resume, "resuming agent");
                            let start = match resume {
                                // (Sleeping agents got an alarm above.)
                                Resume::Poll | Resume::Wake { .. } => Start::Poll,
                                Resume::Handle => match agent.context().pending.clone() {
                                    Some(op) => Start::Handle(op),
                                    None => Start::Poll,
                                },
                                Resume::Arrived => {
                                    self.came_home(&agent).await;
                                    match agent.context().first_step() {
                                        FirstStep::Complete(result) => {
                                            agent.complete(result);
                                            Start::Poll
                                        }
                                        FirstStep::Perform(op) => Start::Handle(op),
                                    }
                                }
                                Resume::HopFailed(error) => {
                                    forget_failed_hop(&mut agent);
                                    // A move (a drain's) that failed leaves its operation to
                                    // be performed here; a hop that failed returns its error.
                                    match agent.context().pending.clone() {
                                        Some(op) if !matches!(op, Op::Hop { .. }) => {
                                            Start::Handle(op)
                                        }
                                        _ => {
                                            agent.complete(OpResult::Hop(Err(error)));
                                            Start::Poll
                                        }
                                    }
                                }
                            };
                            self.spawn_agent(agent, start);
                        }
                        Err(e) => tracing::error!(agent = %id, "cannot resume agent: {e}"),
                    }
                }
                AgentRecord::Departing { seq, to, image } => {
                    tokio::spawn(self.clone().settle_departure(id, seq, to, image));
                }
                AgentRecord::Forwarded { .. } => {}
            }
        }
    }

    /// A hop this host was making when it stopped: the destination alone knows whether it
    /// committed, so ask it (until it answers) and go on from there.
    pub(in crate::net) async fn settle_departure(
        self: Arc<Self>,
        id: AgentId,
        seq: u64,
        to: String,
        image: String,
    ) {
        tracing::info!(agent = %id, seq, %to, "asking where a departing agent is");
        let mut hop = SourceHop::departed(&to);
        let mut step = SourceStep::Query;
        while step == SourceStep::Query && !self.stopping() {
            let query = Request::Query { agent: id, seq };
            let status = self.peers.ask::<Reply<TransferStatus>>(&to, &query).await;
            step = hop.on_query_reply(status.map_err(LinkError::from).and_then(|s| Ok(s?)));
            if step == SourceStep::Query {
                tokio::time::sleep(hop.query_pause()).await;
            }
        }
        let (image_bytes, stored) = match self.departure_image(&image) {
            Ok(d) => d,
            Err(e) => return tracing::error!(agent = %id, "cannot read departure image: {e}"),
        };
        let home = stored.context.home.clone();
        match step {
            SourceStep::Forget => {
                let info = HopInfo {
                    seq,
                    from: self.config.name.clone(),
                    from_arch: std::env::consts::ARCH.to_string(),
                    to,
                    image_bytes,
                    memory_bytes: stored.memory_bytes,
                    ..HopInfo::default()
                };
                self.forwarded(id, home, info).await;
            }
            SourceStep::Resume(error) => {
                let mut agent = match self.restore_stored(&image).await {
                    Ok(agent) => agent,
                    Err(e) => return tracing::error!(agent = %id, "cannot resume: {e}"),
                };
                forget_failed_hop(&mut agent);
                self.hop_failed(&mut agent, Some(&image), error).await;
                self.spawn_agent(agent, Start::Poll);
            }
            _ => {} // shutting down: the record stays, the next start asks again
        }
    }

    /// The size of departure image `image` and the image.
    fn departure_image(&self, image: &str) -> Result<(u64, AgentImage), RestoreError> {
        let bytes = self.store.image(image)?;
        let image_len = bytes.len() as u64;
        let image = AgentImage::decode(bytes, &DecodeOptions::new(self.image_limits()))?.image;
        Ok((image_len, image))
    }

    /// A hop away failed after its departure was recorded: the agent stays, and on a restart
    /// it goes on from the departure image with the same error.
    /// Without `departure` (nothing was recorded or sent) the stored record stays as it was.
    pub(in crate::net) async fn hop_failed(
        self: &Arc<Self>,
        agent: &mut AgentInstance,
        departure: Option<&str>,
        error: HopError,
    ) {
        let id = agent.context().agent_id;
        if let Some(image) = departure {
            let record = AgentRecord::Resident {
                seq: agent.context().hop_seq,
                image: image.to_string(),
                resume: Resume::HopFailed(error.clone()),
            };
            if let Err(e) = self.store.set_agent(&id, &record).await {
                tracing::error!(agent = %id, "cannot record the failed hop: {e}");
            }
        }
        tracing::info!(agent = %id, "hop failed: {error}");
        self.report(
            id,
            agent.context().home.clone(),
            LaunchEvent::HopFailed {
                site: self.config.name.clone(),
                error: error.to_string(),
            },
        )
        .await;
        if matches!(agent.context().pending, Some(Op::Hop { .. })) {
            agent.complete(OpResult::Hop(Err(error)));
        }
    }
}
