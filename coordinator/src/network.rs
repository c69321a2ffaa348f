//! The coordinator's swarm: starts the network, keeps the node table current from its
//! events and expires silent nodes, and hands out job clients.

use crate::client::JobClient;
use crate::table::NodeTable;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tessera_net::{Multiaddr, NetConfig, NetHandle, PeerId};
use tessera_protocol::Keypair;
use tokio_util::sync::CancellationToken;

/// How often silent nodes are looked for.
const EXPIRY_SWEEP: Duration = Duration::from_millis(500);

/// Why the coordinator's network could not start.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorNetError {
    /// The swarm failed to start.
    #[error(transparent)]
    Net(#[from] tessera_net::NetError),
}

/// The coordinator's network: swarm, node table and job client.
pub struct CoordinatorNet {
    net: NetHandle,
    key: Keypair,
    table: Arc<RwLock<NodeTable>>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl CoordinatorNet {
    /// Starts the swarm with `key` and `config` and begins tracking nodes.
    pub async fn start(key: Keypair, config: &NetConfig) -> Result<Self, CoordinatorNetError> {
        let (net, mut events, net_task) = tessera_net::start(key.clone(), config).await?;
        let table = Arc::new(RwLock::new(NodeTable::default()));
        let stop = CancellationToken::new();
        let tracker = {
            let table = table.clone();
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut sweep = tokio::time::interval(EXPIRY_SWEEP);
                loop {
                    tokio::select! {
                        event = events.recv() => match event {
                            Some(event) => {
                                if let Ok(mut t) = table.write() {
                                    t.apply(&event, Instant::now());
                                }
                            }
                            None => break,
                        },
                        _ = sweep.tick() => {
                            if let Ok(mut t) = table.write() {
                                t.expire(Instant::now());
                            }
                        }
                        () = stop.cancelled() => break,
                    }
                }
            })
        };
        Ok(Self {
            net,
            key,
            table,
            stop,
            tasks: vec![tracker, net_task],
        })
    }

    /// This coordinator's peer id.
    pub fn peer_id(&self) -> PeerId {
        self.net.peer_id()
    }

    /// Addresses it listens on.
    pub async fn listen_addrs(&self) -> Vec<Multiaddr> {
        self.net.listen_addrs().await.unwrap_or_default()
    }

    /// The live node table.
    pub fn table(&self) -> Arc<RwLock<NodeTable>> {
        self.table.clone()
    }

    /// The swarm handle (dialing, peers).
    pub fn net(&self) -> &NetHandle {
        &self.net
    }

    /// A job client that signs with the coordinator's key and records outcomes in the table.
    pub fn client(&self) -> JobClient {
        JobClient::new(self.net.clone(), self.key.clone(), Some(self.table.clone()))
    }

    /// Stops tracking and closes the swarm.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.net.shutdown().await;
        for t in self.tasks {
            let _ = t.await;
        }
    }
}
