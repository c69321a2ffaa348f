//! "Verify": checks a proof from a page against what the settlement contract holds. An
//! account (or statement row) leaf is hashed and folded up its sparse Merkle proof, and
//! the result compared with the root the contract stores for that batch; a receipt's
//! signature is checked and its leaf folded up its path to the receipts root, which must
//! be carried by a settlement of a standing batch. Anything that does not hold is
//! `failed`, never `final`.

use super::data::{self, hex32, Chain, DataError};
use crate::api::ApiState;
use serde::Deserialize;
use serde_json::{json, Value};
use tessera_contracts::Contracts;
use tessera_protocol::{Receipt, Signed};
use tessera_rollup::{MerkleProof, H256};

/// What to verify (`POST /api/v1/verify`, JSON with a `kind`).
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum VerifyRequest {
    /// An account leaf (an account page's proof, or a statement row's).
    Account {
        /// The batch whose root it proves against.
        batch: u64,
        /// The leaf's slot.
        slot: u32,
        /// The leaf's preimage, `0x` hex.
        leaf: String,
        /// Which siblings are carried.
        bitmap: u32,
        /// The carried siblings, `0x` hex, from the leaf up.
        siblings: Vec<String>,
    },
    /// A signed receipt and its inclusion path.
    Receipt {
        /// The signed receipt, as the API shows it.
        receipt: Value,
        /// The settlement's receipts root, `0x` hex.
        receipts_root: Option<String>,
        /// The receipt's position under it.
        index: Option<usize>,
        /// The siblings from the leaf up.
        path: Option<Vec<String>>,
    },
}

/// The same as a page's form (every field a string).
#[derive(Clone, Debug, Deserialize)]
pub struct VerifyForm {
    kind: String,
    #[serde(default)]
    batch: String,
    #[serde(default)]
    slot: String,
    #[serde(default)]
    leaf: String,
    #[serde(default)]
    bitmap: String,
    #[serde(default)]
    siblings: String,
    #[serde(default)]
    receipt: String,
    #[serde(default)]
    receipts_root: String,
    #[serde(default)]
    index: String,
    #[serde(default)]
    path: String,
}

fn list(s: &str) -> Vec<String> {
    s.split([',', ' ', '\n'])
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(str::to_owned)
        .collect()
}

fn num<T: std::str::FromStr>(field: &str, s: &str) -> Result<T, DataError> {
    s.trim()
        .parse()
        .map_err(|_| DataError::BadRequest(format!("{field} must be a number, not {s:?}")))
}

impl VerifyForm {
    /// The request the form describes.
    pub fn into_request(self) -> Result<VerifyRequest, DataError> {
        match self.kind.as_str() {
            "account" => Ok(VerifyRequest::Account {
                batch: num("batch", &self.batch)?,
                slot: num("slot", &self.slot)?,
                leaf: self.leaf,
                bitmap: num("bitmap", &self.bitmap)?,
                siblings: list(&self.siblings),
            }),
            "receipt" => Ok(VerifyRequest::Receipt {
                receipt: serde_json::from_str(&self.receipt)
                    .map_err(|e| DataError::BadRequest(format!("the receipt is not JSON: {e}")))?,
                receipts_root: Some(self.receipts_root).filter(|s| !s.is_empty()),
                index: if self.index.trim().is_empty() {
                    None
                } else {
                    Some(num("index", &self.index)?)
                },
                path: Some(list(&self.path)),
            }),
            k => Err(DataError::BadRequest(format!(
                "kind must be account or receipt, not {k:?}"
            ))),
        }
    }
}

fn h256(field: &str, s: &str) -> Result<H256, String> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(s.trim().trim_start_matches("0x"), &mut out)
        .map_err(|_| format!("{field} is not 32 bytes of 0x hex: {s:?}"))?;
    Ok(out)
}

fn check(name: &str, ok: bool, detail: impl Into<String>) -> Value {
    json!({"check": name, "ok": ok, "detail": detail.into()})
}

/// Runs a verification; a proof that does not hold is an `ok: false`, `status: failed`
/// answer, not an error.
pub async fn verify(state: &ApiState, req: &VerifyRequest) -> Result<Value, DataError> {
    let chain = Chain::load(state).await?;
    let (Some(l1), Some(d)) = (&state.chain, &state.deployment) else {
        return Err(DataError::NoSettlement);
    };
    let contracts = Contracts::new(l1, d);
    let mut checks = Vec::new();
    let mut out = json!({
        "object": "tessera.dashboard.verification",
        "as_of": chain.as_of(),
        "contract": d.settlement.to_string(),
    });
    let standing = chain.batches.last().map_or(0, |b| b.index + 1);
    let contracts = &contracts;
    // A batch that is not standing is a failed check; an L1 that cannot be read is an
    // error (a valid proof must not read as failed because the chain was unreachable).
    let batch_root = |i: u64| async move {
        if i >= standing {
            return Ok(None);
        }
        contracts
            .batch(i)
            .await
            .map(|r| Some(r.root.0))
            .map_err(|e| DataError::Internal(format!("cannot read batch {i} from L1: {e}")))
    };
    let mut status_batch: Option<u64> = None;
    match req {
        VerifyRequest::Account {
            batch,
            slot,
            leaf,
            bitmap,
            siblings,
        } => {
            out["kind"] = json!("account");
            out["batch"] = json!(batch);
            out["slot"] = json!(slot);
            let parsed: Result<(Vec<u8>, Vec<H256>), String> = (|| {
                let leaf = hex::decode(leaf.trim().trim_start_matches("0x"))
                    .map_err(|_| format!("leaf is not 0x hex: {leaf:?}"))?;
                let sib = siblings
                    .iter()
                    .map(|s| h256("sibling", s))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((leaf, sib))
            })();
            match parsed {
                Err(e) => checks.push(check("proof readable", false, e)),
                Ok((preimage, siblings)) => {
                    let proof = MerkleProof {
                        bitmap: *bitmap,
                        siblings,
                    };
                    let leaf_hash = tessera_rollup::keccak256(&preimage);
                    match proof.root(*slot, &leaf_hash) {
                        Err(e) => checks.push(check("proof readable", false, e.to_string())),
                        Ok(computed) => {
                            out["computed_root"] = json!(hex32(&computed));
                            match batch_root(*batch).await? {
                                None => checks.push(check(
                                    "batch on the contract",
                                    false,
                                    format!("the contract holds no standing batch {batch}"),
                                )),
                                Some(root) => {
                                    out["contract_root"] = json!(hex32(&root));
                                    checks.push(check(
                                        "root matches the contract",
                                        root == computed,
                                        if root == computed {
                                            "the leaf and proof fold up to the root the contract stores".to_owned()
                                        } else {
                                            format!("computed {} but the contract stores {}", hex32(&computed), hex32(&root))
                                        },
                                    ));
                                    status_batch = Some(*batch);
                                }
                            }
                            if let Some(a) = tessera_rollup::Account::decode(&preimage) {
                                out["leaf_fields"] = json!({
                                    "address": format!("0x{}", hex::encode(a.address)),
                                    "balance": a.balance.to_string(),
                                    "earned": a.earned.to_string(),
                                    "withdrawn": a.withdrawn.to_string(),
                                    "stake": a.stake.to_string(),
                                });
                            }
                        }
                    }
                }
            }
        }
        VerifyRequest::Receipt {
            receipt,
            receipts_root,
            index,
            path,
        } => {
            out["kind"] = json!("receipt");
            match serde_json::from_value::<Signed<Receipt>>(receipt.clone()) {
                Err(e) => checks.push(check("receipt readable", false, e.to_string())),
                Ok(signed) => {
                    out["id"] = json!(signed.body.job_id.to_hex());
                    let sig = data::check_signature(&signed);
                    let valid = sig["valid"].as_bool().unwrap_or(false);
                    checks.push(check(
                        "signature",
                        valid,
                        sig["error"].as_str().map_or_else(
                            || format!("signed by the node it names, {}", signed.body.node),
                            str::to_owned,
                        ),
                    ));
                    let encoded = tessera_protocol::wire::encode(
                        &signed,
                        tessera_protocol::job::MAX_EVENT_FRAME,
                    )
                    .map_err(|e| DataError::BadRequest(e.to_string()))?;
                    let leaf = tessera_rollup::keccak256(&encoded);
                    out["leaf"] = json!(hex32(&leaf));
                    match (receipts_root, index, path) {
                        (Some(root), Some(i), Some(path)) => {
                            let parsed = h256("receipts_root", root).and_then(|r| {
                                let p = path
                                    .iter()
                                    .map(|s| h256("path", s))
                                    .collect::<Result<Vec<_>, _>>()?;
                                Ok((r, p))
                            });
                            match parsed {
                                Err(e) => checks.push(check("path readable", false, e)),
                                Ok((_, p))
                                    if p.len() >= usize::BITS as usize || *i >> p.len() != 0 =>
                                {
                                    checks.push(check(
                                        "path readable",
                                        false,
                                        format!(
                                            "index {i} does not fit a path of {} levels",
                                            p.len()
                                        ),
                                    ));
                                }
                                Ok((root, p)) => {
                                    let computed =
                                        crate::sequencer::receipts_root_from_path(&leaf, *i, &p);
                                    out["computed_root"] = json!(hex32(&computed));
                                    checks.push(check(
                                        "inclusion path",
                                        computed == root,
                                        if computed == root {
                                            format!(
                                                "the receipt is leaf {i} under {}",
                                                hex32(&root)
                                            )
                                        } else {
                                            format!(
                                                "the path folds up to {}, not {}",
                                                hex32(&computed),
                                                hex32(&root)
                                            )
                                        },
                                    ));
                                    match chain.roots.get(&root) {
                                        Some(b) => {
                                            let on_l1 = batch_root(*b).await?;
                                            let summary_root = chain.batches.iter().find(|x| x.index == *b).map(|x| x.root);
                                            let ok = on_l1.is_some() && on_l1 == summary_root;
                                            checks.push(check(
                                                "settled in a batch on the contract",
                                                ok,
                                                format!("batch {b} carries a settlement with this receipts root"),
                                            ));
                                            out["batch"] = json!(b);
                                            status_batch = Some(*b);
                                        }
                                        None => checks.push(check(
                                            "settled in a batch on the contract",
                                            false,
                                            "no standing batch carries this receipts root (pending, or unknown)",
                                        )),
                                    }
                                }
                            }
                        }
                        _ => checks.push(check(
                            "inclusion path",
                            false,
                            "no receipts root and path: the receipt is not in a batch yet",
                        )),
                    }
                }
            }
        }
    }
    let ok = !checks.is_empty() && checks.iter().all(|c| c["ok"].as_bool() == Some(true));
    let status = match (ok, status_batch) {
        (true, Some(b)) => chain.status(b).as_str(),
        _ => "failed",
    };
    out["ok"] = json!(ok);
    out["status"] = json!(status);
    out["checks"] = json!(checks);
    Ok(out)
}
