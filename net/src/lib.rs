//! The libp2p swarm shared by Tessera nodes and coordinators: TCP and QUIC transports with
//! Noise and Yamux, identify, ping, Kademlia, gossipsub for adverts, optional mDNS, a
//! stream protocol for jobs, and NAT traversal: circuit relay v2 (client everywhere,
//! server on coordinators and `--relay` nodes), hole punching (DCUtR), AutoNAT v2 and UPnP. One task owns the [`libp2p::Swarm`]; everything else holds a
//! cloneable [`NetHandle`] and receives [`NetEvent`]s on a bounded channel (the shape of
//! rust-libp2p's file-sharing example).

mod behaviour;
mod circuits;
pub mod config;
pub mod identity;
mod metrics;
mod network;
mod prefer_direct;
pub mod reachability;

pub use circuits::CircuitBudget;
pub use config::{NetConfig, RelayConfig};
pub use identity::{load_or_create_identity, IdentityError};
pub use libp2p::multiaddr::Protocol;
pub use libp2p::{Multiaddr, PeerId, Stream, StreamProtocol};
pub use libp2p_stream::{Control, IncomingStreams, OpenStreamError};
pub use metrics::NetMetrics;
pub use network::{start, NetError, NetEvent, NetHandle, Path};
pub use reachability::{Reachability, UpnpStatus};

/// Protocol id of Tessera's Kademlia DHT (kept apart from the public IPFS DHT).
pub const KAD_PROTOCOL: &str = "/tessera/kad/1";
/// Identify's protocol version string; peers speaking another are not Tessera peers.
pub const IDENTIFY_PROTOCOL: &str = "/tessera/1";

/// The job stream protocol as libp2p's type.
pub fn job_protocol() -> StreamProtocol {
    StreamProtocol::new(tessera_protocol::JOB_PROTOCOL)
}
