//! The composed libp2p behaviour: small standard behaviours, no protocol logic.

use crate::config::NetConfig;
use crate::{IDENTIFY_PROTOCOL, KAD_PROTOCOL};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{
    connection_limits, gossipsub, identify, identity::Keypair, kad, mdns, ping, StreamProtocol,
};
use std::time::Duration;
use tessera_protocol::advert::MAX_ADVERT_BYTES;

/// Every protocol a Tessera peer speaks.
#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    pub limits: connection_limits::Behaviour,
    pub identify: identify::Behaviour,
    pub ping: ping::Behaviour,
    pub kad: kad::Behaviour<kad::store::MemoryStore>,
    pub gossipsub: gossipsub::Behaviour,
    pub stream: libp2p_stream::Behaviour,
    pub mdns: Toggle<mdns::tokio::Behaviour>,
}

impl Behaviour {
    pub(crate) fn new(key: &Keypair, config: &NetConfig) -> Result<Self, String> {
        let peer_id = key.public().to_peer_id();
        let identify = identify::Behaviour::new(
            identify::Config::new(IDENTIFY_PROTOCOL.to_owned(), key.public())
                .with_agent_version(format!("tessera/{}", env!("CARGO_PKG_VERSION"))),
        );
        let ping = ping::Behaviour::new(
            ping::Config::new()
                .with_interval(config.ping_interval)
                .with_timeout(config.ping_interval * 2),
        );
        let mut kad_config = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
        kad_config.set_periodic_bootstrap_interval(Some(Duration::from_secs(300)));
        let mut kad =
            kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kad_config);
        // Nodes on a LAN or loopback are not seen as publicly reachable by kad's
        // autodetection; every Tessera peer answers DHT queries.
        kad.set_mode(Some(kad::Mode::Server));

        let gossip_config = gossipsub::ConfigBuilder::default()
            .heartbeat_interval(Duration::from_secs(1))
            .validation_mode(gossipsub::ValidationMode::Strict)
            .validate_messages()
            // Room for the advert plus gossipsub's envelope (signature, key, topic).
            .max_transmit_size(MAX_ADVERT_BYTES * 2)
            .message_id_fn(|m: &gossipsub::Message| {
                let mut h = blake3::Hasher::new();
                if let Some(src) = &m.source {
                    h.update(&src.to_bytes());
                }
                h.update(&m.data);
                gossipsub::MessageId::from(&h.finalize().as_bytes()[..20])
            })
            .build()
            .map_err(|e| format!("gossipsub config: {e}"))?;
        let gossipsub = gossipsub::Behaviour::new(
            gossipsub::MessageAuthenticity::Signed(key.clone()),
            gossip_config,
        )
        .map_err(|e| format!("gossipsub: {e}"))?;

        let mdns = if config.mdns {
            Some(
                mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id)
                    .map_err(|e| format!("mdns: {e}"))?,
            )
        } else {
            None
        };
        let limits = connection_limits::Behaviour::new(
            connection_limits::ConnectionLimits::default()
                .with_max_established(Some(config.max_connections))
                .with_max_pending_incoming(Some(config.max_connections.div_ceil(8)))
                // A TCP and a QUIC connection to the same peer may both be up for a while.
                .with_max_established_per_peer(Some(4)),
        );
        Ok(Self {
            limits,
            identify,
            ping,
            kad,
            gossipsub,
            stream: libp2p_stream::Behaviour::new(),
            mdns: mdns.into(),
        })
    }
}
