//! The three kinds of leaf in the state tree and their packed encodings. A leaf's value
//! in the tree is keccak256 of its encoding (an empty slot is 32 zero bytes); the
//! settlement contract decodes the same bytes in a fraud proof or a withdrawal, so the
//! layout here is the contract's layout, field for field (docs/settlement.md).

use crate::smt::{keccak256, H256};
use ethnum::U256;

/// An EVM address.
pub type Address = [u8; 20];

/// Slot of the meta leaf.
pub const META_SLOT: u32 = 0;
/// Slot of the protocol fee account.
pub const FEE_SLOT: u32 = 1;
/// First slot the L1 contract assigns to a depositor.
pub const FIRST_ACCOUNT_SLOT: u32 = 2;
/// First delegation slot; accounts live below it.
pub const DELEGATION_BASE: u32 = 1 << 31;
/// Basis points in one whole.
pub const BPS: u128 = 10_000;
/// Fixed-point scale of a node's reward-per-delegated-token accumulator.
pub const SCALE: u128 = 1_000_000_000_000_000_000;

/// Whether `slot` can hold an account (the fee account or an L1-assigned slot).
pub fn is_account_slot(slot: u32) -> bool {
    (FEE_SLOT..DELEGATION_BASE).contains(&slot)
}

/// Whether `slot` can hold a delegation.
pub fn is_delegation_slot(slot: u32) -> bool {
    (DELEGATION_BASE..u32::MAX).contains(&slot)
}

/// Counters and parameters the transition reads: slot 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Meta {
    /// Deposits applied from the L1 queue; the next must carry this sequence number.
    pub deposits: u64,
    /// The current epoch (commission changes and unbonding count in epochs).
    pub epoch: u64,
    /// The slot the next new delegation gets.
    pub next_delegation: u32,
    /// Stake destroyed by slashes (kept so the books balance).
    pub burned: u128,
    /// Protocol fee on settlements, in basis points.
    pub fee_bps: u16,
    /// Epochs between unstaking and the stake becoming spendable.
    pub unbonding_epochs: u16,
}

/// Bytes in a meta leaf's encoding.
pub const META_LEN: usize = 1 + 8 + 8 + 4 + 16 + 2 + 2;

impl Meta {
    /// The packed encoding whose keccak256 is the leaf.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(META_LEN);
        b.push(0);
        b.extend_from_slice(&self.deposits.to_be_bytes());
        b.extend_from_slice(&self.epoch.to_be_bytes());
        b.extend_from_slice(&self.next_delegation.to_be_bytes());
        b.extend_from_slice(&self.burned.to_be_bytes());
        b.extend_from_slice(&self.fee_bps.to_be_bytes());
        b.extend_from_slice(&self.unbonding_epochs.to_be_bytes());
        b
    }

    /// Reads an encoding back; `None` unless it is exactly a meta leaf.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let mut r = Reader::tagged(b, 0, META_LEN)?;
        Some(Self {
            deposits: r.u64(),
            epoch: r.u64(),
            next_delegation: r.u32(),
            burned: r.u128(),
            fee_bps: r.u16(),
            unbonding_epochs: r.u16(),
        })
    }

    /// The leaf hash.
    pub fn leaf(&self) -> H256 {
        keccak256(&self.encode())
    }
}

/// An account: a developer who pays, a node that earns, a token holder who delegates, or
/// all three. A node is an account with stake; its delegators' rewards accrue to `pool`
/// through the accumulator `reward_per_token`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Account {
    /// The L1 address that owns it.
    pub address: Address,
    /// Spendable base units.
    pub balance: u128,
    /// Signed transactions applied.
    pub nonce: u64,
    /// Everything ever credited as income: job earnings, commission, claimed delegation
    /// rewards, fees (cumulative, so one proof covers every epoch).
    pub earned: u128,
    /// Everything ever moved out to L1 (cumulative; L1 pays the part it has not paid).
    pub withdrawn: u128,
    /// The node's own bonded stake.
    pub stake: u128,
    /// Stake or delegation on its way out, spendable from `unbond_epoch`.
    pub unbonding: u128,
    /// Epoch from which `unbonding` can be released.
    pub unbond_epoch: u64,
    /// Total delegated to this node by others.
    pub delegated: u128,
    /// Commission in force until `next_commission_epoch`, in basis points.
    pub commission_bps: u16,
    /// Commission from `next_commission_epoch` on.
    pub next_commission_bps: u16,
    /// The epoch the next commission applies from.
    pub next_commission_epoch: u64,
    /// Delegators' rewards per delegated base unit, times [`SCALE`] (cumulative).
    pub reward_per_token: U256,
    /// Delegators' rewards not yet claimed (claims take from it, rounding dust stays).
    pub pool: u128,
}

/// Bytes in an account leaf's encoding.
pub const ACCOUNT_LEN: usize = 1 + 20 + 16 + 8 + 16 + 16 + 16 + 16 + 8 + 16 + 2 + 2 + 8 + 32 + 16;

impl Account {
    /// A fresh account owned by `address`.
    pub fn new(address: Address) -> Self {
        Self {
            address,
            ..Self::default()
        }
    }

    /// The commission that applies in `epoch`.
    pub fn commission_at(&self, epoch: u64) -> u16 {
        if epoch >= self.next_commission_epoch {
            self.next_commission_bps
        } else {
            self.commission_bps
        }
    }

    /// The packed encoding whose keccak256 is the leaf.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(ACCOUNT_LEN);
        b.push(1);
        b.extend_from_slice(&self.address);
        b.extend_from_slice(&self.balance.to_be_bytes());
        b.extend_from_slice(&self.nonce.to_be_bytes());
        b.extend_from_slice(&self.earned.to_be_bytes());
        b.extend_from_slice(&self.withdrawn.to_be_bytes());
        b.extend_from_slice(&self.stake.to_be_bytes());
        b.extend_from_slice(&self.unbonding.to_be_bytes());
        b.extend_from_slice(&self.unbond_epoch.to_be_bytes());
        b.extend_from_slice(&self.delegated.to_be_bytes());
        b.extend_from_slice(&self.commission_bps.to_be_bytes());
        b.extend_from_slice(&self.next_commission_bps.to_be_bytes());
        b.extend_from_slice(&self.next_commission_epoch.to_be_bytes());
        b.extend_from_slice(&self.reward_per_token.to_be_bytes());
        b.extend_from_slice(&self.pool.to_be_bytes());
        b
    }

    /// Reads an encoding back; `None` unless it is exactly an account leaf.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let mut r = Reader::tagged(b, 1, ACCOUNT_LEN)?;
        Some(Self {
            address: r.address(),
            balance: r.u128(),
            nonce: r.u64(),
            earned: r.u128(),
            withdrawn: r.u128(),
            stake: r.u128(),
            unbonding: r.u128(),
            unbond_epoch: r.u64(),
            delegated: r.u128(),
            commission_bps: r.u16(),
            next_commission_bps: r.u16(),
            next_commission_epoch: r.u64(),
            reward_per_token: r.u256(),
            pool: r.u128(),
        })
    }

    /// The leaf hash.
    pub fn leaf(&self) -> H256 {
        keccak256(&self.encode())
    }
}

/// One delegator's position with one node.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delegation {
    /// The delegator's account slot.
    pub delegator: u32,
    /// The node's account slot.
    pub node: u32,
    /// Base units delegated.
    pub amount: u128,
    /// The node's `reward_per_token` when this position last claimed.
    pub reward_snapshot: U256,
    /// Rewards claimed from this node (cumulative).
    pub earned: u128,
}

/// Bytes in a delegation leaf's encoding.
pub const DELEGATION_LEN: usize = 1 + 4 + 4 + 16 + 32 + 16;

impl Delegation {
    /// Rewards accrued since the last claim (before the pool's cap).
    pub fn accrued(&self, node: &Account) -> U256 {
        let per_token = node.reward_per_token.saturating_sub(self.reward_snapshot);
        // amount < 2^128 and per_token < 2^256 / 2^128 in any reachable state, but keep
        // the product total: wrapping would be a divergence from the contract's checked
        // arithmetic, saturation is what both compute (see `mul_div`).
        mul_div_u256(U256::from(self.amount), per_token, U256::from(SCALE))
    }

    /// The packed encoding whose keccak256 is the leaf.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(DELEGATION_LEN);
        b.push(2);
        b.extend_from_slice(&self.delegator.to_be_bytes());
        b.extend_from_slice(&self.node.to_be_bytes());
        b.extend_from_slice(&self.amount.to_be_bytes());
        b.extend_from_slice(&self.reward_snapshot.to_be_bytes());
        b.extend_from_slice(&self.earned.to_be_bytes());
        b
    }

    /// Reads an encoding back; `None` unless it is exactly a delegation leaf.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let mut r = Reader::tagged(b, 2, DELEGATION_LEN)?;
        Some(Self {
            delegator: r.u32(),
            node: r.u32(),
            amount: r.u128(),
            reward_snapshot: r.u256(),
            earned: r.u128(),
        })
    }

    /// The leaf hash.
    pub fn leaf(&self) -> H256 {
        keccak256(&self.encode())
    }
}

/// `a * b / c` rounded down, for u128 operands: the product fits 256 bits, as in the
/// contract's `uint256`; `None` when `c` is zero or the quotient exceeds u128.
pub fn mul_div(a: u128, b: u128, c: u128) -> Option<u128> {
    if c == 0 {
        return None;
    }
    let q = U256::from(a) * U256::from(b) / U256::from(c);
    u128::try_from(q).ok()
}

/// `a * b / c` over 256 bits, saturating the product at `U256::MAX` (the contract uses
/// the same rule: a product that would overflow is taken as the maximum).
pub fn mul_div_u256(a: U256, b: U256, c: U256) -> U256 {
    if c == U256::ZERO {
        return U256::ZERO;
    }
    a.checked_mul(b).unwrap_or(U256::MAX) / c
}

/// A cursor over a fixed-layout encoding.
pub(crate) struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    /// Starts after the tag byte, if the tag and the total length match.
    fn tagged(b: &'a [u8], tag: u8, len: usize) -> Option<Self> {
        (b.len() == len && b[0] == tag).then_some(Self { b, at: 1 })
    }

    /// Starts at the front of `b` (the caller has checked its length).
    pub(crate) fn new(b: &'a [u8]) -> Self {
        Self { b, at: 0 }
    }

    pub(crate) fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        out.copy_from_slice(&self.b[self.at..self.at + N]);
        self.at += N;
        out
    }

    pub(crate) fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.take())
    }

    pub(crate) fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.take())
    }

    pub(crate) fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.take())
    }

    pub(crate) fn u128(&mut self) -> u128 {
        u128::from_be_bytes(self.take())
    }

    pub(crate) fn u256(&mut self) -> U256 {
        U256::from_be_bytes(self.take())
    }

    pub(crate) fn address(&mut self) -> Address {
        self.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_have_their_documented_lengths_and_read_back() {
        let meta = Meta {
            deposits: 3,
            epoch: 9,
            next_delegation: DELEGATION_BASE + 4,
            burned: 77,
            fee_bps: 250,
            unbonding_epochs: 2,
        };
        assert_eq!(meta.encode().len(), META_LEN);
        assert_eq!(Meta::decode(&meta.encode()), Some(meta));
        let account = Account {
            address: [5; 20],
            balance: 1,
            nonce: 2,
            earned: 3,
            withdrawn: 4,
            stake: 5,
            unbonding: 6,
            unbond_epoch: 7,
            delegated: 8,
            commission_bps: 9,
            next_commission_bps: 10,
            next_commission_epoch: 11,
            reward_per_token: U256::from(12u8) << 200,
            pool: 13,
        };
        assert_eq!(account.encode().len(), ACCOUNT_LEN);
        assert_eq!(Account::decode(&account.encode()), Some(account));
        let d = Delegation {
            delegator: 2,
            node: 3,
            amount: 4,
            reward_snapshot: U256::MAX,
            earned: 5,
        };
        assert_eq!(d.encode().len(), DELEGATION_LEN);
        assert_eq!(Delegation::decode(&d.encode()), Some(d));
        // A leaf of one kind never reads as another.
        assert_eq!(Account::decode(&meta.encode()), None);
        assert_eq!(Delegation::decode(&account.encode()), None);
        assert_eq!(Meta::decode(&[]), None);
    }

    #[test]
    fn mul_div_is_exact_over_256_bits() {
        assert_eq!(mul_div(u128::MAX, u128::MAX, u128::MAX), Some(u128::MAX));
        assert_eq!(mul_div(u128::MAX, 2, 1), None);
        assert_eq!(mul_div(7, 3, 2), Some(10));
        assert_eq!(mul_div(1, 1, 0), None);
        assert_eq!(
            mul_div_u256(U256::MAX, U256::from(2u8), U256::ONE),
            U256::MAX
        );
    }
}
