//! Numerics of a serving path against a reference path on the same file: per-position
//! logits over a fixed text (largest and mean absolute difference, top-1 agreement) and
//! perplexity of that text under each, teacher-forced. `tessera numerics` prints the table
//! in `docs/performance.md`; the real-model tests assert its bounds.

use serde::Serialize;

use crate::engine::{GenerateError, Model};

/// A public-domain text the checks run on (the opening of the US Declaration of
/// Independence, 1776).
pub const TEXT: &str = include_str!("../data/declaration.txt");

/// Positions per pass (either path keeps its own cache between passes).
const CHUNK: usize = 64;

/// How one path compares with another.
#[derive(Debug, Clone, Serialize)]
pub struct NumericsReport {
    /// Model name.
    pub model: String,
    /// The path checked.
    pub path: String,
    /// The path it is checked against.
    pub reference: String,
    /// Positions compared (tokens of the text, at most the limit asked for).
    pub positions: usize,
    /// Largest |logit difference| over every position and vocabulary entry.
    pub max_abs_diff: f32,
    /// Mean over positions of the largest |difference| at that position.
    pub mean_max_abs_diff: f32,
    /// Share of positions whose argmax agrees.
    pub top1_agreement: f64,
    /// Perplexity of the text under the path checked.
    pub perplexity: f64,
    /// Perplexity under the reference.
    pub reference_perplexity: f64,
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv {
                (i, v)
            } else {
                (bi, bv)
            }
        })
        .0
}

/// −log p(next) from one row of logits (log-sum-exp in f64).
fn nll(row: &[f32], next: u32) -> f64 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let lse = row
        .iter()
        .map(|&v| (v as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    lse - row[next as usize] as f64
}

/// Runs [`TEXT`] (tokenized by `path`'s tokenizer, at most `positions` tokens) through
/// both models and compares them position by position. Both must load the same file.
pub fn compare(
    path: (&str, &mut Model),
    reference: (&str, &mut Model),
    positions: usize,
) -> Result<NumericsReport, GenerateError> {
    let (path_name, model) = path;
    let (ref_name, refm) = reference;
    let tokens = model.tokenize_prompt(&crate::Prompt::Text(TEXT.to_owned()), false)?;
    let n = tokens.len().min(positions.max(2));
    let tokens = &tokens[..n];
    let (mut max_abs, mut sum_max, mut agree) = (0f32, 0f64, 0usize);
    let (mut nll_a, mut nll_b) = (0f64, 0f64);
    let mut pos = 0;
    while pos < n {
        let end = (pos + CHUNK).min(n);
        let a = model.logits_chunk(&tokens[pos..end], pos)?;
        let b = refm.logits_chunk(&tokens[pos..end], pos)?;
        let width = a.len() / (end - pos);
        if width == 0 || b.len() != a.len() {
            return Err(GenerateError::Candle(candle_core::Error::Msg(format!(
                "the two paths gave {} and {} logits for {} positions",
                a.len(),
                b.len(),
                end - pos
            ))));
        }
        for (i, (ra, rb)) in a.chunks_exact(width).zip(b.chunks_exact(width)).enumerate() {
            let m = ra
                .iter()
                .zip(rb)
                .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
            max_abs = max_abs.max(m);
            sum_max += f64::from(m);
            agree += usize::from(argmax(ra) == argmax(rb));
            if let Some(&next) = tokens.get(pos + i + 1) {
                nll_a += nll(ra, next);
                nll_b += nll(rb, next);
            }
        }
        pos = end;
    }
    let predicted = (n - 1) as f64;
    Ok(NumericsReport {
        model: model.name().to_owned(),
        path: path_name.to_owned(),
        reference: ref_name.to_owned(),
        positions: n,
        max_abs_diff: max_abs,
        mean_max_abs_diff: (sum_max / n as f64) as f32,
        top1_agreement: agree as f64 / n as f64,
        perplexity: (nll_a / predicted).exp(),
        reference_perplexity: (nll_b / predicted).exp(),
    })
}
