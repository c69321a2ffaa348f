//! The Tessera payment rollup: the L2 state of balances, stakes, delegations and
//! rewards, committed by a fixed-depth keccak256 sparse Merkle tree that Rust and the
//! settlement contract compute identically, so one proof format serves withdrawals,
//! reward statements and fraud proofs.
//!
//! - [`smt`]: the tree and its proofs;
//! - [`leaf`]: the meta, account and delegation leaves and their packed encodings;
//! - [`tx`]: transactions, their wire encoding and owner signatures;
//! - [`state`]: the one pure transition function and the witnesses of a step;
//! - [`batch`]: batches with intermediate roots, the steps commitment, fraud proofs.

pub mod batch;
pub mod leaf;
pub mod smt;
pub mod state;
pub mod tx;

pub use batch::{step_leaf, verify_step, Batch, BatchError, FraudProof};
pub use leaf::{
    Account, Address, Delegation, Meta, BPS, DELEGATION_BASE, FEE_SLOT, FIRST_ACCOUNT_SLOT,
    META_SLOT, SCALE,
};
pub use smt::{
    empty_hashes, hash_pair, keccak256, MerkleProof, ProofError, SparseMerkleTree, DEPTH, H256,
};
pub use state::{deposit_hash, DepositQueue, Outcome, SettleSplit, State, Witness};
pub use tx::{address_of, personal_digest, recover, sign_digest, Action, DecodeError, Tx};
