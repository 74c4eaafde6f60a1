//! Times the two halves of a Qwen2.5-VL prompt on the CPU — the images through the
//! vision tower, then the prefill of the prompt with their rows in place — as the
//! provider runs them, without the engine around them: for A/B runs of the kernels.
//!
//!     cargo run --release -p kiln-provider-candle --example qwen2vl_prompt_timing -- \
//!         MODEL_DIR IMAGE... [--reps 4] [--arithmetic bf16|int8|as-stored] [--max-pixels 100352]
//!
//! The prompt is 20 text tokens, each image's placeholder tokens, and 30 more; every
//! repetition prints the two times, and the last line the best of each.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Device;
use kiln_provider_candle::qwen2vl::{Arithmetic, QwenVl};
use kiln_vision::ImageInput;
use kiln_vision::qwen2vl::{QwenVlProcessor, QwenVlSettings};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().ok_or("usage: MODEL_DIR IMAGE... [--reps N] [--arithmetic A]")?);
    let (mut images, mut reps, mut arithmetic, mut max_pixels) =
        (Vec::new(), 4usize, Arithmetic::Bf16, None::<u64>);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--reps" => reps = value()?.parse()?,
            "--max-pixels" => max_pixels = Some(value()?.parse()?),
            "--arithmetic" => {
                arithmetic = match value()?.as_str() {
                    "bf16" => Arithmetic::Bf16,
                    "int8" => Arithmetic::Int8Activations,
                    "as-stored" => Arithmetic::AsStored,
                    other => return Err(format!("--arithmetic {other}: bf16, int8 or as-stored").into()),
                }
            }
            _ => images.push(PathBuf::from(arg)),
        }
    }
    if images.is_empty() {
        return Err("no images given".into());
    }
    let started = Instant::now();
    let model = QwenVl::load_with(&dir, &Device::Cpu, true, arithmetic)?;
    eprintln!("loaded in {:.1} s", started.elapsed().as_secs_f64());
    let mut settings = QwenVlSettings::from_model_dir(&dir)?;
    if let Some(max) = max_pixels {
        settings.max_pixels = max;
    }
    let processor = QwenVlProcessor::new(settings, 1 << 28, 1 << 28)?;
    let (mut pixels, mut grids) = (Vec::new(), Vec::new());
    for image in images {
        let processed = processor.process(&ImageInput::Path(image))?;
        pixels.extend_from_slice(&processed.pixel_values);
        grids.push(processed.grid_thw);
    }
    let config = model.config();
    let merge = config.vision.spatial_merge_size * config.vision.spatial_merge_size;
    let mut ids: Vec<u32> = (100..120).collect();
    for grid in &grids {
        ids.push(config.vision_start_token_id);
        ids.extend(std::iter::repeat_n(config.image_token_id, grid.iter().product::<usize>() / merge));
        ids.push(config.vision_start_token_id + 1); // <|vision_end|>
    }
    ids.extend(200..230);
    eprintln!("grids {grids:?}, a prompt of {} tokens", ids.len());
    let (mut best_tower, mut best_prefill) = (f64::MAX, f64::MAX);
    for _ in 0..reps {
        let started = Instant::now();
        let rows = model.encode_images(&pixels, &grids)?;
        let tower = started.elapsed().as_secs_f64();
        let started = Instant::now();
        let mut cache = model.new_cache();
        model.prefill(&ids, Some(&rows), &grids, &mut cache, 1)?;
        let prefill = started.elapsed().as_secs_f64();
        eprintln!("tower {tower:.3} s, prefill {prefill:.3} s");
        (best_tower, best_prefill) = (best_tower.min(tower), best_prefill.min(prefill));
    }
    println!(
        "best: tower {best_tower:.3} s, prefill {best_prefill:.3} s, together {:.3} s",
        best_tower + best_prefill
    );
    Ok(())
}
