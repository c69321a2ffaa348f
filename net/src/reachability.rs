//! How others reach this peer: which of its addresses are confirmed from outside, which
//! relays carry it, what UPnP and hole punching found. The swarm task keeps one
//! [`Reachability`] current; nodes print its [`Reachability::summary`] and advertise its
//! [`Reachability::advertised`] addresses.

use libp2p::multiaddr::Protocol;
use libp2p::Multiaddr;
use serde::{Deserialize, Serialize};

/// What the home router's UPnP gateway did for us.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UpnpStatus {
    /// UPnP is turned off (`--no-upnp`, or not a node).
    #[default]
    Off,
    /// Looking for a gateway.
    Searching,
    /// No gateway answered on the LAN (or it refused to map).
    NoGateway,
    /// A gateway answered, but its own external address is private (a NAT behind a NAT).
    NonRoutable,
    /// A port is mapped.
    Mapped,
}

/// What hole punching (DCUtR) has achieved with peers that reached us over a relay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeStats {
    /// Relayed connections upgraded to direct ones.
    pub succeeded: u64,
    /// Upgrades that failed after every attempt.
    pub failed: u64,
}

/// This peer's reachability as far as it knows now.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reachability {
    /// Direct addresses confirmed reachable from outside (AutoNAT, UPnP, `--external`, or a
    /// public listener).
    pub public: Vec<Multiaddr>,
    /// `/p2p-circuit` addresses through relays that hold a reservation for us.
    pub relayed: Vec<Multiaddr>,
    /// Addresses peers saw us connect from (identify): where a router would be forwarded.
    pub observed: Vec<Multiaddr>,
    /// Addresses AutoNAT probed and found unreachable.
    pub unreachable: Vec<Multiaddr>,
    /// The UPnP gateway's answer.
    pub upnp: UpnpStatus,
    /// Hole punching so far.
    pub upgrades: UpgradeStats,
}

impl Reachability {
    /// Whether the peer is reachable at all: a confirmed direct address or a relay.
    pub fn known(&self) -> bool {
        !self.public.is_empty() || !self.relayed.is_empty()
    }

    /// One line for the operator: `public at …`, `behind NAT, reached through relay … (direct
    /// upgrade: …)`, or why it is not reachable yet.
    pub fn summary(&self) -> String {
        if let Some(addr) = self.public.first() {
            return format!("public at {addr}");
        }
        if let Some(relay) = self.relayed.first() {
            let relay = relay_part(relay);
            let upgrade = match (self.upgrades.succeeded, self.upgrades.failed) {
                (0, 0) => "not tried yet".to_owned(),
                (s, 0) => format!("yes, {s} so far"),
                (0, f) => format!("no, {f} failed: the router's NAT is endpoint-dependent"),
                (s, f) => format!("yes, {s} upgraded and {f} failed"),
            };
            return format!(
                "behind NAT, reached through relay {relay} (direct upgrade: {upgrade})"
            );
        }
        "not reachable from outside yet: no confirmed public address and no relay reservation"
            .to_owned()
    }

    /// What the operator should do, one line each (empty: nothing).
    pub fn advice(&self, listen_ports: &[u16]) -> Vec<String> {
        if !self.public.is_empty() {
            return Vec::new();
        }
        let ports = if listen_ports.is_empty() {
            "the node's port".to_owned()
        } else {
            listen_ports
                .iter()
                .map(|p| format!("TCP and UDP {p}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut out = Vec::new();
        let ip = self.observed.first().and_then(public_ip);
        let external = format!(
            "--external /ip4/{}/tcp/{}",
            ip.as_deref().unwrap_or("YOUR_PUBLIC_IP"),
            listen_ports
                .first()
                .map_or_else(|| "PORT".to_owned(), u16::to_string)
        );
        match self.upnp {
            UpnpStatus::NoGateway | UpnpStatus::Searching => out.push(format!(
                "enable UPnP on your router, or forward {ports} to this machine and start the node with {external}"
            )),
            UpnpStatus::NonRoutable => out.push(
                "your router is itself behind another NAT (carrier-grade NAT): port forwarding cannot help; the relay carries your jobs".to_owned(),
            ),
            UpnpStatus::Off => out.push(format!(
                "forward {ports} on your router to this machine and start the node with {external} (or drop --no-upnp)"
            )),
            UpnpStatus::Mapped => {}
        }
        if let Some(ip) = self.observed.first().and_then(public_ip) {
            out.push(format!("your public IP, as peers see it: {ip}"));
        }
        if self.relayed.is_empty() {
            out.push(
                "no relay holds a reservation for you: bootstrap to a coordinator (it relays) or a node started with --relay".to_owned(),
            );
        } else if self.upgrades.failed > 0 && self.upgrades.succeeded == 0 {
            out.push("hole punching failed: jobs keep working over the relay, more slowly; forwarding a port removes the relay".to_owned());
        }
        out
    }
}

/// The IP of an address (`/ip4/…` or `/ip6/…`), for the operator.
pub fn public_ip(addr: &Multiaddr) -> Option<String> {
    match addr.iter().next()? {
        Protocol::Ip4(ip) => Some(ip.to_string()),
        Protocol::Ip6(ip) => Some(ip.to_string()),
        _ => None,
    }
}

/// The relay's own address in a `/…/p2p/RELAY/p2p-circuit[/p2p/ME]` address.
pub fn relay_part(addr: &Multiaddr) -> Multiaddr {
    addr.iter()
        .take_while(|p| !matches!(p, Protocol::P2pCircuit))
        .collect()
}

/// Whether `addr` goes through a relay.
pub fn is_relayed(addr: &Multiaddr) -> bool {
    addr.iter().any(|p| matches!(p, Protocol::P2pCircuit))
}

/// Whether `addr`'s IP is one only its own network can reach: loopback, private ranges,
/// link-local, carrier-grade NAT, unspecified, unique-local IPv6. For a relayed address,
/// the relay's IP decides. DNS names count as public.
pub fn is_private(addr: &Multiaddr) -> bool {
    match addr.iter().next() {
        Some(Protocol::Ip4(ip)) => {
            let [a, b, ..] = ip.octets();
            ip.is_private()
                || ip.is_loopback()
                || ip.is_link_local()
                || ip.is_unspecified()
                || ip.is_broadcast()
                // 100.64.0.0/10, carrier-grade NAT.
                || (a == 100 && (64..128).contains(&b))
        }
        Some(Protocol::Ip6(ip)) => {
            let first = ip.segments()[0];
            ip.is_loopback()
                || ip.is_unspecified()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Multiaddr {
        s.parse().expect("multiaddr")
    }

    #[test]
    fn private_and_public_addresses_are_told_apart() {
        for private in [
            "/ip4/10.1.0.2/tcp/7400",
            "/ip4/192.168.1.5/udp/7400/quic-v1",
            "/ip4/172.20.0.1/tcp/1",
            "/ip4/127.0.0.1/tcp/1",
            "/ip4/100.64.3.4/tcp/1",
            "/ip4/169.254.0.1/tcp/1",
            "/ip4/0.0.0.0/tcp/1",
            "/ip6/::1/tcp/1",
            "/ip6/fd00::1/tcp/1",
            "/ip6/fe80::1/tcp/1",
            "/ip4/10.0.0.1/tcp/1/p2p/12D3KooWQYV9dGMFoRzNStwpXztXaBUjtPqi6aU76ZgUriHhKust/p2p-circuit",
        ] {
            assert!(is_private(&a(private)), "{private}");
        }
        for public in [
            "/ip4/203.0.113.11/tcp/7400",
            "/ip4/8.8.8.8/udp/1/quic-v1",
            "/ip4/100.128.0.1/tcp/1",
            "/ip6/2001:db8::1/tcp/1",
            "/dns4/example.org/tcp/1",
        ] {
            assert!(!is_private(&a(public)), "{public}");
        }
    }

    #[test]
    fn the_summary_names_how_the_peer_is_reached() {
        let mut r = Reachability::default();
        assert!(r.summary().starts_with("not reachable"));
        let relay =
            "/ip4/203.0.113.1/tcp/7300/p2p/12D3KooWQYV9dGMFoRzNStwpXztXaBUjtPqi6aU76ZgUriHhKust";
        r.relayed.push(a(&format!("{relay}/p2p-circuit")));
        assert_eq!(
            r.summary(),
            format!("behind NAT, reached through relay {relay} (direct upgrade: not tried yet)")
        );
        r.upgrades.failed = 1;
        assert!(
            r.summary().contains("direct upgrade: no"),
            "{}",
            r.summary()
        );
        assert!(r
            .advice(&[7400])
            .iter()
            .any(|l| l.contains("hole punching failed")));
        r.upgrades.succeeded = 2;
        assert!(
            r.summary().contains("direct upgrade: yes"),
            "{}",
            r.summary()
        );
        r.public.push(a("/ip4/203.0.113.11/tcp/7400"));
        assert_eq!(r.summary(), "public at /ip4/203.0.113.11/tcp/7400");
        assert!(r.advice(&[7400]).is_empty());
    }

    #[test]
    fn advice_names_the_ports_to_forward() {
        let r = Reachability {
            upnp: UpnpStatus::NoGateway,
            ..Reachability::default()
        };
        let advice = r.advice(&[7400]);
        assert!(advice[0].contains("enable UPnP"), "{advice:?}");
        assert!(advice[0].contains("TCP and UDP 7400"), "{advice:?}");
        assert!(advice.iter().any(|l| l.contains("no relay")), "{advice:?}");
    }
}
