//! Gas figures for docs/settlement.md, measured on the embedded chain (Prague rules,
//! EIP-7623's calldata floor included): deposits, `submitBatch` per settled job at
//! several batch sizes, a challenge, a withdrawal, and an ERC-20 transfer per job for
//! comparison. Gas is deterministic, so the figures are asserted against the prototype's
//! (ARCHITECTURE.md) as well as printed: `cargo test -p tessera-contracts --test gas --
//! --nocapture` prints the table.

use alloy::primitives::{Address, U256};
use alloy::signers::local::PrivateKeySigner;
use tessera_contracts::{deploy, ChallengeOutcome, Contracts, EmbeddedChain, Params, L1};
use tessera_rollup::{Action, Batch, FraudProof, State, Tx};

fn wallet(n: u8) -> PrivateKeySigner {
    PrivateKeySigner::from_signing_key(
        k256::ecdsa::SigningKey::from_bytes(&[n; 32].into()).expect("key"),
    )
}

const ETH: u128 = 1_000_000_000_000_000_000;

#[tokio::test]
async fn gas_per_operation_beats_the_prototype() {
    let chain = EmbeddedChain::in_memory();
    let (op, dev, node) = (wallet(100), wallet(1), wallet(2));
    chain
        .fund(op.address(), U256::from(100 * ETH))
        .expect("fund");
    let params = Params {
        challenge_window: 600,
        ..Params::default()
    };
    let d = deploy(
        &chain,
        &op,
        op.address(),
        Address::repeat_byte(0xfe),
        &params,
    )
    .await
    .expect("deploy");
    let c = Contracts::new(&chain, &d);
    c.post_bond(&op, U256::from(10 * ETH)).await.expect("bond");
    // Realistic amounts: 18-decimal tokens.
    let funds = 10u128.pow(24);
    c.mint(&op, dev.address(), U256::from(funds))
        .await
        .expect("mint");
    let (first, first_r) = c
        .deposit(&dev, dev.address(), funds / 2)
        .await
        .expect("deposit");
    let (second, second_r) = c
        .deposit(&dev, dev.address(), funds / 4)
        .await
        .expect("deposit");
    let (reg, reg_r) = c.deposit(&op, node.address(), 0).await.expect("register");
    let other = wallet(4);
    c.mint(&op, other.address(), U256::from(funds))
        .await
        .expect("mint");
    let (third, third_r) = c
        .deposit(&other, other.address(), funds)
        .await
        .expect("deposit");
    let transfer = {
        let input = alloy::sol_types::SolCall::abi_encode(
            &tessera_contracts::bindings::TesseraToken::transferCall {
                to: Address::repeat_byte(7),
                value: U256::from(12_345_678_901_234u64),
            },
        );
        chain
            .send(&dev, Some(d.token), input.into(), U256::ZERO)
            .await
            .expect("transfer")
            .gas_used
    };
    let queue: Vec<_> = [&first, &second, &reg, &third]
        .iter()
        .map(|q| q.hash())
        .collect();

    let mut state = State::genesis(
        d.domain.0,
        params.fee_bps,
        params.unbonding_epochs,
        [0xfe; 20],
    );
    let setup = Batch::build(
        &mut state,
        vec![first.tx(), second.tx(), reg.tx(), third.tx()],
        &queue,
    );
    c.submit_batch(&op, &setup).await.expect("setup batch");

    println!("| operation | gas | per settled job |");
    println!("|---|---:|---:|");
    println!(
        "| deposit, the contract's very first | {} | |",
        first_r.gas_used
    );
    println!(
        "| deposit, a new address (assigns its L2 slot) | {} | |",
        third_r.gas_used
    );
    println!(
        "| deposit, an address seen before | {} | |",
        second_r.gas_used
    );
    println!("| register a node (zero deposit) | {} | |", reg_r.gas_used);
    println!("| ERC-20 transfer (one job paid on L1) | {transfer} | {transfer} |");
    let mut per_job_512 = 0;
    let mut last = None;
    for n in [1usize, 16, 128, 512] {
        let pre = state.clone();
        let txs: Vec<Tx> = (0..n)
            .map(|i| Tx::Settle {
                payer: first.slot,
                node: reg.slot,
                amount: 1_234_567_890_123_456 + i as u128 * 7_919,
                receipts_root: tessera_rollup::keccak256(&(i as u64).to_be_bytes()),
            })
            .collect();
        let batch = Batch::build(&mut state, txs, &queue);
        let (index, r) = c.submit_batch(&op, &batch).await.expect("submit");
        let per = r.gas_used / n as u64;
        println!("| submitBatch, {n} settlements | {} | {per} |", r.gas_used);
        if n == 512 {
            per_job_512 = per;
        }
        last = Some((pre, batch, index));
    }

    // A challenge of the last step of a 512-settlement batch that a cheating sequencer
    // posted with its last root wrong (a settlement of 1 it never made).
    let (_, batch, _) = last.expect("batch");
    let mut wrong = Batch::build(&mut state.clone(), batch.txs.clone(), &queue);
    let mut at_step = state.clone();
    for tx in &wrong.txs[..511] {
        at_step.apply(tx, &queue);
    }
    let mut forged = at_step.clone();
    forged.apply(
        &Tx::Settle {
            payer: first.slot,
            node: reg.slot,
            amount: 1,
            receipts_root: [0; 32],
        },
        &queue,
    );
    wrong.roots[511] = forged.root();
    let (index, _) = c.submit_batch(&op, &wrong).await.expect("submit wrong");
    let proof = FraudProof {
        step: 511,
        tx: wrong.txs[511].encode(),
        pre_root: wrong.roots[510],
        post_root: wrong.roots[511],
        step_path: wrong.step_path(511),
        witnesses: at_step.witnesses(&wrong.txs[511], &queue),
    };
    let challenger = wallet(3);
    chain
        .fund(challenger.address(), U256::from(ETH))
        .expect("fund");
    let (outcome, r) = c
        .challenge(&challenger, index, &proof, params.challenge_bond)
        .await
        .expect("challenge");
    assert!(matches!(outcome, ChallengeOutcome::Upheld { .. }));
    println!(
        "| challenge (settle step of a 512 batch) | {} | |",
        r.gas_used
    );
    let challenge = r.gas_used;

    // Withdrawals after the window, against the last final batch: the first for an
    // account writes its `paid` entry and (here) the recipient's first token balance;
    // later ones update both.
    let node_key = k256::ecdsa::SigningKey::from_bytes(&[2; 32].into()).expect("key");
    let mut withdraw_gas = Vec::new();
    for nonce in 0..2 {
        c.post_bond(&op, U256::from(10 * ETH)).await.expect("bond");
        let tx = Tx::sign(
            &node_key,
            &d.domain.0,
            reg.slot,
            nonce,
            Action::Withdraw { amount: 1_000 },
        );
        let b = Batch::build(&mut state, vec![tx], &queue);
        let (index, _) = c.submit_batch(&op, &b).await.expect("submit");
        chain
            .advance_time(params.challenge_window + 1)
            .await
            .expect("time");
        c.finalize(&op).await.expect("finalize");
        let proof = state.tree().prove(reg.slot);
        let r = c
            .withdraw(&op, index, reg.slot, state.preimage(reg.slot), &proof)
            .await
            .expect("withdraw");
        withdraw_gas.push(r.gas_used);
    }
    println!(
        "| withdraw, an account's first (recipient had no tokens) | {} | |",
        withdraw_gas[0]
    );
    println!("| withdraw, later ones | {} | |", withdraw_gas[1]);

    // The prototype's figures (docs/settlement.md): ours must be lower.
    assert!(
        per_job_512 < 4_640,
        "submitBatch per settlement at 512: {per_job_512}"
    );
    assert!(challenge < 144_000, "challenge: {challenge}");
    assert!(withdraw_gas[1] < 64_000, "withdraw: {withdraw_gas:?}");
    assert!(third_r.gas_used < 98_000 && second_r.gas_used < 81_000);
}
