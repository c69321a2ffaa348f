//! Engine behaviour on a tiny random-weight llama GGUF that the test writes itself: the real
//! loader, tokenizer, template, sampler and commitment code, in milliseconds.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use tessera_models::test_support::{write_tiny_gguf, TinySpec};
use tessera_models::{
    ChatMessage, Engine, GenerateError, GenerateEvent, GenerateRequest, LoadError, Model, Prompt,
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
    let engine = Engine::spawn(model(dir.path()), 4).expect("spawn");
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
