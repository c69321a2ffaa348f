//! The OpenAI-compatible HTTP API, first slice: errors in OpenAI's shape (one place turns
//! them into responses), JSON bodies whose rejections become those errors, and the
//! read-only endpoints `/health` and `/v1/models`, served from the live node table.

use crate::table::NodeTable;
use axum::extract::{FromRequest, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use tessera_protocol::Amount;

/// Largest request body, in bytes: a full context of text with JSON overhead.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// What every handler can reach.
#[derive(Clone)]
pub struct ApiState {
    /// The live node table.
    pub table: Arc<RwLock<NodeTable>>,
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
}

impl ApiError {
    /// 400: the request is malformed or out of range.
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code: None,
            message: message.into(),
        }
    }

    /// 401: missing or unknown API key.
    pub fn invalid_api_key() -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            kind: "invalid_request_error",
            code: Some("invalid_api_key"),
            message: "Incorrect or missing API key: send `Authorization: Bearer tsk_…` (create one with `tessera keys create ACCOUNT`)".into(),
        }
    }

    /// 402: the account cannot cover the job's maximum cost.
    pub fn insufficient_balance(needed: Amount, available: Amount) -> Self {
        Self {
            status: StatusCode::PAYMENT_REQUIRED,
            kind: "insufficient_quota",
            code: Some("insufficient_balance"),
            message: format!("insufficient balance: this request may cost up to {needed} base units and {available} are available"),
        }
    }

    /// 404: no such model on the network, or no such route.
    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            kind: "invalid_request_error",
            code: Some(code),
            message: message.into(),
        }
    }

    /// 413: the body is over [`MAX_BODY_BYTES`].
    pub fn too_large() -> Self {
        Self {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            kind: "invalid_request_error",
            code: Some("request_too_large"),
            message: format!("request body exceeds {MAX_BODY_BYTES} bytes"),
        }
    }

    /// 503: no node can take the job now.
    pub fn no_node(model: &str) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "service_unavailable_error",
            code: Some("no_node_available"),
            message: format!("no node serving {model} can take the job now; retry shortly"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, message = %self.message, "API error");
        }
        let body = json!({
            "error": {"message": self.message, "type": self.kind, "param": null, "code": self.code}
        });
        (self.status, Json(body)).into_response()
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
        .route("/v1/models", get(models))
        .fallback(|| async { ApiError::not_found("unknown_url", "no such endpoint") })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

async fn health(State(state): State<ApiState>) -> Json<serde_json::Value> {
    let nodes = state.table.read().map(|t| t.len()).unwrap_or(0);
    Json(json!({"status": "ok", "nodes": nodes}))
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
    use axum::routing::post;
    use std::time::Instant;
    use tessera_net::NetEvent;
    use tessera_protocol::{
        AdvertStatus, Keypair, LatencyStats, ModuleId, ModuleOffer, Price, Quantization,
        WeightsHash,
    };
    use tower::ServiceExt;

    fn state_with_nodes(prices: &[u128]) -> ApiState {
        let module = ModuleId::new(
            "llama",
            Quantization::from_gguf_file_type(3),
            8192,
            WeightsHash([1; 32]),
        )
        .expect("id");
        let mut table = NodeTable::default();
        for &out in prices {
            let key = Keypair::generate_ed25519();
            let mut advert =
                crate::table::tests::advert(key.public().to_peer_id(), 1, AdvertStatus::Online);
            advert.modules = vec![ModuleOffer {
                module: module.clone(),
                alias: "smollm2-135m-instruct".into(),
                price: Price {
                    per_1k_input: Amount(1000),
                    per_1k_output: Amount(out),
                },
                latency: LatencyStats::default(),
            }];
            table.apply(&NetEvent::Advert(Box::new(advert)), Instant::now());
        }
        ApiState {
            table: Arc::new(RwLock::new(table)),
        }
    }

    async fn call(app: Router, req: Request<Body>) -> (StatusCode, serde_json::Value) {
        let resp = app.oneshot(req).await.expect("response");
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .expect("body");
        (status, serde_json::from_slice(&bytes).expect("JSON body"))
    }

    fn get_req(uri: &str) -> Request<Body> {
        Request::builder()
            .uri(uri)
            .body(Body::empty())
            .expect("request")
    }

    #[tokio::test]
    async fn models_lists_each_alias_with_its_modules_nodes_and_price_range() {
        let app = router(state_with_nodes(&[4000, 6000]));
        let (status, body) = call(app.clone(), get_req("/v1/models")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(body["object"], "list");
        let model = &body["data"][0];
        assert_eq!(model["id"], "smollm2-135m-instruct");
        assert_eq!(model["object"], "model");
        let module = &model["tessera"]["modules"][0];
        assert_eq!(module["nodes"], 2);
        assert_eq!(module["price_per_1k_output"]["min"], "4000");
        assert_eq!(module["price_per_1k_output"]["max"], "6000");
        let (status, body) = call(app, get_req("/health")).await;
        assert_eq!((status, body["nodes"].clone()), (StatusCode::OK, json!(2)));
    }

    #[tokio::test]
    async fn errors_have_openai_shape_and_status() {
        let app = router(state_with_nodes(&[]));
        let (status, body) = call(app, get_req("/v1/nope")).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert_eq!(body["error"]["code"], "unknown_url");
        assert!(body["error"]["param"].is_null());

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
                ApiError::no_node("smollm2-135m-instruct"),
                503,
                "no_node_available",
            ),
        ];
        for (err, status, code) in cases {
            let resp = err.into_response();
            assert_eq!(resp.status().as_u16(), status);
            let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
                .await
                .expect("body");
            let body: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON");
            assert_eq!(body["error"]["code"], code);
            assert!(body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()));
        }
    }

    #[tokio::test]
    async fn malformed_and_oversized_bodies_are_openai_400_and_413() {
        async fn echo(ApiJson(v): ApiJson<serde_json::Value>) -> Json<serde_json::Value> {
            Json(v)
        }
        let app = Router::new()
            .route("/echo", post(echo))
            .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES));
        let post_req = |body: Vec<u8>, json: bool| {
            let mut b = Request::builder().method("POST").uri("/echo");
            if json {
                b = b.header("content-type", "application/json");
            }
            b.body(Body::from(body)).expect("request")
        };
        let (status, body) = call(app.clone(), post_req(br#"{"a": 1}"#.to_vec(), true)).await;
        assert_eq!((status, body), (StatusCode::OK, json!({"a": 1})));
        for (bytes, json) in [(b"{not json".to_vec(), true), (b"{}".to_vec(), false)] {
            let (status, body) = call(app.clone(), post_req(bytes, json)).await;
            assert_eq!(status, StatusCode::BAD_REQUEST);
            assert_eq!(body["error"]["type"], "invalid_request_error");
            assert!(body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()));
        }
        let mut big = br#"{"a": ""#.to_vec();
        big.resize(MAX_BODY_BYTES + 10, b'x');
        big.extend_from_slice(br#""}"#);
        let (status, body) = call(app, post_req(big, true)).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
        assert_eq!(body["error"]["code"], "request_too_large");
    }
}
