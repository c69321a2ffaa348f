//! Opening the L1 a coordinator settles on: the embedded chain in its data directory (the
//! default) or an EVM node over JSON-RPC; the operator key (the contract's sequencer);
//! and the deployment, made on first start and kept in `deployment.json`.

use crate::sequencer::{ensure_bond, L1Setup};
use alloy::primitives::U256;
use std::path::Path;
use std::sync::Arc;
use tessera_contracts::wallet;
use tessera_contracts::{deploy, AnyChain, Deployment, EmbeddedChain, Params, RpcChain, L1};

/// Why the L1 could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum L1Error {
    /// The chain.
    #[error(transparent)]
    Chain(#[from] tessera_contracts::ChainError),
    /// A contract call.
    #[error(transparent)]
    Contract(#[from] tessera_contracts::ContractError),
    /// The operator key.
    #[error(transparent)]
    Wallet(#[from] wallet::WalletError),
    /// The deployment file.
    #[error("deployment file {path}: {message}")]
    Deployment {
        /// The file.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// Ether the embedded chain's faucet keeps on the operator (bonds and gas-free txs).
const OPERATOR_ETH: u128 = 1_000 * 10u128.pow(18);

/// Opens the L1 kept in `dir`: the embedded chain (`rpc` None) or the node at `rpc`.
/// Deploys the contracts with `params` on first start (the operator is the sequencer and
/// owns the protocol fee account) and keeps the sequencer's bond at the minimum.
pub async fn open_l1(dir: &Path, rpc: Option<&str>, params: &Params) -> Result<L1Setup, L1Error> {
    std::fs::create_dir_all(dir).map_err(|e| L1Error::Deployment {
        path: dir.display().to_string(),
        message: e.to_string(),
    })?;
    let (operator, _) = wallet::load_or_create(&dir.join("operator.key"))?;
    let chain = match rpc {
        None => {
            let c = Arc::new(EmbeddedChain::open(&dir.join("chain.bin"))?);
            if c.eth_balance(operator.address()).await? < U256::from(OPERATOR_ETH / 10) {
                c.fund(operator.address(), U256::from(OPERATOR_ETH))?;
            }
            AnyChain::Embedded(c)
        }
        Some(url) => AnyChain::Rpc(Arc::new(RpcChain::connect(url, false).await?)),
    };
    let file = dir.join(format!("deployment-{}.json", chain.chain_id()));
    let bad = |message: String| L1Error::Deployment {
        path: file.display().to_string(),
        message,
    };
    let deployment: Deployment = match std::fs::read(&file) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let d = deploy(
                &chain,
                &operator,
                operator.address(),
                operator.address(),
                params,
            )
            .await?;
            let json = serde_json::to_vec_pretty(&d).map_err(|e| bad(e.to_string()))?;
            std::fs::write(&file, json).map_err(|e| bad(e.to_string()))?;
            tracing::info!(settlement = %d.settlement, token = %d.token, "settlement contracts deployed");
            d
        }
        Err(e) => return Err(bad(e.to_string())),
    };
    if deployment.chain_id != chain.chain_id() {
        return Err(bad(format!(
            "made for chain {}, but the L1 is chain {}",
            deployment.chain_id,
            chain.chain_id()
        )));
    }
    let setup = L1Setup {
        chain,
        deployment,
        operator,
    };
    ensure_bond(&setup, setup.deployment.params.min_bond).await?;
    Ok(setup)
}
