//! The CPU path's rotary positions and attention, on the rows the linear layers write
//! ([`Linear::forward_rows`](super::weights::Linear::forward_rows)) rather than as a
//! graph of candle operations.
//!
//! # Why
//!
//! At the 3B's shapes a two-image prompt spent about a quarter of its time to first
//! token outside the matrix products, in candle's element-wise operations: the rotary
//! embedding as narrow, negate, concatenate, two broadcast products and a sum (each a
//! pass over every query and key), attention as a copy per window and head,
//! transposes, a repeat of each key/value head for its query group and a mask added to
//! every score. Here the rotation is one pass in place, and attention reads q, k and v
//! where they lie (strided views for the `gemm` crate), one job per head and segment,
//! with the causal limit applied in the softmax's range instead of a mask.

use rayon::prelude::*;

use crate::cpu::{Shared, View, product, softmax};

/// Rotates `heads` heads of `d` values, starting at column `at` of each row of `x`
/// (rows `stride` apart), by their row's `cos` and `sin` (`[rows, d]`):
/// `x · cos + rotate_half(x) · sin`, rotate_half being `[-second half, first half]`.
pub(super) fn rotate(
    x: &mut [f32],
    stride: usize,
    at: usize,
    heads: usize,
    d: usize,
    cos: &[f32],
    sin: &[f32],
) {
    let half = d / 2;
    x.par_chunks_mut(stride * 16).zip(cos.par_chunks(d * 16).zip(sin.par_chunks(d * 16))).for_each(
        |(rows, (cos, sin))| {
            for ((row, cos), sin) in
                rows.chunks_exact_mut(stride).zip(cos.chunks_exact(d)).zip(sin.chunks_exact(d))
            {
                for head in row[at..at + heads * d].chunks_exact_mut(d) {
                    let (first, second) = head.split_at_mut(half);
                    for i in 0..half {
                        let (a, b) = (first[i], second[i]);
                        first[i] = a * cos[i] - b * sin[i];
                        second[i] = b * cos[half + i] + a * sin[half + i];
                    }
                }
            }
        },
    );
}

/// Where heads of `d` values lie in a buffer: head `h` of token `t` starts at
/// `at + t · token + h · head`.
#[derive(Clone, Copy)]
pub(super) struct Heads<'a> {
    data: &'a [f32],
    at: usize,
    token: usize,
    head: usize,
}

impl<'a> Heads<'a> {
    /// Heads of `d` values in rows of `width` values, from column `at` (a layer's
    /// output, `[tokens, .. | heads · d | ..]`).
    pub fn in_rows(data: &'a [f32], at: usize, width: usize, d: usize) -> Self {
        Heads { data, at, token: width, head: d }
    }

    /// Heads stored head-major, `[heads, tokens, d]` (the decoder's KV cache).
    pub fn head_major(data: &'a [f32], tokens: usize, d: usize) -> Self {
        Heads { data, at: 0, token: d, head: tokens * d }
    }

    /// Head `h` of token `t`'s first value; the buffer holds what the caller addresses.
    fn start(&self, t: usize, h: usize) -> *const f32 {
        self.data[self.at + t * self.token + h * self.head..].as_ptr()
    }
}

/// One attention span: queries `queries` (token indexes of `q`) over keys `keys` (of
/// `k` and `v`); with `causal`, query `i` of the span sees keys up to `causal + i` of
/// the span (a prompt after `causal` cached tokens).
#[derive(Clone)]
pub(super) struct Span {
    pub queries: std::ops::Range<usize>,
    pub keys: std::ops::Range<usize>,
    pub causal: Option<usize>,
}

/// Softmax attention of `heads` query heads of `d` values over `kv_heads` key/value
/// heads (query head `h` reads key head `h / (heads / kv_heads)`), for each span;
/// results into `out`, a row of `heads · d` per query token (`out` row `t` for query
/// token `t`).
pub(super) fn attention(
    q: Heads,
    k: Heads,
    v: Heads,
    (heads, kv_heads, d): (usize, usize, usize),
    spans: &[Span],
    out: &mut [f32],
) {
    let group = heads / kv_heads;
    let width = heads * d;
    let scale = 1.0 / (d as f32).sqrt();
    if let Some(last) = spans.iter().map(|s| s.queries.end).max() {
        assert!(out.len() >= last * width, "attention output holds a row per query");
    }
    // Jobs of (span, head, query rows): a causal span's queries in blocks, each over the
    // keys its last row sees — a prompt's scores are a triangle, and computing the
    // whole square did twice the work.
    let mut jobs: Vec<(usize, usize, std::ops::Range<usize>)> = Vec::new();
    for (s, span) in spans.iter().enumerate() {
        let rows = span.queries.len();
        let block = if span.causal.is_some() { QUERY_BLOCK } else { rows.max(1) };
        for h in 0..heads {
            for r0 in (0..rows).step_by(block) {
                jobs.push((s, h, r0..(r0 + block).min(rows)));
            }
        }
    }
    let seen = |s: usize, r: &std::ops::Range<usize>| {
        let span = &spans[s];
        span.causal.map_or(span.keys.len(), |past| (past + r.end).min(span.keys.len()))
    };
    // Longest first, so the last jobs to start are short ones.
    jobs.sort_by_key(|(s, _, r)| std::cmp::Reverse(r.len() * seen(*s, r)));
    let shared = Shared(out.as_mut_ptr());
    jobs.par_iter().for_each(|(s, h, r)| {
        let (span, h) = (&spans[*s], *h);
        let (rows, cols) = (r.len(), seen(*s, r));
        if rows == 0 {
            return;
        }
        let first = span.queries.start + r.start;
        crate::cpu::SCORES.with_borrow_mut(|buffer| {
            if buffer.len() < rows * cols {
                buffer.resize(rows * cols, 0.0);
            }
            let scores = &mut buffer[..rows * cols];
            let kv = h / group;
            // SAFETY: q, k and v address the spans' rows and heads inside their buffers
            // (`Heads::start` indexes them, so it panics first if not); scores is
            // rows × cols; this job alone writes its queries' columns h·d..(h+1)·d of
            // `out`, which holds a row per query (asserted above).
            unsafe {
                product(
                    (rows, cols, d),
                    View::rows(scores.as_mut_ptr(), cols),
                    false,
                    View::rows(q.start(first, h), q.token),
                    View::transposed(k.start(span.keys.start, kv), k.token),
                    scale,
                    gemm::Parallelism::None,
                );
                for (i, row) in scores.chunks_exact_mut(cols).enumerate() {
                    let visible = span.causal.map_or(cols, |past| (past + r.start + i + 1).min(cols));
                    softmax(&mut row[..visible]);
                    row[visible..].fill(0.0);
                }
                product(
                    (rows, d, cols),
                    View::rows(shared.at(first * width + h * d), width),
                    false,
                    View::rows(scores.as_ptr(), cols),
                    View::rows(v.start(span.keys.start, kv), v.token),
                    1.0,
                    gemm::Parallelism::None,
                );
            }
        })
    });
}

/// Query rows a job of causal attention takes at most.
const QUERY_BLOCK: usize = 64;

#[cfg(test)]
mod tests {
    use super::*;

    /// Attention over spans, with query groups sharing key heads and causal spans after
    /// cached tokens (one longer than a job's block of queries), against its
    /// definition in f64.
    #[test]
    fn attention_over_spans_matches_its_definition() {
        let (heads, kv_heads, d) = (4, 2, 8);
        let tokens = 11 + QUERY_BLOCK + 6;
        let value = |i: usize| ((i * 37 % 101) as f32 / 50.0 - 1.0) * 1.5;
        let q: Vec<f32> = (0..tokens * heads * d).map(value).collect();
        let kv_len = 10 + QUERY_BLOCK + 6;
        // Keys and values head-major, as the decoder's cache holds them.
        let k: Vec<f32> = (0..kv_heads * kv_len * d).map(|i| value(i + 7)).collect();
        let v: Vec<f32> = (0..kv_heads * kv_len * d).map(|i| value(i + 19)).collect();
        let spans = [
            Span { queries: 0..5, keys: 0..5, causal: None },
            Span { queries: 5..11, keys: 0..14, causal: Some(8) },
            Span { queries: 11..tokens, keys: 0..kv_len, causal: Some(10) },
        ];
        let mut out = vec![0f32; tokens * heads * d];
        attention(
            Heads::in_rows(&q, 0, heads * d, d),
            Heads::head_major(&k, kv_len, d),
            Heads::head_major(&v, kv_len, d),
            (heads, kv_heads, d),
            &spans,
            &mut out,
        );
        for span in &spans {
            for (i, t) in span.queries.clone().enumerate() {
                for h in 0..heads {
                    let kv = h / (heads / kv_heads);
                    let seen = span.causal.map_or(span.keys.len(), |p| p + i + 1);
                    let scores: Vec<f64> = (0..seen)
                        .map(|j| {
                            let key = span.keys.start + j;
                            (0..d)
                                .map(|x| {
                                    f64::from(q[t * heads * d + h * d + x])
                                        * f64::from(k[kv * kv_len * d + key * d + x])
                                })
                                .sum::<f64>()
                                / (d as f64).sqrt()
                        })
                        .collect();
                    let m = scores.iter().fold(f64::MIN, |m, &s| m.max(s));
                    let e: Vec<f64> = scores.iter().map(|s| (s - m).exp()).collect();
                    let total: f64 = e.iter().sum();
                    for x in 0..d {
                        let want: f64 = e
                            .iter()
                            .enumerate()
                            .map(|(j, p)| {
                                p / total * f64::from(v[kv * kv_len * d + (span.keys.start + j) * d + x])
                            })
                            .sum();
                        let got = f64::from(out[t * heads * d + h * d + x]);
                        assert!((got - want).abs() < 1e-5, "token {t} head {h} value {x}: {got} vs {want}");
                    }
                }
            }
        }
    }

    #[test]
    fn rotation_turns_each_pair_of_halves() {
        let (heads, d, stride, at) = (2, 4, 11, 3);
        let rows = 3;
        let mut x: Vec<f32> = (0..rows * stride).map(|i| i as f32 * 0.1).collect();
        let before = x.clone();
        let cos: Vec<f32> = (0..rows * d).map(|i| (i as f32 * 0.3).cos()).collect();
        let sin: Vec<f32> = (0..rows * d).map(|i| (i as f32 * 0.3).sin()).collect();
        rotate(&mut x, stride, at, heads, d, &cos, &sin);
        for r in 0..rows {
            for c in 0..stride {
                let inside = c >= at && c < at + heads * d;
                if !inside {
                    assert_eq!(
                        x[r * stride + c],
                        before[r * stride + c],
                        "row {r} column {c} is not a head's"
                    );
                    continue;
                }
                let (h, i) = ((c - at) / d, (c - at) % d);
                let head = &before[r * stride + at + h * d..][..d];
                let rotated = if i < d / 2 { -head[i + d / 2] } else { head[i - d / 2] };
                let want = head[i] * cos[r * d + i] + rotated * sin[r * d + i];
                assert!((x[r * stride + c] - want).abs() < 1e-6, "row {r} column {c}");
            }
        }
    }
}
