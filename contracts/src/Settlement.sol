// SPDX-License-Identifier: MIT OR Apache-2.0
pragma solidity 0.8.37;

import {SparseMerkle} from "./SparseMerkle.sol";
import {StepVerifier, Witness} from "./StepVerifier.sol";

interface IERC20 {
    function transfer(address to, uint256 value) external returns (bool);
    function transferFrom(address from, address to, uint256 value) external returns (bool);
}

/// @title Settlement
/// @notice The L1 side of the Tessera payment rollup. It holds the deposited tokens,
/// queues deposits for L2 in order, accepts batches of L2 transactions (with the state
/// root after each) from one bonded sequencer, lets anyone prove a wrong root within the
/// challenge window by re-executing one transaction (StepVerifier), finalizes batches
/// after the window, and pays withdrawals against final roots by Merkle proof, once.
/// If the sequencer stops posting, anyone can open the escape hatch: every owner then
/// takes out what the last final state holds for them, and queued deposits that state
/// never applied are refunded. docs/settlement.md describes the rules and the layouts;
/// rollup/src/*.rs is the normative L2 state machine.
contract Settlement {
    struct Batch {
        bytes32 root; // state root after the batch
        bytes32 steps; // Merkle root of keccak256(keccak256(tx) ‖ pre ‖ post) per step
        uint64 submittedAt;
        uint32 count;
    }

    /// One step of a batch, as a challenge names it.
    struct Step {
        uint32 index; // position in the batch
        bytes txData; // the transaction's encoding
        bytes32 preRoot; // the posted root before it
        bytes32 postRoot; // the posted root after it
        bytes32[] path; // siblings of the step leaf under the steps commitment, bottom up
    }

    /// @notice Most transactions one batch may carry.
    uint256 public constant MAX_BATCH = 4096;
    uint256 private constant ACCOUNT_LEN = 193;
    uint256 private constant DELEGATION_LEN = 73;
    uint256 private constant META_LEN = 41;
    uint32 private constant DELEGATION_BASE = 1 << 31;
    uint256 private constant SCALE = 1e18;

    IERC20 public immutable token;
    StepVerifier public immutable verifier;
    address public immutable sequencer;
    /// @notice Seconds a batch can be challenged after it is posted.
    uint64 public immutable challengeWindow;
    /// @notice Seconds without a new batch after which anyone may open the escape hatch.
    uint64 public immutable escapeDelay;
    /// @notice Wei the sequencer must have bonded to post.
    uint256 public immutable minBond;
    /// @notice Wei a challenger puts up; lost to the sequencer if the challenge is wrong.
    uint256 public immutable challengeBond;
    /// @notice Binds L2 signatures to this chain and this contract.
    bytes32 public immutable domain;
    bytes32 public immutable genesisRoot;
    uint64 private immutable deployedAt;

    /// @notice The sequencer's bonded wei.
    uint256 public bond;
    /// Batches by index; entries at or past `batchCount` are reverted leftovers.
    mapping(uint256 => Batch) private batches;
    // The three counters below share one storage word: a withdrawal reads it once.
    /// @notice Batches posted and not reverted.
    uint64 public batchCount;
    /// @notice Batches [0, finalized) are final.
    uint64 public finalized;
    /// @notice Set once the escape hatch is open: no more batches; exits by proof.
    bool public escaped;
    /// @notice keccak256(slot ‖ address ‖ amount) of each deposit, by queue position.
    mapping(uint64 => bytes32) public depositHashes;
    /// @notice Deposits queued so far (applied on L2 or not). Shares a storage slot with
    /// `nextSlot`, so a deposit writes one word of counters.
    uint64 public depositCount;
    /// @notice The slot the next new depositor gets.
    uint32 public nextSlot = 2;
    /// @notice The account slot L1 assigned to each depositor (0: none yet).
    mapping(address => uint32) public slotOf;
    /// @notice Cumulative `withdrawn` already paid out per account slot.
    mapping(uint32 => uint256) public paid;

    bytes32 public escapeRoot;
    mapping(uint32 => bool) public exited;
    mapping(uint64 => bool) public refunded;
    mapping(uint32 => uint256) public poolPaid;

    event Deposited(uint64 indexed seq, uint32 indexed slot, address indexed account, uint256 amount);
    event Bonded(uint256 amount, uint256 total);
    event BatchSubmitted(uint256 indexed index, bytes32 prevRoot, bytes32 root, bytes32 steps, uint256 count);
    event BatchFinalized(uint256 indexed index, bytes32 root);
    event BatchesReverted(uint256 indexed fromIndex, uint256 count);
    event Challenged(uint256 indexed index, uint32 step, address indexed challenger, bytes32 correctRoot, uint256 reward);
    event ChallengeFailed(uint256 indexed index, uint32 step, address indexed challenger);
    event Withdrawn(uint32 indexed slot, address indexed account, uint256 amount);
    event EscapeOpened(bytes32 root, uint256 finalBatches);
    event Exited(uint32 indexed slot, address indexed account, uint256 amount);
    event Refunded(uint64 indexed seq, address indexed account, uint256 amount);

    error NotSequencer(address caller);
    error BondTooLow(uint256 bond, uint256 needed);
    error WrongPrevRoot(bytes32 tip, bytes32 given);
    error BadBatchSize(uint256 count);
    error BadBatchData(uint256 offset);
    error NoSuchBatch(uint256 index);
    error NotFinal(uint256 index);
    error WindowClosed(uint256 index);
    error WrongChallengeBond(uint256 sent, uint256 needed);
    error StepNotInBatch(uint32 step);
    error BadLeaf();
    error BadProof();
    error NothingToWithdraw(uint32 slot);
    error AmountTooLarge(uint256 amount);
    error NoFreeSlot();
    error EscapeOpen();
    error EscapeNotOpen();
    error SequencerActive(uint256 opensAt);
    error AlreadyExited(uint256 what);
    error DepositApplied(uint64 seq);
    error TransferFailed();

    constructor(
        IERC20 token_,
        StepVerifier verifier_,
        address sequencer_,
        bytes32 genesisRoot_,
        uint64 challengeWindow_,
        uint64 escapeDelay_,
        uint256 minBond_,
        uint256 challengeBond_
    ) {
        // Escape needs every posted batch past its window, so the delay is longer.
        require(escapeDelay_ > challengeWindow_, "escape delay must exceed the window");
        token = token_;
        verifier = verifier_;
        sequencer = sequencer_;
        genesisRoot = genesisRoot_;
        challengeWindow = challengeWindow_;
        escapeDelay = escapeDelay_;
        minBond = minBond_;
        challengeBond = challengeBond_;
        deployedAt = uint64(block.timestamp);
        domain = keccak256(abi.encodePacked("tessera/domain/1", block.chainid, address(this)));
    }

    // ---------------------------------------------------------------- deposits

    /// @notice Moves `amount` tokens from the caller into the rollup for `account`
    /// (approve first). A first deposit assigns the account its slot; a zero deposit
    /// only registers it (how a node gets a slot to be paid in).
    function deposit(address account, uint256 amount) external {
        if (escaped) revert EscapeOpen();
        if (amount > type(uint128).max) revert AmountTooLarge(amount);
        uint32 slot = slotOf[account];
        if (slot == 0) {
            slot = nextSlot;
            if (slot >= DELEGATION_BASE) revert NoFreeSlot();
            slotOf[account] = slot;
            nextSlot = slot + 1;
        }
        if (amount > 0 && !token.transferFrom(msg.sender, address(this), amount)) revert TransferFailed();
        uint64 seq = depositCount;
        depositCount = seq + 1;
        depositHashes[seq] = keccak256(abi.encodePacked(slot, account, uint128(amount)));
        emit Deposited(seq, slot, account, amount);
    }

    // ---------------------------------------------------------------- batches

    /// @notice Adds to the sequencer's bond.
    function postBond() external payable {
        bond += msg.value;
        emit Bonded(msg.value, bond);
    }

    /// @notice Posts a batch: the transactions back to back (rollup/src/tx.rs encoding)
    /// and the state root after each. The steps commitment is computed here, so the
    /// chain of roots is consistent by construction.
    function submitBatch(bytes32 prevRoot, bytes calldata txs, bytes32[] calldata roots) external {
        if (msg.sender != sequencer) revert NotSequencer(msg.sender);
        if (escaped) revert EscapeOpen();
        if (bond < minBond) revert BondTooLow(bond, minBond);
        bytes32 tip = tipRoot();
        if (prevRoot != tip) revert WrongPrevRoot(tip, prevRoot);
        uint256 n = roots.length;
        if (n == 0 || n > MAX_BATCH) revert BadBatchSize(n);
        uint256 width = 1;
        while (width < n) width <<= 1;
        bytes32[] memory level = new bytes32[](width);
        uint256 off;
        bytes32 pre = prevRoot;
        for (uint256 i; i < n; ++i) {
            uint256 len = off < txs.length ? txLength(uint8(txs[off])) : 0;
            if (len == 0 || off + len > txs.length) revert BadBatchData(off);
            level[i] = _stepLeaf(txs[off:off + len], pre, roots[i]);
            pre = roots[i];
            off += len;
        }
        if (off != txs.length) revert BadBatchData(off);
        for (; width > 1; width >>= 1) {
            for (uint256 i; i < width / 2; ++i) {
                level[i] = hashPair(level[2 * i], level[2 * i + 1]);
            }
        }
        uint64 index = batchCount;
        batches[index] = Batch({root: pre, steps: level[0], submittedAt: uint64(block.timestamp), count: uint32(n)});
        batchCount = index + 1;
        emit BatchSubmitted(index, prevRoot, pre, level[0], n);
    }

    /// @notice Marks every batch whose window has passed as final.
    function finalize() public {
        uint64 f = finalized;
        uint64 n = batchCount;
        while (f < n && block.timestamp >= uint256(batches[f].submittedAt) + challengeWindow) {
            emit BatchFinalized(f, batches[f].root);
            ++f;
        }
        finalized = f;
    }

    /// @notice Proves batch `index` wrong at one step by re-executing that one
    /// transaction from its posted pre-root against `witnesses` (rollup/src/state.rs
    /// witness order). If the posted post-root is wrong, the batch and every later one
    /// are reverted and the sequencer's bond is slashed, half to the challenger. If it
    /// is right, the challenge bond goes to the sequencer.
    function challenge(uint256 index, Step calldata step, Witness[] calldata witnesses) external payable {
        if (msg.value != challengeBond) revert WrongChallengeBond(msg.value, challengeBond);
        _checkStep(index, step);
        bytes32 correct = verifier.execute(domain, step.preRoot, step.txData, witnesses, _queued(step.txData));
        if (correct == step.postRoot) {
            emit ChallengeFailed(index, step.index, msg.sender);
            _pay(sequencer, msg.value);
            return;
        }
        uint256 reverted = batchCount - index;
        batchCount = uint64(index);
        emit BatchesReverted(index, reverted);
        uint256 slashed = bond;
        bond = 0;
        uint256 reward = slashed / 2; // the other half stays locked here for good
        emit Challenged(index, step.index, msg.sender, correct, reward);
        _pay(msg.sender, reward + msg.value);
    }

    /// Requires `step` to be step `step.index` of batch `index`, within its window.
    function _checkStep(uint256 index, Step calldata step) private view {
        if (index >= batchCount) revert NoSuchBatch(index);
        if (index < finalized) revert WindowClosed(index);
        Batch storage b = batches[index];
        if (block.timestamp >= uint256(b.submittedAt) + challengeWindow) revert WindowClosed(index);
        uint32 pos = step.index;
        if (pos >= b.count) revert StepNotInBatch(pos);
        uint256 depth;
        while ((uint256(1) << depth) < b.count) ++depth;
        bytes32[] calldata path = step.path;
        if (path.length != depth) revert StepNotInBatch(pos);
        bytes32 node = _stepLeaf(step.txData, step.preRoot, step.postRoot);
        for (uint256 h; h < depth; ++h) {
            node = (pos >> h) & 1 == 0 ? hashPair(node, path[h]) : hashPair(path[h], node);
        }
        if (node != b.steps) revert StepNotInBatch(pos);
    }

    /// The L1 queue's hash at a deposit transaction's position (zero otherwise).
    function _queued(bytes calldata txData) private view returns (bytes32) {
        if (txData.length != 49 || uint8(txData[0]) != 1) return bytes32(0);
        uint64 seq = uint64(bytes8(txData[1:9]));
        return depositHashes[seq];
    }

    // ---------------------------------------------------------------- withdrawals

    /// @notice Pays an account what it has moved out of L2 and not yet been paid: its
    /// cumulative `withdrawn` at final batch `index`, proved by `leaf`, less `paid`.
    /// Anyone may call; the tokens go to the account's address.
    function withdraw(uint256 index, Witness calldata leaf) external {
        if (escaped) revert EscapeOpen();
        if (index >= finalized) revert NotFinal(index);
        (address account, uint256 withdrawn) = _provenAccount(batches[index].root, leaf);
        if (withdrawn <= paid[leaf.slot]) revert NothingToWithdraw(leaf.slot);
        uint256 owed = withdrawn - paid[leaf.slot];
        paid[leaf.slot] = withdrawn;
        emit Withdrawn(leaf.slot, account, owed);
        _transfer(account, owed);
    }

    // ---------------------------------------------------------------- escape hatch

    /// @notice Opens the escape hatch once no batch has been posted for `escapeDelay`:
    /// finalizes what was posted and freezes its root as the one exits prove against.
    function openEscape() external {
        if (escaped) revert EscapeOpen();
        uint256 last = batchCount == 0 ? deployedAt : batches[batchCount - 1].submittedAt;
        if (block.timestamp < last + escapeDelay) revert SequencerActive(last + escapeDelay);
        finalize();
        escaped = true;
        escapeRoot = finalRoot();
        emit EscapeOpened(escapeRoot, finalized);
    }

    /// @notice After escape: pays an account its balance, stake, unbonding stake and
    /// unpaid withdrawals at the escape root, once.
    function exitAccount(Witness calldata leaf) external {
        if (!escaped) revert EscapeNotOpen();
        if (exited[leaf.slot]) revert AlreadyExited(leaf.slot);
        (address account, uint256 withdrawn) = _provenAccount(escapeRoot, leaf);
        bytes calldata p = leaf.preimage;
        uint256 amount = uint128(bytes16(p[21:37])) + uint128(bytes16(p[77:93])) + uint128(bytes16(p[93:109]))
            + (withdrawn - paid[leaf.slot]);
        exited[leaf.slot] = true;
        paid[leaf.slot] = withdrawn;
        emit Exited(leaf.slot, account, amount);
        _transfer(account, amount);
    }

    /// @notice After escape: pays a delegator its delegation and its share of the node's
    /// reward pool at the escape root, once. Needs the delegation, the node's account
    /// and the delegator's account, each proved.
    function exitDelegation(Witness calldata delegation, Witness calldata node, Witness calldata delegator)
        external
    {
        if (!escaped) revert EscapeNotOpen();
        if (exited[delegation.slot]) revert AlreadyExited(delegation.slot);
        bytes calldata d = delegation.preimage;
        if (delegation.slot < DELEGATION_BASE || d.length != DELEGATION_LEN || uint8(d[0]) != 2) revert BadLeaf();
        _prove(escapeRoot, delegation);
        if (uint32(bytes4(d[1:5])) != delegator.slot || uint32(bytes4(d[5:9])) != node.slot) revert BadLeaf();
        (address account,) = _provenAccount(escapeRoot, delegator);
        _provenAccount(escapeRoot, node);
        (uint256 amount, uint256 accrued) = _accrued(d, node.preimage);
        uint256 left = uint128(bytes16(node.preimage[177:193])) - poolPaid[node.slot];
        uint256 share = accrued < left ? accrued : left;
        poolPaid[node.slot] += share;
        exited[delegation.slot] = true;
        emit Exited(delegation.slot, account, amount + share);
        _transfer(account, amount + share);
    }

    /// A delegation's amount and its rewards accrued since its last claim, as
    /// rollup/src/leaf.rs `Delegation::accrued` computes them.
    function _accrued(bytes calldata d, bytes calldata n) private pure returns (uint256 amount, uint256 accrued) {
        amount = uint128(bytes16(d[9:25]));
        uint256 perToken = uint256(bytes32(n[145:177]));
        uint256 snapshot = uint256(bytes32(d[25:57]));
        if (perToken > snapshot) {
            uint256 delta = perToken - snapshot;
            accrued = (amount != 0 && delta > type(uint256).max / amount)
                ? type(uint256).max / SCALE
                : amount * delta / SCALE;
        }
    }

    /// @notice After escape: refunds a queued deposit the escape root never applied.
    function refundDeposit(uint64 seq, uint32 slot, address account, uint128 amount, Witness calldata meta)
        external
    {
        if (!escaped) revert EscapeNotOpen();
        if (refunded[seq]) revert AlreadyExited(seq);
        if (depositHashes[seq] != keccak256(abi.encodePacked(slot, account, amount))) {
            revert BadLeaf();
        }
        bytes calldata m = meta.preimage;
        if (meta.slot != 0 || m.length != META_LEN || uint8(m[0]) != 0) revert BadLeaf();
        _prove(escapeRoot, meta);
        if (seq < uint64(bytes8(m[1:9]))) revert DepositApplied(seq);
        refunded[seq] = true;
        emit Refunded(seq, account, amount);
        _transfer(account, amount);
    }

    // ---------------------------------------------------------------- views

    /// @notice Slashed bond not paid to challengers: locked in this contract for good
    /// (its ether is only ever the sequencer's bond and what slashes left behind).
    function burnedBond() external view returns (uint256) {
        return address(this).balance - bond;
    }

    /// @notice Batch `index` as posted.
    function batch(uint256 index) external view returns (Batch memory) {
        if (index >= batchCount) revert NoSuchBatch(index);
        return batches[index];
    }

    /// @notice The root the next batch must start from.
    function tipRoot() public view returns (bytes32) {
        return batchCount == 0 ? genesisRoot : batches[batchCount - 1].root;
    }

    /// @notice The latest final root (genesis if none is final).
    function finalRoot() public view returns (bytes32) {
        return finalized == 0 ? genesisRoot : batches[finalized - 1].root;
    }

    /// @notice Encoded length of an L2 transaction by type byte (0: unknown type).
    function txLength(uint8 kind) public pure returns (uint256) {
        if (kind == 1) return 49; // deposit
        if (kind == 2) return 57; // settle
        if (kind >= 3 && kind <= 5) return 94; // withdraw, stake, unstake
        if (kind == 6) return 102; // delegate
        if (kind == 7) return 98; // undelegate
        if (kind == 8) return 80; // set commission
        if (kind == 9 || kind == 10) return 5; // claim, release
        if (kind == 11) return 53; // slash
        if (kind == 12) return 9; // epoch
        return 0;
    }

    // ---------------------------------------------------------------- internals

    function _provenAccount(bytes32 root, Witness calldata leaf) private pure returns (address, uint256) {
        bytes calldata p = leaf.preimage;
        if (leaf.slot == 0 || leaf.slot >= DELEGATION_BASE || p.length != ACCOUNT_LEN || uint8(p[0]) != 1) {
            revert BadLeaf();
        }
        _prove(root, leaf);
        return (address(bytes20(p[1:21])), uint128(bytes16(p[61:77])));
    }

    function _prove(bytes32 root, Witness calldata leaf) private pure {
        if (SparseMerkle.root(leaf.slot, keccak256(leaf.preimage), leaf.bitmap, leaf.siblings) != root) {
            revert BadProof();
        }
    }

    function _transfer(address to, uint256 amount) private {
        if (amount > 0 && !token.transfer(to, amount)) revert TransferFailed();
    }

    function _pay(address to, uint256 value) private {
        if (value == 0) return;
        (bool ok,) = payable(to).call{value: value}("");
        if (!ok) revert TransferFailed();
    }

    /// keccak256(keccak256(tx) ‖ pre ‖ post), hashed in scratch memory (nothing allocated
    /// per step, so a long batch pays no growing memory cost).
    function _stepLeaf(bytes calldata txData, bytes32 pre, bytes32 post) private pure returns (bytes32 leaf) {
        assembly ("memory-safe") {
            let ptr := mload(0x40)
            calldatacopy(ptr, txData.offset, txData.length)
            mstore(ptr, keccak256(ptr, txData.length))
            mstore(add(ptr, 32), pre)
            mstore(add(ptr, 64), post)
            leaf := keccak256(ptr, 96)
        }
    }

    function hashPair(bytes32 a, bytes32 b) private pure returns (bytes32 h) {
        assembly ("memory-safe") {
            mstore(0x00, a)
            mstore(0x20, b)
            h := keccak256(0x00, 0x40)
        }
    }
}
