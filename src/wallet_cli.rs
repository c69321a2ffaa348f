//! `tessera wallet`, `tessera stake`, `tessera delegate` and `tessera rewards`: a token
//! holder's view of the rollup. L2 actions are signed here with the wallet's key and sent
//! to a coordinator's public L2 routes; L1 actions (deposit, payout) and every check
//! against the contract go straight to the L1 over JSON-RPC (a devnet serves its embedded
//! chain at `COORDINATOR/l1`). The signing domain is recomputed here from the chain id
//! and the contract address, never taken on trust.

use std::path::{Path, PathBuf};

use alloy::primitives::{Address as EvmAddress, U256};
use alloy::signers::local::PrivateKeySigner;
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use tessera_contracts::{domain, wallet, Contracts, Deployment, RpcChain, L1};
use tessera_rollup::{Account, Action, Delegation, MerkleProof, Tx};

#[derive(Args, Debug, Clone)]
pub struct Endpoints {
    /// The coordinator (its public L2 routes).
    #[arg(
        long,
        global = true,
        env = "TESSERA_COORDINATOR",
        default_value = "http://127.0.0.1:8080"
    )]
    coordinator: String,
    /// The L1's JSON-RPC URL [default: COORDINATOR/l1, a devnet's embedded chain].
    #[arg(long, global = true, env = "TESSERA_L1")]
    l1: Option<String>,
    /// Which wallet key ($TESSERA_HOME/wallet/NAME.key).
    #[arg(long, global = true, env = "TESSERA_WALLET", default_value = "default")]
    wallet: String,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand, Debug)]
pub enum WalletCommand {
    /// Create the wallet key (once) and print its address.
    New,
    /// Print the wallet's address.
    Address,
    /// L1 balances (tokens, ether, withdrawals paid) and the L2 account.
    Balance,
    /// Deposit tokens into the rollup (approve + deposit on L1), for the wallet or `--for`.
    Deposit {
        /// Base units.
        amount: u128,
        /// Credit another address (e.g. register a node's payout address with 0).
        #[arg(long = "for")]
        beneficiary: Option<EvmAddress>,
    },
    /// Move L2 balance out (signed L2 withdrawal); `payout` collects it on L1 once final.
    Withdraw {
        /// Base units.
        amount: u128,
    },
    /// Collect on L1 every withdrawal final and not yet paid (Merkle proof against the
    /// contract's final root).
    Payout,
    /// Move the rewards your delegations accrued into your L2 balance.
    Claim,
}

#[derive(Args, Debug)]
pub struct StakeArgs {
    /// Base units.
    amount: u128,
    /// Unstake instead (spendable after the unbonding epochs; `tessera release`).
    #[arg(long)]
    unstake: bool,
    #[command(flatten)]
    at: Endpoints,
}

#[derive(Args, Debug)]
pub struct CommissionArgs {
    /// Basis points of what callers pay (after the protocol fee) kept by the node before
    /// the rest is shared by stake (0–10000).
    bps: u16,
    #[command(flatten)]
    at: Endpoints,
}

#[derive(Args, Debug)]
pub struct DelegateArgs {
    /// The node's payout address.
    node: EvmAddress,
    /// Base units.
    amount: u128,
    /// Take the delegation back instead (it unbonds first).
    #[arg(long)]
    undelegate: bool,
    #[command(flatten)]
    at: Endpoints,
}

#[derive(Args, Debug)]
pub struct RewardsArgs {
    /// Whose rewards (a node's payout address or a delegator's address).
    address: EvmAddress,
    #[command(flatten)]
    at: Endpoints,
}

fn wallet_path(home: &Path, name: &str) -> PathBuf {
    home.join("wallet").join(format!("{name}.key"))
}

fn load_wallet(home: &Path, name: &str) -> Result<PrivateKeySigner> {
    let path = wallet_path(home, name);
    if !path.exists() {
        bail!(
            "no wallet {name:?} ({}): create it with `tessera wallet new --wallet {name}`",
            path.display()
        );
    }
    Ok(wallet::load(&path)?)
}

/// What a command needs of the coordinator and the L1.
struct Session {
    http: reqwest::Client,
    base: String,
    chain: RpcChain,
    d: Deployment,
}

impl Session {
    async fn open(at: &Endpoints) -> Result<Self> {
        let http = reqwest::Client::new();
        let base = at.coordinator.trim_end_matches('/').to_owned();
        let d: Deployment = get(&http, &format!("{base}/v1/l2/deployment")).await?;
        let l1 = at.l1.clone().unwrap_or_else(|| format!("{base}/l1"));
        let chain = RpcChain::connect(&l1, false)
            .await
            .with_context(|| format!("cannot reach the L1 at {l1}"))?;
        if chain.chain_id() != d.chain_id || domain(d.chain_id, d.settlement) != d.domain {
            bail!(
                "the coordinator's deployment (chain {}, {}) does not match the L1 at {l1} (chain {})",
                d.chain_id,
                d.settlement,
                chain.chain_id()
            );
        }
        Ok(Self {
            http,
            base,
            chain,
            d,
        })
    }

    fn contracts(&self) -> Contracts<'_, RpcChain> {
        Contracts::new(&self.chain, &self.d)
    }

    async fn account(&self, address: EvmAddress) -> Result<Option<Value>> {
        let r = self
            .http
            .get(format!("{}/v1/l2/accounts/{address}", self.base))
            .send()
            .await
            .with_context(|| format!("cannot reach {}", self.base))?;
        if r.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        Ok(Some(answer(r).await?))
    }

    /// Signs `action` for the wallet's L2 account and queues it.
    async fn send(&self, w: &PrivateKeySigner, action: Action) -> Result<()> {
        let Some(me) = self.account(w.address()).await? else {
            bail!("{} has no L2 account yet: deposit first", w.address());
        };
        let slot = me["slot"].as_u64().context("slot")? as u32;
        let nonce = me["pending"]["nonce"].as_u64().context("nonce")?;
        let tx = Tx::sign(w.credential(), &self.d.domain.0, slot, nonce, action);
        self.submit(&tx).await
    }

    /// Queues a transaction at the coordinator.
    async fn submit(&self, tx: &Tx) -> Result<()> {
        let body = json!({"tx": format!("0x{}", hex::encode(tx.encode()))});
        let r = self
            .http
            .post(format!("{}/v1/l2/transactions", self.base))
            .json(&body)
            .send()
            .await?;
        answer(r).await?;
        Ok(())
    }
}

async fn answer(r: reqwest::Response) -> Result<Value> {
    let status = r.status();
    let v: Value = r
        .json()
        .await
        .context("the coordinator's answer is not JSON")?;
    if !status.is_success() {
        let msg = v["error"]["message"].as_str().unwrap_or("no message");
        bail!("coordinator: {status}: {msg}");
    }
    Ok(v)
}

async fn get<T: serde::de::DeserializeOwned>(http: &reqwest::Client, url: &str) -> Result<T> {
    let r = http
        .get(url)
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let v = answer(r).await?;
    serde_json::from_value(v).with_context(|| format!("unexpected answer from {url}"))
}

fn unhex(v: &Value) -> Result<Vec<u8>> {
    let s = v.as_str().context("expected a hex string")?;
    Ok(hex::decode(s.trim_start_matches("0x"))?)
}

fn proof_of(v: &Value) -> Result<(Vec<u8>, MerkleProof)> {
    let siblings = v["siblings"]
        .as_array()
        .context("siblings")?
        .iter()
        .map(|h| {
            unhex(h)?
                .try_into()
                .map_err(|_| anyhow::anyhow!("a sibling is not 32 bytes"))
        })
        .collect::<Result<Vec<[u8; 32]>>>()?;
    let bitmap = v["bitmap"].as_u64().context("bitmap")? as u32;
    Ok((unhex(&v["leaf"])?, MerkleProof { bitmap, siblings }))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn print(json_out: bool, v: &Value, text: impl FnOnce() -> String) {
    if json_out {
        println!("{v}");
    } else {
        println!("{}", text());
    }
}

/// `tessera wallet …`.
pub fn wallet(home: &Path, at: Endpoints, command: WalletCommand) -> Result<()> {
    match command {
        WalletCommand::New => {
            let path = wallet_path(home, &at.wallet);
            let (w, created) = wallet::load_or_create(&path)?;
            let v = json!({"address": w.address(), "file": path, "created": created});
            print(at.json, &v, || {
                let verb = if created { "created" } else { "exists" };
                format!("{} ({verb}: {})", w.address(), path.display())
            });
            Ok(())
        }
        WalletCommand::Address => {
            let w = load_wallet(home, &at.wallet)?;
            print(at.json, &json!({"address": w.address()}), || {
                w.address().to_string()
            });
            Ok(())
        }
        command => runtime()?.block_on(wallet_online(home, at, command)),
    }
}

async fn wallet_online(home: &Path, at: Endpoints, command: WalletCommand) -> Result<()> {
    let w = load_wallet(home, &at.wallet)?;
    let s = Session::open(&at).await?;
    let c = s.contracts();
    match command {
        WalletCommand::Balance => {
            let l2 = s.account(w.address()).await?;
            let slot = c.slot_of(w.address()).await?;
            let paid = if slot == 0 {
                U256::ZERO
            } else {
                c.paid(slot).await?
            };
            let v = json!({
                "address": w.address(),
                "l1": {
                    "tokens": c.token_balance(w.address()).await?.to_string(),
                    "ether_wei": s.chain.eth_balance(w.address()).await?.to_string(),
                    "withdrawals_paid": paid.to_string(),
                },
                "l2": l2,
            });
            print(at.json, &v, || {
                let l2_line = |k: &str| {
                    v["l2"][k]["balance"]
                        .as_str()
                        .map_or("-".to_owned(), str::to_owned)
                };
                format!(
                    "{}\nL1: {} tokens, {} wei, {} paid out\nL2: balance {} pending, {} posted, {} final (stake {}, withdrawn {})",
                    w.address(),
                    v["l1"]["tokens"].as_str().unwrap_or("?"),
                    v["l1"]["ether_wei"].as_str().unwrap_or("?"),
                    v["l1"]["withdrawals_paid"].as_str().unwrap_or("?"),
                    l2_line("pending"),
                    l2_line("posted"),
                    l2_line("final"),
                    v["l2"]["pending"]["stake"].as_str().unwrap_or("-"),
                    v["l2"]["pending"]["withdrawn"].as_str().unwrap_or("-"),
                )
            });
        }
        WalletCommand::Deposit {
            amount,
            beneficiary,
        } => {
            let to = beneficiary.unwrap_or(w.address());
            let (q, _) = c.deposit(&w, to, amount).await?;
            let v =
                json!({"seq": q.seq, "slot": q.slot, "account": to, "amount": amount.to_string()});
            print(at.json, &v, || {
                format!(
                    "deposited {amount} for {to}: L1 queue position {}, L2 slot {}; credited on L2 in the next batch",
                    q.seq, q.slot
                )
            });
        }
        WalletCommand::Withdraw { amount } => {
            s.send(&w, Action::Withdraw { amount }).await?;
            print(
                at.json,
                &json!({"status": "pending", "amount": amount.to_string()}),
                || {
                    format!(
                    "withdrawal of {amount} queued; once its batch is final ({} s after posting), `tessera wallet payout` collects it on L1",
                    s.d.params.challenge_window
                )
                },
            );
        }
        WalletCommand::Payout => {
            let me = s
                .account(w.address())
                .await?
                .context("no L2 account for this wallet")?;
            let p = &me["proof"];
            if p.is_null() {
                bail!("no batch is final yet");
            }
            let slot = me["slot"].as_u64().context("slot")? as u32;
            let (leaf, proof) = proof_of(p)?;
            let batch = p["batch"].as_u64().context("batch")?;
            let before = c.token_balance(w.address()).await?;
            c.withdraw(&w, batch, slot, leaf, &proof).await?;
            let got = c.token_balance(w.address()).await? - before;
            print(
                at.json,
                &json!({"paid": got.to_string(), "batch": batch}),
                || format!("paid {got} tokens on L1 (final batch {batch})"),
            );
        }
        WalletCommand::Claim => {
            let me = s
                .account(w.address())
                .await?
                .context("no L2 account for this wallet")?;
            let mut claimed = Vec::new();
            for d in me["delegations"].as_array().into_iter().flatten() {
                let delegation = d["slot"].as_u64().context("slot")? as u32;
                match s.submit(&Tx::Claim { delegation }).await {
                    Ok(()) => claimed.push(delegation),
                    // Nothing accrued since the last claim: not an error for the caller.
                    Err(e) if e.to_string().contains("nothing to claim") => {}
                    Err(e) => return Err(e),
                }
            }
            print(at.json, &json!({"claimed": claimed}), || {
                format!("claims queued for {} delegation(s)", claimed.len())
            });
        }
        WalletCommand::New | WalletCommand::Address => unreachable!("handled offline"),
    }
    Ok(())
}

/// `tessera stake AMOUNT [--unstake]`.
pub fn stake(home: &Path, args: StakeArgs) -> Result<()> {
    runtime()?.block_on(async {
        let w = load_wallet(home, &args.at.wallet)?;
        let s = Session::open(&args.at).await?;
        let (action, verb) = if args.unstake {
            (
                Action::Unstake {
                    amount: args.amount,
                },
                "unstake",
            )
        } else {
            (
                Action::Stake {
                    amount: args.amount,
                },
                "stake",
            )
        };
        s.send(&w, action).await?;
        let v = json!({"status": "pending", "action": verb, "amount": args.amount.to_string()});
        print(args.at.json, &v, || {
            format!("{verb} of {} queued for the next batch", args.amount)
        });
        Ok(())
    })
}

/// `tessera commission BPS`: announced now, in force from the next epoch.
pub fn commission(home: &Path, args: CommissionArgs) -> Result<()> {
    if args.bps > 10_000 {
        bail!(
            "commission must be at most 10000 basis points (100%), not {}",
            args.bps
        );
    }
    runtime()?.block_on(async {
        let w = load_wallet(home, &args.at.wallet)?;
        let s = Session::open(&args.at).await?;
        s.send(&w, Action::SetCommission { bps: args.bps }).await?;
        let v = json!({"status": "pending", "action": "set_commission", "bps": args.bps, "applies": "from the epoch after the one its batch lands in"});
        print(args.at.json, &v, || {
            format!("commission of {} bps queued; it applies from the next epoch", args.bps)
        });
        Ok(())
    })
}

/// `tessera delegate NODE AMOUNT [--undelegate]`.
pub fn delegate(home: &Path, args: DelegateArgs) -> Result<()> {
    runtime()?.block_on(async {
        let w = load_wallet(home, &args.at.wallet)?;
        let s = Session::open(&args.at).await?;
        let node = s
            .account(args.node)
            .await?
            .with_context(|| format!("{} has no L2 account: not a node", args.node))?;
        let node_slot = node["slot"].as_u64().context("slot")?;
        let me = s
            .account(w.address())
            .await?
            .context("this wallet has no L2 account yet: deposit first")?;
        let existing = me["delegations"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| d["node_slot"].as_u64() == Some(node_slot))
            .and_then(|d| d["slot"].as_u64());
        let action = if args.undelegate {
            let delegation = existing.context("no delegation to that node")? as u32;
            Action::Undelegate {
                delegation,
                amount: args.amount,
            }
        } else {
            let delegation = existing
                .or(me["next_delegation_slot"].as_u64())
                .context("next delegation slot")? as u32;
            Action::Delegate {
                delegation,
                node: node_slot as u32,
                amount: args.amount,
            }
        };
        s.send(&w, action).await?;
        let verb = if args.undelegate {
            "undelegation"
        } else {
            "delegation"
        };
        print(args.at.json, &json!({"status": "pending"}), || {
            format!(
                "{verb} of {} to {} queued for the next batch",
                args.amount, args.node
            )
        });
        Ok(())
    })
}

/// `tessera rewards ADDRESS`: earnings per node and per epoch, each figure checked by a
/// Merkle proof against the root the contract holds for a final batch.
pub fn rewards(args: RewardsArgs) -> Result<()> {
    runtime()?.block_on(async {
        let s = Session::open(&args.at).await?;
        // What --json prints is the dashboard's account document, the API's JSON for the
        // same address; every statement row in it must be one proved here against L1. A
        // batch that turns final between the two reads moves a row: read both again.
        let mut tries = 0;
        let (doc, out) = loop {
            tries += 1;
            let doc: Value = get(
                &s.http,
                &format!("{}/api/v1/accounts/{}", s.base, args.address),
            )
            .await?;
            let out = prove_statement(&s, &args.address).await?;
            let all_proved = doc["statement"]["rows"]
                .as_array()
                .into_iter()
                .flatten()
                .all(|row| {
                    out.iter().any(|r| {
                        r["batch"] == row["batch"] && r["own_earned_total"] == row["inputs"]["earned"]
                    })
                });
            if all_proved {
                break (doc, out);
            }
            if tries == 3 {
                bail!("the coordinator's statement rows are not the ones proved against L1");
            }
        };
        print(args.at.json, &doc, || {
            let mut t = format!(
                "rewards of {} (claimed earnings; each row proved against the contract's root of a final batch)\n",
                args.address
            );
            t.push_str("epoch  batch  earned in epoch  earned total  per node (earned in epoch / total)\n");
            for r in &out {
                let nodes: Vec<String> = r["per_node"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|n| {
                        format!(
                            "slot {}: {} / {}",
                            n["node_slot"],
                            n["earned_in_epoch"].as_str().unwrap_or("?"),
                            n["earned_total"].as_str().unwrap_or("?")
                        )
                    })
                    .collect();
                t.push_str(&format!(
                    "{:>5}  {:>5}  {:>15}  {:>12}  {}  ✓\n",
                    r["epoch"],
                    r["batch"],
                    r["own_earned_in_epoch"].as_str().unwrap_or("?"),
                    r["own_earned_total"].as_str().unwrap_or("?"),
                    nodes.join(", ")
                ));
            }
            if out.is_empty() {
                t.push_str("(no final batch holds this address yet)\n");
            }
            t
        });
        Ok(())
    })
}

/// Each row of an address's statement, every leaf proved against the root the contract
/// holds for its final batch.
async fn prove_statement(s: &Session, address: &EvmAddress) -> Result<Vec<Value>> {
    let c = s.contracts();
    let statement: Value = get(
        &s.http,
        &format!("{}/v1/l2/accounts/{}/statement", s.base, address),
    )
    .await?;
    let finalized = c.finalized().await?;
    let mut out = Vec::new();
    let mut last_own = 0u128;
    let mut last_per_node: std::collections::BTreeMap<u32, u128> = Default::default();
    for row in statement["rows"].as_array().into_iter().flatten() {
        let batch = row["batch"].as_u64().context("batch")?;
        let root: [u8; 32] = unhex(&row["root"])?
            .try_into()
            .map_err(|_| anyhow::anyhow!("root is not 32 bytes"))?;
        if batch >= finalized {
            bail!("batch {batch} is not final on L1");
        }
        let on_l1 = c.batch(batch).await?.root;
        if on_l1.0 != root {
            bail!("the coordinator's root for batch {batch} is not the contract's");
        }
        let (leaf, proof) = proof_of(&row["account"])?;
        let account = Account::decode(&leaf).context("not an account leaf")?;
        let slot = row["slot"].as_u64().context("slot")? as u32;
        if !proof.verify(&root, slot, &tessera_rollup::keccak256(&leaf)) {
            bail!("the account's proof for batch {batch} does not verify against the L1 root");
        }
        let mut per_node = Vec::new();
        for d in row["delegations"].as_array().into_iter().flatten() {
            let dslot = d["slot"].as_u64().context("slot")? as u32;
            let (dleaf, dproof) = proof_of(d)?;
            let del = Delegation::decode(&dleaf).context("not a delegation leaf")?;
            if !dproof.verify(&root, dslot, &tessera_rollup::keccak256(&dleaf))
                || del.delegator != slot
            {
                bail!("delegation {dslot}'s proof does not verify against the L1 root");
            }
            let before = last_per_node.insert(del.node, del.earned).unwrap_or(0);
            per_node.push(json!({
                "node_slot": del.node,
                "delegated": del.amount.to_string(),
                "earned_total": del.earned.to_string(),
                "earned_in_epoch": (del.earned - before.min(del.earned)).to_string(),
            }));
        }
        out.push(json!({
            "epoch": row["epoch"],
            "batch": batch,
            "root": row["root"],
            "own_earned_total": account.earned.to_string(),
            "own_earned_in_epoch": (account.earned - last_own.min(account.earned)).to_string(),
            "per_node": per_node,
            "status": "final",
            "verified": true,
        }));
        last_own = account.earned;
    }
    Ok(out)
}

/// A watchtower over the settlement of the coordinator at `coordinator` (its HTTP URL),
/// reading L1 at `l1` (default: the coordinator's `/l1`), challenging with the key at
/// `key` (created if missing).
pub async fn watchtower(
    coordinator: &str,
    l1: Option<&str>,
    key: &Path,
) -> Result<tessera_node::Watchtower> {
    let at = Endpoints {
        coordinator: coordinator.to_owned(),
        l1: l1.map(str::to_owned),
        wallet: String::new(),
        json: false,
    };
    let s = Session::open(&at).await?;
    let (w, _) = wallet::load_or_create(key)?;
    if s.chain.eth_balance(w.address()).await? < s.d.params.challenge_bond {
        eprintln!(
            "watchtower {}: no ether for the challenge bond ({} wei): it verifies every batch but cannot challenge until funded",
            w.address(),
            s.d.params.challenge_bond
        );
    } else {
        eprintln!("watchtower {} watching {}", w.address(), s.d.settlement);
    }
    let chain = tessera_contracts::AnyChain::Rpc(std::sync::Arc::new(s.chain));
    Ok(tessera_node::Watchtower::new(chain, s.d, w))
}
