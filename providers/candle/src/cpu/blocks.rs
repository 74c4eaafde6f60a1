//! Linear layers over GGML's block-quantized weights exactly as a GGUF file stores them
//! (`Q4_1`, `Q8_0`): no re-quantization, so a model computes with the file's precision.
//!
//! The arithmetic is GGML's own: each row of activations is quantized per block of 32
//! inputs as the weights' partner type expects (`Q8_1` for `Q4_1`: a scale and the
//! scaled sum; `Q8_0` for `Q8_0`), scales rounded to f16 as GGML stores them; a block's
//! product is an exact integer sum times the two scales, plus (for `Q4_1`) the block's
//! minimum times the activations' scaled sum. So results match llama.cpp's CPU matmul up
//! to the order of float additions.
//!
//! The kernel is AVX-512 VNNI's `vpdpbusd` (unsigned × signed bytes). Weights are
//! re-laid at load, per block of 16 output columns and per block of 32 inputs, into one
//! record read front to back: `Q4_1` as four 64-byte vectors whose bytes are the file's
//! own (low nibble input `i`, high nibble input `i + 16` — the unsigned operand after a
//! mask and a shift), then the 16 columns' f16 scales and mins; `Q8_0` as eight 64-byte
//! vectors of signed weights, the f16 scales, and `-128 Σ q` per column (the activations
//! go in offset by 128 to be the unsigned operand; the correction starts each block's
//! sum). A CPU without VNNI runs the same arithmetic in plain Rust (slow, for
//! correctness only). On AMX, `Q8_0` calls of 16 rows or more (many decoding streams,
//! a prompt) take their sums from int8 tiles (`amx_tiles`), bit for bit the same.

use half::f16;
use rayon::prelude::*;

use super::bf16::{Bf16Dense, Sink, TILE, has_avx512_bf16, round};
use super::isa::{self, Isa};
use super::tiles::{BLOCK, Call};

/// Inputs per GGML block.
const QK: usize = 32;
/// Rows per kernel call.
const ROWS: usize = 4;
/// Rows of an AMX call: one tile of activations.
const AMX_ROWS: usize = 16;
/// Rows from which a call's last partial tile runs on AMX, filled up with zero rows.
const AMX_PAD_FROM: usize = 8;

/// A GGML block type kiln runs as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    /// Per 32 inputs: f16 scale `d`, f16 min `m`, 32 unsigned nibbles: `w = d q + m`.
    Q4_1,
    /// Per 32 inputs: f16 scale `d`, 32 signed bytes: `w = d q`.
    Q8_0,
}

impl Format {
    /// Bytes of one block in the file.
    fn file_block(self) -> usize {
        match self {
            Format::Q4_1 => 20,
            Format::Q8_0 => 34,
        }
    }

    /// Where a record's 16 f16 scales start (after the weight vectors).
    fn scales_at(self) -> usize {
        match self {
            Format::Q4_1 => 256,
            Format::Q8_0 => 512,
        }
    }

    /// Bytes a matrix of `elements` weights takes once re-laid.
    pub(crate) fn bytes(self, elements: usize) -> usize {
        elements / (BLOCK * QK) * self.record()
    }

    /// Bytes of one re-laid record (16 columns × 32 inputs).
    fn record(self) -> usize {
        match self {
            Format::Q4_1 => 256 + 32 + 32,
            Format::Q8_0 => 512 + 32 + 64,
        }
    }
}

/// A linear layer (no bias) over block-quantized weights.
pub(crate) struct BlockDense {
    format: Format,
    /// `[outputs / 16][inputs / 32]` records (module docs).
    packed: Vec<u8>,
    inputs: usize,
    outputs: usize,
}

impl BlockDense {
    /// Re-lays `raw`, a GGUF tensor of `format` with `n` output rows of `k` inputs;
    /// `None` when `n` is not a multiple of 16, `k` not of 32, or `raw` not that size.
    pub(crate) fn from_file(format: Format, raw: &[u8], k: usize, n: usize) -> Option<Self> {
        let nb = k / QK;
        let fb = format.file_block();
        if !n.is_multiple_of(BLOCK) || !k.is_multiple_of(QK) || raw.len() != n * nb * fb {
            return None;
        }
        let rec = format.record();
        let mut packed = vec![0u8; n / BLOCK * nb * rec];
        packed.par_chunks_mut(nb * rec).enumerate().for_each(|(cb, out)| {
            for (b, out) in out.chunks_mut(rec).enumerate() {
                for c in 0..BLOCK {
                    let src = &raw[((cb * BLOCK + c) * nb + b) * fb..][..fb];
                    let (d, rest) = src.split_at(2);
                    out[format.scales_at() + 2 * c..][..2].copy_from_slice(d);
                    match format {
                        Format::Q4_1 => {
                            let (m, qs) = rest.split_at(2);
                            out[288 + 2 * c..][..2].copy_from_slice(m);
                            for j in 0..4 {
                                out[j * 64 + c * 4..][..4].copy_from_slice(&qs[4 * j..4 * j + 4]);
                            }
                        }
                        Format::Q8_0 => {
                            for g in 0..8 {
                                out[g * 64 + c * 4..][..4].copy_from_slice(&rest[4 * g..4 * g + 4]);
                            }
                            let sum: i32 = rest.iter().map(|&q| i32::from(q as i8)).sum();
                            out[544 + 4 * c..][..4].copy_from_slice(&(-128 * sum).to_le_bytes());
                        }
                    }
                }
            }
        });
        Some(BlockDense { format, packed, inputs: k, outputs: n })
    }

    /// `parts` side by side as one layer over the same inputs (a layer's Q, K and V, or
    /// its gate and up): its outputs are theirs one after another. The records are per
    /// 16 output columns, so the packed parts simply follow each other. One call then
    /// quantizes the activations once and wakes the threads once, where the parts took
    /// one each. `None` unless the parts share their format and inputs.
    pub(crate) fn concat(parts: &[&BlockDense]) -> Option<Self> {
        let (first, rest) = parts.split_first()?;
        if rest.iter().any(|p| p.format != first.format || p.inputs != first.inputs) {
            return None;
        }
        Some(BlockDense {
            format: first.format,
            packed: parts.iter().flat_map(|p| p.packed.iter().copied()).collect(),
            inputs: first.inputs,
            outputs: parts.iter().map(|p| p.outputs).sum(),
        })
    }

    /// Input features.
    pub(crate) fn inputs(&self) -> usize {
        self.inputs
    }

    /// Output features.
    pub(crate) fn outputs(&self) -> usize {
        self.outputs
    }

    /// `out = x W^T` for `tokens` rows of `x`.
    pub(crate) fn forward(&self, x: &[f32], tokens: usize, out: &mut Vec<f32>) {
        let (k, n) = (self.inputs, self.outputs);
        let nb = k / QK;
        debug_assert_eq!(x.len(), tokens * k);
        // Rows run on AMX tiles: whole tiles of 16, and a last one of `AMX_PAD_FROM` rows
        // or more filled up with rows of zeros (a tile costs the same however many rows
        // it holds); the rest on the block kernel. Both give the same integer sums and
        // take the same float steps after them, so a row's results do not depend on how
        // many rows share its call.
        let tiled = match self.runs_on_amx() {
            false => 0,
            true if tokens % AMX_ROWS >= AMX_PAD_FROM => tokens.next_multiple_of(AMX_ROWS),
            true => tokens / AMX_ROWS * AMX_ROWS,
        };
        let rows = tokens.max(tiled);
        super::with_taken(&ACTIVATIONS, |a| {
            a.q.resize(rows * k, 0);
            a.d.resize(rows * nb, 0.0);
            a.s.resize(rows * nb, 0.0);
            a.q[tokens * k..].fill(0);
            a.d[tokens * nb..].fill(0.0);
            a.s[tokens * nb..].fill(0.0);
            let format = self.format;
            a.q.par_chunks_mut(k)
                .zip(x.par_chunks(k))
                .zip(a.d.par_chunks_mut(nb).zip(a.s.par_chunks_mut(nb)))
                .for_each(|((q, x), (d, s))| quantize_row(format, x, q, d, s));
            let vnni = super::int8::QDense::fast();
            let a = &*a;
            if tiled == 0 {
                super::tiles::run(tokens, n, ROWS, 4, out, |call, out| {
                    let tile = Tile { layer: self, a, call };
                    tile.run(vnni, out);
                });
                return;
            }
            out.truncate(rows * n);
            out.resize(rows * n, 0.0);
            self.run_amx(a, tiled, super::Shared(out.as_mut_ptr()));
            out.truncate(tokens * n);
            if tiled < tokens {
                let mut rest = Vec::new();
                super::tiles::run(tokens - tiled, n, ROWS, 4, &mut rest, |call, out| {
                    let call = Call { row0: call.row0 + tiled, ..call };
                    Tile { layer: self, a, call }.run(vnni, out);
                });
                out[tiled * n..].copy_from_slice(&rest);
            }
        });
    }

    /// Whether calls of 16 rows or more run on AMX int8 tiles here: `Q8_0` layers on an
    /// AMX level (`amx_tiles` says why not `Q4_1`).
    fn runs_on_amx(&self) -> bool {
        self.format == Format::Q8_0 && isa::active() >= Isa::Amx
    }

    /// Rows `0..rows` (a multiple of 16) of `a` times every column, into `out` (rows of
    /// `outputs`), on AMX tiles: jobs of 16 rows by a run of column blocks, split so both
    /// cores have several.
    fn run_amx(&self, a: &Activations, rows: usize, out: super::Shared) {
        let groups = rows / AMX_ROWS;
        let blocks = self.outputs / BLOCK;
        let threads = rayon::current_num_threads();
        let splits = (threads * 4).div_ceil(groups).clamp(1, blocks);
        let per = blocks.div_ceil(splits);
        let jobs: Vec<(usize, usize)> =
            (0..groups).flat_map(|g| (0..blocks).step_by(per).map(move |first| (g, first))).collect();
        jobs.into_par_iter().for_each(|(group, first)| {
            let _tiles = super::amx::TileConfig::load();
            let end = (first + per).min(blocks);
            // SAFETY: the level is AMX (`runs_on_amx`), and `_tiles` configured this thread's
            // tiles; rows `16 group..16 group + 16` are quantized in `a`; blocks
            // `first..end` are the layer's; this job alone writes those rows' columns of
            // those blocks in `out` (`rows × outputs`).
            #[cfg(target_arch = "x86_64")]
            unsafe {
                amx_tiles::rows16(self, a, group * AMX_ROWS, first..end, out)
            };
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (group, end, out);
        });
    }
}

impl BlockDense {
    /// `out = x W^T` for `tokens` rows on AMX tiles: the weights widened from their
    /// blocks (`d q + m`, GGML's dequantization, in f32) and rounded to bf16 into a
    /// scratch layer in [`Bf16Dense`]'s tile order, the rows rounded to bf16 — a prompt's
    /// arithmetic in bf16 with f32 sums, as `model.dtype = "bf16"` computes. For many
    /// rows that is several times faster than [`BlockDense::forward`], which reads the
    /// weights once a call but does a row's products one block at a time; widening a
    /// layer costs about what a few rows through the block kernel do. The caller checks
    /// [`BlockDense::widens`].
    pub(crate) fn forward_widened(&self, x: &[f32], tokens: usize, out: &mut Vec<f32>) {
        let layer = Bf16Dense::shape(self.inputs, self.outputs);
        out.resize(tokens * self.outputs, 0.0);
        let fast = has_avx512_bf16();
        layer.forward_from(x, tokens, Sink::F32(out), &|pair, chunks, tiles| {
            self.widen(pair, chunks, tiles, fast)
        });
    }

    /// Whether [`BlockDense::forward_widened`] runs on tiles here (AMX).
    pub(crate) fn widens() -> bool {
        isa::active() >= Isa::Amx
    }

    /// Column pair `pair`'s weights for the inputs of `chunks` (32 each) in
    /// [`Bf16Dense`]'s tile order, into `tiles`: a record (16 columns × 32 inputs) is
    /// exactly one tile — columns `16 t` of the pair, inputs of one chunk — so each
    /// record widens into its own 1 KiB. A pair's missing half (outputs an odd multiple
    /// of 16) is zeros, as [`Bf16Dense::pack`] pads. `fast`: [`has_avx512_bf16`].
    fn widen(&self, pair: usize, chunks: std::ops::Range<usize>, tiles: &mut [u16], fast: bool) {
        let (nb, rec, blocks) = (self.inputs / QK, self.format.record(), self.outputs / BLOCK);
        for (i, tile) in tiles.chunks_exact_mut(TILE).take(chunks.len() * 2).enumerate() {
            let (chunk, half) = (chunks.start + i / 2, i % 2);
            let cb = pair * 2 + half;
            if cb >= blocks {
                tile.fill(0);
                continue;
            }
            let record = &self.packed[(cb * nb + chunk) * rec..][..rec];
            #[cfg(target_arch = "x86_64")]
            if fast {
                // SAFETY: the CPU has AVX-512 F, BW and BF16 (`has_avx512_bf16`);
                // `record` is one whole record and `tile` one whole tile.
                unsafe { widen_avx512::record(self.format, record, tile) };
                continue;
            }
            let _ = fast;
            widen_record(self.format, record, tile);
        }
    }
}

/// One record widened into one tile (plain Rust): tile row `r` holds inputs `2r` and
/// `2r + 1` of the 16 columns, interleaved.
fn widen_record(format: Format, record: &[u8], tile: &mut [u16]) {
    let f16_at = |i: usize| f16::from_le_bytes([record[i], record[i + 1]]).to_f32();
    for c in 0..BLOCK {
        let d = f16_at(format.scales_at() + 2 * c);
        for i in 0..QK {
            let w = match format {
                Format::Q4_1 => {
                    let byte = record[(i % 16) / 4 * 64 + c * 4 + i % 4];
                    let q = if i < 16 { byte & 15 } else { byte >> 4 };
                    d * f32::from(q) + f16_at(288 + 2 * c)
                }
                Format::Q8_0 => d * f32::from(record[i / 4 * 64 + c * 4 + i % 4] as i8),
            };
            tile[i / 2 * 32 + c * 2 + i % 2] = round(w);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod widen_avx512 {
    use std::arch::x86_64::*;

    use super::Format;

    /// [`super::widen_record`] in registers: a record's 64-byte vectors hold one dword
    /// of each of the 16 columns, so shifting and masking one gives an input of all 16
    /// columns at once; two such inputs, widened and rounded, interleave into a tile row
    /// with one permute.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn record(format: Format, record: &[u8], tile: &mut [u16]) {
        let (r, t) = (record.as_ptr(), tile.as_mut_ptr());
        // Lane 2c takes column c's first input, lane 2c + 1 its second.
        let interleave = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3,
            18, 2, 17, 1, 16, 0,
        );
        // SAFETY (all loads and stores): offsets inside one record (Q4_1: 320 bytes,
        // Q8_0: 608) and one tile (16 rows of 64 bytes).
        unsafe {
            let d = _mm512_cvtph_ps(_mm256_loadu_si256(r.add(format.scales_at()).cast()));
            let row = |index: usize, a: __m512, b: __m512| {
                let pairs = _mm512_cvtne2ps_pbh(b, a);
                let pairs = std::mem::transmute::<__m512bh, __m512i>(pairs);
                _mm512_storeu_si512(t.add(index * 32).cast(), _mm512_permutexvar_epi16(interleave, pairs));
            };
            match format {
                Format::Q4_1 => {
                    let m = _mm512_cvtph_ps(_mm256_loadu_si256(r.add(288).cast()));
                    let nibble = _mm512_set1_epi32(15);
                    let widen = |v: __m512i, shift: u32| {
                        let q =
                            _mm512_and_si512(_mm512_srlv_epi32(v, _mm512_set1_epi32(shift as i32)), nibble);
                        _mm512_add_ps(_mm512_mul_ps(d, _mm512_cvtepi32_ps(q)), m)
                    };
                    // Vector j holds bytes 4j..4j+4 of each column's 16: byte p is
                    // input 4j + p (low nibble) and input 4j + p + 16 (high nibble).
                    for j in 0..4 {
                        let v = _mm512_loadu_si512(r.add(64 * j).cast());
                        for half in 0..2u32 {
                            for high in 0..2u32 {
                                let shift = 16 * half + 4 * high;
                                row(
                                    2 * j + half as usize + 8 * high as usize,
                                    widen(v, shift),
                                    widen(v, shift + 8),
                                );
                            }
                        }
                    }
                }
                Format::Q8_0 => {
                    // Byte p of a dword, sign-extended: up to the top, then back down.
                    let widen = |v: __m512i, p: u32| {
                        let up = _mm512_sllv_epi32(v, _mm512_set1_epi32(24 - 8 * p as i32));
                        _mm512_mul_ps(d, _mm512_cvtepi32_ps(_mm512_srai_epi32::<24>(up)))
                    };
                    // Vector g holds inputs 4g..4g+4 of each column.
                    for g in 0..8 {
                        let v = _mm512_loadu_si512(r.add(64 * g).cast());
                        row(2 * g, widen(v, 0), widen(v, 1));
                        row(2 * g + 1, widen(v, 2), widen(v, 3));
                    }
                }
            }
        }
    }
}

/// A step's quantized activations: per row, `k` bytes (`Q8_1`: signed; `Q8_0`: offset
/// by 128, unsigned), and per block its scale and (`Q8_1`) scaled sum.
#[derive(Default)]
struct Activations {
    q: Vec<u8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

thread_local! {
    /// The calling thread's quantized activations, kept between calls.
    static ACTIVATIONS: std::cell::Cell<Activations> = std::cell::Cell::new(Activations::default());
}

dispatch!(
    /// One row, as GGML's `quantize_row_q8_1` / `quantize_row_q8_0` do on x86: per block
    /// `d = max|x| / 127`, `q = round(x / d)` (ties to even); `d` and (`Q8_1`) `d Σ q`
    /// kept as the f16 values GGML stores.
    fn quantize_row => quantize_row_generic(format: Format, x: &[f32], q: &mut [u8], d: &mut [f32], s: &mut [f32])
);

#[inline(always)]
fn quantize_row_generic(format: Format, x: &[f32], q: &mut [u8], d: &mut [f32], s: &mut [f32]) {
    // Adding 1.5·2²³ rounds to the nearest integer (ties to even) and leaves it in the
    // low mantissa bits, two's complement in the low byte: no float-to-int conversion,
    // which the compiler would not vectorise. `Q8_0`'s offset of 128 rides along.
    const ROUND: f32 = 12_582_912.0;
    let offset = match format {
        Format::Q4_1 => 0,
        Format::Q8_0 => 128,
    };
    let round = ROUND + offset as f32;
    for (((x, q), d), s) in x.chunks_exact(QK).zip(q.chunks_exact_mut(QK)).zip(d).zip(s) {
        let mut lanes = [0f32; 16];
        for half in x.chunks_exact(16) {
            for (m, v) in lanes.iter_mut().zip(half) {
                *m = if v.abs() > *m { v.abs() } else { *m };
            }
        }
        let max = lanes.iter().fold(0f32, |m, &v| if v > m { v } else { m });
        let scale = max / 127.0;
        let inv = if max > 0.0 { 127.0 / max } else { 0.0 };
        let mut sum = 0i32;
        for (q, v) in q.iter_mut().zip(x) {
            let bits = (v * inv + round).to_bits() as i32;
            *q = bits as u8;
            sum += bits - ROUND.to_bits() as i32;
        }
        sum -= offset * QK as i32;
        *d = f16::from_f32(scale).to_f32();
        *s = f16::from_f32(scale * sum as f32).to_f32();
    }
}

/// One kernel call's rows (from `a`) times its column blocks.
struct Tile<'a> {
    layer: &'a BlockDense,
    a: &'a Activations,
    call: Call,
}

impl Tile<'_> {
    fn run(&self, vnni: bool, out: &mut [f32]) {
        let c = self.call;
        debug_assert!(c.col0 <= c.first * BLOCK);
        debug_assert!(out.len() >= (c.rows - 1) * c.stride + (c.first + c.blocks) * BLOCK - c.col0);
        #[cfg(target_arch = "x86_64")]
        if vnni {
            // SAFETY: the CPU has AVX-512 F/BW and VNNI (`QDense::fast`).
            unsafe { vnni::tile(self, out) };
            return;
        }
        let _ = vnni;
        self.plain(out);
    }

    /// The same sums as the kernel, in the same order, one column at a time.
    fn plain(&self, out: &mut [f32]) {
        let (l, c) = (self.layer, self.call);
        let (k, nb, rec) = (l.inputs, l.inputs / QK, l.format.record());
        let f16_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
        for r in 0..c.rows {
            let row = c.row0 + r;
            let x = &self.a.q[row * k..(row + 1) * k];
            for cb in c.first..c.first + c.blocks {
                for col in 0..BLOCK {
                    let mut acc = 0f32;
                    for b in 0..nb {
                        let w = &l.packed[(cb * nb + b) * rec..][..rec];
                        let x = &x[b * QK..(b + 1) * QK];
                        let (da, sa) = (self.a.d[row * nb + b], self.a.s[row * nb + b]);
                        match l.format {
                            Format::Q4_1 => {
                                let mut sum = 0i32;
                                for j in 0..4 {
                                    for i in 0..4 {
                                        let byte = w[j * 64 + col * 4 + i];
                                        sum += i32::from(byte & 15) * i32::from(x[4 * j + i] as i8);
                                        sum += i32::from(byte >> 4) * i32::from(x[16 + 4 * j + i] as i8);
                                    }
                                }
                                let (dw, mw) = (f16_at(w, 256 + 2 * col), f16_at(w, 288 + 2 * col));
                                acc = (sum as f32).mul_add(dw * da, acc);
                                acc = mw.mul_add(sa, acc);
                            }
                            Format::Q8_0 => {
                                let corr = i32::from_le_bytes(w[544 + 4 * col..][..4].try_into().unwrap());
                                let mut sum = corr;
                                for g in 0..8 {
                                    for i in 0..4 {
                                        let wq = i32::from(w[g * 64 + col * 4 + i] as i8);
                                        sum += wq * i32::from(x[4 * g + i]);
                                    }
                                }
                                acc = (sum as f32).mul_add(f16_at(w, 512 + 2 * col) * da, acc);
                            }
                        }
                    }
                    out[r * c.stride + cb * BLOCK + col - c.col0] = acc;
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    use super::{BLOCK, Format, QK, Tile};

    /// Dispatches on the tile's rows and column blocks to a kernel with both fixed, so
    /// its accumulators stay in registers (at most 8 of each kind).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(super) fn tile(t: &Tile, out: &mut [f32]) {
        macro_rules! shapes {
            ($kernel:ident) => {
                match (t.call.rows, t.call.blocks) {
                    (1, 1) => $kernel::<1, 1>(t, out),
                    (1, 2) => $kernel::<1, 2>(t, out),
                    (1, 3) => $kernel::<1, 3>(t, out),
                    (1, _) => $kernel::<1, 4>(t, out),
                    (2, 1) => $kernel::<2, 1>(t, out),
                    (2, 2) => $kernel::<2, 2>(t, out),
                    (2, 3) => $kernel::<2, 3>(t, out),
                    (2, _) => $kernel::<2, 4>(t, out),
                    (3, 1) => $kernel::<3, 1>(t, out),
                    (3, _) => $kernel::<3, 2>(t, out),
                    (_, 1) => $kernel::<4, 1>(t, out),
                    _ => $kernel::<4, 2>(t, out),
                }
            };
        }
        // A tile of 3 or 4 rows takes 2 column blocks at a time: split wider calls.
        if t.call.rows > 2 && t.call.blocks > 2 {
            let mut call = t.call;
            while call.blocks > 0 {
                let part = Tile { call: super::Call { blocks: call.blocks.min(2), ..call }, ..*t };
                tile(&part, out);
                call.first += 2;
                call.blocks = call.blocks.saturating_sub(2);
            }
            return;
        }
        match t.layer.format {
            Format::Q4_1 => shapes!(q4_1),
            Format::Q8_0 => shapes!(q8_0),
        }
    }

    /// Stores `acc[r][b]` at row `r`, column block `first + b`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn store<const R: usize, const B: usize>(t: &Tile, acc: &[[__m512; B]; R], out: &mut [f32]) {
        let c = t.call;
        for (r, row) in acc.iter().enumerate() {
            for (b, v) in row.iter().enumerate() {
                let at = r * c.stride + (c.first + b) * BLOCK - c.col0;
                debug_assert!(at + BLOCK <= out.len());
                // SAFETY: `at + 16 <= out.len()` (checked by `Tile::run`).
                unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(at), *v) };
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    fn q4_1<const R: usize, const B: usize>(t: &Tile, out: &mut [f32]) {
        let (l, c) = (t.layer, t.call);
        let (k, nb, rec) = (l.inputs, l.inputs / QK, l.format.record());
        assert!(c.row0 + R <= t.a.d.len() / nb && (c.first + B) * nb * rec <= l.packed.len());
        let mut acc = [[_mm512_setzero_ps(); B]; R];
        let nibble = _mm512_set1_epi8(15);
        // SAFETY: records `first..first + B` of every input block lie in `packed`, rows
        // `row0..row0 + R` in the activations (asserted above).
        unsafe {
            let w0 = l.packed.as_ptr().add(c.first * nb * rec);
            let x0 = t.a.q.as_ptr().add(c.row0 * k);
            for b in 0..nb {
                let mut sums = [[_mm512_setzero_si512(); B]; R];
                for j in 0..4 {
                    let mut lo = [_mm512_setzero_si512(); B];
                    let mut hi = [_mm512_setzero_si512(); B];
                    for cb in 0..B {
                        let v = _mm512_loadu_si512(w0.add((cb * nb + b) * rec + j * 64).cast());
                        lo[cb] = _mm512_and_si512(v, nibble);
                        hi[cb] = _mm512_and_si512(_mm512_srli_epi16::<4>(v), nibble);
                    }
                    for (r, sums) in sums.iter_mut().enumerate() {
                        let x = x0.add(r * k + b * QK + 4 * j);
                        let xl = _mm512_set1_epi32(x.cast::<i32>().read_unaligned());
                        let xh = _mm512_set1_epi32(x.add(16).cast::<i32>().read_unaligned());
                        for cb in 0..B {
                            sums[cb] = _mm512_dpbusd_epi32(sums[cb], lo[cb], xl);
                            sums[cb] = _mm512_dpbusd_epi32(sums[cb], hi[cb], xh);
                        }
                    }
                }
                for cb in 0..B {
                    let w = w0.add((cb * nb + b) * rec);
                    let dw = _mm512_cvtph_ps(_mm256_loadu_si256(w.add(256).cast()));
                    let mw = _mm512_cvtph_ps(_mm256_loadu_si256(w.add(288).cast()));
                    for r in 0..R {
                        let at = (c.row0 + r) * nb + b;
                        let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*t.a.d.get_unchecked(at)));
                        acc[r][cb] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[r][cb]), scale, acc[r][cb]);
                        acc[r][cb] =
                            _mm512_fmadd_ps(mw, _mm512_set1_ps(*t.a.s.get_unchecked(at)), acc[r][cb]);
                    }
                }
            }
        }
        store(t, &acc, out);
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    fn q8_0<const R: usize, const B: usize>(t: &Tile, out: &mut [f32]) {
        let (l, c) = (t.layer, t.call);
        let (k, nb, rec) = (l.inputs, l.inputs / QK, l.format.record());
        assert!(c.row0 + R <= t.a.d.len() / nb && (c.first + B) * nb * rec <= l.packed.len());
        let mut acc = [[_mm512_setzero_ps(); B]; R];
        // SAFETY: as in `q4_1`.
        unsafe {
            let w0 = l.packed.as_ptr().add(c.first * nb * rec);
            let x0 = t.a.q.as_ptr().add(c.row0 * k);
            for b in 0..nb {
                let mut sums = [[_mm512_setzero_si512(); B]; R];
                for cb in 0..B {
                    let corr = _mm512_loadu_si512(w0.add((cb * nb + b) * rec + 544).cast());
                    for row in sums.iter_mut() {
                        row[cb] = corr;
                    }
                }
                for g in 0..8 {
                    let mut w = [_mm512_setzero_si512(); B];
                    for (cb, w) in w.iter_mut().enumerate() {
                        *w = _mm512_loadu_si512(w0.add((cb * nb + b) * rec + g * 64).cast());
                    }
                    for (r, sums) in sums.iter_mut().enumerate() {
                        let x = x0.add(r * k + b * QK + 4 * g);
                        let xb = _mm512_set1_epi32(x.cast::<i32>().read_unaligned());
                        for cb in 0..B {
                            sums[cb] = _mm512_dpbusd_epi32(sums[cb], xb, w[cb]);
                        }
                    }
                }
                for cb in 0..B {
                    let dw = _mm512_cvtph_ps(_mm256_loadu_si256(w0.add((cb * nb + b) * rec + 512).cast()));
                    for r in 0..R {
                        let at = (c.row0 + r) * nb + b;
                        let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*t.a.d.get_unchecked(at)));
                        acc[r][cb] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[r][cb]), scale, acc[r][cb]);
                    }
                }
            }
        }
        store(t, &acc, out);
    }
}

/// `Q8_0` block products on AMX int8 tiles, 16 rows at a time. A tile row is 64 bytes
/// and a block 32 inputs, so each block's activations are copied once a call into a
/// tile of their own whose other half is zeros: with it, a weight tile's rows 8–15 add
/// nothing, whatever they hold, so the weights load straight from their records (eight
/// rows of 64 bytes, then whatever follows) and each block's sums come out alone, exact
/// as `vpdpbusd`'s. Then the VNNI kernel's float steps in its order: the results are bit
/// for bit the block kernel's. A column block goes in two passes — products (four
/// blocks at a time into four sum tiles, so their latencies overlap), then the float
/// steps — so no vector load waits on a tile store just made. (`Q4_1` on tiles measured
/// no faster than the VNNI kernel at 16 rows: its nibbles must be split into a weight
/// tile first, and it has a second float step per block.)
#[cfg(target_arch = "x86_64")]
mod amx_tiles {
    use std::arch::x86_64::*;

    use super::{AMX_ROWS, Activations, BLOCK, BlockDense, QK};
    use crate::cpu::Shared;

    /// A thread's tiles in memory, kept between calls: per block of inputs an
    /// activation tile (16 rows: the block's 32 bytes, then 32 zeros, which stay zeros)
    /// and a tile of i32 sums (16 × 16); one weight tile for the layer's last record,
    /// which has nothing after it to read.
    #[derive(Default)]
    struct Scratch {
        last: Aligned,
        sums: Vec<Aligned>,
        activations: Vec<Aligned>,
    }

    /// One tile's 1 KiB, on a 64-byte boundary.
    #[repr(C, align(64))]
    #[derive(Clone)]
    struct Aligned([u8; 1024]);

    impl Default for Aligned {
        fn default() -> Self {
            Aligned([0; 1024])
        }
    }

    thread_local! {
        /// Kept between calls: the zero halves are written once.
        static SCRATCH: std::cell::Cell<Scratch> = std::cell::Cell::new(Scratch::default());
    }

    /// Rows `row0..row0 + 16` of `a` times column blocks `blocks` of a `Q8_0` layer, into
    /// `out` (rows of `layer.outputs`).
    ///
    /// # Safety
    /// The CPU runs AMX and AVX-512 F/BW and the thread's tiles are configured
    /// (`TileConfig::load`); the layer is `Q8_0`; `a` holds rows `row0..row0 + 16`;
    /// `blocks` are the layer's; `out` has `row0 + 16` rows of `layer.outputs` and no one
    /// else writes those rows' columns of `blocks` meanwhile.
    pub(super) unsafe fn rows16(
        layer: &BlockDense,
        a: &Activations,
        row0: usize,
        blocks: std::ops::Range<usize>,
        out: Shared,
    ) {
        debug_assert_eq!(layer.format, super::Format::Q8_0);
        let mut scratch = SCRATCH.take();
        let nb = layer.inputs / QK;
        for tiles in [&mut scratch.sums, &mut scratch.activations] {
            if tiles.len() < nb {
                tiles.resize(nb, Aligned::default());
            }
        }
        // SAFETY: as the caller promises.
        unsafe { run(layer, a, row0, blocks, out, &mut scratch) };
        SCRATCH.set(scratch);
    }

    /// [`rows16`], its scratch taken.
    ///
    /// # Safety
    /// As [`rows16`]; `scratch` has a sum and an activation tile for every block.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn run(
        layer: &BlockDense,
        a: &Activations,
        row0: usize,
        blocks: std::ops::Range<usize>,
        out: Shared,
        scratch: &mut Scratch,
    ) {
        let (k, n, nb, rec) = (layer.inputs, layer.outputs, layer.inputs / QK, layer.format.record());
        debug_assert!(a.q.len() >= (row0 + AMX_ROWS) * k);
        // SAFETY: as the caller promises; every record read is inside `packed` (a
        // record's weights and the 512 bytes after them, but for the layer's last record,
        // which is copied), every activation read inside `a.q`, every store inside `out`
        // or the scratch.
        unsafe {
            let xs = scratch.activations.as_mut_ptr().cast::<u8>();
            for r in 0..AMX_ROWS {
                let x = a.q.as_ptr().add((row0 + r) * k);
                for bb in 0..nb {
                    let v = _mm256_loadu_si256(x.add(bb * QK).cast());
                    _mm256_store_si256(xs.add(bb * 1024 + r * 64).cast(), v);
                }
            }
            let cs = scratch.sums.as_mut_ptr().cast::<u8>();
            let last = layer.packed.as_ptr().add(layer.packed.len() - rec);
            std::ptr::copy_nonoverlapping(last, scratch.last.0.as_mut_ptr(), 512);
            let last_tile = scratch.last.0.as_ptr();
            for cb in blocks {
                let records = layer.packed.as_ptr().add(cb * nb * rec);
                let w = |bb: usize| {
                    let record = records.add(bb * rec);
                    if record == last { last_tile } else { record }
                };
                // The activations are offset to unsigned, the weights signed: `tdpbusd`.
                let fours = nb / 4 * 4;
                for bb in (0..fours).step_by(4) {
                    std::arch::asm!(
                        "tilezero tmm0",
                        "tilezero tmm1",
                        "tilezero tmm2",
                        "tilezero tmm3",
                        "tileloadd tmm4, [{a0} + {s}*1]",
                        "tileloadd tmm6, [{w0} + {s}*1]",
                        "tdpbusd tmm0, tmm4, tmm6",
                        "tileloadd tmm5, [{a1} + {s}*1]",
                        "tileloadd tmm7, [{w1} + {s}*1]",
                        "tdpbusd tmm1, tmm5, tmm7",
                        "tileloadd tmm4, [{a2} + {s}*1]",
                        "tileloadd tmm6, [{w2} + {s}*1]",
                        "tdpbusd tmm2, tmm4, tmm6",
                        "tileloadd tmm5, [{a3} + {s}*1]",
                        "tileloadd tmm7, [{w3} + {s}*1]",
                        "tdpbusd tmm3, tmm5, tmm7",
                        "tilestored [{c0} + {s}*1], tmm0",
                        "tilestored [{c1} + {s}*1], tmm1",
                        "tilestored [{c2} + {s}*1], tmm2",
                        "tilestored [{c3} + {s}*1], tmm3",
                        a0 = in(reg) xs.add(bb * 1024),
                        a1 = in(reg) xs.add((bb + 1) * 1024),
                        a2 = in(reg) xs.add((bb + 2) * 1024),
                        a3 = in(reg) xs.add((bb + 3) * 1024),
                        w0 = in(reg) w(bb),
                        w1 = in(reg) w(bb + 1),
                        w2 = in(reg) w(bb + 2),
                        w3 = in(reg) w(bb + 3),
                        c0 = in(reg) cs.add(bb * 1024),
                        c1 = in(reg) cs.add((bb + 1) * 1024),
                        c2 = in(reg) cs.add((bb + 2) * 1024),
                        c3 = in(reg) cs.add((bb + 3) * 1024),
                        s = in(reg) 64usize,
                        options(nostack),
                    );
                }
                for bb in fours..nb {
                    std::arch::asm!(
                        "tilezero tmm0",
                        "tileloadd tmm4, [{a} + {s}*1]",
                        "tileloadd tmm6, [{w} + {s}*1]",
                        "tdpbusd tmm0, tmm4, tmm6",
                        "tilestored [{c} + {s}*1], tmm0",
                        a = in(reg) xs.add(bb * 1024),
                        w = in(reg) w(bb),
                        c = in(reg) cs.add(bb * 1024),
                        s = in(reg) 64usize,
                        options(nostack),
                    );
                }
                let mut acc = [_mm512_setzero_ps(); AMX_ROWS];
                for bb in 0..nb {
                    let record = records.add(bb * rec);
                    let sums = cs.add(bb * 1024).cast::<i32>();
                    let d = a.d.as_ptr().add(row0 * nb + bb);
                    let dw = _mm512_cvtph_ps(_mm256_loadu_si256(record.add(512).cast()));
                    let corr = _mm512_loadu_si512(record.add(544).cast());
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let sum = _mm512_add_epi32(corr, _mm512_load_si512(sums.add(r * BLOCK).cast()));
                        let scale = _mm512_mul_ps(dw, _mm512_set1_ps(*d.add(r * nb)));
                        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), scale, *acc);
                    }
                }
                for (r, acc) in acc.iter().enumerate() {
                    _mm512_storeu_ps(out.at((row0 + r) * n + cb * BLOCK), *acc);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GGUF blocks for `n` rows of `k` inputs from a deterministic pattern.
    fn blocks(format: Format, k: usize, n: usize) -> Vec<u8> {
        let mut raw = Vec::new();
        for row in 0..n {
            for b in 0..k / QK {
                let d = f16::from_f32(0.01 + (row * 7 + b) as f32 % 13.0 * 0.002);
                raw.extend_from_slice(&d.to_le_bytes());
                match format {
                    Format::Q4_1 => {
                        let m = f16::from_f32(-0.08 + (row + 3 * b) as f32 % 5.0 * 0.01);
                        raw.extend_from_slice(&m.to_le_bytes());
                        raw.extend((0..16).map(|i| ((row * 31 + b * 7 + i * 5) % 256) as u8));
                    }
                    Format::Q8_0 => raw.extend((0..32).map(|i| ((row * 29 + b * 11 + i * 37) % 255) as u8)),
                }
            }
        }
        raw
    }

    /// `tokens` rows of `x` (`k` inputs each) quantized as the layer's forward does.
    fn quantized(format: Format, x: &[f32], tokens: usize, k: usize) -> Activations {
        let mut a = Activations::default();
        let nb = k / QK;
        (a.q, a.d, a.s) = (vec![0; tokens * k], vec![0.0; tokens * nb], vec![0.0; tokens * nb]);
        for r in 0..tokens {
            let (d, s) = (&mut a.d[r * nb..(r + 1) * nb], &mut a.s[r * nb..(r + 1) * nb]);
            quantize_row(format, &x[r * k..(r + 1) * k], &mut a.q[r * k..(r + 1) * k], d, s);
        }
        a
    }

    /// The weights as f32, read from the file's layout (GGML's dequantization).
    fn dequantize(format: Format, raw: &[u8], k: usize, n: usize) -> Vec<f32> {
        let fb = format.file_block();
        let mut w = vec![0f32; n * k];
        for (i, block) in raw.chunks(fb).enumerate() {
            let (row, b) = (i / (k / QK), i % (k / QK));
            let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
            let at = row * k + b * QK;
            match format {
                Format::Q4_1 => {
                    let m = f16::from_le_bytes([block[2], block[3]]).to_f32();
                    for (i, &byte) in block[4..].iter().enumerate() {
                        w[at + i] = d * f32::from(byte & 15) + m;
                        w[at + i + 16] = d * f32::from(byte >> 4) + m;
                    }
                }
                Format::Q8_0 => {
                    for (i, &q) in block[2..].iter().enumerate() {
                        w[at + i] = d * f32::from(q as i8);
                    }
                }
            }
        }
        w
    }

    /// Against the dequantized weights in f32: within the activations' 8-bit error; the
    /// kernel and the plain path agree to rounding, on shapes that exercise every tile
    /// and both ways of splitting the work.
    #[test]
    fn block_layers_match_the_dequantized_weights() {
        for format in [Format::Q4_1, Format::Q8_0] {
            for (k, n, tokens) in [(576, 192, 13), (64, 16, 1), (96, 512, 3), (64, 512, 1), (32, 48, 7)] {
                let raw = blocks(format, k, n);
                let layer = BlockDense::from_file(format, &raw, k, n).unwrap();
                let w = dequantize(format, &raw, k, n);
                let x: Vec<f32> =
                    (0..tokens * k).map(|i| ((i * 31 % 97) as f32 / 48.0 - 1.0) * 3.0).collect();
                let want: Vec<f32> = (0..tokens * n)
                    .map(|i| (0..k).map(|j| x[i / n * k + j] * w[i % n * k + j]).sum())
                    .collect();
                let mut got = Vec::new();
                layer.forward(&x, tokens, &mut got);
                let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(
                    worst < 0.01 * scale,
                    "{format:?} k {k} n {n}: worst {worst} against values up to {scale}"
                );

                let a = quantized(format, &x, tokens, k);
                let mut plain = vec![0f32; tokens * n];
                let call = Call { row0: 0, rows: tokens, first: 0, blocks: n / BLOCK, stride: n, col0: 0 };
                Tile { layer: &layer, a: &a, call }.plain(&mut plain);
                let differ = plain.iter().zip(&got).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(
                    differ <= 1e-5 * scale,
                    "{format:?} k {k} n {n}: kernel and plain differ by {differ}"
                );
            }
        }
    }

    /// `Q8_0` calls of 16 rows and more on AMX tiles give bit for bit what the VNNI
    /// kernel gives the same rows — whole tiles, a last tile filled up with zero rows, a
    /// remainder on the block kernel, inputs of odd and even block counts.
    #[test]
    fn tiles_of_rows_on_amx_equal_the_block_kernel() {
        if isa::detected() < Isa::Amx || !super::super::int8::QDense::fast() {
            eprintln!("this CPU has no AMX (detected: {}): only the block kernel runs here", isa::detected());
            return;
        }
        let format = Format::Q8_0;
        for (k, n, tokens) in [
            (576, 192, 16),
            (64, 48, 37),
            (1536, 64, 32),
            (128, 16, 17),
            (576, 64, 13),
            (64, 32, 45),
            (96, 32, 16),
        ] {
            let raw = blocks(format, k, n);
            let layer = BlockDense::from_file(format, &raw, k, n).unwrap();
            assert!(layer.runs_on_amx(), "{format:?} k {k}");
            let x: Vec<f32> = (0..tokens * k).map(|i| ((i * 37 % 101) as f32 / 50.0 - 1.0) * 2.5).collect();
            let mut tiled = vec![f32::NAN; 3];
            layer.forward(&x, tokens, &mut tiled);

            let a = quantized(format, &x, tokens, k);
            let mut vnni = Vec::new();
            super::super::tiles::run(tokens, n, ROWS, 4, &mut vnni, |call, out| {
                Tile { layer: &layer, a: &a, call }.run(true, out)
            });
            assert_eq!(tiled.len(), vnni.len());
            for (i, (t, v)) in tiled.iter().zip(&vnni).enumerate() {
                assert!(
                    t.to_bits() == v.to_bits(),
                    "{format:?} k {k} n {n}: row {} column {}: {t} on tiles, {v}",
                    i / n,
                    i % n
                );
            }
        }
    }

    /// Widening gives exactly the tiles `Bf16Dense::pack` makes of the dequantized
    /// weights, in registers and in plain Rust, over a buffer holding anything before
    /// (the scratch is reused); a pair's missing half (48 outputs) is zeros. The
    /// widened layer's products match the f32 ones to bf16's rounding.
    #[test]
    fn widened_blocks_are_the_dequantized_weights_in_bf16_tiles() {
        for format in [Format::Q4_1, Format::Q8_0] {
            // 4160 inputs: more than two slices of a sliced run (`bf16::SLICE`).
            for (k, n) in [(64, 48), (96, 64), (32, 16), (4160, 48)] {
                let raw = blocks(format, k, n);
                let layer = BlockDense::from_file(format, &raw, k, n).unwrap();
                let w = dequantize(format, &raw, k, n);
                let want =
                    Bf16Dense::pack(k, n, None, |col, out| out.copy_from_slice(&w[col * k..(col + 1) * k]));
                let want = want.tiles();
                let pair_len = k / QK * 2 * TILE;
                let mut got = vec![0x7fc1u16; want.len()];
                let (nb, fast) = (k / QK, has_avx512_bf16());
                for (pair, tiles) in got.chunks_mut(pair_len).enumerate() {
                    // In two calls of part of the inputs each, as a sliced run asks.
                    let (first, rest) = tiles.split_at_mut(nb / 2 * 2 * TILE);
                    layer.widen(pair, 0..nb / 2, first, fast);
                    layer.widen(pair, nb / 2..nb, rest, fast);
                }
                assert!(got[..] == want[..], "{format:?} k {k} n {n}: widened tiles differ from pack's");
                let rec = format.record();
                for (i, tile) in want.chunks(TILE).enumerate() {
                    let (pair, chunk, half) = (i / (2 * nb), i / 2 % nb, i % 2);
                    let cb = pair * 2 + half;
                    if cb < n / BLOCK {
                        let mut plain = vec![0u16; TILE];
                        widen_record(format, &layer.packed[(cb * nb + chunk) * rec..][..rec], &mut plain);
                        assert!(plain[..] == tile[..], "{format:?} k {k} n {n}: the plain widening differs");
                    }
                }

                let tokens = 37;
                let x: Vec<f32> =
                    (0..tokens * k).map(|i| ((i * 29 % 89) as f32 / 44.0 - 1.0) * 2.0).collect();
                let exact: Vec<f32> = (0..tokens * n)
                    .map(|i| (0..k).map(|j| x[i / n * k + j] * w[i % n * k + j]).sum())
                    .collect();
                let mut out = Vec::new();
                layer.forward_widened(&x, tokens, &mut out);
                let scale = exact.iter().fold(0f32, |m, v| m.max(v.abs()));
                let worst = out.iter().zip(&exact).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(
                    worst < 0.02 * scale,
                    "{format:?} k {k} n {n}: worst {worst} against values up to {scale}"
                );
            }
        }
    }

    /// A joined layer gives each part's results, column for column, for one row
    /// (decoding) and several (split by columns and by rows).
    #[test]
    fn joined_layers_give_their_parts_results() {
        for format in [Format::Q4_1, Format::Q8_0] {
            let k = 576;
            let parts: Vec<BlockDense> = [576, 192, 64]
                .iter()
                .map(|&n| BlockDense::from_file(format, &blocks(format, k, n), k, n).unwrap())
                .collect();
            let joined =
                BlockDense::concat(&parts.iter().collect::<Vec<_>>()).expect("same format and inputs");
            assert_eq!(joined.outputs(), 832);
            for tokens in [1, 16, 70] {
                let x: Vec<f32> =
                    (0..tokens * k).map(|i| ((i * 13 % 29) as f32 / 14.0 - 1.0) * 2.0).collect();
                let mut all = Vec::new();
                joined.forward(&x, tokens, &mut all);
                let mut at = 0;
                for part in &parts {
                    let mut alone = Vec::new();
                    part.forward(&x, tokens, &mut alone);
                    let n = part.outputs();
                    for t in 0..tokens {
                        assert_eq!(
                            &all[t * 832 + at..][..n],
                            &alone[t * n..][..n],
                            "{format:?}, {tokens} rows"
                        );
                    }
                    at += n;
                }
            }
        }
        let (q4, q8) = (
            BlockDense::from_file(Format::Q4_1, &blocks(Format::Q4_1, 64, 16), 64, 16).unwrap(),
            BlockDense::from_file(Format::Q8_0, &blocks(Format::Q8_0, 64, 16), 64, 16).unwrap(),
        );
        assert!(BlockDense::concat(&[&q4, &q8]).is_none(), "different formats do not join");
    }

    /// The vectorised quantization against GGML's definition, ties and an all-zero
    /// block included.
    #[test]
    fn activations_quantize_as_ggml_defines() {
        let mut x: Vec<f32> = (0..96).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.37).collect();
        x[..32].fill(0.0);
        x[40] = 127.0 * 0.5 / 63.5; // lands on a tie once scaled
        for format in [Format::Q4_1, Format::Q8_0] {
            let (mut q, mut d, mut s) = (vec![0u8; 96], vec![0f32; 3], vec![0f32; 3]);
            quantize_row(format, &x, &mut q, &mut d, &mut s);
            for (b, x) in x.chunks(QK).enumerate() {
                let max = x.iter().fold(0f32, |m, v| m.max(v.abs()));
                let inv = if max > 0.0 { 127.0 / max } else { 0.0 };
                let want: Vec<i32> = x.iter().map(|v| (v * inv).round_ties_even() as i32).collect();
                let got: Vec<i32> = q[b * QK..(b + 1) * QK]
                    .iter()
                    .map(|&q| match format {
                        Format::Q4_1 => i32::from(q as i8),
                        Format::Q8_0 => i32::from(q) - 128,
                    })
                    .collect();
                assert_eq!(got, want, "{format:?} block {b}");
                assert_eq!(d[b], f16::from_f32(max / 127.0).to_f32());
                let sum: i32 = want.iter().sum();
                assert_eq!(s[b], f16::from_f32(max / 127.0 * sum as f32).to_f32());
            }
        }
    }

    #[test]
    fn shapes_the_kernel_cannot_take_are_refused() {
        let raw = blocks(Format::Q4_1, 64, 16);
        let layer = BlockDense::from_file(Format::Q4_1, &raw, 64, 16).unwrap();
        let mut out = vec![1.0];
        layer.forward(&[], 0, &mut out);
        assert!(out.is_empty(), "no rows, no outputs");
        assert!(BlockDense::from_file(Format::Q4_1, &raw[1..], 64, 16).is_none());
        assert!(BlockDense::from_file(Format::Q4_1, &blocks(Format::Q4_1, 64, 8), 64, 8).is_none());
        assert!(BlockDense::from_file(Format::Q8_0, &raw, 64, 16).is_none());
    }
}
