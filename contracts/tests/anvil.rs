//! The deposit → batch → withdraw flow against a real external EVM node: anvil from the
//! npm package `@foundry-rs/anvil` (installed by scripts/contracts.sh), started by the
//! test on a free loopback port and spoken to over JSON-RPC through alloy.

mod common;

use alloy::signers::local::PrivateKeySigner;
use common::ANVIL_KEYS;
use std::path::PathBuf;
use std::process::Stdio;
use tessera_contracts::{RpcChain, L1};
use tokio::io::{AsyncBufReadExt, BufReader};

fn anvil_binary() -> PathBuf {
    // The manifest directory at run time: cargo sets it for tests, and a test binary reused
    // from a shared target directory may have been built in another checkout.
    let dir = PathBuf::from(
        std::env::var("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_owned()),
    )
    .join("node_modules/@foundry-rs");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deposit_batch_and_withdraw_on_anvil_over_json_rpc() {
    let anvil = Anvil::start().await;
    let chain = RpcChain::connect(&anvil.url, true).await.expect("connect");
    assert_eq!(chain.chain_id(), 31337);
    let operator: PrivateKeySigner = ANVIL_KEYS[0].parse().expect("key");
    let dev: PrivateKeySigner = ANVIL_KEYS[1].parse().expect("key");
    common::deposit_batch_and_withdraw(&chain, &operator, &dev).await;
}
