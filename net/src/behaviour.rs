//! The composed libp2p behaviour: small standard behaviours, no protocol logic.

use crate::config::NetConfig;
use crate::{IDENTIFY_PROTOCOL, KAD_PROTOCOL};
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::swarm::NetworkBehaviour;
use libp2p::{
    autonat, connection_limits, dcutr, gossipsub, identify, identity::Keypair, kad, mdns, ping,
    relay, upnp, StreamProtocol,
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
    pub stream: crate::prefer_direct::PreferDirect,
    pub mdns: Toggle<mdns::tokio::Behaviour>,
    /// Reservations on relays and circuits through them (every peer).
    pub relay_client: relay::client::Behaviour,
    /// Relay service for peers behind NAT (coordinators, `--relay` nodes).
    pub relay: Toggle<relay::Behaviour>,
    /// Hole punching over a relayed connection.
    pub dcutr: dcutr::Behaviour,
    /// Asks AutoNAT servers whether our address candidates are reachable.
    pub autonat: autonat::v2::client::Behaviour,
    /// Dials peers back for their AutoNAT probes (coordinators).
    pub autonat_server: Toggle<autonat::v2::server::Behaviour>,
    /// Port mapping on the home router.
    pub upnp: Toggle<upnp::tokio::Behaviour>,
}

impl Behaviour {
    pub(crate) fn new(
        key: &Keypair,
        config: &NetConfig,
        relay_client: relay::client::Behaviour,
    ) -> Result<Self, String> {
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
        let relay = config.relay.serve.then(|| {
            let r = &config.relay;
            relay::Behaviour::new(
                peer_id,
                relay::Config {
                    max_reservations: r.max_reservations,
                    max_reservations_per_peer: 4,
                    max_circuits: r.max_circuits,
                    max_circuits_per_peer: r.max_circuits_per_peer,
                    max_circuit_duration: r.max_circuit_duration,
                    max_circuit_bytes: r.max_circuit_bytes,
                    ..relay::Config::default()
                },
            )
        });
        Ok(Self {
            limits,
            identify,
            ping,
            kad,
            gossipsub,
            stream: crate::prefer_direct::PreferDirect::new(),
            mdns: mdns.into(),
            relay_client,
            relay: relay.into(),
            dcutr: dcutr::Behaviour::new(peer_id),
            autonat: autonat::v2::client::Behaviour::default(),
            autonat_server: config
                .autonat_server
                .then(autonat::v2::server::Behaviour::default)
                .into(),
            upnp: config.upnp.then(upnp::tokio::Behaviour::default).into(),
        })
    }
}
