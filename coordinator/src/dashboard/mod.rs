//! The dashboard: a JSON API under `/api/v1/` where every money figure carries its status
//! and proof, and pages rendered on the server from exactly that JSON (minijinja), with
//! charts drawn as SVG beside tables of the same data. Pages use no script, load nothing
//! from another origin (`Content-Security-Policy: default-src 'self'`), and developers
//! sign in with an API key through a form that sets an HttpOnly, SameSite=Strict cookie.

pub mod data;
mod pages;
pub mod svg;
pub mod verify;

use crate::api::{ApiError, ApiState};
use axum::extract::{Form, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use data::DataError;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The session cookie's name.
pub const COOKIE: &str = "tessera_session";
/// How long a session lasts.
const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// Most sessions held at once (the oldest go first).
const MAX_SESSIONS: usize = 10_000;
/// Most sessions one account holds at once (its oldest goes first).
const MAX_SESSIONS_PER_ACCOUNT: usize = 16;
/// The Content-Security-Policy of every dashboard response.
pub const CSP: &str = "default-src 'self'";

/// Signed-in dashboard sessions: blake3(cookie) → (account, expiry). In memory: a
/// restarted coordinator asks developers to sign in again.
#[derive(Clone, Default)]
pub struct Sessions(Arc<Mutex<SessionMap>>);

/// blake3(cookie) → (account, expiry).
type SessionMap = HashMap<[u8; 32], (String, Instant)>;

impl Sessions {
    /// Opens a session for `account`; returns the cookie value.
    pub fn open(&self, account: &str) -> String {
        let secret = hex::encode(crate::ledger::random_bytes());
        let now = Instant::now();
        if let Ok(mut m) = self.0.lock() {
            m.retain(|_, (_, until)| *until > now);
            // One account's sign-ins cannot push everyone else's sessions out.
            let mine: Vec<([u8; 32], Instant)> = m
                .iter()
                .filter(|(_, (a, _))| a == account)
                .map(|(k, (_, t))| (*k, *t))
                .collect();
            if mine.len() >= MAX_SESSIONS_PER_ACCOUNT {
                if let Some((k, _)) = mine.iter().min_by_key(|(_, t)| *t) {
                    m.remove(k);
                }
            }
            if m.len() >= MAX_SESSIONS {
                if let Some(oldest) = m.iter().min_by_key(|(_, (_, t))| *t).map(|(k, _)| *k) {
                    m.remove(&oldest);
                }
            }
            m.insert(
                *blake3::hash(secret.as_bytes()).as_bytes(),
                (account.to_owned(), now + SESSION_TTL),
            );
        }
        secret
    }

    /// The account of a live session.
    pub fn account(&self, cookie: &str) -> Option<String> {
        let m = self.0.lock().ok()?;
        let (account, until) = m.get(blake3::hash(cookie.as_bytes()).as_bytes())?;
        (*until > Instant::now()).then(|| account.clone())
    }

    /// Ends a session.
    pub fn close(&self, cookie: &str) {
        if let Ok(mut m) = self.0.lock() {
            m.remove(blake3::hash(cookie.as_bytes()).as_bytes());
        }
    }
}

fn cookie_value(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_owned())
}

/// The signed-in account: a session cookie, or an API key as a Bearer token (the CLI).
async fn signed_in(state: &ApiState, headers: &HeaderMap) -> Option<String> {
    if let Some(a) = cookie_value(headers).and_then(|c| state.sessions.account(&c)) {
        return Some(a);
    }
    let key = headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")?
        .trim()
        .to_owned();
    let ledger = state.dispatcher.ledger().clone();
    tokio::task::spawn_blocking(move || ledger.authenticate(&key).ok())
        .await
        .ok()
        .flatten()
}

impl From<DataError> for ApiError {
    fn from(e: DataError) -> Self {
        match e {
            DataError::NotFound(m) => ApiError::not_found("not_found", m),
            DataError::BadRequest(m) => ApiError::invalid_request(m),
            DataError::NoSettlement => ApiError::not_found("settlement_off", e.to_string()),
            DataError::Internal(m) => ApiError::internal(m),
        }
    }
}

/// The dashboard's routes (API and pages), merged into the coordinator's router.
pub fn routes() -> Router<ApiState> {
    Router::new()
        .route("/api/v1/overview", get(api_overview))
        .route("/api/v1/nodes", get(api_nodes))
        .route("/api/v1/nodes/{id}", get(api_node))
        .route("/api/v1/accounts/{address}", get(api_account))
        .route("/api/v1/accounts/{address}/proof", get(api_account_proof))
        .route(
            "/api/v1/accounts/{address}/statement.csv",
            get(api_statement_csv),
        )
        .route("/api/v1/usage", get(api_usage))
        .route("/api/v1/usage.csv", get(api_usage_csv))
        .route("/api/v1/receipts/{id}", get(api_receipt))
        .route("/api/v1/batches", get(api_batches))
        .route("/api/v1/verify", post(api_verify))
        .route("/", get(page_overview))
        .route("/nodes", get(page_nodes))
        .route("/nodes/{id}", get(page_node))
        .route("/accounts", get(page_account_lookup))
        .route("/accounts/{address}", get(page_account))
        .route("/usage", get(page_usage))
        .route("/receipts/{id}", get(page_receipt))
        .route("/batches", get(page_batches))
        .route("/login", get(page_login).post(login))
        .route("/logout", post(logout))
        .route("/verify", post(page_verify))
        .route("/static/dashboard.css", get(css))
        .route("/favicon.ico", get(favicon))
        .layer(axum::middleware::map_response(security_headers))
}

/// Every dashboard response: same-origin only, no framing, no sniffing, no referrer.
async fn security_headers(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    resp
}

type ApiResult = Result<Json<Value>, ApiError>;

async fn api_overview(State(s): State<ApiState>) -> ApiResult {
    Ok(Json(data::overview(&s).await?))
}

async fn api_nodes(State(s): State<ApiState>) -> ApiResult {
    Ok(Json(data::nodes(&s).await?))
}

async fn api_node(State(s): State<ApiState>, Path(id): Path<String>) -> ApiResult {
    Ok(Json(data::node(&s, &id).await?))
}

async fn api_account(State(s): State<ApiState>, Path(a): Path<String>) -> ApiResult {
    Ok(Json(data::account(&s, &a).await?))
}

#[derive(serde::Deserialize)]
struct BatchQuery {
    batch: Option<u64>,
}

async fn api_account_proof(
    State(s): State<ApiState>,
    Path(a): Path<String>,
    Query(q): Query<BatchQuery>,
) -> ApiResult {
    Ok(Json(data::account_proof(&s, &a, q.batch).await?))
}

fn csv(name: &str, body: String) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/csv; charset=utf-8".to_owned()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        body,
    )
        .into_response()
}

async fn api_statement_csv(
    State(s): State<ApiState>,
    Path(a): Path<String>,
) -> Result<Response, ApiError> {
    let v = data::account(&s, &a).await?;
    Ok(csv("statement.csv", data::statement_csv(&v)))
}

async fn need_account(s: &ApiState, headers: &HeaderMap) -> Result<String, ApiError> {
    signed_in(s, headers)
        .await
        .ok_or_else(ApiError::invalid_api_key)
}

/// Requests a usage document lists by default, and at most.
const USAGE_LIMIT: usize = 1_000;
const USAGE_MAX: usize = 10_000;

#[derive(serde::Deserialize)]
struct LimitQuery {
    limit: Option<usize>,
}

impl LimitQuery {
    fn get(&self) -> usize {
        self.limit.unwrap_or(USAGE_LIMIT).min(USAGE_MAX)
    }
}

async fn api_usage(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Query(q): Query<LimitQuery>,
) -> ApiResult {
    let account = need_account(&s, &headers).await?;
    Ok(Json(data::usage(&s, &account, q.get()).await?))
}

async fn api_usage_csv(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Query(q): Query<LimitQuery>,
) -> Result<Response, ApiError> {
    let account = need_account(&s, &headers).await?;
    let v = data::usage(&s, &account, q.get()).await?;
    Ok(csv("usage.csv", data::usage_csv(&v)))
}

async fn api_receipt(
    State(s): State<ApiState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    let account = need_account(&s, &headers).await?;
    Ok(Json(data::receipt(&s, &account, &id).await?))
}

async fn api_batches(State(s): State<ApiState>) -> ApiResult {
    Ok(Json(data::batches(&s).await?))
}

async fn api_verify(State(s): State<ApiState>, body: axum::body::Bytes) -> ApiResult {
    let req: verify::VerifyRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid_request(format!("body is not a verify request: {e}")))?;
    Ok(Json(verify::verify(&s, &req).await?))
}

// ----- pages -----

async fn page(
    s: &ApiState,
    headers: &HeaderMap,
    template: &str,
    title: &str,
    src: &str,
    d: Result<Value, DataError>,
) -> Response {
    let user = signed_in(s, headers).await;
    match d {
        Ok(d) => pages::render(template, title, src, &d, user.as_deref()),
        Err(e) => pages::error(&e, user.as_deref()),
    }
}

async fn page_overview(State(s): State<ApiState>, h: HeaderMap) -> Response {
    let d = data::overview(&s).await;
    page(&s, &h, "overview.html", "Overview", "/api/v1/overview", d).await
}

async fn page_nodes(State(s): State<ApiState>, h: HeaderMap) -> Response {
    let d = data::nodes(&s).await;
    page(&s, &h, "nodes.html", "Nodes", "/api/v1/nodes", d).await
}

async fn page_node(State(s): State<ApiState>, h: HeaderMap, Path(id): Path<String>) -> Response {
    let d = data::node(&s, &id).await;
    let src = format!("/api/v1/nodes/{id}");
    page(&s, &h, "node.html", "Node", &src, d).await
}

#[derive(serde::Deserialize)]
struct AddressQuery {
    address: Option<String>,
}

async fn page_account_lookup(
    State(s): State<ApiState>,
    h: HeaderMap,
    Query(q): Query<AddressQuery>,
) -> Response {
    match q
        .address
        .as_deref()
        .map(str::trim)
        .filter(|a| !a.is_empty())
    {
        Some(a) => match data::parse_address(a) {
            Ok(addr) => Redirect::to(&format!("/accounts/{addr}")).into_response(),
            Err(e) => pages::error(&e, signed_in(&s, &h).await.as_deref()),
        },
        None => pages::render(
            "lookup.html",
            "Account",
            "",
            &Value::Null,
            signed_in(&s, &h).await.as_deref(),
        ),
    }
}

async fn page_account(State(s): State<ApiState>, h: HeaderMap, Path(a): Path<String>) -> Response {
    let d = data::account(&s, &a).await;
    let src = format!("/api/v1/accounts/{a}");
    page(&s, &h, "account.html", "Account", &src, d).await
}

async fn page_usage(State(s): State<ApiState>, h: HeaderMap) -> Response {
    let Some(account) = signed_in(&s, &h).await else {
        return Redirect::to("/login").into_response();
    };
    let d = data::usage(&s, &account, USAGE_LIMIT).await;
    page(&s, &h, "usage.html", "Usage", "/api/v1/usage", d).await
}

async fn page_receipt(State(s): State<ApiState>, h: HeaderMap, Path(id): Path<String>) -> Response {
    let Some(account) = signed_in(&s, &h).await else {
        return Redirect::to("/login").into_response();
    };
    let d = data::receipt(&s, &account, &id).await;
    let src = format!("/api/v1/receipts/{id}");
    page(&s, &h, "receipt.html", "Receipt", &src, d).await
}

async fn page_batches(State(s): State<ApiState>, h: HeaderMap) -> Response {
    let d = data::batches(&s).await;
    page(&s, &h, "batches.html", "Batches", "/api/v1/batches", d).await
}

async fn page_login(State(s): State<ApiState>, h: HeaderMap) -> Response {
    pages::render(
        "login.html",
        "Sign in",
        "",
        &Value::Null,
        signed_in(&s, &h).await.as_deref(),
    )
}

#[derive(serde::Deserialize)]
struct LoginForm {
    key: String,
}

async fn login(State(s): State<ApiState>, Form(f): Form<LoginForm>) -> Response {
    let ledger = s.dispatcher.ledger().clone();
    let key = f.key.trim().to_owned();
    let account = tokio::task::spawn_blocking(move || ledger.authenticate(&key))
        .await
        .ok()
        .and_then(Result::ok);
    match account {
        Some(account) => {
            let cookie = s.sessions.open(&account);
            let set = format!(
                "{COOKIE}={cookie}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
                SESSION_TTL.as_secs()
            );
            let mut resp = Redirect::to("/usage").into_response();
            if let Ok(v) = HeaderValue::from_str(&set) {
                resp.headers_mut().insert(header::SET_COOKIE, v);
            }
            resp
        }
        None => {
            let mut r = pages::render(
                "login.html",
                "Sign in",
                "",
                &serde_json::json!({"error": "That API key matches no account."}),
                None,
            );
            *r.status_mut() = StatusCode::UNAUTHORIZED;
            r
        }
    }
}

async fn logout(State(s): State<ApiState>, h: HeaderMap) -> Response {
    if let Some(c) = cookie_value(&h) {
        s.sessions.close(&c);
    }
    let mut resp = Redirect::to("/").into_response();
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("tessera_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    resp
}

async fn page_verify(
    State(s): State<ApiState>,
    h: HeaderMap,
    Form(f): Form<verify::VerifyForm>,
) -> Response {
    let user = signed_in(&s, &h).await;
    let d = match f.into_request() {
        Ok(req) => verify::verify(&s, &req).await,
        Err(e) => Err(e),
    };
    match d {
        Ok(d) => pages::render("verify.html", "Verify", "", &d, user.as_deref()),
        Err(e) => pages::error(&e, user.as_deref()),
    }
}

async fn css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        pages::CSS,
    )
        .into_response()
}

async fn favicon() -> Response {
    (
        [
            (header::CONTENT_TYPE, "image/svg+xml"),
            (header::CACHE_CONTROL, "max-age=86400"),
        ],
        pages::FAVICON,
    )
        .into_response()
}
