//! The dashboard end to end: a devnet (SmolLM2 on the real engine, the embedded L1),
//! driven through Debian's Chromium by chromedriver over the W3C WebDriver protocol, and
//! every page's marked figure checked against the JSON it comes from, every proof checked
//! against the contract by the test itself.

mod common;

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tessera_contracts::{Contracts, Deployment, RpcChain};

/// A chromedriver process; killed when dropped.
struct Driver {
    child: Child,
    base: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

impl Driver {
    fn start() -> Self {
        let bin = ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("chromedriver is missing: scripts/test.sh installs Debian's chromium and chromium-driver");
        let port = free_port();
        let child = Command::new(bin)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start chromedriver");
        Self {
            child,
            base: format!("http://127.0.0.1:{port}"),
        }
    }
}

/// One browser session.
struct Browser {
    http: reqwest::Client,
    url: String,
}

impl Browser {
    async fn open(driver: &Driver, javascript: bool) -> Self {
        let http = reqwest::Client::new();
        let mut prefs = json!({});
        if !javascript {
            prefs["profile.managed_default_content_settings.javascript"] = json!(2);
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1600"],
                "prefs": prefs,
            },
            "goog:loggingPrefs": {"browser": "ALL"},
        }}});
        let deadline = Instant::now() + Duration::from_secs(30);
        let v = loop {
            match http
                .post(format!("{}/session", driver.base))
                .json(&caps)
                .send()
                .await
            {
                Ok(r) => break r.json::<Value>().await.expect("session JSON"),
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(200)).await
                }
                Err(e) => panic!("chromedriver did not answer: {e}"),
            }
        };
        let id = v["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {v}"))
            .to_owned();
        Self {
            http,
            url: format!("{}/session/{id}", driver.base),
        }
    }

    /// One WebDriver call, its answer as it is.
    async fn raw(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut r = self.http.request(method, format!("{}{path}", self.url));
        if let Some(b) = body {
            r = r.json(&b);
        }
        r.send()
            .await
            .expect("webdriver")
            .json()
            .await
            .expect("JSON")
    }

    /// One WebDriver call; an error panics with the page it happened on.
    async fn cmd(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let v = self.raw(method, path, body).await;
        if v["value"].get("error").is_some() {
            let page = self
                .raw(
                    reqwest::Method::POST,
                    "/execute/sync",
                    Some(json!({"script": "return [location.href, document.body ? document.body.innerText.slice(0, 2000) : '']", "args": []})),
                )
                .await;
            panic!(
                "webdriver {path}: {}\non page {}",
                v["value"]["message"], page["value"]
            );
        }
        v["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.cmd(reqwest::Method::POST, "/url", Some(json!({"url": url})))
            .await;
    }

    async fn eval(&self, script: &str) -> Value {
        self.cmd(
            reqwest::Method::POST,
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
        .await
    }

    async fn source(&self) -> String {
        self.cmd(reqwest::Method::GET, "/source", None)
            .await
            .as_str()
            .expect("source")
            .to_owned()
    }

    async fn element(&self, css: &str) -> String {
        let v = self
            .cmd(
                reqwest::Method::POST,
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .await;
        v.as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .expect("element id")
            .to_owned()
    }

    async fn type_into(&self, css: &str, text: &str) {
        let e = self.element(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{e}/value"),
            Some(json!({"text": text})),
        )
        .await;
    }

    async fn click(&self, css: &str) {
        let e = self.element(css).await;
        self.cmd(
            reqwest::Method::POST,
            &format!("/element/{e}/click"),
            Some(json!({})),
        )
        .await;
    }

    /// Clicks a form's button and waits until the page it leads to has `css`.
    async fn submit(&self, button: &str, css: &str) {
        self.click(button).await;
        let deadline = Instant::now() + Duration::from_secs(15);
        let probe = format!(
            "return document.readyState === 'complete' && document.querySelector({}) !== null",
            serde_json::to_string(css).expect("css")
        );
        while self.eval(&probe).await != json!(true) {
            assert!(
                Instant::now() < deadline,
                "no {css} after clicking {button}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Submits a Verify form and reads the verdict on the page it leads to.
    async fn verdict_after(&self, button: &str) -> String {
        self.submit(button, "#verdict").await;
        self.eval("return document.getElementById('verdict').textContent")
            .await
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    async fn screenshot(&self, path: &Path) {
        let v = self.cmd(reqwest::Method::GET, "/screenshot", None).await;
        let png = base64_decode(v.as_str().expect("base64"));
        std::fs::write(path, png).expect("write screenshot");
    }

    /// Browser console entries of level SEVERE since the last call.
    async fn console_errors(&self) -> Vec<Value> {
        let v = self
            .cmd(
                reqwest::Method::POST,
                "/se/log",
                Some(json!({"type": "browser"})),
            )
            .await;
        v.as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["level"] == json!("SEVERE"))
            .cloned()
            .collect()
    }

    async fn close(&self) {
        let _ = self.http.delete(&self.url).send().await;
    }
}

/// Standard base64 (WebDriver screenshots), decoded without another dependency.
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => 0,
        }
    };
    let bytes: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let n = chunk.iter().take_while(|&&c| c != b'=').count();
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= (if c == b'=' { 0 } else { val(c) }) << (18 - 6 * i);
        }
        let three = [(acc >> 16) as u8, (acc >> 8) as u8, acc as u8];
        out.extend_from_slice(&three[..n.saturating_sub(1)]);
    }
    out
}

fn amount(v: &Value) -> u128 {
    v.as_str()
        .unwrap_or_else(|| panic!("expected an integer string, got {v}"))
        .parse()
        .expect("integer string")
}

const STATUSES: [&str; 5] = ["pending", "posted", "final", "withdrawn", "estimate"];

/// Every money object in a document has a status from the vocabulary and an integer
/// amount; returns how many there are.
fn check_money(v: &Value, path: &str) -> usize {
    match v {
        Value::Object(o) if o.contains_key("amount") && o.contains_key("status") => {
            let st = o["status"].as_str().unwrap_or_default();
            assert!(STATUSES.contains(&st), "{path}: status {st:?}");
            amount(&o["amount"]);
            1
        }
        Value::Object(o) => o
            .iter()
            .map(|(k, x)| check_money(x, &format!("{path}/{k}")))
            .sum(),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, x)| check_money(x, &format!("{path}/{i}")))
            .sum(),
        _ => 0,
    }
}

/// A document without the figures that move by the second.
fn stable(v: &Value) -> Value {
    match v {
        Value::Object(o) => Value::Object(
            o.iter()
                .filter(|(k, _)| k.as_str() != "uptime_s")
                .map(|(k, x)| (k.clone(), stable(x)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(stable).collect()),
        other => other.clone(),
    }
}

fn text_of(v: &Value) -> String {
    match v {
        Value::Null => "none".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

struct Net {
    net: common::Devnet,
    base: String,
    http: reqwest::Client,
    shots: PathBuf,
    home: PathBuf,
}

impl Net {
    async fn get(&self, path: &str) -> Value {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.net.key)
            .send()
            .await
            .expect("GET");
        assert!(r.status().is_success(), "GET {path}: {}", r.status());
        r.json().await.expect("JSON")
    }

    /// `POST /api/v1/verify` of a receipt with its inclusion, at `index`.
    async fn verify_receipt(&self, receipt: &Value, inc: &Value, index: Value) -> Value {
        let body = json!({"kind": "receipt", "receipt": receipt, "receipts_root": inc["receipts_root"], "index": index, "path": inc["path"]});
        self.http
            .post(format!("{}/api/v1/verify", self.base))
            .json(&body)
            .send()
            .await
            .expect("verify")
            .json()
            .await
            .expect("JSON")
    }

    async fn wait_for(&self, what: &str, path: &str, check: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let v = self.get(path).await;
            if check(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {v}"
            );
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }

    async fn chat(&self, q: &str) -> Value {
        let r = self
            .http
            .post(format!("{}/v1/chat/completions", self.base))
            .bearer_auth(&self.net.key)
            .json(&json!({"model": common::MODEL, "messages": [{"role": "user", "content": q}], "max_tokens": 12, "temperature": 0}))
            .send()
            .await
            .expect("chat");
        assert!(r.status().is_success(), "chat: {}", r.status());
        r.json().await.expect("JSON")
    }

    fn cli(&self, args: &[&str]) -> Value {
        let out = Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(args)
            .args(["--coordinator", &self.base, "--json"])
            .env("TESSERA_HOME", &self.home)
            .env("TESSERA_API_KEY", &self.net.key)
            .output()
            .expect("run tessera");
        assert!(
            out.status.success(),
            "tessera {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("JSON out")
    }

    /// Loads a page and checks what every page must hold: one origin, the CSP, no console
    /// error, under 200 KB, every marked figure equal to its JSON value, every money
    /// figure with a status, every chart with a mark per point. Saves a screenshot.
    async fn check_page(&self, b: &Browser, path: &str, shot: &str) {
        // The page's document; read before and after loading the page, and compared
        // only when nothing moved in between (an epoch tick or a batch can land at any
        // time on a devnet), so every figure must then equal it exactly.
        let api = match path {
            "/" => "/api/v1/overview".to_owned(),
            p => format!("/api/v1{p}"),
        };
        let mut attempt = 0;
        let (doc, figs) = loop {
            attempt += 1;
            assert!(attempt <= 8, "{path}: its document never held still");
            let before = self.get(&api).await;
            b.goto(&format!("{}{path}", self.base)).await;
            let figs = b
                .eval("return Array.from(document.querySelectorAll('[data-ptr]')).filter(e => e.dataset.src).map(e => [e.dataset.src, e.dataset.ptr, e.textContent])")
                .await;
            let after = self.get(&api).await;
            if stable(&before) == stable(&after) {
                break (after, figs.as_array().expect("figs").clone());
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        };
        // Same origin only, and the transfer.
        let res = b
            .eval("return performance.getEntriesByType('navigation').concat(performance.getEntriesByType('resource')).map(e => [e.name, e.transferSize || e.encodedBodySize || 0])")
            .await;
        let mut total = 0u64;
        for e in res.as_array().expect("entries") {
            let name = e[0].as_str().unwrap_or_default();
            assert!(
                name.starts_with(&self.base),
                "{path} loads {name} from another origin"
            );
            total += e[1].as_u64().unwrap_or(0);
        }
        assert!(
            total > 0 && total < 200_000,
            "{path}: {total} bytes transferred"
        );
        eprintln!("{path}: {total} bytes transferred, {} figures", figs.len());
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("GET page");
        assert_eq!(
            resp.headers()
                .get("content-security-policy")
                .and_then(|h| h.to_str().ok()),
            Some("default-src 'self'"),
            "{path}: CSP"
        );
        let errors = b.console_errors().await;
        assert!(errors.is_empty(), "{path}: console errors {errors:?}");
        // Each marked figure equals its JSON value.
        assert!(!figs.is_empty(), "{path} marks no figure");
        let mut mismatched = Vec::new();
        for f in &figs {
            let src = f[0].as_str().expect("src");
            let ptr = f[1].as_str().expect("ptr");
            let shown = f[2].as_str().expect("text").trim().to_owned();
            assert_eq!(src, api, "{path}: a figure from another document");
            let Some(v) = doc.pointer(ptr) else {
                panic!("{path}: {ptr} is not in {src}");
            };
            if v.is_object() || v.is_array() || ptr.ends_with("/uptime_s") {
                continue; // a chart's box; uptime moves every second
            }
            let want = text_of(v);
            // Strings (every amount) must match exactly; JSON numbers as numbers.
            let equal = want == shown
                || (v.is_number()
                    && matches!((want.parse::<f64>(), shown.parse::<f64>()), (Ok(a), Ok(c)) if a == c));
            if !equal {
                mismatched.push(format!("{ptr}: page {shown:?}, JSON {want:?}"));
            }
        }
        assert!(mismatched.is_empty(), "{path}: {mismatched:?}");
        let docs: BTreeMap<String, Value> = [(api.clone(), doc)].into_iter().collect();
        // Money figures have a status; every money object in the JSON has one too.
        let bad = b
            .eval("return Array.from(document.querySelectorAll('.money')).filter(e => !['pending','posted','final','withdrawn','estimate'].includes(e.dataset.status)).length")
            .await;
        assert_eq!(bad, json!(0), "{path}: money without a status");
        for d in docs.values() {
            check_money(d, path);
        }
        // Charts: as many marks as points, the same as the JSON series.
        let charts = b
            .eval("return Array.from(document.querySelectorAll('figure.chartbox')).map(f => [f.dataset.src, f.dataset.ptr, f.querySelectorAll('.mark').length, Number(f.querySelector('svg').dataset.points)])")
            .await;
        for c in charts.as_array().expect("charts") {
            let doc = &docs[c[0].as_str().expect("src")];
            let points = doc
                .pointer(&format!("{}/points", c[1].as_str().expect("ptr")))
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            assert_eq!(c[2].as_u64(), Some(points as u64), "{path}: chart marks");
            assert_eq!(c[3].as_u64(), Some(points as u64), "{path}: chart points");
        }
        b.screenshot(&self.shots.join(format!("{shot}.png"))).await;
    }
}

async fn root_on_contract(base: &str, batch: u64) -> [u8; 32] {
    let http = reqwest::Client::new();
    let d: Deployment = http
        .get(format!("{base}/v1/l2/deployment"))
        .send()
        .await
        .expect("deployment")
        .json()
        .await
        .expect("JSON");
    let chain = RpcChain::connect(&format!("{base}/l1"), false)
        .await
        .expect("L1");
    Contracts::new(&chain, &d)
        .batch(batch)
        .await
        .expect("batch")
        .root
        .0
}

fn unhex32(v: &Value) -> [u8; 32] {
    let mut out = [0u8; 32];
    hex::decode_to_slice(v.as_str().expect("hex").trim_start_matches("0x"), &mut out)
        .expect("32 bytes");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_only_provable_figures_in_a_real_browser() {
    let dir = tempfile::tempdir().expect("dir");
    let net = common::Devnet::start_with(
        dir.path(),
        &[
            "--nodes",
            "1",
            "--batch-interval",
            "1",
            "--challenge-window",
            "6",
            "--epoch-interval",
            "8",
        ],
    );
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard-screenshots");
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    let base = format!("http://{}", net.addr);
    let n = Net {
        base: base.clone(),
        http: reqwest::Client::new(),
        shots: shots.clone(),
        home: dir.path().to_owned(),
        net,
    };
    let driver = Driver::start();
    let b = Browser::open(&driver, true).await;

    // 9. N completions: the usage lists N requests at once.
    const N: usize = 3;
    let mut ids = Vec::new();
    for q in [
        "Name the capital of France.",
        "What is 2 + 2?",
        "Name three colors.",
    ] {
        let r = n.chat(q).await;
        ids.push(r["id"].as_str().expect("id").to_owned());
    }
    let usage = n.get("/api/v1/usage").await;
    assert_eq!(
        usage["request_count"],
        json!(N),
        "listed the moment they end"
    );
    for r in usage["requests"].as_array().expect("rows") {
        let st = r["cost"]["status"].as_str().unwrap_or_default();
        assert!(
            st == "pending" || st == "posted",
            "a request that just ended is not final yet: {r}"
        );
    }
    for id in &ids {
        let hex = id.trim_start_matches("chatcmpl-");
        assert!(
            usage["requests"]
                .as_array()
                .expect("rows")
                .iter()
                .any(|r| r["id"] == json!(hex)),
            "{id} listed"
        );
    }
    // Sign in through the form; the cookie is HttpOnly (no script sees it).
    b.goto(&format!("{base}/login")).await;
    b.type_into("#key", &n.net.key).await;
    b.submit("form.login button", "table.requests").await;
    let at = b.eval("return [location.pathname, document.cookie]").await;
    assert_eq!(
        at,
        json!(["/usage", ""]),
        "signed in, cookie hidden from scripts"
    );
    let rows = b
        .eval("return document.querySelectorAll('tr.request').length")
        .await;
    assert_eq!(rows, json!(N));
    assert!(!b
        .eval("return location.href")
        .await
        .as_str()
        .unwrap_or_default()
        .contains("tsk_"));

    // Wait for everything to be final, then check costs, receipts and the CSV.
    let usage = n
        .wait_for("the requests final", "/api/v1/usage", |u| {
            u["requests"]
                .as_array()
                .is_some_and(|r| r.iter().all(|x| x["cost"]["status"] == json!("final")))
        })
        .await;
    let costs: u128 = usage["requests"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| amount(&r["cost"]["amount"]))
        .sum();
    assert_eq!(
        costs,
        amount(&usage["balance"]["charged"]["amount"]),
        "costs add up to the debit"
    );
    let csv = n
        .http
        .get(format!("{base}/api/v1/usage.csv"))
        .bearer_auth(&n.net.key)
        .send()
        .await
        .expect("csv")
        .text()
        .await
        .expect("text");
    let csv_rows: Vec<(String, String)> = csv
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[0].to_owned(), f[10].to_owned())
        })
        .collect();
    let json_rows: Vec<(String, String)> = usage["requests"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|r| (text_of(&r["id"]), text_of(&r["cost"]["amount"])))
        .collect();
    assert_eq!(csv_rows, json_rows, "the CSV has the same ids and costs");
    for r in usage["requests"].as_array().expect("rows") {
        let rec = n
            .get(&format!("/api/v1/receipts/{}", text_of(&r["id"])))
            .await;
        assert_eq!(rec["signature"]["valid"], json!(true));
        let inc = &rec["inclusion"];
        let v = n
            .verify_receipt(&rec["receipt"], inc, inc["index"].clone())
            .await;
        assert_eq!(
            (v["ok"].clone(), v["status"].clone()),
            (json!(true), json!("final")),
            "{v}"
        );
    }

    // A receipt with a valid signature at the wrong place under its root fails.
    let first = text_of(&usage["requests"][0]["id"]);
    let rec = n.get(&format!("/api/v1/receipts/{first}")).await;
    let inc = &rec["inclusion"];
    let wrong = inc["index"].as_u64().expect("index") ^ 1;
    let v = n.verify_receipt(&rec["receipt"], inc, json!(wrong)).await;
    assert_eq!(
        (v["ok"].clone(), v["status"].clone()),
        (json!(false), json!("failed")),
        "{v}"
    );

    let nodes = n.get("/api/v1/nodes").await;
    let node_id = text_of(&nodes["nodes"][0]["node"]);
    let payout = text_of(&nodes["nodes"][0]["payout"]);
    let dev = n.cli(&["wallet", "address", "--wallet", "devnet"])["address"]
        .as_str()
        .expect("address")
        .to_owned();

    // A token holder (the devnet account) delegates to the node: later settlements
    // share with it.
    // The node bonds half its balance first (delegations go to staked nodes only).
    let bal =
        amount(&n.get(&format!("/api/v1/accounts/{payout}")).await["balance"]["pending"]["amount"]);
    n.cli(&["stake", &(bal / 2).to_string(), "--wallet", "node-1"]);
    n.cli(&["delegate", &payout, "1000000", "--wallet", "devnet"]);
    n.wait_for(
        "the delegation applied",
        &format!("/api/v1/accounts/{dev}"),
        |a| {
            a["positions"]["delegations"]
                .as_array()
                .is_some_and(|d| d.len() == 1)
        },
    )
    .await;

    // 8. A commission change: pending until its epoch, and earlier epochs keep the old rate.
    // Announce it just after an epoch turned, so the page can be read while it is pending.
    let e0 = n.get(&format!("/api/v1/accounts/{payout}")).await["epoch"]
        .as_u64()
        .expect("epoch");
    n.wait_for(
        "an epoch to turn",
        &format!("/api/v1/accounts/{payout}"),
        |a| a["epoch"].as_u64().is_some_and(|e| e > e0),
    )
    .await;
    n.cli(&["commission", "1500", "--wallet", "node-1"]);
    let acc = n
        .wait_for(
            "the commission change posted",
            &format!("/api/v1/accounts/{payout}"),
            |a| a["node"]["commission"]["pending_change"]["bps"] == json!(1500),
        )
        .await;
    let from_epoch = acc["node"]["commission"]["pending_change"]["from_epoch"]
        .as_u64()
        .expect("epoch");
    b.goto(&format!("{base}/nodes/{node_id}")).await;
    let shown = b.eval("return document.querySelector('.pending-change') ? document.querySelector('.pending-change').textContent : ''").await;
    assert!(
        shown.as_str().unwrap_or_default().contains("1500")
            && shown.as_str().unwrap_or_default().contains("pending"),
        "the node page shows the announced rate as pending: {shown:?}"
    );
    n.wait_for(
        "the new epoch",
        &format!("/api/v1/accounts/{payout}"),
        |a| a["epoch"].as_u64().is_some_and(|e| e >= from_epoch),
    )
    .await;
    n.chat("Which planet is known as the Red Planet?").await;
    let acc = n
        .wait_for(
            "a settlement at the new rate final",
            &format!("/api/v1/accounts/{payout}"),
            |a| {
                a["node"]["earnings_by_epoch"].as_array().is_some_and(|e| {
                    e.iter().any(|x| {
                        x["status"] == json!("final") && x["commission_bps"] == json!([1500])
                    })
                })
            },
        )
        .await;
    for e in acc["node"]["earnings_by_epoch"].as_array().expect("epochs") {
        let want = if e["epoch"].as_u64().expect("epoch") < from_epoch {
            0
        } else {
            1500
        };
        assert_eq!(e["commission_bps"], json!([want]), "epoch {e}");
    }
    // 4. Statement rows add up, each recomputed from its inputs; each settlement's split
    // recomputed with integer arithmetic at the rate of its epoch.
    let acc = n
        .wait_for(
            "every settlement final",
            &format!("/api/v1/accounts/{payout}"),
            |a| {
                a["node"]["settlements"]
                    .as_array()
                    .is_some_and(|s| s.iter().all(|x| x["status"] == json!("final")))
                    && a["earnings"]["in_challenge_window"]["amount"] == json!("0")
                    && a["earnings"]["pending"]["amount"] == json!("0")
            },
        )
        .await;
    let rows = acc["statement"]["rows"].as_array().expect("rows");
    let mut sum = 0u128;
    let mut prev = 0u128;
    for r in rows {
        let (start, end) = (amount(&r["start"]), amount(&r["end"]));
        assert_eq!(start, prev, "rows chain");
        assert_eq!(
            end,
            amount(&r["inputs"]["earned"]) + amount(&r["inputs"]["accrued_unclaimed"])
        );
        assert_eq!(amount(&r["earned"]["amount"]), end - start);
        sum += end - start;
        prev = end;
    }
    assert_eq!(
        sum,
        amount(&acc["statement"]["total"]["amount"]),
        "rows add up to the lifetime total"
    );
    let mut own = 0u128;
    for s in acc["node"]["settlements"].as_array().expect("settlements") {
        let a = amount(&s["amount"]);
        let fee = a * u128::from(s["fee_bps"].as_u64().expect("bps") as u16) / 10_000;
        let to_node = a - fee;
        let commission =
            to_node * u128::from(s["commission_bps"].as_u64().expect("bps") as u16) / 10_000;
        let rest = to_node - commission;
        let (stake, delegated) = (amount(&s["stake"]), amount(&s["delegated"]));
        let delegators = if delegated == 0 {
            0
        } else {
            rest * delegated / (stake + delegated)
        };
        assert_eq!(amount(&s["fee"]), fee);
        assert_eq!(amount(&s["commission"]), commission);
        assert_eq!(amount(&s["delegators"]), delegators);
        assert_eq!(amount(&s["self_share"]), rest - delegators);
        let epoch = s["epoch"].as_u64().expect("epoch");
        assert_eq!(
            s["commission_bps"],
            json!(if epoch < from_epoch { 0 } else { 1500 })
        );
        own += commission + rest - delegators;
    }
    assert_eq!(
        own,
        amount(&acc["statement"]["total"]["amount"]),
        "the node earned its commission and stake share"
    );
    // The delegators' share reached the delegation, provably.
    let shared: u128 = acc["node"]["settlements"]
        .as_array()
        .expect("settlements")
        .iter()
        .map(|x| amount(&x["delegators"]))
        .sum();
    assert!(
        shared > 0,
        "a settlement after the delegation shared with it"
    );
    let holder = n
        .wait_for(
            "the holder's rewards final",
            &format!("/api/v1/accounts/{dev}"),
            |a| {
                a["positions"]["delegations"][0]["unclaimed_final"]["amount"]
                    .as_str()
                    .is_some_and(|v| v != "0")
            },
        )
        .await;
    let unclaimed = amount(&holder["positions"]["delegations"][0]["unclaimed_final"]["amount"]);
    assert!(
        unclaimed <= shared,
        "a holder gets at most the delegators' share"
    );
    assert_eq!(
        amount(&holder["statement"]["total"]["amount"]),
        amount(&holder["earnings"]["final"]["amount"]),
        "the holder's statement adds up to its final earnings"
    );
    assert!(acc["node"]["delegator_apr"]["inputs"]["delegators_share"].is_string());

    // 5. Verify on the account page: success, and the test checks the root itself.
    b.goto(&format!("{base}/accounts/{payout}")).await;
    let verdict = b.verdict_after("#verify-account button").await;
    assert!(
        verdict.contains("Verified") && verdict.contains("final"),
        "{verdict}"
    );
    b.screenshot(&shots.join("verify.png")).await;
    let proof = n.get(&format!("/api/v1/accounts/{payout}/proof")).await["proof"].clone();
    let on_l1 = root_on_contract(&base, proof["batch"].as_u64().expect("batch")).await;
    let leaf = hex::decode(text_of(&proof["leaf"]).trim_start_matches("0x")).expect("leaf");
    let mp = tessera_rollup::MerkleProof {
        bitmap: proof["bitmap"].as_u64().expect("bitmap") as u32,
        siblings: proof["siblings"]
            .as_array()
            .expect("siblings")
            .iter()
            .map(unhex32)
            .collect(),
    };
    assert!(mp.verify(
        &on_l1,
        proof["slot"].as_u64().expect("slot") as u32,
        &tessera_rollup::keccak256(&leaf)
    ));
    assert_eq!(on_l1, unhex32(&proof["root"]));

    // 6. A tampered proof, and a receipt with a bad signature, fail and are not final.
    b.goto(&format!("{base}/accounts/{payout}")).await;
    b.eval("const l = document.querySelector('#verify-account input[name=leaf]'); l.value = l.value.slice(0, -1) + (l.value.endsWith('0') ? '1' : '0'); return 0").await;
    let verdict = b.verdict_after("#verify-account button").await;
    assert!(
        verdict.contains("FAILED") && verdict.contains("failed"),
        "{verdict}"
    );
    b.goto(&format!(
        "{base}/receipts/{}",
        ids[0].trim_start_matches("chatcmpl-")
    ))
    .await;
    b.eval("const t = document.getElementById('receipt-json'); const r = JSON.parse(t.value); r.body.usage.completion_tokens += 1; t.value = JSON.stringify(r); return 0").await;
    let verdict = b.verdict_after("#verify-receipt button").await;
    assert!(
        verdict.contains("FAILED") && !verdict.contains("final"),
        "{verdict}"
    );
    let bad_sig = b.eval("return Array.from(document.querySelectorAll('.checklist li.bad b')).map(e => e.textContent)").await;
    assert!(
        bad_sig
            .as_array()
            .expect("list")
            .contains(&json!("signature")),
        "{bad_sig}"
    );

    // 7. Withdraw: in the challenge window once posted, claimable by exactly that amount
    // once final, withdrawn after the L1 payout.
    let before = n.get(&format!("/api/v1/accounts/{payout}")).await;
    let claimable0 = amount(&before["withdrawals"]["claimable"]["amount"]);
    let withdrawn0 = amount(&before["withdrawals"]["withdrawn"]["amount"]);
    let x = amount(&before["balance"]["pending"]["amount"]) / 2;
    assert!(x > 0, "the node has earnings to withdraw: {before}");
    n.cli(&["wallet", "withdraw", &x.to_string(), "--wallet", "node-1"]);
    let pending = n.get(&format!("/api/v1/accounts/{payout}")).await;
    assert_eq!(
        amount(&pending["withdrawals"]["pending"]["amount"]),
        x,
        "pending before its batch"
    );
    let posted = n
        .wait_for(
            "the withdrawal in the challenge window",
            &format!("/api/v1/accounts/{payout}"),
            |a| amount(&a["withdrawals"]["in_challenge_window"]["amount"]) == x,
        )
        .await;
    assert_eq!(
        posted["withdrawals"]["in_challenge_window"]["status"],
        json!("posted")
    );
    assert_eq!(
        amount(&posted["withdrawals"]["claimable"]["amount"]),
        claimable0,
        "not claimable while the window is open"
    );
    assert!(posted["withdrawals"]["in_challenge_window_until"].is_u64());
    let fin = n
        .wait_for(
            "the withdrawal claimable",
            &format!("/api/v1/accounts/{payout}"),
            |a| {
                amount(&a["withdrawals"]["in_challenge_window"]["amount"]) == 0
                    && amount(&a["withdrawals"]["pending"]["amount"]) == 0
            },
        )
        .await;
    assert_eq!(
        amount(&fin["withdrawals"]["claimable"]["amount"]),
        claimable0 + x,
        "claimable by exactly that amount"
    );
    n.cli(&["wallet", "payout", "--wallet", "node-1"]);
    let paid = n
        .wait_for("the payout", &format!("/api/v1/accounts/{payout}"), |a| {
            amount(&a["withdrawals"]["withdrawn"]["amount"]) == withdrawn0 + claimable0 + x
        })
        .await;
    assert_eq!(amount(&paid["withdrawals"]["claimable"]["amount"]), 0);
    assert_eq!(
        paid["withdrawals"]["withdrawn"]["status"],
        json!("withdrawn")
    );

    // 1–3, 10. Every page: origin, CSP, console, figures, statuses, charts, size.
    let receipt = ids[0].trim_start_matches("chatcmpl-").to_owned();
    for (path, shot) in [
        ("/".to_owned(), "overview"),
        ("/nodes".to_owned(), "nodes"),
        (format!("/nodes/{node_id}"), "node"),
        (format!("/accounts/{payout}"), "account-node"),
        (format!("/accounts/{dev}"), "account-developer"),
        ("/usage".to_owned(), "usage"),
        (format!("/receipts/{receipt}"), "receipt"),
        ("/batches".to_owned(), "batches"),
    ] {
        n.check_page(&b, &path, shot).await;
    }
    // 3. Every money object carries a status; totals by status add up without mixing
    // in anything else (the usage's cost by status is its requests' costs).
    for p in [
        "/api/v1/overview".to_owned(),
        format!("/api/v1/accounts/{payout}"),
        format!("/api/v1/accounts/{dev}"),
        "/api/v1/usage".into(),
        "/api/v1/batches".into(),
        format!("/api/v1/nodes/{node_id}"),
    ] {
        let d = n.get(&p).await;
        assert!(check_money(&d, &p) > 0, "{p} has money figures");
    }
    let u = n.get("/api/v1/usage").await;
    let by_status: u128 = ["pending", "posted", "final"]
        .iter()
        .map(|k| amount(&u["cost_by_status"][k]["amount"]))
        .sum();
    assert_eq!(by_status, amount(&u["balance"]["charged"]["amount"]));

    // 10. With JavaScript off: sign in with the form and read the usage page.
    let nojs = Browser::open(&driver, false).await;
    nojs.goto(&format!("{base}/login")).await;
    nojs.type_into("#key", &n.net.key).await;
    nojs.click("form.login button").await;
    let deadline = Instant::now() + Duration::from_secs(15);
    let src = loop {
        let src = nojs.source().await;
        if src.contains("class=\"requests\"") {
            break src;
        }
        assert!(
            Instant::now() < deadline,
            "the usage page did not load without script"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        src.matches("class=\"request\"").count(),
        N + 1,
        "the usage page without script"
    );
    assert!(
        src.contains("class=\"mark\""),
        "charts are drawn without script"
    );
    nojs.close().await;

    // The CLI prints the API's JSON.
    for (args, path) in [
        (vec!["batches"], "/api/v1/batches".to_owned()),
        (
            vec!["account", payout.as_str()],
            format!("/api/v1/accounts/{payout}"),
        ),
        (vec!["usage"], "/api/v1/usage".to_owned()),
        (vec!["status"], "/api/v1/overview".to_owned()),
        (
            vec!["rewards", dev.as_str()],
            format!("/api/v1/accounts/{dev}"),
        ),
    ] {
        let mut same = false;
        for _ in 0..5 {
            let cli = n.cli(&args);
            let api = n.get(&path).await;
            if cli == api {
                same = true;
                break;
            }
        }
        assert!(same, "tessera {args:?} --json differs from {path}");
    }
    // The CLI checks proofs itself, against the contract on the L1.
    let v = n.cli(&["verify", "receipt", &receipt]);
    assert_eq!(
        (
            v["ok"].clone(),
            v["status"].clone(),
            v["verified_by"].clone()
        ),
        (json!(true), json!("final"), json!("client")),
        "{v}"
    );
    let v = n.cli(&["verify", "account", &payout]);
    assert_eq!(
        (v["ok"].clone(), v["status"].clone()),
        (json!(true), json!("final")),
        "{v}"
    );
    let v = n.cli(&["verify", "statement", &payout]);
    assert_eq!(v["ok"], json!(true), "{v}");
    assert!(
        v["rows"]
            .as_array()
            .is_some_and(|r| !r.is_empty() && r.iter().all(|x| x["status"] == json!("final"))),
        "{v}"
    );

    b.close().await;
    let _: SocketAddr = n.net.addr;
    n.net.stop();
}
