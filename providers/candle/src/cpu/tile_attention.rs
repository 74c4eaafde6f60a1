//! Self-attention on AMX tiles for the bf16 path (`model.dtype = "bf16"`): scores and
//! the weighted sum of values as bf16 products summed in f32, the softmax between them
//! in f32 — what OpenVINO's and PyTorch's bf16 attention compute.
//!
//! Per text and head, with `d` (32 or 64) values a head:
//!
//! - Q, K and V are rounded to bf16 once for all heads; Q rows are the tiles' `A`.
//! - K is re-laid as `B` tiles of `Kᵀ`: per 16 keys and 32 of the head's values, row `r`
//!   holds values `2r, 2r + 1` of each key (a 16 × 16 transpose of value pairs).
//! - `S = Q Kᵀ` one 16 × 16 tile at a time; each row's exponentials over its real keys
//!   (scaled by `1/√d`, less the row's maximum) are rounded to bf16 as `P`, zero past the
//!   text's end, and summed; `P V` is divided by the sum as it leaves the tiles — one
//!   pass over the scores fewer than normalising `P` (perf had the softmax at 16 % of an
//!   embedding run).
//! - V is re-laid as `B` tiles: per 32 keys and 16 values, row `r` holds keys `2r,
//!   2r + 1` of each value. `P V` accumulates over the keys in 32s.
//!
//! Re-laying is linear in the text's length, the products quadratic. A CPU without AMX
//! keeps the f32 attention (`cpu.rs`): more exact, within the bf16 path's tolerance.

use rayon::prelude::*;

use super::Shared;
use super::bf16::{Bits, to_bf16};
use super::isa::{self, Isa};
use super::kernels::exponentials;

/// Whether heads of `head_dim` values run here: AMX active, `head_dim` 32 or 64.
pub(crate) fn supported(head_dim: usize) -> bool {
    matches!(head_dim, 32 | 64) && isa::active() >= Isa::Amx
}

/// Per-thread buffers, kept between jobs.
#[derive(Default)]
struct Buffers {
    q: Bits,
    k: Bits,
    v: Bits,
    p: Bits,
    s: Vec<f32>,
    /// Per row, 1 / the sum of its exponentials.
    inv: Vec<f32>,
}

thread_local! {
    /// The calling thread's bf16 copy of `qkv`.
    static QKV: std::cell::RefCell<Bits> = const { std::cell::RefCell::new(Bits::new()) };
    static BUFFERS: std::cell::RefCell<Buffers> = std::cell::RefCell::new(Buffers::default());
}

/// As `cpu.rs`'s `attention`: `qkv` is `[tokens, 3 * hidden]` (`[q | k | v]`),
/// `context` `[tokens, hidden]`; each text (`rows`: first token, tokens) attends over its
/// own tokens. Callers check [`supported`] first.
pub(crate) fn attention(
    qkv: &[f32],
    rows: &[(usize, usize)],
    hidden: usize,
    heads: usize,
    context: &mut [f32],
) {
    let d = hidden / heads;
    assert!(supported(d), "tile attention takes heads of 32 or 64 values with AMX active");
    let jobs = super::head_jobs(rows, heads);
    // The whole of Q, K and V rounded at once: per token and head it would be a call
    // per 32 values, which perf showed costing more than the products.
    QKV.with_borrow_mut(|rounded| {
        rounded.resize(qkv.len());
        rounded.par_chunks_mut(1 << 14).zip(qkv.par_chunks(1 << 14)).for_each(|(o, x)| to_bf16(x, o));
        let rounded = &rounded[..];
        let out = Shared(context.as_mut_ptr());
        jobs.par_iter().for_each(|&(start, len, head)| {
            BUFFERS.with_borrow_mut(|b| {
                let _tiles = super::amx::TileConfig::load();
                head_attention(rounded, start, len, head, hidden, d, b, out);
            })
        });
    });
}

/// One text's head: rows `start..start + len` of `qkv` (bf16), columns `head * d..` of
/// q, k, v.
#[allow(clippy::too_many_arguments)]
fn head_attention(
    qkv: &[u16],
    start: usize,
    len: usize,
    head: usize,
    hidden: usize,
    d: usize,
    b: &mut Buffers,
    out: Shared,
) {
    let stride = 3 * hidden;
    let (l16, l32) = (len.div_ceil(16) * 16, len.div_ceil(32) * 32);
    let chunks = d / 32;
    let scale = 1.0 / (d as f32).sqrt();
    let token = |i: usize, part: usize| &qkv[(start + i) * stride + part * hidden + head * d..][..d];

    // Q as A rows of d values (the scale is applied to the scores); rows past the
    // text are zeros.
    b.q.clear();
    b.q.resize(l16 * d);
    for i in 0..len {
        b.q[i * d..(i + 1) * d].copy_from_slice(token(i, 0));
    }
    // Kᵀ tiles: [key block of 16][chunk of 32 values] → 16 rows (value pairs) × 16 keys × 2.
    b.k.clear();
    b.k.resize(l32 / 16 * chunks * 512);
    for i in 0..len {
        let key = token(i, 1);
        let (block, within) = (i / 16, i % 16);
        for c in 0..chunks {
            let tile = &mut b.k[(block * chunks + c) * 512..][..512];
            for r in 0..16 {
                tile[r * 32 + within * 2] = key[c * 32 + 2 * r];
                tile[r * 32 + within * 2 + 1] = key[c * 32 + 2 * r + 1];
            }
        }
    }
    // V tiles: [key chunk of 32][value block of 16] → 16 rows (key pairs) × 16 values × 2.
    let blocks = d / 16;
    b.v.clear();
    b.v.resize(l32 / 32 * blocks * 512);
    for i in 0..len {
        let value = token(i, 2);
        let (chunk, r, lane) = (i / 32, (i % 32) / 2, i % 2);
        for vb in 0..blocks {
            let tile = &mut b.v[(chunk * blocks + vb) * 512..][..512];
            for c in 0..16 {
                tile[r * 32 + c * 2 + lane] = value[vb * 16 + c];
            }
        }
    }

    // S = Q Kᵀ, [l16][l32] f32.
    b.s.resize(l16 * l32, 0.0);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: tiles are configured (the caller's TileConfig) and AMX is active
    // (`supported`); every tile read is inside q (l16 × d), k (l32/16 × chunks tiles),
    // every store inside s (l16 × l32).
    unsafe {
        use super::amx::{dot, load, store, zero};
        for qb in 0..l16 / 16 {
            for kb in 0..l32 / 16 {
                zero::<0>();
                for c in 0..chunks {
                    load::<4>(b.q.as_ptr().add(qb * 16 * d + c * 32), d * 2);
                    load::<6>(b.k.as_ptr().add((kb * chunks + c) * 512), 64);
                    dot::<0, 4, 6>();
                }
                store::<0>(b.s.as_mut_ptr().add(qb * 16 * l32 + kb * 16), l32 * 4);
            }
        }
    }
    // P: each row's exponentials over its real keys, bf16, zeros past them and past the
    // text; their sums' inverses in `inv`.
    b.p.clear();
    b.p.resize(l16 * l32);
    b.inv.resize(len, 0.0);
    for i in 0..len {
        b.inv[i] = 1.0 / exponentials(&b.s[i * l32..i * l32 + len], scale, &mut b.p[i * l32..i * l32 + len]);
    }
    // O = P V, 16 rows × 16 values at a time, into the text's rows of `context`.
    let mut tile = [0f32; 256];
    for qb in 0..l16 / 16 {
        for vb in 0..blocks {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above; reads inside p (l16 × l32) and v (l32/32 × blocks
            // tiles), the store inside `tile` (16 × 16).
            unsafe {
                use super::amx::{dot, load, store, zero};
                zero::<0>();
                for chunk in 0..l32 / 32 {
                    load::<4>(b.p.as_ptr().add(qb * 16 * l32 + chunk * 32), l32 * 2);
                    load::<6>(b.v.as_ptr().add((chunk * blocks + vb) * 512), 64);
                    dot::<0, 4, 6>();
                }
                store::<0>(tile.as_mut_ptr(), 64);
            }
            for r in 0..16.min(len - qb * 16) {
                let row = start + qb * 16 + r;
                let inv = b.inv[qb * 16 + r];
                // SAFETY: row is one of this text's tokens and the 16 columns are this
                // head's block vb: written by this job alone, inside `context`.
                let dst =
                    unsafe { std::slice::from_raw_parts_mut(out.at(row * hidden + head * d + vb * 16), 16) };
                for (d, t) in dst.iter_mut().zip(&tile[r * 16..(r + 1) * 16]) {
                    *d = t * inv;
                }
            }
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
        for (d, heads, lens) in [(32, 3, vec![1, 17, 40]), (64, 2, vec![33, 5])] {
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
            attention(&qkv, &rows, hidden, heads, &mut got);
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
}
