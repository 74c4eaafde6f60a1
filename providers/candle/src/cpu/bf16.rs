//! bf16 linear layers for the packed CPU path (`model.dtype = "bf16"`): bf16 weights
//! and activations, products summed in f32 — the precision OpenVINO and PyTorch pick
//! on a CPU with AMX — on AMX tiles (`TDPBF16PS`).
//!
//! # Layout
//!
//! A tile multiply takes `A` as 16 rows of 32 bf16 and `B` as 16 rows of 16 column
//! *pairs* (row `r` holds inputs `2r` and `2r + 1` of 16 output columns, interleaved).
//! Weights are re-laid at load into exactly those 1 KiB tiles — per 32 output columns,
//! per 32 inputs, two tiles side by side — so a tile load reads 1 KiB in a row.
//! Inputs and outputs are padded to multiples of 32 with zero weights.
//!
//! # Kernel
//!
//! 32 rows × 32 columns of results live in four accumulator tiles (2 × 2); each step of
//! 32 inputs loads two activation and two weight tiles and issues four tile products.
//! A job takes a range of columns whose weights fit in L2 and a range of row groups
//! (`Plan`); for each group of 32 rows (in L1) it walks its columns, so the weights
//! stream from L2 and come from memory once a call. Results go through a 4 KiB scratch
//! (where the bias is added, GELU or SwiGLU applied for `Sink::GeluRows` and
//! `Sink::SwiGluRows`, and the padding dropped) into the caller's buffer. Weights and
//! activations start on 64-byte boundaries ([`Bits`]): a tile row is a cache line.
//! With both aligned the kernel reaches 1.0–1.3 TFLOPS a core on a 3B model's shapes
//! (about 0.7 on MiniLM's short rows); at the allocator's 16-byte alignment it ran at
//! about half that (docs/benchmarks.md, issue 32).
//!
//! A CPU without AMX (or a level capped below it, `KILN_CPU_ISA`) runs the same
//! products in plain Rust over the same layout: the same rounding, only the order of
//! the f32 sums differs.

use rayon::prelude::*;

use super::Shared;
use super::isa::{self, Isa};

/// Rows and columns of one kernel call's results.
const EDGE: usize = 32;
/// bf16 values per tile (16 rows of 64 bytes).
pub(super) const TILE: usize = 512;

/// A linear layer with bf16 weights in AMX tile order.
pub(crate) struct Bf16Dense {
    /// `[pairs][chunks][2][16][16][2]` bf16 bits: per 32 output columns, per 32 inputs,
    /// two tiles.
    packed: Bits,
    /// A bias per output, then zeros up to a whole pair of 16 columns.
    bias: Vec<f32>,
    inputs: usize,
    outputs: usize,
    /// Inputs rounded up to a multiple of 32.
    padded: usize,
}

impl Bf16Dense {
    /// Rounds a layer to bf16: `row(n, out)` writes output column `n`'s `inputs` weights
    /// into `out` (a row of `W` as PyTorch stores it); `bias` has `outputs` values (or
    /// none: zeros).
    pub(crate) fn pack(
        inputs: usize,
        outputs: usize,
        bias: Option<Vec<f32>>,
        row: impl Fn(usize, &mut [f32]) + Sync,
    ) -> Self {
        let padded = inputs.div_ceil(EDGE) * EDGE;
        let chunks = padded / EDGE;
        let pairs = outputs.div_ceil(EDGE);
        let mut packed = Bits::default();
        packed.resize(pairs * chunks * 2 * TILE);
        let fast = has_avx512_bf16();
        packed.par_chunks_mut(chunks * 2 * TILE).enumerate().for_each(|(pair, tiles)| {
            // The pair's 32 columns rounded, one padded row each (zeros past `outputs`).
            let mut w = vec![0f32; inputs];
            let mut rounded = vec![0u16; EDGE * padded];
            for c in 0..EDGE.min(outputs - pair * EDGE) {
                row(pair * EDGE + c, &mut w);
                to_bf16(&w, &mut rounded[c * padded..c * padded + inputs]);
            }
            #[cfg(target_arch = "x86_64")]
            if fast {
                // SAFETY: the CPU has AVX-512 F and BF16 (`has_avx512_bf16`); `rounded`
                // is 32 rows of `padded` values, `tiles` the pair's `chunks · 2` tiles.
                unsafe { tile_columns(&rounded, padded, tiles) };
                return;
            }
            let _ = fast;
            for (c, column) in rounded.chunks_exact(padded).enumerate() {
                let (t, col) = (c / 16, c % 16);
                for (k, &v) in column.iter().enumerate() {
                    let (chunk, r, lane) = (k / EDGE, (k % EDGE) / 2, k % 2);
                    tiles[(chunk * 2 + t) * TILE + r * 32 + col * 2 + lane] = v;
                }
            }
        });
        let mut bias = bias.unwrap_or_else(|| vec![0.0; outputs]);
        assert_eq!(bias.len(), outputs, "a bias per output");
        bias.resize(pairs * EDGE, 0.0);
        Bf16Dense { packed, bias, inputs, outputs, padded }
    }

    /// The weights in tile order (tests compare other layouts' widening with them).
    #[cfg(test)]
    pub(crate) fn tiles(&self) -> &[u16] {
        &self.packed
    }

    /// Rounds `dense` (f32, `W^T` stored `[inputs, outputs]`) to bf16.
    pub(crate) fn from_dense(dense: &super::Dense) -> Self {
        let n = dense.outputs;
        Self::pack(dense.inputs, n, Some(dense.bias.clone()), |col, out| {
            for (o, w) in out.iter_mut().zip(dense.weight_t.iter().skip(col).step_by(n)) {
                *o = *w;
            }
        })
    }

    /// `parts` side by side as one layer over the same inputs: its outputs are theirs,
    /// one after another (q, k and v of a prompt in one pass over its rows). `None`
    /// unless they share their inputs and every part but the last has a multiple of 32
    /// outputs (tiles hold 32 columns; the packed layers then simply follow each other).
    pub(crate) fn concat(parts: &[&Bf16Dense]) -> Option<Self> {
        let (first, rest) = parts.split_first()?;
        let aligned = parts[..parts.len() - 1].iter().all(|p| p.outputs % EDGE == 0);
        if !aligned || rest.iter().any(|p| p.inputs != first.inputs) {
            return None;
        }
        let packed = Bits::joined(parts.iter().map(|p| &p.packed[..]));
        Some(Bf16Dense {
            packed,
            bias: parts.iter().flat_map(|p| p.bias.iter().copied()).collect(),
            inputs: first.inputs,
            outputs: parts.iter().map(|p| p.outputs).sum(),
            padded: first.padded,
        })
    }

    /// The gate and up layers of a SwiGLU feed-forward as one layer for
    /// [`Sink::SwiGluRows`]: each 32-column block of its results holds 16 of the
    /// gate's columns and the same 16 of up's, so one block gives `SiLU(gate) · up`
    /// for its 16 columns. The tiles are copied as they are (the results exactly the
    /// separate layers'); the intermediate is padded to a multiple of 32 columns with
    /// zero weights and bias (`SiLU(0) · 0 = 0`). `None` unless both have the same
    /// shape.
    pub(crate) fn swiglu(gate: &Bf16Dense, up: &Bf16Dense) -> Option<Self> {
        if gate.inputs != up.inputs || gate.outputs != up.outputs {
            return None;
        }
        let chunks = gate.padded / EDGE;
        let tile_run = chunks * 2 * TILE;
        let halves = 2 * gate.outputs.div_ceil(EDGE);
        let mut packed = Bits::default();
        packed.resize(halves * tile_run);
        packed.par_chunks_mut(tile_run).enumerate().for_each(|(half, out)| {
            // Columns 16·half.. of gate and up: tile `half % 2` of their pair `half / 2`.
            let (pair, t) = (half / 2, half % 2);
            for (which, layer) in [gate, up].iter().enumerate() {
                for chunk in 0..chunks {
                    let from = pair * tile_run + (chunk * 2 + t) * TILE;
                    out[(chunk * 2 + which) * TILE..][..TILE]
                        .copy_from_slice(&layer.packed[from..from + TILE]);
                }
            }
        });
        let bias = (0..halves * EDGE)
            .map(|c| {
                let (half, which, j) = (c / EDGE, (c % EDGE) / 16, c % 16);
                let column = half * 16 + j;
                let layer = if which == 0 { gate } else { up };
                layer.bias.get(column).copied().unwrap_or(0.0)
            })
            .collect();
        Some(Bf16Dense { packed, bias, inputs: gate.inputs, outputs: halves * EDGE, padded: gate.padded })
    }

    /// Input features.
    pub(crate) fn inputs(&self) -> usize {
        self.inputs
    }

    /// Output features.
    pub(crate) fn outputs(&self) -> usize {
        self.outputs
    }

    /// `x W^T + b` for `tokens` rows of `x` (f32, rounded to bf16 here), into `sink`.
    pub(crate) fn forward(&self, x: &[f32], tokens: usize, sink: Sink) {
        self.forward_with(x, tokens, sink, None);
    }

    /// `x` rounded into the thread's rows, then [`Bf16Dense::run_from`].
    fn forward_with(&self, x: &[f32], tokens: usize, sink: Sink, source: Option<Source>) {
        super::with_taken(&ROWS, |rows| {
            self.round_rows(x, tokens, rows);
            self.run_from(rows, tokens, sink, source);
        });
    }

    /// `x` (`tokens` rows of f32) rounded to bf16 as this layer's kernel reads it: rows
    /// of `inputs` padded with zeros to a multiple of 32, in groups of 32 rows.
    pub(crate) fn round_rows(&self, x: &[f32], tokens: usize, rows: &mut Bits) {
        let (k, kp) = (self.inputs, self.padded);
        debug_assert_eq!(x.len(), tokens * k);
        // Rows past `tokens` keep whatever they held: their results are dropped.
        rows.resize(tokens.div_ceil(EDGE) * EDGE * kp);
        rows.par_chunks_mut(64 * kp).zip(x.par_chunks(64 * k)).for_each(|(rows, x)| {
            for (row, x) in rows.chunks_mut(kp).zip(x.chunks(k)) {
                to_bf16(x, &mut row[..k]);
                row[k..].fill(0);
            }
        });
    }

    /// This layer over `tokens` rows laid out by [`Bf16Dense::round_rows`] (or written
    /// by a [`Sink::GeluRows`]), into `sink`.
    pub(crate) fn run(&self, rows: &[u16], tokens: usize, sink: Sink) {
        self.run_from(rows, tokens, sink, None);
    }

    /// A layer of this shape whose weights are not kept but made per job by a
    /// [`Source`] ([`Bf16Dense::forward_from`]); no bias.
    pub(crate) fn shape(inputs: usize, outputs: usize) -> Self {
        let padded = inputs.div_ceil(EDGE) * EDGE;
        Bf16Dense {
            packed: Bits::default(),
            bias: vec![0.0; outputs.div_ceil(EDGE) * EDGE],
            inputs,
            outputs,
            padded,
        }
    }

    /// [`Bf16Dense::forward`] with the weights from `source`: each job writes the tiles
    /// of its columns (at most [`L2_BUDGET`] bytes) into a buffer of its thread and runs
    /// its rows over them, so the weights go from their own layout to the tiles in L2 —
    /// never through memory as bf16 (4-bit blocks: `BlockDense::forward_widened`).
    pub(crate) fn forward_from(&self, x: &[f32], tokens: usize, sink: Sink, source: Source) {
        self.forward_with(x, tokens, sink, Some(source));
    }

    /// [`Bf16Dense::run`], the weights from `self` or from `source`.
    fn run_from(&self, rows: &[u16], tokens: usize, sink: Sink, source: Option<Source>) {
        let (kp, n) = (self.padded, self.outputs);
        let groups = tokens.div_ceil(EDGE);
        debug_assert!(rows.len() >= groups * EDGE * kp);
        let pairs = n.div_ceil(EDGE);
        let next = pairs * EDGE;
        // Every element is written below: grown or shrunk, never cleared.
        let out = match sink {
            Sink::F32(out) => {
                assert_eq!(out.len(), tokens * n, "an f32 sink holds tokens × outputs");
                Out::F32(Shared(out.as_mut_ptr()))
            }
            Sink::GeluRows(out) => {
                out.resize(groups * EDGE * next);
                Out::GeluRows(SharedBits(out.as_mut_ptr()))
            }
            Sink::SwiGluRows(out) => {
                out.resize(groups * EDGE * n / 2);
                Out::SwiGluRows(SharedBits(out.as_mut_ptr()))
            }
            Sink::Bf16(out) => {
                out.resize(tokens * n);
                Out::Bf16(SharedBits(out.as_mut_ptr()))
            }
        };
        if tokens == 0 || n == 0 {
            return;
        }
        let amx = isa::active() >= Isa::Amx;
        let chunks = kp / EDGE;
        // One group of rows (decoding, a short prompt) reads its activations from L2
        // anyway; slicing would only add the sums' round trips.
        if amx && chunks > 2 * SLICE && groups > 1 {
            self.run_sliced(rows, tokens, out, source);
            return;
        }
        let plan = Plan::new(groups, pairs, kp * EDGE * 2);
        let pair_len = chunks * 2 * TILE;
        (0..plan.jobs()).into_par_iter().for_each(|job| {
            let mut sums = Sums([0f32; EDGE * EDGE]);
            let _tiles = amx.then(super::amx::TileConfig::load);
            let columns = plan.job(job).1;
            super::with_taken(&JOB_TILES, |local| {
                fill_job_tiles(source, columns.clone(), 0..chunks, local);
                for (group, pair) in plan.blocks(job) {
                    let a = &rows[group * EDGE * kp..(group + 1) * EDGE * kp];
                    let b = match source {
                        Some(_) => &local[(pair - columns.start) * pair_len..][..pair_len],
                        None => &self.packed[pair * pair_len..(pair + 1) * pair_len],
                    };
                    // Only a call of a few rows in all: the last few rows of a prompt's
                    // group read weights a job keeps in L2, where the tiles are faster.
                    if amx && tokens <= FEW_ROWS {
                        // SAFETY: AMX is active, so the CPU has AVX-512 F and BF16 (every
                        // AMX CPU does; `isa::detected`); `a` holds `tokens` rows of `kp`
                        // values, `b` the pair's `kp / 32` tile pairs, `sums` 32 × 32.
                        #[cfg(target_arch = "x86_64")]
                        unsafe {
                            avx512_bf16::few_rows(
                                a.as_ptr(),
                                kp,
                                b.as_ptr(),
                                chunks,
                                tokens,
                                sums.0.as_mut_ptr(),
                            )
                        };
                    } else if amx {
                        // SAFETY: the level is AMX, so the CPU has it and the OS granted the
                        // tile data (`isa::detected`); `_tiles` configured this thread's
                        // tiles; `a` is 32 rows of `kp` values, `b` the pair's `kp / 32`
                        // tile pairs, `sums` 32 × 32 (rows 128 bytes apart).
                        #[cfg(target_arch = "x86_64")]
                        unsafe {
                            super::amx::block(
                                a.as_ptr(),
                                kp,
                                b.as_ptr(),
                                chunks,
                                sums.0.as_mut_ptr(),
                                128,
                                false,
                            )
                        };
                    } else {
                        block(a, kp, b, &mut sums.0);
                    }
                    if amx {
                        // SAFETY: AMX is active, so the CPU has AVX-512 F, BW and BF16 (every
                        // AMX CPU does; `isa::detected`).
                        #[cfg(target_arch = "x86_64")]
                        unsafe {
                            self.finish_avx512(out, group, pair, tokens, &mut sums.0)
                        };
                    } else {
                        self.finish(out, group, pair, tokens, &mut sums.0);
                    }
                }
            });
        });
    }

    /// [`run`](Self::run) for long rows (more than `2 · SLICE · 32` inputs: a 3B model's
    /// down projection, 11 008) and more than 32 of them: the inputs in slices of `SLICE · 32`, every block's sums
    /// kept in an f32 buffer between slices. Unsliced, a job holding one column pair's
    /// weights in L2 (704 KB at 11 008 inputs) read every row's activations again from
    /// L3 — the whole prompt's per pair, 64 times a layer — and the product ran at 1.17
    /// TFLOP/s against 2.0–2.6 on shorter rows. A slice's activations for 32 rows (128
    /// KB) and a job's weights stay in L2.
    fn run_sliced(&self, rows: &[u16], tokens: usize, out: Out, source: Option<Source>) {
        let (kp, n) = (self.padded, self.outputs);
        let (groups, pairs, chunks) = (tokens.div_ceil(EDGE), n.div_ceil(EDGE), kp / EDGE);
        let width = pairs * EDGE;
        super::with_taken(&ACCUMULATED, |acc| {
            acc.resize(groups * EDGE * width);
            let shared = Shared(acc.as_mut_ptr());
            for first in (0..chunks).step_by(SLICE) {
                let count = SLICE.min(chunks - first);
                let plan = Plan::new(groups, pairs, count * 2 * TILE * 2);
                (0..plan.jobs()).into_par_iter().for_each(|job| {
                    let _tiles = super::amx::TileConfig::load();
                    let columns = plan.job(job).1;
                    super::with_taken(&JOB_TILES, |local| {
                        fill_job_tiles(source, columns.clone(), first..first + count, local);
                        let slice_len = count * 2 * TILE;
                        for (group, pair) in plan.blocks(job) {
                            let a = &rows[group * EDGE * kp + first * EDGE..];
                            let b = match source {
                                Some(_) => &local[(pair - columns.start) * slice_len..][..slice_len],
                                None => &self.packed[(pair * chunks + first) * 2 * TILE..][..slice_len],
                            };
                            // SAFETY: the caller checked the level is AMX; `_tiles` configured
                            // this thread's tiles; `a` holds 32 rows `kp` apart of which the
                            // slice reads `count · 32` values each, `b` the slice's `count` tile
                            // pairs; the block of sums at (group, pair) is 32 rows of 32 f32,
                            // `width` f32 apart, inside `acc`, written by this job alone.
                            #[cfg(target_arch = "x86_64")]
                            unsafe {
                                let c = shared.at(group * EDGE * width + pair * EDGE);
                                super::amx::block(a.as_ptr(), kp, b.as_ptr(), count, c, width * 4, first > 0)
                            };
                            #[cfg(not(target_arch = "x86_64"))]
                            let _ = (a, b);
                        }
                    });
                });
            }
            let acc = &acc[..];
            (0..groups * pairs).into_par_iter().for_each(|block| {
                let (group, pair) = (block / pairs, block % pairs);
                let mut sums = Sums([0f32; EDGE * EDGE]);
                for (r, row) in sums.0.chunks_exact_mut(EDGE).enumerate() {
                    let at = (group * EDGE + r) * width + pair * EDGE;
                    row.copy_from_slice(&acc[at..at + EDGE]);
                }
                // SAFETY: as in `run`: the caller checked the level is AMX.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    self.finish_avx512(out, group, pair, tokens, &mut sums.0)
                };
            });
        });
    }

    /// [`finish`](Self::finish) in AVX-512 for the tile path: the bias added and the rows
    /// stored (rounded for [`Sink::Bf16`]) 16 values an instruction, masked at a last
    /// partial pair; the row sinks' GELU and SwiGLU as `finish` has them. (The baseline
    /// build moved 16 bytes an instruction, and the compiler's AVX-512 build of the
    /// same loops vectorised them across rows, with gathers: perf had either at a
    /// tenth of a bf16 embedding run.)
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW, VL and BF16 (every AMX CPU; [`Isa::Amx`] checks).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")]
    unsafe fn finish_avx512(
        &self,
        out: Out,
        group: usize,
        pair: usize,
        tokens: usize,
        scratch: &mut [f32; EDGE * EDGE],
    ) {
        use std::arch::x86_64::*;
        let n = self.outputs;
        let valid = EDGE.min(tokens - group * EDGE);
        let col0 = pair * EDGE;
        let cols = EDGE.min(n - col0);
        use avx512_bf16::{bits, lanes};
        let (m0, m1) = (lanes(cols), lanes(cols.saturating_sub(16)));
        // SAFETY (the whole body): the bias is padded to whole pairs (32 values from
        // col0); the block's rows below `tokens` and columns col0..col0 + cols are inside
        // `out` (masked stores touch no other column), written by this job alone.
        unsafe {
            let bias = self.bias.as_ptr().add(col0);
            let (b0, b1) = (_mm512_loadu_ps(bias), _mm512_loadu_ps(bias.add(16)));
            let sums = scratch.as_mut_ptr();
            let row = |r: usize| {
                let s = sums.add(r * EDGE);
                (_mm512_add_ps(_mm512_loadu_ps(s), b0), _mm512_add_ps(_mm512_loadu_ps(s.add(16)), b1))
            };
            match out {
                Out::F32(out) => {
                    for r in 0..valid {
                        let (v0, v1) = row(r);
                        let to = out.at((group * EDGE + r) * n + col0);
                        _mm512_mask_storeu_ps(to, m0, v0);
                        _mm512_mask_storeu_ps(to.add(16), m1, v1);
                    }
                }
                Out::Bf16(out) => {
                    for r in 0..valid {
                        let (v0, v1) = row(r);
                        let to = out.at((group * EDGE + r) * n + col0);
                        _mm256_mask_storeu_epi16(to.cast(), m0, bits(v0));
                        _mm256_mask_storeu_epi16(to.add(16).cast(), m1, bits(v1));
                    }
                }
                Out::GeluRows(_) | Out::SwiGluRows(_) => {
                    for r in 0..EDGE {
                        let (v0, v1) = row(r);
                        let s = sums.add(r * EDGE);
                        _mm512_storeu_ps(s, v0);
                        _mm512_storeu_ps(s.add(16), v1);
                    }
                    self.finish_rows(out, group, pair, scratch);
                }
            }
        }
    }

    /// The block of results at (`group`, `pair`), its f32 sums in `scratch`, into `out`:
    /// the bias added, and for the row sinks GELU or SwiGLU applied and the rows rounded
    /// to bf16. The plain build, for CPUs without AMX ([`finish_avx512`](Self::finish_avx512)
    /// on the tiles' path).
    fn finish(&self, out: Out, group: usize, pair: usize, tokens: usize, scratch: &mut [f32; EDGE * EDGE]) {
        let n = self.outputs;
        let valid = EDGE.min(tokens - group * EDGE);
        let col0 = pair * EDGE;
        let cols = EDGE.min(n - col0);
        // Padded with zeros to whole pairs; so are the weights, so padding columns stay 0.
        let bias = &self.bias[col0..col0 + EDGE];
        for s in scratch.chunks_exact_mut(EDGE) {
            for (s, b) in s.iter_mut().zip(bias) {
                *s += b;
            }
        }
        match out {
            Out::F32(out) => {
                for (r, s) in scratch.chunks_exact(EDGE).take(valid).enumerate() {
                    // SAFETY: the row is below `tokens` and col0 + cols <= n, so the
                    // elements are inside `out` (tokens × n); one job alone writes them.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(out.at((group * EDGE + r) * n + col0), cols)
                    };
                    dst.copy_from_slice(&s[..cols]);
                }
            }
            Out::Bf16(out) => {
                for (r, s) in scratch.chunks_exact(EDGE).take(valid).enumerate() {
                    // SAFETY: as for `Out::F32`, in a bf16 buffer of the same shape.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(out.at((group * EDGE + r) * n + col0), cols)
                    };
                    to_bf16(&s[..cols], dst);
                }
            }
            Out::GeluRows(_) | Out::SwiGluRows(_) => self.finish_rows(out, group, pair, scratch),
        }
    }

    /// [`finish`](Self::finish)'s row sinks, the bias already added: GELU or SwiGLU
    /// applied and the 32 rows rounded to bf16 into the next layer's rows.
    #[inline(always)]
    fn finish_rows(&self, out: Out, group: usize, pair: usize, scratch: &mut [f32; EDGE * EDGE]) {
        let n = self.outputs;
        let next = n.div_ceil(EDGE) * EDGE;
        let col0 = pair * EDGE;
        match out {
            Out::SwiGluRows(out) => {
                let mut product = [0f32; EDGE * 16];
                super::kernels::swiglu(scratch, &mut product);
                let mut rounded = [0u16; EDGE * 16];
                to_bf16(&product, &mut rounded);
                let width = n / 2;
                for (r, s) in rounded.chunks_exact(16).enumerate() {
                    let row = group * EDGE + r;
                    // SAFETY: the group's rows and the 16 columns this pair makes are
                    // inside `out` (groups·32 rows of `width`); one job alone writes them.
                    let dst = unsafe { std::slice::from_raw_parts_mut(out.at(row * width + pair * 16), 16) };
                    dst.copy_from_slice(s);
                }
            }
            Out::GeluRows(out) => {
                // Padding columns: zero weights and bias, GELU(0) = 0.
                super::kernels::gelu(scratch);
                // One conversion for the block: per row of 32 the call cost more than the
                // conversion.
                let mut rounded = [0u16; EDGE * EDGE];
                to_bf16(scratch, &mut rounded);
                for (r, s) in rounded.chunks_exact(EDGE).enumerate() {
                    let row = group * EDGE + r;
                    // SAFETY: the rows of this group and the pair's 32 columns are inside
                    // `out` (groups·32 × pairs·32), written by one job alone.
                    let dst = unsafe { std::slice::from_raw_parts_mut(out.at(row * next + col0), EDGE) };
                    dst.copy_from_slice(s);
                }
            }
            Out::F32(_) | Out::Bf16(_) => unreachable!("finish stores the f32 and bf16 sinks itself"),
        }
    }
}

/// `dst` = the first `dst.len()` (at most 32) values of `row`: a whole row as a fixed
/// 32-value copy the compiler inlines (a `memmove` call per 32 values showed in perf).
#[inline(always)]
pub(super) fn copy_row<T: Copy>(dst: &mut [T], row: &[T]) {
    match <&mut [T; EDGE]>::try_from(&mut *dst) {
        Ok(whole) => *whole = row[..EDGE].try_into().expect("a block's row has 32 values"),
        Err(_) => dst.copy_from_slice(&row[..dst.len()]),
    }
}

/// Inputs a slice of [`Bf16Dense::run_sliced`] takes, in chunks of 32 (2 048 inputs).
const SLICE: usize = 64;

thread_local! {
    /// The calling thread's f32 sums of [`Bf16Dense::run_sliced`], kept between calls.
    static ACCUMULATED: std::cell::Cell<super::aligned::Aligned<f32>> =
        const { std::cell::Cell::new(super::aligned::Aligned::new()) };
}

/// Weight bytes a job keeps hot in L2 (2 MiB a core on Sapphire Rapids; half of it
/// measured 1.1–1.2× the rate of three quarters on a 3B model's shapes) while it walks
/// its rows.
const L2_BUDGET: usize = 1 << 20;

/// How [`Bf16Dense::run`] splits `groups` of 32 rows × `pairs` of 32 columns into jobs:
/// each job takes a range of column pairs whose weights fit in [`L2_BUDGET`] and a
/// range of row groups, and walks its rows over its columns, so every weight byte comes
/// from memory once per call however many rows there are (a 3B model's prompt: a
/// layer's 45 MB once, not once per 32 rows). Ranges shrink until every thread has
/// several jobs.
pub(super) struct Plan {
    groups: usize,
    pairs: usize,
    groups_per_job: usize,
    pairs_per_job: usize,
}

impl Plan {
    /// `pair_bytes`: the weight bytes of one pair of columns.
    pub(super) fn new(groups: usize, pairs: usize, pair_bytes: usize) -> Self {
        let wanted = 8 * rayon::current_num_threads();
        let mut pairs_per_job = (L2_BUDGET / pair_bytes.max(1)).clamp(1, pairs);
        let column_jobs = pairs.div_ceil(pairs_per_job);
        let row_jobs = wanted.div_ceil(column_jobs).clamp(1, groups);
        if column_jobs * row_jobs < wanted {
            pairs_per_job = pairs.div_ceil(wanted.div_ceil(row_jobs)).max(1);
        }
        Plan { groups, pairs, groups_per_job: groups.div_ceil(row_jobs), pairs_per_job }
    }

    /// Whether every job takes all the columns, so a row group's whole rows are made by
    /// one job, one after another.
    pub(super) fn whole_rows(&self) -> bool {
        self.pairs_per_job >= self.pairs
    }

    pub(super) fn jobs(&self) -> usize {
        self.pairs.div_ceil(self.pairs_per_job) * self.groups.div_ceil(self.groups_per_job)
    }

    /// Job `job`'s blocks as (row group, column pair), each group walking the job's
    /// columns (their weights stay in L2 while the group's rows sit in L1).
    pub(super) fn blocks(&self, job: usize) -> impl Iterator<Item = (usize, usize)> {
        let (groups, pairs) = self.job(job);
        groups.flat_map(move |g| pairs.clone().map(move |p| (g, p)))
    }

    /// Job `job`'s row groups and column pairs; consecutive jobs share columns (rayon
    /// hands a thread a run of consecutive jobs).
    fn job(&self, job: usize) -> (std::ops::Range<usize>, std::ops::Range<usize>) {
        let row_jobs = self.groups.div_ceil(self.groups_per_job);
        let (columns, rows) = (job / row_jobs, job % row_jobs);
        let g = rows * self.groups_per_job;
        let p = columns * self.pairs_per_job;
        (g..(g + self.groups_per_job).min(self.groups), p..(p + self.pairs_per_job).min(self.pairs))
    }
}

/// A pair's 32 rounded columns (`padded` values each) as its tiles: per chunk of 32
/// inputs and half of 16 columns, the 16 columns' 64 bytes are 16 dwords of input pairs
/// each, and the tile's row `r` is pair `r` of every column — a 16 × 16 transpose of
/// dwords in registers (tile attention's, for its keys), where the scalar loop spent
/// most of a 3B bf16 load.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_columns(rounded: &[u16], padded: usize, tiles: &mut [u16]) {
    use std::arch::x86_64::*;
    let chunks = padded / EDGE;
    debug_assert!(rounded.len() >= EDGE * padded && tiles.len() >= chunks * 2 * TILE);
    // SAFETY: every load reads 64 bytes of one column inside `rounded`, every store a
    // tile row inside `tiles` (the caller's sizes).
    unsafe {
        for chunk in 0..chunks {
            for t in 0..2 {
                let mut columns = [_mm512_setzero_si512(); 16];
                for (c, column) in columns.iter_mut().enumerate() {
                    *column =
                        _mm512_loadu_si512(rounded.as_ptr().add((t * 16 + c) * padded + chunk * EDGE).cast());
                }
                let tile = tiles.as_mut_ptr().add((chunk * 2 + t) * TILE);
                for (r, pairs) in super::tile_attention::avx512::transpose(columns).iter().enumerate() {
                    _mm512_storeu_si512(tile.add(r * 32).cast(), *pairs);
                }
            }
        }
    }
}

/// Where a layer's weights come from when it keeps none ([`Bf16Dense::forward_from`]):
/// `source(pair, chunks, tiles)` writes column pair `pair`'s tiles for the inputs of
/// `chunks` (32 each), in this module's order, into `tiles`.
pub(crate) type Source<'a> = &'a (dyn Fn(usize, std::ops::Range<usize>, &mut [u16]) + Sync);

thread_local! {
    /// A job's tiles made by a [`Source`], kept between jobs and calls (at most about
    /// [`L2_BUDGET`] bytes).
    static JOB_TILES: std::cell::Cell<Bits> = const { std::cell::Cell::new(Bits::new()) };
}

/// `columns`' tiles for `chunks` from `source` (if any) into a job's buffer.
fn fill_job_tiles(
    source: Option<Source>,
    columns: std::ops::Range<usize>,
    chunks: std::ops::Range<usize>,
    local: &mut Bits,
) {
    let Some(source) = source else { return };
    let len = chunks.len() * 2 * TILE;
    // Only grown: every value read is written below first.
    if local.len() < columns.len() * len {
        local.resize(columns.len() * len);
    }
    for (i, pair) in columns.enumerate() {
        source(pair, chunks.clone(), &mut local[i * len..(i + 1) * len]);
    }
}

/// bf16 bits on 64-byte boundaries, as tiles load them best ([`Aligned`](super::aligned::Aligned)).
pub(crate) type Bits = super::aligned::Aligned<u16>;

/// A block's f32 results, where tiles store them: aligned as [`Bits`] are, for the
/// same reason.
#[repr(C, align(64))]
struct Sums([f32; EDGE * EDGE]);

/// Rows of a call up to which its product runs as AVX-512 BF16 dot products instead of
/// on tiles (decoding: one row a sequence), where the weights stream from memory.
const FEW_ROWS: usize = 4;

/// Where [`Bf16Dense::run`] puts its results.
pub(crate) enum Sink<'a> {
    /// `tokens × outputs` f32 (exactly that many), the bias added.
    F32(&'a mut [f32]),
    /// `GELU(x W^T + b)` rounded to bf16, laid out as the next layer's rows (what
    /// [`Bf16Dense::round_rows`] would make of it): BERT's feed-forward, whose
    /// intermediate then never exists in f32.
    GeluRows(&'a mut Bits),
    /// For a layer made by [`Bf16Dense::swiglu`]: `SiLU(gate) · up` rounded to bf16, laid
    /// out as the down layer's rows (its `outputs / 2` columns).
    SwiGluRows(&'a mut Bits),
    /// `x W^T + b` rounded to bf16, `tokens × outputs` (resized to exactly that): Q, K
    /// and V as tile attention reads them, never stored in f32.
    Bf16(&'a mut Bits),
}

/// A [`Sink`]'s buffer as the jobs share it.
#[derive(Clone, Copy)]
enum Out {
    F32(Shared),
    GeluRows(SharedBits),
    SwiGluRows(SharedBits),
    Bf16(SharedBits),
}

/// [`Shared`] for bf16 bits.
#[derive(Clone, Copy)]
pub(super) struct SharedBits(pub(super) *mut u16);
// SAFETY: jobs write disjoint elements (see `Bf16Dense::run`).
unsafe impl Send for SharedBits {}
unsafe impl Sync for SharedBits {}

impl SharedBits {
    /// # Safety
    /// `offset` is inside the buffer.
    pub(super) unsafe fn at(self, offset: usize) -> *mut u16 {
        // SAFETY: as the caller promises.
        unsafe { self.0.add(offset) }
    }
}

thread_local! {
    /// The calling thread's bf16 activations, kept between calls.
    static ROWS: std::cell::Cell<Bits> = const { std::cell::Cell::new(Bits::new()) };
}

/// f32 to bf16 bits, rounding to nearest even (NaN stays NaN).
#[inline(always)]
pub(super) fn round(v: f32) -> u16 {
    let b = v.to_bits();
    if b & 0x7fff_ffff > 0x7f80_0000 {
        ((b >> 16) | 0x40) as u16
    } else {
        ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
    }
}

#[inline(always)]
pub(super) fn widen(v: u16) -> f32 {
    f32::from_bits(u32::from(v) << 16)
}

/// Rounds a row to bf16 bits: AVX-512 BF16's conversion where the CPU has it (every
/// CPU with AMX does), else plain Rust. Both round to nearest even; the instruction
/// also flushes subnormals (below 1.2e-38) to zero.
pub(super) fn to_bf16(x: &[f32], out: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if has_avx512_bf16() {
        // SAFETY: the CPU has AVX-512 F and BF16.
        unsafe { avx512_bf16::round(x, out) };
        return;
    }
    to_bf16_plain(x, out);
}

dispatch!(
    fn to_bf16_plain => to_bf16_generic(x: &[f32], out: &mut [u16])
);

/// AVX-512 BF16 at an allowed level (with BW, which every such CPU has and the 4-bit
/// widening's permutes use).
#[cfg(target_arch = "x86_64")]
pub(super) fn has_avx512_bf16() -> bool {
    isa::active() >= Isa::Avx512
        && std::is_x86_feature_detected!("avx512bf16")
        && std::is_x86_feature_detected!("avx512bw")
}

#[cfg(not(target_arch = "x86_64"))]
pub(super) fn has_avx512_bf16() -> bool {
    false
}

/// AVX-512 BF16 pieces the tile path's kernels share (`finish_avx512`, tile attention).
#[cfg(target_arch = "x86_64")]
pub(super) mod avx512_bf16 {
    use std::arch::x86_64::*;

    /// The first `n` of 16 lanes (all when `n` ≥ 16): a masked load's or store's mask
    /// for a row's last, partial 16 values.
    #[inline(always)]
    pub(in super::super) fn lanes(n: usize) -> u16 {
        if n >= 16 { 0xffff } else { (1u16 << n) - 1 }
    }

    /// 16 f32 rounded to bf16 (nearest even), 16 bits each.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(in super::super) fn bits(v: __m512) -> __m256i {
        // SAFETY: both are 256 bits of plain data.
        unsafe { std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(v)) }
    }

    /// `c` rows `0..rows` (32 f32 each, 128 bytes apart) = `rows` (at most
    /// [`FEW_ROWS`](super::FEW_ROWS)) rows of `a` (bf16, `kp` apart) times one column
    /// pair's tiles `b` (`chunks` pairs of 16 × 16 tiles), by AVX-512 BF16 dot products:
    /// a tile row holds 16 columns' values for a pair of inputs, so one `vdpbf16ps` with
    /// the row's two activations broadcast adds both to 16 columns. A decoding step
    /// streams the weights once this way, where the tiles multiply 31 rows of padding
    /// with each (and decoding is bound by how fast the weights arrive).
    ///
    /// # Safety
    /// The CPU has AVX-512 F and BF16; `a` holds `rows` rows of `32 · chunks` values,
    /// `b` `chunks · 1024` values, `c` `rows` rows of 32 f32 128 bytes apart.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(in super::super) unsafe fn few_rows(
        a: *const u16,
        kp: usize,
        b: *const u16,
        chunks: usize,
        rows: usize,
        c: *mut f32,
    ) {
        // SAFETY: as the caller promises.
        unsafe {
            match rows {
                1 => few::<1>(a, kp, b, chunks, c),
                2 => few::<2>(a, kp, b, chunks, c),
                3 => few::<3>(a, kp, b, chunks, c),
                _ => few::<4>(a, kp, b, chunks, c),
            }
        }
    }

    /// [`few_rows`] for `R` rows, its accumulators in registers.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn few<const R: usize>(a: *const u16, kp: usize, b: *const u16, chunks: usize, c: *mut f32) {
        // SAFETY: as `few_rows`' caller promises; every read is inside `a` and `b`, every
        // write inside `c`.
        unsafe {
            let mut acc = [[_mm512_setzero_ps(); 2]; R];
            for chunk in 0..chunks {
                let tiles = b.add(chunk * 1024);
                for r in 0..16 {
                    let w0: __m512bh = std::mem::transmute(_mm512_loadu_si512(tiles.add(r * 32).cast()));
                    let w1: __m512bh =
                        std::mem::transmute(_mm512_loadu_si512(tiles.add(512 + r * 32).cast()));
                    for (j, acc) in acc.iter_mut().enumerate() {
                        let pair = a.add(j * kp + chunk * 32 + 2 * r).cast::<i32>().read_unaligned();
                        let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                        acc[0] = _mm512_dpbf16_ps(acc[0], x, w0);
                        acc[1] = _mm512_dpbf16_ps(acc[1], x, w1);
                    }
                }
            }
            for (j, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(c.add(j * 32), acc[0]);
                _mm512_storeu_ps(c.add(j * 32 + 16), acc[1]);
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) fn round(x: &[f32], out: &mut [u16]) {
        let n = x.len().min(out.len());
        let whole = n / 16 * 16;
        for i in (0..whole).step_by(16) {
            // SAFETY: i + 16 <= n, inside both slices.
            unsafe {
                let v = _mm512_loadu_ps(x.as_ptr().add(i));
                _mm256_storeu_si256(out.as_mut_ptr().add(i).cast(), bits(v));
            }
        }
        if whole < n {
            let k = lanes(n - whole);
            // SAFETY: the masked load and store touch only elements whole..n.
            unsafe {
                let v = _mm512_maskz_loadu_ps(k, x.as_ptr().add(whole));
                _mm256_mask_storeu_epi16(out.as_mut_ptr().add(whole).cast(), k, bits(v));
            }
        }
    }
}

#[inline(always)]
fn to_bf16_generic(x: &[f32], out: &mut [u16]) {
    for (o, &v) in out.iter_mut().zip(x) {
        *o = round(v);
    }
}

dispatch!(
    /// 32 rows of `a` (bf16, `kp` apart) times one column pair's tiles `b`, into `c`
    /// (32 × 32): the tile product in plain Rust.
    fn block => block_generic(a: &[u16], kp: usize, b: &[u16], c: &mut [f32; EDGE * EDGE])
);

#[inline(always)]
fn block_generic(a: &[u16], kp: usize, b: &[u16], c: &mut [f32; EDGE * EDGE]) {
    c.fill(0.0);
    for (chunk, tiles) in b.chunks_exact(2 * TILE).enumerate() {
        for (m, acc) in c.chunks_exact_mut(EDGE).enumerate() {
            let row = &a[m * kp + chunk * EDGE..m * kp + (chunk + 1) * EDGE];
            for r in 0..16 {
                let (a0, a1) = (widen(row[2 * r]), widen(row[2 * r + 1]));
                for (t, acc) in acc.chunks_exact_mut(16).enumerate() {
                    let w = &tiles[t * TILE + r * 32..t * TILE + (r + 1) * 32];
                    for (acc, w) in acc.iter_mut().zip(w.chunks_exact(2)) {
                        *acc += a0 * widen(w[0]) + a1 * widen(w[1]);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `pack` lays every weight where the layout says (column `n`'s input `k` at tile
    /// `(k / 32) · 2 + (n % 32) / 16` of pair `n / 32`, row `(k % 32) / 2`, column
    /// `n % 16`, lane `k % 2`), rounded, and zeros in the padding — through the register
    /// transpose where the CPU has it.
    #[test]
    fn pack_lays_each_weight_where_the_tile_layout_says() {
        for (inputs, outputs) in [(80, 48), (64, 96), (32, 16), (200, 33)] {
            let w: Vec<f32> = (0..inputs * outputs).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
            let layer = Bf16Dense::pack(inputs, outputs, None, |n, out| {
                out.copy_from_slice(&w[n * inputs..(n + 1) * inputs])
            });
            let (padded, pairs) = (inputs.div_ceil(EDGE) * EDGE, outputs.div_ceil(EDGE));
            let chunks = padded / EDGE;
            let mut want = vec![0u16; pairs * chunks * 2 * TILE];
            for n in 0..outputs {
                for k in 0..inputs {
                    let tile = (n / EDGE * chunks + k / EDGE) * 2 + (n % EDGE) / 16;
                    want[tile * TILE + (k % EDGE) / 2 * 32 + n % 16 * 2 + k % 2] = round(w[n * inputs + k]);
                }
            }
            assert!(layer.packed[..] == want[..], "inputs {inputs}, outputs {outputs}");
        }
    }

    /// The layer against f32 products of the same bf16-rounded values, on shapes with
    /// padding in rows, inputs and outputs, with the AMX kernel (where the CPU has it)
    /// and the plain one over the same layout.
    #[test]
    fn bf16_layers_match_the_products_of_their_rounded_values() {
        // (4200, 48, 40): inputs past 2 · SLICE · 32, so on AMX in slices (the last one
        // short), sums carried between them. Calls of up to FEW_ROWS rows (1, 3, 4) take
        // the dot-product path on AMX, the rest the tiles.
        let cases = [
            (384, 1152, 70),
            (30, 40, 7),
            (64, 32, 1),
            (100, 16, 33),
            (4200, 48, 40),
            (384, 96, 3),
            (2048, 64, 4),
        ];
        for (k, n, tokens) in cases {
            let w: Vec<f32> = (0..n * k).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.2).collect();
            let bias: Vec<f32> = (0..n).map(|i| i as f32 * 0.01).collect();
            let layer =
                Bf16Dense::pack(k, n, Some(bias.clone()), |col, out| out.copy_from_slice(&w[col * k..][..k]));
            let x: Vec<f32> = (0..tokens * k).map(|i| ((i * 31 % 97) as f32 / 48.0 - 1.0) * 3.0).collect();
            let mut want = vec![0f32; tokens * n];
            for t in 0..tokens {
                for c in 0..n {
                    let dot: f64 = (0..k)
                        .map(|kk| {
                            f64::from(widen(round(x[t * k + kk]))) * f64::from(widen(round(w[c * k + kk])))
                        })
                        .sum();
                    want[t * n + c] = dot as f32 + bias[c];
                }
            }
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let mut got = vec![0f32; tokens * n];
            layer.forward(&x, tokens, Sink::F32(&mut got));
            let mut rows = Bits::default();
            layer.round_rows(&x, tokens, &mut rows);
            let mut gelu_rows = Bits::default();
            layer.run(&rows, tokens, Sink::GeluRows(&mut gelu_rows));
            let next = n.div_ceil(EDGE) * EDGE;
            for t in 0..tokens {
                for c in 0..next {
                    let fused = widen(gelu_rows[t * next + c]);
                    let mut separate = [if c < n { got[t * n + c] } else { 0.0 }];
                    super::super::kernels::gelu(&mut separate);
                    let expected = widen(round(separate[0]));
                    assert!(
                        (fused - expected).abs() <= 1e-2 * expected.abs().max(1e-3),
                        "GELU rows: {fused} vs {expected}"
                    );
                }
            }
            let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 1e-5 * scale, "k {k}, n {n}: worst error {worst} against values up to {scale}");
            // The bf16 sink: the same sums rounded, bit for bit.
            let mut bits = Bits::default();
            layer.forward(&x, tokens, Sink::Bf16(&mut bits));
            assert_eq!(bits.len(), tokens * n, "k {k}, n {n}: tokens × outputs");
            for (i, (&b, &f)) in bits.iter().zip(&got).enumerate() {
                assert_eq!(b, round(f), "k {k}, n {n}: bf16 sink at {i}");
            }

            let kp = layer.padded;
            let mut rows = vec![0u16; tokens.div_ceil(EDGE) * EDGE * kp];
            for (row, x) in rows.chunks_mut(kp).zip(x.chunks(k)) {
                to_bf16(x, &mut row[..k]);
            }
            let mut scratch = [0f32; EDGE * EDGE];
            block(&rows[..EDGE * kp], kp, &layer.packed[..kp / EDGE * 2 * TILE], &mut scratch);
            for r in 0..tokens.min(EDGE) {
                for c in 0..n.min(EDGE) {
                    let plain = scratch[r * EDGE + c] + bias[c];
                    assert!(
                        (plain - got[r * n + c]).abs() <= 1e-5 * scale,
                        "k {k}, n {n}: plain path differs"
                    );
                }
            }
        }
    }

    fn layer(k: usize, n: usize, seed: usize) -> Bf16Dense {
        let bias: Vec<f32> = (0..n).map(|i| ((i + seed) % 7) as f32 * 0.1 - 0.3).collect();
        Bf16Dense::pack(k, n, Some(bias), |col, out| {
            for (i, o) in out.iter_mut().enumerate() {
                *o = (((col * 31 + i * 7 + seed) % 23) as f32 / 11.0 - 1.0) * 0.3;
            }
        })
    }

    fn run(layer: &Bf16Dense, x: &[f32], tokens: usize) -> Vec<f32> {
        let mut out = vec![0f32; tokens * layer.outputs()];
        layer.forward(x, tokens, Sink::F32(&mut out));
        out
    }

    /// Joined layers give each part's results, column for column.
    #[test]
    fn joined_layers_give_their_parts_results() {
        let (k, tokens) = (2048, 37);
        let x: Vec<f32> = (0..tokens * k).map(|i| ((i * 13 % 29) as f32 / 14.0 - 1.0) * 2.0).collect();
        let parts = [layer(k, 64, 1), layer(k, 32, 2), layer(k, 40, 3)];
        let joined = Bf16Dense::concat(&[&parts[0], &parts[1], &parts[2]]).expect("aligned parts join");
        let all = run(&joined, &x, tokens);
        let mut at = 0;
        for part in &parts {
            let alone = run(part, &x, tokens);
            for t in 0..tokens {
                assert_eq!(
                    &all[t * 136 + at..][..part.outputs()],
                    &alone[t * part.outputs()..][..part.outputs()]
                );
            }
            at += part.outputs();
        }
        assert!(Bf16Dense::concat(&[&parts[2], &parts[0]]).is_none(), "40 outputs then more do not join");
    }

    /// The fused gate and up layer's rows are `SiLU(gate) · up` of the separate layers'
    /// results, rounded to bf16, and the down layer reads them as rows of its own.
    #[test]
    fn a_fused_gate_and_up_give_silu_of_gate_times_up() {
        let (k, inter, tokens) = (96, 84, 45);
        let x: Vec<f32> = (0..tokens * k).map(|i| ((i * 17 % 31) as f32 / 15.0 - 1.0) * 2.0).collect();
        let (gate, up, down) = (layer(k, inter, 4), layer(k, inter, 5), layer(inter, 50, 6));
        let fused = Bf16Dense::swiglu(&gate, &up).expect("same shapes fuse");
        let mut rows = Bits::default();
        fused.forward(&x, tokens, Sink::SwiGluRows(&mut rows));
        let mut got = vec![0f32; tokens * 50];
        down.run(&rows, tokens, Sink::F32(&mut got));
        let (g, u) = (run(&gate, &x, tokens), run(&up, &x, tokens));
        let h: Vec<f32> = g.iter().zip(&u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
        let want = run(&down, &h, tokens);
        let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            // Both round the intermediate to bf16; only SiLU's exp differs (≈ 2e-7).
            assert!((a - b).abs() <= 1e-3 * scale, "{i}: {a} vs {b}");
        }
        assert!(Bf16Dense::swiglu(&gate, &down).is_none(), "different shapes do not fuse");
    }
}
