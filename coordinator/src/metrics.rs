//! `/metrics`: the coordinator's figures in Prometheus' text format (prometheus-client,
//! already in the build through libp2p). Request, token and job counters and latency
//! histograms are recorded as things happen; node counts and per-module queues are read
//! from the node table at scrape time, so they are never stale.

use crate::table::NodeTable;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::collections::BTreeMap;
use std::time::Duration;

/// Labels of HTTP request figures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Route (`chat`, `completions`, `models`, …).
    pub endpoint: String,
    /// HTTP status code.
    pub status: u16,
}

/// Labels of per-module figures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModuleLabels {
    /// Model alias.
    pub model: String,
    /// Module id.
    pub module: String,
}

/// Labels of token counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    /// Model alias.
    pub model: String,
    /// `prompt` or `completion`.
    pub kind: String,
}

/// Labels of audit results.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuditLabels {
    /// `passed`, `failed`, `missed` (could not run) or `dropped` (queue full).
    pub result: String,
}

/// Labels of per-node figures.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    /// The node's peer id.
    pub node: String,
}

/// Labels of per-node audit counts.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeAuditLabels {
    /// The node's peer id.
    pub node: String,
    /// `passed`, `failed` or `missed`.
    pub result: String,
}

/// Labels of job outcomes.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `ok`, `cancelled`, `failed`, `no_node`.
    pub outcome: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 5 ms … ~80 s.
    Histogram::new(exponential_buckets(0.005, 2.0, 15))
}

/// A money status (`pending`, `posted`, `final`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    /// The status.
    pub status: String,
}

/// Every figure the coordinator exports.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_seconds: HistogramFamily<RequestLabels>,
    ttft_seconds: HistogramFamily<ModuleLabels>,
    tokens: Family<TokenLabels, Counter>,
    jobs: Family<OutcomeLabels, Counter>,
    retries: Counter,
    charged: Counter,
    nodes: Gauge,
    module_nodes: Family<ModuleLabels, Gauge>,
    module_queue: Family<ModuleLabels, Gauge>,
    module_inflight: Family<ModuleLabels, Gauge>,
    module_tps: Family<ModuleLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    settled: Family<StatusLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    audits: Family<AuditLabels, Counter>,
    node_reputation: Family<NodeLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    node_audits: Family<NodeAuditLabels, Gauge>,
    node_disputes: Family<NodeLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every figure, the swarm's among them (`tessera_net_…`).
    pub fn with_net(net: &tessera_net::NetMetrics) -> Self {
        let mut m = Self::new();
        net.register(&mut m.registry);
        m
    }

    /// Registers every figure.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tessera");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by endpoint and status",
            requests.clone(),
        );
        let request_seconds: HistogramFamily<RequestLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "http_request_duration_seconds",
            "Time to the whole response (streams: to their end)",
            request_seconds.clone(),
        );
        let ttft_seconds: HistogramFamily<ModuleLabels> =
            Family::new_with_constructor(latency_histogram);
        registry.register(
            "time_to_first_token_seconds",
            "Time from request to first token, as the API saw it",
            ttft_seconds.clone(),
        );
        let tokens = Family::<TokenLabels, Counter>::default();
        registry.register("tokens", "Tokens billed, by model and kind", tokens.clone());
        let jobs = Family::<OutcomeLabels, Counter>::default();
        registry.register("jobs", "Jobs by outcome", jobs.clone());
        let retries = Counter::default();
        registry.register(
            "job_retries",
            "Jobs moved to another node before their first token",
            retries.clone(),
        );
        let charged = Counter::default();
        registry.register(
            "charged_base_units",
            "Base units charged to accounts (and credited to nodes)",
            charged.clone(),
        );
        let nodes = Gauge::default();
        registry.register("nodes", "Nodes in the table", nodes.clone());
        let module_nodes = Family::<ModuleLabels, Gauge>::default();
        registry.register(
            "module_nodes",
            "Nodes serving each module",
            module_nodes.clone(),
        );
        let module_queue = Family::<ModuleLabels, Gauge>::default();
        registry.register(
            "module_queue",
            "Jobs running or waiting on the nodes of each module, as advertised",
            module_queue.clone(),
        );
        let module_inflight = Family::<ModuleLabels, Gauge>::default();
        registry.register(
            "module_inflight",
            "Jobs this coordinator has running on each module",
            module_inflight.clone(),
        );
        let module_tps =
            Family::<ModuleLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "module_tokens_per_second",
            "Mean decode speed this coordinator measured on the nodes of each module",
            module_tps.clone(),
        );
        let settled = Family::<StatusLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "settled_base_units",
            "What callers paid nodes, by status: pending (receipts not yet batched), posted (challenge window open), final",
            settled.clone(),
        );
        let audits = Family::<AuditLabels, Counter>::default();
        registry.register("audits", "Audits by result", audits.clone());
        let node_reputation =
            Family::<NodeLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        registry.register(
            "node_reputation",
            "Each node's reputation from its audits (0..1; unaudited 0.5)",
            node_reputation.clone(),
        );
        let node_audits = Family::<NodeAuditLabels, Gauge>::default();
        registry.register(
            "node_audits",
            "Each node's audits by result",
            node_audits.clone(),
        );
        let node_disputes = Family::<NodeLabels, Gauge>::default();
        registry.register(
            "node_open_disputes",
            "Disputes open against each node (it gets no jobs while any is open)",
            node_disputes.clone(),
        );
        Self {
            registry,
            audits,
            node_reputation,
            node_audits,
            node_disputes,
            requests,
            request_seconds,
            ttft_seconds,
            tokens,
            jobs,
            retries,
            charged,
            nodes,
            module_nodes,
            module_queue,
            module_inflight,
            module_tps,
            settled,
        }
    }

    /// Sets what has been settled, by status (read from the ledger and the batches).
    pub fn set_settled(&self, status: &str, amount: u128) {
        self.settled
            .get_or_create(&StatusLabels {
                status: status.to_owned(),
            })
            .set(amount as f64);
    }

    /// One HTTP request answered.
    pub fn request(&self, endpoint: &str, status: u16, elapsed: Duration) {
        let labels = RequestLabels {
            endpoint: endpoint.to_owned(),
            status,
        };
        self.requests.get_or_create(&labels).inc();
        self.request_seconds
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
    }

    /// A job's first token reached the API.
    pub fn first_token(&self, model: &str, module: &str, elapsed: Duration) {
        self.ttft_seconds
            .get_or_create(&ModuleLabels {
                model: model.to_owned(),
                module: module.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// A job ended with `outcome`, billing `prompt` and `completion` tokens and `charged`.
    pub fn job(&self, model: &str, outcome: &str, prompt: u32, completion: u32, charged: u128) {
        self.jobs
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_owned(),
            })
            .inc();
        for (kind, n) in [("prompt", prompt), ("completion", completion)] {
            if n > 0 {
                self.tokens
                    .get_or_create(&TokenLabels {
                        model: model.to_owned(),
                        kind: kind.to_owned(),
                    })
                    .inc_by(u64::from(n));
            }
        }
        self.charged
            .inc_by(u64::try_from(charged).unwrap_or(u64::MAX));
    }

    /// An audit ended with `result`.
    pub fn audit(&self, result: &str) {
        self.audits
            .get_or_create(&AuditLabels {
                result: result.to_owned(),
            })
            .inc();
    }

    /// A job moved to another node.
    pub fn retry(&self) {
        self.retries.inc();
    }

    /// The text exposition, with table figures read now.
    pub fn render(&self, table: &NodeTable) -> String {
        self.nodes.set(table.len() as i64);
        let mut per_module: BTreeMap<(String, String), (i64, i64, i64)> = BTreeMap::new();
        let mut speeds: BTreeMap<(String, String), (f64, u32)> = BTreeMap::new();
        for e in table.nodes() {
            let queue = i64::from(e.advert.load.running) + i64::from(e.advert.load.waiting);
            for o in &e.advert.modules {
                let row = per_module
                    .entry((o.alias.clone(), o.module.to_string()))
                    .or_default();
                row.0 += 1;
                row.1 += queue;
                row.2 += i64::from(e.inflight);
                if e.observed.jobs > 0 {
                    let sp = speeds
                        .entry((o.alias.clone(), o.module.to_string()))
                        .or_default();
                    sp.0 += e.observed.tokens_per_sec;
                    sp.1 += 1;
                }
            }
        }
        // Modules that left the network drop out of the exposition.
        self.module_nodes.clear();
        self.module_queue.clear();
        self.module_inflight.clear();
        self.module_tps.clear();
        for ((model, module), (sum, n)) in speeds {
            self.module_tps
                .get_or_create(&ModuleLabels { model, module })
                .set(sum / f64::from(n));
        }
        for ((model, module), (nodes, queue, inflight)) in per_module {
            let labels = ModuleLabels { model, module };
            self.module_nodes.get_or_create(&labels).set(nodes);
            self.module_queue.get_or_create(&labels).set(queue);
            self.module_inflight.get_or_create(&labels).set(inflight);
        }
        for (node, r) in table.standings() {
            let node = node.to_string();
            self.node_reputation
                .get_or_create(&NodeLabels { node: node.clone() })
                .set(r.reputation());
            self.node_disputes
                .get_or_create(&NodeLabels { node: node.clone() })
                .set(i64::from(r.open_disputes));
            for (result, n) in [
                ("passed", r.passed),
                ("failed", r.failed),
                ("missed", r.missed),
            ] {
                self.node_audits
                    .get_or_create(&NodeAuditLabels {
                        node: node.clone(),
                        result: result.into(),
                    })
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
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
        let m = Metrics::new();
        m.request("chat", 200, Duration::from_millis(120));
        m.request("chat", 402, Duration::from_millis(2));
        m.first_token("smol", "llama/q4_1", Duration::from_millis(80));
        m.job("smol", "ok", 10, 5, 42);
        m.retry();
        m.set_settled("final", 204);
        let text = m.render(&NodeTable::default());
        for needle in [
            "tessera_http_requests_total{endpoint=\"chat\",status=\"200\"} 1",
            "tessera_http_requests_total{endpoint=\"chat\",status=\"402\"} 1",
            "tessera_http_request_duration_seconds_bucket",
            "tessera_time_to_first_token_seconds_count{model=\"smol\",module=\"llama/q4_1\"} 1",
            "tessera_tokens_total{model=\"smol\",kind=\"completion\"} 5",
            "tessera_jobs_total{outcome=\"ok\"} 1",
            "tessera_job_retries_total 1",
            "tessera_charged_base_units_total 42",
            "tessera_nodes 0",
            "tessera_settled_base_units{status=\"final\"} 204.0",
        ] {
            assert!(text.contains(needle), "missing {needle} in\n{text}");
        }
    }
}
