//! The inference engine a node calls: load a module once, then run requests that stream
//! text deltas and end with a [`Completion`] carrying usage, timings and the transcript
//! commitment. [`Model`] is the synchronous core; [`Engine`] owns one on a dedicated thread
//! and serves requests from cloneable [`EngineHandle`]s over bounded channels, stopping a
//! request's generation as soon as its receiver is dropped.

use std::ops::ControlFlow;
use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use candle_transformers::models::{quantized_gemma3, quantized_llama};
use serde::{Deserialize, Serialize};
use tessera_protocol::{
    FinishReason, ModuleId, ReplayClaim, SamplingParams, SamplingParamsError, TokenRecord,
    TranscriptCommitment, Verdict,
};

use crate::batch::{BatchConfig, EngineStats, StatsSnapshot};
use crate::chat::{ChatError, ChatMessage, ChatTemplate};
use crate::gguf::{Architecture, Backend, LoadError, ModelFile};
use crate::serving::{KvCache, SeqStep};
use crate::tokenizer::Tokenizer;
use crate::verify::Judge;

/// What the model is asked to continue.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prompt {
    /// Raw text, tokenized as is (special tokens in it are parsed, BOS added per the model).
    Text(String),
    /// A conversation, rendered with the model's chat template.
    Chat(Vec<ChatMessage>),
    /// Pre-tokenized input, used as is.
    Tokens(Vec<u32>),
}

/// Most stop sequences a request may carry (OpenAI's limit).
pub const MAX_STOP_SEQUENCES: usize = 4;
/// Longest stop sequence, in bytes: holding text back costs time in its length every token.
pub const MAX_STOP_BYTES: usize = 256;

/// One generation request.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenerateRequest {
    /// The input.
    pub prompt: Prompt,
    /// Sampler settings and seed.
    pub sampling: SamplingParams,
    /// Most tokens to generate (fewer if the context fills up first).
    pub max_tokens: u32,
    /// Generation ends before the first occurrence of any of these strings.
    pub stop: Vec<String>,
    /// For chat prompts on a model without a template: use the documented fallback format
    /// (Gemma turns for gemma models) instead of failing.
    pub chat_fallback: bool,
    /// Keep generating through end-of-text tokens (benchmarks, like llama.cpp's `ignore_eos`).
    #[serde(default)]
    pub ignore_eos: bool,
}

impl GenerateRequest {
    /// A greedy request for `prompt` with `max_tokens`.
    pub fn new(prompt: Prompt, max_tokens: u32) -> Self {
        Self {
            prompt,
            sampling: SamplingParams::greedy(),
            max_tokens,
            stop: Vec::new(),
            chat_fallback: false,
            ignore_eos: false,
        }
    }
}

/// How long each phase took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// Time to process the prompt and produce the first token's logits.
    pub prefill: Duration,
    /// Time for the remaining tokens.
    pub decode: Duration,
    /// Number of prompt tokens processed.
    pub prefill_tokens: u32,
    /// Number of forward passes after the prefill.
    pub decode_tokens: u32,
}

impl Timings {
    /// Prompt tokens per second.
    pub fn prefill_tps(&self) -> f64 {
        rate(self.prefill_tokens, self.prefill)
    }
    /// Generated tokens per second after the first.
    pub fn decode_tps(&self) -> f64 {
        rate(self.decode_tokens, self.decode)
    }
}

fn rate(n: u32, d: Duration) -> f64 {
    if d.is_zero() {
        0.0
    } else {
        f64::from(n) / d.as_secs_f64()
    }
}

/// The end of a request: why it stopped, what it used, and what it committed to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Completion {
    /// `stop` or `length`.
    pub finish_reason: FinishReason,
    /// Tokens in the prompt (after templating, BOS included).
    pub prompt_tokens: u32,
    /// Tokens generated (an end-of-text token counts: it was computed).
    pub completion_tokens: u32,
    /// The full answer text (what the deltas add up to).
    pub text: String,
    /// Generated token ids.
    pub tokens: Vec<u32>,
    /// Per-position records, kept for verification.
    pub transcript: Vec<TokenRecord>,
    /// Merkle root over `transcript`.
    pub commitment: TranscriptCommitment,
    /// Prefill and decode times.
    pub timings: Timings,
}

/// What a replay found: the verdict, and the replay's own records (the claimed tokens with
/// the fingerprints the replay computed; empty when the claim failed its shape check).
#[derive(Debug, Clone)]
pub struct Replayed {
    /// The judgement.
    pub verdict: Verdict,
    /// The auditor's transcript.
    pub records: Vec<TokenRecord>,
    /// Tokens in the prompt as the auditor rendered it.
    pub prompt_tokens: u32,
}

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// The prompt does not fit the context.
    #[error("prompt is {prompt_tokens} tokens but the model's context is {context} tokens (leave room for at least one generated token)")]
    PromptTooLong {
        /// Tokens in the prompt.
        prompt_tokens: usize,
        /// Context length served.
        context: u32,
    },
    /// Nothing to continue from.
    #[error("prompt is empty")]
    EmptyPrompt,
    /// A pre-tokenized prompt holds an id outside the vocabulary.
    #[error("token id {0} is outside the vocabulary of {1} tokens")]
    BadToken(u32, usize),
    /// A sampling parameter is out of range.
    #[error(transparent)]
    Sampling(#[from] SamplingParamsError),
    /// Too many or too long stop sequences.
    #[error("stop sequences: at most {MAX_STOP_SEQUENCES}, each at most {MAX_STOP_BYTES} bytes (got {count}, longest {longest} bytes)")]
    BadStop {
        /// How many were given.
        count: usize,
        /// The longest, in bytes.
        longest: usize,
    },
    /// The chat prompt could not be rendered.
    #[error(transparent)]
    Chat(#[from] ChatError),
    /// The consumer went away; generation stopped.
    #[error("request cancelled")]
    Cancelled,
    /// The engine thread is gone.
    #[error("inference engine has shut down")]
    EngineGone,
    /// The tensor library failed.
    #[error("inference failed: {0}")]
    Candle(#[from] candle_core::Error),
}

/// The implementation running a model: ours, or candle's stock one (the reference).
enum Weights {
    OwnLlama(crate::llama::Llama),
    OwnGemma3(crate::gemma3::Gemma3),
    CandleLlama(quantized_llama::ModelWeights),
    CandleGemma3(quantized_gemma3::ModelWeights),
}

/// Control tokens that end a turn in common chat formats (llama.cpp's end-of-generation list).
const END_OF_TURN_PIECES: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<EOT>",
];

/// A loaded module: weights, tokenizer and chat template, ready to generate.
pub struct Model {
    name: String,
    module_id: ModuleId,
    arch: Architecture,
    context_length: u32,
    tokenizer: Tokenizer,
    template: ChatTemplate,
    end_tokens: Vec<u32>,
    weights: Weights,
    device: Device,
    load_time: Duration,
    generated: std::sync::Arc<std::sync::atomic::AtomicU64>,
    numerics: &'static str,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("name", &self.name)
            .field("module_id", &self.module_id.to_string())
            .finish_non_exhaustive()
    }
}

impl Model {
    /// Opens, hashes and loads the GGUF at `path` on the CPU; `name` is used in messages.
    pub fn load(path: &Path, name: &str) -> Result<Self, LoadError> {
        Self::load_checked(path, name, None)
    }

    /// Like [`Model::load`], also checking the blake3 against `expected_blake3` (catalogue
    /// files), so a corrupted cache is reported as such rather than producing garbage.
    pub fn load_checked(
        path: &Path,
        name: &str,
        expected: Option<&'static crate::catalog::CatalogEntry>,
    ) -> Result<Self, LoadError> {
        Self::load_with(path, name, expected, Backend::default())
    }

    /// Like [`Model::load_checked`], choosing the implementation.
    pub fn load_with(
        path: &Path,
        name: &str,
        expected: Option<&'static crate::catalog::CatalogEntry>,
        backend: Backend,
    ) -> Result<Self, LoadError> {
        let start = Instant::now();
        let file = ModelFile::open_for(path, backend)?;
        let weights_hash = file.weights_hash();
        if let Some(entry) = expected {
            if weights_hash.to_hex() != entry.blake3 {
                return Err(LoadError::Corrupt {
                    path: path.to_owned(),
                    alias: entry.alias,
                    got: weights_hash.to_hex(),
                    expected: entry.blake3,
                });
            }
        }
        let module_id = file.module_id(weights_hash);
        let tokenizer =
            Tokenizer::from_gguf(&file.content).map_err(|cause| LoadError::Tokenizer {
                path: path.to_owned(),
                cause,
            })?;
        let template =
            ChatTemplate::for_model(file.metadata_str("tokenizer.chat_template"), file.arch);
        let mut end_tokens: Vec<u32> = tokenizer.eos_id().into_iter().collect();
        for piece in END_OF_TURN_PIECES {
            if let Some(id) = tokenizer
                .token_id(piece)
                .filter(|&id| tokenizer.is_control(id))
            {
                end_tokens.push(id);
            }
        }
        end_tokens.sort_unstable();
        end_tokens.dedup();
        let device = Device::Cpu;
        let (arch, context_length) = (file.arch, file.context_length);
        let ModelFile { content, mmap, .. } = file;
        let mut reader = std::io::Cursor::new(&mmap[..]);
        let weights_err = |cause: candle_core::Error| LoadError::Weights {
            path: path.to_owned(),
            cause: crate::gguf::first_line(&cause.to_string()),
        };
        let weights = match (arch, backend) {
            (Architecture::Llama, Backend::Tessera) => Weights::OwnLlama(
                crate::llama::Llama::load(&content, mmap.clone(), context_length as usize)
                    .map_err(weights_err)?,
            ),
            (Architecture::Llama, Backend::Candle) => Weights::CandleLlama(
                quantized_llama::ModelWeights::from_gguf(content, &mut reader, &device)
                    .map_err(weights_err)?,
            ),
            (Architecture::Gemma3, Backend::Tessera) => Weights::OwnGemma3(
                crate::gemma3::Gemma3::load(&content, mmap.clone(), context_length as usize)
                    .map_err(weights_err)?,
            ),
            (Architecture::Gemma3, Backend::Candle) => Weights::CandleGemma3(
                quantized_gemma3::ModelWeights::from_gguf(content, &mut reader, &device)
                    .map_err(weights_err)?,
            ),
        };
        let model = Self {
            name: name.to_owned(),
            module_id,
            arch,
            context_length,
            tokenizer,
            template,
            end_tokens,
            weights,
            device,
            load_time: start.elapsed(),
            generated: Default::default(),
            numerics: match backend {
                Backend::Tessera => crate::kernels::numerics(),
                Backend::Candle => "candle-0.11.1",
            },
        };
        tracing::info!(model = %model.name, module = %model.module_id, load_ms = model.load_time.as_millis() as u64, "model loaded");
        Ok(model)
    }

    /// A live count of every token this model has generated (shared; one relaxed add per
    /// token), so a node can report progress while a request runs.
    pub fn token_counter(&self) -> std::sync::Arc<std::sync::atomic::AtomicU64> {
        self.generated.clone()
    }

    /// The module this model serves.
    pub fn module_id(&self) -> &ModuleId {
        &self.module_id
    }
    /// The name it was loaded under (alias or path).
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Its architecture.
    pub fn architecture(&self) -> Architecture {
        self.arch
    }
    /// Context length served, in tokens.
    pub fn context_length(&self) -> u32 {
        self.context_length
    }
    /// Its tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }
    /// Whether the GGUF carries its own chat template.
    pub fn has_chat_template(&self) -> bool {
        self.template.is_native()
    }
    /// Time `load` took, hashing included.
    pub fn load_time(&self) -> Duration {
        self.load_time
    }

    /// Which implementation runs the model, so figures can say whose they are.
    pub fn backend(&self) -> Backend {
        match self.weights {
            Weights::OwnLlama(_) | Weights::OwnGemma3(_) => Backend::Tessera,
            Weights::CandleLlama(_) | Weights::CandleGemma3(_) => Backend::Candle,
        }
    }

    /// Turns a prompt into token ids, exactly as `generate` will.
    pub fn tokenize_prompt(
        &self,
        prompt: &Prompt,
        chat_fallback: bool,
    ) -> Result<Vec<u32>, GenerateError> {
        let ids = match prompt {
            Prompt::Tokens(ids) => {
                // Ids the model can embed: a GGUF whose tokenizer lists more tokens than
                // its embedding has rows must not fail a whole batch at the lookup.
                let n = self.tokenizer.vocab_size().min(self.embedding_rows());
                if let Some(&bad) = ids.iter().find(|&&t| t as usize >= n) {
                    return Err(GenerateError::BadToken(bad, n));
                }
                ids.clone()
            }
            Prompt::Text(text) => self.tokenizer.encode(text, self.tokenizer.add_bos(), true),
            Prompt::Chat(messages) => {
                let piece = |id: Option<u32>| {
                    id.and_then(|i| self.tokenizer.token_str(i))
                        .unwrap_or("")
                        .to_owned()
                };
                let rendered = self.template.render(
                    &self.name,
                    messages,
                    &piece(self.tokenizer.bos_id()),
                    &piece(self.tokenizer.eos_id()),
                    chat_fallback,
                )?;
                let mut ids = self
                    .tokenizer
                    .encode(&rendered, self.tokenizer.add_bos(), true);
                // Templates that print the BOS themselves would otherwise get it twice.
                if let (Some(bos), true) = (self.tokenizer.bos_id(), self.tokenizer.add_bos()) {
                    if ids.len() >= 2 && ids[0] == bos && ids[1] == bos {
                        ids.remove(0);
                    }
                }
                ids
            }
        };
        if ids.is_empty() {
            return Err(GenerateError::EmptyPrompt);
        }
        if ids.len() >= self.context_length as usize {
            return Err(GenerateError::PromptTooLong {
                prompt_tokens: ids.len(),
                context: self.context_length,
            });
        }
        Ok(ids)
    }

    /// Logits of the last position after running `tokens` at positions `pos..`.
    fn forward(&mut self, tokens: &[u32], pos: usize) -> Result<Vec<f32>, candle_core::Error> {
        let input = |device: &Device| Tensor::new(tokens, device)?.unsqueeze(0);
        let logits = match &mut self.weights {
            Weights::OwnLlama(m) => return m.forward(tokens, pos),
            Weights::OwnGemma3(m) => return m.forward(tokens, pos),
            Weights::CandleLlama(m) => m.forward(&input(&self.device)?, pos)?,
            Weights::CandleGemma3(m) => m.forward(&input(&self.device)?, pos)?,
        };
        logits
            .squeeze(0)?
            .to_dtype(candle_core::DType::F32)?
            .to_vec1()
    }

    /// Runs the prompt through the model, filling the KV cache (reserved for `capacity`
    /// positions); returns the last logits.
    fn prefill(&mut self, prompt: &[u32], capacity: usize) -> Result<Vec<f32>, candle_core::Error> {
        match &mut self.weights {
            Weights::OwnLlama(m) => m.reset(capacity),
            Weights::OwnGemma3(m) => m.reset(capacity),
            Weights::CandleLlama(_) | Weights::CandleGemma3(_) => {}
        }
        self.forward(prompt, 0)
    }

    /// Logits of the last position of `tokens` from a fresh context (tests and numerics checks).
    pub fn logits(&mut self, tokens: &[u32]) -> Result<Vec<f32>, GenerateError> {
        Ok(self.prefill(tokens, tokens.len())?)
    }

    /// Logits of every position of `tokens`, run at positions `pos..` after the current
    /// context (a fresh one when `pos` is 0), row after row: numerics checks compare the
    /// implementations with this, in chunks. candle's models run a token at a time.
    pub fn logits_chunk(&mut self, tokens: &[u32], pos: usize) -> Result<Vec<f32>, GenerateError> {
        match &mut self.weights {
            Weights::OwnLlama(m) => Ok(m.forward_rows(tokens, pos, 0)?),
            Weights::OwnGemma3(m) => Ok(m.forward_rows(tokens, pos, 0)?),
            Weights::CandleLlama(_) | Weights::CandleGemma3(_) => {
                let mut out = Vec::new();
                for (i, &t) in tokens.iter().enumerate() {
                    out.extend(self.forward(&[t], pos + i)?);
                }
                Ok(out)
            }
        }
    }

    /// Logits after appending `token` at `pos` to the current context.
    pub fn logits_next(&mut self, token: u32, pos: usize) -> Result<Vec<f32>, GenerateError> {
        Ok(self.forward(&[token], pos)?)
    }

    /// Replays a claimed transcript of `prompt` (teacher forcing: the prompt and the claimed
    /// tokens run through the model in passes of `chunk` positions, far cheaper than
    /// generating them) and judges every position against `claim` with the sampler of
    /// `sampling`: see [`crate::verify`]. Structural faults (positions that do not follow the
    /// prompt, ids outside the vocabulary, a transcript longer than the context) fail
    /// without a replay.
    pub fn replay(
        &mut self,
        prompt: &Prompt,
        chat_fallback: bool,
        sampling: &SamplingParams,
        claim: &ReplayClaim,
        chunk: usize,
    ) -> Result<Replayed, GenerateError> {
        sampling.validate()?;
        let prompt = self.tokenize_prompt(prompt, chat_fallback)?;
        let records = &claim.records;
        let vocab = self.tokenizer.vocab_size();
        let shape = Judge::check_shape(prompt.len(), records, vocab).or_else(|| {
            let fits = prompt.len() + records.len() <= self.context_length as usize;
            (!fits).then(|| tessera_protocol::Failure {
                index: (self.context_length as usize).saturating_sub(prompt.len()) as u32,
                kind: tessera_protocol::FailureKind::Position,
                distance: 0.0,
            })
        });
        if let Some(failure) = shape {
            return Ok(Replayed {
                verdict: Judge::structural(records, failure, claim.tolerance, &claim.commitment),
                records: Vec::new(),
                prompt_tokens: prompt.len() as u32,
            });
        }
        let start = Instant::now();
        let mut judge = Judge::new(&prompt, records, sampling, claim.tolerance);
        if let Some((_, generated)) = records.split_last() {
            // Inputs: the prompt, then every claimed token but the last (whose logits
            // nothing was sampled from). Row `prompt.len() - 1` predicts the first record.
            let mut seq = prompt.clone();
            seq.extend(generated.iter().map(|r| r.token));
            let first_row = prompt.len() - 1;
            let chunk = chunk.max(1);
            match &mut self.weights {
                Weights::OwnLlama(_) | Weights::OwnGemma3(_) => {
                    let mut c = 0;
                    while c < seq.len() {
                        let end = c.saturating_add(chunk).min(seq.len());
                        let from = first_row.saturating_sub(c).min(end - c);
                        let rows = match &mut self.weights {
                            Weights::OwnLlama(m) => m.forward_rows(&seq[c..end], c, from)?,
                            Weights::OwnGemma3(m) => m.forward_rows(&seq[c..end], c, from)?,
                            _ => unreachable!("matched an own model above"),
                        };
                        let width = rows.len() / (end - c - from).max(1);
                        for row in rows.chunks_exact(width.max(1)) {
                            judge.push(row);
                        }
                        c = end;
                    }
                }
                Weights::CandleLlama(_) | Weights::CandleGemma3(_) => {
                    // The reference path returns one row per pass: prefill, then a token
                    // at a time.
                    let logits = self.prefill(&prompt, seq.len())?;
                    judge.push(&logits);
                    for (i, &t) in seq.iter().enumerate().skip(prompt.len()) {
                        let logits = self.forward(&[t], i)?;
                        judge.push(&logits);
                    }
                }
            }
        }
        let ms = start.elapsed().as_millis().min(u128::from(u32::MAX)) as u32;
        let replayed = judge.replayed().to_vec();
        Ok(Replayed {
            verdict: judge.finish(&claim.commitment, ms),
            records: replayed,
            prompt_tokens: prompt.len() as u32,
        })
    }

    /// Generates for `req`, calling `on_text` with each text delta; returning
    /// `ControlFlow::Break` from it cancels the request.
    pub fn generate(
        &mut self,
        req: &GenerateRequest,
        on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Completion, GenerateError> {
        let done = self.generate_until(req, on_text)?;
        if done.finish_reason == FinishReason::Cancelled {
            return Err(GenerateError::Cancelled);
        }
        Ok(done)
    }

    /// Like [`Model::generate`], but `ControlFlow::Break` ends the request with what was
    /// delivered: finish reason `Cancelled`, and the tokens, transcript and commitment of
    /// every token whose text `on_text` accepted (a node still signs a receipt for those).
    pub fn generate_until(
        &mut self,
        req: &GenerateRequest,
        on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) -> Result<Completion, GenerateError> {
        crate::batch::generate_alone(self, req, on_text)
    }

    /// The arithmetic this model runs, as adverts name it: transcripts replay exactly
    /// only under the same numerics (a different float order flips activation roundings
    /// and moves logits by up to a few units; docs/performance.md).
    pub fn numerics(&self) -> &'static str {
        self.numerics
    }

    /// Whether this implementation runs many sequences per step (ours; candle's stock
    /// models keep a single sequence's cache inside them).
    pub(crate) fn batches(&self) -> bool {
        self.backend() == Backend::Tessera
    }

    /// A KV cache for one sequence of `positions` positions.
    pub(crate) fn new_cache(&self, positions: usize) -> KvCache {
        match &self.weights {
            Weights::OwnLlama(m) => m.new_cache(positions),
            Weights::OwnGemma3(m) => m.new_cache(positions),
            Weights::CandleLlama(_) | Weights::CandleGemma3(_) => KvCache::default(),
        }
    }

    /// One batched step (see [`crate::llama::Llama::step`]); candle's models take one
    /// sequence, with logits for its last token only.
    pub(crate) fn step(
        &mut self,
        seqs: &mut [SeqStep<'_>],
    ) -> Result<Vec<f32>, candle_core::Error> {
        match &mut self.weights {
            Weights::OwnLlama(m) => m.step(seqs),
            Weights::OwnGemma3(m) => m.step(seqs),
            Weights::CandleLlama(_) | Weights::CandleGemma3(_) => {
                let [sq] = seqs else {
                    candle_core::bail!("candle's models run one sequence per step");
                };
                let n = sq.tokens.len();
                if n == 0 || sq.logits_from + 1 < n {
                    candle_core::bail!("candle's models give logits for the last token only");
                }
                let logits = self.forward(sq.tokens, sq.cache.len())?;
                sq.cache.advance(n);
                Ok(if sq.logits_from < n {
                    logits
                } else {
                    Vec::new()
                })
            }
        }
    }

    /// Rows of the token embedding (ids the model can take as input).
    fn embedding_rows(&self) -> usize {
        match &self.weights {
            Weights::OwnLlama(m) => m.vocab(),
            Weights::OwnGemma3(m) => m.vocab(),
            Weights::CandleLlama(_) | Weights::CandleGemma3(_) => usize::MAX,
        }
    }

    /// Counts one generated token.
    pub(crate) fn count_token(&self) {
        self.generated
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether `token` ends generation (end of text or of a turn).
    pub(crate) fn is_end_token(&self, token: u32) -> bool {
        self.end_tokens.contains(&token)
    }
}

/// One item of a request's event stream.
#[derive(Debug)]
pub enum GenerateEvent {
    /// The next piece of answer text (complete UTF-8, never part of a stop sequence).
    Delta(String),
    /// The request finished; always the last event.
    Done(Box<Completion>),
}

/// Events of one request; an `Err` is always the last item. Dropping it cancels the
/// request outright; [`EventStream::stop`] ends it early but still delivers its `Done`.
#[derive(Debug)]
pub struct EventStream {
    rx: tokio::sync::mpsc::Receiver<Result<GenerateEvent, GenerateError>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl EventStream {
    /// The next event; `None` after the last.
    pub async fn recv(&mut self) -> Option<Result<GenerateEvent, GenerateError>> {
        self.rx.recv().await
    }

    /// Asks the engine to stop after the token in progress: the request then ends with a
    /// `Done` whose finish reason is `Cancelled`, covering the text delivered so far (or
    /// with `Err(Cancelled)` if it had not started).
    pub fn stop(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Deltas buffered per request before generation waits for the consumer (back-pressure).
const EVENT_BUFFER: usize = 64;

pub(crate) enum Command {
    Generate {
        req: Box<GenerateRequest>,
        events: tokio::sync::mpsc::Sender<Result<GenerateEvent, GenerateError>>,
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    },
    Replay {
        req: Box<ReplayRequest>,
        reply: tokio::sync::oneshot::Sender<Result<Replayed, GenerateError>>,
    },
    Shutdown,
}

/// An audit's replay, as the engine thread runs it.
#[derive(Debug, Clone)]
pub struct ReplayRequest {
    /// The audited job's prompt.
    pub prompt: Prompt,
    /// Whether the audited job used the chat fallback format.
    pub chat_fallback: bool,
    /// Its sampler settings and seed.
    pub sampling: SamplingParams,
    /// What the audited node claimed.
    pub claim: ReplayClaim,
}

/// Positions per pass of an engine's replay: large enough that the matrix products run
/// on full activation tiles, small enough that one pass's logits stay small (128 rows of
/// gemma3's 262,144-token vocabulary are 134 MB). Any chunking replays exactly.
pub const REPLAY_CHUNK: usize = 128;

/// What handles can know about the engine's model without asking its thread.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Name it was loaded under.
    pub name: String,
    /// Module served.
    pub module_id: ModuleId,
    /// Context length served.
    pub context_length: u32,
    /// Whether the GGUF has a chat template.
    pub has_chat_template: bool,
    /// The engine's arithmetic ([`Model::numerics`]).
    pub numerics: &'static str,
}

/// Owner of the model thread. Dropping it (or `shutdown`) stops the thread after the
/// request in progress.
#[derive(Debug)]
pub struct Engine {
    handle: EngineHandle,
    shutdown: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Cheap, cloneable way to submit requests to an [`Engine`].
#[derive(Debug, Clone)]
pub struct EngineHandle {
    tx: tokio::sync::mpsc::Sender<Command>,
    info: std::sync::Arc<ModelInfo>,
    generated: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stats: std::sync::Arc<EngineStats>,
}

impl Engine {
    /// Moves `model` onto its own thread, which runs up to `cfg.max_batch` requests at once
    /// (continuous batching, [`crate::batch`]); at most `cfg.queue` more wait.
    pub fn spawn(model: Model, cfg: BatchConfig) -> std::io::Result<Self> {
        let info = std::sync::Arc::new(ModelInfo {
            name: model.name.clone(),
            module_id: model.module_id.clone(),
            context_length: model.context_length,
            has_chat_template: model.has_chat_template(),
            numerics: model.numerics(),
        });
        let generated = model.token_counter();
        let (tx, rx) = tokio::sync::mpsc::channel::<Command>(cfg.queue.max(1));
        let shutdown = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = shutdown.clone();
        let stats = std::sync::Arc::new(EngineStats::default());
        let shared = stats.clone();
        let thread = std::thread::Builder::new()
            .name(format!("engine-{}", model.name))
            .spawn(move || crate::batch::serve(model, rx, cfg, flag, shared))?;
        Ok(Self {
            handle: EngineHandle {
                tx,
                info,
                generated,
                stats,
            },
            shutdown,
            thread: Some(thread),
        })
    }

    /// A handle for submitting requests.
    pub fn handle(&self) -> EngineHandle {
        self.handle.clone()
    }

    /// Stops the thread after the running request and waits for it.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(thread) = self.thread.take() {
            // The flag stops the thread after the step in progress (running requests end as
            // stopped, with what they delivered); the command wakes it if it waits for work.
            // With a full queue it is not waiting, and it is detached rather than waited
            // for if the command cannot be queued, so shutdown never blocks on callers.
            self.shutdown
                .store(true, std::sync::atomic::Ordering::Relaxed);
            if self.handle.tx.try_send(Command::Shutdown).is_ok() {
                let _ = thread.join();
            }
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop();
    }
}

impl EngineHandle {
    /// The engine's model.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// The batch's figures now: steps, rows, sequences running, the largest batch.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Tokens the engine has generated so far, counted as they are sampled.
    pub fn tokens_generated(&self) -> u64 {
        self.generated.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Queues `req`, waiting for room in the queue; events arrive on the returned stream.
    /// Dropping the stream cancels the request.
    pub async fn generate(&self, req: GenerateRequest) -> Result<EventStream, GenerateError> {
        let (command, stream) = Self::command(req);
        self.tx
            .send(command)
            .await
            .map_err(|_| GenerateError::EngineGone)?;
        Ok(stream)
    }

    fn command(req: GenerateRequest) -> (Command, EventStream) {
        let (events, rx) = tokio::sync::mpsc::channel(EVENT_BUFFER);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let command = Command::Generate {
            req: Box::new(req),
            events,
            stop: stop.clone(),
        };
        (command, EventStream { rx, stop })
    }

    /// Replays an audited transcript on the engine thread (queued like a request).
    pub async fn replay(&self, req: ReplayRequest) -> Result<Replayed, GenerateError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Command::Replay {
                req: Box::new(req),
                reply,
            })
            .await
            .map_err(|_| GenerateError::EngineGone)?;
        rx.await.map_err(|_| GenerateError::EngineGone)?
    }

    /// Queues `req` only if there is room now; `Ok(None)` means busy.
    pub fn try_generate(&self, req: GenerateRequest) -> Result<Option<EventStream>, GenerateError> {
        let (command, stream) = Self::command(req);
        match self.tx.try_send(command) {
            Ok(()) => Ok(Some(stream)),
            Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => Ok(None),
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => {
                Err(GenerateError::EngineGone)
            }
        }
    }
}
