//! The dashboard from the command line: `tessera status`, `nodes`, `account`, `usage`,
//! `batches` and `verify` print the coordinator's `/api/v1` documents (with `--json`,
//! exactly as the API serves them; without, a short summary).

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

/// Where the coordinator is, and how to print.
#[derive(Args, Debug, Clone)]
pub struct Api {
    /// The coordinator's base URL.
    #[arg(
        long,
        global = true,
        env = "TESSERA_COORDINATOR",
        default_value = "http://127.0.0.1:8080"
    )]
    coordinator: String,
    /// An API key (usage and receipts are the key's account's own).
    #[arg(long, global = true, env = "TESSERA_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Print the API's JSON as it is.
    #[arg(long, global = true)]
    json: bool,
}

/// `tessera verify …`.
#[derive(Subcommand, Debug)]
pub enum VerifyCommand {
    /// A receipt: its signature, its inclusion path, and the batch on L1 that settles it.
    Receipt {
        /// The receipt (response) id.
        id: String,
    },
    /// An account's leaf at the last final batch, against the contract's root.
    Account {
        /// The L1 address.
        address: String,
    },
    /// Every row of an account's statement, each against its batch's root.
    Statement {
        /// The L1 address.
        address: String,
    },
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

impl Api {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.coordinator.trim_end_matches('/'))
    }

    async fn answer(&self, r: reqwest::RequestBuilder, url: &str) -> Result<Value> {
        let r = match &self.api_key {
            Some(k) => r.bearer_auth(k),
            None => r,
        };
        let resp = r
            .send()
            .await
            .with_context(|| format!("cannot reach {url}"))?;
        let status = resp.status();
        let v: Value = resp
            .json()
            .await
            .with_context(|| format!("{url} did not answer JSON"))?;
        if !status.is_success() {
            let msg = v["error"]["message"].as_str().unwrap_or("no message");
            bail!("{url}: {status}: {msg}");
        }
        Ok(v)
    }

    async fn get(&self, path: &str) -> Result<Value> {
        let url = self.url(path);
        self.answer(reqwest::Client::new().get(&url), &url).await
    }

    async fn post(&self, path: &str, body: &Value) -> Result<Value> {
        let url = self.url(path);
        self.answer(reqwest::Client::new().post(&url).json(body), &url)
            .await
    }
}

fn show(api: &Api, v: &Value, summary: impl FnOnce(&Value) -> String) {
    if api.json {
        println!("{v}");
    } else {
        println!("{}", summary(v));
    }
}

fn amount(v: &Value) -> String {
    format!(
        "{} ({})",
        v["amount"].as_str().unwrap_or("?"),
        v["status"].as_str().unwrap_or("?")
    )
}

/// `tessera status`: the overview.
pub fn status(api: Api) -> Result<()> {
    runtime()?.block_on(async {
        let v = api.get("/api/v1/overview").await?;
        show(&api, &v, |v| {
            format!(
                "{} nodes online; settled {} + {} + {}; batches {} standing, {} final; audits {} passed, {} failed",
                v["nodes_online"],
                amount(&v["settled"]["pending"]),
                amount(&v["settled"]["posted"]),
                amount(&v["settled"]["final"]),
                v["batches"]["standing"],
                v["batches"]["final"],
                v["audits"]["passed"],
                v["audits"]["failed"],
            )
        });
        Ok(())
    })
}

/// `tessera nodes [ID]`.
pub fn nodes(api: Api, id: Option<String>) -> Result<()> {
    runtime()?.block_on(async {
        let path = match &id {
            Some(id) => format!("/api/v1/nodes/{id}"),
            None => "/api/v1/nodes".into(),
        };
        let v = api.get(&path).await?;
        show(&api, &v, |v| {
            let rows: Vec<Value> = match v["nodes"].as_array() {
                Some(n) => n.clone(),
                None => vec![v["node"].clone()],
            };
            rows.iter()
                .map(|n| {
                    format!(
                        "{}  {} tok/s  ttft {} ms  audits {}/{}",
                        n["node"].as_str().unwrap_or("?"),
                        n["tokens_per_s"],
                        n["ttft_ms"],
                        n["audits"]["passed"],
                        n["audits"]["failed"]
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        });
        Ok(())
    })
}

/// `tessera account ADDRESS`.
pub fn account(api: Api, address: String) -> Result<()> {
    runtime()?.block_on(async {
        let v = api.get(&format!("/api/v1/accounts/{address}")).await?;
        show(&api, &v, |v| {
            format!(
                "claimable {}; in challenge window {}; withdrawn {}; lifetime earned {}",
                amount(&v["withdrawals"]["claimable"]),
                amount(&v["withdrawals"]["in_challenge_window"]),
                amount(&v["withdrawals"]["withdrawn"]),
                amount(&v["statement"]["total"]),
            )
        });
        Ok(())
    })
}

/// `tessera usage`.
pub fn usage(api: Api) -> Result<()> {
    runtime()?.block_on(async {
        if api.api_key.is_none() {
            bail!("usage needs an API key: --api-key or TESSERA_API_KEY");
        }
        let v = api.get("/api/v1/usage").await?;
        show(&api, &v, |v| {
            let mut out = format!(
                "{} requests; charged {}",
                v["request_count"],
                amount(&v["balance"]["charged"])
            );
            for r in v["requests"].as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "\n{}  {}  {}+{} tokens  {}",
                    r["id"].as_str().unwrap_or("?"),
                    r["model"].as_str().unwrap_or("?"),
                    r["prompt_tokens"],
                    r["completion_tokens"],
                    amount(&r["cost"])
                ));
            }
            out
        });
        Ok(())
    })
}

/// `tessera batches`.
pub fn batches(api: Api) -> Result<()> {
    runtime()?.block_on(async {
        let v = api.get("/api/v1/batches").await?;
        show(&api, &v, |v| {
            v["batches"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|b| {
                    format!(
                        "#{} {} epoch {} root {} settled {}",
                        b["index"],
                        b["status"].as_str().unwrap_or("?"),
                        b["epoch"],
                        b["root"].as_str().unwrap_or("?"),
                        amount(&b["settled"])
                    )
                })
                .collect::<Vec<_>>()
                .join("\n")
        });
        Ok(())
    })
}

fn account_request(proof: &Value) -> Value {
    json!({
        "kind": "account",
        "batch": proof["batch"],
        "slot": proof["slot"],
        "leaf": proof["leaf"],
        "bitmap": proof["bitmap"],
        "siblings": proof["siblings"],
    })
}

/// `tessera verify receipt|account|statement`: asks the coordinator to check the proof
/// against the root it reads from the contract, and prints its verdict.
pub fn verify(api: Api, command: VerifyCommand) -> Result<()> {
    runtime()?.block_on(async {
        let verdicts: Vec<Value> = match &command {
            VerifyCommand::Receipt { id } => {
                let r = api.get(&format!("/api/v1/receipts/{id}")).await?;
                let inc = &r["inclusion"];
                let req = json!({
                    "kind": "receipt",
                    "receipt": r["receipt"],
                    "receipts_root": inc["receipts_root"],
                    "index": inc["index"],
                    "path": inc["path"],
                });
                vec![api.post("/api/v1/verify", &req).await?]
            }
            VerifyCommand::Account { address } => {
                let p = api
                    .get(&format!("/api/v1/accounts/{address}/proof"))
                    .await?;
                vec![
                    api.post("/api/v1/verify", &account_request(&p["proof"]))
                        .await?,
                ]
            }
            VerifyCommand::Statement { address } => {
                let a = api.get(&format!("/api/v1/accounts/{address}")).await?;
                let mut out = Vec::new();
                for row in a["statement"]["rows"].as_array().into_iter().flatten() {
                    let p = api
                        .get(&format!(
                            "/api/v1/accounts/{address}/proof?batch={}",
                            row["batch"]
                        ))
                        .await?;
                    out.push(
                        api.post("/api/v1/verify", &account_request(&p["proof"]))
                            .await?,
                    );
                }
                out
            }
        };
        // Nothing to check is not a success.
        let all_ok = !verdicts.is_empty() && verdicts.iter().all(|v| v["ok"] == json!(true));
        let v = if let VerifyCommand::Statement { .. } = command {
            json!({"object": "tessera.dashboard.verifications", "ok": all_ok, "rows": verdicts})
        } else {
            verdicts.into_iter().next().unwrap_or(Value::Null)
        };
        show(&api, &v, |v| {
            format!(
                "{}: status {}",
                if all_ok { "verified" } else { "FAILED" },
                v["status"]
                    .as_str()
                    .unwrap_or(if all_ok { "final" } else { "failed" })
            )
        });
        if !all_ok {
            bail!("verification failed");
        }
        Ok(())
    })
}
