//! Running an API request as a job: reserve its maximum cost, pick a node, stream its
//! tokens, settle its receipt. Each job runs on its own task (tracked, stopped on
//! shutdown) that owns the reservation from start to end, so whatever happens to the HTTP
//! side (a client that disconnects, a handler dropped mid-await) the money ends in
//! exactly one state: settled by a receipt, or released. The HTTP side reads the job's
//! updates from a bounded channel; when it goes away the job is cancelled on its node,
//! which still signs a receipt for the tokens it delivered, and only those are charged.

use crate::api::ApiError;
use crate::client::{ClientError, JobClient, JobSpec, JobStream};
use crate::ledger::{Ledger, LedgerError};
use crate::limits::Permit;
use crate::metrics::Metrics;
use crate::openai::{CompletionRequest, Provenance};
use crate::route::{candidates, Candidate, RouteError};
use crate::table::NodeTable;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tessera_net::PeerId;
use tessera_protocol::job::MAX_JOB_TOKENS;
use tessera_protocol::{
    Address, Amount, ErrorCode, FinishReason, JobEvent, JobId, JobResult, ModuleId, Price,
    TokenRecord, Usage,
};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Updates buffered between a job and its HTTP response.
const UPDATE_BUFFER: usize = 64;
/// How often a job waiting for a free node looks again (besides being woken).
const WAIT_TICK: Duration = Duration::from_millis(250);
/// A response that takes no update for this long has stopped reading: its job is
/// cancelled (and settled) before the node's own 5 s write timeout would drop it unpaid.
const STALL_TIMEOUT: Duration = Duration::from_secs(4);

/// How jobs are run.
#[derive(Clone, Debug)]
pub struct DispatchConfig {
    /// Longest a request waits for a node with a free slot before 503.
    pub queue_timeout: Duration,
    /// Longest a job may run.
    pub job_timeout: Duration,
    /// Most nodes tried for one request (before its first token).
    pub max_attempts: u32,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        Self {
            queue_timeout: Duration::from_secs(30),
            job_timeout: Duration::from_secs(600),
            max_attempts: 3,
        }
    }
}

/// What a running job tells its HTTP response.
#[derive(Debug)]
pub enum JobUpdate {
    /// A node took the job and produced its first token (or finished at once).
    Started(Box<Started>),
    /// More text.
    Delta(String),
    /// Finished and settled; always the last update.
    Done(Box<Finished>),
    /// Failed; always the last update. Nothing was charged.
    Failed(ApiError),
}

/// Which node is serving a job.
#[derive(Debug, Clone)]
pub struct Started {
    /// The node.
    pub node: PeerId,
    /// Its L1 payout address (where the rollup pays it).
    pub payout: Address,
    /// The module it runs.
    pub module: ModuleId,
    /// The job id (the receipt's id).
    pub job_id: JobId,
    /// Its price.
    pub price: Price,
    /// Nodes tried so far, this one included.
    pub attempts: u32,
    /// Its engine's numerics (auditors must share them).
    pub numerics: String,
}

/// A settled job.
#[derive(Debug, Clone)]
pub struct Finished {
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// Token counts.
    pub usage: Usage,
    /// Who served it and what it cost.
    pub provenance: Provenance,
}

/// The HTTP side's end of a job.
pub struct JobHandle {
    /// The job id.
    pub job_id: JobId,
    /// Updates in order; dropping the receiver cancels the job.
    pub updates: mpsc::Receiver<JobUpdate>,
}

/// Runs jobs for the API.
#[derive(Clone)]
pub struct Dispatcher {
    inner: Arc<Inner>,
}

struct Inner {
    client: JobClient,
    auditor: Option<crate::audit::Auditor>,
    table: Arc<RwLock<NodeTable>>,
    ledger: Arc<Ledger>,
    metrics: Arc<Metrics>,
    config: DispatchConfig,
    freed: Notify,
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl Dispatcher {
    /// A dispatcher over the network's client and table, the ledger and the metrics.
    pub fn new(
        client: JobClient,
        table: Arc<RwLock<NodeTable>>,
        ledger: Arc<Ledger>,
        metrics: Arc<Metrics>,
        config: DispatchConfig,
        auditor: Option<crate::audit::Auditor>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                client,
                auditor,
                table,
                ledger,
                metrics,
                config,
                freed: Notify::new(),
                tasks: TaskTracker::new(),
                stop: CancellationToken::new(),
            }),
        }
    }

    /// The ledger.
    pub fn ledger(&self) -> &Arc<Ledger> {
        &self.inner.ledger
    }

    /// Checks the model and starts the job, whose first act is to reserve the request's
    /// maximum cost from `account` (a 402 then arrives as its first update). Errors here
    /// (404, 503) and there happen before anything is charged.
    pub async fn submit(
        &self,
        account: String,
        req: CompletionRequest,
        permit: Permit,
    ) -> Result<JobHandle, ApiError> {
        let inner = &self.inner;
        if inner.stop.is_cancelled() {
            return Err(ApiError::shutting_down());
        }
        // Size the job on every module the model name could route to, so that a fallback
        // to a dearer node or a longer context stays within what was reserved.
        let (max_tokens, prompt_bound, output_bound, reservation) = {
            let table = inner
                .table
                .read()
                .map_err(|_| ApiError::internal("node table poisoned"))?;
            let list = candidates(
                &table,
                &req.model,
                &req.provider,
                req.max_tokens.unwrap_or(1024),
                Instant::now(),
            )
            .map_err(|e| route_error(&req.model, e))?;
            let context = list
                .iter()
                .map(|c| c.offer.module.context_length)
                .max()
                .unwrap_or(0);
            let max_tokens = req.max_tokens.unwrap_or(context).clamp(1, MAX_JOB_TOKENS);
            let prompt = u32::try_from(req.prompt_token_bound())
                .unwrap_or(u32::MAX)
                .min(context);
            let output = max_tokens.min(context);
            let mut most = Amount::ZERO;
            for c in &list {
                let cost = c
                    .offer
                    .price
                    .cost(prompt, output)
                    .ok_or_else(|| ApiError::internal("price overflows"))?;
                most = most.max(cost);
            }
            (max_tokens, prompt, output, most)
        };
        let job_id = crate::client::new_job_id();
        let (tx, updates) = mpsc::channel(UPDATE_BUFFER);
        let job = Job {
            inner: self.inner.clone(),
            account,
            req,
            max_tokens,
            prompt_bound,
            output_bound,
            reservation,
            job_id,
            tx,
            _permit: permit,
        };
        inner.tasks.spawn(job.run());
        Ok(JobHandle { job_id, updates })
    }

    /// Stops taking jobs, cancels running ones (each still settles what it delivered) and
    /// waits for them to end.
    pub async fn shutdown(&self) {
        self.inner.stop.cancel();
        self.inner.tasks.close();
        self.inner.tasks.wait().await;
    }
}

fn route_error(model: &str, e: RouteError) -> ApiError {
    match e {
        RouteError::UnknownModel => ApiError::not_found(
            "model_not_found",
            format!("The model `{model}` does not exist on the network: GET /v1/models lists what is served"),
        )
        .with_param("model"),
        RouteError::Filtered(why) => ApiError::no_node_because(why),
    }
}

/// One job's task.
struct Job {
    inner: Arc<Inner>,
    account: String,
    req: CompletionRequest,
    max_tokens: u32,
    /// Bounds the reservation was sized on: a node may take the job only if its price
    /// applied to these stays within `reservation`.
    prompt_bound: u32,
    output_bound: u32,
    reservation: Amount,
    job_id: JobId,
    tx: mpsc::Sender<JobUpdate>,
    _permit: Permit,
}

/// Pause before trying a node again after its transport failed (a closing connection is
/// replaced within milliseconds).
const TRANSPORT_RETRY_PAUSE: Duration = Duration::from_millis(100);

/// How an attempt on one node ended.
enum Attempt {
    /// Before any token: try another node if allowed.
    Retry(ApiError),
    /// Before any token, the connection under an opened stream closed (as when libp2p
    /// drops one of two connections to a peer): the node is not at fault, so it may be
    /// tried once more before others.
    RetryTransport(ApiError),
    /// The node was at capacity: wait for room (anywhere) without counting an attempt.
    Busy,
    /// The job is over (settled, released, or failed after its first token).
    Over,
}

impl Job {
    async fn run(self) {
        // The reservation is made here, in the tracked task, so that a handler dropped
        // while it commits (the client gone) cannot leave a hold nobody releases.
        let ledger = self.inner.ledger.clone();
        let (account, job_id, amount) = (self.account.clone(), self.job_id, self.reservation);
        let reserved =
            tokio::task::spawn_blocking(move || ledger.reserve(&account, job_id, amount)).await;
        let refused = match reserved {
            Ok(Ok(())) => None,
            Ok(Err(LedgerError::InsufficientBalance { needed, available })) => {
                Some(ApiError::insufficient_balance(needed, available))
            }
            Ok(Err(LedgerError::UnknownAccount(_))) => Some(ApiError::invalid_api_key()),
            Ok(Err(e)) => Some(ApiError::internal(e.to_string())),
            Err(_) => Some(ApiError::internal("ledger task failed")),
        };
        if let Some(e) = refused {
            self.inner.metrics.job(&self.req.model, "refused", 0, 0, 0);
            self.finish(JobUpdate::Failed(e)).await;
            return;
        }
        tracing::debug!(%job_id, account = %self.account, reservation = %amount, "reserved");
        let started = Instant::now();
        let queue_deadline = started + self.inner.config.queue_timeout;
        let allowed = if self.req.provider.allow_fallbacks() {
            self.inner.config.max_attempts
        } else {
            1
        };
        let mut tried: Vec<PeerId> = Vec::new();
        let mut retried_transport: Vec<PeerId> = Vec::new();
        let mut last: Option<ApiError> = None;
        loop {
            if tried.len() as u32 >= allowed {
                let e = last.unwrap_or_else(|| ApiError::no_node(&self.req.model));
                return self.fail(e).await;
            }
            let candidate = match self.next_candidate(&tried, queue_deadline).await {
                Ok(c) => c,
                Err(e) => return self.fail(last.unwrap_or(e)).await,
            };
            if !tried.is_empty() {
                self.inner.metrics.retry();
            }
            // Attempts so far, a node tried again included (waiting for room is not one).
            let made = (tried.len() + retried_transport.len()) as u32 + 1;
            match self.attempt(&candidate, made, started).await {
                Attempt::Over => return,
                Attempt::Busy => {
                    // Bounded by the queue deadline even if a node's adverts keep showing
                    // room it does not have.
                    if Instant::now() >= queue_deadline {
                        return self.fail(self.busy_too_long()).await;
                    }
                    tracing::debug!(job_id = %self.job_id, node = %candidate.node, "node busy; waiting for room");
                    self.wait_for_room().await;
                }
                Attempt::RetryTransport(e) if !retried_transport.contains(&candidate.node) => {
                    tracing::info!(job_id = %self.job_id, node = %candidate.node, error = %e.message, "transport failed before the job started; trying the node again");
                    retried_transport.push(candidate.node);
                    last = Some(e);
                    tokio::time::sleep(TRANSPORT_RETRY_PAUSE).await;
                }
                Attempt::Retry(e) | Attempt::RetryTransport(e) => {
                    tracing::info!(job_id = %self.job_id, node = %candidate.node, error = %e.message, "attempt failed before its first token");
                    tried.push(candidate.node);
                    last = Some(e);
                }
            }
        }
    }

    fn busy_too_long(&self) -> ApiError {
        ApiError::no_node_because(format!(
            "every node serving {} stayed busy for {:?}; retry shortly",
            self.req.model, self.inner.config.queue_timeout
        ))
    }

    /// Until a job ends somewhere, a tick passes, or the job is abandoned.
    async fn wait_for_room(&self) {
        tokio::select! {
            () = self.inner.freed.notified() => {}
            () = tokio::time::sleep(WAIT_TICK) => {}
            () = self.inner.stop.cancelled() => {}
            () = self.tx.closed() => {}
        }
    }

    /// The best untried node with a free slot whose price fits the reservation, waiting
    /// for one up to `deadline`. The slot is taken under the same lock it was found free.
    async fn next_candidate(
        &self,
        tried: &[PeerId],
        deadline: Instant,
    ) -> Result<Candidate, ApiError> {
        loop {
            if self.inner.stop.is_cancelled() {
                return Err(ApiError::shutting_down());
            }
            if self.tx.is_closed() {
                return Err(ApiError::client_gone());
            }
            {
                let mut table = self
                    .inner
                    .table
                    .write()
                    .map_err(|_| ApiError::internal("node table poisoned"))?;
                let list = candidates(
                    &table,
                    &self.req.model,
                    &self.req.provider,
                    self.max_tokens,
                    Instant::now(),
                )
                .map_err(|e| route_error(&self.req.model, e))?;
                let affordable: Vec<Candidate> = list
                    .into_iter()
                    .filter(|c| !tried.contains(&c.node))
                    .filter(|c| {
                        c.offer
                            .price
                            .cost(self.prompt_bound, self.output_bound)
                            .is_some_and(|cost| cost <= self.reservation)
                    })
                    .collect();
                if affordable.is_empty() {
                    return Err(ApiError::no_node(&self.req.model));
                }
                if let Some(c) = affordable.into_iter().find(Candidate::has_room) {
                    table.begin_job(&c.node);
                    return Ok(c);
                }
            }
            if Instant::now() >= deadline {
                return Err(self.busy_too_long());
            }
            self.wait_for_room().await;
        }
    }

    async fn attempt(&self, c: &Candidate, attempts: u32, t0: Instant) -> Attempt {
        let spec = JobSpec {
            module: c.offer.module.clone(),
            payer: self.account.clone(),
            input: self.req.input.clone(),
            sampling: self.req.sampling.clone(),
            max_tokens: self.max_tokens,
            stop: self.req.stop.clone(),
            max_price: c.offer.price,
            timeout: self.inner.config.job_timeout,
            replay: None,
        };
        let outcome = self.stream_job(c, spec, attempts, t0).await;
        if let Ok(mut t) = self.inner.table.write() {
            t.end_job(&c.node);
        }
        self.inner.freed.notify_waiters();
        outcome
    }

    async fn stream_job(
        &self,
        c: &Candidate,
        spec: JobSpec,
        attempts: u32,
        t0: Instant,
    ) -> Attempt {
        // Nothing runs on the node until its request arrives: abandoning the start is free.
        let start = self.inner.client.start_with_id(c.node, spec, self.job_id);
        let mut stream = tokio::select! {
            s = start => match s {
                Ok(s) => s,
                Err(e) => return self.before_first_token(e).await,
            },
            () = self.inner.stop.cancelled() => {
                self.fail(ApiError::shutting_down()).await;
                return Attempt::Over;
            }
            () = self.tx.closed() => {
                self.fail(ApiError::client_gone()).await;
                return Attempt::Over;
            }
        };
        let started = Started {
            node: c.node,
            payout: c.payout,
            module: c.offer.module.clone(),
            job_id: self.job_id,
            price: c.offer.price,
            attempts,
            numerics: c.offer.numerics.clone(),
        };
        let mut announced = false;
        loop {
            // `JobStream::next` is cancel-safe: losing this race drops no event.
            let event = tokio::select! {
                e = stream.next() => e,
                () = self.inner.stop.cancelled() => {
                    return self.cancel(stream, &started, "the coordinator is shutting down").await;
                }
                () = self.tx.closed() => {
                    return self.cancel(stream, &started, "the client went away").await;
                }
            };
            match event {
                None => {
                    let e = ClientError::PeerGone {
                        node: c.node,
                        cause: "no result".into(),
                    };
                    return if announced {
                        self.after_first_token(e).await
                    } else {
                        self.before_first_token(e).await
                    };
                }
                Some(Err(e)) if !announced => return self.before_first_token(e).await,
                Some(Err(e)) => return self.after_first_token(e).await,
                Some(Ok(JobEvent::Accepted { .. } | JobEvent::Transcript(_))) => {}
                Some(Ok(JobEvent::Delta(text))) => {
                    if !announced {
                        announced = true;
                        self.inner.metrics.first_token(
                            &self.req.model,
                            &c.offer.module.to_string(),
                            t0.elapsed(),
                        );
                        if !self
                            .send(JobUpdate::Started(Box::new(started.clone())))
                            .await
                        {
                            return self.cancel(stream, &started, "the client went away").await;
                        }
                    }
                    if !self.send(JobUpdate::Delta(text)).await {
                        return self
                            .cancel(stream, &started, "the client went away or stopped reading")
                            .await;
                    }
                }
                Some(Ok(JobEvent::Result(result))) => {
                    if !announced {
                        self.finish(JobUpdate::Started(Box::new(started.clone())))
                            .await;
                    }
                    if let Some(done) = self.settle(&started, &result).await {
                        self.offer_audit(&started, &result, stream.transcript());
                        self.finish(JobUpdate::Done(Box::new(done))).await;
                    }
                    return Attempt::Over;
                }
                Some(Ok(JobEvent::Error(e))) => {
                    // `next` turns error frames into `ClientError::Node`; kept for completeness.
                    let e = ClientError::Node(e);
                    return if announced {
                        self.after_first_token(e).await
                    } else {
                        self.before_first_token(e).await
                    };
                }
            }
        }
    }

    /// Hands the HTTP side an update while the job runs; false when it is gone, or has not
    /// taken an update for [`STALL_TIMEOUT`] (then the job is cancelled like a departed
    /// client's, before the node's own write timeout drops it without a receipt).
    async fn send(&self, update: JobUpdate) -> bool {
        tokio::select! {
            biased;
            r = tokio::time::timeout(STALL_TIMEOUT, self.tx.send(update)) => matches!(r, Ok(Ok(()))),
            () = self.inner.stop.cancelled() => false,
        }
    }

    /// Hands the HTTP side the job's last update, waiting a little for room.
    async fn finish(&self, update: JobUpdate) {
        let _ = tokio::time::timeout(STALL_TIMEOUT, self.tx.send(update)).await;
    }

    async fn before_first_token(&self, e: ClientError) -> Attempt {
        match &e {
            ClientError::Node(je) if je.code == ErrorCode::Busy => Attempt::Busy,
            ClientError::Node(je) if !je.code.is_retryable() => {
                let err = match je.code {
                    ErrorCode::PromptTooLong => ApiError::invalid_request(je.message.clone())
                        .with_code("context_length_exceeded")
                        .with_param("messages"),
                    ErrorCode::BadRequest => ApiError::invalid_request(je.message.clone()),
                    _ => ApiError::node_failed(&e.to_string()),
                };
                self.fail(err).await;
                Attempt::Over
            }
            ClientError::Request(msg) => {
                self.fail(ApiError::invalid_request(msg.clone())).await;
                Attempt::Over
            }
            // A stream that opened and then lost its connection before the job started: the
            // node was reachable a moment ago (a node that cannot be reached at all fails to
            // open, and is not tried again).
            ClientError::PeerGone { .. } => {
                Attempt::RetryTransport(ApiError::node_failed(&e.to_string()))
            }
            _ => Attempt::Retry(ApiError::node_failed(&e.to_string())),
        }
    }

    async fn after_first_token(&self, e: ClientError) -> Attempt {
        tracing::warn!(job_id = %self.job_id, error = %e, "job failed mid-stream; nothing is charged");
        self.fail(ApiError::node_failed(&format!(
            "the node failed mid-answer: {e}"
        )))
        .await;
        Attempt::Over
    }

    /// Cancels on the node and settles what it delivered. A caller still there (the
    /// coordinator stopping) gets the answer so far as a finished, billed response.
    async fn cancel(&self, stream: JobStream, started: &Started, why: &str) -> Attempt {
        tracing::info!(job_id = %self.job_id, node = %started.node, "cancelling: {why}");
        match stream.cancel().await {
            Some(result) => {
                if let Some(done) = self.settle(started, &result).await {
                    self.finish(JobUpdate::Done(Box::new(done))).await;
                }
            }
            None => {
                self.release().await;
                self.inner
                    .metrics
                    .job(&self.req.model, "cancelled", 0, 0, 0);
                let e = if self.inner.stop.is_cancelled() {
                    ApiError::shutting_down()
                } else {
                    ApiError::client_gone()
                };
                self.finish(JobUpdate::Failed(e)).await;
            }
        }
        Attempt::Over
    }

    /// Stores the receipt and charges it, in one ledger transaction.
    async fn settle(&self, started: &Started, result: &JobResult) -> Option<Finished> {
        let ledger = self.inner.ledger.clone();
        let receipt = result.receipt.clone();
        let job = self.job_id;
        if receipt.body.cost > self.reservation {
            // Cannot happen when the prompt bound holds; the ledger caps the charge.
            tracing::error!(job_id = %job, cost = %receipt.body.cost, reserved = %self.reservation, "receipt costs more than was reserved");
        }
        let payout = started.payout;
        let meta = crate::ledger::RequestMeta {
            at_ms: tessera_protocol::now_ms(),
            model: self.req.model.clone(),
            endpoint: match self.req.endpoint {
                crate::openai::Endpoint::Chat => "chat",
                crate::openai::Endpoint::Completions => "completions",
            }
            .to_owned(),
            attempts: started.attempts,
            ttft_ms: result.ttft_ms,
            decode_ms: result.decode_ms,
        };
        let settled = tokio::task::spawn_blocking(move || {
            ledger.settle_request(job, &receipt, &payout, Some(&meta))
        })
        .await;
        let settlement = match settled {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::error!(job_id = %job, error = %e, "settling a receipt failed");
                self.release().await;
                self.finish(JobUpdate::Failed(ApiError::internal(format!(
                    "cannot record the receipt: {e}"
                ))))
                .await;
                return None;
            }
            Err(_) => {
                self.release().await;
                self.finish(JobUpdate::Failed(ApiError::internal("ledger task failed")))
                    .await;
                return None;
            }
        };
        let outcome = match result.finish_reason {
            FinishReason::Cancelled => "cancelled",
            FinishReason::Interrupted => "interrupted",
            _ => "ok",
        };
        self.inner.metrics.job(
            &self.req.model,
            outcome,
            result.usage.prompt_tokens,
            result.usage.completion_tokens,
            settlement.charged.0,
        );
        tracing::info!(job_id = %job, node = %started.node, charged = %settlement.charged, tokens = result.usage.completion_tokens, "settled");
        let provenance = Provenance {
            node: started.node.to_string(),
            module: started.module.to_string(),
            receipt: job.to_hex(),
            receipt_url: format!("/v1/receipts/{}", job.to_hex()),
            cost: settlement.charged,
            price: started.price,
            attempts: started.attempts,
            ttft_ms: result.ttft_ms,
            interrupted: (result.finish_reason == FinishReason::Interrupted).then(|| {
                format!(
                    "node {} ended the answer after {} tokens: its relay circuit to this coordinator was closing; the {} tokens delivered are billed ({} base units, receipt {})",
                    started.node,
                    result.usage.completion_tokens,
                    result.usage.completion_tokens,
                    settlement.charged,
                    job.to_hex()
                )
            }),
        };
        Some(Finished {
            finish_reason: result.finish_reason,
            usage: result.usage,
            provenance,
        })
    }

    /// Hands a settled job to the auditor when it chooses to replay it.
    fn offer_audit(&self, started: &Started, result: &JobResult, transcript: &[TokenRecord]) {
        if let Some(auditor) = self
            .inner
            .auditor
            .as_ref()
            .filter(|a| a.chooses(&self.job_id, &started.node))
        {
            auditor.offer(crate::audit::AuditCase {
                job: self.job_id,
                node: started.node,
                payout: started.payout,
                module: started.module.clone(),
                numerics: started.numerics.clone(),
                input: self.req.input.clone(),
                sampling: result.receipt.body.sampling.clone(),
                prompt_tokens: result.usage.prompt_tokens,
                records: transcript.to_vec(),
                commitment: result.commitment,
            });
        }
    }

    async fn release(&self) {
        let ledger = self.inner.ledger.clone();
        let job = self.job_id;
        match tokio::task::spawn_blocking(move || ledger.release(job)).await {
            Ok(Ok(amount)) => tracing::debug!(job_id = %job, %amount, "reservation released"),
            Ok(Err(e)) => {
                tracing::error!(job_id = %job, error = %e, "releasing a reservation failed")
            }
            Err(_) => tracing::error!(job_id = %job, "ledger task failed"),
        }
    }

    async fn fail(&self, error: ApiError) {
        self.release().await;
        let outcome = if error.code == Some("no_node_available") {
            "no_node"
        } else {
            "failed"
        };
        self.inner.metrics.job(&self.req.model, outcome, 0, 0, 0);
        self.finish(JobUpdate::Failed(error)).await;
    }
}
