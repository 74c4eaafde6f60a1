//! `task = "generate"` on the MLX provider (CPU here), the real SmolLM2 GGUF. The
//! matrices hold exactly the file's weights — dequantized (the CPU default), or the
//! Q4_1 blocks re-packed for MLX's 4-bit quantized matmul (what a GPU runs) — so the
//! logits of every step equal candle's with the same weights dequantized to f32
//! (`requantize = "f32"`) within float rounding, through a long prefill and decode
//! steps that grow the KV cache past its first 256-token buffer; the chat answers are
//! llama.cpp's; sequences batched together get their tokens alone.
#![cfg(all(feature = "mlx", feature = "candle"))]

mod support;

use kiln::runtime::{Generation, Prompt};

fn mlx(sets: &[&str]) -> kiln::KilnConfig {
    let mut all = vec!["provider.name=\"mlx\""];
    all.extend_from_slice(sets);
    support::smollm_config(&all)
}

/// The first index of the largest value (as kiln's sampler picks it).
fn argmax(v: &[f32]) -> u32 {
    let max = v.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    v.iter().position(|&l| l == max).unwrap() as u32
}

async fn load(config: kiln::KilnConfig) -> std::sync::Arc<dyn kiln::Generator> {
    let provider = kiln::build_provider(&config.provider).unwrap();
    let spec = kiln::ModelSpec::new(&config.model.path, kiln::Device::Cpu, kiln::DType::F32);
    provider.load_generator(&spec).await.unwrap()
}

/// Feeds `prompt` and then `decode` greedy tokens to both, comparing each step's logits.
fn same_logits(ours: &dyn kiln::Generator, reference: &dyn kiln::Generator, prompt: Vec<u32>, decode: usize) {
    let (mut a, mut b) = (ours.new_sequence().unwrap(), reference.new_sequence().unwrap());
    let mut feed = prompt;
    let mut fed = 0;
    for step in 0..=decode {
        let x = ours.step(&mut [kiln::StepItem::new(&feed, a.as_mut())]).unwrap().remove(0);
        let y = reference.step(&mut [kiln::StepItem::new(&feed, b.as_mut())]).unwrap().remove(0);
        fed += feed.len();
        let worst = x.iter().zip(&y).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        let scale = y.iter().map(|v| v.abs()).fold(0f32, f32::max);
        assert!(worst <= 2e-3 * scale.max(1.0), "step {step}: logits differ by {worst} (largest {scale})");
        assert_eq!(argmax(&x), argmax(&y), "step {step}");
        feed = vec![argmax(&y)];
    }
    assert_eq!(a.len(), fed);
    assert_eq!(a.bytes(), fed as u64 * ours.info().kv_bytes_per_token);
}

#[tokio::test]
async fn mlx_logits_equal_candle_s_with_the_same_weights_step_after_step() {
    let reference = load(support::smollm_config(&["provider.options.requantize=\"f32\""])).await;
    let dense = load(mlx(&[])).await;
    let quantization = &dense.info().quantization;
    assert!(quantization.starts_with("q4_1 dequantized to f32"), "{quantization}");
    // MLX keeps keys and values in f32, candle in f16 (as llama.cpp does).
    assert_eq!(dense.info().kv_bytes_per_token, 2 * reference.info().kv_bytes_per_token);
    // 250 prompt tokens, then 12 decode steps: the cache's buffer grows at 256.
    let prompt: Vec<u32> = (0..250u32).map(|i| 100 + (i * 37) % 5000).collect();
    same_logits(dense.as_ref(), reference.as_ref(), prompt.clone(), 12);
    drop(dense);
    // The file's blocks re-packed for MLX's quantized matmul (what a GPU runs; a scalar
    // loop on the CPU, so a short run).
    let quantized = load(mlx(&["provider.options.gguf_matrices=\"quantized\""])).await;
    assert!(
        quantized.info().quantization.starts_with("q4_1 as in the file"),
        "{}",
        quantized.info().quantization
    );
    same_logits(quantized.as_ref(), reference.as_ref(), prompt[..6].to_vec(), 2);
}

#[tokio::test]
async fn mlx_answers_as_llama_cpp_does_and_batches_without_changing_tokens() {
    let g = Generation::from_config(mlx(&["generate.max_new_tokens=20", "batching.max_batch_size=4"]))
        .await
        .unwrap();
    let ask = |q: &str| Prompt::Text(q.to_string());
    let germany = g.generate(ask("What is the capital of Germany?")).await.unwrap();
    assert_eq!(germany.text, "The capital of Germany is Berlin.");
    let prompts = ["Name three colours.", "What is 2 + 2?", "What is the capital of Japan?"];
    let (alone, together) = support::alone_and_together(&g, &prompts).await;
    assert_eq!(together, alone, "a sequence's tokens do not depend on its batch");
    let stats = g.shutdown().await;
    assert!(stats.max_sequences_per_step >= 2 && stats.failed == 0, "{stats:?}");
}

/// `step_next` picks a greedy item's token on the device: the first index of the largest
/// of the logits `step` gives for the same inputs, in a batch that mixes items wanting
/// their logits (which come back as `step`'s) with greedy ones, and in an all-greedy
/// decode step (nothing but ids read back).
#[tokio::test]
async fn greedy_items_get_the_argmax_of_their_logits_picked_on_the_device() {
    let g = load(mlx(&[])).await;
    let prompts: [Vec<u32>; 3] =
        [vec![1, 504, 3458, 282], vec![1, 2683, 314], (0..40).map(|i| 100 + i * 7).collect()];
    // The reference: logits of every item through `step`.
    let mut theirs: Vec<_> = prompts.iter().map(|_| g.new_sequence().unwrap()).collect();
    let mut items: Vec<_> =
        prompts.iter().zip(&mut theirs).map(|(p, c)| kiln::StepItem::new(p, c.as_mut())).collect();
    let logits = g.step(&mut items).unwrap();
    // The same through `step_next`, the middle one wanting its logits.
    let mut ours: Vec<_> = prompts.iter().map(|_| g.new_sequence().unwrap()).collect();
    let mut items: Vec<_> =
        prompts.iter().zip(&mut ours).map(|(p, c)| kiln::StepItem::new(p, c.as_mut())).collect();
    items[0].greedy = true;
    items[2].greedy = true;
    let next = g.step_next(&mut items).unwrap();
    assert_eq!(next[0], kiln::Next::Token(argmax(&logits[0])));
    assert_eq!(next[1], kiln::Next::Logits(logits[1].clone()));
    assert_eq!(next[2], kiln::Next::Token(argmax(&logits[2])));
    // A decode step of all three, every item greedy, against `step` on the reference caches.
    let feed: Vec<Vec<u32>> = logits.iter().map(|l| vec![argmax(l)]).collect();
    let mut items: Vec<_> =
        feed.iter().zip(&mut theirs).map(|(f, c)| kiln::StepItem::new(f, c.as_mut())).collect();
    let logits = g.step(&mut items).unwrap();
    let mut items: Vec<_> =
        feed.iter().zip(&mut ours).map(|(f, c)| kiln::StepItem::new(f, c.as_mut())).collect();
    items.iter_mut().for_each(|i| i.greedy = true);
    let next = g.step_next(&mut items).unwrap();
    let expected: Vec<_> = logits.iter().map(|l| kiln::Next::Token(argmax(l))).collect();
    assert_eq!(next, expected);
    assert!(ours.iter().zip(&prompts).all(|(c, p)| c.len() == p.len() + 1), "every cache took its tokens");
}
