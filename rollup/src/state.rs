//! The L2 state and its one pure transition function, which the sequencer, the
//! watchtower and the fraud-proof builder all call, and which the settlement contract
//! mirrors for a single-step fraud proof.
//!
//! A transaction that does not apply (out-of-order deposit, short balance, bad
//! signature, unknown slot …) is a no-op: the transition is total, so a fraud proof can
//! re-execute any transaction a batch carries and compare roots.
//!
//! Each transaction reads and writes a fixed, ordered list of leaves, its *witness
//! slots* ([`State::witness_slots`]): the meta leaf first, then the accounts and
//! delegations it names. A fraud proof carries those leaves' encodings with Merkle
//! proofs, each against the root after the writes to the leaves before it; the contract
//! checks each old leaf against the running root and folds the new leaf in.

use crate::leaf::{
    is_account_slot, is_delegation_slot, mul_div, mul_div_u256, Account, Address, Delegation, Meta,
    BPS, DELEGATION_BASE, FEE_SLOT, META_SLOT, SCALE,
};
use crate::smt::{keccak256, MerkleProof, SparseMerkleTree, H256};
use crate::tx::{recover, Action, Tx};
use ethnum::U256;
use std::collections::HashMap;

/// What applying a transaction did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Applied.
    Applied,
    /// Not applicable; the state is unchanged. Says why.
    NoOp(&'static str),
}

/// The L1 deposit queue as the transition sees it: the hash of entry `seq`, if L1 has it.
pub trait DepositQueue {
    /// `deposit_hash` of the entry at `seq`.
    fn deposit(&self, seq: u64) -> Option<H256>;
}

impl DepositQueue for [H256] {
    fn deposit(&self, seq: u64) -> Option<H256> {
        usize::try_from(seq).ok().and_then(|i| self.get(i)).copied()
    }
}

impl DepositQueue for Vec<H256> {
    fn deposit(&self, seq: u64) -> Option<H256> {
        self.as_slice().deposit(seq)
    }
}

/// The hash L1 stores for each queued deposit: `keccak256(slot ‖ address ‖ amount)`.
pub fn deposit_hash(slot: u32, address: &Address, amount: u128) -> H256 {
    let mut b = Vec::with_capacity(40);
    b.extend_from_slice(&slot.to_be_bytes());
    b.extend_from_slice(address);
    b.extend_from_slice(&amount.to_be_bytes());
    keccak256(&b)
}

/// A leaf's new value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Write {
    Meta(Meta),
    Account(u32, Account),
    Delegation(u32, Delegation),
}

impl Write {
    fn slot(&self) -> u32 {
        match self {
            Write::Meta(_) => META_SLOT,
            Write::Account(s, _) | Write::Delegation(s, _) => *s,
        }
    }

    fn leaf(&self) -> H256 {
        match self {
            Write::Meta(m) => m.leaf(),
            Write::Account(_, a) => a.leaf(),
            Write::Delegation(_, d) => d.leaf(),
        }
    }
}

/// One leaf of a fraud proof: its slot, its encoding before the transaction (empty for
/// an empty slot) and its proof against the running root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Witness {
    /// The slot.
    pub slot: u32,
    /// The leaf's encoding before the transaction; empty for an empty slot.
    pub preimage: Vec<u8>,
    /// Proof against the root after the writes to the witnesses before this one.
    pub proof: MerkleProof,
}

type Step = Result<Vec<Write>, &'static str>;

/// How one settlement divides (docs/settlement.md, "settle"), with the inputs each part
/// is computed from, so a statement row can be recomputed with integer arithmetic:
/// `fee = amount·fee_bps/10⁴`, `commission = (amount−fee)·commission_bps/10⁴`,
/// `delegators = (amount−fee−commission)·delegated/(stake+delegated)`, the rest the
/// node's own stake share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SettleSplit {
    /// The epoch whose rates applied.
    pub epoch: u64,
    /// What the payer paid.
    pub amount: u128,
    /// The protocol fee rate.
    pub fee_bps: u16,
    /// The protocol's part.
    pub fee: u128,
    /// The node's commission rate in force in `epoch`.
    pub commission_bps: u16,
    /// The node's commission.
    pub commission: u128,
    /// The node's own stake then.
    pub stake: u128,
    /// Stake delegated to it then.
    pub delegated: u128,
    /// The node's own stake share (the rounding remainder included).
    pub self_share: u128,
    /// The delegators' share, into the node's pool.
    pub delegators: u128,
}

/// The whole L2 state, and the tree that commits to it.
#[derive(Clone, Debug)]
pub struct State {
    meta: Meta,
    domain: H256,
    accounts: HashMap<u32, Account>,
    delegations: HashMap<u32, Delegation>,
    slot_of: HashMap<Address, u32>,
    tree: SparseMerkleTree,
}

impl State {
    /// A fresh state for the deployment `domain` (see [`Tx::signing_digest`]): a
    /// `fee_bps` protocol fee paid to `fee_owner`'s fee account, and stake that unbonds
    /// in `unbonding_epochs`.
    pub fn genesis(domain: H256, fee_bps: u16, unbonding_epochs: u16, fee_owner: Address) -> Self {
        let mut s = Self {
            domain,
            meta: Meta {
                deposits: 0,
                epoch: 0,
                next_delegation: DELEGATION_BASE,
                burned: 0,
                fee_bps: fee_bps.min(BPS as u16),
                unbonding_epochs,
            },
            accounts: HashMap::new(),
            delegations: HashMap::new(),
            slot_of: HashMap::new(),
            tree: SparseMerkleTree::new(),
        };
        s.write(Write::Meta(s.meta));
        s.write(Write::Account(FEE_SLOT, Account::new(fee_owner)));
        s
    }

    /// The root every leaf is proved against.
    pub fn root(&self) -> H256 {
        self.tree.root()
    }

    /// The deployment this state's signatures are bound to.
    pub fn domain(&self) -> H256 {
        self.domain
    }

    /// The meta leaf's values.
    pub fn meta(&self) -> Meta {
        self.meta
    }

    /// An account by slot.
    pub fn account(&self, slot: u32) -> Option<&Account> {
        self.accounts.get(&slot)
    }

    /// A delegation by slot.
    pub fn delegation(&self, slot: u32) -> Option<&Delegation> {
        self.delegations.get(&slot)
    }

    /// Every account, by slot.
    pub fn accounts(&self) -> impl Iterator<Item = (u32, &Account)> {
        self.accounts.iter().map(|(s, a)| (*s, a))
    }

    /// Every delegation, by slot.
    pub fn delegations(&self) -> impl Iterator<Item = (u32, &Delegation)> {
        self.delegations.iter().map(|(s, d)| (*s, d))
    }

    /// The account slot of an address, if it has one (the fee account's owner may also
    /// hold a depositor slot; that one is returned).
    pub fn slot_of(&self, address: &Address) -> Option<u32> {
        self.slot_of.get(address).copied()
    }

    /// The tree (for proofs).
    pub fn tree(&self) -> &SparseMerkleTree {
        &self.tree
    }

    /// The encoding of the leaf in `slot` (empty for an empty slot).
    pub fn preimage(&self, slot: u32) -> Vec<u8> {
        if slot == META_SLOT {
            self.meta.encode()
        } else if let Some(a) = self.accounts.get(&slot) {
            a.encode()
        } else if let Some(d) = self.delegations.get(&slot) {
            d.encode()
        } else {
            Vec::new()
        }
    }

    fn write(&mut self, w: Write) {
        self.tree.set(w.slot(), w.leaf());
        match w {
            Write::Meta(m) => self.meta = m,
            Write::Account(slot, a) => {
                if slot != FEE_SLOT || !self.slot_of.contains_key(&a.address) {
                    self.slot_of.insert(a.address, slot);
                }
                self.accounts.insert(slot, a);
            }
            Write::Delegation(slot, d) => {
                self.delegations.insert(slot, d);
            }
        }
    }

    /// Applies one transaction: the one pure transition the sequencer, the watchtower and
    /// the fraud-proof builder all call. `queue` is the L1 deposit queue.
    pub fn apply(&mut self, tx: &Tx, queue: &(impl DepositQueue + ?Sized)) -> Outcome {
        match self.transition(tx, queue) {
            Ok(writes) => {
                for w in writes {
                    self.write(w);
                }
                Outcome::Applied
            }
            Err(why) => Outcome::NoOp(why),
        }
    }

    /// The leaves `tx` reads and writes, in the order a fraud proof carries them.
    pub fn witness_slots(&self, tx: &Tx) -> Vec<u32> {
        let mut slots = vec![META_SLOT];
        match *tx {
            Tx::Deposit { slot, .. } | Tx::Release { slot } => slots.push(slot),
            Tx::Settle { payer, node, .. } => slots.extend([payer, node, FEE_SLOT]),
            Tx::Signed { slot, action, .. } => {
                slots.push(slot);
                match action {
                    Action::Delegate {
                        delegation, node, ..
                    } => slots.extend([node, delegation]),
                    Action::Undelegate { delegation, .. } => {
                        slots.push(delegation);
                        if let Some(d) = self.delegation_at(delegation) {
                            slots.push(d.node);
                        }
                    }
                    _ => {}
                }
            }
            Tx::Claim { delegation } => {
                slots.push(delegation);
                if let Some(d) = self.delegation_at(delegation) {
                    slots.extend([d.delegator, d.node]);
                }
            }
            Tx::Slash { node, .. } => slots.push(node),
            Tx::Epoch { .. } => {}
        }
        slots
    }

    /// The witnesses of a single-step fraud proof of `tx` against this (pre-)state.
    pub fn witnesses(&self, tx: &Tx, queue: &(impl DepositQueue + ?Sized)) -> Vec<Witness> {
        let writes = self.transition(tx, queue).unwrap_or_default();
        let mut tree = self.tree.clone();
        let mut out = Vec::new();
        for slot in self.witness_slots(tx) {
            out.push(Witness {
                slot,
                preimage: self.preimage(slot),
                proof: tree.prove(slot),
            });
            if let Some(w) = writes.iter().find(|w| w.slot() == slot) {
                tree.set(slot, w.leaf());
            }
        }
        out
    }

    fn account_at(&self, slot: u32) -> Option<Account> {
        is_account_slot(slot)
            .then(|| self.accounts.get(&slot).copied())
            .flatten()
    }

    fn delegation_at(&self, slot: u32) -> Option<Delegation> {
        is_delegation_slot(slot)
            .then(|| self.delegations.get(&slot).copied())
            .flatten()
    }

    /// The writes `tx` makes, or why it is a no-op. Pure: reads `self` only.
    fn transition(&self, tx: &Tx, queue: &(impl DepositQueue + ?Sized)) -> Step {
        let meta = self.meta;
        match *tx {
            Tx::Deposit {
                seq,
                slot,
                address,
                amount,
            } => {
                if seq != meta.deposits {
                    return Err("deposit out of queue order");
                }
                if queue.deposit(seq) != Some(deposit_hash(slot, &address, amount)) {
                    return Err("not the deposit L1 queued at this position");
                }
                if !is_account_slot(slot) || slot == FEE_SLOT {
                    return Err("not a depositor slot");
                }
                let mut a = match self.accounts.get(&slot) {
                    None => Account::new(address),
                    Some(a) if a.address == address => *a,
                    Some(_) => return Err("slot owned by another address"),
                };
                a.balance = a.balance.checked_add(amount).ok_or("balance overflows")?;
                Ok(vec![
                    Write::Meta(Meta {
                        deposits: meta.deposits + 1,
                        ..meta
                    }),
                    Write::Account(slot, a),
                ])
            }
            Tx::Settle {
                payer,
                node,
                amount,
                ..
            } => self.settle(payer, node, amount),
            Tx::Signed {
                slot,
                nonce,
                action,
                ref signature,
            } => {
                let mut a = self.account_at(slot).ok_or("unknown account slot")?;
                if nonce != a.nonce {
                    return Err("wrong nonce");
                }
                let digest = tx.signing_digest(&self.domain).ok_or("unsigned")?;
                if recover(&digest, signature) != Some(a.address) {
                    return Err("not signed by the account's owner");
                }
                a.nonce += 1;
                self.signed(slot, a, action)
            }
            Tx::Claim { delegation } => {
                let d = self
                    .delegation_at(delegation)
                    .ok_or("unknown delegation slot")?;
                let (mut a, mut n) = self.delegation_parties(&d)?;
                let mut d = d;
                let paid = claim(&mut d, &mut a, &mut n)?;
                if paid == 0 {
                    return Err("nothing to claim");
                }
                Ok(vec![
                    Write::Delegation(delegation, d),
                    Write::Account(d.delegator, a),
                    Write::Account(d.node, n),
                ])
            }
            Tx::Release { slot } => {
                let mut a = self.account_at(slot).ok_or("unknown account slot")?;
                if a.unbonding == 0 {
                    return Err("nothing unbonding");
                }
                if meta.epoch < a.unbond_epoch {
                    return Err("still unbonding");
                }
                a.balance = a
                    .balance
                    .checked_add(a.unbonding)
                    .ok_or("balance overflows")?;
                a.unbonding = 0;
                Ok(vec![Write::Account(slot, a)])
            }
            Tx::Slash { node, amount, .. } => {
                let mut n = self.account_at(node).ok_or("unknown account slot")?;
                let held = n.stake.saturating_add(n.unbonding);
                let take = amount.min(held);
                if take == 0 {
                    return Err("nothing to slash");
                }
                let from_stake = take.min(n.stake);
                n.stake -= from_stake;
                n.unbonding -= take - from_stake;
                let burned = meta.burned.checked_add(take).ok_or("burned overflows")?;
                Ok(vec![
                    Write::Meta(Meta { burned, ..meta }),
                    Write::Account(node, n),
                ])
            }
            Tx::Epoch { epoch } => {
                if Some(epoch) != meta.epoch.checked_add(1) {
                    return Err("not the next epoch");
                }
                Ok(vec![Write::Meta(Meta { epoch, ..meta })])
            }
        }
    }

    /// How a settlement of `amount` from `payer` to `node` divides, under the rates in
    /// force now: the one computation [`State::apply`] uses, exposed so statements can
    /// show each part with its inputs. `Err` when the settlement would be a no-op.
    pub fn settle_split(
        &self,
        payer: u32,
        node: u32,
        amount: u128,
    ) -> Result<SettleSplit, &'static str> {
        if payer == node {
            return Err("payer and node are the same account");
        }
        if payer == FEE_SLOT || node == FEE_SLOT {
            return Err("the fee account neither pays nor serves jobs");
        }
        let p = self.account_at(payer).ok_or("unknown account slot")?;
        let n = self.account_at(node).ok_or("unknown account slot")?;
        if p.balance < amount {
            return Err("payer balance too low");
        }
        let meta = self.meta;
        let fee = mul_div(amount, u128::from(meta.fee_bps), BPS).ok_or("fee overflows")?;
        let to_node = amount - fee;
        let commission_bps = n.commission_at(meta.epoch);
        let commission =
            mul_div(to_node, u128::from(commission_bps), BPS).ok_or("commission overflows")?;
        // The rest is shared pro rata to stake: the node's own part with its balance, the
        // delegators' part to the pool, tracked per delegated unit by the accumulator.
        let rest = to_node - commission;
        let total_stake = U256::from(n.stake) + U256::from(n.delegated);
        let delegators = if n.delegated == 0 {
            0
        } else {
            let share = U256::from(rest) * U256::from(n.delegated) / total_stake;
            u128::try_from(share).map_err(|_| "share overflows")?
        };
        Ok(SettleSplit {
            epoch: meta.epoch,
            amount,
            fee_bps: meta.fee_bps,
            fee,
            commission_bps,
            commission,
            stake: n.stake,
            delegated: n.delegated,
            self_share: rest - delegators,
            delegators,
        })
    }

    fn settle(&self, payer: u32, node: u32, amount: u128) -> Step {
        let split = self.settle_split(payer, node, amount)?;
        let mut p = self.account_at(payer).ok_or("unknown account slot")?;
        let mut n = self.account_at(node).ok_or("unknown account slot")?;
        let mut f = self.accounts[&FEE_SLOT];
        let SettleSplit {
            fee, delegators, ..
        } = split;
        let to_owner = split.commission + split.self_share;
        if delegators > 0 {
            let per_token = mul_div_u256(
                U256::from(delegators),
                U256::from(SCALE),
                U256::from(n.delegated),
            );
            n.reward_per_token = n
                .reward_per_token
                .checked_add(per_token)
                .ok_or("reward accumulator overflows")?;
            n.pool = n.pool.checked_add(delegators).ok_or("pool overflows")?;
        }
        p.balance -= amount;
        n.balance = n.balance.checked_add(to_owner).ok_or("balance overflows")?;
        n.earned = n.earned.checked_add(to_owner).ok_or("earned overflows")?;
        f.balance = f.balance.checked_add(fee).ok_or("fee balance overflows")?;
        f.earned = f.earned.checked_add(fee).ok_or("fee earned overflows")?;
        Ok(vec![
            Write::Account(payer, p),
            Write::Account(node, n),
            Write::Account(FEE_SLOT, f),
        ])
    }

    fn delegation_parties(&self, d: &Delegation) -> Result<(Account, Account), &'static str> {
        if d.delegator == d.node {
            return Err("delegator and node are the same account");
        }
        let a = self.account_at(d.delegator).ok_or("unknown account slot")?;
        let n = self.account_at(d.node).ok_or("unknown account slot")?;
        Ok((a, n))
    }

    /// A signed action by the owner of `slot` (`a`, its nonce already advanced).
    fn signed(&self, slot: u32, mut a: Account, action: Action) -> Step {
        let meta = self.meta;
        let unbond_epoch = || {
            meta.epoch
                .checked_add(u64::from(meta.unbonding_epochs))
                .ok_or("epoch overflows")
        };
        match action {
            Action::Withdraw { amount } => {
                if amount == 0 {
                    return Err("zero amount");
                }
                a.balance = a.balance.checked_sub(amount).ok_or("balance too low")?;
                a.withdrawn = a
                    .withdrawn
                    .checked_add(amount)
                    .ok_or("withdrawn total overflows")?;
                Ok(vec![Write::Account(slot, a)])
            }
            Action::Stake { amount } => {
                if amount == 0 {
                    return Err("zero amount");
                }
                a.balance = a.balance.checked_sub(amount).ok_or("balance too low")?;
                a.stake = a.stake.checked_add(amount).ok_or("stake overflows")?;
                Ok(vec![Write::Account(slot, a)])
            }
            Action::Unstake { amount } => {
                if amount == 0 {
                    return Err("zero amount");
                }
                a.stake = a.stake.checked_sub(amount).ok_or("stake too low")?;
                a.unbonding = a
                    .unbonding
                    .checked_add(amount)
                    .ok_or("unbonding overflows")?;
                a.unbond_epoch = unbond_epoch()?;
                Ok(vec![Write::Account(slot, a)])
            }
            Action::SetCommission { bps } => {
                if u128::from(bps) > BPS {
                    return Err("commission above 100%");
                }
                a.commission_bps = a.commission_at(meta.epoch);
                a.next_commission_bps = bps;
                a.next_commission_epoch = meta.epoch.checked_add(1).ok_or("epoch overflows")?;
                Ok(vec![Write::Account(slot, a)])
            }
            Action::Delegate {
                delegation,
                node,
                amount,
            } => {
                if amount == 0 {
                    return Err("zero amount");
                }
                if node == slot {
                    return Err("a node stakes rather than delegates to itself");
                }
                let mut n = self.account_at(node).ok_or("unknown node slot")?;
                if n.stake == 0 {
                    return Err("not a staked node");
                }
                if !is_delegation_slot(delegation) {
                    return Err("not a delegation slot");
                }
                let mut meta = meta;
                let mut d = match self.delegations.get(&delegation) {
                    None if delegation == meta.next_delegation => {
                        meta.next_delegation += 1;
                        Delegation {
                            delegator: slot,
                            node,
                            reward_snapshot: n.reward_per_token,
                            ..Delegation::default()
                        }
                    }
                    None => return Err("a new delegation takes the next free slot"),
                    Some(d) if d.delegator == slot && d.node == node => *d,
                    Some(_) => return Err("delegation held by another pair"),
                };
                claim(&mut d, &mut a, &mut n)?;
                a.balance = a.balance.checked_sub(amount).ok_or("balance too low")?;
                d.amount = d.amount.checked_add(amount).ok_or("delegation overflows")?;
                n.delegated = n
                    .delegated
                    .checked_add(amount)
                    .ok_or("delegated overflows")?;
                Ok(vec![
                    Write::Meta(meta),
                    Write::Account(slot, a),
                    Write::Account(node, n),
                    Write::Delegation(delegation, d),
                ])
            }
            Action::Undelegate { delegation, amount } => {
                if amount == 0 {
                    return Err("zero amount");
                }
                let mut d = self
                    .delegation_at(delegation)
                    .ok_or("unknown delegation slot")?;
                if d.delegator != slot {
                    return Err("not the delegator");
                }
                let mut n = self.account_at(d.node).ok_or("unknown node slot")?;
                if d.node == slot {
                    return Err("delegator and node are the same account");
                }
                claim(&mut d, &mut a, &mut n)?;
                d.amount = d.amount.checked_sub(amount).ok_or("delegation too small")?;
                n.delegated = n
                    .delegated
                    .checked_sub(amount)
                    .ok_or("delegated underflows")?;
                a.unbonding = a
                    .unbonding
                    .checked_add(amount)
                    .ok_or("unbonding overflows")?;
                a.unbond_epoch = unbond_epoch()?;
                Ok(vec![
                    Write::Account(slot, a),
                    Write::Delegation(delegation, d),
                    Write::Account(d.node, n),
                ])
            }
        }
    }

    /// Money held in L2 for its owners: every balance, stake, unbonding stake,
    /// delegation and undistributed pool, plus everything withdrawn and burned. Equals
    /// the deposits applied, always.
    pub fn total_held(&self) -> u128 {
        let accounts: u128 = self
            .accounts
            .values()
            .map(|a| a.balance + a.stake + a.unbonding + a.pool + a.withdrawn)
            .sum();
        let delegations: u128 = self.delegations.values().map(|d| d.amount).sum();
        accounts + delegations + self.meta.burned
    }
}

/// Moves a delegation's accrued rewards (capped by the node's pool) to the delegator.
fn claim(d: &mut Delegation, a: &mut Account, n: &mut Account) -> Result<u128, &'static str> {
    let accrued = d.accrued(n);
    let paid = u128::try_from(accrued.min(U256::from(n.pool))).unwrap_or(n.pool);
    n.pool -= paid;
    a.balance = a.balance.checked_add(paid).ok_or("balance overflows")?;
    a.earned = a.earned.checked_add(paid).ok_or("earned overflows")?;
    d.earned = d.earned.checked_add(paid).ok_or("earned overflows")?;
    d.reward_snapshot = n.reward_per_token;
    Ok(paid)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::leaf::FIRST_ACCOUNT_SLOT;
    use crate::tx::address_of;
    use proptest::prelude::*;

    pub(crate) const FEE_OWNER: Address = [0xfe; 20];
    pub(crate) const DOMAIN: H256 = [0xd0; 32];

    pub(crate) fn key(n: u8) -> k256::ecdsa::SigningKey {
        k256::ecdsa::SigningKey::from_bytes(&[n; 32].into()).expect("key")
    }

    pub(crate) fn addr(n: u8) -> Address {
        address_of(key(n).verifying_key())
    }

    /// A state and the L1 queue it reads, with helpers that behave like the bridge.
    pub(crate) struct World {
        pub(crate) state: State,
        pub(crate) queue: Vec<H256>,
        pub(crate) slots: HashMap<Address, u32>,
        pub(crate) deposited: u128,
    }

    impl World {
        pub(crate) fn new(fee_bps: u16) -> Self {
            Self {
                state: State::genesis(DOMAIN, fee_bps, 2, FEE_OWNER),
                queue: Vec::new(),
                slots: HashMap::new(),
                deposited: 0,
            }
        }

        /// Queues a deposit on "L1" for key `n` and returns the transaction.
        pub(crate) fn queue_deposit(&mut self, n: u8, amount: u128) -> Tx {
            let address = addr(n);
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

        pub(crate) fn apply(&mut self, tx: &Tx) -> Outcome {
            let out = self.state.apply(tx, &self.queue);
            if let (Outcome::Applied, Tx::Deposit { amount, .. }) = (&out, tx) {
                self.deposited += amount;
            }
            out
        }

        pub(crate) fn deposit(&mut self, n: u8, amount: u128) -> u32 {
            let tx = self.queue_deposit(n, amount);
            assert_eq!(self.apply(&tx), Outcome::Applied);
            self.slots[&addr(n)]
        }

        pub(crate) fn signed(&mut self, n: u8, action: Action) -> Outcome {
            let slot = self.slots[&addr(n)];
            let nonce = self.state.account(slot).expect("account").nonce;
            let tx = Tx::sign(&key(n), &DOMAIN, slot, nonce, action);
            self.apply(&tx)
        }
    }

    #[test]
    fn deposits_apply_in_queue_order_to_the_slot_l1_assigned() {
        let mut w = World::new(100);
        let genesis = w.state.root();
        let d0 = w.queue_deposit(1, 10);
        let d1 = w.queue_deposit(2, 5);
        assert_eq!(w.apply(&d1), Outcome::NoOp("deposit out of queue order"));
        assert_eq!(w.state.root(), genesis, "a no-op leaves the root alone");
        let forged = Tx::Deposit {
            seq: 0,
            slot: 2,
            address: addr(1),
            amount: 1_000,
        };
        assert_eq!(
            w.apply(&forged),
            Outcome::NoOp("not the deposit L1 queued at this position")
        );
        assert_eq!(w.apply(&d0), Outcome::Applied);
        assert_eq!(w.apply(&d1), Outcome::Applied);
        assert_eq!(
            w.apply(&d1),
            Outcome::NoOp("deposit out of queue order"),
            "a replayed deposit does nothing"
        );
        let d2 = w.queue_deposit(1, 7);
        assert_eq!(w.apply(&d2), Outcome::Applied);
        assert_eq!(w.state.slot_of(&addr(1)), Some(FIRST_ACCOUNT_SLOT));
        assert_eq!(
            w.state.account(FIRST_ACCOUNT_SLOT).map(|a| a.balance),
            Some(17)
        );
        assert_eq!(w.state.meta().deposits, 3);
        let root = w.state.root();
        let acct = *w.state.account(FIRST_ACCOUNT_SLOT).expect("account");
        assert!(w.state.tree().prove(FIRST_ACCOUNT_SLOT).verify(
            &root,
            FIRST_ACCOUNT_SLOT,
            &acct.leaf()
        ));
    }

    #[test]
    fn settlement_splits_fee_commission_and_delegators_share_exactly() {
        let mut w = World::new(250); // 2.5% protocol fee
        let payer = w.deposit(1, 100_000);
        let node = w.deposit(2, 1_000);
        let holder = w.deposit(3, 3_000);
        assert_eq!(
            w.signed(2, Action::Stake { amount: 1_000 }),
            Outcome::Applied
        );
        assert_eq!(
            w.signed(2, Action::SetCommission { bps: 1_000 }),
            Outcome::Applied
        );
        let delegation = DELEGATION_BASE;
        assert_eq!(
            w.signed(
                3,
                Action::Delegate {
                    delegation,
                    node,
                    amount: 3_000
                }
            ),
            Outcome::Applied
        );
        // Commission changes apply from the next epoch: this settlement pays 0%.
        let settle = |amount| Tx::Settle {
            payer,
            node,
            amount,
            receipts_root: [7; 32],
        };
        assert_eq!(w.apply(&settle(40_000)), Outcome::Applied);
        // fee 1,000; 39,000 shared 1:3 by stake → node 9,750, delegators 29,250.
        let n = *w.state.account(node).expect("node");
        assert_eq!((n.balance, n.earned, n.pool), (9_750, 9_750, 29_250));
        assert_eq!(w.state.account(FEE_SLOT).map(|f| f.balance), Some(1_000));
        assert_eq!(w.apply(&Tx::Epoch { epoch: 1 }), Outcome::Applied);
        assert_eq!(w.apply(&settle(40_000)), Outcome::Applied);
        // Now 10% commission: 3,900 to the node, then 35,100 shared 1:3.
        let n = *w.state.account(node).expect("node");
        assert_eq!(n.balance, 9_750 + 3_900 + 8_775);
        assert_eq!(n.pool, 29_250 + 26_325);
        assert_eq!(w.apply(&Tx::Claim { delegation }), Outcome::Applied);
        let h = *w.state.account(holder).expect("holder");
        assert_eq!((h.balance, h.earned), (29_250 + 26_325, 29_250 + 26_325));
        assert_eq!(
            w.state.delegation(delegation).map(|d| d.earned),
            Some(55_575)
        );
        assert_eq!(w.state.account(node).map(|n| n.pool), Some(0));
        assert_eq!(
            w.apply(&Tx::Claim { delegation }),
            Outcome::NoOp("nothing to claim")
        );
        assert_eq!(w.state.total_held(), w.deposited);
        assert_eq!(w.state.account(payer).map(|p| p.balance), Some(20_000));
    }

    #[test]
    fn unstaking_and_undelegating_wait_out_the_unbonding_epochs() {
        let mut w = World::new(0);
        let node = w.deposit(2, 500);
        let holder = w.deposit(3, 300);
        w.signed(2, Action::Stake { amount: 500 });
        w.signed(
            3,
            Action::Delegate {
                delegation: DELEGATION_BASE,
                node,
                amount: 300,
            },
        );
        assert_eq!(
            w.signed(2, Action::Unstake { amount: 200 }),
            Outcome::Applied
        );
        assert_eq!(
            w.signed(
                3,
                Action::Undelegate {
                    delegation: DELEGATION_BASE,
                    amount: 300
                }
            ),
            Outcome::Applied
        );
        assert_eq!(w.state.account(node).map(|n| n.delegated), Some(0));
        for slot in [node, holder] {
            assert_eq!(
                w.apply(&Tx::Release { slot }),
                Outcome::NoOp("still unbonding")
            );
        }
        w.apply(&Tx::Epoch { epoch: 1 });
        w.apply(&Tx::Epoch { epoch: 2 });
        assert_eq!(w.apply(&Tx::Release { slot: node }), Outcome::Applied);
        assert_eq!(w.apply(&Tx::Release { slot: holder }), Outcome::Applied);
        assert_eq!(
            w.state.account(node).map(|a| (a.balance, a.stake)),
            Some((200, 300))
        );
        assert_eq!(w.state.account(holder).map(|a| a.balance), Some(300));
        assert_eq!(w.state.total_held(), w.deposited);
    }

    #[test]
    fn a_slash_burns_own_stake_then_unbonding_and_never_delegations() {
        let mut w = World::new(0);
        let node = w.deposit(2, 1_000);
        w.deposit(3, 300);
        w.signed(2, Action::Stake { amount: 600 });
        w.signed(2, Action::Unstake { amount: 100 });
        w.signed(
            3,
            Action::Delegate {
                delegation: DELEGATION_BASE,
                node,
                amount: 300,
            },
        );
        let slash = |amount| Tx::Slash {
            node,
            amount,
            evidence: [9; 32],
        };
        assert_eq!(w.apply(&slash(550)), Outcome::Applied);
        let n = *w.state.account(node).expect("node");
        assert_eq!((n.stake, n.unbonding, n.balance), (0, 50, 400));
        assert_eq!(w.apply(&slash(1_000)), Outcome::Applied);
        assert_eq!(w.state.meta().burned, 600);
        assert_eq!(w.apply(&slash(1)), Outcome::NoOp("nothing to slash"));
        assert_eq!(
            w.state.delegation(DELEGATION_BASE).map(|d| d.amount),
            Some(300)
        );
        assert_eq!(w.state.total_held(), w.deposited);
    }

    #[test]
    fn signed_actions_need_the_owner_the_nonce_and_this_deployment() {
        let mut w = World::new(0);
        let slot = w.deposit(7, 500);
        let tx = Tx::sign(&key(7), &DOMAIN, slot, 0, Action::Withdraw { amount: 200 });
        assert_eq!(w.apply(&tx), Outcome::Applied);
        let a = *w.state.account(slot).expect("account");
        assert_eq!((a.balance, a.withdrawn, a.nonce), (300, 200, 1));
        let root = w.state.root();
        assert_eq!(
            w.apply(&tx),
            Outcome::NoOp("wrong nonce"),
            "a replay does nothing"
        );
        let other = Tx::sign(&key(8), &DOMAIN, slot, 1, Action::Withdraw { amount: 10 });
        assert_eq!(
            w.apply(&other),
            Outcome::NoOp("not signed by the account's owner")
        );
        let elsewhere = Tx::sign(&key(7), &[0; 32], slot, 1, Action::Withdraw { amount: 10 });
        assert_eq!(
            w.apply(&elsewhere),
            Outcome::NoOp("not signed by the account's owner"),
            "a signature for another deployment does not apply here"
        );
        let too_much = Tx::sign(&key(7), &DOMAIN, slot, 1, Action::Withdraw { amount: 301 });
        assert_eq!(w.apply(&too_much), Outcome::NoOp("balance too low"));
        assert_eq!(w.state.root(), root);
    }

    /// Replays the contract's check of one step from witnesses alone: each old leaf
    /// against the running root, then the new leaf folded in.
    fn root_from_witnesses(pre: &H256, witnesses: &[Witness], post: &State) -> Option<H256> {
        let mut cur = *pre;
        for w in witnesses {
            let old = if w.preimage.is_empty() {
                [0; 32]
            } else {
                keccak256(&w.preimage)
            };
            if w.proof.root(w.slot, &old).ok()? != cur {
                return None;
            }
            cur = w.proof.root(w.slot, &post.tree().get(w.slot)).ok()?;
        }
        Some(cur)
    }

    fn any_step() -> impl Strategy<Value = (u8, u8, u8, u128, u32)> {
        (0u8..12, 1u8..5, 1u8..5, 0u128..2_000, 0u32..6)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Random sequences of every kind of transaction, valid and not: money is
        /// conserved, no-ops change nothing, a replay gives the same roots, and every
        /// step's witnesses carry the pre-root to the post-root.
        #[test]
        fn any_sequence_conserves_money_and_its_witnesses_prove_each_step(
            fee in 0u16..=10_000,
            steps in proptest::collection::vec(any_step(), 0..64),
        ) {
            // Every key starts with an account and keys 3 and 4 as staked nodes, so most
            // signed actions have someone to apply to.
            let mut w = World::new(fee);
            for n in 1..5 {
                w.deposit(n, 50_000);
            }
            for n in 3..5 {
                w.signed(n, Action::Stake { amount: 5_000 });
            }
            let start = w.state.clone();
            let mut txs = Vec::new();
            let mut roots = Vec::new();
            for (kind, a, b, amount, pick) in steps {
                let slot_of = |w: &World, n: u8| w.slots.get(&addr(n)).copied().unwrap_or(FIRST_ACCOUNT_SLOT + u32::from(n) + 10);
                // Mostly positions that exist or the next free one, sometimes a stray slot.
                let next = w.state.meta().next_delegation;
                let existing = DELEGATION_BASE + pick % (next - DELEGATION_BASE).max(1);
                let unbonding = w.state.accounts().filter(|(_, x)| x.unbonding > 0).map(|(s, _)| s).min();
                let delegation = match pick { 0 | 1 => next, 5 => next + 3, p => DELEGATION_BASE + p % (next - DELEGATION_BASE).max(1) };
                let action = match kind {
                    0 => { let tx = w.queue_deposit(a, amount * 10); txs.push(tx.clone()); None }
                    1 | 2 => { txs.push(Tx::Settle { payer: slot_of(&w, a), node: slot_of(&w, b), amount, receipts_root: [1; 32] }); None }
                    3 => Some(Action::Stake { amount }),
                    4 => Some(Action::Unstake { amount: amount / 2 }),
                    5 => Some(Action::Delegate { delegation, node: slot_of(&w, b), amount }),
                    6 => Some(Action::Undelegate { delegation: existing, amount: amount / 3 }),
                    7 => Some(Action::SetCommission { bps: (amount * 7) as u16 }),
                    8 => Some(Action::Withdraw { amount: amount / 4 }),
                    9 => { txs.push(Tx::Claim { delegation: existing }); None }
                    10 => { txs.push(if pick < 4 { Tx::Epoch { epoch: w.state.meta().epoch + 1 } } else { Tx::Release { slot: unbonding.unwrap_or(slot_of(&w, a)) } }); None }
                    _ => { txs.push(Tx::Slash { node: slot_of(&w, a), amount, evidence: [2; 32] }); None }
                };
                if let Some(action) = action {
                    let slot = slot_of(&w, a);
                    let nonce = w.state.account(slot).map_or(0, |x| x.nonce);
                    txs.push(Tx::sign(&key(a), &DOMAIN, slot, nonce, action));
                }
                let tx = txs.last().expect("a tx").clone();
                let pre = w.state.clone();
                let outcome = w.apply(&tx);
                if outcome != Outcome::Applied {
                    prop_assert_eq!(w.state.root(), pre.root(), "no-ops change nothing");
                }
                let witnesses = pre.witnesses(&tx, &w.queue);
                prop_assert_eq!(
                    root_from_witnesses(&pre.root(), &witnesses, &w.state),
                    Some(w.state.root()),
                    "witnesses carry the step {:?}", tx
                );
                prop_assert_eq!(w.state.total_held(), w.deposited, "after {:?}", tx);
                roots.push(w.state.root());
            }
            // The watchtower's replay: the same function gives the same roots.
            let mut again = start;
            for (tx, root) in txs.iter().zip(&roots) {
                again.apply(tx, &w.queue);
                prop_assert_eq!(&again.root(), root);
            }
        }
    }
}
