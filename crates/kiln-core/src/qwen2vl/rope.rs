//! Rotary positions: the language model's multimodal RoPE (M-RoPE: a time, a height and
//! a width position per token, each driving its own section of the frequencies) and the
//! vision tower's 2D rotary table. Pure arithmetic, tested on its own.

use crate::{Error, Result};

/// The three position streams (time, height, width) of every prompt token, and the
/// rope delta: what decoding adds to a token's index to get its position (negative
/// when images took fewer positions than tokens).
#[derive(Debug, Clone, PartialEq)]
pub struct RopeIndex {
    /// Time, height and width positions, one per token each.
    pub positions: [Vec<i64>; 3],
    /// Added to a later token's index to give its position.
    pub delta: i64,
}

/// transformers' `get_rope_index` for images: text tokens count up on all three
/// streams; an image's tokens (its `<|image_pad|>` run, one per merged patch) share one
/// time position and take their row and column on the height and width streams,
/// starting where the text before them ends; text after an image resumes at the
/// largest position so far + 1. `grids[i]` is image i's `[t, h, w]` in patches.
pub fn rope_index(ids: &[u32], grids: &[[usize; 3]], merge: usize, image_token: u32) -> Result<RopeIndex> {
    let mut positions: [Vec<i64>; 3] = std::array::from_fn(|_| Vec::with_capacity(ids.len()));
    let mut next = 0i64; // the largest position so far + 1
    let mut at = 0usize;
    for (i, grid) in grids.iter().enumerate() {
        let start = ids[at..].iter().position(|&t| t == image_token).map(|p| at + p).ok_or_else(|| {
            Error::InvalidInput(format!("image {} has no <|image_pad|> tokens left in the prompt", i + 1))
        })?;
        for k in 0..(start - at) as i64 {
            for stream in positions.iter_mut() {
                stream.push(next + k);
            }
        }
        let base = next + (start - at) as i64;
        let (t, h, w) = (grid[0], grid[1] / merge, grid[2] / merge);
        let count = t * h * w;
        if ids.len() < start + count || ids[start..start + count].iter().any(|&x| x != image_token) {
            return Err(Error::InvalidInput(format!(
                "image {} needs {count} <|image_pad|> tokens in a row (its {}×{} patches merged {merge}×{merge}); \
                 the prompt has fewer",
                i + 1,
                grid[1],
                grid[2]
            )));
        }
        let mut largest = base;
        for _ in 0..t {
            for r in 0..h {
                for c in 0..w {
                    positions[0].push(base);
                    positions[1].push(base + r as i64);
                    positions[2].push(base + c as i64);
                    largest = largest.max(base + r.max(c) as i64);
                }
            }
        }
        next = largest + 1;
        at = start + count;
    }
    if ids[at..].contains(&image_token) {
        return Err(Error::InvalidInput(format!(
            "the prompt has more <|image_pad|> tokens than its {} image(s) fill",
            grids.len()
        )));
    }
    for k in 0..(ids.len() - at) as i64 {
        for stream in positions.iter_mut() {
            stream.push(next + k);
        }
    }
    let largest = positions.iter().flat_map(|s| s.iter().copied()).max().unwrap_or(-1);
    Ok(RopeIndex { delta: largest + 1 - ids.len() as i64, positions })
}

/// `1 / theta^(2k / dim)` for k in 0..dim/2, in f32 as torch computes it.
pub fn inverse_frequencies(dim: usize, theta: f64) -> Vec<f32> {
    (0..dim / 2).map(|k| 1.0 / (theta as f32).powf((2 * k) as f32 / dim as f32)).collect()
}

/// The language model's cos and sin, `[tokens, head_dim]` each, row-major: frequency j
/// of a token takes its time position for j < section[0], its height position for j <
/// section[0] + section[1], else its width position; the two halves of a head repeat
/// the frequencies (rotate-half convention).
pub fn mrope_cos_sin(
    positions: &[Vec<i64>; 3],
    head_dim: usize,
    theta: f64,
    section: [usize; 3],
) -> (Vec<f32>, Vec<f32>) {
    let inv = inverse_frequencies(head_dim, theta);
    let half = head_dim / 2;
    let tokens = positions[0].len();
    let (mut cos, mut sin) = (vec![0f32; tokens * head_dim], vec![0f32; tokens * head_dim]);
    for t in 0..tokens {
        for (j, &f) in inv.iter().enumerate() {
            let stream = if j < section[0] {
                0
            } else if j < section[0] + section[1] {
                1
            } else {
                2
            };
            let angle = positions[stream][t] as f32 * f;
            let (c, s) = (angle.cos(), angle.sin());
            for k in [j, j + half] {
                cos[t * head_dim + k] = c;
                sin[t * head_dim + k] = s;
            }
        }
    }
    (cos, sin)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_around_an_image_resumes_after_its_largest_position() {
        // 3 text tokens (the last is <|vision_start|>), a 4×6-patch image (2×3 merged),
        // then 2 text tokens.
        let pad = 9;
        let ids = [1, 2, 3, pad, pad, pad, pad, pad, pad, 4, 5];
        let r = rope_index(&ids, &[[1, 4, 6]], 2, pad).unwrap();
        assert_eq!(r.positions[0], vec![0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7]);
        assert_eq!(r.positions[1], vec![0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7]);
        assert_eq!(r.positions[2], vec![0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7]);
        // The largest position is 7 for 11 tokens: decoding continues at index - 3.
        assert_eq!(r.delta, -3);
    }

    #[test]
    fn pad_tokens_and_images_must_agree() {
        let e = rope_index(&[1, 9, 9, 2], &[[1, 4, 4]], 2, 9).unwrap_err().to_string();
        assert!(e.contains("needs 4 <|image_pad|> tokens"), "{e}");
        let e = rope_index(&[1, 9, 2], &[], 2, 9).unwrap_err().to_string();
        assert!(e.contains("more <|image_pad|> tokens"), "{e}");
        let text = rope_index(&[1, 2, 3], &[], 2, 9).unwrap();
        assert_eq!((text.positions[1].clone(), text.delta), (vec![0, 1, 2], 0));
    }

    #[test]
    fn text_positions_give_ordinary_rope() {
        // Equal streams: every section sees the same position.
        let positions = [vec![5i64], vec![5], vec![5]];
        let (cos, _) = mrope_cos_sin(&positions, 8, 10_000.0, [1, 2, 1]);
        let inv = inverse_frequencies(8, 10_000.0);
        for j in 0..4 {
            assert_eq!(cos[j], (5.0 * inv[j]).cos());
            assert_eq!(cos[j + 4], cos[j]);
        }
    }
}
