//! kiln's Qwen2-VL image processor against transformers' `Qwen2VLImageProcessor` (the
//! PIL path) on the fixture `scripts/setup vlm` makes: photos of several sizes and
//! aspect ratios — one under `min_pixels` — with the checkpoint's settings and with a
//! user's lower `max_pixels`. The grids must be equal and the pixel values within 1e-4
//! (mean abs); the resize is Pillow's arithmetic, so they are expected equal.

use std::path::PathBuf;

use kiln_vision::{ImageInput, QwenVlProcessor, QwenVlSettings, read_npy};

fn fixture() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.kiln/models/qwen25vl-tiny");
    assert!(
        dir.join("processor.json").is_file(),
        "{} is missing: run `scripts/setup vlm` (scripts/test does)",
        dir.display()
    );
    dir
}

#[test]
fn grids_and_pixel_values_equal_transformers_on_every_photo() {
    let dir = fixture();
    let cases: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("processor.json")).unwrap()).unwrap();
    let checkpoint = QwenVlSettings::from_model_dir(&dir.join("model")).unwrap();
    let mut worst = 0f64;
    for case in cases.as_array().unwrap() {
        let name = case["case"].as_str().unwrap();
        let settings = QwenVlSettings {
            min_pixels: case["min_pixels"].as_u64().unwrap(),
            max_pixels: case["max_pixels"].as_u64().unwrap(),
            ..checkpoint.clone()
        };
        let processor = QwenVlProcessor::new(settings, 64_000_000, 64 << 20).unwrap();
        let image = ImageInput::path(dir.join("images").join(case["image"].as_str().unwrap()));
        let got = processor.process(&image).unwrap();
        let grid: Vec<usize> = serde_json::from_value(case["grid_thw"].clone()).unwrap();
        assert_eq!(got.grid_thw.to_vec(), grid, "{name}: grid_thw");
        let expected = read_npy(&dir.join("processor").join(format!("{name}.npy"))).unwrap();
        assert_eq!(expected.shape(), [got.patches(), 1176], "{name}: shape");
        let expected = expected.to_f32_vec().unwrap();
        let (mut sum, mut max) = (0f64, 0f32);
        for (a, b) in got.pixel_values.iter().zip(&expected) {
            let d = (a - b).abs();
            sum += f64::from(d);
            max = max.max(d);
        }
        let mean = sum / expected.len() as f64;
        println!("{name}: grid {grid:?}, mean abs {mean:.2e}, max abs {max:.2e}");
        assert!(mean <= 1e-4, "{name}: mean abs difference {mean:.3e} (max {max:.3e})");
        worst = worst.max(mean);
    }
    println!("worst mean abs difference: {worst:.2e}");
}

#[test]
fn the_checkpoint_settings_are_read_from_its_folder() {
    let s = QwenVlSettings::from_model_dir(&fixture().join("model")).unwrap();
    assert_eq!(
        (s.min_pixels, s.max_pixels, s.patch_size, s.temporal_patch_size, s.merge_size),
        (3136, 50176, 14, 2, 2)
    );
    assert_eq!(s.patch_values(), 1176);
}
