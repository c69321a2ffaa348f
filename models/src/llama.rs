//! Our own llama-family model, written for serving rather than for a demo: weights stay in
//! the memory-mapped GGUF (Q4_1/Q8_0 projections run on our kernels straight from the
//! mapping), the token embedding stays quantized and only looked-up rows are dequantized,
//! rope tables are sized to the served context, the KV cache is one buffer per layer
//! reserved for the request, and grouped-query attention reads K and V in place.
//! candle's stock `quantized_llama` stays available as the reference path.
//!
//! The math follows llama.cpp's llama graph: RMSNorm, interleaved rope (GGML "normal"
//! mode), softmax attention scaled by 1/√d, SwiGLU feed-forward, tied or separate output.

use std::sync::Arc;

use candle_core::quantized::gguf_file;

use crate::kernels;
use crate::serving::{
    append_kv, attention, layer_kv, logits_rows, md_f32, md_usize, quantize_rows,
    refuse_rope_scaling, rms_norm, rope, step_one, AttnShape, Embedding, Fused, KvCache, Layout,
    Linear, RopeStyle, RopeTable, Scratch, SeqStep, TensorSource,
};

struct Layer {
    attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    /// Q, K and V.
    qkv: Fused,
    wo: Linear,
    /// Gate and up.
    gate_up: Fused,
    down: Linear,
}

/// The llama serving model with the KV cache of one sequence.
pub struct Llama {
    mmap: Arc<memmap2::Mmap>,
    dim: usize,
    attn: AttnShape,
    eps: f32,
    context: usize,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    output: Linear,
    rope: RopeTable,
    path: kernels::Path,
    cache: KvCache,
    s: Scratch,
}

impl std::fmt::Debug for Llama {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Llama")
            .field("dim", &self.dim)
            .field("attn", &self.attn)
            .field("layers", &self.layers.len())
            .finish_non_exhaustive()
    }
}

impl Llama {
    /// Builds the model over the mapped file; `context` is the number of positions served.
    pub fn load(
        ct: &gguf_file::Content,
        mmap: Arc<memmap2::Mmap>,
        context: usize,
    ) -> candle_core::Result<Self> {
        let dim = md_usize(ct, "llama.embedding_length")?;
        let n_head = md_usize(ct, "llama.attention.head_count")?;
        let n_kv_head = md_usize(ct, "llama.attention.head_count_kv").unwrap_or(n_head);
        let n_layer = md_usize(ct, "llama.block_count")?;
        let ffn = md_usize(ct, "llama.feed_forward_length")?;
        let head_dim = dim.checked_div(n_head).unwrap_or(0);
        let rope_dim = md_usize(ct, "llama.rope.dimension_count").unwrap_or(head_dim);
        if head_dim == 0
            || head_dim * n_head != dim
            || rope_dim != head_dim
            || n_kv_head == 0
            || n_head % n_kv_head != 0
            || head_dim % 2 != 0
        {
            candle_core::bail!("unsupported llama shape: width {dim}, heads {n_head}/{n_kv_head}, rope dims {rope_dim}");
        }
        refuse_rope_scaling(ct, "llama")?;
        let eps = md_f32(ct, "llama.attention.layer_norm_rms_epsilon", 1e-5);
        let rope_base = md_f32(ct, "llama.rope.freq_base", 10000.0);
        let kv = n_kv_head * head_dim;
        let src = TensorSource { ct, mmap: &mmap };
        let mut layers = Vec::with_capacity(n_layer);
        for l in 0..n_layer {
            let p = |n: &str| format!("blk.{l}.{n}.weight");
            layers.push(Layer {
                attn_norm: src.f32_vec(&p("attn_norm"), dim)?,
                ffn_norm: src.f32_vec(&p("ffn_norm"), dim)?,
                qkv: src.fused(
                    &[(&p("attn_q"), dim), (&p("attn_k"), kv), (&p("attn_v"), kv)],
                    dim,
                )?,
                wo: src.linear(&p("attn_output"), dim, dim)?,
                gate_up: src.fused(&[(&p("ffn_gate"), ffn), (&p("ffn_up"), ffn)], dim)?,
                down: src.linear(&p("ffn_down"), dim, ffn)?,
            });
        }
        let embed = src.embedding("token_embd.weight", dim)?;
        let output = src.output(embed.vocab, dim)?;
        let norm = src.f32_vec("output_norm.weight", dim)?;
        let attn = AttnShape {
            n_head,
            n_kv_head,
            head_dim,
            scale: 1.0 / (head_dim as f32).sqrt(),
            window: None,
        };
        Ok(Self {
            mmap,
            dim,
            attn,
            eps,
            context,
            embed,
            layers,
            norm,
            output,
            rope: RopeTable::new(rope_base, head_dim),
            path: kernels::best_path(),
            cache: KvCache::new(n_layer),
            s: Scratch::default(),
        })
    }

    /// Rows of the token embedding.
    pub fn vocab(&self) -> usize {
        self.embed.vocab
    }

    /// Empties the KV cache and reserves room for `capacity` positions.
    pub fn reset(&mut self, capacity: usize) {
        self.cache = self.new_cache(capacity);
    }

    /// An empty KV cache for one sequence, with room for `capacity` positions (at most the
    /// served context).
    pub fn new_cache(&self, capacity: usize) -> KvCache {
        KvCache::with_capacity(
            self.layers.len(),
            capacity.min(self.context),
            self.attn.n_kv_head * self.attn.head_dim,
        )
    }

    /// Runs `tokens` at positions `pos..` (which must equal the cached length) and returns
    /// the logits of the last one. The pass runs on a rayon worker, so the ~200 matrix
    /// products inside it share the pool without a thread wake-up each.
    pub fn forward(&mut self, tokens: &[u32], pos: usize) -> candle_core::Result<Vec<f32>> {
        self.forward_rows(tokens, pos, tokens.len().saturating_sub(1))
    }

    /// Like `forward`, returning the logits of every token from index `from` of `tokens`
    /// on, row after row: what a replay verifier needs (teacher forcing in one pass).
    pub fn forward_rows(
        &mut self,
        tokens: &[u32],
        pos: usize,
        from: usize,
    ) -> candle_core::Result<Vec<f32>> {
        if pos == 0 {
            self.reset(tokens.len());
        }
        let mut cache = std::mem::take(&mut self.cache);
        let out = step_one(&mut cache, tokens, pos, from, |seqs| self.step(seqs));
        self.cache = cache;
        out
    }

    /// One step of a batch: every sequence's new tokens run through the model together, so
    /// each weight matrix is read once for all of them; returns the logits of the rows each
    /// sequence asked for, sequence after sequence. Each row's result is bit-identical to
    /// running its sequence alone.
    pub fn step(&mut self, seqs: &mut [SeqStep<'_>]) -> candle_core::Result<Vec<f32>> {
        let lay = Layout::of(seqs, self.context)?;
        self.rope.ensure(lay.end);
        let mut s = std::mem::take(&mut self.s);
        let this = &*self;
        let out = rayon::scope(|_| this.step_inner(&mut s, seqs, &lay));
        self.s = s;
        out
    }

    fn step_inner(
        &self,
        s: &mut Scratch,
        seqs: &mut [SeqStep<'_>],
        lay: &Layout,
    ) -> candle_core::Result<Vec<f32>> {
        let n = lay.rows;
        let (dim, eps, path) = (self.dim, self.eps, self.path);
        let hd = self.attn.head_dim;
        let kvw = self.attn.n_kv_head * hd;
        let file: &[u8] = &self.mmap;
        s.x.resize(n * dim, 0.0);
        for (i, &t) in seqs.iter().flat_map(|sq| sq.tokens).enumerate() {
            self.embed.row(file, t, &mut s.x[i * dim..(i + 1) * dim])?;
        }
        for (l, layer) in self.layers.iter().enumerate() {
            rms_norm(&s.x, &layer.attn_norm, eps, &mut s.h);
            quantize_rows(&s.h, dim, &mut s.xq);
            let outs = &mut [&mut s.q, &mut s.k, &mut s.v];
            layer
                .qkv
                .forward(file, path, &s.h, &s.xq, n, &mut s.fused, outs)?;
            for (i, &p) in lay.row_pos.iter().enumerate() {
                let q = &mut s.q[i * dim..(i + 1) * dim];
                rope(RopeStyle::Interleaved, q, hd, &self.rope, p);
                let k = &mut s.k[i * kvw..(i + 1) * kvw];
                rope(RopeStyle::Interleaved, k, hd, &self.rope, p);
            }
            append_kv(seqs, lay, l, &s.k, &s.v, kvw);
            attention(path, self.attn, &s.q, &layer_kv(seqs, l), lay, &mut s.att);
            quantize_rows(&s.att, dim, &mut s.xq);
            layer.wo.forward(file, path, &s.att, &s.xq, n, &mut s.o)?;
            s.x.iter_mut().zip(&s.o).for_each(|(x, o)| *x += o);
            rms_norm(&s.x, &layer.ffn_norm, eps, &mut s.h);
            quantize_rows(&s.h, dim, &mut s.xq);
            let outs = &mut [&mut s.g, &mut s.u];
            layer
                .gate_up
                .forward(file, path, &s.h, &s.xq, n, &mut s.fused, outs)?;
            s.g.iter_mut()
                .zip(&s.u)
                .for_each(|(g, u)| *g = *g / (1.0 + (-*g).exp()) * u);
            let ffn = layer.gate_up.rows(0);
            quantize_rows(&s.g, ffn, &mut s.xq);
            layer.down.forward(file, path, &s.g, &s.xq, n, &mut s.o)?;
            s.x.iter_mut().zip(&s.o).for_each(|(x, o)| *x += o);
        }
        for sq in seqs.iter_mut() {
            sq.cache.len += sq.tokens.len();
        }
        logits_rows(
            s,
            dim,
            &self.norm,
            eps,
            &self.output,
            file,
            path,
            &lay.logit_rows,
        )
    }
}
