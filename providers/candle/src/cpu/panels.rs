//! Linear layers whose weights stay in memory as the checkpoint stores them — MLX's
//! affine quantization (2–8 bits per weight, a scale and a bias per group of inputs) or
//! 16-bit floats (bf16, f16) — and are widened to f32 a few output rows at a time, just
//! before those rows are used.
//!
//! # Why
//!
//! A 4-bit checkpoint dequantized at load takes eight times its file's bytes in f32, and
//! decoding one token reads every weight once, so the bytes read per token are the
//! speed. Kept packed, a layer reads a quarter or an eighth of the f32 bytes; widening
//! costs a few vector instructions per weight, which a decode step (one row of
//! activations per sequence) has to spare. A prompt or a vision tower (hundreds of rows)
//! widens a panel of output rows once and runs the `gemm` crate over it, so the
//! widening is paid once per panel, not once per row.
//!
//! The arithmetic is MLX's: `w = scale · q + bias` in f32, then f32 products and sums;
//! nothing is re-quantized and activations stay f32, so results equal a dequantized-at-
//! load layer's up to the order of float additions (the tests).

use half::{bf16, f16};
use rayon::prelude::*;

use super::Shared;

/// Output rows widened together for a few-row product.
const PANEL: usize = 32;
/// Bytes of widened weights a many-row panel aims at: wide panels mean fewer `gemm`
/// calls, each of which packs the activations again, while the panel still fits in
/// the core's L2.
const PANEL_BYTES: usize = 1 << 20;
/// At most this many rows of activations take the row-at-a-time path (no `gemm`).
const FEW_ROWS: usize = 4;

/// How a layer's `[outputs, inputs]` weights are held.
pub(crate) enum Stored {
    /// MLX affine quantization: per output row a little-endian bit stream of `bits`-bit
    /// values (`words_per_row` u32s), and per group of `group` inputs an f32 scale and
    /// bias.
    Affine {
        bits: usize,
        group: usize,
        words_per_row: usize,
        packed: Vec<u32>,
        scales: Vec<f32>,
        biases: Vec<f32>,
    },
    /// bf16, as stored.
    Bf16(Vec<bf16>),
    /// f16, as stored.
    F16(Vec<f16>),
}

/// A linear layer (no bias) over weights [`Stored`] compactly.
pub(crate) struct PanelDense {
    stored: Stored,
    inputs: usize,
    outputs: usize,
}

impl PanelDense {
    /// An MLX affine-quantized layer: `packed` u32 `[outputs, inputs · bits / 32]`,
    /// `scales` and `biases` `[outputs, inputs / group]`. An error says which size is off.
    pub(crate) fn affine(
        packed: Vec<u32>,
        scales: Vec<f32>,
        biases: Vec<f32>,
        outputs: usize,
        group: usize,
        bits: usize,
    ) -> Result<Self, String> {
        if !(2..=8).contains(&bits) || group == 0 || !(group * bits).is_multiple_of(32) {
            return Err(format!(
                "{bits}-bit values in groups of {group}: kiln reads 2–8 bits in groups whose bits fill whole u32 words"
            ));
        }
        if outputs == 0 || !packed.len().is_multiple_of(outputs) {
            return Err(format!("{} packed words do not make {outputs} rows", packed.len()));
        }
        let words_per_row = packed.len() / outputs;
        let inputs = words_per_row * 32 / bits;
        if !inputs.is_multiple_of(group) {
            return Err(format!("{inputs} inputs are not whole groups of {group}"));
        }
        let groups = outputs * inputs / group;
        if scales.len() != groups || biases.len() != groups {
            return Err(format!(
                "{} scales and {} biases for a [{outputs}, {inputs}] weight in groups of {group} (expected {groups} each)",
                scales.len(),
                biases.len()
            ));
        }
        Ok(PanelDense {
            stored: Stored::Affine { bits, group, words_per_row, packed, scales, biases },
            inputs,
            outputs,
        })
    }

    /// A 16-bit float layer, `[outputs, inputs]` row-major.
    pub(crate) fn half(stored: Stored, outputs: usize, inputs: usize) -> Result<Self, String> {
        let len = match &stored {
            Stored::Bf16(w) => w.len(),
            Stored::F16(w) => w.len(),
            Stored::Affine { .. } => return Err("an affine layer is built by `PanelDense::affine`".into()),
        };
        if len != outputs * inputs {
            return Err(format!("{len} values for a [{outputs}, {inputs}] weight"));
        }
        Ok(PanelDense { stored, inputs, outputs })
    }

    /// Input features.
    pub(crate) fn inputs(&self) -> usize {
        self.inputs
    }

    /// Output features.
    pub(crate) fn outputs(&self) -> usize {
        self.outputs
    }

    /// This layer as GGML `Q4_1` blocks for the VNNI kernel (`blocks.rs`), when it is
    /// 4-bit in groups of a multiple of 32 with outputs in sixteens: per 32 inputs the
    /// group's scale and bias as f16 `d` and `m`, and the nibbles in GGML's order
    /// (input `i` low, `i + 16` high). `None` for other layouts.
    pub(crate) fn q4_1_blocks(&self) -> Option<super::blocks::BlockDense> {
        let Stored::Affine { bits: 4, group, words_per_row, packed, scales, biases } = &self.stored else {
            return None;
        };
        let (k, n) = (self.inputs, self.outputs);
        if group % 32 != 0 || !k.is_multiple_of(32) || !n.is_multiple_of(16) {
            return None;
        }
        let (groups, blocks) = (k / group, k / 32);
        let mut raw = vec![0u8; n * blocks * 20];
        for r in 0..n {
            let words = &packed[r * words_per_row..(r + 1) * words_per_row];
            let nibble = |j: usize| ((words[j / 8] >> (4 * (j % 8))) & 15) as u8;
            for b in 0..blocks {
                let g = r * groups + b * 32 / group;
                let out = &mut raw[(r * blocks + b) * 20..][..20];
                out[..2].copy_from_slice(&half::f16::from_f32(scales[g]).to_le_bytes());
                out[2..4].copy_from_slice(&half::f16::from_f32(biases[g]).to_le_bytes());
                for i in 0..16 {
                    out[4 + i] = nibble(b * 32 + i) | nibble(b * 32 + i + 16) << 4;
                }
            }
        }
        super::blocks::BlockDense::from_file(super::blocks::Format::Q4_1, &raw, k, n)
    }

    /// Output row `r` (an embedding's row) widened to f32 into `dst` (`inputs` long).
    pub(crate) fn widen_row(&self, r: usize, dst: &mut [f32]) {
        debug_assert_eq!(dst.len(), self.inputs);
        let k = self.inputs;
        match &self.stored {
            Stored::Affine { bits, group, words_per_row, packed, scales, biases } => {
                let row = &packed[r * words_per_row..(r + 1) * words_per_row];
                let groups = r * (k / group)..(r + 1) * (k / group);
                widen_affine(row, *bits, *group, &scales[groups.clone()], &biases[groups], dst);
            }
            Stored::Bf16(w) => widen_bf16(&w[r * k..(r + 1) * k], dst),
            Stored::F16(w) => {
                for (d, s) in dst.iter_mut().zip(&w[r * k..(r + 1) * k]) {
                    *d = s.to_f32();
                }
            }
        }
    }

    /// `out = x Wᵀ` for `rows` rows of `x` (`rows × inputs`, row-major); `out` is
    /// resized to `rows × outputs`.
    pub(crate) fn forward(&self, x: &[f32], rows: usize, out: &mut Vec<f32>) {
        let (k, n) = (self.inputs, self.outputs);
        debug_assert_eq!(x.len(), rows * k);
        out.clear();
        out.resize(rows * n, 0.0);
        if rows == 0 {
            return;
        }
        let dst = Shared(out.as_mut_ptr());
        let panel = if rows <= FEW_ROWS {
            PANEL
        } else {
            let threads = rayon::current_num_threads().max(1);
            let fits = (PANEL_BYTES / 4 / k.max(1)) / 16 * 16;
            fits.min(n.div_ceil(2 * threads).div_ceil(16) * 16).clamp(PANEL, 256)
        };
        (0..n.div_ceil(panel)).into_par_iter().for_each(|p| {
            let cols = p * panel..((p + 1) * panel).min(n);
            SCRATCH.with_borrow_mut(|scratch| {
                if rows <= FEW_ROWS {
                    scratch.resize(k, 0.0);
                    for c in cols {
                        self.widen_row(c, scratch);
                        for r in 0..rows {
                            let v = dot(&x[r * k..(r + 1) * k], scratch);
                            // SAFETY: element (r, c) of the rows × n output; each panel
                            // writes only its own columns.
                            unsafe { *dst.at(r * n + c) = v };
                        }
                    }
                    return;
                }
                let width = cols.len();
                scratch.resize(width * k, 0.0);
                for (i, c) in cols.clone().enumerate() {
                    self.widen_row(c, &mut scratch[i * k..(i + 1) * k]);
                }
                // SAFETY: dst is the rows × n output (row stride n) offset to this panel's
                // first column, of which only this panel's `width` columns are written;
                // x is rows × k (row stride k); the scratch holds the panel's rows of W
                // (`width × k`), read as the k × width matrix Wᵀ (column stride k).
                unsafe {
                    super::product(
                        (rows, width, k),
                        super::View::rows(dst.at(cols.start), n),
                        false,
                        super::View::rows(x.as_ptr(), k),
                        super::View::transposed(scratch.as_ptr(), k),
                        1.0,
                        gemm::Parallelism::None,
                    );
                }
            });
        });
    }
}

thread_local! {
    /// The calling thread's widened weights, kept between calls.
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

dispatch!(
    /// One row's `bits`-bit values from its bit stream `row`, group by group scaled and
    /// offset into `dst`.
    fn widen_affine => widen_affine_generic(row: &[u32], bits: usize, group: usize, scales: &[f32], biases: &[f32], dst: &mut [f32])
);

#[inline(always)]
fn widen_affine_generic(
    row: &[u32],
    bits: usize,
    group: usize,
    scales: &[f32],
    biases: &[f32],
    dst: &mut [f32],
) {
    let per_group = group * bits / 32;
    for (((words, dst), &scale), &bias) in
        row.chunks_exact(per_group).zip(dst.chunks_exact_mut(group)).zip(scales).zip(biases)
    {
        unpack(words, bits, scale, bias, dst);
    }
}

/// One group's `bits`-bit values from `words` (a whole number of u32s), scaled and
/// offset into `dst`.
#[inline(always)]
fn unpack(words: &[u32], bits: usize, scale: f32, bias: f32, dst: &mut [f32]) {
    // The common widths, whose values never straddle a word, get loops the compiler
    // vectorises; the others read a 64-bit window.
    macro_rules! whole_words {
        ($per:literal) => {
            for (w, d) in words.iter().zip(dst.chunks_exact_mut($per)) {
                for (i, d) in d.iter_mut().enumerate() {
                    *d = ((w >> (i * (32 / $per))) & ((1 << (32 / $per)) - 1)) as f32 * scale + bias;
                }
            }
        };
    }
    match bits {
        2 => whole_words!(16),
        4 => whole_words!(8),
        8 => whole_words!(4),
        _ => {
            let mask = (1u64 << bits) - 1;
            for (j, d) in dst.iter_mut().enumerate() {
                let (word, shift) = (j * bits / 32, j * bits % 32);
                let low = u64::from(words[word]);
                let high = words.get(word + 1).map_or(0, |&w| u64::from(w));
                *d = ((((high << 32) | low) >> shift) & mask) as f32 * scale + bias;
            }
        }
    }
}

dispatch!(
    /// bf16 to f32 (exact: a bf16 is an f32's top half).
    fn widen_bf16 => widen_bf16_generic(src: &[bf16], dst: &mut [f32])
);

#[inline(always)]
fn widen_bf16_generic(src: &[bf16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits(u32::from(s.to_bits()) << 16);
    }
}

dispatch!(
    /// `Σ a·b` in sixteen lanes.
    fn dot => dot_generic(a: &[f32], b: &[f32]) -> f32
);

#[inline(always)]
fn dot_generic(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            lanes[i] = x[i].mul_add(y[i], lanes[i]);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Packs `q` (values below 2^bits) as MLX does: one little-endian bit stream per row.
    pub(crate) fn pack(q: &[u64], bits: usize) -> Vec<u32> {
        let mut words = vec![0u32; q.len() * bits / 32];
        for (j, &v) in q.iter().enumerate() {
            for b in 0..bits {
                if v >> b & 1 == 1 {
                    let at = j * bits + b;
                    words[at / 32] |= 1 << (at % 32);
                }
            }
        }
        words
    }

    fn reference(w: &[f32], x: &[f32], rows: usize, k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; rows * n];
        for r in 0..rows {
            for c in 0..n {
                out[r * n + c] =
                    (0..k).map(|i| f64::from(x[r * k + i]) * f64::from(w[c * k + i])).sum::<f64>() as f32;
            }
        }
        out
    }

    fn close(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{what}: element {i}: {g} vs {w}");
        }
    }

    #[test]
    fn every_bit_width_multiplies_as_its_dequantized_weights() {
        let (k, n) = (192, 70);
        let x: Vec<f32> = (0..9 * k).map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0).collect();
        for bits in [2usize, 3, 4, 5, 6, 8] {
            let group = 64;
            let q: Vec<u64> = (0..n * k).map(|j| (j as u64 * 7 + 3) % (1 << bits)).collect();
            let packed: Vec<u32> = q.chunks(k).flat_map(|row| pack(row, bits)).collect();
            let groups = n * k / group;
            let scales: Vec<f32> = (0..groups).map(|g| 0.01 + g as f32 * 1e-3).collect();
            let biases: Vec<f32> = (0..groups).map(|g| -0.05 + g as f32 * 2e-3).collect();
            let w: Vec<f32> =
                (0..n * k).map(|j| scales[j / group] * q[j] as f32 + biases[j / group]).collect();
            let layer = PanelDense::affine(packed, scales, biases, n, group, bits).unwrap();
            let mut row = vec![0f32; k];
            layer.widen_row(5, &mut row);
            assert_eq!(row, w[5 * k..6 * k], "bits {bits}: row 5 widened");
            for rows in [1, 3, 8, 9] {
                let mut out = Vec::new();
                layer.forward(&x[..rows * k], rows, &mut out);
                close(&out, &reference(&w, &x[..rows * k], rows, k, n), &format!("bits {bits}, {rows} rows"));
            }
        }
    }

    #[test]
    fn half_floats_multiply_as_their_f32_values() {
        let (k, n) = (100, 40);
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 13 % 71) as f32 - 35.0) / 40.0).collect();
        let x: Vec<f32> = (0..7 * k).map(|i| ((i * 29 % 53) as f32 - 26.0) / 13.0).collect();
        for stored in [
            Stored::Bf16(w.iter().map(|&v| bf16::from_f32(v)).collect()),
            Stored::F16(w.iter().map(|&v| f16::from_f32(v)).collect()),
        ] {
            let layer = PanelDense::half(stored, n, k).unwrap();
            let mut wide = vec![0f32; n * k];
            for (c, row) in wide.chunks_mut(k).enumerate() {
                layer.widen_row(c, row);
            }
            for rows in [1, 7] {
                let mut out = Vec::new();
                layer.forward(&x[..rows * k], rows, &mut out);
                close(&out, &reference(&wide, &x[..rows * k], rows, k, n), &format!("{rows} rows"));
            }
        }
    }

    #[test]
    fn sizes_that_do_not_fit_are_refused_by_name() {
        let err = PanelDense::affine(vec![0; 16], vec![0.0; 3], vec![0.0; 3], 2, 64, 4).err().unwrap();
        assert!(err.contains("3 scales") && err.contains("expected 2"), "{err}");
        let err = PanelDense::affine(vec![0; 15], vec![0.0; 2], vec![0.0; 2], 2, 64, 4).err().unwrap();
        assert!(err.contains("15 packed words"), "{err}");
        let err = PanelDense::affine(vec![0; 16], vec![0.0; 2], vec![0.0; 2], 2, 64, 9).err().unwrap();
        assert!(err.contains("9-bit"), "{err}");
    }
}
