//! The verification benchmark behind `tessera verify-bench` and `docs/verification.md`:
//! honest and dishonest nodes generate real jobs on the real models, an auditor replays
//! each one, and the figures say how often honest work is flagged (false positives), how
//! often substituted work is caught (detection), and what an audit costs against the job.
//!
//! Every job's largest per-position distance is kept, so one run gives the detection and
//! false-positive rates at every candidate tolerance: a job is flagged at tolerance τ
//! exactly when its largest distance exceeds τ (that is the verdict's rule).

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use tessera_protocol::{
    audit::DEFAULT_TOLERANCE, Fingerprint, ReplayClaim, SamplingParams, TokenRecord,
    TranscriptCommitment, Verdict, FINGERPRINT_TOP_K, LOGIT_GRID,
};

use crate::engine::{Completion, GenerateError, GenerateRequest, Model, Prompt};
use crate::ChatMessage;

/// Tolerances the report gives rates at (logits).
pub const TOLERANCES: [f32; 7] = [0.0, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5];

/// User prompts of the workload: short questions and instructions of many kinds.
pub const PROMPTS: [&str; 40] = [
    "Name the capital of France.",
    "Which planet is known as the Red Planet?",
    "What is 2 + 2?",
    "Name three colors.",
    "Write a haiku about autumn leaves.",
    "Explain photosynthesis in one sentence.",
    "Give me a tip for learning a new language.",
    "What is the boiling point of water in Fahrenheit?",
    "Translate 'good morning' into Spanish.",
    "List four animals that live in the ocean.",
    "Why is the sky blue?",
    "Suggest a name for a pet goldfish.",
    "What does a carpenter do?",
    "Describe a sunset in two sentences.",
    "How many days are in a leap year?",
    "Write a short riddle.",
    "What is the largest mammal?",
    "Give a synonym for happy.",
    "Summarize the story of Cinderella in one sentence.",
    "What are the primary colors?",
    "How do bees make honey?",
    "Recommend a book for a long train ride.",
    "What is the square root of 81?",
    "Write a limerick about a cat.",
    "Who wrote Romeo and Juliet?",
    "What is the freezing point of water in Celsius?",
    "Give three reasons to exercise.",
    "Explain what a computer program is to a child.",
    "What is the opposite of cold?",
    "Name a famous painting.",
    "Write a two-line poem about the sea.",
    "How many legs does a spider have?",
    "What is the chemical symbol for gold?",
    "Give an example of a renewable energy source.",
    "What is a noun?",
    "Describe the taste of a lemon.",
    "Why do we need sleep?",
    "Plan a simple breakfast.",
    "What is the tallest mountain in the world?",
    "Tell me a fun fact about octopuses.",
];

/// The sampler settings jobs cycle through: greedy and four common sampled settings.
pub fn sampling_mix(job: usize) -> SamplingParams {
    let seed = 1000 + job as u64;
    let base = SamplingParams {
        seed,
        ..SamplingParams::default()
    };
    match job % 5 {
        0 => base,
        1 => SamplingParams {
            temperature: 0.7,
            top_p: 0.9,
            ..base
        },
        2 => SamplingParams {
            temperature: 1.0,
            ..base
        },
        3 => SamplingParams {
            temperature: 0.8,
            top_k: 40,
            repetition_penalty: 1.1,
            ..base
        },
        _ => SamplingParams {
            temperature: 1.2,
            top_p: 0.95,
            top_k: 100,
            ..base
        },
    }
}

/// The prompt of job `job`.
pub fn prompt(job: usize) -> Prompt {
    Prompt::Chat(vec![ChatMessage::user(PROMPTS[job % PROMPTS.len()])])
}

/// One audited job.
#[derive(Debug, Clone, Serialize)]
pub struct JobFigure {
    /// Positions judged.
    pub positions: u32,
    /// Largest per-position distance (logits).
    pub max_distance: f32,
    /// Index of the first position beyond the default tolerance.
    pub first_failure: Option<u32>,
    /// Generation time (prefill and decode), milliseconds.
    pub generate_ms: f64,
    /// Replay time, milliseconds.
    pub replay_ms: f64,
}

/// A scenario's figures.
#[derive(Debug, Clone, Serialize)]
pub struct ScenarioReport {
    /// Short name.
    pub scenario: String,
    /// What the generator and the auditor ran.
    pub setup: String,
    /// Whether the generator was honest (rates are then false positives).
    pub honest: bool,
    /// Jobs audited.
    pub jobs: usize,
    /// Positions judged in all.
    pub positions: u64,
    /// Share of jobs flagged at each tolerance of [`TOLERANCES`].
    pub flagged: Vec<(f32, f64)>,
    /// Share flagged at the default tolerance.
    pub flagged_at_default: f64,
    /// Largest-distance quantiles over jobs: min, median, p99, max.
    pub distance: [f32; 4],
    /// Median first failing position among flagged jobs (at the default tolerance).
    pub median_first_failure: Option<u32>,
    /// Median generation time per job, milliseconds.
    pub generate_ms_median: f64,
    /// Median replay time per job, milliseconds.
    pub replay_ms_median: f64,
    /// Median of replay time over generation time, per job.
    pub replay_over_generate: f64,
}

fn quantile(sorted: &[f32], q: f64) -> f32 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

impl ScenarioReport {
    /// Summarises per-job figures.
    pub fn new(scenario: &str, setup: String, honest: bool, jobs: &[JobFigure]) -> Self {
        let mut d: Vec<f32> = jobs.iter().map(|j| j.max_distance).collect();
        d.sort_by(f32::total_cmp);
        let share = |tol: f32| {
            if jobs.is_empty() {
                0.0
            } else {
                jobs.iter().filter(|j| j.max_distance > tol).count() as f64 / jobs.len() as f64
            }
        };
        let mut firsts: Vec<u32> = jobs.iter().filter_map(|j| j.first_failure).collect();
        firsts.sort_unstable();
        Self {
            scenario: scenario.into(),
            setup,
            honest,
            jobs: jobs.len(),
            positions: jobs.iter().map(|j| u64::from(j.positions)).sum(),
            flagged: TOLERANCES.iter().map(|&t| (t, share(t))).collect(),
            flagged_at_default: share(DEFAULT_TOLERANCE),
            distance: [
                quantile(&d, 0.0),
                quantile(&d, 0.5),
                quantile(&d, 0.99),
                quantile(&d, 1.0),
            ],
            median_first_failure: firsts.get(firsts.len() / 2).copied(),
            generate_ms_median: median(jobs.iter().map(|j| j.generate_ms).collect()),
            replay_ms_median: median(jobs.iter().map(|j| j.replay_ms).collect()),
            replay_over_generate: median(
                jobs.iter()
                    .filter(|j| j.generate_ms > 0.0)
                    .map(|j| j.replay_ms / j.generate_ms)
                    .collect(),
            ),
        }
    }
}

/// The claim a node makes for a completion.
pub fn claim_of(done: &Completion) -> ReplayClaim {
    ReplayClaim {
        commitment: done.commitment,
        records: done.transcript.clone(),
        tolerance: DEFAULT_TOLERANCE,
    }
}

/// Runs `f` on a rayon pool of `threads` (our kernels and candle's run where they are called).
pub fn with_threads<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    match rayon::ThreadPoolBuilder::new().num_threads(threads).build() {
        Ok(pool) => pool.install(f),
        Err(_) => f(),
    }
}

/// Generates job `job` of the workload on `model`.
pub fn generate(
    model: &mut Model,
    job: usize,
    max_tokens: u32,
    ignore_eos: bool,
) -> Result<(Completion, f64), GenerateError> {
    let mut req = GenerateRequest::new(prompt(job), max_tokens);
    req.sampling = sampling_mix(job);
    req.ignore_eos = ignore_eos;
    // A base model without a template answers in its documented fallback turn format.
    req.chat_fallback = !model.has_chat_template();
    let t = Instant::now();
    let done = model.generate(&req, |_| std::ops::ControlFlow::Continue(()))?;
    Ok((done, t.elapsed().as_secs_f64() * 1e3))
}

/// Replays `claim` of job `job` on `auditor` in passes of `chunk` positions (a node uses
/// [`crate::engine::REPLAY_CHUNK`]).
pub fn audit(
    auditor: &mut Model,
    job: usize,
    claim: &ReplayClaim,
    chunk: usize,
) -> Result<(Verdict, f64), GenerateError> {
    let t = Instant::now();
    let fallback = !auditor.has_chat_template();
    let v = auditor
        .replay(&prompt(job), fallback, &sampling_mix(job), claim, chunk)?
        .verdict;
    Ok((v, t.elapsed().as_secs_f64() * 1e3))
}

/// The figure of one audited job.
pub fn figure(v: &Verdict, generate_ms: f64, replay_ms: f64) -> JobFigure {
    JobFigure {
        positions: v.positions,
        max_distance: v.max_distance,
        first_failure: v.first_failure.map(|f| f.index),
        generate_ms,
        replay_ms,
    }
}

/// What a node that runs another model entirely must claim: that model's answer text,
/// tokenized with the advertised module's tokenizer, with fingerprints it has to invent
/// (it never computed the advertised model's logits). The invented fingerprint puts the
/// claimed token first at a typical top logit, and the next ids below it.
pub fn foreign_claim(auditor: &Model, job: usize, text: &str, max_tokens: u32) -> ReplayClaim {
    let tok = auditor.tokenizer();
    let prompt_len = auditor
        .tokenize_prompt(&prompt(job), false)
        .map(|p| p.len())
        .unwrap_or(0);
    let vocab = tok.vocab_size() as u32;
    let mut ids = tok.encode(text, false, false);
    ids.truncate(max_tokens as usize);
    if ids.is_empty() {
        ids.extend(tok.eos_id());
    }
    let records: Vec<TokenRecord> = ids
        .iter()
        .enumerate()
        .map(|(i, &token)| {
            let mut fp = Fingerprint {
                ids: [u32::MAX; FINGERPRINT_TOP_K],
                logits: [0; FINGERPRINT_TOP_K],
            };
            for k in 0..FINGERPRINT_TOP_K {
                fp.ids[k] = (token + k as u32) % vocab;
                fp.logits[k] = ((20.0 - k as f32) / LOGIT_GRID) as i32;
            }
            TokenRecord {
                position: (prompt_len + i) as u32,
                token,
                fingerprint: fp,
            }
        })
        .collect();
    ReplayClaim {
        commitment: TranscriptCommitment::from_records(&records),
        records,
        tolerance: DEFAULT_TOLERANCE,
    }
}

/// Where a requantized substitute of `src` lives: next to the cache, made once.
pub fn substitute_path(home: &Path, src: &Path, format: &str) -> PathBuf {
    let stem = src
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    home.join("derived")
        .join(format!("{stem}.requant-{format}.gguf"))
}
