//! OpenAI's request and response shapes for `/v1/chat/completions` and `/v1/completions`,
//! and their translation into a job. Unknown fields are ignored, as OpenAI's SDKs send
//! many; the ones that would change the answer in ways we do not implement (`n` > 1,
//! tools, logprobs, penalties) are refused with a clear 400 rather than silently dropped.

use crate::api::ApiError;
use crate::route::ProviderPrefs;
use serde::Deserialize;
use serde_json::{json, Value};
use tessera_protocol::job::{MAX_JOB_TOKENS, MAX_MESSAGES, MAX_STOP};
use tessera_protocol::{ChatMessage, FinishReason, JobInput, SamplingParams, Usage};

/// `/v1/completions` answers 16 tokens when `max_tokens` is absent, as OpenAI's does.
pub const COMPLETIONS_DEFAULT_MAX_TOKENS: u32 = 16;

/// Which endpoint a request came in on: it decides the response's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `/v1/chat/completions`.
    Chat,
    /// `/v1/completions`.
    Completions,
}

impl Endpoint {
    /// Label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Completions => "completions",
        }
    }
}

/// A text or a list of texts (`stop`, and `prompt` of completions).
#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// A chat message's content: a string, or parts of which only `text` ones are understood.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Value>),
}

#[derive(Deserialize, Debug)]
struct MessageIn {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize, Debug, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// The union of both endpoints' request bodies; [`CompletionRequest::parse`] checks which
/// fields belong to which.
#[derive(Deserialize, Debug)]
struct RawRequest {
    model: Option<String>,
    messages: Option<Vec<MessageIn>>,
    prompt: Option<Value>,
    max_tokens: Option<u32>,
    max_completion_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    /// Not OpenAI's, but common (vLLM, llama.cpp's server): 0 disables.
    top_k: Option<u32>,
    /// Not OpenAI's, but common: 1.0 disables.
    repetition_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    presence_penalty: Option<f32>,
    stop: Option<OneOrMany>,
    seed: Option<u64>,
    n: Option<u32>,
    user: Option<String>,
    #[serde(default)]
    stream: Option<bool>,
    stream_options: Option<StreamOptions>,
    response_format: Option<Value>,
    #[serde(default)]
    logprobs: Option<Value>,
    tools: Option<Vec<Value>>,
    functions: Option<Vec<Value>>,
    echo: Option<bool>,
    best_of: Option<u32>,
    suffix: Option<String>,
    provider: Option<Value>,
}

/// A parsed, checked request for either endpoint.
#[derive(Debug, Clone)]
pub struct CompletionRequest {
    /// The endpoint it came in on.
    pub endpoint: Endpoint,
    /// Alias or module id asked for.
    pub model: String,
    /// The prompt.
    pub input: JobInput,
    /// Sampler settings, seed included (random when the caller gave none).
    pub sampling: SamplingParams,
    /// Most tokens to generate; `None` means "to the end of the context" (chat's default).
    pub max_tokens: Option<u32>,
    /// Stop sequences.
    pub stop: Vec<String>,
    /// Server-sent events instead of one JSON body.
    pub stream: bool,
    /// Whether the stream ends with a usage chunk.
    pub include_usage: bool,
    /// The caller's end-user id, kept for logs.
    pub user: Option<String>,
    /// Routing preferences.
    pub provider: ProviderPrefs,
}

fn bad(param: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::invalid_request(message).with_param(param)
}

impl CompletionRequest {
    /// Parses and checks a request body for `endpoint`; every problem is a 400 naming the
    /// parameter.
    pub fn parse(endpoint: Endpoint, body: Value) -> Result<Self, ApiError> {
        let raw: RawRequest = serde_json::from_value(body)
            .map_err(|e| ApiError::invalid_request(format!("invalid request body: {e}")))?;
        let model = match raw.model {
            Some(m) if !m.trim().is_empty() => m,
            _ => return Err(bad("model", "you must provide a model parameter")),
        };
        let input = match endpoint {
            Endpoint::Chat => {
                if raw.prompt.is_some() {
                    return Err(bad(
                        "prompt",
                        "chat completions take `messages`, not `prompt` (use /v1/completions)",
                    ));
                }
                let messages = raw
                    .messages
                    .ok_or_else(|| bad("messages", "missing required parameter: messages"))?;
                JobInput::Chat(chat_messages(messages)?)
            }
            Endpoint::Completions => {
                if raw.messages.is_some() {
                    return Err(bad(
                        "messages",
                        "completions take `prompt`, not `messages` (use /v1/chat/completions)",
                    ));
                }
                JobInput::Text(prompt_text(raw.prompt)?)
            }
        };
        if let Some(n) = raw.n.filter(|&n| n != 1) {
            return Err(bad(
                "n",
                format!("n must be 1: each request produces one choice (got {n}); send several requests instead"),
            ));
        }
        if raw.tools.is_some_and(|t| !t.is_empty()) || raw.functions.is_some_and(|f| !f.is_empty())
        {
            return Err(bad(
                "tools",
                "tools and function calling are not supported by Tessera's models",
            ));
        }
        let logprobs_on = match &raw.logprobs {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            Some(Value::Number(n)) => n.as_u64() != Some(0),
            Some(_) => true,
        };
        if logprobs_on {
            return Err(bad("logprobs", "logprobs are not supported"));
        }
        for (name, value) in [
            ("frequency_penalty", raw.frequency_penalty),
            ("presence_penalty", raw.presence_penalty),
        ] {
            if value.is_some_and(|v| v != 0.0) {
                return Err(bad(
                    name,
                    format!("{name} is not supported; use repetition_penalty (1.0 = off)"),
                ));
            }
        }
        if raw.echo == Some(true) {
            return Err(bad("echo", "echo is not supported"));
        }
        if raw.best_of.is_some_and(|b| b != 1) {
            return Err(bad("best_of", "best_of must be 1"));
        }
        if raw.suffix.is_some_and(|s| !s.is_empty()) {
            return Err(bad("suffix", "suffix (insertion) is not supported"));
        }
        let max_tokens = match (raw.max_tokens, raw.max_completion_tokens) {
            (Some(a), Some(b)) if a != b => {
                return Err(bad(
                    "max_tokens",
                    "max_tokens and max_completion_tokens differ: send one",
                ))
            }
            (a, b) => a.or(b),
        };
        if let Some(m) = max_tokens {
            if m == 0 || m > MAX_JOB_TOKENS {
                return Err(bad(
                    "max_tokens",
                    format!("max_tokens must be between 1 and {MAX_JOB_TOKENS}, got {m}"),
                ));
            }
        }
        let max_tokens = match endpoint {
            Endpoint::Completions => Some(max_tokens.unwrap_or(COMPLETIONS_DEFAULT_MAX_TOKENS)),
            Endpoint::Chat => max_tokens,
        };
        let temperature = raw.temperature.unwrap_or(1.0);
        if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
            return Err(bad(
                "temperature",
                format!("temperature must be between 0 and 2, got {temperature}"),
            ));
        }
        let sampling = SamplingParams {
            temperature,
            top_k: raw.top_k.unwrap_or(0),
            top_p: raw.top_p.unwrap_or(1.0),
            repetition_penalty: raw.repetition_penalty.unwrap_or(1.0),
            seed: raw.seed.unwrap_or_else(random_seed),
            ..SamplingParams::default()
        };
        if let Err(e) = sampling.validate() {
            let param = match e {
                tessera_protocol::SamplingParamsError::Temperature(_) => "temperature",
                tessera_protocol::SamplingParamsError::TopP(_) => "top_p",
                tessera_protocol::SamplingParamsError::RepetitionPenalty(_) => "repetition_penalty",
            };
            return Err(bad(param, e.to_string()));
        }
        let stop = match raw.stop {
            None => Vec::new(),
            Some(OneOrMany::One(s)) => vec![s],
            Some(OneOrMany::Many(v)) => v,
        };
        if stop.len() > MAX_STOP.0 || stop.iter().any(|s| s.is_empty() || s.len() > MAX_STOP.1) {
            return Err(bad(
                "stop",
                format!(
                    "stop takes at most {} sequences of 1 to {} bytes",
                    MAX_STOP.0, MAX_STOP.1
                ),
            ));
        }
        let stream = raw.stream.unwrap_or(false);
        if let Some(kind) = raw
            .response_format
            .as_ref()
            .and_then(|f| f.get("type"))
            .and_then(Value::as_str)
            .filter(|k| *k != "text")
        {
            return Err(bad(
                "response_format",
                format!("response_format {kind:?} is not supported (text only)"),
            ));
        }
        if !stream && raw.stream_options.is_some() {
            return Err(bad(
                "stream_options",
                "stream_options is only allowed when stream is true",
            ));
        }
        let provider: ProviderPrefs = match raw.provider {
            None | Some(Value::Null) => ProviderPrefs::default(),
            Some(v) => serde_json::from_value(v)
                .map_err(|e| bad("provider", format!("invalid provider object: {e}")))?,
        };
        provider.check()?;
        Ok(Self {
            endpoint,
            model,
            input,
            sampling,
            max_tokens,
            stop,
            stream,
            include_usage: raw.stream_options.unwrap_or_default().include_usage,
            user: raw.user,
            provider,
        })
    }

    /// A bound on the prompt's token count without tokenizing it: every token of our
    /// tokenizers (byte-level BPE, SentencePiece with byte fallback) covers at least one
    /// byte, and a chat template adds at most a few dozen tokens per message plus a
    /// default system prompt.
    pub fn prompt_token_bound(&self) -> u64 {
        const TEMPLATE_FIXED: u64 = 256;
        const PER_MESSAGE: u64 = 16;
        match &self.input {
            JobInput::Text(t) => t.len() as u64 + 2,
            JobInput::Chat(m) => {
                TEMPLATE_FIXED
                    + m.iter()
                        .map(|m| m.content.len() as u64 + m.role.len() as u64 + PER_MESSAGE)
                        .sum::<u64>()
            }
        }
    }
}

fn chat_messages(messages: Vec<MessageIn>) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() || messages.len() > MAX_MESSAGES {
        return Err(bad(
            "messages",
            format!(
                "messages must hold 1 to {MAX_MESSAGES} messages, got {}",
                messages.len()
            ),
        ));
    }
    messages
        .into_iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(bad(
                        "messages",
                        format!("messages[{i}].role {other:?} is not supported (system, developer, user, assistant)"),
                    ))
                }
            };
            let content = match m.content {
                None => String::new(),
                Some(Content::Text(t)) => t,
                Some(Content::Parts(parts)) => {
                    let mut text = String::new();
                    for part in parts {
                        match (part.get("type").and_then(Value::as_str), part.get("text").and_then(Value::as_str)) {
                            (Some("text"), Some(t)) => text.push_str(t),
                            (kind, _) => {
                                return Err(bad(
                                    "messages",
                                    format!("messages[{i}]: content part of type {} is not supported (text only)", kind.unwrap_or("?")),
                                ))
                            }
                        }
                    }
                    text
                }
            };
            Ok(ChatMessage {
                role: role.to_owned(),
                content,
            })
        })
        .collect()
}

fn prompt_text(prompt: Option<Value>) -> Result<String, ApiError> {
    let text = match prompt {
        None => return Err(bad("prompt", "missing required parameter: prompt")),
        Some(Value::String(s)) => s,
        Some(Value::Array(items)) => match items.as_slice() {
            [Value::String(s)] => s.clone(),
            [] => return Err(bad("prompt", "prompt is empty")),
            [_] => {
                return Err(bad(
                    "prompt",
                    "token-id prompts are not supported: send text",
                ))
            }
            _ => {
                return Err(bad(
                    "prompt",
                    "one prompt per request: send several requests for several prompts",
                ))
            }
        },
        Some(_) => return Err(bad("prompt", "prompt must be a string")),
    };
    if text.is_empty() {
        return Err(bad("prompt", "prompt is empty"));
    }
    Ok(text)
}

fn random_seed() -> u64 {
    let id = crate::client::new_job_id();
    u64::from_le_bytes(id.0[..8].try_into().unwrap_or_default())
}

/// What every response carries to name its server and bill: the `tessera` object.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Provenance {
    /// The node's peer id.
    pub node: String,
    /// The module id.
    pub module: String,
    /// The job id, which is also the receipt's id.
    pub receipt: String,
    /// Where the signed receipt can be fetched.
    pub receipt_url: String,
    /// What the job cost, in base units.
    pub cost: tessera_protocol::Amount,
    /// Price applied, per 1k tokens.
    pub price: tessera_protocol::Price,
    /// Nodes tried, this one included.
    pub attempts: u32,
    /// Time to first token measured by the node, milliseconds.
    pub ttft_ms: u32,
    /// Why the node ended the answer early, when it did (its relay circuit was closing):
    /// the text delivered is billed and the finish reason is `length`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interrupted: Option<String>,
}

/// OpenAI's `usage` object.
pub fn usage_json(u: &Usage) -> Value {
    json!({
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    })
}

/// OpenAI's `finish_reason`. A job cancelled while its caller is still there (the
/// coordinator stopping), or ended by the node before its relay circuit closed, was cut
/// short, which OpenAI calls `length`.
pub fn finish_str(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length | FinishReason::Cancelled | FinishReason::Interrupted => "length",
    }
}

/// Fields every response and chunk shares.
pub struct Head<'a> {
    /// `chatcmpl-…` or `cmpl-…`.
    pub id: &'a str,
    /// Unix seconds.
    pub created: u64,
    /// The model as asked for.
    pub model: &'a str,
    /// The module id.
    pub fingerprint: &'a str,
}

/// The whole (non-streaming) response body.
pub fn full_response(
    endpoint: Endpoint,
    head: &Head<'_>,
    text: &str,
    finish: FinishReason,
    usage: &Usage,
    provenance: &Provenance,
) -> Value {
    let choice = match endpoint {
        Endpoint::Chat => json!({
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": null},
            "logprobs": null,
            "finish_reason": finish_str(finish),
        }),
        Endpoint::Completions => json!({
            "index": 0,
            "text": text,
            "logprobs": null,
            "finish_reason": finish_str(finish),
        }),
    };
    json!({
        "id": head.id,
        "object": match endpoint { Endpoint::Chat => "chat.completion", Endpoint::Completions => "text_completion" },
        "created": head.created,
        "model": head.model,
        "system_fingerprint": head.fingerprint,
        "choices": [choice],
        "usage": usage_json(usage),
        "tessera": provenance,
    })
}

/// One streamed chunk: a text delta (`Some`), the opening role chunk of chat (`None` text,
/// no finish), or the closing chunk (`finish` set).
pub fn chunk(
    endpoint: Endpoint,
    head: &Head<'_>,
    text: Option<&str>,
    finish: Option<FinishReason>,
    include_usage: bool,
) -> Value {
    let choice = match endpoint {
        Endpoint::Chat => {
            let delta = match (text, finish) {
                (Some(t), _) => json!({"content": t}),
                (None, None) => json!({"role": "assistant", "content": ""}),
                (None, Some(_)) => json!({}),
            };
            json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish.map(finish_str)})
        }
        Endpoint::Completions => json!({
            "index": 0,
            "text": text.unwrap_or(""),
            "logprobs": null,
            "finish_reason": finish.map(finish_str),
        }),
    };
    let mut v = json!({
        "id": head.id,
        "object": match endpoint { Endpoint::Chat => "chat.completion.chunk", Endpoint::Completions => "text_completion" },
        "created": head.created,
        "model": head.model,
        "system_fingerprint": head.fingerprint,
        "choices": [choice],
    });
    if include_usage {
        v["usage"] = Value::Null;
    }
    v
}

/// The usage chunk that ends a stream when `stream_options.include_usage` is set: no
/// choices, the usage, and (ours) the provenance.
pub fn usage_chunk(
    endpoint: Endpoint,
    head: &Head<'_>,
    usage: &Usage,
    provenance: &Provenance,
) -> Value {
    json!({
        "id": head.id,
        "object": match endpoint { Endpoint::Chat => "chat.completion.chunk", Endpoint::Completions => "text_completion" },
        "created": head.created,
        "model": head.model,
        "system_fingerprint": head.fingerprint,
        "choices": [],
        "usage": usage_json(usage),
        "tessera": provenance,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: Value) -> Result<CompletionRequest, ApiError> {
        CompletionRequest::parse(Endpoint::Chat, body)
    }

    #[test]
    fn a_minimal_chat_request_takes_openai_defaults() {
        let r = chat(json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
            .expect("parse");
        assert_eq!(r.sampling.temperature, 1.0, "OpenAI's default temperature");
        assert_eq!(r.max_tokens, None);
        assert!(!r.stream);
        assert_eq!(r.input, JobInput::Chat(vec![ChatMessage::user("hi")]));
        let nulls = chat(
            json!({"model": "m", "messages": [{"role": "user", "content": "hi"}],
            "stream": null, "response_format": {"type": "text"}, "tool_choice": "none"}),
        )
        .expect("nulls and defaults are accepted");
        assert!(!nulls.stream);
        let c =
            CompletionRequest::parse(Endpoint::Completions, json!({"model": "m", "prompt": "x"}))
                .expect("parse");
        assert_eq!(c.max_tokens, Some(COMPLETIONS_DEFAULT_MAX_TOKENS));
    }

    #[test]
    fn fields_map_onto_the_job() {
        let r = chat(json!({
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
            ],
            "max_completion_tokens": 7, "temperature": 0, "top_p": 0.5, "seed": 42,
            "stop": "\n", "n": 1, "user": "u1", "stream": true,
            "stream_options": {"include_usage": true},
            "provider": {"sort": "price", "allow_fallbacks": false},
            "some_future_field": {"ignored": true}
        }))
        .expect("parse");
        assert_eq!(r.max_tokens, Some(7));
        assert_eq!(
            (r.sampling.temperature, r.sampling.top_p, r.sampling.seed),
            (0.0, 0.5, 42)
        );
        assert_eq!(r.stop, vec!["\n".to_owned()]);
        assert!(r.stream && r.include_usage);
        assert_eq!(r.user.as_deref(), Some("u1"));
        let JobInput::Chat(m) = &r.input else {
            panic!("chat")
        };
        assert_eq!(
            (m[0].role.as_str(), m[1].content.as_str()),
            ("system", "ab")
        );
        assert!(!r.provider.allow_fallbacks());
    }

    #[test]
    fn unsupported_or_malformed_fields_are_400_naming_the_parameter() {
        let base = || json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        let cases: Vec<(Value, &str)> = vec![
            (
                json!({"messages": [{"role": "user", "content": "hi"}]}),
                "model",
            ),
            (json!({"model": "m"}), "messages"),
            (json!({"model": "m", "messages": []}), "messages"),
            (
                json!({"model": "m", "messages": [{"role": "tool", "content": "x"}]}),
                "messages",
            ),
            (
                {
                    let mut b = base();
                    b["n"] = json!(2);
                    b
                },
                "n",
            ),
            (
                {
                    let mut b = base();
                    b["max_tokens"] = json!(0);
                    b
                },
                "max_tokens",
            ),
            (
                {
                    let mut b = base();
                    b["temperature"] = json!(3);
                    b
                },
                "temperature",
            ),
            (
                {
                    let mut b = base();
                    b["top_p"] = json!(0);
                    b
                },
                "top_p",
            ),
            (
                {
                    let mut b = base();
                    b["stop"] = json!(["a", "b", "c", "d", "e"]);
                    b
                },
                "stop",
            ),
            (
                {
                    let mut b = base();
                    b["tools"] = json!([{"type": "function"}]);
                    b
                },
                "tools",
            ),
            (
                {
                    let mut b = base();
                    b["logprobs"] = json!(true);
                    b
                },
                "logprobs",
            ),
            (
                {
                    let mut b = base();
                    b["frequency_penalty"] = json!(0.5);
                    b
                },
                "frequency_penalty",
            ),
            (
                {
                    let mut b = base();
                    b["stream_options"] = json!({"include_usage": true});
                    b
                },
                "stream_options",
            ),
            (
                {
                    let mut b = base();
                    b["provider"] = json!({"sort": "cheapest"});
                    b
                },
                "provider",
            ),
            (
                {
                    let mut b = base();
                    b["response_format"] = json!({"type": "json_schema"});
                    b
                },
                "response_format",
            ),
        ];
        for (body, param) in cases {
            let err = chat(body.clone()).expect_err(&body.to_string());
            assert_eq!(err.status.as_u16(), 400, "{body}");
            assert_eq!(err.param.as_deref(), Some(param), "{body}: {}", err.message);
        }
        let err = chat(json!({"model": 5, "messages": []})).expect_err("type error");
        assert!(
            err.message.contains("invalid request body"),
            "{}",
            err.message
        );
        for prompt in [json!(["a", "b"]), json!([[1, 2]]), json!(""), json!(7)] {
            let err = CompletionRequest::parse(
                Endpoint::Completions,
                json!({"model": "m", "prompt": prompt}),
            )
            .expect_err("bad prompt");
            assert_eq!(err.param.as_deref(), Some("prompt"));
        }
    }

    #[test]
    fn the_prompt_bound_is_at_least_the_byte_count() {
        let r = CompletionRequest::parse(
            Endpoint::Completions,
            json!({"model": "m", "prompt": "héllo"}),
        )
        .expect("parse");
        assert!(r.prompt_token_bound() >= "héllo".len() as u64);
    }

    #[test]
    fn chunks_follow_openai_shapes() {
        let head = Head {
            id: "chatcmpl-1",
            created: 5,
            model: "m",
            fingerprint: "f",
        };
        let first = chunk(Endpoint::Chat, &head, None, None, true);
        assert_eq!(first["object"], "chat.completion.chunk");
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
        assert!(first["usage"].is_null() && first.get("usage").is_some());
        let last = chunk(
            Endpoint::Chat,
            &head,
            None,
            Some(FinishReason::Length),
            false,
        );
        assert_eq!(last["choices"][0]["finish_reason"], "length");
        assert_eq!(last["choices"][0]["delta"], json!({}));
        assert!(last.get("usage").is_none());
        let text = chunk(Endpoint::Completions, &head, Some("x"), None, false);
        assert_eq!(
            (text["object"].as_str(), text["choices"][0]["text"].as_str()),
            (Some("text_completion"), Some("x"))
        );
    }
}
