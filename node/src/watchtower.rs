//! The watchtower every node runs: it replays each batch posted to the settlement
//! contract from L1 data alone (the deposit queue and the batch's calldata), with the
//! same state-transition function as the sequencer, and challenges the first wrong root
//! with a single-step fraud proof while the window is open.

use alloy::primitives::B256;
use alloy::signers::local::PrivateKeySigner;
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tessera_contracts::{AnyChain, ChallengeOutcome, ContractError, Contracts, Deployment, L1};
use tessera_rollup::{State, H256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What the watchtower saw or did, for logs and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchtowerEvent {
    /// Batch `index` replays to its posted roots.
    Verified {
        /// The batch.
        index: u64,
    },
    /// Batch `index` is wrong at `step`; a challenge was sent.
    Challenged {
        /// The batch.
        index: u64,
        /// The first wrong step.
        step: u32,
        /// Whether the contract upheld it.
        upheld: bool,
    },
    /// A wrong batch could not be challenged (window closed, no ether, L1 error).
    Missed {
        /// The batch.
        index: u64,
        /// Why.
        reason: String,
    },
}

/// A node's watch over one settlement deployment.
pub struct Watchtower {
    chain: AnyChain,
    deployment: Deployment,
    wallet: PrivateKeySigner,
    genesis: State,
    /// The state at each root seen verified (and genesis).
    states: HashMap<H256, State>,
    /// Batches already judged, by posting transaction.
    judged: HashSet<B256>,
}

impl Watchtower {
    /// Watches `deployment` on `chain`, challenging with `wallet` (which needs ether for
    /// the challenge bond). `genesis` is the L2 genesis the deployment names.
    pub fn new(chain: AnyChain, deployment: Deployment, wallet: PrivateKeySigner) -> Self {
        let genesis = deployment.genesis();
        let mut states = HashMap::new();
        states.insert(genesis.root(), genesis.clone());
        Self {
            chain,
            deployment,
            wallet,
            genesis,
            states,
            judged: HashSet::new(),
        }
    }

    /// The genesis this watchtower replays from.
    pub fn genesis(&self) -> &State {
        &self.genesis
    }

    /// Checks every batch posted since the last round; returns what it found.
    pub async fn round(&mut self) -> Result<Vec<WatchtowerEvent>, ContractError> {
        let c = Contracts::new(&self.chain, &self.deployment);
        let queue: Vec<H256> = c.deposits().await?.iter().map(|d| d.hash()).collect();
        let mut events = Vec::new();
        for posted in c.posted_batches().await? {
            if self.judged.contains(&posted.tx) {
                continue;
            }
            let Some(base) = self.states.get(&posted.prev_root.0) else {
                // Built on a root we never verified: an earlier wrong batch, which is
                // (or was) challenged; this one falls with it.
                continue;
            };
            let batch = c.batch_data(&posted).await?;
            match batch.check(base, &queue) {
                Ok(after) => {
                    self.states.insert(after.root(), after);
                    self.judged.insert(posted.tx);
                    events.push(WatchtowerEvent::Verified {
                        index: posted.index,
                    });
                }
                Err(proof) => {
                    self.judged.insert(posted.tx);
                    tracing::warn!(
                        index = posted.index,
                        step = proof.step,
                        "posted batch is wrong; challenging"
                    );
                    let bond = self.deployment.params.challenge_bond;
                    match c.challenge(&self.wallet, posted.index, &proof, bond).await {
                        Ok((outcome, _)) => {
                            let upheld = matches!(outcome, ChallengeOutcome::Upheld { .. });
                            tracing::warn!(index = posted.index, upheld, "challenge judged");
                            events.push(WatchtowerEvent::Challenged {
                                index: posted.index,
                                step: proof.step,
                                upheld,
                            });
                        }
                        Err(e) => {
                            tracing::error!(index = posted.index, error = %e, "challenge failed to land");
                            events.push(WatchtowerEvent::Missed {
                                index: posted.index,
                                reason: e.to_string(),
                            });
                        }
                    }
                }
            }
        }
        Ok(events)
    }

    /// Runs rounds every `every` until `stop`, reporting events to `events` (bounded;
    /// events are dropped, never waited on, when the receiver is slow).
    pub async fn run(
        mut self,
        every: Duration,
        events: Option<mpsc::Sender<WatchtowerEvent>>,
        stop: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => match self.round().await {
                    Ok(found) => {
                        for e in found {
                            if let Some(tx) = &events {
                                let _ = tx.try_send(e);
                            }
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "watchtower round failed; retrying"),
                },
            }
        }
    }
}

/// Whether `chain` has ether enough for one challenge bond for `wallet`.
pub async fn can_challenge(chain: &AnyChain, d: &Deployment, wallet: &PrivateKeySigner) -> bool {
    chain
        .eth_balance(wallet.address())
        .await
        .is_ok_and(|b| b >= d.params.challenge_bond)
}
