//! A node's settings: defaults here, then a TOML file, then environment and flags (the CLI
//! applies those), validated once at start.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tessera_models::BatchConfig;
use tessera_net::{Multiaddr, NetConfig, PeerId};
use tessera_protocol::advert::{MAX_MODULES, TTL_RANGE_SECS};
use tessera_protocol::{Address, Amount, Price};

/// Default port of a node, TCP and QUIC alike.
pub const DEFAULT_PORT: u16 = 7400;

/// One model a node serves, and its price.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServedModel {
    /// Catalogue alias or path to a GGUF file.
    pub model: String,
    /// Asking price per 1k input and output tokens, in base units.
    #[serde(default = "default_price")]
    pub price: Price,
    /// Serve chat on a model without a chat template through the documented fallback
    /// format (Gemma turns) instead of refusing chat jobs.
    #[serde(default)]
    pub chat_fallback: bool,
    /// Test-only adversary: advertise (and claim in receipts) the module of this model
    /// while running `model`. Refused unless `TESSERA_TEST_IMPERSONATION=1` is set: it
    /// exists so tests can show that audits catch such a node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub impersonate: Option<String>,
    /// The module `impersonate` names, resolved at load.
    #[serde(skip)]
    pub impersonated: Option<tessera_protocol::ModuleId>,
}

/// Environment switch that allows [`ServedModel::impersonate`] (tests only).
pub const IMPERSONATION_ENV: &str = "TESSERA_TEST_IMPERSONATION";

fn default_price() -> Price {
    Price {
        per_1k_input: Amount(1_000),
        per_1k_output: Amount(4_000),
    }
}

impl ServedModel {
    /// `model` at the default price.
    pub fn new(model: impl Into<String>) -> Self {
        Self {
            model: model.into(),
            price: default_price(),
            chat_fallback: false,
            impersonate: None,
            impersonated: None,
        }
    }
}

/// Everything a node needs to run.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Where the identity key lives (`identity.key`, mode 0600).
    pub data_dir: PathBuf,
    /// What to serve.
    pub models: Vec<ServedModel>,
    /// Where earnings are paid.
    pub payout: Address,
    /// Most jobs admitted at once (running and waiting); beyond it a node answers busy.
    pub max_jobs: u32,
    /// Seconds between adverts when nothing changes.
    #[serde(with = "tessera_net::config::secs")]
    pub advert_interval: Duration,
    /// Seconds an advert stays valid without a newer one.
    pub advert_ttl_secs: u32,
    /// Seconds a job stream may take to deliver its request.
    #[serde(with = "tessera_net::config::secs")]
    pub request_timeout: Duration,
    /// Seconds in-flight jobs get to finish on shutdown before they are failed.
    #[serde(with = "tessera_net::config::secs")]
    pub shutdown_grace: Duration,
    /// Coordinators whose jobs are accepted (peer ids); empty accepts any signed request.
    pub coordinators: Vec<PeerId>,
    /// Listen addresses, bootstrap peers, mDNS, liveness.
    pub net: NetConfig,
    /// Continuous batching limits of each model's engine (`[engine]`); its queue is
    /// `max_jobs`.
    pub engine: BatchConfig,
}

impl Default for NodeConfig {
    fn default() -> Self {
        let net = NetConfig {
            listen: vec![
                format!("/ip4/0.0.0.0/tcp/{DEFAULT_PORT}")
                    .parse()
                    .expect("static multiaddr"),
                format!("/ip4/0.0.0.0/udp/{DEFAULT_PORT}/quic-v1")
                    .parse()
                    .expect("static multiaddr"),
            ],
            // Most nodes run at home: ask the router for a port mapping.
            upnp: true,
            ..NetConfig::default()
        };
        Self {
            data_dir: PathBuf::from("tessera-node"),
            models: Vec::new(),
            payout: Address::default(),
            max_jobs: 16,
            advert_interval: Duration::from_secs(10),
            advert_ttl_secs: 30,
            request_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(30),
            coordinators: Vec::new(),
            net,
            engine: BatchConfig::default(),
        }
    }
}

/// A setting that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config {path}: {cause}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        cause: std::io::Error,
    },
    /// The file is not valid TOML for this struct.
    #[error("config {path}: {cause}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why (with line and column).
        cause: String,
    },
    /// A value is out of range.
    #[error("invalid config: {0}")]
    Invalid(String),
}

impl NodeConfig {
    /// Reads a TOML file; fields it leaves out keep their defaults.
    pub fn from_toml_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
            path: path.to_owned(),
            cause,
        })?;
        tessera_net::config::from_toml_over(&Self::default(), &text).map_err(|cause| {
            ConfigError::Parse {
                path: path.to_owned(),
                cause,
            }
        })
    }

    /// Checks ranges once, before anything starts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.models.is_empty() {
            return bad("no models to serve: add --model ALIAS (see `tessera models list`) or [[models]] to the config file".into());
        }
        if self.models.len() > MAX_MODULES {
            return bad(format!(
                "at most {MAX_MODULES} models per node, got {}",
                self.models.len()
            ));
        }
        if self.max_jobs == 0 || self.max_jobs > 1024 {
            return bad(format!("max_jobs must be 1..=1024, got {}", self.max_jobs));
        }
        self.engine
            .validate()
            .map_err(|e| ConfigError::Invalid(format!("[engine] {e}")))?;
        if !TTL_RANGE_SECS.contains(&self.advert_ttl_secs) {
            return bad(format!(
                "advert_ttl_secs must be {}..={}, got {}",
                TTL_RANGE_SECS.start(),
                TTL_RANGE_SECS.end(),
                self.advert_ttl_secs
            ));
        }
        if self.advert_interval.is_zero()
            || self.advert_interval.as_secs_f64() * 2.0 > f64::from(self.advert_ttl_secs)
        {
            return bad(format!(
                "advert_interval ({:?}) must be positive and at most half of advert_ttl_secs ({}), so one lost advert does not expire a node",
                self.advert_interval, self.advert_ttl_secs
            ));
        }
        self.net.validate().map_err(ConfigError::Invalid)?;
        if self.net.listen.is_empty() {
            return bad("no listen addresses".into());
        }
        for addr in &self.net.bootstrap {
            if !matches!(addr.iter().last(), Some(tessera_net::Protocol::P2p(_))) {
                return bad(format!(
                    "bootstrap address {addr} must end in /p2p/<peer id>"
                ));
            }
        }
        Ok(())
    }

    /// Bootstrap addresses, for messages.
    pub fn bootstrap(&self) -> &[Multiaddr] {
        &self.net.bootstrap
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_overrides_defaults_and_validates() {
        let text = r#"
            payout = "0x00000000000000000000000000000000000000aa"
            max_jobs = 2
            advert_interval = 1.5
            [[models]]
            model = "smollm2-135m-instruct"
            price = { per_1k_input = "10", per_1k_output = "40" }
            [net]
            listen = ["/ip4/127.0.0.1/tcp/0"]
            bootstrap = ["/ip4/127.0.0.1/tcp/7400/p2p/12D3KooWQYV9dGMFoRzNStwpXztXaBUjtPqi6aU76ZgUriHhKust"]
        "#;
        let c: NodeConfig = toml::from_str(text).expect("parse");
        assert_eq!(c.max_jobs, 2);
        assert_eq!(c.advert_interval, Duration::from_millis(1500));
        assert_eq!(c.models[0].price.per_1k_output, Amount(40));
        assert_eq!(c.advert_ttl_secs, 30, "default kept");
        assert_eq!(
            c.net.ping_interval,
            NetConfig::default().ping_interval,
            "nested default kept"
        );
        c.validate().expect("valid");
    }

    #[test]
    fn a_file_with_a_net_table_keeps_the_nodes_network_defaults() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("node.toml");
        std::fs::write(
            &path,
            "[[models]]\nmodel = \"smollm2-135m-instruct\"\n[net]\nlisten = [\"/ip4/0.0.0.0/tcp/9000\"]\n",
        )
        .expect("write");
        let c = NodeConfig::from_toml_file(&path).expect("parse");
        assert!(c.net.upnp, "UPnP stays on for a node");
        assert_eq!(c.net.listen.len(), 1);
        assert_eq!(c.max_jobs, 16);
        c.validate().expect("valid");
        std::fs::write(&path, "max_job = 3").expect("write");
        let err = NodeConfig::from_toml_file(&path).unwrap_err().to_string();
        assert!(err.contains("max_job"), "{err}");
    }

    #[test]
    fn bad_settings_are_named() {
        let mut c = NodeConfig::default();
        assert!(c.validate().unwrap_err().to_string().contains("--model"));
        c.models.push(ServedModel::new("smollm2-135m-instruct"));
        c.validate().expect("valid");
        c.max_jobs = 0;
        assert!(c.validate().unwrap_err().to_string().contains("max_jobs"));
        c.max_jobs = 1;
        c.advert_interval = Duration::from_secs(20);
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("advert_interval"));
        c.advert_interval = Duration::from_secs(1);
        c.net.bootstrap = vec!["/ip4/127.0.0.1/tcp/1".parse().expect("addr")];
        assert!(c.validate().unwrap_err().to_string().contains("/p2p/"));
        let err = toml::from_str::<NodeConfig>("max_job = 3").unwrap_err();
        assert!(err.to_string().contains("max_job"), "{err}");
    }
}
