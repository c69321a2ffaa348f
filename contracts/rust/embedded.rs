//! The embedded L1: revm in-process, running the real compiled bytecode. Each
//! transaction is mined in a block of its own, stamped with the wall clock (plus any
//! offset a test adds), and the whole chain — accounts, storage, code, logs, inputs —
//! is written to one file after each block, so a restarted devnet keeps its balances.
//! Gas is free (base fee 0): this chain is for development, not for measuring fees in
//! ether (gas *amounts* are exact and are what docs/settlement.md reports).

use crate::chain::{ChainError, ChainLog, Receipt, L1};
use alloy::primitives::{keccak256, Address, Bytes, B256, U256};
use alloy::signers::local::PrivateKeySigner;
use revm::context::{BlockEnv, Context, TxEnv};
use revm::context_interface::result::{ExecutionResult, Output};
use revm::context_interface::ContextTr;
use revm::database::{CacheDB, EmptyDB};
use revm::handler::{MainnetContext, MainnetEvm};
use revm::primitives::hardfork::SpecId;
use revm::state::AccountInfo;
use revm::{Database, ExecuteCommitEvm, ExecuteEvm, MainBuilder, MainContext};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

type Db = CacheDB<EmptyDB>;
type Evm = MainnetEvm<MainnetContext<Db>>;

/// The embedded chain's id (anvil's default, so wallets and tools recognise a dev chain).
pub const EMBEDDED_CHAIN_ID: u64 = 31337;
const BLOCK_GAS_LIMIT: u64 = 30_000_000;

#[derive(Serialize, Deserialize)]
struct Snapshot {
    db: Db,
    number: u64,
    timestamp: u64,
    offset: u64,
    logs: Vec<StoredLog>,
    inputs: HashMap<B256, Bytes>,
}

#[derive(Clone, Serialize, Deserialize)]
struct StoredLog {
    block: u64,
    tx: B256,
    address: Address,
    topics: Vec<B256>,
    data: Bytes,
}

/// The chain's state. revm's EVM is not `Send`, so one is built around the database
/// for each transaction and taken apart again after it.
struct Inner {
    db: Db,
    number: u64,
    timestamp: u64,
    offset: u64,
    logs: Vec<StoredLog>,
    inputs: HashMap<B256, Bytes>,
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
        Self::from_parts(
            CacheDB::new(EmptyDB::default()),
            0,
            0,
            0,
            Vec::new(),
            HashMap::new(),
            None,
        )
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
                let s: Snapshot = postcard::from_bytes(&bytes).map_err(|e| {
                    err(format!(
                        "unreadable ({e}); move it away to start a new chain"
                    ))
                })?;
                Ok(Self::from_parts(
                    s.db,
                    s.number,
                    s.timestamp,
                    s.offset,
                    s.logs,
                    s.inputs,
                    Some(path.to_path_buf()),
                ))
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

    fn from_parts(
        db: Db,
        number: u64,
        timestamp: u64,
        offset: u64,
        logs: Vec<StoredLog>,
        inputs: HashMap<B256, Bytes>,
        path: Option<PathBuf>,
    ) -> Self {
        Self {
            inner: Mutex::new(Inner {
                db,
                number,
                timestamp,
                offset,
                logs,
                inputs,
                path,
            }),
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
        let db = &mut inner.db;
        let mut info = db.basic(address).ok().flatten().unwrap_or_default();
        info.balance = info.balance.saturating_add(wei);
        db.insert_account_info(address, AccountInfo { ..info });
        inner.persist()
    }

    fn send_sync(
        &self,
        from: Address,
        to: Option<Address>,
        input: Bytes,
        value: U256,
    ) -> Result<Receipt, ChainError> {
        let mut inner = self.lock();
        let number = inner.number + 1;
        let timestamp = (now() + inner.offset).max(inner.timestamp + 1);
        let nonce = inner.db.basic(from).ok().flatten().map_or(0, |i| i.nonce);
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
        let result = with_evm(&mut inner, number, timestamp, |evm| evm.transact_commit(tx))
            .map_err(|e| ChainError::Invalid(e.to_string()))?;
        let mut preimage = Vec::with_capacity(64 + input.len());
        preimage.extend_from_slice(&number.to_be_bytes());
        preimage.extend_from_slice(from.as_slice());
        preimage.extend_from_slice(&nonce.to_be_bytes());
        preimage.extend_from_slice(&input);
        let hash = keccak256(&preimage);
        inner.number = number;
        inner.timestamp = timestamp;
        inner.inputs.insert(hash, input);
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
        for log in &logs {
            inner.logs.push(StoredLog {
                block: number,
                tx: hash,
                address: log.address,
                topics: log.topics().to_vec(),
                data: log.data.data.clone(),
            });
        }
        inner.persist()?;
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

    fn call_sync(&self, to: Address, input: Bytes) -> Result<Bytes, ChainError> {
        let mut inner = self.lock();
        let nonce = inner
            .db
            .basic(Address::ZERO)
            .ok()
            .flatten()
            .map_or(0, |i| i.nonce);
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
        // A view runs in the next block, as eth_call does on a node.
        let (number, timestamp) = (
            inner.number + 1,
            (now() + inner.offset).max(inner.timestamp + 1),
        );
        let out = with_evm(&mut inner, number, timestamp, |evm| evm.transact(tx))
            .map_err(|e| ChainError::Invalid(e.to_string()))?;
        match out.result {
            ExecutionResult::Success { output, .. } => Ok(output.into_data()),
            ExecutionResult::Revert { output, .. } => Err(ChainError::Reverted(output)),
            ExecutionResult::Halt { reason, .. } => Err(ChainError::Invalid(format!("{reason:?}"))),
        }
    }
}

impl Inner {
    fn persist(&mut self) -> Result<(), ChainError> {
        let Some(path) = self.path.clone() else {
            return Ok(());
        };
        let err = |message: String| ChainError::State {
            path: path.display().to_string(),
            message,
        };
        let snapshot = Snapshot {
            db: self.db.clone(),
            number: self.number,
            timestamp: self.timestamp,
            offset: self.offset,
            logs: std::mem::take(&mut self.logs),
            inputs: std::mem::take(&mut self.inputs),
        };
        let bytes = postcard::to_allocvec(&snapshot);
        self.logs = snapshot.logs;
        self.inputs = snapshot.inputs;
        let bytes = bytes.map_err(|e| err(e.to_string()))?;
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, &bytes).map_err(|e| err(e.to_string()))?;
        std::fs::rename(&tmp, &path).map_err(|e| err(e.to_string()))
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
            .inputs
            .get(&hash)
            .cloned()
            .ok_or(ChainError::UnknownTx(hash))
    }

    async fn head(&self) -> Result<(u64, u64), ChainError> {
        let inner = self.lock();
        Ok((inner.number, inner.timestamp.max(now() + inner.offset)))
    }

    async fn eth_balance(&self, address: Address) -> Result<U256, ChainError> {
        let mut inner = self.lock();
        Ok(inner
            .db
            .basic(address)
            .ok()
            .flatten()
            .map_or(U256::ZERO, |i| i.balance))
    }

    async fn advance_time(&self, seconds: u64) -> Result<(), ChainError> {
        {
            let mut inner = self.lock();
            // Blocks mined faster than one a second run ahead of the wall clock; the
            // next block is at least `seconds` after the latest one.
            let target = inner.timestamp.saturating_add(seconds);
            inner.offset = (inner.offset + seconds).max(target.saturating_sub(now()));
            inner.persist()?;
        }
        Ok(())
    }
}
