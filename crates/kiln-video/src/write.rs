//! Frames to files, chosen by the output's extension: `.gif` (animated, looping; no
//! extra dependency), `.mp4` (H.264 through `ffmpeg` on `PATH`, Debian's package),
//! `.png` (one file per frame: `name_0000.png`, ...) and `.npy` (the float frames,
//! `[frames, 3, H, W]`, for comparisons).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use image::codecs::gif::{GifEncoder, Repeat};
use image::{Delay, Frame, RgbImage, RgbaImage};
use kiln_core::{Error, Result, Tensor};

use crate::Video;

/// What was written, for the run's output line.
#[derive(Debug, Clone, PartialEq)]
pub struct Written {
    /// The format, in words: "an animated GIF", "an MP4 (H.264, ffmpeg)", ...
    pub format: &'static str,
    /// The files written.
    pub files: Vec<PathBuf>,
    /// The GIF's bytes when the format was GIF, so the trackers need not encode it again.
    pub gif: Option<Vec<u8>>,
}

/// The extension `path` names a format by, checked before any rendering: `gif`, `mp4`,
/// `png` or `npy`, else an error naming them.
pub fn check_path(path: &Path) -> Result<&'static str> {
    match path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).as_deref() {
        Some("gif") => Ok("gif"),
        Some("mp4") => Ok("mp4"),
        Some("png") => Ok("png"),
        Some("npy") => Ok("npy"),
        _ => Err(Error::InvalidInput(format!(
            "cannot write a video to {}: name it .gif, .mp4 (needs ffmpeg on PATH), .png (one file per frame) or .npy",
            path.display()
        ))),
    }
}

/// Writes `video` to `path` in the format its extension names.
pub fn write(video: &Video, path: &Path) -> Result<Written> {
    let io = |e: std::io::Error| Error::io("writing", path.display().to_string(), e);
    match check_path(path)? {
        "gif" => {
            let bytes = gif(video)?;
            std::fs::write(path, &bytes).map_err(io)?;
            Ok(Written { format: "an animated GIF", files: vec![path.to_path_buf()], gif: Some(bytes) })
        }
        "png" => {
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("frame");
            let dir = path.parent().unwrap_or(Path::new("."));
            let mut files = Vec::with_capacity(video.frames.len());
            for (i, frame) in video.frames.iter().enumerate() {
                let file = dir.join(format!("{stem}_{i:04}.png"));
                rgb(video, frame).save(&file).map_err(|e| image_error(&file, e))?;
                files.push(file);
            }
            Ok(Written { format: "a PNG sequence", files, gif: None })
        }
        "npy" => {
            let data: Vec<f32> = video.frames.iter().flat_map(|f| f.iter().copied()).collect();
            let tensor = Tensor::from_vec(vec![video.frames.len(), 3, video.height, video.width], data)?;
            kiln_vision::write_npy(path, &tensor)?;
            Ok(Written {
                format: "a float32 .npy array [frames, 3, H, W]",
                files: vec![path.to_path_buf()],
                gif: None,
            })
        }
        _ => mp4(video, path),
    }
}

/// The video as an animated GIF that loops, in memory (for a file, or for the trackers).
pub fn gif(video: &Video) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    {
        // Speed 10 of 1..=30: NeuQuant's palette per frame in ~10 ms at 128 × 128.
        let mut encoder = GifEncoder::new_with_speed(&mut bytes, 10);
        let fail = |e: image::ImageError| Error::backend("gif", format!("encoding the video as a GIF: {e}"));
        encoder.set_repeat(Repeat::Infinite).map_err(fail)?;
        let delay = Delay::from_numer_denom_ms(1000, video.fps.max(1));
        for frame in &video.frames {
            let rgba = RgbaImage::from_fn(video.width as u32, video.height as u32, |x, y| {
                let [r, g, b] = pixel(video, frame, x as usize, y as usize);
                image::Rgba([r, g, b, 255])
            });
            encoder.encode_frame(Frame::from_parts(rgba, 0, 0, delay)).map_err(fail)?;
        }
    }
    Ok(bytes)
}

/// H.264 through `ffmpeg` (raw RGB frames on its stdin).
fn mp4(video: &Video, path: &Path) -> Result<Written> {
    let size = format!("{}x{}", video.width, video.height);
    let spawned = Command::new("ffmpeg")
        .args(["-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", &size, "-r"])
        .arg(video.fps.to_string())
        .args(["-i", "-", "-c:v", "libx264", "-pix_fmt", "yuv420p"])
        .arg(path)
        .stdin(Stdio::piped())
        .spawn();
    let mut child = spawned.map_err(|e| {
        Error::Unsupported(format!(
            "writing {} needs ffmpeg on PATH ({e}); install Debian's ffmpeg package, or name the output .gif",
            path.display()
        ))
    })?;
    let mut stdin = child.stdin.take().expect("piped");
    let io = |e: std::io::Error| Error::io("piping frames to", "ffmpeg", e);
    for frame in &video.frames {
        stdin.write_all(rgb(video, frame).as_raw()).map_err(io)?;
    }
    drop(stdin);
    let status = child.wait().map_err(io)?;
    if !status.success() {
        return Err(Error::backend("ffmpeg", format!("ffmpeg failed ({status}) writing {}", path.display())));
    }
    Ok(Written { format: "an MP4 (H.264, by ffmpeg)", files: vec![path.to_path_buf()], gif: None })
}

/// The 8-bit colour of pixel (x, y) of a planar frame.
fn pixel(video: &Video, frame: &[f32], x: usize, y: usize) -> [u8; 3] {
    let plane = video.height * video.width;
    let at = y * video.width + x;
    std::array::from_fn(|c| (frame[c * plane + at].clamp(0.0, 1.0) * 255.0).round() as u8)
}

fn rgb(video: &Video, frame: &[f32]) -> RgbImage {
    RgbImage::from_fn(video.width as u32, video.height as u32, |x, y| {
        image::Rgb(pixel(video, frame, x as usize, y as usize))
    })
}

fn image_error(path: &Path, e: image::ImageError) -> Error {
    Error::io("writing", path.display().to_string(), std::io::Error::other(e))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn video() -> Video {
        let frame = |v: f32| Arc::new(vec![v; 3 * 4 * 6]);
        Video {
            frames: vec![frame(0.0), frame(0.5), frame(1.0)],
            height: 4,
            width: 6,
            fps: 10,
            keyframes: vec![0, 2],
            keyframe_seconds: 0.0,
            seconds: 0.0,
            cached_keyframes: 0,
        }
    }

    #[test]
    fn gif_png_and_npy_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let gif = dir.path().join("v.gif");
        assert_eq!(write(&video(), &gif).unwrap().format, "an animated GIF");
        let decoded = image::open(&gif).unwrap().to_rgb8();
        assert_eq!((decoded.width(), decoded.height()), (6, 4));
        let pngs = write(&video(), &dir.path().join("f.png")).unwrap().files;
        assert_eq!(pngs.len(), 3);
        assert_eq!(image::open(&pngs[1]).unwrap().to_rgb8().get_pixel(0, 0).0, [128, 128, 128]);
        let npy = std::fs::read({
            let p = dir.path().join("v.npy");
            write(&video(), &p).unwrap();
            p
        })
        .unwrap();
        assert_eq!(npy.len() % 16, 0, "64-byte header, f32 data");
        let header_len = u16::from_le_bytes([npy[8], npy[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        assert!(String::from_utf8_lossy(&npy[10..10 + header_len]).contains("'shape': (3, 3, 4, 6)"));
        assert_eq!(npy.len(), 10 + header_len + 3 * 3 * 4 * 6 * 4);
    }

    #[test]
    fn an_unknown_extension_names_the_ones_there_are() {
        let e = write(&video(), Path::new("/tmp/x.avi")).unwrap_err().to_string();
        assert!(e.contains(".gif") && e.contains(".mp4") && e.contains(".npy"), "{e}");
    }
}
