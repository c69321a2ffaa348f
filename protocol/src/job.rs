//! Jobs on the wire. A coordinator opens one stream per job on [`JOB_PROTOCOL`] and writes
//! one frame: a [`Signed`] [`JobRequest`]. The node answers with [`JobEvent`] frames:
//! `Accepted`, then text `Delta`s as tokens are generated, then one `Result` carrying usage,
//! the transcript commitment and a node-signed [`Receipt`]; or one `Error` with a
//! machine-readable [`ErrorCode`] at any point. Either side closing the stream ends the job.

use crate::audit::MAX_REPLAY_RECORDS;
use crate::money::{Amount, Price};
use crate::signed::{Signed, SignedMessage};
use crate::{
    ChatMessage, FinishReason, ModuleId, ReplayClaim, SamplingParams, TokenRecord,
    TranscriptCommitment, Verdict,
};
use libp2p_identity::PeerId;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Stream protocol id of jobs.
pub const JOB_PROTOCOL: &str = "/tessera/job/1";
/// Largest request frame: room for a full context of text.
pub const MAX_REQUEST_FRAME: usize = 256 * 1024;
/// Largest event frame (a delta, or a result with its receipt).
pub const MAX_EVENT_FRAME: usize = 64 * 1024;
/// Most chat messages in one request.
pub const MAX_MESSAGES: usize = 256;
/// Most stop sequences, and the longest in bytes (OpenAI's limits).
pub const MAX_STOP: (usize, usize) = (4, 256);
/// Longest payer account name, in bytes.
pub const MAX_PAYER_BYTES: usize = 64;
/// Most tokens one job may ask for.
pub const MAX_JOB_TOKENS: u32 = 32 * 1024;
/// Most transcript records in one event frame (a record encodes to at most ~60 bytes).
pub const MAX_TRANSCRIPT_CHUNK: usize = 512;

/// A job's id: 16 random bytes chosen by the coordinator.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct JobId(#[serde(with = "crate::bytes")] pub [u8; 16]);

impl JobId {
    /// Hex form for logs and URLs.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobId({})", self.to_hex())
    }
}

/// What the model is asked to continue.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum JobInput {
    /// Raw text (completions).
    Text(String),
    /// A conversation, rendered with the module's chat template.
    Chat(Vec<ChatMessage>),
}

impl JobInput {
    /// blake3 of the input's encoding: what a receipt binds without carrying the prompt.
    pub fn hash(&self) -> [u8; 32] {
        let bytes = postcard::to_allocvec(self).unwrap_or_default();
        *blake3::Hasher::new_derive_key("tessera job input v1")
            .update(&bytes)
            .finalize()
            .as_bytes()
    }
}

/// A job, as the coordinator signs it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRequest {
    /// Chosen by the coordinator, unique per job.
    pub job_id: JobId,
    /// The node it is for; a node refuses a request addressed to another.
    pub node: PeerId,
    /// The module to run.
    pub module: ModuleId,
    /// The account paying, as the coordinator names it.
    pub payer: String,
    /// The prompt.
    pub input: JobInput,
    /// Sampler settings, seed included.
    pub sampling: SamplingParams,
    /// Most tokens to generate.
    pub max_tokens: u32,
    /// Generation ends before any of these.
    pub stop: Vec<String>,
    /// The most the payer accepts per 1k tokens; a node asking more refuses.
    pub max_price: Price,
    /// Unix milliseconds after which the job is worthless; a node refuses or stops then.
    pub deadline_ms: u64,
    /// An audit: instead of generating, replay this claimed transcript of `input` and
    /// judge it (`max_tokens` and `stop` are then unused). Priced as input tokens: the
    /// prompt and the claimed tokens all go through one teacher-forced pass.
    pub replay: Option<ReplayClaim>,
}

impl SignedMessage for JobRequest {
    const DOMAIN: &'static [u8] = b"tessera/job-request/1";
}

impl JobRequest {
    /// Checks the fields a node cannot trust: counts, lengths and ranges.
    pub fn check_bounds(&self) -> Result<(), JobError> {
        let bad = |what: String| Err(JobError::new(ErrorCode::BadRequest, what));
        if self.max_tokens == 0 || self.max_tokens > MAX_JOB_TOKENS {
            return bad(format!(
                "max_tokens must be 1..={MAX_JOB_TOKENS}, got {}",
                self.max_tokens
            ));
        }
        if self.payer.len() > MAX_PAYER_BYTES {
            return bad(format!("payer is longer than {MAX_PAYER_BYTES} bytes"));
        }
        if self.stop.len() > MAX_STOP.0
            || self
                .stop
                .iter()
                .any(|s| s.is_empty() || s.len() > MAX_STOP.1)
        {
            return bad(format!(
                "at most {} stop sequences of 1..={} bytes",
                MAX_STOP.0, MAX_STOP.1
            ));
        }
        match &self.input {
            JobInput::Chat(m) if m.is_empty() || m.len() > MAX_MESSAGES => {
                return bad(format!(
                    "chat input must have 1..={MAX_MESSAGES} messages, got {}",
                    m.len()
                ));
            }
            JobInput::Text(t) if t.is_empty() => return bad("prompt is empty".into()),
            _ => {}
        }
        if let Err(e) = self.sampling.validate() {
            return bad(e.to_string());
        }
        if let Some(claim) = &self.replay {
            if claim.records.is_empty() || claim.records.len() > MAX_REPLAY_RECORDS {
                return bad(format!(
                    "a replay claim carries 1..={MAX_REPLAY_RECORDS} records, got {}",
                    claim.records.len()
                ));
            }
            if !(claim.tolerance.is_finite() && claim.tolerance >= 0.0) {
                return bad(format!(
                    "replay tolerance must be a finite number ≥ 0, got {}",
                    claim.tolerance
                ));
            }
        }
        Ok(())
    }
}

/// Token counts of a job.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens read.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
}

/// What the node signs when a job ends: the basis of payment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Receipt {
    /// The job.
    pub job_id: JobId,
    /// The node that ran it (the signer).
    pub node: PeerId,
    /// The coordinator that requested it.
    pub coordinator: PeerId,
    /// The paying account, as the request named it.
    pub payer: String,
    /// The module run.
    pub module: ModuleId,
    /// blake3 of the input ([`JobInput::hash`]).
    #[serde(with = "crate::bytes")]
    pub input_hash: [u8; 32],
    /// Sampler settings and seed used.
    pub sampling: SamplingParams,
    /// Tokens read and generated.
    pub usage: Usage,
    /// Why generation ended.
    pub finish_reason: FinishReason,
    /// Price applied.
    pub price: Price,
    /// `price` applied to `usage`, rounded up.
    pub cost: Amount,
    /// Merkle root of the transcript records.
    pub commitment: TranscriptCommitment,
    /// When the node admitted the job (unix ms).
    pub started_ms: u64,
    /// When it finished (unix ms).
    pub finished_ms: u64,
    /// For an audit job: the auditor's verdict on the replayed transcript, signed with the
    /// receipt so the auditor answers for it.
    pub verdict: Option<Verdict>,
}

impl SignedMessage for Receipt {
    const DOMAIN: &'static [u8] = b"tessera/receipt/1";
}

/// The end of a successful job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobResult {
    /// Token counts.
    pub usage: Usage,
    /// Why generation ended.
    pub finish_reason: FinishReason,
    /// Transcript commitment (also in the receipt).
    pub commitment: TranscriptCommitment,
    /// Time to first token measured on the node, milliseconds.
    pub ttft_ms: u32,
    /// Generation time after the first token, milliseconds.
    pub decode_ms: u32,
    /// The node-signed receipt.
    pub receipt: Signed<Receipt>,
}

/// What went wrong, for machines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// At capacity: try another node now.
    Busy,
    /// The node does not serve that module.
    UnknownModule,
    /// The request's signature, signer or addressee is wrong.
    BadSignature,
    /// The request is malformed or out of bounds.
    BadRequest,
    /// The node's price is above the request's maximum.
    PriceTooHigh,
    /// The deadline passed.
    DeadlineExceeded,
    /// The prompt does not fit the module's context.
    PromptTooLong,
    /// The coordinator is not one this node serves.
    Unauthorized,
    /// The node is shutting down.
    ShuttingDown,
    /// The node failed while running the job.
    Internal,
    /// The coordinator cancelled the job before its first token.
    Cancelled,
}

impl ErrorCode {
    /// Whether trying the same job on another node can help.
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            Self::Busy
                | Self::ShuttingDown
                | Self::Internal
                | Self::UnknownModule
                | Self::PriceTooHigh
        )
    }
}

/// An error reply: a code for machines, a message for people.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct JobError {
    /// What kind of failure.
    pub code: ErrorCode,
    /// Human-readable detail.
    pub message: String,
}

impl JobError {
    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// One frame from node to coordinator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum JobEvent {
    /// Admitted; `queued` jobs are ahead of it on the engine.
    Accepted {
        /// Jobs ahead of this one.
        queued: u32,
    },
    /// The next piece of text.
    Delta(String),
    /// The next records of the transcript (at most [`MAX_TRANSCRIPT_CHUNK`] per frame),
    /// sent after the last delta and before the result: the generated positions of a
    /// job, or the replayed positions of an audit. They must hash to the commitment.
    Transcript(Vec<TokenRecord>),
    /// Finished; always the last frame.
    Result(Box<JobResult>),
    /// Failed; always the last frame.
    Error(JobError),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{decode, encode};
    use crate::{Quantization, WeightsHash};
    use libp2p_identity::Keypair;

    pub(crate) fn request(node: PeerId) -> JobRequest {
        JobRequest {
            job_id: JobId([9; 16]),
            node,
            module: ModuleId::new(
                "llama",
                Quantization::from_gguf_file_type(3),
                8192,
                WeightsHash([7; 32]),
            )
            .expect("id"),
            payer: "acct-1".into(),
            input: JobInput::Chat(vec![ChatMessage::user("Name the capital of France.")]),
            sampling: SamplingParams::greedy(),
            max_tokens: 32,
            stop: vec![],
            max_price: Price {
                per_1k_input: Amount(10),
                per_1k_output: Amount(20),
            },
            deadline_ms: 2_000_000,
            replay: None,
        }
    }

    #[test]
    fn signed_requests_round_trip_the_wire() {
        let coord = Keypair::generate_ed25519();
        let node = Keypair::generate_ed25519().public().to_peer_id();
        let signed = Signed::sign(request(node), &coord).expect("sign");
        let bytes = encode(&signed, MAX_REQUEST_FRAME).expect("encode");
        let back: Signed<JobRequest> = decode(&bytes, MAX_REQUEST_FRAME).expect("decode");
        assert_eq!(back.verify(), Ok(coord.public().to_peer_id()));
        assert_eq!(back.body, signed.body);
    }

    #[test]
    fn bounds_are_checked() {
        let node = Keypair::generate_ed25519().public().to_peer_id();
        assert!(request(node).check_bounds().is_ok());
        let mut r = request(node);
        r.max_tokens = 0;
        assert_eq!(r.check_bounds().unwrap_err().code, ErrorCode::BadRequest);
        let mut r = request(node);
        r.stop = vec!["x".into(); 5];
        assert!(r.check_bounds().is_err());
        let mut r = request(node);
        r.input = JobInput::Chat(vec![]);
        assert!(r.check_bounds().is_err());
        let mut r = request(node);
        r.sampling.top_p = 2.0;
        assert!(r.check_bounds().is_err());
    }

    #[test]
    fn input_hash_separates_text_from_chat() {
        let a = JobInput::Text("hi".into()).hash();
        let b = JobInput::Chat(vec![ChatMessage::user("hi")]).hash();
        assert_ne!(a, b);
        assert_eq!(a, JobInput::Text("hi".into()).hash());
    }
}
