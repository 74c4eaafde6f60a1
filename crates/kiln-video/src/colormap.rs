//! Heights to colours: the terrain heightmap the denoiser makes, as an RGB frame.

/// Height → RGB stops, placed where this model's heights fall (mostly -0.9..0.1): deep
/// water, water, shallows, sand, grass, forest, rock, snow. The Python reference
/// (scripts/video_reference.py) uses the same stops.
const STOPS: [(f32, [f32; 3]); 9] = [
    (-1.0, [0.04, 0.08, 0.30]),
    (-0.45, [0.10, 0.30, 0.62]),
    (-0.22, [0.30, 0.55, 0.80]),
    (-0.18, [0.86, 0.80, 0.56]),
    (-0.12, [0.30, 0.58, 0.24]),
    (0.0, [0.20, 0.42, 0.16]),
    (0.08, [0.50, 0.40, 0.30]),
    (0.2, [0.95, 0.95, 0.95]),
    (1.0, [1.00, 1.00, 1.00]),
];

/// `heights` (one frame, row-major) → planar RGB `[3, len]` in [0, 1], piecewise linear
/// between the stops (in f64, rounded to f32 last, as numpy's `interp` does).
pub fn colormap(heights: &[f32]) -> Vec<f32> {
    let len = heights.len();
    let mut out = vec![0f32; 3 * len];
    for (i, &h) in heights.iter().enumerate() {
        let h = f64::from(h.clamp(-1.0, 1.0));
        let upper = STOPS.iter().position(|&(x, _)| f64::from(x) >= h).unwrap_or(STOPS.len() - 1).max(1);
        let ((x0, c0), (x1, c1)) = (STOPS[upper - 1], STOPS[upper]);
        let (x0, x1) = (f64::from(x0), f64::from(x1));
        let w = if x1 > x0 { (h - x0) / (x1 - x0) } else { 0.0 };
        for c in 0..3 {
            let (a, b) = (f64::from(c0[c]), f64::from(c1[c]));
            out[c * len + i] = (a + w * (b - a)) as f32;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_map_to_their_colours_and_between_them_linearly() {
        let rgb = colormap(&[-1.0, -0.18, 1.0, -5.0, 0.04]);
        let px = |i: usize| [rgb[i], rgb[5 + i], rgb[10 + i]];
        assert_eq!(px(0), [0.04, 0.08, 0.30]);
        assert_eq!(px(1), [0.86, 0.80, 0.56]);
        assert_eq!(px(2), [1.0, 1.0, 1.0]);
        assert_eq!(px(3), px(0), "clamped below");
        let mid = px(4);
        assert!((mid[0] - 0.35).abs() < 1e-6 && (mid[2] - 0.23).abs() < 1e-6, "{mid:?}");
    }
}
