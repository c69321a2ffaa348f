//! Our own llama-family model, written for serving rather than for a demo: weights stay in
//! the memory-mapped GGUF (Q4_1 projections run on our kernels straight from the mapping),
//! the token embedding stays quantized and only looked-up rows are dequantized, rope tables
//! are sized to the served context, the KV cache is one growing buffer per layer reserved
//! for the request, and grouped-query attention reads K and V in place (no repeat, no
//! concatenation). candle's stock `quantized_llama` stays available as the reference path.
//!
//! The math follows candle's `quantized_llama` (and llama.cpp): RMSNorm, interleaved rope
//! (GGML's "normal" mode), softmax attention scaled by 1/√d, SwiGLU feed-forward.

use std::ops::Range;
use std::sync::Arc;

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul};
use candle_core::{Device, Module, Tensor};

use crate::kernels::{self, BlockQ8, Format, QMatrix, QK};

/// Shape of a llama-family model, from GGUF metadata.
#[derive(Debug, Clone)]
pub struct LlamaConfig {
    /// Hidden size.
    pub dim: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads (grouped-query attention when fewer than `n_head`).
    pub n_kv_head: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// Transformer blocks.
    pub n_layer: usize,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// Rope base frequency.
    pub rope_base: f32,
    /// Context length served (rope table rows).
    pub context: usize,
    /// Vocabulary size.
    pub vocab: usize,
}

/// A projection: Q4_1/Q8_0 on our kernels straight from the mapping, anything else through
/// candle.
enum Linear {
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
    },
}

struct Layer {
    attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    wq: Linear,
    wk: Linear,
    wv: Linear,
    wo: Linear,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// Token embedding: quantized Q8_0 rows read from the mapping, or a dequantized table.
enum Embedding {
    Q8_0(Range<usize>),
    F32(Vec<f32>),
}

/// Reusable buffers so the token loop allocates nothing it can reuse.
#[derive(Default)]
struct Scratch {
    x: Vec<f32>,
    h: Vec<f32>,
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    att: Vec<f32>,
    o: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    xq: Vec<BlockQ8>,
    scores: Vec<f32>,
}

/// The llama serving model with its KV cache (one sequence).
pub struct Llama {
    mmap: Arc<memmap2::Mmap>,
    cfg: LlamaConfig,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    output: Linear,
    cos: Vec<f32>,
    sin: Vec<f32>,
    path: kernels::Path,
    k_cache: Vec<Vec<f32>>,
    v_cache: Vec<Vec<f32>>,
    len: usize,
    s: Scratch,
}

impl std::fmt::Debug for Llama {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Llama")
            .field("cfg", &self.cfg)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn md_u32(ct: &gguf_file::Content, key: &str) -> candle_core::Result<usize> {
    ct.metadata
        .get(key)
        .ok_or_else(|| candle_core::Error::Msg(format!("missing {key}")))?
        .to_u32()
        .map(|v| v as usize)
}

impl Llama {
    /// Builds the model over the mapped file; `context` is the number of positions served.
    pub fn load(
        ct: &gguf_file::Content,
        mmap: Arc<memmap2::Mmap>,
        context: usize,
    ) -> candle_core::Result<Self> {
        let dim = md_u32(ct, "llama.embedding_length")?;
        let n_head = md_u32(ct, "llama.attention.head_count")?;
        let n_kv_head = md_u32(ct, "llama.attention.head_count_kv").unwrap_or(n_head);
        let n_layer = md_u32(ct, "llama.block_count")?;
        let head_dim = dim / n_head;
        let rope_dim = md_u32(ct, "llama.rope.dimension_count").unwrap_or(head_dim);
        if rope_dim != head_dim || n_head % n_kv_head != 0 || head_dim % 2 != 0 {
            candle_core::bail!("unsupported llama shape: head_dim {head_dim}, rope dims {rope_dim}, heads {n_head}/{n_kv_head}");
        }
        let eps = ct
            .metadata
            .get("llama.attention.layer_norm_rms_epsilon")
            .and_then(|v| v.to_f32().ok())
            .unwrap_or(1e-5);
        let rope_base = ct
            .metadata
            .get("llama.rope.freq_base")
            .and_then(|v| v.to_f32().ok())
            .unwrap_or(10000.0);
        let emb_info = ct
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| candle_core::Error::Msg("missing token_embd.weight".into()))?;
        let vocab = emb_info.shape.dims()[0];
        let cfg = LlamaConfig {
            dim,
            n_head,
            n_kv_head,
            head_dim,
            n_layer,
            eps,
            rope_base,
            context,
            vocab,
        };

        let range = |name: &str| -> candle_core::Result<(Range<usize>, GgmlDType, Vec<usize>)> {
            let t = ct
                .tensor_infos
                .get(name)
                .ok_or_else(|| candle_core::Error::Msg(format!("missing tensor {name}")))?;
            let elems = t.shape.elem_count();
            let bytes = elems / t.ggml_dtype.block_size() * t.ggml_dtype.type_size();
            let start = (ct.tensor_data_offset + t.offset) as usize;
            Ok((start..start + bytes, t.ggml_dtype, t.shape.dims().to_vec()))
        };
        let f32_vec = |name: &str| -> candle_core::Result<Vec<f32>> {
            let (r, dt, _) = range(name)?;
            if dt != GgmlDType::F32 {
                candle_core::bail!("{name}: expected F32, got {dt:?}");
            }
            Ok(mmap[r]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect())
        };
        let mut reader = std::io::Cursor::new(&mmap[..]);
        let mut linear = |name: &str| -> candle_core::Result<Linear> {
            let (r, dt, dims) = range(name)?;
            let (rows, cols) = (dims[0], dims[1]);
            let format = match dt {
                GgmlDType::Q4_1 => Some(Format::Q4_1),
                GgmlDType::Q8_0 => Some(Format::Q8_0),
                _ => None,
            };
            if let Some(format) = format {
                QMatrix::new(format, &mmap[r.clone()], rows, cols)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                Ok(Linear::Own {
                    format,
                    bytes: r,
                    rows,
                    cols,
                })
            } else {
                let qt = ct.tensor(&mut reader, name, &Device::Cpu)?;
                Ok(Linear::Candle {
                    mm: QMatMul::from_qtensor(qt)?,
                    rows,
                    cols,
                })
            }
        };
        let mut layers = Vec::with_capacity(n_layer);
        for l in 0..n_layer {
            let p = |n: &str| format!("blk.{l}.{n}.weight");
            layers.push(Layer {
                attn_norm: f32_vec(&p("attn_norm"))?,
                ffn_norm: f32_vec(&p("ffn_norm"))?,
                wq: linear(&p("attn_q"))?,
                wk: linear(&p("attn_k"))?,
                wv: linear(&p("attn_v"))?,
                wo: linear(&p("attn_output"))?,
                gate: linear(&p("ffn_gate"))?,
                up: linear(&p("ffn_up"))?,
                down: linear(&p("ffn_down"))?,
            });
        }
        let output = if ct.tensor_infos.contains_key("output.weight") {
            linear("output.weight")?
        } else {
            linear("token_embd.weight")?
        };
        let (er, edt, _) = range("token_embd.weight")?;
        let embed = if edt == GgmlDType::Q8_0 {
            Embedding::Q8_0(er)
        } else {
            let t = ct
                .tensor(&mut reader, "token_embd.weight", &Device::Cpu)?
                .dequantize(&Device::Cpu)?;
            Embedding::F32(t.flatten_all()?.to_vec1()?)
        };
        let norm = f32_vec("output_norm.weight")?;
        let half = head_dim / 2;
        let mut cos = vec![0f32; context * half];
        let mut sin = vec![0f32; context * half];
        for i in 0..half {
            let theta = 1f32 / rope_base.powf((2 * i) as f32 / head_dim as f32);
            for p in 0..context {
                let a = p as f32 * theta;
                cos[p * half + i] = a.cos();
                sin[p * half + i] = a.sin();
            }
        }
        Ok(Self {
            mmap,
            cfg,
            embed,
            layers,
            norm,
            output,
            cos,
            sin,
            path: kernels::best_path(),
            k_cache: vec![Vec::new(); n_layer],
            v_cache: vec![Vec::new(); n_layer],
            len: 0,
            s: Scratch::default(),
        })
    }

    /// The model's shape.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Empties the KV cache and reserves room for `capacity` positions.
    pub fn reset(&mut self, capacity: usize) {
        let kv = self.cfg.n_kv_head * self.cfg.head_dim;
        for c in self.k_cache.iter_mut().chain(self.v_cache.iter_mut()) {
            c.clear();
            c.reserve(capacity.min(self.cfg.context) * kv);
        }
        self.len = 0;
    }

    /// Runs `tokens` at positions `pos..` (which must equal the cached length) and returns
    /// the logits of the last one. The pass runs on a rayon worker, so the ~200 matrix
    /// products inside it share the pool without a thread wake-up each.
    pub fn forward(&mut self, tokens: &[u32], pos: usize) -> candle_core::Result<Vec<f32>> {
        rayon::scope(|_| self.forward_inner(tokens, pos))
    }

    fn forward_inner(&mut self, tokens: &[u32], pos: usize) -> candle_core::Result<Vec<f32>> {
        if pos == 0 {
            self.reset(tokens.len());
        }
        if pos != self.len {
            candle_core::bail!(
                "position {pos} does not follow the {} cached positions",
                self.len
            );
        }
        let n = tokens.len();
        if n == 0 || pos + n > self.cfg.context {
            candle_core::bail!(
                "{} tokens at position {pos} exceed the context of {}",
                n,
                self.cfg.context
            );
        }
        let LlamaConfig {
            dim,
            n_kv_head,
            head_dim,
            eps,
            ..
        } = self.cfg;
        let kv = n_kv_head * head_dim;
        let mut s = std::mem::take(&mut self.s);
        s.x.resize(n * dim, 0.0);
        for (i, &t) in tokens.iter().enumerate() {
            self.embed_row(t, &mut s.x[i * dim..(i + 1) * dim])?;
        }
        for l in 0..self.layers.len() {
            let layer = &self.layers[l];
            rms_norm(&s.x, &layer.attn_norm, eps, &mut s.h);
            self.quantize(&s.h, dim, &mut s.xq);
            self.matmul(&layer.wq, &s.h, &s.xq, n, &mut s.q)?;
            self.matmul(&layer.wk, &s.h, &s.xq, n, &mut s.k)?;
            self.matmul(&layer.wv, &s.h, &s.xq, n, &mut s.v)?;
            for i in 0..n {
                self.rope(&mut s.q[i * dim..(i + 1) * dim], pos + i);
                self.rope(&mut s.k[i * kv..(i + 1) * kv], pos + i);
            }
            self.k_cache[l].extend_from_slice(&s.k);
            self.v_cache[l].extend_from_slice(&s.v);
            attention(
                &self.cfg,
                &s.q,
                &self.k_cache[l],
                &self.v_cache[l],
                pos,
                n,
                &mut s.att,
                &mut s.scores,
            );
            let layer = &self.layers[l];
            self.quantize(&s.att, dim, &mut s.xq);
            self.matmul(&layer.wo, &s.att, &s.xq, n, &mut s.o)?;
            s.x.iter_mut().zip(&s.o).for_each(|(x, o)| *x += o);
            rms_norm(&s.x, &layer.ffn_norm, eps, &mut s.h);
            self.quantize(&s.h, dim, &mut s.xq);
            self.matmul(&layer.gate, &s.h, &s.xq, n, &mut s.g)?;
            self.matmul(&layer.up, &s.h, &s.xq, n, &mut s.u)?;
            s.g.iter_mut()
                .zip(&s.u)
                .for_each(|(g, u)| *g = *g / (1.0 + (-*g).exp()) * u);
            let ffn = s.g.len() / n;
            self.quantize(&s.g, ffn, &mut s.xq);
            self.matmul(&layer.down, &s.g, &s.xq, n, &mut s.o)?;
            s.x.iter_mut().zip(&s.o).for_each(|(x, o)| *x += o);
        }
        self.len += n;
        let last = s.x[(n - 1) * dim..].to_vec();
        rms_norm(&last, &self.norm, eps, &mut s.h);
        self.quantize(&s.h, dim, &mut s.xq);
        let mut logits = Vec::new();
        self.matmul(&self.output, &s.h, &s.xq, 1, &mut logits)?;
        self.s = s;
        Ok(logits)
    }

    fn embed_row(&self, token: u32, out: &mut [f32]) -> candle_core::Result<()> {
        let dim = self.cfg.dim;
        let t = token as usize;
        if t >= self.cfg.vocab {
            candle_core::bail!("token {token} outside the vocabulary of {}", self.cfg.vocab);
        }
        match &self.embed {
            Embedding::Q8_0(r) => {
                const BLOCK: usize = 34;
                let row_bytes = dim / QK * BLOCK;
                let row = &self.mmap[r.start + t * row_bytes..r.start + (t + 1) * row_bytes];
                for (b, o) in row.chunks_exact(BLOCK).zip(out.chunks_exact_mut(QK)) {
                    let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
                    for (q, o) in b[2..].iter().zip(o) {
                        *o = f32::from(*q as i8) * d;
                    }
                }
            }
            Embedding::F32(table) => out.copy_from_slice(&table[t * dim..(t + 1) * dim]),
        }
        Ok(())
    }

    /// Quantizes `n` rows of width `cols` once, for every Q4_1 projection that reads them.
    fn quantize(&self, x: &[f32], cols: usize, out: &mut Vec<BlockQ8>) {
        if cols % QK != 0 {
            return;
        }
        let nb = cols / QK;
        out.resize(x.len() / QK, BlockQ8::default());
        for (row, q) in x.chunks_exact(cols).zip(out.chunks_exact_mut(nb)) {
            kernels::quantize_row_q8_1(row, q);
        }
    }

    fn matmul(
        &self,
        w: &Linear,
        x: &[f32],
        xq: &[BlockQ8],
        n: usize,
        out: &mut Vec<f32>,
    ) -> candle_core::Result<()> {
        match w {
            Linear::Own {
                format,
                bytes,
                rows,
                cols,
            } => {
                let m = QMatrix::new(*format, &self.mmap[bytes.clone()], *rows, *cols)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                out.resize(n * rows, 0.0);
                kernels::matmul(self.path, &m, &xq[..n * cols / QK], n, out);
            }
            Linear::Candle { mm, rows, cols } => {
                let t = Tensor::from_slice(&x[..n * cols], (n, *cols), &Device::Cpu)?;
                let y = mm.forward(&t)?;
                out.clear();
                out.extend(y.flatten_all()?.to_vec1::<f32>()?);
                debug_assert_eq!(out.len(), n * rows);
            }
        }
        Ok(())
    }

    /// Interleaved rope on every head of one position's vector.
    fn rope(&self, x: &mut [f32], pos: usize) {
        let half = self.cfg.head_dim / 2;
        let (cos, sin) = (
            &self.cos[pos * half..(pos + 1) * half],
            &self.sin[pos * half..(pos + 1) * half],
        );
        for head in x.chunks_exact_mut(self.cfg.head_dim) {
            for i in 0..half {
                let (a, b) = (head[2 * i], head[2 * i + 1]);
                head[2 * i] = a * cos[i] - b * sin[i];
                head[2 * i + 1] = a * sin[i] + b * cos[i];
            }
        }
    }
}

fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut Vec<f32>) {
    let dim = w.len();
    out.resize(x.len(), 0.0);
    for (xr, or) in x.chunks_exact(dim).zip(out.chunks_exact_mut(dim)) {
        let ms = xr.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let scale = 1.0 / (ms + eps).sqrt();
        for ((o, v), g) in or.iter_mut().zip(xr).zip(w) {
            *o = v * scale * g;
        }
    }
}

/// Causal grouped-query attention of `n` new positions starting at `pos`, reading the cache
/// in place: query head h uses key/value head h / (n_head / n_kv_head).
#[allow(clippy::too_many_arguments)]
fn attention(
    cfg: &LlamaConfig,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    pos: usize,
    n: usize,
    out: &mut Vec<f32>,
    scores: &mut Vec<f32>,
) {
    let (hd, dim, kv) = (cfg.head_dim, cfg.dim, cfg.n_kv_head * cfg.head_dim);
    let group = cfg.n_head / cfg.n_kv_head;
    let scale = 1.0 / (hd as f32).sqrt();
    out.clear();
    out.resize(n * dim, 0.0);
    for i in 0..n {
        let t_len = pos + i + 1;
        for h in 0..cfg.n_head {
            let g = h / group;
            let qh = &q[i * dim + h * hd..i * dim + (h + 1) * hd];
            scores.clear();
            let mut max = f32::NEG_INFINITY;
            for t in 0..t_len {
                let kt = &k[t * kv + g * hd..t * kv + (g + 1) * hd];
                let sc = qh.iter().zip(kt).map(|(a, b)| a * b).sum::<f32>() * scale;
                max = max.max(sc);
                scores.push(sc);
            }
            let mut sum = 0f32;
            for sc in scores.iter_mut() {
                *sc = (*sc - max).exp();
                sum += *sc;
            }
            let oh = &mut out[i * dim + h * hd..i * dim + (h + 1) * hd];
            for (t, p) in scores.iter().enumerate() {
                let w = p / sum;
                let vt = &v[t * kv + g * hd..t * kv + (g + 1) * hd];
                oh.iter_mut().zip(vt).for_each(|(o, x)| *o += w * x);
            }
        }
    }
}
