//! The Tessera node: loads model modules, joins the swarm, advertises what it serves and
//! how loaded it is, admits jobs within capacity and price, streams their text, and signs
//! a receipt for each (`docs/network.md`); and watches the rollup, challenging any batch
//! whose roots do not replay (`docs/settlement.md`).

pub mod config;
pub mod metrics;
mod serve;
pub mod stats;
pub mod watchtower;

pub use config::{ConfigError, NodeConfig, ServedModel, DEFAULT_PORT};
pub use metrics::NodeMetrics;
pub use serve::{load_models, serve_metrics, MetricsHandle, NodeError, RunningNode};
pub use watchtower::{Watchtower, WatchtowerEvent};
