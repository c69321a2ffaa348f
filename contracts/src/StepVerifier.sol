// SPDX-License-Identifier: MIT OR Apache-2.0
pragma solidity 0.8.37;

import {SparseMerkle} from "./SparseMerkle.sol";

// StepVerifier: the on-chain mirror of the L2 state-transition function, for
// single-step fraud proofs. It re-executes ONE transaction against Merkle witnesses of
// the leaves it touches and returns the state root after it.
//
// The Rust code is normative: `rollup/src/state.rs` (`transition`, `settle`, `signed`,
// `claim`, `witness_slots`, `witnesses`), with `rollup/src/leaf.rs` (leaf encodings,
// `mul_div`, `mul_div_u256`, slot ranges), `rollup/src/tx.rs` (packed tx encoding,
// signing digest, `recover`) and `rollup/src/smt.rs` (the tree). Where this file and
// the Rust code disagree, this file is wrong. A transaction that does not apply in Rust
// (`Err(..)`) is a no-op here too: the root after it is the root before it.
//
// Witness order (`State::witness_slots`), slot 0 (meta) always first:
//   Deposit                               0, slot
//   Settle                                0, payer, node, 1 (fee account)
//   Withdraw / Stake / Unstake / SetCommission   0, signer slot
//   Delegate                              0, signer slot, node, delegation
//   Undelegate                            0, signer slot, delegation[, d.node]
//   Claim                                 0, delegation[, d.delegator, d.node]
//   Release                               0, slot
//   Slash                                 0, node
//   Epoch                                 0
// The bracketed slots are present exactly when the delegation slot is in the
// delegation range and its witness is non-empty (then they are read from that leaf).
// Witness i's proof is against the root after the new leaves of witnesses 0..i-1.
//
// States no sequence of transactions reaches from genesis (a missing fee account, a
// fee or commission above 100%, a u64 counter at its maximum) make Rust panic; here
// they revert.

/// One leaf of a fraud proof: its slot, its packed encoding before the transaction
/// (empty for an empty slot) and its sparse Merkle proof against the running root.
struct Witness {
    uint32 slot;
    bytes preimage;
    uint32 bitmap;
    bytes32[] siblings;
}

contract StepVerifier {
    /// `txData` is not exactly one transaction of a known type.
    error BadTransaction();
    /// The witnesses are not the transaction's witness slots, or a preimage is not a
    /// leaf that can live in its slot.
    error BadWitnesses();
    /// Witness `index`'s proof is malformed or does not lead to the running root.
    error BadProof(uint256 index);

    /// Slot 0 (`leaf::Meta`).
    struct Meta {
        uint64 deposits;
        uint64 epoch;
        uint32 nextDelegation;
        uint128 burned;
        uint16 feeBps;
        uint16 unbondingEpochs;
    }

    /// An account leaf (`leaf::Account`).
    struct Account {
        address owner;
        uint128 balance;
        uint64 nonce;
        uint128 earned;
        uint128 withdrawn;
        uint128 stake;
        uint128 unbonding;
        uint64 unbondEpoch;
        uint128 delegated;
        uint16 commissionBps;
        uint16 nextCommissionBps;
        uint64 nextCommissionEpoch;
        uint256 rewardPerToken;
        uint128 pool;
    }

    /// A delegation leaf (`leaf::Delegation`).
    struct Delegation {
        uint32 delegator;
        uint32 node;
        uint128 amount;
        uint256 rewardSnapshot;
        uint128 earned;
    }

    // Transaction type bytes (`tx::kind`).
    uint256 private constant DEPOSIT = 1;
    uint256 private constant SETTLE = 2;
    uint256 private constant WITHDRAW = 3;
    uint256 private constant STAKE = 4;
    uint256 private constant UNSTAKE = 5;
    uint256 private constant DELEGATE = 6;
    uint256 private constant UNDELEGATE = 7;
    uint256 private constant SET_COMMISSION = 8;
    uint256 private constant CLAIM = 9;
    uint256 private constant RELEASE = 10;
    uint256 private constant SLASH = 11;
    uint256 private constant EPOCH = 12;

    uint256 private constant SIGNATURE_LEN = 65;

    // Leaf encodings: tag byte, then the fields big-endian.
    uint256 private constant META_LEN = 41;
    uint256 private constant ACCOUNT_LEN = 193;
    uint256 private constant DELEGATION_LEN = 73;

    uint256 private constant FEE_SLOT = 1;
    uint256 private constant DELEGATION_BASE = 1 << 31;
    uint256 private constant BPS = 10_000;
    uint256 private constant SCALE = 1e18;
    uint256 private constant MAX64 = type(uint64).max;
    uint256 private constant MAX128 = type(uint128).max;
    /// secp256k1n / 2: the largest low s (OpenZeppelin's ECDSA bound, k256's `is_high`).
    uint256 private constant HALF_N = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0;


    // ------------------------------------------------------------------------------
    // Entry points
    // ------------------------------------------------------------------------------

    /// Re-executes one transaction from `preRoot`; returns the root after it.
    /// `queuedDeposit` is the L1 deposit queue's hash at the deposit's `seq` (bytes32(0)
    /// if L1 has no entry there, or if the tx is not a deposit).
    function execute(
        bytes32 domain,
        bytes32 preRoot,
        bytes calldata txData,
        Witness[] calldata witnesses,
        bytes32 queuedDeposit
    ) external pure returns (bytes32 postRoot) {
        uint256 kind = _txKind(txData);
        _checkSlots(kind, txData, witnesses);
        bytes32[] memory oldLeaves = new bytes32[](witnesses.length);
        bytes32[] memory newLeaves = new bytes32[](witnesses.length);
        for (uint256 i = 0; i < witnesses.length; ++i) {
            bytes32 leaf = _leafOf(witnesses[i].slot, witnesses[i].preimage);
            oldLeaves[i] = leaf;
            newLeaves[i] = leaf;
        }
        _transition(kind, domain, txData, witnesses, queuedDeposit, newLeaves);
        postRoot = _fold(preRoot, witnesses, oldLeaves, newLeaves);
    }

    /// The sparse Merkle root implied by `leaf` at `index` (for withdrawals elsewhere,
    /// also handy in tests). Reverts with `BadProof(0)` when the bitmap's popcount is
    /// not the number of siblings (Rust: `ProofError::Malformed`).
    function rootOf(uint32 index, bytes32 leaf, uint32 bitmap, bytes32[] calldata siblings)
        external
        pure
        returns (bytes32)
    {
        return SparseMerkle.root(index, leaf, bitmap, siblings);
    }

    // ------------------------------------------------------------------------------
    // Merkle proofs
    // ------------------------------------------------------------------------------

    /// Checks each old leaf against the running root and folds its new leaf in.
    function _fold(
        bytes32 preRoot,
        Witness[] calldata witnesses,
        bytes32[] memory oldLeaves,
        bytes32[] memory newLeaves
    ) private pure returns (bytes32 cur) {
        cur = preRoot;
        for (uint256 i = 0; i < witnesses.length; ++i) {
            Witness calldata w = witnesses[i];
            if (SparseMerkle.popcount(w.bitmap) != w.siblings.length) revert BadProof(i);
            (bytes32 oldRoot, bytes32 newRoot) =
                SparseMerkle.roots(w.slot, oldLeaves[i], newLeaves[i], w.bitmap, w.siblings);
            if (oldRoot != cur) revert BadProof(i);
            cur = newRoot;
        }
    }

    // ------------------------------------------------------------------------------
    // Transaction and witness shape
    // ------------------------------------------------------------------------------

    /// The type byte of `t`, which must be exactly one transaction (`tx::encoded_len`).
    function _txKind(bytes calldata t) private pure returns (uint256 kind) {
        if (t.length == 0) revert BadTransaction();
        kind = uint8(t[0]);
        uint256 need;
        if (kind == DEPOSIT) need = 1 + 8 + 4 + 20 + 16;
        else if (kind == SETTLE) need = 1 + 4 + 4 + 16 + 32;
        else if (kind == WITHDRAW || kind == STAKE || kind == UNSTAKE) need = 13 + 16 + SIGNATURE_LEN;
        else if (kind == DELEGATE) need = 13 + 4 + 4 + 16 + SIGNATURE_LEN;
        else if (kind == UNDELEGATE) need = 13 + 4 + 16 + SIGNATURE_LEN;
        else if (kind == SET_COMMISSION) need = 13 + 2 + SIGNATURE_LEN;
        else if (kind == CLAIM || kind == RELEASE) need = 1 + 4;
        else if (kind == SLASH) need = 1 + 4 + 16 + 32;
        else if (kind == EPOCH) need = 1 + 8;
        else revert BadTransaction();
        if (t.length != need) revert BadTransaction();
    }

    /// Requires the witnesses to carry exactly `State::witness_slots(tx)`, in order.
    function _checkSlots(uint256 kind, bytes calldata t, Witness[] calldata w) private pure {
        uint256[4] memory s; // s[0] = META_SLOT = 0
        uint256 n;
        if (kind == EPOCH) {
            n = 1;
        } else if (kind == DEPOSIT) {
            s[1] = _u(t, 9, 4);
            n = 2;
        } else if (kind == SETTLE) {
            s[1] = _u(t, 1, 4);
            s[2] = _u(t, 5, 4);
            s[3] = FEE_SLOT;
            n = 4;
        } else if (kind == DELEGATE) {
            s[1] = _u(t, 1, 4);
            s[2] = _u(t, 17, 4); // node
            s[3] = _u(t, 13, 4); // delegation
            n = 4;
        } else if (kind == UNDELEGATE) {
            s[1] = _u(t, 1, 4);
            s[2] = _u(t, 13, 4); // delegation
            n = 3;
            if (w.length > 2 && _isDelegationWitness(w[2], s[2])) {
                s[3] = _u(w[2].preimage, 5, 4); // its node
                n = 4;
            }
        } else if (kind == CLAIM) {
            s[1] = _u(t, 1, 4); // delegation
            n = 2;
            if (w.length > 1 && _isDelegationWitness(w[1], s[1])) {
                s[2] = _u(w[1].preimage, 1, 4); // its delegator
                s[3] = _u(w[1].preimage, 5, 4); // its node
                n = 4;
            }
        } else {
            // Withdraw, Stake, Unstake, SetCommission (signer slot), Release (slot),
            // Slash (node): the slot right after the type byte.
            s[1] = _u(t, 1, 4);
            n = 2;
        }
        if (w.length != n) revert BadWitnesses();
        for (uint256 i = 0; i < n; ++i) {
            if (w[i].slot != s[i]) revert BadWitnesses();
        }
    }

    /// Whether `w` is at `slot` and holds a delegation there (`State::delegation_at`);
    /// reverts if it holds something that is not a delegation leaf.
    function _isDelegationWitness(Witness calldata w, uint256 slot) private pure returns (bool) {
        if (w.slot != slot || !_isDelegationSlot(slot) || w.preimage.length == 0) return false;
        _leafOf(w.slot, w.preimage); // a non-empty delegation-range leaf must be a delegation
        return true;
    }

    /// The leaf value of a witness (zero for an empty slot), after checking that the
    /// preimage is a leaf of the kind its slot can hold.
    function _leafOf(uint32 slot, bytes calldata p) private pure returns (bytes32) {
        uint256 len = p.length;
        if (slot == 0) {
            if (len != META_LEN || uint8(p[0]) != 0) revert BadWitnesses();
        } else if (len == 0) {
            return bytes32(0);
        } else if (_isAccountSlot(slot)) {
            if (len != ACCOUNT_LEN || uint8(p[0]) != 1) revert BadWitnesses();
        } else if (_isDelegationSlot(slot)) {
            if (len != DELEGATION_LEN || uint8(p[0]) != 2) revert BadWitnesses();
        } else {
            revert BadWitnesses(); // slot 2^32 - 1 holds nothing
        }
        return keccak256(p);
    }

    /// `leaf::is_account_slot`: 1 <= slot < 2^31.
    function _isAccountSlot(uint256 slot) private pure returns (bool) {
        return slot >= FEE_SLOT && slot < DELEGATION_BASE;
    }

    /// `leaf::is_delegation_slot`: 2^31 <= slot < 2^32 - 1.
    function _isDelegationSlot(uint256 slot) private pure returns (bool) {
        return slot >= DELEGATION_BASE && slot < type(uint32).max;
    }

    /// `State::account_at` for a witness already checked to be at the slot.
    function _hasAccount(Witness calldata w) private pure returns (bool) {
        return _isAccountSlot(w.slot) && w.preimage.length != 0;
    }

    // ------------------------------------------------------------------------------
    // The transition (`State::transition`)
    // ------------------------------------------------------------------------------

    /// Writes into `leaves` the new leaf of every witness the transaction writes, if it
    /// applies; leaves them as they are if it is a no-op.
    function _transition(
        uint256 kind,
        bytes32 domain,
        bytes calldata t,
        Witness[] calldata w,
        bytes32 queuedDeposit,
        bytes32[] memory leaves
    ) private pure {
        if (kind == DEPOSIT) _deposit(t, w, queuedDeposit, leaves);
        else if (kind == SETTLE) _settle(t, w, leaves);
        else if (kind == CLAIM) _claimTx(w, leaves);
        else if (kind == RELEASE) _release(w, leaves);
        else if (kind == SLASH) _slash(t, w, leaves);
        else if (kind == EPOCH) _epoch(t, w, leaves);
        else _signed(kind, domain, t, w, leaves);
    }

    function _deposit(bytes calldata t, Witness[] calldata w, bytes32 queuedDeposit, bytes32[] memory leaves)
        private
        pure
    {
        Meta memory m = _meta(w[0].preimage);
        uint256 slot = _u(t, 9, 4);
        address owner = address(uint160(_u(t, 13, 20)));
        uint256 amount = _u(t, 33, 16);
        if (_u(t, 1, 8) != m.deposits) return; // out of queue order
        // `deposit_hash(slot, address, amount)` = keccak256(slot ‖ address ‖ amount): the
        // transaction's bytes 9..49.
        if (queuedDeposit != keccak256(t[9:49])) return;
        if (!_isAccountSlot(slot) || slot == FEE_SLOT) return;
        Account memory a;
        if (w[1].preimage.length == 0) {
            a.owner = owner;
        } else {
            a = _account(w[1].preimage);
            if (a.owner != owner) return;
        }
        bool ok;
        (ok, a.balance) = _add128(a.balance, amount);
        if (!ok) return;
        m.deposits += 1; // checked: u64::MAX deposits is unreachable (Rust panics)
        leaves[0] = _metaLeaf(m);
        leaves[1] = _accountLeaf(a);
    }

    /// `State::settle`.
    function _settle(bytes calldata t, Witness[] calldata w, bytes32[] memory leaves) private pure {
        uint256 payer = _u(t, 1, 4);
        uint256 node = _u(t, 5, 4);
        uint256 amount = _u(t, 9, 16);
        if (payer == node) return;
        if (payer == FEE_SLOT || node == FEE_SLOT) return;
        if (!_hasAccount(w[1]) || !_hasAccount(w[2])) return;
        // Rust indexes the fee account (`self.accounts[&FEE_SLOT]`): genesis creates it
        // and nothing removes it, so an empty slot 1 is no reachable state.
        if (w[3].preimage.length == 0) revert BadWitnesses();
        Account memory p = _account(w[1].preimage);
        Account memory n = _account(w[2].preimage);
        Account memory f = _account(w[3].preimage);
        if (p.balance < amount) return;
        Meta memory m = _meta(w[0].preimage);
        (bool ok, uint256 fee) = _mulDiv(amount, m.feeBps, BPS);
        if (!ok) return;
        uint256 toNode = amount - fee; // checked: fee_bps > 100% is unreachable (Rust panics)
        uint256 commission;
        (ok, commission) = _mulDiv(toNode, _commissionAt(n, m.epoch), BPS);
        if (!ok) return;
        uint256 rest = toNode - commission; // checked: as above for commission
        uint256 delegators = 0;
        if (n.delegated != 0) {
            delegators = rest * n.delegated / (uint256(n.stake) + n.delegated);
            if (delegators > MAX128) return;
        }
        uint256 toOwner = toNode - delegators; // delegators <= rest <= toNode
        if (delegators > 0) {
            // mul_div_u256(delegators, SCALE, delegated): the product is below 2^188.
            uint256 perToken = delegators * SCALE / n.delegated;
            if (perToken > type(uint256).max - n.rewardPerToken) return;
            n.rewardPerToken += perToken;
            (ok, n.pool) = _add128(n.pool, delegators);
            if (!ok) return;
        }
        p.balance -= uint128(amount); // p.balance >= amount
        (ok, n.balance) = _add128(n.balance, toOwner);
        if (!ok) return;
        (ok, n.earned) = _add128(n.earned, toOwner);
        if (!ok) return;
        (ok, f.balance) = _add128(f.balance, fee);
        if (!ok) return;
        (ok, f.earned) = _add128(f.earned, fee);
        if (!ok) return;
        leaves[1] = _accountLeaf(p);
        leaves[2] = _accountLeaf(n);
        leaves[3] = _accountLeaf(f);
    }

    /// `Tx::Claim`.
    function _claimTx(Witness[] calldata w, bytes32[] memory leaves) private pure {
        // The delegator and node witnesses are there exactly when this holds.
        if (w.length != 4) return; // unknown delegation slot
        Delegation memory d = _delegation(w[1].preimage);
        if (d.delegator == d.node) return;
        if (!_hasAccount(w[2]) || !_hasAccount(w[3])) return;
        Account memory a = _account(w[2].preimage);
        Account memory n = _account(w[3].preimage);
        (bool ok, uint256 paid) = _claim(d, a, n);
        if (!ok || paid == 0) return;
        leaves[1] = _delegationLeaf(d);
        leaves[2] = _accountLeaf(a);
        leaves[3] = _accountLeaf(n);
    }

    /// `Tx::Release`.
    function _release(Witness[] calldata w, bytes32[] memory leaves) private pure {
        if (!_hasAccount(w[1])) return;
        Account memory a = _account(w[1].preimage);
        if (a.unbonding == 0) return;
        if (_meta(w[0].preimage).epoch < a.unbondEpoch) return;
        bool ok;
        (ok, a.balance) = _add128(a.balance, a.unbonding);
        if (!ok) return;
        a.unbonding = 0;
        leaves[1] = _accountLeaf(a);
    }

    /// `Tx::Slash`: own stake first, then unbonding stake; burned += take.
    function _slash(bytes calldata t, Witness[] calldata w, bytes32[] memory leaves) private pure {
        uint256 amount = _u(t, 5, 16);
        if (!_hasAccount(w[1])) return;
        Account memory n = _account(w[1].preimage);
        uint256 held = uint256(n.stake) + n.unbonding; // saturating_add in u128:
        if (held > MAX128) held = MAX128;
        uint256 take = amount < held ? amount : held;
        if (take == 0) return;
        uint256 fromStake = take < n.stake ? take : n.stake;
        n.stake -= uint128(fromStake);
        n.unbonding -= uint128(take - fromStake); // take - fromStake <= unbonding
        Meta memory m = _meta(w[0].preimage);
        bool ok;
        (ok, m.burned) = _add128(m.burned, take);
        if (!ok) return;
        leaves[0] = _metaLeaf(m);
        leaves[1] = _accountLeaf(n);
    }

    /// `Tx::Epoch`: must be the current epoch plus one (which must fit a u64).
    function _epoch(bytes calldata t, Witness[] calldata w, bytes32[] memory leaves) private pure {
        Meta memory m = _meta(w[0].preimage);
        if (m.epoch == MAX64 || _u(t, 1, 8) != uint256(m.epoch) + 1) return;
        m.epoch += 1;
        leaves[0] = _metaLeaf(m);
    }

    /// `Tx::Signed`: the account must exist, the nonce match and the signature recover
    /// to the account's address; then nonce + 1 and the action (`State::signed`).
    function _signed(uint256 kind, bytes32 domain, bytes calldata t, Witness[] calldata w, bytes32[] memory leaves)
        private
        pure
    {
        if (!_hasAccount(w[1])) return;
        Account memory a = _account(w[1].preimage);
        if (_u(t, 5, 8) != a.nonce) return;
        if (!_signedBy(domain, t, a.owner)) return;
        a.nonce += 1; // checked: nonce u64::MAX is unreachable (Rust panics)
        Meta memory m = _meta(w[0].preimage);
        if (kind == WITHDRAW || kind == STAKE || kind == UNSTAKE) _moveAction(kind, t, m, a, leaves);
        else if (kind == SET_COMMISSION) _setCommission(t, m, a, leaves);
        else if (kind == DELEGATE) _delegate(t, w, m, a, leaves);
        else _undelegate(t, w, m, a, leaves);
    }

    /// Whether signature `t[len-65..]` (r ‖ s ‖ v) over the transaction's signing digest
    /// recovers to `owner` (`tx::recover`: v 27/28, low s; no signer is never a match).
    function _signedBy(bytes32 domain, bytes calldata t, address owner) private pure returns (bool) {
        uint256 sig = t.length - SIGNATURE_LEN;
        bytes32 r = bytes32(_u(t, sig, 32));
        bytes32 s = bytes32(_u(t, sig + 32, 32));
        uint8 v = uint8(_u(t, sig + 64, 1));
        if (v != 27 && v != 28) return false;
        if (uint256(s) > HALF_N) return false;
        bytes32 message = keccak256(abi.encodePacked("tessera/tx/1", domain, t[:sig]));
        bytes32 digest = keccak256(abi.encodePacked("\x19Ethereum Signed Message:\n32", message));
        address signer = ecrecover(digest, v, r, s);
        return signer != address(0) && signer == owner;
    }

    /// Withdraw, Stake and Unstake: one amount moved between two of the account's fields.
    function _moveAction(uint256 kind, bytes calldata t, Meta memory m, Account memory a, bytes32[] memory leaves)
        private
        pure
    {
        uint256 amount = _u(t, 13, 16);
        if (amount == 0) return;
        bool ok;
        if (kind == WITHDRAW) {
            if (a.balance < amount) return;
            a.balance -= uint128(amount);
            (ok, a.withdrawn) = _add128(a.withdrawn, amount);
            if (!ok) return;
        } else if (kind == STAKE) {
            if (a.balance < amount) return;
            a.balance -= uint128(amount);
            (ok, a.stake) = _add128(a.stake, amount);
            if (!ok) return;
        } else {
            if (a.stake < amount) return;
            a.stake -= uint128(amount);
            (ok, a.unbonding) = _add128(a.unbonding, amount);
            if (!ok) return;
            (ok, a.unbondEpoch) = _unbondEpoch(m);
            if (!ok) return;
        }
        leaves[1] = _accountLeaf(a);
    }

    /// `Action::SetCommission`: takes effect from the next epoch.
    function _setCommission(bytes calldata t, Meta memory m, Account memory a, bytes32[] memory leaves)
        private
        pure
    {
        uint256 bps = _u(t, 13, 2);
        if (bps > BPS) return;
        a.commissionBps = _commissionAt(a, m.epoch);
        a.nextCommissionBps = uint16(bps);
        if (m.epoch == MAX64) return;
        a.nextCommissionEpoch = m.epoch + 1;
        leaves[1] = _accountLeaf(a);
    }

    /// `Action::Delegate`. Witnesses: 0, signer, node, delegation.
    function _delegate(
        bytes calldata t,
        Witness[] calldata w,
        Meta memory m,
        Account memory a,
        bytes32[] memory leaves
    ) private pure {
        uint256 slot = _u(t, 1, 4);
        uint256 delegation = _u(t, 13, 4);
        uint256 node = _u(t, 17, 4);
        uint256 amount = _u(t, 21, 16);
        if (amount == 0) return;
        if (node == slot) return;
        if (!_hasAccount(w[2])) return;
        Account memory n = _account(w[2].preimage);
        if (n.stake == 0) return;
        if (!_isDelegationSlot(delegation)) return;
        Delegation memory d;
        if (w[3].preimage.length == 0) {
            if (delegation != m.nextDelegation) return; // a new one takes the next free slot
            m.nextDelegation += 1; // delegation < 2^32 - 1
            d.delegator = uint32(slot);
            d.node = uint32(node);
            d.rewardSnapshot = n.rewardPerToken;
        } else {
            d = _delegation(w[3].preimage);
            if (d.delegator != slot || d.node != node) return;
        }
        (bool ok,) = _claim(d, a, n);
        if (!ok) return;
        if (a.balance < amount) return;
        a.balance -= uint128(amount);
        (ok, d.amount) = _add128(d.amount, amount);
        if (!ok) return;
        (ok, n.delegated) = _add128(n.delegated, amount);
        if (!ok) return;
        leaves[0] = _metaLeaf(m);
        leaves[1] = _accountLeaf(a);
        leaves[2] = _accountLeaf(n);
        leaves[3] = _delegationLeaf(d);
    }

    /// `Action::Undelegate`. Witnesses: 0, signer, delegation[, its node].
    function _undelegate(
        bytes calldata t,
        Witness[] calldata w,
        Meta memory m,
        Account memory a,
        bytes32[] memory leaves
    ) private pure {
        uint256 slot = _u(t, 1, 4);
        uint256 amount = _u(t, 17, 16);
        if (amount == 0) return;
        // The node witness is there exactly when the delegation slot holds a delegation.
        if (w.length != 4) return; // unknown delegation slot
        Delegation memory d = _delegation(w[2].preimage);
        if (d.delegator != slot) return;
        if (!_hasAccount(w[3])) return; // unknown node slot
        Account memory n = _account(w[3].preimage);
        if (d.node == slot) return;
        (bool ok,) = _claim(d, a, n);
        if (!ok) return;
        if (d.amount < amount) return;
        d.amount -= uint128(amount);
        if (n.delegated < amount) return;
        n.delegated -= uint128(amount);
        (ok, a.unbonding) = _add128(a.unbonding, amount);
        if (!ok) return;
        (ok, a.unbondEpoch) = _unbondEpoch(m);
        if (!ok) return;
        leaves[1] = _accountLeaf(a);
        leaves[2] = _delegationLeaf(d);
        leaves[3] = _accountLeaf(n);
    }

    /// `state::claim`: moves the delegation's accrued rewards, capped by the node's
    /// pool, to the delegator. `ok` is false where Rust returns `Err` (a no-op).
    function _claim(Delegation memory d, Account memory a, Account memory n)
        private
        pure
        returns (bool ok, uint256 paid)
    {
        // Delegation::accrued: mul_div_u256(amount, rpt.saturating_sub(snapshot), SCALE).
        uint256 perToken = n.rewardPerToken > d.rewardSnapshot ? n.rewardPerToken - d.rewardSnapshot : 0;
        uint256 product;
        if (perToken != 0 && d.amount > type(uint256).max / perToken) {
            product = type(uint256).max; // saturates, as in Rust
        } else {
            product = uint256(d.amount) * perToken;
        }
        uint256 accrued = product / SCALE;
        paid = accrued < n.pool ? accrued : n.pool;
        n.pool -= uint128(paid);
        (ok, a.balance) = _add128(a.balance, paid);
        if (!ok) return (false, 0);
        (ok, a.earned) = _add128(a.earned, paid);
        if (!ok) return (false, 0);
        (ok, d.earned) = _add128(d.earned, paid);
        if (!ok) return (false, 0);
        d.rewardSnapshot = n.rewardPerToken;
    }

    // ------------------------------------------------------------------------------
    // Arithmetic
    // ------------------------------------------------------------------------------

    /// u128 `checked_add`: `ok` false on overflow.
    function _add128(uint128 x, uint256 y) private pure returns (bool ok, uint128 sum) {
        uint256 s = uint256(x) + y; // y < 2^256 - 2^128 at every call site
        if (s > MAX128) return (false, 0);
        return (true, uint128(s));
    }

    /// `leaf::mul_div` for u128 operands: `ok` false when c is zero or the quotient
    /// exceeds u128.
    function _mulDiv(uint256 a, uint256 b, uint256 c) private pure returns (bool ok, uint256 q) {
        if (c == 0) return (false, 0);
        q = a * b / c; // a < 2^128, b < 2^16 at every call site
        if (q > MAX128) return (false, 0);
        return (true, q);
    }

    /// `Account::commission_at`.
    function _commissionAt(Account memory a, uint64 epoch) private pure returns (uint16) {
        return epoch >= a.nextCommissionEpoch ? a.nextCommissionBps : a.commissionBps;
    }

    /// `meta.epoch + meta.unbonding_epochs`, `ok` false if it overflows u64.
    function _unbondEpoch(Meta memory m) private pure returns (bool ok, uint64 e) {
        uint256 sum = uint256(m.epoch) + m.unbondingEpochs;
        if (sum > MAX64) return (false, 0);
        return (true, uint64(sum));
    }

    // ------------------------------------------------------------------------------
    // Leaf encodings (`leaf.rs`): big-endian, abi.encodePacked order
    // ------------------------------------------------------------------------------

    /// `len` (1..32) bytes of `b` at `off`, big-endian. The caller has checked that they
    /// lie within `b`.
    function _u(bytes calldata b, uint256 off, uint256 len) private pure returns (uint256 v) {
        assembly ("memory-safe") {
            v := shr(sub(256, shl(3, len)), calldataload(add(b.offset, off)))
        }
    }

    function _meta(bytes calldata p) private pure returns (Meta memory m) {
        m.deposits = uint64(_u(p, 1, 8));
        m.epoch = uint64(_u(p, 9, 8));
        m.nextDelegation = uint32(_u(p, 17, 4));
        m.burned = uint128(_u(p, 21, 16));
        m.feeBps = uint16(_u(p, 37, 2));
        m.unbondingEpochs = uint16(_u(p, 39, 2));
    }

    function _account(bytes calldata p) private pure returns (Account memory a) {
        a.owner = address(uint160(_u(p, 1, 20)));
        a.balance = uint128(_u(p, 21, 16));
        a.nonce = uint64(_u(p, 37, 8));
        a.earned = uint128(_u(p, 45, 16));
        a.withdrawn = uint128(_u(p, 61, 16));
        a.stake = uint128(_u(p, 77, 16));
        a.unbonding = uint128(_u(p, 93, 16));
        a.unbondEpoch = uint64(_u(p, 109, 8));
        a.delegated = uint128(_u(p, 117, 16));
        a.commissionBps = uint16(_u(p, 133, 2));
        a.nextCommissionBps = uint16(_u(p, 135, 2));
        a.nextCommissionEpoch = uint64(_u(p, 137, 8));
        a.rewardPerToken = _u(p, 145, 32);
        a.pool = uint128(_u(p, 177, 16));
    }

    function _delegation(bytes calldata p) private pure returns (Delegation memory d) {
        d.delegator = uint32(_u(p, 1, 4));
        d.node = uint32(_u(p, 5, 4));
        d.amount = uint128(_u(p, 9, 16));
        d.rewardSnapshot = _u(p, 25, 32);
        d.earned = uint128(_u(p, 57, 16));
    }

    function _metaLeaf(Meta memory m) private pure returns (bytes32) {
        return keccak256(
            abi.encodePacked(bytes1(0x00), m.deposits, m.epoch, m.nextDelegation, m.burned, m.feeBps, m.unbondingEpochs)
        );
    }

    function _accountLeaf(Account memory a) private pure returns (bytes32) {
        return keccak256(
            abi.encodePacked(
                abi.encodePacked(bytes1(0x01), a.owner, a.balance, a.nonce, a.earned, a.withdrawn, a.stake),
                abi.encodePacked(
                    a.unbonding,
                    a.unbondEpoch,
                    a.delegated,
                    a.commissionBps,
                    a.nextCommissionBps,
                    a.nextCommissionEpoch,
                    a.rewardPerToken,
                    a.pool
                )
            )
        );
    }

    function _delegationLeaf(Delegation memory d) private pure returns (bytes32) {
        return keccak256(abi.encodePacked(bytes1(0x02), d.delegator, d.node, d.amount, d.rewardSnapshot, d.earned));
    }
}
