//! Helpers for tests in this crate and above it: the real catalogue models (fetched once
//! into the user's model cache and reused), and tiny random-weight GGUFs written on the
//! spot so fast tests exercise the real loading, tokenizing and generation code.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::catalog;
use crate::tokenizer::byte_to_char;

static FETCH_LOCK: Mutex<()> = Mutex::new(());

/// Path of a catalogue model, fetching it into the model cache on first use.
///
/// # Panics
/// If the alias is unknown or the fetch fails: a test that needs the model cannot run
/// without it, and must fail rather than pass by skipping its subject.
pub fn model_path(alias: &str) -> PathBuf {
    let entry = catalog::find(alias).unwrap_or_else(|| panic!("unknown catalogue alias {alias}"));
    let home = catalog::tessera_home();
    let _guard = FETCH_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    if entry.is_cached(&home) {
        return entry.cache_path(&home);
    }
    crate::fetch::fetch(entry, &home, &crate::fetch::FetchOptions::default(), |_| {})
        .unwrap_or_else(|e| panic!("fetching {alias} for tests failed: {e}"))
}

/// Shape of a tiny llama-architecture model.
#[derive(Debug, Clone)]
pub struct TinySpec {
    /// `general.architecture`; anything but "llama" makes an unsupported file.
    pub arch: String,
    /// Context length written to the metadata.
    pub context_length: u32,
    /// Seed of the random weights.
    pub seed: u64,
    /// Whether to store a ChatML chat template.
    pub chat_template: bool,
    /// Metadata written over (or added to) the generated keys, for malformed-file tests.
    pub metadata: Vec<(String, gguf_file::Value)>,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            arch: "llama".into(),
            context_length: 64,
            seed: 1,
            chat_template: true,
            metadata: Vec::new(),
        }
    }
}

/// The tiny vocabulary: 256 byte tokens (GPT-2 byte-to-unicode mapping), a few merges,
/// then three control tokens.
pub const TINY_SPECIAL: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
const TINY_MERGES: [(&str, &str); 6] = [
    ("h", "e"),
    ("l", "l"),
    ("he", "ll"),
    ("hell", "o"),
    ("Ġ", "w"),
    ("Ġw", "o"),
];

/// Writes a tiny, valid llama GGUF with random Q4_1 weights to `path`.
pub fn write_tiny_gguf(path: &Path, spec: &TinySpec) -> candle_core::Result<()> {
    let (dim, ffn, heads, kv_heads, layers) = (64usize, 128usize, 4u32, 2u32, 2u32);
    let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_to_char(b).to_string()).collect();
    for (a, b) in TINY_MERGES {
        tokens.push(format!("{a}{b}"));
    }
    let first_special = tokens.len() as u32;
    tokens.extend(TINY_SPECIAL.iter().map(|s| s.to_string()));
    let vocab = tokens.len();
    let types: Vec<gguf_file::Value> = (0..vocab)
        .map(|i| gguf_file::Value::I32(if i as u32 >= first_special { 3 } else { 1 }))
        .collect();

    let dev = Device::Cpu;
    let mut state = spec.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut rand = |rows: usize, cols: usize, scale: f32| -> candle_core::Result<Tensor> {
        let data: Vec<f32> = (0..rows * cols)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * scale
            })
            .collect();
        Tensor::from_vec(data, (rows, cols), &dev)
    };
    let q = |t: Tensor, dt: GgmlDType| QTensor::quantize(&t, dt);
    let ones = |n: usize| {
        QTensor::quantize(
            &Tensor::ones(n, candle_core::DType::F32, &dev)?,
            GgmlDType::F32,
        )
    };
    let head_dim = dim / heads as usize;
    let mut tensors: Vec<(String, QTensor)> = vec![
        (
            "token_embd.weight".into(),
            q(rand(vocab, dim, 2.0)?, GgmlDType::Q8_0)?,
        ),
        ("output_norm.weight".into(), ones(dim)?),
        (
            "output.weight".into(),
            q(rand(vocab, dim, 0.5)?, GgmlDType::Q8_0)?,
        ),
    ];
    for l in 0..layers {
        let p = |n: &str| format!("blk.{l}.{n}.weight");
        tensors.push((p("attn_norm"), ones(dim)?));
        tensors.push((p("ffn_norm"), ones(dim)?));
        tensors.push((p("attn_q"), q(rand(dim, dim, 0.5)?, GgmlDType::Q4_1)?));
        tensors.push((
            p("attn_k"),
            q(
                rand(kv_heads as usize * head_dim, dim, 0.5)?,
                GgmlDType::Q4_1,
            )?,
        ));
        tensors.push((
            p("attn_v"),
            q(
                rand(kv_heads as usize * head_dim, dim, 0.5)?,
                GgmlDType::Q4_1,
            )?,
        ));
        tensors.push((p("attn_output"), q(rand(dim, dim, 0.5)?, GgmlDType::Q4_1)?));
        tensors.push((p("ffn_gate"), q(rand(ffn, dim, 0.5)?, GgmlDType::Q4_1)?));
        tensors.push((p("ffn_up"), q(rand(ffn, dim, 0.5)?, GgmlDType::Q4_1)?));
        tensors.push((p("ffn_down"), q(rand(dim, ffn, 0.5)?, GgmlDType::Q4_1)?));
    }

    use gguf_file::Value as V;
    let a = spec.arch.as_str();
    let mut md: Vec<(String, V)> = vec![
        ("general.architecture".into(), V::String(spec.arch.clone())),
        ("general.name".into(), V::String("tessera-tiny".into())),
        ("general.file_type".into(), V::U32(3)),
        (format!("{a}.block_count"), V::U32(layers)),
        (format!("{a}.context_length"), V::U32(spec.context_length)),
        (format!("{a}.embedding_length"), V::U32(dim as u32)),
        (format!("{a}.feed_forward_length"), V::U32(ffn as u32)),
        (format!("{a}.attention.head_count"), V::U32(heads)),
        (format!("{a}.attention.head_count_kv"), V::U32(kv_heads)),
        (format!("{a}.rope.dimension_count"), V::U32(head_dim as u32)),
        (format!("{a}.rope.freq_base"), V::F32(10000.0)),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            V::F32(1e-5),
        ),
        ("tokenizer.ggml.model".into(), V::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), V::String("smollm".into())),
        (
            "tokenizer.ggml.tokens".into(),
            V::Array(tokens.into_iter().map(V::String).collect()),
        ),
        ("tokenizer.ggml.token_type".into(), V::Array(types)),
        (
            "tokenizer.ggml.merges".into(),
            V::Array(
                TINY_MERGES
                    .iter()
                    .map(|(a, b)| V::String(format!("{a} {b}")))
                    .collect(),
            ),
        ),
        (
            "tokenizer.ggml.bos_token_id".into(),
            V::U32(first_special + 1),
        ),
        ("tokenizer.ggml.eos_token_id".into(), V::U32(first_special)),
        ("tokenizer.ggml.add_bos_token".into(), V::Bool(false)),
    ];
    if spec.chat_template {
        md.push((
            "tokenizer.chat_template".into(),
            V::String("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}".into()),
        ));
    }
    for (key, value) in &spec.metadata {
        md.retain(|(k, _)| k != key);
        md.push((key.clone(), value.clone()));
    }
    let md_refs: Vec<(&str, &V)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let t_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    gguf_file::write(&mut f, &md_refs, &t_refs)?;
    use std::io::Write;
    f.flush()?;
    Ok(())
}

/// Reads an engine's event stream to its end: the deltas joined, and the completion
/// (panics on an engine error, as the tests want).
pub async fn collect(mut events: crate::EventStream) -> (String, crate::Completion) {
    let mut text = String::new();
    loop {
        match events.recv().await.expect("stream ends with Done") {
            Ok(crate::GenerateEvent::Delta(t)) => text.push_str(&t),
            Ok(crate::GenerateEvent::Done(done)) => return (text, *done),
            Err(e) => panic!("engine error: {e}"),
        }
    }
}
