//! Our own Gemma 3 model, written to llama.cpp's gemma3 graph (candle 0.11.1's stock
//! `quantized_gemma3` uses SiLU in the feed-forward and drifts from llama.cpp within a few
//! tokens): embeddings scaled by √d, RMSNorm before and after both attention and
//! feed-forward, per-head RMSNorm of q and k, NEOX-style rope with a local base (10⁴) on
//! sliding-window layers and a global base (10⁶) on every sixth layer, sliding window by
//! llama.cpp's rule (query i sees key j when i − j < window), GELU(tanh) gating (rounded
//! through f16 as ggml's table-driven GELU is), tied output. Same serving design as
//! `llama.rs`: mmapped weights, quantized embedding rows, rope tables sized to the served
//! context (not 131,072 positions per layer), KV cache read in place.

use std::sync::Arc;

use candle_core::quantized::gguf_file;
use half::f16;

use crate::kernels;
use crate::serving::{
    append_kv, attention, layer_kv, logits_rows, md_f32, md_usize, quantize_rows,
    refuse_rope_scaling, rms_norm, rms_norm_in_place, rope, step_one, AttnShape, Embedding, Fused,
    KvCache, Layout, Linear, RopeStyle, RopeTable, Scratch, SeqStep, TensorSource,
};

const SLIDING_WINDOW_PATTERN: usize = 6;
const LOCAL_ROPE_BASE: f32 = 10_000.0;

struct Layer {
    attn_norm: Vec<f32>,
    q_norm: Vec<f32>,
    k_norm: Vec<f32>,
    post_attn_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    post_ffn_norm: Vec<f32>,
    /// Q, K and V.
    qkv: Fused,
    wo: Linear,
    /// Gate and up.
    gate_up: Fused,
    down: Linear,
    sliding: bool,
}

/// The Gemma 3 serving model with the KV cache of one sequence.
pub struct Gemma3 {
    mmap: Arc<memmap2::Mmap>,
    dim: usize,
    attn: AttnShape,
    window: usize,
    eps: f32,
    context: usize,
    embed: Embedding,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    output: Linear,
    local: RopeTable,
    global: RopeTable,
    path: kernels::Path,
    cache: KvCache,
    s: Scratch,
}

impl std::fmt::Debug for Gemma3 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gemma3")
            .field("dim", &self.dim)
            .field("attn", &self.attn)
            .field("layers", &self.layers.len())
            .finish_non_exhaustive()
    }
}

/// GELU with the tanh approximation, input and output rounded through f16 like ggml's table.
fn gelu(x: f32) -> f32 {
    if x <= -10.0 {
        return 0.0;
    }
    if x >= 10.0 {
        return x;
    }
    let x = f16::from_f32(x).to_f32();
    let y = 0.5 * x * (1.0 + (0.797_884_6 * x * (1.0 + 0.044_715 * x * x)).tanh());
    f16::from_f32(y).to_f32()
}

impl Gemma3 {
    /// Builds the model over the mapped file; `context` is the number of positions served.
    pub fn load(
        ct: &gguf_file::Content,
        mmap: Arc<memmap2::Mmap>,
        context: usize,
    ) -> candle_core::Result<Self> {
        let u = |k: &str| md_usize(ct, &format!("gemma3.{k}"));
        let f = |k: &str, default: f32| md_f32(ct, &format!("gemma3.{k}"), default);
        let dim = u("embedding_length")?;
        let n_head = u("attention.head_count")?;
        let n_kv_head = u("attention.head_count_kv")?;
        let head_dim = u("attention.key_length")?;
        let n_layer = u("block_count")?;
        let ffn = u("feed_forward_length")?;
        let window = u("attention.sliding_window")?;
        if n_head == 0
            || head_dim == 0
            || n_kv_head == 0
            || n_head % n_kv_head != 0
            || head_dim % 2 != 0
            || u("attention.value_length")? != head_dim
            || window == 0
        {
            candle_core::bail!(
                "unsupported gemma3 shape: heads {n_head}/{n_kv_head}, head_dim {head_dim}, sliding window {window}"
            );
        }
        refuse_rope_scaling(ct, "gemma3")?;
        let eps = f("attention.layer_norm_rms_epsilon", 1e-6);
        let (qdim, kv) = (n_head * head_dim, n_kv_head * head_dim);
        let src = TensorSource { ct, mmap: &mmap };
        let mut layers = Vec::with_capacity(n_layer);
        for l in 0..n_layer {
            let p = |n: &str| format!("blk.{l}.{n}.weight");
            layers.push(Layer {
                attn_norm: src.f32_vec(&p("attn_norm"), dim)?,
                q_norm: src.f32_vec(&p("attn_q_norm"), head_dim)?,
                k_norm: src.f32_vec(&p("attn_k_norm"), head_dim)?,
                post_attn_norm: src.f32_vec(&p("post_attention_norm"), dim)?,
                ffn_norm: src.f32_vec(&p("ffn_norm"), dim)?,
                post_ffn_norm: src.f32_vec(&p("post_ffw_norm"), dim)?,
                qkv: src.fused(
                    &[(&p("attn_q"), qdim), (&p("attn_k"), kv), (&p("attn_v"), kv)],
                    dim,
                )?,
                wo: src.linear(&p("attn_output"), dim, qdim)?,
                gate_up: src.fused(&[(&p("ffn_gate"), ffn), (&p("ffn_up"), ffn)], dim)?,
                down: src.linear(&p("ffn_down"), dim, ffn)?,
                sliding: (l + 1) % SLIDING_WINDOW_PATTERN != 0,
            });
        }
        let embed = src.embedding("token_embd.weight", dim)?;
        let output = src.output(embed.vocab, dim)?;
        Ok(Self {
            dim,
            attn: AttnShape {
                n_head,
                n_kv_head,
                head_dim,
                scale: 1.0 / (head_dim as f32).sqrt(),
                window: None,
            },
            window,
            eps,
            context,
            embed,
            norm: src.f32_vec("output_norm.weight", dim)?,
            output,
            local: RopeTable::new(f("rope.local_freq_base", LOCAL_ROPE_BASE), head_dim),
            global: RopeTable::new(f("rope.freq_base", 1_000_000.0), head_dim),
            path: kernels::best_path(),
            cache: KvCache::new(n_layer),
            s: Scratch::default(),
            layers,
            mmap,
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
    /// the logits of the last one, on a rayon worker like [`crate::llama::Llama::forward`].
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

    /// One step of a batch, as [`crate::llama::Llama::step`]: every sequence's new tokens
    /// in one pass, each row bit-identical to running its sequence alone.
    pub fn step(&mut self, seqs: &mut [SeqStep<'_>]) -> candle_core::Result<Vec<f32>> {
        let lay = Layout::of(seqs, self.context)?;
        self.local.ensure(lay.end);
        self.global.ensure(lay.end);
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
        let qdim = self.attn.n_head * hd;
        let kvdim = self.attn.n_kv_head * hd;
        let file: &[u8] = &self.mmap;
        s.x.resize(n * dim, 0.0);
        let scale = (dim as f32).sqrt();
        for (i, &t) in seqs.iter().flat_map(|sq| sq.tokens).enumerate() {
            let row = &mut s.x[i * dim..(i + 1) * dim];
            self.embed.row(file, t, row)?;
            row.iter_mut().for_each(|v| *v *= scale);
        }
        for (l, layer) in self.layers.iter().enumerate() {
            rms_norm(&s.x, &layer.attn_norm, eps, &mut s.h);
            quantize_rows(&s.h, dim, &mut s.xq);
            let outs = &mut [&mut s.q, &mut s.k, &mut s.v];
            layer
                .qkv
                .forward(file, path, &s.h, &s.xq, n, &mut s.fused, outs)?;
            rms_norm_in_place(&mut s.q, &layer.q_norm, eps);
            rms_norm_in_place(&mut s.k, &layer.k_norm, eps);
            let table = if layer.sliding {
                &self.local
            } else {
                &self.global
            };
            for (i, &p) in lay.row_pos.iter().enumerate() {
                let q = &mut s.q[i * qdim..(i + 1) * qdim];
                rope(RopeStyle::Halves, q, hd, table, p);
                let k = &mut s.k[i * kvdim..(i + 1) * kvdim];
                rope(RopeStyle::Halves, k, hd, table, p);
            }
            append_kv(seqs, lay, l, &s.k, &s.v, kvdim);
            let shape = AttnShape {
                window: layer.sliding.then_some(self.window),
                ..self.attn
            };
            attention(path, shape, &s.q, &layer_kv(seqs, l), lay, &mut s.att);
            quantize_rows(&s.att, qdim, &mut s.xq);
            layer.wo.forward(file, path, &s.att, &s.xq, n, &mut s.o)?;
            rms_norm_in_place(&mut s.o, &layer.post_attn_norm, eps);
            s.x.iter_mut().zip(&s.o).for_each(|(x, o)| *x += o);
            rms_norm(&s.x, &layer.ffn_norm, eps, &mut s.h);
            quantize_rows(&s.h, dim, &mut s.xq);
            let outs = &mut [&mut s.g, &mut s.u];
            layer
                .gate_up
                .forward(file, path, &s.h, &s.xq, n, &mut s.fused, outs)?;
            s.g.iter_mut()
                .zip(&s.u)
                .for_each(|(g, u)| *g = gelu(*g) * u);
            quantize_rows(&s.g, layer.gate_up.rows(0), &mut s.xq);
            layer.down.forward(file, path, &s.g, &s.xq, n, &mut s.o)?;
            rms_norm_in_place(&mut s.o, &layer.post_ffn_norm, eps);
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
