//! Quantized matrix kernels of our own, for the formats where candle's CPU path is slow:
//! Q4_1 weights (candle's `BlockQ4_1::vec_dot` is scalar, ~70% of SmolLM2's decode time and
//! nearly all of its prefill). Activations are quantized once per input row to Q8_1, the
//! way llama.cpp does (`quantize_row_q8_1`: per 32 values, d = f16(max|x|/127),
//! q = round(x/d), s = f16(d·Σq)), and each weight block's dot product is
//! `d_w·d_x·Σ q_w·q_x + m_w·s_x` (`ggml_vec_dot_q4_1_q8_1`).
//!
//! This module holds every `unsafe` block of the crate's kernels. The AVX2 path is chosen at
//! run time by CPU feature detection; the scalar path is the reference the tests compare it
//! with (the integer sums are exact, so both paths agree to float rounding of the final
//! accumulation).

#![allow(unsafe_code)]

use half::f16;
use rayon::prelude::*;

/// Values per quantization block (Q4_1 and Q8_1).
pub const QK: usize = 32;
/// Bytes of one GGUF Q4_1 block: f16 d, f16 m, 16 bytes of nibbles.
pub const Q4_1_BLOCK_BYTES: usize = 20;

/// One block of 32 quantized activations.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(8))]
pub struct BlockQ8 {
    /// Scale (an f16 value held as f32).
    pub d: f32,
    /// d · Σ qs, rounded to f16 (held as f32).
    pub s: f32,
    /// Quantized values.
    pub qs: [i8; QK],
}

/// Quantizes one row of activations (`x.len()` a multiple of 32) into `out`.
pub fn quantize_row_q8_1(x: &[f32], out: &mut [BlockQ8]) {
    debug_assert_eq!(x.len(), out.len() * QK);
    for (xs, b) in x.chunks_exact(QK).zip(out.iter_mut()) {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let mut sum = 0i32;
        for (q, &v) in b.qs.iter_mut().zip(xs) {
            *q = (v * id).round() as i8;
            sum += i32::from(*q);
        }
        b.d = f16::from_f32(d).to_f32();
        b.s = f16::from_f32(sum as f32 * d).to_f32();
    }
}

/// Bytes of one GGUF Q8_0 block: f16 d, 32 signed bytes.
pub const Q8_0_BLOCK_BYTES: usize = 34;
/// Bytes of one GGUF Q5_0 block: f16 d, 32 high bits, 16 bytes of low nibbles.
pub const Q5_0_BLOCK_BYTES: usize = 22;
/// Values per K-quant super-block.
pub const QK_K: usize = 256;
/// Bytes of one GGUF Q4_K super-block: f16 d, f16 dmin, 12 bytes of 6-bit scales and
/// minimums, 128 bytes of nibbles.
pub const Q4K_BLOCK_BYTES: usize = 144;
/// Bytes of one GGUF Q6_K super-block: 128 bytes of low nibbles, 64 of high bit pairs, 16
/// signed 8-bit scales, f16 d.
pub const Q6K_BLOCK_BYTES: usize = 210;

/// Weight formats with a kernel here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// 4-bit with scale and minimum per 32 values.
    Q4_1,
    /// 8-bit with scale per 32 values.
    Q8_0,
    /// 5-bit with scale per 32 values (values q − 16).
    Q5_0,
    /// K-quant, 4-bit: per 256 values an f16 scale and minimum, per 32 a 6-bit scale and
    /// minimum of those. Tile kernels only.
    Q4K,
    /// K-quant, 6-bit: per 256 values an f16 scale, per 16 an 8-bit scale of it (values
    /// q − 32). Tile kernels only.
    Q6K,
}

impl Format {
    /// Bytes of one block ([`Format::block_values`] values).
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_1 => Q4_1_BLOCK_BYTES,
            Self::Q8_0 => Q8_0_BLOCK_BYTES,
            Self::Q5_0 => Q5_0_BLOCK_BYTES,
            Self::Q4K => Q4K_BLOCK_BYTES,
            Self::Q6K => Q6K_BLOCK_BYTES,
        }
    }

    /// Values per block: 32, or 256 for the K-quants.
    pub fn block_values(self) -> usize {
        match self {
            Self::Q4K | Self::Q6K => QK_K,
            _ => QK,
        }
    }

    /// Bytes of one row of `cols` values.
    pub fn row_bytes(self, cols: usize) -> usize {
        cols / self.block_values() * self.block_bytes()
    }

    /// Whether the row-at-a-time kernels (`TESSERA_KERNEL=rows`) have this format.
    pub fn has_row_kernel(self) -> bool {
        matches!(self, Self::Q4_1 | Self::Q8_0 | Self::Q5_0)
    }
}

/// A quantized weight matrix of `rows` outputs by `cols` inputs, in GGUF's row-major block
/// layout.
#[derive(Debug, Clone, Copy)]
pub struct QMatrix<'a> {
    /// Block format.
    pub format: Format,
    /// Raw blocks: `rows * cols / 32` blocks.
    pub bytes: &'a [u8],
    /// Output features.
    pub rows: usize,
    /// Input features (a multiple of 32).
    pub cols: usize,
}

/// Why a matrix could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KernelError {
    /// The byte length does not match the shape.
    #[error("quantized matrix {rows}x{cols} needs {need} bytes, got {got}")]
    Size {
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
        /// Bytes required.
        need: usize,
        /// Bytes given.
        got: usize,
    },
    /// Columns not a multiple of the block size.
    #[error("quantized matrix has {0} columns, not a multiple of its block size {1}")]
    Cols(usize, usize),
}

impl<'a> QMatrix<'a> {
    /// Checks that `bytes` holds exactly a `rows`×`cols` matrix of `format`.
    pub fn new(
        format: Format,
        bytes: &'a [u8],
        rows: usize,
        cols: usize,
    ) -> Result<Self, KernelError> {
        if !cols.is_multiple_of(format.block_values()) {
            return Err(KernelError::Cols(cols, format.block_values()));
        }
        let need = rows * format.row_bytes(cols);
        if bytes.len() != need {
            return Err(KernelError::Size {
                rows,
                cols,
                need,
                got: bytes.len(),
            });
        }
        Ok(Self {
            format,
            bytes,
            rows,
            cols,
        })
    }

    fn row(&self, r: usize) -> &'a [u8] {
        let n = self.format.row_bytes(self.cols);
        &self.bytes[r * n..(r + 1) * n]
    }

    fn dot(&self, path: Path, r: usize, x: &[BlockQ8]) -> f32 {
        match self.format {
            Format::Q4_1 => dot_q4_1(path, self.row(r), x),
            Format::Q8_0 => dot_q8_0(path, self.row(r), x),
            Format::Q5_0 => dot_q5_0(path, self.row(r), x),
            Format::Q4K | Format::Q6K => unreachable!("K-quants have tile kernels only"),
        }
    }

    /// Weight row `r` against four activation rows at once: the weight blocks are loaded
    /// and unpacked once for all four. Each result is bit-identical to [`QMatrix::dot`]
    /// (the same operations in the same order per row), so a replay that multiplies many
    /// rows matches decoding that multiplies one.
    fn dot4(&self, path: Path, r: usize, x: [&[BlockQ8]; 4]) -> [f32; 4] {
        #[cfg(target_arch = "x86_64")]
        if matches!(path, Path::Avx2(_)) {
            let w = self.row(r);
            match self.format {
                // SAFETY: `Path::Avx2` means AVX2, FMA and F16C were detected; each activation row
                // has `cols / 32` blocks and `w` one row of blocks (checked in `matmul`).
                Format::Q4_1 => return unsafe { avx2::dot4_q4_1(w, x) },
                // SAFETY: as above.
                Format::Q8_0 => return unsafe { avx2::dot4_q8_0(w, x) },
                Format::Q5_0 | Format::Q4K | Format::Q6K => {}
            }
        }
        x.map(|xi| self.dot(path, r, xi))
    }

    /// Weight rows `weights` against activation rows `rows`.
    fn dot_block(
        &self,
        path: Path,
        weights: std::ops::Range<usize>,
        x: &[BlockQ8],
        rows: std::ops::Range<usize>,
        mut put: impl FnMut(usize, usize, f32),
    ) {
        for r in weights {
            self.dot_rows(path, r, x, rows.clone(), |i, v| put(r, i, v));
        }
    }

    /// Weight row `r` against activation rows `rows` of `x`, four at a time.
    fn dot_rows(
        &self,
        path: Path,
        r: usize,
        x: &[BlockQ8],
        rows: std::ops::Range<usize>,
        mut put: impl FnMut(usize, f32),
    ) {
        let nb = self.cols / QK;
        let row = |i: usize| &x[i * nb..(i + 1) * nb];
        let (mut i, m) = (rows.start, rows.end);
        while i + 4 <= m {
            let out = self.dot4(path, r, [row(i), row(i + 1), row(i + 2), row(i + 3)]);
            for (k, v) in out.into_iter().enumerate() {
                put(i + k, v);
            }
            i += 4;
        }
        for i in i..m {
            put(i, self.dot(path, r, row(i)));
        }
    }
}

/// Which implementation runs the dot products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Plain Rust; the reference.
    Scalar,
    /// AVX2, FMA and F16C (x86-64). Only [`best_path`] makes one (its token cannot be
    /// built elsewhere), after detecting them: the AVX2 kernels' safety rests on that.
    Avx2(Avx2Detected),
}

/// Proof that [`best_path`] detected AVX2, FMA and F16C on this CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Avx2Detected(());

/// The fastest path this CPU supports, unless `TESSERA_KERNEL=scalar` asks for the
/// reference path (for numerics checks and debugging).
pub fn best_path() -> Path {
    if std::env::var("TESSERA_KERNEL").is_ok_and(|v| v == "scalar") {
        return Path::Scalar;
    }
    #[cfg(target_arch = "x86_64")]
    {
        // Every AVX2 kernel here also converts f16 (F16C): a VM may mask it.
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            return Path::Avx2(Avx2Detected(()));
        }
    }
    Path::Scalar
}

/// Whether weights are repacked for the tile kernels (the default). `TESSERA_KERNEL=rows`
/// keeps the previous row-at-a-time kernels on the mapped file, whose float sums are
/// ordered differently: what nodes before the tile kernels ran, kept to check that a node
/// on one and an auditor on the other agree within the audit tolerance.
pub fn tiles_enabled() -> bool {
    !std::env::var("TESSERA_KERNEL").is_ok_and(|v| v == "rows")
}

/// The numerics of models loaded now (see [`Packed`]): `tessera-tiles-2` for the tile
/// kernels, whose scalar and SIMD paths agree bit for bit, `tessera-rows-2` for the
/// previous row kernels. Generation 2 computes attention in one fixed float order with its
/// own `exp` ([`attn_scores`], [`attn_values`]; generation 1 used libm's per-CPU `expf` and
/// plain sums), keeps the KV cache in f16 and multiplies Q4_K and Q6_K with its own tiles.
pub fn numerics() -> &'static str {
    if tiles_enabled() {
        "tessera-tiles-2"
    } else {
        "tessera-rows-2"
    }
}

/// Dot product of one Q4_1 weight row with one quantized activation row.
pub fn dot_q4_1(path: Path, w: &[u8], x: &[BlockQ8]) -> f32 {
    debug_assert_eq!(w.len(), x.len() * Q4_1_BLOCK_BYTES);
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Path::Avx2` is only produced by `best_path` after detecting AVX2, FMA and F16C,
        // or by tests that check the same; slice lengths are asserted above and re-checked
        // by the bounds of the block loop.
        Path::Avx2(_) => unsafe { avx2::dot_q4_1(w, x) },
        _ => dot_q4_1_scalar(w, x),
    }
}

/// Dot product of one Q8_0 weight row with one quantized activation row (`ggml_vec_dot_q8_0_q8_0`;
/// the activation's `s` is unused).
pub fn dot_q8_0(path: Path, w: &[u8], x: &[BlockQ8]) -> f32 {
    debug_assert_eq!(w.len(), x.len() * Q8_0_BLOCK_BYTES);
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as for `dot_q4_1`.
        Path::Avx2(_) => unsafe { avx2::dot_q8_0(w, x) },
        _ => dot_q8_0_scalar(w, x),
    }
}

/// The reference Q8_0 dot product.
pub fn dot_q8_0_scalar(w: &[u8], x: &[BlockQ8]) -> f32 {
    let mut sum = 0f32;
    for (wb, xb) in w.chunks_exact(Q8_0_BLOCK_BYTES).zip(x) {
        let d = f16::from_le_bytes([wb[0], wb[1]]).to_f32();
        let sumi: i32 = wb[2..]
            .iter()
            .zip(&xb.qs)
            .map(|(&a, &b)| i32::from(a as i8) * i32::from(b))
            .sum();
        sum += sumi as f32 * d * xb.d;
    }
    sum
}

/// Dot product of one Q5_0 weight row with one quantized activation row
/// (`ggml_vec_dot_q5_0_q8_0`; the activation's `s` is unused).
pub fn dot_q5_0(path: Path, w: &[u8], x: &[BlockQ8]) -> f32 {
    debug_assert_eq!(w.len(), x.len() * Q5_0_BLOCK_BYTES);
    match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as for `dot_q4_1`.
        Path::Avx2(_) => unsafe { avx2::dot_q5_0(w, x) },
        _ => dot_q5_0_scalar(w, x),
    }
}

/// The reference Q5_0 dot product: value j is ((nibble | high bit << 4) − 16) · d.
pub fn dot_q5_0_scalar(w: &[u8], x: &[BlockQ8]) -> f32 {
    let mut sum = 0f32;
    for (wb, xb) in w.chunks_exact(Q5_0_BLOCK_BYTES).zip(x) {
        let d = f16::from_le_bytes([wb[0], wb[1]]).to_f32();
        let qh = u32::from_le_bytes([wb[2], wb[3], wb[4], wb[5]]);
        let mut sumi = 0i32;
        for j in 0..QK / 2 {
            let lo = i32::from(wb[6 + j] & 0x0F) | (((qh >> j) & 1) << 4) as i32;
            let hi = i32::from(wb[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4) as i32;
            sumi += (lo - 16) * i32::from(xb.qs[j]) + (hi - 16) * i32::from(xb.qs[j + QK / 2]);
        }
        sum += sumi as f32 * d * xb.d;
    }
    sum
}

/// The reference dot product (`ggml_vec_dot_q4_1_q8_1`).
pub fn dot_q4_1_scalar(w: &[u8], x: &[BlockQ8]) -> f32 {
    let mut sum = 0f32;
    for (wb, xb) in w.chunks_exact(Q4_1_BLOCK_BYTES).zip(x) {
        let d = f16::from_le_bytes([wb[0], wb[1]]).to_f32();
        let m = f16::from_le_bytes([wb[2], wb[3]]).to_f32();
        let mut sumi = 0i32;
        for j in 0..QK / 2 {
            let q = wb[4 + j];
            sumi += i32::from(q & 0x0F) * i32::from(xb.qs[j])
                + i32::from(q >> 4) * i32::from(xb.qs[j + QK / 2]);
        }
        sum += sumi as f32 * d * xb.d + m * xb.s;
    }
    sum
}

/// Activation rows multiplied against every weight row before the next ones: 16 rows of
/// the widest projection (1536 inputs) are 30 KB of blocks, so they stay in L1 while the
/// weight rows stream past (a prefill or replay multiplies hundreds of rows).
const ACT_TILE: usize = 16;

/// `out[i][r] = W[r] · x[i]` for `m` quantized activation rows (each `w.cols / 32` blocks),
/// with the output rows split across the rayon pool (run it from inside the pool: a call
/// from outside pays a thread wake-up each time). `out` is `m × w.rows`, row-major.
pub fn matmul(path: Path, w: &QMatrix<'_>, x: &[BlockQ8], m: usize, out: &mut [f32]) {
    let nb = w.cols / QK;
    assert!(
        w.format.has_row_kernel(),
        "no row kernel for {:?}",
        w.format
    );
    assert_eq!(x.len(), m * nb, "activation blocks");
    assert_eq!(out.len(), m * w.rows, "output size");
    if rayon::current_num_threads() == 1 {
        let rows = w.rows;
        for i0 in (0..m).step_by(ACT_TILE) {
            w.dot_block(path, 0..rows, x, i0..(i0 + ACT_TILE).min(m), |r, i, v| {
                out[i * rows + r] = v
            });
        }
        return;
    }
    // Chunks of weight rows large enough to amortise the hand-off, small enough to balance.
    let chunk = (w.rows / (4 * rayon::current_num_threads()).max(1)).clamp(16, 256);
    let n_chunks = w.rows.div_ceil(chunk);
    let parts: Vec<(usize, Vec<f32>)> = (0..n_chunks)
        .into_par_iter()
        .map(|c| {
            let r0 = c * chunk;
            let r1 = (r0 + chunk).min(w.rows);
            let mut part = vec![0f32; (r1 - r0) * m];
            for i0 in (0..m).step_by(ACT_TILE) {
                w.dot_block(path, r0..r1, x, i0..(i0 + ACT_TILE).min(m), |r, i, v| {
                    part[i * (r1 - r0) + (r - r0)] = v
                });
            }
            (r0, part)
        })
        .collect();
    for (r0, part) in parts {
        let len = part.len() / m;
        for i in 0..m {
            out[i * w.rows + r0..i * w.rows + r0 + len]
                .copy_from_slice(&part[i * len..(i + 1) * len]);
        }
    }
}

/// Weight rows per tile of a [`Packed`] matrix: one 8-lane register of outputs.
pub const TILE: usize = 8;

/// A weight matrix repacked once at load into tiles of [`TILE`] rows, the layout the tile
/// kernels read without shuffles: per tile and block, the rows' f16 scales side by side,
/// then their quants (Q4_1: row k's nibbles beside row k+4's, so one 32-byte load serves
/// two rows). Padding rows are zero and their outputs dropped.
///
/// Every path computes each output in one canonical order, defined by
/// [`tile_scalar`]: per block, the exact integer dot product `isum` of the quants, then
/// `acc = fma(isum, d_w·d_x, acc)` (and for Q4_1 `sm = fma(m_w, s_x, sm)`), blocks in
/// order, and `acc + sm` at the end. The SIMD paths keep that order lane by lane, so they
/// are bit-identical to the scalar reference and to each other whatever the number of
/// activation rows, the thread count or the CPU: a replay on any machine reproduces
/// decoding on any other.
#[derive(Debug, Clone)]
pub struct Packed {
    format: Format,
    rows: usize,
    cols: usize,
    data: WeightBuf,
}

/// Repacked weights in anonymous memory advised for transparent huge pages: decoding streams
/// every weight once per token, and with 4 KiB pages each page costs a TLB miss and stops
/// the hardware prefetcher (THP is usually `madvise`, so a plain `Vec` never gets them).
struct WeightBuf(memmap2::MmapMut, usize);

impl WeightBuf {
    /// `len` zeroed bytes (at least one page, so even an empty matrix has a mapping).
    fn zeroed(len: usize) -> Self {
        let map = memmap2::MmapMut::map_anon(len.max(1))
            .unwrap_or_else(|e| panic!("cannot map {len} bytes for weights: {e}"));
        #[cfg(target_os = "linux")]
        if let Err(e) = map.advise(memmap2::Advice::HugePage) {
            tracing::debug!("no transparent huge pages for weights: {e}");
        }
        Self(map, len)
    }
}

impl std::ops::Deref for WeightBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0[..self.1]
    }
}

impl std::ops::DerefMut for WeightBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.0[..self.1]
    }
}

impl Clone for WeightBuf {
    fn clone(&self) -> Self {
        let mut c = Self::zeroed(self.len());
        c.copy_from_slice(self);
        c
    }
}

impl std::fmt::Debug for WeightBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WeightBuf({} bytes)", self.len())
    }
}

impl Packed {
    /// Whether `format` has tile kernels.
    pub fn supports(format: Format) -> bool {
        matches!(
            format,
            Format::Q4_1 | Format::Q8_0 | Format::Q5_0 | Format::Q4K | Format::Q6K
        )
    }

    /// Bytes of one tile's block (all its rows).
    fn tile_block_bytes(format: Format) -> usize {
        match format {
            // 8 f16 d, 8 f16 m, 4 pairs of 16 nibble bytes.
            Format::Q4_1 => 16 + 16 + 4 * 32,
            // 8 f16 d, 8 rows of 32 bytes.
            Format::Q8_0 => 16 + TILE * 32,
            // 8 f16 d, per pair two 32-bit words of high bits (values 0..15, 16..31; row
            // k's bits in the low half, row k+4's in the high), 4 pairs of nibble bytes.
            Format::Q5_0 => 16 + 32 + 4 * 32,
            // Per 32 values: 8 f32 scales d·sc, 8 f32 negated minimums −dmin·m (exact
            // products, as llama.cpp computes them), then nibbles as Q4_1's.
            Format::Q4K => 32 + 32 + 4 * 32,
            // Per 32 values: 8 f32 scales d·sc of values 0..15, 8 of values 16..31, then
            // each row's 32 unsigned 6-bit values, one per byte.
            Format::Q6K => 32 + 32 + TILE * 32,
        }
    }

    /// Repacks `m`; `None` for formats without tile kernels.
    pub fn new(m: &QMatrix<'_>) -> Option<Self> {
        Self::stacked(&[*m])
    }

    /// Repacks matrices stacked row-wise, one after the other, as one (a fused projection:
    /// one parallel product for all of them). `None` unless they share a format with tile
    /// kernels and a width, and every one but the last fills whole tiles. Outputs are
    /// bit-identical to the parts' (each row's arithmetic is its own).
    pub fn stacked(parts: &[QMatrix<'_>]) -> Option<Self> {
        let first = parts.first()?;
        let (format, cols) = (first.format, first.cols);
        if !Self::supports(format)
            || parts.iter().any(|p| p.format != format || p.cols != cols)
            || !parts[..parts.len() - 1]
                .iter()
                .all(|p| p.rows.is_multiple_of(TILE))
        {
            return None;
        }
        // First tile of each part.
        let mut starts = Vec::with_capacity(parts.len());
        let mut tiles = 0;
        for p in parts {
            starts.push(tiles);
            tiles += p.rows.div_ceil(TILE);
        }
        let nb = cols / QK;
        let tbb = Self::tile_block_bytes(format);
        let mut data = WeightBuf::zeroed(tiles * nb * tbb);
        let bb = format.block_bytes();
        let kquant = format.block_values() == QK_K;
        data.par_chunks_mut(nb * tbb)
            .enumerate()
            .for_each(|(tt, tile)| {
                let part = starts.partition_point(|&s| s <= tt) - 1;
                let (m, t) = (&parts[part], tt - starts[part]);
                for k in 0..TILE {
                    let r = t * TILE + k;
                    if r >= m.rows {
                        break;
                    }
                    let row = m.row(r);
                    if kquant {
                        for (sb, src) in row.chunks_exact(bb).enumerate() {
                            let dst = &mut tile[sb * 8 * tbb..(sb + 1) * 8 * tbb];
                            repack_kquant(format, src, k, tbb, dst);
                        }
                        continue;
                    }
                    for b in 0..nb {
                        let src = &row[b * bb..(b + 1) * bb];
                        let dst = &mut tile[b * tbb..(b + 1) * tbb];
                        dst[2 * k..2 * k + 2].copy_from_slice(&src[..2]);
                        match format {
                            Format::Q4_1 => {
                                dst[16 + 2 * k..16 + 2 * k + 2].copy_from_slice(&src[2..4]);
                                let off = 32 + (k % 4) * 32 + (k / 4) * 16;
                                dst[off..off + 16].copy_from_slice(&src[4..20]);
                            }
                            Format::Q8_0 => {
                                let off = 16 + k * 32;
                                dst[off..off + 32].copy_from_slice(&src[2..34]);
                            }
                            Format::Q4K | Format::Q6K => unreachable!("K-quants repack above"),
                            Format::Q5_0 => {
                                let qh = u32::from_le_bytes([src[2], src[3], src[4], src[5]]);
                                let (p, hi) = (k % 4, k / 4);
                                for (half, bits) in [(0, qh & 0xFFFF), (1, qh >> 16)] {
                                    let at = 16 + p * 8 + half * 4;
                                    let mut w = u32::from_le_bytes([
                                        dst[at],
                                        dst[at + 1],
                                        dst[at + 2],
                                        dst[at + 3],
                                    ]);
                                    w |= bits << (16 * hi);
                                    dst[at..at + 4].copy_from_slice(&w.to_le_bytes());
                                }
                                let off = 48 + p * 32 + hi * 16;
                                dst[off..off + 16].copy_from_slice(&src[6..22]);
                            }
                        }
                    }
                }
            });
        Some(Self {
            format,
            rows: parts.iter().map(|p| p.rows).sum(),
            cols,
            data,
        })
    }

    /// Output features.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input features.
    pub fn cols(&self) -> usize {
        self.cols
    }

    fn tile(&self, t: usize) -> &[u8] {
        let n = self.cols / QK * Self::tile_block_bytes(self.format);
        &self.data[t * n..(t + 1) * n]
    }

    /// Outputs of tile `t` for activation rows `x` (`m` rows of `cols / 32` blocks): row
    /// i's 8 outputs go to `out[i * ostride..][..8]`.
    ///
    /// # Safety
    /// `out[i * ostride..][..8]` must be writable and not otherwise borrowed for every
    /// i < m.
    #[allow(clippy::too_many_arguments)] // one tile call's inputs
    unsafe fn tile_rows(
        &self,
        path: Path,
        t: usize,
        x: &[BlockQ8],
        xsum: &[i32],
        m: usize,
        out: *mut f32,
        ostride: usize,
    ) {
        let nb = self.cols / QK;
        let tile = self.tile(t);
        assert!(x.len() >= m * nb);
        assert!(
            m <= TILE_ROWS,
            "at most {TILE_ROWS} activation rows per tile call"
        );
        assert!(xsum.len() >= m * nb * xsum_per_block(self.format));
        #[cfg(target_arch = "x86_64")]
        if matches!(path, Path::Avx2(_)) {
            // SAFETY: `Path::Avx2` means AVX2, FMA and F16C were detected; `tile` holds
            // `nb` tile blocks of this format, `x` at least `m * nb` blocks (asserted
            // above); `out` is the caller's contract.
            unsafe {
                // One activation row (decoding) gets its own instance: one accumulator
                // held in a register, none zeroed for rows that are not there.
                match (self.format, m) {
                    (Format::Q4_1, 1) => avx2::tile_q4_1::<1, false>(tile, nb, x, m, out, ostride),
                    (Format::Q4_1, _) => {
                        avx2::tile_q4_1::<TILE_ROWS, false>(tile, nb, x, m, out, ostride)
                    }
                    (Format::Q4K, 1) => avx2::tile_q4_1::<1, true>(tile, nb, x, m, out, ostride),
                    (Format::Q4K, _) => {
                        avx2::tile_q4_1::<TILE_ROWS, true>(tile, nb, x, m, out, ostride)
                    }
                    (Format::Q6K, 1) => avx2::tile_q6k::<1>(tile, nb, x, xsum, m, out, ostride),
                    (Format::Q6K, _) => {
                        avx2::tile_q6k::<TILE_ROWS>(tile, nb, x, xsum, m, out, ostride)
                    }
                    (Format::Q8_0, 1) => avx2::tile_q8_0::<1>(tile, nb, x, m, out, ostride),
                    (Format::Q8_0, _) => avx2::tile_q8_0::<TILE_ROWS>(tile, nb, x, m, out, ostride),
                    (Format::Q5_0, 1) => avx2::tile_q5_0::<1>(tile, nb, x, xsum, m, out, ostride),
                    (Format::Q5_0, _) => {
                        avx2::tile_q5_0::<TILE_ROWS>(tile, nb, x, xsum, m, out, ostride)
                    }
                }
            }
            return;
        }
        for i in 0..m {
            // SAFETY: the caller's contract: these 8 floats are ours alone.
            let o = unsafe { std::slice::from_raw_parts_mut(out.add(i * ostride), TILE) };
            tile_scalar(self.format, tile, &x[i * nb..(i + 1) * nb], o);
        }
    }
}

/// Writes row `k` of one K-quant super-block `src` into the 8 tile blocks (`tbb` bytes
/// each) of `dst` that cover its 256 values, decoded as llama.cpp's `dequantize_row_q4_K`
/// and `dequantize_row_q6_K` do: the f32 scales are the same products `d · sc` (and
/// `dmin · m`), exact in f32, and the quants are the same integers.
fn repack_kquant(format: Format, src: &[u8], k: usize, tbb: usize, dst: &mut [u8]) {
    let h = |at: usize| f16::from_le_bytes([src[at], src[at + 1]]).to_f32();
    let mut q = [0u8; QK_K];
    // Row k's two f32 per tile block j: Q4_K's scale and negated minimum, or Q6_K's scales
    // of values 0..15 and 16..31.
    let put = |j: usize, first: f32, second: f32, dst: &mut [u8]| {
        let blk = &mut dst[j * tbb..(j + 1) * tbb];
        blk[4 * k..4 * k + 4].copy_from_slice(&first.to_le_bytes());
        blk[32 + 4 * k..32 + 4 * k + 4].copy_from_slice(&second.to_le_bytes());
    };
    match format {
        Format::Q4K => {
            let (d, dmin) = (h(0), h(2));
            let sc = &src[4..16];
            let qs = &src[16..144];
            for j in 0..8 {
                // llama.cpp's get_scale_min_k4.
                let (s, m) = if j < 4 {
                    (sc[j] & 63, sc[j + 4] & 63)
                } else {
                    (
                        (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4),
                        (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4),
                    )
                };
                let chunk = &qs[(j / 2) * 32..(j / 2) * 32 + 32];
                for l in 0..32 {
                    q[j * 32 + l] = if j % 2 == 0 {
                        chunk[l] & 0xF
                    } else {
                        chunk[l] >> 4
                    };
                }
                put(j, d * f32::from(s), -(dmin * f32::from(m)), dst);
                let off = 64 + (k % 4) * 32 + (k / 4) * 16;
                let v = &q[j * 32..j * 32 + 32];
                for l in 0..16 {
                    dst[j * tbb + off + l] = v[l] | (v[l + 16] << 4);
                }
            }
        }
        Format::Q6K => {
            let (ql, qh) = (&src[..128], &src[128..192]);
            let sc = &src[192..208];
            let d = h(208);
            for half in 0..2 {
                let (ql, qh) = (&ql[half * 64..], &qh[half * 32..]);
                let y = &mut q[half * 128..];
                for l in 0..32 {
                    y[l] = (ql[l] & 0xF) | ((qh[l] & 3) << 4);
                    y[l + 32] = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4);
                    y[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                    y[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
                }
            }
            for j in 0..8 {
                let s = |i: usize| d * f32::from(sc[i] as i8);
                put(j, s(2 * j), s(2 * j + 1), dst);
                let off = 64 + k * 32;
                dst[j * tbb + off..j * tbb + off + 32].copy_from_slice(&q[j * 32..j * 32 + 32]);
            }
        }
        _ => unreachable!("not a K-quant"),
    }
}

/// The canonical computation of one tile's 8 outputs for one activation row (see
/// [`Packed`]): the reference every SIMD path equals bit for bit.
pub fn tile_scalar(format: Format, tile: &[u8], x: &[BlockQ8], out: &mut [f32]) {
    let tbb = Packed::tile_block_bytes(format);
    let h = |b: &[u8], at: usize| f16::from_le_bytes([b[at], b[at + 1]]).to_f32();
    let f = |b: &[u8], at: usize| f32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    for (k, o) in out.iter_mut().enumerate().take(TILE) {
        let (mut acc, mut sm) = (0f32, 0f32);
        for (b, xb) in x.iter().enumerate() {
            let blk = &tile[b * tbb..(b + 1) * tbb];
            if format == Format::Q6K {
                // Two scales per block: values 0..15, then 16..31, each sum exact.
                let qs = &blk[64 + k * 32..64 + k * 32 + 32];
                for half in 0..2 {
                    let isum: i32 = (16 * half..16 * half + 16)
                        .map(|j| (i32::from(qs[j]) - 32) * i32::from(xb.qs[j]))
                        .sum();
                    acc = (isum as f32).mul_add(f(blk, 32 * half + 4 * k) * xb.d, acc);
                }
                continue;
            }
            let d = if format == Format::Q4K {
                f(blk, 4 * k)
            } else {
                h(blk, 2 * k)
            };
            let isum: i32 = match format {
                Format::Q4K => {
                    let off = 64 + (k % 4) * 32 + (k / 4) * 16;
                    let qs = &blk[off..off + 16];
                    sm = f(blk, 32 + 4 * k).mul_add(xb.s, sm);
                    (0..16)
                        .map(|j| {
                            i32::from(qs[j] & 0x0F) * i32::from(xb.qs[j])
                                + i32::from(qs[j] >> 4) * i32::from(xb.qs[j + 16])
                        })
                        .sum()
                }
                Format::Q6K => unreachable!("handled above"),
                Format::Q4_1 => {
                    let off = 32 + (k % 4) * 32 + (k / 4) * 16;
                    let qs = &blk[off..off + 16];
                    let m = h(blk, 16 + 2 * k);
                    sm = m.mul_add(xb.s, sm);
                    (0..16)
                        .map(|j| {
                            i32::from(qs[j] & 0x0F) * i32::from(xb.qs[j])
                                + i32::from(qs[j] >> 4) * i32::from(xb.qs[j + 16])
                        })
                        .sum()
                }
                Format::Q8_0 => {
                    let off = 16 + k * 32;
                    blk[off..off + 32]
                        .iter()
                        .zip(&xb.qs)
                        .map(|(&w, &q)| i32::from(w as i8) * i32::from(q))
                        .sum()
                }
                Format::Q5_0 => {
                    let (p, hi) = (k % 4, k / 4);
                    let word = |half: usize| {
                        let at = 16 + p * 8 + half * 4;
                        u32::from_le_bytes([blk[at], blk[at + 1], blk[at + 2], blk[at + 3]])
                            >> (16 * hi)
                    };
                    let (lo_bits, hi_bits) = (word(0), word(1));
                    let off = 48 + p * 32 + hi * 16;
                    let qs = &blk[off..off + 16];
                    (0..16)
                        .map(|j| {
                            let v0 = i32::from(qs[j] & 0x0F) | (((lo_bits >> j) & 1) << 4) as i32;
                            let v1 = i32::from(qs[j] >> 4) | (((hi_bits >> j) & 1) << 4) as i32;
                            (v0 - 16) * i32::from(xb.qs[j]) + (v1 - 16) * i32::from(xb.qs[j + 16])
                        })
                        .sum()
                }
            };
            acc = (isum as f32).mul_add(d * xb.d, acc);
        }
        *o = match format {
            Format::Q4_1 | Format::Q4K => acc + sm,
            _ => acc,
        };
    }
}

/// Activation rows whose accumulators a tile kernel keeps at once: 32 rows of the widest
/// projection's blocks stay in L1/L2 while the tile's unpacked weights are reused for each.
const TILE_ROWS: usize = 32;

/// `out[i][r] = W[r] · x[i]` for a packed `w` and `m` quantized activation rows, tiles
/// split across the rayon pool (run it from inside the pool). `out` is `m × w.rows()`.
pub fn matmul_packed(path: Path, w: &Packed, x: &[BlockQ8], m: usize, out: &mut [f32]) {
    let nb = w.cols / QK;
    assert_eq!(x.len(), m * nb, "activation blocks");
    assert_eq!(out.len(), m * w.rows, "output size");
    let tiles = w.rows.div_ceil(TILE);
    let rows = w.rows;
    // Q5_0 and Q6_K values are stored unsigned (offset by 16 or 32): each block's Σx
    // (Q6_K: each half block's, one per scale) corrects the integer sums.
    let per = xsum_per_block(w.format);
    let xsum: Vec<i32> = x
        .iter()
        .flat_map(|b| b.qs.chunks(QK / per.max(1)).take(per))
        .map(|qs| qs.iter().map(|&q| i32::from(q)).sum())
        .collect();
    let dst = OutPtr(out.as_mut_ptr());
    // Tiles t0..t1 for every activation row, straight into `out` (whole tiles) or through
    // `buf` (the last, partial tile).
    let run_tiles = |t0: usize, t1: usize, buf: &mut Vec<f32>| {
        for t in t0..t1 {
            let col = t * TILE;
            let valid = TILE.min(rows - col);
            for i0 in (0..m).step_by(TILE_ROWS) {
                let g = TILE_ROWS.min(m - i0);
                let xs = &xsum[i0 * nb * per..(i0 + g) * nb * per];
                let xg = &x[i0 * nb..(i0 + g) * nb];
                if valid == TILE {
                    // SAFETY: `out` is m × rows and col + 8 <= rows, so columns
                    // col..col + 8 of rows i0..i0 + g are in bounds; tile t is run by this
                    // call alone, so nothing else reads or writes them.
                    unsafe { w.tile_rows(path, t, xg, xs, g, dst.at(i0 * rows + col), rows) };
                } else {
                    buf.resize(g * TILE, 0.0);
                    // SAFETY: `buf` holds g rows of 8 floats.
                    unsafe { w.tile_rows(path, t, xg, xs, g, buf.as_mut_ptr(), TILE) };
                    for i in 0..g {
                        // SAFETY: columns col..col + valid of row i0 + i are in bounds and
                        // this tile's alone (as above); `buf` does not overlap `out`.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                buf.as_ptr().add(i * TILE),
                                dst.at((i0 + i) * rows + col),
                                valid,
                            )
                        };
                    }
                }
            }
        }
    };
    if rayon::current_num_threads() == 1 {
        run_tiles(0, tiles, &mut Vec::new());
        return;
    }
    // Chunks of tiles large enough to amortise the hand-off, small enough to balance.
    let chunk = (tiles / (4 * rayon::current_num_threads())).clamp(2, 32);
    (0..tiles.div_ceil(chunk))
        .into_par_iter()
        .for_each_init(Vec::new, |buf, c| {
            run_tiles(c * chunk, ((c + 1) * chunk).min(tiles), buf)
        });
}

/// Sums of activations a format's kernel needs per block (see [`matmul_packed`]).
fn xsum_per_block(format: Format) -> usize {
    match format {
        Format::Q5_0 => 1,
        Format::Q6K => 2,
        _ => 0,
    }
}

/// The output of [`matmul_packed`], shared by the tasks that each write their own tiles'
/// columns (disjoint elements; no two tasks form overlapping slices).
struct OutPtr(*mut f32);

// SAFETY: the pointer is only written through at elements one task owns (see
// `matmul_packed`), and `out` outlives the parallel loop.
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The element at `i`, as a pointer (a method, so closures capture the whole `OutPtr`).
    fn at(&self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// Attention scores of one query head: `out[t] = scale · (q · k_t)` for key t at
/// `k[t * stride..][..q.len()]`, in one fixed float order on every path: lane l sums dims
/// 8c + l over whole chunks c in order with fused multiply-adds, the lanes are reduced as
/// ((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7)), the dims past the last whole chunk are added one by
/// one, and the sum is scaled. The AVX2 path scores eight keys at once and reduces them
/// together, with the same additions.
pub fn attn_scores(path: Path, q: &[f32], k: &[f16], stride: usize, scale: f32, out: &mut [f32]) {
    let hd = q.len();
    let whole = hd / 8 * 8;
    if let Some(last) = out.len().checked_sub(1) {
        assert!(k.len() >= last * stride + hd, "keys too short");
    }
    let mut t = 0;
    #[cfg(target_arch = "x86_64")]
    if matches!(path, Path::Avx2(_)) {
        while t + 8 <= out.len() {
            // SAFETY: `Path::Avx2` means AVX2, FMA and F16C were detected; keys t..t + 8 lie in
            // `k` (asserted above) and `q` holds `whole` floats.
            let lanes = unsafe { avx2::dot8_keys(&q[..whole], &k[t * stride..], stride) };
            for (u, s) in lanes.iter().enumerate() {
                let kt = &k[(t + u) * stride..][..hd];
                out[t + u] = (s + tail_dot(&q[whole..], &kt[whole..])) * scale;
            }
            t += 8;
        }
    }
    let _ = path;
    for (t, o) in out.iter_mut().enumerate().skip(t) {
        let kt = &k[t * stride..][..hd];
        let mut a = [0f32; 8];
        for c in (0..whole).step_by(8) {
            for l in 0..8 {
                a[l] = q[c + l].mul_add(kt[c + l].to_f32(), a[l]);
            }
        }
        *o = (lanes_sum(&a) + tail_dot(&q[whole..], &kt[whole..])) * scale;
    }
}

/// Output dimensions one pass of [`attn_values`] keeps in registers over all keys.
const DIMS_AT_ONCE: usize = 64;

/// Weighted sum of one head's values: `out[d] = Σ_t fma(e[t], v_t[d])` in t order from 0,
/// for value t at `v[t * stride..][..out.len()]`. The AVX2 path takes 64 dims at a time in
/// eight registers; the rest, and the scalar path, the same operations one dim at a time.
pub fn attn_values(path: Path, e: &[f32], v: &[f16], stride: usize, out: &mut [f32]) {
    let hd = out.len();
    if let Some(last) = e.len().checked_sub(1) {
        assert!(v.len() >= last * stride + hd, "values too short");
    }
    let mut d0 = 0;
    #[cfg(target_arch = "x86_64")]
    if matches!(path, Path::Avx2(_)) {
        while d0 + DIMS_AT_ONCE <= hd {
            // SAFETY: `Path::Avx2` means AVX2, FMA and F16C were detected; value t's dims
            // d0..d0 + 64 lie in `v` for every t < e.len() (asserted above), and `out` has them.
            unsafe { avx2::values64(e, &v[d0..], stride, &mut out[d0..d0 + DIMS_AT_ONCE]) };
            d0 += DIMS_AT_ONCE;
        }
    }
    let _ = path;
    for (d, o) in out.iter_mut().enumerate().skip(d0) {
        let mut acc = 0f32;
        for (t, w) in e.iter().enumerate() {
            acc = w.mul_add(v[t * stride + d].to_f32(), acc);
        }
        *o = acc;
    }
}

/// The fixed reduction of eight lanes: ((l0+l1)+(l2+l3))+((l4+l5)+(l6+l7)).
#[inline(always)]
pub fn lanes_sum(a: &[f32; 8]) -> f32 {
    ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))
}

/// Dims past the last whole chunk of eight, one by one.
#[inline(always)]
fn tail_dot(q: &[f32], k: &[f16]) -> f32 {
    q.iter()
        .zip(k)
        .fold(0.0, |s, (a, b)| a.mul_add(b.to_f32(), s))
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{BlockQ8, Q4_1_BLOCK_BYTES};
    use half::f16;
    use std::arch::x86_64::*;

    /// [`super::tile_scalar`] for a Q5_0 tile against `m` activation rows, bit for bit:
    /// values are taken as `v = nibble + 16·bit` (unsigned, so `maddubs` applies) and each
    /// block's integer sum corrected by `16·Σx` (`xsum`), giving Σ (v − 16)·x exactly.
    ///
    /// # Safety
    /// Computes at most `R` activation rows (accumulators kept: 1 when decoding).
    /// The CPU must support AVX2, FMA and F16C; `tile` holds `nb` Q5_0 tile blocks
    /// (176 bytes each), `x` and `xsum` at least `m * nb` entries; `out[i * ostride..][..8]`
    /// is writable and not otherwise borrowed for every i < m.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile_q5_0<const R: usize>(
        tile: &[u8],
        nb: usize,
        x: &[BlockQ8],
        xsum: &[i32],
        m: usize,
        out: *mut f32,
        ostride: usize,
    ) {
        const TBB: usize = 176;
        debug_assert!(tile.len() >= nb * TBB && x.len() >= m * nb && xsum.len() >= m * nb);
        let mask = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let sixteen = _mm256_set1_epi8(0x10);
        let shuf = _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0,
        );
        let bit_mask = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
        let all = _mm256_set1_epi64x(-1);
        // Byte j of the result is 16 when bit j of `w` is set, else 0.
        let bits16 = |w: u32| {
            let b = _mm256_shuffle_epi8(_mm256_set1_epi32(w as i32), shuf);
            _mm256_and_si256(
                _mm256_cmpeq_epi8(_mm256_or_si256(b, bit_mask), all),
                sixteen,
            )
        };
        let mut acc = [_mm256_setzero_ps(); R];
        let m = m.min(R);
        let tp = tile.as_ptr();
        let xp = x.as_ptr();
        for b in 0..nb {
            // SAFETY: tile block b lies within `tile` (b < nb); unaligned loads.
            let blk = tp.add(b * TBB);
            if R == 1 {
                prefetch_ahead::<TBB>(blk);
            }
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
            let mut lo = [_mm256_setzero_si256(); 4];
            let mut hi = [_mm256_setzero_si256(); 4];
            for p in 0..4 {
                let words = blk.add(16 + 8 * p) as *const u32;
                let q = _mm256_loadu_si256(blk.add(48 + 32 * p) as *const __m256i);
                lo[p] = _mm256_add_epi8(
                    _mm256_and_si256(q, mask),
                    bits16(std::ptr::read_unaligned(words)),
                );
                hi[p] = _mm256_add_epi8(
                    _mm256_and_si256(_mm256_srli_epi16(q, 4), mask),
                    bits16(std::ptr::read_unaligned(words.add(1))),
                );
            }
            for (i, acc) in acc.iter_mut().enumerate().take(m) {
                // SAFETY: block b of row i lies within `x` and `xsum` (i < m, b < nb).
                let xb = &*xp.add(i * nb + b);
                let xq = xb.qs.as_ptr() as *const __m128i;
                let xl = _mm256_broadcastsi128_si256(_mm_loadu_si128(xq));
                let xh = _mm256_broadcastsi128_si256(_mm_loadu_si128(xq.add(1)));
                let mut v = [_mm256_setzero_si256(); 4];
                for (p, v) in v.iter_mut().enumerate() {
                    // 2·31·127 per maddubs lane, twice that per s16 lane (15,748).
                    *v = _mm256_add_epi16(
                        _mm256_maddubs_epi16(lo[p], xl),
                        _mm256_maddubs_epi16(hi[p], xh),
                    );
                }
                // One i16 level of pair sums still fits (31,496); then i32. The integer
                // sums are exact whatever the grouping, so results are unchanged.
                let h = _mm256_hadd_epi32(
                    _mm256_madd_epi16(_mm256_hadd_epi16(v[0], v[1]), ones),
                    _mm256_madd_epi16(_mm256_hadd_epi16(v[2], v[3]), ones),
                );
                let isum =
                    _mm256_sub_epi32(h, _mm256_set1_epi32(16 * *xsum.get_unchecked(i * nb + b)));
                let scale = _mm256_mul_ps(dw, _mm256_set1_ps(xb.d));
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, *acc);
            }
        }
        for (i, acc) in acc.iter().enumerate().take(m) {
            // SAFETY: out[i * ostride..][..8] is writable (the caller's contract).
            _mm256_storeu_ps(out.add(i * ostride), *acc);
        }
    }

    /// [`super::tile_scalar`] for a Q6_K tile against `m` activation rows, bit for bit:
    /// values are unsigned 6-bit (`maddubs` applies directly), each half block's integer
    /// sum kept apart (one scale each) and corrected by `32·Σx` of that half (`xsum`, two
    /// per block).
    ///
    /// # Safety
    /// Computes at most `R` activation rows (accumulators kept: 1 when decoding).
    /// The CPU must support AVX2, FMA and F16C; `tile` holds `nb` Q6_K tile blocks (320
    /// bytes each), `x` at least `m * nb` blocks and `xsum` `2 * m * nb` sums;
    /// `out[i * ostride..][..8]` is writable and not otherwise borrowed for every i < m.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile_q6k<const R: usize>(
        tile: &[u8],
        nb: usize,
        x: &[BlockQ8],
        xsum: &[i32],
        m: usize,
        out: *mut f32,
        ostride: usize,
    ) {
        const TBB: usize = 320;
        debug_assert!(tile.len() >= nb * TBB && x.len() >= m * nb && xsum.len() >= 2 * m * nb);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); R];
        let m = m.min(R);
        let tp = tile.as_ptr();
        let xp = x.as_ptr();
        for b in 0..nb {
            // SAFETY: tile block b lies within `tile` (b < nb); unaligned loads.
            let blk = tp.add(b * TBB);
            if R == 1 {
                prefetch_ahead::<TBB>(blk);
            }
            let s0 = _mm256_loadu_ps(blk as *const f32);
            let s1 = _mm256_loadu_ps(blk.add(32) as *const f32);
            let mut w = [_mm256_setzero_si256(); 8];
            for (k, w) in w.iter_mut().enumerate() {
                *w = _mm256_loadu_si256(blk.add(64 + 32 * k) as *const __m256i);
            }
            for (i, acc) in acc.iter_mut().enumerate().take(m) {
                // SAFETY: block b of row i lies within `x`, its sums within `xsum`.
                let xb = &*xp.add(i * nb + b);
                let xq = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
                // Lanes 0..3: values 0..15 of row k; lanes 4..7: values 16..31.
                let mut p = [_mm256_setzero_si256(); 8];
                for (k, p) in p.iter_mut().enumerate() {
                    *p = _mm256_madd_epi16(_mm256_maddubs_epi16(w[k], xq), ones);
                }
                let h0 =
                    _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
                let h1 =
                    _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]), _mm256_hadd_epi32(p[6], p[7]));
                // h0 = rows 0..3 (first halves) | rows 0..3 (second halves); h1 likewise.
                let first = _mm256_sub_epi32(
                    _mm256_permute2x128_si256(h0, h1, 0x20),
                    _mm256_set1_epi32(32 * *xsum.get_unchecked(2 * (i * nb + b))),
                );
                let second = _mm256_sub_epi32(
                    _mm256_permute2x128_si256(h0, h1, 0x31),
                    _mm256_set1_epi32(32 * *xsum.get_unchecked(2 * (i * nb + b) + 1)),
                );
                let dx = _mm256_set1_ps(xb.d);
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(first), _mm256_mul_ps(s0, dx), *acc);
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(second), _mm256_mul_ps(s1, dx), *acc);
            }
        }
        for (i, acc) in acc.iter().enumerate().take(m) {
            // SAFETY: out[i * ostride..][..8] is writable (the caller's contract).
            _mm256_storeu_ps(out.add(i * ostride), *acc);
        }
    }

    /// [`super::tile_scalar`] for a Q4_1 tile (or, with `K`, a Q4_K tile: f32 scales and
    /// negated minimums instead of f16 ones) against `m` activation rows, bit for bit.
    ///
    /// # Safety
    /// Computes at most `R` activation rows (accumulators kept: 1 when decoding).
    /// The CPU must support AVX2, FMA and F16C; `tile` holds `nb` Q4_1 tile blocks
    /// (160 bytes each; Q4_K: 192), `x` at least `m * nb` blocks; `out[i * ostride..][..8]` is
    /// writable and not otherwise borrowed for every i < m.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile_q4_1<const R: usize, const K: bool>(
        tile: &[u8],
        nb: usize,
        x: &[BlockQ8],
        m: usize,
        out: *mut f32,
        ostride: usize,
    ) {
        let (tbb, quants) = if K { (192, 64) } else { (160, 32) };
        debug_assert!(tile.len() >= nb * tbb && x.len() >= m * nb);
        let mask = _mm256_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); R];
        let mut sm = [_mm256_setzero_ps(); R];
        let m = m.min(R);
        let tp = tile.as_ptr();
        let xp = x.as_ptr();
        for b in 0..nb {
            // SAFETY: tile block b lies within `tile` (b < nb); unaligned loads.
            let blk = tp.add(b * tbb);
            if R == 1 {
                if K {
                    prefetch_ahead::<192>(blk);
                } else {
                    prefetch_ahead::<160>(blk);
                }
            }
            let (dw, mw) = if K {
                (
                    _mm256_loadu_ps(blk as *const f32),
                    _mm256_loadu_ps(blk.add(32) as *const f32),
                )
            } else {
                (
                    _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i)),
                    _mm256_cvtph_ps(_mm_loadu_si128(blk.add(16) as *const __m128i)),
                )
            };
            let mut lo = [_mm256_setzero_si256(); 4];
            let mut hi = [_mm256_setzero_si256(); 4];
            for p in 0..4 {
                let q = _mm256_loadu_si256(blk.add(quants + 32 * p) as *const __m256i);
                lo[p] = _mm256_and_si256(q, mask);
                hi[p] = _mm256_and_si256(_mm256_srli_epi16(q, 4), mask);
            }
            for i in 0..m {
                // SAFETY: block b of row i lies within `x` (i < m, b < nb).
                let xb = &*xp.add(i * nb + b);
                let xq = xb.qs.as_ptr() as *const __m128i;
                let xl = _mm256_broadcastsi128_si256(_mm_loadu_si128(xq));
                let xh = _mm256_broadcastsi128_si256(_mm_loadu_si128(xq.add(1)));
                // Pair p: row p in the low lane, row p + 4 in the high lane. Nibbles keep
                // every i16 small (2·15·127 per maddubs lane, 7,620 per s16 lane), so two
                // levels of pair sums stay in i16 (30,480) before one madd widens: exact
                // sums, three fewer widening steps per row than a madd per pair.
                let mut v = [_mm256_setzero_si256(); 4];
                for p in 0..4 {
                    v[p] = _mm256_add_epi16(
                        _mm256_maddubs_epi16(lo[p], xl),
                        _mm256_maddubs_epi16(hi[p], xh),
                    );
                }
                // Lanes: rows 0..3 | rows 4..7.
                let isum = _mm256_madd_epi16(
                    _mm256_hadd_epi16(_mm256_hadd_epi16(v[0], v[1]), _mm256_hadd_epi16(v[2], v[3])),
                    ones,
                );
                let scale = _mm256_mul_ps(dw, _mm256_set1_ps(xb.d));
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, acc[i]);
                sm[i] = _mm256_fmadd_ps(mw, _mm256_set1_ps(xb.s), sm[i]);
            }
        }
        for i in 0..m {
            // SAFETY: out[i * ostride..][..8] is writable (the caller's contract).
            _mm256_storeu_ps(out.add(i * ostride), _mm256_add_ps(acc[i], sm[i]));
        }
    }

    /// [`super::tile_scalar`] for a Q8_0 tile against `m` activation rows, bit for bit.
    ///
    /// # Safety
    /// Computes at most `R` activation rows (accumulators kept: 1 when decoding).
    /// The CPU must support AVX2, FMA and F16C; `tile` holds `nb` Q8_0 tile blocks
    /// (272 bytes each), `x` at least `m * nb` blocks; `out[i * ostride..][..8]` is
    /// writable and not otherwise borrowed for every i < m.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile_q8_0<const R: usize>(
        tile: &[u8],
        nb: usize,
        x: &[BlockQ8],
        m: usize,
        out: *mut f32,
        ostride: usize,
    ) {
        const TBB: usize = 272;
        debug_assert!(tile.len() >= nb * TBB && x.len() >= m * nb);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); R];
        let m = m.min(R);
        let tp = tile.as_ptr();
        let xp = x.as_ptr();
        for b in 0..nb {
            // SAFETY: tile block b lies within `tile` (b < nb); unaligned loads.
            let blk = tp.add(b * TBB);
            if R == 1 {
                prefetch_ahead::<TBB>(blk);
            }
            let dw = _mm256_cvtph_ps(_mm_loadu_si128(blk as *const __m128i));
            let wq = |k: usize| _mm256_loadu_si256(blk.add(16 + 32 * k) as *const __m256i);
            let mut aw = [_mm256_setzero_si256(); 8];
            for (k, a) in aw.iter_mut().enumerate() {
                let w = wq(k);
                *a = _mm256_sign_epi8(w, w);
            }
            for (i, acc) in acc.iter_mut().enumerate().take(m) {
                // SAFETY: block b of row i lies within `x` (i < m, b < nb).
                let xb = &*xp.add(i * nb + b);
                let xq = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
                // |w| · (x with w's sign): maddubs needs an unsigned operand; exact sums.
                let mut p = [_mm256_setzero_si256(); 8];
                for (k, p) in p.iter_mut().enumerate() {
                    *p = _mm256_madd_epi16(
                        _mm256_maddubs_epi16(aw[k], _mm256_sign_epi8(xq, wq(k))),
                        ones,
                    );
                }
                let h0 =
                    _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
                let h1 =
                    _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]), _mm256_hadd_epi32(p[6], p[7]));
                // h0 = rows 0..3 (low half sums) | rows 0..3 (high half sums); same for h1.
                let isum = _mm256_add_epi32(
                    _mm256_permute2x128_si256(h0, h1, 0x20),
                    _mm256_permute2x128_si256(h0, h1, 0x31),
                );
                let scale = _mm256_mul_ps(dw, _mm256_set1_ps(xb.d));
                *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), scale, *acc);
            }
        }
        for (i, acc) in acc.iter().enumerate().take(m) {
            // SAFETY: out[i * ostride..][..8] is writable (the caller's contract).
            _mm256_storeu_ps(out.add(i * ostride), *acc);
        }
    }

    /// AVX2 dot product of a Q4_1 row and a Q8_1 row.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `w.len() == x.len() * 20`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q4_1(w: &[u8], x: &[BlockQ8]) -> f32 {
        let nb = x.len().min(w.len() / Q4_1_BLOCK_BYTES);
        let mask = _mm_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_ps();
        let mut summ = 0f32;
        let wp = w.as_ptr();
        for (i, xb) in x.iter().enumerate().take(nb) {
            // SAFETY: block i lies within `w` (i < nb ≤ w.len()/20); unaligned loads are used.
            let b = wp.add(i * Q4_1_BLOCK_BYTES);
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(b as *const i32)));
            let d = _mm_cvtss_f32(dm);
            let m = _mm_cvtss_f32(_mm_shuffle_ps(dm, dm, 1));
            let qs = _mm_loadu_si128(b.add(4) as *const __m128i);
            let lo = _mm_and_si128(qs, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
            let q4 = _mm256_set_m128i(hi, lo);
            let q8 = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
            // u8 × i8 pairs summed to i16 (no overflow: 2·15·128 < 32768), then to i32.
            let p = _mm256_madd_epi16(_mm256_maddubs_epi16(q4, q8), ones);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d * xb.d), _mm256_cvtepi32_ps(p), acc);
            summ += m * xb.s;
        }
        let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s) + summ
    }

    /// Asks for the cache lines of the tile block six blocks after `blk` (about 1–1.6 KB
    /// ahead). Decoding reads each weight once, from memory: the hardware prefetcher alone
    /// left the Q8_0 kernel at ~12 GB/s of the machine's ~19 (`prefetch` never faults, so
    /// running past the end is harmless).
    #[inline(always)]
    unsafe fn prefetch_ahead<const TBB: usize>(blk: *const u8) {
        let ahead = blk.wrapping_add(6 * TBB);
        let first = ahead as usize & !63;
        for line in 0..TBB.div_ceil(64) + 1 {
            _mm_prefetch::<_MM_HINT_T0>((first + 64 * line) as *const i8);
        }
    }

    /// Eight keys' dot products with `q` (whole chunks of eight only; key u at
    /// `k[u * stride..]`), each lane-summed as [`super::attn_scores`] defines: hadd pairs
    /// (l0+l1), (l2+l3), then their sums, then the two 128-bit halves.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `q.len()` is a multiple of 8 and
    /// `k.len() >= 7 * stride + q.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot8_keys(q: &[f32], k: &[f16], stride: usize) -> [f32; 8] {
        debug_assert!(q.len().is_multiple_of(8) && k.len() >= 7 * stride + q.len());
        let mut acc = [_mm256_setzero_ps(); 8];
        let kp = k.as_ptr();
        for c in (0..q.len()).step_by(8) {
            // SAFETY: c + 8 <= q.len(), and key u's chunk lies within `k` (see above).
            let qv = _mm256_loadu_ps(q.as_ptr().add(c));
            for (u, a) in acc.iter_mut().enumerate() {
                let kv = _mm256_cvtph_ps(_mm_loadu_si128(kp.add(u * stride + c) as *const __m128i));
                *a = _mm256_fmadd_ps(qv, kv, *a);
            }
        }
        // hadd(a, b) = [a0+a1, a2+a3, b0+b1, b2+b3 | a4+a5, a6+a7, b4+b5, b6+b7].
        let x = _mm256_hadd_ps(
            _mm256_hadd_ps(acc[0], acc[1]),
            _mm256_hadd_ps(acc[2], acc[3]),
        );
        let y = _mm256_hadd_ps(
            _mm256_hadd_ps(acc[4], acc[5]),
            _mm256_hadd_ps(acc[6], acc[7]),
        );
        // x = [(0..3 of keys 0..3) | (4..7 of keys 0..3)]; same for y with keys 4..7.
        let s = _mm256_add_ps(
            _mm256_permute2f128_ps(x, y, 0x20),
            _mm256_permute2f128_ps(x, y, 0x31),
        );
        let mut out = [0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), s);
        out
    }

    /// [`super::attn_values`] for 64 dims: `out[d] = Σ_t fma(e[t], v_t[d])`, t in order.
    ///
    /// # Safety
    /// The CPU must support AVX2, FMA and F16C; `out.len() == 64` and
    /// `v[t * stride..][..64]` lies in `v` for every t < `e.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn values64(e: &[f32], v: &[f16], stride: usize, out: &mut [f32]) {
        debug_assert!(out.len() == 64);
        let mut acc = [_mm256_setzero_ps(); 8];
        let vp = v.as_ptr();
        for (t, &w) in e.iter().enumerate() {
            let w = _mm256_set1_ps(w);
            // SAFETY: value t's 64 dims lie in `v` (the caller's contract).
            let row = vp.add(t * stride);
            for (j, a) in acc.iter_mut().enumerate() {
                let x = _mm256_cvtph_ps(_mm_loadu_si128(row.add(8 * j) as *const __m128i));
                *a = _mm256_fmadd_ps(w, x, *a);
            }
        }
        for (j, a) in acc.iter().enumerate() {
            // SAFETY: out holds 64 floats.
            _mm256_storeu_ps(out.as_mut_ptr().add(8 * j), *a);
        }
    }

    /// Horizontal sum of an accumulator, in the order every dot product here uses.
    #[inline(always)]
    unsafe fn hsum(acc: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// [`dot_q4_1`] of one Q4_1 row against four activation rows: the nibbles are unpacked
    /// once; per row the operations and their order are those of `dot_q4_1`.
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; every `x[k].len() * 20 == w.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot4_q4_1(w: &[u8], x: [&[BlockQ8]; 4]) -> [f32; 4] {
        let nb = x
            .iter()
            .map(|r| r.len())
            .min()
            .unwrap_or(0)
            .min(w.len() / Q4_1_BLOCK_BYTES);
        let mask = _mm_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut summ = [0f32; 4];
        let wp = w.as_ptr();
        for i in 0..nb {
            // SAFETY: block i lies within `w` and within every activation row (i < nb).
            let b = wp.add(i * Q4_1_BLOCK_BYTES);
            let dm = _mm_cvtph_ps(_mm_cvtsi32_si128(std::ptr::read_unaligned(b as *const i32)));
            let d = _mm_cvtss_f32(dm);
            let m = _mm_cvtss_f32(_mm_shuffle_ps(dm, dm, 1));
            let qs = _mm_loadu_si128(b.add(4) as *const __m128i);
            let lo = _mm_and_si128(qs, mask);
            let hi = _mm_and_si128(_mm_srli_epi16(qs, 4), mask);
            let q4 = _mm256_set_m128i(hi, lo);
            for k in 0..4 {
                let xb = x[k].get_unchecked(i);
                let q8 = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(q4, q8), ones);
                acc[k] = _mm256_fmadd_ps(_mm256_set1_ps(d * xb.d), _mm256_cvtepi32_ps(p), acc[k]);
                summ[k] += m * xb.s;
            }
        }
        [
            hsum(acc[0]) + summ[0],
            hsum(acc[1]) + summ[1],
            hsum(acc[2]) + summ[2],
            hsum(acc[3]) + summ[3],
        ]
    }

    /// [`dot_q8_0`] of one Q8_0 row against four activation rows (|w| computed once).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; every `x[k].len() * 34 == w.len()`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot4_q8_0(w: &[u8], x: [&[BlockQ8]; 4]) -> [f32; 4] {
        use super::Q8_0_BLOCK_BYTES;
        let nb = x
            .iter()
            .map(|r| r.len())
            .min()
            .unwrap_or(0)
            .min(w.len() / Q8_0_BLOCK_BYTES);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); 4];
        let wp = w.as_ptr();
        for i in 0..nb {
            // SAFETY: block i lies within `w` and within every activation row (i < nb).
            let b = wp.add(i * Q8_0_BLOCK_BYTES);
            let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(
                std::ptr::read_unaligned(b as *const u16),
            ))));
            let qw = _mm256_loadu_si256(b.add(2) as *const __m256i);
            let aw = _mm256_sign_epi8(qw, qw);
            for k in 0..4 {
                let xb = x[k].get_unchecked(i);
                let qx = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
                let p = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, _mm256_sign_epi8(qx, qw)), ones);
                acc[k] = _mm256_fmadd_ps(_mm256_set1_ps(d * xb.d), _mm256_cvtepi32_ps(p), acc[k]);
            }
        }
        [hsum(acc[0]), hsum(acc[1]), hsum(acc[2]), hsum(acc[3])]
    }

    /// AVX2 dot product of a Q5_0 row and a Q8 activation row (llama.cpp's
    /// `bytes_from_bits_32`: the high bits become 0x00/0xF0 bytes that, OR-ed into the
    /// nibbles, give q − 16 as a signed byte).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `w.len() == x.len() * 22`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q5_0(w: &[u8], x: &[BlockQ8]) -> f32 {
        use super::Q5_0_BLOCK_BYTES;
        let nb = x.len().min(w.len() / Q5_0_BLOCK_BYTES);
        let ones = _mm256_set1_epi16(1);
        let mask = _mm_set1_epi8(0x0F);
        let shuf = _mm256_set_epi64x(
            0x0303_0303_0303_0303,
            0x0202_0202_0202_0202,
            0x0101_0101_0101_0101,
            0,
        );
        let bit_mask = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
        let all = _mm256_set1_epi64x(-1);
        let f0 = _mm256_set1_epi8(0xF0u8 as i8);
        let mut acc = _mm256_setzero_ps();
        let wp = w.as_ptr();
        for (i, xb) in x.iter().enumerate().take(nb) {
            // SAFETY: block i lies within `w`; unaligned loads are used.
            let b = wp.add(i * Q5_0_BLOCK_BYTES);
            let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(
                std::ptr::read_unaligned(b as *const u16),
            ))));
            let qh = std::ptr::read_unaligned(b.add(2) as *const i32);
            let bits = _mm256_cmpeq_epi8(
                _mm256_or_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(qh), shuf), bit_mask),
                all,
            );
            let qs = _mm_loadu_si128(b.add(6) as *const __m128i);
            let nib = _mm256_set_m128i(
                _mm_and_si128(_mm_srli_epi16(qs, 4), mask),
                _mm_and_si128(qs, mask),
            );
            let qw = _mm256_or_si256(nib, _mm256_andnot_si256(bits, f0));
            let qx = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
            let p = _mm256_madd_epi16(
                _mm256_maddubs_epi16(_mm256_sign_epi8(qw, qw), _mm256_sign_epi8(qx, qw)),
                ones,
            );
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d * xb.d), _mm256_cvtepi32_ps(p), acc);
        }
        let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// AVX2 dot product of a Q8_0 row and a Q8 activation row (llama.cpp's sign trick:
    /// |w| as unsigned times x with w's sign, so `maddubs` applies).
    ///
    /// # Safety
    /// The CPU must support AVX2 and FMA; `w.len() == x.len() * 34`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_q8_0(w: &[u8], x: &[BlockQ8]) -> f32 {
        use super::Q8_0_BLOCK_BYTES;
        let nb = x.len().min(w.len() / Q8_0_BLOCK_BYTES);
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_ps();
        let wp = w.as_ptr();
        for (i, xb) in x.iter().enumerate().take(nb) {
            // SAFETY: block i lies within `w`; unaligned loads are used.
            let b = wp.add(i * Q8_0_BLOCK_BYTES);
            let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(i32::from(
                std::ptr::read_unaligned(b as *const u16),
            ))));
            let qw = _mm256_loadu_si256(b.add(2) as *const __m256i);
            let qx = _mm256_loadu_si256(xb.qs.as_ptr() as *const __m256i);
            let p = _mm256_madd_epi16(
                _mm256_maddubs_epi16(_mm256_sign_epi8(qw, qw), _mm256_sign_epi8(qx, qw)),
                ones,
            );
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d * xb.d), _mm256_cvtepi32_ps(p), acc);
        }
        let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;
    use proptest::prelude::*;

    fn q4_1_row(seed: u64, cols: usize) -> Vec<u8> {
        let mut s = seed | 1;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let mut out = Vec::new();
        for _ in 0..cols / QK {
            let d = ((next() % 1000) as f32 / 1000.0 + 0.001) * 0.1;
            let m = -((next() % 1000) as f32 / 1000.0) * 0.8;
            out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            out.extend_from_slice(&f16::from_f32(m).to_le_bytes());
            for _ in 0..16 {
                out.push((next() & 0xFF) as u8);
            }
        }
        out
    }

    fn quantized(x: &[f32]) -> Vec<BlockQ8> {
        let mut q = vec![BlockQ8::default(); x.len() / QK];
        quantize_row_q8_1(x, &mut q);
        q
    }

    #[test]
    fn q8_1_quantization_matches_llama_cpp_rules() {
        let x: Vec<f32> = (0..32).map(|i| i as f32 - 10.0).collect();
        let q = quantized(&x);
        assert_eq!(q[0].d, f16::from_f32(21.0 / 127.0).to_f32());
        assert_eq!(q[0].qs[31], 127);
        assert_eq!(q[0].qs[10], 0);
        let sum: i32 = q[0].qs.iter().map(|&v| i32::from(v)).sum();
        assert_eq!(q[0].s, f16::from_f32(sum as f32 * 21.0 / 127.0).to_f32());
        assert!(quantized(&[0.0; 32])[0].qs.iter().all(|&v| v == 0));
    }

    #[test]
    fn scalar_dot_matches_float_math_within_quantization_error() {
        let cols = 256;
        let w = q4_1_row(3, cols);
        let x: Vec<f32> = (0..cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect();
        // Dequantized float reference.
        let mut exact = 0f64;
        for (b, wb) in w.chunks_exact(20).enumerate() {
            let d = f16::from_le_bytes([wb[0], wb[1]]).to_f32();
            let m = f16::from_le_bytes([wb[2], wb[3]]).to_f32();
            for j in 0..16 {
                exact += f64::from((f32::from(wb[4 + j] & 15) * d + m) * x[b * 32 + j]);
                exact += f64::from((f32::from(wb[4 + j] >> 4) * d + m) * x[b * 32 + j + 16]);
            }
        }
        let got = dot_q4_1_scalar(&w, &quantized(&x));
        assert!(
            (f64::from(got) - exact).abs() < 0.02 * exact.abs().max(1.0),
            "{got} vs {exact}"
        );
    }

    proptest! {
        #[test]
        fn avx2_path_matches_the_scalar_reference(seed in 1u64..u64::MAX, nb in 1usize..40, xs in proptest::collection::vec(-8.0f32..8.0, 32..1280)) {
            prop_assume!(matches!(best_path(), Path::Avx2(_)));
            let cols = nb * QK;
            let x: Vec<f32> = (0..cols).map(|i| xs[i % xs.len()] * (1.0 + i as f32 / 97.0)).collect();
            let w = q4_1_row(seed, cols);
            let q = quantized(&x);
            let a = dot_q4_1(best_path(), &w, &q);
            let s = dot_q4_1_scalar(&w, &q);
            // Integer block sums are exact; only the float accumulation order differs.
            let bound = 1e-5 * (q.iter().map(|b| b.d.abs() * 32.0 * 15.0 * 0.1 + b.s.abs()).sum::<f32>() + 1.0);
            prop_assert!((a - s).abs() <= bound, "avx2 {a} scalar {s} bound {bound}");
        }

        #[test]
        fn q8_0_avx2_path_equals_the_scalar_reference(ws in proptest::collection::vec(any::<i8>(), 32 * 8), d in 0.001f32..2.0, xs in proptest::collection::vec(-4.0f32..4.0, 32 * 8)) {
            prop_assume!(matches!(best_path(), Path::Avx2(_)));
            let mut w = Vec::new();
            for b in ws.chunks(32) {
                w.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                w.extend(b.iter().map(|&v| v as u8));
            }
            let q = quantized(&xs);
            let (a, s) = (dot_q8_0(best_path(), &w, &q), dot_q8_0_scalar(&w, &q));
            // Integer block sums are exact; the float sums of large, cancelling block terms
            // differ only by rounding, bounded relative to the sum of their magnitudes.
            let magnitude: f32 = w.chunks(34).zip(&q).map(|(wb, xb)| {
                let sumi: i32 = wb[2..].iter().zip(&xb.qs).map(|(&a, &b)| i32::from(a as i8) * i32::from(b)).sum();
                (sumi as f32 * d * xb.d).abs()
            }).sum();
            prop_assert!((a - s).abs() <= 1e-6 * magnitude + 1e-6, "avx2 {a} scalar {s} magnitude {magnitude}");
        }

        #[test]
        fn q5_0_avx2_path_equals_the_scalar_reference(raw in proptest::collection::vec(any::<u8>(), 20 * 6), d in 0.001f32..2.0, xs in proptest::collection::vec(-4.0f32..4.0, 32 * 6)) {
            prop_assume!(matches!(best_path(), Path::Avx2(_)));
            let mut w = Vec::new();
            for b in raw.chunks(20) {
                w.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                w.extend_from_slice(b);
            }
            let q = quantized(&xs);
            let (a, s) = (dot_q5_0(best_path(), &w, &q), dot_q5_0_scalar(&w, &q));
            let magnitude: f32 = q.iter().map(|xb| 32.0 * 16.0 * 127.0 * d * xb.d).sum();
            prop_assert!((a - s).abs() <= 1e-6 * magnitude + 1e-6, "avx2 {a} scalar {s}");
        }

        #[test]
        /// Bit-identical, not merely close: a replay multiplies many rows at once (the
        /// four-row kernels) and must reproduce decoding, which multiplies one.
        fn matmul_equals_row_by_row_dots(rows in 1usize..70, nb in 1usize..6, m in 1usize..11, seed in 1u64..1000, q8 in any::<bool>()) {
            let cols = nb * QK;
            let (format, bytes): (Format, Vec<u8>) = if q8 {
                // Q8_0 blocks: an f16 scale, then 32 signed bytes (from the Q4_1 generator's
                // random bytes).
                let raw: Vec<u8> = (0..rows).flat_map(|r| q4_1_row(seed + r as u64, 2 * cols)).collect();
                let bytes = raw
                    .chunks_exact(34)
                    .take(rows * nb)
                    .flat_map(|c| {
                        let mut b = f16::from_f32(f32::from(c[0] % 50 + 1) / 997.0).to_le_bytes().to_vec();
                        b.extend_from_slice(&c[2..34]);
                        b
                    })
                    .collect();
                (Format::Q8_0, bytes)
            } else {
                (Format::Q4_1, (0..rows).flat_map(|r| q4_1_row(seed + r as u64, cols)).collect())
            };
            let w = QMatrix::new(format, &bytes, rows, cols).expect("shape");
            let x: Vec<f32> = (0..m * cols).map(|i| ((i * 13 % 29) as f32 - 14.0) / 7.0).collect();
            let q: Vec<BlockQ8> = x.chunks(cols).flat_map(quantized).collect();
            let mut out = vec![0f32; m * rows];
            matmul(best_path(), &w, &q, m, &mut out);
            for i in 0..m {
                for r in 0..rows {
                    let want = w.dot(best_path(), r, &q[i * nb..(i + 1) * nb]);
                    prop_assert_eq!(out[i * rows + r].to_bits(), want.to_bits());
                }
            }
        }
    }

    /// Random Q4_1 or Q8_0 weight bytes for `rows × cols`, with varied scales and mins.
    fn random_matrix(format: Format, rows: usize, cols: usize, seed: u64) -> Vec<u8> {
        let mut s = seed | 1;
        let mut next = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        let mut out = Vec::new();
        let small =
            |v: u64, scale: f32| f16::from_f32(((v % 1000) as f32 / 1000.0 + 0.001) * scale);
        match format {
            Format::Q4K => {
                for _ in 0..rows * cols / QK_K {
                    out.extend_from_slice(&small(next(), 0.01).to_le_bytes());
                    out.extend_from_slice(&small(next(), 0.02).to_le_bytes());
                    out.extend((0..140).map(|_| next() as u8));
                }
                return out;
            }
            Format::Q6K => {
                for _ in 0..rows * cols / QK_K {
                    out.extend((0..208).map(|_| next() as u8));
                    out.extend_from_slice(&small(next(), 0.002).to_le_bytes());
                }
                return out;
            }
            _ => {}
        }
        for _ in 0..rows * cols / QK {
            let d = ((next() % 1000) as f32 / 1000.0 + 0.001) * 0.05;
            out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            match format {
                Format::Q4_1 => {
                    let m = -((next() % 1000) as f32 / 1000.0) * 0.4;
                    out.extend_from_slice(&f16::from_f32(m).to_le_bytes());
                    out.extend((0..16).map(|_| next() as u8));
                }
                // 4 bytes of high bits, 16 of nibbles.
                Format::Q5_0 => out.extend((0..20).map(|_| next() as u8)),
                Format::Q8_0 => out.extend((0..32).map(|_| next() as u8)),
                Format::Q4K | Format::Q6K => unreachable!("returned above"),
            }
        }
        out
    }

    fn activations(m: usize, cols: usize, seed: u64) -> Vec<BlockQ8> {
        let x: Vec<f32> = (0..m * cols)
            .map(|i| {
                let v = ((i as u64 * 2654435761 + seed * 97) % 2001) as f32 / 1000.0 - 1.0;
                v * (1.0 + (i % 7) as f32)
            })
            .collect();
        x.chunks(cols).flat_map(quantized).collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The tile kernels equal the scalar reference bit for bit, for any shape, any
        /// number of activation rows (across the kernel's row groups) and any pool size.
        #[test]
        fn tile_kernels_equal_the_scalar_reference_bit_for_bit(rows in 1usize..40, nb in 1usize..12, m in 1usize..70, seed in 1u64..10_000, which in 0usize..5) {
            let format = [Format::Q4_1, Format::Q8_0, Format::Q5_0, Format::Q4K, Format::Q6K][which];
            // K-quants: one or two super-blocks of 256.
            let cols = if format.has_row_kernel() { nb * QK } else { (1 + nb / 8) * QK_K };
            let nb = cols / QK;
            let bytes = random_matrix(format, rows, cols, seed);
            let w = QMatrix::new(format, &bytes, rows, cols).expect("shape");
            let p = Packed::new(&w).expect("packable");
            let x = activations(m, cols, seed);
            let mut got = vec![0f32; m * rows];
            matmul_packed(best_path(), &p, &x, m, &mut got);
            let mut scalar = vec![0f32; m * rows];
            matmul_packed(Path::Scalar, &p, &x, m, &mut scalar);
            for (a, b) in got.iter().zip(&scalar) {
                prop_assert_eq!(a.to_bits(), b.to_bits());
            }
            // One row at a time (decoding) gives the same bits as all rows at once.
            for i in 0..m {
                let mut one = vec![0f32; rows];
                matmul_packed(best_path(), &p, &x[i * nb..(i + 1) * nb], 1, &mut one);
                for r in 0..rows {
                    prop_assert_eq!(one[r].to_bits(), got[i * rows + r].to_bits());
                }
            }
            if !format.has_row_kernel() {
                // K-quants: the weights as candle dequantizes them, times the activations.
                let deq = candle_core::quantized::ggml_file::qtensor_from_ggml(
                    if format == Format::Q4K { GgmlDType::Q4K } else { GgmlDType::Q6K },
                    &bytes, vec![rows, cols], &candle_core::Device::Cpu,
                ).expect("ggml tensor").dequantize(&candle_core::Device::Cpu).expect("dequantize")
                    .flatten_all().expect("flat").to_vec1::<f32>().expect("f32");
                for i in 0..m {
                    let xi = &x[i * nb..(i + 1) * nb];
                    for r in 0..rows {
                        let (mut want, mut magnitude) = (0f64, 0f64);
                        for (j, wv) in deq[r * cols..(r + 1) * cols].iter().enumerate() {
                            let xv = f64::from(xi[j / QK].qs[j % QK]) * f64::from(xi[j / QK].d);
                            want += f64::from(*wv) * xv;
                            magnitude += (f64::from(*wv) * xv).abs();
                        }
                        let got = f64::from(got[i * rows + r]);
                        // Q4_K's minimum term uses s = f16(d·Σq), as Q4_1's does.
                        prop_assert!((got - want).abs() <= 1e-3 * magnitude + 1e-5, "{format:?} row {r}: {got} vs {want}");
                    }
                }
                return Ok(());
            }
            // And the tile order agrees with the row kernels' within float rounding of the
            // sum: |Δ| ≤ 1e-5 · Σ|block terms| (the documented bound).
            for i in 0..m {
                for r in 0..rows {
                    let row = w.row(r);
                    let xi = &x[i * nb..(i + 1) * nb];
                    let want = match format {
                        Format::Q4_1 => dot_q4_1_scalar(row, xi),
                        Format::Q8_0 => dot_q8_0_scalar(row, xi),
                        Format::Q5_0 => dot_q5_0_scalar(row, xi),
                        Format::Q4K | Format::Q6K => unreachable!("checked above"),
                    };
                    let magnitude: f32 = xi.iter().map(|b| b.d.abs() * 32.0 * 128.0 * 0.05 + b.s.abs() * 0.4).sum();
                    prop_assert!((got[i * rows + r] - want).abs() <= 1e-5 * magnitude + 1e-6, "{} vs {want}", got[i * rows + r]);
                }
            }
        }
    }

    proptest! {
        #[test]
        fn attention_scores_avx2_equal_the_scalar_reference_bit_for_bit(hd in 1usize..300, len in 0usize..40, pad in 0usize..9, seed in 1u64..10_000) {
            let stride = hd + pad;
            let mut state = seed;
            let mut rand = |n: usize| -> Vec<f32> {
                (0..n).map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
                }).collect()
            };
            let q = rand(hd);
            let k: Vec<f16> = rand(len * stride + hd).into_iter().map(f16::from_f32).collect();
            let (mut a, mut b) = (vec![0f32; len], vec![0f32; len]);
            attn_scores(Path::Scalar, &q, &k, stride, 0.125, &mut a);
            attn_scores(best_path(), &q, &k, stride, 0.125, &mut b);
            for (t, (x, y)) in a.iter().zip(&b).enumerate() {
                prop_assert_eq!(x.to_bits(), y.to_bits(), "key {}", t);
                let want: f64 = (0..hd).map(|d| q[d] as f64 * k[t * stride + d].to_f64()).sum::<f64>() * 0.125;
                prop_assert!((*x as f64 - want).abs() < 1e-4);
            }
            // Weighted value sums likewise, for every width (64-dim passes and the rest).
            let e = rand(len);
            let (mut a, mut b) = (vec![0f32; hd], vec![0f32; hd]);
            attn_values(Path::Scalar, &e, &k, stride, &mut a);
            attn_values(best_path(), &e, &k, stride, &mut b);
            for (d, (x, y)) in a.iter().zip(&b).enumerate() {
                prop_assert_eq!(x.to_bits(), y.to_bits(), "dim {}", d);
                let want: f64 = (0..len).map(|t| e[t] as f64 * k[t * stride + d].to_f64()).sum();
                prop_assert!((*x as f64 - want).abs() < 1e-4);
            }
        }
    }

    /// The largest integer sums (every 4- or 5-bit value at its top, every activation at
    /// ±127) stay exact in the kernels' i16 stages.
    #[test]
    fn tile_kernels_are_exact_at_the_extremes() {
        let (rows, cols) = (8, 4 * QK);
        for format in [Format::Q4_1, Format::Q5_0, Format::Q4K] {
            let block: Vec<u8> = match format {
                Format::Q4_1 => [f16::from_f32(0.01).to_le_bytes(), [0, 0]]
                    .concat()
                    .into_iter()
                    .chain([0xFF; 16])
                    .collect(),
                // d, all high bits set, all nibbles 15: value 31 (stored), 15 after −16.
                Format::Q5_0 => f16::from_f32(0.01)
                    .to_le_bytes()
                    .into_iter()
                    .chain([0xFF; 20])
                    .collect(),
                _ => Vec::new(),
            };
            let bytes: Vec<u8> = if format == Format::Q4K {
                let sb: Vec<u8> = [f16::from_f32(0.01).to_le_bytes(), [0, 0]]
                    .concat()
                    .into_iter()
                    .chain([0x3F; 12])
                    .chain([0xFF; 128])
                    .collect();
                sb.repeat(rows * 2)
            } else {
                block.repeat(rows * cols / QK)
            };
            let cols = if format == Format::Q4K {
                2 * QK_K
            } else {
                cols
            };
            let nb = cols / QK;
            let w = QMatrix::new(format, &bytes, rows, cols).expect("shape");
            let p = Packed::new(&w).expect("packable");
            for sign in [1.0f32, -1.0] {
                let x: Vec<BlockQ8> = quantized(&vec![sign; cols]);
                assert!(x
                    .iter()
                    .all(|b| b.qs.iter().all(|&q| q == (127.0 * sign) as i8)));
                let (mut got, mut want) = (vec![0f32; rows], vec![0f32; rows]);
                matmul_packed(best_path(), &p, &x, 1, &mut got);
                matmul_packed(Path::Scalar, &p, &x, 1, &mut want);
                assert_eq!(got, want, "{format:?}");
                assert_eq!(x.len(), nb);
            }
        }
    }

    #[test]
    fn stacked_matrices_give_their_parts_outputs_bit_for_bit() {
        let (cols, m) = (4 * QK, 5);
        let a_bytes = random_matrix(Format::Q5_0, 16, cols, 3);
        let b_bytes = random_matrix(Format::Q5_0, 13, cols, 4);
        let qa = QMatrix::new(Format::Q5_0, &a_bytes, 16, cols).expect("a");
        let qb = QMatrix::new(Format::Q5_0, &b_bytes, 13, cols).expect("b");
        let (a, b) = (Packed::new(&qa).expect("a"), Packed::new(&qb).expect("b"));
        let ab = Packed::stacked(&[qa, qb]).expect("stackable");
        assert_eq!(ab.rows(), 29);
        // A part that does not fill whole tiles can only come last.
        assert!(Packed::stacked(&[qb, qa]).is_none());
        let x = activations(m, cols, 1);
        let run = |p: &Packed| {
            let mut out = vec![0f32; m * p.rows()];
            matmul_packed(best_path(), p, &x, m, &mut out);
            out
        };
        let (oa, ob, oab) = (run(&a), run(&b), run(&ab));
        for i in 0..m {
            let row = &oab[i * 29..(i + 1) * 29];
            assert!(row[..16]
                .iter()
                .zip(&oa[i * 16..(i + 1) * 16])
                .all(|(x, y)| x.to_bits() == y.to_bits()));
            assert!(row[16..]
                .iter()
                .zip(&ob[i * 13..(i + 1) * 13])
                .all(|(x, y)| x.to_bits() == y.to_bits()));
        }
    }

    #[test]
    fn tile_results_do_not_depend_on_the_pool_size() {
        let (rows, cols, m) = (100, 8 * QK, 37);
        let bytes = random_matrix(Format::Q4_1, rows, cols, 5);
        let w = QMatrix::new(Format::Q4_1, &bytes, rows, cols).expect("shape");
        let p = Packed::new(&w).expect("packable");
        let x = activations(m, cols, 9);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .expect("pool");
            let mut out = vec![0f32; m * rows];
            pool.install(|| matmul_packed(best_path(), &p, &x, m, &mut out));
            out
        };
        let (one, three) = (run(1), run(3));
        assert!(one
            .iter()
            .zip(&three)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        assert!(one.iter().any(|v| *v != 0.0));
    }

    #[test]
    fn q5_0_scalar_decodes_values_as_llama_cpp_does() {
        // d = 1; high bits set for elements 0 and 17; nibbles: lo = 3, hi = 9 everywhere.
        let mut w = f16::from_f32(1.0).to_le_bytes().to_vec();
        w.extend_from_slice(&(1u32 | 1 << 17).to_le_bytes());
        w.extend_from_slice(&[0x93; 16]);
        let onehot = |j: usize| {
            let mut x = [BlockQ8 {
                d: 1.0,
                s: 0.0,
                qs: [0; 32],
            }];
            x[0].qs[j] = 1;
            dot_q5_0_scalar(&w, &x)
        };
        assert_eq!(onehot(0), (3 + 16 - 16) as f32);
        assert_eq!(onehot(1), (3 - 16) as f32);
        assert_eq!(onehot(16), (9 - 16) as f32);
        assert_eq!(onehot(17), (9 + 16 - 16) as f32);
    }

    #[test]
    fn wrong_shapes_are_rejected() {
        assert_eq!(
            QMatrix::new(Format::Q4_1, &[0; 20], 1, 33).map(|_| ()),
            Err(KernelError::Cols(33, 32))
        );
        assert!(matches!(
            QMatrix::new(Format::Q4_1, &[0; 19], 1, 32),
            Err(KernelError::Size { .. })
        ));
        assert!(QMatrix::new(Format::Q8_0, &[0; 34], 1, 32).is_ok());
    }
}
