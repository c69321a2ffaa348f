//! Tokenizers rebuilt from GGUF metadata alone (no tokenizer.json), reproducing llama.cpp's
//! `llama-vocab.cpp` so token ids match it exactly:
//!
//! - special tokens (control, user-defined, unknown; longest first) are split out of the
//!   text before anything else; control and unknown ones only when `parse_special`;
//! - `gpt2` vocabularies: pre-tokenizer regexes by `tokenizer.ggml.pre` (SmolLM's splits
//!   every digit, then the GPT-2 pattern), bytes mapped to GPT-2's printable characters,
//!   then byte-level BPE applying the lowest-ranked merge first (leftmost on ties);
//! - `llama` vocabularies (SentencePiece, e.g. Gemma): spaces escaped to `▁`, UTF-8
//!   characters merged pairwise by highest token score (leftmost on ties), characters
//!   without a token falling back to `<0xXX>` byte tokens.

use std::collections::{BinaryHeap, HashMap};

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

/// GGUF token types (`tokenizer.ggml.token_type`).
mod token_type {
    pub const NORMAL: u8 = 1;
    pub const UNKNOWN: u8 = 2;
    pub const CONTROL: u8 = 3;
    pub const USER_DEFINED: u8 = 4;
    pub const BYTE: u8 = 6;
}

/// SentencePiece's escaped space.
const SPM_SPACE: &str = "\u{2581}";

/// The GPT-2 pre-tokenizer pattern, as llama.cpp writes it.
const GPT2_PATTERN: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// A tokenizer built from GGUF metadata; ids match llama.cpp's.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    kind: TokenizerKind,
    tokens: Vec<String>,
    types: Vec<u8>,
    scores: Vec<f32>,
    token_to_id: HashMap<String, u32>,
    /// BPE: (left id, right id) → (rank, merged id).
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Special tokens, longest text first (llama.cpp's `cache_special_tokens`).
    special: Vec<u32>,
    /// Bytes each token contributes to output text.
    pieces: Vec<Vec<u8>>,
    /// Token of each byte: GPT-2's byte character (BPE) or `<0xXX>` (SPM).
    byte_tokens: [Option<u32>; 256],
    /// Regexes applied in turn to split raw text into words (BPE).
    pre: Vec<Splitter>,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    add_bos: bool,
    add_space_prefix: bool,
}

#[derive(Debug, Clone)]
enum Splitter {
    Plain(regex::Regex),
    Fancy(Box<fancy_regex::Regex>),
}

impl Splitter {
    fn new(pattern: &str) -> Result<Self, TokenizerError> {
        let bad = |e: String| {
            TokenizerError::Unsupported(format!("pre-tokenizer pattern {pattern:?}: {e}"))
        };
        match regex::Regex::new(pattern) {
            Ok(r) => Ok(Self::Plain(r)),
            Err(_) => Ok(Self::Fancy(Box::new(
                fancy_regex::Regex::new(pattern).map_err(|e| bad(e.to_string()))?,
            ))),
        }
    }

    /// Splits `text` into matches and the text between them, as llama.cpp's
    /// `unicode_regex_split` keeps both.
    fn split<'t>(&self, text: &'t str, out: &mut Vec<&'t str>) {
        let mut last = 0;
        let mut push = |s: usize, e: usize, out: &mut Vec<&'t str>| {
            if s > last {
                out.push(&text[last..s]);
            }
            if e > s {
                out.push(&text[s..e]);
            }
            last = e;
        };
        match self {
            Self::Plain(r) => r
                .find_iter(text)
                .for_each(|m| push(m.start(), m.end(), out)),
            Self::Fancy(r) => {
                // A pattern that fails to run (backtrack limit) leaves the text unsplit.
                r.find_iter(text)
                    .filter_map(Result::ok)
                    .for_each(|m| push(m.start(), m.end(), out));
            }
        }
        if last < text.len() {
            out.push(&text[last..]);
        }
    }
}

/// GPT-2's reversible map from bytes to printable characters.
fn byte_to_char(b: u8) -> char {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    if printable(b) {
        char::from(b)
    } else {
        let n = (0..b).filter(|&x| !printable(x)).count() as u32;
        char::from_u32(256 + n).expect("256..=323 are valid code points")
    }
}

fn string_array<'a>(
    md: &'a HashMap<String, Value>,
    key: &'static str,
) -> Result<Vec<&'a str>, TokenizerError> {
    let v = md.get(key).ok_or(TokenizerError::MissingKey(key))?;
    let arr = v
        .to_vec()
        .map_err(|_| TokenizerError::BadMetadata(format!("{key} is not an array")))?;
    arr.iter()
        .map(|x| {
            x.to_string()
                .map(String::as_str)
                .map_err(|_| TokenizerError::BadMetadata(format!("{key} holds a non-string")))
        })
        .collect()
}

fn number_array(
    md: &HashMap<String, Value>,
    key: &'static str,
) -> Result<Option<Vec<f64>>, TokenizerError> {
    let Some(v) = md.get(key) else {
        return Ok(None);
    };
    let arr = v
        .to_vec()
        .map_err(|_| TokenizerError::BadMetadata(format!("{key} is not an array")))?;
    arr.iter()
        .map(|x| match x {
            Value::I32(v) => Ok(f64::from(*v)),
            Value::U32(v) => Ok(f64::from(*v)),
            Value::I8(v) => Ok(f64::from(*v)),
            Value::U8(v) => Ok(f64::from(*v)),
            Value::F32(v) => Ok(f64::from(*v)),
            Value::F64(v) => Ok(*v),
            other => Err(TokenizerError::BadMetadata(format!(
                "{key} holds {other:?}"
            ))),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

impl Tokenizer {
    /// Builds the tokenizer from a GGUF's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(content: &Content) -> Result<Self, TokenizerError> {
        let md = &content.metadata;
        let model = md
            .get("tokenizer.ggml.model")
            .ok_or(TokenizerError::MissingKey("tokenizer.ggml.model"))?
            .to_string()
            .map_err(|_| {
                TokenizerError::BadMetadata("tokenizer.ggml.model is not a string".into())
            })?;
        let kind = match model.as_str() {
            "gpt2" => TokenizerKind::Bpe,
            "llama" => TokenizerKind::Spm,
            other => {
                return Err(TokenizerError::Unsupported(format!(
                    "tokenizer model {other:?} (supported: gpt2, llama)"
                )))
            }
        };
        let tokens: Vec<String> = string_array(md, "tokenizer.ggml.tokens")?
            .into_iter()
            .map(str::to_owned)
            .collect();
        let n = tokens.len();
        let types: Vec<u8> = match number_array(md, "tokenizer.ggml.token_type")? {
            Some(t) if t.len() == n => t.into_iter().map(|v| v as u8).collect(),
            Some(t) => {
                return Err(TokenizerError::BadMetadata(format!(
                    "{} token types for {n} tokens",
                    t.len()
                )))
            }
            None => vec![token_type::NORMAL; n],
        };
        let scores: Vec<f32> = match number_array(md, "tokenizer.ggml.scores")? {
            Some(s) if s.len() == n => s.into_iter().map(|v| v as f32).collect(),
            Some(s) => {
                return Err(TokenizerError::BadMetadata(format!(
                    "{} scores for {n} tokens",
                    s.len()
                )))
            }
            None if kind == TokenizerKind::Spm => {
                return Err(TokenizerError::MissingKey("tokenizer.ggml.scores"))
            }
            None => Vec::new(),
        };
        let merges: Vec<&str> = match kind {
            TokenizerKind::Bpe => string_array(md, "tokenizer.ggml.merges")?,
            TokenizerKind::Spm => Vec::new(),
        };
        let id = |key: &str| {
            md.get(key)
                .and_then(|v| v.to_u32().ok())
                .filter(|&i| (i as usize) < n)
        };
        let flag = |key: &str| md.get(key).and_then(|v| v.to_bool().ok());
        let pre = md
            .get("tokenizer.ggml.pre")
            .and_then(|v| v.to_string().ok())
            .map(String::as_str)
            .unwrap_or("default");
        Self::from_parts(
            kind,
            tokens,
            types,
            scores,
            &merges,
            pre,
            Specials {
                bos: id("tokenizer.ggml.bos_token_id"),
                eos: id("tokenizer.ggml.eos_token_id"),
                unk: id("tokenizer.ggml.unknown_token_id"),
                add_bos: flag("tokenizer.ggml.add_bos_token").unwrap_or(kind == TokenizerKind::Spm),
                add_space_prefix: flag("tokenizer.ggml.add_space_prefix")
                    .unwrap_or(kind == TokenizerKind::Spm),
            },
        )
    }

    fn from_parts(
        kind: TokenizerKind,
        tokens: Vec<String>,
        types: Vec<u8>,
        scores: Vec<f32>,
        merges: &[&str],
        pre: &str,
        sp: Specials,
    ) -> Result<Self, TokenizerError> {
        let mut token_to_id = HashMap::with_capacity(tokens.len());
        for (i, t) in tokens.iter().enumerate() {
            // Later duplicates win, as in llama.cpp's map.
            token_to_id.insert(t.clone(), i as u32);
        }
        let mut merge_map = HashMap::with_capacity(merges.len());
        for (rank, m) in merges.iter().enumerate() {
            // llama.cpp splits at the first space after the first character.
            let split = m
                .char_indices()
                .skip(1)
                .find(|&(_, c)| c == ' ')
                .map(|(i, _)| i);
            let Some(at) = split else {
                return Err(TokenizerError::BadMetadata(format!(
                    "merge {m:?} has no space"
                )));
            };
            let (a, b) = (&m[..at], &m[at + 1..]);
            if let (Some(&ia), Some(&ib), Some(&im)) = (
                token_to_id.get(a),
                token_to_id.get(b),
                token_to_id.get(&format!("{a}{b}")),
            ) {
                merge_map.entry((ia, ib)).or_insert((rank as u32, im));
            }
        }
        let mut special: Vec<u32> = (0..tokens.len() as u32)
            .filter(|&i| {
                matches!(
                    types[i as usize],
                    token_type::CONTROL | token_type::USER_DEFINED | token_type::UNKNOWN
                ) && !tokens[i as usize].is_empty()
            })
            .collect();
        special.sort_by(|&a, &b| {
            tokens[b as usize]
                .len()
                .cmp(&tokens[a as usize].len())
                .then(a.cmp(&b))
        });

        let char_to_byte: HashMap<char, u8> = (0..=255u8).map(|b| (byte_to_char(b), b)).collect();
        let pieces: Vec<Vec<u8>> = tokens
            .iter()
            .zip(&types)
            .map(|(text, &ty)| match (kind, ty) {
                (_, token_type::CONTROL | token_type::UNKNOWN) => Vec::new(),
                (_, token_type::USER_DEFINED) => text.as_bytes().to_vec(),
                (TokenizerKind::Spm, token_type::BYTE) => {
                    parse_byte_token(text).map(|b| vec![b]).unwrap_or_default()
                }
                (TokenizerKind::Spm, _) => text.replace(SPM_SPACE, " ").into_bytes(),
                (TokenizerKind::Bpe, _) => {
                    let mut out = Vec::with_capacity(text.len());
                    for c in text.chars() {
                        match char_to_byte.get(&c) {
                            Some(&b) => out.push(b),
                            None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
                        }
                    }
                    out
                }
            })
            .collect();
        let mut byte_tokens = [None; 256];
        for (b, slot) in byte_tokens.iter_mut().enumerate() {
            *slot = match kind {
                TokenizerKind::Bpe => token_to_id
                    .get(byte_to_char(b as u8).encode_utf8(&mut [0; 4]) as &str)
                    .copied(),
                TokenizerKind::Spm => token_to_id.get(&format!("<0x{b:02X}>")).copied(),
            };
        }
        let pre = match kind {
            TokenizerKind::Spm => Vec::new(),
            TokenizerKind::Bpe => match pre {
                // llama.cpp: STARCODER, REFACT, COMMAND_R, SMOLLM, CODESHELL, EXAONE, MINERVA.
                "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b" => {
                    vec![Splitter::new(r"\p{N}")?, Splitter::new(GPT2_PATTERN)?]
                }
                "gpt-2" | "gpt2" | "default" | "phi-2" | "jina-es" | "jina-de" | "jina-v2-es" | "jina-v2-de" => vec![Splitter::new(GPT2_PATTERN)?],
                other => return Err(TokenizerError::Unsupported(format!("BPE pre-tokenizer {other:?} (supported: smollm, starcoder, gpt2, default and their aliases)"))),
            },
        };
        Ok(Self {
            kind,
            tokens,
            types,
            scores,
            token_to_id,
            merges: merge_map,
            special,
            pieces,
            byte_tokens,
            pre,
            bos: sp.bos,
            eos: sp.eos,
            unk: sp.unk,
            add_bos: sp.add_bos,
            add_space_prefix: sp.add_space_prefix,
        })
    }

    /// Token ids of `text`, optionally after BOS; `parse_special` turns text such as
    /// `<|im_start|>` into its control token (user-defined tokens are always matched).
    pub fn encode(&self, text: &str, add_bos: bool, parse_special: bool) -> Vec<u32> {
        let mut out = Vec::new();
        if add_bos {
            out.extend(self.bos);
        }
        let mut prev_special = true;
        for frag in self.partition(text, parse_special) {
            match frag {
                Fragment::Token(id) => {
                    out.push(id);
                    prev_special = true;
                }
                Fragment::Text(t) => {
                    match self.kind {
                        TokenizerKind::Bpe => self.encode_bpe(t, &mut out),
                        TokenizerKind::Spm => {
                            let mut s = String::with_capacity(t.len() + 3);
                            if self.add_space_prefix && prev_special {
                                s.push(' ');
                            }
                            s.push_str(t);
                            self.encode_spm(&s.replace(' ', SPM_SPACE), &mut out);
                        }
                    }
                    prev_special = false;
                }
            }
        }
        out
    }

    /// Splits out special tokens, longest first (llama.cpp's `tokenizer_st_partition`).
    fn partition<'t>(&self, text: &'t str, parse_special: bool) -> Vec<Fragment<'t>> {
        let mut frags = vec![Fragment::Text(text)];
        if text.is_empty() {
            return Vec::new();
        }
        for &id in &self.special {
            let ty = self.types[id as usize];
            if !parse_special && matches!(ty, token_type::CONTROL | token_type::UNKNOWN) {
                continue;
            }
            let pat = self.tokens[id as usize].as_str();
            if !frags
                .iter()
                .any(|f| matches!(f, Fragment::Text(t) if t.contains(pat)))
            {
                continue;
            }
            let mut next = Vec::with_capacity(frags.len() + 2);
            for f in frags {
                let Fragment::Text(mut t) = f else {
                    next.push(f);
                    continue;
                };
                while let Some(at) = t.find(pat) {
                    if at > 0 {
                        next.push(Fragment::Text(&t[..at]));
                    }
                    next.push(Fragment::Token(id));
                    t = &t[at + pat.len()..];
                }
                if !t.is_empty() {
                    next.push(Fragment::Text(t));
                }
            }
            frags = next;
        }
        frags
    }

    fn encode_bpe(&self, text: &str, out: &mut Vec<u32>) {
        let mut words = vec![text];
        for splitter in &self.pre {
            let mut next = Vec::with_capacity(words.len() * 2);
            for w in words {
                splitter.split(w, &mut next);
            }
            words = next;
        }
        let mut syms: Vec<Sym> = Vec::new();
        let mut heap: BinaryHeap<BpePair> = BinaryHeap::new();
        for word in words {
            syms.clear();
            heap.clear();
            for (i, b) in word.bytes().enumerate() {
                let id = self.byte_tokens[b as usize];
                syms.push(Sym {
                    id: id.unwrap_or(u32::MAX),
                    prev: i as isize - 1,
                    next: if i + 1 == word.len() {
                        -1
                    } else {
                        i as isize + 1
                    },
                    alive: true,
                    byte: b,
                });
            }
            for i in 1..syms.len() {
                self.push_bpe_pair(&syms, i - 1, i, &mut heap);
            }
            while let Some(p) = heap.pop() {
                let (l, r) = (p.left, p.right);
                if !syms[l].alive
                    || !syms[r].alive
                    || syms[l].next != r as isize
                    || syms[l].id != p.left_id
                    || syms[r].id != p.right_id
                {
                    continue;
                }
                syms[l].id = p.merged;
                syms[r].alive = false;
                syms[l].next = syms[r].next;
                if syms[r].next >= 0 {
                    let nx = syms[r].next as usize;
                    syms[nx].prev = l as isize;
                }
                if syms[l].prev >= 0 {
                    self.push_bpe_pair(&syms, syms[l].prev as usize, l, &mut heap);
                }
                if syms[l].next >= 0 {
                    self.push_bpe_pair(&syms, l, syms[l].next as usize, &mut heap);
                }
            }
            let mut i = if syms.is_empty() { -1 } else { 0 };
            while i >= 0 {
                let s = &syms[i as usize];
                if s.id != u32::MAX {
                    out.push(s.id);
                } else if let Some(t) = self
                    .token_to_id
                    .get(byte_to_char(s.byte).encode_utf8(&mut [0; 4]) as &str)
                {
                    out.push(*t);
                }
                i = s.next;
            }
        }
    }

    fn push_bpe_pair(&self, syms: &[Sym], l: usize, r: usize, heap: &mut BinaryHeap<BpePair>) {
        let (a, b) = (syms[l].id, syms[r].id);
        if let Some(&(rank, merged)) = self.merges.get(&(a, b)) {
            heap.push(BpePair {
                rank,
                left: l,
                right: r,
                left_id: a,
                right_id: b,
                merged,
            });
        }
    }

    fn encode_spm(&self, text: &str, out: &mut Vec<u32>) {
        // Symbols are byte spans of `text`, starting as single UTF-8 characters.
        let mut syms: Vec<Span> = Vec::new();
        for (i, (start, c)) in text.char_indices().enumerate() {
            let len = c.len_utf8();
            syms.push(Span {
                start,
                len,
                prev: i as isize - 1,
                next: if start + len == text.len() {
                    -1
                } else {
                    i as isize + 1
                },
            });
        }
        let mut heap: BinaryHeap<SpmPair> = BinaryHeap::new();
        for i in 1..syms.len() {
            self.push_spm_pair(text, &syms, i - 1, i, &mut heap);
        }
        while let Some(p) = heap.pop() {
            let (l, r) = (p.left, p.right);
            if syms[l].len == 0 || syms[r].len == 0 || syms[l].len + syms[r].len != p.size {
                continue;
            }
            syms[l].len += syms[r].len;
            syms[r].len = 0;
            syms[l].next = syms[r].next;
            if syms[r].next >= 0 {
                let nx = syms[r].next as usize;
                syms[nx].prev = l as isize;
            }
            if syms[l].prev >= 0 {
                self.push_spm_pair(text, &syms, syms[l].prev as usize, l, &mut heap);
            }
            if syms[l].next >= 0 {
                self.push_spm_pair(text, &syms, l, syms[l].next as usize, &mut heap);
            }
        }
        let mut i = if syms.is_empty() { -1 } else { 0 };
        while i >= 0 {
            let s = &syms[i as usize];
            let piece = &text[s.start..s.start + s.len];
            match self.token_to_id.get(piece) {
                Some(&id) => out.push(id),
                None => {
                    for b in piece.bytes() {
                        let fallback = self.byte_tokens[b as usize]
                            .or_else(|| self.token_to_id.get(&(b as char).to_string()).copied())
                            .or(self.unk);
                        out.extend(fallback);
                    }
                }
            }
            i = s.next;
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
        let piece = &text[a.start..b.start + b.len];
        if let Some(&id) = self.token_to_id.get(piece) {
            heap.push(SpmPair {
                score: self.scores.get(id as usize).copied().unwrap_or(0.0),
                left: l,
                right: r,
                size: a.len + b.len,
            });
        }
    }

    /// Bytes this token adds to output text (nothing for control tokens, as llama.cpp's
    /// `token_to_piece` without `special`).
    pub fn token_bytes(&self, id: u32) -> &[u8] {
        self.pieces.get(id as usize).map_or(&[], Vec::as_slice)
    }

    /// Concatenated output bytes of `ids` (may end inside a UTF-8 character).
    pub fn decode(&self, ids: &[u32]) -> Vec<u8> {
        ids.iter()
            .flat_map(|&i| self.token_bytes(i).iter().copied())
            .collect()
    }

    /// Id of the vocabulary entry spelled exactly `piece`.
    pub fn token_id(&self, piece: &str) -> Option<u32> {
        self.token_to_id.get(piece).copied()
    }

    /// The vocabulary entry of `id`, as stored in the GGUF.
    pub fn token_str(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// Whether `id` is a control token (chat markers, BOS/EOS).
    pub fn is_control(&self, id: u32) -> bool {
        self.types.get(id as usize) == Some(&token_type::CONTROL)
    }

    /// Beginning-of-sequence token.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// End-of-sequence token.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Whether prompts start with BOS (`tokenizer.ggml.add_bos_token`).
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The algorithm of this vocabulary.
    pub fn kind(&self) -> TokenizerKind {
        self.kind
    }
}

struct Specials {
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    add_bos: bool,
    add_space_prefix: bool,
}

fn parse_byte_token(text: &str) -> Option<u8> {
    let hex = text.strip_prefix("<0x")?.strip_suffix('>')?;
    u8::from_str_radix(hex, 16).ok()
}

enum Fragment<'t> {
    Text(&'t str),
    Token(u32),
}

struct Sym {
    id: u32,
    prev: isize,
    next: isize,
    alive: bool,
    byte: u8,
}

/// A candidate BPE merge; the heap pops the lowest rank, then the leftmost.
#[derive(PartialEq, Eq)]
struct BpePair {
    rank: u32,
    left: usize,
    right: usize,
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

struct Span {
    start: usize,
    len: usize,
    prev: isize,
    next: isize,
}

/// A candidate SPM merge; the heap pops the highest score, then the leftmost.
struct SpmPair {
    score: f32,
    left: usize,
    right: usize,
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

    fn specials(add_bos: bool) -> Specials {
        Specials {
            bos: None,
            eos: None,
            unk: None,
            add_bos,
            add_space_prefix: false,
        }
    }

    fn bpe(merges: &[&str], extra: &[&str]) -> Tokenizer {
        let mut tokens: Vec<String> = (0..=255u8).map(|b| byte_to_char(b).to_string()).collect();
        tokens.extend(extra.iter().map(|s| s.to_string()));
        tokens.push("<|im_start|>".into());
        let mut types = vec![token_type::NORMAL; tokens.len()];
        *types.last_mut().expect("nonempty") = token_type::CONTROL;
        Tokenizer::from_parts(
            TokenizerKind::Bpe,
            tokens,
            types,
            Vec::new(),
            merges,
            "smollm",
            specials(false),
        )
        .expect("builds")
    }

    #[test]
    fn bpe_applies_lowest_rank_first_and_splits_digits() {
        // "ab" ranks before "bc": "abc" becomes [ab, c], not [a, bc].
        let t = bpe(&["a b", "b c", "ab c"], &["ab", "bc", "abc"]);
        let id = |s: &str| t.token_id(s).expect("in vocab");
        assert_eq!(t.encode("abc", false, false), vec![id("abc")]);
        let t = bpe(&["b c", "a b"], &["ab", "bc"]);
        assert_eq!(
            t.encode("abc", false, false),
            vec![t.token_id("a").expect("a"), t.token_id("bc").expect("bc")]
        );
        // Digits are single words under the smollm pre-tokenizer.
        let t = bpe(&["1 2"], &["12"]);
        assert_eq!(t.encode("12", false, false).len(), 2);
    }

    #[test]
    fn bpe_special_tokens_are_parsed_only_when_asked_and_round_trip() {
        let t = bpe(&[], &[]);
        let start = t.token_id("<|im_start|>").expect("special");
        assert_eq!(
            t.encode("<|im_start|>x", false, true),
            vec![start, t.token_id("x").expect("x")]
        );
        assert_eq!(t.encode("<|im_start|>x", false, false).len(), 13);
        let text = "héllo wörld 🌍\n\t";
        assert_eq!(t.decode(&t.encode(text, false, false)), text.as_bytes());
        assert!(
            t.token_bytes(start).is_empty(),
            "control tokens print nothing"
        );
    }

    fn spm(pieces: &[(&str, f32)]) -> Tokenizer {
        let mut tokens = vec!["<unk>".to_string()];
        let mut types = vec![token_type::UNKNOWN];
        let mut scores = vec![0.0];
        for b in 0..=255u8 {
            tokens.push(format!("<0x{b:02X}>"));
            types.push(token_type::BYTE);
            scores.push(0.0);
        }
        for (p, s) in pieces {
            tokens.push(p.to_string());
            types.push(token_type::NORMAL);
            scores.push(*s);
        }
        Tokenizer::from_parts(
            TokenizerKind::Spm,
            tokens,
            types,
            scores,
            &[],
            "default",
            Specials {
                unk: Some(0),
                ..specials(true)
            },
        )
        .expect("builds")
    }

    #[test]
    fn spm_merges_by_score_and_falls_back_to_bytes() {
        let t = spm(&[
            ("a", 0.0),
            ("b", 0.0),
            ("c", 0.0),
            ("ab", -1.0),
            ("bc", -0.5),
            ("▁", 0.0),
            ("▁a", -0.1),
        ]);
        let id = |s: &str| t.token_id(s).expect("in vocab");
        // "bc" scores higher than "ab".
        assert_eq!(t.encode("abc", false, false), vec![id("a"), id("bc")]);
        assert_eq!(t.encode(" a", false, false), vec![id("▁a")]);
        // "é" has no token: its two UTF-8 bytes become byte tokens.
        assert_eq!(
            t.encode("é", false, false),
            vec![id("<0xC3>"), id("<0xA9>")]
        );
        assert_eq!(t.decode(&t.encode("ab é", false, false)), "ab é".as_bytes());
    }
}
