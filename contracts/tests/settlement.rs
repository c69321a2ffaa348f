//! The settlement contract on the embedded chain: deposit → L2 → batch → window →
//! withdraw, the fraud proof, and every refusal the issue names.

use alloy::primitives::{Address, U256};
use alloy::signers::local::PrivateKeySigner;
use tessera_contracts::{
    deploy, ChallengeOutcome, ContractError, Contracts, Deployment, EmbeddedChain, Params, L1,
};
use tessera_rollup::{
    Action, Batch, FraudProof, Outcome, State, Tx, Witness, DELEGATION_BASE, H256,
};

fn key(n: u8) -> k256::ecdsa::SigningKey {
    k256::ecdsa::SigningKey::from_bytes(&[n; 32].into()).expect("key")
}

fn wallet(n: u8) -> PrivateKeySigner {
    PrivateKeySigner::from_signing_key(key(n))
}

const ETH: u128 = 1_000_000_000_000_000_000;
const DEPLOYER: u8 = 100;
const SEQUENCER: u8 = 101;
const CHALLENGER: u8 = 102;
const DEV: u8 = 1;
const NODE: u8 = 2;
const HOLDER: u8 = 3;

struct Net {
    chain: EmbeddedChain,
    d: Deployment,
    params: Params,
    /// The sequencer's L2 state and what it has read of the L1 queue.
    state: State,
    queue: Vec<H256>,
}

impl Net {
    async fn new() -> Net {
        let chain = EmbeddedChain::in_memory();
        for n in [SEQUENCER, CHALLENGER] {
            chain
                .fund(wallet(n).address(), U256::from(100 * ETH))
                .expect("fund");
        }
        let params = Params {
            challenge_window: 600,
            escape_delay: 3_600,
            min_bond: U256::from(ETH),
            challenge_bond: U256::from(ETH / 10),
            fee_bps: 100,
            unbonding_epochs: 1,
        };
        let d = deploy(
            &chain,
            &wallet(DEPLOYER),
            wallet(SEQUENCER).address(),
            Address::repeat_byte(0xfe),
            &params,
        )
        .await
        .expect("deploy");
        let state = State::genesis(
            d.domain.0,
            params.fee_bps,
            params.unbonding_epochs,
            [0xfe; 20],
        );
        assert_eq!(state.root(), d.genesis_root.0);
        Net {
            chain,
            d,
            params,
            state,
            queue: Vec::new(),
        }
    }

    fn c(&self) -> Contracts<'_, EmbeddedChain> {
        Contracts::new(&self.chain, &self.d)
    }

    /// Mints and deposits for key `n`; returns the L2 deposit transaction.
    async fn deposit(&mut self, n: u8, amount: u128) -> Tx {
        let who = wallet(n);
        self.c()
            .mint(&wallet(DEPLOYER), who.address(), U256::from(amount))
            .await
            .expect("mint");
        let (q, _) = self
            .c()
            .deposit(&who, who.address(), amount)
            .await
            .expect("deposit");
        self.queue.push(q.hash());
        q.tx()
    }

    fn slot(&self, n: u8) -> u32 {
        self.state.slot_of(&wallet(n).address().0 .0).expect("slot")
    }

    fn sign(&self, n: u8, action: Action) -> Tx {
        let slot = self.slot(n);
        let nonce = self.state.account(slot).expect("account").nonce;
        Tx::sign(&key(n), &self.d.domain.0, slot, nonce, action)
    }

    /// Applies `txs` one by one (so later ones can be signed against the state) and
    /// posts them as one batch; returns the batch and its index.
    async fn post(&mut self, txs: Vec<Tx>) -> (Batch, u64) {
        let batch = Batch::build(&mut self.state, txs, &self.queue);
        let (index, _) = self
            .c()
            .submit_batch(&wallet(SEQUENCER), &batch)
            .await
            .expect("submit");
        (batch, index)
    }

    async fn pass_window(&self) {
        self.chain
            .advance_time(self.params.challenge_window + 1)
            .await
            .expect("time");
        self.c()
            .finalize(&wallet(CHALLENGER))
            .await
            .expect("finalize");
    }

    async fn withdraw(
        &self,
        n: u8,
        index: u64,
    ) -> Result<tessera_contracts::Receipt, ContractError> {
        let slot = self.slot(n);
        let proof = self.state.tree().prove(slot);
        self.c()
            .withdraw(&wallet(n), index, slot, self.state.preimage(slot), &proof)
            .await
    }
}

/// Applies `tx` to the sequencer's state (it must apply) and queues it for the batch.
fn step(net: &mut Net, txs: &mut Vec<Tx>, tx: Tx) {
    assert_eq!(net.state.apply(&tx, &net.queue), Outcome::Applied, "{tx:?}");
    txs.push(tx);
}

fn reason(e: ContractError) -> String {
    e.to_string()
}

#[tokio::test]
async fn deposit_jobs_batch_window_and_withdrawals_add_up_exactly() {
    let mut net = Net::new().await;
    let c_bond = net.params.min_bond;
    net.c()
        .post_bond(&wallet(SEQUENCER), c_bond)
        .await
        .expect("bond");
    // The sequencer's view: each transaction applied as it is made (so later ones can
    // be signed against it), then the whole sequence posted as one batch from genesis.
    let genesis = net.state.clone();
    let mut txs = Vec::new();
    for (n, amount) in [(DEV, 1_000_000), (NODE, 10_000), (HOLDER, 30_000)] {
        let tx = net.deposit(n, amount).await;
        step(&mut net, &mut txs, tx);
    }
    let (dev, node) = (net.slot(DEV), net.slot(NODE));
    let tx = net.sign(NODE, Action::Stake { amount: 10_000 });
    step(&mut net, &mut txs, tx);
    let tx = net.sign(NODE, Action::SetCommission { bps: 2_000 });
    step(&mut net, &mut txs, tx);
    let tx = net.sign(
        HOLDER,
        Action::Delegate {
            delegation: DELEGATION_BASE,
            node,
            amount: 30_000,
        },
    );
    step(&mut net, &mut txs, tx);
    step(&mut net, &mut txs, Tx::Epoch { epoch: 1 });
    // Three jobs' receipts netted into one settlement per (payer, node).
    let jobs = [120_000u128, 80_000, 200_000];
    let settle = Tx::Settle {
        payer: dev,
        node,
        amount: jobs.iter().sum(),
        receipts_root: [0x5e; 32],
    };
    step(&mut net, &mut txs, settle);
    step(
        &mut net,
        &mut txs,
        Tx::Claim {
            delegation: DELEGATION_BASE,
        },
    );
    let node_balance = net.state.account(node).expect("node").balance;
    let holder_balance = net.state.account(net.slot(HOLDER)).expect("holder").balance;
    for (n, amount) in [(NODE, node_balance), (HOLDER, holder_balance)] {
        let tx = net.sign(n, Action::Withdraw { amount });
        step(&mut net, &mut txs, tx);
    }
    net.state = genesis;
    let (batch, index) = net.post(txs).await;
    assert_eq!(index, 0);
    assert_eq!(batch.new_root(), net.state.root());

    // 400,000 paid: 1% fee 4,000; of 396,000 the node takes 20% commission 79,200 and a
    // quarter of the rest by stake (10,000 of 40,000): 79,200; delegators 237,600.
    assert_eq!(node_balance, 79_200 + 79_200);
    assert_eq!(holder_balance, 237_600);
    assert!(matches!(
        net.withdraw(NODE, 0).await.map_err(reason),
        Err(e) if e.contains("NotFinal")
    ));
    net.pass_window().await;
    let c = net.c();
    let before = c
        .token_balance(wallet(NODE).address())
        .await
        .expect("balance");
    net.withdraw(NODE, 0).await.expect("node withdraws");
    net.withdraw(HOLDER, 0).await.expect("holder withdraws");
    assert_eq!(
        c.token_balance(wallet(NODE).address())
            .await
            .expect("balance")
            - before,
        U256::from(node_balance)
    );
    assert_eq!(
        c.token_balance(wallet(HOLDER).address())
            .await
            .expect("balance"),
        U256::from(holder_balance)
    );
    // The books: what the contract still holds is every deposit less what it paid, and
    // L2 accounts for every base unit deposited.
    let deposited = 1_000_000u128 + 10_000 + 30_000;
    let held = c.token_balance(net.d.settlement).await.expect("balance");
    assert_eq!(held, U256::from(deposited - node_balance - holder_balance));
    assert_eq!(net.state.total_held(), deposited);
    let dev_left = net.state.account(dev).expect("dev").balance;
    assert_eq!(dev_left, 1_000_000 - 400_000);
    assert_eq!(net.state.account(1).expect("fee").balance, 4_000);

    // Refusals: a second withdrawal of the same leaf, and a bad proof.
    assert!(
        matches!(net.withdraw(NODE, 0).await.map_err(reason), Err(e) if e.contains("NothingToWithdraw"))
    );
    let slot = net.slot(HOLDER);
    let mut forged = net.state.account(slot).copied().expect("holder");
    forged.withdrawn += 1_000;
    let proof = net.state.tree().prove(slot);
    let err = c
        .withdraw(&wallet(HOLDER), 0, slot, forged.encode(), &proof)
        .await
        .expect_err("a leaf the final root does not hold");
    assert!(reason(err).contains("BadProof"));
}

#[tokio::test]
async fn only_the_bonded_sequencer_posts_and_a_replayed_deposit_does_nothing() {
    let mut net = Net::new().await;
    let d = net.deposit(DEV, 500).await;
    let mut s = net.state.clone();
    let batch = Batch::build(&mut s, vec![d.clone(), d.clone()], &net.queue);
    assert_eq!(batch.roots[0], batch.roots[1], "the replay is a no-op");
    let err = net
        .c()
        .submit_batch(&wallet(SEQUENCER), &batch)
        .await
        .expect_err("no bond yet");
    assert!(reason(err).contains("BondTooLow"));
    net.c()
        .post_bond(&wallet(SEQUENCER), net.params.min_bond)
        .await
        .expect("bond");
    let err = net
        .c()
        .submit_batch(&wallet(CHALLENGER), &batch)
        .await
        .expect_err("not the sequencer");
    assert!(reason(err).contains("NotSequencer"));
    let mut wrong_start = batch.clone();
    wrong_start.prev_root = [1; 32];
    let err = net
        .c()
        .submit_batch(&wallet(SEQUENCER), &wrong_start)
        .await
        .expect_err("not from the tip");
    assert!(reason(err).contains("WrongPrevRoot"));
    net.c()
        .submit_batch(&wallet(SEQUENCER), &batch)
        .await
        .expect("the sequencer posts");
    assert_eq!(net.c().batch_count().await.expect("count"), 1);
}

/// A sequencer that credits a deposit twice (pretending L1 queued it again) posts a
/// wrong root; the watchtower's replay finds the step, the challenge reverts the batch
/// and slashes the bond; the honest batch is posted again. A challenge of a correct
/// step fails and costs the challenger its bond.
#[tokio::test]
async fn a_wrong_root_is_challenged_reverted_slashed_and_reposted() {
    let mut net = Net::new().await;
    net.c()
        .post_bond(&wallet(SEQUENCER), U256::from(2 * ETH))
        .await
        .expect("bond");
    let d = net.deposit(DEV, 700).await;
    let genesis = net.state.clone();
    // The cheat: a queue with the deposit twice, so the replay "applies".
    let mut fake_queue = net.queue.clone();
    fake_queue.push(net.queue[0]);
    let replay = match d.clone() {
        Tx::Deposit {
            slot,
            address,
            amount,
            ..
        } => Tx::Deposit {
            seq: 1,
            slot,
            address,
            amount,
        },
        _ => unreachable!(),
    };
    let mut cheat = genesis.clone();
    let bad = Batch::build(&mut cheat, vec![d.clone(), replay], &fake_queue);
    assert_eq!(cheat.account(2).expect("dev").balance, 1_400);
    let (index, _) = net
        .c()
        .submit_batch(&wallet(SEQUENCER), &bad)
        .await
        .expect("posted");

    // The watchtower reads the batch back from L1 calldata and replays it.
    let posted = net.c().posted_batches().await.expect("batches");
    assert_eq!(posted.len(), 1);
    let read = net.c().batch_data(&posted[0]).await.expect("data");
    assert_eq!(read, bad);
    let proof: FraudProof = *read
        .check(&genesis, &net.queue)
        .expect_err("wrong root found");
    assert_eq!(proof.step, 1);

    let challenger = wallet(CHALLENGER).address();
    let eth_before = net.chain.eth_balance(challenger).await.expect("eth");
    let (outcome, receipt) = net
        .c()
        .challenge(
            &wallet(CHALLENGER),
            index,
            &proof,
            net.params.challenge_bond,
        )
        .await
        .expect("challenge");
    let ChallengeOutcome::Upheld {
        reward,
        correct_root,
    } = outcome
    else {
        panic!("challenge failed: {outcome:?}")
    };
    eprintln!(
        "gas: challenge (fraud proven, deposit step) {}",
        receipt.gas_used
    );
    assert_eq!(reward, U256::from(ETH), "half of the 2 ETH bond");
    assert_eq!(correct_root.0, bad.roots[0], "the replay is a no-op");
    assert_eq!(net.c().batch_count().await.expect("count"), 0, "reverted");
    assert_eq!(net.c().bond().await.expect("bond"), U256::ZERO, "slashed");
    assert_eq!(
        net.chain.eth_balance(challenger).await.expect("eth") - eth_before,
        U256::from(ETH),
        "the reward (gas is free on the embedded chain)"
    );

    // The sequencer bonds again and posts the honest batch from the same root.
    net.c()
        .post_bond(&wallet(SEQUENCER), net.params.min_bond)
        .await
        .expect("bond");
    let (good, index) = net.post(vec![d.clone()]).await;
    assert_eq!(index, 0);
    assert!(good.check(&genesis, &net.queue).is_ok());
    assert_eq!(net.state.account(2).expect("dev").balance, 700);

    // A false challenge: a correct step "proven" wrong fails and pays the sequencer.
    let honest = FraudProof {
        step: 0,
        tx: good.txs[0].encode(),
        pre_root: good.prev_root,
        post_root: good.roots[0],
        step_path: good.step_path(0),
        witnesses: genesis.witnesses(&good.txs[0], &net.queue),
    };
    let sequencer = wallet(SEQUENCER).address();
    let (seq_before, ch_before) = (
        net.chain.eth_balance(sequencer).await.expect("eth"),
        net.chain.eth_balance(challenger).await.expect("eth"),
    );
    let (outcome, _) = net
        .c()
        .challenge(
            &wallet(CHALLENGER),
            index,
            &honest,
            net.params.challenge_bond,
        )
        .await
        .expect("a well-formed challenge is accepted and judged");
    assert_eq!(outcome, ChallengeOutcome::Failed);
    assert_eq!(
        net.c().batch_count().await.expect("count"),
        1,
        "the batch stands"
    );
    assert_eq!(
        ch_before - net.chain.eth_balance(challenger).await.expect("eth"),
        net.params.challenge_bond
    );
    assert_eq!(
        net.chain.eth_balance(sequencer).await.expect("eth") - seq_before,
        net.params.challenge_bond
    );
    // After the window nothing can be challenged.
    net.pass_window().await;
    let err = net
        .c()
        .challenge(
            &wallet(CHALLENGER),
            index,
            &honest,
            net.params.challenge_bond,
        )
        .await
        .expect_err("window closed");
    assert!(reason(err).contains("WindowClosed"));
}

#[tokio::test]
async fn the_embedded_chain_keeps_its_state_across_a_restart() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("l1/chain.bin");
    let d = {
        let chain = EmbeddedChain::open(&path).expect("open");
        let deployer = wallet(DEPLOYER);
        let d = deploy(
            &chain,
            &deployer,
            deployer.address(),
            Address::ZERO,
            &Params::default(),
        )
        .await
        .expect("deploy");
        let c = Contracts::new(&chain, &d);
        c.mint(&deployer, wallet(DEV).address(), U256::from(5_000u64))
            .await
            .expect("mint");
        c.deposit(&wallet(DEV), wallet(DEV).address(), 1_234)
            .await
            .expect("deposit");
        d
    };
    let chain = EmbeddedChain::open(&path).expect("reopen");
    let c = Contracts::new(&chain, &d);
    assert_eq!(
        c.token_balance(wallet(DEV).address())
            .await
            .expect("balance"),
        U256::from(5_000u64 - 1_234)
    );
    assert_eq!(
        c.token_balance(d.settlement).await.expect("balance"),
        U256::from(1_234u64)
    );
    let deposits = c.deposits().await.expect("deposits");
    assert_eq!(deposits.len(), 1);
    assert_eq!((deposits[0].slot, deposits[0].amount), (2, 1_234));
    let (number, _) = chain.head().await.expect("head");
    assert!(number >= 6, "blocks survive too: {number}");
    std::fs::write(&path, b"garbage").expect("write");
    let err = EmbeddedChain::open(&path)
        .err()
        .expect("a corrupt file is an error");
    assert!(err.to_string().contains("move it away"), "{err}");
}

/// The sequencer stops posting: after the escape delay anyone opens the escape hatch and
/// every owner takes out what the last final state holds for them, once; a deposit that
/// state never applied is refunded; nothing more can be posted; only rounding dust stays.
#[tokio::test]
async fn the_escape_hatch_pays_everyone_from_the_last_final_root() {
    let mut net = Net::new().await;
    net.c()
        .post_bond(&wallet(SEQUENCER), net.params.min_bond)
        .await
        .expect("bond");
    let genesis = net.state.clone();
    let mut txs = Vec::new();
    for (n, amount) in [(DEV, 1_000), (NODE, 500), (HOLDER, 300)] {
        let tx = net.deposit(n, amount).await;
        step(&mut net, &mut txs, tx);
    }
    let (dev, node, holder) = (net.slot(DEV), net.slot(NODE), net.slot(HOLDER));
    let tx = net.sign(NODE, Action::Stake { amount: 500 });
    step(&mut net, &mut txs, tx);
    let tx = net.sign(
        HOLDER,
        Action::Delegate {
            delegation: DELEGATION_BASE,
            node,
            amount: 300,
        },
    );
    step(&mut net, &mut txs, tx);
    let settle = Tx::Settle {
        payer: dev,
        node,
        amount: 400,
        receipts_root: [1; 32],
    };
    step(&mut net, &mut txs, settle);
    let tx = net.sign(NODE, Action::Withdraw { amount: 100 });
    step(&mut net, &mut txs, tx);
    let last = net.state.clone();
    net.state = genesis;
    net.post(txs).await;
    assert_eq!(net.state.root(), last.root());
    net.pass_window().await;
    // A deposit queued after the last batch, never applied: the sequencer is gone.
    let late = net.deposit(DEV, 50).await;
    let Tx::Deposit { seq, .. } = late else {
        unreachable!()
    };
    let c = net.c();
    let anyone = wallet(CHALLENGER);
    let err = c.open_escape(&anyone).await.expect_err("too early");
    assert!(reason(err).contains("SequencerActive"));
    net.chain.advance_time(3_601).await.expect("time");
    c.open_escape(&anyone).await.expect("escape opens");

    let witness = |slot: u32| Witness {
        slot,
        preimage: net.state.preimage(slot),
        proof: net.state.tree().prove(slot),
    };
    let paid = |n: u8| {
        let c = net.c();
        async move { c.token_balance(wallet(n).address()).await.expect("balance") }
    };
    // 400 paid: fee 4; 396 shared 500:300 by stake → node 248, pool 148; node withdrew 100.
    let node_before = paid(NODE).await;
    c.exit_account(&anyone, &witness(node))
        .await
        .expect("node exits");
    assert_eq!(paid(NODE).await - node_before, U256::from(148 + 500 + 100));
    let again = c
        .exit_account(&anyone, &witness(node))
        .await
        .expect_err("once");
    assert!(reason(again).contains("AlreadyExited"));
    c.exit_delegation(
        &anyone,
        &witness(DELEGATION_BASE),
        &witness(node),
        &witness(holder),
    )
    .await
    .expect("delegation exits");
    // 300 delegated + 300 · ⌊148·10^18/300⌋ / 10^18 = 147 of the pool's 148.
    assert_eq!(paid(HOLDER).await, U256::from(300 + 147));
    let dev_before = paid(DEV).await;
    c.exit_account(&anyone, &witness(dev))
        .await
        .expect("dev exits");
    assert_eq!(paid(DEV).await - dev_before, U256::from(600));
    c.exit_account(&anyone, &witness(1))
        .await
        .expect("fee account exits");
    let late = tessera_contracts::QueuedDeposit {
        seq,
        slot: dev,
        account: wallet(DEV).address(),
        amount: 50,
        block: 0,
    };
    c.refund_deposit(&anyone, &late, &witness(0))
        .await
        .expect("refund");
    assert_eq!(paid(DEV).await - dev_before, U256::from(650));
    let twice = c
        .refund_deposit(&anyone, &late, &witness(0))
        .await
        .expect_err("once");
    assert!(reason(twice).contains("AlreadyExited"));
    // An applied deposit is not refundable.
    let applied = tessera_contracts::QueuedDeposit {
        seq: 0,
        slot: dev,
        account: wallet(DEV).address(),
        amount: 1_000,
        block: 0,
    };
    let err = c
        .refund_deposit(&anyone, &applied, &witness(0))
        .await
        .expect_err("applied");
    assert!(reason(err).contains("DepositApplied"));
    // Everything deposited is out but the pool's one unit of rounding dust.
    assert_eq!(
        c.token_balance(net.d.settlement).await.expect("balance"),
        U256::from(1)
    );
    let mut s = net.state.clone();
    let batch = Batch::build(&mut s, vec![Tx::Epoch { epoch: 1 }], &net.queue);
    let err = c
        .submit_batch(&wallet(SEQUENCER), &batch)
        .await
        .expect_err("closed");
    assert!(reason(err).contains("EscapeOpen"));
}
