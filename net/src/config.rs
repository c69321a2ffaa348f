//! Network settings shared by nodes and coordinators.

use libp2p::Multiaddr;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How the swarm listens, whom it meets first, and how fast it notices a dead peer.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetConfig {
    /// Addresses to listen on (TCP and QUIC multiaddrs; port 0 picks a free port).
    pub listen: Vec<Multiaddr>,
    /// Peers to connect to at start, each ending in `/p2p/<peer id>`.
    pub bootstrap: Vec<Multiaddr>,
    /// Addresses to announce in place of the listen addresses (behind NAT or a proxy).
    pub external: Vec<Multiaddr>,
    /// Find peers on the local network with mDNS (devnets; off by default).
    pub mdns: bool,
    /// Seconds between pings on each connection. A ping unanswered for 2 intervals closes
    /// the connection (and QUIC's idle timeout is 3 intervals), so a peer that vanishes
    /// without closing its connections is noticed within about 3 intervals.
    #[serde(with = "secs")]
    pub ping_interval: Duration,
    /// Seconds a connection with no open streams stays up.
    #[serde(with = "secs")]
    pub idle_timeout: Duration,
    /// Most connections at once (a peer may hold up to 4); more are refused.
    pub max_connections: u32,
}

impl NetConfig {
    /// Checks ranges once, before the swarm starts.
    pub fn validate(&self) -> Result<(), String> {
        let ping = Duration::from_millis(100)..=Duration::from_secs(60);
        if !ping.contains(&self.ping_interval) {
            return Err(format!(
                "net.ping_interval must be 0.1..=60 seconds, got {:?}",
                self.ping_interval
            ));
        }
        if self.idle_timeout < Duration::from_secs(1)
            || self.idle_timeout > Duration::from_secs(86_400)
        {
            return Err(format!(
                "net.idle_timeout must be 1..=86400 seconds, got {:?}",
                self.idle_timeout
            ));
        }
        if self.max_connections == 0 {
            return Err("net.max_connections must be at least 1".into());
        }
        Ok(())
    }
}

impl Default for NetConfig {
    fn default() -> Self {
        Self {
            listen: vec![
                "/ip4/0.0.0.0/tcp/0".parse().expect("static multiaddr"),
                "/ip4/0.0.0.0/udp/0/quic-v1"
                    .parse()
                    .expect("static multiaddr"),
            ],
            bootstrap: Vec::new(),
            external: Vec::new(),
            mdns: false,
            ping_interval: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(60),
            max_connections: 512,
        }
    }
}

/// Durations as (fractional) seconds in config files: `ping_interval = 2.0`.
pub mod secs {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    /// Writes seconds as a float.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    /// Reads non-negative, finite seconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let v = f64::deserialize(d)?;
        Duration::try_from_secs_f64(v).map_err(serde::de::Error::custom)
    }
}
