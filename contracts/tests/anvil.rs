//! The deposit → batch → withdraw flow against a real external EVM node: anvil from the
//! npm package `@foundry-rs/anvil` (installed by scripts/contracts.sh), started by the
//! test on a free loopback port and spoken to over JSON-RPC through alloy.

use alloy::primitives::{Address, U256};
use alloy::signers::local::PrivateKeySigner;
use std::path::PathBuf;
use std::process::Stdio;
use tessera_contracts::{deploy, Contracts, Params, RpcChain, L1};
use tessera_rollup::{Action, Batch, State, Tx};
use tokio::io::{AsyncBufReadExt, BufReader};

/// anvil's well-known development keys (accounts #0 and #1 of its default mnemonic).
const ANVIL_KEYS: [&str; 2] = [
    "ac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80",
    "59c6995e998f97a5a0044966f0945389dc9e86dae88c7a8412f4603b6b78690d",
];

fn anvil_binary() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("node_modules/@foundry-rs");
    let found = std::fs::read_dir(&dir).ok().and_then(|entries| {
        entries
            .filter_map(Result::ok)
            .map(|e| e.path().join("bin/anvil"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "anvil is not installed under {}: run scripts/contracts.sh (the test command does)",
            dir.display()
        )
    })
}

struct Anvil {
    child: tokio::process::Child,
    url: String,
}

impl Anvil {
    async fn start() -> Anvil {
        let mut child = tokio::process::Command::new(anvil_binary())
            .args(["--host", "127.0.0.1", "--port", "0", "--hardfork", "prague"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("anvil starts");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let url = tokio::time::timeout(std::time::Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.expect("anvil output") {
                if let Some(addr) = line.strip_prefix("Listening on ") {
                    return format!("http://{}", addr.trim());
                }
            }
            panic!("anvil exited before listening")
        })
        .await
        .expect("anvil listens within 30 s");
        // Keep draining its output so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Anvil { child, url }
    }
}

impl Drop for Anvil {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

fn l2_key(n: u8) -> k256::ecdsa::SigningKey {
    k256::ecdsa::SigningKey::from_bytes(&[n; 32].into()).expect("key")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deposit_batch_and_withdraw_on_anvil_over_json_rpc() {
    let anvil = Anvil::start().await;
    let chain = RpcChain::connect(&anvil.url, true).await.expect("connect");
    assert_eq!(chain.chain_id(), 31337);
    let operator: PrivateKeySigner = ANVIL_KEYS[0].parse().expect("key");
    let dev: PrivateKeySigner = ANVIL_KEYS[1].parse().expect("key");
    let params = Params {
        challenge_window: 120,
        ..Params::default()
    };
    let d = deploy(
        &chain,
        &operator,
        operator.address(),
        Address::repeat_byte(0xfe),
        &params,
    )
    .await
    .expect("deploy on anvil");
    let c = Contracts::new(&chain, &d);
    c.mint(&operator, dev.address(), U256::from(1_000_000u64))
        .await
        .expect("mint");
    c.post_bond(&operator, params.min_bond).await.expect("bond");

    // The developer deposits; the node (an L2 key with no ether) is registered by a
    // zero deposit, made for it by the operator.
    let node = PrivateKeySigner::from_signing_key(l2_key(9));
    let (paying, _) = c
        .deposit(&dev, dev.address(), 600_000)
        .await
        .expect("deposit");
    let (registered, _) = c
        .deposit(&operator, node.address(), 0)
        .await
        .expect("register");
    let queue: Vec<_> = c
        .deposits()
        .await
        .expect("queue")
        .iter()
        .map(|q| q.hash())
        .collect();
    assert_eq!(queue.len(), 2);

    let mut state = State::genesis(
        d.domain.0,
        params.fee_bps,
        params.unbonding_epochs,
        [0xfe; 20],
    );
    let genesis = state.clone();
    let mut txs = vec![paying.tx(), registered.tx()];
    for tx in &txs {
        state.apply(tx, &queue);
    }
    let settle = Tx::Settle {
        payer: paying.slot,
        node: registered.slot,
        amount: 250_000,
        receipts_root: [7; 32],
    };
    state.apply(&settle, &queue);
    txs.push(settle);
    let earned = state.account(registered.slot).expect("node").balance;
    assert_eq!(earned, 247_500, "less the 1% fee");
    txs.push(Tx::sign(
        &l2_key(9),
        &d.domain.0,
        registered.slot,
        0,
        Action::Withdraw { amount: earned },
    ));

    let mut sequencer = genesis.clone();
    let batch = Batch::build(&mut sequencer, txs, &queue);
    let (index, receipt) = c
        .submit_batch(&operator, &batch)
        .await
        .expect("submit on anvil");
    assert!(receipt.gas_used > 0);
    // The watchtower's view over JSON-RPC: the same batch, replaying to the same roots.
    let posted = c.posted_batches().await.expect("batches");
    let read = c.batch_data(&posted[0]).await.expect("calldata");
    assert_eq!(read, batch);
    assert!(read.check(&genesis, &queue).is_ok());

    let slot = registered.slot;
    let proof = sequencer.tree().prove(slot);
    let early = c
        .withdraw(&dev, index, slot, sequencer.preimage(slot), &proof)
        .await;
    assert!(early
        .expect_err("not final yet")
        .to_string()
        .contains("NotFinal"));
    chain
        .advance_time(params.challenge_window + 1)
        .await
        .expect("evm_increaseTime");
    c.finalize(&dev).await.expect("finalize");
    c.withdraw(&dev, index, slot, sequencer.preimage(slot), &proof)
        .await
        .expect("withdraw on anvil");
    assert_eq!(
        c.token_balance(node.address()).await.expect("balance"),
        U256::from(earned)
    );
    assert_eq!(
        c.token_balance(d.settlement).await.expect("balance"),
        U256::from(600_000 - earned)
    );
    let again = c
        .withdraw(&dev, index, slot, sequencer.preimage(slot), &proof)
        .await;
    assert!(again
        .expect_err("paid once")
        .to_string()
        .contains("NothingToWithdraw"));
}
