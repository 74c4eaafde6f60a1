//! Qwen2.5-VL on MLX against the references on the same weights (the seeded random
//! checkpoint `scripts/setup vlm` makes, and mlx-vlm 0.7.10's conversions of it): two
//! images of different sizes and "Compare these images." — transformers' logits (1e-3
//! max abs) and 32 greedy tokens from the `save_pretrained` folder, mlx-vlm's logits
//! and 32 greedy tokens from its f32, 4-, 6- and 8-bit folders (kept packed, through
//! MLX's quantized matmul as mlx-vlm runs them), and sequences stepped together giving
//! what each gives alone.

use std::path::{Path, PathBuf};

use kiln_core::{DType, Device, Generator, ImagePatches, Next, StepImage, StepItem, Tensor};
use kiln_vision::read_npy;

use super::QwenVl;
use crate::testing::argmax;

fn fixture() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../.kiln/models/qwen25vl-tiny");
    assert!(
        dir.join("prompt.json").is_file(),
        "{} is missing: run `scripts/setup vlm` (scripts/test does)",
        dir.display()
    );
    dir
}

/// The fixture's prompt ids, image grids and pixel values (transformers' processor's).
fn prompt(dir: &Path) -> (serde_json::Value, Vec<u32>, Vec<[usize; 3]>, Vec<f32>) {
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("prompt.json")).unwrap()).unwrap();
    let ids = serde_json::from_value(record["input_ids"].clone()).unwrap();
    let grids = serde_json::from_value(record["image_grid_thw"].clone()).unwrap();
    let pixels = read_npy(&dir.join("prompt_pixels.npy")).unwrap().to_f32_vec().unwrap();
    (record, ids, grids, pixels)
}

/// As the runtime steps them: the fixture's prompt with its two images encoded through
/// the `Generator` API (one `ImagePatches` each), and its first 12 tokens as a text-only
/// prompt — `(ids, encoded images, grids, text)`.
fn two_prompts(dir: &Path, model: &QwenVl) -> (Vec<u32>, Vec<Tensor>, Vec<[usize; 3]>, Vec<u32>) {
    let (_, ids, grids, pixels) = prompt(dir);
    let split = grids[0].iter().product::<usize>() * 1176;
    let patches = vec![
        ImagePatches { values: pixels[..split].to_vec(), grid_thw: grids[0] },
        ImagePatches { values: pixels[split..].to_vec(), grid_thw: grids[1] },
    ];
    let encoded = Generator::encode_images(model, &patches).unwrap();
    let text = ids[..12].to_vec();
    (ids, encoded, grids, text)
}

fn load(dir: &Path) -> QwenVl {
    QwenVl::load(dir, None, Device::Cpu, DType::F32, 0).unwrap()
}

/// The prompt's logits at every position, then `count` greedy tokens.
fn run(
    model: &QwenVl,
    ids: &[u32],
    grids: &[[usize; 3]],
    pixels: &[f32],
    count: usize,
) -> (Vec<f32>, Vec<u32>) {
    let images = model.encode_images(pixels, grids).unwrap();
    let mut cache = model.new_cache();
    let logits = model.prefill(ids, Some(&images), grids, &mut cache, ids.len()).unwrap();
    let mut tokens = vec![argmax(logits.last().unwrap())];
    while tokens.len() < count {
        tokens.push(argmax(&model.decode(*tokens.last().unwrap(), &mut cache).unwrap()));
    }
    (logits.concat(), tokens)
}

fn largest_difference(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max)
}

#[test]
fn two_images_and_a_question_give_transformers_logits_and_greedy_tokens() {
    let dir = fixture();
    let (record, ids, grids, pixels) = prompt(&dir);
    let expected: Vec<u32> = serde_json::from_value(record["greedy_tokens"].clone()).unwrap();
    let model = load(&dir.join("model"));
    assert_eq!(model.config().image_token_id, 6);
    let (logits, tokens) = run(&model, &ids, &grids, &pixels, expected.len());
    let reference = read_npy(&dir.join("prompt_logits.npy")).unwrap().to_f32_vec().unwrap();
    let worst = largest_difference(&logits, &reference);
    println!("largest logit difference from transformers {worst:.2e} over {} positions", ids.len());
    assert!(worst <= 1e-3, "logits differ from transformers' by {worst:.3e}");
    assert_eq!(tokens, expected, "transformers' 32 greedy tokens");
}

#[test]
fn mlx_community_checkpoints_give_mlx_vlm_logits_and_greedy_tokens() {
    let dir = fixture();
    let (_, ids, grids, pixels) = prompt(&dir);
    for folder in ["mlx-f32", "mlx-q4", "mlx-q6", "mlx-q8"] {
        let at = dir.join(folder);
        let reference: serde_json::Value =
            serde_json::from_slice(&std::fs::read(at.join("reference.json")).unwrap()).unwrap();
        let expected: Vec<u32> = serde_json::from_value(reference["greedy_tokens"].clone()).unwrap();
        let model = load(&at);
        if folder != "mlx-f32" {
            assert!(model.info().quantization.contains("as stored"), "{}", model.info().quantization);
        }
        let (logits, tokens) = run(&model, &ids, &grids, &pixels, expected.len());
        let reference = read_npy(&at.join("prompt_logits.npy")).unwrap().to_f32_vec().unwrap();
        let worst = largest_difference(&logits, &reference);
        println!("{folder}: largest logit difference from mlx-vlm {worst:.2e}");
        assert!(worst <= 1e-3, "{folder}: logits differ from mlx-vlm's by {worst:.3e}");
        assert_eq!(tokens, expected, "{folder}: mlx-vlm's 32 greedy tokens");
    }
}

/// As a kiln `Generator`: a prompt with images and a text-only prompt in one step, then
/// decoding side by side, give the logits each gives alone.
#[test]
fn sequences_stepped_together_match_each_alone() {
    let dir = fixture();
    let model = load(&dir.join("mlx-q4"));
    let (ids, encoded, grids, text) = two_prompts(&dir, &model);
    let images: Vec<StepImage<'_>> =
        encoded.iter().zip(&grids).map(|(e, g)| StepImage { embedding: e, grid_thw: *g }).collect();
    let alone = |tokens: &[u32], with_images: bool| {
        let mut cache = model.new_sequence().unwrap();
        let mut item = StepItem::new(tokens, cache.as_mut());
        if with_images {
            item.images = &images;
        }
        let mut logits = model.step(&mut [item]).unwrap().remove(0);
        let mut all = vec![logits.clone()];
        for _ in 0..6 {
            let next = [argmax(&logits)];
            logits = model.step(&mut [StepItem::new(&next, cache.as_mut())]).unwrap().remove(0);
            all.push(logits.clone());
        }
        all
    };
    let (a_alone, c_alone) = (alone(&ids, true), alone(&text, false));
    let (mut a, mut c) = (model.new_sequence().unwrap(), model.new_sequence().unwrap());
    let mut first = StepItem::new(&ids, a.as_mut());
    first.images = &images;
    let mut out = model.step(&mut [first, StepItem::new(&text, c.as_mut())]).unwrap();
    let (mut a_together, mut c_together) = (vec![out.remove(0)], vec![out.remove(0)]);
    for _ in 0..6 {
        let (na, nc) = ([argmax(a_together.last().unwrap())], [argmax(c_together.last().unwrap())]);
        let mut out =
            model.step(&mut [StepItem::new(&na, a.as_mut()), StepItem::new(&nc, c.as_mut())]).unwrap();
        a_together.push(out.remove(0));
        c_together.push(out.remove(0));
    }
    for (alone, together) in [(&a_alone, &a_together), (&c_alone, &c_together)] {
        for (x, y) in alone.iter().zip(together.iter()) {
            assert_eq!(argmax(x), argmax(y));
            let diff = largest_difference(x, y);
            assert!(diff < 1e-4, "logits differ by {diff}");
        }
    }
    assert!(a.bytes() >= (a.len() as u64) * model.info().kv_bytes_per_token);
}

/// `step_next` picks greedy items' tokens on the device: the first index of the largest
/// of what `step` gives for the same inputs — for a prompt with images, and for decoding
/// rows stepped beside one that wants its logits (which come back as `step`'s), then all
/// greedy.
#[test]
fn greedy_items_get_the_argmax_of_their_logits_picked_on_the_device() {
    let dir = fixture();
    let model = load(&dir.join("mlx-q4"));
    let (ids, encoded, grids, text) = two_prompts(&dir, &model);
    let images: Vec<StepImage<'_>> =
        encoded.iter().zip(&grids).map(|(e, g)| StepImage { embedding: e, grid_thw: *g }).collect();
    let (mut a, mut c) = (model.new_sequence().unwrap(), model.new_sequence().unwrap());
    let (mut a2, mut c2) = (model.new_sequence().unwrap(), model.new_sequence().unwrap());
    let mut item = StepItem::new(&ids, a.as_mut());
    item.images = &images;
    let logits = model.step(&mut [item, StepItem::new(&text, c.as_mut())]).unwrap();
    let mut item = StepItem::new(&ids, a2.as_mut());
    item.images = &images;
    item.greedy = true;
    let next = model.step_next(&mut [item, StepItem::new(&text, c2.as_mut())]).unwrap();
    assert_eq!(next, [Next::Token(argmax(&logits[0])), Next::Logits(logits[1].clone())]);
    // Decoding: `a` greedy beside `c` wanting its logits, then both greedy.
    let mut fed = (vec![argmax(&logits[0])], vec![argmax(&logits[1])]);
    for both in [false, true] {
        let want =
            model.step(&mut [StepItem::new(&fed.0, a.as_mut()), StepItem::new(&fed.1, c.as_mut())]).unwrap();
        let mut ia = StepItem::new(&fed.0, a2.as_mut());
        ia.greedy = true;
        let mut ic = StepItem::new(&fed.1, c2.as_mut());
        ic.greedy = both;
        let got = model.step_next(&mut [ia, ic]).unwrap();
        let expected_c = match both {
            true => Next::Token(argmax(&want[1])),
            false => Next::Logits(want[1].clone()),
        };
        assert_eq!(got, [Next::Token(argmax(&want[0])), expected_c], "both greedy: {both}");
        fed = (vec![argmax(&want[0])], vec![argmax(&want[1])]);
    }
    assert_eq!((a2.len(), c2.len()), (ids.len() + 2, text.len() + 2));
}

#[test]
fn bad_inputs_are_refused_by_name() {
    let dir = fixture();
    let model = load(&dir.join("mlx-q4"));
    let e = model.encode_images(&[0.0; 1176 * 3], &[[1, 2, 2]]).err().unwrap().to_string();
    assert!(e.contains("pixel values"), "{e}");
    let e = model.encode_images(&[0.0; 1176 * 3], &[[1, 3, 1]]).err().unwrap().to_string();
    assert!(e.contains("merge units"), "{e}");
    let mut cache = model.new_cache();
    let e = model.prefill(&[1, 100_000], None, &[], &mut cache, 1).err().unwrap().to_string();
    assert!(e.contains("outside the vocabulary"), "{e}");
    let e = model.prefill(&[1, 6, 6, 2], None, &[[1, 4, 4]], &mut cache, 1).err().unwrap().to_string();
    assert!(e.contains("<|image_pad|>"), "{e}");
    let e = QwenVl::load(&dir.join("images"), None, Device::Cpu, DType::F32, 0).err().unwrap().to_string();
    assert!(e.contains("config.json"), "{e}");
}

/// A prompt padded to a length bucket (what a GPU does, so MLX's attention graphs are
/// reused across prompt lengths) gives the unpadded prompt's logits at its last position
/// and the same greedy tokens: the padding sits after the prompt, unseen, and the
/// decoding steps overwrite its keys and values.
#[test]
fn a_prompt_padded_to_its_bucket_gives_the_same_tokens() {
    let dir = fixture();
    let (record, ids, grids, pixels) = prompt(&dir);
    let expected: Vec<u32> = serde_json::from_value(record["greedy_tokens"].clone()).unwrap();
    let mut model = load(&dir.join("model"));
    let images = model.encode_images(&pixels, &grids).unwrap();
    let mut plain = model.new_cache();
    let want = model.prefill(&ids, Some(&images), &grids, &mut plain, 1).unwrap();
    model.set_prompt_bucket(64);
    assert_ne!(ids.len() % 64, 0, "the fixture's prompt needs padding for this test");
    let mut cache = model.new_cache();
    let got = model.prefill(&ids, Some(&images), &grids, &mut cache, 1).unwrap();
    assert_eq!(cache.len(), ids.len(), "the cache holds the prompt, not its padding");
    let worst = largest_difference(&got[0], &want[0]);
    assert!(worst <= 1e-4, "padded prompt's last logits differ by {worst:.3e}");
    let mut tokens = vec![argmax(&got[0])];
    while tokens.len() < expected.len() {
        tokens.push(argmax(&model.decode(*tokens.last().unwrap(), &mut cache).unwrap()));
    }
    assert_eq!(tokens, expected, "transformers' greedy tokens from the padded prompt");
}

/// The tower's attention written out per image with a window mask (the GPU's way) gives
/// the per-window fused attention's rows.
#[test]
fn masked_window_attention_gives_the_windows_results() {
    let dir = fixture();
    let (_, _, grids, pixels) = prompt(&dir);
    let mut model = load(&dir.join("model"));
    let want = model.encode_images(&pixels, &grids).unwrap().to_f32().unwrap();
    model.set_masked_attention(true);
    let got = model.encode_images(&pixels, &grids).unwrap().to_f32().unwrap();
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = largest_difference(&got, &want);
    assert!(
        worst <= 1e-4 * scale.max(1.0),
        "masked attention's rows differ by {worst:.3e} (values up to {scale})"
    );
}
