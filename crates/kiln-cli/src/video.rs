//! `kiln run` for `task = "video"`: render the configured video and write it, with a
//! progress bar per stage on a terminal.

use anyhow::{Context, Result};
use kiln::runtime::Parts;
use kiln::video::{VideoPipeline, write};
use kiln::{KilnConfig, Tracker as _};

use crate::RunArgs;
use crate::output::progress_bar;

pub(crate) async fn run(config: KilnConfig, args: &RunArgs) -> Result<()> {
    let video_config = config.video.clone();
    // A name that cannot be written, or a tracker's bad config, is refused before the
    // minutes of rendering.
    write::check_path(&args.output)?;
    let mut parts = Parts::from_config(config)?;
    let mut trackers: Vec<Box<dyn kiln::Tracker>> =
        parts.take_trackers().into_iter().map(|(_, tracker)| tracker).collect();
    warn(trackers.log_config(&serde_json::to_value(&parts.config)?));
    let pipeline = VideoPipeline::from_parts(parts).await.context("loading the video pipeline")?;
    let bars = indicatif::MultiProgress::new();
    let keyframes = bars.add(progress_bar(video_config.keyframes, "keyframes"));
    let midpoints =
        bars.add(progress_bar((video_config.keyframes - 1) * (video_config.interpolation - 1), "midpoints"));
    let video = pipeline
        .render(&|stage, done, _total| match stage {
            "keyframes" => keyframes.set_position(done as u64),
            _ => midpoints.set_position(done as u64),
        })
        .await?;
    keyframes.finish_and_clear();
    midpoints.finish_and_clear();
    let mut written = write::write(&video, &args.output)?;
    let report = pipeline.reports().report();
    args.profiler.write(pipeline.reports())?;
    if !trackers.is_empty() {
        // Metrics at step 1, the video at step 2 (W&B wants one row per step), then the
        // summary and profile; a tracker that fails is a warning, never a failed run.
        let metrics = kiln::video::metrics(&video, &pipeline.profiler().report());
        warn(trackers.log_metrics(1, &metrics));
        let gif = match written.gif.take() {
            Some(gif) => gif,
            None => write::gif(&video)?,
        };
        let clip = kiln::Clip {
            width: video.width as u32,
            height: video.height as u32,
            fps: video.fps,
            frames: video.frames.len(),
            gif: &gif,
        };
        warn(trackers.log_video(2, "video", &clip));
        warn(trackers.log_summary(&metrics));
        if let Some(report) = &report {
            warn(trackers.log_profile(report));
        }
        warn(trackers.finish());
    }
    pipeline.shutdown().await;
    let shown = match written.files.as_slice() {
        [one] => one.display().to_string(),
        many => format!("{} files, {} ...", many.len(), many[0].display()),
    };
    eprintln!(
        "kiln: wrote {} frames ({}×{}, {} fps; {} keyframes, {} from the cache) to {shown} as {} in {:.2} s (keyframes done at {:.2} s)",
        video.frames.len(),
        video.width,
        video.height,
        video.fps,
        video.keyframes.len(),
        video.cached_keyframes,
        written.format,
        video.seconds,
        video.keyframe_seconds,
    );
    // How smooth it is: neighbours against the two ends (mean absolute difference).
    let diff = |a: &[f32], b: &[f32]| kiln::video::mean_abs_difference(a, b);
    let steps: Vec<f64> = video.frames.windows(2).map(|w| diff(&w[0], &w[1])).collect();
    if let (Some(first), Some(last)) = (video.frames.first(), video.frames.last()) {
        eprintln!(
            "kiln: neighbouring frames differ by {:.4} mean abs on average ({:.4} at most), the first and last by {:.4}",
            steps.iter().sum::<f64>() / steps.len().max(1) as f64,
            steps.iter().copied().fold(0.0, f64::max),
            diff(first, last)
        );
    }
    Ok(())
}

fn warn(result: kiln::Result<()>) {
    if let Err(e) = result {
        tracing::warn!("a tracker failed: {e}");
    }
}

/// `kiln bench` for `task = "video"`: a warm-up render, then `rounds` renders by kiln,
/// each followed, with `reference` (a Python with onnxruntime and numpy), by a render
/// of scripts/video_reference.py — one frame at a time, on kiln's GPU when the config
/// names one (`onnxruntime-gpu` then) — in a process of its own that warms up with one
/// render first. Interleaved, so both sides see the same machine;
/// medians give the ratio, and the reference's frames are held against kiln's.
pub(crate) async fn bench(
    config: KilnConfig,
    rounds: usize,
    reference: Option<&std::path::Path>,
    json: Option<&std::path::Path>,
) -> Result<()> {
    let rounds = rounds.max(1);
    // Every round computes its keyframes: a cache would measure lookups, not the pipeline.
    let mut config = config;
    config.cache.enabled = false;
    let video_config = config.video.clone();
    let (unet, rife) = (config.model.path.clone(), video_config.interpolator.clone());
    // The reference runs on the same GPU as kiln (ONNX Runtime's CUDA provider), or the CPU.
    let reference_device = match config.model.device.fixed() {
        Some(kiln::Device::Cuda(n)) => format!("cuda:{n}"),
        _ => "cpu".to_string(),
    };
    // The reference computes as kiln does: TF32 on the GPU or not (ort's `tf32`).
    let tf32 = config.provider.options.get("tf32").and_then(serde_json::Value::as_bool);
    let pipeline = VideoPipeline::from_config(config).await.context("loading the video pipeline")?;
    let warm_up = pipeline.render(&|_, _, _| {}).await?.seconds;
    let dir = tempfile_dir()?;
    let out = dir.join("reference.npy");
    let mut kiln_rounds = Vec::with_capacity(rounds);
    let mut reference_rounds = Vec::with_capacity(rounds);
    let mut last = None;
    for _ in 0..rounds {
        let video = pipeline.render(&|_, _, _| {}).await?;
        kiln_rounds.push((video.seconds, video.keyframe_seconds));
        last = Some(video);
        if let Some(python) = reference {
            reference_rounds.push(run_reference(
                python,
                &video_config,
                (&reference_device, tf32),
                [&unet, &rife],
                &out,
            )?);
        }
    }
    let video = last.expect("one round at least");
    let profile = pipeline.profiler().report();
    // Runs by items in them, warm-up and every render together: how well each stage batched.
    let (denoiser_batches, interpolator_batches) = pipeline.batch_stats();
    pipeline.shutdown().await;
    let kiln_median = median(kiln_rounds.iter().map(|r| r.0).collect());
    eprintln!(
        "kiln: {} frames, warm-up {warm_up:.2} s, rounds {} s, median {kiln_median:.2} s, {:.1} frames/s",
        video.frames.len(),
        seconds_list(kiln_rounds.iter().map(|r| r.0)),
        video.frames.len() as f64 / kiln_median
    );
    let mut report = serde_json::json!({
        "frames": video.frames.len(),
        "kiln_warm_up_s": warm_up,
        "kiln_rounds_s": kiln_rounds.iter().map(|r| r.0).collect::<Vec<_>>(),
        "kiln_keyframes_s": kiln_rounds.iter().map(|r| r.1).collect::<Vec<_>>(),
        "kiln_median_s": kiln_median,
        "spans": profile.spans,
        "denoiser_batches": denoiser_batches,
        "interpolator_batches": interpolator_batches,
    });
    if reference.is_some() {
        let reference_median = median(reference_rounds.clone());
        let frames = kiln::vision::read_npy(&out)?.to_vec::<f32>()?;
        let plane = 3 * video.height * video.width;
        anyhow::ensure!(
            frames.len() == video.frames.len() * plane,
            "the reference made another number of frames"
        );
        let worst = video
            .frames
            .iter()
            .zip(frames.chunks(plane))
            .map(|(k, r)| kiln::video::mean_abs_difference(k, r))
            .fold(0.0, f64::max);
        let ratio = reference_median / kiln_median;
        eprintln!(
            "reference (one frame at a time, each round after a warm-up render): rounds {} s, median \
             {reference_median:.2} s\nkiln / reference speed: {ratio:.2}x; frames differ by {worst:.2e} mean abs at most",
            seconds_list(reference_rounds.iter().copied())
        );
        report["reference_rounds_s"] = serde_json::json!(reference_rounds);
        report["reference_median_s"] = serde_json::json!(reference_median);
        report["speed_ratio"] = serde_json::json!(ratio);
        report["max_frame_mean_abs_diff"] = serde_json::json!(worst);
    }
    let _ = std::fs::remove_dir_all(&dir);
    if let Some(path) = json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// One timed render of scripts/video_reference.py (after its warm-up render) on
/// `device`, TF32 as the config sets it (`None`: ONNX Runtime's default), its frames
/// written to `out`.
fn run_reference(
    python: &std::path::Path,
    c: &kiln::VideoConfig,
    (device, tf32): (&str, Option<bool>),
    [unet, rife]: [&std::path::Path; 2],
    out: &std::path::Path,
) -> Result<f64> {
    // The script of the source tree this binary was built from, else of the working
    // directory's (a binary carried to another machine with a checkout).
    let built = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/video_reference.py");
    let script = [built.clone(), std::path::PathBuf::from("scripts/video_reference.py")]
        .into_iter()
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no {} nor scripts/video_reference.py here (the reference ships with kiln's sources)",
                built.display()
            )
        })?;
    let mut command = std::process::Command::new(python);
    command.arg(&script).arg(unet).arg(rife).arg(out).args(["--device", device]);
    if let Some(tf32) = tf32 {
        command.args(["--tf32", if tf32 { "1" } else { "0" }]);
    }
    command.args(["--seed", &c.seed.to_string(), "--keyframes", &c.keyframes.to_string()]);
    command.args(["--anchors", &c.anchors.to_string(), "--interpolation", &c.interpolation.to_string()]);
    command.args(["--rounds", "2", "--difficulty"]);
    command.args(c.difficulty.iter().map(|d| d.to_string()));
    command.arg("--sigmas").args(c.sigmas.iter().map(|s| s.to_string()));
    let ran = command.output().with_context(|| format!("running {}", script.display()))?;
    anyhow::ensure!(
        ran.status.success(),
        "the Python reference failed: {}",
        String::from_utf8_lossy(&ran.stderr)
    );
    let figures: serde_json::Value = serde_json::from_slice(&ran.stdout)?;
    figures["rounds"][1]["seconds"]
        .as_f64()
        .ok_or_else(|| anyhow::anyhow!("the reference printed no second round: {figures}"))
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn seconds_list(values: impl Iterator<Item = f64>) -> String {
    values.map(|s| format!("{s:.2}")).collect::<Vec<_>>().join(", ")
}

/// A folder of this process's own under the system's temporary folder.
fn tempfile_dir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("kiln-video-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}
