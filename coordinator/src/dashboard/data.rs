//! The dashboard's JSON (`/api/v1/...`): every page is rendered from one of these
//! values, and the CLI prints them as they are. One convention throughout: amounts are
//! integer strings in base units; every money figure is `{"amount", "status", "proof"?}`
//! with a status from [`Status`]; every document carries an `as_of` block naming the
//! final and posted batch, the L1 block and the contract it was read against.

use crate::api::ApiState;
use crate::ledger::RequestRow;
use crate::sequencer::{AccountReport, BatchSummary, SettleRecord};
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use tessera_contracts::{BatchRecord, Contracts, PostedBatch, L1};
use tessera_protocol::{Address, JobId};
use tessera_rollup::H256;

/// Where a money figure stands. `Estimate` (forecasts) is never summed with the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Signed receipts or transactions not yet in a batch.
    Pending,
    /// In a posted batch whose challenge window is open.
    Posted,
    /// In a final batch: provable against the contract's root.
    Final,
    /// Paid out on L1.
    Withdrawn,
    /// A forecast.
    Estimate,
}

impl Status {
    /// Its name in the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Posted => "posted",
            Status::Final => "final",
            Status::Withdrawn => "withdrawn",
            Status::Estimate => "estimate",
        }
    }
}

/// A money figure.
pub fn money(amount: u128, status: Status, proof: Option<String>) -> Value {
    let mut v = json!({"amount": amount.to_string(), "status": status.as_str()});
    if let Some(p) = proof {
        v["proof"] = json!(p);
    }
    v
}

/// Why a dashboard document could not be built.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// No such thing (node, account, receipt).
    #[error("{0}")]
    NotFound(String),
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// This coordinator does not settle on an L1.
    #[error("this coordinator does not settle on an L1 (no sequencer)")]
    NoSettlement,
    /// The ledger, the sequencer or L1 failed.
    #[error("{0}")]
    Internal(String),
}

fn internal(e: impl std::fmt::Display) -> DataError {
    DataError::Internal(e.to_string())
}

/// `0x`-hex of 32 bytes.
pub fn hex32(h: &[u8; 32]) -> String {
    format!("0x{}", hex::encode(h))
}

/// What the chain says, read once per document.
pub struct Chain {
    /// Every standing batch's summary.
    pub batches: Vec<Arc<BatchSummary>>,
    /// Batches final.
    pub finalized: u64,
    /// Where each batch was posted on L1.
    pub posted: Arc<HashMap<u64, PostedBatch>>,
    /// Each batch's on-chain record.
    pub records: Arc<HashMap<u64, BatchRecord>>,
    /// L1 head: block and timestamp.
    pub head: (u64, u64),
    /// The challenge window (s).
    pub window: u64,
    /// The settlement contract.
    pub contract: String,
    /// The chain id.
    pub chain_id: u64,
    /// Receipts root → the index of the batch whose settlement carries it.
    pub roots: HashMap<H256, u64>,
}

/// What [`Chain::load`] read from L1 for a set of standing batches: it changes only
/// when a batch is posted, reverted or finalized, so pages do not rescan L1 logs.
#[derive(Clone, Default)]
pub struct ChainCache(Arc<std::sync::Mutex<Option<CachedL1>>>);

struct CachedL1 {
    key: (usize, Option<H256>, u64),
    posted: Arc<HashMap<u64, PostedBatch>>,
    records: Arc<HashMap<u64, BatchRecord>>,
}

impl Chain {
    /// Reads the sequencer's batches and their L1 records (cached until the batches
    /// change) and the L1 head.
    pub async fn load(state: &ApiState) -> Result<Self, DataError> {
        let seq = state.sequencer.as_ref().ok_or(DataError::NoSettlement)?;
        let (chain, d) = match (&state.chain, &state.deployment) {
            (Some(c), Some(d)) => (c, d),
            _ => return Err(DataError::NoSettlement),
        };
        let (batches, finalized) = seq.batches().await.map_err(internal)?;
        let key = (batches.len(), batches.last().map(|b| b.root), finalized);
        let cached = state.chain_cache.0.lock().ok().and_then(|c| {
            c.as_ref()
                .filter(|c| c.key == key)
                .map(|c| (c.posted.clone(), c.records.clone()))
        });
        let (posted, records) = match cached {
            Some(hit) => hit,
            None => {
                let c = Contracts::new(chain, d);
                let posted: HashMap<u64, PostedBatch> = c
                    .posted_batches()
                    .await
                    .map_err(internal)?
                    .into_iter()
                    .map(|p| (p.index, p))
                    .collect();
                let mut records = HashMap::new();
                for b in &batches {
                    records.insert(b.index, c.batch(b.index).await.map_err(internal)?);
                }
                let (posted, records) = (Arc::new(posted), Arc::new(records));
                if let Ok(mut slot) = state.chain_cache.0.lock() {
                    *slot = Some(CachedL1 {
                        key,
                        posted: posted.clone(),
                        records: records.clone(),
                    });
                }
                (posted, records)
            }
        };
        let head = chain.head().await.map_err(internal)?;
        let roots = batches
            .iter()
            .flat_map(|b| b.settlements.iter().map(|s| (s.receipts_root, b.index)))
            .collect();
        Ok(Self {
            batches,
            finalized,
            posted,
            records,
            head,
            window: d.params.challenge_window,
            contract: d.settlement.to_string(),
            chain_id: d.chain_id,
            roots,
        })
    }

    /// A batch's status.
    pub fn status(&self, index: u64) -> Status {
        if index < self.finalized {
            Status::Final
        } else {
            Status::Posted
        }
    }

    /// When a batch's challenge window ends (L1 seconds).
    pub fn window_end(&self, index: u64) -> Option<u64> {
        self.records
            .get(&index)
            .map(|r| r.submitted_at + self.window)
    }

    /// The `as_of` block.
    pub fn as_of(&self) -> Value {
        json!({
            "final_batch": self.finalized.checked_sub(1),
            "posted_batch": self.batches.last().map(|b| b.index),
            "l1_block": self.head.0,
            "l1_time": self.head.1,
            "contract": self.contract,
            "chain_id": self.chain_id,
        })
    }
}

/// `as_of` for a coordinator without settlement: nothing is provable there.
fn as_of_unsettled() -> Value {
    json!({"final_batch": null, "posted_batch": null, "l1_block": null, "l1_time": null, "contract": null, "chain_id": null})
}

async fn report(state: &ApiState, address: &Address) -> Result<Option<AccountReport>, DataError> {
    let seq = state.sequencer.as_ref().ok_or(DataError::NoSettlement)?;
    seq.report(*address, true).await.map_err(internal)
}

/// A report without the statement's proofs (node lists).
async fn light_report(
    state: &ApiState,
    address: &Address,
) -> Result<Option<AccountReport>, DataError> {
    let seq = state.sequencer.as_ref().ok_or(DataError::NoSettlement)?;
    seq.report(*address, false).await.map_err(internal)
}

async fn paid(state: &ApiState, slot: u32) -> Result<u128, DataError> {
    let (Some(chain), Some(d)) = (&state.chain, &state.deployment) else {
        return Err(DataError::NoSettlement);
    };
    let p = Contracts::new(chain, d)
        .paid(slot)
        .await
        .map_err(internal)?;
    u128::try_from(p).map_err(internal)
}

/// Parses a `0x` address, naming the parameter when it is not one.
pub fn parse_address(s: &str) -> Result<Address, DataError> {
    s.parse()
        .map_err(|_| DataError::BadRequest(format!("{s:?} is not a 0x-prefixed 20-byte address")))
}

/// A leaf's preimage and its sparse Merkle proof, as every proof in the API shows them.
pub fn leaf_proof_json(preimage: &[u8], proof: &tessera_rollup::MerkleProof) -> Value {
    json!({
        "leaf": format!("0x{}", hex::encode(preimage)),
        "bitmap": proof.bitmap,
        "siblings": proof.siblings.iter().map(hex32).collect::<Vec<_>>(),
    })
}

/// A leaf's proof with the final batch, root and slot it proves against.
fn proof_json(
    batch: u64,
    root: &H256,
    slot: u32,
    preimage: &[u8],
    proof: &tessera_rollup::MerkleProof,
) -> Value {
    let mut v = leaf_proof_json(preimage, proof);
    v["batch"] = json!(batch);
    v["root"] = json!(hex32(root));
    v["slot"] = json!(slot);
    v
}

/// A settlement's split as JSON, with its inputs.
fn split_json(batch: u64, status: Status, r: &SettleRecord) -> Value {
    let s = &r.split;
    json!({
        "batch": batch,
        "status": status.as_str(),
        "epoch": s.epoch,
        "payer_slot": r.payer,
        "receipts_root": hex32(&r.receipts_root),
        "amount": s.amount.to_string(),
        "fee_bps": s.fee_bps,
        "fee": s.fee.to_string(),
        "commission_bps": s.commission_bps,
        "commission": s.commission.to_string(),
        "stake": s.stake.to_string(),
        "delegated": s.delegated.to_string(),
        "self_share": s.self_share.to_string(),
        "delegators": s.delegators.to_string(),
    })
}

/// Formula of the realised delegator APR, as the API states it.
pub const APR_FORMULA: &str =
    "apr_bps = delegators_share · 31536000 · 10000 / (mean_delegated · seconds), over the final batches since the node's first stake, mean_delegated weighted by time";

/// The node-side part of an account report: commission, per-epoch split, stake.
fn node_json(r: &AccountReport, chain: &Chain) -> Value {
    let now = r.pending.commission_at(r.epoch);
    let pending_change = (r.pending.next_commission_epoch > r.epoch
        && r.pending.next_commission_bps != r.pending.commission_bps)
        .then(|| {
            json!({
                "bps": r.pending.next_commission_bps,
                "from_epoch": r.pending.next_commission_epoch,
            })
        });
    // Per (epoch, status): sums of each part.
    let mut epochs: BTreeMap<(u64, &'static str), [u128; 5]> = BTreeMap::new();
    let mut bps_used: BTreeMap<(u64, &'static str), Vec<u16>> = BTreeMap::new();
    for (batch, _, rec) in &r.settlements {
        let st = chain.status(*batch).as_str();
        let e = epochs.entry((rec.split.epoch, st)).or_default();
        let s = &rec.split;
        for (slot, v) in
            e.iter_mut()
                .zip([s.amount, s.fee, s.commission, s.self_share, s.delegators])
        {
            *slot += v;
        }
        let b = bps_used.entry((rec.split.epoch, st)).or_default();
        if !b.contains(&s.commission_bps) {
            b.push(s.commission_bps);
        }
    }
    let status_of = |s: &str| match s {
        "final" => Status::Final,
        _ => Status::Posted,
    };
    let earnings: Vec<Value> = epochs
        .iter()
        .map(
            |((epoch, st), [amount, fee, commission, self_share, delegators])| {
                let status = status_of(st);
                json!({
                    "epoch": epoch,
                    "status": st,
                    "paid_by_callers": money(*amount, status, None),
                    "protocol_fee": money(*fee, status, None),
                    "commission": money(*commission, status, None),
                    "self_stake_share": money(*self_share, status, None),
                    "delegators_share": money(*delegators, status, None),
                    "commission_bps": bps_used.get(&(*epoch, *st)).cloned().unwrap_or_default(),
                })
            },
        )
        .collect();
    // Realised APR for delegators over final batches.
    let finals: Vec<&(u64, bool, SettleRecord)> = r
        .settlements
        .iter()
        .filter(|(b, _, _)| chain.status(*b) == Status::Final)
        .collect();
    let delegators_share: u128 = finals.iter().map(|(_, _, s)| s.split.delegators).sum();
    // Time-weighted delegated stake over the final batches since the node's first stake
    // point: each batch's delegation holds until the next final batch was posted.
    let final_batches: Vec<(u64, u64)> = chain
        .batches
        .iter()
        .filter(|b| chain.status(b.index) == Status::Final)
        .filter(|b| r.stakes.first().is_some_and(|p| p.batch <= b.index))
        .filter_map(|b| {
            chain
                .records
                .get(&b.index)
                .map(|rec| (b.index, rec.submitted_at))
        })
        .collect();
    let delegated_at = |batch: u64| {
        r.stakes
            .iter()
            .take_while(|p| p.batch <= batch)
            .last()
            .map_or(0, |p| p.delegated)
    };
    let mut weighted = 0u128;
    for w in final_batches.windows(2) {
        let dt = u128::from(w[1].1.saturating_sub(w[0].1));
        weighted = weighted.saturating_add(delegated_at(w[0].0).saturating_mul(dt));
    }
    let span = match (final_batches.first(), final_batches.last()) {
        (Some(a), Some(b)) => b.1.saturating_sub(a.1),
        _ => 0,
    };
    let mean_delegated = if span > 0 {
        weighted / u128::from(span)
    } else {
        0
    };
    let final_points = final_batches.len();
    let apr_bps = (mean_delegated > 0 && span > 0)
        .then(|| {
            delegators_share
                .checked_mul(31_536_000 * 10_000)?
                .checked_div(mean_delegated.checked_mul(u128::from(span))?)
        })
        .flatten();
    json!({
        "commission": {
            "now_bps": now,
            "pending_change": pending_change,
            "history": r.commissions.iter().map(|(batch, _, c)| json!({
                "batch": batch,
                "status": chain.status(*batch).as_str(),
                "old_bps": c.old_bps,
                "bps": c.bps,
                "from_epoch": c.from_epoch,
            })).collect::<Vec<_>>(),
        },
        "stake": {
            "self": money(r.pending.stake, Status::Pending, None),
            "delegated": money(r.pending.delegated, Status::Pending, None),
            "history": r.stakes.iter().map(|p| json!({
                "batch": p.batch,
                "epoch": p.epoch,
                "status": chain.status(p.batch).as_str(),
                "self": p.stake.to_string(),
                "delegated": p.delegated.to_string(),
            })).collect::<Vec<_>>(),
        },
        "earnings_by_epoch": earnings,
        "settlements": r.settlements.iter().map(|(b, _, s)| split_json(*b, chain.status(*b), s)).collect::<Vec<_>>(),
        "delegators": r.delegators.iter().map(|(a, amount, earned)| json!({
            "address": a.to_string(),
            "amount": money(*amount, Status::Pending, None),
            "claimed": money(*earned, Status::Pending, None),
        })).collect::<Vec<_>>(),
        "delegator_apr": {
            "bps": apr_bps,
            "formula": APR_FORMULA,
            "inputs": {
                "delegators_share": delegators_share.to_string(),
                "mean_delegated": mean_delegated.to_string(),
                "seconds": span,
                "final_batches": final_points,
            },
        },
    })
}

/// `GET /api/v1/accounts/{address}`: an account's money by status, its positions, its
/// per-epoch statement (rows add up to the lifetime total) and, for a node, its side.
pub async fn account(state: &ApiState, address: &str) -> Result<Value, DataError> {
    let address = parse_address(address)?;
    let chain = Chain::load(state).await?;
    let r = report(state, &address)
        .await?
        .ok_or_else(|| DataError::NotFound(format!("no L2 account for {address}")))?;
    let paid = paid(state, r.slot).await?;
    let proof_url = format!("/api/v1/accounts/{address}/proof");
    let posted = r.posted.map(|(_, a)| a);
    let final_ = r.final_.as_ref().map(|(a, _)| *a);
    let zero = tessera_rollup::Account::default();
    let (p, po, f) = (
        &r.pending,
        posted.as_ref().unwrap_or(&zero),
        final_.as_ref().unwrap_or(&zero),
    );
    let last_posted = chain.batches.last().map(|b| b.index);
    let window_end = last_posted
        .filter(|i| chain.status(*i) == Status::Posted)
        .and_then(|i| chain.window_end(i));
    let has_final = r.final_.is_some();
    let final_proof = has_final.then(|| proof_url.clone());
    let mut rows = Vec::new();
    let mut prev = 0u128;
    for row in &r.rows {
        let end = row.earned + row.accrued;
        rows.push(json!({
            "epoch": row.at.epoch,
            "batch": row.at.batch,
            "root": hex32(&row.at.root),
            "start": prev.to_string(),
            "end": end.to_string(),
            "inputs": {"earned": row.earned.to_string(), "accrued_unclaimed": row.accrued.to_string()},
            "earned": money(end.saturating_sub(prev), Status::Final, Some(format!("/api/v1/accounts/{address}/proof?batch={}", row.at.batch))),
        }));
        prev = end;
    }
    let lifetime = prev;
    let is_node =
        p.stake > 0 || p.delegated > 0 || !r.settlements.is_empty() || !r.commissions.is_empty();
    let earnings_chart: Vec<Value> = r
        .rows
        .iter()
        .zip(rows.iter())
        .map(|(row, j)| json!({"label": format!("epoch {}", row.at.epoch), "value": j["earned"]["amount"]}))
        .collect();
    Ok(json!({
        "object": "tessera.dashboard.account",
        "address": address.to_string(),
        "slot": r.slot,
        "epoch": r.epoch,
        "as_of": chain.as_of(),
        "withdrawals": {
            "claimable": money(f.withdrawn.saturating_sub(paid), Status::Final, final_proof.clone()),
            "in_challenge_window": money(po.withdrawn.saturating_sub(f.withdrawn), Status::Posted, None),
            "in_challenge_window_until": window_end,
            "pending": money(p.withdrawn.saturating_sub(po.withdrawn), Status::Pending, None),
            "withdrawn": money(paid, Status::Withdrawn, None),
        },
        "earnings": {
            "final": money(r.cumulative[2].unwrap_or(0), Status::Final, final_proof.clone()),
            "in_challenge_window": money(r.cumulative[1].unwrap_or(0).saturating_sub(r.cumulative[2].unwrap_or(0)), Status::Posted, None),
            "pending": money(r.cumulative[0].unwrap_or(0).saturating_sub(r.cumulative[1].unwrap_or(0)), Status::Pending, None),
        },
        "balance": {
            "final": money(f.balance, Status::Final, final_proof.clone()),
            "pending": money(p.balance, Status::Pending, None),
        },
        "positions": {
            "stake": money(p.stake, Status::Pending, None),
            "unbonding": money(p.unbonding, Status::Pending, None),
            "unbond_epoch": p.unbond_epoch,
            "delegations": r.positions.iter().map(|d| json!({
                "slot": d.slot,
                "node": d.node.to_string(),
                "amount": money(d.amount, Status::Pending, None),
                "claimed": money(d.earned, Status::Pending, None),
                "unclaimed": money(d.accrued, Status::Pending, None),
                "unclaimed_final": d.accrued_final.map(|a| money(a, Status::Final, final_proof.clone())),
            })).collect::<Vec<_>>(),
        },
        "statement": {
            "rows": rows,
            "total": money(lifetime, Status::Final, final_proof.clone()),
            "csv": format!("/api/v1/accounts/{address}/statement.csv"),
            "rule": "each row's earned = end − start, where end = earned + accrued_unclaimed at the epoch's last final root; the rows add up to total",
        },
        "chart": {"title": "Earned per epoch (final)", "points": earnings_chart},
        "proof": r.final_.as_ref().map(|(_, fp)| proof_json(fp.batch, &fp.root, r.slot, &fp.preimage, &fp.proof)),
        "node": is_node.then(|| node_json(&r, &chain)),
    }))
}

/// `GET /api/v1/accounts/{address}/proof[?batch=N]`: the account leaf and its proof
/// against the root of final batch N (default: the last final batch).
pub async fn account_proof(
    state: &ApiState,
    address: &str,
    batch: Option<u64>,
) -> Result<Value, DataError> {
    let addr = parse_address(address)?;
    let chain = Chain::load(state).await?;
    let r = report(state, &addr)
        .await?
        .ok_or_else(|| DataError::NotFound(format!("no L2 account for {addr}")))?;
    let found = match batch {
        None => r
            .final_
            .as_ref()
            .map(|(_, fp)| proof_json(fp.batch, &fp.root, r.slot, &fp.preimage, &fp.proof)),
        Some(b) => r.rows.iter().find(|row| row.at.batch == b).map(|row| {
            proof_json(
                row.at.batch,
                &row.at.root,
                row.at.slot,
                &row.at.account.0,
                &row.at.account.1,
            )
        }),
    };
    let proof = found
        .ok_or_else(|| DataError::NotFound("no final batch with this account's leaf".into()))?;
    Ok(
        json!({"object": "tessera.dashboard.proof", "address": addr.to_string(), "as_of": chain.as_of(), "proof": proof}),
    )
}

/// The statement as CSV: one line per epoch row, then the total.
pub fn statement_csv(account: &Value) -> String {
    let mut out = String::from("epoch,batch,root,start,end,earned,status\n");
    for r in account["statement"]["rows"]
        .as_array()
        .into_iter()
        .flatten()
    {
        csv_line(
            &mut out,
            &[
                r["epoch"].to_string(),
                r["batch"].to_string(),
                s(&r["root"]).to_owned(),
                s(&r["start"]).to_owned(),
                s(&r["end"]).to_owned(),
                s(&r["earned"]["amount"]).to_owned(),
                s(&r["earned"]["status"]).to_owned(),
            ],
        );
    }
    let total = &account["statement"]["total"];
    csv_line(
        &mut out,
        &[
            "total".into(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
            s(&total["amount"]).to_owned(),
            s(&total["status"]).to_owned(),
        ],
    );
    out
}

/// Appends one CSV record, each field quoted per RFC 4180 when it needs to be.
fn csv_line(out: &mut String, fields: &[String]) {
    let quoted: Vec<String> = fields
        .iter()
        .map(|f| {
            if f.contains([',', '"', '\n', '\r']) {
                format!("\"{}\"", f.replace('"', "\"\""))
            } else {
                f.clone()
            }
        })
        .collect();
    out.push_str(&quoted.join(","));
    out.push('\n');
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

/// A request's batch status: where its receipt's settlement stands.
fn request_status(chain: Option<&Chain>, row: &RequestRow) -> (Status, Option<u64>) {
    match (row.receipts_root, chain) {
        (Some(root), Some(c)) => match c.roots.get(&root) {
            Some(i) => (c.status(*i), Some(*i)),
            None => (Status::Pending, None),
        },
        _ => (Status::Pending, None),
    }
}

fn request_json(chain: Option<&Chain>, row: &RequestRow) -> Value {
    let b = &row.receipt.body;
    let (status, batch) = request_status(chain, row);
    let meta = row.meta.clone().unwrap_or_default();
    let tps = (meta.decode_ms > 0 && b.usage.completion_tokens > 1).then(|| {
        (f64::from(b.usage.completion_tokens - 1) * 1000.0 / f64::from(meta.decode_ms) * 10.0)
            .round()
            / 10.0
    });
    let id = row.job.to_hex();
    json!({
        "id": id,
        "time_ms": b.finished_ms,
        "model": meta.model,
        "module": b.module.to_string(),
        "node": b.node.to_string(),
        "prompt_tokens": b.usage.prompt_tokens,
        "completion_tokens": b.usage.completion_tokens,
        "ttft_ms": meta.ttft_ms,
        "tokens_per_s": tps,
        "retries": meta.attempts.saturating_sub(1),
        "cost": money(row.cost, status, Some(format!("/api/v1/receipts/{id}"))),
        "receipt": format!("/api/v1/receipts/{id}"),
        "audit": row.audit.as_ref().map(|a| a.result.clone()),
        "batch": {"status": status.as_str(), "index": batch},
    })
}

/// `GET /api/v1/usage` (signed in): the account's API balance and every settled request,
/// listed the moment its response ends, with costs by batch status.
pub async fn usage(state: &ApiState, account: &str, limit: usize) -> Result<Value, DataError> {
    let ledger = state.dispatcher.ledger().clone();
    let who = account.to_owned();
    let (balance, mut rows) = tokio::task::spawn_blocking(move || {
        Ok::<_, crate::LedgerError>((ledger.balance(&who)?, ledger.requests(&who)?))
    })
    .await
    .map_err(internal)?
    .map_err(internal)?;
    let chain = match Chain::load(state).await {
        Ok(c) => Some(c),
        Err(DataError::NoSettlement) => None,
        Err(e) => return Err(e),
    };
    let mut by_status: BTreeMap<&str, u128> = [("pending", 0), ("posted", 0), ("final", 0)]
        .into_iter()
        .collect();
    for r in &rows {
        let (st, _) = request_status(chain.as_ref(), r);
        *by_status.entry(st.as_str()).or_default() += r.cost;
    }
    let total_requests = rows.len();
    rows.truncate(limit);
    let requests: Vec<Value> = rows
        .iter()
        .map(|r| request_json(chain.as_ref(), r))
        .collect();
    let chart: Vec<Value> = rows
        .iter()
        .rev()
        .map(|r| json!({"label": r.job.to_hex()[..8].to_owned(), "value": r.cost.to_string()}))
        .collect();
    let cost = |k: &str, st: Status| money(by_status.get(k).copied().unwrap_or(0), st, None);
    Ok(json!({
        "object": "tessera.dashboard.usage",
        "account": account,
        "as_of": chain.as_ref().map_or_else(as_of_unsettled, Chain::as_of),
        "balance": {
            "credited": money(balance.credited.0, Status::Pending, None),
            "charged": money(balance.charged.0, Status::Pending, None),
            "reserved": money(balance.reserved.0, Status::Pending, None),
            "available": money(balance.available().0, Status::Pending, None),
        },
        "cost_by_status": {
            "pending": cost("pending", Status::Pending),
            "posted": cost("posted", Status::Posted),
            "final": cost("final", Status::Final),
        },
        "request_count": total_requests,
        "listed": requests.len(),
        "requests": requests,
        "chart": {"title": "Cost per request (oldest first)", "points": chart},
        "csv": "/api/v1/usage.csv",
    }))
}

/// The usage document's requests as CSV.
pub fn usage_csv(usage: &Value) -> String {
    let mut out = String::from("id,time_ms,model,module,node,prompt_tokens,completion_tokens,ttft_ms,tokens_per_s,retries,cost,status,batch,audit\n");
    let opt = |v: &Value| match v {
        Value::Null => String::new(),
        v => v.to_string(),
    };
    for r in usage["requests"].as_array().into_iter().flatten() {
        csv_line(
            &mut out,
            &[
                s(&r["id"]).to_owned(),
                r["time_ms"].to_string(),
                s(&r["model"]).to_owned(),
                s(&r["module"]).to_owned(),
                s(&r["node"]).to_owned(),
                r["prompt_tokens"].to_string(),
                r["completion_tokens"].to_string(),
                r["ttft_ms"].to_string(),
                opt(&r["tokens_per_s"]),
                r["retries"].to_string(),
                s(&r["cost"]["amount"]).to_owned(),
                s(&r["cost"]["status"]).to_owned(),
                opt(&r["batch"]["index"]),
                s(&r["audit"]).to_owned(),
            ],
        );
    }
    out
}

/// Parses a receipt id (`chatcmpl-…`, `cmpl-…` or bare hex).
pub fn parse_job(id: &str) -> Result<JobId, DataError> {
    let mut bytes = [0u8; 16];
    hex::decode_to_slice(
        id.trim_start_matches("chatcmpl-")
            .trim_start_matches("cmpl-"),
        &mut bytes,
    )
    .map_err(|_| DataError::NotFound(format!("no receipt {id}")))?;
    Ok(JobId(bytes))
}

/// `GET /api/v1/receipts/{id}` (its payer only): the receipt's fields, its signature
/// check, and its inclusion path under the receipts root its settlement carries.
pub async fn receipt(state: &ApiState, account: &str, id: &str) -> Result<Value, DataError> {
    let job = parse_job(id)?;
    let ledger = state.dispatcher.ledger().clone();
    let row = tokio::task::spawn_blocking(move || ledger.request(job))
        .await
        .map_err(internal)?
        .map_err(internal)?
        .filter(|r| r.receipt.body.payer == account)
        .ok_or_else(|| DataError::NotFound(format!("no receipt {id} for this account")))?;
    let chain = match Chain::load(state).await {
        Ok(c) => Some(c),
        Err(DataError::NoSettlement) => None,
        Err(e) => return Err(e),
    };
    let encoded =
        tessera_protocol::wire::encode(&row.receipt, tessera_protocol::job::MAX_EVENT_FRAME)
            .map_err(internal)?;
    let leaf = tessera_rollup::keccak256(&encoded);
    let signature = check_signature(&row.receipt);
    let inclusion = match row.receipts_root {
        Some(root) => {
            let ledger = state.dispatcher.ledger().clone();
            let jobs = tokio::task::spawn_blocking(move || ledger.posted_jobs(&root))
                .await
                .map_err(internal)?
                .map_err(internal)?;
            jobs.iter().position(|j| j.job == job).map(|i| {
                let path = crate::sequencer::receipts_path(&jobs, i);
                let (status, batch) = request_status(chain.as_ref(), &row);
                json!({
                    "receipts_root": hex32(&root),
                    "index": i,
                    "leaves": jobs.len(),
                    "path": path.iter().map(hex32).collect::<Vec<_>>(),
                    "batch": batch,
                    "status": status.as_str(),
                })
            })
        }
        None => None,
    };
    let mut body = serde_json::to_value(&row.receipt).map_err(internal)?;
    if let Some(o) = body.as_object_mut() {
        o.remove("signature");
    }
    Ok(json!({
        "object": "tessera.dashboard.receipt",
        "id": job.to_hex(),
        "as_of": chain.as_ref().map_or_else(as_of_unsettled, Chain::as_of),
        "request": request_json(chain.as_ref(), &row),
        "receipt": row.receipt,
        "signature": signature,
        "leaf": hex32(&leaf),
        "encoded": format!("0x{}", hex::encode(&encoded)),
        "inclusion": inclusion,
    }))
}

/// A receipt's signature check: valid, and made by the node it names.
pub fn check_signature(r: &tessera_protocol::Signed<tessera_protocol::Receipt>) -> Value {
    match r.verify() {
        Ok(signer) if signer == r.body.node => json!({"valid": true, "signer": signer.to_string()}),
        Ok(signer) => {
            json!({"valid": false, "signer": signer.to_string(), "error": "signed by another key than the node it names"})
        }
        Err(e) => json!({"valid": false, "error": e.to_string()}),
    }
}

/// `GET /api/v1/batches`: every standing batch: status, roots, L1 transaction, window
/// end, counts by transaction type, settled volume, and challenges.
pub async fn batches(state: &ApiState) -> Result<Value, DataError> {
    let chain = Chain::load(state).await?;
    let (Some(l1), Some(d)) = (&state.chain, &state.deployment) else {
        return Err(DataError::NoSettlement);
    };
    let challenges = Contracts::new(l1, d).challenges().await.map_err(internal)?;
    let list: Vec<Value> = chain
        .batches
        .iter()
        .rev()
        .map(|b| {
            let status = chain.status(b.index);
            let settled: u128 = b.settlements.iter().map(|s| s.split.amount).sum();
            json!({
                "index": b.index,
                "status": status.as_str(),
                "prev_root": hex32(&b.prev_root),
                "root": hex32(&b.root),
                "epoch": b.epoch,
                "l1_tx": chain.posted.get(&b.index).map(|p| p.tx.to_string()),
                "l1_block": chain.posted.get(&b.index).map(|p| p.block),
                "submitted_at": chain.records.get(&b.index).map(|r| r.submitted_at),
                "window_end": chain.window_end(b.index),
                "counts": b.counts,
                "noops": b.noops,
                "settled": money(settled, status, None),
                // A reverted batch's index is reused: only challenges sent after this
                // batch was posted are about it.
                "challenges": challenges.iter().filter(|c| c.index == b.index && chain.posted.get(&b.index).is_none_or(|p| c.block >= p.block)).map(|c| json!({
                    "step": c.step, "challenger": c.challenger.to_string(), "upheld": c.upheld, "l1_tx": c.tx.to_string(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let chart: Vec<Value> = chain
        .batches
        .iter()
        .map(|b| json!({"label": format!("#{}", b.index), "value": b.settlements.iter().map(|s| s.split.amount).sum::<u128>().to_string()}))
        .collect();
    Ok(json!({
        "object": "tessera.dashboard.batches",
        "as_of": chain.as_of(),
        "challenge_window_s": chain.window,
        "batches": list,
        "challenges_total": challenges.len(),
        "chart": {"title": "Settled per batch", "points": chart},
    }))
}

/// Uptime and quality of one node from the table.
fn node_row(e: &crate::table::NodeEntry, standing: &crate::audit::NodeRecord) -> Value {
    json!({
        "node": e.advert.node.to_string(),
        "online": true,
        "connected": e.connected,
        "payout": e.advert.payout.to_string(),
        "agent": e.agent,
        "modules": e.advert.modules.iter().map(|o| json!({
            "alias": o.alias,
            "module": o.module.to_string(),
            "numerics": o.numerics,
            "price": {"per_1k_input": o.price.per_1k_input, "per_1k_output": o.price.per_1k_output},
        })).collect::<Vec<_>>(),
        "tokens_per_s": (e.observed.jobs > 0).then(|| (e.observed.tokens_per_sec * 10.0).round() / 10.0),
        "ttft_ms": (e.observed.jobs > 0).then(|| e.observed.ttft_ms.round()),
        "jobs_measured": e.observed.jobs,
        "uptime_s": e.joined.elapsed().as_secs(),
        "failures": e.failures,
        "load": {"running": e.advert.load.running, "waiting": e.advert.load.waiting, "capacity": e.advert.capacity},
        "audits": {"passed": standing.passed, "failed": standing.failed, "missed": standing.missed},
        "open_disputes": standing.open_disputes,
        "slashed": money(standing.slashed.0, Status::Pending, None),
    })
}

/// Adds each node's L2 side (stake, commission, APR) to its row.
async fn with_l2(
    state: &ApiState,
    chain: Option<&Chain>,
    row: &mut Value,
) -> Result<(), DataError> {
    let (Some(chain), Some(payout)) = (chain, row["payout"].as_str()) else {
        return Ok(());
    };
    let address = parse_address(payout)?;
    if let Some(r) = light_report(state, &address).await? {
        let n = node_json(&r, chain);
        row["commission"] = n["commission"].clone();
        row["stake"] = json!({"self": n["stake"]["self"], "delegated": n["stake"]["delegated"]});
        row["delegator_apr"] = n["delegator_apr"].clone();
    }
    Ok(())
}

/// `GET /api/v1/nodes`: every node: modules, price, measured speed and time to first
/// token, uptime, audits, slashes, commission, stake, realised delegator APR.
pub async fn nodes(state: &ApiState) -> Result<Value, DataError> {
    let chain = match Chain::load(state).await {
        Ok(c) => Some(c),
        Err(DataError::NoSettlement) => None,
        Err(e) => return Err(e),
    };
    let mut rows = Vec::new();
    {
        let table = state
            .table
            .read()
            .map_err(|_| internal("node table poisoned"))?;
        let fresh = crate::audit::NodeRecord::default();
        for e in table.nodes() {
            let standing = table.standing(&e.advert.node).unwrap_or(&fresh);
            rows.push(node_row(e, standing));
        }
    }
    for row in &mut rows {
        with_l2(state, chain.as_ref(), row).await?;
    }
    let chart: Vec<Value> = rows
        .iter()
        .map(|r| json!({"label": r["node"].as_str().map(|n| n[n.len().saturating_sub(8)..].to_owned()), "value": r["tokens_per_s"].as_f64().unwrap_or(0.0)}))
        .collect();
    Ok(json!({
        "object": "tessera.dashboard.nodes",
        "as_of": chain.as_ref().map_or_else(as_of_unsettled, Chain::as_of),
        "nodes": rows,
        "chart": {"title": "Measured tokens/s per node", "points": chart},
    }))
}

/// `GET /api/v1/nodes/{id}`: one node: its row, its L2 side (per-epoch earnings split,
/// commission and stake history, delegators) and, for its operator, earnings by job and
/// the "why not earning" checklist.
pub async fn node(state: &ApiState, id: &str) -> Result<Value, DataError> {
    let peer: tessera_protocol::PeerId = id.parse().map_err(|_| {
        DataError::BadRequest(format!("{id:?} is not a node id (a libp2p peer id)"))
    })?;
    let chain = match Chain::load(state).await {
        Ok(c) => Some(c),
        Err(DataError::NoSettlement) => None,
        Err(e) => return Err(e),
    };
    let found = {
        let table = state
            .table
            .read()
            .map_err(|_| internal("node table poisoned"))?;
        let known = table.standing(&peer).cloned();
        let standing = known.clone().unwrap_or_default();
        match table.get(&peer) {
            None => Err((known, standing)),
            Some(e) => {
                // Lowest price others ask for each module this node serves.
                let mut prices = Vec::new();
                for o in &e.advert.modules {
                    let others = table
                        .serving(&o.module)
                        .filter(|n| n.advert.node != peer)
                        .filter_map(|n| {
                            n.advert
                                .modules
                                .iter()
                                .find(|m| m.module == o.module)
                                .map(|m| m.price.per_1k_output.0)
                        })
                        .min();
                    prices.push((o.alias.clone(), o.price.per_1k_output.0, others));
                }
                Ok((node_row(e, &standing), (prices, e.advert.addrs.clone())))
            }
        }
    };
    let (mut row, (prices, addrs)) = match found {
        Ok(found) => found,
        Err((known, standing)) => {
            // Not advertising: the page still answers why it earns nothing, from what
            // the coordinator remembers of it.
            let ledger = state.dispatcher.ledger().clone();
            let last = tokio::task::spawn_blocking(move || ledger.node_requests(&peer, 1))
                .await
                .map_err(internal)?
                .map_err(internal)?;
            if known.is_none() && last.is_empty() {
                return Err(DataError::NotFound(format!(
                    "node {peer} is not advertising and has never served a job here"
                )));
            }
            return Ok(offline_node(&peer, &standing, chain.as_ref(), last.first()));
        }
    };
    with_l2(state, chain.as_ref(), &mut row).await?;
    let payout = parse_address(row["payout"].as_str().unwrap_or_default())?;
    let l2 = match &chain {
        Some(c) => report(state, &payout).await?.map(|r| (node_json(&r, c), r)),
        None => None,
    };
    let ledger = state.dispatcher.ledger().clone();
    let jobs = tokio::task::spawn_blocking(move || ledger.node_requests(&peer, 50))
        .await
        .map_err(internal)?
        .map_err(internal)?;
    let last_job = jobs.first().map(|r| r.receipt.body.finished_ms);
    let by_job: Vec<Value> = jobs
        .iter()
        .map(|r| {
            let (st, batch) = request_status(chain.as_ref(), r);
            json!({
                "id": r.job.to_hex(),
                "time_ms": r.receipt.body.finished_ms,
                "module": r.receipt.body.module.to_string(),
                "tokens": r.receipt.body.usage.prompt_tokens + r.receipt.body.usage.completion_tokens,
                "paid": money(r.cost, st, None),
                "batch": batch,
                "audit": r.audit.as_ref().map(|a| a.result.clone()),
            })
        })
        .collect();
    let min_stake = state.dashboard_min_stake;
    let stake = l2.as_ref().map_or(0, |(_, r)| r.pending.stake);
    let price_ok = prices
        .iter()
        .all(|(_, mine, others)| others.is_none_or(|o| *mine <= o));
    let open = row["open_disputes"].as_u64().unwrap_or(0);
    let check =
        |name: &str, ok: bool, detail: String| json!({"check": name, "ok": ok, "detail": detail});
    let checklist = vec![
        check(
            "reachable",
            row["connected"].as_bool().unwrap_or(false),
            if row["connected"].as_bool().unwrap_or(false) {
                "the coordinator holds a connection to it".into()
            } else {
                "no open connection: check its listen address and firewall".into()
            },
        ),
        {
            let (ok, detail) = reachability_check(&addrs);
            check("reachable by other peers", ok, detail)
        },
        check(
            "advertising",
            true,
            format!(
                "{} module(s) advertised",
                row["modules"].as_array().map_or(0, Vec::len)
            ),
        ),
        check(
            "price within callers' limits",
            price_ok,
            prices
                .iter()
                .map(|(a, mine, others)| match others {
                    Some(o) => format!("{a}: {mine} per 1k output vs lowest other {o}"),
                    None => format!("{a}: {mine} per 1k output, the only node serving it"),
                })
                .collect::<Vec<_>>()
                .join("; "),
        ),
        check(
            "stake above minimum",
            stake >= min_stake,
            format!("own stake {stake}, minimum {min_stake}"),
        ),
        check(
            "no open dispute",
            open == 0,
            format!("{open} open dispute(s)"),
        ),
        check(
            "version",
            row["agent"].is_string(),
            row["agent"]
                .as_str()
                .unwrap_or("not identified yet")
                .to_owned(),
        ),
        check(
            "last job",
            last_job.is_some(),
            last_job.map_or_else(
                || "no job yet".to_owned(),
                |t| format!("finished at {t} (unix ms)"),
            ),
        ),
    ];
    let chart: Vec<Value> = l2
        .as_ref()
        .and_then(|(n, _)| n["earnings_by_epoch"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .map(|e| {
            let part = |k: &str| {
                e[k]["amount"]
                    .as_str()
                    .and_then(|c| c.parse::<u128>().ok())
                    .unwrap_or(0)
            };
            json!({
                "label": format!("epoch {} ({})", e["epoch"], s(&e["status"])),
                "value": (part("commission") + part("self_stake_share")).to_string(),
            })
        })
        .collect();
    Ok(json!({
        "object": "tessera.dashboard.node",
        "as_of": chain.as_ref().map_or_else(as_of_unsettled, Chain::as_of),
        "node": row,
        "l2": l2.map(|(n, _)| n),
        "operator": {"earnings_by_job": by_job, "why_not_earning": checklist},
        "chart": {"title": "Node's own earnings per epoch (commission + self-stake share)", "points": chart},
    }))
}

/// The node document of a node that is not advertising now.
fn offline_node(
    peer: &tessera_protocol::PeerId,
    standing: &crate::audit::NodeRecord,
    chain: Option<&Chain>,
    last: Option<&RequestRow>,
) -> Value {
    let check =
        |name: &str, ok: bool, detail: &str| json!({"check": name, "ok": ok, "detail": detail});
    let last_job = last.map(|r| r.receipt.body.finished_ms);
    json!({
        "object": "tessera.dashboard.node",
        "as_of": chain.map_or_else(as_of_unsettled, Chain::as_of),
        "node": {
            "node": peer.to_string(),
            "online": false,
            "connected": false,
            "payout": null,
            "agent": null,
            "modules": [],
            "tokens_per_s": null,
            "ttft_ms": null,
            "jobs_measured": 0,
            "uptime_s": 0,
            "failures": 0,
            "audits": {"passed": standing.passed, "failed": standing.failed, "missed": standing.missed},
            "open_disputes": standing.open_disputes,
            "slashed": money(standing.slashed.0, Status::Pending, None),
        },
        "l2": null,
        "operator": {
            "earnings_by_job": [],
            "why_not_earning": [
                check("reachable", false, "no open connection: is the node running, and can it reach the coordinator (listen address, firewall, bootstrap peers)?"),
                check("advertising", false, "no valid advert seen lately: it left, its adverts expired, or they do not arrive (clock, network)"),
                check("no open dispute", standing.open_disputes == 0, &format!("{} open dispute(s)", standing.open_disputes)),
                check("last job", last_job.is_some(), &last_job.map_or_else(|| "no job yet".to_owned(), |t| format!("finished at {t} (unix ms)"))),
            ],
        },
        "chart": {"title": "Node's own earnings per epoch (commission + self-stake share)", "points": []},
    })
}

/// The "reachable by other peers" line: how the addresses a node advertises let other
/// coordinators, auditors and pipeline peers dial it.
pub fn reachability_check(addrs: &[String]) -> (bool, String) {
    let parsed: Vec<tessera_net::Multiaddr> = addrs.iter().filter_map(|a| a.parse().ok()).collect();
    let (relayed, direct): (Vec<_>, Vec<_>) = parsed
        .iter()
        .partition(|a| tessera_net::reachability::is_relayed(a));
    if let Some(a) = direct.first() {
        let scope = if tessera_net::reachability::is_private(a) {
            "on its LAN"
        } else {
            "publicly"
        };
        return (true, format!("dialable {scope} at {a}"));
    }
    if let Some(a) = relayed.first() {
        return (
            true,
            format!(
                "behind NAT, reached through relay {}; hole punching upgrades about 7 in 10 such connections, the rest stay on the relay (forwarding a port makes it direct)",
                tessera_net::reachability::relay_part(a)
            ),
        );
    }
    (
        false,
        "its advert names no address others can dial: only a coordinator it connected to can send it jobs; run `tessera node --check` on the node".into(),
    )
}

/// `GET /api/v1/overview`: the network at a glance.
pub async fn overview(state: &ApiState) -> Result<Value, DataError> {
    let chain = match Chain::load(state).await {
        Ok(c) => Some(c),
        Err(DataError::NoSettlement) => None,
        Err(e) => return Err(e),
    };
    let (nodes, modules) = {
        let table = state
            .table
            .read()
            .map_err(|_| internal("node table poisoned"))?;
        let mut modules: BTreeMap<String, (u64, u128)> = BTreeMap::new();
        for e in table.nodes() {
            for o in &e.advert.modules {
                let m = modules.entry(o.alias.clone()).or_insert((0, u128::MAX));
                m.0 += 1;
                m.1 = m.1.min(o.price.per_1k_output.0);
            }
        }
        (table.len(), modules)
    };
    let ledger = state.dispatcher.ledger().clone();
    let (unbatched, audits) = tokio::task::spawn_blocking(move || {
        Ok::<_, crate::LedgerError>((ledger.unbatched()?, ledger.audits()?))
    })
    .await
    .map_err(internal)?
    .map_err(internal)?;
    let pending: u128 = unbatched.iter().map(|u| u.cost).sum();
    let (mut posted, mut final_) = (0u128, 0u128);
    if let Some(c) = &chain {
        for b in &c.batches {
            let v: u128 = b.settlements.iter().map(|s| s.split.amount).sum();
            match c.status(b.index) {
                Status::Final => final_ += v,
                _ => posted += v,
            }
        }
    }
    let passed = audits.iter().filter(|a| a.result == "passed").count();
    let failed = audits.iter().filter(|a| a.result == "failed").count();
    let chart: Vec<Value> = chain
        .as_ref()
        .map(|c| {
            c.batches
                .iter()
                .map(|b| json!({"label": format!("#{}", b.index), "value": b.settlements.iter().map(|s| s.split.amount).sum::<u128>().to_string()}))
                .collect()
        })
        .unwrap_or_default();
    Ok(json!({
        "object": "tessera.dashboard.overview",
        "as_of": chain.as_ref().map_or_else(as_of_unsettled, Chain::as_of),
        "nodes_online": nodes,
        "modules": modules.iter().map(|(alias, (n, p))| json!({"alias": alias, "nodes": n, "lowest_price_per_1k_output": p.to_string()})).collect::<Vec<_>>(),
        "settled": {
            "pending": money(pending, Status::Pending, None),
            "posted": money(posted, Status::Posted, None),
            "final": money(final_, Status::Final, None),
        },
        "batches": {"standing": chain.as_ref().map_or(0, |c| c.batches.len()), "final": chain.as_ref().map_or(0, |c| c.finalized)},
        "audits": {"passed": passed, "failed": failed},
        "chart": {"title": "Settled per batch", "points": chart},
    }))
}

#[cfg(test)]
mod tests {
    use super::reachability_check;

    #[test]
    fn the_reachability_line_tells_public_relayed_and_undialable_nodes_apart() {
        let relay =
            "/ip4/203.0.113.1/tcp/7300/p2p/12D3KooWQYV9dGMFoRzNStwpXztXaBUjtPqi6aU76ZgUriHhKust";
        let (ok, d) = reachability_check(&[format!("{relay}/p2p-circuit")]);
        assert!(ok);
        assert!(
            d.starts_with(&format!("behind NAT, reached through relay {relay};")),
            "{d}"
        );
        let (ok, d) = reachability_check(&[
            format!("{relay}/p2p-circuit"),
            "/ip4/203.0.113.11/tcp/7400".into(),
        ]);
        assert!(ok);
        assert_eq!(d, "dialable publicly at /ip4/203.0.113.11/tcp/7400");
        let (ok, d) = reachability_check(&["/ip4/127.0.0.1/tcp/1".into()]);
        assert!(ok && d.contains("on its LAN"), "{d}");
        let (ok, d) = reachability_check(&[]);
        assert!(!ok);
        assert!(d.contains("tessera node --check"), "{d}");
    }
}
