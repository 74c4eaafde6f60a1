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

use super::tiles::BLOCK;
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
        let mut rows = vec![0f32; k * n];
        for (kk, row) in dense.weight_t.chunks(n).enumerate() {
            for (col, &v) in row.iter().enumerate() {
                rows[col * k + kk] = v;
            }
        }
        Self::from_output_rows(&rows, dense.bias.clone(), k, n)
    }

    /// Quantizes `W` given as `n` output rows of `k` inputs (`[n, k]` row-major, as GGUF
    /// and PyTorch store it); `None` when `n` is not a multiple of 16. Each output row is
    /// read contiguously (a big matrix quantizes in a fraction of a second).
    pub(crate) fn from_output_rows(w: &[f32], bias: Vec<f32>, k: usize, n: usize) -> Option<Self> {
        if !n.is_multiple_of(BLOCK) || w.len() != k * n || bias.len() != n {
            return None;
        }
        let padded = k.div_ceil(4) * 4;
        let scales: Vec<f32> = w
            .par_chunks(k)
            .map(|row| {
                let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                if max > 0.0 { max / 127.0 } else { 1.0 }
            })
            .collect();
        // Each output row quantized, padded to a multiple of 4 inputs.
        let mut q = vec![0i8; n * padded];
        q.par_chunks_mut(padded).zip(w.par_chunks(k)).zip(&scales).for_each(|((q, row), s)| {
            for (q, v) in q.iter_mut().zip(row) {
                *q = (v / s).round().clamp(-127.0, 127.0) as i8;
            }
        });
        let weight_sums: Vec<f32> = q
            .chunks(padded)
            .zip(&scales)
            .map(|(q, s)| s * q.iter().map(|&v| f32::from(v)).sum::<f32>())
            .collect();
        // Per block of 16 columns, per group of 4 inputs: 16 x 4 bytes.
        let mut packed = vec![0i8; padded * n];
        packed.par_chunks_mut(padded * BLOCK).enumerate().for_each(|(block, out)| {
            for group in 0..padded / 4 {
                for c in 0..BLOCK {
                    let src = (block * BLOCK + c) * padded + group * 4;
                    out[group * 64 + c * 4..group * 64 + c * 4 + 4].copy_from_slice(&q[src..src + 4]);
                }
            }
        });
        Some(QDense { packed, scales, weight_sums, bias, inputs: k, padded, outputs: n })
    }

    /// Whether this CPU runs the VNNI kernel (the plain path is for correctness only).
    pub(crate) fn fast() -> bool {
        has_vnni()
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
            let vnni = has_vnni();
            super::tiles::run(tokens, n, ROWS, BLOCKS, out, |call, out| {
                let tile = Tile {
                    layer: self,
                    q: &quantized[call.row0 * kp..(call.row0 + call.rows) * kp],
                    a: &row_scales[call.row0..call.row0 + call.rows],
                    rows: call.rows,
                    first: call.first,
                    blocks: call.blocks,
                    stride: call.stride,
                    col0: call.col0,
                };
                tile.run(vnni, out);
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
/// `first..first+blocks`, written at `out[row * stride + column - col0]`.
struct Tile<'a> {
    layer: &'a QDense,
    q: &'a [u8],
    a: &'a [(f32, f32)],
    rows: usize,
    first: usize,
    blocks: usize,
    stride: usize,
    col0: usize,
}

impl Tile<'_> {
    fn run(&self, vnni: bool, out: &mut [f32]) {
        debug_assert!(self.col0 <= self.first * BLOCK);
        debug_assert!(
            out.len() >= (self.rows - 1) * self.stride + (self.first + self.blocks) * BLOCK - self.col0
        );
        #[cfg(target_arch = "x86_64")]
        if vnni {
            // SAFETY: the CPU has AVX-512 F/BW and VNNI (`has_vnni`).
            unsafe { vnni::tile(self, out) };
            return;
        }
        let _ = vnni;
        self.plain(out);
    }

    fn plain(&self, out: &mut [f32]) {
        let l = self.layer;
        let kp = l.padded;
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
                    out[r * self.stride + col - self.col0] =
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

/// Whether the active level has AVX-512 F/BW and VNNI (`isa::detected` checked them).
fn has_vnni() -> bool {
    super::isa::active() >= super::isa::Isa::Avx512Vnni
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
        debug_assert!(t.q.len() >= R * kp && t.first + B <= n / BLOCK);
        debug_assert!(out.len() >= (R - 1) * t.stride + (t.first + B) * BLOCK - t.col0);
        let mut acc = [[_mm512_setzero_si512(); B]; R];
        // SAFETY: every pointer stays inside its buffer: weights `(first + B) * kp * 16`
        // bytes, activations `R * kp`, outputs up to row R - 1's column `(first + B) * 16`
        // (checked above).
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
                    _mm512_storeu_ps(out.as_mut_ptr().add(r * t.stride + col - t.col0), y);
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
        // (64, 512, 3): few rows, so the threads split the columns (on 2 or more threads).
        for (k, n, tokens) in [(384, 1152, 13), (30, 64, 7), (8, 16, 1), (64, 512, 3), (64, 512, 1)] {
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
                Tile {
                    layer: &q,
                    q: qrows,
                    a: arows,
                    rows: arows.len(),
                    first: 0,
                    blocks: n / BLOCK,
                    stride: n,
                    col0: 0,
                }
                .plain(out);
            }
            let differ = plain.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(differ <= 1e-3 * scale, "k {k}, n {n}: kernel and plain differ by {differ}");
        }
    }
}
