//! The sequencer: turns what the coordinator settles into L2 transactions and posts them
//! to the settlement contract. One task owns the L2 state; everything else holds a
//! [`SequencerHandle`] and sends commands with a reply channel.
//!
//! Every `poll` it reads L1: new deposits (credited to the linked API account once, and
//! queued as deposit transactions) and the batch count (a challenge that reverted our
//! batches puts their transactions back in line, and their receipts back among the
//! unbatched). Every `batch_interval`, or as soon as `max_batch` transactions wait, it
//! posts a batch: deposits and signed transactions in arrival order, then one settlement
//! per (payer, node) netting the receipts settled since, with the Merkle root of those
//! receipts so each job stays provable.
//!
//! What survives a crash: posted batches are on L1 and replayed from their calldata at
//! start; receipts not yet posted are in the ledger (written with the receipt); deposits
//! are re-read from L1 and credited once. Signed transactions received but not yet
//! posted are lost with the process and must be sent again (nothing was applied).

use crate::ledger::{Ledger, Unbatched};
use alloy::primitives::{Address as EvmAddress, U256};
use alloy::signers::local::PrivateKeySigner;
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tessera_contracts::{AnyChain, ContractError, Contracts, Deployment, QueuedDeposit, L1};
use tessera_protocol::{Address, Amount};
use tessera_rollup::{Account, Action, Batch, MerkleProof, Outcome, SettleSplit, State, Tx, H256};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// How the sequencer batches.
#[derive(Clone, Debug)]
pub struct SequencerConfig {
    /// Post at least this often when anything waits.
    pub batch_interval: Duration,
    /// Post at once when this many transactions wait; also the most one batch carries.
    pub max_batch: usize,
    /// How often L1 is read for deposits, reverts and finality.
    pub poll_interval: Duration,
    /// How long an epoch lasts: the sequencer queues the next epoch's tick this often.
    /// Commission changes apply from the epoch after they are announced, and statements
    /// have a row per epoch.
    pub epoch_interval: Duration,
    /// Misbehave on purpose (tests of the watchtowers only).
    pub fault: Option<Fault>,
}

impl Default for SequencerConfig {
    fn default() -> Self {
        Self {
            batch_interval: Duration::from_secs(10),
            max_batch: 512,
            poll_interval: Duration::from_secs(1),
            epoch_interval: Duration::from_secs(3600),
            fault: None,
        }
    }
}

/// A deliberate fault, so tests can show that watchtowers catch it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// The next batch is posted with its last root wrong.
    WrongRoot,
}

/// The L1 the sequencer posts to, and its key (the contract's sequencer).
#[derive(Clone)]
pub struct L1Setup {
    /// The chain.
    pub chain: AnyChain,
    /// The contracts.
    pub deployment: Deployment,
    /// The sequencer's key.
    pub operator: PrivateKeySigner,
}

/// Why a sequencer request failed.
#[derive(Debug, thiserror::Error)]
pub enum SequencerError {
    /// The transaction would not apply to the current L2 state.
    #[error("transaction does not apply: {0}")]
    Rejected(&'static str),
    /// The transaction bytes are malformed.
    #[error("{0}")]
    Malformed(String),
    /// The ledger refused (e.g. the balance is held by running jobs).
    #[error(transparent)]
    Ledger(#[from] crate::ledger::LedgerError),
    /// L1 failed.
    #[error("L1: {0}")]
    L1(#[from] ContractError),
    /// The sequencer has stopped.
    #[error("the sequencer has stopped")]
    Stopped,
}

/// An account as the sequencer knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountView {
    /// Its slot.
    pub slot: u32,
    /// With everything the sequencer has applied (posted or not).
    pub pending: Account,
    /// At the last posted batch.
    pub posted: Option<Account>,
    /// At the last final batch.
    pub final_: Option<Account>,
    /// Its delegations (as applied): slot and position.
    pub delegations: Vec<(u32, tessera_rollup::Delegation)>,
    /// The slot a new delegation takes next.
    pub next_delegation: u32,
}

/// One row of a reward statement: an account (and its delegations) at the last final
/// batch of an epoch, each leaf with its proof against that batch's root.
#[derive(Clone, Debug)]
pub struct StatementRow {
    /// The final batch.
    pub batch: u64,
    /// The epoch in force after it.
    pub epoch: u64,
    /// Its root (the contract holds the same).
    pub root: H256,
    /// The account's slot.
    pub slot: u32,
    /// The account leaf and its proof.
    pub account: (Vec<u8>, MerkleProof),
    /// The account's delegations: slot, leaf, proof.
    pub delegations: Vec<(u32, Vec<u8>, MerkleProof)>,
}

/// An account leaf with its proof against a final root: what an L1 withdrawal needs.
#[derive(Clone, Debug)]
pub struct FinalProof {
    /// The final batch.
    pub batch: u64,
    /// Its root.
    pub root: H256,
    /// The leaf's encoding.
    pub preimage: Vec<u8>,
    /// Its proof.
    pub proof: MerkleProof,
}

/// A point of a node's stake history: its own and delegated stake after a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StakePoint {
    /// The batch.
    pub batch: u64,
    /// The epoch after it.
    pub epoch: u64,
    /// Whether the batch is final.
    pub final_: bool,
    /// The node's own stake.
    pub stake: u128,
    /// Stake delegated to it.
    pub delegated: u128,
}

/// A delegation held by an account.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    /// The delegation's slot.
    pub slot: u32,
    /// The node's slot.
    pub node_slot: u32,
    /// The node's address.
    pub node: Address,
    /// Delegated, with everything applied.
    pub amount: u128,
    /// Claimed so far (cumulative), with everything applied.
    pub earned: u128,
    /// Accrued and not yet claimed, with everything applied (capped by the pool).
    pub accrued: u128,
    /// Accrued and not yet claimed at the last final root.
    pub accrued_final: Option<u128>,
}

/// One epoch of an account's statement: the cumulative figures at the last final batch
/// of the epoch (or the last final batch, for the epoch running then), with the leaves
/// and proofs they come from.
#[derive(Clone, Debug)]
pub struct EpochRow {
    /// The statement row's leaves and proofs.
    pub at: StatementRow,
    /// The account's cumulative `earned` there.
    pub earned: u128,
    /// Its delegations' rewards accrued and not yet claimed there.
    pub accrued: u128,
}

/// Everything the dashboard shows of one address, computed on the sequencer's task from
/// the batches it posted.
#[derive(Clone, Debug)]
pub struct AccountReport {
    /// The account's slot.
    pub slot: u32,
    /// The epoch in force with everything applied.
    pub epoch: u64,
    /// With everything applied (posted or not).
    pub pending: Account,
    /// At the last posted batch, and its index.
    pub posted: Option<(u64, Account)>,
    /// At the last final batch, with its proof.
    pub final_: Option<(Account, FinalProof)>,
    /// Its delegations.
    pub positions: Vec<Position>,
    /// A row per epoch (final batches only).
    pub rows: Vec<EpochRow>,
    /// Settlements paid to it as a node: batch, whether final, the record.
    pub settlements: Vec<(u64, bool, SettleRecord)>,
    /// Its commission changes: batch, whether final, the change.
    pub commissions: Vec<(u64, bool, CommissionChange)>,
    /// Its stake after each batch that changed it.
    pub stakes: Vec<StakePoint>,
    /// Delegations to it: delegator address, amount, claimed.
    pub delegators: Vec<(Address, u128, u128)>,
    /// Cumulative earnings (`earned` plus delegation rewards accrued and unclaimed) with
    /// everything applied, at the last posted batch, and at the last final batch.
    pub cumulative: [Option<u128>; 3],
}

/// One settlement in a batch and how it divided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SettleRecord {
    /// The paying account's slot.
    pub payer: u32,
    /// The node's slot.
    pub node: u32,
    /// The Merkle root of the receipts it nets.
    pub receipts_root: H256,
    /// The parts, with their inputs.
    pub split: SettleSplit,
}

/// A commission change announced in a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CommissionChange {
    /// The node's slot.
    pub node: u32,
    /// The rate before (in force until `from_epoch`).
    pub old_bps: u16,
    /// The new rate.
    pub bps: u16,
    /// The epoch it applies from.
    pub from_epoch: u64,
}

/// What a posted batch did, read from replaying its transactions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchSummary {
    /// Its index on L1.
    pub index: u64,
    /// The root before it.
    pub prev_root: H256,
    /// The root after it.
    pub root: H256,
    /// The epoch in force after it.
    pub epoch: u64,
    /// Transactions by kind (`settle`, `deposit` …), no-ops included.
    pub counts: BTreeMap<&'static str, u32>,
    /// Transactions that applied as no-ops.
    pub noops: u32,
    /// Its settlements.
    pub settlements: Vec<SettleRecord>,
    /// Its commission changes.
    pub commissions: Vec<CommissionChange>,
}

/// The name of a transaction's kind, as the API and pages show it.
pub fn tx_kind(tx: &Tx) -> &'static str {
    match tx {
        Tx::Deposit { .. } => "deposit",
        Tx::Settle { .. } => "settle",
        Tx::Signed { action, .. } => match action {
            Action::Withdraw { .. } => "withdraw",
            Action::Stake { .. } => "stake",
            Action::Unstake { .. } => "unstake",
            Action::Delegate { .. } => "delegate",
            Action::Undelegate { .. } => "undelegate",
            Action::SetCommission { .. } => "set_commission",
        },
        Tx::Claim { .. } => "claim",
        Tx::Release { .. } => "release",
        Tx::Slash { .. } => "slash",
        Tx::Epoch { .. } => "epoch",
    }
}

/// Replays `txs` on `state` (the state before the batch), recording what each did.
fn summarize(
    index: u64,
    state: &mut State,
    txs: &[Tx],
    queue: &(impl tessera_rollup::DepositQueue + ?Sized),
) -> BatchSummary {
    let mut sum = BatchSummary {
        index,
        prev_root: state.root(),
        root: [0; 32],
        epoch: 0,
        counts: BTreeMap::new(),
        noops: 0,
        settlements: Vec::new(),
        commissions: Vec::new(),
    };
    for tx in txs {
        *sum.counts.entry(tx_kind(tx)).or_default() += 1;
        let split = match tx {
            Tx::Settle {
                payer,
                node,
                amount,
                receipts_root,
            } => state
                .settle_split(*payer, *node, *amount)
                .ok()
                .map(|split| SettleRecord {
                    payer: *payer,
                    node: *node,
                    receipts_root: *receipts_root,
                    split,
                }),
            _ => None,
        };
        let old_bps = match tx {
            Tx::Signed { slot, .. } => state
                .account(*slot)
                .map(|a| a.commission_at(state.meta().epoch + 1)),
            _ => None,
        };
        if let Outcome::NoOp(_) = state.apply(tx, queue) {
            sum.noops += 1;
            continue;
        }
        sum.settlements.extend(split);
        if let Tx::Signed {
            slot,
            action: Action::SetCommission { bps },
            ..
        } = tx
        {
            if let Some(a) = state.account(*slot) {
                sum.commissions.push(CommissionChange {
                    node: *slot,
                    old_bps: old_bps.unwrap_or(0),
                    bps: *bps,
                    from_epoch: a.next_commission_epoch,
                });
            }
        }
    }
    sum.root = state.root();
    sum.epoch = state.meta().epoch;
    sum
}

/// Where the sequencer stands.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SequencerStatus {
    /// Batches posted and standing on L1.
    pub batches: u64,
    /// Of which final.
    pub finalized: u64,
    /// Transactions waiting for the next batch (receipts not counted).
    pub waiting: usize,
    /// The root of everything applied.
    pub pending_root: String,
}

enum Command {
    Submit {
        tx: Tx,
        reply: oneshot::Sender<Result<(), SequencerError>>,
    },
    Slash {
        node: Address,
        amount: Amount,
        evidence: [u8; 32],
        reply: oneshot::Sender<Result<(), SequencerError>>,
    },
    Flush {
        reply: oneshot::Sender<Result<Option<u64>, SequencerError>>,
    },
    Account {
        address: Address,
        reply: oneshot::Sender<Option<AccountView>>,
    },
    Proof {
        slot: u32,
        reply: oneshot::Sender<Option<FinalProof>>,
    },
    Status {
        reply: oneshot::Sender<SequencerStatus>,
    },
    Inject(Fault),
    Statement {
        address: Address,
        reply: oneshot::Sender<Vec<StatementRow>>,
    },
    Batches {
        reply: oneshot::Sender<(Vec<Arc<BatchSummary>>, u64)>,
    },
    Report {
        address: Address,
        statement: bool,
        reply: oneshot::Sender<Option<AccountReport>>,
    },
    Slots {
        reply: oneshot::Sender<Vec<(u32, Account)>>,
    },
}

/// A handle to the sequencer task.
#[derive(Clone)]
pub struct SequencerHandle {
    tx: mpsc::Sender<Command>,
}

impl SequencerHandle {
    async fn ask<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, SequencerError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| SequencerError::Stopped)?;
        rx.await.map_err(|_| SequencerError::Stopped)
    }

    /// Queues a signed L2 transaction (withdraw, stake, delegate …), a claim or a
    /// release for the next batch, after checking that it applies. A withdrawal or stake by an API account's address
    /// also takes the amount out of the API balance.
    pub async fn submit(&self, tx: Tx) -> Result<(), SequencerError> {
        self.ask(|reply| Command::Submit { tx, reply }).await?
    }

    /// Queues a slash of `amount` from the stake of the account at `node` (a failed
    /// audit's penalty) for the next batch; `evidence` is the dispute's hash, and a slash
    /// with the same evidence already posted or waiting is not queued again.
    pub async fn slash(
        &self,
        node: Address,
        amount: Amount,
        evidence: [u8; 32],
    ) -> Result<(), SequencerError> {
        self.ask(|reply| Command::Slash {
            node,
            amount,
            evidence,
            reply,
        })
        .await?
    }

    /// Posts a batch now if anything waits; returns its index.
    pub async fn flush(&self) -> Result<Option<u64>, SequencerError> {
        self.ask(|reply| Command::Flush { reply }).await?
    }

    /// An address's account.
    pub async fn account(&self, address: Address) -> Result<Option<AccountView>, SequencerError> {
        self.ask(|reply| Command::Account { address, reply }).await
    }

    /// A slot's leaf and proof at the last final batch.
    pub async fn final_proof(&self, slot: u32) -> Result<Option<FinalProof>, SequencerError> {
        self.ask(|reply| Command::Proof { slot, reply }).await
    }

    /// Where the sequencer stands.
    pub async fn status(&self) -> Result<SequencerStatus, SequencerError> {
        self.ask(|reply| Command::Status { reply }).await
    }

    /// An address's reward statement: a row per epoch ended in a final batch, and one for
    /// the last final batch.
    pub async fn statement(&self, address: Address) -> Result<Vec<StatementRow>, SequencerError> {
        self.ask(|reply| Command::Statement { address, reply })
            .await
    }

    /// Every standing batch's summary, oldest first, and how many are final.
    pub async fn batches(&self) -> Result<(Vec<Arc<BatchSummary>>, u64), SequencerError> {
        self.ask(|reply| Command::Batches { reply }).await
    }

    /// Everything the dashboard shows of an address (`None`: no L2 account); the
    /// statement's rows and their proofs only when `statement`.
    pub async fn report(
        &self,
        address: Address,
        statement: bool,
    ) -> Result<Option<AccountReport>, SequencerError> {
        self.ask(|reply| Command::Report {
            address,
            statement,
            reply,
        })
        .await
    }

    /// Every account with everything applied, by slot.
    pub async fn accounts(&self) -> Result<Vec<(u32, Account)>, SequencerError> {
        self.ask(|reply| Command::Slots { reply }).await
    }

    /// Makes the next batch faulty (a test option: watchtowers must catch it).
    pub async fn inject_fault(&self, fault: Fault) -> Result<(), SequencerError> {
        self.tx
            .send(Command::Inject(fault))
            .await
            .map_err(|_| SequencerError::Stopped)
    }
}

/// One batch we posted that L1 still holds.
struct Posted {
    index: u64,
    txs: Vec<Tx>,
    state: State,
    summary: Arc<BatchSummary>,
}

/// The sequencer task's state.
struct Sequencer {
    l1: L1Setup,
    ledger: Arc<Ledger>,
    config: SequencerConfig,
    genesis: State,
    /// State after the posted batches and the waiting transactions.
    pending: State,
    posted: Vec<Posted>,
    finalized: u64,
    deposits: Vec<QueuedDeposit>,
    queue: Vec<H256>,
    waiting: Vec<Tx>,
    registering: HashSet<Address>,
    last_post: Instant,
    last_epoch: Instant,
    fault: Option<Fault>,
}

/// Starts the sequencer: rebuilds the L2 state from the batches on L1, then runs until
/// `stop`. The returned join handle ends when it has stopped.
pub async fn start(
    l1: L1Setup,
    ledger: Arc<Ledger>,
    genesis: State,
    config: SequencerConfig,
    stop: CancellationToken,
) -> Result<(SequencerHandle, tokio::task::JoinHandle<()>), SequencerError> {
    let mut s = Sequencer {
        pending: genesis.clone(),
        genesis,
        fault: config.fault,
        l1,
        ledger,
        config,
        posted: Vec::new(),
        finalized: 0,
        deposits: Vec::new(),
        queue: Vec::new(),
        waiting: Vec::new(),
        registering: HashSet::new(),
        last_post: Instant::now(),
        last_epoch: Instant::now(),
    };
    s.recover().await?;
    let (tx, mut rx) = mpsc::channel(64);
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(s.config.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                cmd = rx.recv() => match cmd {
                    Some(cmd) => s.handle(cmd).await,
                    None => break,
                },
                _ = tick.tick() => {
                    if let Err(e) = s.tick().await {
                        tracing::warn!(error = %e, "sequencer round failed; retrying");
                    }
                }
            }
        }
        tracing::info!("sequencer stopped");
    });
    Ok((SequencerHandle { tx }, task))
}

impl Sequencer {
    fn contracts(&self) -> Contracts<'_, AnyChain> {
        Contracts::new(&self.l1.chain, &self.l1.deployment)
    }

    /// Rebuilds the posted state from L1: every standing batch, replayed from calldata.
    async fn recover(&mut self) -> Result<(), SequencerError> {
        self.sync_deposits().await?;
        let c = self.contracts();
        let batches = c.posted_batches().await?;
        let mut state = self.genesis.clone();
        let mut posted = Vec::new();
        for b in &batches {
            let batch = c.batch_data(b).await?;
            let summary = summarize(b.index, &mut state, &batch.txs, &self.queue);
            if state.root() != batch.new_root() {
                tracing::error!(index = b.index, "a standing batch does not replay to its root; a watchtower should challenge it");
            }
            posted.push(Posted {
                index: b.index,
                txs: batch.txs,
                state: state.clone(),
                summary: Arc::new(summary),
            });
        }
        let finalized = c.finalized().await?;
        self.finalized = finalized;
        self.posted = posted;
        self.pending = state;
        // Receipts whose settlement L1 no longer holds (reverted while we were down) are
        // unbatched again; deposits not yet applied wait for the next batch.
        let live = self.live_roots();
        let back = self.ledger.unpost_except(&live)?;
        if back > 0 {
            tracing::warn!(jobs = back, "receipts of reverted batches queued again");
        }
        let applied = self.pending.meta().deposits;
        self.waiting = self
            .deposits
            .iter()
            .filter(|d| d.seq >= applied)
            .map(QueuedDeposit::tx)
            .collect();
        for tx in &self.waiting {
            self.pending.apply(tx, &self.queue);
        }
        tracing::info!(batches = self.posted.len(), finalized = self.finalized, root = %hex::encode(self.pending.root()), "L2 state rebuilt from L1");
        Ok(())
    }

    fn live_roots(&self) -> HashSet<H256> {
        self.posted
            .iter()
            .flat_map(|p| p.txs.iter())
            .filter_map(|tx| match tx {
                Tx::Settle { receipts_root, .. } => Some(*receipts_root),
                _ => None,
            })
            .collect()
    }

    async fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Submit { tx, reply } => {
                let _ = reply.send(self.submit(tx));
            }
            Command::Slash {
                node,
                amount,
                evidence,
                reply,
            } => {
                let _ = reply.send(self.slash(node, amount, evidence));
            }
            Command::Flush { reply } => {
                let r = async {
                    self.sync().await?;
                    self.post().await
                }
                .await;
                let _ = reply.send(r);
            }
            Command::Account { address, reply } => {
                let view = self.pending.slot_of(&address.0).map(|slot| {
                    let mut delegations: Vec<_> = self
                        .pending
                        .delegations()
                        .filter(|(_, d)| d.delegator == slot)
                        .map(|(s, d)| (s, *d))
                        .collect();
                    delegations.sort_by_key(|(s, _)| *s);
                    AccountView {
                        slot,
                        pending: *self
                            .pending
                            .account(slot)
                            .expect("slot_of names an account"),
                        posted: self
                            .posted
                            .last()
                            .and_then(|p| p.state.account(slot).copied()),
                        final_: self.final_state().and_then(|s| s.account(slot).copied()),
                        delegations,
                        next_delegation: self.pending.meta().next_delegation,
                    }
                });
                let _ = reply.send(view);
            }
            Command::Proof { slot, reply } => {
                let proof = self.final_index().and_then(|i| {
                    let p = self.posted.iter().find(|p| p.index == i)?;
                    Some(FinalProof {
                        batch: i,
                        root: p.state.root(),
                        preimage: p.state.preimage(slot),
                        proof: p.state.tree().prove(slot),
                    })
                });
                let _ = reply.send(proof);
            }
            Command::Statement { address, reply } => {
                let _ = reply.send(self.statement(&address));
            }
            Command::Batches { reply } => {
                let list = self.posted.iter().map(|p| p.summary.clone()).collect();
                let _ = reply.send((list, self.finalized));
            }
            Command::Report {
                address,
                statement,
                reply,
            } => {
                let _ = reply.send(self.report(&address, statement));
            }
            Command::Slots { reply } => {
                let _ = reply.send(self.pending.accounts().map(|(s, a)| (s, *a)).collect());
            }
            Command::Inject(fault) => {
                tracing::warn!(?fault, "fault injected into the next batch");
                self.fault = Some(fault);
            }
            Command::Status { reply } => {
                let _ = reply.send(SequencerStatus {
                    batches: self.posted.len() as u64,
                    finalized: self.finalized,
                    waiting: self.waiting.len(),
                    pending_root: hex::encode(self.pending.root()),
                });
            }
        }
    }

    fn statement(&self, address: &Address) -> Vec<StatementRow> {
        let finals: Vec<&Posted> = self
            .posted
            .iter()
            .filter(|p| p.index < self.finalized)
            .collect();
        let mut rows = Vec::new();
        for (i, p) in finals.iter().enumerate() {
            let epoch = p.state.meta().epoch;
            let last_of_epoch = finals
                .get(i + 1)
                .is_none_or(|next| next.state.meta().epoch != epoch);
            let Some(slot) = p.state.slot_of(&address.0) else {
                continue;
            };
            if !last_of_epoch {
                continue;
            }
            let tree = p.state.tree();
            let mut delegations: Vec<_> = p
                .state
                .delegations()
                .filter(|(_, d)| d.delegator == slot)
                .map(|(s, _)| (s, p.state.preimage(s), tree.prove(s)))
                .collect();
            delegations.sort_by_key(|(s, _, _)| *s);
            rows.push(StatementRow {
                batch: p.index,
                epoch,
                root: p.state.root(),
                slot,
                account: (p.state.preimage(slot), tree.prove(slot)),
                delegations,
            });
        }
        rows
    }

    fn report(&self, address: &Address, statement: bool) -> Option<AccountReport> {
        let slot = self.pending.slot_of(&address.0)?;
        let pending = *self.pending.account(slot)?;
        let accrued_in = |state: &State, d: &tessera_rollup::Delegation| -> u128 {
            let node = state.account(d.node).copied().unwrap_or_default();
            u128::try_from(d.accrued(&node))
                .unwrap_or(u128::MAX)
                .min(node.pool)
        };
        let final_state = self.final_state();
        let mut positions: Vec<Position> = self
            .pending
            .delegations()
            .filter(|(_, d)| d.delegator == slot)
            .map(|(s, d)| Position {
                slot: s,
                node_slot: d.node,
                node: Address(self.pending.account(d.node).map_or([0; 20], |a| a.address)),
                amount: d.amount,
                earned: d.earned,
                accrued: accrued_in(&self.pending, d),
                accrued_final: final_state
                    .and_then(|f| f.delegation(s).map(|fd| accrued_in(f, fd))),
            })
            .collect();
        positions.sort_by_key(|p| p.slot);
        let rows = if statement {
            self.statement(address)
        } else {
            Vec::new()
        }
        .into_iter()
        .filter_map(|row| {
            let p = self.posted.iter().find(|p| p.index == row.batch)?;
            let account = p.state.account(row.slot)?;
            let accrued = row
                .delegations
                .iter()
                .filter_map(|(s, _, _)| p.state.delegation(*s))
                .map(|d| accrued_in(&p.state, d))
                .sum();
            Some(EpochRow {
                earned: account.earned,
                accrued,
                at: row,
            })
        })
        .collect();
        let mut settlements = Vec::new();
        let mut commissions = Vec::new();
        let mut stakes: Vec<StakePoint> = Vec::new();
        for p in &self.posted {
            let is_final = p.index < self.finalized;
            for r in p.summary.settlements.iter().filter(|r| r.node == slot) {
                settlements.push((p.index, is_final, r.clone()));
            }
            for c in p.summary.commissions.iter().filter(|c| c.node == slot) {
                commissions.push((p.index, is_final, *c));
            }
            if let Some(a) = p.state.account(slot) {
                if stakes
                    .last()
                    .is_none_or(|l| (l.stake, l.delegated) != (a.stake, a.delegated))
                {
                    stakes.push(StakePoint {
                        batch: p.index,
                        epoch: p.summary.epoch,
                        final_: is_final,
                        stake: a.stake,
                        delegated: a.delegated,
                    });
                }
            }
        }
        let delegators = self
            .pending
            .delegations()
            .filter(|(_, d)| d.node == slot && d.amount > 0)
            .map(|(_, d)| {
                let who = self
                    .pending
                    .account(d.delegator)
                    .map_or([0; 20], |a| a.address);
                (Address(who), d.amount, d.earned)
            })
            .collect();
        let final_ = self.final_index().and_then(|i| {
            let p = self.posted.iter().find(|p| p.index == i)?;
            let a = *p.state.account(slot)?;
            Some((
                a,
                FinalProof {
                    batch: i,
                    root: p.state.root(),
                    preimage: p.state.preimage(slot),
                    proof: p.state.tree().prove(slot),
                },
            ))
        });
        let cumulative_in = |state: &State| -> Option<u128> {
            let a = state.account(slot)?;
            let accrued: u128 = state
                .delegations()
                .filter(|(_, d)| d.delegator == slot)
                .map(|(_, d)| accrued_in(state, d))
                .sum();
            Some(a.earned + accrued)
        };
        let cumulative = [
            cumulative_in(&self.pending),
            self.posted.last().and_then(|p| cumulative_in(&p.state)),
            final_state.and_then(cumulative_in),
        ];
        Some(AccountReport {
            cumulative,
            slot,
            epoch: self.pending.meta().epoch,
            pending,
            posted: self
                .posted
                .last()
                .and_then(|p| p.state.account(slot).map(|a| (p.index, *a))),
            final_,
            positions,
            rows,
            settlements,
            commissions,
            stakes,
            delegators,
        })
    }

    fn final_index(&self) -> Option<u64> {
        self.finalized.checked_sub(1)
    }

    fn final_state(&self) -> Option<&State> {
        let i = self.final_index()?;
        self.posted.iter().find(|p| p.index == i).map(|p| &p.state)
    }

    /// Checks a signed transaction against the pending state and queues it.
    fn submit(&mut self, tx: Tx) -> Result<(), SequencerError> {
        if !matches!(
            tx,
            Tx::Signed { .. } | Tx::Claim { .. } | Tx::Release { .. }
        ) {
            return Err(SequencerError::Malformed(
                "only signed transactions (withdraw, stake, unstake, delegate, undelegate, set commission), claims and releases can be submitted".into(),
            ));
        }
        let mut trial = self.pending.clone();
        if let Outcome::NoOp(why) = trial.apply(&tx, &self.queue) {
            return Err(SequencerError::Rejected(why));
        }
        // Money leaving an API account's balance: the API must not spend it too.
        if let Tx::Signed { slot, .. } = tx {
            let before = self.pending.account(slot).map_or(0, |a| a.balance);
            let after = trial.account(slot).map_or(0, |a| a.balance);
            if after < before {
                let owner = Address(trial.account(slot).map_or([0; 20], |a| a.address));
                if let Some(account) = self.ledger_account(&owner) {
                    self.ledger.debit(&account, Amount(before - after))?;
                }
            }
        }
        self.pending = trial;
        self.waiting.push(tx);
        Ok(())
    }

    /// A slash the sequencer authors itself (audits), applied to the pending state like a
    /// submitted transaction; refused with the reason when it would be a no-op.
    fn slash(
        &mut self,
        node: Address,
        amount: Amount,
        evidence: [u8; 32],
    ) -> Result<(), SequencerError> {
        // Idempotent by evidence: a coordinator that restarts hands its open disputes'
        // slashes over again, and one already posted or waiting must not apply twice.
        let known = self
            .posted
            .iter()
            .flat_map(|p| &p.txs)
            .chain(&self.waiting)
            .any(|t| matches!(t, Tx::Slash { evidence: e, .. } if *e == evidence));
        if known {
            return Ok(());
        }
        let Some(slot) = self.pending.slot_of(&node.0) else {
            return Err(SequencerError::Rejected("the node has no L2 account"));
        };
        let tx = Tx::Slash {
            node: slot,
            amount: amount.0,
            evidence,
        };
        let mut trial = self.pending.clone();
        if let Outcome::NoOp(why) = trial.apply(&tx, &self.queue) {
            return Err(SequencerError::Rejected(why));
        }
        self.pending = trial;
        self.waiting.push(tx);
        Ok(())
    }

    fn ledger_account(&self, address: &Address) -> Option<String> {
        self.ledger.account_at(address).ok().flatten()
    }

    async fn tick(&mut self) -> Result<(), SequencerError> {
        self.sync().await?;
        if self.last_epoch.elapsed() >= self.config.epoch_interval {
            let next = self.pending.meta().epoch + 1;
            let tx = Tx::Epoch { epoch: next };
            if self.pending.apply(&tx, &self.queue) == Outcome::Applied {
                tracing::info!(epoch = next, "epoch tick queued");
                self.waiting.push(tx);
            }
            self.last_epoch = Instant::now();
        }
        let unbatched = self.ledger.unbatched()?.len();
        let due = self.last_post.elapsed() >= self.config.batch_interval
            || self.waiting.len() + unbatched >= self.config.max_batch;
        if due && (!self.waiting.is_empty() || unbatched > 0) {
            self.post().await?;
        }
        Ok(())
    }

    /// Reads L1: deposits, reverts, finality.
    async fn sync(&mut self) -> Result<(), SequencerError> {
        let fresh = self.sync_deposits().await?;
        for d in fresh {
            let tx = d.tx();
            self.pending.apply(&tx, &self.queue);
            self.waiting.push(tx);
        }
        let c = self.contracts();
        let count = c.batch_count().await?;
        let finalized = c.finalized().await?;
        if count < self.posted.len() as u64 {
            self.rewind(count)?;
        }
        self.finalized = finalized;
        self.finalize_if_due().await;
        Ok(())
    }

    /// New L1 deposits, credited to linked API accounts once.
    async fn sync_deposits(&mut self) -> Result<Vec<QueuedDeposit>, SequencerError> {
        let all = self.contracts().deposits().await?;
        let fresh: Vec<QueuedDeposit> = all.into_iter().skip(self.deposits.len()).collect();
        for d in &fresh {
            let credited =
                self.ledger
                    .credit_deposit(d.seq, &Address(d.account.0 .0), Amount(d.amount))?;
            if let Some(account) = credited {
                tracing::info!(seq = d.seq, %account, amount = d.amount, "deposit credited");
            }
            self.queue.push(d.hash());
            self.deposits.push(d.clone());
        }
        Ok(fresh)
    }

    /// L1 reverted our batches from `count` on: their transactions wait again (their
    /// settlements come back as unbatched receipts) and the pending state is rebuilt.
    fn rewind(&mut self, count: u64) -> Result<(), SequencerError> {
        let gone = self.posted.split_off(count as usize);
        tracing::warn!(
            from = count,
            batches = gone.len(),
            "batches reverted on L1; posting them again"
        );
        let mut again: Vec<Tx> = gone
            .into_iter()
            .flat_map(|p| p.txs)
            .filter(|tx| !matches!(tx, Tx::Settle { .. }))
            .collect();
        again.append(&mut self.waiting);
        self.waiting = again;
        let live = self.live_roots();
        self.ledger.unpost_except(&live)?;
        let mut state = self
            .posted
            .last()
            .map_or_else(|| self.genesis.clone(), |p| p.state.clone());
        for tx in &self.waiting {
            state.apply(tx, &self.queue);
        }
        self.pending = state;
        Ok(())
    }

    async fn finalize_if_due(&mut self) {
        let next = self.finalized;
        if !self.posted.iter().any(|p| p.index == next) {
            return;
        }
        let c = self.contracts();
        let (Ok(record), Ok((_, now))) = (c.batch(next).await, self.l1.chain.head().await) else {
            return;
        };
        if now >= record.submitted_at + self.window() {
            match c.finalize(&self.l1.operator).await {
                Ok(_) => {
                    if let Ok(f) = c.finalized().await {
                        tracing::info!(finalized = f, "batches final");
                        self.finalized = f;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "finalize failed"),
            }
        }
    }

    fn window(&self) -> u64 {
        self.l1.deployment.params.challenge_window
    }

    /// Builds and posts one batch from what waits; returns its index.
    async fn post(&mut self) -> Result<Option<u64>, SequencerError> {
        let base = self
            .posted
            .last()
            .map_or_else(|| self.genesis.clone(), |p| p.state.clone());
        let take = self.waiting.len().min(self.config.max_batch);
        let mut txs: Vec<Tx> = self.waiting[..take].to_vec();
        let mut state = base.clone();
        for tx in &txs {
            state.apply(tx, &self.queue);
        }
        let settled = self
            .settlements(&mut state, self.config.max_batch - take)
            .await?;
        txs.extend(settled.iter().map(|(tx, _, _)| tx.clone()));
        if txs.is_empty() {
            return Ok(None);
        }
        let mut s = base.clone();
        let mut batch = Batch::build(&mut s, txs, &self.queue);
        if self.fault.take() == Some(Fault::WrongRoot) {
            if let Some(last) = batch.roots.last_mut() {
                last[31] ^= 1;
            }
            tracing::warn!("fault injection: posting a batch with a wrong last root");
        }
        // A challenge slashed the bond: top it up before posting again.
        ensure_bond(&self.l1, self.l1.deployment.params.min_bond).await?;
        // The receipts are marked posted before the batch goes out: if the process dies
        // in between, the next start finds their root on no standing batch and queues
        // them again, so a receipt is never settled twice nor lost.
        for (_, root, jobs) in &settled {
            self.ledger.mark_posted(root, jobs)?;
        }
        let submitted = self
            .contracts()
            .submit_batch(&self.l1.operator, &batch)
            .await;
        let (index, receipt) = match submitted {
            Ok(ok) => ok,
            Err(e) => {
                self.ledger.unpost_except(&self.live_roots())?;
                return Err(e.into());
            }
        };
        tracing::info!(
            index,
            txs = batch.txs.len(),
            settlements = settled.len(),
            gas = receipt.gas_used,
            "batch posted"
        );
        self.waiting.drain(..take);
        let summary = summarize(index, &mut base.clone(), &batch.txs, &self.queue);
        let mut pending = s.clone();
        for tx in &self.waiting {
            pending.apply(tx, &self.queue);
        }
        self.pending = pending;
        self.posted.push(Posted {
            index,
            txs: batch.txs,
            state: s,
            summary: Arc::new(summary),
        });
        self.last_post = Instant::now();
        Ok(Some(index))
    }

    /// One settlement per (payer, node) for the receipts waiting, applied to `state`;
    /// at most `room`. Receipts whose payer or node has no L2 account yet wait (a node's
    /// payout address is registered on L1 by a zero deposit).
    async fn settlements(
        &mut self,
        state: &mut State,
        room: usize,
    ) -> Result<Vec<(Tx, H256, Vec<Unbatched>)>, SequencerError> {
        let mut groups: BTreeMap<(u32, u32), Vec<Unbatched>> = BTreeMap::new();
        let mut links: BTreeMap<String, Option<Address>> = BTreeMap::new();
        for u in self.ledger.unbatched()? {
            let payer = match links.get(&u.account) {
                Some(a) => *a,
                None => {
                    let a = self.ledger.address_of(&u.account)?;
                    links.insert(u.account.clone(), a);
                    a
                }
            };
            let Some(payer) = payer.and_then(|a| state.slot_of(&a.0)) else {
                tracing::debug!(job = %u.job, account = %u.account, "payer has no L2 account (not linked to a deposit address); receipt waits");
                continue;
            };
            let Some(node) = state.slot_of(&u.payout) else {
                self.register(Address(u.payout)).await;
                continue;
            };
            groups.entry((payer, node)).or_default().push(u);
        }
        let mut out = Vec::new();
        for ((payer, node), jobs) in groups.into_iter().take(room) {
            let amount: u128 = jobs.iter().map(|j| j.cost).sum();
            let receipts_root = receipts_root(&jobs);
            let tx = Tx::Settle {
                payer,
                node,
                amount,
                receipts_root,
            };
            match state.apply(&tx, &self.queue) {
                Outcome::Applied => out.push((tx, receipts_root, jobs)),
                Outcome::NoOp(why) => {
                    tracing::error!(
                        payer,
                        node,
                        amount,
                        why,
                        "a settlement does not apply; its receipts wait"
                    )
                }
            }
        }
        Ok(out)
    }

    /// Gives a node's payout address an L2 account: a zero deposit on L1, once.
    async fn register(&mut self, payout: Address) {
        if !self.registering.insert(payout) {
            return;
        }
        let to = EvmAddress::from(payout.0);
        match self.contracts().deposit(&self.l1.operator, to, 0).await {
            Ok((q, _)) => {
                tracing::info!(payout = %payout, slot = q.slot, "node payout address registered on L1")
            }
            Err(e) => {
                self.registering.remove(&payout);
                tracing::warn!(payout = %payout, error = %e, "registering a payout address failed");
            }
        }
    }
}

/// The levels of the binary keccak256 Merkle tree over the receipts' leaves (padded with
/// zero leaves to a power of two), from the leaves up to the root.
fn receipt_levels(jobs: &[Unbatched]) -> Vec<Vec<H256>> {
    let mut level: Vec<H256> = jobs.iter().map(|j| j.leaf).collect();
    let width = level.len().max(1).next_power_of_two();
    level.resize(width, [0; 32]);
    let mut levels = vec![level];
    while let Some(last) = levels.last().filter(|l| l.len() > 1) {
        let up = last
            .chunks(2)
            .map(|p| tessera_rollup::hash_pair(&p[0], &p[1]))
            .collect();
        levels.push(up);
    }
    levels
}

/// The binary keccak256 Merkle root of the receipts' leaves (padded with zero leaves to
/// a power of two), as a settlement carries it.
pub fn receipts_root(jobs: &[Unbatched]) -> H256 {
    receipt_levels(jobs)
        .last()
        .and_then(|l| l.first())
        .copied()
        .unwrap_or([0; 32])
}

/// The siblings from leaf `index` up to [`receipts_root`], so one receipt is provable
/// under the root its settlement carries.
pub fn receipts_path(jobs: &[Unbatched], index: usize) -> Vec<H256> {
    let levels = receipt_levels(jobs);
    levels[..levels.len() - 1]
        .iter()
        .enumerate()
        .map(|(h, level)| level[(index >> h) ^ 1])
        .collect()
}

/// Posts the sequencer's bond if it holds less than the contract's minimum (devnet and
/// first start).
pub async fn ensure_bond(l1: &L1Setup, min: U256) -> Result<(), ContractError> {
    let c = Contracts::new(&l1.chain, &l1.deployment);
    let bond = c.bond().await?;
    if bond < min {
        c.post_bond(&l1.operator, min - bond).await?;
    }
    Ok(())
}

/// The root a receipt leaf at `index` with `path` proves (what a verifier recomputes).
pub fn receipts_root_from_path(leaf: &H256, index: usize, path: &[H256]) -> H256 {
    let mut h = *leaf;
    let mut i = index;
    for s in path {
        h = if i.is_multiple_of(2) {
            tessera_rollup::hash_pair(&h, s)
        } else {
            tessera_rollup::hash_pair(s, &h)
        };
        i /= 2;
    }
    h
}

#[cfg(test)]
mod receipt_path_tests {
    use super::*;
    use tessera_protocol::JobId;

    fn jobs(n: u8) -> Vec<Unbatched> {
        (0..n)
            .map(|i| Unbatched {
                job: JobId([i; 16]),
                account: "a".into(),
                cost: 1,
                payout: [0; 20],
                leaf: tessera_rollup::keccak256(&[i]),
            })
            .collect()
    }

    #[test]
    fn every_receipt_proves_under_its_settlements_root_and_a_changed_leaf_does_not() {
        for n in [1u8, 2, 3, 5, 8] {
            let jobs = jobs(n);
            let root = receipts_root(&jobs);
            for (i, j) in jobs.iter().enumerate() {
                let path = receipts_path(&jobs, i);
                assert_eq!(
                    receipts_root_from_path(&j.leaf, i, &path),
                    root,
                    "n {n} i {i}"
                );
                let mut bad = j.leaf;
                bad[0] ^= 1;
                assert_ne!(receipts_root_from_path(&bad, i, &path), root);
                if n > 1 {
                    assert_ne!(receipts_root_from_path(&j.leaf, i ^ 1, &path), root);
                }
            }
        }
    }
}
