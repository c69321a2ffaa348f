//! The swarm's Prometheus figures, registered into the node's or coordinator's registry
//! under `net_`: connections by kind, hole punching by outcome, bytes over relay
//! circuits, reservations held here and on relays.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct KindLabels {
    /// `direct`, `relayed` or `upgraded` (direct, made by hole punching).
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct DirectionLabels {
    pub direction: &'static str,
}

/// Every figure the swarm keeps; cheap to clone (the figures are shared).
#[derive(Clone, Default, Debug)]
pub struct NetMetrics {
    pub(crate) connections_opened: Family<KindLabels, Counter>,
    pub(crate) connections: Family<KindLabels, Gauge>,
    pub(crate) dcutr: Family<OutcomeLabels, Counter>,
    pub(crate) relayed_bytes: Family<DirectionLabels, Counter>,
    pub(crate) reservations: Gauge,
    pub(crate) relay_reservations: Gauge,
    pub(crate) relay_circuits: Family<OutcomeLabels, Counter>,
}

impl NetMetrics {
    /// Registers every figure under `net_` in `registry`.
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("net");
        r.register(
            "connections_opened",
            "Connections established, by kind: direct, relayed (through a relay circuit), upgraded (direct, made by hole punching)",
            self.connections_opened.clone(),
        );
        r.register(
            "connections",
            "Connections open now, by kind",
            self.connections.clone(),
        );
        r.register(
            "dcutr_attempts",
            "Hole punching (DCUtR) over a relayed connection, by outcome",
            self.dcutr.clone(),
        );
        r.register(
            "relayed_bytes",
            "Bytes this peer sent (out) and received (in) over relay circuits",
            self.relayed_bytes.clone(),
        );
        r.register(
            "reservations",
            "Relay reservations this peer holds (it is reachable through these relays)",
            self.reservations.clone(),
        );
        r.register(
            "relay_reservations",
            "Reservations other peers hold on this relay",
            self.relay_reservations.clone(),
        );
        r.register(
            "relay_circuits",
            "Circuits through this relay, by outcome: accepted, denied, closed",
            self.relay_circuits.clone(),
        );
    }

    pub(crate) fn opened(&self, kind: &'static str) {
        self.connections_opened
            .get_or_create(&KindLabels { kind })
            .inc();
        self.connections.get_or_create(&KindLabels { kind }).inc();
    }

    pub(crate) fn closed(&self, kind: &'static str) {
        self.connections.get_or_create(&KindLabels { kind }).dec();
    }

    /// The relayed-byte counters the relay transport adds to.
    pub(crate) fn relayed_totals(&self) -> crate::circuits::RelayedTotals {
        let counter = |direction| {
            self.relayed_bytes
                .get_or_create(&DirectionLabels { direction })
                .clone()
        };
        crate::circuits::RelayedTotals {
            read: counter("in"),
            written: counter("out"),
        }
    }

    pub(crate) fn outcome(family: &Family<OutcomeLabels, Counter>, outcome: &'static str) {
        family.get_or_create(&OutcomeLabels { outcome }).inc();
    }
}
