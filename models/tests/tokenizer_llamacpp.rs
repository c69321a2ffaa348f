//! Token ids must equal llama.cpp's on the same GGUF: vectors made once with
//! scripts/tokenizer-vectors.mjs (whitespace runs, digits, code, accents, CJK, emoji,
//! contractions, URLs, HTML, special tokens with parsing on and off).

use serde::Deserialize;
use tessera_models::Tokenizer;

#[derive(Deserialize)]
struct Vectors {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    text: String,
    parse_special: bool,
    ids: Vec<u32>,
}

fn tokenizer(alias: &str) -> Tokenizer {
    let path = tessera_models::test_support::model_path(alias);
    let mut f = std::fs::File::open(&path).expect("open model");
    let content = candle_core::quantized::gguf_file::Content::read(&mut f).expect("read GGUF");
    Tokenizer::from_gguf(&content).expect("tokenizer")
}

fn check(alias: &str) {
    let tok = tokenizer(alias);
    let path = format!(
        "{}/tests/vectors/{alias}.tokens.json",
        env!("CARGO_MANIFEST_DIR")
    );
    let v: Vectors =
        serde_json::from_str(&std::fs::read_to_string(path).expect("vectors")).expect("parse");
    let mut failures = Vec::new();
    for c in &v.cases {
        let got = tok.encode(&c.text, false, c.parse_special);
        if got != c.ids {
            failures.push(format!(
                "{:?} (parse_special {}):\n  llama.cpp {:?}\n  ours      {:?}",
                c.text, c.parse_special, c.ids, got
            ));
        }
        // Without special tokens in play, decoding gives the text back.
        let has_special = ["<|", "<start_of_turn>", "<end_of_turn>", "<bos>", "<eos>"]
            .iter()
            .any(|s| c.text.contains(s));
        if !has_special {
            assert_eq!(
                String::from_utf8_lossy(&tok.decode(&got)),
                c.text,
                "{alias}: decode(encode(x)) != x"
            );
        }
    }
    assert!(v.cases.len() >= 80, "vector file too small");
    assert!(
        failures.is_empty(),
        "{alias}: {} of {} cases differ from llama.cpp:\n{}",
        failures.len(),
        v.cases.len(),
        failures.join("\n")
    );
}

#[test]
fn smollm2_token_ids_match_llama_cpp() {
    check("smollm2-135m-instruct");
}

#[test]
fn gemma3_token_ids_match_llama_cpp() {
    check("gemma3-270m");
}
