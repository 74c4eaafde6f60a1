//! Self-attention on AMX tiles for the bf16 path (`model.dtype = "bf16"`): scores and
//! the weighted sum of values as bf16 products summed in f32, the softmax between them
//! in f32 — what OpenVINO's and PyTorch's bf16 attention compute.
//!
//! Per text and head, with `d` values a head (a multiple of 16 up to 128: BERT's 32 and
//! 64, a Qwen2.5-VL vision tower's 80):
//!
//! - Q, K and V are rounded to bf16 once for all heads; Q's rows are the tiles' `A`,
//!   loaded where they are (rows `3 · hidden` apart).
//! - K is re-laid as `B` tiles of `Kᵀ`: per 16 keys and 32 of the head's values, row `r`
//!   holds values `2r, 2r + 1` of each key — a 16 × 16 transpose of value pairs, done in
//!   AVX-512 registers (perf had the scalar re-laying costing more than the products).
//! - V is re-laid as `B` tiles: per 32 keys and 16 values, row `r` holds keys `2r,
//!   2r + 1` of each value (two keys' rows interleaved, one permute per tile row).
//! - Then per block of 16 queries, in L1: `S = Q Kᵀ` (16 × the keys, f32); each row's
//!   exponentials over its real keys (scaled by `1/√d`, less the row's maximum) rounded
//!   to bf16 as `P`, zeros past the text's end, and summed; `P V` divided by the sum as
//!   it leaves the tiles — one pass over the scores fewer than normalising `P` (perf had
//!   the softmax at 16 % of an embedding run).
//!
//! Re-laying is linear in the text's length, the products quadratic. A CPU without AMX
//! keeps the f32 attention (`cpu.rs`): more exact, within the bf16 path's tolerance.
//!
//! Heads of 32 or 64 values keep Q's one or two tiles loaded for all keys and `P V`'s
//! two or four accumulators in one pass. Wider heads (more than two 32-value chunks)
//! load Q's chunks again for each pair of key blocks, the keys' values past `d` zeros
//! (so what Q's last tile reads past its head multiplies nothing), and sum `P V` in
//! passes of up to four 16-value blocks.

use rayon::prelude::*;

use super::Shared;
use super::aligned::Aligned;
use super::bf16::{Bits, SharedBits, to_bf16};
use super::isa::{self, Isa};

/// Whether heads of `head_dim` values run here: AMX active (with AVX-512 BF16, which
/// every AMX CPU has), `head_dim` a multiple of 16 from 32 to 128.
pub(crate) fn supported(head_dim: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        head_dim.is_multiple_of(16)
            && (32..=MAX_HEAD).contains(&head_dim)
            && isa::active() >= Isa::Amx
            && std::is_x86_feature_detected!("avx512bw")
            && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (head_dim, Isa::Amx, isa::active);
        false
    }
}

/// The widest head taken: four 32-value chunks.
const MAX_HEAD: usize = 128;

/// Per-thread buffers, kept between jobs.
#[derive(Default)]
struct Buffers {
    /// The last block of a text's queries when it has fewer than 16, zeros after them.
    q: Bits,
    k: Bits,
    v: Bits,
    /// One block of 16 queries' probabilities, `[16][keys rounded up to 32]`.
    p: Bits,
    /// One block of 16 queries' scores, as `p`.
    s: Aligned<f32>,
}

thread_local! {
    /// The calling thread's bf16 copy of an f32 `qkv`.
    static QKV: std::cell::Cell<Bits> = const { std::cell::Cell::new(Bits::new()) };
    static BUFFERS: std::cell::RefCell<Buffers> = std::cell::RefCell::new(Buffers::default());
}

/// Q, K and V of a batch's tokens, `[tokens, 3 · hidden]` (`[q | k | v]` a token).
pub(crate) enum Qkv<'a> {
    /// f32 (an int8 layer's results): rounded to bf16 here first.
    F32(&'a [f32]),
    /// Already bf16 (a bf16 layer's [`Sink::Bf16`](super::bf16::Sink::Bf16)).
    Bf16(&'a [u16]),
}

/// Where attention's `[tokens, hidden]` results go.
pub(crate) enum Context<'a> {
    /// f32, exactly `tokens × hidden`.
    F32(&'a mut [f32]),
    /// Rounded to bf16 and laid out as [`Bf16Dense::round_rows`](super::bf16::Bf16Dense::round_rows)
    /// lays out the output layer's input (resized here): that layer runs on them
    /// directly, and the context never exists in f32. `hidden` is a multiple of 32
    /// (heads of 32 or 64), so its rows need no padding.
    Rows(&'a mut Bits),
}

/// [`Context`] as the jobs share it.
#[derive(Clone, Copy)]
enum Dst {
    F32(Shared),
    Bits(SharedBits),
}

/// As `cpu.rs`'s `attention`: each text (`rows`: first token, tokens) attends over its
/// own tokens. Callers check [`supported`] first.
pub(crate) fn attention(qkv: Qkv, rows: &[(usize, usize)], hidden: usize, heads: usize, context: Context) {
    let d = hidden / heads;
    assert!(supported(d), "tile attention takes heads of 32 to 128 values (multiples of 16) with AMX active");
    let tokens = rows.iter().map(|&(start, len)| start + len).max().unwrap_or(0);
    let dst = match context {
        Context::F32(out) => {
            assert_eq!(out.len(), tokens * hidden, "an f32 context holds tokens × hidden");
            Dst::F32(Shared(out.as_mut_ptr()))
        }
        Context::Rows(out) => {
            assert!(hidden.is_multiple_of(32), "bf16 rows of a width that is a multiple of 32");
            out.resize(tokens.div_ceil(32) * 32 * hidden);
            Dst::Bits(SharedBits(out.as_mut_ptr()))
        }
    };
    let run = |qkv: &[u16]| {
        assert!(qkv.len() >= tokens * 3 * hidden, "Q, K and V for every token");
        let jobs = super::head_jobs(rows, heads);
        jobs.par_iter().for_each(|&(start, len, head)| {
            BUFFERS.with_borrow_mut(|b| {
                let _tiles = super::amx::TileConfig::load();
                #[cfg(target_arch = "x86_64")]
                // SAFETY: `supported` checked AMX (tiles configured above), AVX-512 BW and
                // BF16; the text's rows are inside `qkv`; the job writes only its text's
                // rows' columns of this head.
                unsafe {
                    avx512::head_attention(qkv, start, len, head, hidden, d, b, dst)
                };
                #[cfg(not(target_arch = "x86_64"))]
                let _ = (qkv, start, len, head, b, dst);
            })
        });
    };
    match qkv {
        Qkv::Bf16(qkv) => run(qkv),
        // The whole of Q, K and V rounded at once: per token and head it would be a
        // call per 32 values, which perf showed costing more than the products.
        Qkv::F32(qkv) => super::with_taken(&QKV, |rounded| {
            rounded.resize(qkv.len());
            rounded.par_chunks_mut(1 << 14).zip(qkv.par_chunks(1 << 14)).for_each(|(o, x)| to_bf16(x, o));
            run(rounded)
        }),
    }
}

/// The per-head kernel and its re-layings, compiled for AVX-512 (every AMX CPU has it).
#[cfg(target_arch = "x86_64")]
pub(super) mod avx512 {
    use std::arch::x86_64::*;

    use super::super::amx::{dot, load, store, zero};
    use super::super::bf16::avx512_bf16::{bits, lanes};
    use super::{Buffers, Dst};

    /// The 16 results of a block of 16 queries, `d` values each, where tiles store them.
    #[repr(C, align(64))]
    struct Results([f32; 16 * super::MAX_HEAD]);

    /// One text's head: rows `start..start + len` of `qkv` (bf16), columns `head * d..` of
    /// q, k, v, into the text's rows of `out` (`[tokens, hidden]`).
    ///
    /// # Safety
    /// AVX-512 F/BW/BF16 and AMX (tiles configured) on this CPU; `qkv` holds the text's
    /// rows; this job alone writes the text's rows' columns `head * d..(head + 1) * d`
    /// of `out`, which holds them.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,fma")]
    pub(super) unsafe fn head_attention(
        qkv: &[u16],
        start: usize,
        len: usize,
        head: usize,
        hidden: usize,
        d: usize,
        b: &mut Buffers,
        out: Dst,
    ) {
        let stride = 3 * hidden;
        let (l16, l32) = (len.div_ceil(16) * 16, len.div_ceil(32) * 32);
        let (chunks, blocks) = (d.div_ceil(32), d / 16);
        // The values of chunk `c` that belong to the head (the last chunk of a head of 80
        // has 16): the rest are loaded as zeros.
        let valid = |c: usize| -> __mmask32 {
            let n = (d - c * 32).min(32);
            if n == 32 { !0 } else { (1u32 << n) - 1 }
        };
        let scale = 1.0 / (d as f32).sqrt();
        debug_assert!(qkv.len() >= (start + len) * stride);
        // SAFETY (the whole body): loads read the text's rows (keys past `len` are
        // skipped, a last block of fewer than 16 queries is copied out first); stores
        // stay inside the buffers as they are sized here, and inside this job's part of
        // `out`.
        unsafe {
            let base = qkv.as_ptr().add(start * stride + head * d);
            let row = |token: usize, part: usize| base.add(token * stride + part * hidden);

            // Kᵀ tiles: [16 keys][32 values] → 16 rows (value pairs) × 16 keys.
            b.k.resize(l32 / 16 * chunks * 512);
            for kb in 0..l32 / 16 {
                for c in 0..chunks {
                    let mut keys = [_mm512_setzero_si512(); 16];
                    for (j, key) in keys.iter_mut().enumerate() {
                        if kb * 16 + j < len {
                            *key = _mm512_maskz_loadu_epi16(valid(c), row(kb * 16 + j, 1).add(c * 32).cast());
                        }
                    }
                    let tile = b.k.as_mut_ptr().add((kb * chunks + c) * 512);
                    for (r, pairs) in transpose(keys).iter().enumerate() {
                        _mm512_storeu_si512(tile.add(r * 32).cast(), *pairs);
                    }
                }
            }
            // V tiles: [32 keys][16 values] → 16 rows (key pairs) × 16 values × 2.
            b.v.resize(l32 / 32 * blocks * 512);
            let (low, high) = interleavings();
            for chunk in 0..l32 / 32 {
                for r in 0..16 {
                    let (k0, k1) = (chunk * 32 + 2 * r, chunk * 32 + 2 * r + 1);
                    for c in 0..chunks {
                        let value = |k: usize| {
                            if k < len {
                                _mm512_maskz_loadu_epi16(valid(c), row(k, 2).add(c * 32).cast())
                            } else {
                                _mm512_setzero_si512()
                            }
                        };
                        let (a, bb) = (value(k0), value(k1));
                        let tile = b.v.as_mut_ptr().add((chunk * blocks + 2 * c) * 512 + r * 32);
                        _mm512_storeu_si512(tile.cast(), _mm512_permutex2var_epi16(a, low, bb));
                        // A head of 80 has no block after its fifth.
                        if 2 * c + 1 < blocks {
                            _mm512_storeu_si512(tile.add(512).cast(), _mm512_permutex2var_epi16(a, high, bb));
                        }
                    }
                }
            }

            b.s.resize(16 * l32);
            b.p.resize(16 * l32);
            let (s, p) = (b.s.as_mut_ptr(), b.p.as_mut_ptr());
            let mut results = Results([0.0; 16 * super::MAX_HEAD]);
            for qb in 0..l16 / 16 {
                // S = Q Kᵀ for 16 queries.
                let rows = 16.min(len - qb * 16);
                let (q, q_stride) = if rows == 16 {
                    (row(qb * 16, 0), stride * 2)
                } else {
                    // Rows of whole chunks, zeros past the head.
                    let width = chunks * 32;
                    b.q.resize(16 * width);
                    b.q.fill(0);
                    for r in 0..rows {
                        std::ptr::copy_nonoverlapping(
                            row(qb * 16 + r, 0),
                            b.q.as_mut_ptr().add(r * width),
                            d,
                        );
                    }
                    (b.q.as_ptr(), width * 2)
                };
                if chunks > 2 {
                    scores_wide(q, q_stride, b.k.as_ptr(), chunks, l32, s);
                } else {
                    scores_narrow(q, q_stride, b.k.as_ptr(), chunks, l32, s);
                }
                // P and its rows' sums; rows past the text keep what they held (finite:
                // zeros or earlier probabilities), their results are dropped.
                let mut inv = [0f32; 16];
                for (r, inv) in inv.iter_mut().enumerate().take(rows) {
                    *inv = 1.0 / exponentials(s.add(r * l32), len, l32, scale, p.add(r * l32));
                }
                let o = results.0.as_mut_ptr();
                if matches!(blocks, 2 | 4) {
                    values_narrow(p, b.v.as_ptr(), blocks, l32, o, d);
                } else {
                    values_wide(p, b.v.as_ptr(), blocks, l32, o, d);
                }
                for (r, &inv) in inv.iter().enumerate().take(rows) {
                    let at = (start + qb * 16 + r) * hidden + head * d;
                    let inv = _mm512_set1_ps(inv);
                    for c in (0..d).step_by(16) {
                        let v = _mm512_mul_ps(_mm512_loadu_ps(o.add(r * d + c)), inv);
                        match out {
                            Dst::F32(out) => _mm512_storeu_ps(out.at(at + c), v),
                            Dst::Bits(out) => _mm256_storeu_si256(out.at(at + c).cast(), bits(v)),
                        }
                    }
                }
            }
        }
    }

    /// `S = Q Kᵀ` for 16 queries of a head of one or two 32-value chunks, into `s` (16
    /// rows of `l32` scores): Q's chunks loaded once for all keys, two key blocks at a
    /// time in two accumulators (tiles are not renamed: one accumulator would wait on
    /// each product).
    ///
    /// # Safety
    /// As [`scores_wide`]'s.
    #[inline(always)]
    unsafe fn scores_narrow(
        q: *const u16,
        q_stride: usize,
        k: *const u16,
        chunks: usize,
        l32: usize,
        s: *mut f32,
    ) {
        // SAFETY: as the caller promises.
        unsafe {
            load::<4>(q, q_stride);
            if chunks == 2 {
                load::<5>(q.add(32), q_stride);
            }
            for kb in (0..l32 / 16).step_by(2) {
                let (k0, k1) = (k.add(kb * chunks * 512), k.add((kb + 1) * chunks * 512));
                zero::<0>();
                zero::<1>();
                load::<6>(k0, 64);
                load::<2>(k1, 64);
                dot::<0, 4, 6>();
                dot::<1, 4, 2>();
                if chunks == 2 {
                    load::<7>(k0.add(512), 64);
                    load::<3>(k1.add(512), 64);
                    dot::<0, 5, 7>();
                    dot::<1, 5, 3>();
                }
                store::<0>(s.add(kb * 16), l32 * 4);
                store::<1>(s.add(kb * 16 + 16), l32 * 4);
            }
        }
    }

    /// `S = Q Kᵀ` for 16 queries of a head of more than two 32-value chunks: per pair
    /// of key blocks, each chunk of Q (16 rows `q_stride` bytes apart) loaded again
    /// against the two blocks' Kᵀ tiles (`chunks` tiles a block of 16 keys), into `s`
    /// (16 rows of `l32` scores).
    ///
    /// # Safety
    /// Tiles configured; `q` holds 16 rows of `32 · chunks` values, `k` `l32 / 16 ·
    /// chunks` tiles, `s` 16 × `l32` f32.
    #[inline(always)]
    unsafe fn scores_wide(
        q: *const u16,
        q_stride: usize,
        k: *const u16,
        chunks: usize,
        l32: usize,
        s: *mut f32,
    ) {
        // SAFETY: as the caller promises.
        unsafe {
            for kb in (0..l32 / 16).step_by(2) {
                let (k0, k1) = (k.add(kb * chunks * 512), k.add((kb + 1) * chunks * 512));
                zero::<0>();
                zero::<1>();
                for c in 0..chunks {
                    load::<4>(q.add(c * 32), q_stride);
                    load::<6>(k0.add(c * 512), 64);
                    load::<7>(k1.add(c * 512), 64);
                    dot::<0, 4, 6>();
                    dot::<1, 4, 7>();
                }
                store::<0>(s.add(kb * 16), l32 * 4);
                store::<1>(s.add(kb * 16 + 16), l32 * 4);
            }
        }
    }

    /// `O = P V` for 16 queries of a head of two or four 16-value blocks, stored into `o`
    /// (16 rows of `d`): each 32 keys' probabilities loaded once for every value block.
    ///
    /// # Safety
    /// As [`values_wide`]'s.
    #[inline(always)]
    unsafe fn values_narrow(p: *const u16, v: *const u16, blocks: usize, l32: usize, o: *mut f32, d: usize) {
        // SAFETY: as the caller promises.
        unsafe {
            zero::<0>();
            zero::<1>();
            zero::<2>();
            zero::<3>();
            for chunk in 0..l32 / 32 {
                load::<4>(p.add(chunk * 32), l32 * 2);
                let v = v.add(chunk * blocks * 512);
                load::<6>(v, 64);
                load::<7>(v.add(512), 64);
                dot::<0, 4, 6>();
                dot::<1, 4, 7>();
                if blocks == 4 {
                    load::<5>(v.add(1024), 64);
                    load::<6>(v.add(1536), 64);
                    dot::<2, 4, 5>();
                    dot::<3, 4, 6>();
                }
            }
            store::<0>(o, d * 4);
            store::<1>(o.add(16), d * 4);
            if blocks == 4 {
                store::<2>(o.add(32), d * 4);
                store::<3>(o.add(48), d * 4);
            }
        }
    }

    /// `O = P V` for 16 queries of a head of other than two or four 16-value blocks: passes of
    /// up to four blocks over every 32 keys' probabilities (`p`, 16 rows of `l32`),
    /// stored into `o` (16 rows of `d`).
    ///
    /// # Safety
    /// Tiles configured; `v` holds `l32 / 32 · blocks` tiles, `o` 16 × `d` f32.
    #[inline(always)]
    unsafe fn values_wide(p: *const u16, v: *const u16, blocks: usize, l32: usize, o: *mut f32, d: usize) {
        // SAFETY: as the caller promises.
        unsafe {
            for first in (0..blocks).step_by(4) {
                let n = (blocks - first).min(4);
                zero::<0>();
                zero::<1>();
                zero::<2>();
                zero::<3>();
                for chunk in 0..l32 / 32 {
                    load::<4>(p.add(chunk * 32), l32 * 2);
                    let v = v.add((chunk * blocks + first) * 512);
                    load::<6>(v, 64);
                    dot::<0, 4, 6>();
                    if n > 1 {
                        load::<7>(v.add(512), 64);
                        dot::<1, 4, 7>();
                    }
                    if n > 2 {
                        load::<5>(v.add(1024), 64);
                        dot::<2, 4, 5>();
                    }
                    if n > 3 {
                        load::<6>(v.add(1536), 64);
                        dot::<3, 4, 6>();
                    }
                }
                let at = o.add(first * 16);
                store::<0>(at, d * 4);
                if n > 1 {
                    store::<1>(at.add(16), d * 4);
                }
                if n > 2 {
                    store::<2>(at.add(32), d * 4);
                }
                if n > 3 {
                    store::<3>(at.add(48), d * 4);
                }
            }
        }
    }

    /// `exp(scale · s − max)` of a row's `len` scores at `s`, rounded to bf16 into `p`
    /// with zeros up to `l32` (the keys' padding), and their sum (of the unrounded
    /// values).
    ///
    /// # Safety
    /// AVX-512 F and BF16; `s` and `p` hold `l32` values, `l32` a multiple of 16 and at
    /// least `len`.
    #[inline(always)]
    unsafe fn exponentials(s: *const f32, len: usize, l32: usize, scale: f32, p: *mut u16) -> f32 {
        // SAFETY: as the caller promises: every access is below `l32`.
        unsafe {
            let mut m = _mm512_set1_ps(f32::NEG_INFINITY);
            for i in (0..len).step_by(16) {
                m = _mm512_mask_max_ps(m, lanes(len - i), m, _mm512_loadu_ps(s.add(i)));
            }
            let shift = _mm512_set1_ps(_mm512_reduce_max_ps(m) * scale);
            let scale = _mm512_set1_ps(scale);
            let mut sum = _mm512_setzero_ps();
            for i in (0..l32).step_by(16) {
                let e = if i < len {
                    let t = _mm512_fmsub_ps(_mm512_loadu_ps(s.add(i)), scale, shift);
                    _mm512_maskz_mov_ps(lanes(len - i), exp(t))
                } else {
                    _mm512_setzero_ps()
                };
                sum = _mm512_add_ps(sum, e);
                _mm256_storeu_si256(p.add(i).cast(), bits(e));
            }
            _mm512_reduce_add_ps(sum)
        }
    }

    /// `e^t` for `t` ≤ 0 (below −87 taken as −87), relative error below 1e-4 — for
    /// probabilities rounded to bf16 right after, where half an ulp is 2e-3: `t = n ln2 +
    /// r`, `e^r` by its Taylor series to r⁴ (|r| ≤ ln2/2), `2^n` by `vscalefps`.
    #[inline(always)]
    unsafe fn exp(t: __m512) -> __m512 {
        use super::super::kernels::{EXP_SERIES, LN2_HI, LN2_LO};
        // SAFETY: register arithmetic on a CPU with AVX-512 F (the caller's promise).
        unsafe {
            let t = _mm512_max_ps(t, _mm512_set1_ps(-87.0));
            // Round to nearest, exceptions suppressed.
            let n = _mm512_roundscale_ps::<0x08>(_mm512_mul_ps(t, _mm512_set1_ps(std::f32::consts::LOG2_E)));
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_HI), t);
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(LN2_LO), r);
            // The series from r⁴ (`exp`'s coefficients less the two highest).
            let mut e = _mm512_set1_ps(EXP_SERIES[2]);
            for &c in &EXP_SERIES[3..] {
                e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(c));
            }
            _mm512_scalef_ps(e, n)
        }
    }

    /// Permutations interleaving two rows of 32 bf16 `a`, `b`: `a0 b0 a1 b1 … a15 b15`
    /// (values 0–15) and the same for values 16–31.
    #[inline(always)]
    unsafe fn interleavings() -> (__m512i, __m512i) {
        let mut low = [0u16; 32];
        let mut high = [0u16; 32];
        for i in 0..32 {
            let from = (i as u16 / 2) + if i % 2 == 1 { 32 } else { 0 };
            low[i] = from;
            high[i] = from + 16;
        }
        // SAFETY: 64-byte arrays read unaligned.
        unsafe { (_mm512_loadu_si512(low.as_ptr().cast()), _mm512_loadu_si512(high.as_ptr().cast())) }
    }

    /// A 16 × 16 transpose of 32-bit elements (bf16 pairs): row `i` of the result holds
    /// element `i` of every input row. Interleaves within 128-bit lanes by 32 and 64 bits,
    /// then moves lanes in two steps: 64 shuffles against 256 scalar moves.
    #[inline(always)]
    pub(in crate::cpu) unsafe fn transpose(r: [__m512i; 16]) -> [__m512i; 16] {
        // SAFETY: register shuffles on a CPU with AVX-512 F (the caller's promise).
        unsafe {
            let z = _mm512_setzero_si512();
            // t[2i], t[2i + 1]: rows 2i and 2i + 1 interleaved (elements 0, 1 | 2, 3 of
            // each lane).
            let mut t = [z; 16];
            for i in 0..8 {
                t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
                t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
            }
            // u[4g + j]: in lane L, element 4L + j of rows 4g..4g + 4.
            let mut u = [z; 16];
            for g in 0..4 {
                u[4 * g] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
                u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
                u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
                u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
            }
            // v[j] = lanes 0, 2 of groups 0 and 1; v[4 + j] lanes 1, 3; v[8 + j], v[12 + j]
            // the same for groups 2 and 3.
            let mut v = [z; 16];
            for j in 0..4 {
                v[j] = _mm512_shuffle_i32x4::<0x88>(u[j], u[4 + j]);
                v[4 + j] = _mm512_shuffle_i32x4::<0xdd>(u[j], u[4 + j]);
                v[8 + j] = _mm512_shuffle_i32x4::<0x88>(u[8 + j], u[12 + j]);
                v[12 + j] = _mm512_shuffle_i32x4::<0xdd>(u[8 + j], u[12 + j]);
            }
            let mut o = [z; 16];
            for j in 0..4 {
                o[j] = _mm512_shuffle_i32x4::<0x88>(v[j], v[8 + j]);
                o[8 + j] = _mm512_shuffle_i32x4::<0xdd>(v[j], v[8 + j]);
                o[4 + j] = _mm512_shuffle_i32x4::<0x88>(v[4 + j], v[12 + j]);
                o[12 + j] = _mm512_shuffle_i32x4::<0xdd>(v[4 + j], v[12 + j]);
            }
            o
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against f32 attention over the same values, on lengths with and without
    /// padding, heads of 32 and 64: within bf16's rounding.
    #[test]
    fn tile_attention_matches_f32_attention_within_bf16_rounding() {
        if !supported(32) {
            eprintln!("no AMX here (or capped): tile attention is not used, nothing to compare");
            return;
        }
        // Heads of one, two, three and four 32-value chunks, the last one part-filled
        // for 48 and 80 (a Qwen2.5-VL vision tower's); texts of a part-filled last
        // block of 16 queries and of 32 keys.
        let cases = [
            (32, 3, vec![1, 17, 40, 100]),
            (64, 2, vec![33, 5, 70]),
            (48, 3, vec![20, 64]),
            (80, 2, vec![64, 7, 45]),
            (128, 2, vec![50, 16]),
        ];
        for (d, heads, lens) in cases {
            let hidden = d * heads;
            let tokens: usize = lens.iter().sum();
            let qkv: Vec<f32> =
                (0..tokens * 3 * hidden).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 2.0).collect();
            let mut rows = Vec::new();
            let mut at = 0;
            for &len in &lens {
                rows.push((at, len));
                at += len;
            }
            let mut got = vec![f32::NAN; tokens * hidden];
            attention(Qkv::F32(&qkv), &rows, hidden, heads, Context::F32(&mut got));
            let mut want = vec![0f32; tokens * hidden];
            let stride = 3 * hidden;
            for &(start, len) in &rows {
                for h in 0..heads {
                    for i in 0..len {
                        let q = &qkv[(start + i) * stride + h * d..][..d];
                        let mut s: Vec<f32> = (0..len)
                            .map(|j| {
                                let k = &qkv[(start + j) * stride + hidden + h * d..][..d];
                                q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>() / (d as f32).sqrt()
                            })
                            .collect();
                        super::super::kernels::softmax(&mut s);
                        for c in 0..d {
                            want[(start + i) * hidden + h * d + c] = (0..len)
                                .map(|j| s[j] * qkv[(start + j) * stride + 2 * hidden + h * d + c])
                                .sum();
                        }
                    }
                }
            }
            let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst < 0.05, "d {d}: worst difference {worst} (values up to 2)");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_register_transpose_moves_element_i_of_row_j_to_element_j_of_row_i() {
        if !std::is_x86_feature_detected!("avx512f") {
            eprintln!("no AVX-512 here: the transpose is not used, nothing to check");
            return;
        }
        let rows: Vec<[u32; 16]> = (0..16).map(|j| std::array::from_fn(|i| (j * 100 + i) as u32)).collect();
        // SAFETY: the CPU has AVX-512 F (checked above); 64-byte arrays read and written
        // unaligned.
        let out: Vec<[u32; 16]> = unsafe {
            use std::arch::x86_64::*;
            let input = std::array::from_fn(|j| _mm512_loadu_si512(rows[j].as_ptr().cast()));
            avx512::transpose(input)
                .iter()
                .map(|v| {
                    let mut row = [0u32; 16];
                    _mm512_storeu_si512(row.as_mut_ptr().cast(), *v);
                    row
                })
                .collect()
        };
        for i in 0..16 {
            for j in 0..16 {
                assert_eq!(out[i][j], rows[j][i], "row {i}, element {j}");
            }
        }
    }
}
