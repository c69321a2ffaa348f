//! A whole coordinator: its configuration (defaults → TOML → flags), and [`Coordinator`],
//! which opens the ledger (releasing holds a crash left behind), joins the network, serves
//! the HTTP API, and shuts all of it down in order: stop accepting requests, let running
//! jobs finish within a grace period (then cancel them, settling what they delivered),
//! close the swarm.

use crate::api::{router, ApiState};
use crate::jobs::{DispatchConfig, Dispatcher};
use crate::ledger::{Ledger, LedgerError};
use crate::limits::RateLimits;
use crate::network::{CoordinatorNet, CoordinatorNetError};
use crate::sequencer::{L1Setup, SequencerConfig, SequencerHandle};
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tessera_net::config::secs;
use tessera_net::{Multiaddr, NetConfig, PeerId};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The coordinator's default libp2p port (nodes use 7400).
pub const DEFAULT_P2P_PORT: u16 = 7300;

/// Everything a coordinator needs to run.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CoordinatorConfig {
    /// Where the API listens.
    pub http: SocketAddr,
    /// Where the identity key (`identity.key`) and the ledger (`ledger.redb`) live.
    pub data_dir: PathBuf,
    /// Requests per minute per account (bursts up to a minute's worth).
    pub requests_per_minute: u32,
    /// Jobs running at once per account.
    pub concurrent_jobs: u32,
    /// Seconds a request waits for a free node before 503.
    #[serde(with = "secs")]
    pub queue_timeout: Duration,
    /// Seconds a job may run.
    #[serde(with = "secs")]
    pub job_timeout: Duration,
    /// Most nodes tried per request before its first token.
    pub max_attempts: u32,
    /// Seconds running jobs get to finish on shutdown before they are cancelled.
    #[serde(with = "secs")]
    pub shutdown_grace: Duration,
    /// Listen addresses, bootstrap peers, mDNS, liveness.
    pub net: NetConfig,
    /// Settle on an L1 through the rollup (docs/settlement.md); off when absent.
    pub settlement: Option<SettlementConfig>,
    /// Audits by replay (docs/verification.md).
    pub audit: crate::audit::AuditConfig,
}

/// Where and how the coordinator settles.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SettlementConfig {
    /// `embedded` (a chain kept in `DATA_DIR/l1/`) or an EVM node's JSON-RPC URL.
    pub l1: String,
    /// Seconds between batches when anything waits.
    #[serde(with = "secs")]
    pub batch_interval: Duration,
    /// Seconds a batch can be challenged (used when deploying the contracts).
    pub challenge_window: u64,
    /// Seconds an epoch lasts (statement rows; commission changes apply from the next).
    #[serde(with = "secs")]
    pub epoch_interval: Duration,
}

impl Default for SettlementConfig {
    fn default() -> Self {
        Self {
            l1: "embedded".into(),
            batch_interval: SequencerConfig::default().batch_interval,
            challenge_window: tessera_contracts::Params::default().challenge_window,
            epoch_interval: SequencerConfig::default().epoch_interval,
        }
    }
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        let limits = RateLimits::default();
        let dispatch = DispatchConfig::default();
        Self {
            http: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: PathBuf::from("tessera-coordinator"),
            requests_per_minute: limits.requests_per_minute,
            concurrent_jobs: limits.concurrent_jobs,
            queue_timeout: dispatch.queue_timeout,
            job_timeout: dispatch.job_timeout,
            max_attempts: dispatch.max_attempts,
            shutdown_grace: Duration::from_secs(30),
            settlement: None,
            audit: crate::audit::AuditConfig::default(),
            net: NetConfig {
                listen: vec![
                    format!("/ip4/0.0.0.0/tcp/{DEFAULT_P2P_PORT}")
                        .parse()
                        .expect("static multiaddr"),
                    format!("/ip4/0.0.0.0/udp/{DEFAULT_P2P_PORT}/quic-v1")
                        .parse()
                        .expect("static multiaddr"),
                ],
                // A coordinator is a public server: it relays for nodes behind NAT and
                // tells them, by dialing back, whether they are reachable.
                public: true,
                autonat_server: true,
                relay: tessera_net::RelayConfig {
                    serve: true,
                    ..tessera_net::RelayConfig::default()
                },
                ..NetConfig::default()
            },
        }
    }
}

/// Why a coordinator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A setting is out of range, or the config file is unreadable.
    #[error("invalid config: {0}")]
    Config(String),
    /// The ledger could not be opened.
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    /// The identity key could not be read or made.
    #[error(transparent)]
    Identity(#[from] tessera_net::IdentityError),
    /// The swarm failed to start.
    #[error(transparent)]
    Net(#[from] CoordinatorNetError),
    /// The HTTP address could not be bound.
    #[error("cannot listen for HTTP on {addr}: {cause}")]
    Http {
        /// The address.
        addr: SocketAddr,
        /// Why.
        cause: std::io::Error,
    },
    /// The data directory could not be made.
    #[error("cannot create {path}: {cause}")]
    DataDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        cause: std::io::Error,
    },
}

impl CoordinatorConfig {
    /// Reads a TOML file; fields it leaves out keep their defaults.
    pub fn from_toml_file(path: &Path) -> Result<Self, StartError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| StartError::Config(format!("cannot read {}: {e}", path.display())))?;
        tessera_net::config::from_toml_over(&Self::default(), &text)
            .map_err(|e| StartError::Config(format!("{}: {e}", path.display())))
    }

    /// Checks ranges once, before anything starts.
    pub fn validate(&self) -> Result<(), StartError> {
        let bad = |m: String| Err(StartError::Config(m));
        if let Err(e) = self.audit.validate() {
            return bad(e);
        }
        if self.requests_per_minute == 0 || self.concurrent_jobs == 0 {
            return bad("requests_per_minute and concurrent_jobs must be at least 1".into());
        }
        if self.max_attempts == 0 || self.max_attempts > 16 {
            return bad(format!(
                "max_attempts must be 1..=16, got {}",
                self.max_attempts
            ));
        }
        if self.job_timeout.is_zero() || self.job_timeout > crate::client::MAX_JOB_TIMEOUT {
            return bad("job_timeout must be between 1 s and 24 h".into());
        }
        if let Some(st) = &self.settlement {
            if st.epoch_interval < Duration::from_secs(1) {
                return bad(format!(
                    "settlement.epoch_interval must be at least 1 s, got {:?}",
                    st.epoch_interval
                ));
            }
        }
        self.net.validate().map_err(StartError::Config)
    }

    /// The ledger file.
    pub fn ledger_path(&self) -> PathBuf {
        self.data_dir.join("ledger.redb")
    }
}

/// A running coordinator.
pub struct Coordinator {
    sequencer: Option<(
        SequencerHandle,
        CancellationToken,
        tokio::task::JoinHandle<()>,
    )>,
    net: CoordinatorNet,
    dispatcher: Dispatcher,
    http_addr: SocketAddr,
    http_stop: CancellationToken,
    http_task: tokio::task::JoinHandle<()>,
    grace: Duration,
    audits: (TaskTracker, CancellationToken),
}

impl Coordinator {
    /// Opens the ledger, joins the network and starts serving the API.
    pub async fn start(config: CoordinatorConfig) -> Result<Self, StartError> {
        let Some(s) = config.settlement.clone() else {
            return Self::start_with(config, None).await;
        };
        let rpc = (s.l1 != "embedded").then_some(s.l1.as_str());
        let params = tessera_contracts::Params {
            challenge_window: s.challenge_window,
            escape_delay: tessera_contracts::Params::default()
                .escape_delay
                .max(s.challenge_window * 2),
            ..tessera_contracts::Params::default()
        };
        let l1 = crate::l1::open_l1(&config.data_dir.join("l1"), rpc, &params)
            .await
            .map_err(|e| StartError::Config(format!("cannot open the L1 {:?}: {e}", s.l1)))?;
        let sequencer = SequencerConfig {
            batch_interval: s.batch_interval,
            epoch_interval: s.epoch_interval,
            ..SequencerConfig::default()
        };
        Self::start_with(config, Some((l1, sequencer))).await
    }

    /// Starts a coordinator that also runs the rollup's sequencer on `settlement`'s L1:
    /// what the API settles is posted in batches (docs/settlement.md).
    pub async fn start_with(
        config: CoordinatorConfig,
        settlement: Option<(L1Setup, SequencerConfig)>,
    ) -> Result<Self, StartError> {
        config.validate()?;
        std::fs::create_dir_all(&config.data_dir).map_err(|cause| StartError::DataDir {
            path: config.data_dir.clone(),
            cause,
        })?;
        let ledger = Ledger::open(&config.ledger_path())?;
        let (count, amount) = ledger.recover()?;
        if count > 0 {
            tracing::warn!(count, %amount, "released reservations of jobs that were running when the coordinator stopped");
        }
        let (key, _) = tessera_net::load_or_create_identity(&config.data_dir.join("identity.key"))?;
        let listener = tokio::net::TcpListener::bind(config.http)
            .await
            .map_err(|cause| StartError::Http {
                addr: config.http,
                cause,
            })?;
        let http_addr = listener.local_addr().map_err(|cause| StartError::Http {
            addr: config.http,
            cause,
        })?;
        if config.audit.enabled {
            // Before anything starts that an early return would leave running.
            match ledger.create_account(&config.audit.account) {
                Ok(()) | Err(LedgerError::AccountExists(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let net = CoordinatorNet::start(key, &config.net).await?;
        let ledger = Arc::new(ledger);
        let deployment = settlement.as_ref().map(|(l1, _)| l1.deployment.clone());
        let chain = settlement.as_ref().map(|(l1, _)| l1.chain.clone());
        let embedded_l1 = settlement.as_ref().and_then(|(l1, _)| match &l1.chain {
            tessera_contracts::AnyChain::Embedded(c) => Some(c.clone()),
            tessera_contracts::AnyChain::Rpc(_) => None,
        });
        let sequencer = match settlement {
            Some((l1, seq_config)) => {
                let stop = CancellationToken::new();
                let genesis = l1.deployment.genesis();
                let (handle, task) =
                    crate::sequencer::start(l1, ledger.clone(), genesis, seq_config, stop.clone())
                        .await
                        .map_err(|e| {
                            StartError::Config(format!("cannot start the sequencer: {e}"))
                        })?;
                Some((handle, stop, task))
            }
            None => None,
        };
        let metrics = Arc::new(crate::metrics::Metrics::with_net(net.net().metrics()));
        let audits = TaskTracker::new();
        let audit_stop = CancellationToken::new();
        let auditor = if config.audit.enabled {
            Some(crate::audit::spawn(
                config.audit.clone(),
                crate::audit::AuditDeps {
                    client: net.client(),
                    table: net.table(),
                    ledger: ledger.clone(),
                    metrics: metrics.clone(),
                    sequencer: sequencer.as_ref().map(|(h, _, _)| h.clone()),
                },
                &audits,
                audit_stop.clone(),
            ))
        } else {
            None
        };
        let state = ApiState::new(
            &net,
            ledger,
            metrics,
            DispatchConfig {
                queue_timeout: config.queue_timeout,
                job_timeout: config.job_timeout,
                max_attempts: config.max_attempts,
            },
            RateLimits {
                requests_per_minute: config.requests_per_minute,
                concurrent_jobs: config.concurrent_jobs,
            },
            auditor,
        );
        let dispatcher = state.dispatcher.clone();
        let mut state = state;
        state.sequencer = sequencer.as_ref().map(|(h, _, _)| h.clone());
        state.deployment = deployment;
        state.embedded_l1 = embedded_l1;
        state.chain = chain;
        let http_stop = CancellationToken::new();
        let app = router(state);
        let stop = http_stop.clone();
        let http_task = tokio::spawn(async move {
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "HTTP server failed");
            }
        });
        tracing::info!(%http_addr, peer = %net.peer_id(), "coordinator started");
        Ok(Self {
            sequencer,
            audits: (audits, audit_stop),
            net,
            dispatcher,
            http_addr,
            http_stop,
            http_task,
            grace: config.shutdown_grace,
        })
    }

    /// Where the API listens.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The coordinator's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.net.peer_id()
    }

    /// Its libp2p listen addresses.
    pub async fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.net.listen_addrs().await
    }

    /// The network side (node table, swarm).
    pub fn net(&self) -> &CoordinatorNet {
        &self.net
    }

    /// The ledger.
    pub fn ledger(&self) -> &Arc<Ledger> {
        self.dispatcher.ledger()
    }

    /// The rollup's sequencer, when settlement is on.
    pub fn sequencer(&self) -> Option<&SequencerHandle> {
        self.sequencer.as_ref().map(|(h, _, _)| h)
    }

    /// Stops in order: no new requests; running jobs get the grace period to finish, then
    /// are cancelled (each settling what it delivered); the sequencer stops; then the
    /// swarm closes.
    pub async fn shutdown(self) {
        self.http_stop.cancel();
        let http = self.http_task;
        tokio::pin!(http);
        let finished = tokio::time::timeout(self.grace, &mut http).await.is_ok();
        self.dispatcher.shutdown().await;
        if !finished {
            let _ = tokio::time::timeout(Duration::from_secs(5), http).await;
        }
        let (audits, audit_stop) = self.audits;
        audit_stop.cancel();
        audits.close();
        audits.wait().await;
        if let Some((_, stop, task)) = self.sequencer {
            stop.cancel();
            let _ = task.await;
        }
        self.net.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_overrides_defaults_and_unknown_keys_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "http = \"0.0.0.0:9000\"\nqueue_timeout = 2.5\nmax_attempts = 2\n[net]\nlisten = [\"/ip4/127.0.0.1/tcp/0\"]\n",
        )
        .expect("write");
        let c = CoordinatorConfig::from_toml_file(&path).expect("parse");
        assert_eq!(c.http.port(), 9000);
        assert_eq!(c.queue_timeout, Duration::from_millis(2500));
        assert_eq!(c.max_attempts, 2);
        assert_eq!(c.requests_per_minute, 600, "defaults kept");
        assert!(
            c.net.relay.serve && c.net.public && c.net.autonat_server,
            "a [net] table keeps the coordinator's own defaults"
        );
        c.validate().expect("valid");
        std::fs::write(&path, "[settlement]\nbatch_interval = 2.5\n").expect("write");
        let c = CoordinatorConfig::from_toml_file(&path).expect("parse");
        let s = c.settlement.expect("settlement on");
        assert_eq!(
            (s.l1.as_str(), s.batch_interval),
            ("embedded", Duration::from_millis(2500))
        );
        assert!(
            CoordinatorConfig::default().settlement.is_none(),
            "off unless configured"
        );
        std::fs::write(&path, "htp = 1\n").expect("write");
        let err = CoordinatorConfig::from_toml_file(&path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("htp"), "{err}");
        let bad = CoordinatorConfig {
            max_attempts: 0,
            ..CoordinatorConfig::default()
        };
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("max_attempts"));
    }
}
