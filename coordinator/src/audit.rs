//! Audits by replay: a share of settled jobs is sent to another node serving the same
//! weights, which replays the transcript in one teacher-forced pass and signs a verdict
//! (ARCHITECTURE.md, step 6). A failed audit opens a dispute that keeps both transcripts,
//! drops the node's reputation, takes it out of routing, and queues a slash of its stake
//! for the rollup's sequencer. A failing verdict is replayed again on a second auditor:
//! a dispute needs two auditors to agree, so one lying or broken auditor can neither get
//! an honest node slashed nor clear a cheat alone.
//!
//! Which jobs: always the first [`AuditConfig::first_jobs`] of a node this coordinator has
//! not yet seen pass, then [`AuditConfig::share`] of the rest, raised to
//! [`AuditConfig::raised_share`] for a node with a failed audit or an audit that could not
//! be run. The draw hashes the job id with a per-process secret, so a node cannot tell
//! which of its jobs will be replayed. The auditor is paid for its replay like any job
//! (priced as input tokens), from the audit account.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tessera_net::PeerId;
use tessera_protocol::{
    Address, Amount, JobId, JobInput, ModuleId, ReplayClaim, SamplingParams, TokenRecord,
    TranscriptCommitment, Verdict,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::client::{JobClient, JobSpec};
use crate::ledger::Ledger;
use crate::metrics::Metrics;
use crate::sequencer::SequencerHandle;
use crate::table::NodeTable;

/// How audits are chosen, judged and punished.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuditConfig {
    /// Whether jobs are audited at all.
    pub enabled: bool,
    /// Share of a node's jobs replayed once it has a clean record.
    pub share: f64,
    /// Share for a node with a failed audit or one that could not be run.
    pub raised_share: f64,
    /// A node's first jobs on this coordinator are always audited, until this many passed.
    pub first_jobs: u32,
    /// Share of passes checked again on a second auditor (an auditor that passes what it
    /// did not replay is then contradicted).
    pub confirm_share: f64,
    /// Logit tolerance the auditor judges with.
    pub tolerance: f32,
    /// Stake slashed for a failed audit, in base units.
    pub slash: Amount,
    /// Account that pays auditors.
    pub account: String,
    /// Audits waiting to run; beyond it new ones are dropped (and counted).
    pub queue: usize,
    /// Longest an audit job may run.
    #[serde(with = "tessera_net::config::secs")]
    pub timeout: Duration,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            share: 0.05,
            raised_share: 0.5,
            first_jobs: 3,
            confirm_share: 0.1,
            tolerance: tessera_protocol::audit::DEFAULT_TOLERANCE,
            slash: Amount(100_000_000),
            account: "tessera-audits".into(),
            queue: 64,
            timeout: Duration::from_secs(300),
        }
    }
}

impl AuditConfig {
    /// Checks ranges once, at start.
    pub fn validate(&self) -> Result<(), String> {
        let share_ok = |s: f64| (0.0..=1.0).contains(&s);
        if !share_ok(self.share) || !share_ok(self.raised_share) || !share_ok(self.confirm_share) {
            return Err(format!(
                "audit shares must be in [0, 1], got share {}, raised_share {} and confirm_share {}",
                self.share, self.raised_share, self.confirm_share
            ));
        }
        if !(self.tolerance.is_finite() && self.tolerance >= 0.0) {
            return Err(format!(
                "audit tolerance must be ≥ 0 logits, got {}",
                self.tolerance
            ));
        }
        if self.queue == 0 {
            return Err("audit queue must hold at least one audit".into());
        }
        crate::ledger::check_account_id(&self.account).map_err(|e| e.to_string())
    }
}

/// A node's standing with this coordinator: its audit history and reputation.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Audits that passed.
    pub passed: u64,
    /// Audits that failed.
    pub failed: u64,
    /// Audits that could not be run (no other node serving its weights, the auditor
    /// failed, the audit fund empty).
    pub missed: u64,
    /// Disputes open against it.
    pub open_disputes: u32,
    /// Stake slashed or queued for slashing, in base units.
    pub slashed: Amount,
    /// When it was last audited (unix ms).
    pub last_audit_ms: Option<u64>,
}

impl NodeRecord {
    /// Reputation in [0, 1]: passed audits raise it, a failed one weighs as ten passes;
    /// an unaudited node starts at one half.
    pub fn reputation(&self) -> f64 {
        (self.passed as f64 + 1.0) / (self.passed as f64 + 10.0 * self.failed as f64 + 2.0)
    }

    /// Whether routing leaves it out: a node with an open dispute gets no jobs.
    pub fn excluded(&self) -> bool {
        self.open_disputes > 0
    }

    /// The share of its jobs to audit under `config`.
    pub fn audit_share(&self, config: &AuditConfig) -> f64 {
        if self.passed < u64::from(config.first_jobs) && self.failed == 0 {
            1.0
        } else if self.failed > 0 || self.missed > 0 {
            config.raised_share
        } else {
            config.share
        }
    }
}

/// Where a queued slash stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "status", content = "detail")]
pub enum SlashStatus {
    /// Recorded; no settlement is configured to apply it (a coordinator without L1).
    Queued,
    /// Handed to the sequencer: it goes out in the next batch.
    Submitted,
    /// The sequencer could not apply it (no L2 account, nothing staked, …).
    NotApplied(String),
}

/// A slash queued for a failed audit.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Slash {
    /// The node's payout address (its L2 account).
    pub payout: Address,
    /// Base units to take from its stake.
    pub amount: Amount,
    /// Hash of the dispute record, carried by the rollup transaction as evidence.
    #[serde(with = "hex_bytes")]
    pub evidence: [u8; 32],
    /// Where it stands.
    pub status: SlashStatus,
}

mod hex_bytes {
    pub fn serialize<S: serde::Serializer>(b: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(b))
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s: String = serde::Deserialize::deserialize(d)?;
        let mut out = [0u8; 32];
        hex::decode_to_slice(&s, &mut out).map_err(serde::de::Error::custom)?;
        Ok(out)
    }
}

/// One audit and how it ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// The audited job (its receipt id).
    pub job: String,
    /// The audited node.
    pub node: String,
    /// The module it claimed.
    pub module: String,
    /// The auditing node, if one ran it.
    pub auditor: Option<String>,
    /// The audit's own job id (the auditor's receipt), if it ran.
    pub audit_job: Option<String>,
    /// `passed`, `failed` or `missed`.
    pub result: String,
    /// Why it was missed, or the verdict's summary.
    pub detail: String,
    /// The verdict, if the replay ran.
    pub verdict: Option<Verdict>,
    /// When it ended (unix ms).
    pub at_ms: u64,
}

/// A failed audit: both transcripts, the verdict, and the slash it queued.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Dispute {
    /// The audit.
    pub audit: AuditRecord,
    /// The records the audited node committed to in its receipt.
    pub claimed: Vec<TokenRecord>,
    /// The same positions as the auditor's replay computed them.
    pub replayed: Vec<TokenRecord>,
    /// The commitment in the audited node's receipt.
    pub commitment: TranscriptCommitment,
    /// The slash queued for it.
    pub slash: Slash,
    /// Whether it is still open (the node stays out of routing while it is).
    pub open: bool,
}

impl Dispute {
    /// The evidence hash a slash carries: blake3 of the dispute's JSON without the slash.
    pub fn evidence(
        audit: &AuditRecord,
        claimed: &[TokenRecord],
        replayed: &[TokenRecord],
    ) -> [u8; 32] {
        let body = serde_json::to_vec(&(audit, claimed, replayed)).unwrap_or_default();
        *blake3::Hasher::new_derive_key("tessera dispute evidence v1")
            .update(&body)
            .finalize()
            .as_bytes()
    }
}

/// A settled job offered for audit.
#[derive(Clone, Debug)]
pub struct AuditCase {
    /// The job.
    pub job: JobId,
    /// The node that ran it.
    pub node: PeerId,
    /// Where the node is paid (its L2 account, for a slash).
    pub payout: Address,
    /// The module it claimed.
    pub module: ModuleId,
    /// Its engine's numerics, from its advert: only a node of the same numerics replays
    /// its transcript exactly (docs/verification.md).
    pub numerics: String,
    /// The prompt.
    pub input: JobInput,
    /// The sampler settings and seed.
    pub sampling: SamplingParams,
    /// Prompt tokens its receipt counts (the auditor must count the same).
    pub prompt_tokens: u32,
    /// The transcript it streamed (checked against its commitment).
    pub records: Vec<TokenRecord>,
    /// Its commitment.
    pub commitment: TranscriptCommitment,
}

/// The API side of the auditor: offer settled jobs; the audit task decides and runs.
#[derive(Clone)]
pub struct Auditor {
    tx: mpsc::Sender<AuditCase>,
    metrics: Arc<Metrics>,
    table: Arc<RwLock<NodeTable>>,
    config: Arc<AuditConfig>,
    secret: [u8; 32],
}

impl Auditor {
    /// Whether to audit `job` of `node`, decided at once from the node's standing and a
    /// draw the node cannot predict (so only chosen jobs are copied and queued).
    pub fn chooses(&self, job: &JobId, node: &PeerId) -> bool {
        let share = self
            .table
            .read()
            .ok()
            .map(|t| t.standing(node).cloned().unwrap_or_default())
            .unwrap_or_default()
            .audit_share(&self.config);
        draw(&self.secret, job) < share
    }

    /// Queues a chosen job for the audit task without waiting; when the queue is full the
    /// audit is dropped (counted as `dropped`). Jobs longer than a replay claim can carry
    /// are counted as `too_long`.
    pub fn offer(&self, case: AuditCase) {
        if case.records.is_empty() {
            return;
        }
        if case.records.len() > tessera_protocol::audit::MAX_REPLAY_RECORDS {
            self.metrics.audit("too_long");
            return;
        }
        if self.tx.try_send(case).is_err() {
            self.metrics.audit("dropped");
        }
    }
}

/// What the audit task needs.
pub struct AuditDeps {
    /// Opens audit jobs.
    pub client: JobClient,
    /// Finds auditors; receives standings for routing.
    pub table: Arc<RwLock<NodeTable>>,
    /// Persists records, disputes and the auditors' receipts.
    pub ledger: Arc<Ledger>,
    /// Counts audits.
    pub metrics: Arc<Metrics>,
    /// Applies slashes, when settlement is configured.
    pub sequencer: Option<SequencerHandle>,
}

/// Starts the audit task; it stops when `stop` fires. Standings stored in the ledger are
/// loaded into the node table first, so a restart keeps disputed nodes out of routing.
pub fn spawn(
    config: AuditConfig,
    deps: AuditDeps,
    tasks: &tokio_util::task::TaskTracker,
    stop: CancellationToken,
) -> Auditor {
    if let Ok(records) = deps.ledger.node_records() {
        if let Ok(mut t) = deps.table.write() {
            for (node, rec) in records {
                if let Ok(peer) = node.parse::<PeerId>() {
                    t.set_standing(peer, rec);
                }
            }
        }
    }
    let (tx, mut rx) = mpsc::channel::<AuditCase>(config.queue);
    let secret: [u8; 32] = *blake3::hash(&crate::client::new_job_id().0).as_bytes();
    let auditor = Auditor {
        tx,
        metrics: deps.metrics.clone(),
        table: deps.table.clone(),
        config: Arc::new(config.clone()),
        secret,
    };
    tasks.spawn(async move {
        resubmit_slashes(&deps).await;
        loop {
            let case = tokio::select! {
                c = rx.recv() => match c { Some(c) => c, None => break },
                () = stop.cancelled() => break,
            };
            tokio::select! {
                () = run_case(&config, &deps, &secret, case) => {}
                () = stop.cancelled() => break,
            }
        }
        tracing::debug!("audit task stopped");
    });
    auditor
}

/// Hands the sequencer the slashes of every open dispute again at start: one queued before
/// settlement was configured, or submitted but lost with a crash before its batch, goes
/// out now; one already posted is recognised by its evidence and not applied twice.
async fn resubmit_slashes(deps: &AuditDeps) {
    let Some(seq) = &deps.sequencer else { return };
    let ledger = deps.ledger.clone();
    let Some(Ok(disputes)) = blocking(move || ledger.disputes()).await else {
        tracing::error!("cannot read the disputes to resubmit their slashes");
        return;
    };
    for d in disputes.into_iter().filter(|d| d.open) {
        if !matches!(d.slash.status, SlashStatus::Queued | SlashStatus::Submitted) {
            continue;
        }
        let status = match seq
            .slash(d.slash.payout, d.slash.amount, d.slash.evidence)
            .await
        {
            Ok(()) => SlashStatus::Submitted,
            Err(e) => SlashStatus::NotApplied(e.to_string()),
        };
        tracing::info!(job = %d.audit.job, node = %d.audit.node, ?status, "slash of an open dispute handed to the sequencer");
        let (ledger, job) = (deps.ledger.clone(), d.audit.job.clone());
        if let Some(Err(e)) = blocking(move || ledger.set_slash_status(&job, status)).await {
            tracing::error!(error = %e, "cannot record a slash's status");
        }
    }
}

/// Uniform in [0, 1) from the job id and the secret: unpredictable to the node.
fn draw(secret: &[u8; 32], job: &JobId) -> f64 {
    let h = blake3::keyed_hash(secret, &job.0);
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.as_bytes()[..8]);
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    tokio::task::spawn_blocking(f).await.ok()
}

async fn run_case(config: &AuditConfig, deps: &AuditDeps, secret: &[u8; 32], case: AuditCase) {
    // A node taken out of routing since this job was queued has its dispute already.
    let excluded = deps
        .table
        .read()
        .map(|t| t.standing(&case.node).is_some_and(NodeRecord::excluded))
        .unwrap_or(false);
    if excluded {
        return;
    }
    let outcome = audit(config, deps, secret, &case).await;
    let ledger = deps.ledger.clone();
    let node = case.node.to_string();
    let saved = match outcome {
        Outcome::Passed(audit) => {
            deps.metrics.audit("passed");
            tracing::info!(job = %case.job, node = %case.node, "{}", audit.detail);
            blocking(move || ledger.record_audit(&node, &audit, None)).await
        }
        Outcome::Missed(audit) => {
            deps.metrics.audit("missed");
            tracing::warn!(job = %case.job, node = %case.node, "audit inconclusive: {}", audit.detail);
            blocking(move || ledger.record_audit(&node, &audit, None)).await
        }
        Outcome::Failed(audit, replayed) => {
            deps.metrics.audit("failed");
            tracing::warn!(job = %case.job, node = %case.node, "AUDIT FAILED: {}", audit.detail);
            let evidence = Dispute::evidence(&audit, &case.records, &replayed);
            let dispute = Dispute {
                audit: audit.clone(),
                claimed: case.records.clone(),
                replayed,
                commitment: case.commitment,
                slash: Slash {
                    payout: case.payout,
                    amount: config.slash,
                    evidence,
                    status: SlashStatus::Queued,
                },
                open: true,
            };
            // The dispute is on record before its slash leaves: a crash in between leaves
            // a queued slash that the next start hands over, never a slash without a
            // dispute.
            let saved = blocking(move || ledger.record_audit(&node, &audit, Some(&dispute))).await;
            if let (Some(Ok(_)), Some(seq)) = (&saved, &deps.sequencer) {
                let status = match seq.slash(case.payout, config.slash, evidence).await {
                    Ok(()) => SlashStatus::Submitted,
                    Err(e) => SlashStatus::NotApplied(e.to_string()),
                };
                tracing::warn!(node = %case.node, amount = %config.slash, ?status, "slash queued");
                let (ledger, job) = (deps.ledger.clone(), case.job.to_hex());
                if let Some(Err(e)) = blocking(move || ledger.set_slash_status(&job, status)).await
                {
                    tracing::error!(error = %e, "cannot record a slash's status");
                }
            }
            saved
        }
    };
    match saved {
        Some(Ok(record)) => publish(deps, &case.node, &record),
        Some(Err(e)) => tracing::error!(job = %case.job, error = %e, "cannot record an audit"),
        None => tracing::error!(job = %case.job, "ledger task failed recording an audit"),
    }
}

fn publish(deps: &AuditDeps, node: &PeerId, record: &NodeRecord) {
    if let Ok(mut t) = deps.table.write() {
        t.set_standing(*node, record.clone());
    }
}

enum Outcome {
    Passed(AuditRecord),
    Failed(AuditRecord, Vec<TokenRecord>),
    Missed(AuditRecord),
}

/// An audit's reservation, released when dropped unless it was settled.
struct Hold {
    ledger: Arc<Ledger>,
    job: Option<JobId>,
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Some(job) = self.job.take() {
            // One small local write; no await is possible in a drop.
            if let Err(e) = self.ledger.release(job) {
                tracing::error!(%job, error = %e, "releasing an audit's reservation failed");
            }
        }
    }
}

/// One replay on one auditor.
struct Replay {
    auditor: PeerId,
    audit_job: JobId,
    verdict: Verdict,
    records: Vec<TokenRecord>,
}

/// Picks an auditor (not in `exclude`), pays it from the audit account, and runs the
/// replay. `Err` says why it could not run.
async fn replay_once(
    config: &AuditConfig,
    deps: &AuditDeps,
    secret: &[u8; 32],
    case: &AuditCase,
    exclude: &[(PeerId, Address)],
) -> Result<Replay, String> {
    let (auditor, module, price, payout) =
        pick_auditor(deps, secret, case, exclude).ok_or_else(|| {
            format!(
                "no other node serves weights {} to replay on",
                case.module.weights
            )
        })?;
    // The replay reads the prompt (as the audited receipt counts it) and every claimed
    // token: the most the auditor is paid (settling caps a charge at its reservation).
    let tokens = case.prompt_tokens.saturating_add(case.records.len() as u32);
    let bound = price
        .cost(tokens, 0)
        .ok_or("the auditor's price overflows")?;
    let audit_job = crate::client::new_job_id();
    // Reserved and guarded with no await in between (one small local write): a
    // coordinator that stops drops this future at an await, and the hold must then be
    // released, never left behind. Released however the audit ends unless settled.
    deps.ledger
        .reserve(&config.account, audit_job, bound)
        .map_err(|e| {
            format!(
                "cannot pay the auditor from account {:?}: {e}",
                config.account
            )
        })?;
    let mut hold = Hold {
        ledger: deps.ledger.clone(),
        job: Some(audit_job),
    };
    let _busy = InFlight::begin(&deps.table, auditor);
    let spec = JobSpec {
        module,
        payer: config.account.clone(),
        input: case.input.clone(),
        sampling: case.sampling.clone(),
        max_tokens: 1,
        stop: Vec::new(),
        max_price: price,
        timeout: config.timeout,
        replay: Some(ReplayClaim {
            commitment: case.commitment,
            records: case.records.clone(),
            tolerance: config.tolerance,
        }),
    };
    let run = async {
        deps.client
            .start_with_id(auditor, spec, audit_job)
            .await?
            .collect()
            .await
    };
    let outcome = match run.await {
        Ok(o) => o,
        Err(e) => return Err(format!("the auditor {auditor} failed: {e}")),
    };
    // An auditor's word is checked before it is paid: the verdict must be about this
    // claim, and a pass must agree with the auditor's own replayed records.
    let verdict = outcome
        .result
        .receipt
        .body
        .verdict
        .clone()
        .ok_or("the auditor's receipt carries no verdict")?;
    check_verdict(config, case, &outcome, &verdict)
        .map_err(|why| format!("the auditor {auditor}'s verdict is inconsistent: {why}"))?;
    let (ledger, receipt) = (deps.ledger.clone(), outcome.result.receipt.clone());
    match blocking(move || ledger.settle(audit_job, &receipt, &payout)).await {
        Some(Ok(_)) => hold.job = None,
        Some(Err(e)) => {
            tracing::error!(%audit_job, error = %e, "settling the auditor's receipt failed")
        }
        None => tracing::error!(%audit_job, "ledger task failed settling an audit"),
    }
    Ok(Replay {
        auditor,
        audit_job,
        verdict,
        records: outcome.transcript,
    })
}

/// Whether an auditor's answer is about this claim and agrees with itself: the positions,
/// tolerance and commitment of the claim, and, for a pass,
/// a replayed transcript of the claimed tokens whose fingerprints are within tolerance of
/// the claimed ones (checked here, without a model).
fn check_verdict(
    config: &AuditConfig,
    case: &AuditCase,
    outcome: &crate::client::JobOutcome,
    verdict: &Verdict,
) -> Result<(), String> {
    if verdict.positions as usize != case.records.len() {
        return Err(format!(
            "it judged {} positions of {}",
            verdict.positions,
            case.records.len()
        ));
    }
    if (verdict.tolerance - config.tolerance).abs() > f32::EPSILON {
        return Err(format!("it judged at tolerance {}", verdict.tolerance));
    }
    if verdict.commitment != case.commitment && verdict.passed {
        return Err("it passed records that do not hash to the receipt's commitment".into());
    }
    if verdict.passed {
        let replayed = &outcome.transcript;
        if replayed.len() != case.records.len() {
            return Err("a pass without the replayed records".into());
        }
        for (i, (c, r)) in case.records.iter().zip(replayed).enumerate() {
            if (c.position, c.token) != (r.position, r.token) {
                return Err(format!("replayed record {i} is not the claimed position"));
            }
            let gap = c.fingerprint.gap(&r.fingerprint);
            if gap > config.tolerance {
                return Err(format!(
                    "it passed record {i} although its own replay is {gap:.3} logits from the claim"
                ));
            }
        }
    }
    Ok(())
}

/// A job counted against a node's in-flight figure until dropped.
struct InFlight {
    table: Arc<RwLock<NodeTable>>,
    node: PeerId,
}

impl InFlight {
    fn begin(table: &Arc<RwLock<NodeTable>>, node: PeerId) -> Self {
        if let Ok(mut t) = table.write() {
            t.begin_job(&node);
        }
        Self {
            table: table.clone(),
            node,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut t) = self.table.write() {
            t.end_job(&self.node);
        }
    }
}

/// Runs the audit: one replay, and when it fails a second one on another auditor to
/// confirm. A dispute needs two auditors to agree: one lying or broken auditor can neither
/// get an honest node slashed nor clear a cheat alone. A failure nobody could confirm
/// (no third node serves the weights) or that another auditor contradicts counts as a
/// missed audit, which raises the node's audit share until the truth shows.
async fn audit(
    config: &AuditConfig,
    deps: &AuditDeps,
    secret: &[u8; 32],
    case: &AuditCase,
) -> Outcome {
    let mut rec = AuditRecord {
        job: case.job.to_hex(),
        node: case.node.to_string(),
        module: case.module.to_string(),
        auditor: None,
        audit_job: None,
        result: "missed".into(),
        detail: String::new(),
        verdict: None,
        at_ms: tessera_protocol::now_ms(),
    };
    let me = (case.node, case.payout);
    let first = match replay_once(config, deps, secret, case, &[me]).await {
        Ok(r) => r,
        Err(why) => {
            rec.detail = why;
            return Outcome::Missed(rec);
        }
    };
    rec.auditor = Some(first.auditor.to_string());
    rec.audit_job = Some(first.audit_job.to_hex());
    rec.detail = first.verdict.summary();
    rec.verdict = Some(first.verdict.clone());
    let first_payout = payout_of(deps, &first.auditor);
    if first.verdict.passed {
        // A share of passes goes to a second auditor too (drawn apart from the audit's own
        // draw): one that passed without replaying is then contradicted.
        let mut key = case.job.0.to_vec();
        key.extend_from_slice(b"confirm");
        let h = blake3::keyed_hash(secret, &key);
        let mut b = [0u8; 8];
        b.copy_from_slice(&h.as_bytes()[..8]);
        let confirm =
            ((u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64) < config.confirm_share;
        if confirm {
            if let Ok(second) = replay_once(
                config,
                deps,
                secret,
                case,
                &[me, (first.auditor, first_payout)],
            )
            .await
            {
                if !second.verdict.passed {
                    rec.detail = format!(
                        "contested: auditor {} passed it, auditor {} failed it ({})",
                        first.auditor,
                        second.auditor,
                        second.verdict.summary()
                    );
                    return Outcome::Missed(rec);
                }
            }
        }
        rec.result = "passed".into();
        return Outcome::Passed(rec);
    }
    match replay_once(
        config,
        deps,
        secret,
        case,
        &[me, (first.auditor, first_payout)],
    )
    .await
    {
        Ok(second) if !second.verdict.passed => {
            rec.result = "failed".into();
            rec.detail = format!(
                "{} (confirmed by {}: {})",
                first.verdict.summary(),
                second.auditor,
                second.verdict.summary()
            );
            Outcome::Failed(rec, first.records)
        }
        Ok(second) => {
            rec.detail = format!(
                "contested: auditor {} failed it ({}), auditor {} passed it",
                first.auditor,
                first.verdict.summary(),
                second.auditor
            );
            Outcome::Missed(rec)
        }
        Err(why) => {
            rec.detail = format!(
                "unconfirmed: auditor {} failed it ({}), and no second auditor could confirm ({why})",
                first.auditor,
                first.verdict.summary()
            );
            Outcome::Missed(rec)
        }
    }
}

/// The payout address `node` advertises (zero if it left).
fn payout_of(deps: &AuditDeps, node: &PeerId) -> Address {
    deps.table
        .read()
        .ok()
        .and_then(|t| t.get(node).map(|e| e.advert.payout))
        .unwrap_or_default()
}

/// Another node serving the same weights with the same numerics, chosen at random (keyed by the job and the
/// coordinator's secret, so no node can arrange to be picked), never one in `exclude` by
/// peer id or payout address (a second identity of the audited node), never one under
/// dispute.
fn pick_auditor(
    deps: &AuditDeps,
    secret: &[u8; 32],
    case: &AuditCase,
    exclude: &[(PeerId, Address)],
) -> Option<(PeerId, ModuleId, tessera_protocol::Price, Address)> {
    let table = deps.table.read().ok()?;
    let mut eligible: Vec<(PeerId, ModuleId, tessera_protocol::Price, Address)> = table
        .nodes()
        .filter(|e| {
            let peer = e.advert.node;
            !exclude
                .iter()
                .any(|(p, a)| *p == peer || (*a == e.advert.payout && *a != Address::default()))
                && !table.standing(&peer).is_some_and(NodeRecord::excluded)
        })
        .filter_map(|e| {
            e.advert
                .modules
                .iter()
                .find(|o| {
                    o.module.weights == case.module.weights
                        && o.module.family == case.module.family
                        && o.numerics == case.numerics
                })
                .map(|o| (e.advert.node, o.module.clone(), o.price, e.advert.payout))
        })
        .collect();
    if eligible.is_empty() {
        return None;
    }
    eligible.sort_by_key(|c| c.0);
    let mut key = case.job.0.to_vec();
    key.push(exclude.len() as u8);
    let h = blake3::keyed_hash(secret, &key);
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.as_bytes()[..8]);
    let pick = (u64::from_le_bytes(b) % eligible.len() as u64) as usize;
    Some(eligible.swap_remove(pick))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_follow_the_record() {
        let c = AuditConfig::default();
        let mut r = NodeRecord::default();
        assert_eq!(r.audit_share(&c), 1.0, "a new node's first jobs");
        r.passed = 3;
        assert_eq!(r.audit_share(&c), c.share);
        r.missed = 1;
        assert_eq!(r.audit_share(&c), c.raised_share);
        let mut bad = NodeRecord {
            failed: 1,
            open_disputes: 1,
            ..NodeRecord::default()
        };
        assert_eq!(bad.audit_share(&c), c.raised_share);
        assert!(bad.excluded());
        assert!(bad.reputation() < 0.1);
        bad.open_disputes = 0;
        assert!(!bad.excluded());
        assert!((NodeRecord::default().reputation() - 0.5).abs() < 1e-9);
    }

    #[test]
    fn the_draw_is_uniform_and_keyed() {
        let secret = [7u8; 32];
        let n = 4000;
        let below = (0..n)
            .filter(|i| {
                let mut id = [0u8; 16];
                id[..8].copy_from_slice(&(*i as u64).to_le_bytes());
                draw(&secret, &JobId(id)) < 0.05
            })
            .count();
        assert!((120..280).contains(&below), "{below} of {n} below 5%");
        let id = JobId([1; 16]);
        assert_ne!(draw(&secret, &id), draw(&[8u8; 32], &id));
    }

    #[test]
    fn config_ranges_are_checked() {
        assert!(AuditConfig::default().validate().is_ok());
        let bad = AuditConfig {
            share: 1.5,
            ..AuditConfig::default()
        };
        assert!(bad.validate().unwrap_err().contains("share"));
        let bad = AuditConfig {
            confirm_share: -0.1,
            ..AuditConfig::default()
        };
        assert!(bad.validate().unwrap_err().contains("confirm_share"));
    }
}
