//! Any EVM chain over JSON-RPC, through alloy's provider: transactions are signed here
//! with the sender's local key and sent raw, so the node needs no unlocked accounts.

use crate::chain::{ChainError, ChainLog, Receipt, L1};
use alloy::consensus::Transaction as _;
use alloy::network::{EthereumWallet, TransactionBuilder};
use alloy::primitives::{Address, Bytes, B256, U256};
use alloy::providers::{Provider, ProviderBuilder, RootProvider};
use alloy::rpc::types::{BlockNumberOrTag, Filter, TransactionRequest};
use alloy::signers::local::PrivateKeySigner;

/// An EVM node reached over HTTP JSON-RPC.
pub struct RpcChain {
    url: alloy::transports::http::reqwest::Url,
    reader: RootProvider,
    chain_id: u64,
    dev: bool,
}

fn rpc(e: impl std::fmt::Display) -> ChainError {
    ChainError::Rpc(e.to_string())
}

impl RpcChain {
    /// Connects to `url` (e.g. `http://127.0.0.1:8545`) and reads its chain id. `dev`
    /// allows [`L1::advance_time`] through `evm_increaseTime` (anvil, hardhat).
    pub async fn connect(url: &str, dev: bool) -> Result<Self, ChainError> {
        let url: alloy::transports::http::reqwest::Url = url
            .parse()
            .map_err(|e| ChainError::Rpc(format!("bad RPC URL {url:?}: {e}")))?;
        let reader = RootProvider::new_http(url.clone());
        let chain_id = reader
            .get_chain_id()
            .await
            .map_err(|e| ChainError::Rpc(format!("{url}: {e}")))?;
        Ok(Self {
            url,
            reader,
            chain_id,
            dev,
        })
    }
}

impl L1 for RpcChain {
    fn chain_id(&self) -> u64 {
        self.chain_id
    }

    async fn send(
        &self,
        from: &PrivateKeySigner,
        to: Option<Address>,
        input: Bytes,
        value: U256,
    ) -> Result<Receipt, ChainError> {
        let provider = ProviderBuilder::new()
            .wallet(EthereumWallet::from(from.clone()))
            .connect_http(self.url.clone());
        let request = TransactionRequest::default()
            .with_from(from.address())
            .with_value(value);
        let request = match to {
            Some(to) => request.with_to(to).with_input(input),
            None => request.with_deploy_code(input),
        };
        // Estimating gas runs the call first: a revert surfaces here with its data, and
        // costs nothing on chain. Send with a fixed limit instead when the caller wants
        // the revert mined (none do today).
        let pending = match provider.send_transaction(request).await {
            Ok(p) => p,
            Err(e) => {
                if let Some(data) = e.as_error_resp().and_then(|r| r.as_revert_data()) {
                    return Err(ChainError::Reverted(data));
                }
                return Err(rpc(e));
            }
        };
        let r = pending.get_receipt().await.map_err(rpc)?;
        Ok(Receipt {
            hash: r.transaction_hash,
            block: r.block_number.unwrap_or_default(),
            gas_used: r.gas_used,
            success: r.status(),
            logs: r.logs().iter().map(|l| l.inner.clone()).collect(),
            contract: r.contract_address,
            revert: Bytes::new(),
        })
    }

    async fn call(&self, to: Address, input: Bytes) -> Result<Bytes, ChainError> {
        let request = TransactionRequest::default().with_to(to).with_input(input);
        match self.reader.call(request).await {
            Ok(out) => Ok(out),
            Err(e) => match e.as_error_resp().and_then(|r| r.as_revert_data()) {
                Some(data) => Err(ChainError::Reverted(data)),
                None => Err(rpc(e)),
            },
        }
    }

    async fn logs(&self, address: Address, from: u64) -> Result<Vec<ChainLog>, ChainError> {
        let filter = Filter::new().address(address).from_block(from);
        let logs = self.reader.get_logs(&filter).await.map_err(rpc)?;
        Ok(logs
            .into_iter()
            .map(|l| ChainLog {
                block: l.block_number.unwrap_or_default(),
                tx: l.transaction_hash.unwrap_or_default(),
                log: l.inner,
            })
            .collect())
    }

    async fn tx_input(&self, hash: B256) -> Result<Bytes, ChainError> {
        let tx = self
            .reader
            .get_transaction_by_hash(hash)
            .await
            .map_err(rpc)?
            .ok_or(ChainError::UnknownTx(hash))?;
        Ok(tx.input().clone())
    }

    async fn head(&self) -> Result<(u64, u64), ChainError> {
        let block = self
            .reader
            .get_block_by_number(BlockNumberOrTag::Latest)
            .await
            .map_err(rpc)?
            .ok_or_else(|| ChainError::Rpc("no latest block".into()))?;
        Ok((block.header.number, block.header.timestamp))
    }

    async fn eth_balance(&self, address: Address) -> Result<U256, ChainError> {
        self.reader.get_balance(address).await.map_err(rpc)
    }

    async fn advance_time(&self, seconds: u64) -> Result<(), ChainError> {
        if !self.dev {
            return Err(ChainError::NoTimeTravel);
        }
        let _: serde_json::Value = self
            .reader
            .raw_request("evm_increaseTime".into(), (seconds,))
            .await
            .map_err(rpc)?;
        let _: serde_json::Value = self
            .reader
            .raw_request("evm_mine".into(), ())
            .await
            .map_err(rpc)?;
        Ok(())
    }
}
