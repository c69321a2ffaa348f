//! The OpenAI-compatible HTTP API: `/v1/chat/completions` and `/v1/completions` (JSON or
//! server-sent events), `/v1/models`, `/v1/receipts/{id}`, `/v1/account`, `/health` and
//! `/metrics`. Errors take OpenAI's shape in one place ([`ApiError`]); JSON bodies whose
//! rejections would be axum's plain text become those errors too.

use crate::dashboard::data::{hex32, leaf_proof_json};
use crate::jobs::{DispatchConfig, Dispatcher, JobHandle, JobUpdate, Started};
use crate::ledger::{Ledger, LedgerError};
use crate::limits::{Limited, Limiter, RateLimits};
use crate::metrics::Metrics;
use crate::network::CoordinatorNet;
use crate::openai::{self, CompletionRequest, Endpoint, Head};
use crate::sequencer::{SequencerError, SequencerHandle};
use crate::table::NodeTable;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tessera_protocol::{Address, Amount, JobId};

/// Largest request body, in bytes: a full context of text with JSON overhead.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// What every handler can reach.
#[derive(Clone)]
pub struct ApiState {
    /// The live node table.
    pub table: Arc<RwLock<NodeTable>>,
    /// Runs jobs; holds the ledger.
    pub dispatcher: Dispatcher,
    /// Per-account request limits.
    pub limiter: Limiter,
    /// Figures for `/metrics`.
    pub metrics: Arc<Metrics>,
    /// The rollup's sequencer, when the coordinator settles on an L1.
    pub sequencer: Option<SequencerHandle>,
    /// Where the settlement contracts are, when it does.
    pub deployment: Option<tessera_contracts::Deployment>,
    /// The embedded L1, served over JSON-RPC at `/l1` (wallets in other processes use it).
    pub embedded_l1: Option<Arc<tessera_contracts::EmbeddedChain>>,
    /// The L1 the contracts are on (the dashboard reads roots and payouts from it).
    pub chain: Option<tessera_contracts::AnyChain>,
    /// Dashboard sessions (signed in with an API key).
    pub sessions: crate::dashboard::Sessions,
    /// What the dashboard last read of the batches on L1.
    pub chain_cache: crate::dashboard::data::ChainCache,
    /// The own stake below which the dashboard tells an operator its node is under the
    /// minimum (base units).
    pub dashboard_min_stake: u128,
}

impl ApiState {
    /// The API over a running network and a ledger, with the job and rate settings.
    pub fn new(
        net: &CoordinatorNet,
        ledger: Arc<Ledger>,
        metrics: Arc<Metrics>,
        dispatch: DispatchConfig,
        limits: RateLimits,
        auditor: Option<crate::audit::Auditor>,
    ) -> Self {
        let dispatcher = Dispatcher::new(
            net.client(),
            net.table(),
            ledger,
            metrics.clone(),
            dispatch,
            auditor,
        );
        Self {
            table: net.table(),
            dispatcher,
            limiter: Limiter::new(limits),
            metrics,
            sequencer: None,
            deployment: None,
            embedded_l1: None,
            chain: None,
            sessions: crate::dashboard::Sessions::default(),
            chain_cache: crate::dashboard::data::ChainCache::default(),
            dashboard_min_stake: 0,
        }
    }
}

/// An error as OpenAI clients expect it: `{"error": {"message", "type", "param", "code"}}`
/// with the matching HTTP status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// OpenAI's `type` (`invalid_request_error`, `authentication_error`, …).
    pub kind: &'static str,
    /// OpenAI's `code`, where one applies (`invalid_api_key`, `model_not_found`, …).
    pub code: Option<&'static str>,
    /// For people.
    pub message: String,
    /// The request parameter at fault, if one is.
    pub param: Option<String>,
    /// Seconds to wait before retrying (429), sent as `Retry-After`.
    pub retry_after: Option<u64>,
}

impl ApiError {
    fn new(
        status: StatusCode,
        kind: &'static str,
        code: Option<&'static str>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            kind,
            code,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }

    /// 400: the request is malformed or out of range.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            None,
            message,
        )
    }

    /// Names the parameter at fault.
    pub fn with_param(mut self, param: &str) -> Self {
        self.param = Some(param.to_owned());
        self
    }

    /// Sets OpenAI's `code`.
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// 429: over the account's rate or concurrency limit.
    pub fn rate_limited(limited: &Limited) -> Self {
        let (message, retry) = match limited {
            Limited::Rate(wait) => (
                format!(
                    "Rate limit reached for requests: retry in {:.1} s",
                    wait.as_secs_f64()
                ),
                wait.as_secs().max(1),
            ),
            Limited::Concurrency(n) => (
                format!(
                    "Too many requests in flight: at most {n} jobs may run at once per account"
                ),
                1,
            ),
        };
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            "requests",
            Some("rate_limit_exceeded"),
            message,
        );
        e.retry_after = Some(retry);
        e
    }

    /// 500: something failed on our side.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            Some("internal_error"),
            message,
        )
    }

    /// 503: the coordinator is stopping.
    pub fn shutting_down() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable_error",
            Some("shutting_down"),
            "the coordinator is shutting down; retry shortly",
        )
    }

    /// The HTTP client went away (never sent: nobody is left to read it).
    pub fn client_gone() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some("client_closed"),
            "the client closed the request",
        )
    }

    /// 503: the node(s) tried failed before answering; nothing was charged.
    pub fn node_failed(why: &str) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable_error",
            Some("node_failed"),
            format!("{why}; nothing was charged"),
        )
    }

    /// 503: no node can take the job, for the reason given.
    pub fn no_node_because(why: impl Into<String>) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable_error",
            Some("no_node_available"),
            why,
        )
    }

    /// 401: missing or unknown API key.
    pub fn invalid_api_key() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            Some("invalid_api_key"),
            "Incorrect or missing API key: send `Authorization: Bearer tsk_…` (create one with `tessera keys create ACCOUNT`)",
        )
    }

    /// 402: the account cannot cover the job's maximum cost.
    pub fn insufficient_balance(needed: Amount, available: Amount) -> Self {
        Self::new(
            StatusCode::PAYMENT_REQUIRED,
            "insufficient_quota",
            Some("insufficient_balance"),
            format!("insufficient balance: this request may cost up to {needed} base units and {available} are available (lower max_tokens, or add funds)"),
        )
    }

    /// 404: no such model on the network, or no such route.
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            Some(code),
            message,
        )
    }

    /// 413: the body is over [`MAX_BODY_BYTES`].
    pub fn too_large() -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            Some("request_too_large"),
            format!("request body exceeds {MAX_BODY_BYTES} bytes"),
        )
    }

    /// 503: no node can take the job now.
    pub fn no_node(model: &str) -> Self {
        Self::no_node_because(format!(
            "no node serving {model} can take the job now; retry shortly"
        ))
    }

    fn body(&self) -> Value {
        json!({
            "error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}
        })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, message = %self.message, "API error");
        }
        let mut resp = (self.status, Json(self.body())).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert("retry-after", HeaderValue::from(secs));
        }
        resp
    }
}

/// A JSON body whose every rejection is an OpenAI-shaped error (400, or 413 when too large),
/// where axum's own would answer 415/422 with plain text.
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(r) if r.status() == StatusCode::PAYLOAD_TOO_LARGE => Err(ApiError::too_large()),
            Err(r) => Err(ApiError::invalid_request(r.body_text())),
        }
    }
}

/// The API's routes over `state`.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/nodes", get(nodes))
        .route("/v1/audits", get(audits))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/receipts/{id}", get(receipt))
        .route("/v1/account", get(account))
        .route("/l1", post(l1_rpc))
        .route("/v1/l2/deployment", get(l2_deployment))
        .route("/v1/l2/accounts/{address}", get(l2_account))
        .route("/v1/l2/accounts/{address}/statement", get(l2_statement))
        .route("/v1/l2/transactions", post(l2_submit))
        .merge(crate::dashboard::routes())
        .fallback(|| async { ApiError::not_found("unknown_url", "no such endpoint") })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_requests,
        ))
        .with_state(state)
}

/// Records every response's status and time in `/metrics` (streams: time to headers).
async fn count_requests(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    let endpoint = match req.uri().path() {
        "/v1/chat/completions" => "chat",
        "/v1/completions" => "completions",
        "/v1/models" => "models",
        "/health" => "health",
        "/metrics" => "metrics",
        "/v1/account" => "account",
        p if p.starts_with("/v1/l2/") => "l2",
        "/l1" => "l1",
        p if p.starts_with("/v1/receipts/") => "receipts",
        _ => "other",
    };
    let t0 = Instant::now();
    let resp = next.run(req).await;
    state
        .metrics
        .request(endpoint, resp.status().as_u16(), t0.elapsed());
    resp
}

async fn metrics(State(state): State<ApiState>) -> Response {
    if let Some(seq) = &state.sequencer {
        if let Ok((batches, finalized)) = seq.batches().await {
            let (mut posted, mut final_) = (0u128, 0u128);
            for b in &batches {
                let v: u128 = b.settlements.iter().map(|s| s.split.amount).sum();
                if b.index < finalized {
                    final_ += v;
                } else {
                    posted += v;
                }
            }
            state.metrics.set_settled("posted", posted);
            state.metrics.set_settled("final", final_);
        }
    }
    let ledger = state.dispatcher.ledger().clone();
    if let Ok(Ok(unbatched)) = tokio::task::spawn_blocking(move || ledger.unbatched()).await {
        let pending: u128 = unbatched.iter().map(|u| u.cost).sum();
        state.metrics.set_settled("pending", pending);
    }
    let text = match state.table.read() {
        Ok(t) => state.metrics.render(&t),
        Err(_) => String::new(),
    };
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        text,
    )
        .into_response()
}

/// The account behind the request's `Authorization: Bearer` key.
fn authenticate(state: &ApiState, headers: &HeaderMap) -> Result<String, ApiError> {
    let key = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .ok_or_else(ApiError::invalid_api_key)?;
    match state.dispatcher.ledger().authenticate(key) {
        Ok(account) => Ok(account),
        Err(LedgerError::BadKey) => Err(ApiError::invalid_api_key()),
        Err(e) => Err(ApiError::internal(e.to_string())),
    }
}

async fn chat_completions(
    State(state): State<ApiState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    complete(state, headers, Endpoint::Chat, body).await
}

async fn completions(
    State(state): State<ApiState>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<Value>,
) -> Result<Response, ApiError> {
    complete(state, headers, Endpoint::Completions, body).await
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

async fn complete(
    state: ApiState,
    headers: HeaderMap,
    endpoint: Endpoint,
    body: Value,
) -> Result<Response, ApiError> {
    let account = authenticate(&state, &headers)?;
    let req = CompletionRequest::parse(endpoint, body)?;
    let permit = state
        .limiter
        .admit(&account, Instant::now())
        .map_err(|l| ApiError::rate_limited(&l))?;
    tracing::debug!(%account, model = %req.model, stream = req.stream, user = ?req.user, "completion request");
    let mut job = state
        .dispatcher
        .submit(account, req.clone(), permit)
        .await?;
    let started = match job.updates.recv().await {
        Some(JobUpdate::Started(s)) => s,
        Some(JobUpdate::Failed(e)) => return Err(e),
        Some(_) | None => return Err(ApiError::internal("the job ended before it started")),
    };
    let id = match endpoint {
        Endpoint::Chat => format!("chatcmpl-{}", job.job_id),
        Endpoint::Completions => format!("cmpl-{}", job.job_id),
    };
    let created = unix_now();
    let mut response = if req.stream {
        stream_response(endpoint, id, created, req, *started.clone(), job)
    } else {
        whole_response(endpoint, &id, created, &req, &started, job).await?
    };
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&started.node.to_string()) {
        h.insert("x-tessera-node", v);
    }
    if let Ok(v) = HeaderValue::from_str(&started.job_id.to_hex()) {
        h.insert("x-tessera-receipt", v);
    }
    if let Ok(v) = HeaderValue::from_str(&started.module.to_string()) {
        h.insert("x-tessera-module", v);
    }
    Ok(response)
}

async fn whole_response(
    endpoint: Endpoint,
    id: &str,
    created: u64,
    req: &CompletionRequest,
    started: &Started,
    mut job: JobHandle,
) -> Result<Response, ApiError> {
    let mut text = String::new();
    loop {
        match job.updates.recv().await {
            Some(JobUpdate::Delta(t)) => text.push_str(&t),
            Some(JobUpdate::Done(done)) => {
                let fingerprint = started.module.to_string();
                let head = Head {
                    id,
                    created,
                    model: &req.model,
                    fingerprint: &fingerprint,
                };
                let body = openai::full_response(
                    endpoint,
                    &head,
                    &text,
                    done.finish_reason,
                    &done.usage,
                    &done.provenance,
                );
                return Ok(Json(body).into_response());
            }
            Some(JobUpdate::Failed(e)) => return Err(e),
            Some(JobUpdate::Started(_)) => {}
            None => return Err(ApiError::internal("the job ended without a result")),
        }
    }
}

/// The SSE body: OpenAI's chunks, then `data: [DONE]`; a failure mid-stream is an
/// `{"error": …}` event (what OpenAI's SDKs raise as an API error) and no `[DONE]`.
fn stream_response(
    endpoint: Endpoint,
    id: String,
    created: u64,
    req: CompletionRequest,
    started: Started,
    job: JobHandle,
) -> Response {
    struct S {
        endpoint: Endpoint,
        id: String,
        created: u64,
        model: String,
        fingerprint: String,
        include_usage: bool,
        pending: std::collections::VecDeque<Event>,
        job: Option<JobHandle>,
    }
    let mut s = S {
        endpoint,
        id,
        created,
        model: req.model.clone(),
        fingerprint: started.module.to_string(),
        include_usage: req.include_usage,
        pending: Default::default(),
        job: Some(job),
    };
    let data = |v: &Value| Event::default().data(v.to_string());
    if endpoint == Endpoint::Chat {
        let head = Head {
            id: &s.id,
            created,
            model: &s.model,
            fingerprint: &s.fingerprint,
        };
        s.pending.push_back(data(&openai::chunk(
            endpoint,
            &head,
            None,
            None,
            s.include_usage,
        )));
    }
    let stream = futures::stream::unfold(s, move |mut s| async move {
        loop {
            if let Some(ev) = s.pending.pop_front() {
                return Some((Ok::<Event, Infallible>(ev), s));
            }
            let job = s.job.as_mut()?;
            let head = Head {
                id: &s.id,
                created: s.created,
                model: &s.model,
                fingerprint: &s.fingerprint,
            };
            match job.updates.recv().await {
                Some(JobUpdate::Delta(t)) => {
                    s.pending.push_back(data(&openai::chunk(
                        s.endpoint,
                        &head,
                        Some(&t),
                        None,
                        s.include_usage,
                    )));
                }
                Some(JobUpdate::Done(done)) => {
                    let mut last = openai::chunk(
                        s.endpoint,
                        &head,
                        None,
                        Some(done.finish_reason),
                        s.include_usage,
                    );
                    last["tessera"] = serde_json::to_value(&done.provenance).unwrap_or(Value::Null);
                    if let Some(why) = &done.provenance.interrupted {
                        // The answer was cut short: the text sent is billed, and the
                        // stream ends with an error that says so (no `[DONE]`).
                        let mut err = ApiError::new(
                            StatusCode::BAD_GATEWAY,
                            "server_error",
                            Some("node_interrupted"),
                            why.clone(),
                        )
                        .body();
                        err["tessera"] = last["tessera"].clone();
                        s.pending.push_back(data(&err));
                        s.job = None;
                        continue;
                    }
                    s.pending.push_back(data(&last));
                    if s.include_usage {
                        s.pending.push_back(data(&openai::usage_chunk(
                            s.endpoint,
                            &head,
                            &done.usage,
                            &done.provenance,
                        )));
                    }
                    s.pending.push_back(Event::default().data("[DONE]"));
                    s.job = None;
                }
                Some(JobUpdate::Failed(e)) => {
                    s.pending.push_back(data(&e.body()));
                    s.job = None;
                }
                Some(JobUpdate::Started(_)) => {}
                None => {
                    s.pending.push_back(data(
                        &ApiError::internal("the job ended without a result").body(),
                    ));
                    s.job = None;
                }
            }
        }
    });
    Sse::new(stream).into_response()
}

/// `GET /v1/receipts/{id}`: the node-signed receipt of one of the caller's jobs, with the
/// amount charged, so a developer can check their bill against the node's signature.
async fn receipt(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let account = authenticate(&state, &headers)?;
    let not_found = || {
        ApiError::not_found(
            "receipt_not_found",
            format!("no receipt {id} for this account"),
        )
    };
    let mut bytes = [0u8; 16];
    hex::decode_to_slice(
        id.trim_start_matches("chatcmpl-")
            .trim_start_matches("cmpl-"),
        &mut bytes,
    )
    .map_err(|_| not_found())?;
    let ledger = state.dispatcher.ledger().clone();
    let found = tokio::task::spawn_blocking(move || ledger.receipt(JobId(bytes)))
        .await
        .map_err(|_| ApiError::internal("ledger task failed"))?
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let Some((owner, charged, signed)) = found.filter(|(owner, ..)| *owner == account) else {
        return Err(not_found());
    };
    let verified = signed.verify().is_ok();
    Ok(Json(json!({
        "object": "tessera.receipt",
        "id": id,
        "account": owner,
        "charged": charged,
        "signature_valid": verified,
        "receipt": signed,
    })))
}

/// `GET /v1/account`: the caller's balance.
async fn account(
    State(state): State<ApiState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let account = authenticate(&state, &headers)?;
    let b = state
        .dispatcher
        .ledger()
        .balance(&account)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let mut body = b.to_json(&account);
    body["object"] = json!("tessera.account");
    Ok(Json(body))
}

fn parse_address(address: &str) -> Result<Address, ApiError> {
    address.parse().map_err(|_| {
        ApiError::invalid_request(format!("{address:?} is not a 0x-prefixed 20-byte address"))
            .with_param("address")
    })
}

fn sequencer(state: &ApiState) -> Result<&SequencerHandle, ApiError> {
    state.sequencer.as_ref().ok_or_else(|| {
        ApiError::not_found(
            "settlement_off",
            "this coordinator does not settle on an L1 (no sequencer)",
        )
    })
}

fn l2_leaf(a: &tessera_rollup::Account) -> Value {
    json!({
        "balance": Amount(a.balance),
        "nonce": a.nonce,
        "earned": Amount(a.earned),
        "withdrawn": Amount(a.withdrawn),
        "stake": Amount(a.stake),
        "unbonding": Amount(a.unbonding),
        "unbond_epoch": a.unbond_epoch,
        "delegated_to_it": Amount(a.delegated),
        "commission_bps": a.commission_bps,
        "next_commission_bps": a.next_commission_bps,
        "next_commission_epoch": a.next_commission_epoch,
        "pool": Amount(a.pool),
    })
}

/// An L2 account by L1 address: as applied (`pending`), at the last posted batch
/// (`posted`) and at the last final one (`final`, with the leaf and its Merkle proof, what
/// an L1 withdrawal or a reward statement checks against the contract's root). Public:
/// anyone can rebuild it from L1 data.
async fn l2_account(
    State(state): State<ApiState>,
    Path(address): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let seq = sequencer(&state)?;
    let address = parse_address(&address)?;
    let view = seq
        .account(address)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .ok_or_else(|| {
            ApiError::not_found("account_not_found", format!("no L2 account for {address}"))
        })?;
    let proof = seq
        .final_proof(view.slot)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Json(json!({
        "object": "tessera.l2_account",
        "address": address,
        "slot": view.slot,
        "pending": l2_leaf(&view.pending),
        "delegations": view.delegations.iter().map(|(slot, d)| json!({
            "slot": slot,
            "node_slot": d.node,
            "amount": Amount(d.amount),
            "earned": Amount(d.earned),
        })).collect::<Vec<_>>(),
        "next_delegation_slot": view.next_delegation,
        "posted": view.posted.as_ref().map(l2_leaf),
        "final": view.final_.as_ref().map(l2_leaf),
        "proof": proof.map(|p| {
            let mut v = leaf_proof_json(&p.preimage, &p.proof);
            v["batch"] = json!(p.batch);
            v["root"] = json!(hex32(&p.root));
            v
        }),
    })))
}

/// The embedded L1's Ethereum JSON-RPC (a devnet's chain, for wallets and tools in other
/// processes). Answers JSON-RPC errors, never HTTP ones, for anything it can parse.
async fn l1_rpc(State(state): State<ApiState>, body: axum::body::Bytes) -> Response {
    let Some(chain) = state.embedded_l1.clone() else {
        return ApiError::not_found("no_embedded_l1", "this coordinator serves no embedded L1")
            .into_response();
    };
    let request: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return Json(json!({
                "jsonrpc": "2.0",
                "id": null,
                "error": {"code": -32700, "message": format!("parse error: {e}")},
            }))
            .into_response()
        }
    };
    match tokio::task::spawn_blocking(move || chain.rpc(request)).await {
        Ok(answer) => Json(answer).into_response(),
        Err(_) => ApiError::internal("the L1 task failed").into_response(),
    }
}

/// The settlement deployment: chain id, contract addresses, the signing domain, the
/// parameters. A wallet checks the domain itself (docs/settlement.md) before signing.
async fn l2_deployment(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    sequencer(&state)?;
    let d = state
        .deployment
        .as_ref()
        .ok_or_else(|| ApiError::internal("no deployment recorded"))?;
    let mut body = serde_json::to_value(d).map_err(|e| ApiError::internal(e.to_string()))?;
    body["object"] = json!("tessera.deployment");
    Ok(Json(body))
}

/// A reward statement: the account and its delegations at the last final batch of each
/// epoch (and at the last final batch), each leaf with its proof against that batch's
/// root, which the contract holds. Differences between rows are the epoch's earnings.
async fn l2_statement(
    State(state): State<ApiState>,
    Path(address): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let seq = sequencer(&state)?;
    let address = parse_address(&address)?;
    let rows = seq
        .statement(address)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    Ok(Json(json!({
        "object": "tessera.statement",
        "address": address,
        "rows": rows.iter().map(|r| json!({
            "batch": r.batch,
            "epoch": r.epoch,
            "root": hex32(&r.root),
            "slot": r.slot,
            "account": leaf_proof_json(&r.account.0, &r.account.1),
            "delegations": r.delegations.iter().map(|(slot, leaf, proof)| {
                let mut v = leaf_proof_json(leaf, proof);
                v["slot"] = json!(slot);
                v
            }).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })))
}

/// Queues a signed L2 transaction (withdraw, stake, unstake, delegate, undelegate, set
/// commission), a claim or a release: `{"tx": "0x…"}` in the packed encoding of
/// docs/settlement.md. Refused with the reason when it would not apply. Public: a signed
/// transaction carries its own authority.
async fn l2_submit(
    State(state): State<ApiState>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let seq = sequencer(&state)?;
    let v: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid_request(format!("body is not JSON: {e}")))?;
    let hex_tx = v
        .get("tx")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::invalid_request("expected {\"tx\": \"0x…\"}").with_param("tx"))?;
    let bytes = hex::decode(hex_tx.trim_start_matches("0x"))
        .map_err(|e| ApiError::invalid_request(format!("tx is not hex: {e}")).with_param("tx"))?;
    let (tx, len) = tessera_rollup::Tx::decode(&bytes)
        .map_err(|e| ApiError::invalid_request(e.to_string()).with_param("tx"))?;
    if len != bytes.len() {
        return Err(ApiError::invalid_request(format!(
            "tx has {} trailing bytes after one transaction",
            bytes.len() - len
        ))
        .with_param("tx"));
    }
    match seq.submit(tx).await {
        Ok(()) => Ok((
            StatusCode::ACCEPTED,
            Json(json!({"object": "tessera.l2_transaction", "status": "pending"})),
        )),
        Err(
            e @ (SequencerError::Rejected(_)
            | SequencerError::Malformed(_)
            | SequencerError::Ledger(_)),
        ) => Err(ApiError::invalid_request(e.to_string()).with_param("tx")),
        Err(e) => Err(ApiError::internal(e.to_string())),
    }
}

async fn health(State(state): State<ApiState>) -> Json<serde_json::Value> {
    let nodes = state.table.read().map(|t| t.len()).unwrap_or(0);
    Json(json!({"status": "ok", "nodes": nodes}))
}

/// A node's audit standing as the API shows it.
fn standing_json(r: &crate::audit::NodeRecord) -> Value {
    json!({
        "audits": {"passed": r.passed, "failed": r.failed, "missed": r.missed},
        "reputation": (r.reputation() * 1000.0).round() / 1000.0,
        "open_disputes": r.open_disputes,
        "slashed": r.slashed,
        "routed": !r.excluded(),
        "last_audit_ms": r.last_audit_ms,
    })
}

/// The node table: every node advertising, its modules and load, and its audit standing
/// (nodes that left but have a standing are listed too, as offline).
async fn nodes(State(state): State<ApiState>) -> Json<Value> {
    let mut data = Vec::new();
    if let Ok(table) = state.table.read() {
        let fresh = crate::audit::NodeRecord::default();
        for e in table.nodes() {
            let standing = table.standing(&e.advert.node).unwrap_or(&fresh);
            let modules: Vec<Value> = e
                .advert
                .modules
                .iter()
                .map(
                    |o| json!({"alias": o.alias, "module": o.module.to_string(), "price": o.price}),
                )
                .collect();
            data.push(json!({
                "node": e.advert.node.to_string(),
                "online": true,
                "connected": e.connected,
                "payout": e.advert.payout,
                "modules": modules,
                "load": {"running": e.advert.load.running, "waiting": e.advert.load.waiting, "capacity": e.advert.capacity},
                "standing": standing_json(standing),
            }));
        }
        for (peer, r) in table.standings() {
            if table.get(peer).is_none() {
                data.push(json!({"node": peer.to_string(), "online": false, "standing": standing_json(r)}));
            }
        }
    }
    Json(json!({"object": "list", "data": data}))
}

/// Audit history: every audit's result, and each dispute's verdict and slash (the
/// transcripts stay in the coordinator's ledger: they are callers' answers).
async fn audits(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    let ledger = state.dispatcher.ledger().clone();
    let (audits, disputes) = tokio::task::spawn_blocking(move || {
        Ok::<_, LedgerError>((ledger.audits()?, ledger.disputes()?))
    })
    .await
    .map_err(|_| ApiError::internal("ledger task failed"))?
    .map_err(|e| ApiError::internal(e.to_string()))?;
    let disputes: Vec<Value> = disputes
        .iter()
        .map(|d| {
            json!({
                "job": d.audit.job,
                "node": d.audit.node,
                "auditor": d.audit.auditor,
                "module": d.audit.module,
                "verdict": d.audit.verdict,
                "records": d.claimed.len(),
                "slash": d.slash,
                "open": d.open,
                "at_ms": d.audit.at_ms,
            })
        })
        .collect();
    Ok(Json(json!({"audits": audits, "disputes": disputes})))
}

/// Per alias: its modules, each with node count and price range.
async fn models(State(state): State<ApiState>) -> Json<serde_json::Value> {
    #[derive(Default)]
    struct Range {
        nodes: usize,
        input: (u128, u128),
        output: (u128, u128),
    }
    let mut by_alias: BTreeMap<String, BTreeMap<String, Range>> = BTreeMap::new();
    if let Ok(table) = state.table.read() {
        for entry in table.nodes() {
            for offer in &entry.advert.modules {
                let r = by_alias
                    .entry(offer.alias.clone())
                    .or_default()
                    .entry(offer.module.to_string())
                    .or_insert(Range {
                        nodes: 0,
                        input: (u128::MAX, 0),
                        output: (u128::MAX, 0),
                    });
                r.nodes += 1;
                let (i, o) = (offer.price.per_1k_input.0, offer.price.per_1k_output.0);
                r.input = (r.input.0.min(i), r.input.1.max(i));
                r.output = (r.output.0.min(o), r.output.1.max(o));
            }
        }
    }
    let data: Vec<serde_json::Value> = by_alias
        .into_iter()
        .map(|(alias, modules)| {
            let modules: Vec<serde_json::Value> = modules
                .into_iter()
                .map(|(module, r)| {
                    json!({
                        "module": module,
                        "nodes": r.nodes,
                        "price_per_1k_input": {"min": Amount(r.input.0), "max": Amount(r.input.1)},
                        "price_per_1k_output": {"min": Amount(r.output.0), "max": Amount(r.output.1)},
                    })
                })
                .collect();
            json!({"id": alias, "object": "model", "created": 0, "owned_by": "tessera", "tessera": {"modules": modules}})
        })
        .collect();
    Json(json!({"object": "list", "data": data}))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use std::time::Duration;
    use tessera_net::{NetConfig, NetEvent};
    use tessera_protocol::{AdvertStatus, Keypair, LatencyStats, ModuleOffer, Price};
    use tower::ServiceExt;

    const MODEL: &str = "smollm2-135m-instruct";

    struct Fixture {
        app: Router,
        state: ApiState,
        key: String,
        poor_key: String,
        _net: CoordinatorNet,
        _dir: tempfile::TempDir,
    }

    /// A real swarm and ledger; the table holds adverts of nodes that do not exist, so
    /// every job to them fails to open (what a vanished node looks like).
    async fn fixture(prices: &[u128], limits: RateLimits, full: bool) -> Fixture {
        let dir = tempfile::tempdir().expect("tempdir");
        let ledger = Ledger::open(&dir.path().join("ledger.redb")).expect("ledger");
        ledger.create_account("alice").expect("account");
        ledger.credit("alice", Amount(10_000_000)).expect("credit");
        let key = ledger.create_key("alice").expect("key").expose().to_owned();
        ledger.create_account("poor").expect("account");
        let poor_key = ledger.create_key("poor").expect("key").expose().to_owned();
        let config = NetConfig {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")],
            ..NetConfig::default()
        };
        let net = CoordinatorNet::start(Keypair::generate_ed25519(), &config)
            .await
            .expect("net");
        let module = crate::table::tests::module(3);
        {
            let table = net.table();
            let mut table = table.write().expect("table");
            for &out in prices {
                let key = Keypair::generate_ed25519();
                let mut advert =
                    crate::table::tests::advert(key.public().to_peer_id(), 1, AdvertStatus::Online);
                advert.capacity = 2;
                advert.load.running = if full { 2 } else { 0 };
                advert.modules = vec![ModuleOffer {
                    module: module.clone(),
                    alias: MODEL.into(),
                    price: Price {
                        per_1k_input: Amount(1000),
                        per_1k_output: Amount(out),
                    },
                    latency: LatencyStats::default(),
                    numerics: "tessera-tiles-2".into(),
                }];
                table.apply(
                    &NetEvent::Advert(Box::new(advert)),
                    std::time::Instant::now(),
                );
            }
        }
        let state = ApiState::new(
            &net,
            Arc::new(ledger),
            Arc::new(Metrics::new()),
            DispatchConfig {
                queue_timeout: Duration::from_millis(300),
                ..DispatchConfig::default()
            },
            limits,
            None,
        );
        Fixture {
            app: router(state.clone()),
            state,
            key,
            poor_key,
            _net: net,
            _dir: dir,
        }
    }

    async fn call(app: Router, req: Request<Body>) -> (StatusCode, HeaderMap, Value) {
        let resp = app.oneshot(req).await.expect("response");
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .expect("body");
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, headers, body)
    }

    fn get_req(uri: &str, key: Option<&str>) -> Request<Body> {
        let mut b = Request::builder().uri(uri);
        if let Some(k) = key {
            b = b.header("authorization", format!("Bearer {k}"));
        }
        b.body(Body::empty()).expect("request")
    }

    fn post_req(uri: &str, key: Option<&str>, body: Value) -> Request<Body> {
        let mut b = Request::builder()
            .method("POST")
            .uri(uri)
            .header("content-type", "application/json");
        if let Some(k) = key {
            b = b.header("authorization", format!("Bearer {k}"));
        }
        b.body(Body::from(body.to_string())).expect("request")
    }

    fn chat_body(model: &str) -> Value {
        json!({"model": model, "messages": [{"role": "user", "content": "Name the capital of France."}], "max_tokens": 8})
    }

    fn assert_openai_error(body: &Value, code: &str) {
        assert_eq!(body["error"]["code"], code, "{body}");
        assert!(body["error"]["type"].is_string(), "{body}");
        assert!(body["error"].get("param").is_some(), "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{body}"
        );
    }

    #[tokio::test]
    async fn models_lists_each_alias_with_its_modules_nodes_and_price_range() {
        let f = fixture(&[4000, 6000], RateLimits::default(), false).await;
        let (status, _, body) = call(f.app.clone(), get_req("/v1/models", None)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["object"], "list");
        let model = &body["data"][0];
        assert_eq!(model["id"], MODEL);
        assert_eq!(model["object"], "model");
        let module = &model["tessera"]["modules"][0];
        assert_eq!(module["nodes"], 2);
        assert_eq!(module["price_per_1k_output"]["min"], "4000");
        assert_eq!(module["price_per_1k_output"]["max"], "6000");
        let (status, _, body) = call(f.app, get_req("/health", None)).await;
        assert_eq!((status, body["nodes"].clone()), (StatusCode::OK, json!(2)));
    }

    #[tokio::test]
    async fn each_error_status_has_openai_shape() {
        let f = fixture(
            &[4000],
            RateLimits {
                requests_per_minute: 3,
                concurrent_jobs: 8,
            },
            false,
        )
        .await;
        let chat = "/v1/chat/completions";
        // 401: no key, wrong key.
        for key in [None, Some("tsk_wrong")] {
            let (status, _, body) =
                call(f.app.clone(), post_req(chat, key, chat_body(MODEL))).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED);
            assert_openai_error(&body, "invalid_api_key");
        }
        // 400: malformed body, bad parameter.
        let bad = Request::builder()
            .method("POST")
            .uri(chat)
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {}", f.key))
            .body(Body::from("{nope"))
            .expect("req");
        let (status, _, body) = call(f.app.clone(), bad).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["type"], "invalid_request_error");
        let mut two = chat_body(MODEL);
        two["n"] = json!(2);
        let (status, _, body) = call(f.app.clone(), post_req(chat, Some(&f.key), two)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["param"], "n");
        // 404: unknown model.
        let (status, _, body) = call(
            f.app.clone(),
            post_req(chat, Some(&f.key), chat_body("gpt-17")),
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_openai_error(&body, "model_not_found");
        // 429: the bucket holds 3 requests a minute; the limiter counts requests that
        // authenticated and parsed (the unknown-model one above), so a few more reach it.
        let mut limited = None;
        for _ in 0..4 {
            let (status, headers, body) = call(
                f.app.clone(),
                post_req(chat, Some(&f.key), chat_body("gpt-17")),
            )
            .await;
            if status == StatusCode::TOO_MANY_REQUESTS {
                limited = Some((headers, body));
                break;
            }
        }
        let (headers, body) = limited.expect("rate limit reached");
        assert_openai_error(&body, "rate_limit_exceeded");
        assert!(headers.get("retry-after").is_some());
        // 402: an account that cannot cover max_tokens at the node's price.
        let (status, _, body) = call(
            f.app.clone(),
            post_req(chat, Some(&f.poor_key), chat_body(MODEL)),
        )
        .await;
        assert_eq!(status, StatusCode::PAYMENT_REQUIRED);
        assert_openai_error(&body, "insufficient_balance");
        // 413: too large.
        let mut huge = chat_body(MODEL);
        huge["messages"][0]["content"] = json!("x".repeat(MAX_BODY_BYTES));
        let (status, _, body) = call(f.app.clone(), post_req(chat, Some(&f.poor_key), huge)).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_openai_error(&body, "request_too_large");
        // Unknown route.
        let (status, _, body) = call(f.app, get_req("/v1/nope", None)).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_openai_error(&body, "unknown_url");
    }

    #[tokio::test]
    async fn unreachable_nodes_are_503_after_fallbacks_and_nothing_stays_reserved() {
        let f = fixture(&[4000, 5000], RateLimits::default(), false).await;
        let (status, _, body) = call(
            f.app.clone(),
            post_req(
                "/v1/completions",
                Some(&f.key),
                json!({"model": MODEL, "prompt": "Hi"}),
            ),
        )
        .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_openai_error(&body, "node_failed");
        let b = f
            .state
            .dispatcher
            .ledger()
            .balance("alice")
            .expect("balance");
        assert_eq!((b.balance, b.reserved), (Amount(10_000_000), Amount::ZERO));
        // Both nodes were tried, and both are now marked as failed.
        {
            let table = f.state.table.read().expect("table");
            assert!(
                table.nodes().all(|e| e.failures == 1),
                "each node tried once"
            );
        }
        let (_, _, text) = call(f.app, get_req("/metrics", None)).await;
        let text = text.as_str().expect("text").to_owned();
        assert!(text.contains("tessera_job_retries_total 1"), "{text}");
        assert!(
            text.contains("tessera_jobs_total{outcome=\"failed\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tessera_http_requests_total{endpoint=\"completions\",status=\"503\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tessera_module_nodes{model=\"smollm2-135m-instruct\""),
            "{text}"
        );
    }

    #[tokio::test]
    async fn busy_nodes_make_requests_wait_then_503_no_node_available() {
        let f = fixture(&[4000], RateLimits::default(), true).await;
        let t0 = Instant::now();
        let (status, _, body) = call(
            f.app.clone(),
            post_req("/v1/chat/completions", Some(&f.key), chat_body(MODEL)),
        )
        .await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_openai_error(&body, "no_node_available");
        assert!(
            t0.elapsed() >= Duration::from_millis(300),
            "waited for the queue timeout"
        );
        assert_eq!(
            f.state
                .dispatcher
                .ledger()
                .balance("alice")
                .expect("b")
                .reserved,
            Amount::ZERO
        );
    }

    #[tokio::test]
    async fn dashboard_pages_and_api_answer_with_clear_errors_and_sign_in_by_form() {
        let f = fixture(&[4000, 5000], RateLimits::default(), false).await;
        // Pages: server-rendered, same-origin only.
        for page in ["/", "/nodes", "/login", "/accounts"] {
            let (status, headers, body) = call(f.app.clone(), get_req(page, None)).await;
            assert_eq!(status, StatusCode::OK, "{page}: {body}");
            assert_eq!(
                headers
                    .get("content-security-policy")
                    .map(|v| v.to_str().unwrap_or("")),
                Some("default-src 'self'"),
                "{page}"
            );
            let html = body.as_str().unwrap_or_default();
            assert!(
                html.contains("<!doctype html>") && !html.contains("<script"),
                "{page}"
            );
        }
        let (status, _, nodes) = call(f.app.clone(), get_req("/api/v1/nodes", None)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(nodes["nodes"].as_array().map(Vec::len), Some(2));
        assert_eq!(
            nodes["as_of"]["final_batch"],
            Value::Null,
            "no settlement here"
        );
        // Bad input: one clear error each.
        let (status, _, body) =
            call(f.app.clone(), get_req("/api/v1/accounts/0xnothex", None)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("20-byte address"),
            "{body}"
        );
        let (status, _, body) = call(
            f.app.clone(),
            get_req(
                "/api/v1/accounts/0x00000000000000000000000000000000000000aa",
                None,
            ),
        )
        .await;
        assert_eq!(
            (status, body["error"]["code"].clone()),
            (StatusCode::NOT_FOUND, json!("settlement_off"))
        );
        let (status, _, _) = call(f.app.clone(), get_req("/api/v1/nodes/not-a-peer", None)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let (status, _, _) = call(
            f.app.clone(),
            post_req("/api/v1/verify", None, json!({"kind": "nonsense"})),
        )
        .await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        // Usage needs a key or a session.
        let (status, _, _) = call(f.app.clone(), get_req("/api/v1/usage", None)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _, usage) = call(f.app.clone(), get_req("/api/v1/usage", Some(&f.key))).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            (usage["account"].clone(), usage["request_count"].clone()),
            (json!("alice"), json!(0))
        );
        assert_eq!(
            usage["balance"]["credited"],
            json!({"amount": "10000000", "status": "pending"})
        );
        let (status, headers, _) = call(f.app.clone(), get_req("/usage", None)).await;
        assert_eq!(status, StatusCode::SEE_OTHER);
        assert_eq!(
            headers.get("location").map(|v| v.to_str().unwrap_or("")),
            Some("/login")
        );
        // Sign in with the form: a wrong key is refused, a right one sets the cookie.
        let form = |key: &str| {
            Request::builder()
                .method("POST")
                .uri("/login")
                .header("content-type", "application/x-www-form-urlencoded")
                .body(Body::from(format!("key={key}")))
                .expect("request")
        };
        let (status, headers, _) = call(f.app.clone(), form("tsk_wrong")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(headers.get("set-cookie").is_none());
        let (status, headers, _) = call(f.app.clone(), form(&f.key)).await;
        assert_eq!(status, StatusCode::SEE_OTHER);
        let cookie = headers
            .get("set-cookie")
            .and_then(|v| v.to_str().ok())
            .expect("cookie")
            .to_owned();
        assert!(
            cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
            "{cookie}"
        );
        assert!(!cookie.contains(&f.key), "the key is not the cookie");
        let session = cookie.split(';').next().expect("pair").to_owned();
        let req = Request::builder()
            .uri("/usage")
            .header("cookie", &session)
            .body(Body::empty())
            .expect("request");
        let (status, _, page) = call(f.app.clone(), req).await;
        assert_eq!(status, StatusCode::OK);
        assert!(page
            .as_str()
            .unwrap_or_default()
            .contains("signed in as <b>alice</b>"));
        // Signing out ends the session.
        let req = Request::builder()
            .method("POST")
            .uri("/logout")
            .header("cookie", &session)
            .body(Body::empty())
            .expect("request");
        call(f.app.clone(), req).await;
        let req = Request::builder()
            .uri("/api/v1/usage")
            .header("cookie", &session)
            .body(Body::empty())
            .expect("request");
        assert_eq!(call(f.app.clone(), req).await.0, StatusCode::UNAUTHORIZED);
        for (path, kind) in [
            ("/static/dashboard.css", "text/css"),
            ("/favicon.ico", "image/svg+xml"),
        ] {
            let (status, headers, _) = call(f.app.clone(), get_req(path, None)).await;
            assert_eq!(status, StatusCode::OK);
            assert!(headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with(kind)));
        }
    }

    /// A node on a real swarm that answers every job with "Paris" and ends it
    /// `interrupted`, with a valid receipt, as a node does before its relay circuit closes.
    async fn interrupting_node(f: &Fixture, price: Price) -> tessera_net::NetHandle {
        use futures::{AsyncWriteExt, StreamExt};
        use tessera_protocol::job::{MAX_EVENT_FRAME, MAX_REQUEST_FRAME};
        use tessera_protocol::transcript::{Fingerprint, FINGERPRINT_TOP_K};
        use tessera_protocol::wire::{read_frame, write_frame};
        use tessera_protocol::{
            FinishReason, JobEvent, JobRequest, JobResult, Receipt, Signed, TokenRecord,
            TranscriptCommitment, Usage,
        };
        let coordinator = f._net.peer_id();
        let addr = loop {
            if let Some(a) = f._net.listen_addrs().await.into_iter().next() {
                break a.with(tessera_net::Protocol::P2p(coordinator));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let key = Keypair::generate_ed25519();
        let config = NetConfig {
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse().expect("addr")],
            bootstrap: vec![addr],
            ..NetConfig::default()
        };
        let (net, _events, _task) = tessera_net::start(key.clone(), &config)
            .await
            .expect("node swarm");
        let mut incoming = net
            .control()
            .accept(tessera_net::job_protocol())
            .expect("accept");
        tokio::spawn(async move {
            while let Some((_, stream)) = incoming.next().await {
                let key = key.clone();
                tokio::spawn(async move {
                    let (mut r, mut w) = futures::AsyncReadExt::split(stream);
                    let Ok(Some(signed)) =
                        read_frame::<_, Signed<JobRequest>>(&mut r, MAX_REQUEST_FRAME).await
                    else {
                        return;
                    };
                    let Ok(coordinator) = signed.verify() else {
                        return;
                    };
                    let req = signed.body;
                    let records = vec![TokenRecord {
                        position: 30,
                        token: 42,
                        fingerprint: Fingerprint {
                            ids: [0; FINGERPRINT_TOP_K],
                            logits: [0; FINGERPRINT_TOP_K],
                        },
                    }];
                    let commitment = TranscriptCommitment::from_records(&records);
                    let usage = Usage {
                        prompt_tokens: 30,
                        completion_tokens: 1,
                    };
                    let receipt = Receipt {
                        job_id: req.job_id,
                        node: key.public().to_peer_id(),
                        coordinator,
                        payer: req.payer.clone(),
                        module: req.module.clone(),
                        input_hash: req.input.hash(),
                        sampling: req.sampling.clone(),
                        usage,
                        finish_reason: FinishReason::Interrupted,
                        price,
                        cost: price.cost(30, 1).expect("cost"),
                        commitment,
                        started_ms: tessera_protocol::now_ms(),
                        finished_ms: tessera_protocol::now_ms(),
                        verdict: None,
                    };
                    let receipt = Signed::sign(receipt, &key).expect("sign");
                    for event in [
                        JobEvent::Accepted { queued: 0 },
                        JobEvent::Delta("Paris".into()),
                        JobEvent::Transcript(records),
                        JobEvent::Result(Box::new(JobResult {
                            usage,
                            finish_reason: FinishReason::Interrupted,
                            commitment,
                            ttft_ms: 1,
                            decode_ms: 1,
                            receipt,
                        })),
                    ] {
                        if write_frame(&mut w, &event, MAX_EVENT_FRAME).await.is_err() {
                            return;
                        }
                    }
                    let _ = w.close().await;
                });
            }
        });
        let node = net.peer_id();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !f
            ._net
            .net()
            .connected_peers()
            .await
            .expect("peers")
            .contains(&node)
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the node never connected"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut advert = crate::table::tests::advert(node, 1, AdvertStatus::Online);
        advert.modules = vec![ModuleOffer {
            module: crate::table::tests::module(3),
            alias: MODEL.into(),
            price,
            latency: LatencyStats::default(),
            numerics: "tessera-tiles-2".into(),
        }];
        f.state.table.write().expect("table").apply(
            &NetEvent::Advert(Box::new(advert)),
            std::time::Instant::now(),
        );
        net
    }

    #[tokio::test]
    async fn an_answer_cut_short_by_a_relay_limit_is_billed_and_says_so() {
        let f = fixture(&[], RateLimits::default(), false).await;
        let price = Price {
            per_1k_input: Amount(1000),
            per_1k_output: Amount(4000),
        };
        let _node = interrupting_node(&f, price).await;
        let chat = "/v1/chat/completions";
        // Whole: the text delivered, finish_reason "length", and why in `tessera`.
        let (status, _, body) = call(
            f.app.clone(),
            post_req(chat, Some(&f.key), chat_body(MODEL)),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["choices"][0]["message"]["content"], "Paris", "{body}");
        assert_eq!(body["choices"][0]["finish_reason"], "length", "{body}");
        let why = body["tessera"]["interrupted"].as_str().expect("why");
        assert!(
            why.contains("relay circuit") && why.contains("are billed"),
            "{why}"
        );
        assert_eq!(
            body["tessera"]["cost"], "34",
            "30 prompt + 1 generated token"
        );
        let receipt = body["tessera"]["receipt"]
            .as_str()
            .expect("receipt")
            .to_owned();
        let (status, _, r) = call(
            f.app.clone(),
            get_req(&format!("/v1/receipts/{receipt}"), Some(&f.key)),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{r}");
        assert_eq!(r["charged"], "34", "{r}");
        assert_eq!(r["receipt"]["body"]["finish_reason"], "interrupted", "{r}");
        // Streamed: the text, then an error event that names the bill, and no [DONE].
        let mut streamed = chat_body(MODEL);
        streamed["stream"] = json!(true);
        let (status, _, body) = call(f.app.clone(), post_req(chat, Some(&f.key), streamed)).await;
        assert_eq!(status, StatusCode::OK);
        let text = body.as_str().expect("SSE text");
        assert!(text.contains("Paris"), "{text}");
        assert!(text.contains("\"code\":\"node_interrupted\""), "{text}");
        assert!(text.contains("are billed"), "{text}");
        assert!(!text.contains("[DONE]"), "{text}");
    }

    #[tokio::test]
    async fn receipts_and_accounts_need_the_owner_key() {
        let f = fixture(&[], RateLimits::default(), false).await;
        let (status, _, body) = call(
            f.app.clone(),
            get_req(
                "/v1/receipts/00112233445566778899aabbccddeeff",
                Some(&f.key),
            ),
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_openai_error(&body, "receipt_not_found");
        let (status, _, _) = call(f.app.clone(), get_req("/v1/receipts/zz", None)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let (status, _, body) = call(f.app, get_req("/v1/account", Some(&f.key))).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            (body["account"].as_str(), body["available"].as_str()),
            (Some("alice"), Some("10000000"))
        );
    }

    #[tokio::test]
    async fn error_constructors_have_the_documented_status() {
        let cases = [
            (ApiError::invalid_api_key(), 401, "invalid_api_key"),
            (
                ApiError::insufficient_balance(Amount(10), Amount(3)),
                402,
                "insufficient_balance",
            ),
            (
                ApiError::not_found("model_not_found", "unknown model"),
                404,
                "model_not_found",
            ),
            (ApiError::too_large(), 413, "request_too_large"),
            (
                ApiError::rate_limited(&Limited::Concurrency(2)),
                429,
                "rate_limit_exceeded",
            ),
            (ApiError::no_node(MODEL), 503, "no_node_available"),
        ];
        for (err, status, code) in cases {
            let resp = err.into_response();
            assert_eq!(resp.status().as_u16(), status);
            let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
                .await
                .expect("body");
            let body: Value = serde_json::from_slice(&bytes).expect("JSON");
            assert_openai_error(&body, code);
        }
    }
}
