//! The dashboard from the command line: `tessera status`, `nodes`, `account`, `usage`
//! and `batches` print the coordinator's `/api/v1` documents (with `--json`, exactly as
//! the API serves them; without, a short summary); `verify` checks proofs here, against
//! the settlement contract read from the L1 itself.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use tessera_contracts::{Contracts, Deployment, RpcChain, L1};
use tessera_protocol::{Receipt, Signed};
use tessera_rollup::{keccak256, MerkleProof};

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
    /// `verify`: the L1's JSON-RPC URL to read roots from [default: COORDINATOR/l1].
    #[arg(long, global = true, env = "TESSERA_L1")]
    l1: Option<String>,
    /// `verify`: the settlement contract you expect; refused if the coordinator names
    /// another.
    #[arg(long, global = true, env = "TESSERA_CONTRACT")]
    contract: Option<String>,
}

/// `tessera verify …`.
#[derive(Subcommand, Debug)]
pub enum VerifyCommand {
    /// A receipt: its signature, its inclusion path, and the batch on L1 that settles it
    /// (needs the payer's --api-key).
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

/// `tessera verify receipt|account|statement`: fetches the proof from the coordinator,
/// then checks it here, against roots read from the settlement contract on the L1
/// itself (`--l1`, default COORDINATOR/l1): nothing is taken on the coordinator's word
/// but the data to check. Prints the verdict in the API's `verification` shape.
pub fn verify(api: Api, command: VerifyCommand) -> Result<()> {
    runtime()?.block_on(async {
        let l1 = L1View::open(&api).await?;
        let verdicts: Vec<Value> = match &command {
            VerifyCommand::Receipt { id } => {
                let r = api.get(&format!("/api/v1/receipts/{id}")).await?;
                vec![l1.receipt(&r).await?]
            }
            VerifyCommand::Account { address } => {
                let p = api.get(&format!("/api/v1/accounts/{address}/proof")).await?;
                vec![l1.account(&p["proof"]).await?]
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
                    out.push(l1.account(&p["proof"]).await?);
                }
                out
            }
        };
        // Nothing to check is not a success.
        let all_ok = !verdicts.is_empty() && verdicts.iter().all(|v| v["ok"] == json!(true));
        let v = if let VerifyCommand::Statement { .. } = command {
            json!({"object": "tessera.dashboard.verifications", "ok": all_ok, "contract": l1.d.settlement.to_string(), "rows": verdicts})
        } else {
            verdicts.into_iter().next().unwrap_or(Value::Null)
        };
        show(&api, &v, |v| {
            let mut out = format!(
                "{}: status {} (checked here against contract {} on chain {})",
                if all_ok { "verified" } else { "FAILED" },
                v["status"].as_str().unwrap_or(if all_ok { "final" } else { "failed" }),
                l1.d.settlement,
                l1.d.chain_id,
            );
            for c in v["checks"].as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "\n  {} {}: {}",
                    if c["ok"] == json!(true) { "ok  " } else { "FAIL" },
                    c["check"].as_str().unwrap_or("?"),
                    c["detail"].as_str().unwrap_or("")
                ));
            }
            out
        });
        if !all_ok {
            bail!("verification failed");
        }
        Ok(())
    })
}

/// The settlement contract, read over the L1's JSON-RPC.
struct L1View {
    chain: RpcChain,
    d: Deployment,
}

fn check(name: &str, ok: bool, detail: impl Into<String>) -> Value {
    json!({"check": name, "ok": ok, "detail": detail.into()})
}

fn h256(v: &Value) -> Result<[u8; 32]> {
    let s = v.as_str().context("expected 0x hex")?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(s.trim_start_matches("0x"), &mut out)
        .with_context(|| format!("{s:?} is not 32 bytes of hex"))?;
    Ok(out)
}

impl L1View {
    async fn open(api: &Api) -> Result<Self> {
        let d: Deployment = serde_json::from_value(api.get("/v1/l2/deployment").await?)
            .context("the coordinator's deployment")?;
        if let Some(pinned) = &api.contract {
            if pinned.parse::<alloy::primitives::Address>().ok() != Some(d.settlement) {
                bail!(
                    "the coordinator names contract {}, not the pinned {pinned}",
                    d.settlement
                );
            }
        }
        let url = api.l1.clone().unwrap_or_else(|| api.url("/l1"));
        let chain = RpcChain::connect(&url, false)
            .await
            .with_context(|| format!("cannot reach the L1 at {url}"))?;
        if chain.chain_id() != d.chain_id
            || tessera_contracts::domain(d.chain_id, d.settlement) != d.domain
        {
            bail!(
                "the coordinator's deployment (chain {}) does not match the L1 at {url} (chain {})",
                d.chain_id,
                chain.chain_id()
            );
        }
        Ok(Self { chain, d })
    }

    fn contracts(&self) -> Contracts<'_, RpcChain> {
        Contracts::new(&self.chain, &self.d)
    }

    /// The root the contract stores for standing batch `i`, and whether it is final.
    async fn root(&self, i: u64) -> Result<Option<([u8; 32], bool)>> {
        let c = self.contracts();
        if i >= c.batch_count().await? {
            return Ok(None);
        }
        let root = c.batch(i).await?.root.0;
        Ok(Some((root, i < c.finalized().await?)))
    }

    fn verdict(&self, kind: &str, checks: Vec<Value>, final_: Option<bool>) -> Value {
        let ok = !checks.is_empty() && checks.iter().all(|c| c["ok"] == json!(true));
        let status = match (ok, final_) {
            (true, Some(true)) => "final",
            (true, Some(false)) => "posted",
            _ => "failed",
        };
        json!({
            "object": "tessera.dashboard.verification",
            "kind": kind,
            "verified_by": "client",
            "contract": self.d.settlement.to_string(),
            "ok": ok,
            "status": status,
            "checks": checks,
        })
    }

    async fn account(&self, p: &Value) -> Result<Value> {
        let batch = p["batch"].as_u64().context("proof batch")?;
        let slot = u32::try_from(p["slot"].as_u64().context("proof slot")?)?;
        let leaf = hex::decode(p["leaf"].as_str().context("leaf")?.trim_start_matches("0x"))?;
        let proof = MerkleProof {
            bitmap: u32::try_from(p["bitmap"].as_u64().context("bitmap")?)?,
            siblings: p["siblings"]
                .as_array()
                .context("siblings")?
                .iter()
                .map(h256)
                .collect::<Result<_>>()?,
        };
        let mut checks = Vec::new();
        let mut final_ = None;
        match (proof.root(slot, &keccak256(&leaf)), self.root(batch).await?) {
            (Err(e), _) => checks.push(check("proof readable", false, e.to_string())),
            (_, None) => checks.push(check(
                "batch on the contract",
                false,
                format!("the contract holds no standing batch {batch}"),
            )),
            (Ok(computed), Some((root, fin))) => {
                checks.push(check(
                    "root matches the contract",
                    computed == root,
                    format!(
                        "computed 0x{}, the contract stores 0x{} for batch {batch}",
                        hex::encode(computed),
                        hex::encode(root)
                    ),
                ));
                final_ = Some(fin);
            }
        }
        let mut v = self.verdict("account", checks, final_);
        v["batch"] = json!(batch);
        v["slot"] = json!(slot);
        Ok(v)
    }

    async fn receipt(&self, r: &Value) -> Result<Value> {
        let signed: Signed<Receipt> =
            serde_json::from_value(r["receipt"].clone()).context("the receipt")?;
        let mut checks = Vec::new();
        let sig = match signed.verify() {
            Ok(signer) if signer == signed.body.node => Ok(signer),
            Ok(signer) => Err(format!("signed by {signer}, not the node it names")),
            Err(e) => Err(e.to_string()),
        };
        checks.push(check(
            "signature",
            sig.is_ok(),
            sig.map_or_else(|e| e, |s| format!("signed by the node it names, {s}")),
        ));
        let encoded =
            tessera_protocol::wire::encode(&signed, tessera_protocol::job::MAX_EVENT_FRAME)?;
        let leaf = keccak256(&encoded);
        let inc = &r["inclusion"];
        let mut final_ = None;
        if inc.is_null() {
            checks.push(check("inclusion path", false, "not in a batch yet"));
        } else {
            let root = h256(&inc["receipts_root"])?;
            let index = usize::try_from(inc["index"].as_u64().context("index")?)?;
            let path: Vec<[u8; 32]> = inc["path"]
                .as_array()
                .context("path")?
                .iter()
                .map(h256)
                .collect::<Result<_>>()?;
            let fits = path.len() < usize::BITS as usize && index >> path.len() == 0;
            let computed =
                tessera_coordinator::sequencer::receipts_root_from_path(&leaf, index, &path);
            checks.push(check(
                "inclusion path",
                fits && computed == root,
                format!("leaf {index} folds up to 0x{}", hex::encode(computed)),
            ));
            // Which standing batch carries a settlement with this root: read from the
            // batches' calldata on L1, and that batch's root checked against the contract.
            let c = self.contracts();
            let mut found = None;
            for pb in c.posted_batches().await? {
                let batch = c.batch_data(&pb).await?;
                let carries = batch.txs.iter().any(|t| {
                    matches!(t, tessera_rollup::Tx::Settle { receipts_root, .. } if *receipts_root == root)
                });
                if carries {
                    found = Some((pb.index, batch.new_root()));
                    break;
                }
            }
            match found {
                None => checks.push(check(
                    "settled in a batch on the contract",
                    false,
                    "no standing batch on L1 carries this receipts root",
                )),
                Some((i, new_root)) => {
                    let on_l1 = self.root(i).await?;
                    checks.push(check(
                        "settled in a batch on the contract",
                        on_l1.is_some_and(|(r, _)| r == new_root),
                        format!("batch {i}'s calldata settles this receipts root"),
                    ));
                    final_ = on_l1.map(|(_, f)| f);
                }
            }
        }
        let mut v = self.verdict("receipt", checks, final_);
        v["id"] = json!(signed.body.job_id.to_hex());
        Ok(v)
    }
}
