//! The vector kernels of the packed CPU path: exp, erf-GELU, softmax and LayerNorm,
//! written so the compiler vectorises them, and `dispatch!`, which builds each for
//! AVX-512, AVX2+FMA and the baseline and picks one at run time.

/// Runs `$generic` compiled for AVX-512 or AVX2+FMA when the active level
/// ([`isa::active`](super::isa::active)) has them, else for the baseline.
macro_rules! dispatch {
    ($(#[$doc:meta])* $vis:vis fn $name:ident => $generic:ident ($($arg:ident : $ty:ty),*) $(-> $ret:ty)?) => {
        $(#[$doc])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                fn avx512($($arg: $ty),*) $(-> $ret)? {
                    $generic($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                fn avx2($($arg: $ty),*) $(-> $ret)? {
                    $generic($($arg),*)
                }
                let level = $crate::cpu::isa::active();
                if level >= $crate::cpu::isa::Isa::Avx512 {
                    // SAFETY: the level is at most what the CPU has (`isa::detected`),
                    // which includes the features `avx512` is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if level >= $crate::cpu::isa::Isa::Avx2 {
                    // SAFETY: as above, for `avx2`'s features.
                    return unsafe { avx2($($arg),*) };
                }
            }
            $generic($($arg),*)
        }
    };
}

dispatch!(
    /// Exact GELU in place: `x/2 (1 + erf(x/√2))`.
    pub(super) fn gelu => gelu_generic(x: &mut [f32])
);
dispatch!(
    /// Softmax of one row in place.
    pub(crate) fn softmax => softmax_generic(x: &mut [f32])
);
dispatch!(
    /// `SiLU(g) · u` for blocks of 32 rows of `[16 g | 16 u]` (a fused gate and up
    /// layer's output, `bf16.rs`), 16 values a row into `out`.
    pub(super) fn swiglu => swiglu_generic(block: &[f32], out: &mut [f32])
);
/// The query rows of `heads` heads sharing one key and value head (grouped-query attention),
/// attending over the first `seen` positions of that head (a decoding step): for each
/// head `i`, `out[i] = softmax(scale · q[i] Kᵀ) V`, where position `t`'s key and value
/// start at `t · stride` of `keys` and `values`; `q` and `out` are the heads' rows one
/// after another, `scores` scratch for `heads × seen`; the keys and values are f16 (the
/// cache's), widened as they are read. One pass over the keys and values serves every
/// head of the group: decoding attention is bound by reading the
/// cache, and `gemm` per head read it once per head and cost more to set up than the
/// products for one row (perf: a fifth of a 16-stream decoding step). Heads of 32, 64
/// or 128 values run in AVX-512 registers, others (and lower levels) plain loops.
pub(crate) fn decode_attention(
    q: &[f32],
    keys: &[half::f16],
    values: &[half::f16],
    (heads, stride, seen, scale): (usize, usize, usize, f32),
    scores: &mut [f32],
    out: &mut [f32],
) {
    let hd = q.len() / heads.max(1);
    assert!(heads > 0 && q.len() == heads * hd && out.len() == q.len() && scores.len() >= heads * seen);
    assert!(seen == 0 || keys.len().min(values.len()) >= (seen - 1) * stride + hd);
    #[cfg(target_arch = "x86_64")]
    if super::isa::active() >= super::isa::Isa::Avx512 && matches!(hd, 32 | 64 | 128) {
        let mut h = 0;
        while h < heads {
            let g = (heads - h).min(4);
            let (q, out) = (&q[h * hd..(h + g) * hd], &mut out[h * hd..(h + g) * hd]);
            let scores = &mut scores[h * seen..(h + g) * seen];
            macro_rules! run {
                ($v:literal, $g:literal) => {
                    // SAFETY: the level is at most what the CPU has, which includes
                    // AVX-512 F; every key and value read is inside the slices
                    // (asserted above), `q`, `out` and `scores` hold `g` heads.
                    unsafe { decode_avx512::<$v, $g>(q, keys, values, (stride, seen, scale), scores, out) }
                };
            }
            macro_rules! heads {
                ($v:literal) => {
                    match g {
                        1 => run!($v, 1),
                        2 => run!($v, 2),
                        3 => run!($v, 3),
                        _ => run!($v, 4),
                    }
                };
            }
            match hd {
                32 => heads!(2),
                64 => heads!(4),
                _ => heads!(8),
            }
            h += g;
        }
        return;
    }
    for ((q, out), scores) in
        q.chunks_exact(hd).zip(out.chunks_exact_mut(hd)).zip(scores.chunks_exact_mut(seen.max(1)))
    {
        decode_attention_generic(q, keys, values, (stride, seen, scale), scores, out);
    }
}

/// [`decode_attention`] for `G` heads of `16 V` values: the queries and the outputs in
/// registers, each key and value row loaded once for all `G` heads.
///
/// # Safety
/// AVX-512 F; `q` and `out` hold `G` heads of `16 V` values, `scores` `G × seen`, `keys`
/// and `values` every position's row.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn decode_avx512<const V: usize, const G: usize>(
    q: &[f32],
    keys: &[half::f16],
    values: &[half::f16],
    (stride, seen, scale): (usize, usize, f32),
    scores: &mut [f32],
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    // SAFETY: as the caller promises.
    unsafe {
        let qv: [[__m512; V]; G] = std::array::from_fn(|g| {
            std::array::from_fn(|c| _mm512_loadu_ps(q.as_ptr().add((g * V + c) * 16)))
        });
        for t in 0..seen {
            let k = keys.as_ptr().add(t * stride);
            let mut acc = [_mm512_setzero_ps(); G];
            for c in 0..V {
                let kc = _mm512_cvtph_ps(_mm256_loadu_si256(k.add(16 * c).cast()));
                for (acc, q) in acc.iter_mut().zip(&qv) {
                    *acc = _mm512_fmadd_ps(q[c], kc, *acc);
                }
            }
            for (g, acc) in acc.iter().enumerate() {
                *scores.get_unchecked_mut(g * seen + t) = _mm512_reduce_add_ps(*acc) * scale;
            }
        }
        for g in 0..G {
            softmax(&mut scores[g * seen..(g + 1) * seen]);
        }
        let mut acc = [[_mm512_setzero_ps(); V]; G];
        for t in 0..seen {
            let v = values.as_ptr().add(t * stride);
            for c in 0..V {
                let vc = _mm512_cvtph_ps(_mm256_loadu_si256(v.add(16 * c).cast()));
                for (g, acc) in acc.iter_mut().enumerate() {
                    let p = _mm512_set1_ps(*scores.get_unchecked(g * seen + t));
                    acc[c] = _mm512_fmadd_ps(p, vc, acc[c]);
                }
            }
        }
        for (g, acc) in acc.iter().enumerate() {
            for (c, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(out.as_mut_ptr().add((g * V + c) * 16), *acc);
            }
        }
    }
}

dispatch!(
    /// One row of `LayerNorm(x + residual)`, into `x`.
    pub(super) fn add_norm => add_norm_generic(x: &mut [f32], residual: &[f32], gamma: &[f32], beta: &[f32], eps: f32)
);
dispatch!(
    /// One row of `x += residual` and its RMSNorm `h = x / rms(x) · w`, in one pass.
    pub(crate) fn add_rms_norm => add_rms_norm_generic(x: &mut [f32], residual: &[f32], w: &[f32], eps: f32, h: &mut [f32])
);

const LANES: usize = 16;

/// Sum with independent lanes, which the compiler keeps in vector registers (a plain
/// float sum is a serial chain it may not reorder).
#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// The smallest and largest value, with independent lanes (see [`sum`]).
#[inline(always)]
pub(super) fn min_max(x: &[f32]) -> (f32, f32) {
    let (mut lo, mut hi) = ([f32::INFINITY; LANES], [f32::NEG_INFINITY; LANES]);
    let chunks = x.chunks_exact(LANES);
    let tail =
        chunks.remainder().iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), &v| (l.min(v), h.max(v)));
    for c in chunks {
        for ((l, h), &v) in lo.iter_mut().zip(hi.iter_mut()).zip(c) {
            *l = if v < *l { v } else { *l };
            *h = if v > *h { v } else { *h };
        }
    }
    (lo.iter().fold(tail.0, |m, &v| m.min(v)), hi.iter().fold(tail.1, |m, &v| m.max(v)))
}

#[inline(always)]
fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    acc.iter().fold(tail, |m, &v| m.max(v))
}

/// `e^x` for x in [-87, 88] (clamped), relative error ≈ 2e-7: `x = n ln2 + r`,
/// `e^r` by its Taylor series to r⁶ (|r| ≤ ln2/2: the r⁷ term is below 1.3e-7), `2^n`
/// built in the exponent bits. n is rounded by adding 1.5·2²³, which leaves it in the
/// low mantissa bits: unlike `as i32` (saturating, NaN-checked), that stays in vector
/// registers. The Horner steps are fused multiply-adds where the build has FMA (the
/// AVX-512 and AVX2 builds of `dispatch!`): perf showed the bf16 path's softmax bound by
/// this polynomial.
#[inline(always)]
fn exp(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let t = x.mul_add(std::f32::consts::LOG2_E, ROUND);
    let n = t - ROUND;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let p = EXP_SERIES[1..].iter().fold(EXP_SERIES[0], |p, &c| p.mul_add(r, c));
    let n = t.to_bits().wrapping_sub(ROUND.to_bits());
    p * f32::from_bits(n.wrapping_add(127) << 23)
}

/// ln 2 in two parts, `LN2_HI` exact in few bits, for `x − n ln2` without losing `r`'s
/// low bits.
pub(super) const LN2_HI: f32 = 0.693_359_4;
pub(super) const LN2_LO: f32 = -2.121_944_4e-4;

/// The Taylor coefficients of `e^r`, highest power (r⁶) first.
pub(super) const EXP_SERIES: [f32; 7] = [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0];

/// erf by Abramowitz & Stegun 7.1.26: |error| ≤ 1.5e-7 in exact arithmetic, < 1e-6 in f32.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / 0.327_591_1f32.mul_add(a, 1.0);
    let p = 1.061_405_4f32;
    let p = p.mul_add(t, -1.453_152_1);
    let p = p.mul_add(t, 1.421_413_8);
    let p = p.mul_add(t, -0.284_496_74);
    let p = p.mul_add(t, 0.254_829_6);
    let y = (-p * t).mul_add(exp(-a * a), 1.0);
    y.copysign(x)
}

#[inline(always)]
fn gelu_generic(x: &mut [f32]) {
    for v in x {
        *v = 0.5 * *v * (1.0 + erf(*v * std::f32::consts::FRAC_1_SQRT_2));
    }
}

#[inline(always)]
fn swiglu_generic(block: &[f32], out: &mut [f32]) {
    for (row, out) in block.chunks_exact(32).zip(out.chunks_exact_mut(16)) {
        let (g, u) = row.split_at(16);
        for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
            *o = g / (1.0 + exp(-g)) * u;
        }
    }
}

#[inline(always)]
fn softmax_generic(x: &mut [f32]) {
    let m = max(x);
    for v in x.iter_mut() {
        *v = exp(*v - m);
    }
    let inv = 1.0 / sum(x);
    for v in x {
        *v *= inv;
    }
}

/// [`decode_attention`] for one head in plain loops, for any head width.
fn decode_attention_generic(
    q: &[f32],
    keys: &[half::f16],
    values: &[half::f16],
    (stride, seen, scale): (usize, usize, f32),
    scores: &mut [f32],
    out: &mut [f32],
) {
    let hd = q.len();
    let scores = &mut scores[..seen];
    for (t, score) in scores.iter_mut().enumerate() {
        let k = &keys[t * stride..t * stride + hd];
        *score = q.iter().zip(k).map(|(q, k)| q * k.to_f32()).sum::<f32>() * scale;
    }
    softmax(scores);
    out.fill(0.0);
    for (t, &p) in scores.iter().enumerate() {
        let v = &values[t * stride..t * stride + hd];
        for (o, v) in out.iter_mut().zip(v) {
            *o += p * v.to_f32();
        }
    }
}

#[inline(always)]
fn add_norm_generic(x: &mut [f32], residual: &[f32], gamma: &[f32], beta: &[f32], eps: f32) {
    for (v, r) in x.iter_mut().zip(residual) {
        *v += r;
    }
    let n = x.len() as f32;
    let mean = sum(x) / n;
    let mut sq = [0f32; LANES];
    let chunks = x.chunks_exact(LANES);
    let tail: f32 = chunks.remainder().iter().map(|v| (v - mean) * (v - mean)).sum();
    for c in chunks {
        for (a, v) in sq.iter_mut().zip(c) {
            *a += (v - mean) * (v - mean);
        }
    }
    let var = (sq.iter().sum::<f32>() + tail) / n;
    let inv = 1.0 / (var + eps).sqrt();
    for ((v, g), b) in x.iter_mut().zip(gamma).zip(beta) {
        *v = (*v - mean) * inv * g + b;
    }
}

#[inline(always)]
fn add_rms_norm_generic(x: &mut [f32], residual: &[f32], w: &[f32], eps: f32, h: &mut [f32]) {
    for (v, r) in x.iter_mut().zip(residual) {
        *v += r;
    }
    // The graph ops this replaces (candle's sqr, mean, affine, sqrt, recip, mul), in
    // their order, so the results are theirs to the bit: greedy tokens on quantized
    // activations flip on a last-bit change of a norm.
    let mean = sum_of_squares_as_candle(x) * (1.0 / x.len() as f64) as f32;
    let inv = 1.0 / (mean + eps).sqrt();
    for ((h, v), w) in h.iter_mut().zip(x.iter()).zip(w) {
        *h = v * inv * w;
    }
}

/// `Σ v²` summed as candle's AVX `vec_sum` sums a row of squares: 32 lanes (four
/// vectors of 8), the vectors added pairwise, the halves of the last one, two
/// horizontal adds, then the tail in order.
#[inline(always)]
fn sum_of_squares_as_candle(x: &[f32]) -> f32 {
    let mut acc = [0f32; 32];
    let chunks = x.chunks_exact(32);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a += v * v;
        }
    }
    let mut v = [0f32; 8];
    for l in 0..8 {
        v[l] = (acc[l] + acc[8 + l]) + (acc[16 + l] + acc[24 + l]);
    }
    let t: [f32; 4] = std::array::from_fn(|l| v[l] + v[l + 4]);
    let mut total = (t[0] + t[1]) + (t[2] + t[3]);
    for v in tail {
        total += v * v;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_and_erf_are_accurate_over_their_range() {
        let mut worst_exp = 0f64;
        let mut worst_erf = 0f64;
        for i in -80_000..=80_000 {
            let x = i as f32 * 1e-3;
            let e = f64::from(x).exp();
            worst_exp = worst_exp.max(((f64::from(exp(x)) - e) / e).abs());
            let x = i as f32 * 1e-4;
            worst_erf = worst_erf.max((f64::from(erf(x)) - erf_reference(f64::from(x))).abs());
        }
        assert!(worst_exp < 5e-7, "exp: relative error {worst_exp:e}");
        assert!(worst_erf < 1e-6, "erf: error {worst_erf:e}");
    }

    /// Decoding attention against the same in f64, for groups of 1 to 7 heads (more
    /// than one register group), several cache lengths and head widths, dispatched
    /// (AVX-512 here) and head by head in the baseline loops.
    #[test]
    fn decode_attention_matches_f64() {
        for (heads, hd, seen, stride) in
            [(1, 64, 1, 192), (3, 64, 37, 192), (2, 16, 200, 48), (7, 128, 9, 128), (5, 32, 70, 64)]
        {
            let q: Vec<f32> = (0..heads * hd).map(|i| ((i * 13 % 29) as f32 / 14.0 - 1.0) * 0.7).collect();
            let keys: Vec<half::f16> = (0..seen * stride)
                .map(|i| half::f16::from_f32(((i * 31 % 53) as f32 / 26.0 - 1.0) * 1.3))
                .collect();
            let values: Vec<half::f16> =
                (0..seen * stride).map(|i| half::f16::from_f32((i * 17 % 41) as f32 / 20.0 - 1.0)).collect();
            let scale = 1.0 / (hd as f32).sqrt();
            let mut want = Vec::new();
            for q in q.chunks(hd) {
                let logits: Vec<f64> = (0..seen)
                    .map(|t| {
                        (0..hd).map(|d| f64::from(q[d]) * f64::from(keys[t * stride + d])).sum::<f64>()
                            * f64::from(scale)
                    })
                    .collect();
                let m = logits.iter().copied().fold(f64::MIN, f64::max);
                let e: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
                let z: f64 = e.iter().sum();
                want.extend(
                    (0..hd).map(|d| {
                        (0..seen).map(|t| e[t] / z * f64::from(values[t * stride + d])).sum::<f64>()
                    }),
                );
            }
            let mut dispatched = vec![f32::NAN; heads * hd];
            let mut scores = vec![0f32; heads * seen];
            decode_attention(&q, &keys, &values, (heads, stride, seen, scale), &mut scores, &mut dispatched);
            let mut baseline = vec![f32::NAN; heads * hd];
            for (q, out) in q.chunks(hd).zip(baseline.chunks_mut(hd)) {
                decode_attention_generic(q, &keys, &values, (stride, seen, scale), &mut scores, out);
            }
            for (name, got) in [("dispatched", &dispatched), ("baseline", &baseline)] {
                let worst = got.iter().zip(&want).map(|(a, b)| (f64::from(*a) - b).abs()).fold(0.0, f64::max);
                assert!(worst < 1e-5, "{name}: {heads} heads of {hd}, {seen} positions: off by {worst}");
            }
        }
    }

    /// erf by its Taylor series (x small) or continued fraction, in f64.
    fn erf_reference(x: f64) -> f64 {
        let a = x.abs();
        let y = if a < 3.0 {
            let (mut term, mut total, mut n) = (a, a, 0.0);
            while term.abs() > 1e-17 {
                n += 1.0;
                term *= -a * a / n;
                total += term / (2.0 * n + 1.0);
            }
            total * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            let mut f = 0.0;
            for k in (1..60).rev() {
                f = f64::from(k) / 2.0 / (a + f);
            }
            1.0 - (-a * a).exp() / std::f64::consts::PI.sqrt() / (a + f)
        };
        y.copysign(x)
    }

    #[test]
    fn softmax_and_layer_norm_match_their_definitions() {
        let mut x: Vec<f32> = (0..37).map(|i| (i as f32 * 0.7).sin() * 5.0).collect();
        let expected: Vec<f64> = {
            let m = x.iter().fold(f64::MIN, |m, &v| m.max(f64::from(v)));
            let e: Vec<f64> = x.iter().map(|&v| (f64::from(v) - m).exp()).collect();
            let s: f64 = e.iter().sum();
            e.iter().map(|v| v / s).collect()
        };
        softmax(&mut x);
        for (a, b) in x.iter().zip(&expected) {
            assert!((f64::from(*a) - b).abs() < 1e-7, "{a} vs {b}");
        }

        let mut x: Vec<f32> = (0..35).map(|i| i as f32 * 0.3 - 2.0).collect();
        let r: Vec<f32> = (0..35).map(|i| (i as f32).cos()).collect();
        let g: Vec<f32> = (0..35).map(|i| 1.0 + i as f32 * 0.01).collect();
        let b: Vec<f32> = (0..35).map(|i| i as f32 * -0.02).collect();
        let v: Vec<f64> = x.iter().zip(&r).map(|(a, b)| f64::from(a + b)).collect();
        let mean = v.iter().sum::<f64>() / 35.0;
        let var = v.iter().map(|a| (a - mean) * (a - mean)).sum::<f64>() / 35.0;
        add_norm(&mut x, &r, &g, &b, 1e-12);
        for i in 0..35 {
            let want = (v[i] - mean) / var.sqrt() * f64::from(g[i]) + f64::from(b[i]);
            assert!((f64::from(x[i]) - want).abs() < 1e-5, "{i}: {} vs {want}", x[i]);
        }
    }

    #[test]
    fn add_rms_norm_matches_its_definition() {
        // 37 values: one 32-value step of the sum and a tail.
        let x: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin() * 3.0).collect();
        let r: Vec<f32> = (0..37).map(|i| (i as f32 * 0.11).cos()).collect();
        let w: Vec<f32> = (0..37).map(|i| 0.5 + i as f32 * 0.03).collect();
        let sum: Vec<f64> = x.iter().zip(&r).map(|(a, b)| f64::from(*a) + f64::from(*b)).collect();
        let rms = (sum.iter().map(|v| v * v).sum::<f64>() / 37.0 + 1e-6).sqrt();
        let (mut got, mut h) = (x.clone(), vec![0f32; 37]);
        add_rms_norm(&mut got, &r, &w, 1e-6, &mut h);
        for i in 0..37 {
            assert!((f64::from(got[i]) - sum[i]).abs() < 1e-6, "sum {i}");
            let want = sum[i] / rms * f64::from(w[i]);
            assert!((f64::from(h[i]) - want).abs() < 1e-5, "{i}: {} vs {want}", h[i]);
        }
    }
}
