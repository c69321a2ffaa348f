//! The L2 state and its pure transition function, first slice: accounts, the deposit
//! queue and job settlement with a protocol fee. Stakes, delegations, unbonding, slashes
//! and signed withdrawals extend the same leaf scheme (docs/settlement.md).
//!
//! Layout in the tree (all leaf hashes are keccak256 of a packed encoding the contract
//! reproduces with `abi.encodePacked`):
//! - slot 0, the meta leaf: `0x00 ‖ deposits applied (u64) ‖ next free slot (u32) ‖ fee (u16 bps)`;
//! - slot 1, the protocol fee account;
//! - slots 2.., accounts in order of first appearance: `0x01 ‖ address (20) ‖ balance (u128)
//!   ‖ nonce (u64) ‖ earned (u128) ‖ withdrawn (u128)`, where `earned` is cumulative (one
//!   proof against one root covers every epoch) and `withdrawn` is cumulative (the L1
//!   contract pays `withdrawn` minus what it already paid, so a withdrawal cannot be paid
//!   twice).
//!
//! A transaction that does not apply (wrong deposit order, short balance, unknown slot) is
//! a no-op: the transition is total, so a fraud proof can re-execute any transaction a
//! batch carries and compare roots.

use crate::smt::{keccak256, SparseMerkleTree, H256};
use std::collections::HashMap;

/// An EVM address.
pub type Address = [u8; 20];

/// Slot of the meta leaf.
pub const META_SLOT: u32 = 0;
/// Slot of the protocol fee account.
pub const FEE_SLOT: u32 = 1;
/// First slot given to accounts.
pub const FIRST_ACCOUNT_SLOT: u32 = 2;
/// Basis points in one whole.
pub const BPS: u128 = 10_000;

/// One account's leaf.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Account {
    /// The L1 address that owns it.
    pub address: Address,
    /// Spendable base units.
    pub balance: u128,
    /// Signed transactions applied (withdrawals, stakes).
    pub nonce: u64,
    /// Everything ever earned from jobs (cumulative).
    pub earned: u128,
    /// Everything ever moved out to L1 (cumulative).
    pub withdrawn: u128,
}

impl Account {
    /// The packed encoding whose keccak256 is the leaf.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(77);
        b.push(1);
        b.extend_from_slice(&self.address);
        b.extend_from_slice(&self.balance.to_be_bytes());
        b.extend_from_slice(&self.nonce.to_be_bytes());
        b.extend_from_slice(&self.earned.to_be_bytes());
        b.extend_from_slice(&self.withdrawn.to_be_bytes());
        b
    }

    /// The leaf hash.
    pub fn leaf(&self) -> H256 {
        keccak256(&self.encode())
    }
}

/// The meta leaf: counters the contract needs to check order and slot assignment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meta {
    /// Deposits applied from the L1 queue; the next must carry this sequence number.
    pub deposits: u64,
    /// The slot the next new account gets.
    pub next_slot: u32,
    /// Protocol fee on settlements, in basis points.
    pub fee_bps: u16,
}

impl Meta {
    /// The packed encoding whose keccak256 is the leaf.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(15);
        b.push(0);
        b.extend_from_slice(&self.deposits.to_be_bytes());
        b.extend_from_slice(&self.next_slot.to_be_bytes());
        b.extend_from_slice(&self.fee_bps.to_be_bytes());
        b
    }

    /// The leaf hash.
    pub fn leaf(&self) -> H256 {
        keccak256(&self.encode())
    }
}

/// An L2 transaction (first slice).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tx {
    /// Tokens deposited on L1, applied in queue order.
    Deposit {
        /// Position in the L1 queue.
        seq: u64,
        /// Who deposited (the account credited).
        address: Address,
        /// Base units.
        amount: u128,
    },
    /// Moves `amount` of an account's balance out to L1 (added to its cumulative
    /// `withdrawn`, which the contract pays against a final root). Signed by the owner:
    /// a 65-byte `r ‖ s ‖ v` signature (v = 27 or 28, low s, as OpenZeppelin's
    /// `ECDSA.recover` requires) over [`withdraw_digest`].
    Withdraw {
        /// The account's slot.
        slot: u32,
        /// Base units.
        amount: u128,
        /// Must equal the account's nonce.
        nonce: u64,
        /// The owner's signature.
        signature: [u8; 65],
    },
    /// A job's payment (or a netted total of several jobs): payer to node, less the fee.
    Settle {
        /// Paying account's slot.
        payer: u32,
        /// Node's account slot.
        node: u32,
        /// Base units charged to the payer.
        amount: u128,
        /// Merkle root of the receipts this settles (keeps each job provable).
        receipts_root: H256,
    },
}

/// What applying a transaction did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Applied.
    Applied,
    /// Not applicable; the state is unchanged. Says why.
    NoOp(&'static str),
}

/// What the owner of an account signs to withdraw: EIP-191's `personal_sign` of
/// `keccak256("tessera/withdraw/1" ‖ domain ‖ slot ‖ amount ‖ nonce)`, where `domain`
/// names the deployment (chain id and settlement contract), so a signature is good on
/// one rollup only.
pub fn withdraw_digest(domain: &H256, slot: u32, amount: u128, nonce: u64) -> H256 {
    let mut m = Vec::with_capacity(18 + 32 + 4 + 16 + 8);
    m.extend_from_slice(b"tessera/withdraw/1");
    m.extend_from_slice(domain);
    m.extend_from_slice(&slot.to_be_bytes());
    m.extend_from_slice(&amount.to_be_bytes());
    m.extend_from_slice(&nonce.to_be_bytes());
    let inner = keccak256(&m);
    let mut p = Vec::with_capacity(28 + 32);
    p.extend_from_slice(b"\x19Ethereum Signed Message:\n32");
    p.extend_from_slice(&inner);
    keccak256(&p)
}

/// The address that signed `digest`, as the EVM's `ecrecover` (behind OpenZeppelin's
/// checks) finds it; `None` for a malformed, high-s or non-27/28-v signature.
pub fn recover(digest: &H256, signature: &[u8; 65]) -> Option<Address> {
    use k256::ecdsa::{RecoveryId, Signature, VerifyingKey};
    let v = signature[64].checked_sub(27)?;
    let id = RecoveryId::from_byte(v).filter(|_| v <= 1)?;
    let sig = Signature::from_slice(&signature[..64]).ok()?;
    if sig.normalize_s().is_some() {
        return None;
    }
    let key = VerifyingKey::recover_from_prehash(digest, &sig, id).ok()?;
    let point = key.to_encoded_point(false);
    let hash = keccak256(&point.as_bytes()[1..]);
    let mut address = [0u8; 20];
    address.copy_from_slice(&hash[12..]);
    Some(address)
}

/// The whole L2 state, and the tree that commits to it.
#[derive(Clone, Debug)]
pub struct State {
    meta: Meta,
    domain: H256,
    accounts: HashMap<u32, Account>,
    slot_of: HashMap<Address, u32>,
    tree: SparseMerkleTree,
}

impl State {
    /// A fresh state for the deployment `domain` (see [`withdraw_digest`]), with
    /// `fee_bps` protocol fee owned (the fee account) by `fee_owner`.
    pub fn genesis(domain: H256, fee_bps: u16, fee_owner: Address) -> Self {
        let mut s = Self {
            domain,
            meta: Meta {
                deposits: 0,
                next_slot: FIRST_ACCOUNT_SLOT,
                fee_bps: fee_bps.min(BPS as u16),
            },
            accounts: HashMap::new(),
            slot_of: HashMap::new(),
            tree: SparseMerkleTree::new(),
        };
        s.put_meta();
        s.put(
            FEE_SLOT,
            Account {
                address: fee_owner,
                ..Account::default()
            },
        );
        s
    }

    /// The state root.
    pub fn root(&self) -> H256 {
        self.tree.root()
    }

    /// The meta leaf's values.
    pub fn meta(&self) -> Meta {
        self.meta
    }

    /// An account by slot.
    pub fn account(&self, slot: u32) -> Option<&Account> {
        self.accounts.get(&slot)
    }

    /// The slot of an address, if it has one.
    pub fn slot_of(&self, address: &Address) -> Option<u32> {
        self.slot_of.get(address).copied()
    }

    /// The tree (for proofs).
    pub fn tree(&self) -> &SparseMerkleTree {
        &self.tree
    }

    fn put_meta(&mut self) {
        self.tree.set(META_SLOT, self.meta.leaf());
    }

    fn put(&mut self, slot: u32, account: Account) {
        self.tree.set(slot, account.leaf());
        self.slot_of.insert(account.address, slot);
        self.accounts.insert(slot, account);
    }

    /// Applies one transaction: the one pure transition the sequencer, the watchtower and
    /// the fraud-proof builder all call.
    pub fn apply(&mut self, tx: &Tx) -> Outcome {
        match *tx {
            Tx::Deposit {
                seq,
                address,
                amount,
            } => {
                if seq != self.meta.deposits {
                    return Outcome::NoOp("deposit out of queue order");
                }
                let (slot, mut account) = match self.slot_of(&address) {
                    Some(slot) => (slot, self.accounts[&slot]),
                    None => {
                        if self.meta.next_slot == u32::MAX {
                            return Outcome::NoOp("no free slot");
                        }
                        let slot = self.meta.next_slot;
                        self.meta.next_slot += 1;
                        (
                            slot,
                            Account {
                                address,
                                ..Account::default()
                            },
                        )
                    }
                };
                let Some(balance) = account.balance.checked_add(amount) else {
                    return Outcome::NoOp("balance overflows");
                };
                account.balance = balance;
                self.meta.deposits += 1;
                self.put_meta();
                self.put(slot, account);
                Outcome::Applied
            }
            Tx::Withdraw {
                slot,
                amount,
                nonce,
                ref signature,
            } => {
                let Some(&a) = self.accounts.get(&slot) else {
                    return Outcome::NoOp("unknown account slot");
                };
                if nonce != a.nonce {
                    return Outcome::NoOp("wrong nonce");
                }
                let digest = withdraw_digest(&self.domain, slot, amount, nonce);
                if recover(&digest, signature) != Some(a.address) {
                    return Outcome::NoOp("not signed by the account's owner");
                }
                if a.balance < amount {
                    return Outcome::NoOp("balance too low");
                }
                let Some(withdrawn) = a.withdrawn.checked_add(amount) else {
                    return Outcome::NoOp("withdrawn total overflows");
                };
                self.put(
                    slot,
                    Account {
                        balance: a.balance - amount,
                        nonce: a.nonce + 1,
                        withdrawn,
                        ..a
                    },
                );
                Outcome::Applied
            }
            Tx::Settle {
                payer,
                node,
                amount,
                ..
            } => {
                if payer == node {
                    return Outcome::NoOp("payer and node are the same account");
                }
                if payer == FEE_SLOT || node == FEE_SLOT {
                    return Outcome::NoOp("the fee account neither pays nor serves jobs");
                }
                let (Some(&p), Some(&n)) = (self.accounts.get(&payer), self.accounts.get(&node))
                else {
                    return Outcome::NoOp("unknown account slot");
                };
                if p.balance < amount {
                    return Outcome::NoOp("payer balance too low");
                }
                let fee = amount * u128::from(self.meta.fee_bps) / BPS;
                let to_node = amount - fee;
                let (Some(node_balance), Some(node_earned)) = (
                    n.balance.checked_add(to_node),
                    n.earned.checked_add(to_node),
                ) else {
                    return Outcome::NoOp("node balance overflows");
                };
                let fee_account = self.accounts[&FEE_SLOT];
                let Some(fee_balance) = fee_account.balance.checked_add(fee) else {
                    return Outcome::NoOp("fee balance overflows");
                };
                self.put(
                    payer,
                    Account {
                        balance: p.balance - amount,
                        ..p
                    },
                );
                self.put(
                    node,
                    Account {
                        balance: node_balance,
                        earned: node_earned,
                        ..n
                    },
                );
                if fee > 0 {
                    self.put(
                        FEE_SLOT,
                        Account {
                            balance: fee_balance,
                            earned: fee_account.earned + fee,
                            ..fee_account
                        },
                    );
                }
                Outcome::Applied
            }
        }
    }

    /// Sum of every balance: conserved by settlements, raised only by deposits.
    pub fn total_balance(&self) -> u128 {
        self.accounts.values().map(|a| a.balance).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const FEE_OWNER: Address = [0xfe; 20];
    const DOMAIN: H256 = [0xd0; 32];

    fn key(n: u8) -> k256::ecdsa::SigningKey {
        k256::ecdsa::SigningKey::from_bytes(&[n; 32].into()).expect("key")
    }

    fn address_of(k: &k256::ecdsa::SigningKey) -> Address {
        let point = k.verifying_key().to_encoded_point(false);
        let mut a = [0u8; 20];
        a.copy_from_slice(&keccak256(&point.as_bytes()[1..])[12..]);
        a
    }

    fn sign(k: &k256::ecdsa::SigningKey, digest: &H256) -> [u8; 65] {
        let (sig, id) = k.sign_prehash_recoverable(digest).expect("sign");
        let mut out = [0u8; 65];
        out[..64].copy_from_slice(&sig.to_bytes());
        out[64] = 27 + id.to_byte();
        out
    }

    #[test]
    fn a_signed_withdrawal_moves_balance_to_withdrawn_once() {
        let owner = key(7);
        let mut s = State::genesis(DOMAIN, 0, FEE_OWNER);
        s.apply(&Tx::Deposit {
            seq: 0,
            address: address_of(&owner),
            amount: 500,
        });
        let slot = FIRST_ACCOUNT_SLOT;
        let withdraw = |k: &k256::ecdsa::SigningKey, amount, nonce, domain: &H256| Tx::Withdraw {
            slot,
            amount,
            nonce,
            signature: sign(k, &withdraw_digest(domain, slot, amount, nonce)),
        };
        let tx = withdraw(&owner, 200, 0, &DOMAIN);
        assert_eq!(s.apply(&tx), Outcome::Applied);
        let a = s.account(slot).copied().expect("account");
        assert_eq!((a.balance, a.withdrawn, a.nonce), (300, 200, 1));
        let root = s.root();
        assert_eq!(
            s.apply(&tx),
            Outcome::NoOp("wrong nonce"),
            "a replay does nothing"
        );
        assert_eq!(
            s.apply(&withdraw(&key(8), 10, 1, &DOMAIN)),
            Outcome::NoOp("not signed by the account's owner")
        );
        assert_eq!(
            s.apply(&withdraw(&owner, 10, 1, &[0; 32])),
            Outcome::NoOp("not signed by the account's owner"),
            "a signature for another deployment does not apply here"
        );
        assert_eq!(
            s.apply(&withdraw(&owner, 301, 1, &DOMAIN)),
            Outcome::NoOp("balance too low")
        );
        assert_eq!(s.root(), root);
        // The same signature with s flipped to the high half (still valid ECDSA) is refused,
        // as the contract's ECDSA.recover refuses it.
        let Tx::Withdraw { mut signature, .. } = withdraw(&owner, 10, 1, &DOMAIN) else {
            unreachable!()
        };
        let sig = k256::ecdsa::Signature::from_slice(&signature[..64]).expect("sig");
        let (r, s_low) = sig.split_scalars();
        let high =
            k256::ecdsa::Signature::from_scalars(r.to_bytes(), (-*s_low).to_bytes()).expect("high");
        signature[..64].copy_from_slice(&high.to_bytes());
        signature[64] ^= 1;
        let digest = withdraw_digest(&DOMAIN, slot, 10, 1);
        assert_eq!(recover(&digest, &signature), None);
        signature[64] = 29;
        assert_eq!(recover(&digest, &signature), None, "v must be 27 or 28");
    }

    fn addr(n: u8) -> Address {
        [n; 20]
    }

    #[test]
    fn deposits_apply_in_queue_order_and_assign_slots_on_first_sight() {
        let mut s = State::genesis(DOMAIN, 100, FEE_OWNER);
        let genesis = s.root();
        let d = |seq, a, amount| Tx::Deposit {
            seq,
            address: addr(a),
            amount,
        };
        assert_eq!(
            s.apply(&d(1, 1, 10)),
            Outcome::NoOp("deposit out of queue order")
        );
        assert_eq!(s.root(), genesis, "a no-op leaves the root alone");
        assert_eq!(s.apply(&d(0, 1, 10)), Outcome::Applied);
        assert_eq!(s.apply(&d(1, 2, 5)), Outcome::Applied);
        assert_eq!(s.apply(&d(2, 1, 7)), Outcome::Applied);
        assert_eq!(
            s.apply(&d(2, 1, 7)),
            Outcome::NoOp("deposit out of queue order"),
            "a replayed deposit does nothing"
        );
        assert_eq!(s.slot_of(&addr(1)), Some(FIRST_ACCOUNT_SLOT));
        assert_eq!(s.slot_of(&addr(2)), Some(FIRST_ACCOUNT_SLOT + 1));
        assert_eq!(s.account(FIRST_ACCOUNT_SLOT).map(|a| a.balance), Some(17));
        assert_eq!(
            s.meta(),
            Meta {
                deposits: 3,
                next_slot: FIRST_ACCOUNT_SLOT + 2,
                fee_bps: 100
            }
        );
        // Every leaf is provable against the root.
        let root = s.root();
        let acct = s.account(FIRST_ACCOUNT_SLOT).copied().expect("account");
        assert!(s
            .tree()
            .prove(FIRST_ACCOUNT_SLOT)
            .verify(&root, FIRST_ACCOUNT_SLOT, &acct.leaf()));
        assert!(s
            .tree()
            .prove(META_SLOT)
            .verify(&root, META_SLOT, &s.meta().leaf()));
    }

    #[test]
    fn settlement_pays_the_node_less_the_fee_and_records_earnings() {
        let mut s = State::genesis(DOMAIN, 250, FEE_OWNER); // 2.5%
        s.apply(&Tx::Deposit {
            seq: 0,
            address: addr(1),
            amount: 1_000,
        });
        s.apply(&Tx::Deposit {
            seq: 1,
            address: addr(2),
            amount: 0,
        });
        let (payer, node) = (FIRST_ACCOUNT_SLOT, FIRST_ACCOUNT_SLOT + 1);
        let settle = |amount| Tx::Settle {
            payer,
            node,
            amount,
            receipts_root: [7; 32],
        };
        assert_eq!(s.apply(&settle(400)), Outcome::Applied);
        assert_eq!(s.account(payer).map(|a| a.balance), Some(600));
        let n = s.account(node).copied().expect("node");
        assert_eq!((n.balance, n.earned), (390, 390));
        assert_eq!(s.account(FEE_SLOT).map(|a| a.balance), Some(10));
        assert_eq!(
            s.apply(&settle(601)),
            Outcome::NoOp("payer balance too low")
        );
        assert_eq!(
            s.apply(&Tx::Settle {
                payer,
                node: 99,
                amount: 1,
                receipts_root: [0; 32]
            }),
            Outcome::NoOp("unknown account slot")
        );
        assert_eq!(s.total_balance(), 1_000, "settlement conserves balances");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn any_sequence_conserves_money_and_replays_to_the_same_roots(
            fee in 0u16..=10_000,
            txs in proptest::collection::vec(
                prop_oneof![
                    (0u64..12, 1u8..5, 0u128..1_000_000).prop_map(|(seq, a, amount)| Tx::Deposit { seq, address: [a; 20], amount }),
                    (0u32..8, 0u32..8, 0u128..500_000).prop_map(|(payer, node, amount)| Tx::Settle { payer, node, amount, receipts_root: [1; 32] }),
                ],
                0..40,
            ),
        ) {
            let mut a = State::genesis(DOMAIN, fee, FEE_OWNER);
            let mut roots = Vec::new();
            let mut deposited = 0u128;
            for tx in &txs {
                let before = a.root();
                let outcome = a.apply(tx);
                if outcome == Outcome::Applied {
                    if let Tx::Deposit { amount, .. } = tx { deposited += amount; }
                } else {
                    prop_assert_eq!(a.root(), before, "no-ops change nothing");
                }
                roots.push(a.root());
            }
            prop_assert_eq!(a.total_balance(), deposited);
            // Earnings only grow with what nodes (and the fee account) were paid.
            let earned: u128 = (0..a.meta().next_slot).filter_map(|s| a.account(s)).map(|x| x.earned).sum();
            prop_assert!(earned <= deposited);
            // The watchtower's replay: the same function gives the same intermediate roots.
            let mut b = State::genesis(DOMAIN, fee, FEE_OWNER);
            for (tx, root) in txs.iter().zip(&roots) {
                b.apply(tx);
                prop_assert_eq!(&b.root(), root);
            }
        }
    }
}
