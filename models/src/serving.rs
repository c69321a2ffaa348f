//! Building blocks of our serving models (`llama.rs`, `gemma3.rs`): projections that run on
//! our kernels straight from the memory-mapped GGUF (or through candle for formats we have
//! no kernel for), quantized embedding rows, RMSNorm, rope tables, and grouped-query
//! attention over a per-layer KV cache read in place. Plain slices, no tensor graph: the
//! token loop allocates nothing it can reuse.

use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul};
use candle_core::{Device, Module, Tensor};
use half::{f16, slice::HalfFloatSliceExt};
use rayon::prelude::*;

use crate::kernels::{self, BlockQ8, Format, QMatrix, QK};

fn err(msg: String) -> candle_core::Error {
    candle_core::Error::Msg(msg)
}

/// A required integer hyperparameter, so a missing or mistyped key is one clear error.
pub(crate) fn md_usize(ct: &gguf_file::Content, key: &str) -> candle_core::Result<usize> {
    let v = ct
        .metadata
        .get(key)
        .ok_or_else(|| err(format!("missing {key}")))?;
    v.to_u32()
        .map(|v| v as usize)
        .map_err(|_| err(format!("{key} is not an unsigned 32-bit integer")))
}

/// An optional float hyperparameter with the default llama.cpp uses.
pub(crate) fn md_f32(ct: &gguf_file::Content, key: &str, default: f32) -> f32 {
    ct.metadata
        .get(key)
        .and_then(|v| v.to_f32().ok())
        .unwrap_or(default)
}

/// Refuses rope scaling (linear/YaRN factors, llama3's `rope_freqs`): our rope tables do not
/// apply it, and silently ignoring it would serve wrong logits under a valid module id.
pub(crate) fn refuse_rope_scaling(ct: &gguf_file::Content, arch: &str) -> candle_core::Result<()> {
    let kind = ct
        .metadata
        .get(&format!("{arch}.rope.scaling.type"))
        .and_then(|v| v.to_string().ok())
        .map(String::as_str);
    let factor = md_f32(ct, &format!("{arch}.rope.scaling.factor"), 1.0);
    if kind.is_some_and(|k| k != "none")
        || factor != 1.0
        || ct.tensor_infos.contains_key("rope_freqs.weight")
    {
        return Err(err(format!(
            "rope scaling ({}, factor {factor}) is not supported yet",
            kind.unwrap_or("rope_freqs")
        )));
    }
    Ok(())
}

/// The formats our kernels multiply (the rest go through candle). The K-quants have tile
/// kernels only: with the row kernels (`TESSERA_KERNEL=rows`) candle keeps them.
fn own_format(dt: GgmlDType) -> Option<Format> {
    match dt {
        GgmlDType::Q4_1 => Some(Format::Q4_1),
        GgmlDType::Q8_0 => Some(Format::Q8_0),
        GgmlDType::Q5_0 => Some(Format::Q5_0),
        GgmlDType::Q4K if kernels::tiles_enabled() => Some(Format::Q4K),
        GgmlDType::Q6K if kernels::tiles_enabled() => Some(Format::Q6K),
        _ => None,
    }
}

/// Runs `tokens` at `pos` on one sequence's `cache` through a model's batched `step`: the
/// single-sequence entry points (`forward`, `forward_rows`) of every serving model.
pub(crate) fn step_one(
    cache: &mut KvCache,
    tokens: &[u32],
    pos: usize,
    logits_from: usize,
    step: impl FnOnce(&mut [SeqStep<'_>]) -> candle_core::Result<Vec<f32>>,
) -> candle_core::Result<Vec<f32>> {
    if pos != cache.len {
        return Err(err(format!(
            "{} tokens at position {pos} do not follow the {} cached positions",
            tokens.len(),
            cache.len
        )));
    }
    step(&mut [SeqStep {
        cache,
        tokens,
        logits_from,
    }])
}

/// Reads tensors of a GGUF that is mapped in memory.
pub(crate) struct TensorSource<'a> {
    pub ct: &'a gguf_file::Content,
    pub mmap: &'a Arc<memmap2::Mmap>,
}

impl TensorSource<'_> {
    /// Byte range, dtype and (rows, cols …) dims of a tensor, checked to lie in the file.
    pub fn range(&self, name: &str) -> candle_core::Result<(Range<usize>, GgmlDType, Vec<usize>)> {
        let t = self
            .ct
            .tensor_infos
            .get(name)
            .ok_or_else(|| err(format!("missing tensor {name}")))?;
        let span = crate::gguf::tensor_span(self.ct, t)
            .filter(|s| s.end <= self.mmap.len() as u64)
            .ok_or_else(|| err(format!("tensor {name} does not fit in the file")))?;
        let range = span.start as usize..span.end as usize;
        Ok((range, t.ggml_dtype, t.shape.dims().to_vec()))
    }

    /// An F32 vector of `len` values (norm weights).
    pub fn f32_vec(&self, name: &str, len: usize) -> candle_core::Result<Vec<f32>> {
        let (r, dt, dims) = self.range(name)?;
        if dt != GgmlDType::F32 || dims != [len] {
            return Err(err(format!(
                "{name}: expected F32 [{len}], got {dt:?} {dims:?}"
            )));
        }
        Ok(self.mmap[r]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect())
    }

    /// A projection matrix of `rows` outputs by `cols` inputs.
    pub fn linear(&self, name: &str, rows: usize, cols: usize) -> candle_core::Result<Linear> {
        let (r, dt, dims) = self.range(name)?;
        if dims != [rows, cols] {
            return Err(err(format!(
                "{name}: expected a [{rows}, {cols}] matrix, got {dims:?}"
            )));
        }
        match own_format(dt) {
            Some(format) => {
                let m = QMatrix::new(format, &self.mmap[r.clone()], rows, cols)
                    .map_err(|e| err(format!("{name}: {e}")))?;
                if kernels::tiles_enabled() {
                    if let Some(p) = kernels::Packed::new(&m) {
                        return Ok(Linear::Packed(p));
                    }
                }
                Ok(Linear::Own {
                    format,
                    bytes: r,
                    rows,
                    cols,
                })
            }
            None => {
                let qt = self.ct.tensor(
                    &mut std::io::Cursor::new(&self.mmap[..]),
                    name,
                    &Device::Cpu,
                )?;
                // candle multiplies Q6_K by one row with a GEMV on the compact blocks and by
                // several rows on repacked tiles, which quantize the activations differently:
                // a replay (many rows) would then disagree with decoding (one row) by up to
                // a logit. Such weights always take the many-row path.
                let pad_single_row = qt.dtype() == GgmlDType::Q6K;
                Ok(Linear::Candle {
                    mm: QMatMul::from_qtensor(qt)?,
                    rows,
                    cols,
                    pad_single_row,
                })
            }
        }
    }

    /// Projections `(name, rows)` of width `cols` that read the same input: repacked as one
    /// stacked matrix when they can be (same tile format), else kept apart.
    pub fn fused(&self, parts: &[(&str, usize)], cols: usize) -> candle_core::Result<Fused> {
        let mut mats = Vec::with_capacity(parts.len());
        for &(name, rows) in parts {
            let (r, dt, dims) = self.range(name)?;
            let Some(format) = own_format(dt) else {
                break;
            };
            if dims != [rows, cols] {
                break;
            }
            match QMatrix::new(format, &self.mmap[r], rows, cols) {
                Ok(m) => mats.push(m),
                Err(_) => break,
            }
        }
        if mats.len() == parts.len() && kernels::tiles_enabled() {
            if let Some(w) = kernels::Packed::stacked(&mats) {
                return Ok(Fused::Stacked {
                    w: Linear::Packed(w),
                    widths: parts.iter().map(|&(_, rows)| rows).collect(),
                });
            }
        }
        let each = parts
            .iter()
            .map(|&(name, rows)| self.linear(name, rows, cols))
            .collect::<candle_core::Result<_>>()?;
        Ok(Fused::Each(each))
    }

    /// The output projection: `output.weight`, or the token embedding when the two are tied.
    pub fn output(&self, vocab: usize, dim: usize) -> candle_core::Result<Linear> {
        let name = if self.ct.tensor_infos.contains_key("output.weight") {
            "output.weight"
        } else {
            "token_embd.weight"
        };
        self.linear(name, vocab, dim)
    }

    /// The token embedding of width `dim`, kept quantized when it is Q8_0.
    pub fn embedding(&self, name: &str, dim: usize) -> candle_core::Result<Embedding> {
        let (r, dt, dims) = self.range(name)?;
        let vocab = match dims[..] {
            [vocab, d] if d == dim && vocab > 0 => vocab,
            _ => {
                return Err(err(format!(
                    "{name}: expected a [vocab, {dim}] table, got {dims:?}"
                )))
            }
        };
        if dt == GgmlDType::Q8_0 && dim.is_multiple_of(QK) {
            return Ok(Embedding {
                vocab,
                dim,
                table: EmbeddingTable::Q8_0(r),
            });
        }
        let t = self
            .ct
            .tensor(
                &mut std::io::Cursor::new(&self.mmap[..]),
                name,
                &Device::Cpu,
            )?
            .dequantize(&Device::Cpu)?;
        Ok(Embedding {
            vocab,
            dim,
            table: EmbeddingTable::F32(t.flatten_all()?.to_vec1()?),
        })
    }
}

/// Projections that read the same input, run as one product when they can be stacked
/// (fused QKV, fused gate/up: one parallel dispatch instead of three or two), else one by
/// one; either way each part's output lands in its own buffer.
pub(crate) enum Fused {
    Stacked { w: Linear, widths: Vec<usize> },
    Each(Vec<Linear>),
}

impl Fused {
    /// Output features of part `i`.
    pub fn rows(&self, i: usize) -> usize {
        match self {
            Self::Stacked { widths, .. } => widths[i],
            Self::Each(parts) => parts[i].rows(),
        }
    }

    /// Every part's `out = x · Wᵀ` for `n` rows, into `outs` (one per part); `tmp` holds
    /// a stacked product before it is split.
    #[allow(clippy::too_many_arguments)] // the projection's inputs and its outputs
    pub fn forward(
        &self,
        file: &[u8],
        path: kernels::Path,
        x: &[f32],
        xq: &[BlockQ8],
        n: usize,
        tmp: &mut Vec<f32>,
        outs: &mut [&mut Vec<f32>],
    ) -> candle_core::Result<()> {
        match self {
            Self::Each(parts) => {
                for (l, out) in parts.iter().zip(outs.iter_mut()) {
                    l.forward(file, path, x, xq, n, out)?;
                }
            }
            Self::Stacked { w, widths } => {
                w.forward(file, path, x, xq, n, tmp)?;
                let total: usize = widths.iter().sum();
                let mut off = 0;
                for (&width, out) in widths.iter().zip(outs.iter_mut()) {
                    out.clear();
                    for row in tmp.chunks_exact(total).take(n) {
                        out.extend_from_slice(&row[off..off + width]);
                    }
                    off += width;
                }
            }
        }
        Ok(())
    }
}

/// A projection: our tile kernels on weights repacked at load, our row kernels straight
/// from the mapping, or candle for other formats.
pub(crate) enum Linear {
    Packed(kernels::Packed),
    Own {
        format: Format,
        bytes: Range<usize>,
        rows: usize,
        cols: usize,
    },
    Candle {
        mm: QMatMul,
        rows: usize,
        cols: usize,
        /// Run one-row products as two rows (see `TensorSource::linear`).
        pad_single_row: bool,
    },
}

impl Linear {
    /// Output features.
    pub fn rows(&self) -> usize {
        match self {
            Self::Packed(p) => p.rows(),
            Self::Own { rows, .. } | Self::Candle { rows, .. } => *rows,
        }
    }

    /// `out = x · Wᵀ` for `n` rows; `xq` is `x` quantized by [`quantize_rows`] (own kernels).
    pub fn forward(
        &self,
        file: &[u8],
        path: kernels::Path,
        x: &[f32],
        xq: &[BlockQ8],
        n: usize,
        out: &mut Vec<f32>,
    ) -> candle_core::Result<()> {
        match self {
            Self::Packed(p) => {
                out.resize(n * p.rows(), 0.0);
                kernels::matmul_packed(path, p, &xq[..n * p.cols() / QK], n, out);
            }
            Self::Own {
                format,
                bytes,
                rows,
                cols,
            } => {
                let m = QMatrix::new(*format, &file[bytes.clone()], *rows, *cols)
                    .map_err(|e| err(e.to_string()))?;
                out.resize(n * rows, 0.0);
                kernels::matmul(path, &m, &xq[..n * cols / QK], n, out);
            }
            Self::Candle {
                mm,
                rows,
                cols,
                pad_single_row,
            } => {
                out.clear();
                if n == 1 && *pad_single_row {
                    let mut two = Vec::with_capacity(2 * cols);
                    two.extend_from_slice(&x[..*cols]);
                    two.extend_from_slice(&x[..*cols]);
                    let t = Tensor::from_vec(two, (2, *cols), &Device::Cpu)?;
                    let y = mm.forward(&t)?.flatten_all()?.to_vec1::<f32>()?;
                    out.extend_from_slice(&y[..*rows]);
                } else {
                    let t = Tensor::from_slice(&x[..n * cols], (n, *cols), &Device::Cpu)?;
                    out.extend(mm.forward(&t)?.flatten_all()?.to_vec1::<f32>()?);
                }
            }
        }
        Ok(())
    }
}

/// Token embedding table.
pub(crate) struct Embedding {
    pub vocab: usize,
    pub dim: usize,
    table: EmbeddingTable,
}

enum EmbeddingTable {
    Q8_0(Range<usize>),
    F32(Vec<f32>),
}

impl Embedding {
    /// Writes the row of `token` into `out`, dequantizing only that row.
    pub fn row(&self, file: &[u8], token: u32, out: &mut [f32]) -> candle_core::Result<()> {
        let t = token as usize;
        if t >= self.vocab {
            return Err(err(format!(
                "token {token} outside the vocabulary of {}",
                self.vocab
            )));
        }
        match &self.table {
            EmbeddingTable::Q8_0(r) => {
                const BLOCK: usize = 34;
                let row_bytes = self.dim / QK * BLOCK;
                let row = &file[r.start + t * row_bytes..r.start + (t + 1) * row_bytes];
                for (b, o) in row.chunks_exact(BLOCK).zip(out.chunks_exact_mut(QK)) {
                    let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                    for (q, o) in b[2..].iter().zip(o) {
                        *o = f32::from(*q as i8) * d;
                    }
                }
            }
            EmbeddingTable::F32(table) => {
                out.copy_from_slice(&table[t * self.dim..(t + 1) * self.dim])
            }
        }
        Ok(())
    }
}

/// Quantizes rows of width `cols` once, for every own-kernel projection that reads them.
/// Widths that are not whole Q8 blocks are left alone: no own-kernel matrix accepts them
/// (`QMatrix::new` refuses at load), so only candle projections read such rows.
pub(crate) fn quantize_rows(x: &[f32], cols: usize, out: &mut Vec<BlockQ8>) {
    if !cols.is_multiple_of(QK) {
        return;
    }
    out.resize(x.len() / QK, BlockQ8::default());
    for (row, q) in x.chunks_exact(cols).zip(out.chunks_exact_mut(cols / QK)) {
        kernels::quantize_row_q8_1(row, q);
    }
}

/// RMSNorm of each `w.len()`-wide row of `x` into `out`.
pub(crate) fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut Vec<f32>) {
    out.resize(x.len(), 0.0);
    out.copy_from_slice(x);
    rms_norm_in_place(out, w, eps);
}

/// RMSNorm of each `w.len()`-wide row of `x`, in place.
pub(crate) fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    let dim = w.len();
    for row in x.chunks_exact_mut(dim) {
        let ms = row.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let scale = 1.0 / (ms + eps).sqrt();
        row.iter_mut().zip(w).for_each(|(v, g)| *v *= scale * g);
    }
}

/// Rope angle tables (`cos`, `sin`, `positions × head_dim/2`, θᵢ = base^(−2i/d)), grown to
/// the positions requests reach rather than built for the whole context at load (gemma3's
/// 32k context would cost 64 MB and a tenth of a second up front).
#[derive(Debug)]
pub(crate) struct RopeTable {
    theta: Vec<f32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl RopeTable {
    /// Empty tables for `head_dim`-wide heads.
    pub fn new(base: f32, head_dim: usize) -> Self {
        let theta = (0..head_dim / 2)
            .map(|i| 1f32 / base.powf((2 * i) as f32 / head_dim as f32))
            .collect();
        Self {
            theta,
            cos: Vec::new(),
            sin: Vec::new(),
        }
    }

    /// Makes positions `0..positions` available.
    pub fn ensure(&mut self, positions: usize) {
        let half = self.theta.len();
        let have = self.cos.len() / half.max(1);
        for p in have..positions {
            for &theta in &self.theta {
                let a = p as f32 * theta;
                self.cos.push(a.cos());
                self.sin.push(a.sin());
            }
        }
    }
}

/// How a model pairs dimensions for rope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RopeStyle {
    /// Adjacent pairs (x₂ᵢ, x₂ᵢ₊₁): GGML's "normal" mode, llama.
    Interleaved,
    /// Halves (xᵢ, xᵢ₊d/2): GGML's NEOX mode, gemma.
    Halves,
}

/// Applies rope at `pos` to every head of one position's vector.
pub(crate) fn rope(
    style: RopeStyle,
    x: &mut [f32],
    head_dim: usize,
    table: &RopeTable,
    pos: usize,
) {
    let half = head_dim / 2;
    let (cos, sin) = (
        &table.cos[pos * half..(pos + 1) * half],
        &table.sin[pos * half..(pos + 1) * half],
    );
    for head in x.chunks_exact_mut(head_dim) {
        for i in 0..half {
            let (ia, ib) = match style {
                RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                RopeStyle::Halves => (i, i + half),
            };
            let (a, b) = (head[ia], head[ib]);
            head[ia] = a * cos[i] - b * sin[i];
            head[ib] = a * sin[i] + b * cos[i];
        }
    }
}

/// Shape of one attention layer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttnShape {
    pub n_head: usize,
    pub n_kv_head: usize,
    pub head_dim: usize,
    /// Multiplier of q·k.
    pub scale: f32,
    /// Sliding window: a query at i sees keys j with i − j < window (llama.cpp's rule).
    pub window: Option<usize>,
}

/// Where the rows of one batched step come from: the sequences' new tokens, one after the
/// other, each at its own position.
#[derive(Debug, Default)]
pub(crate) struct Layout {
    /// Rows in the step (every sequence's new tokens).
    pub rows: usize,
    /// Position of each row in its sequence.
    pub row_pos: Vec<usize>,
    /// Sequence of each row.
    pub row_seq: Vec<usize>,
    /// First row of each sequence, then `rows`.
    pub starts: Vec<usize>,
    /// Rows whose logits are returned, in order.
    pub logit_rows: Vec<usize>,
    /// One past the largest position.
    pub end: usize,
}

impl Layout {
    /// The layout of sequences given as (cached length, new tokens, first row with logits).
    pub fn new(spans: impl IntoIterator<Item = (usize, usize, usize)>) -> Self {
        let mut l = Layout::default();
        for (seq, (pos, n, logits_from)) in spans.into_iter().enumerate() {
            l.starts.push(l.rows);
            for i in 0..n {
                l.row_pos.push(pos + i);
                l.row_seq.push(seq);
                if i >= logits_from {
                    l.logit_rows.push(l.rows + i);
                }
            }
            l.rows += n;
            l.end = l.end.max(pos + n);
        }
        l.starts.push(l.rows);
        l
    }

    /// The layout of a step, checking that every sequence continues its cache within
    /// `context` with at least one token.
    pub fn of(seqs: &[SeqStep<'_>], context: usize) -> candle_core::Result<Self> {
        for sq in seqs {
            sq.cache
                .check_step(sq.cache.len, sq.tokens.len(), context)?;
        }
        if seqs.is_empty() {
            return Err(err("a step needs at least one sequence".into()));
        }
        Ok(Self::new(
            seqs.iter()
                .map(|sq| (sq.cache.len, sq.tokens.len(), sq.logits_from)),
        ))
    }

    /// Rows of sequence `seq`.
    pub fn seq_rows(&self, seq: usize) -> Range<usize> {
        self.starts[seq]..self.starts[seq + 1]
    }
}

/// One sequence's share of a batched step: `tokens` run at the positions after those in
/// `cache`, and every row from index `logits_from` of `tokens` on gets logits.
pub struct SeqStep<'a> {
    /// The sequence's keys and values, extended by the step.
    pub cache: &'a mut KvCache,
    /// New tokens.
    pub tokens: &'a [u32],
    /// First new token whose logits are wanted (`tokens.len()` for none).
    pub logits_from: usize,
}

/// Appends each sequence's rows of `k` and `v` (rows of `width`) to its cache of layer `l`,
/// rounded to f16 (to nearest even, with F16C where the CPU has it: the same bits either way).
pub(crate) fn append_kv(
    seqs: &mut [SeqStep<'_>],
    lay: &Layout,
    l: usize,
    k: &[f32],
    v: &[f32],
    width: usize,
) {
    for (i, sq) in seqs.iter_mut().enumerate() {
        let r = lay.seq_rows(i);
        for (cache, src) in [(&mut sq.cache.k[l], k), (&mut sq.cache.v[l], v)] {
            let at = cache.len();
            cache.resize(at + r.len() * width, f16::ZERO);
            cache[at..].convert_from_f32_slice(&src[r.start * width..r.end * width]);
        }
    }
}

/// Keys and values of layer `l` of every sequence, for [`attention`].
pub(crate) fn layer_kv<'a>(seqs: &'a [SeqStep<'_>], l: usize) -> Vec<(&'a [f16], &'a [f16])> {
    seqs.iter()
        .map(|sq| (&sq.cache.k[l][..], &sq.cache.v[l][..]))
        .collect()
}

/// Causal grouped-query attention of every row of a step, each against its own sequence's
/// cache (`kv[seq]`, which already holds the step's keys and values), read in place: query
/// head h uses key/value head h / (n_head / n_kv_head). Each (row, query head) is one task
/// on the pool the forward pass runs in, whatever sequence it belongs to: a decode step of
/// one sequence still gives every thread work (a task per key/value head left one of two
/// threads idle a third of the time on SmolLM2's three). A head's arithmetic is one fixed
/// function of its inputs ([`attend_head`]), so results do not depend on the batch, the
/// partition or the thread count.
pub(crate) fn attention(
    path: kernels::Path,
    a: AttnShape,
    q: &[f32],
    kv: &[(&[f16], &[f16])],
    lay: &Layout,
    out: &mut Vec<f32>,
) {
    let hd = a.head_dim;
    let (qdim, kvw) = (a.n_head * hd, a.n_kv_head * hd);
    let group = a.n_head / a.n_kv_head;
    out.clear();
    out.resize(lay.rows * qdim, 0.0);
    out.par_chunks_mut(hd)
        .enumerate()
        .for_each_init(Vec::new, |scores: &mut Vec<f32>, (c, oh)| {
            let (i, h) = (c / a.n_head, c % a.n_head);
            let g = h / group;
            let (k, v) = kv[lay.row_seq[i]];
            let end = lay.row_pos[i] + 1;
            let start = a.window.map_or(0, |w| end.saturating_sub(w));
            let at = start * kvw + g * hd;
            attend_head(
                path,
                &q[i * qdim + h * hd..][..hd],
                &k[at..],
                &v[at..],
                kvw,
                end - start,
                a.scale,
                scores,
                oh,
            );
        });
}

/// One query head's attention over `len` keys and values (key t at `k[t * stride..][..hd]`,
/// likewise `v`): `out = Σ_t softmax(scale · q·k_t)_t · v_t`. Written in eight-lane chunks
/// with fused multiply-adds in one fixed order, so every CPU, vectorized or not, gets the
/// same bits:
/// - scores `scale · q·k_t` by [`kernels::attn_scores`];
/// - weights `e_t = exp(s_t − max)` with [`exp_neg`], summed in eight lanes (t mod 8) and
///   reduced the same way;
/// - `out[d] = (Σ_t fma(e_t, v_t[d]) in t order, by [`kernels::attn_values`]) · (1 / Σ e)`.
///
/// Keys and values are cached as f16 (as llama.cpp caches them): half the memory and half
/// the bytes read per step, which is what attention costs once several sequences or long
/// contexts share a step.
#[allow(clippy::too_many_arguments)] // one head's slices and shape; called per task
fn attend_head(
    path: kernels::Path,
    q: &[f32],
    k: &[f16],
    v: &[f16],
    stride: usize,
    len: usize,
    scale: f32,
    scores: &mut Vec<f32>,
    out: &mut [f32],
) {
    scores.clear();
    scores.resize(len, 0.0);
    kernels::attn_scores(path, q, k, stride, scale, scores);
    let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
    let mut sums = [0f32; 8];
    let mut chunks = scores.chunks_exact_mut(8);
    for ch in &mut chunks {
        for l in 0..8 {
            ch[l] = exp_neg(ch[l] - max);
            sums[l] += ch[l];
        }
    }
    for (l, s) in chunks.into_remainder().iter_mut().enumerate() {
        *s = exp_neg(*s - max);
        sums[l] += *s;
    }
    let inv = 1.0 / kernels::lanes_sum(&sums);
    kernels::attn_values(path, scores, v, stride, out);
    for o in out.iter_mut() {
        *o *= inv;
    }
}

/// `e^x` for the x ≤ 0 of a softmax, as one fixed sequence of IEEE operations (so it
/// vectorizes and is the same on every CPU, unlike libm's per-CPU variants): x = n·ln2 + r
/// with n rounded to nearest, then Cephes' degree-7 polynomial for e^r, scaled by 2^n.
/// Relative error under 2e-7; inputs below −87 give e^−87 (≈ 1.6e-38), which a softmax
/// cannot tell from 0.
#[inline(always)]
pub(crate) fn exp_neg(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const P: [f32; 6] = [
        1.987_569_1e-4,
        1.398_199_9e-3,
        8.333_452e-3,
        4.166_579_6e-2,
        1.666_666_5e-1,
        0.5,
    ];
    let x = x.clamp(-87.0, 0.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = n.mul_add(-LN2_HI, x);
    let r = n.mul_add(-LN2_LO, r);
    let mut p = P[0];
    for c in &P[1..] {
        p = p.mul_add(r, *c);
    }
    let e = p.mul_add(r * r, r) + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Keys and values of one sequence, in f16, one buffer per layer reserved for the positions
/// the sequence may reach, so a step appends without reallocating.
#[derive(Debug, Default)]
pub struct KvCache {
    pub(crate) k: Vec<Vec<f16>>,
    pub(crate) v: Vec<Vec<f16>>,
    pub(crate) len: usize,
}

impl KvCache {
    /// A cache for `layers` layers.
    pub fn new(layers: usize) -> Self {
        Self {
            k: vec![Vec::new(); layers],
            v: vec![Vec::new(); layers],
            len: 0,
        }
    }

    /// An empty cache of `layers` layers with room for `positions` rows of `width`.
    pub fn with_capacity(layers: usize, positions: usize, width: usize) -> Self {
        let mut c = Self::new(layers);
        c.reset(positions, width);
        c
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Counts `n` positions run outside our models (candle's keep their own cache).
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Empties it and reserves `positions × width` values per layer.
    pub fn reset(&mut self, positions: usize, width: usize) {
        for c in self.k.iter_mut().chain(self.v.iter_mut()) {
            c.clear();
            c.reserve(positions * width);
        }
        self.len = 0;
    }

    /// Checks that `n` new positions at `pos` continue this cache within `context`.
    pub fn check_step(&self, pos: usize, n: usize, context: usize) -> candle_core::Result<()> {
        if pos != self.len || n == 0 || pos + n > context {
            return Err(err(format!(
                "{n} tokens at position {pos} do not fit after {} cached positions in a context of {context}",
                self.len
            )));
        }
        Ok(())
    }
}

/// Logits of rows `rows` of the `dim`-wide rows of `s.x`, in that order: final RMSNorm,
/// then the output projection (the common tail of every serving model's forward pass).
#[allow(clippy::too_many_arguments)] // the tail's inputs; one call per model
pub(crate) fn logits_rows(
    s: &mut Scratch,
    dim: usize,
    norm: &[f32],
    eps: f32,
    output: &Linear,
    file: &[u8],
    path: kernels::Path,
    rows: &[usize],
) -> candle_core::Result<Vec<f32>> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    s.h.clear();
    for &r in rows {
        s.h.extend_from_slice(&s.x[r * dim..(r + 1) * dim]);
    }
    rms_norm_in_place(&mut s.h, norm, eps);
    quantize_rows(&s.h, dim, &mut s.xq);
    let mut logits = Vec::with_capacity(rows.len() * output.rows());
    output.forward(file, path, &s.h, &s.xq, rows.len(), &mut logits)?;
    Ok(logits)
}

/// Reusable buffers for one forward pass.
#[derive(Default)]
pub(crate) struct Scratch {
    pub x: Vec<f32>,
    pub h: Vec<f32>,
    pub q: Vec<f32>,
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    pub att: Vec<f32>,
    pub o: Vec<f32>,
    pub g: Vec<f32>,
    pub u: Vec<f32>,
    /// A stacked (fused) product before it is split.
    pub fused: Vec<f32>,
    pub xq: Vec<BlockQ8>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attention the slow, obvious way, in f64.
    fn reference(a: AttnShape, q: &[f32], k: &[f32], v: &[f32], pos: usize, n: usize) -> Vec<f64> {
        let hd = a.head_dim;
        let (qdim, kv) = (a.n_head * hd, a.n_kv_head * hd);
        let mut out = vec![0f64; n * qdim];
        for i in 0..n {
            for h in 0..a.n_head {
                let g = h / (a.n_head / a.n_kv_head);
                let end = pos + i + 1;
                let start = a.window.map_or(0, |w| end.saturating_sub(w));
                let sc: Vec<f64> = (start..end)
                    .map(|t| {
                        (0..hd)
                            .map(|d| {
                                q[i * qdim + h * hd + d] as f64 * k[t * kv + g * hd + d] as f64
                            })
                            .sum::<f64>()
                            * a.scale as f64
                    })
                    .collect();
                let max = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = sc.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for (t, w) in (start..end).zip(&e) {
                    for d in 0..hd {
                        out[i * qdim + h * hd + d] += w / sum * v[t * kv + g * hd + d] as f64;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn exp_neg_is_within_two_ulps_of_exp() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp();
            let rel = ((exp_neg(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 2.5e-7, "relative error {worst}");
        assert_eq!(exp_neg(0.0), 1.0);
        assert!(exp_neg(-1000.0) < 1e-37 && exp_neg(f32::NEG_INFINITY) >= 0.0);
    }

    #[test]
    fn parallel_attention_matches_the_reference_with_gqa_and_windows() {
        let mut state = 7u64;
        let mut rand = |len: usize| -> Vec<f32> {
            (0..len)
                .map(|_| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                })
                .collect()
        };
        for (window, head_dim) in [(None, 20), (Some(3), 16), (None, 72), (Some(6), 256)] {
            let a = AttnShape {
                n_head: 6,
                n_kv_head: 2,
                head_dim,
                scale: 0.3,
                window,
            };
            let (pos, n) = (5, 4);
            let q = rand(n * a.n_head * head_dim);
            // The cache holds f16; the reference reads the same values.
            let halves = |x: Vec<f32>| -> Vec<f16> { x.into_iter().map(f16::from_f32).collect() };
            let floats = |x: &[f16]| -> Vec<f32> { x.iter().map(|h| h.to_f32()).collect() };
            let k = halves(rand((pos + n) * a.n_kv_head * head_dim));
            let v = halves(rand((pos + n) * a.n_kv_head * head_dim));
            let mut out = Vec::new();
            attention(
                kernels::best_path(),
                a,
                &q,
                &[(&k, &v)],
                &Layout::new([(pos, n, n)]),
                &mut out,
            );
            let want = reference(a, &q, &floats(&k), &floats(&v), pos, n);
            for (got, want) in out.iter().zip(&want) {
                assert!((*got as f64 - want).abs() < 1e-5, "{got} vs {want}");
            }
            // The same rows inside a batch with another sequence: bit-identical.
            let (q2, k2, v2) = (
                rand(2 * a.n_head * head_dim),
                halves(rand(9 * a.n_kv_head * head_dim)),
                halves(rand(9 * a.n_kv_head * head_dim)),
            );
            let mut both_q = q2.clone();
            both_q.extend_from_slice(&q);
            let mut both = Vec::new();
            let lay = Layout::new([(7, 2, 0), (pos, n, 0)]);
            attention(
                kernels::best_path(),
                a,
                &both_q,
                &[(&k2, &v2), (&k, &v)],
                &lay,
                &mut both,
            );
            assert_eq!(lay.logit_rows.len(), 2 + n);
            let qdim = a.n_head * head_dim;
            for (x, y) in both[2 * qdim..].iter().zip(&out) {
                assert_eq!(x.to_bits(), y.to_bits());
            }
        }
    }
}
