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
//! Weights are packed per block of 16 output columns, per group of 4 inputs: 64 bytes —
//! what AVX-512 VNNI's `vpdpbusd` reads as one vector (unsigned × signed bytes, four
//! products summed into each i32 lane), and, since a block's groups follow each other,
//! sixteen groups are one 1 KiB tile of AMX's `TDPBUSD` (16 rows of 16 columns × 4
//! inputs). Inputs are padded to a multiple of 64 (a tile row) with zero weights, and
//! the packed blocks to an even count, so tiles pair as the bf16 kernel's do.
//!
//! Where AMX runs and a call has at least [`AMX_ROWS`] rows, the product runs on tiles:
//! 32 rows × 32 columns in four accumulators, each step of 64 inputs two activation
//! and two weight tiles, jobs split as the bf16 layers' (`bf16::Plan`: a range of
//! columns whose weights stay in L2, walked by groups of 32 rows). Fewer rows (decoding)
//! run the VNNI kernel, which splits one row's columns over the cores. A CPU without
//! VNNI runs the same arithmetic in plain Rust (slow, for correctness only); all three
//! give the same i32 sums.

use rayon::prelude::*;

use super::aligned::Aligned;
use super::isa::{self, Isa};
use super::{Dense, Shared};

use super::tiles::BLOCK;
/// Rows (and columns) of one AMX call's results.
const EDGE: usize = 32;
/// Inputs per tile row: the multiple inputs are padded to.
const STEP: usize = 64;
/// Fewest rows a call runs on AMX tiles (one tile's rows): below it, the VNNI kernel.
pub(crate) const AMX_ROWS: usize = 16;
/// Rows per kernel call.
const ROWS: usize = 6;
/// Column blocks per kernel call.
const BLOCKS: usize = 4;

/// A linear layer with int8 weights.
pub(crate) struct QDense {
    /// `[blocks][inputs_padded / 4][16][4]` int8, `blocks` = `outputs / 16` rounded up
    /// to even (the last block of an odd count is zeros), on 64-byte lines.
    packed: Aligned<i8>,
    /// Per output column (padded with zeros as the blocks are).
    scales: Vec<f32>,
    /// Per output column: `sₙ Σₖ w` (quantized w), what a row's offset `lo` adds.
    weight_sums: Vec<f32>,
    /// Per output column.
    bias: Vec<f32>,
    inputs: usize,
    /// `inputs` rounded up to a multiple of 64.
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
        let padded = k.div_ceil(STEP) * STEP;
        let scales: Vec<f32> = w
            .par_chunks(k)
            .map(|row| {
                let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                if max > 0.0 { max / 127.0 } else { 1.0 }
            })
            .collect();
        // Each output row quantized, padded to a multiple of 64 inputs.
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
        let mut packed = Aligned::new();
        packed.resize((n / BLOCK).next_multiple_of(2) * padded * BLOCK);
        packed[..padded * n].par_chunks_mut(padded * BLOCK).enumerate().for_each(|(block, out)| {
            for group in 0..padded / 4 {
                for c in 0..BLOCK {
                    let src = (block * BLOCK + c) * padded + group * 4;
                    out[group * 64 + c * 4..group * 64 + c * 4 + 4].copy_from_slice(&q[src..src + 4]);
                }
            }
        });
        // The per-column values padded as the blocks are (zeros), so the tiles' epilogue
        // always reads 32 columns.
        let columns = (n / BLOCK).next_multiple_of(2) * BLOCK;
        let pad = |mut v: Vec<f32>| {
            v.resize(columns, 0.0);
            v
        };
        let (scales, weight_sums, bias) = (pad(scales), pad(weight_sums), pad(bias));
        Some(QDense { packed, scales, weight_sums, bias, inputs: k, padded, outputs: n })
    }

    /// `parts` side by side as one layer, their outputs one after another (a prompt's
    /// q, k and v, or gate and up, quantized and multiplied in one pass over its rows).
    /// `None` unless they share their inputs and every part but the last has a multiple
    /// of 32 outputs (a tile pair's columns: the packed blocks then simply follow each
    /// other, as do the per-column values). Each column keeps its own scale, so the
    /// results are exactly the separate layers'.
    pub(crate) fn concat(parts: &[&QDense]) -> Option<Self> {
        let (first, rest) = parts.split_first()?;
        let aligned = parts[..parts.len() - 1].iter().all(|p| p.outputs.is_multiple_of(EDGE));
        if !aligned || rest.iter().any(|p| p.inputs != first.inputs) {
            return None;
        }
        let packed = Aligned::joined(parts.iter().map(|p| &p.packed[..]));
        let joined = |f: fn(&QDense) -> &Vec<f32>| parts.iter().flat_map(|p| f(p).iter().copied()).collect();
        Some(QDense {
            packed,
            scales: joined(|p| &p.scales),
            weight_sums: joined(|p| &p.weight_sums),
            bias: joined(|p| &p.bias),
            inputs: first.inputs,
            padded: first.padded,
            outputs: parts.iter().map(|p| p.outputs).sum(),
        })
    }

    /// The gate and up layers of a SwiGLU feed-forward as one layer whose 32-column
    /// blocks hold 16 of the gate's columns and the same 16 of up's — the order
    /// [`kernels::swiglu`](super::kernels) reads, so a row of its results gives
    /// `SiLU(gate) · up` in one pass ([`QRows::quantize_swiglu`]). Blocks and per-column
    /// values are moved as they are: the results are exactly the two layers'. `None`
    /// unless both have the same shape and their outputs are a multiple of 16.
    pub(crate) fn swiglu(gate: &QDense, up: &QDense) -> Option<Self> {
        let n = gate.outputs;
        if gate.inputs != up.inputs || n != up.outputs || !n.is_multiple_of(BLOCK) {
            return None;
        }
        let block = gate.padded * BLOCK;
        let mut packed = Aligned::new();
        packed.resize(2 * n * gate.padded);
        packed.par_chunks_mut(2 * block).enumerate().for_each(|(b, out)| {
            out[..block].copy_from_slice(&gate.packed[b * block..(b + 1) * block]);
            out[block..].copy_from_slice(&up.packed[b * block..(b + 1) * block]);
        });
        let mixed = |f: fn(&QDense) -> &Vec<f32>| {
            f(gate)[..n]
                .chunks(BLOCK)
                .zip(f(up)[..n].chunks(BLOCK))
                .flat_map(|(g, u)| g.iter().chain(u))
                .copied()
                .collect()
        };
        Some(QDense {
            packed,
            scales: mixed(|p| &p.scales),
            weight_sums: mixed(|p| &p.weight_sums),
            bias: mixed(|p| &p.bias),
            inputs: gate.inputs,
            padded: gate.padded,
            outputs: 2 * n,
        })
    }

    /// Values a row of its input has.
    pub(crate) fn inputs(&self) -> usize {
        self.inputs
    }

    /// Values a row of its output has.
    pub(crate) fn outputs(&self) -> usize {
        self.outputs
    }

    /// Whether this CPU runs the VNNI kernel (the plain path is for correctness only).
    pub(crate) fn fast() -> bool {
        has_vnni()
    }

    /// `out = x W^T + b` for `tokens` rows of `x`.
    pub(crate) fn forward(&self, x: &[f32], tokens: usize, out: &mut Vec<f32>) {
        self.forward_then(x, tokens, out, false);
    }

    /// `out = GELU(x W^T + b)`: on tiles GELU is applied to each block of results as it
    /// leaves them (cache-hot), otherwise over `out` afterwards.
    pub(crate) fn forward_gelu(&self, x: &[f32], tokens: usize, out: &mut Vec<f32>) {
        self.forward_then(x, tokens, out, true);
    }

    /// `out = x W^T + b` rounded to bf16 (`tokens × outputs`, no padding) where the
    /// product runs on AMX tiles (at least [`AMX_ROWS`] rows): each block of results is
    /// rounded as it leaves the tiles, for tile attention, which reads Q, K and V in bf16
    /// (no f32 copy written and rounded again). `false`, and `out` untouched, elsewhere.
    pub(crate) fn forward_bf16(&self, x: &[f32], tokens: usize, out: &mut super::bf16::Bits) -> bool {
        if !tiles_run(tokens) {
            return false;
        }
        super::with_taken(&QUANTIZED, |rows| {
            rows.quantize(x, tokens, self.inputs);
            self.rows_bf16(rows, out)
        })
    }

    /// [`QDense::forward_bf16`] of rows already quantized for this layer.
    pub(crate) fn rows_bf16(&self, rows: &QRows, out: &mut super::bf16::Bits) -> bool {
        debug_assert_eq!(rows.padded, self.padded);
        if !tiles_run(rows.tokens) {
            return false;
        }
        out.resize(rows.tokens * self.outputs);
        let dst = Dst::Bf16(super::bf16::SharedBits(out.as_mut_ptr()));
        self.run_amx(rows, dst, false);
        true
    }

    /// The layer over `rows` (GELU applied if `gelu`), each whole output row then passed
    /// through `finish(row index, row)` (a residual + LayerNorm), kept in `out` as f32
    /// if `keep` (else `out` is scratch) and quantized into `next` if given, for a layer
    /// of this one's outputs as inputs.
    ///
    /// Where the product runs on tiles and one job makes whole rows (its weights fit in
    /// L2, as every MiniLM layer's do), a group of 32 rows is finished and quantized as
    /// its last columns leave the tiles, while it sits in L2: an int8 layer's output is
    /// then neither re-read from memory by the norm nor by the next layer's quantization
    /// (22 % of an int8 MiniLM run in perf, as two passes). Elsewhere the same steps run
    /// one after another over `out`. Either way the same values and bytes.
    pub(crate) fn rows_then(
        &self,
        rows: &QRows,
        gelu: bool,
        finish: Option<Finish>,
        (out, keep): (&mut Vec<f32>, bool),
        next: Option<&mut QRows>,
    ) {
        debug_assert_eq!(rows.padded, self.padded);
        let (tokens, n) = (rows.tokens, self.outputs);
        if !(tiles_run(tokens) && self.plan(tokens).whole_rows()) {
            self.rows_forward(rows, out, gelu);
            match (next, finish) {
                (Some(next), finish) => next.quantize_after(out, tokens, n, |r, row| {
                    if let Some(f) = finish {
                        f(r, row)
                    }
                }),
                (None, Some(f)) => out.par_chunks_mut(n).enumerate().for_each(|(r, row)| f(r, row)),
                (None, None) => {}
            }
            return;
        }
        if keep {
            out.truncate(tokens * n);
            out.resize(tokens * n, 0.0);
        }
        let next = next.map(|next| {
            next.prepare(tokens, n);
            (SharedRows(next.q.as_mut_ptr(), next.a.as_mut_ptr()), next.padded)
        });
        let dst = RowsOut { keep: keep.then_some(Shared(out.as_mut_ptr())), next, finish };
        self.run_amx(rows, Dst::Rows(dst), gelu);
    }

    /// `out = x W^T + b` (GELU applied if `gelu`) of rows already quantized for this
    /// layer, on tiles or the VNNI kernel as [`QDense::forward`] chooses.
    pub(crate) fn rows_forward(&self, rows: &QRows, out: &mut Vec<f32>, gelu: bool) {
        debug_assert_eq!(rows.padded, self.padded);
        let (tokens, kp, n) = (rows.tokens, self.padded, self.outputs);
        // The caller's buffers are reused across layers and batches, and every element
        // is written before it is read: grown (or shrunk), never cleared.
        if tiles_run(tokens) {
            out.truncate(tokens * n);
            out.resize(tokens * n, 0.0);
            self.run_amx(rows, Dst::F32(Shared(out.as_mut_ptr())), gelu);
            return;
        }
        let vnni = has_vnni();
        super::tiles::run(tokens, n, ROWS, BLOCKS, out, |call, out| {
            let tile = Tile {
                layer: self,
                q: &rows.q[call.row0 * kp..(call.row0 + call.rows) * kp],
                a: &rows.a[call.row0..call.row0 + call.rows],
                rows: call.rows,
                first: call.first,
                blocks: call.blocks,
                stride: call.stride,
                col0: call.col0,
            };
            tile.run(vnni, out);
        });
        if gelu {
            out.par_chunks_mut(1 << 14).for_each(super::kernels::gelu);
        }
    }

    fn forward_then(&self, x: &[f32], tokens: usize, out: &mut Vec<f32>, gelu: bool) {
        debug_assert_eq!(x.len(), tokens * self.inputs);
        super::with_taken(&QUANTIZED, |rows| {
            rows.quantize(x, tokens, self.inputs);
            self.rows_forward(rows, out, gelu);
        });
    }

    /// How [`QDense::run_amx`] splits `tokens` rows into jobs.
    fn plan(&self, tokens: usize) -> super::bf16::Plan {
        super::bf16::Plan::new(tokens.div_ceil(EDGE), (self.outputs / BLOCK).div_ceil(2), self.padded * EDGE)
    }

    /// `out` (`tokens × outputs`: f32, bf16, or quantized for the next layer) = the layer
    /// over `rows` on AMX tiles, GELU applied if `gelu`.
    fn run_amx(&self, rows: &QRows, out: Dst<'_>, gelu: bool) {
        let (kp, n, tokens) = (self.padded, self.outputs, rows.tokens);
        let (q, a) = (&rows.q[..], &rows.a[..]);
        debug_assert!(q.len() >= tokens.div_ceil(EDGE) * EDGE * kp);
        let plan = self.plan(tokens);
        let last_pair = (n / BLOCK).div_ceil(2) - 1;
        debug_assert!(!matches!(out, Dst::Rows(..)) || plan.whole_rows());
        let chunks = kp / STEP;
        (0..plan.jobs()).into_par_iter().for_each(|job| {
            let mut sums = Sums([0; EDGE * EDGE]);
            let mut block = Block([0.0; EDGE * EDGE]);
            let _tiles = super::amx::TileConfig::load();
            // A group's whole rows, when they are finished together: 32 × n f32, in L2.
            // (Only then: zeroing 32 × n values a job for nothing cost a 3B layer of
            // 22 016 columns 2.8 MB of memset a job.)
            let mut group_rows = match out {
                Dst::Rows(..) => {
                    let mut rows = GROUP_ROWS.take();
                    rows.resize(EDGE * n, 0.0);
                    rows
                }
                _ => Vec::new(),
            };
            for (group, pair) in plan.blocks(job) {
                let rows = &q[group * EDGE * kp..(group + 1) * EDGE * kp];
                let b0 = &self.packed[2 * pair * kp * BLOCK..(2 * pair + 1) * kp * BLOCK];
                let b1 = &self.packed[(2 * pair + 1) * kp * BLOCK..(2 * pair + 2) * kp * BLOCK];
                // SAFETY: the caller checked the level is AMX (the CPU has it and the OS
                // granted the tile data, `isa::detected`); `_tiles` configured this
                // thread's tiles; `rows` is 32 rows of `kp` bytes, `b0` and `b1` `kp / 64`
                // tiles each (the packed blocks are an even count), `sums` 32 × 32.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    super::amx::block_i8(
                        rows.as_ptr(),
                        kp,
                        b0.as_ptr(),
                        b1.as_ptr(),
                        chunks,
                        sums.0.as_mut_ptr(),
                    )
                };
                #[cfg(not(target_arch = "x86_64"))]
                let _ = (rows, b0, b1, chunks);
                let col0 = pair * EDGE;
                let cols = EDGE.min(n - col0);
                let valid = EDGE.min(tokens - group * EDGE);
                let columns =
                    |v: &[f32]| -> [f32; EDGE] { v[col0..col0 + EDGE].try_into().expect("32 columns") };
                results(
                    &sums.0,
                    &a[group * EDGE..group * EDGE + valid],
                    &columns(&self.scales),
                    &columns(&self.weight_sums),
                    &columns(&self.bias),
                    &mut block.0,
                );
                if gelu {
                    super::kernels::gelu(&mut block.0[..valid * EDGE]);
                }
                // SAFETY (all): group·32 + valid <= tokens and col0 + cols <= n, so the
                // rows written are inside `out` (tokens × n, or the next layer's quantized
                // rows, whole groups of `padded` bytes); this job alone writes them.
                match out {
                    Dst::F32(shared) => unsafe {
                        store_rows(shared.0, &block.0, group, valid, n, col0, cols)
                    },
                    Dst::Bf16(shared) => {
                        // One conversion for the block (a call per row of 32 costs more).
                        let mut rounded = [0u16; EDGE * EDGE];
                        super::bf16::to_bf16(&block.0[..valid * EDGE], &mut rounded[..valid * EDGE]);
                        unsafe { store_rows(shared.0, &rounded, group, valid, n, col0, cols) }
                    }
                    Dst::Rows(dst) => {
                        // SAFETY: `group_rows` is 32 × n.
                        unsafe { store_rows(group_rows.as_mut_ptr(), &block.0, 0, valid, n, col0, cols) };
                        if pair == last_pair {
                            // SAFETY: the group's rows are inside `dst`'s buffers (`rows_then`).
                            unsafe { dst.finish_group(&mut group_rows, group, valid, n) };
                        }
                    }
                }
            }
            if matches!(out, Dst::Rows(..)) {
                GROUP_ROWS.set(group_rows);
            }
        });
    }
}

/// A batch's rows quantized for an int8 layer: each row's bytes (`padded` a row, in
/// whole groups of 32 rows, on 64-byte lines, as tiles read them) and its (scale, lo).
/// Made once per width and read by every layer that takes it, or written by the norm or
/// the layer before as each row is made (then the f32 rows are not read again).
#[derive(Default)]
pub(crate) struct QRows {
    q: Aligned<u8>,
    a: Vec<(f32, f32)>,
    tokens: usize,
    padded: usize,
}

impl QRows {
    /// Room for `tokens` rows of `inputs` values. Bytes past a row's inputs, and rows
    /// past `tokens` in the last group, keep whatever they held: zero weights meet the
    /// first, and the second's results are dropped.
    fn prepare(&mut self, tokens: usize, inputs: usize) {
        self.padded = inputs.div_ceil(STEP) * STEP;
        self.tokens = tokens;
        self.q.resize_any(tokens.div_ceil(EDGE) * EDGE * self.padded);
        self.a.resize(tokens, (0.0, 0.0));
    }

    /// `tokens` rows of `x` (`inputs` values each) quantized.
    pub(crate) fn quantize(&mut self, x: &[f32], tokens: usize, inputs: usize) {
        debug_assert!(x.len() >= tokens * inputs);
        self.prepare(tokens, inputs);
        self.q[..tokens * self.padded]
            .par_chunks_mut(self.padded)
            .zip(x.par_chunks(inputs))
            .zip(self.a.par_iter_mut())
            .for_each(|((q, x), a)| *a = quantize_row(x, &mut q[..inputs]));
    }

    /// `tokens` rows of a [`QDense::swiglu`] layer's results (`2 · width` values each)
    /// as `SiLU(gate) · up`, each row's first `inputs` values quantized (a feed-forward
    /// whose layers were padded to 16 columns has `inputs < width`): the down layer's
    /// rows, without an f32 copy of the intermediate.
    pub(crate) fn quantize_swiglu(&mut self, both: &[f32], tokens: usize, width: usize, inputs: usize) {
        debug_assert!(both.len() >= tokens * 2 * width && inputs <= width);
        self.prepare(tokens, inputs);
        self.q[..tokens * self.padded]
            .par_chunks_mut(self.padded)
            .zip(both.par_chunks(2 * width))
            .zip(self.a.par_iter_mut())
            .for_each_init(
                || vec![0f32; width],
                |act, ((q, row), a)| {
                    super::kernels::swiglu(row, act);
                    *a = quantize_row(&act[..inputs], &mut q[..inputs]);
                },
            );
    }

    /// `tokens` rows of `x` (`inputs` values each), each first passed through
    /// `f(row index, row)` and then quantized while it is in L1 (a residual + LayerNorm
    /// writes its rows and the next layer's input in one pass).
    pub(crate) fn quantize_after(
        &mut self,
        x: &mut [f32],
        tokens: usize,
        inputs: usize,
        f: impl Fn(usize, &mut [f32]) + Sync,
    ) {
        debug_assert!(x.len() >= tokens * inputs);
        self.prepare(tokens, inputs);
        const CHUNK: usize = 64;
        let kp = self.padded;
        x[..tokens * inputs]
            .par_chunks_mut(inputs * CHUNK)
            .zip(self.q.par_chunks_mut(kp * CHUNK))
            .zip(self.a.par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(chunk, ((x, q), a))| {
                for (r, ((x, q), a)) in
                    x.chunks_exact_mut(inputs).zip(q.chunks_exact_mut(kp)).zip(a).enumerate()
                {
                    f(chunk * CHUNK + r, x);
                    *a = quantize_row(x, &mut q[..inputs]);
                }
            });
    }
}

/// Whether a call of `tokens` rows runs on AMX tiles.
pub(crate) fn tiles_run(tokens: usize) -> bool {
    tokens >= AMX_ROWS && isa::active() >= Isa::Amx
}

/// Rows `0..valid` of a block of 32 × 32 results, their first `cols` values, into rows
/// `group · 32 ..` of the `n`-wide buffer at `out`, from column `col0`.
///
/// # Safety
/// Those rows and columns are inside the buffer, and no one else writes them meanwhile.
#[inline(always)]
unsafe fn store_rows<T: Copy>(
    out: *mut T,
    block: &[T; EDGE * EDGE],
    group: usize,
    valid: usize,
    n: usize,
    col0: usize,
    cols: usize,
) {
    for (r, row) in block.chunks_exact(EDGE).take(valid).enumerate() {
        // SAFETY: as the caller promises.
        let dst = unsafe { std::slice::from_raw_parts_mut(out.add((group * EDGE + r) * n + col0), cols) };
        super::bf16::copy_row(dst, row);
    }
}

/// Where [`QDense::run_amx`] writes: `tokens × outputs` f32, the same rounded to bf16,
/// or whole rows finished together ([`QDense::rows_then`]).
#[derive(Clone, Copy)]
enum Dst<'a> {
    F32(Shared),
    Bf16(super::bf16::SharedBits),
    Rows(RowsOut<'a>),
}

/// What [`QDense::rows_then`] does with a row before it is kept or quantized: given
/// the row's index in the call and its values.
pub(crate) type Finish<'a> = &'a (dyn Fn(usize, &mut [f32]) + Sync);

/// Whole rows' way out of [`QDense::run_amx`]: through `finish`, kept as f32 rows of
/// `tokens × outputs`, and quantized into the next layer's rows (`padded` bytes each).
#[derive(Clone, Copy)]
struct RowsOut<'a> {
    finish: Option<Finish<'a>>,
    keep: Option<Shared>,
    next: Option<(SharedRows, usize)>,
}

impl RowsOut<'_> {
    /// Rows `0..valid` of `group_rows` (`n` values each), rows `group · 32 ..` of the
    /// call, finished, kept and quantized.
    ///
    /// # Safety
    /// The call's buffers hold those rows, and no one else writes them meanwhile.
    unsafe fn finish_group(&self, group_rows: &mut [f32], group: usize, valid: usize, n: usize) {
        for (r, x) in group_rows.chunks_exact_mut(n).take(valid).enumerate() {
            let row = group * EDGE + r;
            if let Some(f) = self.finish {
                f(row, x);
            }
            // SAFETY (both): as the caller promises.
            if let Some(keep) = self.keep {
                unsafe { std::slice::from_raw_parts_mut(keep.at(row * n), n) }.copy_from_slice(x);
            }
            if let Some((next, padded)) = self.next {
                unsafe {
                    let q = std::slice::from_raw_parts_mut(next.0.add(row * padded), n);
                    *next.1.add(row) = quantize_row(x, q);
                }
            }
        }
    }
}

/// [`QRows`]' two buffers, which [`QDense::run_amx`]'s jobs write a group of rows each.
#[derive(Clone, Copy)]
struct SharedRows(*mut u8, *mut (f32, f32));
// SAFETY: jobs write disjoint rows (each group belongs to one job: `Plan::whole_rows`).
unsafe impl Send for SharedRows {}
unsafe impl Sync for SharedRows {}

/// A block's i32 sums, where tiles store them, on a 64-byte boundary.
#[repr(C, align(64))]
struct Sums([i32; EDGE * EDGE]);

/// A block's results in f32.
#[repr(C, align(64))]
struct Block([f32; EDGE * EDGE]);

dispatch!(
    /// A block's results from its i32 sums, row `r` of `rows` (scale, lo) and the 32
    /// columns' scales, weight sums and biases: `sum · scale·sₙ + lo·wₙ + bₙ`.
    fn results => results_generic(
        sums: &[i32; EDGE * EDGE],
        rows: &[(f32, f32)],
        scales: &[f32; EDGE],
        weights: &[f32; EDGE],
        bias: &[f32; EDGE],
        out: &mut [f32; EDGE * EDGE]
    )
);

#[inline(always)]
fn results_generic(
    sums: &[i32; EDGE * EDGE],
    rows: &[(f32, f32)],
    scales: &[f32; EDGE],
    weights: &[f32; EDGE],
    bias: &[f32; EDGE],
    out: &mut [f32; EDGE * EDGE],
) {
    // The VNNI kernel's operations in its order (two fused multiply-adds): the two terms
    // nearly cancel for a row with a large offset, so a different rounding here made a
    // text's embedding depend on whether its batch ran on tiles (cosine 0.9991).
    for ((out, sums), &(scale, lo)) in out.chunks_exact_mut(EDGE).zip(sums.chunks_exact(EDGE)).zip(rows) {
        for c in 0..EDGE {
            out[c] = (sums[c] as f32).mul_add(scale * scales[c], lo.mul_add(weights[c], bias[c]));
        }
    }
}

thread_local! {
    /// The calling thread's quantized rows, kept between calls.
    static QUANTIZED: std::cell::Cell<QRows> = std::cell::Cell::new(QRows::default());
    /// A job's group of whole f32 rows on their way to being quantized, kept between jobs.
    static GROUP_ROWS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
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
                    // The kernels' order of operations (see `results_generic`).
                    out[r * self.stride + col - self.col0] = (acc as f32)
                        .mul_add(scale * l.scales[col], lo.mul_add(l.weight_sums[col], l.bias[col]));
                }
            }
        }
    }
}

/// Quantizes one row to `round((value - lo) / scale)` (0..=255) into `q`; returns
/// `(scale, lo)`. Written out for AVX-512 (min and max, then scale, round and narrow to
/// bytes, 16 values a step): the compiler's version of the plain loop narrowed lane by
/// lane and took 16 % of an int8 embedding run on AMX.
fn quantize_row(x: &[f32], q: &mut [u8]) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if isa::active() >= Isa::Avx512 {
        // SAFETY: the level is at most what the CPU has (`isa::detected`): AVX-512 F.
        return unsafe { avx512::quantize_row(x, q) };
    }
    quantize_row_generic(x, q)
}

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
mod avx512 {
    use std::arch::x86_64::*;

    /// [`super::quantize_row`] on AVX-512 F: the same rounding (to nearest, ties to even)
    /// and so the same bytes as the plain version.
    #[target_feature(enable = "avx512f")]
    pub(super) fn quantize_row(x: &[f32], q: &mut [u8]) -> (f32, f32) {
        let n = x.len().min(q.len());
        let (whole, tail) = (n / 16 * 16, n % 16);
        let mask: __mmask16 = ((1u32 << tail) - 1) as u16;
        // SAFETY: loads and stores stay below `n`, inside both slices (the tail's masked).
        unsafe {
            let (px, pq) = (x.as_ptr(), q.as_mut_ptr());
            // Four independent (lo, hi) pairs, 64 values a step: one pair was a chain of
            // dependent vector ops as long as the row (min and max are exact, so the
            // order changes nothing).
            let (mut lo, mut hi) = (_mm512_set1_ps(f32::INFINITY), _mm512_set1_ps(f32::NEG_INFINITY));
            let (mut lows, mut highs) = ([lo; 4], [hi; 4]);
            let wide = whole / 64 * 64;
            for i in (0..wide).step_by(64) {
                for j in 0..4 {
                    let v = _mm512_loadu_ps(px.add(i + 16 * j));
                    lows[j] = _mm512_min_ps(lows[j], v);
                    highs[j] = _mm512_max_ps(highs[j], v);
                }
            }
            for j in 0..4 {
                lo = _mm512_min_ps(lo, lows[j]);
                hi = _mm512_max_ps(hi, highs[j]);
            }
            for i in (wide..whole).step_by(16) {
                let v = _mm512_loadu_ps(px.add(i));
                lo = _mm512_min_ps(lo, v);
                hi = _mm512_max_ps(hi, v);
            }
            if tail > 0 {
                let v = _mm512_maskz_loadu_ps(mask, px.add(whole));
                lo = _mm512_mask_min_ps(lo, mask, lo, v);
                hi = _mm512_mask_max_ps(hi, mask, hi, v);
            }
            let (l, h) = (_mm512_reduce_min_ps(lo), _mm512_reduce_max_ps(hi));
            let scale = if h > l { (h - l) / 255.0 } else { 1.0 };
            let (vl, inv, top) = (_mm512_set1_ps(l), _mm512_set1_ps(1.0 / scale), _mm512_set1_ps(255.0));
            let byte = |v: __m512| {
                let t = _mm512_min_ps(
                    _mm512_max_ps(_mm512_mul_ps(_mm512_sub_ps(v, vl), inv), _mm512_setzero_ps()),
                    top,
                );
                _mm512_cvtps_epu32(t)
            };
            for i in (0..whole).step_by(16) {
                _mm_storeu_si128(pq.add(i).cast(), _mm512_cvtusepi32_epi8(byte(_mm512_loadu_ps(px.add(i)))));
            }
            if tail > 0 {
                let v = _mm512_maskz_loadu_ps(mask, px.add(whole));
                _mm512_mask_cvtusepi32_storeu_epi8(pq.add(whole).cast(), mask, byte(v));
            }
            (scale, l)
        }
    }
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

    /// A row gives the same floats alone (VNNI, or plain) as among 40 (AMX tiles where
    /// they run), also when its values sit far from zero: the offset's term then nearly
    /// cancels the product's, and any other order of rounding showed (cosine 0.9991
    /// between a text embedded alone and in a batch).
    #[test]
    fn a_row_gives_the_same_results_alone_and_in_a_batch() {
        for (k, n) in [(384, 1152), (1536, 384)] {
            let dense = layer(k, n);
            let q = QDense::quantize(&dense).unwrap();
            let tokens = 40;
            let x: Vec<f32> = (0..tokens * k).map(|i| 10.0 + (i * 31 % 97) as f32 / 32.0).collect();
            let mut all = Vec::new();
            q.forward(&x, tokens, &mut all);
            for t in 0..tokens {
                let mut one = Vec::new();
                q.forward(&x[t * k..(t + 1) * k], 1, &mut one);
                assert_eq!(one[..], all[t * n..(t + 1) * n], "k {k}, n {n}: row {t} alone and in the batch");
            }
        }
    }

    /// The AVX-512 quantization gives the plain version's bytes and range, tails included.
    #[test]
    fn quantized_rows_are_the_same_on_every_level() {
        for len in [1, 15, 16, 17, 100, 384, 1536] {
            let x: Vec<f32> = (0..len).map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * 2.5 + 0.3).collect();
            let (mut plain, mut fast) = (vec![0u8; len], vec![0u8; len]);
            let want = quantize_row_generic(&x, &mut plain);
            let got = quantize_row(&x, &mut fast);
            assert_eq!(got, want, "scale and offset, {len} values");
            assert_eq!(fast, plain, "bytes, {len} values");
        }
    }

    fn layer(k: usize, n: usize) -> Dense {
        let weight_t = (0..k * n).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.2).collect();
        let bias = (0..n).map(|i| i as f32 * 0.01).collect();
        Dense { weight_t, bias, inputs: k, outputs: n }
    }

    /// Layers joined side by side give each part's results exactly, in their order, on
    /// rows that run on tiles (where AMX runs) and rows that do not; parts that do not
    /// line up with a tile pair's 32 columns are refused.
    #[test]
    fn joined_layers_give_each_parts_results() {
        let k = 200;
        let (a, b, c) = (layer(k, 64), layer(k, 96), layer(k, 48));
        let parts =
            [QDense::quantize(&a).unwrap(), QDense::quantize(&b).unwrap(), QDense::quantize(&c).unwrap()];
        let joined = QDense::concat(&[&parts[0], &parts[1], &parts[2]]).unwrap();
        assert_eq!((joined.inputs(), joined.outputs()), (k, 208));
        for tokens in [3, 40] {
            let x: Vec<f32> = (0..tokens * k).map(|i| ((i * 13 % 71) as f32 / 35.0 - 1.0) * 1.5).collect();
            let mut all = Vec::new();
            joined.forward(&x, tokens, &mut all);
            let mut at = 0;
            for part in &parts {
                let mut one = Vec::new();
                part.forward(&x, tokens, &mut one);
                let n = part.outputs();
                for t in 0..tokens {
                    assert_eq!(
                        one[t * n..(t + 1) * n],
                        all[t * 208 + at..t * 208 + at + n],
                        "{tokens} rows, row {t}"
                    );
                }
                at += n;
            }
        }
        assert!(QDense::concat(&[&parts[2], &parts[0]]).is_none(), "48 outputs do not end a tile pair");
        let other = QDense::quantize(&layer(k + 1, 64)).unwrap();
        assert!(QDense::concat(&[&parts[0], &other]).is_none(), "different inputs");
    }

    /// A gate-and-up layer's results are the two layers' exactly, 16 columns of each in
    /// turn, and its rows become the down layer's quantized `SiLU(gate) · up` rows — the
    /// bytes and ranges of quantizing those values computed apart, a padded intermediate
    /// cut to the down layer's inputs.
    #[test]
    fn swiglu_rows_are_the_two_layers_through_silu_quantized() {
        let (k, n, inputs) = (130, 48, 45);
        let (gate, up) = (QDense::quantize(&layer(k, n)).unwrap(), QDense::quantize(&layer(k, n)).unwrap());
        let joined = QDense::swiglu(&gate, &up).unwrap();
        assert_eq!(joined.outputs(), 2 * n);
        for tokens in [2, 35] {
            let x: Vec<f32> = (0..tokens * k).map(|i| ((i * 17 % 89) as f32 / 44.0 - 1.0) * 2.0).collect();
            let (mut both, mut g, mut u) = (Vec::new(), Vec::new(), Vec::new());
            joined.forward(&x, tokens, &mut both);
            gate.forward(&x, tokens, &mut g);
            up.forward(&x, tokens, &mut u);
            let mut act = vec![0f32; tokens * inputs];
            for t in 0..tokens {
                let row = &both[t * 2 * n..(t + 1) * 2 * n];
                for c in 0..n {
                    let (block, at) = (c / 16, c % 16);
                    assert_eq!(row[block * 32 + at], g[t * n + c], "{tokens} rows: gate column {c}");
                    assert_eq!(row[block * 32 + 16 + at], u[t * n + c], "{tokens} rows: up column {c}");
                }
                let mut full = vec![0f32; n];
                super::super::kernels::swiglu(row, &mut full);
                act[t * inputs..(t + 1) * inputs].copy_from_slice(&full[..inputs]);
            }
            let (mut fused, mut apart) = (QRows::default(), QRows::default());
            fused.quantize_swiglu(&both, tokens, n, inputs);
            apart.quantize(&act, tokens, inputs);
            assert_eq!(fused.a, apart.a, "{tokens} rows: ranges");
            for t in 0..tokens {
                let at = t * fused.padded;
                assert_eq!(
                    fused.q[at..at + inputs],
                    apart.q[at..at + inputs],
                    "{tokens} rows: row {t}'s bytes"
                );
            }
        }
        assert!(QDense::swiglu(&gate, &QDense::quantize(&layer(k, 64)).unwrap()).is_none(), "shapes differ");
    }

    /// The int8 layer against the f32 one: close (per-token and per-channel scales), on
    /// row and column counts that exercise every tile shape, AMX, VNNI and plain alike.
    #[test]
    fn int8_layers_match_f32_within_quantization_error() {
        // (64, 512, 3): few rows, so the threads split the columns (on 2 or more threads).
        // From 16 rows on AMX (where it runs): (100, 48, 40) has a partial group of rows,
        // inputs that are no multiple of 64 and an odd count of column blocks.
        let cases = [
            (384, 1152, 13),
            (30, 64, 7),
            (8, 16, 1),
            (64, 512, 3),
            (64, 512, 1),
            (384, 1536, 70),
            (100, 48, 40),
        ];
        for (k, n, tokens) in cases {
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
            // GELU as the results leave the tiles (or after, off tiles): GELU of them.
            let mut fused = Vec::new();
            q.forward_gelu(&x, tokens, &mut fused);
            let mut after = got.clone();
            crate::cpu::kernels::gelu(&mut after);
            assert_eq!(fused, after, "k {k}, n {n}: GELU fused into the layer");
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

    /// Rows passed on quantized — GELU rows quantized as they leave the tiles, a norm's
    /// rows as it makes them — are the bytes and (scale, lo) of quantizing the f32 rows
    /// afterwards, so an int8 model's embeddings do not depend on the path.
    #[test]
    fn rows_quantized_where_they_are_made_are_the_rows_quantized_afterwards() {
        // 70 rows: a partial group of 32; 16 and 15 rows: at and below tiles' minimum.
        for tokens in [70, 16, 15] {
            let (k, n) = (384, 1536);
            let up = QDense::quantize(&layer(k, n)).unwrap();
            let x: Vec<f32> = (0..tokens * k).map(|i| ((i * 31 % 97) as f32 / 48.0 - 1.0) * 3.0).collect();
            let mut input = QRows::default();
            input.quantize(&x, tokens, k);

            let mut gelu_rows = Vec::new();
            up.forward_gelu(&x, tokens, &mut gelu_rows);
            let mut want = QRows::default();
            want.quantize(&gelu_rows, tokens, n);
            let (mut fused, mut scratch) = (QRows::default(), Vec::new());
            up.rows_then(&input, true, None, (&mut scratch, false), Some(&mut fused));
            assert_eq!(fused.a, want.a, "{tokens} rows: (scale, lo) of each row");
            for (r, (a, b)) in fused.q.chunks(n).zip(want.q.chunks(n)).take(tokens).enumerate() {
                assert_eq!(a, b, "{tokens} rows: row {r}'s bytes");
            }

            // A finishing pass (a norm's) on each whole row, the rows kept and quantized.
            let down = QDense::quantize(&layer(n, k)).unwrap();
            let finish = |r: usize, row: &mut [f32]| row.iter_mut().for_each(|v| *v = *v * 0.5 + r as f32);
            let (mut kept, mut next) = (Vec::new(), QRows::default());
            down.rows_then(&fused, false, Some(&finish), (&mut kept, true), Some(&mut next));
            let mut plain = Vec::new();
            down.forward(&gelu_rows, tokens, &mut plain);
            plain.chunks_mut(k).enumerate().for_each(|(r, row)| finish(r, row));
            assert_eq!(kept, plain, "{tokens} rows: the next layer's rows, finished");
            let mut want = QRows::default();
            want.quantize(&plain, tokens, k);
            assert_eq!(next.a, want.a, "{tokens} rows: (scale, lo) of the finished rows");
            assert_eq!(next.q[..tokens * k], want.q[..tokens * k], "{tokens} rows: their bytes");

            // The same pass over f32 rows as they are quantized.
            let mut rows = x.clone();
            let mut after = QRows::default();
            after.quantize_after(&mut rows, tokens, k, finish);
            let mut shifted = x.clone();
            shifted.chunks_mut(k).enumerate().for_each(|(r, row)| finish(r, row));
            assert_eq!(rows, shifted, "{tokens} rows: the pass's rows stay in place");
            let mut plain = QRows::default();
            plain.quantize(&shifted, tokens, k);
            assert_eq!(after.a, plain.a, "{tokens} rows: (scale, lo) after the pass");
            assert_eq!(after.q[..tokens * k], plain.q[..tokens * k], "{tokens} rows: bytes after the pass");
        }
    }
}
