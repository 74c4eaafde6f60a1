//! `[video]`: the video task's pipeline — diffusion keyframes, then frame interpolation.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::ConfigIssue;

/// `[video]`, for `task = "video"`: keyframes from the denoiser (`model.path`, on
/// `provider`) along a smooth path in noise space, then the interpolator's midpoints
/// between neighbours, `interpolation` times as many frames in all.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VideoConfig {
    /// The frame interpolation model (RIFE as ONNX: `img0`, `img1` → `midpoint`, RGB
    /// `[b, 3, H, W]` in [0, 1]), on the same provider as the denoiser.
    pub interpolator: PathBuf,
    /// Frames the denoiser makes, evenly along the path (2 or more).
    pub keyframes: usize,
    /// Seeded noises the path passes through, by spherical interpolation (2 or more).
    pub anchors: usize,
    /// Seeds the anchors (anchor `a` of sampling step `k`: stream `seed + 1000 k + a`).
    pub seed: u64,
    /// Conditioning from the first keyframe to the last, linearly: `[start, end]` in [0, 1].
    pub difficulty: [f32; 2],
    /// Noise levels of the sampling steps, first the start (`noise × sigmas[0]`), then
    /// each further step re-noises the previous estimate to the next level (consistency
    /// multistep sampling). `[80.0]`: one step.
    pub sigmas: Vec<f32>,
    /// Frames per keyframe interval in the video: 1 (keyframes only), 2, 4, 8, ...
    /// (recursive midpoints).
    pub interpolation: usize,
    /// Frames per second of the written video.
    pub fps: u32,
    /// Keyframes the denoiser runs at once at most.
    pub denoise_batch: usize,
    /// Midpoints the interpolator runs at once at most.
    pub interpolate_batch: usize,
    /// Copies of the denoiser, each with a worker of its own; items go to the one with
    /// the shortest queue. On a CPU, copies running one thread each
    /// (`provider.options.intra_threads = 1` on ort) use the cores better than one copy
    /// running a small model on all of them.
    pub denoise_workers: usize,
    /// Copies of the interpolator, likewise.
    pub interpolate_workers: usize,
}

impl Default for VideoConfig {
    fn default() -> Self {
        VideoConfig {
            interpolator: PathBuf::new(),
            keyframes: 8,
            anchors: 3,
            seed: 7,
            difficulty: [0.5, 0.9],
            sigmas: vec![80.0],
            interpolation: 8,
            fps: 16,
            denoise_batch: 2,
            interpolate_batch: 4,
            denoise_workers: 1,
            interpolate_workers: 1,
        }
    }
}

impl VideoConfig {
    /// Frames of the video: the keyframes and the midpoints between them.
    pub fn frames(&self) -> usize {
        (self.keyframes.max(1) - 1) * self.interpolation.max(1) + 1
    }

    /// What is out of range, by key (checked for `task = "video"` only).
    pub fn issues(&self) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        if self.interpolator.as_os_str().is_empty() {
            issues.push(ConfigIssue::new(
                "video.interpolator",
                "\"\"",
                "the interpolation model's file (rife.onnx)",
            ));
        }
        if !(2..=4096).contains(&self.keyframes) {
            issues.push(ConfigIssue::new("video.keyframes", self.keyframes.to_string(), "2..=4096"));
        }
        if !(2..=1024).contains(&self.anchors) {
            issues.push(ConfigIssue::new("video.anchors", self.anchors.to_string(), "2..=1024"));
        }
        if self.difficulty.iter().any(|d| !(0.0..=1.0).contains(d)) {
            issues.push(ConfigIssue::new(
                "video.difficulty",
                format!("{:?}", self.difficulty),
                "two values in [0, 1]",
            ));
        }
        if self.sigmas.is_empty() || self.sigmas.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
            issues.push(ConfigIssue::new(
                "video.sigmas",
                format!("{:?}", self.sigmas),
                "one or more positive noise levels, e.g. [80.0] or [80.0, 20.0, 5.0]",
            ));
        }
        if !self.interpolation.is_power_of_two() || self.interpolation > 64 {
            issues.push(ConfigIssue::new(
                "video.interpolation",
                self.interpolation.to_string(),
                "1, 2, 4, 8, 16, 32 or 64",
            ));
        }
        if !(1..=120).contains(&self.fps) {
            issues.push(ConfigIssue::new("video.fps", self.fps.to_string(), "1..=120"));
        }
        for (key, value) in
            [("video.denoise_batch", self.denoise_batch), ("video.interpolate_batch", self.interpolate_batch)]
        {
            if !(1..=1024).contains(&value) {
                issues.push(ConfigIssue::new(key, value.to_string(), "1..=1024"));
            }
        }
        for (key, value) in [
            ("video.denoise_workers", self.denoise_workers),
            ("video.interpolate_workers", self.interpolate_workers),
        ] {
            if !(1..=64).contains(&value) {
                issues.push(ConfigIssue::new(key, value.to_string(), "1..=64"));
            }
        }
        issues
    }
}
