//! Home nodes behind real NATs. Linux network namespaces make a small internet: a public
//! segment (203.0.113.0/24) with the coordinator (relay and AutoNAT server), and two home
//! LANs, each behind its own router namespace doing nftables masquerade, with the WAN
//! `input` drop a real router has (without it, zero-latency veths turn a cone NAT into a
//! symmetric one by accident: ../shared/research/nat-traversal.md, 1.4).
//!
//! ```text
//!   lan1 10.1.0.2 -- nat1 [10.1.0.1 | 203.0.113.11] --+
//!                                                     br0 in pub, 203.0.113.1 (coordinator)
//!   lan2 10.2.0.2 -- nat2 [10.2.0.1 | 203.0.113.12] --+
//! ```
//!
//! A node in LAN 1 joins through the relay; a peer in LAN 2 (`tessera ask`, which runs a
//! job the way a second coordinator or an auditor does) reaches it over the relay and is
//! upgraded to a direct connection by hole punching; behind an endpoint-dependent NAT the
//! upgrade fails and jobs stay on the relay; a job longer than a circuit allows ends with
//! a receipt. Needs root (CI runs as root) and `nft` (scripts/test.sh installs it); where
//! either is missing the test fails with one line saying so. Namespaces and processes are
//! removed on every path, panics included.

mod common;

use common::smollm2;
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const COORD_IP: &str = "203.0.113.1";
const COORD_P2P: u16 = 7300;
const NODE_WAN: &str = "203.0.113.11";
const PAYOUT: &str = "0x00000000000000000000000000000000000000aa";
/// Seconds one relay circuit may stay open on the coordinator (longer than hole punching's
/// three attempts of 10 s each).
const CIRCUIT_SECS: u64 = 60;
/// Bytes one relay circuit may carry: small, so a long answer meets the limit in seconds.
const CIRCUIT_BYTES: u64 = 384 << 10;

/// The namespaces, the processes in them, and their logs; all removed when dropped.
struct Lab {
    prefix: String,
    dir: tempfile::TempDir,
    children: Vec<(String, Child)>,
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

fn must(cmd: &mut Command) {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ip(args: &[&str]) {
    must(Command::new("ip").args(args));
}

impl Lab {
    fn ns(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// Builds the topology, or fails in one line saying what this machine lacks.
    fn new() -> Self {
        let prefix = format!("tn{}", std::process::id());
        let lab = Self {
            prefix,
            dir: tempfile::tempdir().expect("tempdir"),
            children: Vec::new(),
        };
        let probe = run(Command::new("ip").args(["netns", "add", &lab.ns("pub")]));
        assert!(
            probe.status.success(),
            "the NAT test needs root to create network namespaces (CI runs as root): ip netns add said: {}",
            String::from_utf8_lossy(&probe.stderr).trim()
        );
        assert!(
            Command::new("nft").arg("--version").output().is_ok(),
            "the NAT test needs nft (Debian's nftables package; scripts/test.sh installs it)"
        );
        for ns in ["nat1", "nat2", "lan1", "lan2"] {
            ip(&["netns", "add", &lab.ns(ns)]);
        }
        for ns in ["pub", "nat1", "nat2", "lan1", "lan2"] {
            ip(&["-n", &lab.ns(ns), "link", "set", "lo", "up"]);
        }
        let public = lab.ns("pub");
        ip(&["-n", &public, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &public, "addr", "add", "203.0.113.1/24", "dev", "br0"]);
        ip(&["-n", &public, "link", "set", "br0", "up"]);
        for i in 1..=2 {
            let (nat, lan) = (lab.ns(&format!("nat{i}")), lab.ns(&format!("lan{i}")));
            let (w, u) = (format!("{}w{i}", lab.prefix), format!("{}u{i}", lab.prefix));
            let (l, n) = (format!("{}l{i}", lab.prefix), format!("{}n{i}", lab.prefix));
            ip(&["link", "add", &w, "type", "veth", "peer", "name", &u]);
            ip(&["link", "set", &w, "netns", &nat, "name", "wan"]);
            ip(&[
                "link",
                "set",
                &u,
                "netns",
                &public,
                "name",
                &format!("up{i}"),
            ]);
            ip(&[
                "-n",
                &public,
                "link",
                "set",
                &format!("up{i}"),
                "master",
                "br0",
            ]);
            ip(&["-n", &public, "link", "set", &format!("up{i}"), "up"]);
            ip(&[
                "-n",
                &nat,
                "addr",
                "add",
                &format!("203.0.113.1{i}/24"),
                "dev",
                "wan",
            ]);
            ip(&["-n", &nat, "link", "set", "wan", "up"]);
            ip(&["link", "add", &l, "type", "veth", "peer", "name", &n]);
            ip(&["link", "set", &l, "netns", &lan, "name", "eth0"]);
            ip(&["link", "set", &n, "netns", &nat, "name", "lan"]);
            ip(&[
                "-n",
                &nat,
                "addr",
                "add",
                &format!("10.{i}.0.1/24"),
                "dev",
                "lan",
            ]);
            ip(&["-n", &nat, "link", "set", "lan", "up"]);
            ip(&[
                "-n",
                &lan,
                "addr",
                "add",
                &format!("10.{i}.0.2/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &lan, "link", "set", "eth0", "up"]);
            ip(&[
                "-n",
                &lan,
                "route",
                "add",
                "default",
                "via",
                &format!("10.{i}.0.1"),
            ]);
            must(Command::new("ip").args([
                "netns",
                "exec",
                &nat,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ]));
            lab.router(i, false);
        }
        lab
    }

    /// Loads router `i`'s rules: masquerade out of the WAN (port-preserving, or with
    /// `random` ports per destination: an endpoint-dependent, "symmetric" NAT), forward
    /// only what the LAN started, and drop new connections arriving on the WAN.
    fn router(&self, i: u32, random: bool) {
        let nat = self.ns(&format!("nat{i}"));
        let rules = format!(
            "flush ruleset\n\
             table ip nat {{\n\
               chain postrouting {{\n\
                 type nat hook postrouting priority srcnat; policy accept;\n\
                 oifname \"wan\" masquerade{}\n\
               }}\n\
             }}\n\
             table ip filter {{\n\
               chain forward {{\n\
                 type filter hook forward priority filter; policy drop;\n\
                 ct state established,related accept\n\
                 iifname \"lan\" oifname \"wan\" accept\n\
               }}\n\
               chain input {{\n\
                 type filter hook input priority filter; policy accept;\n\
                 iifname \"wan\" ct state new drop\n\
               }}\n\
             }}\n",
            if random { " random" } else { "" }
        );
        let mut child = Command::new("ip")
            .args(["netns", "exec", &nat, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run nft");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(rules.as_bytes())
            .expect("write rules");
        let out = child.wait_with_output().expect("nft");
        assert!(
            out.status.success(),
            "nft in {nat}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn log_path(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }

    /// Starts `tessera ARGS` in namespace `ns`, its output in `NAME.log`.
    fn spawn(&mut self, name: &str, ns: &str, args: &[&str]) {
        let log = std::fs::File::create(self.log_path(name)).expect("log");
        let child = Command::new("ip")
            .args(["netns", "exec", &self.ns(ns), env!("CARGO_BIN_EXE_tessera")])
            .args(args)
            .env("TESSERA_HOME", self.dir.path().join(format!("{name}-home")))
            .env("RUST_LOG", "info,libp2p=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start tessera");
        self.children.push((name.to_owned(), child));
    }

    /// Kills process `name` (SIGKILL: a crash, not a goodbye).
    fn kill(&mut self, name: &str) {
        if let Some(i) = self.children.iter().position(|(n, _)| n == name) {
            let (_, mut child) = self.children.swap_remove(i);
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// How many lines of `name`'s log contain `needle`.
    fn count(&self, name: &str, needle: &str) -> usize {
        self.log(name)
            .lines()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// Waits for a line of `name`'s log containing `needle`; returns it.
    fn wait_for(&self, name: &str, needle: &str, secs: u64) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(line) = self.log(name).lines().find(|l| l.contains(needle)) {
                return line.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} from {name} within {secs} s; its log:\n{}",
                self.log(name)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `cmd` in namespace `ns` to the end.
    fn exec(&self, ns: &str, cmd: &[&str]) -> Output {
        run(Command::new("ip")
            .args(["netns", "exec", &self.ns(ns)])
            .args(cmd))
    }

    /// `curl -s ARGS` from namespace `ns`: the body.
    fn curl(&self, ns: &str, args: &[&str]) -> String {
        let mut cmd = vec!["curl", "-s"];
        cmd.extend_from_slice(args);
        String::from_utf8_lossy(&self.exec(ns, &cmd).stdout).into_owned()
    }

    /// `tessera ask --json …` from namespace `ns`: one JSON document per job.
    fn ask(&self, ns: &str, args: &[&str]) -> Vec<Value> {
        let mut cmd = vec![env!("CARGO_BIN_EXE_tessera"), "ask", "--json"];
        cmd.extend_from_slice(args);
        let out = run(Command::new("ip")
            .args(["netns", "exec", &self.ns(ns)])
            .args(&cmd)
            .env("RUST_LOG", "info,libp2p=warn"));
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            out.status.success(),
            "tessera ask {args:?} failed:\n{stderr}\nnode log:\n{}",
            self.log("node")
        );
        stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    /// Starts `tessera ask --json …` in namespace `ns`, its log in `NAME.log`; read its jobs
    /// with [`AskRun::next`] as they finish.
    fn spawn_ask(&mut self, name: &str, ns: &str, args: &[&str]) -> AskRun {
        let log = std::fs::File::create(self.log_path(name)).expect("log");
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns(ns),
                env!("CARGO_BIN_EXE_tessera"),
                "ask",
                "--json",
            ])
            .args(args)
            .env("RUST_LOG", "info,libp2p=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start tessera ask");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::sync_channel(16);
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        self.children.push((name.to_owned(), child));
        AskRun {
            name: name.to_owned(),
            lines: rx,
        }
    }

    /// Blocks (or lets through) LAN 2's packets to the node's router: hole punching then
    /// fails while the relay still works.
    fn block_lan2_to_node(&self, block: bool) {
        self.router(2, false);
        if block {
            must(Command::new("ip").args([
                "netns",
                "exec",
                &self.ns("nat2"),
                "nft",
                "insert",
                "rule",
                "ip",
                "filter",
                "forward",
                "ip",
                "daddr",
                NODE_WAN,
                "drop",
            ]));
        }
    }

    /// Whether a TCP connection from namespace `ns` to `addr:port` opens within 3 s.
    fn tcp_connects(&self, ns: &str, addr: &str, port: u16) -> bool {
        self.exec(
            ns,
            &[
                "timeout",
                "3",
                "bash",
                "-c",
                &format!("exec 3<>/dev/tcp/{addr}/{port}"),
            ],
        )
        .status
        .success()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        for ns in ["lan1", "lan2", "nat1", "nat2", "pub"] {
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns(ns)])
                .status();
        }
        if std::thread::panicking() {
            for name in ["coordinator", "node"] {
                eprintln!("--- {name} log ---\n{}", self.log(name));
            }
        }
    }
}

/// A `tessera ask` running in the background.
struct AskRun {
    name: String,
    lines: std::sync::mpsc::Receiver<String>,
}

impl AskRun {
    /// The next finished job, within `secs`.
    fn next(&self, lab: &Lab, secs: u64) -> Value {
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(secs))
            .unwrap_or_else(|_| {
                panic!(
                    "no job from {} within {secs} s; its log:\n{}\nnode log:\n{}",
                    self.name,
                    lab.log(&self.name),
                    lab.log("node")
                )
            });
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
    }
}

fn path_of(job: &Value) -> (&str, &str) {
    (
        job["path"].as_str().unwrap_or("none"),
        job["remote"].as_str().unwrap_or(""),
    )
}

fn ms(job: &Value, field: &str) -> f64 {
    job[field].as_f64().unwrap_or(f64::NAN)
}

/// A coordinator's data directory with an account holding credit and an API key; returns
/// the key and the coordinator's peer id.
fn coordinator_dir(dir: &Path) -> (String, String) {
    use tessera_coordinator::Ledger;
    std::fs::create_dir_all(dir).expect("coordinator dir");
    let (key, _) =
        tessera_net::load_or_create_identity(&dir.join("identity.key")).expect("identity");
    let ledger = Ledger::open(&dir.join("ledger.redb")).expect("ledger");
    ledger.create_account("home").expect("account");
    ledger
        .credit("home", tessera_protocol::Amount(1_000_000_000))
        .expect("credit");
    let api_key = ledger.create_key("home").expect("key").expose().to_owned();
    (api_key, key.public().to_peer_id().to_string())
}

#[test]
fn a_node_behind_nat_is_reached_through_the_relay_and_upgraded_by_hole_punching() {
    let mut lab = Lab::new();
    let coord_dir = lab.dir.path().join("coordinator");
    let (api_key, coord) = coordinator_dir(&coord_dir);
    let (circuit_secs, circuit_bytes) = (CIRCUIT_SECS.to_string(), CIRCUIT_BYTES.to_string());
    let http = format!("{COORD_IP}:8080");
    let (tcp, quic) = (
        format!("/ip4/{COORD_IP}/tcp/{COORD_P2P}"),
        format!("/ip4/{COORD_IP}/udp/{COORD_P2P}/quic-v1"),
    );
    let coordinator_args = [
        "coordinator",
        "--http",
        &http,
        "--data-dir",
        coord_dir.to_str().expect("utf-8"),
        "--listen",
        &tcp,
        "--listen",
        &quic,
        "--relay-circuit-secs",
        &circuit_secs,
        "--relay-circuit-bytes",
        &circuit_bytes,
    ];
    lab.spawn("coordinator", "pub", &coordinator_args);
    lab.wait_for("coordinator", "OpenAI-compatible API", 60);
    let relay = format!("/ip4/{COORD_IP}/tcp/{COORD_P2P}/p2p/{coord}");

    // 0. `tessera node --check` tells a home node's owner how it is reached and what to
    // change, and a public one that nothing needs doing.
    let check = |ns: &str, listen: &str, dir: &str, extra: &[&str]| {
        let dir = lab.dir.path().join(dir);
        let mut cmd = vec![
            env!("CARGO_BIN_EXE_tessera"),
            "node",
            "--check",
            "--check-secs",
            "30",
            "--listen",
            listen,
            "--bootstrap",
            &relay,
            "--data-dir",
            dir.to_str().expect("utf-8"),
        ];
        cmd.extend_from_slice(extra);
        let out = lab.exec(ns, &cmd);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // Another port than the node's: the check's connections linger in TIME_WAIT.
    let (ok, home) = check("lan1", "/ip4/0.0.0.0/tcp/7401", "check-home", &[]);
    eprintln!("tessera node --check behind NAT:\n{home}");
    assert!(ok, "{home}");
    assert!(
        home.contains("result: behind NAT, reached through relay"),
        "{home}"
    );
    assert!(
        home.contains(&format!(
            "AutoNAT: /ip4/{NODE_WAN}/tcp/7401 is not reachable"
        )),
        "{home}"
    );
    assert!(
        home.contains("peers see this node come from /ip4/203.0.113.11/tcp/7401"),
        "{home}"
    );
    assert!(
        home.contains("your public IP, as peers see it: 203.0.113.11"),
        "{home}"
    );
    assert!(home.contains("UPnP: no gateway answered"), "{home}");
    assert!(
        home.contains("enable UPnP on your router, or forward TCP and UDP 7401"),
        "{home}"
    );
    let (ok, public) = check(
        "pub",
        &format!("/ip4/{COORD_IP}/tcp/7500"),
        "check-public",
        &["--no-upnp"],
    );
    eprintln!("tessera node --check on the public side:\n{public}");
    assert!(ok, "{public}");
    assert!(
        public.contains(&format!("result: public at /ip4/{COORD_IP}/tcp/7500")),
        "{public}"
    );
    assert!(public.contains("what to do: nothing"), "{public}");

    // 1. The node joins from LAN 1 and learns that it is behind NAT, reached through the
    // coordinator's relay.
    let node_dir = lab.dir.path().join("node-data");
    let (node_key, _) =
        tessera_net::load_or_create_identity(&node_dir.join("identity.key")).expect("identity");
    let node = node_key.public().to_peer_id().to_string();
    let model = smollm2();
    let started = Instant::now();
    lab.spawn(
        "node",
        "lan1",
        &[
            "--threads",
            "1",
            "node",
            "--model",
            model.to_str().expect("utf-8"),
            "--data-dir",
            node_dir.to_str().expect("utf-8"),
            "--listen",
            "/ip4/0.0.0.0/tcp/7400",
            "--listen",
            "/ip4/0.0.0.0/udp/7400/quic-v1",
            "--bootstrap",
            &relay,
            "--advert-interval",
            "1",
            "--advert-ttl",
            "10",
            "--payout",
            PAYOUT,
            "--metrics",
            "127.0.0.1:9101",
        ],
    );
    let line = lab.wait_for("node", "reachability:", 120);
    let to_reachable = started.elapsed();
    assert!(
        line.contains(&format!("behind NAT, reached through relay {relay}")),
        "{line}"
    );
    // 2. A job from the coordinator reaches the node over the node's own connection and
    // settles with a verified receipt.
    let body = r#"{"model":"smollm2-135m-instruct","max_tokens":16,"temperature":0,"messages":[{"role":"user","content":"Name the capital of France."}]}"#;
    let base = format!("http://{COORD_IP}:8080/v1");
    let auth = format!("Authorization: Bearer {api_key}");
    let deadline = Instant::now() + Duration::from_secs(60);
    let reply: Value = loop {
        let out = lab.curl(
            "pub",
            &[
                "-H",
                &auth,
                "-H",
                "Content-Type: application/json",
                "-d",
                body,
                &format!("{base}/chat/completions"),
            ],
        );
        let reply: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
        if reply["choices"].is_array() {
            break reply;
        }
        // 503 until the node's advert reaches the coordinator's table.
        assert!(Instant::now() < deadline, "no completion: {reply}");
        std::thread::sleep(Duration::from_millis(250));
    };
    let first_job = started.elapsed();
    let text = reply["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    assert!(text.contains("Paris"), "{reply}");
    assert_eq!(reply["tessera"]["node"], node.as_str(), "{reply}");
    let receipt_id = reply["tessera"]["receipt"].as_str().expect("receipt id");
    let out = lab.curl(
        "pub",
        &["-H", &auth, &format!("{base}/receipts/{receipt_id}")],
    );
    let receipt: Value = serde_json::from_str(&out).expect("receipt json");
    assert_eq!(receipt["signature_valid"], true, "{receipt}");

    // The NAT is real: nothing outside opens a connection to the node's router or LAN.
    assert!(
        !lab.tcp_connects("pub", NODE_WAN, 7400),
        "the router let in an unsolicited connection"
    );
    assert!(
        !lab.tcp_connects("pub", "10.1.0.2", 7400),
        "LAN 1 is routable from outside"
    );
    assert!(
        lab.tcp_connects("lan1", COORD_IP, 8080),
        "LAN 1 reaches the public side"
    );

    // 3. A peer in LAN 2 reaches the node through the relay and completes a job while its
    // router drops what it sends straight to the node's, so the first punch fails; then
    // the router lets it through, hole punching upgrades the connection on a retry, and
    // the next job runs on the direct connection.
    let circuit = format!("{relay}/p2p-circuit/p2p/{node}");
    // Two jobs; before the second, wait up to 40 s for a direct connection.
    let two_jobs = [
        "--node",
        circuit.as_str(),
        "--max-tokens",
        "16",
        "--jobs",
        "2",
        "--wait-direct",
        "40",
        "Name the capital of France.",
    ];
    lab.block_lan2_to_node(true);
    let ask = lab.spawn_ask("ask-upgrade", "lan2", &two_jobs);
    let first = ask.next(&lab, 60);
    lab.block_lan2_to_node(false);
    let unblocked = Instant::now();
    let second = ask.next(&lab, 60);
    let to_direct = unblocked.elapsed();
    let jobs = vec![first, second];
    eprintln!("LAN 2, port-preserving NAT: {jobs:?}");
    let advert: Vec<&str> = jobs[0]["advert_addrs"]
        .as_array()
        .expect("advert addresses")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        advert
            .iter()
            .any(|a| a.starts_with(&format!("{relay}/p2p-circuit"))),
        "the advert carries the relayed address: {advert:?}"
    );
    assert!(
        advert
            .iter()
            .all(|a| !a.contains("/ip4/10.") && !a.contains("/ip4/127.")),
        "no private address in the advert: {advert:?}"
    );
    for job in &jobs {
        assert_eq!(job["receipt_verified"], true, "{job}");
        assert!(
            job["text"].as_str().unwrap_or_default().contains("Paris"),
            "{job}"
        );
    }
    let (kind, remote) = path_of(&jobs[0]);
    assert_eq!(
        kind, "relayed",
        "the first job runs over the relay: {jobs:?}"
    );
    assert!(remote.contains("/p2p-circuit"), "{remote}");
    // The peer never dialed the node's router itself (the advert names only the relay):
    // a direct connection there was punched.
    let (kind, remote) = path_of(&jobs[1]);
    assert!(
        kind == "upgraded" || kind == "direct",
        "the second job runs on the punched connection: {jobs:?}"
    );
    assert!(
        remote.starts_with(&format!("/ip4/{NODE_WAN}/")) && !remote.contains("p2p-circuit"),
        "{remote}"
    );
    let upgraded_jobs = jobs.clone();
    lab.wait_for("node", "direct upgrade: yes", 10);

    // 4. Behind an endpoint-dependent NAT hole punching fails, as it must (three attempts),
    // and jobs still complete over the relay.
    lab.router(2, true);
    let ask = lab.spawn_ask("ask-symmetric", "lan2", &two_jobs);
    let relayed = vec![ask.next(&lab, 60), ask.next(&lab, 60)];
    eprintln!("LAN 2, endpoint-dependent NAT: {relayed:?}");
    for job in &relayed {
        assert_eq!(path_of(job).0, "relayed", "{relayed:?}");
        assert!(path_of(job).1.contains("/p2p-circuit"), "{job}");
        assert_eq!(job["receipt_verified"], true, "{job}");
        assert!(
            job["text"].as_str().unwrap_or_default().contains("Paris"),
            "{job}"
        );
    }
    let failed = lab.wait_for("node", "hole punching failed", 30);
    assert!(failed.contains("staying on the relay"), "{failed}");

    // 5. A job longer than a circuit allows ends before the relay cuts it, with a receipt
    // for what was delivered.
    let long = lab.ask(
        "lan2",
        &[
            "--node",
            circuit.as_str(),
            "--raw",
            "--max-tokens",
            "8000",
            "Count from 1 to 10000: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10,",
        ],
    );
    eprintln!("LAN 2, a job longer than a circuit: {long:?}");
    let cut = &long[0];
    assert_eq!(path_of(cut).0, "relayed", "{cut}");
    assert_eq!(cut["finish_reason"], "interrupted", "{cut}");
    assert_eq!(cut["receipt_verified"], true, "{cut}");
    let tokens = cut["completion_tokens"].as_u64().unwrap_or(0);
    assert!(tokens > 0 && tokens < 8000, "{cut}");
    assert!(
        ms(cut, "total_ms") < (CIRCUIT_SECS * 1000) as f64,
        "ended inside the {CIRCUIT_SECS} s circuit: {cut}"
    );
    lab.wait_for("node", "the relay circuit is near its limit", 5);

    // The figures on /metrics: connections by kind, hole punching by outcome, relayed bytes,
    // reservations held by the node and on the coordinator's relay.
    let node_metrics = lab.curl("lan1", &["http://127.0.0.1:9101/metrics"]);
    let figure = |text: &str, name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    };
    assert!(
        figure(
            &node_metrics,
            "tessera_node_net_connections_opened_total{kind=\"relayed\"}"
        ) >= 3.0,
        "{node_metrics}"
    );
    assert!(
        figure(
            &node_metrics,
            "tessera_node_net_connections_opened_total{kind=\"upgraded\"}"
        ) >= 1.0,
        "{node_metrics}"
    );
    assert!(
        figure(
            &node_metrics,
            "tessera_node_net_dcutr_attempts_total{outcome=\"success\"}"
        ) >= 1.0,
        "{node_metrics}"
    );
    assert!(
        figure(
            &node_metrics,
            "tessera_node_net_dcutr_attempts_total{outcome=\"failure\"}"
        ) >= 1.0,
        "{node_metrics}"
    );
    assert!(
        figure(
            &node_metrics,
            "tessera_node_net_relayed_bytes_total{direction=\"out\"}"
        ) > 100_000.0,
        "{node_metrics}"
    );
    assert_eq!(
        figure(&node_metrics, "tessera_node_net_reservations "),
        1.0,
        "{node_metrics}"
    );
    let coord_metrics = lab.curl("pub", &[&format!("http://{COORD_IP}:8080/metrics")]);
    assert!(
        figure(&coord_metrics, "tessera_net_relay_reservations ") >= 1.0,
        "{coord_metrics}"
    );
    assert!(
        figure(
            &coord_metrics,
            "tessera_net_relay_circuits_total{outcome=\"accepted\"}"
        ) >= 3.0,
        "{coord_metrics}"
    );

    // 7. The coordinator crashes and comes back: the node, which nobody outside can dial,
    // dials it again by itself and is reachable through its relay within seconds.
    let reservations = lab.count("node", "relay reservation accepted");
    lab.kill("coordinator");
    let crashed = Instant::now();
    lab.spawn("coordinator-again", "pub", &coordinator_args);
    let deadline = Instant::now() + Duration::from_secs(30);
    while lab.count("node", "relay reservation accepted") <= reservations {
        assert!(
            Instant::now() < deadline,
            "the node never came back to the relay; its log:\n{}",
            lab.log("node")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let back = crashed.elapsed();
    assert!(lab
        .log("node")
        .contains("dialing a lost bootstrap peer again"));

    eprintln!(
        "figures: reachable {:.1} s after start (model load included), first job {:.1} s after start; \
         LAN 2 job 1 over the relay: {:.0} ms (ttft {:.0} ms), job 2 over the punched connection {:.1} s after the router let it through: {:.0} ms (ttft {:.0} ms); \
         relayed jobs behind a symmetric NAT: {:.0} / {:.0} ms; a circuit of {CIRCUIT_BYTES} bytes ended a job after {tokens} tokens in {:.1} s; \
         back on the relay {:.1} s after the coordinator crashed and restarted",
        to_reachable.as_secs_f64(),
        first_job.as_secs_f64(),
        ms(&upgraded_jobs[0], "total_ms"),
        ms(&upgraded_jobs[0], "ttft_ms"),
        to_direct.as_secs_f64(),
        ms(&upgraded_jobs[1], "total_ms"),
        ms(&upgraded_jobs[1], "ttft_ms"),
        ms(&relayed[0], "total_ms"),
        ms(&relayed[1], "total_ms"),
        ms(cut, "total_ms") / 1e3,
        back.as_secs_f64(),
    );
}
