//! Tokenizers rebuilt from GGUF metadata alone (no tokenizer.json), reproducing llama.cpp's
//! `src/llama-vocab.cpp` and `src/unicode.cpp` so that token ids match llama.cpp's exactly
//! (`tests/tokenizer_llamacpp.rs` checks them against ids llama.cpp produced):
//!
//! - token attributes come from `tokenizer.ggml.token_type`, with llama.cpp's fix-ups by
//!   token text (end-of-generation and fill-in-the-middle markers become control tokens,
//!   its gpt-oss and Gemma workarounds, phi-3's rstrip and jina's lstrip);
//! - special tokens (control, user-defined, unknown; longest text first) are split out of the
//!   text before anything else, control and unknown ones only when `parse_special`;
//! - `gpt2` vocabularies: llama.cpp's hand-written GPT-2 pre-tokenizer (the SmolLM/StarCoder
//!   family first splits off every digit), with its Unicode 15.1 letter/number classes, bytes
//!   mapped to GPT-2's printable characters, then byte-level BPE applying the lowest-ranked
//!   merge first (leftmost on ties);
//! - `llama` vocabularies (SentencePiece, e.g. Gemma): spaces escaped to `▁`, UTF-8
//!   characters merged pairwise by highest token score (leftmost on ties), characters without
//!   a token falling back to `<0xXX>` byte tokens.

use std::collections::{BinaryHeap, HashMap};
use std::sync::OnceLock;

use candle_core::quantized::gguf_file::{Content, Value};

/// Why a tokenizer could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenizerError {
    /// A metadata key the tokenizer needs is absent.
    #[error("GGUF has no {0} (tokenizer metadata)")]
    MissingKey(&'static str),
    /// A metadata value has the wrong type or shape.
    #[error("bad tokenizer metadata: {0}")]
    BadMetadata(String),
    /// A tokenizer model or pre-tokenizer we do not implement.
    #[error("unsupported tokenizer: {0}")]
    Unsupported(String),
}

/// Which algorithm a vocabulary uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenizerKind {
    /// Byte-level BPE with merges (`tokenizer.ggml.model = gpt2`).
    Bpe,
    /// SentencePiece-style merges by score (`tokenizer.ggml.model = llama`).
    Spm,
}

/// llama.cpp's `llama_token_attr` bits.
mod attr {
    pub const UNKNOWN: u16 = 1 << 0;
    pub const UNUSED: u16 = 1 << 1;
    pub const NORMAL: u16 = 1 << 2;
    pub const CONTROL: u16 = 1 << 3;
    pub const USER_DEFINED: u16 = 1 << 4;
    pub const BYTE: u16 = 1 << 5;
    pub const LSTRIP: u16 = 1 << 7;
    pub const RSTRIP: u16 = 1 << 8;
    /// Tokens split out of the text before tokenizing it (`cache_special_tokens`).
    pub const SPECIAL: u16 = CONTROL | USER_DEFINED | UNKNOWN;

    /// Attribute of a GGUF token type; anything unknown is "undefined" (no bits).
    pub fn from_gguf_type(t: i64) -> u16 {
        match t {
            1 => NORMAL,
            2 => UNKNOWN,
            3 => CONTROL,
            4 => USER_DEFINED,
            5 => UNUSED,
            6 => BYTE,
            _ => 0,
        }
    }
}

/// SentencePiece's escaped space.
const SPM_SPACE: &str = "\u{2581}";

/// Token texts llama.cpp marks as control tokens whatever their GGUF type, because they end
/// generation (`special_eog_ids` in `llama_vocab::impl::load`).
const EOG_TEXTS: [&str; 22] = [
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];

/// Fill-in-the-middle markers llama.cpp marks as control tokens when the GGUF names no token
/// for that role: (metadata keys, token texts).
const FIM_TEXTS: [(&[&str], &[&str]); 6] = [
    (
        &[
            "tokenizer.ggml.fim_pre_token_id",
            "tokenizer.ggml.prefix_token_id",
        ],
        &[
            "<|fim_prefix|>",
            "<fim-prefix>",
            "<fim_prefix>",
            "<｜fim▁begin｜>",
            "<PRE>",
            "▁<PRE>",
            "<|code_prefix|>",
            "<|prefix|>",
        ],
    ),
    (
        &[
            "tokenizer.ggml.fim_suf_token_id",
            "tokenizer.ggml.suffix_token_id",
        ],
        &[
            "<|fim_suffix|>",
            "<fim-suffix>",
            "<fim_suffix>",
            "<｜fim▁hole｜>",
            "<SUF>",
            "▁<SUF>",
            "<|code_suffix|>",
            "<|suffix|>",
        ],
    ),
    (
        &[
            "tokenizer.ggml.fim_mid_token_id",
            "tokenizer.ggml.middle_token_id",
        ],
        &[
            "<|fim_middle|>",
            "<fim-middle>",
            "<fim_middle>",
            "<｜fim▁end｜>",
            "<MID>",
            "▁<MID>",
            "<|code_middle|>",
            "<|middle|>",
        ],
    ),
    (
        &["tokenizer.ggml.fim_pad_token_id"],
        &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"],
    ),
    (
        &["tokenizer.ggml.fim_rep_token_id"],
        &[
            "<|fim_repo|>",
            "<|repo_name|>",
            "<fim-repo>",
            "<REPO>",
            "<reponame>",
        ],
    ),
    (&["tokenizer.ggml.fim_sep_token_id"], &["<|file_sep|>"]),
];

/// How a BPE vocabulary splits text into words before merging (`llm_tokenizer_bpe`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PreTokenizer {
    /// GPT-2's `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`.
    Gpt2,
    /// `\p{N}` (every digit alone), then GPT-2's pattern within each piece.
    DigitsThenGpt2,
}

impl PreTokenizer {
    /// The pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre`, among those we implement.
    fn for_name(pre: &str) -> Option<Self> {
        match pre {
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
            | "minerva-7b" | "mellum2" => Some(Self::DigitsThenGpt2),
            "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es"
            | "jina-v2-de" | "a.x-4.0" | "mellum" | "modern-bert" | "jina-v1-en"
            | "jina-v2-code" | "roberta-bpe" | "mpt" | "olmo" | "jais" | "exaone4" | "trillion"
            | "granite-docling" => Some(Self::Gpt2),
            _ => None,
        }
    }
}

/// Token texts in one buffer with an open-addressing hash index over them, so that building
/// a 262k-token vocabulary allocates a handful of buffers rather than one string per token.
#[derive(Clone)]
struct Vocab {
    text: String,
    /// Token `i` is `text[starts[i]..starts[i + 1]]`.
    starts: Vec<usize>,
    /// Token id + 1 per slot, 0 for empty; the slot of a text is found from its hash's top bits.
    slots: Vec<u32>,
    shift: u32,
}

/// A fast multiplicative hash (FxHash-like) whose top bits pick the slot.
fn text_hash(bytes: &[u8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let mix = |h: u64, chunk: &[u8]| {
        let mut w = [0u8; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        (h.rotate_left(26) ^ u64::from_le_bytes(w)).wrapping_mul(K)
    };
    let mut h = (bytes.len() as u64).wrapping_mul(K);
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        h = mix(h, c);
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        h = mix(h, rest);
    }
    h
}

impl Vocab {
    fn new<'a>(tokens: impl ExactSizeIterator<Item = &'a str>) -> Self {
        let n = tokens.len();
        let mut text = String::new();
        let mut starts = Vec::with_capacity(n + 1);
        starts.push(0);
        for (i, t) in tokens.enumerate() {
            if t.is_empty() {
                // llama.cpp renames empty tokens so that every text is unique and non-empty.
                text.push_str(&format!("[EMPTY_{i}]"));
            } else {
                text.push_str(t);
            }
            starts.push(text.len());
        }
        let bits = (2 * n).next_power_of_two().max(16).trailing_zeros();
        let mut v = Self {
            text,
            starts,
            slots: vec![0; 1 << bits],
            shift: 64 - bits,
        };
        for id in 0..n as u32 {
            let slot = v.find_slot(v.get_text(id));
            // A later duplicate replaces an earlier one, as llama.cpp's `token_to_id[word] = i`.
            v.slots[slot] = id + 1;
        }
        v
    }

    fn len(&self) -> usize {
        self.starts.len() - 1
    }

    fn get_text(&self, id: u32) -> &str {
        &self.text[self.starts[id as usize]..self.starts[id as usize + 1]]
    }

    /// The slot holding `key`, or the empty slot where it would go.
    fn find_slot(&self, key: &str) -> usize {
        let mask = self.slots.len() - 1;
        let mut i = (text_hash(key.as_bytes()) >> self.shift) as usize;
        loop {
            match self.slots[i] {
                0 => return i,
                s if self.get_text(s - 1) == key => return i,
                _ => i = (i + 1) & mask,
            }
        }
    }

    fn id(&self, key: &str) -> Option<u32> {
        self.slots[self.find_slot(key)].checked_sub(1)
    }
}

/// Everything a tokenizer is built from, as read from GGUF metadata.
struct Parts<'a> {
    kind: TokenizerKind,
    tokens: Vec<&'a str>,
    /// `tokenizer.ggml.token_type`, or all normal when absent.
    types: Option<Vec<i64>>,
    /// `tokenizer.ggml.scores`, or all zero when absent.
    scores: Option<Vec<f32>>,
    /// `tokenizer.ggml.merges` (BPE), "left right" in rank order.
    merges: Vec<&'a str>,
    /// `tokenizer.ggml.pre`.
    pre: &'a str,
    /// `general.name` and `general.architecture`, which select llama.cpp's per-model fix-ups.
    name: &'a str,
    arch: &'a str,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    /// Whether each of [`FIM_TEXTS`]'s roles has a valid token id in the metadata.
    fim_set: [bool; 6],
    add_bos: Option<bool>,
    add_space_prefix: Option<bool>,
}

/// A special token as the partitioner scans for it.
#[derive(Debug, Clone, Copy)]
struct SpecialToken {
    id: u32,
    /// Its first byte and, when it has one, its second: text lacking these cannot contain it.
    first: u8,
    second: Option<u8>,
}

/// A tokenizer built from GGUF metadata; its ids match llama.cpp's.
#[derive(Clone)]
pub struct Tokenizer {
    kind: TokenizerKind,
    vocab: Vocab,
    attrs: Vec<u16>,
    scores: Vec<f32>,
    /// BPE: (left id, right id) → (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Tokens split out before tokenizing, longest text first (`cache_special_tokens`).
    special: Vec<SpecialToken>,
    /// Output bytes of every token, token `i` being `pieces[piece_starts[i]..piece_starts[i + 1]]`.
    pieces: Vec<u8>,
    piece_starts: Vec<usize>,
    /// Token of each byte: GPT-2's byte character (BPE) or `<0xXX>` (SPM fallback).
    byte_tokens: [Option<u32>; 256],
    pre: PreTokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    add_space_prefix: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("kind", &self.kind)
            .field("vocab_size", &self.vocab.len())
            .field("merges", &self.merges.len())
            .field("special", &self.special.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("add_bos", &self.add_bos)
            .finish_non_exhaustive()
    }
}

/// GPT-2's reversible map from bytes to printable characters.
pub(crate) fn byte_to_char(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    if printable(b) {
        char::from(b)
    } else {
        let n = (0..b).filter(|&x| !printable(x)).count() as u32;
        char::from_u32(256 + n).expect("256..=323 are valid code points")
    }
}

type Metadata = HashMap<String, Value>;

fn md_str<'a>(md: &'a Metadata, key: &'static str) -> Result<Option<&'a str>, TokenizerError> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(TokenizerError::BadMetadata(format!(
            "{key} is not a string"
        ))),
    }
}

fn md_bool(md: &Metadata, key: &'static str) -> Result<Option<bool>, TokenizerError> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(TokenizerError::BadMetadata(format!("{key} is not a bool"))),
    }
}

fn integer(v: &Value) -> Option<i64> {
    Some(match *v {
        Value::U8(x) => x.into(),
        Value::I8(x) => x.into(),
        Value::U16(x) => x.into(),
        Value::I16(x) => x.into(),
        Value::U32(x) => x.into(),
        Value::I32(x) => x.into(),
        Value::U64(x) => i64::try_from(x).ok()?,
        Value::I64(x) => x,
        _ => return None,
    })
}

fn md_id(md: &Metadata, key: &str) -> Result<Option<u32>, TokenizerError> {
    match md.get(key) {
        None => Ok(None),
        // An id that does not fit is out of the vocabulary, which callers treat as unset.
        Some(v) => integer(v)
            .map(|i| Some(u32::try_from(i).unwrap_or(u32::MAX)))
            .ok_or_else(|| TokenizerError::BadMetadata(format!("{key} is not an integer"))),
    }
}

fn md_array<'a>(
    md: &'a Metadata,
    key: &'static str,
) -> Result<Option<&'a [Value]>, TokenizerError> {
    match md.get(key) {
        None => Ok(None),
        Some(Value::Array(a)) => Ok(Some(a)),
        Some(_) => Err(TokenizerError::BadMetadata(format!(
            "{key} is not an array"
        ))),
    }
}

fn md_strings<'a>(md: &'a Metadata, key: &'static str) -> Result<Vec<&'a str>, TokenizerError> {
    md_array(md, key)?
        .ok_or(TokenizerError::MissingKey(key))?
        .iter()
        .map(|v| match v {
            Value::String(s) => Ok(s.as_str()),
            _ => Err(TokenizerError::BadMetadata(format!(
                "{key} holds a non-string"
            ))),
        })
        .collect()
}

/// A per-token array that must cover every token (extra entries are ignored, as llama.cpp).
fn per_token<T>(
    md: &Metadata,
    key: &'static str,
    n: usize,
    convert: impl Fn(&Value) -> Option<T>,
) -> Result<Option<Vec<T>>, TokenizerError> {
    let Some(values) = md_array(md, key)? else {
        return Ok(None);
    };
    if values.len() < n {
        return Err(TokenizerError::BadMetadata(format!(
            "{key} has {} entries for {n} tokens",
            values.len()
        )));
    }
    values[..n]
        .iter()
        .map(|v| {
            convert(v).ok_or_else(|| TokenizerError::BadMetadata(format!("{key} holds {v:?}")))
        })
        .collect::<Result<Vec<T>, _>>()
        .map(Some)
}

impl Tokenizer {
    /// Builds the tokenizer from a GGUF's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(content: &Content) -> Result<Self, TokenizerError> {
        let md = &content.metadata;
        let model = md_str(md, "tokenizer.ggml.model")?
            .ok_or(TokenizerError::MissingKey("tokenizer.ggml.model"))?;
        let kind = match model {
            "gpt2" => TokenizerKind::Bpe,
            "llama" => TokenizerKind::Spm,
            other => {
                return Err(TokenizerError::Unsupported(format!(
                    "tokenizer model {other:?} (supported: gpt2, llama)"
                )))
            }
        };
        let tokens = md_strings(md, "tokenizer.ggml.tokens")?;
        let n = tokens.len();
        let types = per_token(md, "tokenizer.ggml.token_type", n, integer)?;
        let scores = per_token(md, "tokenizer.ggml.scores", n, |v| match *v {
            Value::F32(x) => Some(x),
            Value::F64(x) => Some(x as f32),
            ref v => integer(v).map(|i| i as f32),
        })?;
        let merges = match kind {
            TokenizerKind::Bpe => md_strings(md, "tokenizer.ggml.merges")?,
            TokenizerKind::Spm => Vec::new(),
        };
        let mut fim_set = [false; 6];
        for (set, (keys, _)) in fim_set.iter_mut().zip(FIM_TEXTS) {
            for key in keys {
                if md_id(md, key)?.is_some_and(|id| (id as usize) < n) {
                    *set = true;
                }
            }
        }
        Self::from_parts(Parts {
            kind,
            tokens,
            types,
            scores,
            merges,
            pre: md_str(md, "tokenizer.ggml.pre")?.unwrap_or(""),
            name: md_str(md, "general.name")?.unwrap_or(""),
            arch: md_str(md, "general.architecture")?.unwrap_or(""),
            bos: md_id(md, "tokenizer.ggml.bos_token_id")?,
            eos: md_id(md, "tokenizer.ggml.eos_token_id")?,
            unk: md_id(md, "tokenizer.ggml.unknown_token_id")?,
            fim_set,
            add_bos: md_bool(md, "tokenizer.ggml.add_bos_token")?,
            add_space_prefix: md_bool(md, "tokenizer.ggml.add_space_prefix")?,
        })
    }

    fn from_parts(p: Parts<'_>) -> Result<Self, TokenizerError> {
        let kind = p.kind;
        let pre = match kind {
            // SentencePiece vocabularies have no pre-tokenizer; the value is never read.
            TokenizerKind::Spm => PreTokenizer::Gpt2,
            TokenizerKind::Bpe => PreTokenizer::for_name(p.pre).ok_or_else(|| {
                TokenizerError::Unsupported(format!(
                    "BPE pre-tokenizer {:?} (supported: smollm, starcoder, gpt-2 and the others \
                     llama.cpp splits with GPT-2's pattern)",
                    p.pre
                ))
            })?,
        };
        let vocab = Vocab::new(p.tokens.iter().copied());
        let n = vocab.len();
        let mut attrs: Vec<u16> = match &p.types {
            Some(t) => t.iter().map(|&t| attr::from_gguf_type(t)).collect(),
            None => vec![attr::NORMAL; n],
        };
        let scores = p.scores.unwrap_or_else(|| vec![0.0; n]);
        fix_attributes(&mut attrs, &vocab, &p.fim_set);

        // Special ids: the metadata's when inside the vocabulary, else llama.cpp's defaults.
        let in_vocab = |id: Option<u32>| id.filter(|&i| (i as usize) < n);
        let (bos_default, eos_default, unk_default) = match kind {
            TokenizerKind::Spm => (Some(1), Some(2), Some(0)),
            TokenizerKind::Bpe => (Some(11), Some(11), None),
        };
        let bos = in_vocab(p.bos).or(in_vocab(bos_default));
        let eos = in_vocab(p.eos).or(in_vocab(eos_default));
        let unk = in_vocab(p.unk).or(in_vocab(unk_default));
        let add_bos = p.add_bos.unwrap_or(kind == TokenizerKind::Spm);
        if add_bos && bos.is_none() {
            return Err(TokenizerError::BadMetadata(
                "tokenizer.ggml.add_bos_token is true, but there is no BOS token".into(),
            ));
        }
        let add_space_prefix = match kind {
            TokenizerKind::Spm => p.add_space_prefix.unwrap_or(true),
            TokenizerKind::Bpe => false,
        };

        let mut merges = HashMap::with_capacity(p.merges.len());
        let mut joined = String::new();
        for (rank, m) in p.merges.iter().enumerate() {
            // llama.cpp splits at the first space after the first byte.
            let Some(at) = m.bytes().skip(1).position(|b| b == b' ').map(|i| i + 1) else {
                continue;
            };
            let (a, b) = (&m[..at], &m[at + 1..]);
            joined.clear();
            joined.push_str(a);
            joined.push_str(b);
            // A merge whose result is not a token never yields one; llama.cpp would merge and
            // then spell the result in bytes, which no real vocabulary needs.
            if let (Some(ia), Some(ib), Some(im)) = (vocab.id(a), vocab.id(b), vocab.id(&joined)) {
                merges.entry((ia, ib)).or_insert((rank as u32, im));
            }
        }

        let mut special: Vec<SpecialToken> = (0..n as u32)
            .filter(|&id| attrs[id as usize] & attr::SPECIAL != 0)
            .filter_map(|id| {
                let t = vocab.get_text(id).as_bytes();
                Some(SpecialToken {
                    id,
                    first: *t.first()?,
                    second: t.get(1).copied(),
                })
            })
            .collect();
        // Longest first; llama.cpp's unstable sort leaves ties in no particular order, ours
        // keeps them by id.
        special.sort_by_key(|s| std::cmp::Reverse(vocab.get_text(s.id).len()));
        set_strip_attributes(&mut attrs, &vocab, &special, p.pre, p.name, p.arch);

        let (pieces, piece_starts) = build_pieces(kind, &vocab, &attrs);
        let mut byte_tokens = [None; 256];
        for (b, slot) in byte_tokens.iter_mut().enumerate() {
            let b = b as u8;
            *slot = match kind {
                TokenizerKind::Bpe => vocab.id(byte_to_char(b).encode_utf8(&mut [0; 4])),
                // llama.cpp's `byte_to_token`: `<0xXX>`, else the byte itself as text; it
                // throws when neither exists, where we fall back to the unknown token.
                TokenizerKind::Spm => vocab
                    .id(&format!("<0x{b:02X}>"))
                    .or_else(|| b.is_ascii().then(|| vocab.id(&char::from(b).to_string()))?)
                    .or(unk),
            };
        }
        Ok(Self {
            kind,
            vocab,
            attrs,
            scores,
            merges,
            special,
            pieces,
            piece_starts,
            byte_tokens,
            pre,
            bos,
            eos,
            add_bos,
            add_space_prefix,
        })
    }

    /// Token ids of `text`, after BOS when `add_bos`; `parse_special` turns text such as
    /// `<|im_start|>` into its control token (user-defined tokens are always matched).
    pub fn encode(&self, text: &str, add_bos: bool, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_bos {
            out.extend(self.bos);
        }
        let mut frags = Vec::new();
        self.partition(text, parse_special, &mut frags);
        let mut scratch = Scratch::default();
        // SentencePiece prefixes a space to text at the start or after a special token.
        let mut prev_special = true;
        for frag in frags {
            match frag {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(start, end) => {
                    let t = &text[start..end];
                    match self.kind {
                        TokenizerKind::Bpe => self.encode_bpe(t, &mut scratch, &mut out),
                        TokenizerKind::Spm => {
                            let mut escaped = String::with_capacity(t.len() + 3);
                            if self.add_space_prefix && prev_special {
                                escaped.push_str(SPM_SPACE);
                            }
                            for c in t.chars() {
                                match c {
                                    ' ' => escaped.push_str(SPM_SPACE),
                                    c => escaped.push(c),
                                }
                            }
                            self.encode_spm(&escaped, &mut scratch, &mut out);
                        }
                    }
                    prev_special = false;
                }
            }
        }
        out
    }

    /// Splits special tokens out of `text`, longest first, each token over every remaining
    /// stretch of text in turn (llama.cpp's `tokenizer_st_partition`).
    fn partition(&self, text: &str, parse_special: bool, frags: &mut Vec<Fragment>) {
        frags.clear();
        if text.is_empty() {
            return;
        }
        frags.push(Fragment::Text(0, text.len()));
        let bytes = text.as_bytes();
        // Bytes and byte pairs present in the text: most of Gemma's 6k special tokens are
        // ruled out by these without scanning.
        let mut singles = [0u64; 4];
        let mut pairs = vec![0u64; 1024];
        for &b in bytes {
            singles[usize::from(b >> 6)] |= 1 << (b & 63);
        }
        for w in bytes.windows(2) {
            let k = usize::from(w[0]) << 8 | usize::from(w[1]);
            pairs[k >> 6] |= 1 << (k & 63);
        }
        let mut next = Vec::new();
        for sp in &self.special {
            let a = self.attrs[sp.id as usize];
            if !parse_special && a & (attr::CONTROL | attr::UNKNOWN) != 0 {
                continue;
            }
            let present = match sp.second {
                None => singles[usize::from(sp.first >> 6)] & (1 << (sp.first & 63)) != 0,
                Some(second) => {
                    let k = usize::from(sp.first) << 8 | usize::from(second);
                    pairs[k >> 6] & (1 << (k & 63)) != 0
                }
            };
            if !present {
                continue;
            }
            let pat = self.vocab.get_text(sp.id);
            next.clear();
            for &frag in frags.iter() {
                let Fragment::Text(mut start, end) = frag else {
                    next.push(frag);
                    continue;
                };
                while let Some(at) = text[start..end].find(pat) {
                    let at = start + at;
                    let mut left_end = at;
                    if a & attr::LSTRIP != 0 {
                        while left_end > start && is_c_space(bytes[left_end - 1]) {
                            left_end -= 1;
                        }
                    }
                    if left_end > start {
                        next.push(Fragment::Text(start, left_end));
                    }
                    next.push(Fragment::Token(sp.id));
                    start = at + pat.len();
                    if a & attr::RSTRIP != 0 {
                        while start < end && is_c_space(bytes[start]) {
                            start += 1;
                        }
                    }
                }
                if start < end {
                    next.push(Fragment::Text(start, end));
                }
            }
            std::mem::swap(frags, &mut next);
        }
    }

    /// Byte-level BPE over each pre-tokenized word (`llm_tokenizer_bpe_session::tokenize`).
    fn encode_bpe(&self, text: &str, s: &mut Scratch, out: &mut Vec<u32>) {
        classify(text, &mut s.cpts);
        pre_tokenize(self.pre, &s.cpts, &mut s.words);
        let byte_at = |i: usize| s.cpts.get(i).map_or(text.len(), |c| c.at);
        for &(from, to) in &s.words {
            let word = &text.as_bytes()[byte_at(from)..byte_at(to)];
            self.bpe_word(word, &mut s.syms, &mut s.bpe_heap, out);
        }
    }

    fn bpe_word(
        &self,
        word: &[u8],
        syms: &mut Vec<Sym>,
        heap: &mut BinaryHeap<BpePair>,
        out: &mut Vec<u32>,
    ) {
        match word {
            [] => return,
            [b] => {
                out.extend(self.byte_tokens[usize::from(*b)]);
                return;
            }
            _ => {}
        }
        syms.clear();
        heap.clear();
        // Every byte starts as its GPT-2 character's token (NONE if the vocabulary lacks it:
        // then it neither merges nor is output, as in llama.cpp).
        for (i, &b) in word.iter().enumerate() {
            syms.push(Sym {
                id: self.byte_tokens[usize::from(b)].unwrap_or(NONE),
                prev: if i == 0 { NONE } else { i as u32 - 1 },
                next: if i + 1 == word.len() {
                    NONE
                } else {
                    i as u32 + 1
                },
            });
        }
        for i in 1..syms.len() {
            self.push_bpe_pair(syms, i - 1, i, heap);
        }
        while let Some(p) = heap.pop() {
            let (l, r) = (p.left as usize, p.right as usize);
            // Skip pairs whose symbols changed since the pair was queued.
            if syms[l].next != p.right || syms[l].id != p.left_id || syms[r].id != p.right_id {
                continue;
            }
            syms[l].id = p.merged;
            syms[r].id = NONE;
            syms[l].next = syms[r].next;
            if let Some(nx) = index(syms[r].next) {
                syms[nx].prev = l as u32;
            }
            if let Some(pv) = index(syms[l].prev) {
                self.push_bpe_pair(syms, pv, l, heap);
            }
            if let Some(nx) = index(syms[l].next) {
                self.push_bpe_pair(syms, l, nx, heap);
            }
        }
        let mut i = Some(0);
        while let Some(k) = i {
            if syms[k].id != NONE {
                out.push(syms[k].id);
            }
            i = index(syms[k].next);
        }
    }

    fn push_bpe_pair(&self, syms: &[Sym], l: usize, r: usize, heap: &mut BinaryHeap<BpePair>) {
        let (a, b) = (syms[l].id, syms[r].id);
        if let Some(&(rank, merged)) = self.merges.get(&(a, b)) {
            heap.push(BpePair {
                rank,
                left: l as u32,
                right: r as u32,
                left_id: a,
                right_id: b,
                merged,
            });
        }
    }

    /// SentencePiece merges by score (`llm_tokenizer_spm_session::tokenize`). Merged symbols
    /// are always tokens, so llama.cpp's `resegment` reduces to byte fallback for single
    /// characters without a token.
    fn encode_spm(&self, text: &str, s: &mut Scratch, out: &mut Vec<u32>) {
        let syms = &mut s.spans;
        syms.clear();
        let count = text.chars().count();
        for (i, (start, c)) in text.char_indices().enumerate() {
            syms.push(Span {
                start,
                len: c.len_utf8(),
                prev: if i == 0 { NONE } else { i as u32 - 1 },
                next: if i + 1 == count { NONE } else { i as u32 + 1 },
            });
        }
        let heap = &mut s.spm_heap;
        heap.clear();
        for i in 1..syms.len() {
            self.push_spm_pair(text, syms, i - 1, i, heap);
        }
        while let Some(p) = heap.pop() {
            let (l, r) = (p.left as usize, p.right as usize);
            if syms[l].len == 0 || syms[r].len == 0 || syms[l].len + syms[r].len != p.size {
                continue;
            }
            syms[l].len += syms[r].len;
            syms[r].len = 0;
            syms[l].next = syms[r].next;
            if let Some(nx) = index(syms[r].next) {
                syms[nx].prev = l as u32;
            }
            if let Some(pv) = index(syms[l].prev) {
                self.push_spm_pair(text, syms, pv, l, heap);
            }
            if let Some(nx) = index(syms[l].next) {
                self.push_spm_pair(text, syms, l, nx, heap);
            }
        }
        let mut i = if syms.is_empty() { None } else { Some(0) };
        while let Some(k) = i {
            let piece = &text[syms[k].start..syms[k].start + syms[k].len];
            match self.vocab.id(piece) {
                Some(id) => out.push(id),
                None => {
                    for b in piece.bytes() {
                        out.extend(self.byte_tokens[usize::from(b)]);
                    }
                }
            }
            i = index(syms[k].next);
        }
    }

    fn push_spm_pair(
        &self,
        text: &str,
        syms: &[Span],
        l: usize,
        r: usize,
        heap: &mut BinaryHeap<SpmPair>,
    ) {
        let (a, b) = (&syms[l], &syms[r]);
        if let Some(id) = self.vocab.id(&text[a.start..b.start + b.len]) {
            heap.push(SpmPair {
                score: self.scores[id as usize],
                left: l as u32,
                right: r as u32,
                size: a.len + b.len,
            });
        }
    }

    /// Bytes this token adds to output text: byte-level BPE decoded to raw bytes, SPM's `▁`
    /// as a space and `<0xXX>` as that byte; nothing for control tokens (llama.cpp's
    /// `token_to_piece` without `special`).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        let i = id as usize;
        match (self.piece_starts.get(i), self.piece_starts.get(i + 1)) {
            (Some(&start), Some(&end)) => &self.pieces[start..end],
            _ => &[],
        }
    }

    /// Concatenated output bytes of `ids` (may end inside a UTF-8 character).
    pub fn decode(&self, ids: &[u32]) -> Vec<u8> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            out.extend_from_slice(self.token_bytes(id));
        }
        out
    }

    /// Id of the vocabulary entry spelled exactly `piece`.
    pub fn token_id(&self, piece: &str) -> Option<u32> {
        self.vocab.id(piece)
    }

    /// The vocabulary entry of `id`, as stored in the GGUF.
    pub fn token_str(&self, id: u32) -> Option<&str> {
        ((id as usize) < self.vocab.len()).then(|| self.vocab.get_text(id))
    }

    /// Whether `id` is a control token (chat markers, BOS/EOS), which prints nothing.
    pub fn is_control(&self, id: u32) -> bool {
        self.attrs
            .get(id as usize)
            .is_some_and(|a| a & attr::CONTROL != 0)
    }

    /// Beginning-of-sequence token.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// End-of-sequence token.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Whether prompts start with BOS (`tokenizer.ggml.add_bos_token`, else llama.cpp's
    /// default for the vocabulary type: yes for SentencePiece, no for BPE).
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// The algorithm of this vocabulary.
    pub fn kind(&self) -> TokenizerKind {
        self.kind
    }
}

/// Applies `f` to the attributes of the token spelled `text`, if there is one.
fn update(attrs: &mut [u16], vocab: &Vocab, text: &str, f: impl FnOnce(&mut u16)) {
    if let Some(id) = vocab.id(text) {
        f(&mut attrs[id as usize]);
    }
}

/// llama.cpp's fix-ups of token attributes by token text, in its order.
fn fix_attributes(attrs: &mut [u16], vocab: &Vocab, fim_set: &[bool; 6]) {
    let control = |a: &mut u16| *a |= attr::CONTROL;
    // Fill-in-the-middle markers when the metadata names none (the first listed present).
    for (&named, (_, texts)) in fim_set.iter().zip(FIM_TEXTS) {
        if !named {
            if let Some(t) = texts.iter().find(|t| vocab.id(t).is_some()) {
                update(attrs, vocab, t, control);
            }
        }
    }
    for (id, a) in attrs.iter_mut().enumerate() {
        if *a & attr::CONTROL != 0 && vocab.get_text(id as u32).contains("unused") {
            *a |= attr::UNUSED;
        }
    }
    for t in EOG_TEXTS {
        update(attrs, vocab, t, control);
    }
    // gpt-oss's channel markers always print.
    for t in ["<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"] {
        update(attrs, vocab, t, |a| *a = attr::USER_DEFINED);
    }
    // o200k_harmony and solar-open: `<|end|>` does not end generation.
    let has = |t: &str| vocab.id(t).is_some();
    let has_call = has("<|call|>") || has("<|calls|>");
    if has("<|end|>") && has_call && (has("<|return|>") || has("<|flush|>")) {
        update(attrs, vocab, "<|end|>", |a| *a = attr::USER_DEFINED);
    }
    // Gemma 4 and PaddleOCR: `</s>` is ordinary text.
    if has("<|tool_response>") && has("</s>") {
        update(attrs, vocab, "</s>", |a| *a = attr::NORMAL);
    }
}

/// llama.cpp's per-model whitespace stripping around special tokens (phi-3's rstrip,
/// jina's and ModernBERT's lstrip of their mask token).
fn set_strip_attributes(
    attrs: &mut [u16],
    vocab: &Vocab,
    special: &[SpecialToken],
    pre: &str,
    name: &str,
    arch: &str,
) {
    let name = name.to_ascii_lowercase();
    let any = |s: &str, subs: &[&str]| subs.iter().any(|x| s.contains(x));
    if any(pre, &["jina-v2-de", "jina-v2-es", "jina-v2-code"])
        || any(arch, &["nomic-bert-moe", "jina-bert-v3"])
    {
        update(attrs, vocab, "<mask>", |a| *a |= attr::LSTRIP);
    } else if any(&name, &["phi-3", "phi3"]) {
        for sp in special {
            attrs[sp.id as usize] |= attr::RSTRIP;
        }
        update(attrs, vocab, "</s>", |a| *a |= attr::RSTRIP);
        for t in ["<unk>", "<s>", "<|endoftext|>"] {
            update(attrs, vocab, t, |a| *a &= !attr::RSTRIP);
        }
    } else if name.contains("modern-bert") {
        update(attrs, vocab, "[MASK]", |a| *a |= attr::LSTRIP);
    }
}

/// Output bytes of every token, as llama.cpp's `token_to_piece(special = false)`.
fn build_pieces(kind: TokenizerKind, vocab: &Vocab, attrs: &[u16]) -> (Vec<u8>, Vec<usize>) {
    let mut gpt2_byte = [None; 324];
    for b in 0..=255u8 {
        gpt2_byte[byte_to_char(b) as usize] = Some(b);
    }
    let mut pieces = Vec::with_capacity(vocab.text.len());
    let mut starts = Vec::with_capacity(vocab.len() + 1);
    starts.push(0);
    for id in 0..vocab.len() as u32 {
        let text = vocab.get_text(id);
        let a = attrs[id as usize];
        if a & (attr::UNKNOWN | attr::CONTROL) != 0 {
            // Prints nothing.
        } else if a & attr::USER_DEFINED != 0 {
            pieces.extend_from_slice(text.as_bytes());
        } else if a & attr::NORMAL != 0 {
            match kind {
                TokenizerKind::Spm => {
                    for (i, part) in text.split(SPM_SPACE).enumerate() {
                        if i > 0 {
                            pieces.push(b' ');
                        }
                        pieces.extend_from_slice(part.as_bytes());
                    }
                }
                TokenizerKind::Bpe => {
                    for c in text.chars() {
                        match gpt2_byte.get(c as usize).copied().flatten() {
                            Some(b) => pieces.push(b),
                            // Not a GPT-2 byte character: kept as is (llama.cpp prints a marker).
                            None => pieces.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                        }
                    }
                }
            }
        } else if a & attr::BYTE != 0 {
            pieces.extend(parse_byte_token(text));
        }
        starts.push(pieces.len());
    }
    (pieces, starts)
}

fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    u8::from_str_radix(hex, 16).ok()
}

/// C's `isspace` in the "C" locale, which llama.cpp's lstrip/rstrip use.
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r')
}

/// A stretch of text still to tokenize (byte range), or a special token split out of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fragment {
    Text(usize, usize),
    Token(u32),
}

/// The classes llama.cpp's GPT-2 splitter tells apart (`unicode_cpt_flags`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// `\p{L}`.
    Letter,
    /// `\p{N}`.
    Number,
    /// `\s` (Unicode White_Space).
    Space,
    /// Anything else.
    Other,
}

/// A character of a text fragment: its byte offset, itself and its class.
#[derive(Debug, Clone, Copy)]
struct Cpt {
    at: usize,
    ch: char,
    class: Class,
}

/// `regex` matching runs of letters or numbers as llama.cpp's tables (Unicode 15.1) define
/// them; later Unicode versions' additions count as "other", as they do for llama.cpp.
fn category_runs(class: Class) -> &'static regex::Regex {
    static LETTERS: OnceLock<regex::Regex> = OnceLock::new();
    static NUMBERS: OnceLock<regex::Regex> = OnceLock::new();
    let (cell, pattern) = match class {
        Class::Letter => (&LETTERS, r"[\p{L}&&\p{Age=V15_1}]+"),
        _ => (&NUMBERS, r"[\p{N}&&\p{Age=V15_1}]+"),
    };
    cell.get_or_init(|| regex::Regex::new(pattern).expect("constant pattern compiles"))
}

fn classify(text: &str, cpts: &mut Vec<Cpt>) {
    cpts.clear();
    for (at, ch) in text.char_indices() {
        let class = match ch {
            'a'..='z' | 'A'..='Z' => Class::Letter,
            '0'..='9' => Class::Number,
            // Unicode White_Space, identical to llama.cpp's whitespace table.
            c if c.is_whitespace() => Class::Space,
            _ => Class::Other,
        };
        cpts.push(Cpt { at, ch, class });
    }
    if !text.is_ascii() {
        for class in [Class::Letter, Class::Number] {
            let mut i = 0;
            for m in category_runs(class).find_iter(text) {
                while cpts.get(i).is_some_and(|c| c.at < m.start()) {
                    i += 1;
                }
                while let Some(c) = cpts.get_mut(i).filter(|c| c.at < m.end()) {
                    c.class = class;
                    i += 1;
                }
            }
        }
    }
}

/// Word boundaries (character index ranges) of a classified text fragment.
fn pre_tokenize(pre: PreTokenizer, cpts: &[Cpt], words: &mut Vec<(usize, usize)>) {
    words.clear();
    match pre {
        PreTokenizer::Gpt2 => split_gpt2(cpts, 0, cpts.len(), words),
        PreTokenizer::DigitsThenGpt2 => {
            // `\p{N}` first: every number character is a piece of its own, and GPT-2's
            // pattern then runs within each piece.
            let mut piece = 0;
            for (i, c) in cpts.iter().enumerate() {
                if c.class == Class::Number {
                    split_gpt2(cpts, piece, i, words);
                    split_gpt2(cpts, i, i + 1, words);
                    piece = i + 1;
                }
            }
            split_gpt2(cpts, piece, cpts.len(), words);
        }
    }
}

/// llama.cpp's `unicode_regex_split_custom_gpt2` over characters `ini..end`: pushes word
/// boundaries (character index ranges). Lookahead never sees past `end`.
fn split_gpt2(cpts: &[Cpt], ini: usize, end: usize, words: &mut Vec<(usize, usize)>) {
    let class = |p: usize| (p < end).then(|| cpts[p].class);
    let mut pos = ini;
    while pos < end {
        let start = pos;
        let c = cpts[pos].ch;
        // 's|'t|'re|'ve|'m|'ll|'d
        if c == '\'' && pos + 1 < end {
            let next = cpts[pos + 1].ch;
            if matches!(next, 's' | 't' | 'm' | 'd') {
                words.push((start, pos + 2));
                pos += 2;
                continue;
            }
            if pos + 2 < end
                && matches!(
                    (next, cpts[pos + 2].ch),
                    ('r', 'e') | ('v', 'e') | ('l', 'l')
                )
            {
                words.push((start, pos + 3));
                pos += 3;
                continue;
            }
        }
        // <space>?\p{L}+ | <space>?\p{N}+ | <space>?[^\s\p{L}\p{N}]+
        let after_space = if c == ' ' { class(pos + 1) } else { class(pos) };
        if let Some(k @ (Class::Letter | Class::Number | Class::Other)) = after_space {
            pos += usize::from(c == ' ');
            while class(pos) == Some(k) {
                pos += 1;
            }
            words.push((start, pos));
            continue;
        }
        let mut spaces = 0;
        while class(pos + spaces) == Some(Class::Space) {
            spaces += 1;
        }
        if spaces > 1 && pos + spaces < end {
            // \s+(?!\S): leave the last space to prefix the next word.
            pos += spaces - 1;
        } else if spaces > 0 {
            pos += spaces;
        } else {
            pos += 1;
        }
        words.push((start, pos));
    }
}

/// "No symbol" in the linked lists below.
const NONE: u32 = u32::MAX;

fn index(link: u32) -> Option<usize> {
    (link != NONE).then_some(link as usize)
}

/// Buffers reused across the words and fragments of one `encode` call.
#[derive(Default)]
struct Scratch {
    cpts: Vec<Cpt>,
    words: Vec<(usize, usize)>,
    syms: Vec<Sym>,
    bpe_heap: BinaryHeap<BpePair>,
    spans: Vec<Span>,
    spm_heap: BinaryHeap<SpmPair>,
}

/// A BPE symbol: its token (NONE once merged away) and its neighbours.
#[derive(Debug, Clone, Copy)]
struct Sym {
    id: u32,
    prev: u32,
    next: u32,
}

/// A candidate BPE merge; the heap pops the lowest rank, then the leftmost.
#[derive(Debug, PartialEq, Eq)]
struct BpePair {
    rank: u32,
    left: u32,
    right: u32,
    left_id: u32,
    right_id: u32,
    merged: u32,
}

impl Ord for BpePair {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        o.rank.cmp(&self.rank).then(o.left.cmp(&self.left))
    }
}

impl PartialOrd for BpePair {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

/// A SentencePiece symbol: a byte span of the escaped text (empty once merged away).
#[derive(Debug, Clone, Copy)]
struct Span {
    start: usize,
    len: usize,
    prev: u32,
    next: u32,
}

/// A candidate SentencePiece merge; the heap pops the highest score, then the leftmost.
#[derive(Debug)]
struct SpmPair {
    score: f32,
    left: u32,
    right: u32,
    size: usize,
}

impl PartialEq for SpmPair {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == std::cmp::Ordering::Equal
    }
}

impl Eq for SpmPair {}

impl Ord for SpmPair {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.score.total_cmp(&o.score).then(o.left.cmp(&self.left))
    }
}

impl PartialOrd for SpmPair {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(kind: TokenizerKind, tokens: &[&'static str], types: Vec<i64>) -> Parts<'static> {
        Parts {
            kind,
            tokens: tokens.to_vec(),
            types: Some(types),
            scores: None,
            merges: Vec::new(),
            pre: "smollm",
            name: "",
            arch: "",
            bos: None,
            eos: None,
            unk: None,
            fim_set: [false; 6],
            add_bos: Some(false),
            add_space_prefix: Some(false),
        }
    }

    /// 256 GPT-2 byte tokens, then `extra` normal tokens, then `specials` with their types.
    fn bpe(merges: &[&'static str], extra: &[&str], specials: &[(&str, i64)]) -> Tokenizer {
        let mut tokens: Vec<&'static str> = (0..=255u8)
            .map(|b| &*Box::leak(byte_to_char(b).to_string().into_boxed_str()))
            .collect();
        let mut types = vec![1; 256];
        for t in extra {
            tokens.push(Box::leak(t.to_string().into_boxed_str()));
            types.push(1);
        }
        for (t, ty) in specials {
            tokens.push(Box::leak(t.to_string().into_boxed_str()));
            types.push(*ty);
        }
        let mut p = parts(TokenizerKind::Bpe, &tokens, types);
        p.merges = merges.to_vec();
        Tokenizer::from_parts(p).expect("builds")
    }

    fn words(text: &str, digits_first: bool) -> Vec<&str> {
        let mut cpts = Vec::new();
        classify(text, &mut cpts);
        let mut w = Vec::new();
        let pre = if digits_first {
            PreTokenizer::DigitsThenGpt2
        } else {
            PreTokenizer::Gpt2
        };
        pre_tokenize(pre, &cpts, &mut w);
        let at = |i: usize| cpts.get(i).map_or(text.len(), |c| c.at);
        w.into_iter().map(|(a, b)| &text[at(a)..at(b)]).collect()
    }

    #[test]
    fn gpt2_pre_tokenizer_splits_like_the_regex() {
        assert_eq!(
            words("I'm don't  they'LL\n\n x", false),
            ["I", "'m", " don", "'t", " ", " they", "'", "LL", "\n\n", " x"]
        );
        // Trailing whitespace stays together; the last space of a run prefixes the next word.
        assert_eq!(words("a   b  ", false), ["a", "  ", " b", "  "]);
        // Combining marks are not letters (\p{L}), though `char::is_alphabetic` says they are.
        assert_eq!(words("नमस्ते", false), ["नमस", "्", "त", "े"]);
        assert_eq!(words("ⓐ½x", false), ["ⓐ", "½", "x"]);
        assert_eq!(
            words("ab 12 3.5", true),
            ["ab", " ", "1", "2", " ", "3", ".", "5"]
        );
        assert_eq!(words("ab 12 3.5", false), ["ab", " 12", " 3", ".", "5"]);
    }

    #[test]
    fn bpe_applies_lowest_rank_first() {
        // "a b" ranks before "b c": "abc" becomes [ab, c] and then [abc].
        let t = bpe(&["a b", "b c", "ab c"], &["ab", "bc", "abc"], &[]);
        let id = |s: &str| t.token_id(s).expect("in vocab");
        assert_eq!(t.encode("abc", false, false), [id("abc")]);
        let t = bpe(&["b c", "a b"], &["ab", "bc"], &[]);
        let id = |s: &str| t.token_id(s).expect("in vocab");
        assert_eq!(t.encode("abc", false, false), [id("a"), id("bc")]);
        // Digits never merge under the smollm pre-tokenizer.
        let t = bpe(&["1 2"], &["12"], &[]);
        assert_eq!(t.encode("12", false, false).len(), 2);
        let text = "héllo wörld 🌍\n\t  x";
        assert_eq!(t.decode(&t.encode(text, false, false)), text.as_bytes());
    }

    #[test]
    fn special_tokens_split_out_longest_first_and_only_when_asked() {
        let t = bpe(
            &[],
            &[],
            &[("<|im_start|>", 3), ("<|im", 4), ("</s>", 4), ("<x>", 4)],
        );
        let id = |s: &str| t.token_id(s).expect("in vocab");
        let start = id("<|im_start|>");
        assert_eq!(
            t.encode("<|im_start|>x", false, true),
            [start, id("x")],
            "the longer control token wins over the user-defined prefix"
        );
        // Without parse_special the control token is text, but user-defined ones still split.
        let got = t.encode("<|im_start|>x", false, false);
        assert_eq!(got[0], id("<|im"));
        assert!(!got.contains(&start));
        assert!(
            t.token_bytes(start).is_empty(),
            "control tokens print nothing"
        );
        assert_eq!(t.token_bytes(id("<x>")), b"<x>");
        // "</s>" ends generation in llama.cpp, so it becomes a control token.
        assert!(t.is_control(id("</s>")));
        assert_eq!(t.encode("a</s>", false, true), [id("a"), id("</s>")]);
        assert_ne!(t.encode("a</s>", false, false)[1], id("</s>"));
    }

    #[test]
    fn phi3_special_tokens_swallow_following_whitespace() {
        let tokens: Vec<&'static str> = vec!["<unk>", "<s>", "</s>", "<|user|>", "▁", "x", "\n"];
        let mut p = parts(TokenizerKind::Spm, &tokens, vec![2, 3, 3, 3, 1, 1, 1]);
        p.name = "Phi-3 mini";
        p.scores = Some(vec![0.0; tokens.len()]);
        let t = Tokenizer::from_parts(p).expect("builds");
        // rstrip: the newline after <|user|> is dropped; not after <s>.
        assert_eq!(t.encode("<|user|>\nx", false, true), [3, 5]);
        assert_eq!(t.encode("<s>\nx", false, true), [1, 6, 5]);
    }

    fn spm(pieces: &[(&'static str, f32)], add_space_prefix: bool) -> Tokenizer {
        let mut tokens: Vec<&'static str> = vec!["<unk>", "<s>", "</s>"];
        let mut types = vec![2, 3, 3];
        let mut scores = vec![0.0; 3];
        for b in 0..=255u8 {
            tokens.push(Box::leak(format!("<0x{b:02X}>").into_boxed_str()));
            types.push(6);
            scores.push(0.0);
        }
        for (p, s) in pieces {
            tokens.push(p);
            types.push(1);
            scores.push(*s);
        }
        let mut p = parts(TokenizerKind::Spm, &tokens, types);
        p.scores = Some(scores);
        p.add_bos = None;
        p.add_space_prefix = Some(add_space_prefix);
        Tokenizer::from_parts(p).expect("builds")
    }

    #[test]
    fn spm_merges_by_score_and_falls_back_to_bytes() {
        let t = spm(
            &[
                ("a", 0.0),
                ("b", 0.0),
                ("c", 0.0),
                ("ab", -1.0),
                ("bc", -0.5),
                ("▁", 0.0),
                ("▁a", -0.1),
            ],
            false,
        );
        let id = |s: &str| t.token_id(s).expect("in vocab");
        assert!(t.add_bos(), "SentencePiece defaults to BOS");
        assert_eq!(t.bos_id(), Some(1));
        // "bc" scores higher than "ab".
        assert_eq!(t.encode("abc", true, false), [1, id("a"), id("bc")]);
        assert_eq!(t.encode(" a", false, false), [id("▁a")]);
        // "é" has no token: its two UTF-8 bytes become byte tokens.
        assert_eq!(t.encode("é", false, false), [id("<0xC3>"), id("<0xA9>")]);
        assert_eq!(t.decode(&t.encode("ab é", false, false)), "ab é".as_bytes());
        // A space is prefixed at the start and after special tokens when the vocabulary asks.
        let t = spm(&[("a", 0.0), ("▁", 0.0), ("▁a", -0.1)], true);
        let id = |s: &str| t.token_id(s).expect("in vocab");
        assert_eq!(t.encode("a</s>a", false, true), [id("▁a"), 2, id("▁a")]);
    }

    #[test]
    fn vocabulary_index_finds_every_token_and_later_duplicates_win() {
        let tokens: Vec<&'static str> = vec!["a", "b", "", "a", "ab", "[EMPTY_2]x"];
        let t =
            Tokenizer::from_parts(parts(TokenizerKind::Bpe, &tokens, vec![1; 6])).expect("builds");
        assert_eq!(t.token_id("a"), Some(3));
        assert_eq!(t.token_id("ab"), Some(4));
        assert_eq!(t.token_str(2), Some("[EMPTY_2]"));
        assert_eq!(t.token_id("zz"), None);
        assert_eq!(t.token_str(6), None);
        assert!(t.token_bytes(99).is_empty());
    }

    #[test]
    fn bad_metadata_is_an_error_not_a_panic() {
        let content = |md: Vec<(&str, Value)>| Content {
            magic: candle_core::quantized::gguf_file::VersionedMagic::GgufV3,
            metadata: md.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        };
        let tokens = || Value::Array(vec![Value::String("a".into()), Value::String("b".into())]);
        let err = |md| Tokenizer::from_gguf(&content(md)).expect_err("rejected");
        assert_eq!(
            err(vec![]),
            TokenizerError::MissingKey("tokenizer.ggml.model")
        );
        assert!(matches!(
            err(vec![("tokenizer.ggml.model", Value::String("bert".into()))]),
            TokenizerError::Unsupported(_)
        ));
        assert_eq!(
            err(vec![
                ("tokenizer.ggml.model", Value::String("gpt2".into())),
                ("tokenizer.ggml.tokens", tokens()),
            ]),
            TokenizerError::MissingKey("tokenizer.ggml.merges")
        );
        assert!(matches!(
            err(vec![
                ("tokenizer.ggml.model", Value::String("llama".into())),
                ("tokenizer.ggml.tokens", tokens()),
                (
                    "tokenizer.ggml.token_type",
                    Value::Array(vec![Value::I32(1)])
                ),
            ]),
            TokenizerError::BadMetadata(_)
        ));
        assert!(matches!(
            err(vec![
                ("tokenizer.ggml.model", Value::String("gpt2".into())),
                ("tokenizer.ggml.pre", Value::String("qwen2".into())),
                ("tokenizer.ggml.tokens", tokens()),
                ("tokenizer.ggml.merges", Value::Array(vec![])),
            ]),
            TokenizerError::Unsupported(_)
        ));
    }
}
