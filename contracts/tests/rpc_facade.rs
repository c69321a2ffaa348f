//! The embedded chain over Ethereum JSON-RPC: [`EmbeddedChain::rpc`] served on a loopback
//! port by a minimal axum server, and spoken to through [`RpcChain`] — alloy's provider
//! with its default fillers, unchanged — running the same flow as against anvil.

mod common;

use alloy::network::{EthereumWallet, TransactionBuilder};
use alloy::primitives::{Address, Bytes, U256};
use alloy::providers::{Provider, ProviderBuilder, RootProvider};
use alloy::rpc::types::{Block, BlockNumberOrTag, TransactionRequest};
use alloy::signers::local::PrivateKeySigner;
use axum::extract::State;
use axum::Json;
use common::ANVIL_KEYS;
use serde_json::{json, Value};
use std::sync::Arc;
use tessera_contracts::{deploy, Contracts, EmbeddedChain, Params, RpcChain, L1};

const ETHER: u128 = 1_000_000_000_000_000_000;
const BLOCK_GAS: u64 = 30_000_000;

async fn handle(
    State(chain): State<Arc<EmbeddedChain>>,
    Json(request): Json<Value>,
) -> Json<Value> {
    Json(chain.rpc(request))
}

/// Serves `chain` at `POST /l1` on a free loopback port; its URL.
async fn serve(chain: Arc<EmbeddedChain>) -> String {
    let app = axum::Router::new()
        .route("/l1", axum::routing::post(handle))
        .with_state(chain);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
    format!("http://{addr}/l1")
}

fn funded(keys: &[&str]) -> (Arc<EmbeddedChain>, Vec<PrivateKeySigner>) {
    let chain = Arc::new(EmbeddedChain::in_memory());
    let wallets: Vec<PrivateKeySigner> = keys.iter().map(|k| k.parse().expect("key")).collect();
    for w in &wallets {
        chain
            .fund(w.address(), U256::from(1_000 * ETHER))
            .expect("fund");
    }
    (chain, wallets)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deposit_batch_and_withdraw_on_the_embedded_chain_over_json_rpc() {
    let (embedded, wallets) = funded(&ANVIL_KEYS);
    let url = serve(embedded.clone()).await;
    let chain = RpcChain::connect(&url, true).await.expect("connect");
    assert_eq!(chain.chain_id(), 31337);
    let (operator, dev) = (&wallets[0], &wallets[1]);
    common::deposit_batch_and_withdraw(&chain, operator, dev).await;

    // Both views agree on the head; the operator paid its bond and some gas (alloy's
    // estimator offers its minimum tip, 1 wei a gas, on a chain whose base fee is 0).
    let (number, _) = chain.head().await.expect("head");
    assert_eq!(number, embedded.head().await.expect("head").0);
    assert!(number >= 10, "{number}");
    let spent = U256::from(1_000 * ETHER)
        - chain
            .eth_balance(operator.address())
            .await
            .expect("balance")
        - Params::default().min_bond;
    assert!(
        spent > U256::ZERO && spent < U256::from(BLOCK_GAS * 20),
        "{spent}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_sent_in_process_are_read_over_json_rpc() {
    let (embedded, wallets) = funded(&ANVIL_KEYS[..1]);
    let operator = &wallets[0];
    let params = Params::default();
    // Deployed and minted in process (L1::send: unsigned, no gas price)...
    let d = deploy(
        &*embedded,
        operator,
        operator.address(),
        Address::ZERO,
        &params,
    )
    .await
    .expect("deploy");
    let receipt = Contracts::new(&*embedded, &d)
        .mint(operator, operator.address(), U256::from(5u64))
        .await
        .expect("mint");
    let url = serve(embedded.clone()).await;
    let chain = RpcChain::connect(&url, true).await.expect("connect");
    // ...read over JSON-RPC: logs, calldata, receipts, blocks.
    let over_rpc = chain.logs(d.token, 0).await.expect("logs");
    let in_process = embedded.logs(d.token, 0).await.expect("logs");
    assert!(!over_rpc.is_empty());
    assert_eq!(over_rpc.len(), in_process.len());
    for (a, b) in over_rpc.iter().zip(&in_process) {
        assert_eq!((a.block, a.tx, &a.log), (b.block, b.tx, &b.log));
    }
    assert_eq!(
        chain.tx_input(receipt.hash).await.expect("input"),
        embedded.tx_input(receipt.hash).await.expect("input")
    );
    let reader: RootProvider = RootProvider::new_http(url.parse().expect("url"));
    let r = reader
        .get_transaction_receipt(receipt.hash)
        .await
        .expect("receipt")
        .expect("known");
    assert!(r.status());
    assert_eq!(r.block_number, Some(receipt.block));
    assert_eq!(r.gas_used, receipt.gas_used);
    assert_eq!(r.from, operator.address());
    assert_eq!(r.logs().len(), receipt.logs.len());
    let block = reader
        .get_block_by_number(BlockNumberOrTag::Number(receipt.block))
        .full()
        .await
        .expect("block")
        .expect("known");
    assert_eq!(block.header.number, receipt.block);
    assert_eq!(block.transactions.len(), 1);
    assert_eq!(r.block_hash, Some(block.header.hash));
    let parent = reader
        .get_block_by_hash(block.header.parent_hash)
        .await
        .expect("parent")
        .expect("known");
    assert_eq!(parent.header.number, receipt.block - 1);
    assert!(reader
        .get_transaction_receipt(Default::default())
        .await
        .expect("receipt")
        .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_transactions_are_checked_and_mined() {
    let (embedded, wallets) = funded(&ANVIL_KEYS[..1]);
    let url = serve(embedded.clone()).await;
    let sender = &wallets[0];
    let to = Address::repeat_byte(0x42);
    let provider = ProviderBuilder::new()
        .wallet(EthereumWallet::from(sender.clone()))
        .connect_http(url.parse().expect("url"));
    let tx = TransactionRequest::default()
        .with_to(to)
        .with_value(U256::from(1_000u64));
    let receipt = provider
        .send_transaction(tx.clone())
        .await
        .expect("send")
        .get_receipt()
        .await
        .expect("receipt");
    assert!(receipt.status());
    assert_eq!(receipt.gas_used, 21_000);
    assert_eq!(receipt.effective_gas_price, 1);
    assert_eq!(
        provider.get_balance(to).await.expect("balance"),
        U256::from(1_000u64)
    );
    assert_eq!(
        provider
            .get_transaction_count(sender.address())
            .await
            .expect("nonce"),
        1
    );
    let sent = provider
        .get_transaction_by_hash(receipt.transaction_hash)
        .await
        .expect("tx")
        .expect("known");
    assert_eq!(sent.inner.signer(), sender.address());

    // The same nonce again is refused, and nothing is mined.
    let head = provider.get_block_number().await.expect("head");
    let stale = provider
        .send_transaction(tx.clone().with_nonce(0).with_gas_limit(21_000))
        .await
        .expect_err("nonce too low");
    assert!(stale.to_string().contains("nonce too low"), "{stale}");
    assert_eq!(provider.get_block_number().await.expect("head"), head);

    // Another chain's transaction is refused.
    let foreign = provider
        .send_transaction(tx.with_chain_id(1).with_gas_limit(21_000))
        .await
        .expect_err("wrong chain");
    assert!(foreign.to_string().contains("chain id"), "{foreign}");

    // evm_mine mines an empty block, later than the last.
    let before: Block = provider
        .get_block_by_number(BlockNumberOrTag::Latest)
        .await
        .expect("block")
        .expect("latest");
    let _: Value = provider
        .raw_request("evm_mine".into(), ())
        .await
        .expect("evm_mine");
    let after = provider
        .get_block_by_number(BlockNumberOrTag::Latest)
        .await
        .expect("block")
        .expect("latest");
    assert_eq!(after.header.number, before.header.number + 1);
    assert!(after.header.timestamp > before.header.timestamp);
    assert!(after.transactions.is_empty());
}

#[test]
fn json_rpc_envelopes_errors_and_batches() {
    let chain = EmbeddedChain::in_memory();
    let r = chain.rpc(json!({"jsonrpc": "2.0", "id": 7, "method": "eth_chainId"}));
    assert_eq!(r, json!({"jsonrpc": "2.0", "id": 7, "result": "0x7a69"}));

    let r =
        chain.rpc(json!({"jsonrpc": "2.0", "id": "a", "method": "eth_frobnicate", "params": []}));
    assert_eq!(r["id"], "a");
    assert_eq!(r["error"]["code"], -32601);
    assert!(r["error"]["message"]
        .as_str()
        .unwrap()
        .contains("eth_frobnicate"));

    let r = chain.rpc(json!([
        {"jsonrpc": "2.0", "id": 1, "method": "eth_blockNumber"},
        {"jsonrpc": "2.0", "id": 2, "method": "net_version"},
        {"jsonrpc": "2.0", "id": 3, "method": "eth_getBalance", "params": ["nonsense"]},
    ]));
    assert_eq!(r[0]["result"], "0x0");
    assert_eq!(r[1]["result"], "31337");
    assert_eq!(r[2]["error"]["code"], -32602);
    assert_eq!(r[2]["id"], 3);

    assert_eq!(chain.rpc(json!([]))["error"]["code"], -32600);
    assert_eq!(chain.rpc(json!(5))["error"]["code"], -32600);

    // A call that reverts: code 3 with the revert data, as geth and anvil answer.
    // (Init code that reverts with 4 bytes: PUSH4 0xdeadbeef PUSH1 0 MSTORE PUSH1 4
    // PUSH1 28 REVERT.)
    let reverting = Bytes::from(hex_literal("63deadbeef6000526004601cfd"));
    let r = chain.rpc(json!({"jsonrpc": "2.0", "id": 1, "method": "eth_call",
        "params": [{"input": reverting}, "latest"]}));
    assert_eq!(r["error"]["code"], 3, "{r}");
    assert_eq!(r["error"]["data"], "0xdeadbeef");

    // Only the latest state is kept.
    chain.mine().expect("mine");
    let r = chain.rpc(
        json!({"jsonrpc": "2.0", "id": 1, "method": "eth_getBalance",
        "params": [Address::ZERO, "0x0"]}),
    );
    assert_eq!(r["error"]["code"], -32000, "{r}");
}

#[tokio::test]
async fn receipts_and_blocks_survive_a_restart() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("chain.bin");
    let sender: PrivateKeySigner = ANVIL_KEYS[0].parse().expect("key");
    let ask = |chain: &EmbeddedChain, method: &str, params: Value| {
        chain.rpc(json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params}))
    };
    let (hash, before) = {
        let chain = EmbeddedChain::open(&path).expect("open");
        chain
            .fund(sender.address(), U256::from(ETHER))
            .expect("fund");
        let receipt = chain
            .send(
                &sender,
                Some(Address::repeat_byte(1)),
                Bytes::new(),
                U256::from(5u64),
            )
            .await
            .expect("send");
        let mined = ask(&chain, "evm_mine", json!([]));
        assert_eq!(mined["result"], "0x0", "{mined}");
        let seen = [
            ask(&chain, "eth_getTransactionReceipt", json!([receipt.hash])),
            ask(&chain, "eth_getTransactionByHash", json!([receipt.hash])),
            ask(&chain, "eth_getBlockByNumber", json!(["0x1", true])),
            ask(&chain, "eth_getBlockByNumber", json!(["latest", false])),
        ];
        (receipt.hash, seen)
    };
    let chain = EmbeddedChain::open(&path).expect("reopen");
    let after = [
        ask(&chain, "eth_getTransactionReceipt", json!([hash])),
        ask(&chain, "eth_getTransactionByHash", json!([hash])),
        ask(&chain, "eth_getBlockByNumber", json!(["0x1", true])),
        ask(&chain, "eth_getBlockByNumber", json!(["latest", false])),
    ];
    assert_eq!(before, after);
    assert_eq!(after[0]["result"]["status"], "0x1");
    assert_eq!(after[3]["result"]["number"], "0x2");
}

fn hex_literal(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}
