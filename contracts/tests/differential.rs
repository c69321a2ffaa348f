//! The same transactions through the Rust state-transition function and through the
//! contract's one-step verifier in revm: every root must agree, on valid transactions,
//! on ones that are no-ops, and on random field values.

use alloy::primitives::{Address, B256};
use alloy::signers::local::PrivateKeySigner;
use proptest::prelude::*;
use std::collections::HashMap;
use tessera_contracts::{deploy, Contracts, Deployment, EmbeddedChain, Params};
use tessera_rollup::{
    address_of, deposit_hash, Action, State, Tx, DELEGATION_BASE, FIRST_ACCOUNT_SLOT, H256,
};

fn key(n: u8) -> k256::ecdsa::SigningKey {
    k256::ecdsa::SigningKey::from_bytes(&[n; 32].into()).expect("key")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
}

fn deployed(rt: &tokio::runtime::Runtime) -> (EmbeddedChain, Deployment) {
    let chain = EmbeddedChain::in_memory();
    let deployer = PrivateKeySigner::from_signing_key(key(200));
    let params = Params {
        fee_bps: 250,
        unbonding_epochs: 2,
        ..Params::default()
    };
    let d = rt
        .block_on(deploy(
            &chain,
            &deployer,
            deployer.address(),
            Address::repeat_byte(0xfe),
            &params,
        ))
        .expect("deploy");
    (chain, d)
}

/// Rust's state, the L1 queue and the slots L1 assigned, as a bridge would keep them.
struct World {
    state: State,
    queue: Vec<H256>,
    slots: HashMap<[u8; 20], u32>,
    domain: H256,
}

impl World {
    fn new(d: &Deployment) -> Self {
        Self {
            state: State::genesis(d.domain.0, 250, 2, [0xfe; 20]),
            queue: Vec::new(),
            slots: HashMap::new(),
            domain: d.domain.0,
        }
    }

    fn queue_deposit(&mut self, n: u8, amount: u128) -> Tx {
        let address = address_of(key(n).verifying_key());
        let next = FIRST_ACCOUNT_SLOT + self.slots.len() as u32;
        let slot = *self.slots.entry(address).or_insert(next);
        let seq = self.queue.len() as u64;
        self.queue.push(deposit_hash(slot, &address, amount));
        Tx::Deposit {
            seq,
            slot,
            address,
            amount,
        }
    }

    fn slot(&self, n: u8) -> u32 {
        let address = address_of(key(n).verifying_key());
        self.slots
            .get(&address)
            .copied()
            .unwrap_or(FIRST_ACCOUNT_SLOT + 40 + u32::from(n))
    }

    fn sign(&self, n: u8, action: Action) -> Tx {
        let slot = self.slot(n);
        let nonce = self.state.account(slot).map_or(0, |a| a.nonce);
        Tx::sign(&key(n), &self.domain, slot, nonce, action)
    }
}

/// Runs `tx` through both and asserts the roots agree.
fn check_step(
    rt: &tokio::runtime::Runtime,
    c: &Contracts<'_, EmbeddedChain>,
    w: &mut World,
    tx: &Tx,
) {
    let pre = w.state.clone();
    let outcome = w.state.apply(tx, &w.queue);
    let witnesses = pre.witnesses(tx, &w.queue);
    let queued = match tx {
        Tx::Deposit { seq, .. } => w.queue.get(*seq as usize).copied().unwrap_or([0; 32]),
        _ => [0; 32],
    };
    let on_chain = rt
        .block_on(c.execute_step(pre.root(), &tx.encode(), &witnesses, queued))
        .unwrap_or_else(|e| panic!("verifier refused {tx:?} ({outcome:?}): {e}"));
    assert_eq!(
        on_chain,
        B256::from(w.state.root()),
        "roots differ after {tx:?} ({outcome:?})"
    );
}

#[test]
fn a_full_economy_agrees_step_by_step() {
    let rt = runtime();
    let (chain, d) = deployed(&rt);
    let c = Contracts::new(&chain, &d);
    let mut w = World::new(&d);
    let mut txs = vec![
        w.queue_deposit(1, 1_000_000),
        w.queue_deposit(2, 5_000),
        w.queue_deposit(3, 40_000),
    ];
    txs.push(w.queue_deposit(1, 1)); // a second deposit to an existing slot
    for tx in &txs {
        check_step(&rt, &c, &mut w, tx);
    }
    let (payer, node, holder) = (w.slot(1), w.slot(2), w.slot(3));
    let steps: Vec<Tx> = vec![
        w.sign(2, Action::Stake { amount: 5_000 }),
        w.sign(2, Action::SetCommission { bps: 1_500 }),
    ];
    for tx in &steps {
        check_step(&rt, &c, &mut w, tx);
    }
    let delegate = w.sign(
        3,
        Action::Delegate {
            delegation: DELEGATION_BASE,
            node,
            amount: 15_000,
        },
    );
    check_step(&rt, &c, &mut w, &delegate);
    for amount in [40_000u128, 33_333, 1] {
        let settle = Tx::Settle {
            payer,
            node,
            amount,
            receipts_root: [9; 32],
        };
        check_step(&rt, &c, &mut w, &settle);
    }
    check_step(&rt, &c, &mut w, &Tx::Epoch { epoch: 1 });
    check_step(
        &rt,
        &c,
        &mut w,
        &Tx::Settle {
            payer,
            node,
            amount: 70_001,
            receipts_root: [9; 32],
        },
    );
    check_step(
        &rt,
        &c,
        &mut w,
        &Tx::Claim {
            delegation: DELEGATION_BASE,
        },
    );
    let more = w.sign(
        3,
        Action::Delegate {
            delegation: DELEGATION_BASE,
            node,
            amount: 100,
        },
    );
    check_step(&rt, &c, &mut w, &more);
    let undelegate = w.sign(
        3,
        Action::Undelegate {
            delegation: DELEGATION_BASE,
            amount: 5_000,
        },
    );
    check_step(&rt, &c, &mut w, &undelegate);
    let unstake = w.sign(2, Action::Unstake { amount: 2_000 });
    check_step(&rt, &c, &mut w, &unstake);
    check_step(
        &rt,
        &c,
        &mut w,
        &Tx::Slash {
            node,
            amount: 4_000,
            evidence: [1; 32],
        },
    );
    check_step(&rt, &c, &mut w, &Tx::Release { slot: holder }); // still unbonding
    check_step(&rt, &c, &mut w, &Tx::Epoch { epoch: 2 });
    check_step(&rt, &c, &mut w, &Tx::Epoch { epoch: 3 });
    check_step(&rt, &c, &mut w, &Tx::Release { slot: holder });
    check_step(&rt, &c, &mut w, &Tx::Release { slot: node });
    let withdraw = w.sign(2, Action::Withdraw { amount: 100 });
    check_step(&rt, &c, &mut w, &withdraw);
    check_step(&rt, &c, &mut w, &withdraw); // replay: no-op on both
    assert!(w.state.account(node).expect("node").withdrawn == 100);
    assert!(w.state.delegation(DELEGATION_BASE).expect("d").earned > 0);
    assert!(w.state.meta().burned > 0);
}

fn any_step() -> impl Strategy<Value = (u8, u8, u8, u128, u32, bool)> {
    (
        0u8..13,
        1u8..5,
        1u8..5,
        prop_oneof![4 => 0u128..3_000, 1 => any::<u128>()],
        0u32..6,
        any::<bool>(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(12))]

    /// Random sequences of every kind, valid or not (wrong slots, nonces, keys, huge
    /// amounts, out-of-order deposits and epochs, strays into the delegation range).
    #[test]
    fn random_sequences_agree_step_by_step(steps in proptest::collection::vec(any_step(), 1..40)) {
        let rt = runtime();
        let (chain, d) = deployed(&rt);
        let c = Contracts::new(&chain, &d);
        let mut w = World::new(&d);
        for n in 1..5 {
            let tx = w.queue_deposit(n, 50_000);
            check_step(&rt, &c, &mut w, &tx);
        }
        for n in 3..5 {
            let tx = w.sign(n, Action::Stake { amount: 5_000 });
            check_step(&rt, &c, &mut w, &tx);
        }
        for (kind, a, b, amount, pick, flip) in steps {
            let next = w.state.meta().next_delegation;
            let existing = DELEGATION_BASE + pick % (next - DELEGATION_BASE).max(1);
            let delegation = if pick < 2 { next } else { existing };
            let tx = match kind {
                0 => w.queue_deposit(a, amount),
                1 => Tx::Settle { payer: w.slot(a), node: w.slot(b), amount, receipts_root: [pick as u8; 32] },
                2 => w.sign(a, Action::Stake { amount }),
                3 => w.sign(a, Action::Unstake { amount: amount / 2 }),
                4 => w.sign(a, Action::Delegate { delegation, node: w.slot(b), amount }),
                5 => w.sign(a, Action::Undelegate { delegation: existing, amount: amount / 3 }),
                6 => w.sign(a, Action::SetCommission { bps: (amount % 12_000) as u16 }),
                7 => w.sign(a, Action::Withdraw { amount: amount / 4 }),
                8 => Tx::Claim { delegation: existing },
                9 => Tx::Release { slot: w.slot(a) },
                10 => Tx::Epoch { epoch: w.state.meta().epoch + u64::from(flip) },
                11 => Tx::Slash { node: w.slot(a), amount, evidence: [3; 32] },
                // Signed by the wrong key, or for a stale nonce.
                _ => {
                    let slot = w.slot(a);
                    let nonce = w.state.account(slot).map_or(0, |x| x.nonce) + u64::from(flip);
                    Tx::sign(&key(b), &w.domain, slot, nonce, Action::Withdraw { amount: 1 })
                }
            };
            check_step(&rt, &c, &mut w, &tx);
        }
    }

    /// Random bytes of the right type and length: both sides decode them and agree.
    #[test]
    fn random_fields_agree(kind in 1u8..13, body in proptest::collection::vec(any::<u8>(), 120)) {
        let rt = runtime();
        let (chain, d) = deployed(&rt);
        let c = Contracts::new(&chain, &d);
        let mut w = World::new(&d);
        let tx = w.queue_deposit(1, 10);
        check_step(&rt, &c, &mut w, &tx);
        let len = tessera_rollup::tx::encoded_len(kind).expect("known type");
        let mut bytes = vec![kind];
        bytes.extend_from_slice(&body[..len - 1]);
        let (tx, _) = Tx::decode(&bytes).expect("decodes");
        check_step(&rt, &c, &mut w, &tx);
    }
}

#[test]
fn a_tampered_witness_or_malformed_transaction_is_refused() {
    let rt = runtime();
    let (chain, d) = deployed(&rt);
    let c = Contracts::new(&chain, &d);
    let mut w = World::new(&d);
    let tx = w.queue_deposit(1, 10);
    let pre = w.state.clone();
    let mut witnesses = pre.witnesses(&tx, &w.queue);
    let queued = w.queue[0];
    // An account leaf that is not what the tree holds.
    witnesses[1].preimage = tessera_rollup::Account::new([1; 20]).encode();
    let err = rt
        .block_on(c.execute_step(pre.root(), &tx.encode(), &witnesses, queued))
        .expect_err("a leaf the root does not hold");
    assert!(err.to_string().contains("BadProof"), "{err}");
    // Truncated transaction bytes and an unknown type.
    let good = pre.witnesses(&tx, &w.queue);
    let mut short = tx.encode();
    short.pop();
    let err = rt
        .block_on(c.execute_step(pre.root(), &short, &good, queued))
        .expect_err("truncated");
    assert!(err.to_string().contains("BadTransaction"), "{err}");
    let err = rt
        .block_on(c.execute_step(pre.root(), &[99], &good, queued))
        .expect_err("unknown type");
    assert!(err.to_string().contains("BadTransaction"), "{err}");
    // Witnesses for the wrong slots.
    let mut wrong = good.clone();
    wrong.swap(0, 1);
    let err = rt
        .block_on(c.execute_step(pre.root(), &tx.encode(), &wrong, queued))
        .expect_err("wrong order");
    assert!(err.to_string().contains("BadWitnesses"), "{err}");
}
