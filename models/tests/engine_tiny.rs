//! Engine behaviour on a tiny random-weight llama GGUF that the test writes itself: the real
//! loader, tokenizer, template, sampler and commitment code, in milliseconds.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::Value;

use tessera_models::test_support::{collect, write_tiny_gguf, TinySpec};
use tessera_models::{
    BatchConfig, ChatMessage, Engine, EventStream, GenerateError, GenerateEvent, GenerateRequest,
    LoadError, Model, Prompt,
};
use tessera_protocol::{FinishReason, SamplingParams, TranscriptCommitment};

fn tiny(dir: &Path, spec: TinySpec) -> PathBuf {
    let path = dir.join(format!("tiny-{}-{}.gguf", spec.arch, spec.seed));
    write_tiny_gguf(&path, &spec).expect("write tiny gguf");
    path
}

fn model(dir: &Path) -> Model {
    Model::load(&tiny(dir, TinySpec::default()), "tiny").expect("load tiny model")
}

fn run(m: &mut Model, req: &GenerateRequest) -> (String, tessera_models::Completion) {
    let mut streamed = String::new();
    let done = m
        .generate(req, |t| {
            streamed.push_str(t);
            ControlFlow::Continue(())
        })
        .expect("generate");
    (streamed, done)
}

fn sampled(seed: u64, temperature: f32) -> GenerateRequest {
    let mut req = GenerateRequest::new(Prompt::Text("hello world".into()), 20);
    req.sampling = SamplingParams {
        temperature,
        seed,
        ..SamplingParams::default()
    };
    req.ignore_eos = true;
    req
}

#[test]
fn same_seed_gives_same_tokens_and_commitment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut m = model(dir.path());
    let (t1, a) = run(&mut m, &sampled(42, 1.0));
    let (t2, b) = run(&mut m, &sampled(42, 1.0));
    assert_eq!(a.tokens, b.tokens);
    assert_eq!(a.commitment, b.commitment);
    assert_eq!(t1, t2);
    // A fresh load of the same file reproduces it too.
    let mut m2 = model(dir.path());
    assert_eq!(run(&mut m2, &sampled(42, 1.0)).1.commitment, a.commitment);
}

#[test]
fn different_seeds_at_temperature_one_differ() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut m = model(dir.path());
    let a = run(&mut m, &sampled(1, 1.0)).1;
    let b = run(&mut m, &sampled(2, 1.0)).1;
    assert_ne!(a.tokens, b.tokens);
    assert_ne!(a.commitment, b.commitment);
}

#[test]
fn transcript_records_every_position_and_matches_the_commitment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut m = model(dir.path());
    let (text, done) = run(&mut m, &sampled(3, 0.8));
    assert_eq!(done.finish_reason, FinishReason::Length);
    assert_eq!(done.completion_tokens, 20);
    assert_eq!(done.transcript.len(), 20);
    assert_eq!(text, done.text);
    for (i, r) in done.transcript.iter().enumerate() {
        assert_eq!(r.position as usize, done.prompt_tokens as usize + i);
        assert_eq!(r.token, done.tokens[i]);
    }
    assert_eq!(
        done.commitment,
        TranscriptCommitment::from_records(&done.transcript)
    );
    let proof = TranscriptCommitment::prove(&done.transcript, 7).expect("in range");
    assert!(proof.verify(&done.transcript[7], &done.commitment));
}

#[test]
fn greedy_fingerprint_top1_is_the_chosen_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut m = model(dir.path());
    let (_, done) = run(&mut m, &sampled(0, 0.0));
    for r in &done.transcript {
        assert_eq!(r.fingerprint.ids[0], r.token);
    }
}

#[test]
fn stop_sequence_cuts_the_text_and_finishes_with_stop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut m = model(dir.path());
    let (full, _) = run(&mut m, &sampled(5, 1.0));
    // Pick a stop string that occurs in the middle of the unconstrained answer.
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() >= 6, "answer too short to test stops: {full:?}");
    let stop: String = chars[3..5].iter().collect();
    let first = full.find(&stop).expect("stop occurs");
    let mut req = sampled(5, 1.0);
    req.stop = vec![stop.clone()];
    let (text, done) = run(&mut m, &req);
    assert_eq!(done.finish_reason, FinishReason::Stop);
    assert_eq!(text, full[..first], "stop {stop:?}");
    assert!(!text.contains(&stop));
}

#[test]
fn prompt_longer_than_context_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut m = model(dir.path());
    let req = GenerateRequest::new(Prompt::Text("x ".repeat(200)), 4);
    let err = m
        .generate(&req, |_| ControlFlow::Continue(()))
        .expect_err("too long");
    assert!(
        matches!(err, GenerateError::PromptTooLong { context: 64, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("context is 64 tokens"), "{err}");
    // max_tokens beyond the context is clipped, not an error.
    let mut req = GenerateRequest::new(Prompt::Text("hello".into()), 1000);
    req.ignore_eos = true;
    let (_, done) = run(&mut m, &req);
    assert_eq!(done.finish_reason, FinishReason::Length);
    assert_eq!(done.prompt_tokens + done.completion_tokens, 64);
}

#[test]
fn bad_requests_are_rejected_before_running() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut m = model(dir.path());
    let empty = GenerateRequest::new(Prompt::Text(String::new()), 4);
    assert!(matches!(
        m.generate(&empty, |_| ControlFlow::Continue(())),
        Err(GenerateError::EmptyPrompt)
    ));
    let bad_tok = GenerateRequest::new(Prompt::Tokens(vec![1, 99_999]), 4);
    assert!(matches!(
        m.generate(&bad_tok, |_| ControlFlow::Continue(())),
        Err(GenerateError::BadToken(99_999, _))
    ));
    let mut bad_temp = sampled(0, 0.0);
    bad_temp.sampling.temperature = -1.0;
    assert!(matches!(
        m.generate(&bad_temp, |_| ControlFlow::Continue(())),
        Err(GenerateError::Sampling(_))
    ));
    let mut many_stops = sampled(0, 0.0);
    many_stops.stop = vec!["a".into(); tessera_models::MAX_STOP_SEQUENCES + 1];
    let mut long_stop = sampled(0, 0.0);
    long_stop.stop = vec!["x".repeat(tessera_models::MAX_STOP_BYTES + 1)];
    for req in [many_stops, long_stop] {
        let err = m
            .generate(&req, |_| ControlFlow::Continue(()))
            .expect_err("refused");
        assert!(matches!(err, GenerateError::BadStop { .. }), "{err}");
        assert!(
            err.to_string().starts_with("stop sequences: at most 4"),
            "{err}"
        );
    }
}

#[test]
fn chat_uses_the_gguf_template_and_base_models_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = model(dir.path());
    let chat = Prompt::Chat(vec![ChatMessage::user("hello")]);
    let ids = m.tokenize_prompt(&chat, false).expect("renders");
    let expected = m.tokenizer().encode(
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
        false,
        true,
    );
    assert_eq!(ids, expected);
    let im_start = m
        .tokenizer()
        .token_id("<|im_start|>")
        .expect("special token");
    assert_eq!(
        ids[0], im_start,
        "special tokens are parsed, not spelled out"
    );

    let mut base = Model::load(
        &tiny(
            dir.path(),
            TinySpec {
                chat_template: false,
                seed: 9,
                ..TinySpec::default()
            },
        ),
        "tiny-base",
    )
    .expect("load");
    let err = base
        .generate(
            &GenerateRequest::new(chat, 4),
            |_| ControlFlow::Continue(()),
        )
        .expect_err("no template");
    assert!(err.to_string().contains("no chat template"), "{err}");
}

#[test]
fn cancelling_by_returning_break_stops_generation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut m = model(dir.path());
    let mut calls = 0;
    let err = m
        .generate(&sampled(1, 1.0), |_| {
            calls += 1;
            ControlFlow::Break(())
        })
        .expect_err("cancelled");
    assert!(matches!(err, GenerateError::Cancelled));
    assert_eq!(calls, 1);
}

#[test]
fn generate_until_keeps_what_was_delivered_when_cancelled() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut m = model(dir.path());
    let full = m
        .generate(&sampled(3, 1.0), |_| ControlFlow::Continue(()))
        .expect("full run");
    let mut delivered = String::new();
    let mut calls = 0;
    let part = m
        .generate_until(&sampled(3, 1.0), |t| {
            calls += 1;
            if calls > 5 {
                return ControlFlow::Break(());
            }
            delivered.push_str(t);
            ControlFlow::Continue(())
        })
        .expect("cancelled, not failed");
    assert_eq!(part.finish_reason, FinishReason::Cancelled);
    assert_eq!(part.text, delivered);
    // The refused token is not counted; every accepted one is, and they are the same
    // tokens (and transcript records) the uncancelled run produced.
    assert!(part.completion_tokens >= 5 && part.completion_tokens < full.completion_tokens);
    let n = part.tokens.len();
    assert_eq!(part.tokens, full.tokens[..n]);
    assert_eq!(part.transcript, full.transcript[..n]);
    assert_eq!(
        part.commitment,
        TranscriptCommitment::from_records(&full.transcript[..n])
    );
}

#[tokio::test]
async fn stopping_a_stream_ends_it_with_a_cancelled_done() {
    let dir = tempfile::tempdir().expect("tempdir");
    // One place in the batch, so the second request below waits in the queue.
    let cfg = BatchConfig {
        max_batch: 1,
        queue: 4,
        ..BatchConfig::default()
    };
    let engine = Engine::spawn(model(dir.path()), cfg).expect("spawn");
    let handle = engine.handle();
    let mut events = handle.generate(sampled(11, 1.0)).await.expect("queued");
    let mut deltas = 0;
    let done = loop {
        match events.recv().await.expect("stream ends with Done") {
            Ok(GenerateEvent::Delta(_)) => {
                deltas += 1;
                if deltas == 3 {
                    events.stop();
                }
            }
            Ok(GenerateEvent::Done(done)) => break done,
            Err(e) => panic!("engine error: {e}"),
        }
    };
    assert_eq!(done.finish_reason, FinishReason::Cancelled);
    assert!(done.completion_tokens >= 3 && done.completion_tokens < 20);
    // A stream stopped before the engine took it ends with Err(Cancelled).
    let blocker = handle.generate(sampled(12, 1.0)).await.expect("queued");
    let waiting = handle.generate(sampled(13, 1.0)).await.expect("queued");
    waiting.stop();
    let mut waiting = waiting;
    drop(blocker);
    assert!(matches!(
        waiting.recv().await,
        Some(Err(GenerateError::Cancelled))
    ));
    engine.shutdown();
}

fn load_err(path: &Path) -> String {
    let err = Model::load(path, "x").expect_err("must fail");
    let msg = err.to_string();
    assert_eq!(msg.lines().count(), 1, "one line: {msg}");
    msg
}

#[test]
fn bad_model_files_give_one_clear_line() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = tiny(dir.path(), TinySpec::default());
    let bytes = std::fs::read(&good).expect("read");

    let missing = load_err(&dir.path().join("nope.gguf"));
    assert!(
        missing.contains("cannot open model file") && missing.contains("nope.gguf"),
        "{missing}"
    );

    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() - 1000]).expect("write");
    let msg = load_err(&truncated);
    assert!(msg.contains("is truncated"), "{msg}");

    let garbage = dir.path().join("garbage.gguf");
    std::fs::write(&garbage, b"this is not a model at all").expect("write");
    let msg = load_err(&garbage);
    assert!(msg.contains("not a valid GGUF"), "{msg}");

    let header_cut = dir.path().join("header.gguf");
    std::fs::write(&header_cut, &bytes[..100]).expect("write");
    let msg = load_err(&header_cut);
    assert!(msg.contains("not a valid GGUF"), "{msg}");

    let other = tiny(
        dir.path(),
        TinySpec {
            arch: "mamba".into(),
            ..TinySpec::default()
        },
    );
    let msg = load_err(&other);
    assert!(
        msg.contains("unsupported model architecture \"mamba\""),
        "{msg}"
    );
}

#[test]
fn names_resolve_to_aliases_or_paths_with_clear_errors() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = tessera_models::load("smolm2", dir.path()).expect_err("unknown");
    assert!(matches!(err, LoadError::UnknownModel(_)));
    assert!(
        err.to_string().contains("unknown model \"smolm2\"")
            && err.to_string().contains("smollm2-135m-instruct"),
        "{err}"
    );
    let err = tessera_models::load("gemma3-270m", dir.path()).expect_err("not fetched");
    assert!(
        err.to_string().contains("tessera models fetch gemma3-270m"),
        "{err}"
    );
    let path = tiny(dir.path(), TinySpec::default());
    let m = tessera_models::load(path.to_str().expect("utf-8 path"), dir.path())
        .expect("path works as a name");
    assert!(m
        .module_id()
        .to_string()
        .starts_with("llama/q4_1/ctx64/b3-"));
}

#[test]
fn corrupt_cached_catalogue_file_is_reported() {
    let home = tempfile::tempdir().expect("tempdir");
    let entry = tessera_models::catalog::find("smollm2-135m-instruct").expect("alias");
    let path = entry.cache_path(home.path());
    std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
    write_tiny_gguf(&path, &TinySpec::default()).expect("write");
    let err = tessera_models::load(entry.alias, home.path()).expect_err("corrupt");
    assert!(
        err.to_string().contains("is corrupt") && err.to_string().contains("--force"),
        "{err}"
    );
}

#[tokio::test]
async fn engine_streams_events_and_dropping_the_stream_cancels() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::spawn(
        model(dir.path()),
        BatchConfig {
            queue: 4,
            ..BatchConfig::default()
        },
    )
    .expect("spawn");
    let handle = engine.handle();
    let mut events = handle.generate(sampled(11, 1.0)).await.expect("queued");
    let mut text = String::new();
    let done = loop {
        match events.recv().await.expect("stream ends with Done") {
            Ok(GenerateEvent::Delta(t)) => text.push_str(&t),
            Ok(GenerateEvent::Done(done)) => break done,
            Err(e) => panic!("engine error: {e}"),
        }
    };
    assert_eq!(done.text, text);
    assert_eq!(done.completion_tokens, 20);

    // A dropped stream frees the engine: the next request still completes.
    drop(handle.generate(sampled(12, 1.0)).await.expect("queued"));
    let mut events = handle.generate(sampled(13, 1.0)).await.expect("queued");
    let mut finished = false;
    while let Some(ev) = events.recv().await {
        if let Ok(GenerateEvent::Done(_)) = ev {
            finished = true;
        }
    }
    assert!(finished);
    // Errors arrive as the last event.
    let mut events = handle
        .generate(GenerateRequest::new(Prompt::Text(String::new()), 1))
        .await
        .expect("queued");
    assert!(matches!(
        events.recv().await,
        Some(Err(GenerateError::EmptyPrompt))
    ));
    engine.shutdown();
    assert!(matches!(
        handle.generate(sampled(1, 1.0)).await,
        Err(GenerateError::EngineGone)
    ));
}

fn tiny_with(dir: &Path, name: &str, metadata: Vec<(&str, Value)>) -> PathBuf {
    let path = dir.join(format!("{name}.gguf"));
    let spec = TinySpec {
        metadata: metadata
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
        ..TinySpec::default()
    };
    write_tiny_gguf(&path, &spec).expect("write tiny gguf");
    path
}

#[test]
fn hyperparameters_that_contradict_the_tensors_are_refused_at_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    type Case = (&'static str, Vec<(&'static str, Value)>, &'static str);
    let cases: [Case; 6] = [
        (
            "no-heads",
            vec![("llama.attention.head_count", Value::U32(0))],
            "unsupported llama shape",
        ),
        (
            "wide",
            vec![
                ("llama.embedding_length", Value::U32(128)),
                ("llama.rope.dimension_count", Value::U32(32)),
            ],
            "expected F32 [128]",
        ),
        (
            "ffn",
            vec![("llama.feed_forward_length", Value::U32(96))],
            "expected a [96, 64] matrix",
        ),
        (
            "kv-heads",
            vec![("llama.attention.head_count_kv", Value::U32(4))],
            "expected a [64, 64] matrix",
        ),
        (
            "scaled",
            vec![
                ("llama.rope.scaling.type", Value::String("linear".into())),
                ("llama.rope.scaling.factor", Value::F32(8.0)),
            ],
            "rope scaling (linear, factor 8) is not supported",
        ),
        (
            "mistyped",
            vec![("llama.block_count", Value::String("two".into()))],
            "llama.block_count is not an unsigned 32-bit integer",
        ),
    ];
    for (name, metadata, want) in cases {
        let msg = load_err(&tiny_with(dir.path(), name, metadata));
        assert!(msg.contains(want), "{name}: {msg}");
    }
}

#[test]
fn zero_alignment_is_an_error_not_a_crash() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The writer lays data out at its own alignment; write a marker value, then patch it to 0.
    let path = tiny_with(
        dir.path(),
        "align",
        vec![("general.alignment", Value::U32(0x5A5A_5A5A))],
    );
    let mut bytes = std::fs::read(&path).expect("read");
    let at = bytes
        .windows(4)
        .position(|w| w == [0x5A; 4])
        .expect("marker");
    bytes[at..at + 4].fill(0);
    std::fs::write(&path, &bytes).expect("write");
    let msg = load_err(&path);
    assert!(msg.contains("not a valid GGUF"), "{msg}");
}

#[test]
fn a_huge_declared_context_costs_nothing_until_used() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = tiny_with(
        dir.path(),
        "long",
        vec![("llama.context_length", Value::U32(u32::MAX))],
    );
    let mut m = Model::load(&path, "long").expect("loads without building 4G positions");
    assert_eq!(m.context_length(), u32::MAX);
    let (_, done) = run(&mut m, &sampled(3, 0.0));
    assert_eq!(done.completion_tokens, 20);
}

#[test]
fn corrupting_any_header_byte_never_panics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = tiny(dir.path(), TinySpec::default());
    let bytes = std::fs::read(&good).expect("read");
    let header =
        candle_core::quantized::gguf_file::Content::read(&mut std::io::Cursor::new(&bytes[..]))
            .expect("parses")
            .tensor_data_offset as usize;
    let path = dir.path().join("fuzzed.gguf");
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let (mut loaded, mut refused) = (0, 0);
    for _ in 0..400 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let mut b = bytes.clone();
        let at = (state % header as u64) as usize;
        b[at] = (state >> 32) as u8;
        std::fs::write(&path, &b).expect("write");
        // Loading either works or fails with one line; whatever loads can also run.
        match Model::load(&path, "fuzzed") {
            Ok(mut m) => {
                loaded += 1;
                let req = GenerateRequest::new(Prompt::Tokens(vec![1, 2, 3]), 2);
                let _ = m.generate(&req, |_| ControlFlow::Continue(()));
            }
            Err(e) => {
                refused += 1;
                assert_eq!(e.to_string().lines().count(), 1, "{e}");
            }
        }
    }
    assert!(
        loaded > 0 && refused > 0,
        "{loaded} loaded, {refused} refused"
    );
}

fn claim(done: &tessera_models::Completion) -> tessera_protocol::ReplayClaim {
    tessera_protocol::ReplayClaim {
        commitment: done.commitment,
        records: done.transcript.clone(),
        tolerance: tessera_protocol::audit::DEFAULT_TOLERANCE,
    }
}

#[test]
fn an_honest_transcript_replays_exactly_in_any_chunking() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut m = model(dir.path());
    for temperature in [0.0, 0.9] {
        let mut req = sampled(11, temperature);
        req.sampling.repetition_penalty = 1.2;
        req.ignore_eos = true;
        let (_, done) = run(&mut m, &req);
        assert!(done.transcript.len() > 5);
        for chunk in [1, 3, 7, 512] {
            let replayed = m
                .replay(&req.prompt, false, &req.sampling, &claim(&done), chunk)
                .expect("replay");
            // The auditor's own transcript is the node's, record for record.
            assert_eq!(replayed.records, done.transcript);
            let v = replayed.verdict;
            assert!(v.passed, "t={temperature} chunk={chunk}: {}", v.summary());
            assert_eq!(v.positions, done.transcript.len() as u32);
            assert_eq!(v.max_distance, 0.0, "t={temperature} chunk={chunk}");
            assert_eq!(v.commitment, done.commitment);
        }
    }
}

#[test]
fn replay_catches_other_weights_edited_records_and_a_wrong_prompt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut honest = model(dir.path());
    let other_path = tiny(
        dir.path(),
        TinySpec {
            seed: 2,
            ..TinySpec::default()
        },
    );
    let mut other = Model::load(&other_path, "other").expect("load");
    let mut req = sampled(5, 0.0);
    req.ignore_eos = true;
    // Generated by other weights, judged by the honest model.
    let (_, cheat) = run(&mut other, &req);
    let v = honest
        .replay(&req.prompt, false, &req.sampling, &claim(&cheat), 64)
        .expect("replay")
        .verdict;
    assert!(!v.passed, "{}", v.summary());
    assert_eq!(v.first_failure.map(|f| f.index), Some(0));
    assert!(v.max_distance > 0.5, "{}", v.summary());

    // One token changed (and recommitted) fails at that record.
    let (_, done) = run(&mut honest, &req);
    let mut c = claim(&done);
    c.records[3].token = (c.records[3].token + 1) % 200;
    c.commitment = TranscriptCommitment::from_records(&c.records);
    let v = honest
        .replay(&req.prompt, false, &req.sampling, &c, 64)
        .expect("replay")
        .verdict;
    assert_eq!(v.first_failure.map(|f| f.index), Some(3), "{}", v.summary());

    // Records that do not hash to the receipt's commitment fail as such.
    let mut c = claim(&done);
    c.commitment = TranscriptCommitment([1; 32]);
    let v = honest
        .replay(&req.prompt, false, &req.sampling, &c, 64)
        .expect("replay")
        .verdict;
    assert_eq!(
        v.first_failure.map(|f| f.kind),
        Some(tessera_protocol::FailureKind::Commitment)
    );

    // Another prompt shifts every position.
    let v = honest
        .replay(
            &Prompt::Text("a different and longer prompt".into()),
            false,
            &req.sampling,
            &claim(&done),
            64,
        )
        .expect("replay")
        .verdict;
    assert_eq!(
        v.first_failure.map(|f| f.kind),
        Some(tessera_protocol::FailureKind::Position)
    );
}

/// Requests of different prompt lengths, samplers and lengths.
fn mixed_requests() -> Vec<GenerateRequest> {
    (0..6u64)
        .map(|k| {
            let prompt = "the quick brown fox jumps over the lazy dog ".repeat(1 + k as usize);
            let mut req = GenerateRequest::new(Prompt::Text(prompt), 12 + 5 * k as u32);
            req.sampling = SamplingParams {
                temperature: if k % 2 == 0 { 0.0 } else { 0.9 },
                top_p: 0.95,
                seed: 100 + k,
                ..SamplingParams::default()
            };
            req.ignore_eos = true;
            req
        })
        .collect()
}

#[tokio::test]
async fn a_request_gives_the_same_tokens_alone_and_inside_a_busy_batch() {
    let dir = tempfile::tempdir().expect("tempdir");
    let reqs = mixed_requests();
    let wide = || {
        let spec = TinySpec {
            context_length: 512,
            ..TinySpec::default()
        };
        Model::load(&tiny(dir.path(), spec), "tiny").expect("load tiny model")
    };
    let mut alone = wide();
    let want: Vec<_> = reqs.iter().map(|r| run(&mut alone, r)).collect();
    // Small steps: long prompts are prefilled in chunks beside sequences that decode.
    let cfg = BatchConfig {
        max_batch: 4,
        max_step_tokens: 8,
        queue: 8,
        ..BatchConfig::default()
    };
    let engine = Engine::spawn(wide(), cfg).expect("spawn");
    let handle = engine.handle();
    let mut streams = Vec::new();
    for r in &reqs {
        streams.push(handle.generate(r.clone()).await.expect("queued"));
    }
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|s| tokio::spawn(collect(s)))
        .collect();
    let mut got = Vec::new();
    for t in tasks {
        got.push(t.await.expect("reader"));
    }
    for (k, ((text, done), (want_text, want_done))) in got.iter().zip(&want).enumerate() {
        assert_eq!(done.tokens, want_done.tokens, "request {k}");
        assert_eq!(done.commitment, want_done.commitment, "request {k}");
        assert_eq!(text, want_text, "request {k}");
        assert_eq!(done.prompt_tokens, want_done.prompt_tokens);
    }
    let stats = handle.stats();
    assert_eq!(stats.peak_batch, 4, "{stats:?}");
    assert!(
        stats.sequences > stats.steps,
        "steps ran several sequences: {stats:?}"
    );
    let total: u64 = want
        .iter()
        .map(|(_, d)| u64::from(d.prompt_tokens + d.completion_tokens - 1))
        .sum();
    assert_eq!(
        stats.rows, total,
        "every prompt token and every fed-back token runs once"
    );
    engine.shutdown();
}

/// An engine with one place (and a queue of 4), taken by a request of 100,000 tokens that
/// has started streaming.
async fn one_slot_taken_by_a_long_request(dir: &Path) -> (Engine, EventStream) {
    let cfg = BatchConfig {
        max_batch: 1,
        queue: 4,
        ..BatchConfig::default()
    };
    let engine = Engine::spawn(model(dir), cfg).expect("spawn");
    let mut long = GenerateRequest::new(Prompt::Text("hello".into()), 100_000);
    long.ignore_eos = true;
    let mut events = engine.handle().generate(long).await.expect("queued");
    assert!(matches!(
        events.recv().await,
        Some(Ok(GenerateEvent::Delta(_)))
    ));
    (engine, events)
}

#[tokio::test]
async fn a_cancelled_request_frees_its_place_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (engine, events) = one_slot_taken_by_a_long_request(dir.path()).await;
    let handle = engine.handle();
    drop(events);
    let (_, done) = collect(handle.generate(sampled(5, 1.0)).await.expect("queued")).await;
    assert_eq!(done.completion_tokens, 20);
    // The long request stopped when its reader left: it did not run to its end first.
    assert!(
        handle.tokens_generated() < 2_000,
        "{}",
        handle.tokens_generated()
    );
    engine.shutdown();
}

#[tokio::test]
async fn a_slow_reader_holds_back_only_its_own_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::spawn(model(dir.path()), BatchConfig::default()).expect("spawn");
    let handle = engine.handle();
    let mut big = GenerateRequest::new(Prompt::Text("hello".into()), 400);
    big.ignore_eos = true;
    let mut alone = model(dir.path());
    let (want_text, want) = run(&mut alone, &big);
    // Nobody reads this one for now: its deltas fill the channel and it sits out steps.
    let slow = handle.generate(big).await.expect("queued");
    let (_, quick) = collect(handle.generate(sampled(6, 1.0)).await.expect("queued")).await;
    assert_eq!(quick.completion_tokens, 20);
    assert!(
        handle.tokens_generated() < 400,
        "the unread request waits for its reader: {}",
        handle.tokens_generated()
    );
    let (text, done) = collect(slow).await;
    assert_eq!(done.tokens, want.tokens);
    assert_eq!(text, want_text);
    engine.shutdown();
}

#[tokio::test]
async fn shutdown_ends_running_requests_as_stopped_and_tells_queued_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (engine, mut running) = one_slot_taken_by_a_long_request(dir.path()).await;
    let handle = engine.handle();
    let mut queued = handle.generate(sampled(8, 1.0)).await.expect("queued");
    let stopper = tokio::task::spawn_blocking(move || engine.shutdown());
    let done = loop {
        match running.recv().await.expect("a last event") {
            Ok(GenerateEvent::Delta(_)) => {}
            Ok(GenerateEvent::Done(done)) => break done,
            Err(e) => panic!("running request failed: {e}"),
        }
    };
    assert_eq!(done.finish_reason, FinishReason::Cancelled);
    assert!(matches!(
        queued.recv().await,
        Some(Err(GenerateError::EngineGone))
    ));
    stopper.await.expect("shutdown");
}
