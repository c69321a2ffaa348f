//! L2 transactions and their packed wire encoding, the bytes a batch carries on L1 and
//! the settlement contract parses: one type byte, then fixed-size big-endian fields
//! (docs/settlement.md has the table). Transactions an account owner authorises carry a
//! 65-byte signature over the encoding of everything before it.

use crate::leaf::{Address, Reader};
use crate::smt::{keccak256, H256};

/// An L2 transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tx {
    /// Tokens deposited on L1, applied in queue order to the slot L1 assigned.
    Deposit {
        /// Position in the L1 queue.
        seq: u64,
        /// The account slot L1 assigned to `address`.
        slot: u32,
        /// Who is credited.
        address: Address,
        /// Base units.
        amount: u128,
    },
    /// A job's payment, or a netted total of several jobs: payer to node, less the
    /// protocol fee; the node's commission and stake share go to its balance, the
    /// delegators' share to its reward pool.
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
    /// An action authorised by the owner of account `slot`.
    Signed {
        /// The signer's account slot.
        slot: u32,
        /// Must equal the account's nonce.
        nonce: u64,
        /// What to do.
        action: Action,
        /// 65-byte `r ‖ s ‖ v` (v 27/28, low s) over [`Tx::signing_digest`].
        signature: [u8; 65],
    },
    /// Moves a delegation's accrued rewards from the node's pool to the delegator
    /// (anyone may ask: it only pays the owner).
    Claim {
        /// The delegation's slot.
        delegation: u32,
    },
    /// Makes matured unbonding stake spendable (anyone may ask).
    Release {
        /// The account's slot.
        slot: u32,
    },
    /// Takes up to `amount` of a node's own stake (then its unbonding stake) after a
    /// dispute, and burns it.
    Slash {
        /// The node's account slot.
        node: u32,
        /// Base units to take.
        amount: u128,
        /// Hash of the dispute record that justifies it.
        evidence: H256,
    },
    /// Starts the next epoch.
    Epoch {
        /// Must be the current epoch plus one.
        epoch: u64,
    },
}

/// What an account owner can sign.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Balance to cumulative `withdrawn`, which L1 pays against a final root.
    Withdraw {
        /// Base units.
        amount: u128,
    },
    /// Balance to own stake (makes the account a node).
    Stake {
        /// Base units.
        amount: u128,
    },
    /// Own stake to unbonding.
    Unstake {
        /// Base units.
        amount: u128,
    },
    /// Balance to a delegation with `node` (opening the position at `delegation` when
    /// that slot is the next free one).
    Delegate {
        /// The delegation's slot.
        delegation: u32,
        /// The node's account slot.
        node: u32,
        /// Base units.
        amount: u128,
    },
    /// Delegation back to unbonding.
    Undelegate {
        /// The delegation's slot.
        delegation: u32,
        /// Base units.
        amount: u128,
    },
    /// The commission from the next epoch on.
    SetCommission {
        /// Basis points, at most 10,000.
        bps: u16,
    },
}

/// Transaction type bytes, as the contract dispatches on them.
pub mod kind {
    /// [`super::Tx::Deposit`].
    pub const DEPOSIT: u8 = 1;
    /// [`super::Tx::Settle`].
    pub const SETTLE: u8 = 2;
    /// [`super::Action::Withdraw`].
    pub const WITHDRAW: u8 = 3;
    /// [`super::Action::Stake`].
    pub const STAKE: u8 = 4;
    /// [`super::Action::Unstake`].
    pub const UNSTAKE: u8 = 5;
    /// [`super::Action::Delegate`].
    pub const DELEGATE: u8 = 6;
    /// [`super::Action::Undelegate`].
    pub const UNDELEGATE: u8 = 7;
    /// [`super::Action::SetCommission`].
    pub const SET_COMMISSION: u8 = 8;
    /// [`super::Tx::Claim`].
    pub const CLAIM: u8 = 9;
    /// [`super::Tx::Release`].
    pub const RELEASE: u8 = 10;
    /// [`super::Tx::Slash`].
    pub const SLASH: u8 = 11;
    /// [`super::Tx::Epoch`].
    pub const EPOCH: u8 = 12;
}

/// Bytes of a signature.
pub const SIGNATURE_LEN: usize = 65;

/// The encoded length of a transaction of type `kind`, or `None` for an unknown type.
pub fn encoded_len(kind: u8) -> Option<usize> {
    const SIGNED_HEAD: usize = 1 + 4 + 8;
    Some(match kind {
        kind::DEPOSIT => 1 + 8 + 4 + 20 + 16,
        kind::SETTLE => 1 + 4 + 4 + 16 + 32,
        kind::WITHDRAW | kind::STAKE | kind::UNSTAKE => SIGNED_HEAD + 16 + SIGNATURE_LEN,
        kind::DELEGATE => SIGNED_HEAD + 4 + 4 + 16 + SIGNATURE_LEN,
        kind::UNDELEGATE => SIGNED_HEAD + 4 + 16 + SIGNATURE_LEN,
        kind::SET_COMMISSION => SIGNED_HEAD + 2 + SIGNATURE_LEN,
        kind::CLAIM | kind::RELEASE => 1 + 4,
        kind::SLASH => 1 + 4 + 16 + 32,
        kind::EPOCH => 1 + 8,
        _ => return None,
    })
}

/// Why bytes are not a transaction.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The type byte names no transaction.
    #[error("unknown transaction type {kind} at byte {at}")]
    UnknownType {
        /// The byte.
        kind: u8,
        /// Its offset.
        at: usize,
    },
    /// The data ends inside a transaction.
    #[error("transaction of type {kind} at byte {at} needs {need} bytes, {have} left")]
    Truncated {
        /// The type byte.
        kind: u8,
        /// Offset of the transaction.
        at: usize,
        /// Its encoded length.
        need: usize,
        /// Bytes left.
        have: usize,
    },
    /// The data is empty where a transaction was expected.
    #[error("no transaction")]
    Empty,
}

impl Tx {
    /// The type byte.
    pub fn kind(&self) -> u8 {
        match self {
            Tx::Deposit { .. } => kind::DEPOSIT,
            Tx::Settle { .. } => kind::SETTLE,
            Tx::Signed { action, .. } => match action {
                Action::Withdraw { .. } => kind::WITHDRAW,
                Action::Stake { .. } => kind::STAKE,
                Action::Unstake { .. } => kind::UNSTAKE,
                Action::Delegate { .. } => kind::DELEGATE,
                Action::Undelegate { .. } => kind::UNDELEGATE,
                Action::SetCommission { .. } => kind::SET_COMMISSION,
            },
            Tx::Claim { .. } => kind::CLAIM,
            Tx::Release { .. } => kind::RELEASE,
            Tx::Slash { .. } => kind::SLASH,
            Tx::Epoch { .. } => kind::EPOCH,
        }
    }

    /// The packed wire encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(encoded_len(self.kind()).unwrap_or(0));
        self.encode_unsigned(&mut b);
        if let Tx::Signed { signature, .. } = self {
            b.extend_from_slice(signature);
        }
        b
    }

    /// Everything before the signature (all of it for unsigned transactions).
    fn encode_unsigned(&self, b: &mut Vec<u8>) {
        b.push(self.kind());
        match *self {
            Tx::Deposit {
                seq,
                slot,
                address,
                amount,
            } => {
                b.extend_from_slice(&seq.to_be_bytes());
                b.extend_from_slice(&slot.to_be_bytes());
                b.extend_from_slice(&address);
                b.extend_from_slice(&amount.to_be_bytes());
            }
            Tx::Settle {
                payer,
                node,
                amount,
                receipts_root,
            } => {
                b.extend_from_slice(&payer.to_be_bytes());
                b.extend_from_slice(&node.to_be_bytes());
                b.extend_from_slice(&amount.to_be_bytes());
                b.extend_from_slice(&receipts_root);
            }
            Tx::Signed {
                slot,
                nonce,
                action,
                ..
            } => {
                b.extend_from_slice(&slot.to_be_bytes());
                b.extend_from_slice(&nonce.to_be_bytes());
                match action {
                    Action::Withdraw { amount }
                    | Action::Stake { amount }
                    | Action::Unstake { amount } => b.extend_from_slice(&amount.to_be_bytes()),
                    Action::Delegate {
                        delegation,
                        node,
                        amount,
                    } => {
                        b.extend_from_slice(&delegation.to_be_bytes());
                        b.extend_from_slice(&node.to_be_bytes());
                        b.extend_from_slice(&amount.to_be_bytes());
                    }
                    Action::Undelegate { delegation, amount } => {
                        b.extend_from_slice(&delegation.to_be_bytes());
                        b.extend_from_slice(&amount.to_be_bytes());
                    }
                    Action::SetCommission { bps } => b.extend_from_slice(&bps.to_be_bytes()),
                }
            }
            Tx::Claim { delegation } => b.extend_from_slice(&delegation.to_be_bytes()),
            Tx::Release { slot } => b.extend_from_slice(&slot.to_be_bytes()),
            Tx::Slash {
                node,
                amount,
                evidence,
            } => {
                b.extend_from_slice(&node.to_be_bytes());
                b.extend_from_slice(&amount.to_be_bytes());
                b.extend_from_slice(&evidence);
            }
            Tx::Epoch { epoch } => b.extend_from_slice(&epoch.to_be_bytes()),
        }
    }

    /// Reads the transaction at the front of `data`; returns it and its length.
    pub fn decode(data: &[u8]) -> Result<(Tx, usize), DecodeError> {
        Self::decode_at(data, 0)
    }

    fn decode_at(data: &[u8], at: usize) -> Result<(Tx, usize), DecodeError> {
        let Some(&kind) = data.first() else {
            return Err(DecodeError::Empty);
        };
        let need = encoded_len(kind).ok_or(DecodeError::UnknownType { kind, at })?;
        if data.len() < need {
            return Err(DecodeError::Truncated {
                kind,
                at,
                need,
                have: data.len(),
            });
        }
        let mut r = Reader::new(&data[1..need]);
        let signed = |r: &mut Reader, action: fn(&mut Reader) -> Action| {
            let slot = r.u32();
            let nonce = r.u64();
            let action = action(r);
            Tx::Signed {
                slot,
                nonce,
                action,
                signature: r.take(),
            }
        };
        let tx = match kind {
            kind::DEPOSIT => Tx::Deposit {
                seq: r.u64(),
                slot: r.u32(),
                address: r.address(),
                amount: r.u128(),
            },
            kind::SETTLE => Tx::Settle {
                payer: r.u32(),
                node: r.u32(),
                amount: r.u128(),
                receipts_root: r.take(),
            },
            kind::WITHDRAW => signed(&mut r, |r| Action::Withdraw { amount: r.u128() }),
            kind::STAKE => signed(&mut r, |r| Action::Stake { amount: r.u128() }),
            kind::UNSTAKE => signed(&mut r, |r| Action::Unstake { amount: r.u128() }),
            kind::DELEGATE => signed(&mut r, |r| Action::Delegate {
                delegation: r.u32(),
                node: r.u32(),
                amount: r.u128(),
            }),
            kind::UNDELEGATE => signed(&mut r, |r| Action::Undelegate {
                delegation: r.u32(),
                amount: r.u128(),
            }),
            kind::SET_COMMISSION => signed(&mut r, |r| Action::SetCommission { bps: r.u16() }),
            kind::CLAIM => Tx::Claim {
                delegation: r.u32(),
            },
            kind::RELEASE => Tx::Release { slot: r.u32() },
            kind::SLASH => Tx::Slash {
                node: r.u32(),
                amount: r.u128(),
                evidence: r.take(),
            },
            kind::EPOCH => Tx::Epoch { epoch: r.u64() },
            _ => unreachable!("encoded_len knows every type"),
        };
        Ok((tx, need))
    }

    /// Reads a batch's transaction data: transactions back to back.
    pub fn decode_all(mut data: &[u8]) -> Result<Vec<Tx>, DecodeError> {
        let mut txs = Vec::new();
        let mut at = 0;
        while !data.is_empty() {
            let (tx, len) = Self::decode_at(data, at)?;
            txs.push(tx);
            data = &data[len..];
            at += len;
        }
        Ok(txs)
    }

    /// Encodes transactions back to back, as a batch carries them.
    pub fn encode_all(txs: &[Tx]) -> Vec<u8> {
        txs.iter().flat_map(Tx::encode).collect()
    }

    /// What the owner signs for a [`Tx::Signed`]: EIP-191's `personal_sign` of
    /// `keccak256("tessera/tx/1" ‖ domain ‖ encoding without the signature)`, where
    /// `domain` names the deployment (chain id and settlement contract), so a signature
    /// is good on one rollup only. `None` for unsigned transactions.
    pub fn signing_digest(&self, domain: &H256) -> Option<H256> {
        let Tx::Signed { .. } = self else {
            return None;
        };
        let mut m = Vec::with_capacity(12 + 32 + 64);
        m.extend_from_slice(b"tessera/tx/1");
        m.extend_from_slice(domain);
        self.encode_unsigned(&mut m);
        Some(personal_digest(&keccak256(&m)))
    }
}

/// EIP-191 `personal_sign` of a 32-byte message, as wallets and OpenZeppelin's
/// `MessageHashUtils.toEthSignedMessageHash` compute it.
pub fn personal_digest(message: &H256) -> H256 {
    let mut p = Vec::with_capacity(28 + 32);
    p.extend_from_slice(b"\x19Ethereum Signed Message:\n32");
    p.extend_from_slice(message);
    keccak256(&p)
}

/// The address that signed `digest`, as the EVM's `ecrecover` behind OpenZeppelin's
/// checks finds it; `None` for a malformed, high-s or non-27/28-v signature.
pub fn recover(digest: &H256, signature: &[u8; 65]) -> Option<Address> {
    use k256::ecdsa::{RecoveryId, Signature, VerifyingKey};
    let v = signature[64].checked_sub(27)?;
    let id = RecoveryId::from_byte(v).filter(|_| v <= 1)?;
    let sig = Signature::from_slice(&signature[..64]).ok()?;
    if sig.normalize_s().is_some() {
        return None;
    }
    let key = VerifyingKey::recover_from_prehash(digest, &sig, id).ok()?;
    Some(address_of(&key))
}

/// The EVM address of a secp256k1 public key.
pub fn address_of(key: &k256::ecdsa::VerifyingKey) -> Address {
    let point = key.to_encoded_point(false);
    let hash = keccak256(&point.as_bytes()[1..]);
    let mut address = [0u8; 20];
    address.copy_from_slice(&hash[12..]);
    address
}

/// Signs `digest` as a wallet would: 65 bytes, low s, v 27/28.
pub fn sign_digest(key: &k256::ecdsa::SigningKey, digest: &H256) -> [u8; 65] {
    // k256 signs with low s (RFC 6979, normalised), as the contract requires.
    let (sig, id) = key
        .sign_prehash_recoverable(digest)
        .expect("a 32-byte prehash always signs");
    let mut out = [0u8; 65];
    out[..64].copy_from_slice(&sig.to_bytes());
    out[64] = 27 + id.to_byte();
    out
}

impl Tx {
    /// A signed transaction for the owner `key` of account `slot`.
    pub fn sign(
        key: &k256::ecdsa::SigningKey,
        domain: &H256,
        slot: u32,
        nonce: u64,
        action: Action,
    ) -> Tx {
        let mut tx = Tx::Signed {
            slot,
            nonce,
            action,
            signature: [0; 65],
        };
        let digest = tx.signing_digest(domain).expect("signed");
        if let Tx::Signed { signature, .. } = &mut tx {
            *signature = sign_digest(key, &digest);
        }
        tx
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn any_tx() -> impl Strategy<Value = Tx> {
        let amount = prop_oneof![0u128..1_000_000, any::<u128>()];
        let action = prop_oneof![
            amount
                .clone()
                .prop_map(|amount| Action::Withdraw { amount }),
            amount.clone().prop_map(|amount| Action::Stake { amount }),
            amount.clone().prop_map(|amount| Action::Unstake { amount }),
            (any::<u32>(), any::<u32>(), amount.clone()).prop_map(|(delegation, node, amount)| {
                Action::Delegate {
                    delegation,
                    node,
                    amount,
                }
            }),
            (any::<u32>(), amount.clone())
                .prop_map(|(delegation, amount)| Action::Undelegate { delegation, amount }),
            any::<u16>().prop_map(|bps| Action::SetCommission { bps }),
        ];
        prop_oneof![
            (
                any::<u64>(),
                any::<u32>(),
                any::<[u8; 20]>(),
                amount.clone()
            )
                .prop_map(|(seq, slot, address, amount)| Tx::Deposit {
                    seq,
                    slot,
                    address,
                    amount
                }),
            (
                any::<u32>(),
                any::<u32>(),
                amount.clone(),
                any::<[u8; 32]>()
            )
                .prop_map(|(payer, node, amount, receipts_root)| Tx::Settle {
                    payer,
                    node,
                    amount,
                    receipts_root
                }),
            (
                any::<u32>(),
                any::<u64>(),
                action,
                proptest::collection::vec(any::<u8>(), 65)
            )
                .prop_map(|(slot, nonce, action, sig)| Tx::Signed {
                    slot,
                    nonce,
                    action,
                    signature: sig.try_into().expect("65"),
                }),
            any::<u32>().prop_map(|delegation| Tx::Claim { delegation }),
            any::<u32>().prop_map(|slot| Tx::Release { slot }),
            (any::<u32>(), amount, any::<[u8; 32]>()).prop_map(|(node, amount, evidence)| {
                Tx::Slash {
                    node,
                    amount,
                    evidence,
                }
            }),
            any::<u64>().prop_map(|epoch| Tx::Epoch { epoch }),
        ]
    }

    proptest! {
        #[test]
        fn every_transaction_round_trips_and_has_its_type_length(txs in proptest::collection::vec(any_tx(), 0..20)) {
            for tx in &txs {
                let b = tx.encode();
                prop_assert_eq!(Some(b.len()), encoded_len(tx.kind()));
                prop_assert_eq!(Tx::decode(&b), Ok((tx.clone(), b.len())));
            }
            let all = Tx::encode_all(&txs);
            prop_assert_eq!(Tx::decode_all(&all), Ok(txs));
        }

        #[test]
        fn garbage_is_an_error_never_a_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Tx::decode_all(&data);
        }
    }

    #[test]
    fn truncated_and_unknown_data_say_where() {
        let tx = Tx::Epoch { epoch: 1 };
        let mut b = Tx::encode_all(&[tx.clone(), tx]);
        b.pop();
        assert_eq!(
            Tx::decode_all(&b),
            Err(DecodeError::Truncated {
                kind: kind::EPOCH,
                at: 9,
                need: 9,
                have: 8
            })
        );
        assert_eq!(
            Tx::decode_all(&[0x7f]),
            Err(DecodeError::UnknownType { kind: 0x7f, at: 0 })
        );
    }

    #[test]
    fn a_signature_recovers_its_signer_and_binds_the_deployment() {
        let key = k256::ecdsa::SigningKey::from_bytes(&[7; 32].into()).expect("key");
        let me = address_of(key.verifying_key());
        let domain = [0xd0; 32];
        let tx = Tx::sign(&key, &domain, 5, 0, Action::Stake { amount: 10 });
        let Tx::Signed { signature, .. } = &tx else {
            unreachable!()
        };
        let digest = tx.signing_digest(&domain).expect("digest");
        assert_eq!(recover(&digest, signature), Some(me));
        let elsewhere = tx.signing_digest(&[0; 32]).expect("digest");
        assert_ne!(recover(&elsewhere, signature), Some(me));
        // The same signature with s flipped to the high half (still valid ECDSA) is
        // refused, as the contract's check refuses it; so is a v other than 27/28.
        let sig = k256::ecdsa::Signature::from_slice(&signature[..64]).expect("sig");
        let (r, s) = sig.split_scalars();
        let high =
            k256::ecdsa::Signature::from_scalars(r.to_bytes(), (-*s).to_bytes()).expect("high");
        let mut flipped = *signature;
        flipped[..64].copy_from_slice(&high.to_bytes());
        flipped[64] ^= 1;
        assert_eq!(recover(&digest, &flipped), None);
        let mut bad_v = *signature;
        bad_v[64] = 29;
        assert_eq!(recover(&digest, &bad_v), None);
        // A known vector: the well-known test key 0x…01's address.
        let one = k256::ecdsa::SigningKey::from_bytes(&{
            let mut k = [0u8; 32];
            k[31] = 1;
            k.into()
        })
        .expect("key");
        assert_eq!(
            hex::encode(address_of(one.verifying_key())),
            "7e5f4552091a69125d5dfcb7b8c2659029395bdf"
        );
    }
}
