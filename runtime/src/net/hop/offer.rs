//! The destination's decision on an OFFER, before any state moves: pure, from what the
//! destination knows ([`DestView`]).

use crate::base::Binding;
use crate::net::certs::{Identity, Role};
use crate::net::messages::{Offer, OfferReply};

/// What a destination knows when it decides on an OFFER.
#[derive(Clone, Debug, Default)]
pub struct DestView {
    /// (agent, seq) was already committed here.
    pub committed: bool,
    /// (agent, seq) was aborted here (a query answered "aborted").
    pub aborted: bool,
    /// The module is already admitted here.
    pub has_module: bool,
    /// Agents running here now.
    pub agents: usize,
    /// Most agents this host runs at once.
    pub max_agents: usize,
    /// Agents of the offer's owner running here now.
    pub owner_agents: usize,
    /// Most agents one user may run here.
    pub max_owner_agents: usize,
    /// Most memory per agent.
    pub max_memory: u64,
    /// Largest image accepted.
    pub max_image: u64,
    /// Largest module accepted.
    pub max_module: u64,
    /// The host is draining: it takes no agent.
    pub draining: bool,
}

/// Phase 1 at the destination: accept or refuse an OFFER before any state moves.
pub fn decide_offer(offer: &Offer, from: &Identity, view: &DestView) -> OfferReply {
    if from.role != Role::Host {
        return OfferReply::Refuse(format!(
            "only hosts may transfer agents, and {from} is not a host"
        ));
    }
    if view.committed {
        return OfferReply::AlreadyCommitted;
    }
    if view.aborted {
        return OfferReply::Refuse(format!(
            "transfer of agent {} at seq {} was aborted",
            offer.agent, offer.seq
        ));
    }
    if view.draining {
        return OfferReply::Refuse("the host is draining: it takes no agents".into());
    }
    if offer.abi != agent_abi::ABI_VERSION {
        return OfferReply::Refuse(format!(
            "agent ABI v{} is not offered here (this host speaks v{})",
            offer.abi,
            agent_abi::ABI_VERSION
        ));
    }
    if offer.memory_bytes > view.max_memory {
        return OfferReply::Refuse(format!(
            "the agent needs {:.1} MiB of memory; this host allows {:.1} MiB",
            offer.memory_bytes as f64 / f64::from(1 << 20),
            view.max_memory as f64 / f64::from(1 << 20)
        ));
    }
    if offer.image_bytes > view.max_image {
        return OfferReply::Refuse(format!(
            "image of {} bytes exceeds this host's limit of {}",
            offer.image_bytes, view.max_image
        ));
    }
    if !view.has_module && offer.module_bytes > view.max_module {
        return OfferReply::Refuse(format!(
            "module of {} bytes exceeds this host's limit of {}",
            offer.module_bytes, view.max_module
        ));
    }
    if view.agents >= view.max_agents {
        return OfferReply::Refuse(format!("host is full ({} agents)", view.agents));
    }
    if view.owner_agents >= view.max_owner_agents {
        return OfferReply::Refuse(format!(
            "user {} already runs {} agents here, the most a user may (user_max_agents)",
            offer.owner, view.owner_agents
        ));
    }
    OfferReply::Accept {
        need_module: !view.has_module,
        base: None,
    }
}

/// What an offer says of the agent that a base must match to serve it.
pub fn offer_binding(offer: &Offer) -> Binding {
    Binding {
        module: offer.module,
        owner: offer.owner.clone(),
        home: offer.home.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::AgentId;
    use crate::modules::ModuleHash;

    fn offer() -> Offer {
        Offer {
            agent: AgentId([1; 16]),
            seq: 3,
            module: ModuleHash([2; 32]),
            module_bytes: 1000,
            memory_bytes: 2 << 20,
            image_bytes: 5000,
            abi: agent_abi::ABI_VERSION,
            owner: "alice".into(),
            home: "a".into(),
            image_follows: false,
        }
    }

    fn view() -> DestView {
        DestView {
            max_agents: 10,
            max_owner_agents: 5,
            max_memory: 64 << 20,
            max_image: 1 << 20,
            max_module: 1 << 20,
            draining: false,
            ..DestView::default()
        }
    }

    fn who(name: &str, role: Role) -> Identity {
        Identity {
            name: name.into(),
            role,
        }
    }

    #[test]
    fn the_destination_decides_before_any_state_moves() {
        let host = who("a", Role::Host);
        assert_eq!(
            decide_offer(&offer(), &host, &view()),
            OfferReply::Accept {
                need_module: true,
                base: None
            }
        );
        assert_eq!(
            decide_offer(
                &offer(),
                &host,
                &DestView {
                    has_module: true,
                    ..view()
                }
            ),
            OfferReply::Accept {
                need_module: false,
                base: None
            }
        );
        assert_eq!(
            decide_offer(
                &offer(),
                &host,
                &DestView {
                    committed: true,
                    ..view()
                }
            ),
            OfferReply::AlreadyCommitted
        );
        // A draining host takes no agent, but still confirms one it committed.
        let draining = DestView {
            draining: true,
            ..view()
        };
        assert!(matches!(
            decide_offer(&offer(), &host, &draining),
            OfferReply::Refuse(why) if why.contains("draining")
        ));
        let committed = DestView {
            committed: true,
            ..draining
        };
        assert_eq!(
            decide_offer(&offer(), &host, &committed),
            OfferReply::AlreadyCommitted
        );
    }

    #[test]
    fn the_destination_refuses_with_a_reason_before_any_state_moves() {
        let host = who("a", Role::Host);
        let user = who("alice", Role::User);
        let refuse = |o: &Offer, from: &Identity, v: &DestView| match decide_offer(o, from, v) {
            OfferReply::Refuse(why) => why,
            other => panic!("expected a refusal, got {other:?}"),
        };
        assert_eq!(
            refuse(&offer(), &user, &view()),
            "only hosts may transfer agents, and user alice is not a host"
        );
        assert!(
            refuse(
                &offer(),
                &host,
                &DestView {
                    aborted: true,
                    ..view()
                }
            )
            .contains("was aborted")
        );
        assert_eq!(
            refuse(
                &offer(),
                &host,
                &DestView {
                    max_memory: 1 << 20,
                    ..view()
                }
            ),
            "the agent needs 2.0 MiB of memory; this host allows 1.0 MiB"
        );
        assert_eq!(
            refuse(
                &offer(),
                &host,
                &DestView {
                    agents: 10,
                    ..view()
                }
            ),
            "host is full (10 agents)"
        );
        assert_eq!(
            refuse(
                &offer(),
                &host,
                &DestView {
                    agents: 5,
                    owner_agents: 5,
                    ..view()
                }
            ),
            "user alice already runs 5 agents here, the most a user may (user_max_agents)"
        );
        assert!(
            refuse(&Offer { abi: 99, ..offer() }, &host, &view())
                .starts_with("agent ABI v99 is not offered here")
        );
        assert!(
            refuse(
                &Offer {
                    image_bytes: 2 << 20,
                    ..offer()
                },
                &host,
                &view()
            )
            .starts_with("image of")
        );
    }
}
