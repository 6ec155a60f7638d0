//! The hop protocol's decisions, as state machines without I/O (like quinn-proto): the async
//! code in [`crate::net::host`] performs the I/O and feeds each result in.
//!
//! Phases: negotiate (OFFER → ACCEPT/REFUSE), transfer (module if needed, then image, then
//! DEPARTED once the source's departure record is durable), commit (the destination stores the
//! image durably, then answers COMMITTED). The destination never commits before DEPARTED, so
//! until DEPARTED is sent the source owns the agent and resumes it with a [`HopError`] on any
//! failure; once DEPARTED may have reached the destination, the source never guesses: it asks
//! the destination what became of the transfer (agent id, hop seq) until it learns.

use crate::backoff::Backoff;
use crate::base::WORTH_A_BASE;
use crate::net::messages::{OfferReply, TransferReply, TransferStatus};
use agent_abi::HopError;
use std::fmt::Display;
use std::time::Duration;

/// The first pause before a source asks a destination what became of a transfer again.
const QUERY_FIRST: Duration = Duration::from_millis(100);

/// The longest pause between such queries.
const QUERY_MOST: Duration = Duration::from_secs(1);

/// What the source must do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceStep {
    /// Send the module (if `module`) and then the image.
    Transfer {
        /// The destination lacks the module.
        module: bool,
    },
    /// Make the departure record durable (start writing it, if that has not begun) and
    /// say how it went ([`SourceHop::on_recorded`]).
    Record,
    /// The departure record is durable: send DEPARTED.
    Confirm,
    /// Wait for the destination's verdict.
    AwaitVerdict,
    /// The hop did not happen: resume the agent here with this error.
    Resume(HopError),
    /// The destination owns the agent: forget it here, keep a forwarding pointer.
    Forget,
    /// Unknown whether the destination committed: ask it (again).
    Query,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SourceState {
    Offered,
    Transferring,
    Confirming,
    AwaitingVerdict,
    InDoubt,
    Done,
}

/// Whether the departure record is being written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Recording {
    NotStarted,
    Started,
    Done,
}

/// How a source sends one hop: decided from the image before the offer leaves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Record the departure while the offer and the image travel. A large image is recorded
    /// once it has been sent, as the destination stores its copy once it has come: writing
    /// to the disk slows a transfer alongside (BENCHMARKS.md), and the destination resumes
    /// the agent before DEPARTED anyway, so only the commit waits for the record.
    pub record_early: bool,
    /// Send the image right after the offer, without waiting for the answer: for an image
    /// too small to be worth a page list, to a host known to hold the module.
    pub image_follows: bool,
    /// Keep the pages the agent leaves with, so that coming back sends only what changed.
    pub keep_base: bool,
}

impl Plan {
    /// The plan for an image of `image_bytes` to a destination that holds the module (as far
    /// as the source knows) or not; `base_fits`: the return cache would keep its pages.
    pub fn new(image_bytes: u64, peer_has_module: bool, base_fits: bool) -> Plan {
        Plan {
            record_early: image_bytes < WORTH_PREPARING,
            image_follows: peer_has_module && image_bytes < WORTH_A_BASE,
            keep_base: base_fits && image_bytes >= WORTH_A_BASE,
        }
    }

    /// Whether an image whose carried pages take `pages_bytes` is encoded from the agent's
    /// memory where it lies: a large one the return cache would not keep. Any other is
    /// copied out (a base keeps its pages, and a small one costs little).
    pub fn in_place(pages_bytes: u64, base_fits: bool) -> bool {
        !base_fits && pages_bytes >= WORTH_PREPARING
    }
}

/// Images at least this large have their departure recorded once they were sent, their
/// instance made ready while they travel, and their pages hashed once the agent runs (before
/// the commit), not before it resumes: below it a restore costs less than the task would,
/// and hashing is quick. Their receive buffer is kept for the next one (`spare`).
pub const WORTH_PREPARING: u64 = 8 << 20;

/// The source side of one hop. Start it after sending the OFFER.
#[derive(Debug)]
pub struct SourceHop {
    site: String,
    state: SourceState,
    plan: Plan,
    recording: Recording,
    /// The step that waits for the departure record.
    after_record: Option<SourceStep>,
    /// Pauses between queries.
    backoff: Backoff,
}

impl SourceHop {
    /// A hop to `site` whose OFFER is on its way and whose departure record is durable
    /// already.
    pub fn offered(site: &str) -> SourceHop {
        SourceHop::recorded(site, Plan::default())
    }

    /// A hop to `site` sent as `plan` says, whose OFFER is on its way and whose departure is
    /// durable already (a child's: its parent was stored with the clone pending).
    pub fn recorded(site: &str, plan: Plan) -> SourceHop {
        let mut hop = SourceHop::planned(site, plan);
        hop.recording = Recording::Done;
        hop
    }

    /// A hop to `site` sent as `plan` says, whose OFFER is on its way. With
    /// [`Plan::record_early`] the driver starts writing the departure record now.
    pub fn planned(site: &str, plan: Plan) -> SourceHop {
        SourceHop {
            site: site.to_string(),
            state: SourceState::Offered,
            plan,
            recording: match plan.record_early {
                true => Recording::Started,
                false => Recording::NotStarted,
            },
            after_record: None,
            backoff: Backoff::new(QUERY_FIRST, QUERY_MOST),
        }
    }

    /// How this hop is sent.
    pub fn plan(&self) -> Plan {
        self.plan
    }

    /// A hop to `site` found recorded as departing after a restart: its image may have reached
    /// the destination, so only the destination's answer settles it.
    pub fn departed(site: &str) -> SourceHop {
        let mut hop = SourceHop::planned(site, Plan::default());
        hop.state = SourceState::InDoubt;
        hop.recording = Recording::Done;
        hop
    }

    /// How long to wait before the next query.
    pub fn query_pause(&mut self) -> Duration {
        self.backoff.wait()
    }

    /// `step`, once a departure record being written is durable: any step but sending the
    /// image waits for it, so that a hop that ends knows whether a departure was recorded.
    fn after_recording(&mut self, step: SourceStep) -> SourceStep {
        if self.recording == Recording::Started && !matches!(step, SourceStep::Transfer { .. }) {
            self.after_record = Some(step);
            return SourceStep::Record;
        }
        step
    }

    /// The departure record is durable (`Ok`), or could not be made so.
    pub fn on_recorded<E: Display>(&mut self, recorded: Result<(), E>) -> SourceStep {
        self.recording = Recording::Done;
        let Some(then) = self.after_record.take() else {
            return self.out_of_order("departure record");
        };
        match (recorded, then) {
            (Err(why), SourceStep::Confirm) => self.on_unrecorded(&why.to_string()),
            (_, then) => then,
        }
    }

    fn done(&mut self, step: SourceStep) -> SourceStep {
        self.state = SourceState::Done;
        self.after_recording(step)
    }

    fn resume(&mut self, why: impl Into<String>) -> SourceStep {
        let error = HopError::Unreachable {
            site: self.site.clone(),
            reason: why.into(),
        };
        self.done(SourceStep::Resume(error))
    }

    fn in_doubt(&mut self) -> SourceStep {
        self.state = SourceState::InDoubt;
        self.after_recording(SourceStep::Query)
    }

    /// The destination answered the OFFER, or the exchange failed (`Err`).
    pub fn on_offer_reply<E: Display>(&mut self, reply: Result<OfferReply, E>) -> SourceStep {
        if self.state != SourceState::Offered {
            return self.out_of_order("offer reply");
        }
        match reply {
            Ok(OfferReply::Accept { need_module, .. }) => {
                self.state = SourceState::Transferring;
                SourceStep::Transfer {
                    module: need_module,
                }
            }
            Ok(OfferReply::Refuse(reason)) => {
                let error = HopError::Refused {
                    site: self.site.clone(),
                    reason,
                };
                self.done(SourceStep::Resume(error))
            }
            Ok(OfferReply::AlreadyCommitted) => self.done(SourceStep::Forget),
            // Nothing of the agent has left: it is safe to resume here.
            Err(why) => self.resume(why.to_string()),
        }
    }

    /// The module and image were sent (`Ok`) or sending failed part-way (`Err`).
    pub fn on_sent<E: Display>(&mut self, sent: Result<(), E>) -> SourceStep {
        if self.state != SourceState::Transferring {
            return self.out_of_order("end of transfer");
        }
        match sent {
            Ok(()) => {
                self.state = SourceState::Confirming;
                // A large image's departure is recorded once it was sent.
                if self.recording == Recording::NotStarted {
                    self.recording = Recording::Started;
                }
                self.after_recording(SourceStep::Confirm)
            }
            // The destination may hold the whole image, but it never commits without DEPARTED.
            Err(why) => self.resume(why.to_string()),
        }
    }

    /// The departure record could not be made durable: DEPARTED is never sent, so the
    /// destination never commits.
    pub fn on_unrecorded(&mut self, why: &str) -> SourceStep {
        if self.state != SourceState::Confirming {
            return self.out_of_order("failed departure record");
        }
        self.resume(format!("cannot record the departure: {why}"))
    }

    /// DEPARTED was sent (`Ok`), or sending it failed (`Err`): it may have arrived.
    pub fn on_confirmed<E: Display>(&mut self, sent: Result<(), E>) -> SourceStep {
        if self.state != SourceState::Confirming {
            return self.out_of_order("DEPARTED");
        }
        match sent {
            Ok(()) => {
                self.state = SourceState::AwaitingVerdict;
                SourceStep::AwaitVerdict
            }
            Err(_) => self.in_doubt(),
        }
    }

    /// The destination's verdict, or the exchange failed before it arrived.
    pub fn on_verdict<E: Display>(&mut self, verdict: Result<TransferReply, E>) -> SourceStep {
        if self.state != SourceState::AwaitingVerdict {
            return self.out_of_order("verdict");
        }
        match verdict {
            Ok(TransferReply::Committed { .. }) => self.done(SourceStep::Forget),
            Ok(TransferReply::Refused(reason)) => {
                let error = HopError::Refused {
                    site: self.site.clone(),
                    reason,
                };
                self.done(SourceStep::Resume(error))
            }
            Err(_) => self.in_doubt(),
        }
    }

    /// The destination's answer to a query, or the query failed (ask again later).
    pub fn on_query_reply<E: Display>(&mut self, status: Result<TransferStatus, E>) -> SourceStep {
        if self.state != SourceState::InDoubt {
            return self.out_of_order("query reply");
        }
        match status {
            Ok(TransferStatus::Committed) => self.done(SourceStep::Forget),
            Ok(TransferStatus::Aborted) => self.resume("the transfer was interrupted and aborted"),
            Ok(TransferStatus::InProgress) | Err(_) => SourceStep::Query,
        }
    }

    /// Whether the machine reached a final step.
    pub fn is_done(&self) -> bool {
        self.state == SourceState::Done
    }

    fn out_of_order(&mut self, what: &str) -> SourceStep {
        // A driver bug: stay safe. In doubt we ask; before DEPARTED is sent we resume.
        match self.state {
            SourceState::Offered | SourceState::Transferring => {
                self.resume(format!("protocol error: {what} out of order"))
            }
            SourceState::Done => SourceStep::Query,
            _ => self.in_doubt(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unreachable(reason: &str) -> SourceStep {
        SourceStep::Resume(HopError::Unreachable {
            site: "b".into(),
            reason: reason.into(),
        })
    }

    #[test]
    fn a_clean_hop_ends_with_the_source_forgetting_the_agent() {
        let mut hop = SourceHop::offered("b");
        assert_eq!(
            hop.on_offer_reply(Ok::<_, &str>(OfferReply::Accept {
                need_module: true,
                base: None
            })),
            SourceStep::Transfer { module: true }
        );
        assert_eq!(hop.on_sent(Ok::<_, &str>(())), SourceStep::Confirm);
        assert_eq!(
            hop.on_confirmed(Ok::<_, &str>(())),
            SourceStep::AwaitVerdict
        );
        assert_eq!(
            hop.on_verdict(Ok::<_, &str>(TransferReply::Committed {
                ran_us: 0,
                resumed_at_us: 0
            })),
            SourceStep::Forget
        );
        assert!(hop.is_done());
    }

    #[test]
    fn before_departed_is_sent_every_failure_resumes_on_the_source() {
        let mut hop = SourceHop::offered("b");
        assert_eq!(
            hop.on_offer_reply(Err("connection lost")),
            unreachable("connection lost")
        );
        let mut hop = SourceHop::offered("b");
        assert_eq!(
            hop.on_offer_reply(Ok::<_, &str>(OfferReply::Refuse("full".into()))),
            SourceStep::Resume(HopError::Refused {
                site: "b".into(),
                reason: "full".into()
            })
        );
        let mut hop = SourceHop::offered("b");
        hop.on_offer_reply(Ok::<_, &str>(OfferReply::Accept {
            need_module: false,
            base: None,
        }));
        hop.on_sent(Ok::<_, &str>(()));
        hop.on_confirmed(Ok::<_, &str>(()));
        assert_eq!(
            hop.on_verdict(Ok::<_, &str>(TransferReply::Refused("bad image".into()))),
            SourceStep::Resume(HopError::Refused {
                site: "b".into(),
                reason: "bad image".into()
            })
        );
        // The image may have arrived whole, but without DEPARTED it is never committed.
        let accepted = || {
            let mut hop = SourceHop::offered("b");
            hop.on_offer_reply(Ok::<_, &str>(OfferReply::Accept {
                need_module: false,
                base: None,
            }));
            hop
        };
        assert_eq!(accepted().on_sent(Err("reset")), unreachable("reset"));
        let mut hop = accepted();
        hop.on_sent(Ok::<_, &str>(()));
        assert_eq!(
            hop.on_unrecorded("disk full"),
            unreachable("cannot record the departure: disk full")
        );
    }

    #[test]
    fn after_departed_may_have_arrived_the_source_asks_until_it_knows() {
        let mut hop = SourceHop::offered("b");
        hop.on_offer_reply(Ok::<_, &str>(OfferReply::Accept {
            need_module: false,
            base: None,
        }));
        hop.on_sent(Ok::<_, &str>(()));
        assert_eq!(hop.on_confirmed(Err("reset")), SourceStep::Query);
        assert_eq!(hop.on_query_reply(Err("still down")), SourceStep::Query);
        assert_eq!(
            hop.on_query_reply(Ok::<_, &str>(TransferStatus::Committed)),
            SourceStep::Forget
        );

        let mut hop = SourceHop::offered("b");
        hop.on_offer_reply(Ok::<_, &str>(OfferReply::Accept {
            need_module: false,
            base: None,
        }));
        hop.on_sent(Ok::<_, &str>(()));
        hop.on_confirmed(Ok::<_, &str>(()));
        assert_eq!(hop.on_verdict(Err("timeout")), SourceStep::Query);
        assert_eq!(
            hop.on_query_reply(Ok::<_, &str>(TransferStatus::Aborted)),
            unreachable("the transfer was interrupted and aborted")
        );
    }

    #[test]
    fn a_repeated_transfer_of_a_committed_hop_is_committed_again() {
        let mut hop = SourceHop::offered("b");
        assert_eq!(
            hop.on_offer_reply(Ok::<_, &str>(OfferReply::AlreadyCommitted)),
            SourceStep::Forget
        );
    }

    #[test]
    fn out_of_order_inputs_resume_only_before_departed_is_sent() {
        let mut hop = SourceHop::offered("b");
        hop.on_offer_reply(Ok::<_, &str>(OfferReply::Accept {
            need_module: false,
            base: None,
        }));
        // A verdict before DEPARTED was sent: the destination cannot have committed.
        assert_eq!(
            hop.on_verdict(Ok::<_, &str>(TransferReply::Committed {
                ran_us: 0,
                resumed_at_us: 0
            })),
            unreachable("protocol error: verdict out of order")
        );
        let mut hop = SourceHop::offered("b");
        hop.on_offer_reply(Ok::<_, &str>(OfferReply::Accept {
            need_module: false,
            base: None,
        }));
        hop.on_sent(Ok::<_, &str>(()));
        hop.on_confirmed(Ok::<_, &str>(()));
        assert_eq!(hop.on_sent(Ok::<_, &str>(())), SourceStep::Query);
    }

    #[test]
    fn a_departure_found_after_a_restart_is_settled_only_by_the_destination() {
        let mut hop = SourceHop::departed("b");
        assert_eq!(hop.on_query_reply(Err("b is down")), SourceStep::Query);
        assert_eq!(
            hop.on_query_reply(Ok::<_, &str>(TransferStatus::InProgress)),
            SourceStep::Query
        );
        assert!(!hop.is_done());
        assert_eq!(
            hop.on_query_reply(Ok::<_, &str>(TransferStatus::Committed)),
            SourceStep::Forget
        );
        let mut hop = SourceHop::departed("b");
        assert_eq!(
            hop.on_query_reply(Ok::<_, &str>(TransferStatus::Aborted)),
            unreachable("the transfer was interrupted and aborted")
        );
        assert!(hop.is_done());
    }
}
