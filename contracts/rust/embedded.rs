//! The embedded L1: revm in-process, running the real compiled bytecode. Each
//! transaction is mined in a block of its own, stamped with the wall clock (plus any
//! offset a test adds), and the whole chain — accounts, storage, code, blocks,
//! transactions, logs — is written to one file after each block, so a restarted devnet
//! keeps its balances.
//! Gas is free (base fee 0): this chain is for development, not for measuring fees in
//! ether (gas *amounts* are exact and are what docs/settlement.md reports).
//!
//! [`EmbeddedChain::rpc`] answers Ethereum JSON-RPC over the same chain, so that a client
//! in another process — [`crate::RpcChain`], alloy's provider with its default fillers —
//! uses it as it would anvil: signed raw transactions (their signer recovered, their
//! nonce and chain id checked), receipts, transactions and blocks by hash or number,
//! logs, calls, gas estimates, fee history, and the dev methods `evm_increaseTime` and
//! `evm_mine`. Only the latest state is kept: state reads at an older block are refused.

use crate::chain::{ChainError, ChainLog, Receipt, L1};
use alloy::consensus::transaction::Recovered;
use alloy::consensus::{
    Eip658Value, Header as ConsensusHeader, Receipt as ConsensusReceipt, ReceiptEnvelope,
    ReceiptWithBloom, Signed, Transaction as _, TxEnvelope, TxLegacy, TxType,
    EMPTY_OMMER_ROOT_HASH, EMPTY_ROOT_HASH,
};
use alloy::eips::eip2718::{Decodable2718, Typed2718};
use alloy::eips::eip4895::Withdrawals;
use alloy::eips::eip7685::EMPTY_REQUESTS_HASH;
use alloy::eips::{BlockId, BlockNumberOrTag};
use alloy::primitives::{
    keccak256, logs_bloom, Address, Bloom, Bytes, Signature, TxKind, B256, U256, U64,
};
use alloy::rpc::types::{
    Block, BlockTransactions, FeeHistory, Filter, FilterBlockOption, Header as RpcHeader,
    Log as RpcLog, Transaction as RpcTransaction, TransactionReceipt, TransactionRequest,
};
use alloy::signers::local::PrivateKeySigner;
use revm::context::{BlockEnv, Context, TxEnv};
use revm::context_interface::result::{ExecutionResult, Output};
use revm::context_interface::ContextTr;
use revm::database::{CacheDB, EmptyDB};
use revm::handler::{MainnetContext, MainnetEvm};
use revm::primitives::hardfork::SpecId;
use revm::state::AccountInfo;
use revm::{Database, ExecuteCommitEvm, ExecuteEvm, MainBuilder, MainContext};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

type Db = CacheDB<EmptyDB>;
type Evm = MainnetEvm<MainnetContext<Db>>;

/// The embedded chain's id (anvil's default, so wallets and tools recognise a dev chain).
pub const EMBEDDED_CHAIN_ID: u64 = 31337;
const BLOCK_GAS_LIMIT: u64 = 30_000_000;

/// The chain as written to its file (the field order is [`SnapshotRef`]'s).
#[derive(Deserialize)]
struct Snapshot {
    db: Db,
    offset: u64,
    blocks: Vec<StoredBlock>,
    logs: Vec<StoredLog>,
    txs: HashMap<B256, StoredTx>,
}

/// [`Snapshot`], borrowed for writing.
#[derive(Serialize)]
struct SnapshotRef<'a> {
    db: &'a Db,
    offset: u64,
    blocks: &'a [StoredBlock],
    logs: &'a [StoredLog],
    txs: &'a HashMap<B256, StoredTx>,
}

#[derive(Clone, Serialize, Deserialize)]
struct StoredBlock {
    timestamp: u64,
    /// The transaction mined in it: every transaction gets a block of its own, and
    /// `evm_mine` mines empty ones.
    tx: Option<B256>,
    gas_used: u64,
}

#[derive(Clone, Serialize, Deserialize)]
struct StoredLog {
    block: u64,
    tx: B256,
    /// Position in its block.
    index: u64,
    address: Address,
    topics: Vec<B256>,
    data: Bytes,
}

#[derive(Clone, Serialize, Deserialize)]
struct StoredTx {
    block: u64,
    /// EIP-2718 type (0 for [`L1::send`]'s unsigned ones).
    ty: u8,
    from: Address,
    to: Option<Address>,
    nonce: u64,
    value: U256,
    input: Bytes,
    gas_limit: u64,
    gas_used: u64,
    /// Wei paid per gas.
    gas_price: u128,
    success: bool,
    contract: Option<Address>,
    /// Its logs: `logs[first_log..first_log + log_count]`.
    first_log: usize,
    log_count: usize,
    /// The signed envelope, for one sent over JSON-RPC.
    raw: Option<Bytes>,
}

/// The chain's state. revm's EVM is not `Send`, so one is built around the database
/// for each transaction and taken apart again after it.
struct Inner {
    db: Db,
    offset: u64,
    /// Never empty: block 0 is the genesis.
    blocks: Vec<StoredBlock>,
    logs: Vec<StoredLog>,
    txs: HashMap<B256, StoredTx>,
    path: Option<PathBuf>,
}

/// An EVM chain inside this process.
pub struct EmbeddedChain {
    inner: Mutex<Inner>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn build(db: Db, number: u64, timestamp: u64) -> Evm {
    Context::mainnet()
        .with_db(db)
        .modify_cfg_chained(|cfg| {
            cfg.chain_id = EMBEDDED_CHAIN_ID;
            cfg.set_spec_and_mainnet_gas_params(SpecId::PRAGUE);
        })
        .modify_block_chained(|b: &mut BlockEnv| {
            b.number = U256::from(number);
            b.timestamp = U256::from(timestamp);
            b.gas_limit = BLOCK_GAS_LIMIT;
            b.basefee = 0;
        })
        .build_mainnet()
}

/// Runs `f` on an EVM over `inner`'s database at block (`number`, `timestamp`).
fn with_evm<T>(inner: &mut Inner, number: u64, timestamp: u64, f: impl FnOnce(&mut Evm) -> T) -> T {
    let db = std::mem::replace(&mut inner.db, CacheDB::new(EmptyDB::default()));
    let mut evm = build(db, number, timestamp);
    let out = f(&mut evm);
    inner.db = std::mem::replace(evm.ctx.db_mut(), CacheDB::new(EmptyDB::default()));
    out
}

impl EmbeddedChain {
    /// A fresh chain in memory only.
    pub fn in_memory() -> Self {
        Self::from_parts(Inner {
            db: CacheDB::new(EmptyDB::default()),
            offset: 0,
            blocks: vec![StoredBlock {
                timestamp: now(),
                tx: None,
                gas_used: 0,
            }],
            logs: Vec::new(),
            txs: HashMap::new(),
            path: None,
        })
    }

    /// The chain kept in `path`: loaded if the file exists, created (and written at the
    /// first block) if not.
    pub fn open(path: &Path) -> Result<Self, ChainError> {
        let err = |message: String| ChainError::State {
            path: path.display().to_string(),
            message,
        };
        match std::fs::read(path) {
            Ok(bytes) => {
                let s: Snapshot = postcard::from_bytes(&bytes)
                    .ok()
                    .filter(|s: &Snapshot| !s.blocks.is_empty())
                    .ok_or_else(|| {
                        err(
                            "unreadable (corrupt, or written by an older version); move it \
                             away to start a new chain"
                                .into(),
                        )
                    })?;
                Ok(Self::from_parts(Inner {
                    db: s.db,
                    offset: s.offset,
                    blocks: s.blocks,
                    logs: s.logs,
                    txs: s.txs,
                    path: Some(path.to_path_buf()),
                }))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
                }
                let mut c = Self::in_memory();
                c.inner.get_mut().expect("fresh lock").path = Some(path.to_path_buf());
                Ok(c)
            }
            Err(e) => Err(err(e.to_string())),
        }
    }

    fn from_parts(inner: Inner) -> Self {
        Self {
            inner: Mutex::new(inner),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves a consistent chain: every block is
        // committed whole by revm before the lock is released.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives `address` ether (the dev chain's faucet, for gas-free chains' bonds).
    pub fn fund(&self, address: Address, wei: U256) -> Result<(), ChainError> {
        let mut inner = self.lock();
        let mut info = inner.account(address);
        info.balance = info.balance.saturating_add(wei);
        inner.db.insert_account_info(address, info);
        inner.persist()
    }

    /// Mines an empty block (what `evm_mine` does), returning its number and timestamp.
    pub fn mine(&self) -> Result<(u64, u64), ChainError> {
        let mut inner = self.lock();
        let mined = inner.mine_empty(None)?;
        inner.persist()?;
        Ok(mined)
    }

    fn send_sync(
        &self,
        from: Address,
        to: Option<Address>,
        input: Bytes,
        value: U256,
    ) -> Result<Receipt, ChainError> {
        let mut inner = self.lock();
        let number = inner.number() + 1;
        let nonce = inner.account(from).nonce;
        let builder = TxEnv::builder()
            .caller(from)
            .data(input.clone())
            .value(value)
            .nonce(nonce)
            .chain_id(Some(EMBEDDED_CHAIN_ID))
            .gas_limit(BLOCK_GAS_LIMIT)
            .gas_price(0);
        let builder = match to {
            Some(to) => builder.call(to),
            None => builder.create(),
        };
        let tx = builder
            .build()
            .map_err(|e| ChainError::Invalid(format!("{e:?}")))?;
        let mut preimage = Vec::with_capacity(64 + input.len());
        preimage.extend_from_slice(&number.to_be_bytes());
        preimage.extend_from_slice(from.as_slice());
        preimage.extend_from_slice(&nonce.to_be_bytes());
        preimage.extend_from_slice(&input);
        inner.execute(tx, keccak256(&preimage), None)
    }

    fn call_sync(&self, to: Address, input: Bytes) -> Result<Bytes, ChainError> {
        let mut inner = self.lock();
        let nonce = inner.account(Address::ZERO).nonce;
        let tx = TxEnv::builder()
            .caller(Address::ZERO)
            .call(to)
            .data(input)
            .nonce(nonce)
            .chain_id(Some(EMBEDDED_CHAIN_ID))
            .gas_limit(BLOCK_GAS_LIMIT)
            .gas_price(0)
            .build()
            .map_err(|e| ChainError::Invalid(format!("{e:?}")))?;
        match inner.simulate(tx)? {
            ExecutionResult::Success { output, .. } => Ok(output.into_data()),
            ExecutionResult::Revert { output, .. } => Err(ChainError::Reverted(output)),
            ExecutionResult::Halt { reason, .. } => Err(ChainError::Invalid(format!("{reason:?}"))),
        }
    }

    fn advance_time_sync(&self, seconds: u64) -> Result<u64, ChainError> {
        let mut inner = self.lock();
        // Blocks mined faster than one a second run ahead of the wall clock; the next
        // block is at least `seconds` after the latest one.
        let target = inner.timestamp().saturating_add(seconds);
        inner.offset = (inner.offset + seconds).max(target.saturating_sub(now()));
        inner.persist()?;
        Ok(inner.offset)
    }
}

impl Inner {
    fn number(&self) -> u64 {
        self.blocks.len() as u64 - 1
    }

    fn timestamp(&self) -> u64 {
        self.blocks.last().map_or(0, |b| b.timestamp)
    }

    /// The next block's number and timestamp.
    fn next_block(&self) -> (u64, u64) {
        (
            self.number() + 1,
            (now() + self.offset).max(self.timestamp() + 1),
        )
    }

    /// Block `n`'s hash: keccak256(number ‖ timestamp), both 8 bytes big-endian (this
    /// chain has no real headers to hash).
    fn block_hash(&self, n: u64) -> B256 {
        let timestamp = self.blocks.get(n as usize).map_or(0, |b| b.timestamp);
        let mut preimage = [0u8; 16];
        preimage[..8].copy_from_slice(&n.to_be_bytes());
        preimage[8..].copy_from_slice(&timestamp.to_be_bytes());
        keccak256(preimage)
    }

    fn account(&mut self, address: Address) -> AccountInfo {
        self.db.basic(address).ok().flatten().unwrap_or_default()
    }

    /// Runs `tx` against the latest state in the next block, committing nothing (as
    /// `eth_call` does on a node).
    fn simulate(&mut self, tx: TxEnv) -> Result<ExecutionResult, ChainError> {
        let (number, timestamp) = self.next_block();
        with_evm(self, number, timestamp, |evm| evm.transact(tx))
            .map(|out| out.result)
            .map_err(|e| ChainError::Invalid(e.to_string()))
    }

    /// Mines `tx` in a block of its own, records it under `hash` and writes the chain.
    fn execute(
        &mut self,
        tx: TxEnv,
        hash: B256,
        raw: Option<Bytes>,
    ) -> Result<Receipt, ChainError> {
        let (number, timestamp) = self.next_block();
        // The base fee is 0: a 1559 transaction pays its priority fee, capped by its
        // maximum fee.
        let gas_price = tx
            .gas_priority_fee
            .map_or(tx.gas_price, |p| p.min(tx.gas_price));
        let mut stored = StoredTx {
            block: number,
            ty: tx.tx_type,
            from: tx.caller,
            to: tx.kind.to().copied(),
            nonce: tx.nonce,
            value: tx.value,
            input: tx.data.clone(),
            gas_limit: tx.gas_limit,
            gas_used: 0,
            gas_price,
            success: false,
            contract: None,
            first_log: self.logs.len(),
            log_count: 0,
            raw,
        };
        let result = with_evm(self, number, timestamp, |evm| evm.transact_commit(tx))
            .map_err(|e| ChainError::Invalid(e.to_string()))?;
        let gas_used = result.tx_gas_used();
        let (success, logs, contract, revert) = match result {
            ExecutionResult::Success { logs, output, .. } => {
                let contract = match output {
                    Output::Create(_, address) => address,
                    Output::Call(_) => None,
                };
                (true, logs, contract, Bytes::new())
            }
            ExecutionResult::Revert { output, .. } => (false, Vec::new(), None, output),
            ExecutionResult::Halt { reason, .. } => (
                false,
                Vec::new(),
                None,
                Bytes::from(format!("{reason:?}").into_bytes()),
            ),
        };
        for (index, log) in logs.iter().enumerate() {
            self.logs.push(StoredLog {
                block: number,
                tx: hash,
                index: index as u64,
                address: log.address,
                topics: log.topics().to_vec(),
                data: log.data.data.clone(),
            });
        }
        stored.gas_used = gas_used;
        stored.success = success;
        stored.contract = contract;
        stored.log_count = logs.len();
        self.txs.insert(hash, stored);
        self.blocks.push(StoredBlock {
            timestamp,
            tx: Some(hash),
            gas_used,
        });
        self.persist()?;
        Ok(Receipt {
            hash,
            block: number,
            gas_used,
            success,
            logs,
            contract,
            revert,
        })
    }

    /// Mines a block with no transaction, at `timestamp` when given (it must be after
    /// the latest block's). The caller writes the chain.
    fn mine_empty(&mut self, timestamp: Option<u64>) -> Result<(u64, u64), ChainError> {
        let (number, next) = self.next_block();
        let timestamp = match timestamp {
            None => next,
            Some(t) if t > self.timestamp() => t,
            Some(t) => {
                return Err(ChainError::Invalid(format!(
                    "timestamp {t} is not after the latest block's ({})",
                    self.timestamp()
                )))
            }
        };
        self.blocks.push(StoredBlock {
            timestamp,
            tx: None,
            gas_used: 0,
        });
        Ok((number, timestamp))
    }

    fn persist(&mut self) -> Result<(), ChainError> {
        let Some(path) = self.path.as_ref() else {
            return Ok(());
        };
        let err = |message: String| ChainError::State {
            path: path.display().to_string(),
            message,
        };
        let snapshot = SnapshotRef {
            db: &self.db,
            offset: self.offset,
            blocks: &self.blocks,
            logs: &self.logs,
            txs: &self.txs,
        };
        let bytes = postcard::to_allocvec(&snapshot).map_err(|e| err(e.to_string()))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, &bytes).map_err(|e| err(e.to_string()))?;
        std::fs::rename(&tmp, path).map_err(|e| err(e.to_string()))
    }
}

impl L1 for EmbeddedChain {
    fn chain_id(&self) -> u64 {
        EMBEDDED_CHAIN_ID
    }

    async fn send(
        &self,
        from: &PrivateKeySigner,
        to: Option<Address>,
        input: Bytes,
        value: U256,
    ) -> Result<Receipt, ChainError> {
        self.send_sync(from.address(), to, input, value)
    }

    async fn call(&self, to: Address, input: Bytes) -> Result<Bytes, ChainError> {
        self.call_sync(to, input)
    }

    async fn logs(&self, address: Address, from: u64) -> Result<Vec<ChainLog>, ChainError> {
        let inner = self.lock();
        Ok(inner
            .logs
            .iter()
            .filter(|l| l.address == address && l.block >= from)
            .map(|l| ChainLog {
                block: l.block,
                tx: l.tx,
                log: alloy::primitives::Log::new_unchecked(
                    l.address,
                    l.topics.clone(),
                    l.data.clone(),
                ),
            })
            .collect())
    }

    async fn tx_input(&self, hash: B256) -> Result<Bytes, ChainError> {
        self.lock()
            .txs
            .get(&hash)
            .map(|t| t.input.clone())
            .ok_or(ChainError::UnknownTx(hash))
    }

    async fn head(&self) -> Result<(u64, u64), ChainError> {
        let inner = self.lock();
        Ok((inner.number(), inner.timestamp().max(now() + inner.offset)))
    }

    async fn eth_balance(&self, address: Address) -> Result<U256, ChainError> {
        Ok(self.lock().account(address).balance)
    }

    async fn advance_time(&self, seconds: u64) -> Result<(), ChainError> {
        self.advance_time_sync(seconds).map(|_| ())
    }
}

/// A JSON-RPC error object.
struct RpcError {
    code: i64,
    message: String,
    data: Option<Value>,
}

impl RpcError {
    fn new(code: i64, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            data: None,
        }
    }

    fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(-32600, message)
    }

    fn invalid_params(message: impl Into<String>) -> Self {
        Self::new(-32602, message)
    }

    /// What geth and anvil answer for a transaction or call the chain refuses.
    fn server(message: impl Into<String>) -> Self {
        Self::new(-32000, message)
    }

    /// A reverted call, as geth and anvil report it: code 3, the revert data in `data`
    /// (where alloy's `as_revert_data` finds it).
    fn reverted(output: &Bytes) -> Self {
        Self {
            code: 3,
            message: "execution reverted".into(),
            data: Some(Value::String(output.to_string())),
        }
    }
}

impl From<ChainError> for RpcError {
    fn from(e: ChainError) -> Self {
        match e {
            ChainError::Reverted(data) => Self::reverted(&data),
            e => Self::server(e.to_string()),
        }
    }
}

fn respond(id: Value, result: Result<Value, RpcError>) -> Value {
    match result {
        Ok(result) => json!({ "jsonrpc": "2.0", "id": id, "result": result }),
        Err(e) => {
            let mut error = json!({ "code": e.code, "message": e.message });
            if let Some(data) = e.data {
                error["data"] = data;
            }
            json!({ "jsonrpc": "2.0", "id": id, "error": error })
        }
    }
}

fn to_json(value: impl Serialize) -> Result<Value, RpcError> {
    serde_json::to_value(value).map_err(|e| RpcError::new(-32603, e.to_string()))
}

/// A request's positional parameters.
struct Params(Vec<Value>);

impl Params {
    fn opt<T: DeserializeOwned>(&self, i: usize) -> Result<Option<T>, RpcError> {
        match self.0.get(i) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v.clone())
                .map(Some)
                .map_err(|e| RpcError::invalid_params(format!("parameter {i}: {e}"))),
        }
    }

    fn get<T: DeserializeOwned>(&self, i: usize) -> Result<T, RpcError> {
        self.opt(i)?
            .ok_or_else(|| RpcError::invalid_params(format!("missing parameter {i}")))
    }

    /// A quantity given as a hex string ("0x10"), a decimal string or a JSON number.
    fn quantity(&self, i: usize) -> Result<Option<u64>, RpcError> {
        let bad = || RpcError::invalid_params(format!("parameter {i}: not a quantity"));
        match self.0.get(i) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n.as_u64().map(Some).ok_or_else(bad),
            Some(Value::String(s)) => match s.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16).map(Some).map_err(|_| bad()),
                None => s.parse().map(Some).map_err(|_| bad()),
            },
            Some(_) => Err(bad()),
        }
    }
}

impl Inner {
    /// The number a block tag names (the head for latest, pending, safe and finalized:
    /// blocks are final once mined). May be past the head.
    fn number_of(&self, tag: BlockNumberOrTag) -> u64 {
        match tag {
            BlockNumberOrTag::Number(n) => n,
            BlockNumberOrTag::Earliest => 0,
            _ => self.number(),
        }
    }

    fn number_of_hash(&self, hash: B256) -> Option<u64> {
        (0..=self.number())
            .rev()
            .find(|&n| self.block_hash(n) == hash)
    }

    /// Only the latest state is kept: a state read names it or no block at all.
    fn check_state_block(&self, block: Option<BlockId>) -> Result<(), RpcError> {
        let head = self.number();
        let n = match block {
            None => return Ok(()),
            Some(BlockId::Number(tag)) => self.number_of(tag),
            Some(BlockId::Hash(h)) => self
                .number_of_hash(h.block_hash)
                .ok_or_else(|| RpcError::server(format!("unknown block {}", h.block_hash)))?,
        };
        if n == head {
            Ok(())
        } else {
            Err(RpcError::server(format!(
                "the embedded chain keeps only the latest state (block {head}), not block {n}'s"
            )))
        }
    }

    /// A call or estimate's transaction: from the request's sender (the zero address when
    /// none) at its current nonce, gas free.
    fn request_env(&mut self, req: &TransactionRequest, gas: u64) -> Result<TxEnv, RpcError> {
        let from = req.from.unwrap_or_default();
        let nonce = self.account(from).nonce;
        let builder = TxEnv::builder()
            .caller(from)
            .data(req.input.input().cloned().unwrap_or_default())
            .value(req.value.unwrap_or_default())
            .nonce(nonce)
            .chain_id(Some(EMBEDDED_CHAIN_ID))
            .gas_limit(gas)
            .gas_price(0)
            .access_list(req.access_list.clone().unwrap_or_default());
        let builder = match req.to {
            Some(TxKind::Call(to)) => builder.call(to),
            Some(TxKind::Create) | None => builder.create(),
        };
        builder
            .build()
            .map_err(|e| RpcError::invalid_params(format!("{e:?}")))
    }

    fn eth_call(&mut self, req: &TransactionRequest) -> Result<Bytes, RpcError> {
        let gas = req.gas.unwrap_or(BLOCK_GAS_LIMIT).min(BLOCK_GAS_LIMIT);
        let tx = self.request_env(req, gas)?;
        match self.simulate(tx)? {
            ExecutionResult::Success { output, .. } => Ok(output.into_data()),
            ExecutionResult::Revert { output, .. } => Err(RpcError::reverted(&output)),
            ExecutionResult::Halt { reason, .. } => {
                Err(RpcError::server(format!("execution halted: {reason:?}")))
            }
        }
    }

    /// The least gas limit (within 1.5%, as geth) with which the request succeeds: more
    /// than it uses, since refunds come back only at the end and a call forwards at most
    /// 63/64 of what is left.
    fn estimate_gas(&mut self, req: &TransactionRequest) -> Result<u64, RpcError> {
        let cap = req.gas.unwrap_or(BLOCK_GAS_LIMIT).min(BLOCK_GAS_LIMIT);
        let tx = self.request_env(req, cap)?;
        let (used, spent) = match self.simulate(tx)? {
            ExecutionResult::Success { gas, .. } => (gas.tx_gas_used(), gas.total_gas_spent()),
            ExecutionResult::Revert { output, .. } => return Err(RpcError::reverted(&output)),
            ExecutionResult::Halt { reason, .. } => {
                return Err(RpcError::server(format!(
                    "execution halted with {cap} gas: {reason:?}"
                )))
            }
        };
        let succeeds = |inner: &mut Self, gas: u64| -> Result<bool, RpcError> {
            let tx = inner.request_env(req, gas)?;
            // Too little gas to start is a refusal, not an error here.
            Ok(inner.simulate(tx).is_ok_and(|r| r.is_success()))
        };
        let (mut lo, mut hi) = (used.saturating_sub(1), cap);
        // geth's first guess: what it spent before refunds, plus a call stipend, plus 1/63.
        let guess = spent.saturating_add(2_300).saturating_mul(64) / 63;
        if guess < hi {
            if succeeds(self, guess)? {
                hi = guess;
            } else {
                lo = guess;
            }
        }
        while hi - lo > 1 && (hi - lo) * 1000 > hi * 15 {
            let mid = lo + (hi - lo) / 2;
            if succeeds(self, mid)? {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        Ok(hi)
    }

    fn send_raw(&mut self, raw: Bytes) -> Result<B256, RpcError> {
        let envelope = TxEnvelope::decode_2718_exact(&raw)
            .map_err(|e| RpcError::invalid_params(format!("undecodable transaction: {e}")))?;
        let hash = *envelope.tx_hash();
        match envelope.chain_id() {
            Some(EMBEDDED_CHAIN_ID) => {}
            Some(other) => {
                return Err(RpcError::server(format!(
                    "invalid chain id {other}: this chain's is {EMBEDDED_CHAIN_ID}"
                )))
            }
            None => {
                return Err(RpcError::server(
                    "only replay-protected (EIP-155) transactions are accepted",
                ))
            }
        }
        if envelope.is_eip4844() {
            return Err(RpcError::server("blob transactions are not supported"));
        }
        let signature = envelope.signature();
        if signature.normalize_s().is_some() {
            return Err(RpcError::server("invalid signature: high s"));
        }
        let from = signature
            .recover_address_from_prehash(&envelope.signature_hash())
            .map_err(|e| RpcError::server(format!("invalid signature: {e}")))?;
        if self.txs.contains_key(&hash) {
            return Err(RpcError::server("already known"));
        }
        let expected = self.account(from).nonce;
        let nonce = envelope.nonce();
        if nonce != expected {
            let which = if nonce < expected { "low" } else { "high" };
            return Err(RpcError::server(format!(
                "nonce too {which}: next nonce {expected}, tx nonce {nonce}"
            )));
        }
        if envelope.gas_limit() > BLOCK_GAS_LIMIT {
            return Err(RpcError::server(format!(
                "exceeds block gas limit ({} > {BLOCK_GAS_LIMIT})",
                envelope.gas_limit()
            )));
        }
        let tx = TxEnv::builder()
            .tx_type(Some(envelope.ty()))
            .caller(from)
            .gas_limit(envelope.gas_limit())
            .gas_price(envelope.max_fee_per_gas())
            .gas_priority_fee(envelope.max_priority_fee_per_gas())
            .kind(envelope.kind())
            .value(envelope.value())
            .data(envelope.input().clone())
            .nonce(nonce)
            .chain_id(envelope.chain_id())
            .access_list(envelope.access_list().cloned().unwrap_or_default())
            .authorization_list_signed(
                envelope
                    .authorization_list()
                    .map(<[_]>::to_vec)
                    .unwrap_or_default(),
            )
            .build()
            .map_err(|e| RpcError::server(format!("{e:?}")))?;
        // A transaction that reverts is still mined (status 0), as on any node.
        self.execute(tx, hash, Some(raw))?;
        Ok(hash)
    }

    fn rpc_log(&self, log: &StoredLog) -> RpcLog {
        RpcLog {
            inner: alloy::primitives::Log::new_unchecked(
                log.address,
                log.topics.clone(),
                log.data.clone(),
            ),
            block_hash: Some(self.block_hash(log.block)),
            block_number: Some(log.block),
            block_timestamp: self.blocks.get(log.block as usize).map(|b| b.timestamp),
            transaction_hash: Some(log.tx),
            transaction_index: Some(0),
            log_index: Some(log.index),
            removed: false,
        }
    }

    fn tx_logs(&self, tx: &StoredTx) -> &[StoredLog] {
        &self.logs[tx.first_log..tx.first_log + tx.log_count]
    }

    fn bloom(&self, tx: &StoredTx) -> Bloom {
        let logs: Vec<_> = self
            .tx_logs(tx)
            .iter()
            .map(|l| {
                alloy::primitives::Log::new_unchecked(l.address, l.topics.clone(), l.data.clone())
            })
            .collect();
        logs_bloom(&logs)
    }

    fn receipt(&self, hash: B256) -> Option<TransactionReceipt> {
        let tx = self.txs.get(&hash)?;
        let logs = self.tx_logs(tx).iter().map(|l| self.rpc_log(l)).collect();
        let receipt = ReceiptWithBloom {
            receipt: ConsensusReceipt {
                status: Eip658Value::Eip658(tx.success),
                cumulative_gas_used: tx.gas_used,
                logs,
            },
            logs_bloom: self.bloom(tx),
        };
        Some(TransactionReceipt {
            inner: ReceiptEnvelope::from_typed(
                TxType::try_from(tx.ty).unwrap_or(TxType::Legacy),
                receipt,
            ),
            transaction_hash: hash,
            transaction_index: Some(0),
            block_hash: Some(self.block_hash(tx.block)),
            block_number: Some(tx.block),
            gas_used: tx.gas_used,
            effective_gas_price: tx.gas_price,
            blob_gas_used: None,
            blob_gas_price: None,
            from: tx.from,
            to: tx.to,
            contract_address: tx.contract,
        })
    }

    fn transaction(&self, hash: B256) -> Option<RpcTransaction> {
        let tx = self.txs.get(&hash)?;
        let envelope = match &tx.raw {
            Some(raw) => TxEnvelope::decode_2718_exact(raw).ok()?,
            // Sent in process, unsigned: shown as a legacy transaction with an empty
            // signature, under the hash it was given.
            None => TxEnvelope::Legacy(Signed::new_unchecked(
                TxLegacy {
                    chain_id: Some(EMBEDDED_CHAIN_ID),
                    nonce: tx.nonce,
                    gas_price: tx.gas_price,
                    gas_limit: tx.gas_limit,
                    to: tx.to.map_or(TxKind::Create, TxKind::Call),
                    value: tx.value,
                    input: tx.input.clone(),
                },
                Signature::new(U256::ZERO, U256::ZERO, false),
                hash,
            )),
        };
        Some(RpcTransaction {
            inner: Recovered::new_unchecked(envelope, tx.from),
            block_hash: Some(self.block_hash(tx.block)),
            block_number: Some(tx.block),
            transaction_index: Some(0),
            effective_gas_price: Some(tx.gas_price),
            block_timestamp: self.blocks.get(tx.block as usize).map(|b| b.timestamp),
        })
    }

    fn block(&self, n: u64, full: bool) -> Option<Block> {
        let b = self.blocks.get(usize::try_from(n).ok()?)?;
        let tx = b.tx.and_then(|h| self.txs.get(&h));
        let header = ConsensusHeader {
            parent_hash: n.checked_sub(1).map_or(B256::ZERO, |p| self.block_hash(p)),
            ommers_hash: EMPTY_OMMER_ROOT_HASH,
            transactions_root: if tx.is_some() {
                B256::ZERO
            } else {
                EMPTY_ROOT_HASH
            },
            receipts_root: if tx.is_some() {
                B256::ZERO
            } else {
                EMPTY_ROOT_HASH
            },
            logs_bloom: tx.map_or(Bloom::ZERO, |t| self.bloom(t)),
            number: n,
            gas_limit: BLOCK_GAS_LIMIT,
            gas_used: b.gas_used,
            timestamp: b.timestamp,
            base_fee_per_gas: Some(0),
            withdrawals_root: Some(EMPTY_ROOT_HASH),
            blob_gas_used: Some(0),
            excess_blob_gas: Some(0),
            parent_beacon_block_root: Some(B256::ZERO),
            requests_hash: Some(EMPTY_REQUESTS_HASH),
            ..Default::default()
        };
        let transactions = if full {
            BlockTransactions::Full(b.tx.and_then(|h| self.transaction(h)).into_iter().collect())
        } else {
            BlockTransactions::Hashes(b.tx.into_iter().collect())
        };
        Some(Block {
            header: RpcHeader {
                hash: self.block_hash(n),
                inner: header,
                total_difficulty: Some(U256::ZERO),
                size: None,
            },
            uncles: Vec::new(),
            transactions,
            withdrawals: Some(Withdrawals::default()),
        })
    }

    fn get_logs(&self, filter: &Filter) -> Result<Vec<RpcLog>, RpcError> {
        let head = self.number();
        let (from, to) = match filter.block_option {
            FilterBlockOption::AtBlockHash(hash) => {
                let n = self
                    .number_of_hash(hash)
                    .ok_or_else(|| RpcError::server(format!("unknown block {hash}")))?;
                (n, n)
            }
            FilterBlockOption::Range {
                from_block,
                to_block,
            } => (
                self.number_of(from_block.unwrap_or(BlockNumberOrTag::Latest)),
                self.number_of(to_block.unwrap_or(BlockNumberOrTag::Latest))
                    .min(head),
            ),
        };
        Ok(self
            .logs
            .iter()
            .filter(|l| {
                (from..=to).contains(&l.block)
                    && filter.matches_address(l.address)
                    && filter.matches_topics(&l.topics)
            })
            .map(|l| self.rpc_log(l))
            .collect())
    }

    /// Every block's base fee is 0 and so is every reward: alloy's estimator then offers
    /// its minimum priority fee, 1 wei.
    fn fee_history(&self, count: u64, newest: BlockNumberOrTag, percentiles: &[f64]) -> FeeHistory {
        let newest = self.number_of(newest).min(self.number());
        let count = count.min(1024).min(newest + 1);
        if count == 0 {
            return FeeHistory::default();
        }
        let oldest = newest + 1 - count;
        let blocks = count as usize;
        FeeHistory {
            base_fee_per_gas: vec![0; blocks + 1],
            gas_used_ratio: (oldest..=newest)
                .map(|n| self.blocks[n as usize].gas_used as f64 / BLOCK_GAS_LIMIT as f64)
                .collect(),
            base_fee_per_blob_gas: vec![0; blocks + 1],
            blob_gas_used_ratio: vec![0.0; blocks],
            oldest_block: oldest,
            reward: (!percentiles.is_empty()).then(|| vec![vec![0; percentiles.len()]; blocks]),
        }
    }
}

impl EmbeddedChain {
    /// Answers one Ethereum JSON-RPC 2.0 request object — or a batch, an array of them,
    /// with an array of responses — over this chain: what alloy's provider and its
    /// default fillers call (so [`crate::RpcChain`] works against it as against anvil),
    /// the dev methods `evm_increaseTime` and `evm_mine`, and a few cheap others. A
    /// request without an id is answered too (with id null). A call or gas estimate that
    /// reverts answers error code 3 with the revert data in `data`, as geth and anvil do.
    pub fn rpc(&self, request: Value) -> Value {
        match request {
            Value::Array(batch) if batch.is_empty() => {
                respond(Value::Null, Err(RpcError::invalid_request("empty batch")))
            }
            Value::Array(batch) => {
                Value::Array(batch.into_iter().map(|r| self.rpc_one(r)).collect())
            }
            request => self.rpc_one(request),
        }
    }

    fn rpc_one(&self, request: Value) -> Value {
        let Value::Object(mut request) = request else {
            return respond(
                Value::Null,
                Err(RpcError::invalid_request("a request is a JSON object")),
            );
        };
        let id = request.remove("id").unwrap_or(Value::Null);
        let Some(Value::String(method)) = request.remove("method") else {
            return respond(id, Err(RpcError::invalid_request("no method")));
        };
        let params = match request.remove("params") {
            None | Some(Value::Null) => Params(Vec::new()),
            Some(Value::Array(params)) => Params(params),
            Some(_) => {
                return respond(id, Err(RpcError::invalid_params("params must be an array")))
            }
        };
        respond(id, self.dispatch(&method, &params))
    }

    fn dispatch(&self, method: &str, p: &Params) -> Result<Value, RpcError> {
        match method {
            "eth_chainId" => to_json(U64::from(EMBEDDED_CHAIN_ID)),
            "net_version" => Ok(json!(EMBEDDED_CHAIN_ID.to_string())),
            "web3_clientVersion" => Ok(json!(concat!(
                "tessera-embedded/",
                env!("CARGO_PKG_VERSION")
            ))),
            "net_listening" => Ok(json!(true)),
            "eth_syncing" => Ok(json!(false)),
            "eth_accounts" => Ok(json!([])),
            "eth_blockNumber" => to_json(U64::from(self.lock().number())),
            // Gas is free: base fee 0, and no tip is needed.
            "eth_gasPrice" | "eth_maxPriorityFeePerGas" | "eth_blobBaseFee" => to_json(U64::ZERO),
            "eth_feeHistory" => {
                let count = p
                    .quantity(0)?
                    .ok_or_else(|| RpcError::invalid_params("missing parameter 0"))?;
                let newest: BlockNumberOrTag = p.get(1)?;
                let percentiles: Vec<f64> = p.opt(2)?.unwrap_or_default();
                to_json(self.lock().fee_history(count, newest, &percentiles))
            }
            "eth_getBalance" | "eth_getTransactionCount" | "eth_getCode" => {
                let address: Address = p.get(0)?;
                let mut inner = self.lock();
                inner.check_state_block(p.opt(1)?)?;
                let account = inner.account(address);
                match method {
                    "eth_getBalance" => to_json(account.balance),
                    "eth_getTransactionCount" => to_json(U64::from(account.nonce)),
                    _ => {
                        let code = match account.code {
                            Some(code) => code.original_bytes(),
                            None => inner
                                .db
                                .code_by_hash(account.code_hash)
                                .map(|c| c.original_bytes())
                                .unwrap_or_default(),
                        };
                        to_json(code)
                    }
                }
            }
            "eth_getStorageAt" => {
                let address: Address = p.get(0)?;
                let slot: U256 = p.get(1)?;
                let mut inner = self.lock();
                inner.check_state_block(p.opt(2)?)?;
                let value = inner.db.storage(address, slot).unwrap_or_default();
                to_json(B256::from(value))
            }
            "eth_call" => {
                let req: TransactionRequest = p.get(0)?;
                let mut inner = self.lock();
                inner.check_state_block(p.opt(1)?)?;
                to_json(inner.eth_call(&req)?)
            }
            "eth_estimateGas" => {
                let req: TransactionRequest = p.get(0)?;
                let mut inner = self.lock();
                inner.check_state_block(p.opt(1)?)?;
                to_json(U64::from(inner.estimate_gas(&req)?))
            }
            "eth_sendRawTransaction" => {
                let raw: Bytes = p.get(0)?;
                to_json(self.lock().send_raw(raw)?)
            }
            "eth_getTransactionReceipt" => to_json(self.lock().receipt(p.get(0)?)),
            "eth_getTransactionByHash" => to_json(self.lock().transaction(p.get(0)?)),
            "eth_getBlockByNumber" | "eth_getBlockByHash" => {
                let full: bool = p.opt(1)?.unwrap_or(false);
                let inner = self.lock();
                let n = if method == "eth_getBlockByHash" {
                    inner.number_of_hash(p.get(0)?)
                } else {
                    Some(inner.number_of(p.get(0)?))
                };
                to_json(n.and_then(|n| inner.block(n, full)))
            }
            "eth_getLogs" => {
                let filter: Filter = p.get(0)?;
                to_json(self.lock().get_logs(&filter)?)
            }
            "evm_increaseTime" => {
                let seconds = p
                    .quantity(0)?
                    .ok_or_else(|| RpcError::invalid_params("missing parameter 0"))?;
                // anvil answers the total adjustment, in seconds.
                Ok(json!(self.advance_time_sync(seconds)?))
            }
            "evm_mine" => {
                // Optional: the block's timestamp, or (anvil) {timestamp, blocks}.
                let (timestamp, blocks) = match p.0.first() {
                    Some(Value::Object(o)) => {
                        let opts = Params(vec![
                            o.get("timestamp").cloned().unwrap_or(Value::Null),
                            o.get("blocks").cloned().unwrap_or(Value::Null),
                        ]);
                        (opts.quantity(0)?, opts.quantity(1)?.unwrap_or(1))
                    }
                    _ => (p.quantity(0)?, 1),
                };
                if blocks > 10_000 {
                    return Err(RpcError::invalid_params("at most 10000 blocks at a time"));
                }
                let mut inner = self.lock();
                for i in 0..blocks {
                    inner.mine_empty(if i == 0 { timestamp } else { None })?;
                }
                inner.persist()?;
                Ok(json!("0x0"))
            }
            _ => Err(RpcError::new(
                -32601,
                format!("the method {method} does not exist/is not available"),
            )),
        }
    }
}
