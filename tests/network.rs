//! The compute network end to end: a coordinator-side swarm in this process and real
//! `tessera node` processes on loopback serving the real SmolLM2 model. Covers discovery,
//! streamed jobs with verified receipts, a node killed mid-job, bad input on the job
//! stream, capacity, cancellation, and a graceful leave.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::io::{AsyncReadExt, AsyncWriteExt};
use tessera_coordinator::{ClientError, CoordinatorNet, JobSpec, JobStream, NodeEntry};
use tessera_net::{Multiaddr, NetConfig, PeerId};
use tessera_protocol::job::{MAX_EVENT_FRAME, MAX_REQUEST_FRAME};
use tessera_protocol::wire::{read_frame, write_frame};
use tessera_protocol::{
    Amount, ChatMessage, ErrorCode, FinishReason, JobEvent, JobId, JobInput, JobRequest, Keypair,
    ModuleId, Price, SamplingParams, Signed,
};

const ALIAS: &str = "smollm2-135m-instruct";

fn smollm2() -> PathBuf {
    tessera_models::test_support::model_path(ALIAS)
}

/// A `tessera node` process, killed when dropped.
struct NodeProc {
    child: std::sync::Mutex<Child>,
    peer: PeerId,
    dir: tempfile::TempDir,
    /// Set once the test signals the process: its exit is then expected.
    signalled: std::sync::atomic::AtomicBool,
}

impl NodeProc {
    fn spawn(bootstrap: &Multiaddr, extra: &[&str]) -> Self {
        Self::spawn_with(bootstrap, ("0.5", "3"), extra)
    }

    /// `adverts` is (interval, TTL) in seconds.
    fn spawn_with(bootstrap: &Multiaddr, adverts: (&str, &str), extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("data");
        // Create the identity the node will load, so the test knows its peer id up front.
        let (key, _) =
            tessera_net::load_or_create_identity(&data.join("identity.key")).expect("identity");
        let log = std::fs::File::create(dir.path().join("node.log")).expect("log file");
        let model = smollm2();
        let mut args: Vec<String> = [
            "--threads",
            "1",
            "node",
            "--model",
            model.to_str().expect("utf-8 path"),
            "--data-dir",
            data.to_str().expect("utf-8 path"),
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--listen",
            "/ip4/127.0.0.1/udp/0/quic-v1",
            // One machine: advertise loopback addresses; no router to ask for a port.
            "--lan",
            "--no-upnp",
            "--bootstrap",
            &bootstrap.to_string(),
            "--advert-interval",
            adverts.0,
            "--advert-ttl",
            adverts.1,
            "--payout",
            "0x00000000000000000000000000000000000000aa",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(&args)
            .env("TESSERA_HOME", dir.path())
            .env("RUST_LOG", "info,libp2p=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start tessera node");
        Self {
            child: std::sync::Mutex::new(child),
            peer: key.public().to_peer_id(),
            dir,
            signalled: false.into(),
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("node.log")).unwrap_or_default()
    }

    fn signal(&self, sig: &str) {
        self.signalled
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let ok = Command::new("kill")
            .args([sig, &self.child.lock().expect("child").id().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill {sig} failed");
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

async fn coordinator() -> (CoordinatorNet, Multiaddr) {
    coordinator_on("/ip4/127.0.0.1/tcp/0").await
}

/// A coordinator swarm listening on `listen` only, and its full address.
async fn coordinator_on(listen: &str) -> (CoordinatorNet, Multiaddr) {
    let config = NetConfig {
        listen: vec![listen.parse().expect("addr")],
        ..NetConfig::default()
    };
    let net = CoordinatorNet::start(Keypair::generate_ed25519(), &config)
        .await
        .expect("coordinator swarm");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(addr) = net.listen_addrs().await.into_iter().next() {
            let full = addr.with(tessera_net::Protocol::P2p(net.peer_id()));
            return (net, full);
        }
        assert!(Instant::now() < deadline, "coordinator never listened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A coordinator swarm and one node (started with `extra` flags) it has discovered, with
/// the module the node serves.
async fn one_node(extra: &[&str]) -> (CoordinatorNet, NodeProc, ModuleId) {
    let (net, addr) = coordinator().await;
    let node = NodeProc::spawn(&addr, extra);
    let module = discovered(&net, &node).await.advert.modules[0]
        .module
        .clone();
    (net, node, module)
}

fn entry(net: &CoordinatorNet, peer: &PeerId) -> Option<NodeEntry> {
    net.table().read().expect("table lock").get(peer).cloned()
}

/// Waits until `cond` holds for `node`'s table entry.
async fn wait_for(
    net: &CoordinatorNet,
    node: &NodeProc,
    what: &str,
    secs: u64,
    cond: impl Fn(Option<&NodeEntry>) -> bool,
) -> Option<NodeEntry> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let e = entry(net, &node.peer);
        if cond(e.as_ref()) {
            return e;
        }
        let exited = node
            .child
            .lock()
            .map(|mut c| c.try_wait())
            .ok()
            .and_then(Result::ok)
            .flatten();
        if let Some(status) =
            exited.filter(|_| !node.signalled.load(std::sync::atomic::Ordering::SeqCst))
        {
            panic!(
                "node exited ({status}) while waiting for {what}; node log:\n{}",
                node.log()
            );
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; node log:\n{}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn discovered(net: &CoordinatorNet, node: &NodeProc) -> NodeEntry {
    // Loading and hashing the model takes a moment in a debug build.
    wait_for(net, node, "the node's advert", 120, |e| e.is_some())
        .await
        .expect("entry")
}

fn spec(module: &ModuleId, input: JobInput, max_tokens: u32) -> JobSpec {
    JobSpec {
        module: module.clone(),
        payer: "acct-test".into(),
        input,
        sampling: SamplingParams::greedy(),
        max_tokens,
        stop: vec![],
        max_price: Price {
            per_1k_input: Amount(1_000_000),
            per_1k_output: Amount(1_000_000),
        },
        timeout: Duration::from_secs(120),
        replay: None,
    }
}

fn long_job(module: &ModuleId) -> JobSpec {
    // A base-model continuation that goes on for thousands of tokens.
    spec(
        module,
        JobInput::Text("1, 2, 3, 4, 5, 6, 7, 8, 9, 10,".into()),
        4000,
    )
}

async fn deltas(job: &mut JobStream, n: usize) {
    let mut seen = 0;
    while seen < n {
        match job.next().await.expect("stream open").expect("event") {
            JobEvent::Delta(_) => seen += 1,
            JobEvent::Accepted { .. } => {}
            other => panic!("unexpected event {other:?}"),
        }
    }
}

#[tokio::test]
async fn two_nodes_are_discovered_and_each_streams_a_job_with_a_verified_receipt() {
    let (net, addr) = coordinator().await;
    let nodes = [
        NodeProc::spawn(&addr, &["--metrics", "127.0.0.1:0"]),
        NodeProc::spawn(&addr, &["--price-output", "5000"]),
    ];
    let mut modules = Vec::new();
    for node in &nodes {
        let e = discovered(&net, node).await;
        modules.push(e.advert.modules[0].module.clone());
        if node.peer == nodes[1].peer {
            assert_eq!(e.advert.modules[0].price.per_1k_output, Amount(5000));
        }
        let a = &e.advert;
        assert_eq!(a.node, node.peer);
        assert_eq!(a.modules.len(), 1);
        let offer = &a.modules[0];
        assert_eq!(
            offer.alias, ALIAS,
            "a catalogue file keeps its alias when given by path"
        );
        assert_eq!(offer.module.family, "llama");
        assert_eq!(offer.module.quantization.as_str(), "q4_1");
        assert_eq!(a.capacity, 16, "the default max_jobs");
        assert_eq!(offer.numerics, "tessera-tiles-2");
        assert_eq!(
            a.payout.to_string(),
            "0x00000000000000000000000000000000000000aa"
        );
        assert!(a.addrs.iter().any(|x| x.contains("/tcp/")), "{:?}", a.addrs);
    }

    let client = net.client();
    for (node, module) in nodes.iter().zip(&modules) {
        let input = JobInput::Chat(vec![ChatMessage::user("Name the capital of France.")]);
        let mut job = client
            .start(node.peer, spec(module, input, 24))
            .await
            .expect("job starts");
        let mut text = String::new();
        let mut deltas = 0;
        let mut result = None;
        while let Some(event) = job.next().await {
            match event.unwrap_or_else(|e| panic!("job failed: {e}; node log:\n{}", node.log())) {
                JobEvent::Accepted { queued } => assert_eq!(queued, 0),
                JobEvent::Delta(t) => {
                    deltas += 1;
                    text.push_str(&t);
                }
                JobEvent::Result(r) => result = Some(r),
                JobEvent::Error(e) => panic!("error event {e:?}"),
                JobEvent::Transcript(_) => panic!("transcript frames are gathered by the client"),
            }
        }
        let result = result.expect("a result ends the stream");
        // The transcript arrived, one record per generated token, hashing to the commitment.
        assert_eq!(
            job.transcript().len(),
            result.usage.completion_tokens as usize
        );
        assert_eq!(
            tessera_protocol::TranscriptCommitment::from_records(job.transcript()),
            result.commitment
        );
        assert!(
            deltas > 1,
            "text streams as it is generated ({deltas} deltas)"
        );
        assert!(text.contains("Paris"), "{text:?}");
        // The receipt verifies on its own (the client checked it too), names this node and
        // prices the usage it reports.
        assert_eq!(
            result.receipt.verify().expect("signature verifies"),
            node.peer
        );
        let receipt = &result.receipt.body;
        assert_eq!(receipt.node, node.peer);
        assert_eq!(receipt.coordinator, net.peer_id());
        assert_eq!(receipt.usage, result.usage);
        assert!(result.usage.prompt_tokens > 10 && result.usage.completion_tokens > 3);
        assert_eq!(
            receipt.cost,
            receipt
                .price
                .cost(result.usage.prompt_tokens, result.usage.completion_tokens)
                .expect("cost")
        );
        let mut forged = result.receipt.clone();
        forged.body.cost = Amount(forged.body.cost.0 + 1);
        assert!(
            forged.verify().is_err(),
            "a changed receipt no longer verifies"
        );
    }
    // Later adverts carry the measured latency, and the table the observed speed.
    for node in &nodes {
        let e = wait_for(&net, node, "latency figures in the advert", 10, |e| {
            e.is_some_and(|e| e.advert.modules[0].latency.samples >= 1)
        })
        .await
        .expect("entry");
        assert!(e.advert.modules[0].latency.p95_ttft_ms.is_some());
        assert!(
            e.observed.jobs >= 1 && e.observed.tokens_per_sec > 0.0,
            "{:?}",
            e.observed
        );
        assert!(e.rtt.is_some(), "ping measured a round trip");
    }
    // The first node serves its Prometheus figures: the job it ran, by outcome, with its
    // time to first token, speed, queue and what its receipt earned (pending).
    let log = nodes[0].log();
    let url = log
        .lines()
        .find_map(|l| l.strip_prefix("metrics at "))
        .unwrap_or_else(|| panic!("the node says where its metrics are; log:\n{log}"))
        .trim()
        .to_owned();
    let text = reqwest::get(&url)
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("text");
    for needle in [
        "tessera_node_jobs_total{model=\"smollm2-135m-instruct\",outcome=\"ok\"} 1",
        "tessera_node_time_to_first_token_seconds_count{model=\"smollm2-135m-instruct\"",
        "tessera_node_tokens_per_second{model=\"smollm2-135m-instruct\"",
        "tessera_node_queue{model=\"smollm2-135m-instruct\"",
        "tessera_node_earned_base_units_total{status=\"pending\"}",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }
    assert!(
        !text.contains("tessera_node_earned_base_units_total{status=\"pending\"} 0"),
        "the receipt's cost is counted:\n{text}"
    );
    net.shutdown().await;
}

#[tokio::test]
async fn a_node_killed_mid_job_fails_the_client_within_seconds_and_expires_from_the_table() {
    let (net, addr) = coordinator().await;
    let node = NodeProc::spawn(&addr, &[]);
    killed_mid_job(net, node).await;
}

#[tokio::test]
async fn a_quic_node_killed_mid_job_fails_the_client_within_seconds() {
    // QUIC over UDP: a dead process sends nothing, so only pings and the idle timeout
    // can tell.
    let (net, addr) = coordinator_on("/ip4/127.0.0.1/udp/0/quic-v1").await;
    let node = NodeProc::spawn(&addr, &[]);
    killed_mid_job(net, node).await;
}

async fn killed_mid_job(net: CoordinatorNet, node: NodeProc) {
    let module = discovered(&net, &node).await.advert.modules[0]
        .module
        .clone();
    let mut job = net
        .client()
        .start(node.peer, long_job(&module))
        .await
        .expect("start");
    deltas(&mut job, 5).await;

    node.signal("-KILL");
    let killed = Instant::now();
    let err = loop {
        match job.next().await.expect("the stream reports its end") {
            Ok(JobEvent::Delta(_)) => continue,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(e) => break e,
        }
    };
    let noticed = killed.elapsed();
    eprintln!("client noticed the dead node after {noticed:?}");
    assert!(matches!(err, ClientError::PeerGone { .. }), "{err}");
    assert!(noticed < Duration::from_secs(5), "took {noticed:?}");

    // Its advert had a 3 s TTL: it is gone from the table soon after.
    wait_for(&net, &node, "the dead node to expire", 3 + 2, |e| {
        e.is_none()
    })
    .await;
    net.shutdown().await;
}

/// Opens a raw job stream to `peer`.
async fn raw_stream(net: &CoordinatorNet, peer: PeerId) -> tessera_net::Stream {
    net.net()
        .control()
        .open_stream(peer, tessera_net::job_protocol())
        .await
        .expect("open stream")
}

async fn error_reply(stream: &mut tessera_net::Stream) -> Option<ErrorCode> {
    match read_frame::<_, JobEvent>(stream, MAX_EVENT_FRAME).await {
        Ok(Some(JobEvent::Error(e))) => Some(e.code),
        Ok(None) | Err(_) => None,
        Ok(Some(other)) => panic!("expected an error, got {other:?}"),
    }
}

#[tokio::test]
async fn garbage_oversized_frames_unknown_modules_and_bad_signatures_are_refused_and_the_node_keeps_serving(
) {
    let (net, node, module) = one_node(&[]).await;

    // Garbage inside a well-formed frame.
    let mut s = raw_stream(&net, node.peer).await;
    s.write_all(&[0, 0, 0, 12]).await.expect("write");
    s.write_all(b"not a job!!!").await.expect("write");
    s.flush().await.expect("flush");
    assert_eq!(error_reply(&mut s).await, Some(ErrorCode::BadRequest));

    // A frame announcing 4 GiB: refused on the header, nothing allocated.
    let mut s = raw_stream(&net, node.peer).await;
    s.write_all(&[0xff, 0xff, 0xff, 0xff, 1, 2, 3])
        .await
        .expect("write");
    s.flush().await.expect("flush");
    let mut reply = Vec::new();
    let _ = s.read_to_end(&mut reply).await;
    assert!(reply.len() > 4, "an error frame comes back, got {reply:?}");
    let event: JobEvent =
        tessera_protocol::wire::decode(&reply[4..], MAX_EVENT_FRAME).expect("an error frame");
    match event {
        JobEvent::Error(e) => {
            assert_eq!(e.code, ErrorCode::BadRequest);
            assert!(e.message.contains("exceeds the limit"), "{}", e.message);
        }
        other => panic!("{other:?}"),
    }

    // A frame cut short: the client closes its side mid-header.
    let mut s = raw_stream(&net, node.peer).await;
    s.write_all(&[0, 0]).await.expect("write");
    s.close().await.expect("close");
    assert_eq!(error_reply(&mut s).await, Some(ErrorCode::BadRequest));

    let request = |node_id: PeerId| JobRequest {
        job_id: JobId([1; 16]),
        node: node_id,
        module: module.clone(),
        payer: "acct".into(),
        input: JobInput::Text("Hello".into()),
        sampling: SamplingParams::greedy(),
        max_tokens: 4,
        stop: vec![],
        max_price: Price {
            per_1k_input: Amount(1_000_000),
            per_1k_output: Amount(1_000_000),
        },
        deadline_ms: u64::MAX / 2,
        replay: None,
    };
    let key = Keypair::generate_ed25519();

    // A signature that does not match the body.
    let mut tampered = Signed::sign(request(node.peer), &key).expect("sign");
    tampered.body.max_tokens = 3000;
    let mut s = raw_stream(&net, node.peer).await;
    write_frame(&mut s, &tampered, MAX_REQUEST_FRAME)
        .await
        .expect("write");
    assert_eq!(error_reply(&mut s).await, Some(ErrorCode::BadSignature));

    // A valid signature on a request addressed to another node.
    let elsewhere = Signed::sign(
        request(Keypair::generate_ed25519().public().to_peer_id()),
        &key,
    )
    .expect("sign");
    let mut s = raw_stream(&net, node.peer).await;
    write_frame(&mut s, &elsewhere, MAX_REQUEST_FRAME)
        .await
        .expect("write");
    assert_eq!(error_reply(&mut s).await, Some(ErrorCode::BadSignature));

    // A module the node does not serve.
    let mut other = module.clone();
    other.weights = tessera_protocol::WeightsHash([0xab; 32]);
    let client = net.client();
    let err = client
        .run(node.peer, spec(&other, JobInput::Text("Hello".into()), 4))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Node(e) if e.code == ErrorCode::UnknownModule),
        "{err}"
    );

    // A price above the caller's maximum.
    let mut cheap = spec(&module, JobInput::Text("Hello".into()), 4);
    cheap.max_price = Price::default();
    let err = client.run(node.peer, cheap).await.unwrap_err();
    assert!(
        matches!(&err, ClientError::Node(e) if e.code == ErrorCode::PriceTooHigh),
        "{err}"
    );

    // After all that, the node still serves.
    let input = JobInput::Chat(vec![ChatMessage::user("Name the capital of France.")]);
    let done = client
        .run(node.peer, spec(&module, input, 16))
        .await
        .unwrap_or_else(|e| panic!("{e}; node log:\n{}", node.log()));
    assert!(done.text.contains("Paris"), "{}", done.text);
    assert!(entry(&net, &node.peer).is_some(), "node still in the table");
    net.shutdown().await;
}

#[tokio::test]
async fn a_node_at_capacity_answers_busy_and_a_closed_stream_stops_generation() {
    let (net, node, module) = one_node(&["--max-jobs", "1"]).await;
    let client = net.client();

    let mut running = client
        .start(node.peer, long_job(&module))
        .await
        .expect("start");
    deltas(&mut running, 5).await;

    let asked = Instant::now();
    let err = client
        .run(node.peer, spec(&module, JobInput::Text("Hello".into()), 4))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Node(e) if e.code == ErrorCode::Busy),
        "{err}"
    );
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "busy is answered at once, not queued"
    );

    // The node's token counter (carried by every advert) climbs while the job runs...
    let before = wait_for(&net, &node, "an advert showing the running job", 10, |e| {
        e.is_some_and(|e| e.advert.load.running == 1 && e.advert.tokens_generated > 0)
    })
    .await
    .expect("entry");
    let climbing = wait_for(&net, &node, "the token counter to climb", 10, |e| {
        e.is_some_and(|e| e.advert.tokens_generated > before.advert.tokens_generated + 10)
    })
    .await
    .expect("entry");
    assert_eq!(climbing.advert.load.running, 1);

    // ...and stops once the coordinator cancels, which still gets a signed receipt for
    // what was generated until then.
    let cancelled = running.cancel().await.unwrap_or_else(|| {
        panic!(
            "a cancelled job still ends with a result; node log:\n{}",
            node.log()
        )
    });
    assert_eq!(cancelled.finish_reason, FinishReason::Cancelled);
    assert_eq!(
        cancelled.receipt.body.finish_reason,
        FinishReason::Cancelled
    );
    assert!(
        (5..4000).contains(&cancelled.usage.completion_tokens),
        "receipt covers the tokens delivered before the cancel: {:?}",
        cancelled.usage
    );
    let settled = wait_for(&net, &node, "an advert showing no running job", 10, |e| {
        e.is_some_and(|e| e.advert.load.running == 0)
    })
    .await
    .expect("entry");
    // The counter comes to rest: equal across three consecutive adverts (a running job
    // adds tens of tokens a second). A token already being computed when the stream
    // closed may still land, so a few tries are allowed.
    let mut rest = None;
    for _ in 0..5 {
        let a = wait_for(&net, &node, "an advert", 10, |e| e.is_some())
            .await
            .expect("entry")
            .advert;
        let b = wait_for(&net, &node, "three more adverts", 10, |e| {
            e.is_some_and(|e| e.advert.seq >= a.seq + 3)
        })
        .await
        .expect("entry")
        .advert;
        if a.tokens_generated == b.tokens_generated {
            rest = Some(b.tokens_generated);
            break;
        }
    }
    let rest =
        rest.unwrap_or_else(|| panic!("token counter never stopped; node log:\n{}", node.log()));
    assert!(
        rest < 4000 && rest >= settled.advert.tokens_generated,
        "the job did not run to its end ({rest} tokens)"
    );
    assert!(
        node.log().contains("cancelled by the client"),
        "the node saw the stream close: {}",
        node.log()
    );

    // The slot is free again.
    let done = client
        .run(
            node.peer,
            spec(
                &module,
                JobInput::Text("The capital of France is".into()),
                4,
            ),
        )
        .await
        .unwrap_or_else(|e| panic!("{e}; node log:\n{}", node.log()));
    assert!(done.result.usage.completion_tokens > 0);
    net.shutdown().await;
}

#[tokio::test]
async fn ctrl_c_finishes_the_running_job_then_the_node_leaves_at_once() {
    let (net, addr) = coordinator().await;
    let node = NodeProc::spawn_with(&addr, ("5", "30"), &[]);
    let module = discovered(&net, &node).await.advert.modules[0]
        .module
        .clone();
    let client = net.client();
    let mut job = client
        .start(
            node.peer,
            spec(&module, JobInput::Text("1, 2, 3, 4, 5,".into()), 100),
        )
        .await
        .expect("start");
    deltas(&mut job, 2).await;
    // The signal handler is in place once the node says how to stop it.
    wait_for(&net, &node, "the node to finish starting", 30, |_| {
        node.log().contains("press Ctrl-C")
    })
    .await;
    // Without a goodbye the entry would live until the last advert's TTL (30 s) ran out.
    let last_seen = entry(&net, &node.peer).map_or_else(Instant::now, |e| e.last_seen);
    node.signal("-INT");
    let signalled_ms = tessera_protocol::now_ms();
    // The in-flight job still completes with a verified receipt...
    let mut result = None;
    while let Some(event) = job.next().await {
        if let JobEvent::Result(r) =
            event.unwrap_or_else(|e| panic!("{e}; node log:\n{}", node.log()))
        {
            result = Some(r);
        }
    }
    let result = result.expect("the in-flight job ends with a result");
    assert!(
        result.receipt.body.finished_ms > signalled_ms,
        "the job was still running when Ctrl-C arrived (finished {} ms, signal {} ms)",
        result.receipt.body.finished_ms,
        signalled_ms
    );
    assert!(node.log().contains("leaving"), "{}", node.log());
    assert_eq!(
        result.receipt.verify().expect("receipt verifies"),
        node.peer
    );
    // ...and the node's goodbye removes it long before its 30 s TTL.
    wait_for(&net, &node, "the leaving advert", 25, |e| e.is_none()).await;
    assert!(
        last_seen.elapsed() < Duration::from_secs(30),
        "removed by the goodbye, not by the TTL"
    );
    net.shutdown().await;
}

#[tokio::test]
async fn tessera_ask_streams_an_answer_over_quic_and_prints_the_verified_receipt() {
    let (net, addr) = coordinator().await;
    let node = NodeProc::spawn(&addr, &[]);
    let advert = discovered(&net, &node).await.advert;
    let quic = advert
        .addrs
        .iter()
        .find(|a| a.contains("/quic-v1"))
        .unwrap_or_else(|| panic!("no QUIC address in {:?}", advert.addrs));
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args([
            "ask",
            "--node",
            &format!("{quic}/p2p/{}", node.peer),
            "--receipt",
            "--max-tokens",
            "16",
            "Name the capital of France.",
        ])
        .output()
        .await
        .expect("run tessera ask");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}\nnode log:\n{}", node.log());
    assert!(
        stdout.starts_with("The capital of France is Paris."),
        "{stdout}"
    );
    assert!(stderr.contains("verified"), "{stderr}");
    let json_start = stdout.find('{').expect("receipt JSON after the answer");
    let receipt: Signed<tessera_protocol::Receipt> =
        serde_json::from_str(&stdout[json_start..]).expect("receipt JSON");
    assert_eq!(
        receipt.verify().expect("verifies"),
        node.peer,
        "the printed receipt verifies on its own"
    );
    net.shutdown().await;
}

#[tokio::test]
async fn a_burst_of_jobs_is_admitted_up_to_capacity_and_the_rest_are_told_busy() {
    let (net, node, module) = one_node(&["--max-jobs", "3"]).await;
    let client = net.client();
    // Eight jobs opened at once: every stream must reach the node (none lost in the
    // libp2p-stream hand-off), three are admitted, five are refused busy.
    let jobs = (0..8).map(|i| {
        let client = client.clone();
        let spec = spec(
            &module,
            JobInput::Text(format!("{i}, {}, {},", i + 1, i + 2)),
            8,
        );
        let peer = node.peer;
        async move { client.run(peer, spec).await }
    });
    let outcomes = futures::future::join_all(jobs).await;
    let done = outcomes.iter().filter(|o| o.is_ok()).count();
    let busy = outcomes
        .iter()
        .filter(|o| matches!(o, Err(ClientError::Node(e)) if e.code == ErrorCode::Busy))
        .count();
    let other: Vec<_> = outcomes
        .iter()
        .filter_map(|o| o.as_ref().err())
        .filter(|e| !matches!(e, ClientError::Node(e) if e.code == ErrorCode::Busy))
        .map(|e| e.to_string())
        .collect();
    assert!(
        other.is_empty(),
        "unexpected failures: {other:?}; node log:\n{}",
        node.log()
    );
    assert_eq!(done + busy, 8);
    assert!(
        done >= 3,
        "at least capacity is served ({done} done, {busy} busy)"
    );
    net.shutdown().await;
}
