//! Typed use of the deployed contracts over any [`L1`]: deploy, deposit, post and
//! challenge batches, finalize, withdraw, and read what a sequencer, a watchtower or a
//! wallet needs back (deposit queue, posted batches and their data).

use crate::bindings::{Settlement, StepVerifier, TesseraToken};
use crate::chain::{ChainError, Receipt, L1};
use alloy::primitives::{keccak256, Address, Bytes, B256, U256};
use alloy::signers::local::PrivateKeySigner;
use alloy::sol_types::{SolCall, SolConstructor, SolError, SolEvent, SolInterface};
use tessera_rollup::{Batch, FraudProof, MerkleProof, State, Witness, H256};

/// Settlement parameters fixed at deployment.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Params {
    /// Seconds a batch can be challenged.
    pub challenge_window: u64,
    /// Seconds without a batch before the escape hatch may open (> the window).
    pub escape_delay: u64,
    /// Wei the sequencer must keep bonded to post.
    pub min_bond: U256,
    /// Wei a challenger puts up.
    pub challenge_bond: U256,
    /// L2 protocol fee in basis points.
    pub fee_bps: u16,
    /// L2 epochs before unstaked tokens are spendable.
    pub unbonding_epochs: u16,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            challenge_window: 600,
            escape_delay: 7 * 24 * 3600,
            min_bond: U256::from(10u128.pow(18)),
            challenge_bond: U256::from(10u128.pow(17)),
            fee_bps: 100,
            unbonding_epochs: 2,
        }
    }
}

/// Where the contracts live and what binds signatures to them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Deployment {
    /// Chain id.
    pub chain_id: u64,
    /// The ERC-20.
    pub token: Address,
    /// The one-step verifier.
    pub verifier: Address,
    /// The settlement contract.
    pub settlement: Address,
    /// `keccak256("tessera/domain/1" ‖ chain id ‖ settlement)`.
    pub domain: B256,
    /// The L2 genesis root.
    pub genesis_root: B256,
    /// Block of the deployment (log scans start here).
    pub block: u64,
    /// What it was deployed with.
    pub params: Params,
    /// Owner of the L2 protocol fee account.
    pub fee_owner: Address,
}

impl Deployment {
    /// The L2 genesis state this deployment starts from (its root is `genesis_root`).
    pub fn genesis(&self) -> State {
        State::genesis(
            self.domain.0,
            self.params.fee_bps,
            self.params.unbonding_epochs,
            self.fee_owner.0 .0,
        )
    }
}

/// Why a contract operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ContractError {
    /// The chain failed.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// The contract reverted; says which error.
    #[error("{contract} reverted: {reason}")]
    Reverted {
        /// Which contract.
        contract: &'static str,
        /// The decoded custom error, or the raw data.
        reason: String,
    },
    /// An answer did not decode.
    #[error("undecodable answer from {0}")]
    Decode(&'static str),
}

/// The deployment domain as the contract computes it.
pub fn domain(chain_id: u64, settlement: Address) -> B256 {
    let mut b = Vec::with_capacity(16 + 32 + 20);
    b.extend_from_slice(b"tessera/domain/1");
    b.extend_from_slice(&U256::from(chain_id).to_be_bytes::<32>());
    b.extend_from_slice(settlement.as_slice());
    keccak256(&b)
}

fn reverted(contract: &'static str, data: &[u8]) -> ContractError {
    let reason = if let Ok(e) = Settlement::SettlementErrors::abi_decode(data) {
        format!("{e:?}")
    } else if let Ok(e) = StepVerifier::StepVerifierErrors::abi_decode(data) {
        format!("{e:?}")
    } else if let Ok(e) = TesseraToken::TesseraTokenErrors::abi_decode(data) {
        format!("{e:?}")
    } else if data.len() >= 4 && data[..4] == [0x08, 0xc3, 0x79, 0xa0] {
        alloy::sol_types::Revert::abi_decode(data)
            .map(|r| r.reason)
            .unwrap_or_else(|_| format!("0x{}", hex::encode(data)))
    } else {
        format!("0x{}", hex::encode(data))
    };
    ContractError::Reverted { contract, reason }
}

async fn send<L: L1>(
    chain: &L,
    from: &PrivateKeySigner,
    contract: &'static str,
    to: Option<Address>,
    input: Vec<u8>,
    value: U256,
) -> Result<Receipt, ContractError> {
    match chain.send(from, to, input.into(), value).await {
        Ok(r) if r.success => Ok(r),
        Ok(r) => Err(reverted(contract, &r.revert)),
        Err(ChainError::Reverted(data)) => Err(reverted(contract, &data)),
        Err(e) => Err(e.into()),
    }
}

async fn view<L: L1, C: SolCall>(
    chain: &L,
    contract: &'static str,
    to: Address,
    call: C,
) -> Result<C::Return, ContractError> {
    let out = match chain.call(to, call.abi_encode().into()).await {
        Ok(out) => out,
        Err(ChainError::Reverted(data)) => return Err(reverted(contract, &data)),
        Err(e) => return Err(e.into()),
    };
    C::abi_decode_returns(&out).map_err(|_| ContractError::Decode(contract))
}

/// Deploys the token, the verifier and the settlement contract from `deployer` (who
/// owns the token's faucet), with `sequencer` as the only batch poster and the L2
/// genesis of `params` with `fee_owner` as the protocol fee's account.
pub async fn deploy<L: L1>(
    chain: &L,
    deployer: &PrivateKeySigner,
    sequencer: Address,
    fee_owner: Address,
    params: &Params,
) -> Result<Deployment, ContractError> {
    let create = |code: &Bytes, args: Vec<u8>| {
        let mut input = code.to_vec();
        input.extend_from_slice(&args);
        input
    };
    let token = send(
        chain,
        deployer,
        "TesseraToken",
        None,
        create(&TesseraToken::BYTECODE, vec![]),
        U256::ZERO,
    )
    .await?;
    let verifier = send(
        chain,
        deployer,
        "StepVerifier",
        None,
        create(&StepVerifier::BYTECODE, vec![]),
        U256::ZERO,
    )
    .await?;
    let (token, verifier) = (
        token
            .contract
            .ok_or(ContractError::Decode("TesseraToken"))?,
        verifier
            .contract
            .ok_or(ContractError::Decode("StepVerifier"))?,
    );
    let genesis = State::genesis(
        [0; 32],
        params.fee_bps,
        params.unbonding_epochs,
        fee_owner.0 .0,
    )
    .root();
    let args = Settlement::constructorCall {
        token_: token,
        verifier_: verifier,
        sequencer_: sequencer,
        genesisRoot_: genesis.into(),
        challengeWindow_: params.challenge_window,
        escapeDelay_: params.escape_delay,
        minBond_: params.min_bond,
        challengeBond_: params.challenge_bond,
    }
    .abi_encode();
    let r = send(
        chain,
        deployer,
        "Settlement",
        None,
        create(&Settlement::BYTECODE, args),
        U256::ZERO,
    )
    .await?;
    let settlement = r.contract.ok_or(ContractError::Decode("Settlement"))?;
    let d = Deployment {
        chain_id: chain.chain_id(),
        token,
        verifier,
        settlement,
        domain: domain(chain.chain_id(), settlement),
        genesis_root: genesis.into(),
        block: r.block,
        params: params.clone(),
        fee_owner,
    };
    let on_chain = view(chain, "Settlement", settlement, Settlement::domainCall {}).await?;
    if on_chain != d.domain {
        return Err(ContractError::Decode(
            "Settlement.domain differs from the Rust computation",
        ));
    }
    Ok(d)
}

/// A deposit as L1 queued it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueuedDeposit {
    /// Queue position.
    pub seq: u64,
    /// The account slot L1 assigned.
    pub slot: u32,
    /// The credited address.
    pub account: Address,
    /// Base units.
    pub amount: u128,
    /// Block it was queued in.
    pub block: u64,
}

impl QueuedDeposit {
    /// The L2 transaction that applies it.
    pub fn tx(&self) -> tessera_rollup::Tx {
        tessera_rollup::Tx::Deposit {
            seq: self.seq,
            slot: self.slot,
            address: self.account.0 .0,
            amount: self.amount,
        }
    }

    /// The hash L1 stores for it.
    pub fn hash(&self) -> H256 {
        tessera_rollup::deposit_hash(self.slot, &self.account.0 .0, self.amount)
    }
}

/// A batch as posted, with where its data is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PostedBatch {
    /// Its index.
    pub index: u64,
    /// The root it starts from.
    pub prev_root: B256,
    /// The root after it.
    pub root: B256,
    /// The steps commitment.
    pub steps: B256,
    /// Transactions.
    pub count: u64,
    /// The L1 transaction that posted it.
    pub tx: B256,
    /// Its block.
    pub block: u64,
}

/// A challenge of a batch, from the contract's events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChallengeRecord {
    /// The batch challenged.
    pub index: u64,
    /// The step named.
    pub step: u32,
    /// Who sent it.
    pub challenger: Address,
    /// Whether the batch was found wrong (and reverted).
    pub upheld: bool,
    /// The L1 transaction.
    pub tx: B256,
    /// Its block.
    pub block: u64,
}

/// A batch's on-chain record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchRecord {
    /// The root after it.
    pub root: B256,
    /// The steps commitment.
    pub steps: B256,
    /// When it was posted (L1 seconds).
    pub submitted_at: u64,
    /// Transactions.
    pub count: u32,
}

/// What a challenge did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChallengeOutcome {
    /// The batch was wrong: reverted with its successors; the challenger got `reward`.
    Upheld {
        /// Wei paid to the challenger besides its bond back.
        reward: U256,
        /// The root the step should have had.
        correct_root: B256,
    },
    /// The batch was right: the challenger's bond went to the sequencer.
    Failed,
}

/// The settlement contracts of one deployment on one chain.
pub struct Contracts<'a, L: L1> {
    /// The chain.
    pub chain: &'a L,
    /// The deployment.
    pub d: &'a Deployment,
}

impl<'a, L: L1> Contracts<'a, L> {
    /// Binds a deployment.
    pub fn new(chain: &'a L, d: &'a Deployment) -> Self {
        Self { chain, d }
    }

    /// Sends `input` to the settlement contract with `value` wei.
    async fn settlement_tx(
        &self,
        from: &PrivateKeySigner,
        input: Vec<u8>,
        value: U256,
    ) -> Result<Receipt, ContractError> {
        send(
            self.chain,
            from,
            "Settlement",
            Some(self.d.settlement),
            input,
            value,
        )
        .await
    }

    /// A read-only call to the settlement contract.
    async fn settlement_view<C: SolCall>(&self, call: C) -> Result<C::Return, ContractError> {
        view(self.chain, "Settlement", self.d.settlement, call).await
    }

    /// Mints devnet tokens (the token owner only).
    pub async fn mint(
        &self,
        owner: &PrivateKeySigner,
        to: Address,
        amount: U256,
    ) -> Result<Receipt, ContractError> {
        let input = TesseraToken::mintCall { to, value: amount }.abi_encode();
        send(
            self.chain,
            owner,
            "TesseraToken",
            Some(self.d.token),
            input,
            U256::ZERO,
        )
        .await
    }

    /// Token balance on L1.
    pub async fn token_balance(&self, who: Address) -> Result<U256, ContractError> {
        view(
            self.chain,
            "TesseraToken",
            self.d.token,
            TesseraToken::balanceOfCall::new((who,)),
        )
        .await
    }

    /// Approves the settlement contract and deposits `amount` for `account`; returns the
    /// queued deposit and the deposit transaction's receipt.
    pub async fn deposit(
        &self,
        from: &PrivateKeySigner,
        account: Address,
        amount: u128,
    ) -> Result<(QueuedDeposit, Receipt), ContractError> {
        if amount > 0 {
            let approve = TesseraToken::approveCall {
                spender: self.d.settlement,
                value: U256::from(amount),
            }
            .abi_encode();
            send(
                self.chain,
                from,
                "TesseraToken",
                Some(self.d.token),
                approve,
                U256::ZERO,
            )
            .await?;
        }
        let input = Settlement::depositCall {
            account,
            amount: U256::from(amount),
        }
        .abi_encode();
        let r = self.settlement_tx(from, input, U256::ZERO).await?;
        let event = r
            .logs
            .iter()
            .find_map(|l| Settlement::Deposited::decode_log(l).ok())
            .ok_or(ContractError::Decode("Settlement.Deposited"))?;
        let q = QueuedDeposit {
            seq: event.seq,
            slot: event.slot,
            account: event.account,
            amount: u128::try_from(event.amount)
                .map_err(|_| ContractError::Decode("deposit amount"))?,
            block: r.block,
        };
        Ok((q, r))
    }

    /// Every deposit L1 has queued, in order.
    pub async fn deposits(&self) -> Result<Vec<QueuedDeposit>, ContractError> {
        let logs = self.chain.logs(self.d.settlement, self.d.block).await?;
        let mut out = Vec::new();
        for l in logs {
            if let Ok(e) = Settlement::Deposited::decode_log(&l.log) {
                out.push(QueuedDeposit {
                    seq: e.seq,
                    slot: e.slot,
                    account: e.account,
                    amount: u128::try_from(e.amount)
                        .map_err(|_| ContractError::Decode("deposit amount"))?,
                    block: l.block,
                });
            }
        }
        out.sort_by_key(|d| d.seq);
        Ok(out)
    }

    /// Adds wei to the sequencer's bond.
    pub async fn post_bond(
        &self,
        from: &PrivateKeySigner,
        wei: U256,
    ) -> Result<Receipt, ContractError> {
        let input = Settlement::postBondCall {}.abi_encode();
        self.settlement_tx(from, input, wei).await
    }

    /// Posts a batch; returns its index and the receipt.
    pub async fn submit_batch(
        &self,
        from: &PrivateKeySigner,
        batch: &Batch,
    ) -> Result<(u64, Receipt), ContractError> {
        let input = Settlement::submitBatchCall {
            prevRoot: batch.prev_root.into(),
            txs: batch.data().into(),
            roots: batch.roots.iter().map(|r| B256::from(*r)).collect(),
        }
        .abi_encode();
        let r = self.settlement_tx(from, input, U256::ZERO).await?;
        let e = r
            .logs
            .iter()
            .find_map(|l| Settlement::BatchSubmitted::decode_log(l).ok())
            .ok_or(ContractError::Decode("Settlement.BatchSubmitted"))?;
        Ok((e.index.to::<u64>(), r))
    }

    /// Batches posted since deployment, in order, including ones later reverted (a
    /// later post at the same index supersedes an earlier one).
    pub async fn posted_batches(&self) -> Result<Vec<PostedBatch>, ContractError> {
        let logs = self.chain.logs(self.d.settlement, self.d.block).await?;
        let mut out: Vec<PostedBatch> = Vec::new();
        for l in logs {
            if let Ok(e) = Settlement::BatchSubmitted::decode_log(&l.log) {
                let index = e.index.to::<u64>();
                out.retain(|b| b.index < index);
                out.push(PostedBatch {
                    index,
                    prev_root: e.prevRoot,
                    root: e.root,
                    steps: e.steps,
                    count: e.count.to::<u64>(),
                    tx: l.tx,
                    block: l.block,
                });
            } else if let Ok(e) = Settlement::BatchesReverted::decode_log(&l.log) {
                let from = e.fromIndex.to::<u64>();
                out.retain(|b| b.index < from);
            }
        }
        Ok(out)
    }

    /// Every challenge sent, upheld or not, oldest first.
    pub async fn challenges(&self) -> Result<Vec<ChallengeRecord>, ContractError> {
        let logs = self.chain.logs(self.d.settlement, self.d.block).await?;
        let mut out = Vec::new();
        for l in logs {
            if let Ok(e) = Settlement::Challenged::decode_log(&l.log) {
                out.push(ChallengeRecord {
                    index: e.index.to::<u64>(),
                    step: e.step,
                    challenger: e.challenger,
                    upheld: true,
                    tx: l.tx,
                    block: l.block,
                });
            } else if let Ok(e) = Settlement::ChallengeFailed::decode_log(&l.log) {
                out.push(ChallengeRecord {
                    index: e.index.to::<u64>(),
                    step: e.step,
                    challenger: e.challenger,
                    upheld: false,
                    tx: l.tx,
                    block: l.block,
                });
            }
        }
        Ok(out)
    }

    /// Reads a posted batch's transactions and roots back from its L1 calldata.
    pub async fn batch_data(&self, posted: &PostedBatch) -> Result<Batch, ContractError> {
        let input = self.chain.tx_input(posted.tx).await?;
        let call = Settlement::submitBatchCall::abi_decode(&input)
            .map_err(|_| ContractError::Decode("submitBatch calldata"))?;
        Batch::from_posted(
            call.prevRoot.0,
            &call.txs,
            call.roots.iter().map(|r| r.0).collect(),
        )
        .map_err(|_| ContractError::Decode("batch data"))
    }

    /// Batch `index`'s on-chain record.
    pub async fn batch(&self, index: u64) -> Result<BatchRecord, ContractError> {
        let b = self
            .settlement_view(Settlement::batchCall {
                index: U256::from(index),
            })
            .await?;
        Ok(BatchRecord {
            root: b.root,
            steps: b.steps,
            submitted_at: b.submittedAt,
            count: b.count,
        })
    }

    /// Batches posted and not reverted.
    pub async fn batch_count(&self) -> Result<u64, ContractError> {
        self.settlement_view(Settlement::batchCountCall {}).await
    }

    /// Batches final so far (as last recorded by `finalize`).
    pub async fn finalized(&self) -> Result<u64, ContractError> {
        self.settlement_view(Settlement::finalizedCall {}).await
    }

    /// The sequencer's bond.
    pub async fn bond(&self) -> Result<U256, ContractError> {
        self.settlement_view(Settlement::bondCall {}).await
    }

    /// The cumulative withdrawal L1 has paid to `slot`.
    pub async fn paid(&self, slot: u32) -> Result<U256, ContractError> {
        self.settlement_view(Settlement::paidCall::new((slot,)))
            .await
    }

    /// The slot L1 assigned to `account` (0: none).
    pub async fn slot_of(&self, account: Address) -> Result<u32, ContractError> {
        self.settlement_view(Settlement::slotOfCall::new((account,)))
            .await
    }

    /// Marks batches past their window final.
    pub async fn finalize(&self, from: &PrivateKeySigner) -> Result<Receipt, ContractError> {
        let input = Settlement::finalizeCall {}.abi_encode();
        self.settlement_tx(from, input, U256::ZERO).await
    }

    /// Challenges batch `index` with a fraud proof, putting up the challenge bond.
    pub async fn challenge(
        &self,
        from: &PrivateKeySigner,
        index: u64,
        proof: &FraudProof,
        bond: U256,
    ) -> Result<(ChallengeOutcome, Receipt), ContractError> {
        let input = Settlement::challengeCall {
            index: U256::from(index),
            step: Settlement::Step {
                index: proof.step,
                txData: proof.tx.clone().into(),
                preRoot: proof.pre_root.into(),
                postRoot: proof.post_root.into(),
                path: proof.step_path.iter().map(|h| B256::from(*h)).collect(),
            },
            witnesses: proof.witnesses.iter().map(settlement_witness).collect(),
        }
        .abi_encode();
        let r = self.settlement_tx(from, input, bond).await?;
        for l in &r.logs {
            if let Ok(e) = Settlement::Challenged::decode_log(l) {
                return Ok((
                    ChallengeOutcome::Upheld {
                        reward: e.reward,
                        correct_root: e.correctRoot,
                    },
                    r,
                ));
            }
            if Settlement::ChallengeFailed::decode_log(l).is_ok() {
                return Ok((ChallengeOutcome::Failed, r));
            }
        }
        Err(ContractError::Decode("Settlement challenge events"))
    }

    /// Pays `slot`'s unpaid withdrawals against final batch `index`, where the account's
    /// leaf is `preimage` with `proof`.
    pub async fn withdraw(
        &self,
        from: &PrivateKeySigner,
        index: u64,
        slot: u32,
        preimage: Vec<u8>,
        proof: &MerkleProof,
    ) -> Result<Receipt, ContractError> {
        let leaf = settlement_witness(&Witness {
            slot,
            preimage,
            proof: proof.clone(),
        });
        let input = Settlement::withdrawCall {
            index: U256::from(index),
            leaf,
        }
        .abi_encode();
        self.settlement_tx(from, input, U256::ZERO).await
    }

    /// Opens the escape hatch (anyone, once no batch was posted for the escape delay).
    pub async fn open_escape(&self, from: &PrivateKeySigner) -> Result<Receipt, ContractError> {
        let input = Settlement::openEscapeCall {}.abi_encode();
        self.settlement_tx(from, input, U256::ZERO).await
    }

    /// After escape: pays an account what the escape root holds for it.
    pub async fn exit_account(
        &self,
        from: &PrivateKeySigner,
        leaf: &Witness,
    ) -> Result<Receipt, ContractError> {
        let input = Settlement::exitAccountCall {
            leaf: settlement_witness(leaf),
        }
        .abi_encode();
        self.settlement_tx(from, input, U256::ZERO).await
    }

    /// After escape: pays a delegation and its share of the node's pool.
    pub async fn exit_delegation(
        &self,
        from: &PrivateKeySigner,
        delegation: &Witness,
        node: &Witness,
        delegator: &Witness,
    ) -> Result<Receipt, ContractError> {
        let input = Settlement::exitDelegationCall {
            delegation: settlement_witness(delegation),
            node: settlement_witness(node),
            delegator: settlement_witness(delegator),
        }
        .abi_encode();
        self.settlement_tx(from, input, U256::ZERO).await
    }

    /// After escape: refunds a queued deposit the escape root never applied (`meta` is
    /// the meta leaf at that root).
    pub async fn refund_deposit(
        &self,
        from: &PrivateKeySigner,
        deposit: &QueuedDeposit,
        meta: &Witness,
    ) -> Result<Receipt, ContractError> {
        let input = Settlement::refundDepositCall {
            seq: deposit.seq,
            slot: deposit.slot,
            account: deposit.account,
            amount: deposit.amount,
            meta: settlement_witness(meta),
        }
        .abi_encode();
        self.settlement_tx(from, input, U256::ZERO).await
    }

    /// Re-executes one step in the verifier contract (a view): the root it computes.
    pub async fn execute_step(
        &self,
        pre_root: H256,
        tx: &[u8],
        witnesses: &[Witness],
        queued_deposit: H256,
    ) -> Result<B256, ContractError> {
        let call = StepVerifier::executeCall {
            domain: self.d.domain,
            preRoot: pre_root.into(),
            txData: tx.to_vec().into(),
            witnesses: witnesses.iter().map(verifier_witness).collect(),
            queuedDeposit: queued_deposit.into(),
        };
        view(self.chain, "StepVerifier", self.d.verifier, call).await
    }
}

fn settlement_witness(w: &Witness) -> Settlement::Witness {
    Settlement::Witness {
        slot: w.slot,
        preimage: w.preimage.clone().into(),
        bitmap: w.proof.bitmap,
        siblings: w.proof.siblings.iter().map(|h| B256::from(*h)).collect(),
    }
}

fn verifier_witness(w: &Witness) -> StepVerifier::Witness {
    StepVerifier::Witness {
        slot: w.slot,
        preimage: w.preimage.clone().into(),
        bitmap: w.proof.bitmap,
        siblings: w.proof.siblings.iter().map(|h| B256::from(*h)).collect(),
    }
}
