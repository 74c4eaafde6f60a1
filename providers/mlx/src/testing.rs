//! What the crate's tests share.

/// The first index of the largest value (as kiln's sampler, torch and MLX pick it).
pub(crate) fn argmax(row: &[f32]) -> u32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    row.iter().position(|&l| l == max).unwrap() as u32
}
