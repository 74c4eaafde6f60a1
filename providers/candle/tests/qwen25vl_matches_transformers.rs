//! Qwen2.5-VL on candle against transformers on the same checkpoint (the seeded random
//! one `scripts/setup vlm` makes, in the layout `save_pretrained` writes): a prompt of
//! two images of different sizes and "Compare these images." — kiln's logits within
//! 1e-3 (max abs) of transformers' at every prefill position, and the same 32 greedy
//! tokens. The images go through kiln's own processor.

use std::path::PathBuf;

use candle_core::Device;
use kiln_provider_candle::qwen2vl::{Arithmetic, QwenVl};
use kiln_vision::{ImageInput, QwenVlProcessor, QwenVlSettings, read_npy};

fn fixture() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.kiln/models/qwen25vl-tiny");
    assert!(
        dir.join("prompt.json").is_file(),
        "{} is missing: run `scripts/setup vlm` (scripts/test does)",
        dir.display()
    );
    dir
}

/// The fixture's prompt: transformers' record of it, its ids and image grids, and its
/// pixel values as transformers' processor gave them.
struct Prompt {
    record: serde_json::Value,
    ids: Vec<u32>,
    grids: Vec<[usize; 3]>,
    pixels: Vec<f32>,
}

fn prompt(dir: &std::path::Path) -> Prompt {
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("prompt.json")).unwrap()).unwrap();
    Prompt {
        ids: serde_json::from_value(record["input_ids"].clone()).unwrap(),
        grids: serde_json::from_value(record["image_grid_thw"].clone()).unwrap(),
        pixels: read_npy(&dir.join("prompt_pixels.npy")).unwrap().to_f32_vec().unwrap(),
        record,
    }
}

fn argmax(row: &[f32]) -> u32 {
    row.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| i as u32).unwrap()
}

/// `count` greedy tokens: the argmax of the prompt's last `logits`, then one decode step
/// per token on `cache`.
fn greedy(
    model: &QwenVl,
    logits: &[Vec<f32>],
    cache: &mut kiln_provider_candle::qwen2vl::KvCache,
    count: usize,
) -> Vec<u32> {
    let mut tokens = vec![argmax(logits.last().unwrap())];
    while tokens.len() < count {
        let next = model.decode(*tokens.last().unwrap(), cache).unwrap().to_vec1::<f32>().unwrap();
        tokens.push(argmax(&next));
    }
    tokens
}

#[test]
fn two_images_and_a_question_give_transformers_logits_and_greedy_tokens() {
    let dir = fixture();
    let Prompt { record, ids, grids: expected_grids, pixels: reference_pixels } = prompt(&dir);
    let expected: Vec<u32> = serde_json::from_value(record["greedy_tokens"].clone()).unwrap();

    let processor =
        QwenVlProcessor::new(QwenVlSettings::from_model_dir(&dir.join("model")).unwrap(), 1 << 26, 1 << 26)
            .unwrap();
    let (mut pixels, mut grids) = (Vec::new(), Vec::new());
    for part in record["messages"][0]["content"].as_array().unwrap() {
        if let Some(path) = part.get("path").and_then(|p| p.as_str()) {
            let image = processor.process(&ImageInput::path(dir.join(path))).unwrap();
            pixels.extend(image.pixel_values);
            grids.push(image.grid_thw);
        }
    }
    assert_eq!(grids, expected_grids);
    assert_eq!(pixels, reference_pixels, "kiln's processor gives transformers' pixel values");

    let model = QwenVl::load(&dir.join("model"), &Device::Cpu).unwrap();
    let images = model.encode_images(&pixels, &grids).unwrap();
    let mut cache = model.new_cache();
    let logits = model.prefill(&ids, Some(&images), &grids, &mut cache, ids.len()).unwrap();
    let logits = logits.to_vec2::<f32>().unwrap();
    let reference = read_npy(&dir.join("prompt_logits.npy")).unwrap();
    let vocab = reference.shape()[1];
    let reference = reference.to_f32_vec().unwrap();
    let mut worst = (0f32, 0usize);
    for (position, row) in logits.iter().enumerate() {
        for (j, v) in row.iter().enumerate() {
            let d = (v - reference[position * vocab + j]).abs();
            if d > worst.0 {
                worst = (d, position);
            }
        }
    }
    println!("largest logit difference {:.2e} at prompt position {} of {}", worst.0, worst.1, ids.len());
    assert!(worst.0 <= 1e-3, "logits differ by {:.3e} at position {}", worst.0, worst.1);

    assert_eq!(greedy(&model, &logits, &mut cache, expected.len()), expected, "32 greedy tokens");
    // A generated image placeholder is an ordinary token when no image comes with it.
    let pad = model.config().image_token_id;
    let logits = model.decode(pad, &mut cache).unwrap().to_vec1::<f32>().unwrap();
    assert!(logits.iter().all(|v| v.is_finite()));
}

/// As a kiln `Generator`: sequences decoding together (one batch of projections, each
/// attending over its own cache) give the tokens and logits they give alone.
#[test]
fn sequences_decoded_together_match_each_alone() {
    use kiln_core::{Generator, ImagePatches, StepImage, StepItem};
    use kiln_provider_candle::qwen2vl::QwenVlGenerator;

    let dir = fixture();
    let Prompt { ids, grids, pixels, .. } = prompt(&dir);
    let generator = QwenVlGenerator::load(&dir.join("model"), 0).unwrap();
    let split = grids[0].iter().product::<usize>() * 1176;
    let patches = vec![
        ImagePatches { values: pixels[..split].to_vec(), grid_thw: grids[0] },
        ImagePatches { values: pixels[split..].to_vec(), grid_thw: grids[1] },
    ];
    let encoded = generator.encode_images(&patches).unwrap();
    let images: Vec<StepImage<'_>> =
        encoded.iter().zip(&grids).map(|(e, g)| StepImage { embedding: e, grid_thw: *g }).collect();
    let text: Vec<u32> = ids[..12].to_vec(); // the system turn: no images

    // Each alone: the prompt, then 6 greedy tokens.
    let alone = |tokens: &[u32], with_images: bool| {
        let mut cache = generator.new_sequence().unwrap();
        let mut item = StepItem::new(tokens, cache.as_mut());
        if with_images {
            item.images = &images;
        }
        let mut logits = generator.step(&mut [item]).unwrap().remove(0);
        let mut all = vec![logits.clone()];
        for _ in 0..6 {
            let next = [argmax(&logits)];
            logits = generator.step(&mut [StepItem::new(&next, cache.as_mut())]).unwrap().remove(0);
            all.push(logits.clone());
        }
        all
    };
    let (a_alone, c_alone) = (alone(&ids, true), alone(&text, false));

    // Together: both prompts in one step, then decoding side by side.
    let (mut a, mut c) = (generator.new_sequence().unwrap(), generator.new_sequence().unwrap());
    let mut first = StepItem::new(&ids, a.as_mut());
    first.images = &images;
    let mut out = generator.step(&mut [first, StepItem::new(&text, c.as_mut())]).unwrap();
    let (mut a_together, mut c_together) = (vec![out.remove(0)], vec![out.remove(0)]);
    for _ in 0..6 {
        let (na, nc) = ([argmax(a_together.last().unwrap())], [argmax(c_together.last().unwrap())]);
        let mut out =
            generator.step(&mut [StepItem::new(&na, a.as_mut()), StepItem::new(&nc, c.as_mut())]).unwrap();
        a_together.push(out.remove(0));
        c_together.push(out.remove(0));
    }
    for (alone, together) in [(&a_alone, &a_together), (&c_alone, &c_together)] {
        for (x, y) in alone.iter().zip(together.iter()) {
            assert_eq!(argmax(x), argmax(y));
            let diff = x.iter().zip(y).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-4, "logits differ by {diff}");
        }
    }
}

/// mlx-community's layout, as mlx-vlm 0.7.10's converter writes it from the fixture
/// (`scripts/make_vlm_mlx_fixture.py`, run by `scripts/setup vlm`): unquantized (mlx-vlm's
/// names, the patch kernel channels-last) against transformers, and quantized to 4, 6 and
/// 8 bits (kept packed) against mlx-vlm's own logits and greedy tokens on the
/// same files and inputs.
#[test]
fn mlx_community_checkpoints_give_mlx_vlm_logits_and_greedy_tokens() {
    let dir = fixture();
    let Prompt { ids, grids, pixels, .. } = prompt(&dir);
    for folder in ["mlx-f32", "mlx-q4", "mlx-q6", "mlx-q8"] {
        let at = dir.join(folder);
        assert!(at.join("reference.json").is_file(), "{} is missing: run `scripts/setup vlm`", at.display());
        let reference: serde_json::Value =
            serde_json::from_slice(&std::fs::read(at.join("reference.json")).unwrap()).unwrap();
        let expected_tokens: Vec<u32> = serde_json::from_value(reference["greedy_tokens"].clone()).unwrap();
        let model = QwenVl::load(&at, &Device::Cpu).unwrap();
        let images = model.encode_images(&pixels, &grids).unwrap();
        let mut cache = model.new_cache();
        let logits = model
            .prefill(&ids, Some(&images), &grids, &mut cache, ids.len())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let expected = read_npy(&at.join("prompt_logits.npy")).unwrap().to_f32_vec().unwrap();
        let worst = logits.iter().flatten().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        println!("{folder}: largest logit difference from mlx-vlm {worst:.2e}");
        assert!(worst <= 1e-3, "{folder}: logits differ from mlx-vlm's by {worst:.3e}");
        let tokens = greedy(&model, &logits, &mut cache, expected_tokens.len());
        assert_eq!(tokens, expected_tokens, "{folder}: mlx-vlm's 32 greedy tokens");
    }
}

/// The prompt's logits from the checkpoint at `dir`, loaded compact or widened at load.
fn prompt_logits(dir: &std::path::Path, prompt: &Prompt, compact: bool) -> Vec<f32> {
    let model = QwenVl::load_as(dir, &Device::Cpu, compact).unwrap();
    let images = model.encode_images(&prompt.pixels, &prompt.grids).unwrap();
    let mut cache = model.new_cache();
    let logits =
        model.prefill(&prompt.ids, Some(&images), &prompt.grids, &mut cache, prompt.ids.len()).unwrap();
    logits.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// Layers kept as stored (packed 4-bit; bf16 — a copy of the fixture written in bf16)
/// and widened a panel at a time compute what the same weights widened at load compute.
#[test]
fn compact_layers_compute_as_the_same_weights_widened_at_load() {
    let dir = fixture();
    let p = prompt(&dir);
    let bf16 = std::env::temp_dir().join(format!("kiln-qwen25vl-bf16-{}", std::process::id()));
    std::fs::create_dir_all(&bf16).unwrap();
    for entry in std::fs::read_dir(dir.join("model")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_owned();
        if path.extension().is_some_and(|e| e == "safetensors") {
            let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
            let tensors: std::collections::HashMap<_, _> = tensors
                .into_iter()
                .map(|(k, t)| (k, t.to_dtype(candle_core::DType::BF16).unwrap()))
                .collect();
            candle_core::safetensors::save(&tensors, bf16.join(name)).unwrap();
        } else if path.is_file() {
            std::fs::copy(&path, bf16.join(name)).unwrap();
        }
    }
    for at in [dir.join("mlx-q4"), bf16.clone()] {
        let (compact, widened) = (prompt_logits(&at, &p, true), prompt_logits(&at, &p, false));
        let worst = compact.iter().zip(&widened).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 1e-4, "{}: compact and widened logits differ by {worst:.3e}", at.display());
    }
    std::fs::remove_dir_all(&bf16).unwrap();
}

/// How a prompt's logits compare with a reference's, for arithmetic that is not the
/// reference's and so agrees only so far.
struct Agreement {
    /// Relative L2 distance over every prompt position's logits.
    relative: f64,
    /// Greedy tokens equal to the reference's before the first difference (after one
    /// difference the two continue different texts, so a near-tie of a random model's
    /// logits early on decides this count).
    greedy: usize,
    /// Prompt positions (teacher-forced: both read the same tokens) whose most likely
    /// next token is the reference's.
    top1: usize,
    /// Prompt positions where the reference's most likely token is among kiln's five.
    top5: usize,
    positions: usize,
}

/// The prompt's logits against a reference's (`reference`, `.npy`) and 32 greedy tokens
/// against `expected`.
fn against(
    model: &QwenVl,
    ids: &[u32],
    grids: &[[usize; 3]],
    pixels: &[f32],
    reference: &std::path::Path,
    expected: &[u32],
) -> Agreement {
    let images = model.encode_images(pixels, grids).unwrap();
    let mut cache = model.new_cache();
    let logits =
        model.prefill(ids, Some(&images), grids, &mut cache, ids.len()).unwrap().to_vec2::<f32>().unwrap();
    let reference = read_npy(reference).unwrap().to_f32_vec().unwrap();
    let diff: f64 = logits.iter().flatten().zip(&reference).map(|(a, b)| f64::from(a - b).powi(2)).sum();
    let norm: f64 = reference.iter().map(|b| f64::from(*b).powi(2)).sum();
    let positions = logits.len();
    let rows = || logits.iter().zip(reference.chunks(reference.len() / positions));
    let top1 = rows().filter(|(a, b)| argmax(a) == argmax(b)).count();
    let top5 = rows()
        .filter(|(a, b)| {
            let wanted = a[argmax(b) as usize];
            a.iter().filter(|&&x| x > wanted).count() < 5
        })
        .count();
    let tokens = greedy(model, &logits, &mut cache, expected.len());
    let greedy = tokens.iter().zip(expected).take_while(|(a, b)| a == b).count();
    let agreement = Agreement { relative: (diff / norm).sqrt(), greedy, top1, top5, positions };
    println!(
        "logits within {:.3e} (relative L2); {greedy} of {} greedy tokens before the first difference; \
         teacher-forced, the reference's next token first at {top1} of {positions} prompt positions, \
         in the top 5 at {top5}",
        agreement.relative,
        expected.len()
    );
    agreement
}

/// `model.quantization = "int8"` on the 4-bit folder: the layers on kiln's VNNI block
/// kernel with activations quantized to int8 per 32 inputs (GGML's `Q4_1 × Q8_1`). Not
/// MLX's arithmetic any more: the logits stay within 10% (relative L2) of mlx-vlm's on
/// this random model (activations far rougher than a trained model's) and its first
/// greedy tokens are mlx-vlm's.
#[test]
fn int8_activations_on_the_4_bit_folder_stay_close_to_mlx_vlm() {
    let dir = fixture();
    let Prompt { ids, grids, pixels, .. } = prompt(&dir);
    let at = dir.join("mlx-q4");
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(at.join("reference.json")).unwrap()).unwrap();
    let expected_tokens: Vec<u32> = serde_json::from_value(reference["greedy_tokens"].clone()).unwrap();
    let model = QwenVl::load_with(&at, &Device::Cpu, true, Arithmetic::Int8Activations).unwrap();
    let Agreement { relative, greedy, .. } =
        against(&model, &ids, &grids, &pixels, &at.join("prompt_logits.npy"), &expected_tokens);
    assert!(relative <= 0.1, "logits differ from mlx-vlm's by {relative:.3e} (relative L2)");
    assert!(greedy >= 8, "only the first {greedy} greedy tokens agree with mlx-vlm's");
}

/// `model.quantization = "int8"` on a checkpoint of floats: every linear layer but the
/// token embedding quantized at load to int8 per output channel (the tied output head
/// too, as a copy), activations to int8 per row. On the transformers folder (f32 weights
/// of a random model, whose activations are far rougher than a trained model's) the
/// logits stay within 12% (relative L2) of transformers' f32 (9.6% measured, bf16's
/// 2.7%), and, read teacher-forced, transformers' next token is kiln's first at four
/// in five prompt positions (151 of 171 measured, bf16's 166) and among its five at
/// every one; and the layers really are int8: the logits are not the f32 path's. (Its
/// greedy continuation agreed for 2 to 11 tokens as rounding moved: a random model's
/// near-ties, not a measure.)
#[test]
fn int8_arithmetic_on_a_float_checkpoint_stays_close_to_transformers() {
    let dir = fixture();
    let Prompt { record, ids, grids, pixels } = prompt(&dir);
    let expected_tokens: Vec<u32> = serde_json::from_value(record["greedy_tokens"].clone()).unwrap();
    let model =
        QwenVl::load_with(&dir.join("model"), &Device::Cpu, true, Arithmetic::Int8Activations).unwrap();
    let Agreement { relative, top1, top5, positions, .. } =
        against(&model, &ids, &grids, &pixels, &dir.join("prompt_logits.npy"), &expected_tokens);
    assert!(relative > 1e-4, "logits within {relative:.3e} of f32's: the layers were not quantized");
    assert!(relative <= 0.12, "logits differ from transformers' by {relative:.3e} (relative L2)");
    assert!(
        5 * top1 >= 4 * positions,
        "transformers' next token first at only {top1} of {positions} positions"
    );
    assert_eq!(top5, positions, "transformers' next token not among kiln's five at every position");
}

/// `model.dtype = "bf16"` (`Arithmetic::Bf16`): every linear layer but the token
/// embedding as bf16 × bf16 products summed in f32 (AMX tiles where the CPU has them),
/// the arithmetic of transformers in bf16. On the transformers folder (f32 weights of a
/// random model) the logits stay within 5% (relative L2) of transformers' f32 and the
/// first greedy tokens are its tokens.
#[test]
fn bf16_arithmetic_stays_close_to_transformers() {
    let dir = fixture();
    let Prompt { record, ids, grids, pixels } = prompt(&dir);
    let expected_tokens: Vec<u32> = serde_json::from_value(record["greedy_tokens"].clone()).unwrap();
    let model = QwenVl::load_with(&dir.join("model"), &Device::Cpu, true, Arithmetic::Bf16).unwrap();
    let Agreement { relative, greedy, .. } =
        against(&model, &ids, &grids, &pixels, &dir.join("prompt_logits.npy"), &expected_tokens);
    assert!(relative <= 0.05, "logits differ from transformers' by {relative:.3e} (relative L2)");
    assert!(greedy >= 8, "only the first {greedy} greedy tokens agree with transformers'");
}
