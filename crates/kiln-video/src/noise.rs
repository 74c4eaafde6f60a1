//! The path through noise space the keyframes follow: seeded Gaussian anchors, joined
//! by spherical interpolation.
//!
//! The generator is kiln's own, SplitMix64 with Box-Muller in f64, written the same way
//! in the Python reference (scripts/video_reference.py), so both draw the same numbers
//! from a seed — no library's stream is assumed to stay the same across versions.

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The `i`-th output (from 1) of SplitMix64 seeded with `seed`.
fn splitmix64(seed: u64, i: u64) -> u64 {
    let mut z = seed.wrapping_add(GOLDEN.wrapping_mul(i));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `n` standard normal samples from stream `seed`: Box-Muller over pairs of uniforms
/// in (0, 1) made of SplitMix64's top 53 bits.
pub fn normal(seed: u64, n: usize) -> Vec<f64> {
    let uniform = |i: u64| ((splitmix64(seed, i) >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64);
    let mut out = Vec::with_capacity(n + 1);
    for pair in 0..n.div_ceil(2) as u64 {
        let (u1, u2) = (uniform(2 * pair + 1), uniform(2 * pair + 2));
        let r = (-2.0 * u1.ln()).sqrt();
        let angle = 2.0 * std::f64::consts::PI * u2;
        out.push(r * angle.cos());
        out.push(r * angle.sin());
    }
    out.truncate(n);
    out
}

/// Spherical interpolation from `a` (u = 0) to `b` (u = 1); straight when they are
/// (nearly) parallel.
pub fn slerp(a: &[f64], b: &[f64], u: f64) -> Vec<f64> {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let theta = (dot / (norm(a) * norm(b))).clamp(-1.0, 1.0).acos();
    if theta < 1e-6 {
        return a.iter().zip(b).map(|(x, y)| (1.0 - u) * x + u * y).collect();
    }
    let (wa, wb) = (((1.0 - u) * theta).sin() / theta.sin(), (u * theta).sin() / theta.sin());
    a.iter().zip(b).map(|(x, y)| wa * x + wb * y).collect()
}

/// The noise (`len` values, f32) at `t` in [0, 1] along sampling step `step`'s path
/// through `anchors` seeded anchors: anchor `a` is stream `seed + 1000 step + a`.
pub fn path_noise(seed: u64, step: usize, anchors: usize, t: f64, len: usize) -> Vec<f32> {
    Path::new(seed, step, anchors, len).at(t)
}

/// One sampling step's path, its anchors drawn once each, when first needed, and shared
/// by every keyframe between them: drawing two anchors is ~1 ms of a core at 128×128,
/// and keyframes drawing their own reached a GPU's batcher a millisecond apart, too far
/// apart to share a batch.
pub struct Path {
    seed: u64,
    step: usize,
    len: usize,
    anchors: Vec<std::sync::OnceLock<Vec<f64>>>,
}

impl Path {
    /// The path of sampling step `step` through `anchors` (2 or more) anchors of `len`
    /// values; nothing is drawn yet.
    pub fn new(seed: u64, step: usize, anchors: usize, len: usize) -> Path {
        Path { seed, step, len, anchors: (0..anchors.max(2)).map(|_| std::sync::OnceLock::new()).collect() }
    }

    /// Anchor `a`: stream `seed + 1000 step + a`.
    fn anchor(&self, a: usize) -> &[f64] {
        self.anchors[a].get_or_init(|| {
            normal(self.seed.wrapping_add(1000 * self.step as u64).wrapping_add(a as u64), self.len)
        })
    }

    /// The noise at `t` in [0, 1]: the two anchors around it, spherically interpolated.
    pub fn at(&self, t: f64) -> Vec<f32> {
        let count = self.anchors.len();
        let position = t * (count - 1) as f64;
        let segment = (position.floor() as usize).min(count - 2);
        let u = position - segment as f64;
        slerp(self.anchor(segment), self.anchor(segment + 1), u).into_iter().map(|x| x as f32).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_standard_normal() {
        let z = normal(7, 100_000);
        let mean = z.iter().sum::<f64>() / z.len() as f64;
        let var = z.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / z.len() as f64;
        assert!(mean.abs() < 0.01 && (var - 1.0).abs() < 0.02, "mean {mean}, variance {var}");
        assert_eq!(normal(7, 5), normal(7, 5), "a seed gives one stream");
        assert_ne!(normal(7, 5), normal(8, 5));
    }

    #[test]
    fn the_path_passes_through_its_anchors_smoothly() {
        let len = 4096;
        let at = |t| path_noise(3, 0, 3, t, len);
        let first: Vec<f32> = normal(3, len).into_iter().map(|x| x as f32).collect();
        let last: Vec<f32> = normal(5, len).into_iter().map(|x| x as f32).collect();
        assert_eq!(at(0.0), first);
        assert!(at(1.0).iter().zip(&last).all(|(a, b)| (a - b).abs() < 1e-5));
        let step =
            |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).sum::<f32>() / len as f32;
        let near = step(&at(0.30), &at(0.32));
        let far = step(&at(0.0), &at(1.0));
        assert!(near * 10.0 < far, "neighbours {near}, ends {far}");
        // Spherical: the norm stays a Gaussian's (≈ sqrt(len)) between the anchors.
        // One path's shared anchors give each point what a path of its own does.
        let shared = Path::new(3, 0, 3, len);
        for t in [0.9, 0.1, 0.5, 0.62, 0.0, 1.0] {
            assert_eq!(shared.at(t), at(t), "t = {t}");
        }
        let norm = at(0.25).iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm / (len as f32).sqrt() - 1.0).abs() < 0.05, "{norm}");
    }
}
