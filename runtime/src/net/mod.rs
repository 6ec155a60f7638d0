//! Hosts over the network: certificates, mutually authenticated QUIC, the hop protocol, the
//! durable store, the host itself and the user's client.

pub mod admin;
pub mod budget;
pub mod certs;
pub mod client;
mod end;
mod executor;
pub mod gossip;
pub mod hop;
pub mod host;
pub mod mailbox;
pub mod messages;
pub mod metrics;
mod peers;
pub mod quota;
mod residents;
mod socket;
pub mod store;
pub mod tls;
mod trim;
pub mod wire;
