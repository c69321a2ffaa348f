//! Continuous batching: the engine thread's scheduler. Requests join and leave a running
//! batch between steps; each sequence keeps its own position, KV cache, sampler and text
//! stream; one step runs the new tokens of every running sequence through the model
//! together (one matrix product per projection, so the weights are read once per step),
//! the prompts of newly arrived requests in chunks beside the decoding streams so those do
//! not stall. A row's logits do not depend on what else shares the step (see
//! [`crate::llama::Llama::step`]), so a seeded request gives the same tokens and the same
//! commitment alone or inside a busy batch.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tessera_protocol::{Fingerprint, FinishReason, TokenRecord, TranscriptCommitment};
use tokio::sync::mpsc;

use crate::engine::{
    Command, Completion, GenerateError, GenerateEvent, GenerateRequest, Model, Timings,
    MAX_STOP_BYTES, MAX_STOP_SEQUENCES, REPLAY_CHUNK,
};
use crate::sampler::Sampler;
use crate::serving::{KvCache, SeqStep};
use crate::text::{Push, TextStream};

/// Limits of the running batch (node configuration `[engine]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BatchConfig {
    /// Most sequences generating at once; more requests wait in the queue.
    pub max_batch: usize,
    /// Most tokens one step runs while other sequences are decoding: a new prompt is
    /// prefilled in chunks of what the decoding sequences leave of this, so they keep
    /// streaming (a larger value prefills faster and stalls them longer).
    pub max_step_tokens: usize,
    /// Most positions (prompt plus allowed output) whose KV cache the running sequences
    /// may hold together; a request that would exceed it waits for room (one request
    /// alone is always admitted, up to the context). Bounds the engine's memory.
    pub max_positions: usize,
    /// How many threads run each step: `adaptive` (default) moves between the whole pool
    /// and one thread by measuring both as it goes, so a core taken by another process
    /// (a node's own network and API, anything else on the machine) costs a little speed
    /// instead of stalling every step on a descheduled worker; `all` always uses the pool
    /// (`--threads`), `one` a single thread.
    pub threads: ThreadPolicy,
    /// Requests waiting for a place in the batch before `try_generate` reports busy (a
    /// node sets it from its `max_jobs`).
    #[serde(skip)]
    pub queue: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_batch: 16,
            max_step_tokens: 64,
            max_positions: 32_768,
            threads: ThreadPolicy::Adaptive,
            queue: 8,
        }
    }
}

impl BatchConfig {
    /// Checks the limits, naming the one that is out of range.
    pub fn validate(&self) -> Result<(), String> {
        let check = |name: &str, v: usize, max: usize| {
            if v == 0 || v > max {
                Err(format!("{name} must be 1..={max}, got {v}"))
            } else {
                Ok(())
            }
        };
        check("max_batch", self.max_batch, 256)?;
        check("max_step_tokens", self.max_step_tokens, 4096)?;
        check("max_positions", self.max_positions, 1 << 24)?;
        check("queue", self.queue, 4096)
    }
}

/// Live figures of an engine's batch, shared between its thread and its handles (relaxed
/// atomics: a node reports them; nothing synchronises on them).
#[derive(Debug, Default)]
pub struct EngineStats {
    steps: AtomicU64,
    rows: AtomicU64,
    sequences: AtomicU64,
    running: AtomicUsize,
    peak: AtomicUsize,
}

/// A snapshot of [`EngineStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    /// Steps run.
    pub steps: u64,
    /// Token rows run over all steps (prompt chunks and decoded tokens).
    pub rows: u64,
    /// Sum over steps of the sequences in each (`sequences / steps` is the mean batch).
    pub sequences: u64,
    /// Sequences holding a place in the batch now.
    pub running: usize,
    /// Most sequences one step has run.
    pub peak_batch: usize,
}

impl EngineStats {
    /// The current figures.
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            steps: self.steps.load(Ordering::Relaxed),
            rows: self.rows.load(Ordering::Relaxed),
            sequences: self.sequences.load(Ordering::Relaxed),
            running: self.running.load(Ordering::Relaxed),
            peak_batch: self.peak.load(Ordering::Relaxed),
        }
    }

    fn step(&self, sequences: usize, rows: usize) {
        self.steps.fetch_add(1, Ordering::Relaxed);
        self.rows.fetch_add(rows as u64, Ordering::Relaxed);
        self.sequences
            .fetch_add(sequences as u64, Ordering::Relaxed);
        self.peak.fetch_max(sequences, Ordering::Relaxed);
    }
}

/// Which threads run the engine's steps (see [`BatchConfig::threads`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ThreadPolicy {
    /// Measure both and use the faster, re-measuring as conditions change.
    Adaptive,
    /// The whole inference pool.
    All,
    /// One thread.
    One,
}

impl std::str::FromStr for ThreadPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "adaptive" => Ok(Self::Adaptive),
            "all" => Ok(Self::All),
            "one" => Ok(Self::One),
            _ => Err(format!(
                "thread policy must be adaptive, all or one, not {s:?}"
            )),
        }
    }
}

/// Steps between two probes of the other setting, steps per probe, and steps before the
/// first probe. A step this much slower than its setting's average probes at once (another
/// process has just taken a core).
const PROBE_EVERY: u32 = 32;
const PROBE_STEPS: u32 = 3;
const FIRST_PROBE: u32 = 6;
const SLOWDOWN: f64 = 2.0;

/// The adaptive policy's state: the setting in use, and each setting's recent time per
/// token row (an exponential average), kept apart for decoding steps (a token per
/// sequence) and steps that carry prompt chunks, whose rows cost less each.
#[derive(Debug)]
struct Threads {
    policy: ThreadPolicy,
    one: Option<rayon::ThreadPool>,
    use_one: bool,
    since_probe: u32,
    probing: u32,
    per_row: [[Option<f64>; 2]; 2],
}

impl Threads {
    fn new(policy: ThreadPolicy) -> Self {
        // One thread needs a pool of its own only when the global pool has more.
        let one = (policy != ThreadPolicy::All && rayon::current_num_threads() > 1)
            .then(|| rayon::ThreadPoolBuilder::new().num_threads(1).build().ok())
            .flatten();
        Self {
            use_one: policy == ThreadPolicy::One,
            policy,
            one,
            since_probe: PROBE_EVERY - FIRST_PROBE,
            probing: 0,
            per_row: [[None, None]; 2],
        }
    }

    /// Whether the next step runs on one thread.
    fn next_on_one(&mut self) -> bool {
        if self.policy != ThreadPolicy::Adaptive || self.one.is_none() {
            return self.use_one && self.one.is_some();
        }
        if self.probing == 0 && self.since_probe >= PROBE_EVERY {
            self.probing = PROBE_STEPS;
            self.since_probe = 0;
        }
        if self.probing > 0 {
            !self.use_one
        } else {
            self.use_one
        }
    }

    /// Records a step's time; after a probe, keeps whichever setting was faster.
    fn record(&mut self, on_one: bool, decoding: bool, rows: usize, took: Duration) {
        if self.policy != ThreadPolicy::Adaptive || rows == 0 {
            return;
        }
        let per_row = took.as_secs_f64() / rows as f64;
        let kind = usize::from(decoding);
        let slot = &mut self.per_row[kind][usize::from(on_one)];
        if self.probing == 0 && slot.is_some_and(|avg| per_row > SLOWDOWN * avg) {
            self.since_probe = PROBE_EVERY;
        }
        *slot = Some(slot.map_or(per_row, |avg| 0.7 * avg + 0.3 * per_row));
        if self.probing > 0 {
            self.probing -= 1;
            if self.probing == 0 {
                if let [Some(all), Some(one)] = self.per_row[kind] {
                    let switch = if self.use_one {
                        all < 0.9 * one
                    } else {
                        one < 0.9 * all
                    };
                    if switch {
                        self.use_one = !self.use_one;
                        tracing::debug!(
                            one_thread = self.use_one,
                            all_us = all * 1e6,
                            one_us = one * 1e6,
                            "engine thread setting changed"
                        );
                    }
                }
            }
        } else {
            self.since_probe = self.since_probe.saturating_add(1);
        }
    }

    /// Runs `f` on the setting chosen for this step.
    fn run<T: Send>(&self, on_one: bool, f: impl FnOnce() -> T + Send) -> T {
        match (&self.one, on_one) {
            (Some(pool), true) => pool.install(f),
            _ => f(),
        }
    }
}

/// Prompt tokens one step runs when no other sequence is decoding (nothing to stall): a
/// long prompt alone is prefilled in passes of this size, which bounds the scratch memory.
const PREFILL_ALONE: usize = 512;

/// A generation in progress: what one request keeps between steps.
pub(crate) struct Running {
    prompt_len: usize,
    history: Vec<u32>,
    /// Tokens of `history` already in the cache.
    fed: usize,
    budget: usize,
    ignore_eos: bool,
    tokens: Vec<u32>,
    transcript: Vec<TokenRecord>,
    stream: TextStream,
    sampler: Sampler,
    text_out: String,
    timings: Timings,
    started: Option<Instant>,
    first_token: Option<Instant>,
    finish: FinishReason,
    stream_stopped: bool,
    done: bool,
    cache: KvCache,
}

impl Running {
    /// Validates `req` and tokenizes its prompt; the KV cache is reserved on admission.
    pub fn start(model: &Model, req: &GenerateRequest) -> Result<Self, GenerateError> {
        req.sampling.validate()?;
        let longest = req.stop.iter().map(String::len).max().unwrap_or(0);
        if req.stop.len() > MAX_STOP_SEQUENCES || longest > MAX_STOP_BYTES {
            return Err(GenerateError::BadStop {
                count: req.stop.len(),
                longest,
            });
        }
        let prompt = model.tokenize_prompt(&req.prompt, req.chat_fallback)?;
        let room = model.context_length() as usize - prompt.len();
        let budget = (req.max_tokens as usize).min(room);
        Ok(Self {
            prompt_len: prompt.len(),
            timings: Timings {
                prefill_tokens: prompt.len() as u32,
                ..Timings::default()
            },
            history: prompt,
            fed: 0,
            budget,
            ignore_eos: req.ignore_eos,
            tokens: Vec::with_capacity(budget),
            transcript: Vec::with_capacity(budget),
            stream: TextStream::new(req.stop.clone()),
            sampler: Sampler::new(req.sampling.clone()),
            text_out: String::new(),
            started: None,
            first_token: None,
            finish: FinishReason::Length,
            stream_stopped: false,
            done: budget == 0,
            cache: KvCache::default(),
        })
    }

    /// Positions this sequence may fill: what its KV cache reserves.
    pub fn positions(&self) -> usize {
        self.prompt_len + self.budget
    }

    /// Reserves the KV cache.
    pub fn admit(&mut self, model: &Model) {
        self.cache = model.new_cache(self.positions());
    }

    /// Whether the prompt is fully in the cache (the sequence decodes a token per step).
    pub fn decoding(&self) -> bool {
        self.fed >= self.prompt_len
    }

    /// This sequence's part of the next step: at most `max` of its tokens not yet run,
    /// with logits for the last of them when it completes the input.
    fn seq_step(&mut self, max: usize) -> SeqStep<'_> {
        let end = self.history.len().min(self.fed.saturating_add(max.max(1)));
        let tokens = &self.history[self.fed..end];
        let logits_from = if end == self.history.len() {
            tokens.len() - 1
        } else {
            tokens.len()
        };
        self.started.get_or_insert_with(Instant::now);
        SeqStep {
            cache: &mut self.cache,
            tokens,
            logits_from,
        }
    }

    /// Records that the step ran `n` tokens; returns whether it produced logits for us.
    fn ran(&mut self, n: usize) -> bool {
        self.fed += n;
        self.fed == self.history.len()
    }

    /// Samples the next token from `logits` and passes its text to `on_text`; a `Break`
    /// from it ends the request as cancelled (that token's text was refused).
    fn accept(
        &mut self,
        model: &Model,
        logits: &mut [f32],
        mut on_text: impl FnMut(&str) -> ControlFlow<()>,
    ) {
        let now = Instant::now();
        match self.first_token {
            None => {
                self.first_token = Some(now);
                self.timings.prefill = now - self.started.unwrap_or(now);
            }
            Some(_) => self.timings.decode_tokens += 1,
        }
        let position = self.history.len() as u32;
        let fingerprint = Fingerprint::from_logits(logits);
        let token = self.sampler.sample(logits, &self.history);
        self.transcript.push(TokenRecord {
            position,
            token,
            fingerprint,
        });
        self.tokens.push(token);
        self.history.push(token);
        model.count_token();
        if !self.ignore_eos && model.is_end_token(token) {
            return self.end(FinishReason::Stop, false);
        }
        let (piece, stopped) = match self.stream.push(model.tokenizer().token_bytes(token)) {
            Push::Text(t) => (t, false),
            Push::Stopped(t) => (t, true),
        };
        if !piece.is_empty() {
            if on_text(piece).is_break() {
                // This token's text was refused: it is not part of what was delivered.
                self.tokens.pop();
                self.transcript.pop();
                self.history.pop();
                return self.end(FinishReason::Cancelled, true);
            }
            self.text_out.push_str(piece);
        }
        if stopped {
            return self.end(FinishReason::Stop, true);
        }
        if self.tokens.len() >= self.budget {
            self.end(FinishReason::Length, false);
        }
    }

    /// Ends the sequence after the token in progress (a consumer's stop).
    pub fn cancel(&mut self) {
        self.end(FinishReason::Cancelled, false);
    }

    fn end(&mut self, finish: FinishReason, stream_stopped: bool) {
        self.finish = finish;
        self.stream_stopped = stream_stopped;
        self.done = true;
        if let Some(t) = self.first_token {
            self.timings.decode = t.elapsed();
        }
    }

    /// The completion, releasing text held back for stop sequences through `on_text`
    /// (unless a stop sequence already cut it).
    fn finish(mut self, mut on_text: impl FnMut(&str) -> ControlFlow<()>) -> Completion {
        if !self.stream_stopped {
            let rest = self.stream.finish();
            if !rest.is_empty() {
                if on_text(&rest).is_break() {
                    self.finish = FinishReason::Cancelled;
                } else {
                    self.text_out.push_str(&rest);
                }
            }
        }
        Completion {
            finish_reason: self.finish,
            prompt_tokens: self.prompt_len as u32,
            completion_tokens: self.tokens.len() as u32,
            text: self.text_out,
            commitment: TranscriptCommitment::from_records(&self.transcript),
            tokens: self.tokens,
            transcript: self.transcript,
            timings: self.timings,
        }
    }
}

/// Runs one request alone to its end (the synchronous path: benchmarks, tests, tools).
pub(crate) fn generate_alone(
    model: &mut Model,
    req: &GenerateRequest,
    mut on_text: impl FnMut(&str) -> ControlFlow<()>,
) -> Result<Completion, GenerateError> {
    let mut run = Running::start(model, req)?;
    if !run.done {
        run.admit(model);
    }
    while !run.done {
        let (mut logits, n) = {
            let mut seq = [run.seq_step(usize::MAX)];
            let n = seq[0].tokens.len();
            (model.step(&mut seq)?, n)
        };
        if run.ran(n) {
            run.accept(model, &mut logits, &mut on_text);
        }
    }
    Ok(run.finish(on_text))
}

type Events = mpsc::Sender<Result<GenerateEvent, GenerateError>>;

/// A running request on the engine thread: its generation and its way out.
struct Slot {
    run: Running,
    events: Events,
    stop: Arc<AtomicBool>,
    /// Events the consumer has not taken yet (its channel was full); while any wait, the
    /// sequence sits out the steps, so a slow reader holds back only itself.
    outbox: VecDeque<Result<GenerateEvent, GenerateError>>,
    /// Delivered `Done` or gave up on the consumer.
    closed: bool,
}

impl Slot {
    fn push_text(&mut self, text: &str) {
        if let Some(Ok(GenerateEvent::Delta(last))) = self.outbox.back_mut() {
            last.push_str(text);
        } else {
            self.outbox
                .push_back(Ok(GenerateEvent::Delta(text.to_owned())));
        }
    }

    /// Sends what the channel takes now; a consumer that went away cancels the request.
    fn flush(&mut self) {
        while let Some(ev) = self.outbox.pop_front() {
            match self.events.try_send(ev) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(ev)) => {
                    self.outbox.push_front(ev);
                    return;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    tracing::debug!("request cancelled by its consumer");
                    self.outbox.clear();
                    self.closed = true;
                    return;
                }
            }
        }
        if self.events.is_closed() && !self.closed {
            tracing::debug!("request cancelled by its consumer");
            self.closed = true;
        }
    }

    /// Ends the request with its completion (text held back included), queued for sending.
    fn complete(&mut self) {
        let run = std::mem::replace(&mut self.run, Running::empty());
        let mut rest = String::new();
        let done = run.finish(|t| {
            rest.push_str(t);
            ControlFlow::Continue(())
        });
        if !rest.is_empty() {
            self.push_text(&rest);
        }
        self.outbox
            .push_back(Ok(GenerateEvent::Done(Box::new(done))));
    }

    /// Still holds the place in the batch: generating, or with events to deliver.
    fn live(&self) -> bool {
        !self.closed && (!self.run.done || !self.outbox.is_empty())
    }
}

impl Running {
    /// A finished placeholder (what a slot holds once its completion was taken).
    fn empty() -> Self {
        Self {
            prompt_len: 0,
            history: Vec::new(),
            fed: 0,
            budget: 0,
            ignore_eos: false,
            tokens: Vec::new(),
            transcript: Vec::new(),
            stream: TextStream::default(),
            sampler: Sampler::new(tessera_protocol::SamplingParams::greedy()),
            text_out: String::new(),
            timings: Timings::default(),
            started: None,
            first_token: None,
            finish: FinishReason::Length,
            stream_stopped: false,
            done: true,
            cache: KvCache::default(),
        }
    }
}

/// A request accepted from the queue, waiting for room in the batch.
struct Pending {
    run: Running,
    events: Events,
    stop: Arc<AtomicBool>,
}

/// The engine thread: admits requests from `rx` into the batch, runs steps while any
/// sequence can advance, and blocks on `rx` when none is running.
pub(crate) fn serve(
    mut model: Model,
    mut rx: mpsc::Receiver<Command>,
    cfg: BatchConfig,
    shutdown: Arc<AtomicBool>,
    stats: Arc<EngineStats>,
) {
    // candle's stock models keep one sequence's cache inside them: one at a time, prompts
    // whole.
    let (max_batch, step_tokens) = if model.batches() {
        (cfg.max_batch, cfg.max_step_tokens)
    } else {
        (1, usize::MAX)
    };
    let mut threads = Threads::new(cfg.threads);
    let mut slots: Vec<Slot> = Vec::new();
    let mut waiting: Option<Pending> = None;
    let mut open = true;
    while !shutdown.load(Ordering::Relaxed) {
        // Admission: block only when nothing is running.
        if slots.is_empty() && waiting.is_none() {
            if !open {
                break;
            }
            match rx.blocking_recv() {
                Some(cmd) => waiting = accept(&mut model, cmd, &shutdown),
                None => break,
            }
        }
        while slots.len() < max_batch {
            let pending = match waiting.take() {
                Some(p) => p,
                None if !open => break,
                None => match rx.try_recv() {
                    Ok(cmd) => {
                        // A replay ran on the spot: let the running sequences take a step
                        // before the next command, so audits cannot starve them.
                        let replay = matches!(cmd, Command::Replay { .. });
                        match accept(&mut model, cmd, &shutdown) {
                            Some(p) => p,
                            None if replay || shutdown.load(Ordering::Relaxed) => break,
                            None => continue,
                        }
                    }
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                },
            };
            let held: usize = slots.iter().map(|s| s.run.positions()).sum();
            if !slots.is_empty() && held + pending.run.positions() > cfg.max_positions {
                waiting = Some(pending);
                break;
            }
            let Pending {
                mut run,
                events,
                stop,
            } = pending;
            run.admit(&model);
            let mut slot = Slot {
                run,
                events,
                stop,
                outbox: VecDeque::new(),
                closed: false,
            };
            if slot.run.done {
                slot.complete();
            }
            slots.push(slot);
        }
        if shutdown.load(Ordering::Relaxed) {
            break;
        }
        if let Some(p) = waiting.take() {
            if p.stop.load(Ordering::Relaxed) || p.events.is_closed() {
                let _ = p.events.try_send(Err(GenerateError::Cancelled));
            } else {
                waiting = Some(p);
            }
        }
        for slot in &mut slots {
            slot.flush();
            if !slot.run.done && slot.stop.load(Ordering::Relaxed) {
                if slot.run.started.is_none() {
                    // Stopped before it ran: nothing was delivered.
                    slot.run = Running::empty();
                    slot.outbox.push_back(Err(GenerateError::Cancelled));
                } else {
                    slot.run.cancel();
                    slot.complete();
                }
                slot.flush();
            }
        }
        slots.retain(Slot::live);
        stats.running.store(slots.len(), Ordering::Relaxed);
        if !step(&mut model, &mut slots, step_tokens, &stats, &mut threads) && !slots.is_empty() {
            // Every running sequence waits for its consumer: give them a moment.
            std::thread::sleep(Duration::from_millis(1));
        }
        for slot in &mut slots {
            slot.flush();
        }
        slots.retain(Slot::live);
        stats.running.store(slots.len(), Ordering::Relaxed);
    }
    stats.running.store(0, Ordering::Relaxed);
    // Shutting down: every running request ends as if stopped, with what it delivered;
    // readers get a moment to take their last events; queued requests are told.
    for slot in &mut slots {
        if !slot.run.done {
            slot.run.cancel();
            slot.complete();
        }
    }
    let deadline = Instant::now() + SHUTDOWN_FLUSH;
    loop {
        for slot in &mut slots {
            slot.flush();
        }
        slots.retain(Slot::live);
        if slots.is_empty() || Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    if let Some(p) = waiting {
        let _ = p.events.try_send(Err(GenerateError::EngineGone));
    }
    rx.close();
    while let Ok(cmd) = rx.try_recv() {
        match cmd {
            Command::Generate { events, .. } => {
                let _ = events.try_send(Err(GenerateError::EngineGone));
            }
            Command::Replay { reply, .. } => {
                let _ = reply.send(Err(GenerateError::EngineGone));
            }
            Command::Shutdown => {}
        }
    }
}

/// How long a stopping engine waits for readers to take their last events.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(2);

/// Turns a command into a pending request; replays run at once, on the spot.
fn accept(model: &mut Model, cmd: Command, shutdown: &AtomicBool) -> Option<Pending> {
    match cmd {
        Command::Generate { req, events, stop } => {
            if events.is_closed() {
                return None;
            }
            if stop.load(Ordering::Relaxed) {
                let _ = events.try_send(Err(GenerateError::Cancelled));
                return None;
            }
            match Running::start(model, &req) {
                Ok(run) => Some(Pending { run, events, stop }),
                Err(e) => {
                    let _ = events.try_send(Err(e));
                    None
                }
            }
        }
        Command::Replay { req, reply } => {
            if !reply.is_closed() {
                let r = model.replay(
                    &req.prompt,
                    req.chat_fallback,
                    &req.sampling,
                    &req.claim,
                    REPLAY_CHUNK,
                );
                let _ = reply.send(r);
            }
            None
        }
        Command::Shutdown => {
            shutdown.store(true, Ordering::Relaxed);
            None
        }
    }
}

/// Ends the sequences of a failed step with its error (their caches are no longer whole).
fn fail(slots: &mut [Slot], takes: &[(usize, usize)], msg: String) {
    for &(i, _) in takes {
        let slot = &mut slots[i];
        slot.run = Running::empty();
        slot.outbox
            .push_back(Err(GenerateError::Candle(candle_core::Error::Msg(
                msg.clone(),
            ))));
    }
}

/// Runs one step over every sequence that can advance; returns whether any did.
fn step(
    model: &mut Model,
    slots: &mut [Slot],
    step_tokens: usize,
    stats: &EngineStats,
    threads: &mut Threads,
) -> bool {
    let ready: Vec<usize> = (0..slots.len())
        .filter(|&i| !slots[i].run.done && slots[i].outbox.is_empty())
        .collect();
    if ready.is_empty() {
        return false;
    }
    let decoders = ready.iter().filter(|&&i| slots[i].run.decoding()).count();
    let mut prefill_room = if decoders == 0 {
        step_tokens.max(PREFILL_ALONE)
    } else {
        step_tokens.saturating_sub(decoders).max(1)
    };
    // Decoding sequences take one token each; prompts share what is left, oldest first.
    let mut takes = Vec::with_capacity(ready.len());
    for &i in &ready {
        let run = &slots[i].run;
        let take = if run.decoding() {
            1
        } else {
            let t = (run.prompt_len - run.fed).min(prefill_room);
            prefill_room -= t;
            t
        };
        if take > 0 {
            takes.push((i, take));
        }
    }
    let mut take_of = vec![0usize; slots.len()];
    for &(i, take) in &takes {
        take_of[i] = take;
    }
    // Sequences whose input this step completes get a row of logits, in step order.
    let rows = takes
        .iter()
        .filter(|&&(i, take)| slots[i].run.fed + take == slots[i].run.history.len())
        .count();
    let step_rows: usize = takes.iter().map(|&(_, t)| t).sum();
    stats.step(takes.len(), step_rows);
    let on_one = threads.next_on_one();
    let started = Instant::now();
    let result = {
        let mut seqs: Vec<SeqStep<'_>> = slots
            .iter_mut()
            .zip(&take_of)
            .filter(|(_, &take)| take > 0)
            .map(|(slot, &take)| slot.run.seq_step(take))
            .collect();
        threads.run(on_one, || model.step(&mut seqs))
    };
    threads.record(
        on_one,
        step_rows == takes.len(),
        step_rows,
        started.elapsed(),
    );
    let mut logits = match result {
        Ok(l) if l.len() % rows.max(1) == 0 => l,
        Ok(l) => {
            fail(slots, &takes, format!("{} logits for {rows} rows", l.len()));
            return true;
        }
        Err(e) => {
            tracing::error!(error = %e, "inference step failed");
            fail(slots, &takes, e.to_string());
            return true;
        }
    };
    let width = logits.len() / rows.max(1);
    let mut row = 0;
    for &(i, take) in &takes {
        let slot = &mut slots[i];
        if slot.run.ran(take) {
            let out = &mut logits[row * width..(row + 1) * width];
            row += 1;
            let mut text = String::new();
            slot.run.accept(model, out, |t| {
                text.push_str(t);
                ControlFlow::Continue(())
            });
            if !text.is_empty() {
                slot.push_text(&text);
            }
            if slot.run.done {
                slot.complete();
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds the adaptive policy steps whose time depends on the setting; returns the
    /// setting it ends on.
    fn settle(t: &mut Threads, steps: u32, one_ms: u64, all_ms: u64) -> bool {
        for _ in 0..steps {
            let on_one = t.next_on_one();
            let ms = if on_one { one_ms } else { all_ms };
            t.record(on_one, true, 4, Duration::from_millis(4 * ms));
        }
        t.use_one
    }

    #[test]
    fn the_adaptive_policy_follows_the_faster_setting() {
        let mut t = Threads {
            policy: ThreadPolicy::Adaptive,
            one: rayon::ThreadPoolBuilder::new().num_threads(1).build().ok(),
            use_one: false,
            since_probe: PROBE_EVERY - FIRST_PROBE,
            probing: 0,
            per_row: [[None, None]; 2],
        };
        // Idle: the whole pool is faster, and stays in use.
        assert!(!settle(&mut t, 100, 10, 6));
        // A core is taken: one thread becomes faster; found within a probe period.
        assert!(settle(&mut t, PROBE_EVERY + 2 * PROBE_STEPS, 10, 25));
        // The core comes back: the pool again.
        assert!(!settle(&mut t, PROBE_EVERY + 2 * PROBE_STEPS, 10, 6));
        // Fixed policies never move.
        let mut fixed = Threads::new(ThreadPolicy::All);
        assert!(!settle(&mut fixed, 100, 1, 100));
        assert_eq!("one".parse::<ThreadPolicy>(), Ok(ThreadPolicy::One));
        assert!("two"
            .parse::<ThreadPolicy>()
            .unwrap_err()
            .contains("adaptive"));
    }

    #[test]
    fn limits_are_checked_by_name() {
        assert!(BatchConfig::default().validate().is_ok());
        let bad = BatchConfig {
            max_batch: 0,
            ..BatchConfig::default()
        };
        assert!(bad.validate().unwrap_err().contains("max_batch"));
        let bad = BatchConfig {
            queue: 5000,
            ..BatchConfig::default()
        };
        assert!(bad.validate().unwrap_err().contains("queue"));
    }
}
