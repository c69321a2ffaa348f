//! The Tessera node: loads model modules, joins the swarm, advertises what it serves and
//! how loaded it is, admits jobs within capacity and price, streams their text, and signs
//! a receipt for each. See `docs/network.md`.

pub mod config;
mod serve;
pub mod stats;

pub use config::{ConfigError, NodeConfig, ServedModel, DEFAULT_PORT};
pub use serve::{load_models, NodeError, RunningNode};
