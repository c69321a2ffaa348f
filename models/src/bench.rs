//! The speed benchmark, the same workloads as `shared/bench/llamacpp-anchor.sh` and
//! `shared/bench/batch-anchor.sh` so each can be compared side by side with llama.cpp: a
//! fixed 64-token prompt of raw ids (1000 + 7·i, plus k for stream k), then greedy decoding
//! of N tokens after the first; one stream on the model directly, or N streams at once
//! through the engine's continuous batching.

use serde::Serialize;

use crate::batch::BatchConfig;
use crate::engine::{Engine, GenerateError, GenerateEvent, GenerateRequest, Model, Prompt};

/// Figures printed by `tessera bench`, named like the anchors'.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    /// "tessera", or "candle" for candle's stock model (`--backend candle`).
    pub engine: &'static str,
    /// Model name.
    pub model: String,
    /// Inference threads (our rayon pool and candle's).
    pub threads: usize,
    /// Streams run at once.
    pub streams: usize,
    /// Prompt tokens per second (prompt tokens / time to first token; the median stream's).
    pub prefill_tps: f64,
    /// Tokens per second after the first (the median stream's).
    pub decode_tps: f64,
    /// All streams' counted tokens over the wall time from the first request to the last
    /// token, prefills included (batch-anchor.sh's figure); only with more than one stream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aggregate_tps: Option<f64>,
    /// Time to open, hash and load the model, in milliseconds.
    pub load_ms: u128,
    /// The matrix kernels that ran.
    pub kernel: &'static str,
    /// SIMD features this CPU reports (of those the kernels know).
    pub cpu_features: Vec<&'static str>,
    /// The engine's thread policy (runs through the engine only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub thread_policy: Option<crate::batch::ThreadPolicy>,
}

/// The anchor's prompt for stream `k`: `n` raw token ids (wrapped into the vocabulary for
/// toy models; the real models' vocabularies hold every id unchanged).
pub fn anchor_prompt(n: usize, vocab: usize, k: usize) -> Vec<u32> {
    (0..n as u64)
        .map(|i| ((1000 + i * 7 + k as u64) % vocab.max(1) as u64) as u32)
        .collect()
}

/// SIMD features of this CPU that matter to the kernels.
pub fn cpu_features() -> Vec<&'static str> {
    #[allow(unused_mut)]
    let mut out = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        macro_rules! probe {
            ($($f:tt),*) => {$(
                if std::is_x86_feature_detected!($f) {
                    out.push($f);
                }
            )*};
        }
        probe!(
            "avx2",
            "fma",
            "f16c",
            "avx512f",
            "avx512bw",
            "avx512vnni",
            "avxvnni"
        );
    }
    out
}

fn kernel_name() -> &'static str {
    match crate::kernels::best_path() {
        crate::kernels::Path::Scalar => "scalar",
        crate::kernels::Path::Avx2(_) => "avx2",
    }
}

fn round(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn request(model: &Model, prompt_tokens: usize, gen_tokens: u32, k: usize) -> GenerateRequest {
    let vocab = model.tokenizer().vocab_size();
    let mut req = GenerateRequest::new(
        Prompt::Tokens(anchor_prompt(prompt_tokens, vocab, k)),
        gen_tokens.saturating_add(1),
    );
    req.ignore_eos = true;
    req
}

fn result(model: &Model, streams: usize) -> BenchResult {
    BenchResult {
        engine: match model.backend() {
            crate::Backend::Tessera => "tessera",
            crate::Backend::Candle => "candle",
        },
        model: model.name().to_owned(),
        threads: rayon::current_num_threads(),
        streams,
        prefill_tps: 0.0,
        decode_tps: 0.0,
        aggregate_tps: None,
        load_ms: model.load_time().as_millis(),
        kernel: match model.backend() {
            crate::Backend::Tessera => kernel_name(),
            crate::Backend::Candle => "candle",
        },
        cpu_features: cpu_features(),
        thread_policy: None,
    }
}

/// Runs the anchor workload on a loaded model directly (no engine thread): `prompt_tokens`
/// ids, then `gen_tokens` greedy tokens after the first, one sequence.
pub fn run(
    model: &mut Model,
    prompt_tokens: usize,
    gen_tokens: u32,
) -> Result<BenchResult, GenerateError> {
    check_prompt(model, prompt_tokens)?;
    let req = request(model, prompt_tokens, gen_tokens, 0);
    let done = model.generate(&req, |_| std::ops::ControlFlow::Continue(()))?;
    Ok(BenchResult {
        prefill_tps: round(done.timings.prefill_tps()),
        decode_tps: round(done.timings.decode_tps()),
        ..result(model, 1)
    })
}

fn check_prompt(model: &Model, prompt_tokens: usize) -> Result<(), GenerateError> {
    if prompt_tokens >= model.context_length() as usize {
        return Err(GenerateError::PromptTooLong {
            prompt_tokens,
            context: model.context_length(),
        });
    }
    Ok(())
}

/// Runs `streams` anchor workloads (one or more) at once through an engine, as a node
/// runs them, batching up to `streams` sequences (batch-anchor.sh's workload: prompt k is the anchor prompt shifted by k);
/// `cfg`'s other limits apply. The aggregate counts `gen_tokens` per stream over the wall
/// time from submitting the first request to the end of the last.
pub fn run_streams(
    model: Model,
    streams: usize,
    prompt_tokens: usize,
    gen_tokens: u32,
    cfg: BatchConfig,
) -> Result<BenchResult, GenerateError> {
    check_prompt(&model, prompt_tokens)?;
    let streams = streams.max(1);
    let reqs: Vec<_> = (0..streams)
        .map(|k| request(&model, prompt_tokens, gen_tokens, k))
        .collect();
    let base = result(&model, streams);
    let cfg = BatchConfig {
        max_batch: streams,
        queue: streams,
        ..cfg
    };
    let policy = cfg.threads;
    let engine = Engine::spawn(model, cfg).map_err(|e| GenerateError::Candle(e.into()))?;
    let handle = engine.handle();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| GenerateError::Candle(e.into()))?;
    let (wall, mut dones) = rt.block_on(async {
        let start = std::time::Instant::now();
        let mut events = Vec::with_capacity(streams);
        for r in reqs {
            events.push(handle.generate(r).await?);
        }
        // Every stream is read at once, as clients would: an unread stream's engine
        // sequence waits for its reader.
        let readers: Vec<_> = events
            .into_iter()
            .map(|mut ev| {
                tokio::spawn(async move {
                    loop {
                        match ev.recv().await {
                            Some(Ok(GenerateEvent::Delta(_))) => {}
                            Some(Ok(GenerateEvent::Done(d))) => return Ok(*d),
                            Some(Err(e)) => return Err(e),
                            None => return Err(GenerateError::EngineGone),
                        }
                    }
                })
            })
            .collect();
        let mut dones = Vec::with_capacity(streams);
        for r in readers {
            dones.push(r.await.map_err(|_| GenerateError::EngineGone)??);
        }
        Ok::<_, GenerateError>((start.elapsed(), dones))
    })?;
    engine.shutdown();
    let median = |f: &dyn Fn(&crate::Completion) -> f64, dones: &mut Vec<crate::Completion>| {
        dones.sort_by(|a, b| f(a).total_cmp(&f(b)));
        dones.get(dones.len() / 2).map(f).unwrap_or(0.0)
    };
    let prefill = median(&|d| d.timings.prefill_tps(), &mut dones);
    let decode = median(&|d| d.timings.decode_tps(), &mut dones);
    let counted = streams as f64 * f64::from(gen_tokens);
    Ok(BenchResult {
        prefill_tps: round(prefill),
        decode_tps: round(decode),
        aggregate_tps: (streams > 1).then(|| round(counted / wall.as_secs_f64())),
        thread_policy: Some(policy),
        ..base
    })
}
