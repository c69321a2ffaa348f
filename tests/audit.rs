//! End-to-end audit: a local network of a coordinator and three `tessera node` processes,
//! one of which cheats. It advertises SmolLM2 Q4_1 but runs the same weights requantized
//! to Q4_0 (the test-only `--impersonate` adversary). Its first job is audited by replay
//! on an honest node and confirmed on the other; the cheater loses reputation, gets no
//! more jobs, and a slash of its stake is queued, while the honest nodes pass their audits.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tessera_coordinator::{AuditConfig, Coordinator, CoordinatorConfig, Ledger};
use tessera_net::{NetConfig, PeerId, Protocol};
use tessera_protocol::Amount;

mod common;
use common::{smollm2, Devnet, MODEL};

/// The Q4_0 substitute of SmolLM2, made once into the model cache.
fn substitute() -> PathBuf {
    let home = tessera_models::catalog::tessera_home();
    let path = tessera_models::verify_bench::substitute_path(&home, &smollm2(), "q4_0");
    if !path.exists() {
        std::fs::create_dir_all(path.parent().expect("parent")).expect("derived dir");
        tessera_models::requant::requantize(
            &smollm2(),
            &path,
            tessera_models::requant::parse_format("q4_0").expect("format"),
        )
        .expect("requantize SmolLM2 to Q4_0");
    }
    path
}

struct Node {
    child: Child,
    peer: PeerId,
    log: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_node(dir: &Path, name: &str, bootstrap: &str, model: &Path, claim: Option<&Path>) -> Node {
    let data = dir.join(name);
    let (key, _) =
        tessera_net::load_or_create_identity(&data.join("identity.key")).expect("identity");
    let log = dir.join(format!("{name}.log"));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tessera"));
    cmd.args(["--threads", "1", "node", "--model"])
        .arg(model)
        .arg("--data-dir")
        .arg(&data)
        .args([
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            // One machine: advertise loopback addresses; no router to ask for a port.
            "--lan",
            "--no-upnp",
            "--advert-interval",
            "0.5",
            "--advert-ttl",
            "3",
            "--bootstrap",
            bootstrap,
        ])
        .env("TESSERA_HOME", dir.join("home"))
        .env("RUST_LOG", "info,libp2p=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"));
    if let Some(claim) = claim {
        cmd.arg("--impersonate")
            .arg(claim)
            .env("TESSERA_TEST_IMPERSONATION", "1");
    }
    Node {
        child: cmd.spawn().expect("start tessera node"),
        peer: key.public().to_peer_id(),
        log,
    }
}

async fn get(client: &reqwest::Client, url: &str) -> Value {
    client
        .get(url)
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("JSON")
}

fn standing<'a>(nodes: &'a Value, peer: &PeerId) -> &'a Value {
    nodes["data"]
        .as_array()
        .and_then(|d| d.iter().find(|n| n["node"] == peer.to_string()))
        .map(|n| &n["standing"])
        .unwrap_or(&Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_running_another_quantization_is_audited_routed_around_and_slashed() {
    let sub = substitute();
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("coordinator");
    std::fs::create_dir_all(&data).expect("data dir");
    let audit = AuditConfig::default();
    let key = {
        let ledger = Ledger::open(&data.join("ledger.redb")).expect("ledger");
        ledger.create_account("dev").expect("account");
        ledger
            .credit("dev", Amount(1_000_000_000_000))
            .expect("credit");
        ledger
            .create_account(&audit.account)
            .expect("audit account");
        ledger
            .credit(&audit.account, Amount(1_000_000_000_000))
            .expect("fund audits");
        ledger.create_key("dev").expect("key").expose().to_owned()
    };
    let coordinator = Coordinator::start(CoordinatorConfig {
        http: "127.0.0.1:0".parse().expect("addr"),
        data_dir: data,
        net: NetConfig {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")],
            ..NetConfig::default()
        },
        audit: audit.clone(),
        ..CoordinatorConfig::default()
    })
    .await
    .expect("coordinator");
    let bootstrap = loop {
        if let Some(a) = coordinator.listen_addrs().await.into_iter().next() {
            break a.with(Protocol::P2p(coordinator.peer_id())).to_string();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let model = smollm2();
    let honest = [
        spawn_node(dir.path(), "honest-1", &bootstrap, &model, None),
        spawn_node(dir.path(), "honest-2", &bootstrap, &model, None),
    ];
    let cheat = spawn_node(dir.path(), "cheat", &bootstrap, &sub, Some(&model));
    let logs = || {
        let mut s = String::new();
        for n in honest.iter().chain([&cheat]) {
            s.push_str(&format!(
                "--- {}:\n{}\n",
                n.log.display(),
                std::fs::read_to_string(&n.log).unwrap_or_default()
            ));
        }
        s
    };
    // All three advertise the same module: the cheater claims SmolLM2 Q4_1's weights hash.
    let table = coordinator.net().table();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let modules: Vec<String> = table
            .read()
            .expect("table")
            .nodes()
            .map(|e| e.advert.modules[0].module.to_string())
            .collect();
        if modules.len() == 3 {
            assert!(
                modules.iter().all(|m| m == &modules[0]),
                "the cheater advertises the honest module: {modules:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nodes not discovered\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let base = format!("http://{}", coordinator.http_addr());
    let client = reqwest::Client::new();
    let chat = |seed: u64, order: Option<&PeerId>| {
        let mut body = json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": "Write a two-line poem about the sea."}],
            "max_tokens": 24,
            "temperature": 0.7,
            "seed": seed,
        });
        if let Some(peer) = order {
            body["provider"] = json!({"order": [peer.to_string()], "allow_fallbacks": false});
        }
        body
    };
    let complete = |body: Value| {
        let (client, key, url) = (
            client.clone(),
            key.clone(),
            format!("{base}/v1/chat/completions"),
        );
        async move {
            let r = client
                .post(url)
                .bearer_auth(key)
                .json(&body)
                .send()
                .await
                .expect("POST");
            let node = r
                .headers()
                .get("x-tessera-node")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            let status = r.status().as_u16();
            (status, node, r.json::<Value>().await.expect("JSON"))
        }
    };

    // The cheater's first job: served, paid, and (a new node's first jobs always are)
    // audited.
    let (status, node, body) = complete(chat(1, Some(&cheat.peer))).await;
    assert_eq!(status, 200, "{body}\n{}", logs());
    assert_eq!(node, Some(cheat.peer.to_string()));

    // The audit fails on an honest auditor, is confirmed on the other, and opens a dispute.
    let deadline = Instant::now() + Duration::from_secs(180);
    let nodes = loop {
        let nodes = get(&client, &format!("{base}/v1/nodes")).await;
        if standing(&nodes, &cheat.peer)["open_disputes"] == 1 {
            break nodes;
        }
        assert!(
            Instant::now() < deadline,
            "no dispute opened: {nodes}\n{}",
            get(&client, &format!("{base}/v1/audits")).await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let s = standing(&nodes, &cheat.peer);
    assert_eq!(s["audits"]["failed"], 1, "{s}");
    assert_eq!(s["routed"], false, "{s}");
    let reputation = s["reputation"].as_f64().expect("reputation");
    assert!(
        reputation < 0.1,
        "reputation dropped from 0.5: {reputation}"
    );

    let audits = get(&client, &format!("{base}/v1/audits")).await;
    let disputes = audits["disputes"].as_array().expect("disputes");
    assert_eq!(disputes.len(), 1, "{audits}");
    let d = &disputes[0];
    assert_eq!(d["node"], cheat.peer.to_string());
    assert_eq!(d["open"], true);
    assert_eq!(d["verdict"]["passed"], false);
    assert!(
        d["verdict"]["max_distance"].as_f64().expect("distance") > 0.5,
        "{d}"
    );
    assert!(
        honest.iter().any(|h| d["auditor"] == h.peer.to_string()),
        "an honest node audited it: {d}"
    );
    assert_eq!(d["slash"]["status"]["status"], "queued", "{d}");
    assert_eq!(d["slash"]["amount"], audit.slash.0.to_string());
    assert!(
        d["records"].as_u64().expect("records") > 0,
        "the dispute keeps the claimed transcript"
    );
    // The ledger keeps both transcripts.
    let (claimed, replayed) = {
        let r = coordinator.ledger().disputes().expect("disputes");
        (r[0].claimed.clone(), r[0].replayed.clone())
    };
    assert_eq!(claimed.len(), replayed.len());
    assert!(claimed
        .iter()
        .zip(&replayed)
        .all(|(c, r)| c.token == r.token));
    assert!(claimed
        .iter()
        .zip(&replayed)
        .any(|(c, r)| c.fingerprint != r.fingerprint));

    // It gets no more jobs, even when a caller asks for it by name; the honest nodes serve
    // everything, and pass their own first audits.
    for seed in 2..8u64 {
        let order = (seed % 2 == 0).then_some(&cheat.peer);
        let (status, node, body) = complete(chat(seed, order)).await;
        assert_eq!(status, 200, "{body}");
        assert_ne!(node, Some(cheat.peer.to_string()), "routed to the cheater");
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let nodes = get(&client, &format!("{base}/v1/nodes")).await;
        let passed: Vec<u64> = honest
            .iter()
            .map(|h| {
                standing(&nodes, &h.peer)["audits"]["passed"]
                    .as_u64()
                    .unwrap_or(0)
            })
            .collect();
        for h in &honest {
            let s = standing(&nodes, &h.peer);
            assert_eq!(s["audits"]["failed"], 0, "an honest node failed: {s}");
            assert_eq!(s["open_disputes"], 0, "{s}");
        }
        if passed.iter().sum::<u64>() >= 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "honest audits did not pass: {nodes}\n{}",
            get(&client, &format!("{base}/v1/audits")).await
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // The figures are in /metrics.
    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("GET")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("tessera_audits_total{result=\"failed\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains(&format!(
        "tessera_node_open_disputes{{node=\"{}\"}} 1",
        cheat.peer
    )));
    assert!(metrics.contains("tessera_node_reputation{"));

    // The auditors were paid from the audit account: two replays of the cheat, and one per
    // passed honest audit.
    let check = coordinator.ledger().check().expect("check");
    assert!(check.problems.is_empty(), "{:?}", check.problems);
    let funds = coordinator
        .ledger()
        .balance(&audit.account)
        .expect("audit account");
    assert!(funds.charged.0 > 0, "auditors are paid: {funds:?}");
    coordinator.shutdown().await;

    // The operator closes the dispute on the stopped coordinator's ledger: the node has no
    // open dispute left (so it is routed again), its history stays, and a second close is
    // refused with the reason.
    let ledger = dir.path().join("coordinator").join("ledger.redb");
    let disputes = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_tessera"))
            .arg("disputes")
            .args(args)
            .arg("--ledger")
            .arg(&ledger)
            .output()
            .expect("run tessera disputes")
    };
    let out = disputes(&["list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let job = list[0]["job"].as_str().expect("job").to_owned();
    assert_eq!(list[0]["open"], true);
    let out = disputes(&["close", &job]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let again = disputes(&["close", &job]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already closed"));
    let standings = Ledger::open(&ledger)
        .expect("ledger")
        .node_records()
        .expect("standings");
    let (_, cheat_record) = standings
        .iter()
        .find(|(n, _)| *n == cheat.peer.to_string())
        .expect("the cheater's standing");
    assert_eq!(cheat_record.open_disputes, 0);
    assert_eq!(cheat_record.failed, 1, "history stays");
}

/// The same cheat in a `tessera devnet` that settles on its embedded L1: every node stakes
/// at creation, the cheater's failed audit is confirmed, and the slash goes out in a rollup
/// batch, taking the slash from its posted stake on L2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_devnet_the_cheaters_slash_is_applied_to_its_stake_on_l2() {
    let sub = substitute();
    let dir = tempfile::tempdir().expect("tempdir");
    let stake: u128 = 1_000_000_000;
    let net = Devnet::start_with_env(
        dir.path(),
        &[
            "--nodes",
            "3",
            "--adversary",
            sub.to_str().expect("utf-8 path"),
            "--node-stake",
            &stake.to_string(),
            "--batch-interval",
            "1",
        ],
        &[("TESSERA_TEST_IMPERSONATION", "1")],
    );
    let base = format!("http://{}", net.addr);
    let client = reqwest::Client::new();
    let (cheat_key, _) =
        tessera_net::load_or_create_identity(&dir.path().join("node-3").join("identity.key"))
            .expect("node-3 identity");
    let cheat = cheat_key.public().to_peer_id();
    let nodes = get(&client, &format!("{base}/v1/nodes")).await;
    let payout = nodes["data"]
        .as_array()
        .and_then(|d| d.iter().find(|n| n["node"] == cheat.to_string()))
        .map(|n| n["payout"].as_str().expect("payout").to_owned())
        .unwrap_or_else(|| panic!("the cheater is in the node table: {nodes}"));
    let posted_stake = |v: &Value| {
        v["posted"]["stake"]
            .as_str()
            .and_then(|s| s.parse::<u128>().ok())
    };
    // Its stake is posted before it cheats.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let acct = get(&client, &format!("{base}/v1/l2/accounts/{payout}")).await;
        if posted_stake(&acct) == Some(stake) {
            break;
        }
        assert!(Instant::now() < deadline, "stake never posted: {acct}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let r = client
        .post(format!("{base}/v1/chat/completions"))
        .bearer_auth(&net.key)
        .json(&json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": "Name three colors."}],
            "max_tokens": 16,
            "temperature": 0,
            "provider": {"order": [cheat.to_string()], "allow_fallbacks": false},
        }))
        .send()
        .await
        .expect("POST");
    assert_eq!(
        r.headers()
            .get("x-tessera-node")
            .and_then(|v| v.to_str().ok()),
        Some(cheat.to_string().as_str())
    );
    // The dispute opens and its slash is handed to the sequencer (the dispute is saved
    // first, `queued`, then the slash submitted: wait for the hand-over) …
    let deadline = Instant::now() + Duration::from_secs(180);
    let dispute = loop {
        let audits = get(&client, &format!("{base}/v1/audits")).await;
        if let Some(d) = audits["disputes"].as_array().and_then(|d| d.first()) {
            if d["slash"]["status"]["status"] != "queued" {
                break d.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "no dispute handed over: {audits}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    assert_eq!(dispute["node"], cheat.to_string());
    assert_eq!(
        dispute["slash"]["status"]["status"], "submitted",
        "{dispute}"
    );
    let slash: u128 = dispute["slash"]["amount"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("amount");
    // … which posts it in the next batch: the cheater's stake on L2 drops by the slash.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let acct = get(&client, &format!("{base}/v1/l2/accounts/{payout}")).await;
        if posted_stake(&acct) == Some(stake - slash) {
            break;
        }
        assert!(Instant::now() < deadline, "slash never posted: {acct}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Killed and started again, the coordinator hands the open dispute's slash to the
    // sequencer once more; already posted, it is recognised by its evidence and the stake
    // is not slashed twice.
    drop(net);
    let net = Devnet::start_with_env(
        dir.path(),
        &[
            "--nodes",
            "3",
            "--adversary",
            sub.to_str().expect("utf-8 path"),
            "--batch-interval",
            "1",
        ],
        &[("TESSERA_TEST_IMPERSONATION", "1")],
    );
    let base = format!("http://{}", net.addr);
    tokio::time::sleep(Duration::from_secs(4)).await;
    let acct = get(&client, &format!("{base}/v1/l2/accounts/{payout}")).await;
    assert_eq!(posted_stake(&acct), Some(stake - slash), "{acct}");
    assert_eq!(
        acct["pending"]["stake"]
            .as_str()
            .and_then(|s| s.parse::<u128>().ok()),
        Some(stake - slash),
        "nothing more is waiting: {acct}"
    );
    let nodes = get(&client, &format!("{base}/v1/nodes")).await;
    assert_eq!(
        standing(&nodes, &cheat)["routed"],
        false,
        "still out after a restart"
    );
    drop(net);
}

/// `tessera verify-bench` on the real model: honest jobs replay at distance 0 and are never
/// flagged; a Q4_0 substitute is flagged on every job; an unknown scenario is a clear error.
#[test]
fn verify_bench_prints_rates_that_separate_honest_from_substituted_jobs() {
    substitute();
    let home = tessera_models::catalog::tessera_home();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
            .arg("verify-bench")
            .args(args)
            .env("TESSERA_HOME", &home)
            .output()
            .expect("run tessera verify-bench")
    };
    let out = run(&[
        "--only",
        "honest,q4_0",
        "--jobs",
        "3",
        "--scenario-jobs",
        "3",
        "--tokens",
        "12",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    let (honest, sub) = (&lines[0], &lines[1]);
    assert_eq!(
        (honest["scenario"].as_str(), sub["scenario"].as_str()),
        (Some("honest"), Some("q4_0"))
    );
    assert_eq!(honest["jobs"], 3);
    assert_eq!(honest["flagged_at_default"], 0.0, "{honest}");
    assert_eq!(
        honest["distance"][3], 0.0,
        "honest replays are exact: {honest}"
    );
    assert_eq!(sub["flagged_at_default"], 1.0, "{sub}");
    assert!(sub["distance"][0].as_f64().expect("min") > 0.1, "{sub}");
    let out = run(&["--only", "nonsense"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown scenario"));
}
