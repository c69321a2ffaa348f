//! End to end on the embedded chain, in one process: a coordinator with its sequencer, a
//! node running SmolLM2 with its watchtower, the settlement contracts in revm.
//!
//! Deposit on L1 → API calls → receipts → batch posted → window → the node and a
//! delegator withdraw on L1, and every balance adds up exactly; then a sequencer that
//! posts a wrong root is challenged by the node's watchtower, reverted, slashed, and the
//! honest state is posted again.

use std::net::SocketAddr;
use std::time::Duration;

use alloy::primitives::U256;
use alloy::signers::local::PrivateKeySigner;
use serde_json::{json, Value};
use tessera_contracts::{AnyChain, Contracts, Params, L1};
use tessera_coordinator::{Coordinator, CoordinatorConfig, Fault, Ledger, SequencerConfig};
use tessera_net::{NetConfig, Protocol};
use tessera_node::{NodeConfig, RunningNode, ServedModel, Watchtower, WatchtowerEvent};
use tessera_protocol::Address;
use tessera_rollup::{Action, Tx, DELEGATION_BASE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

mod common;
use common::MODEL;

/// Each test here runs a model engine; the machines have two cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
const ETH: u128 = 1_000_000_000_000_000_000;
const WINDOW: u64 = 30;

fn key(n: u8) -> k256::ecdsa::SigningKey {
    k256::ecdsa::SigningKey::from_bytes(&[n; 32].into()).expect("key")
}

fn wallet(n: u8) -> PrivateKeySigner {
    PrivateKeySigner::from_signing_key(key(n))
}

/// One HTTP/1.1 request; returns the status code and the JSON body.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    api_key: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {api_key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read");
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").expect("http reply");
    let status = head[9..12].parse().expect("status");
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// POST a chat completion; returns the JSON reply.
async fn chat(addr: SocketAddr, api_key: &str, content: &str) -> Value {
    let body = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 12,
        "temperature": 0,
    });
    let (status, reply) = http(addr, "POST", "/v1/chat/completions", api_key, Some(body)).await;
    assert_eq!(status, 200, "{reply}");
    reply
}

async fn wait_until<F, Fut>(what: &str, secs: u64, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_jobs_settle_on_l1_and_a_wrong_root_is_challenged_by_a_watchtower() {
    let _one = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().expect("dir");
    let model = tessera_models::test_support::model_path(MODEL);
    let params = Params {
        challenge_window: WINDOW,
        escape_delay: 3_600,
        fee_bps: 100,
        unbonding_epochs: 1,
        ..Params::default()
    };
    let l1 = tessera_coordinator::l1::open_l1(&dir.path().join("l1"), None, &params)
        .await
        .expect("embedded L1");
    let AnyChain::Embedded(chain) = l1.chain.clone() else {
        unreachable!("embedded by default")
    };
    let c = Contracts::new(&l1.chain, &l1.deployment);
    let domain = l1.deployment.domain.0;
    let (dev, node_w, holder, watcher) = (wallet(1), wallet(2), wallet(3), wallet(4));
    for w in [&dev, &node_w, &holder, &watcher] {
        chain.fund(w.address(), U256::from(10 * ETH)).expect("fund");
    }

    // L1: the developer deposits 10^9, the node 10,000 (to stake), the holder 30,000.
    let funds = [
        (&dev, 1_000_000_000u128),
        (&node_w, 10_000),
        (&holder, 30_000),
    ];
    for (w, amount) in funds {
        c.mint(&l1.operator, w.address(), U256::from(amount))
            .await
            .expect("mint");
        c.deposit(w, w.address(), amount).await.expect("deposit");
    }
    let deposited: u128 = funds.iter().map(|(_, a)| a).sum();

    // The API account, linked to the developer's address: its deposit credits it.
    let coordinator_dir = dir.path().join("coordinator");
    std::fs::create_dir_all(&coordinator_dir).expect("dir");
    let api_key = {
        let ledger = Ledger::open(&coordinator_dir.join("ledger.redb")).expect("ledger");
        ledger.create_account("dev").expect("account");
        ledger
            .link("dev", &Address(dev.address().0 .0))
            .expect("link");
        ledger.create_key("dev").expect("key").expose().to_owned()
    };
    let loopback = || NetConfig {
        listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")],
        ..NetConfig::default()
    };
    let coordinator = Coordinator::start_with(
        CoordinatorConfig {
            http: "127.0.0.1:0".parse().expect("addr"),
            data_dir: coordinator_dir,
            net: loopback(),
            ..CoordinatorConfig::default()
        },
        Some((
            l1.clone(),
            SequencerConfig {
                batch_interval: Duration::from_secs(3_600), // posted on flush only
                poll_interval: Duration::from_millis(200),
                ..SequencerConfig::default()
            },
        )),
    )
    .await
    .expect("coordinator");
    let seq = coordinator.sequencer().expect("sequencer").clone();
    let http_addr = coordinator.http_addr();
    assert_eq!(
        coordinator
            .ledger()
            .balance("dev")
            .expect("balance")
            .balance
            .0,
        1_000_000_000,
        "the L1 deposit credited the API account"
    );

    // A node paid at its wallet's address, with a watchtower.
    let mut bootstrap = Vec::new();
    while bootstrap.is_empty() {
        bootstrap = coordinator.listen_addrs().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let node_config = NodeConfig {
        data_dir: dir.path().join("node"),
        models: vec![ServedModel::new(model.to_str().expect("utf-8 path"))],
        payout: Address(node_w.address().0 .0),
        advert_interval: Duration::from_secs(1),
        coordinators: vec![coordinator.peer_id()],
        net: NetConfig {
            bootstrap: bootstrap
                .into_iter()
                .map(|a| a.with(Protocol::P2p(coordinator.peer_id())))
                .collect(),
            ..loopback()
        },
        ..NodeConfig::default()
    };
    let models = tessera_node::load_models(&node_config, dir.path()).expect("model");
    let node = RunningNode::start(node_config, models).await.expect("node");
    let stop = tokio_util::sync::CancellationToken::new();
    let (events_tx, mut events) = tokio::sync::mpsc::channel(16);
    let tower = Watchtower::new(l1.chain.clone(), l1.deployment.clone(), watcher.clone());
    let tower_task =
        tokio::spawn(tower.run(Duration::from_millis(300), Some(events_tx), stop.clone()));
    wait_until("the node's advert", 60, || async {
        coordinator
            .net()
            .table()
            .read()
            .map(|t| t.len())
            .unwrap_or(0)
            > 0
    })
    .await;

    // L2: the node stakes, the holder delegates to it; posted in the first batch.
    let slot = |w: &PrivateKeySigner| {
        let seq = seq.clone();
        let a = Address(w.address().0 .0);
        async move { seq.account(a).await.expect("ask").expect("account") }
    };
    let node_slot = slot(&node_w).await.slot;
    let holder_slot = slot(&holder).await.slot;
    seq.submit(Tx::sign(
        &key(2),
        &domain,
        node_slot,
        0,
        Action::Stake { amount: 10_000 },
    ))
    .await
    .expect("stake");
    let delegate = Action::Delegate {
        delegation: DELEGATION_BASE,
        node: node_slot,
        amount: 30_000,
    };
    seq.submit(Tx::sign(&key(3), &domain, holder_slot, 0, delegate))
        .await
        .expect("delegate");
    assert_eq!(seq.flush().await.expect("flush"), Some(0));

    // API calls: each settles a receipt in the ledger, waiting for the next batch.
    let mut charged = 0u128;
    for q in [
        "Name the capital of France.",
        "What is 2 + 2?",
        "Name three colors.",
    ] {
        let reply = chat(http_addr, &api_key, q).await;
        charged += reply["tessera"]["cost"]
            .as_str()
            .expect("cost")
            .parse::<u128>()
            .expect("int");
    }
    assert!(charged > 0);
    assert_eq!(
        coordinator.ledger().unbatched().expect("unbatched").len(),
        3
    );
    assert_eq!(seq.flush().await.expect("flush"), Some(1));
    assert!(coordinator
        .ledger()
        .unbatched()
        .expect("unbatched")
        .is_empty());

    // The split: 1% fee; the node has 10,000 of 40,000 staked, so a quarter of the rest.
    let fee = charged / 100;
    let to_node = charged - fee;
    let delegators = to_node * 30_000 / 40_000;
    let node_earned = to_node - delegators;
    let n = slot(&node_w).await.pending;
    assert_eq!(
        (n.balance, n.earned, n.pool),
        (node_earned, node_earned, delegators)
    );
    let d = slot(&dev).await.pending;
    assert_eq!(
        d.balance,
        1_000_000_000 - charged,
        "the payer paid exactly the receipts"
    );
    assert_eq!(
        coordinator
            .ledger()
            .balance("dev")
            .expect("balance")
            .balance
            .0,
        d.balance,
        "the API's balance is the L2 balance"
    );

    // The holder claims; both withdraw everything to L1.
    seq.submit(Tx::Claim {
        delegation: DELEGATION_BASE,
    })
    .await
    .expect("claim");
    let h = slot(&holder).await.pending;
    let claimed = h.balance;
    let dust = slot(&node_w).await.pending.pool;
    assert_eq!(
        claimed + dust,
        delegators,
        "the pool's rounding dust stays in the pool"
    );
    assert!(
        dust <= 1,
        "a claim loses less than one unit to rounding: {dust}"
    );
    seq.submit(Tx::sign(
        &key(2),
        &domain,
        node_slot,
        1,
        Action::Withdraw {
            amount: node_earned,
        },
    ))
    .await
    .expect("node withdraws");
    // The holder's withdrawal goes through the HTTP route a wallet uses; a replay of
    // the same signed transaction is refused with the reason.
    let signed = Tx::sign(
        &key(3),
        &domain,
        holder_slot,
        1,
        Action::Withdraw { amount: claimed },
    );
    let body = json!({"tx": format!("0x{}", hex::encode(signed.encode()))});
    let (status, reply) = http(
        http_addr,
        "POST",
        "/v1/l2/transactions",
        "",
        Some(body.clone()),
    )
    .await;
    assert_eq!(status, 202, "{reply}");
    let (status, reply) = http(http_addr, "POST", "/v1/l2/transactions", "", Some(body)).await;
    assert_eq!(status, 400);
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap_or("")
            .contains("wrong nonce"),
        "{reply}"
    );
    assert_eq!(seq.flush().await.expect("flush"), Some(2));
    wait_until("the watchtower to verify batches 0-2", 30, || {
        let got = events.try_recv();
        async move { matches!(got, Ok(WatchtowerEvent::Verified { index: 2 })) }
    })
    .await;

    // The window passes; the sequencer finalizes; each withdraws with a proof.
    chain.advance_time(WINDOW + 1).await.expect("time");
    wait_until("batch 2 final", 30, || {
        let seq = seq.clone();
        async move { seq.status().await.is_ok_and(|s| s.finalized == 3) }
    })
    .await;
    for (w, s, amount) in [
        (&node_w, node_slot, node_earned),
        (&holder, holder_slot, claimed),
    ] {
        // The leaf and its proof against the final root, as the public route serves them.
        let path = format!("/v1/l2/accounts/{}", w.address());
        let (status, view) = http(http_addr, "GET", &path, "", None).await;
        assert_eq!(status, 200, "{view}");
        assert_eq!(view["final"]["withdrawn"], json!(amount.to_string()));
        let p = &view["proof"];
        let unhex = |v: &Value| {
            hex::decode(v.as_str().expect("hex").trim_start_matches("0x")).expect("hex")
        };
        let proof = tessera_rollup::MerkleProof {
            bitmap: p["bitmap"].as_u64().expect("bitmap") as u32,
            siblings: p["siblings"]
                .as_array()
                .expect("siblings")
                .iter()
                .map(|h| unhex(h).try_into().expect("32 bytes"))
                .collect(),
        };
        let batch = p["batch"].as_u64().expect("batch");
        let before = c.token_balance(w.address()).await.expect("balance");
        c.withdraw(w, batch, s, unhex(&p["leaf"]), &proof)
            .await
            .expect("withdraw on L1");
        let after = c.token_balance(w.address()).await.expect("balance");
        assert_eq!(after - before, U256::from(amount));
    }
    // The books: L1 holds every deposit less what it paid; L2 accounts for every unit.
    let held = c
        .token_balance(l1.deployment.settlement)
        .await
        .expect("balance");
    assert_eq!(held, U256::from(deposited - node_earned - claimed));
    let fee_account = seq
        .account(Address(l1.operator.address().0 .0))
        .await
        .expect("ask");
    assert_eq!(fee_account.map(|a| a.pending.balance), Some(fee));
    assert!(coordinator
        .ledger()
        .check()
        .expect("check")
        .problems
        .is_empty());

    // A wrong root: the watchtower challenges, the batch is reverted and the bond
    // slashed; the sequencer re-bonds and posts the honest state again.
    let bond_before = c.bond().await.expect("bond");
    seq.inject_fault(Fault::WrongRoot).await.expect("inject");
    chat(
        http_addr,
        &api_key,
        "Which planet is known as the Red Planet?",
    )
    .await;
    assert_eq!(seq.flush().await.expect("flush"), Some(3));
    let mut upheld = false;
    wait_until("the watchtower's challenge", 30, || {
        let got = events.try_recv();
        if let Ok(WatchtowerEvent::Challenged {
            index: 3,
            upheld: u,
            ..
        }) = got
        {
            upheld = u;
        }
        let done = upheld;
        async move { done }
    })
    .await;
    assert!(c.bond().await.expect("bond") < bond_before, "slashed");
    wait_until("the honest batch re-posted", 30, || {
        let seq = seq.clone();
        let c = Contracts::new(&l1.chain, &l1.deployment);
        async move {
            let _ = seq.flush().await;
            c.batch_count().await.is_ok_and(|n| n == 4)
        }
    })
    .await;
    wait_until("the watchtower to verify the re-posted batch", 30, || {
        let got = events.try_recv();
        async move { matches!(got, Ok(WatchtowerEvent::Verified { index: 3 })) }
    })
    .await;
    let status = seq.status().await.expect("status");
    assert_eq!(status.batches, 4);
    assert!(coordinator
        .ledger()
        .unbatched()
        .expect("unbatched")
        .is_empty());

    stop.cancel();
    let _ = tower_task.await;
    node.shutdown().await;
    coordinator.shutdown().await;
}

/// The rollup from the command line, on a `tessera devnet` process: the devnet account's
/// wallet delegates to a node that staked from its earnings; the node withdraws and
/// collects on L1; `tessera rewards` proves both parties' earnings against the contract.
#[test]
fn the_wallet_cli_stakes_delegates_withdraws_pays_out_and_proves_rewards_on_a_devnet() {
    let _one = ONE_AT_A_TIME.blocking_lock();
    let dir = tempfile::tempdir().expect("dir");
    let net = common::Devnet::start_with(
        dir.path(),
        &[
            "--nodes",
            "1",
            "--batch-interval",
            "1",
            "--challenge-window",
            "3",
        ],
    );
    let coordinator = format!("http://{}", net.addr);
    let cli = |args: &[&str]| -> Value {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(args)
            .args(["--coordinator", &coordinator, "--json"])
            .env("TESSERA_HOME", dir.path())
            .output()
            .expect("run tessera");
        assert!(
            out.status.success(),
            "tessera {args:?} failed: {}\ndevnet log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            net.log()
        );
        serde_json::from_slice(&out.stdout).expect("JSON out")
    };
    let amount = |v: &Value| {
        v.as_str()
            .map_or(0, |s| s.parse::<u128>().expect("integer string"))
    };
    let wait = |what: &str, check: &dyn Fn() -> bool| {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while !check() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    };
    let dev = cli(&["wallet", "address", "--wallet", "devnet"])["address"]
        .as_str()
        .expect("address")
        .to_owned();
    let node = cli(&["wallet", "address", "--wallet", "node-1"])["address"]
        .as_str()
        .expect("address")
        .to_owned();
    let balance = |w: &str| cli(&["wallet", "balance", "--wallet", w]);
    assert_eq!(
        amount(&balance("devnet")["l2"]["pending"]["balance"]),
        1_000_000_000_000,
        "the devnet account's deposit"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let ask = |q: &str| rt.block_on(chat(net.addr, &net.key, q));

    // The node earns, then stakes half of what it earned.
    ask("Name the capital of France.");
    wait("the node's earnings posted", &|| {
        amount(&balance("node-1")["l2"]["posted"]["balance"]) > 0
    });
    let earned = amount(&balance("node-1")["l2"]["posted"]["balance"]);
    cli(&["stake", &(earned / 2).to_string(), "--wallet", "node-1"]);
    wait("the stake posted", &|| {
        amount(&balance("node-1")["l2"]["posted"]["stake"]) == earned / 2
    });
    // The devnet account delegates; more jobs; it claims its share.
    cli(&["delegate", &node, "1000000", "--wallet", "devnet"]);
    wait("the delegation posted", &|| {
        let b = balance("node-1");
        amount(&b["l2"]["posted"]["delegated_to_it"]) == 1_000_000
    });
    ask("What is 2 + 2?");
    ask("Name three colors.");
    wait("the node's pool filled", &|| {
        amount(&balance("node-1")["l2"]["posted"]["pool"]) > 0
    });
    cli(&["wallet", "claim", "--wallet", "devnet"]);
    // The node withdraws what it holds and collects it on L1 once final.
    let spendable = amount(&balance("node-1")["l2"]["pending"]["balance"]);
    cli(&[
        "wallet",
        "withdraw",
        &spendable.to_string(),
        "--wallet",
        "node-1",
    ]);
    wait("the withdrawal final", &|| {
        amount(&balance("node-1")["l2"]["final"]["withdrawn"]) == spendable
            && amount(&balance("devnet")["l2"]["final"]["earned"]) > 0
    });
    let paid = cli(&["wallet", "payout", "--wallet", "node-1"]);
    assert_eq!(amount(&paid["paid"]), spendable);
    let l1 = balance("node-1");
    assert_eq!(amount(&l1["l1"]["tokens"]), spendable);
    assert_eq!(amount(&l1["l1"]["withdrawals_paid"]), spendable);

    // Rewards, each row proved against the contract's root of a final batch; --json
    // prints the dashboard's account document for the address.
    let mine = cli(&["rewards", &dev]);
    let rows = mine["statement"]["rows"].as_array().expect("rows");
    let last = rows.last().expect("a final row");
    assert_eq!(last["earned"]["status"], json!("final"));
    assert!(amount(&mine["statement"]["total"]["amount"]) > 0, "{mine}");
    assert_eq!(
        amount(&last["inputs"]["earned"]),
        amount(&balance("devnet")["l2"]["final"]["earned"]),
        "the delegation's claimed rewards are all the account earned"
    );
    assert!(amount(&mine["positions"]["delegations"][0]["claimed"]["amount"]) > 0);
    let theirs = cli(&["rewards", &node]);
    let node_rows = theirs["statement"]["rows"].as_array().expect("rows");
    assert!(amount(&node_rows.last().expect("row")["inputs"]["earned"]) >= earned);
    net.stop();
}
