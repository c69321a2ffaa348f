//! The Tessera payment rollup (issue 5, in progress): the L2 state of balances, stakes,
//! delegations and rewards, committed by a fixed-depth keccak256 sparse Merkle tree that
//! Rust and the settlement contract compute identically, so one proof format serves
//! withdrawals, reward statements and fraud proofs.
//!
//! So far: the tree ([`smt`]) and the first slice of the state and its pure transition
//! function ([`state`]: accounts, the deposit queue, settlement with a protocol fee, and
//! withdrawals signed by the owner). Stakes, delegations, slashes, batches and the
//! contracts come next.

pub mod smt;
pub mod state;

pub use smt::{
    empty_hashes, hash_pair, keccak256, MerkleProof, ProofError, SparseMerkleTree, DEPTH, H256,
};
pub use state::{recover, withdraw_digest, Account, Address, Meta, Outcome, State, Tx};
