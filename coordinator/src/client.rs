//! The job client: open a stream to a node, send a signed request, and yield the node's
//! events as they arrive, with the deadline enforced and the receipt checked. A dead peer
//! surfaces as an error within seconds: a killed process closes its connections at once,
//! and a silent one fails its pings (the swarm then closes the connection).

use crate::table::NodeTable;
use futures::io::{AsyncWriteExt, ReadHalf, WriteHalf};
use futures::AsyncReadExt;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tessera_net::{NetHandle, PeerId, Stream};
use tessera_protocol::job::{MAX_EVENT_FRAME, MAX_REQUEST_FRAME};
use tessera_protocol::wire::{write_frame, FrameReader, WireError};
use tessera_protocol::{
    JobError, JobEvent, JobId, JobInput, JobRequest, JobResult, Keypair, ModuleId, Price,
    ReplayClaim, SamplingParams, Signed, TokenRecord, TranscriptCommitment,
};

/// Longest wait for a stream to open, within the job's own deadline.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for a cancelled job's final result: a node stops at its next token, which
/// comes after the prompt's prefill (tens of seconds for a long prompt on a CPU).
pub const CANCEL_GRACE: Duration = Duration::from_secs(60);
/// Longest a job may be given.
pub const MAX_JOB_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// Why a job did not produce a result.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No stream could be opened to the node.
    #[error("cannot open a job stream to {node}: {cause}")]
    Open {
        /// The node.
        node: PeerId,
        /// Why.
        cause: String,
    },
    /// The job's deadline passed.
    #[error("job deadline passed after {0:?}")]
    Deadline(Duration),
    /// The node answered with an error.
    #[error("node refused or failed the job: {0}")]
    Node(JobError),
    /// The stream broke or ended before a result: the node died or dropped the job.
    #[error("node {node} closed the job stream before a result ({cause})")]
    PeerGone {
        /// The node.
        node: PeerId,
        /// What the transport said.
        cause: String,
    },
    /// The node sent something that breaks the protocol.
    #[error("protocol violation from {node}: {cause}")]
    Protocol {
        /// The node.
        node: PeerId,
        /// What was wrong.
        cause: String,
    },
    /// The receipt does not match the job or its signature fails.
    #[error("bad receipt from {node}: {cause}")]
    BadReceipt {
        /// The node.
        node: PeerId,
        /// What was wrong.
        cause: String,
    },
    /// The request could not be signed or encoded.
    #[error("cannot send the request: {0}")]
    Request(String),
}

/// What to run, before it is addressed and signed.
#[derive(Clone, Debug)]
pub struct JobSpec {
    /// The module.
    pub module: ModuleId,
    /// The paying account.
    pub payer: String,
    /// The prompt.
    pub input: JobInput,
    /// Sampler settings and seed.
    pub sampling: SamplingParams,
    /// Most tokens to generate.
    pub max_tokens: u32,
    /// Stop sequences.
    pub stop: Vec<String>,
    /// The most the payer accepts.
    pub max_price: Price,
    /// How long the whole job may take.
    pub timeout: Duration,
    /// For an audit: the transcript to replay instead of generating.
    pub replay: Option<ReplayClaim>,
}

/// Opens job streams to nodes, signing requests with the coordinator's key.
#[derive(Clone)]
pub struct JobClient {
    net: NetHandle,
    key: Keypair,
    table: Option<Arc<RwLock<NodeTable>>>,
}

impl JobClient {
    /// A client over `net`, signing with `key`; job outcomes are recorded in `table`.
    pub fn new(net: NetHandle, key: Keypair, table: Option<Arc<RwLock<NodeTable>>>) -> Self {
        Self { net, key, table }
    }

    /// Starts `spec` on `node`: opens a stream, sends the signed request, and returns the
    /// stream of its events.
    pub async fn start(&self, node: PeerId, spec: JobSpec) -> Result<JobStream, ClientError> {
        self.start_with_id(node, spec, new_job_id()).await
    }

    /// Like [`JobClient::start`] with the job id chosen by the caller, who may hold a
    /// reservation under it (and keep it across attempts on several nodes).
    pub async fn start_with_id(
        &self,
        node: PeerId,
        spec: JobSpec,
        job_id: JobId,
    ) -> Result<JobStream, ClientError> {
        let started = Instant::now();
        let timeout = spec.timeout.min(MAX_JOB_TIMEOUT);
        let deadline = started + timeout;
        let request = JobRequest {
            job_id,
            node,
            module: spec.module,
            payer: spec.payer,
            input: spec.input,
            sampling: spec.sampling,
            max_tokens: spec.max_tokens,
            stop: spec.stop,
            max_price: spec.max_price,
            deadline_ms: tessera_protocol::now_ms() + timeout.as_millis() as u64,
            replay: spec.replay,
        };
        let signed =
            Signed::sign(request, &self.key).map_err(|e| ClientError::Request(e.to_string()))?;
        let stream = self.open(node, deadline).await?;
        let (reader, mut writer) = stream.split();
        let job_id = signed.body.job_id;
        match tokio::time::timeout_at(
            deadline.into(),
            write_frame(&mut writer, &signed, MAX_REQUEST_FRAME),
        )
        .await
        {
            Err(_) => return Err(ClientError::Deadline(timeout)),
            Ok(Err(WireError::TooLarge { len, max })) => {
                return Err(ClientError::Request(format!(
                    "request of {len} bytes exceeds {max}"
                )))
            }
            Ok(Err(e)) => {
                self.failed(&node);
                return Err(ClientError::PeerGone {
                    node,
                    cause: e.to_string(),
                });
            }
            Ok(Ok(())) => {}
        }
        Ok(JobStream {
            node,
            job_id,
            request: signed.body,
            reader: FrameReader::new(reader, MAX_EVENT_FRAME),
            writer,
            started,
            deadline,
            request_signer: Some(self.key.public().to_peer_id()),
            transcript: Vec::new(),
            first_token: None,
            deltas: 0,
            finished: false,
            table: self.table.clone(),
        })
    }

    /// Runs `spec` on `node` to the end: the whole text and the checked result.
    pub async fn run(&self, node: PeerId, spec: JobSpec) -> Result<JobOutcome, ClientError> {
        self.start(node, spec).await?.collect().await
    }

    async fn open(&self, node: PeerId, deadline: Instant) -> Result<Stream, ClientError> {
        let mut control = self.net.control();
        let limit = (Instant::now() + OPEN_TIMEOUT).min(deadline);
        match tokio::time::timeout_at(
            limit.into(),
            control.open_stream(node, tessera_net::job_protocol()),
        )
        .await
        {
            Ok(Ok(stream)) => Ok(stream),
            Ok(Err(e)) => {
                self.failed(&node);
                Err(ClientError::Open {
                    node,
                    cause: e.to_string(),
                })
            }
            Err(_) => {
                self.failed(&node);
                Err(ClientError::Open {
                    node,
                    cause: format!("timed out after {OPEN_TIMEOUT:?}"),
                })
            }
        }
    }

    fn failed(&self, node: &PeerId) {
        if let Some(t) = &self.table {
            if let Ok(mut t) = t.write() {
                t.record_failure(node);
            }
        }
    }
}

/// A fresh job id.
pub fn new_job_id() -> JobId {
    // Job ids need uniqueness, not secrecy: hash a fresh key's public bytes, the clock
    // and a process-wide counter.
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = blake3::Hasher::new();
    h.update(&tessera_protocol::now_ms().to_le_bytes());
    h.update(
        &COUNTER
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .to_le_bytes(),
    );
    h.update(&std::process::id().to_le_bytes());
    h.update(&Keypair::generate_ed25519().public().encode_protobuf());
    let mut out = [0u8; 16];
    out.copy_from_slice(&h.finalize().as_bytes()[..16]);
    JobId(out)
}

/// A running job's events, in order: `Accepted`, `Delta`s, then a `Result` (checked) or
/// an error. Dropping it (or [`JobStream::cancel`]) closes the stream, which stops the
/// node's generation.
pub struct JobStream {
    node: PeerId,
    job_id: JobId,
    request: JobRequest,
    reader: FrameReader<ReadHalf<Stream>>,
    writer: WriteHalf<Stream>,
    started: Instant,
    deadline: Instant,
    request_signer: Option<PeerId>,
    transcript: Vec<TokenRecord>,
    first_token: Option<Instant>,
    deltas: u32,
    finished: bool,
    table: Option<Arc<RwLock<NodeTable>>>,
}

/// A finished job: all its text and its checked result.
#[derive(Debug, Clone)]
pub struct JobOutcome {
    /// The node that ran it.
    pub node: PeerId,
    /// Every delta, joined.
    pub text: String,
    /// Usage, commitment and the verified receipt.
    pub result: JobResult,
    /// The transcript, checked against the commitment.
    pub transcript: Vec<TokenRecord>,
}

impl JobStream {
    /// The job's id.
    pub fn job_id(&self) -> JobId {
        self.job_id
    }

    /// The node running it.
    pub fn node(&self) -> PeerId {
        self.node
    }

    /// The transcript records received so far (all of them once a `Result` was returned).
    pub fn transcript(&self) -> &[TokenRecord] {
        &self.transcript
    }

    fn failed_here(&self) {
        if let Some(t) = &self.table {
            if let Ok(mut t) = t.write() {
                t.record_failure(&self.node);
            }
        }
    }

    /// Most transcript records this job may send.
    fn transcript_limit(&self) -> usize {
        match &self.request.replay {
            Some(claim) => claim.records.len(),
            None => self.request.max_tokens as usize,
        }
    }

    /// The next event; `None` after the last. A `Result` event has passed
    /// [`check_result`] and [`check_transcript`]; `Transcript` frames are gathered here
    /// (read them with [`JobStream::transcript`]) rather than returned; an `Error` event
    /// is returned as [`ClientError::Node`]. Cancel-safe: a pending call dropped in a
    /// `select!` loses no event.
    pub async fn next(&mut self) -> Option<Result<JobEvent, ClientError>> {
        if self.finished {
            return None;
        }
        let read = loop {
            let read =
                tokio::time::timeout_at(self.deadline.into(), self.reader.next::<JobEvent>()).await;
            match read {
                Ok(Ok(Some(JobEvent::Transcript(records))))
                    if self.transcript.len() + records.len() <= self.transcript_limit() =>
                {
                    self.transcript.extend(records);
                }
                Ok(Ok(Some(JobEvent::Transcript(_)))) => {
                    self.finished = true;
                    self.failed_here();
                    return Some(Err(ClientError::Protocol {
                        node: self.node,
                        cause: "more transcript records than the job has positions".into(),
                    }));
                }
                other => break other,
            }
        };
        let outcome = match read {
            Err(_) => Err(ClientError::Deadline(self.deadline - self.started)),
            Ok(Ok(None)) => Err(ClientError::PeerGone {
                node: self.node,
                cause: "end of stream".into(),
            }),
            Ok(Err(WireError::Io(e))) => Err(ClientError::PeerGone {
                node: self.node,
                cause: e.to_string(),
            }),
            Ok(Err(WireError::Truncated { got, want })) => Err(ClientError::PeerGone {
                node: self.node,
                cause: format!("stream ended inside a frame ({got} of {want} bytes)"),
            }),
            Ok(Err(e)) => Err(ClientError::Protocol {
                node: self.node,
                cause: e.to_string(),
            }),
            Ok(Ok(Some(JobEvent::Error(e)))) => Err(ClientError::Node(e)),
            Ok(Ok(Some(JobEvent::Result(result)))) => {
                match check_result(&self.request, self.node, &result)
                    .and_then(|()| check_transcript(&self.request, &result, &self.transcript))
                    .and_then(|()| {
                        // The receipt must name the coordinator that signed the request.
                        match self.request_signer {
                            Some(me) if result.receipt.body.coordinator != me => {
                                Err("receipt names another coordinator".to_owned())
                            }
                            _ => Ok(()),
                        }
                    }) {
                    Ok(()) => {
                        if let (Some(t), Some(first)) = (&self.table, self.first_token) {
                            if let Ok(mut t) = t.write() {
                                t.record_job(
                                    &self.node,
                                    result.usage.completion_tokens,
                                    first.elapsed(),
                                    result.ttft_ms,
                                );
                            }
                        }
                        // The stream closes when this is dropped; no await here keeps
                        // `next` cancel-safe.
                        self.finished = true;
                        Ok(JobEvent::Result(result))
                    }
                    Err(cause) => Err(ClientError::BadReceipt {
                        node: self.node,
                        cause,
                    }),
                }
            }
            Ok(Ok(Some(JobEvent::Delta(text)))) => {
                self.first_token.get_or_insert_with(Instant::now);
                self.deltas += 1;
                // Each delta carries at least one token's text, plus one final flush.
                if self.deltas > self.request.max_tokens.saturating_add(1) {
                    Err(ClientError::Protocol {
                        node: self.node,
                        cause: format!(
                            "more text deltas than the {} tokens asked for",
                            self.request.max_tokens
                        ),
                    })
                } else {
                    Ok(JobEvent::Delta(text))
                }
            }
            Ok(Ok(Some(event))) => Ok(event),
        };
        if let Err(e) = &outcome {
            self.finished = true;
            if !matches!(e, ClientError::Node(_)) {
                if let Some(t) = &self.table {
                    if let Ok(mut t) = t.write() {
                        t.record_failure(&self.node);
                    }
                }
            }
        }
        Some(outcome)
    }

    /// Reads to the end: the whole text and the checked result.
    pub async fn collect(mut self) -> Result<JobOutcome, ClientError> {
        let mut text = String::new();
        while let Some(event) = self.next().await {
            match event? {
                JobEvent::Delta(t) => text.push_str(&t),
                JobEvent::Result(result) => {
                    return Ok(JobOutcome {
                        node: self.node,
                        text,
                        result: *result,
                        transcript: std::mem::take(&mut self.transcript),
                    })
                }
                JobEvent::Accepted { .. } | JobEvent::Error(_) | JobEvent::Transcript(_) => {}
            }
        }
        Err(ClientError::PeerGone {
            node: self.node,
            cause: "no result".into(),
        })
    }

    /// Cancels the job: closes this side of the stream, so the node stops after the token
    /// in progress and answers with a `cancelled` result whose receipt covers the tokens it
    /// generated. Returns that result, checked like any other; `None` when the node sent
    /// none within [`CANCEL_GRACE`] (or had not started: nothing is owed then).
    pub async fn cancel(mut self) -> Option<JobResult> {
        if self.finished {
            return None;
        }
        let drain = async {
            let _ = self.writer.close().await;
            while let Some(event) = self.next().await {
                match event {
                    Ok(JobEvent::Result(result)) => return Some(*result),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(node = %self.node, error = %e, "cancelled job ended without a result");
                        return None;
                    }
                }
            }
            None
        };
        tokio::time::timeout(CANCEL_GRACE, drain)
            .await
            .ok()
            .flatten()
    }
}

/// Checks that the transcript a node streamed is the one its result commits to: every
/// generated position of a job, or every replayed position of an audit (none when the
/// claim failed its shape check).
pub fn check_transcript(
    request: &JobRequest,
    result: &JobResult,
    records: &[TokenRecord],
) -> Result<(), String> {
    let count_ok = match &request.replay {
        None => records.len() == result.usage.completion_tokens as usize,
        Some(claim) => records.is_empty() || records.len() == claim.records.len(),
    };
    if !count_ok {
        return Err(format!(
            "the transcript has {} records for {} generated tokens",
            records.len(),
            result.usage.completion_tokens
        ));
    }
    if TranscriptCommitment::from_records(records) != result.commitment {
        return Err("the transcript does not hash to the result's commitment".into());
    }
    Ok(())
}

/// Checks a result against the request it answers: the receipt's signature, signer, job,
/// module, input, sampling and counts, and that cost follows from price and usage.
pub fn check_result(request: &JobRequest, node: PeerId, result: &JobResult) -> Result<(), String> {
    let signer = result
        .receipt
        .verify()
        .map_err(|e| format!("receipt signature: {e}"))?;
    let r = &result.receipt.body;
    let checks = [
        (
            signer == node,
            "receipt not signed by the node that ran the job",
        ),
        (r.node == node, "receipt names another node"),
        (r.job_id == request.job_id, "receipt is for another job"),
        (r.module == request.module, "receipt is for another module"),
        (r.payer == request.payer, "receipt names another payer"),
        (
            r.input_hash == request.input.hash(),
            "receipt is for another input",
        ),
        (
            r.sampling == request.sampling,
            "receipt has other sampling parameters",
        ),
        (
            r.usage == result.usage,
            "receipt usage differs from the result",
        ),
        (
            r.commitment == result.commitment,
            "receipt commitment differs from the result",
        ),
        (
            r.finish_reason == result.finish_reason,
            "receipt finish reason differs",
        ),
        (
            result.usage.completion_tokens <= request.max_tokens,
            "more tokens than the request allowed",
        ),
        (
            r.price.within(&request.max_price),
            "price above the request's maximum",
        ),
        (
            r.price
                .cost(r.usage.prompt_tokens, r.usage.completion_tokens)
                == Some(r.cost),
            "cost does not follow from price and usage",
        ),
        (
            r.verdict.is_some() == request.replay.is_some(),
            "a verdict belongs in the receipt of an audit and only there",
        ),
    ];
    match checks.iter().find(|(ok, _)| !ok) {
        Some((_, why)) => Err((*why).to_owned()),
        None => Ok(()),
    }
}
