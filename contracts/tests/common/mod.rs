//! The deposit → batch → withdraw flow over any L1 (shared by the tests that run it
//! against anvil and against the embedded chain's JSON-RPC facade).

use alloy::primitives::{Address, U256};
use alloy::signers::local::PrivateKeySigner;
use tessera_contracts::{deploy, Contracts, Params, L1};
use tessera_rollup::{Action, Batch, State, Tx};

/// anvil's well-known development keys (accounts #0 and #1 of its default mnemonic).
pub const ANVIL_KEYS: [&str; 2] = [
    "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
    "59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
];

fn l2_key(n: u8) -> k256::ecdsa::SigningKey {
    k256::ecdsa::SigningKey::from_bytes(&[n; 32].into()).expect("key")
}

/// Deploys, mints, bonds, deposits and registers, settles in one batch, reads the batch
/// back from its calldata, and withdraws once the challenge window has passed (and not
/// before, and not twice). `operator` and `dev` need ether for gas on a chain that
/// charges it.
pub async fn deposit_batch_and_withdraw<C: L1>(
    chain: &C,
    operator: &PrivateKeySigner,
    dev: &PrivateKeySigner,
) {
    let params = Params {
        challenge_window: 120,
        ..Params::default()
    };
    let d = deploy(
        chain,
        operator,
        operator.address(),
        Address::repeat_byte(0xfe),
        &params,
    )
    .await
    .expect("deploy");
    let c = Contracts::new(chain, &d);
    c.mint(operator, dev.address(), U256::from(1_000_000u64))
        .await
        .expect("mint");
    c.post_bond(operator, params.min_bond).await.expect("bond");

    // The developer deposits; the node (an L2 key with no ether) is registered by a
    // zero deposit, made for it by the operator.
    let node = PrivateKeySigner::from_signing_key(l2_key(9));
    let (paying, _) = c
        .deposit(dev, dev.address(), 600_000)
        .await
        .expect("deposit");
    let (registered, _) = c
        .deposit(operator, node.address(), 0)
        .await
        .expect("register");
    let queue: Vec<_> = c
        .deposits()
        .await
        .expect("queue")
        .iter()
        .map(|q| q.hash())
        .collect();
    assert_eq!(queue.len(), 2);

    let mut state = State::genesis(
        d.domain.0,
        params.fee_bps,
        params.unbonding_epochs,
        [0xfe; 20],
    );
    let genesis = state.clone();
    let mut txs = vec![paying.tx(), registered.tx()];
    for tx in &txs {
        state.apply(tx, &queue);
    }
    let settle = Tx::Settle {
        payer: paying.slot,
        node: registered.slot,
        amount: 250_000,
        receipts_root: [7; 32],
    };
    state.apply(&settle, &queue);
    txs.push(settle);
    let earned = state.account(registered.slot).expect("node").balance;
    assert_eq!(earned, 247_500, "less the 1% fee");
    txs.push(Tx::sign(
        &l2_key(9),
        &d.domain.0,
        registered.slot,
        0,
        Action::Withdraw { amount: earned },
    ));

    let mut sequencer = genesis.clone();
    let batch = Batch::build(&mut sequencer, txs, &queue);
    let (index, receipt) = c
        .submit_batch(operator, &batch)
        .await
        .expect("submit batch");
    assert!(receipt.gas_used > 0);
    // The watchtower's view over JSON-RPC: the same batch, replaying to the same roots.
    let posted = c.posted_batches().await.expect("batches");
    let read = c.batch_data(&posted[0]).await.expect("calldata");
    assert_eq!(read, batch);
    assert!(read.check(&genesis, &queue).is_ok());

    let slot = registered.slot;
    let proof = sequencer.tree().prove(slot);
    let early = c
        .withdraw(dev, index, slot, sequencer.preimage(slot), &proof)
        .await;
    assert!(early
        .expect_err("not final yet")
        .to_string()
        .contains("NotFinal"));
    chain
        .advance_time(params.challenge_window + 1)
        .await
        .expect("evm_increaseTime");
    c.finalize(dev).await.expect("finalize");
    c.withdraw(dev, index, slot, sequencer.preimage(slot), &proof)
        .await
        .expect("withdraw");
    assert_eq!(
        c.token_balance(node.address()).await.expect("balance"),
        U256::from(earned)
    );
    assert_eq!(
        c.token_balance(d.settlement).await.expect("balance"),
        U256::from(600_000 - earned)
    );
    let again = c
        .withdraw(dev, index, slot, sequencer.preimage(slot), &proof)
        .await;
    assert!(again
        .expect_err("paid once")
        .to_string()
        .contains("NothingToWithdraw"));
}
