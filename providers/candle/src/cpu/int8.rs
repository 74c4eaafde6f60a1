//! int8 linear layers for the packed CPU path (`model.quantization = "int8"`).
//!
//! Weights are quantized once at load, symmetrically per output channel (scale
//! `max|w| / 127`); activations per token as each batch runs, asymmetrically over the
//! token's own range (`x ≈ lo + scale · q`, q in 0..=255), so one outlier token does not
//! coarsen every other token's grid and a skewed range (GELU outputs are ≥ -0.17) uses
//! all 256 levels. ONNX Runtime's dynamic quantization takes one scale per tensor — per
//! batch, so a text's result even depends on its neighbours — which is what costs it
//! accuracy on MiniLM (docs/benchmarks.md). Products accumulate exactly in i32 and come
//! back as `scaleₜ·sₙ·Σ q·w + loₜ·sₙ·Σ w + bₙ` in one pass.
//!
//! The kernel is AVX-512 VNNI's `vpdpbusd` (unsigned × signed bytes, four products
//! summed into each i32 lane). Weights are packed for it: per block of 16 output
//! columns, per group of 4 inputs, 64 bytes. A CPU without VNNI runs the same
//! arithmetic in plain Rust (slow, for correctness only).

use rayon::prelude::*;

use super::Dense;

/// Columns per packed block (one 512-bit vector of i32 results).
const BLOCK: usize = 16;
/// Rows per kernel call.
const ROWS: usize = 6;
/// Column blocks per kernel call.
const BLOCKS: usize = 4;

/// A linear layer with int8 weights.
pub(crate) struct QDense {
    /// `[outputs / 16][inputs_padded / 4][16][4]` int8.
    packed: Vec<i8>,
    /// Per output column.
    scales: Vec<f32>,
    /// Per output column: `sₙ Σₖ w` (quantized w), what a row's offset `lo` adds.
    weight_sums: Vec<f32>,
    bias: Vec<f32>,
    inputs: usize,
    /// `inputs` rounded up to a multiple of 4.
    padded: usize,
    outputs: usize,
}

impl QDense {
    /// Quantizes `dense`; `None` when its outputs are not a multiple of 16.
    pub(crate) fn quantize(dense: &Dense) -> Option<Self> {
        let (k, n) = (dense.inputs, dense.outputs);
        if !n.is_multiple_of(BLOCK) {
            return None;
        }
        let padded = k.div_ceil(4) * 4;
        let w = |kk: usize, col: usize| dense.weight_t[kk * n + col];
        let scales: Vec<f32> = (0..n)
            .map(|col| {
                let max = (0..k).map(|kk| w(kk, col).abs()).fold(0f32, f32::max);
                if max > 0.0 { max / 127.0 } else { 1.0 }
            })
            .collect();
        let q = |kk: usize, col: usize| -> i8 {
            if kk >= k { 0 } else { (w(kk, col) / scales[col]).round().clamp(-127.0, 127.0) as i8 }
        };
        let mut packed = Vec::with_capacity(padded * n);
        for block in 0..n / BLOCK {
            for group in 0..padded / 4 {
                for c in 0..BLOCK {
                    for j in 0..4 {
                        packed.push(q(group * 4 + j, block * BLOCK + c));
                    }
                }
            }
        }
        let weight_sums =
            (0..n).map(|col| scales[col] * (0..k).map(|kk| f32::from(q(kk, col))).sum::<f32>()).collect();
        Some(QDense { packed, scales, weight_sums, bias: dense.bias.clone(), inputs: k, padded, outputs: n })
    }

    /// `out = x W^T + b` for `tokens` rows of `x`.
    pub(crate) fn forward(&self, x: &[f32], tokens: usize, out: &mut Vec<f32>) {
        let (k, kp, n) = (self.inputs, self.padded, self.outputs);
        debug_assert_eq!(x.len(), tokens * k);
        // The caller's buffers are reused across layers and batches, and every element
        // is written before it is read: grown (or shrunk), never cleared.
        QUANTIZED.with_borrow_mut(|(quantized, row_scales)| {
            quantized.resize(tokens * kp, 0);
            row_scales.resize(tokens, (0.0, 0.0));
            quantized.par_chunks_mut(kp).zip(x.par_chunks(k)).zip(row_scales.par_iter_mut()).for_each(
                |((q, x), scale)| {
                    *scale = quantize_row(x, &mut q[..k]);
                },
            );
            out.truncate(tokens * n);
            out.resize(tokens * n, 0.0);
            let vnni = has_vnni();
            out.par_chunks_mut(ROWS * n)
                .zip(quantized.par_chunks(ROWS * kp))
                .zip(row_scales.par_chunks(ROWS))
                .for_each(|((out, q), a)| {
                    let rows = a.len();
                    for first in (0..n / BLOCK).step_by(BLOCKS) {
                        let blocks = BLOCKS.min(n / BLOCK - first);
                        let tile = Tile { layer: self, q, a, rows, first, blocks };
                        #[cfg(target_arch = "x86_64")]
                        if vnni {
                            // SAFETY: the CPU has AVX-512 F/BW and VNNI (`has_vnni`).
                            unsafe { vnni::tile(&tile, out) };
                            continue;
                        }
                        let _ = vnni;
                        tile.plain(out);
                    }
                });
        });
    }
}

/// Quantized rows and each row's (scale, lo).
type Rows = (Vec<u8>, Vec<(f32, f32)>);

thread_local! {
    /// The calling thread's quantized rows, kept between calls.
    static QUANTIZED: std::cell::RefCell<Rows> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// Rows `q` (quantized; `a` their (scale, lo)) times column blocks
/// `first..first+blocks`.
struct Tile<'a> {
    layer: &'a QDense,
    q: &'a [u8],
    a: &'a [(f32, f32)],
    rows: usize,
    first: usize,
    blocks: usize,
}

impl Tile<'_> {
    fn plain(&self, out: &mut [f32]) {
        let l = self.layer;
        let (kp, n) = (l.padded, l.outputs);
        for r in 0..self.rows {
            let x = &self.q[r * kp..(r + 1) * kp];
            for block in self.first..self.first + self.blocks {
                let w = &l.packed[block * kp * BLOCK..(block + 1) * kp * BLOCK];
                for c in 0..BLOCK {
                    let mut acc = 0i32;
                    for group in 0..kp / 4 {
                        for j in 0..4 {
                            acc += i32::from(x[group * 4 + j]) * i32::from(w[group * 64 + c * 4 + j]);
                        }
                    }
                    let col = block * BLOCK + c;
                    let (scale, lo) = self.a[r];
                    out[r * n + col] =
                        acc as f32 * (scale * l.scales[col]) + lo * l.weight_sums[col] + l.bias[col];
                }
            }
        }
    }
}

dispatch!(
    /// Quantizes one row to `round((value - lo) / scale)` (0..=255) into `q`; returns
    /// `(scale, lo)`.
    fn quantize_row => quantize_row_generic(x: &[f32], q: &mut [u8]) -> (f32, f32)
);

#[inline(always)]
fn quantize_row_generic(x: &[f32], q: &mut [u8]) -> (f32, f32) {
    // Adding 1.5·2²³ rounds to the nearest integer and leaves it (0..=255) in the low
    // mantissa byte: no float-to-int conversion, which the compiler would not vectorise.
    const ROUND: f32 = 12_582_912.0;
    let (lo, hi) = super::kernels::min_max(x);
    let scale = if hi > lo { (hi - lo) / 255.0 } else { 1.0 };
    let inv = 1.0 / scale;
    for (q, v) in q.iter_mut().zip(x) {
        *q = (((v - lo) * inv).clamp(0.0, 255.0) + ROUND).to_bits() as u8;
    }
    (scale, lo)
}

fn has_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    use super::{BLOCK, Tile};

    /// Dispatches on the tile's rows and column blocks to a kernel with both fixed, so
    /// its accumulators stay in registers.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) fn tile(t: &Tile, out: &mut [f32]) {
        macro_rules! by_blocks {
            ($rows:literal) => {
                match t.blocks {
                    1 => kernel::<$rows, 1>(t, out),
                    2 => kernel::<$rows, 2>(t, out),
                    3 => kernel::<$rows, 3>(t, out),
                    _ => kernel::<$rows, 4>(t, out),
                }
            };
        }
        match t.rows {
            1 => by_blocks!(1),
            2 => by_blocks!(2),
            3 => by_blocks!(3),
            4 => by_blocks!(4),
            5 => by_blocks!(5),
            _ => by_blocks!(6),
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    fn kernel<const R: usize, const B: usize>(t: &Tile, out: &mut [f32]) {
        let l = t.layer;
        let (kp, n) = (l.padded, l.outputs);
        debug_assert!(t.q.len() >= R * kp && out.len() >= R * n && t.first + B <= n / BLOCK);
        let mut acc = [[_mm512_setzero_si512(); B]; R];
        // SAFETY: every pointer stays inside its buffer: weights `(first + B) * kp * 16`
        // bytes, activations `R * kp`, outputs `R * n` (checked above).
        unsafe {
            let w = l.packed.as_ptr().add(t.first * kp * BLOCK);
            let x = t.q.as_ptr();
            for group in 0..kp / 4 {
                let mut wv = [_mm512_setzero_si512(); B];
                for (b, v) in wv.iter_mut().enumerate() {
                    *v = _mm512_loadu_si512(w.add(b * kp * BLOCK + group * 64).cast());
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    let xb = _mm512_set1_epi32(x.add(r * kp + group * 4).cast::<i32>().read_unaligned());
                    for (a, v) in row.iter_mut().zip(&wv) {
                        *a = _mm512_dpbusd_epi32(*a, xb, *v);
                    }
                }
            }
            for (r, row) in acc.iter().enumerate() {
                let (scale, lo) = t.a[r];
                let (a, lo) = (_mm512_set1_ps(scale), _mm512_set1_ps(lo));
                for (b, v) in row.iter().enumerate() {
                    let col = (t.first + b) * BLOCK;
                    let scale = _mm512_mul_ps(a, _mm512_loadu_ps(l.scales.as_ptr().add(col)));
                    let base = _mm512_fmadd_ps(
                        lo,
                        _mm512_loadu_ps(l.weight_sums.as_ptr().add(col)),
                        _mm512_loadu_ps(l.bias.as_ptr().add(col)),
                    );
                    let y = _mm512_fmadd_ps(_mm512_cvtepi32_ps(*v), scale, base);
                    _mm512_storeu_ps(out.as_mut_ptr().add(r * n + col), y);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(k: usize, n: usize) -> Dense {
        let weight_t = (0..k * n).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.2).collect();
        let bias = (0..n).map(|i| i as f32 * 0.01).collect();
        Dense { weight_t, bias, inputs: k, outputs: n }
    }

    /// The int8 layer against the f32 one: close (per-token and per-channel scales), on
    /// row and column counts that exercise every tile shape, VNNI and plain alike.
    #[test]
    fn int8_layers_match_f32_within_quantization_error() {
        for (k, n, tokens) in [(384, 1152, 13), (30, 64, 7), (8, 16, 1)] {
            let dense = layer(k, n);
            let q = QDense::quantize(&dense).unwrap();
            let x: Vec<f32> = (0..tokens * k).map(|i| ((i * 31 % 97) as f32 / 48.0 - 1.0) * 3.0).collect();
            let mut want = vec![0f32; tokens * n];
            for t in 0..tokens {
                for c in 0..n {
                    want[t * n + c] = dense.bias[c]
                        + (0..k).map(|kk| x[t * k + kk] * dense.weight_t[kk * n + c]).sum::<f32>();
                }
            }
            let mut got = Vec::new();
            q.forward(&x, tokens, &mut got);
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 0.02 * scale, "k {k}, n {n}: worst error {worst} against values up to {scale}");

            // The plain path gives the same i32 sums, so the same floats.
            let mut plain = vec![0f32; tokens * n];
            let mut quantized = vec![0u8; tokens * q.padded];
            let a: Vec<(f32, f32)> = quantized
                .chunks_mut(q.padded)
                .zip(x.chunks(k))
                .map(|(row, x)| quantize_row(x, &mut row[..k]))
                .collect();
            for (out, (qrows, arows)) in
                plain.chunks_mut(ROWS * n).zip(quantized.chunks(ROWS * q.padded).zip(a.chunks(ROWS)))
            {
                Tile { layer: &q, q: qrows, a: arows, rows: arows.len(), first: 0, blocks: n / BLOCK }
                    .plain(out);
            }
            let differ = plain.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(differ <= 1e-3 * scale, "k {k}, n {n}: kernel and plain differ by {differ}");
        }
    }
}
