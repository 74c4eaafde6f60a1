//! `task = "video"`: a pipeline of two models, each behind kiln's batching worker.
//!
//! 1. **Keyframes**: the denoiser (`model.path`, a consistency model such as the terrain
//!    UNet: `noisy [b,1,H,W]`, `sigma [b]`, `difficulty [b]` → `denoised [b,1,H,W]`)
//!    samples `video.keyframes` frames along a smooth path in noise space ([`noise`]:
//!    seeded anchors joined by spherical interpolation) while the conditioning moves
//!    from `difficulty[0]` to `difficulty[1]`. One step starts from `noise × sigmas[0]`;
//!    each further step re-noises the estimate to the next sigma (consistency
//!    multistep sampling). Heights become colours ([`colormap`]).
//! 2. **Interpolation**: the interpolator (`video.interpolator`, RIFE: `img0`, `img1` →
//!    `midpoint`) puts a frame between every two neighbours, `log2(video.interpolation)`
//!    times.
//!
//! Every keyframe and every midpoint is an item submitted to its model's worker, which
//! batches what is waiting (up to `video.denoise_batch` / `video.interpolate_batch`), so
//! frames of one video — and of concurrent renders — share runs; and an interval's
//! midpoints start as soon as its two keyframes are there, so the stages overlap. On a
//! GPU the batches are padded to whole ones and that shape warmed up at load
//! (`batching.batch_multiple` and `batching.warmup`, their GPU defaults): a backend sets
//! up each new shape, which cost more than the runs themselves.
//! [`write`] turns the frames into a GIF, MP4 (with `ffmpeg`), PNGs or a `.npy` array.
//!
//! Keyframes go through the configured result cache (`[cache]`), keyed by the denoiser,
//! the seed, the anchors, the keyframe's place on the path, its conditioning and the
//! sigma schedule: with `cache.kind = "disk"` (or `"redis"`) a later render of the same
//! keyframes — a longer interpolation, another output format — runs no denoiser.

pub mod colormap;
pub mod noise;
pub mod write;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::{Shared, join_all};
use kiln_core::{Cache, NamedTensors};
use kiln_core::{
    Error, Inputs, KilnConfig, ModelSpec, Profiler, Result, Task, Tensor, VideoConfig, WhenFull,
};
use kiln_runtime::{BatchPolicy, ModelManager, ModelWorker, Parts, Replicas, Reports, cache_key};

/// A rendered video: RGB frames, planar `[3, height, width]`, values in [0, 1].
#[derive(Debug, Clone)]
pub struct Video {
    /// Every frame, in order.
    pub frames: Vec<Arc<Vec<f32>>>,
    /// Frame height and width.
    pub height: usize,
    /// Frame width.
    pub width: usize,
    /// Frames per second to play them at.
    pub fps: u32,
    /// Indices into `frames` of the keyframes.
    pub keyframes: Vec<usize>,
    /// Seconds until the last keyframe was made, and in all.
    pub keyframe_seconds: f64,
    /// Seconds for the whole render.
    pub seconds: f64,
    /// Keyframes the result cache held (no denoiser run for them).
    pub cached_keyframes: usize,
}

/// The two stages, loaded: build once, render as often as wanted.
pub struct VideoPipeline {
    config: VideoConfig,
    denoiser: Replicas,
    interpolator: Replicas,
    profiler: Arc<dyn Profiler>,
    /// The profiler's outputs.
    reports: Reports,
    cache: Arc<dyn Cache>,
    /// The denoiser's identity in keyframe cache keys.
    identity: String,
    height: usize,
    width: usize,
}

const NOISY: &str = "noisy";
const SIGMA: &str = "sigma";
const DIFFICULTY: &str = "difficulty";
const DENOISED: &str = "denoised";
/// The keyframe cache's entry: the denoiser's heights, `[H, W]`.
const HEIGHTS: &str = "heights";

impl VideoPipeline {
    /// Loads the denoiser (`model.path`) and the interpolator (`video.interpolator`) on
    /// `provider.name`, each with a batching worker of its own: [`Parts::from_config`],
    /// then [`from_parts`](Self::from_parts).
    pub async fn from_config(config: KilnConfig) -> Result<Self> {
        Self::from_parts(Parts::from_config(config)?).await
    }

    /// Loads the two models of `parts`' config on its provider and first device. The
    /// trackers stay in `parts` (the video task logs once, at the end: take them with
    /// [`Parts::take_trackers`] first).
    pub async fn from_parts(parts: Parts) -> Result<Self> {
        let config = &parts.config;
        if config.task != Task::Video {
            return Err(Error::Unsupported(format!(
                "the video pipeline runs task = \"video\" configs; this one's task is \"{}\"",
                config.task.as_str()
            )));
        }
        let provider = parts.provider.clone();
        let cache = parts.cache()?;
        let identity = format!(
            "kiln-video-keyframe-v1|{}|{}|{:?}",
            provider.name(),
            config.model.path.display(),
            config.model.dtype
        );
        let profiler = parts.profiler.clone();
        let models = ModelManager::new(config.models.clone())
            .with_profiler(profiler.clone())
            .with_monitor(parts.monitor.clone());
        let device = parts.device();
        let policy = |batch: usize| BatchPolicy {
            max_batch_size: batch,
            max_batch_tokens: 0,
            max_wait: Duration::from_millis(config.batching.max_wait_ms),
            queue_capacity: config.video.frames().max(batch) * 2,
            when_full: WhenFull::Wait,
            // On a GPU every stage runs whole batches (rows of zeros fill a partial one,
            // `batching.batch_multiple`'s default there, capped by the stage's batch):
            // one input shape per model, set up once at load. With a shape per batch
            // size, ONNX Runtime's CUDA provider spent ~200 ms setting up each new one
            // (docs/benchmarks.md), and dynamic batching makes new ones all the time.
            batch_multiple: config.batching.batch_multiple_on(device),
            sequence_multiple: 1,
        };
        let spec = |path: &std::path::Path| ModelSpec::new(path, device, config.model.dtype);
        let v = &config.video;
        let mut stages = Vec::with_capacity(2);
        for (path, batch, copies) in [
            (&config.model.path, v.denoise_batch, v.denoise_workers),
            (&v.interpolator, v.interpolate_batch, v.interpolate_workers),
        ] {
            let mut workers = Vec::with_capacity(copies);
            for replica in 0..copies {
                workers
                    .push(models.load_replica(provider.clone(), spec(path), policy(batch), replica).await?);
            }
            stages.push(Replicas::new(workers)?);
        }
        if config.batching.warmup_on(device) {
            for stage in &stages {
                stage.warm_up(None, None).await?;
            }
        }
        let interpolator = stages.pop().expect("two stages");
        let denoiser = stages.pop().expect("two stages");
        let (height, width) = frame_size(denoiser.first())?;
        Ok(VideoPipeline {
            config: config.video.clone(),
            denoiser,
            interpolator,
            reports: parts.reports(),
            profiler,
            cache,
            identity,
            height,
            width,
        })
    }

    /// Model runs of each stage so far, by batch size (all copies together): the
    /// denoiser's, then the interpolator's.
    pub fn batch_stats(&self) -> (kiln_runtime::BatchStats, kiln_runtime::BatchStats) {
        (self.denoiser.batch_stats(), self.interpolator.batch_stats())
    }

    /// The profiler the stages' spans went to.
    pub fn profiler(&self) -> &Arc<dyn Profiler> {
        &self.profiler
    }

    /// The profiler's outputs: the report and the Chrome trace, as every front writes them.
    pub fn reports(&self) -> &Reports {
        &self.reports
    }

    /// Renders the configured video. `progress(stage, done, total)` is called as
    /// keyframes (`"keyframes"`) and midpoints (`"interpolation"`) finish.
    pub async fn render(&self, progress: &(dyn Fn(&str, usize, usize) + Sync)) -> Result<Video> {
        let started = Instant::now();
        let c = &self.config;
        let keys = c.keyframes;
        let keyframe_done = std::sync::atomic::AtomicUsize::new(0);
        let cached = std::sync::atomic::AtomicUsize::new(0);
        let keyframe_end = std::sync::Mutex::new(Duration::ZERO);
        let len = self.height * self.width;
        let paths: Vec<noise::Path> =
            (0..c.sigmas.len()).map(|step| noise::Path::new(c.seed, step, c.anchors, len)).collect();
        let keyframes: Vec<Shared<_>> = (0..keys)
            .map(|i| {
                let (done, end, cached, paths) = (&keyframe_done, &keyframe_end, &cached, &paths);
                async move {
                    let frame = self.keyframe(i, paths, cached).await.map(Arc::new).map_err(Arc::new);
                    let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                    progress("keyframes", n, keys);
                    *end.lock().unwrap_or_else(|p| p.into_inner()) = started.elapsed();
                    frame
                }
                .boxed()
                .shared()
            })
            .collect();
        let levels = c.interpolation.trailing_zeros() as usize;
        let total_midpoints = (keys - 1) * (c.interpolation - 1);
        let midpoints_done = std::sync::atomic::AtomicUsize::new(0);
        // One interval per pair of neighbouring keyframes; each starts when its two are made.
        let intervals = (0..keys - 1).map(|i| {
            let (left, right) = (keyframes[i].clone(), keyframes[i + 1].clone());
            let done = &midpoints_done;
            async move {
                // Both at once: awaited in turn, the last keyframe would start only when
                // the one before it was made, in a batch of its own.
                let (left, right) = futures_util::future::join(left, right).await;
                let (left, right) = (left.map_err(unshare)?, right.map_err(unshare)?);
                let mut frames = vec![left, right];
                for _ in 0..levels {
                    let pairs = frames.windows(2).map(|w| self.midpoint(w[0].clone(), w[1].clone()));
                    let mids = join_all(pairs).await.into_iter().collect::<Result<Vec<_>>>()?;
                    let n = done.fetch_add(mids.len(), std::sync::atomic::Ordering::Relaxed) + mids.len();
                    progress("interpolation", n, total_midpoints);
                    let mut next = Vec::with_capacity(frames.len() * 2 - 1);
                    for (frame, mid) in frames.iter().zip(mids) {
                        next.push(frame.clone());
                        next.push(Arc::new(mid));
                    }
                    next.push(frames.last().expect("two frames at least").clone());
                    frames = next;
                }
                Ok::<_, Error>(frames)
            }
        });
        let intervals = join_all(intervals).await;
        let mut frames = Vec::with_capacity(c.frames());
        for (i, interval) in intervals.into_iter().enumerate() {
            let interval = interval?;
            // Each interval ends with the next one's first keyframe.
            let take = if i + 2 == keys { interval.len() } else { interval.len() - 1 };
            frames.extend(interval.into_iter().take(take));
        }
        let keyframe_seconds = keyframe_end.lock().unwrap_or_else(|p| p.into_inner()).as_secs_f64();
        Ok(Video {
            keyframes: (0..keys).map(|k| k * c.interpolation).collect(),
            frames,
            height: self.height,
            width: self.width,
            fps: c.fps,
            keyframe_seconds,
            seconds: started.elapsed().as_secs_f64(),
            cached_keyframes: cached.load(std::sync::atomic::Ordering::Relaxed),
        })
    }

    /// Keyframe `i`: the sampling steps along the path (or the cache's copy of their
    /// result), then the colour map.
    async fn keyframe(
        &self,
        i: usize,
        paths: &[noise::Path],
        cached: &std::sync::atomic::AtomicUsize,
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        let _span = self.profiler.span("video_keyframe");
        let t = if c.keyframes > 1 { i as f64 / (c.keyframes - 1) as f64 } else { 0.0 };
        let difficulty = c.difficulty[0] + (c.difficulty[1] - c.difficulty[0]) * t as f32;
        let sigmas: Vec<u8> = c.sigmas.iter().flat_map(|s| s.to_le_bytes()).collect();
        let key = cache_key(&[
            self.identity.as_bytes(),
            &c.seed.to_le_bytes(),
            &(c.anchors as u64).to_le_bytes(),
            &t.to_bits().to_le_bytes(),
            &difficulty.to_bits().to_le_bytes(),
            &sigmas,
        ]);
        let stored =
            self.cache.get(&key).and_then(|hit| hit.get(HEIGHTS).and_then(|h| h.to_vec::<f32>().ok()));
        if let Some(heights) = stored {
            cached.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Ok(colormap::colormap(&heights));
        }
        let heights = self.sample(paths, t, difficulty).await?;
        let entry = NamedTensors::new()
            .with(HEIGHTS, Tensor::from_vec(vec![self.height, self.width], heights.clone())?);
        self.cache.insert(key, Arc::new(entry));
        Ok(colormap::colormap(&heights))
    }

    /// The denoiser's sampling steps at `t` on the paths (one a step): the keyframe's
    /// heights.
    async fn sample(&self, paths: &[noise::Path], t: f64, difficulty: f32) -> Result<Vec<f32>> {
        let c = &self.config;
        let mut denoised: Option<Vec<f32>> = None;
        for (step, &sigma) in c.sigmas.iter().enumerate() {
            let noise = paths[step].at(t);
            let noisy: Vec<f32> = match &denoised {
                None => noise.iter().map(|n| n * sigma).collect(),
                Some(d) => d.iter().zip(&noise).map(|(d, n)| d + sigma * n).collect(),
            };
            let inputs = Inputs::new()
                .with(NOISY, Tensor::from_vec(vec![1, 1, self.height, self.width], noisy)?)
                .with(SIGMA, Tensor::from_vec(vec![1], vec![sigma])?)
                .with(DIFFICULTY, Tensor::from_vec(vec![1], vec![difficulty])?);
            let out = self.denoiser.pick().submit(inputs, 1).await?;
            denoised = Some(out.outputs.require(DENOISED)?.to_vec::<f32>()?);
        }
        Ok(denoised.expect("one sampling step at least"))
    }

    /// The interpolator's frame halfway between `a` and `b`.
    async fn midpoint(&self, a: Arc<Vec<f32>>, b: Arc<Vec<f32>>) -> Result<Vec<f32>> {
        let _span = self.profiler.span("video_midpoint");
        let shape = vec![1, 3, self.height, self.width];
        let inputs = Inputs::new()
            .with("img0", Tensor::from_vec(shape.clone(), a.to_vec())?)
            .with("img1", Tensor::from_vec(shape, b.to_vec())?);
        let out = self.interpolator.pick().submit(inputs, 1).await?;
        let (_, mid) = out
            .outputs
            .iter()
            .next()
            .ok_or_else(|| Error::backend("kiln", "the interpolator gave no output"))?;
        mid.to_vec::<f32>()
    }

    /// Stops both stages' workers and waits for their threads (in-flight renders finish
    /// first).
    pub async fn shutdown(self) {
        self.denoiser.release().await;
        self.interpolator.release().await;
    }
}

/// The figures of a render for the trackers (`video/*`): frames, seconds, frames per
/// second, and from the profile each stage's time (p50 and total, milliseconds).
pub fn metrics(video: &Video, profile: &kiln_core::ProfileReport) -> kiln_core::Metrics {
    let mut m = kiln_core::Metrics::new();
    m.insert("video/frames".into(), video.frames.len() as f64);
    m.insert("video/keyframes".into(), video.keyframes.len() as f64);
    m.insert("video/seconds".into(), video.seconds);
    m.insert("video/keyframe_seconds".into(), video.keyframe_seconds);
    m.insert("video/frames_per_s".into(), video.frames.len() as f64 / video.seconds.max(1e-9));
    for (span, stage) in
        [("video_keyframe", "keyframe"), ("video_midpoint", "midpoint"), ("model_run", "model_run")]
    {
        if let Some(s) = profile.spans.get(span) {
            m.insert(format!("video/{stage}_ms_p50"), s.p50_ms);
            m.insert(format!("video/{stage}_ms_total"), s.total_ms);
        }
    }
    m
}

/// The mean absolute difference of two frames (or any two equal-length buffers): how far
/// apart neighbours are, or kiln's frames from a reference's.
pub fn mean_abs_difference(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| f64::from((x - y).abs())).sum::<f64>() / a.len().max(1) as f64
}

/// A shared keyframe's error, for the intervals that waited on it.
fn unshare(e: Arc<Error>) -> Error {
    Arc::try_unwrap(e).unwrap_or_else(|shared| Error::backend("kiln", shared.to_string()))
}

/// The denoiser's frame size from its `noisy` input (`[b, 1, H, W]`, H and W fixed).
fn frame_size(denoiser: &ModelWorker) -> Result<(usize, usize)> {
    let info = denoiser.info();
    let spec = info.inputs.iter().find(|s| s.name == NOISY).ok_or_else(|| {
        Error::InvalidInput(format!(
            "the denoiser takes {:?}; the video pipeline needs `noisy`, `sigma` and `difficulty`",
            info.inputs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>()
        ))
    })?;
    match spec.shape.as_slice() {
        [_, _, kiln_core::Dim::Fixed(h), kiln_core::Dim::Fixed(w)] => Ok((*h, *w)),
        other => Err(Error::InvalidInput(format!(
            "the denoiser's `noisy` input has shape {other:?}; the video pipeline needs [batch, 1, H, W] with H and W fixed"
        ))),
    }
}
