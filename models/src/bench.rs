//! The speed benchmark, the same workload as `shared/bench/llamacpp-anchor.sh` so the two
//! can be compared side by side: a fixed 64-token prompt of raw ids (1000 + 7·i), then
//! greedy decoding of N tokens after the first, one sequence.

use serde::Serialize;

use crate::engine::{GenerateError, GenerateRequest, Model, Prompt};

/// Figures printed by `tessera bench`, named like the anchor's.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    /// "tessera", or "candle" for candle's stock model (`--backend candle`).
    pub engine: &'static str,
    /// Model name.
    pub model: String,
    /// Inference threads (our rayon pool and candle's).
    pub threads: usize,
    /// Prompt tokens per second (prompt tokens / time to first token).
    pub prefill_tps: f64,
    /// Tokens per second after the first.
    pub decode_tps: f64,
    /// Time to open, hash and load the model, in milliseconds.
    pub load_ms: u128,
}

/// The anchor's prompt: `n` raw token ids (wrapped into the vocabulary for toy models; the
/// real models' vocabularies hold every id unchanged).
pub fn anchor_prompt(n: usize, vocab: usize) -> Vec<u32> {
    (0..n as u64)
        .map(|i| ((1000 + i * 7) % vocab.max(1) as u64) as u32)
        .collect()
}

/// Runs the anchor workload on a loaded model: `prompt_tokens` ids, then `gen_tokens`
/// greedy tokens after the first.
pub fn run(
    model: &mut Model,
    prompt_tokens: usize,
    gen_tokens: u32,
) -> Result<BenchResult, GenerateError> {
    if prompt_tokens >= model.context_length() as usize {
        return Err(GenerateError::PromptTooLong {
            prompt_tokens,
            context: model.context_length(),
        });
    }
    let mut req = GenerateRequest::new(
        Prompt::Tokens(anchor_prompt(prompt_tokens, model.tokenizer().vocab_size())),
        gen_tokens.saturating_add(1),
    );
    req.ignore_eos = true;
    let done = model.generate(&req, |_| std::ops::ControlFlow::Continue(()))?;
    let round = |x: f64| (x * 10.0).round() / 10.0;
    Ok(BenchResult {
        engine: match model.backend() {
            crate::Backend::Tessera => "tessera",
            crate::Backend::Candle => "candle",
        },
        model: model.name().to_owned(),
        threads: candle_core::utils::get_num_threads(),
        prefill_tps: round(done.timings.prefill_tps()),
        decode_tps: round(done.timings.decode_tps()),
        load_ms: model.load_time().as_millis(),
    })
}
