//! The node's Prometheus figures (`tessera node --metrics ADDR` serves them at
//! `/metrics`): per-module speed and time to first token, queue, jobs by outcome, audit
//! replays by verdict, and what the node has earned by status (receipts it signed are
//! `pending` until the coordinator's batch lands; the coordinator's `/metrics` and
//! dashboard carry the posted and final figures).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

/// A module's labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModuleLabels {
    /// The catalogue alias.
    pub model: String,
    /// The module id.
    pub module: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabels {
    model: String,
    module: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    model: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: String,
}

fn ttft_histogram() -> Histogram {
    // 5 ms … ~80 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

/// Every figure a node exports.
pub struct NodeMetrics {
    registry: Registry,
    tokens_per_second: Family<ModuleLabels, Gauge<f64, AtomicU64>>,
    ttft: Family<ModuleLabels, Histogram, fn() -> Histogram>,
    tokens: Family<ModuleLabels, Counter>,
    queue: Family<QueueLabels, Gauge>,
    jobs: Family<OutcomeLabels, Counter>,
    replays: Family<VerdictLabels, Counter>,
    earned: Family<StatusLabels, Counter>,
}

impl Default for NodeMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl NodeMetrics {
    /// Registers every figure, the swarm's among them (`tessera_node_net_…`).
    pub fn with_net(net: &tessera_net::NetMetrics) -> Self {
        let mut m = Self::new();
        net.register(&mut m.registry);
        m
    }

    /// Registers every figure.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tessera_node");
        let tokens_per_second = Family::<ModuleLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "tokens_per_second",
            "Decode speed of each module's latest job (tokens after the first, per second)",
            tokens_per_second.clone(),
        );
        let ttft: Family<ModuleLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(ttft_histogram);
        registry.register(
            "time_to_first_token_seconds",
            "Time from admission to first token, per module",
            ttft.clone(),
        );
        let tokens = Family::<ModuleLabels, Counter>::default();
        registry.register("tokens", "Tokens generated, per module", tokens.clone());
        let queue = Family::<QueueLabels, Gauge>::default();
        registry.register(
            "queue",
            "Jobs admitted per module: running (1 per engine) and waiting",
            queue.clone(),
        );
        let jobs = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "jobs",
            "Jobs by outcome: ok, cancelled, failed, busy (refused at capacity)",
            jobs.clone(),
        );
        let replays = Family::<VerdictLabels, Counter>::default();
        registry.register(
            "audit_replays",
            "Audit replays this node ran for the coordinator, by verdict",
            replays.clone(),
        );
        let earned = Family::<StatusLabels, Counter>::default();
        registry.register(
            "earned_base_units",
            "Base units of the receipts this node signed, by status (pending: not yet batched, as the node knows it)",
            earned.clone(),
        );
        Self {
            registry,
            tokens_per_second,
            ttft,
            tokens,
            queue,
            jobs,
            replays,
            earned,
        }
    }

    /// A finished job on `module`: its time to first token, speed, tokens and receipt.
    pub fn job_done(
        &self,
        module: &ModuleLabels,
        outcome: &str,
        ttft: Duration,
        tokens_per_second: Option<f64>,
        tokens: u32,
        cost: u128,
    ) {
        self.ttft.get_or_create(module).observe(ttft.as_secs_f64());
        if let Some(tps) = tokens_per_second {
            self.tokens_per_second.get_or_create(module).set(tps);
        }
        self.tokens.get_or_create(module).inc_by(u64::from(tokens));
        self.outcome(&module.model, outcome);
        self.earned
            .get_or_create(&StatusLabels {
                status: "pending".into(),
            })
            .inc_by(u64::try_from(cost).unwrap_or(u64::MAX));
    }

    /// A job that ended without a receipt (`failed`, `busy`).
    pub fn outcome(&self, model: &str, outcome: &str) {
        self.jobs
            .get_or_create(&OutcomeLabels {
                model: model.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// An audit replay's verdict.
    pub fn replay(&self, passed: bool) {
        self.replays
            .get_or_create(&VerdictLabels {
                result: if passed { "passed" } else { "failed" }.into(),
            })
            .inc();
    }

    /// Sets a module's queue.
    pub fn queue(&self, module: &ModuleLabels, running: u32, waiting: u32) {
        for (state, n) in [("running", running), ("waiting", waiting)] {
            self.queue
                .get_or_create(&QueueLabels {
                    model: module.model.clone(),
                    module: module.module.clone(),
                    state: state.into(),
                })
                .set(i64::from(n));
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_appear_in_the_text_exposition() {
        let m = NodeMetrics::new();
        let smol = ModuleLabels {
            model: "smol".into(),
            module: "llama/q4_1".into(),
        };
        m.job_done(&smol, "ok", Duration::from_millis(90), Some(80.5), 12, 68);
        m.outcome("smol", "busy");
        m.replay(true);
        m.queue(&smol, 1, 3);
        let text = m.render();
        for needle in [
            "tessera_node_time_to_first_token_seconds_count{model=\"smol\",module=\"llama/q4_1\"} 1",
            "tessera_node_tokens_per_second{model=\"smol\",module=\"llama/q4_1\"} 80.5",
            "tessera_node_tokens_total{model=\"smol\",module=\"llama/q4_1\"} 12",
            "tessera_node_jobs_total{model=\"smol\",outcome=\"ok\"} 1",
            "tessera_node_jobs_total{model=\"smol\",outcome=\"busy\"} 1",
            "tessera_node_audit_replays_total{result=\"passed\"} 1",
            "tessera_node_queue{model=\"smol\",module=\"llama/q4_1\",state=\"waiting\"} 3",
            "tessera_node_earned_base_units_total{status=\"pending\"} 68",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }
}
