//! Audits by replay: what an auditing node is asked to check and what it answers. An audit
//! travels as an ordinary job (so admission, pricing and receipts are shared) whose request
//! carries a [`ReplayClaim`]: the audited node's output tokens and per-position records.
//! The auditor recomputes the logits of the whole transcript in one teacher-forced pass and
//! answers with a [`Verdict`] inside its job result.

use serde::{Deserialize, Serialize};

use crate::{TokenRecord, TranscriptCommitment};

/// Logit tolerance (in logits, after the commitment grid's rounding slack) under which a
/// replayed position counts as honest. Calibrated on honest runs: `docs/verification.md`
/// gives the measured distances this sits above, and the detection rates it keeps.
pub const DEFAULT_TOLERANCE: f32 = 0.1;

/// Most records one replay claim may carry: what fits a request frame (a record encodes to
/// at most ~60 bytes). Longer jobs are not audited (`docs/verification.md`).
pub const MAX_REPLAY_RECORDS: usize = 3072;

/// What the audited node claimed: the records it committed to, and the commitment itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReplayClaim {
    /// The commitment in the audited node's receipt.
    pub commitment: TranscriptCommitment,
    /// Its per-position records, in order.
    pub records: Vec<TokenRecord>,
    /// Tolerance the auditor judges with, in logits.
    pub tolerance: f32,
}

/// Why a replayed transcript failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The records do not hash to the claimed commitment.
    Commitment,
    /// A record's position is not the next one after the prompt and earlier records (the
    /// prompt was tokenized differently, or records were dropped or reordered).
    Position,
    /// A claimed token id is outside the module's vocabulary.
    TokenOutOfVocabulary,
    /// The claimed fingerprint's logits are further from the replayed logits than the
    /// tolerance (or it omits a token that the replay ranks in the top-k).
    Fingerprint,
    /// The sampler, with this seed, would not have chosen the claimed token unless the
    /// logits moved by more than the tolerance.
    Choice,
}

/// The first position that failed, and by how much.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    /// Index of the record (0 is the first generated token).
    pub index: u32,
    /// What failed there.
    pub kind: FailureKind,
    /// Its distance, in logits (0 for structural failures).
    pub distance: f32,
}

/// An auditor's judgement of one transcript.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    /// True when every position is within tolerance and the commitment matches.
    pub passed: bool,
    /// Records judged.
    pub positions: u32,
    /// The first failing position, if any.
    pub first_failure: Option<Failure>,
    /// Positions beyond tolerance.
    pub failed_positions: u32,
    /// Largest per-position distance (logits): how far the claim is from the replay.
    pub max_distance: f32,
    /// Mean per-position distance.
    pub mean_distance: f32,
    /// Largest fingerprint distance alone (logits).
    pub max_fingerprint_distance: f32,
    /// Largest choice margin alone: how far logits must move for the sampler to pick the
    /// claimed tokens.
    pub max_choice_margin: f32,
    /// The commitment the auditor recomputed from the records.
    pub commitment: TranscriptCommitment,
    /// Tolerance applied.
    pub tolerance: f32,
    /// Time the replay took on the auditor, milliseconds.
    pub replay_ms: u32,
}

impl Verdict {
    /// One line for logs and dispute records.
    pub fn summary(&self) -> String {
        match &self.first_failure {
            None => format!(
                "passed: {} positions, max distance {:.4} (tolerance {})",
                self.positions, self.max_distance, self.tolerance
            ),
            Some(f) => format!(
                "failed at record {} ({:?}, distance {:.4}); {} of {} positions beyond tolerance {}, max distance {:.4}",
                f.index,
                f.kind,
                f.distance,
                self.failed_positions,
                self.positions,
                self.tolerance,
                self.max_distance
            ),
        }
    }
}
