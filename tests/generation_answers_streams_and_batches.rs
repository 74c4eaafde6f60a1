//! `task = "generate"` with the real SmolLM2-135M-Instruct GGUF on candle (CPU): chat
//! prompts get the answers llama.cpp gives with the same file and template at
//! temperature 0; greedy repeats, a seeded sampled run repeats; sequences batched
//! together get exactly the tokens they get alone; a dropped stream frees its slot and
//! KV cache; a prompt beyond the context is refused by rule; a bad setting names itself;
//! a load that does not fit memory is refused, and under memory pressure nothing joins a
//! running batch.
#![cfg(feature = "candle")]

mod support;

use std::time::Duration;

use kiln::runtime::{Event, FinishReason, Generation, Prompt};

fn config(sets: &[&str]) -> kiln::KilnConfig {
    support::smollm_config(sets)
}

fn ask(q: &str) -> Prompt {
    Prompt::Text(q.to_string())
}

#[tokio::test]
async fn chat_prompts_get_llama_cpp_s_answers_and_repeat() {
    // The default (with AVX-512 VNNI: the file's Q4_1 and Q8_0 through kiln's block
    // kernel), kiln's int8 kernel and candle's Q8_0 alike.
    let default = if vnni() { "q4_1 as in the file (kiln's block kernel)" } else { "q8_0" };
    for (weights, expected) in [("auto", default), ("int8", "int8, kiln's kernel"), ("q8_0", "q8_0")] {
        let set = format!("provider.options.requantize={weights:?}");
        chat_prompts_on(config(&["generate.max_new_tokens=24", &set]), expected).await;
    }
}

fn vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::is_x86_feature_detected!("avx512vnni") && std::is_x86_feature_detected!("avx512bw");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

async fn chat_prompts_on(config: kiln::KilnConfig, weights: &str) {
    let g = Generation::from_config(config).await.unwrap();
    assert!(g.info().quantization.starts_with(weights), "{}", g.info().quantization);
    // `generate.warmup` (on by default) stepped throwaway sequences, which left nothing behind.
    assert!(g.warmup_time().is_some());
    let before = g.stats();
    assert_eq!((before.requests, before.kv_cache_bytes), (0, 0), "{before:?}");
    let germany = g.generate(ask("What is the capital of Germany?")).await.unwrap();
    assert_eq!(germany.text, "The capital of Germany is Berlin.");
    assert_eq!(germany.finish_reason, FinishReason::Stop);
    let japan = g.generate(ask("What is the capital of Japan?")).await.unwrap();
    assert!(japan.text.contains("Tokyo"), "{}", japan.text);
    // Greedy is deterministic.
    assert_eq!(g.generate(ask("What is the capital of Germany?")).await.unwrap().tokens, germany.tokens);
    // Japan continued from Germany's kept system turn, Germany again from its whole prompt.
    assert_eq!(g.stats().prefix_cache_hits, 2, "{:?}", g.stats());
    let stats = g.shutdown().await;
    assert_eq!((stats.completed, stats.failed, stats.cancelled), (3, 0, 0), "{stats:?}");
    assert!(stats.ttft_ms[0] > 0.0 && stats.inter_token_ms[0] > 0.0, "{stats:?}");
}

/// The prefix cache on text: a question after the same system turn continues from the
/// first one's kept cache, and the same question again computes nothing and answers
/// exactly as the first time; both answer what they answer computed whole (up to float
/// rounding in general; on these questions token for token).
#[tokio::test]
async fn prompts_from_the_prefix_cache_answer_as_computed_whole() {
    let questions = ["Name three colours.", "Name three animals.", "Name three colours."];
    let mut answers = Vec::new();
    for prefix_mb in ["256", "0"] {
        let set = format!("generate.prefix_cache_mb={prefix_mb}");
        let g = Generation::from_config(config(&["generate.max_new_tokens=16", &set])).await.unwrap();
        let mut tokens = Vec::new();
        for q in questions {
            tokens.push(g.generate(ask(q)).await.unwrap().tokens);
        }
        let stats = g.shutdown().await;
        let expected_hits = if prefix_mb == "0" { 0 } else { 2 };
        assert_eq!(stats.prefix_cache_hits, expected_hits, "{stats:?}");
        answers.push(tokens);
    }
    assert_eq!(answers[0], answers[1], "from the prefix cache and computed whole");
}

#[tokio::test]
async fn batched_sequences_get_what_they_get_alone_and_seeded_sampling_repeats() {
    let prompts = ["Name three colours.", "What is 2 + 2?", "Say hello in French.", "Count to five."];
    let g = Generation::from_config(config(&["generate.max_new_tokens=20", "batching.max_batch_size=4"]))
        .await
        .unwrap();
    // Together: submitted at once, they share steps (prefill and decode in one batch).
    let (alone, together) = support::alone_and_together(&g, &prompts).await;
    assert_eq!(together, alone, "a sequence's tokens do not depend on its batch");
    let stats = g.stats();
    assert!(stats.max_sequences_per_step >= 2, "{stats:?}");

    let sampled = |seed: u64| {
        let settings = kiln::GenerateConfig {
            temperature: 0.9,
            top_k: 40,
            seed,
            max_new_tokens: 16,
            ..Default::default()
        };
        let stream = g.stream_with(ask("Tell me a story."), settings).unwrap();
        async move { stream.finish().await.unwrap().tokens }
    };
    let (a, b, c) = (sampled(11).await, sampled(11).await, sampled(12).await);
    assert_eq!(a, b, "the same seed repeats");
    assert_ne!(a, c, "another seed differs");
}

#[tokio::test]
async fn a_dropped_stream_frees_its_cache_and_bad_requests_are_refused_by_rule() {
    let g = Generation::from_config(config(&["generate.max_new_tokens=200"])).await.unwrap();
    let mut stream = g.stream(ask("Write a long story about a dragon.")).unwrap();
    // Two tokens in, the caller goes away.
    let mut seen = 0;
    while seen < 2 {
        if let Some(Event::Token { .. }) = stream.next().await {
            seen += 1;
        }
    }
    assert!(g.stats().kv_cache_bytes > 0);
    drop(stream);
    let stats = support::eventually(Duration::from_secs(20), || {
        let s = g.stats();
        if s.cancelled == 1 && s.running == 0 { Ok(s) } else { Err(format!("{s:?}")) }
    })
    .await;
    assert!(stats.generated_tokens < 200, "stopped early: {stats:?}");
    // The engine serves on.
    assert!(g.generate(ask("What is the capital of Germany?")).await.unwrap().text.contains("Berlin"));

    // Beyond the context (8192 tokens): refused before any work, by rule.
    let long = "word ".repeat(9000);
    let err = g.stream(Prompt::Text(long)).err().expect("refused");
    assert!(err.to_string().contains("context of 8192 tokens"), "{err}");
    let err = g.stream(Prompt::Text(String::new())).err();
    assert!(err.is_none(), "an empty user message still has the template's tokens");
    let bad = kiln::GenerateConfig { top_p: 0.0, ..Default::default() };
    let err = g.stream_with(ask("hi"), bad).err().expect("refused");
    assert!(err.to_string().contains("generate.top_p"), "{err}");
    let err =
        kiln::runtime::Optimizer::from_config(config(&[])).await.err().expect("not the optimizer's task");
    assert!(err.to_string().contains("kiln_runtime::Generation"), "{err}");
}

#[tokio::test]
async fn memory_admission_refuses_what_does_not_fit_and_pressure_stops_batching() {
    // 100 MB cannot hold the weights and the default 1 GiB KV-cache budget.
    let err = Generation::from_config(config(&["models.max_bytes=100000000"])).await.err().expect("refused");
    let text = err.to_string();
    assert!(text.contains("generate.kv_cache_mb = 1024 MiB") && text.contains("MiB of weights"), "{text}");
    assert!(matches!(err, kiln::Error::OutOfMemory { .. }), "{err:?}");

    // Always "under pressure" (any machine uses more than 1% of its memory): requests
    // still all complete, one at a time, and the holds are counted.
    let g = Generation::from_config(config(&[
        "memory.high_watermark=0.01",
        "memory.low_watermark=0.005",
        "batching.max_batch_size=4",
        "generate.max_new_tokens=6",
    ]))
    .await
    .unwrap();
    let streams: Vec<_> =
        ["Say hi.", "Say bye.", "Name a fruit."].iter().map(|p| g.stream(ask(p)).unwrap()).collect();
    for s in streams {
        s.finish().await.unwrap();
    }
    let stats = g.shutdown().await;
    assert_eq!((stats.completed, stats.max_sequences_per_step), (3, 1), "{stats:?}");
    assert!(stats.pressure_holds > 0, "{stats:?}");
}

/// `generate.stop`: the answer ends before the stop string, which never reaches the
/// stream — text that might start it is held back until the next token shows it does
/// not — and once the sequence ends, the gauges show nothing running.
#[tokio::test]
async fn a_stop_string_ends_the_answer_and_never_reaches_the_stream() {
    let g = Generation::from_config(config(&["generate.max_new_tokens=24"])).await.unwrap();
    // Greedy, the whole answer is "The capital of Germany is Berlin." (tested above).
    let settings = kiln::GenerateConfig {
        stop: vec!["Berlin".into(), "Paris".into()],
        max_new_tokens: 24,
        ..Default::default()
    };
    let mut stream = g.stream_with(ask("What is the capital of Germany?"), settings).unwrap();
    let mut streamed = String::new();
    let done = loop {
        match stream.next().await.expect("the stream ends with Done") {
            Event::Token { text, .. } => streamed.push_str(&text),
            Event::Done(done) => break done,
            Event::Failed(e) => panic!("{e}"),
        }
    };
    assert_eq!(done.finish_reason, FinishReason::StopString);
    assert_eq!(done.text, "The capital of Germany is ");
    assert_eq!(streamed, done.text, "the stream carries exactly the answer");
    let stats = g.stats();
    assert_eq!((stats.running, stats.waiting, stats.kv_cache_bytes), (0, 0, 0), "{stats:?}");
    g.shutdown().await;
}

/// A text model takes no images: a message with an image part is refused, naming the
/// model, before anything runs.
#[tokio::test]
async fn a_text_model_refuses_images() {
    use kiln::text::chat::{Content, Message, Part};
    let g = Generation::from_config(config(&["generate.warmup=false"])).await.unwrap();
    let parts =
        vec![Part::Image { path: Some("cat.png".into()), url: None }, Part::Text { text: "Hi".into() }];
    let prompt = Prompt::Messages(vec![Message { role: "user".into(), content: Content::Parts(parts) }]);
    let e = g.stream(prompt).err().unwrap().to_string();
    assert!(e.contains("is a text model and takes no images"), "{e}");
    assert_eq!(g.stats().requests, 0);
    g.shutdown().await;
}

/// Chunked prefill (issue 30): a ~2000-token prompt arriving while a stream runs is read
/// `generate.prefill_chunk` tokens a step, so the running stream's largest gap between
/// two tokens is a chunk's prefill, not the whole prompt's (under a second in a release
/// build, against 24 s on 2 cores); the long prompt is answered too. With
/// `prefill_chunk = 0` (whole prompts) the gap is the prefill's, measured in the same run
/// as the yardstick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_prompt_does_not_stall_the_running_streams() {
    let words = "the model reads every document in the archive and returns a short summary".split(' ');
    let long: String = words.cycle().take(1900).collect::<Vec<_>>().join(" ");
    let mut gaps = Vec::new();
    for chunk in ["128", "0"] {
        let g = Generation::from_config(config(&[
            "generate.max_new_tokens=400",
            &format!("generate.prefill_chunk={chunk}"),
        ]))
        .await
        .unwrap();
        let mut running = g.stream(ask("Write a long story about a dragon.")).unwrap();
        let mut seen = 0;
        while seen < 3 {
            if let Some(Event::Token { .. }) = running.next().await {
                seen += 1;
            }
        }
        let started = std::time::Instant::now();
        let long_answer = async {
            let settings = kiln::GenerateConfig { max_new_tokens: 2, ..Default::default() };
            let mut stream = g.stream_with(Prompt::Text(long.clone()), settings).unwrap();
            while let Some(event) = stream.next().await {
                if let Event::Done(done) = event {
                    return Some(done);
                }
            }
            None
        };
        let watch = async {
            let (mut last, mut gap) = (std::time::Instant::now(), Duration::ZERO);
            while let Some(event) = running.next().await {
                if let Event::Token { .. } = event {
                    gap = gap.max(last.elapsed());
                    last = std::time::Instant::now();
                }
                if started.elapsed() > Duration::from_secs(60) {
                    break;
                }
            }
            gap
        };
        let (answer, gap) = tokio::join!(long_answer, watch);
        let answer = answer.expect("the long prompt is answered");
        assert!(answer.prompt_tokens > 1500, "the long prompt has {} tokens", answer.prompt_tokens);
        eprintln!("prefill_chunk {chunk}: the running stream's largest gap {gap:?}");
        gaps.push(gap);
        g.shutdown().await;
    }
    // Against the whole-prompt gap measured in the same run, not a fixed second: a
    // debug build on a busy 2-core machine has measured 1.2 s against 7.8 s (the ~15
    // chunks of this prompt would give a fifteenth in an ideal world).
    assert!(
        gaps[0] * 3 < gaps[1],
        "with chunks the largest gap was {:?}, without {:?}: not under a third",
        gaps[0],
        gaps[1]
    );
}
