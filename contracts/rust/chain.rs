//! "The L1" as the rollup needs it: send a transaction, make a view call, read logs and
//! a transaction's input, and know the head. Two implementations: the embedded revm
//! chain ([`crate::EmbeddedChain`]), the default, and any EVM node over JSON-RPC
//! ([`crate::RpcChain`]).

use alloy::primitives::{Address, Bytes, Log, B256, U256};
use alloy::signers::local::PrivateKeySigner;
use std::future::Future;

/// What the chain did with one transaction.
#[derive(Clone, Debug)]
pub struct Receipt {
    /// Transaction hash.
    pub hash: B256,
    /// Block it was included in.
    pub block: u64,
    /// Gas it used (including the 21,000 base and calldata).
    pub gas_used: u64,
    /// Whether it succeeded; a reverted transaction is still included and pays gas.
    pub success: bool,
    /// Its logs.
    pub logs: Vec<Log>,
    /// The created contract, for a deployment.
    pub contract: Option<Address>,
    /// Revert data when it failed (a custom error's selector and arguments).
    pub revert: Bytes,
}

/// A log with where it came from.
#[derive(Clone, Debug)]
pub struct ChainLog {
    /// Block number.
    pub block: u64,
    /// Transaction hash.
    pub tx: B256,
    /// The log.
    pub log: Log,
}

/// Why a chain operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The node could not be reached or answered an error.
    #[error("L1 node: {0}")]
    Rpc(String),
    /// The EVM refused the transaction before executing it (nonce, funds, gas).
    #[error("L1 refused the transaction: {0}")]
    Invalid(String),
    /// A view call reverted.
    #[error("L1 call reverted (data 0x{})", hex::encode(.0))]
    Reverted(Bytes),
    /// A transaction the chain does not know.
    #[error("L1 has no transaction {0}")]
    UnknownTx(B256),
    /// The embedded chain's state file could not be read or written.
    #[error("embedded chain state {path}: {message}")]
    State {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// Only development chains can move their clock.
    #[error("this L1 cannot move its clock")]
    NoTimeTravel,
}

/// The L1 interface the rollup uses. Futures are `Send` so a tokio task can own them.
pub trait L1: Send + Sync {
    /// The chain id signatures and the rollup's domain are bound to.
    fn chain_id(&self) -> u64;

    /// Sends a transaction from `from` to `to` (`None`: deploys `input`) with `value`
    /// wei, and waits for its inclusion.
    fn send(
        &self,
        from: &PrivateKeySigner,
        to: Option<Address>,
        input: Bytes,
        value: U256,
    ) -> impl Future<Output = Result<Receipt, ChainError>> + Send;

    /// A read-only call against the latest state.
    fn call(
        &self,
        to: Address,
        input: Bytes,
    ) -> impl Future<Output = Result<Bytes, ChainError>> + Send;

    /// Logs of `address` from block `from` on, oldest first.
    fn logs(
        &self,
        address: Address,
        from: u64,
    ) -> impl Future<Output = Result<Vec<ChainLog>, ChainError>> + Send;

    /// The calldata of a transaction (how a watchtower reads a batch).
    fn tx_input(&self, hash: B256) -> impl Future<Output = Result<Bytes, ChainError>> + Send;

    /// The latest block's number and timestamp.
    fn head(&self) -> impl Future<Output = Result<(u64, u64), ChainError>> + Send;

    /// An address's ether balance.
    fn eth_balance(
        &self,
        address: Address,
    ) -> impl Future<Output = Result<U256, ChainError>> + Send;

    /// Moves the chain's clock forward: the next block is at least `seconds` after the
    /// latest (development chains).
    fn advance_time(&self, seconds: u64) -> impl Future<Output = Result<(), ChainError>> + Send;
}

impl<T: L1> L1 for std::sync::Arc<T> {
    fn chain_id(&self) -> u64 {
        (**self).chain_id()
    }

    fn send(
        &self,
        from: &PrivateKeySigner,
        to: Option<Address>,
        input: Bytes,
        value: U256,
    ) -> impl Future<Output = Result<Receipt, ChainError>> + Send {
        (**self).send(from, to, input, value)
    }

    fn call(
        &self,
        to: Address,
        input: Bytes,
    ) -> impl Future<Output = Result<Bytes, ChainError>> + Send {
        (**self).call(to, input)
    }

    fn logs(
        &self,
        address: Address,
        from: u64,
    ) -> impl Future<Output = Result<Vec<ChainLog>, ChainError>> + Send {
        (**self).logs(address, from)
    }

    fn tx_input(&self, hash: B256) -> impl Future<Output = Result<Bytes, ChainError>> + Send {
        (**self).tx_input(hash)
    }

    fn head(&self) -> impl Future<Output = Result<(u64, u64), ChainError>> + Send {
        (**self).head()
    }

    fn eth_balance(
        &self,
        address: Address,
    ) -> impl Future<Output = Result<U256, ChainError>> + Send {
        (**self).eth_balance(address)
    }

    fn advance_time(&self, seconds: u64) -> impl Future<Output = Result<(), ChainError>> + Send {
        (**self).advance_time(seconds)
    }
}

/// Either L1, chosen at run time (configuration says embedded or an RPC URL).
#[derive(Clone)]
pub enum AnyChain {
    /// The in-process revm chain.
    Embedded(std::sync::Arc<crate::EmbeddedChain>),
    /// An EVM node over JSON-RPC.
    Rpc(std::sync::Arc<crate::RpcChain>),
}

macro_rules! dispatch {
    ($self:ident, $c:ident => $e:expr) => {
        match $self {
            AnyChain::Embedded($c) => $e,
            AnyChain::Rpc($c) => $e,
        }
    };
}

impl L1 for AnyChain {
    fn chain_id(&self) -> u64 {
        dispatch!(self, c => c.chain_id())
    }

    async fn send(
        &self,
        from: &PrivateKeySigner,
        to: Option<Address>,
        input: Bytes,
        value: U256,
    ) -> Result<Receipt, ChainError> {
        dispatch!(self, c => c.send(from, to, input, value).await)
    }

    async fn call(&self, to: Address, input: Bytes) -> Result<Bytes, ChainError> {
        dispatch!(self, c => c.call(to, input).await)
    }

    async fn logs(&self, address: Address, from: u64) -> Result<Vec<ChainLog>, ChainError> {
        dispatch!(self, c => c.logs(address, from).await)
    }

    async fn tx_input(&self, hash: B256) -> Result<Bytes, ChainError> {
        dispatch!(self, c => c.tx_input(hash).await)
    }

    async fn head(&self) -> Result<(u64, u64), ChainError> {
        dispatch!(self, c => c.head().await)
    }

    async fn eth_balance(&self, address: Address) -> Result<U256, ChainError> {
        dispatch!(self, c => c.eth_balance(address).await)
    }

    async fn advance_time(&self, seconds: u64) -> Result<(), ChainError> {
        dispatch!(self, c => c.advance_time(seconds).await)
    }
}
