//! Network settings shared by nodes and coordinators.

use libp2p::Multiaddr;
use serde::de::DeserializeOwned;
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
    /// Advertise private and loopback addresses too (a LAN or one-machine network; mDNS
    /// implies it). Off: only addresses confirmed reachable from outside are advertised.
    pub lan: bool,
    /// Map the listen ports on the home router by UPnP IGD (nodes; `--no-upnp` turns it off).
    pub upnp: bool,
    /// Reserve a slot on relays (bootstrap peers that offer one) and advertise the
    /// `/p2p-circuit` addresses while no direct address is confirmed reachable.
    pub use_relays: bool,
    /// The listen addresses are public (a coordinator on a server): they count as confirmed
    /// external addresses without a probe, so relay and AutoNAT service start at once.
    pub public: bool,
    /// Answer AutoNAT v2 requests: dial a peer back to tell it whether it is reachable
    /// (coordinators).
    pub autonat_server: bool,
    /// Circuit relay v2 service for peers behind NAT (`[net.relay]`).
    pub relay: RelayConfig,
}

/// A relay's service to peers behind NAT: how many it holds and how much one circuit may
/// carry. libp2p's defaults (2 minutes, 128 KiB per circuit) would cut a long answer; these
/// fit one job, and a node ends a job cleanly before a circuit's limit (docs/network.md).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    /// Serve as a relay (coordinators by default; nodes with `--relay`).
    pub serve: bool,
    /// Reservations held at once (each a peer reachable through this relay).
    pub max_reservations: usize,
    /// Circuits open at once.
    pub max_circuits: usize,
    /// Circuits open at once per peer.
    pub max_circuits_per_peer: usize,
    /// Longest a circuit stays open, in seconds.
    #[serde(with = "secs")]
    pub max_circuit_duration: Duration,
    /// Most bytes one circuit carries, both directions together.
    pub max_circuit_bytes: u64,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            serve: false,
            max_reservations: 1024,
            max_circuits: 256,
            max_circuits_per_peer: 8,
            max_circuit_duration: Duration::from_secs(30 * 60),
            max_circuit_bytes: 64 << 20,
        }
    }
}

impl NetConfig {
    /// Whether private and loopback addresses may be advertised (LAN mode or mDNS).
    pub fn lan_mode(&self) -> bool {
        self.lan || self.mdns
    }

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
        let r = &self.relay;
        if r.serve {
            if r.max_reservations == 0 || r.max_circuits == 0 || r.max_circuits_per_peer == 0 {
                return Err(
                    "net.relay: max_reservations, max_circuits and max_circuits_per_peer must be at least 1"
                        .into(),
                );
            }
            if r.max_circuit_duration < Duration::from_secs(10)
                || r.max_circuit_duration > Duration::from_secs(86_400)
            {
                return Err(format!(
                    "net.relay.max_circuit_duration must be 10..=86400 seconds, got {:?}",
                    r.max_circuit_duration
                ));
            }
            if r.max_circuit_bytes < 64 << 10 {
                return Err(format!(
                    "net.relay.max_circuit_bytes must be at least 65536, got {}",
                    r.max_circuit_bytes
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_naming_one_key_of_a_table_keeps_the_owners_other_defaults() {
        let owner = NetConfig {
            public: true,
            upnp: true,
            relay: RelayConfig {
                serve: true,
                ..RelayConfig::default()
            },
            ..NetConfig::default()
        };
        let text = "listen = [\"/ip4/0.0.0.0/tcp/9000\"]\n[relay]\nmax_circuits = 7\n";
        let c = from_toml_over(&owner, text).expect("parse");
        assert_eq!(
            c.listen,
            vec!["/ip4/0.0.0.0/tcp/9000".parse::<Multiaddr>().expect("addr")]
        );
        assert!(
            c.public && c.upnp && c.relay.serve,
            "the owner's defaults stay"
        );
        assert_eq!(c.relay.max_circuits, 7);
        assert_eq!(c.ping_interval, Duration::from_secs(1));
        let err = from_toml_over(&owner, "publik = true").unwrap_err();
        assert!(err.contains("publik"), "{err}");
        let err = from_toml_over(&owner, "[relay]\nserve = 3").unwrap_err();
        assert!(err.contains("serve"), "{err}");
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
            lan: false,
            upnp: false,
            use_relays: true,
            public: false,
            autonat_server: false,
            relay: RelayConfig::default(),
        }
    }
}

/// Reads a TOML document over `defaults`: a key the file leaves out keeps its default, in
/// nested tables too. Serde's own defaults would rebuild a `[net]` table the file names from
/// `NetConfig::default()`, dropping what the owner set (a coordinator's `public = true`, a
/// node's `upnp = true`) as soon as the file sets `listen`. Arrays are replaced whole.
pub fn from_toml_over<T: Serialize + DeserializeOwned>(
    defaults: &T,
    text: &str,
) -> Result<T, String> {
    let mut base = toml::Value::try_from(defaults).map_err(|e| format!("defaults: {e}"))?;
    let over: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
    merge(&mut base, toml::Value::Table(over));
    base.try_into().map_err(|e: toml::de::Error| e.to_string())
}

fn merge(base: &mut toml::Value, over: toml::Value) {
    match (base, over) {
        (toml::Value::Table(b), toml::Value::Table(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(old) => merge(old, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (b, o) => *b = o,
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
