//! `task = "generate"` on a Qwen2.5-VL checkpoint folder (the seeded random one
//! `scripts/setup vlm` makes) through kiln's whole generation path: chat messages with
//! two images and a question become transformers' prompt tokens (the checkpoint's chat
//! template, each image's placeholder repeated once per image token), and greedy
//! generation gives transformers' 32 tokens. The same images asked about again come
//! from the image cache; a text model refuses images, and bad images are refused by name
//! while other requests are served.
#![cfg(feature = "candle")]

mod support;

use std::path::PathBuf;

use kiln::runtime::{Generation, Prompt};
use kiln::text::chat::{Content, Message, Part};

fn fixture() -> PathBuf {
    let dir = support::root().join(".kiln/models/qwen25vl-tiny");
    assert!(
        dir.join("prompt.json").is_file(),
        "{} is missing: run `scripts/setup vlm` (scripts/test does)",
        dir.display()
    );
    dir
}

fn config(sets: &[&str]) -> kiln::KilnConfig {
    let path = format!("model.path={:?}", fixture().join("model").display().to_string());
    let mut all =
        vec!["task=\"generate\"", path.as_str(), "generate.max_new_tokens=32", "generate.warmup=false"];
    all.extend(sets);
    kiln::KilnConfig::load(None, &all.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
}

/// The fixture's prompt: its image paths made absolute.
fn prompt(reference: &serde_json::Value) -> Prompt {
    let mut messages: Vec<Message> = serde_json::from_value(reference["messages"].clone()).unwrap();
    for m in &mut messages {
        if let Content::Parts(parts) = &mut m.content {
            for part in parts {
                if let Part::Image { path: Some(p), .. } = part {
                    *p = fixture().join(&*p);
                }
            }
        }
    }
    Prompt::Messages(messages)
}

#[tokio::test]
async fn two_images_and_a_question_give_transformers_tokens_and_the_images_are_cached() {
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture().join("prompt.json")).unwrap()).unwrap();
    let expected_ids: Vec<u32> = serde_json::from_value(reference["input_ids"].clone()).unwrap();
    let greedy: Vec<u32> = serde_json::from_value(reference["greedy_tokens"].clone()).unwrap();
    let eos = reference["special_ids"]["<|im_end|>"].as_u64().unwrap() as u32;
    let expected: Vec<u32> = greedy.iter().copied().take_while(|&t| t != eos).collect();

    let generation = Generation::from_config(config(&[])).await.unwrap();
    assert!(generation.info().vision.is_some());
    let prompt = prompt(&reference);
    assert_eq!(generation.prompt_tokens(&prompt, true).unwrap(), expected_ids, "transformers' prompt tokens");
    let first = generation.generate(prompt.clone()).await.unwrap();
    assert_eq!(first.prompt_tokens, expected_ids.len());
    assert_eq!(first.tokens, expected, "transformers' greedy tokens");
    let stats = generation.stats();
    assert_eq!((stats.images, stats.image_cache_hits), (2, 0), "{stats:?}");
    assert_eq!(stats.image_tokens as usize, expected_ids.iter().filter(|&&t| t == 6).count());

    // Asked again: the prompt continues from the prefix cache (only its last token
    // computed), no vision tower run, the same answer.
    let encode_ms = stats.image_encode_ms;
    let again = generation.generate(prompt.clone()).await.unwrap();
    assert_eq!(again.tokens, first.tokens);
    let stats = generation.stats();
    assert_eq!((stats.images, stats.image_cache_hits), (4, 2), "{stats:?}");
    assert_eq!(stats.image_encode_ms, encode_ms, "no encoding for cached images");
    assert_eq!((stats.prefix_cache_hits, stats.prefix_cached_tokens), (1, expected_ids.len() as u64));

    // Another question about the same images: the common part (up to the question) from
    // the prefix cache, the rest computed — the answer an engine without the cache gives.
    let other = with_question(&prompt, "Which one is taller?");
    let reused = generation.generate(other.clone()).await.unwrap();
    let stats = generation.stats();
    assert_eq!(stats.prefix_cache_hits, 2, "{stats:?}");
    let last_image = expected_ids.iter().rposition(|&t| t == 6).unwrap();
    assert!(stats.prefix_cached_tokens > (expected_ids.len() + last_image) as u64, "{stats:?}");
    generation.shutdown().await;
    let fresh = Generation::from_config(config(&["generate.prefix_cache_mb=0"])).await.unwrap();
    let whole = fresh.generate(other).await.unwrap();
    // Equal up to float rounding: the question alone is a shorter product than the
    // whole prompt. On this fixture every token agrees.
    assert_eq!(reused.tokens, whole.tokens, "the answer computed whole");
    assert_eq!(fresh.stats().prefix_cache_hits, 0);
    fresh.shutdown().await;
}

/// `prompt` with its text part replaced by `question`.
fn with_question(prompt: &Prompt, question: &str) -> Prompt {
    let Prompt::Messages(messages) = prompt else { panic!("a chat prompt") };
    let mut messages = messages.clone();
    if let Content::Parts(parts) = &mut messages[0].content {
        for part in parts.iter_mut() {
            if let Part::Text { text } = part {
                *text = question.into();
            }
        }
    }
    Prompt::Messages(messages)
}

#[tokio::test]
async fn bad_images_are_refused_by_name_and_the_rest_is_served() {
    let generation = Generation::from_config(config(&["generate.max_images=2"])).await.unwrap();
    let image = |path: PathBuf| Part::Image { path: Some(path), url: None };
    let ask = |parts: Vec<Part>| {
        let mut parts = parts;
        parts.push(Part::Text { text: "What is this?".into() });
        Prompt::Messages(vec![Message { role: "user".into(), content: Content::Parts(parts) }])
    };
    let dir = fixture().join("images");
    let missing = generation.stream(ask(vec![image(dir.join("nope.png"))])).err().unwrap().to_string();
    assert!(missing.contains("nope.png"), "{missing}");
    let not_image =
        generation.stream(ask(vec![image(fixture().join("prompt.json"))])).err().unwrap().to_string();
    assert!(not_image.contains("prompt.json") && not_image.contains("not an image"), "{not_image}");
    let three = vec![image(dir.join("tiny.png")), image(dir.join("tiny.png")), image(dir.join("tiny.png"))];
    let too_many = generation.stream(ask(three)).err().unwrap().to_string();
    assert!(too_many.contains("3 images") && too_many.contains("generate.max_images = 2"), "{too_many}");
    let remote = Part::ImageUrl {
        image_url: kiln::text::chat::ImageUrl { url: "https://example.com/x.png".into(), detail: None },
    };
    let refused = generation.stream(ask(vec![remote])).err().unwrap().to_string();
    assert!(refused.contains("fetches no remote URLs"), "{refused}");
    // The engine serves on.
    let ok = generation.generate(ask(vec![image(dir.join("tiny.png"))])).await.unwrap();
    assert!(!ok.tokens.is_empty() || ok.finish_reason == kiln::runtime::FinishReason::Stop);
    generation.shutdown().await;
}

/// An mlx-community checkpoint (the fixture converted to 4 bits by mlx-vlm's own
/// converter): loaded from its folder, dequantized at load, it answers the same prompt
/// with mlx-vlm's greedy tokens on the same file.
#[tokio::test]
async fn an_mlx_community_4_bit_checkpoint_gives_mlx_vlm_tokens() {
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture().join("prompt.json")).unwrap()).unwrap();
    let q4: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture().join("mlx-q4/reference.json")).unwrap()).unwrap();
    let eos = reference["special_ids"]["<|im_end|>"].as_u64().unwrap() as u32;
    let greedy: Vec<u32> = serde_json::from_value(q4["greedy_tokens"].clone()).unwrap();
    let expected: Vec<u32> = greedy.iter().copied().take_while(|&t| t != eos).collect();
    let path = format!("model.path={:?}", fixture().join("mlx-q4").display().to_string());
    let generation = Generation::from_config(config(&[path.as_str()])).await.unwrap();
    assert!(
        generation.info().quantization.starts_with("4-bit mlx affine"),
        "{}",
        generation.info().quantization
    );
    let answer = generation.generate(prompt(&reference)).await.unwrap();
    assert_eq!(answer.tokens, expected, "mlx-vlm's greedy tokens");
    generation.shutdown().await;
}

/// The same prompt on provider `mlx` (MLX's CPU here), from the 4-bit folder as stored
/// (MLX's quantized matmul over the packed layers, as mlx-vlm runs them): mlx-vlm's
/// greedy tokens through kiln's whole path — chat template, processor, image cache.
#[cfg(feature = "mlx")]
#[tokio::test]
async fn on_mlx_the_4_bit_checkpoint_as_stored_gives_mlx_vlm_tokens() {
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture().join("prompt.json")).unwrap()).unwrap();
    let q4: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture().join("mlx-q4/reference.json")).unwrap()).unwrap();
    let eos = reference["special_ids"]["<|im_end|>"].as_u64().unwrap() as u32;
    let greedy: Vec<u32> = serde_json::from_value(q4["greedy_tokens"].clone()).unwrap();
    let expected: Vec<u32> = greedy.iter().copied().take_while(|&t| t != eos).collect();
    let path = format!("model.path={:?}", fixture().join("mlx-q4").display().to_string());
    let generation =
        Generation::from_config(config(&[path.as_str(), "provider.name=\"mlx\""])).await.unwrap();
    let info = generation.info();
    assert_eq!(info.provider, "mlx");
    assert!(info.quantization.contains("MLX quantized matmul"), "{}", info.quantization);
    let first = generation.generate(prompt(&reference)).await.unwrap();
    assert_eq!(first.tokens, expected, "mlx-vlm's greedy tokens");
    let again = generation.generate(prompt(&reference)).await.unwrap();
    assert_eq!(again.tokens, expected);
    let stats = generation.stats();
    assert_eq!((stats.images, stats.image_cache_hits, stats.prefix_cache_hits), (4, 2, 1), "{stats:?}");
    // Another question about the same images, from the prefix cache: what MLX computes
    // for it whole.
    let other = with_question(&prompt(&reference), "Which one is taller?");
    let reused = generation.generate(other.clone()).await.unwrap();
    assert_eq!(generation.stats().prefix_cache_hits, 2);
    generation.shutdown().await;
    let whole = Generation::from_config(config(&[
        path.as_str(),
        "provider.name=\"mlx\"",
        "generate.prefix_cache_mb=0",
    ]))
    .await
    .unwrap();
    assert_eq!(whole.generate(other).await.unwrap().tokens, reused.tokens);
    whole.shutdown().await;
}
