//! The Tessera payment rollup (issue 5, in progress): the L2 state of balances, stakes,
//! delegations and rewards, committed by a fixed-depth keccak256 sparse Merkle tree that
//! Rust and the settlement contract compute identically, so one proof format serves
//! withdrawals, reward statements and fraud proofs.
//!
//! This first slice holds the tree ([`smt`]); the state, its transactions and the pure
//! transition function come next.

pub mod smt;

pub use smt::{
    empty_hashes, hash_pair, keccak256, MerkleProof, ProofError, SparseMerkleTree, DEPTH, H256,
};
