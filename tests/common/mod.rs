//! Shared by the end-to-end tests: a `tessera devnet` process driven from its printed
//! lines. Each test binary uses part of it.
#![allow(dead_code)]

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const MODEL: &str = "smollm2-135m-instruct";

pub fn smollm2() -> PathBuf {
    tessera_models::test_support::model_path(MODEL)
}

/// A `tessera devnet` process; killed when dropped.
pub struct Devnet {
    pub child: Child,
    pub dir: PathBuf,
    pub addr: SocketAddr,
    pub key: String,
    pub curl: String,
    pub interrupted: bool,
}

impl Devnet {
    /// Starts a devnet keeping its state in `dir`, and waits until it says it is ready.
    pub fn start(dir: &Path) -> Self {
        Self::start_with(dir, &[])
    }

    /// As `start`, with more `tessera devnet` flags.
    pub fn start_with(dir: &Path, extra: &[&str]) -> Self {
        Self::start_with_env(dir, extra, &[])
    }

    /// As `start_with`, with environment variables for the devnet process.
    pub fn start_with_env(dir: &Path, extra: &[&str], env: &[(&str, &str)]) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("devnet.log"))
            .expect("log file");
        let mut child = Command::new(env!("CARGO_BIN_EXE_tessera"))
            .args(["devnet", "--http", "127.0.0.1:0", "--model"])
            .arg(smollm2())
            .arg("--data-dir")
            .arg(dir)
            .args(extra)
            .env("TESSERA_HOME", dir.join("home"))
            .env("RUST_LOG", "info,libp2p=warn")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("start tessera devnet");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::sync_channel::<String>(64);
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let (mut base, mut key, mut curl) = (None, None, None);
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx.recv_timeout(left).unwrap_or_else(|_| {
                panic!(
                    "devnet not ready; its log:\n{}",
                    std::fs::read_to_string(dir.join("devnet.log")).unwrap_or_default()
                )
            });
            if let Some(b) = line.strip_prefix("base URL: ") {
                base = Some(b.trim().to_owned());
            } else if let Some(k) = line.strip_prefix("API key:  ") {
                key = k.split_whitespace().next().map(str::to_owned);
            } else if line.starts_with("curl ") {
                curl = Some(line.clone());
            } else if line.starts_with("Ctrl-C stops") {
                break;
            }
        }
        let base = base.expect("base URL printed");
        let addr = base
            .trim_start_matches("http://")
            .trim_end_matches("/v1")
            .parse()
            .expect("base URL holds an address");
        Self {
            child,
            dir: dir.to_owned(),
            addr,
            key: key.expect("key printed"),
            curl: curl.expect("curl line printed"),
            interrupted: false,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("devnet.log")).unwrap_or_default()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill {sig} failed");
    }

    /// Ctrl-C, once (a second one means "quit now").
    pub fn interrupt(&mut self) {
        if !self.interrupted {
            self.interrupted = true;
            self.signal("-INT");
        }
    }

    /// Ctrl-C (unless already sent), then waits for a clean exit.
    pub fn stop(mut self) {
        self.interrupt();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(
                    status.success(),
                    "devnet exited with {status}; log:\n{}",
                    self.log()
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "devnet did not stop; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: no chance to clean up.
    pub fn kill(mut self) {
        self.signal("-KILL");
        let _ = self.child.wait();
    }
}

impl Drop for Devnet {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
