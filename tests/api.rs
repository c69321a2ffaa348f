//! End-to-end tests of the OpenAI-compatible API on a real devnet: `tessera devnet`
//! processes (a coordinator and two nodes running SmolLM2), driven over real HTTP by the
//! printed curl line, the official OpenAI Python SDK, and a small HTTP/1.1 client here.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

mod common;
use common::{smollm2, Devnet, MODEL};

/// The devnet account's initial funds (the CLI default).
const FUND: u128 = 1_000_000_000_000;

/// Devnets run one at a time: each runs two engines, and the machines have two cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `tessera accounts check` on a stopped devnet's ledger.
fn books(dir: &Path) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["accounts", "check", "--ledger"])
        .arg(dir.join("coordinator").join("ledger.redb"))
        .output()
        .expect("run accounts check");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "books do not balance: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).expect("check prints JSON")
}

/// `tessera accounts show tessera-audits`: what the auditors were paid.
fn audit_account(dir: &Path) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["accounts", "show", "tessera-audits", "--ledger"])
        .arg(dir.join("coordinator").join("ledger.redb"))
        .output()
        .expect("run accounts show");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("show prints JSON")
}

fn amount(v: &Value) -> u128 {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an amount: {v}"))
}

/// A response read to its end.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }

    /// The `data:` payloads of an event stream.
    fn events(&self) -> Vec<String> {
        String::from_utf8_lossy(&self.body)
            .split("\n\n")
            .filter_map(|e| e.lines().find_map(|l| l.strip_prefix("data: ")))
            .map(str::to_owned)
            .collect()
    }
}

fn request_bytes(method: &str, path: &str, key: &str, body: Option<&Value>) -> Vec<u8> {
    let body = body.map(Value::to_string).unwrap_or_default();
    format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// One HTTP/1.1 exchange with `Connection: close`, read to the end (chunked or not).
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    key: &str,
    body: Option<&Value>,
) -> Reply {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(&request_bytes(method, path, key, body))
        .await
        .expect("send");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.expect("read");
    parse_reply(&raw)
}

fn parse_reply(raw: &[u8]) -> Reply {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", String::from_utf8_lossy(raw)));
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        let mut out = Vec::new();
        let mut rest = body.as_slice();
        while let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") {
            let size = usize::from_str_radix(String::from_utf8_lossy(&rest[..eol]).trim(), 16)
                .expect("chunk size");
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[eol + 2..eol + 2 + size]);
            rest = &rest[eol + 2 + size + 2..];
        }
        body = out;
    }
    Reply {
        status,
        headers,
        body,
    }
}

/// Sends a streaming request and reads until `events` SSE events arrived; returns the
/// open connection and the bytes so far (headers included).
async fn open_stream(
    addr: SocketAddr,
    path: &str,
    key: &str,
    body: &Value,
    events: usize,
) -> (TcpStream, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(&request_bytes("POST", path, key, Some(body)))
        .await
        .expect("send");
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    while raw.windows(6).filter(|w| w == b"data: ").count() < events {
        let n = s.read(&mut buf).await.expect("read");
        assert!(
            n > 0,
            "stream ended early: {}",
            String::from_utf8_lossy(&raw)
        );
        raw.extend_from_slice(&buf[..n]);
    }
    (s, raw)
}

/// `GET /v1/receipts/{id}` with the devnet's key.
async fn get_receipt(net: &Devnet, id: &str) -> Reply {
    http(
        net.addr,
        "GET",
        &format!("/v1/receipts/{id}"),
        &net.key,
        None,
    )
    .await
}

fn cost(usage: &Value) -> u128 {
    // The devnet's nodes ask the default price: 1000 per 1k prompt, 4000 per 1k output.
    let p = u128::from(usage["prompt_tokens"].as_u64().expect("prompt_tokens") as u32);
    let c = u128::from(
        usage["completion_tokens"]
            .as_u64()
            .expect("completion_tokens") as u32,
    );
    (p * 1000 + c * 4000).div_ceil(1000)
}

/// Checks one streamed chat completion and returns (receipt id, cost, node).
fn check_stream(reply: &Reply) -> (String, u128, String) {
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let events = reply.events();
    assert_eq!(
        events.last().map(String::as_str),
        Some("[DONE]"),
        "{events:?}"
    );
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).expect("chunk is JSON"))
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert!(!text.is_empty(), "no text in {events:?}");
    let finish = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["finish_reason"].as_str())
        .collect::<Vec<_>>();
    assert_eq!(finish.len(), 1, "one finishing chunk: {events:?}");
    let last = chunks.last().expect("usage chunk");
    assert_eq!(last["choices"], json!([]), "usage chunk has no choices");
    let usage = &last["usage"];
    let id = last["tessera"]["receipt"]
        .as_str()
        .expect("receipt id")
        .to_owned();
    let charged = amount(&last["tessera"]["cost"]);
    assert_eq!(charged, cost(usage), "cost follows price and usage");
    assert_eq!(reply.header("x-tessera-receipt"), Some(id.as_str()));
    let node = reply
        .header("x-tessera-node")
        .expect("node header")
        .to_owned();
    assert_eq!(last["tessera"]["node"].as_str(), Some(node.as_str()));
    (id, charged, node)
}

fn stream_body(seed: u64, max_tokens: u32) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a short poem about the sea."}],
        "max_tokens": max_tokens,
        "temperature": 0.8,
        "seed": seed,
        "stream": true,
        "stream_options": {"include_usage": true},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devnet_answers_curl_the_openai_sdk_and_32_concurrent_streams_with_exact_books() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut net = Devnet::start(dir.path());

    // The printed curl line works as printed.
    let out = Command::new("sh")
        .args(["-c", &net.curl])
        .output()
        .expect("run curl");
    let reply: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "curl printed no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    // Greedy, as printed: llama.cpp's answer on this file and prompt (README).
    assert_eq!(
        reply["choices"][0]["message"]["content"], "The capital of France is Paris.",
        "{reply}"
    );
    assert_eq!(reply["object"], "chat.completion");
    assert!(reply["usage"]["completion_tokens"].as_u64() > Some(0));

    // The official OpenAI Python SDK: chat, streamed chat with usage, completion, errors.
    let base = format!("http://{}/v1", net.addr);
    let sdk = Command::new(format!(
        "{}/scripts/openai-sdk-check.sh",
        std::env::var("CARGO_MANIFEST_DIR")
            .unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").to_owned())
    ))
    .args([&base, &net.key, MODEL])
    .env("TESSERA_HOME", tessera_models::catalog::tessera_home())
    .output()
    .expect("run the SDK check");
    assert!(
        sdk.status.success(),
        "OpenAI SDK check failed:\n{}{}\ndevnet log:\n{}",
        String::from_utf8_lossy(&sdk.stdout),
        String::from_utf8_lossy(&sdk.stderr),
        net.log()
    );
    let seen: Value = serde_json::from_slice(&sdk.stdout).expect("SDK check prints JSON");
    assert_eq!(seen["chat"]["text"], seen["chat_stream"]["text"]);
    assert!(seen["completion"]["usage"]["completion_tokens"].as_u64() > Some(0));

    // 32 concurrent streams across the two nodes, every one whole.
    let before = http(net.addr, "GET", "/v1/account", &net.key, None)
        .await
        .json();
    let t0 = Instant::now();
    let streams: Vec<_> = (0..32u64)
        .map(|seed| {
            let addr = net.addr;
            let key = net.key.clone();
            tokio::spawn(async move {
                http(
                    addr,
                    "POST",
                    "/v1/chat/completions",
                    &key,
                    Some(&stream_body(seed, 24)),
                )
                .await
            })
        })
        .collect();
    let mut total = 0u128;
    let mut nodes = std::collections::BTreeMap::<String, u32>::new();
    let mut ids = Vec::new();
    for s in streams {
        let reply = s.await.expect("stream task");
        let (id, charged, node) = check_stream(&reply);
        total += charged;
        *nodes.entry(node).or_default() += 1;
        ids.push((id, charged));
    }
    eprintln!("32 streams in {:?}, spread {nodes:?}", t0.elapsed());
    assert_eq!(nodes.len(), 2, "both nodes served: {nodes:?}");
    // Each receipt is the node-signed record of what was charged.
    for (id, charged) in &ids {
        let r = get_receipt(&net, id).await;
        assert_eq!(r.status, 200);
        let r = r.json();
        assert_eq!(amount(&r["charged"]), *charged);
        assert_eq!(amount(&r["receipt"]["body"]["cost"]), *charged);
        assert_eq!(r["signature_valid"], true);
    }
    let after = http(net.addr, "GET", "/v1/account", &net.key, None)
        .await
        .json();
    assert_eq!(
        amount(&after["charged"]) - amount(&before["charged"]),
        total
    );
    assert_eq!(amount(&after["reserved"]), 0);
    let metrics = http(net.addr, "GET", "/metrics", &net.key, None).await;
    let metrics = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(
        metrics.contains("tessera_jobs_total{outcome=\"ok\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("tessera_nodes 2"), "{metrics}");

    // Ctrl-C with a stream in flight: the stream still ends whole, then everything stops.
    let (mut s, mut raw) = open_stream(
        net.addr,
        "/v1/chat/completions",
        &net.key,
        &stream_body(1000, 64),
        1,
    )
    .await;
    net.interrupt();
    s.read_to_end(&mut raw).await.expect("read the rest");
    let (_, last_cost, _) = check_stream(&parse_reply(&raw));
    net.stop();

    // The books: account debits = receipts = node credits, exactly. Besides the caller's
    // jobs, the ledger pays the auditors that replayed the nodes' first jobs.
    let b = books(dir.path());
    assert_eq!(b["problems"], json!([]));
    let audits = audit_account(dir.path());
    assert!(
        amount(&audits["charged"]) > 0,
        "auditors were paid: {audits}"
    );
    assert_eq!(
        amount(&b["charged"]),
        amount(&after["charged"]) + last_cost + amount(&audits["charged"])
    );
    assert_eq!(amount(&b["receipts_charged"]), amount(&b["charged"]));
    assert_eq!(amount(&b["node_credits"]), amount(&b["charged"]));
    assert_eq!(b["open_reservations"], 0);
    assert_eq!(b["nodes"].as_array().map(Vec::len), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_pays_what_it_got_and_a_killed_coordinator_loses_no_receipt() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let net = Devnet::start(dir.path());

    // A client that disconnects mid-stream: the job is cancelled on its node, which signs
    // a receipt for what it generated until then; only that is charged.
    let body = json!({
        "model": MODEL, "prompt": "Once upon a time, in a land far away,", "max_tokens": 2000,
        "temperature": 1.0, "seed": 7, "stream": true,
    });
    let (s, raw) = open_stream(net.addr, "/v1/completions", &net.key, &body, 5).await;
    drop(s);
    let head = String::from_utf8_lossy(&raw).into_owned();
    let id = head
        .lines()
        .find_map(|l| l.strip_prefix("x-tessera-receipt: "))
        .expect("receipt header")
        .trim()
        .to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    let receipt = loop {
        let r = get_receipt(&net, &id).await;
        if r.status == 200 {
            break r.json();
        }
        assert!(
            Instant::now() < deadline,
            "no receipt for the cancelled job; log:\n{}",
            net.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let body = &receipt["receipt"]["body"];
    assert_eq!(body["finish_reason"], "cancelled", "{receipt}");
    let tokens = body["usage"]["completion_tokens"].as_u64().expect("tokens");
    assert!((5..2000).contains(&tokens), "charged for {tokens} tokens");
    assert_eq!(amount(&receipt["charged"]), cost(&body["usage"]));
    let account = http(net.addr, "GET", "/v1/account", &net.key, None)
        .await
        .json();
    assert_eq!(amount(&account["reserved"]), 0);
    assert_eq!(amount(&account["charged"]), amount(&receipt["charged"]));

    // SIGKILL during load: every response that completed has its receipt committed.
    let streams: Vec<_> = (0..24u64)
        .map(|seed| {
            let addr = net.addr;
            let key = net.key.clone();
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.ok()?;
                s.write_all(&request_bytes(
                    "POST",
                    "/v1/chat/completions",
                    &key,
                    Some(&stream_body(seed, 48)),
                ))
                .await
                .ok()?;
                let mut raw = Vec::new();
                // A killed server resets the connection: keep what arrived.
                let _ = s.read_to_end(&mut raw).await;
                if !raw.windows(4).any(|w| w == b"\r\n\r\n") {
                    return None;
                }
                let reply = parse_reply(&raw);
                reply
                    .events()
                    .last()
                    .is_some_and(|e| e == "[DONE]")
                    .then(|| check_stream(&reply))
            })
        })
        .collect();
    let t0 = Instant::now();
    let mut done = Vec::new();
    let mut pending = streams;
    // Kill once a few have completed and others are mid-stream.
    while done.len() < 6 {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "load stalled; log:\n{}",
            net.log()
        );
        let mut still = Vec::new();
        for h in pending {
            if h.is_finished() {
                if let Some(r) = h.await.expect("task") {
                    done.push(r);
                }
            } else {
                still.push(h);
            }
        }
        pending = still;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    net.kill();
    let mut interrupted = 0;
    for h in pending {
        match h.await.expect("task") {
            Some(r) => done.push(r),
            None => interrupted += 1,
        }
    }
    eprintln!(
        "{} streams completed, {interrupted} interrupted by the kill",
        done.len()
    );
    assert!(interrupted > 0, "the kill landed mid-load");
    // The crashed ledger is consistent as it stands (holds still open), …
    let crashed = books(dir.path());
    assert_eq!(crashed["problems"], json!([]));

    // … and a restart releases the holds, keeps every committed receipt and the balance.
    let net = Devnet::start(dir.path());
    let account = http(net.addr, "GET", "/v1/account", &net.key, None)
        .await
        .json();
    assert_eq!(amount(&account["reserved"]), 0, "{account}");
    assert_eq!(amount(&account["credited"]), FUND, "funded once, not again");
    for (id, charged, _) in &done {
        let r = get_receipt(&net, id).await;
        assert_eq!(
            r.status, 200,
            "receipt {id} of a completed response was lost"
        );
        assert_eq!(amount(&r.json()["charged"]), *charged);
    }
    // It serves again.
    let r = http(
        net.addr,
        "POST",
        "/v1/chat/completions",
        &net.key,
        Some(&stream_body(99, 8)),
    )
    .await;
    check_stream(&r);
    net.stop();
    let b = books(dir.path());
    assert_eq!(b["problems"], json!([]));
    assert_eq!(b["open_reservations"], 0);
    assert_eq!(amount(&b["receipts_charged"]), amount(&b["charged"]));
    assert_eq!(amount(&b["node_credits"]), amount(&b["charged"]));
    assert!(b["receipts"].as_u64() >= Some(done.len() as u64 + 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_moves_to_another_node_when_the_first_fails_before_its_first_token() {
    use tessera_coordinator::{Coordinator, CoordinatorConfig, Ledger};
    use tessera_net::{NetConfig, NetEvent, Protocol};
    let _turn = ONE_AT_A_TIME.lock().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("coordinator");
    std::fs::create_dir_all(&data).expect("data dir");
    let key = {
        let ledger = Ledger::open(&data.join("ledger.redb")).expect("ledger");
        ledger.create_account("dev").expect("account");
        ledger
            .credit("dev", tessera_protocol::Amount(FUND))
            .expect("credit");
        ledger.create_key("dev").expect("key").expose().to_owned()
    };
    let coordinator = Coordinator::start(CoordinatorConfig {
        http: "127.0.0.1:0".parse().expect("addr"),
        data_dir: data,
        net: NetConfig {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")],
            ..NetConfig::default()
        },
        ..CoordinatorConfig::default()
    })
    .await
    .expect("coordinator");
    let bootstrap = loop {
        if let Some(a) = coordinator.listen_addrs().await.into_iter().next() {
            break a.with(Protocol::P2p(coordinator.peer_id()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let node_dir = dir.path().join("node");
    let mut node = Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(["--threads", "1", "node", "--model"])
        .arg(smollm2())
        .arg("--data-dir")
        .arg(&node_dir)
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
        ])
        .arg("--bootstrap")
        .arg(bootstrap.to_string())
        .env("TESSERA_HOME", dir.path().join("home"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tessera node");
    let table = coordinator.net().table();
    let deadline = Instant::now() + Duration::from_secs(60);
    let real = loop {
        let found = table
            .read()
            .expect("table")
            .nodes()
            .next()
            .map(|e| e.advert.clone());
        if let Some(a) = found {
            break a;
        }
        assert!(Instant::now() < deadline, "node never discovered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // A ghost: the advert of a node that is not there, better than the real one on every
    // figure, so routing tries it first.
    let ghost = tessera_protocol::Keypair::generate_ed25519()
        .public()
        .to_peer_id();
    let mut advert = real.clone();
    advert.node = ghost;
    advert.ttl_secs = 600;
    advert.load = tessera_protocol::Load::default();
    advert.modules[0].latency = tessera_protocol::LatencyStats {
        samples: 100,
        p95_ttft_ms: Some(1),
        p95_tpot_us: Some(1),
    };
    table
        .write()
        .expect("table")
        .apply(&NetEvent::Advert(Box::new(advert)), Instant::now());
    let addr = coordinator.http_addr();
    let chat = json!({"model": MODEL, "messages": [{"role": "user", "content": "Name the capital of France."}], "max_tokens": 8, "temperature": 0});

    let r = http(addr, "POST", "/v1/chat/completions", &key, Some(&chat)).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let body = r.json();
    assert_eq!(
        body["tessera"]["attempts"], 2,
        "the ghost was tried first: {body}"
    );
    assert_eq!(
        r.header("x-tessera-node"),
        Some(real.node.to_string().as_str())
    );
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "The capital of France is Paris."
    );
    {
        let t = table.read().expect("table");
        let g = t.get(&ghost).expect("ghost still advertised");
        assert_eq!(g.failures, 1);
    }
    // Recently failed, the ghost now goes last: the next job goes straight to the node.
    let r = http(addr, "POST", "/v1/chat/completions", &key, Some(&chat)).await;
    assert_eq!(r.json()["tessera"]["attempts"], 1);
    // Asked for the ghost without fallbacks: 503, and nothing stays reserved or charged.
    let before = http(addr, "GET", "/v1/account", &key, None).await.json();
    let mut only_ghost = chat.clone();
    only_ghost["provider"] = json!({"order": [ghost.to_string()], "allow_fallbacks": false});
    let r = http(
        addr,
        "POST",
        "/v1/chat/completions",
        &key,
        Some(&only_ghost),
    )
    .await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["code"], "node_failed");
    let after = http(addr, "GET", "/v1/account", &key, None).await.json();
    assert_eq!(after["charged"], before["charged"]);
    assert_eq!(after["reserved"], "0");

    coordinator.shutdown().await;
    let _ = node.kill();
    let _ = node.wait();
}
