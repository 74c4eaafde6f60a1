//! `kiln run` for `task = "generate"`: the input's prompts submitted as the engine's
//! queue (`batching.queue_capacity`) takes them (the engine batches them step by step),
//! answers written in input order; a single prompt on a terminal streams its text as it
//! comes.

use std::io::{IsTerminal, Write};

use anyhow::{Context, Result, bail};
use kiln::KilnConfig;
use kiln::runtime::{Event, Generated, Generation, Prompt};
use kiln::text::chat::{Content, Message, Part};
use serde::Deserialize;

use crate::RunArgs;
use crate::output::{write_output, write_row};

/// One input record: `{"id", "prompt"}` or `{"id", "messages"}` (JSON Lines), or a
/// plain line (the prompt).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    #[serde(default)]
    id: Option<serde_json::Value>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    messages: Option<Vec<Message>>,
}

fn read_prompts(path: &std::path::Path) -> Result<Vec<(serde_json::Value, Prompt)>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let jsonl = path.extension().is_some_and(|e| e == "jsonl");
    let mut prompts = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let at = || format!("{}:{}", path.display(), n + 1);
        if !jsonl {
            prompts.push((n.into(), Prompt::Text(line.to_string())));
            continue;
        }
        if line.trim().is_empty() {
            continue;
        }
        let record: Record = serde_json::from_str(line).with_context(|| {
            format!("{}: expected {{\"id\", \"prompt\"}} or {{\"id\", \"messages\"}}", at())
        })?;
        let prompt = match (record.prompt, record.messages) {
            (Some(p), None) => Prompt::Text(p),
            (None, Some(m)) => {
                Prompt::Messages(relative_to(m, path.parent().unwrap_or(std::path::Path::new("."))))
            }
            _ => bail!("{}: give exactly one of \"prompt\" (a string) and \"messages\" (a list)", at()),
        };
        prompts.push((record.id.unwrap_or_else(|| n.into()), prompt));
    }
    if prompts.is_empty() {
        bail!("{} holds no prompts", path.display());
    }
    Ok(prompts)
}

/// `messages` with their image parts' relative paths taken relative to `base` (the
/// input file's folder), as a user writes them beside the images.
fn relative_to(mut messages: Vec<Message>, base: &std::path::Path) -> Vec<Message> {
    for message in &mut messages {
        if let Content::Parts(parts) = &mut message.content {
            for part in parts {
                if let Part::Image { path: Some(path), .. } = part
                    && path.is_relative()
                {
                    *path = base.join(&*path);
                }
            }
        }
    }
    messages
}

pub(crate) async fn run(config: KilnConfig, args: &RunArgs) -> Result<()> {
    let prompts = read_prompts(args.input(kiln::Task::Generate)?)?;
    // The engine's queue holds `queue_capacity` requests; more are submitted as earlier
    // ones finish, so a long file never meets "overloaded".
    let window = config.batching.queue_capacity.max(1);
    let generation = Generation::from_config(config).await?;
    let started = std::time::Instant::now();
    let live = prompts.len() == 1 && std::io::stdout().is_terminal();
    let mut results: Vec<Option<kiln::Result<Generated>>> = prompts.iter().map(|_| None).collect();
    let mut pending = std::collections::VecDeque::new();
    for (i, (_, prompt)) in prompts.iter().enumerate() {
        if pending.len() >= window {
            let (j, task): (usize, tokio::task::JoinHandle<_>) = pending.pop_front().expect("window is full");
            results[j] = Some(task.await?);
        }
        match generation.stream(prompt.clone()) {
            Ok(stream) => pending.push_back((i, tokio::spawn(collect(stream, live)))),
            Err(e) => results[i] = Some(Err(e)),
        }
    }
    for (j, task) in pending {
        results[j] = Some(task.await?);
    }
    let mut failed = 0;
    let mut rows = Vec::with_capacity(prompts.len());
    for ((id, _), row) in prompts.iter().zip(results) {
        rows.push(match row.expect("every prompt has a result") {
            Ok(g) => serde_json::json!({
                "id": id, "text": g.text, "tokens": g.tokens.len(), "token_ids": g.tokens, "prompt_tokens": g.prompt_tokens,
                "image_tokens": g.image_tokens,
                "finish_reason": g.finish_reason, "ttft_ms": g.time_to_first_token_ms, "elapsed_ms": g.elapsed_ms,
            }),
            Err(e) => {
                failed += 1;
                eprintln!("kiln: prompt {id}: {e}");
                serde_json::json!({"id": id, "error": e.to_string()})
            }
        });
    }
    let elapsed = started.elapsed().as_secs_f64();
    write_output(&args.output, async |out| {
        for row in &rows {
            write_row(out, row)?;
        }
        Ok(())
    })
    .await?;
    args.profiler.write(generation.reports())?;
    let info = generation.info().clone();
    let load = generation.load_time().as_secs_f64();
    let warmup = match generation.warmup_time() {
        Some(took) => format!(", warmed up in {:.2} s", took.as_secs_f64()),
        None => String::new(),
    };
    let stats = generation.shutdown().await;
    eprintln!(
        "kiln: generated {} tokens for {} of {} prompts in {:.2} s ({:.1} tokens/s; {:.1} sequences per step) with {} \
         ({}) on {}; model loaded in {load:.2} s{warmup}",
        stats.generated_tokens,
        prompts.len() - failed,
        prompts.len(),
        elapsed,
        stats.generated_tokens as f64 / elapsed.max(1e-9),
        stats.mean_sequences_per_step,
        info.provider,
        info.quantization,
        info.device,
    );
    if failed > 0 {
        bail!("{failed} of {} prompts failed (their rows carry the error)", prompts.len());
    }
    Ok(())
}

/// Reads a stream to its end, printing its text as it comes when `live`.
async fn collect(mut stream: kiln::runtime::TokenStream, live: bool) -> kiln::Result<Generated> {
    let result = loop {
        match stream.next().await {
            Some(Event::Token { text, .. }) if live => {
                print!("{text}");
                std::io::stdout().flush().ok();
            }
            Some(Event::Token { .. }) => {}
            Some(Event::Done(g)) => break Ok(g),
            Some(Event::Failed(e)) => break Err(e),
            None => break Err(kiln::Error::Shutdown("the generation engine stopped".into())),
        }
    };
    if live {
        println!();
    }
    result
}

/// `kiln bench` for `task = "generate"`: one stream, then `concurrency` streams at once
/// (each a fresh engine, so each phase's latency figures are its own), over `requests`
/// prompts per phase — `--texts FILE` lines, or "Write a long story about …" prompts that
/// run to `generate.max_new_tokens`. For a vision-language model each prompt carries one
/// image (16 photo-like images, generated), and a first phase asks about one image twice
/// on one engine: the time to first token the second time, from the image cache, against
/// the first.
pub(crate) async fn bench(
    config: KilnConfig,
    requests: usize,
    concurrency: usize,
    texts: Option<&std::path::Path>,
    json: Option<&std::path::Path>,
) -> Result<()> {
    const TOPICS: [&str; 16] = [
        "a dragon",
        "the sea",
        "a robot",
        "a city at night",
        "a lost key",
        "winter",
        "a baker",
        "the moon",
        "a train",
        "a garden",
        "an old map",
        "a storm",
        "a violin",
        "a lighthouse",
        "a fox",
        "a desert",
    ];
    let probe = Generation::from_config(config.clone()).await?;
    let vision = probe.info().vision.is_some();
    let images = if vision { Some(BenchImages::write(16)?) } else { None };
    // A JSON Lines file is prompts as `kiln run` reads them (images included, paths
    // relative to it); any other file, one question per line (about the bench's own
    // images for a vision model).
    let (given, texts) = match texts {
        Some(path) if path.extension().is_some_and(|e| e == "jsonl") => {
            (Some(read_prompts(path)?.into_iter().map(|(_, p)| p).collect::<Vec<_>>()), None)
        }
        Some(path) => (None, Some(crate::bench::read_texts(path)?)),
        None => (None, None),
    };
    let prompts: Vec<Prompt> = match (texts, &images) {
        _ if let Some(given) = given => given,
        (Some(t), _) if t.is_empty() => bail!("--texts holds no prompts"),
        (Some(t), None) => t.into_iter().map(Prompt::Text).collect(),
        (Some(t), Some(images)) => t.iter().enumerate().map(|(i, q)| images.prompt(i, q)).collect(),
        (None, None) => {
            TOPICS.iter().map(|t| Prompt::Text(format!("Write a long story about {t}."))).collect()
        }
        (None, Some(images)) => (0..16).map(|i| images.prompt(i, "Describe this image in detail.")).collect(),
    };
    let cache = match &images {
        Some(_) if prompts.iter().any(has_image) => {
            // The probe answers the prompt once, so that what a process does once (a GPU
            // backend compiling its kernels, buffers first allocated) stays out of the
            // figures; a fresh engine, its image cache empty, is the one measured.
            probe.generate(prompts[0].clone()).await?;
            probe.shutdown().await;
            let probe = Generation::from_config(config.clone()).await?;
            let ttft = |g: &Generated| g.time_to_first_token_ms;
            let first = probe.generate(prompts[0].clone()).await?;
            let again = probe.generate(prompts[0].clone()).await?;
            let ratio = ttft(&again) / ttft(&first).max(1e-9);
            println!(
                "image cache: time to first token {:.1} ms the first time, {:.1} ms asked again ({ratio:.2}×); \
                 {} image tokens",
                ttft(&first),
                ttft(&again),
                first.image_tokens
            );
            let cache = Some(
                serde_json::json!({"first_ttft_ms": ttft(&first), "repeat_ttft_ms": ttft(&again), "ratio": ratio,
                "image_tokens": first.image_tokens}),
            );
            probe.shutdown().await;
            cache
        }
        _ => {
            probe.shutdown().await;
            None
        }
    };
    let one = bench_phase(&config, prompts.clone(), requests.clamp(1, 4), 1).await?;
    print_phase("1 stream", &one);
    let many = bench_phase(&config, prompts, requests.max(concurrency), concurrency.max(1)).await?;
    print_phase(&format!("{concurrency} streams"), &many);
    let ratio =
        many["tokens_per_s"].as_f64().unwrap_or(0.0) / one["tokens_per_s"].as_f64().unwrap_or(1.0).max(1e-9);
    println!("aggregate tokens/s, {concurrency} streams / 1 stream: {ratio:.2}");
    if let Some(path) = json {
        let mut value = serde_json::json!({"single_stream": one, "concurrent": many, "concurrency": concurrency, "ratio": ratio});
        if let Some(cache) = cache {
            value["image_cache"] = cache;
        }
        std::fs::write(path, serde_json::to_string_pretty(&value)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    drop(images);
    Ok(())
}

/// Whether `prompt` carries an image.
fn has_image(prompt: &Prompt) -> bool {
    match prompt {
        Prompt::Messages(messages) => messages
            .iter()
            .any(|m| matches!(&m.content, Content::Parts(parts) if parts.iter().any(|p| matches!(p, Part::Image { .. } | Part::ImageUrl { .. })))),
        _ => false,
    }
}

/// Photo-like PNGs for a vision-language bench, in a folder of their own removed on drop.
struct BenchImages {
    dir: std::path::PathBuf,
    count: usize,
}

impl BenchImages {
    /// `count` images of 448×336: gradients and a soft disc, different each.
    fn write(count: usize) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("kiln-bench-images-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for i in 0..count {
            let image = image::RgbImage::from_fn(448, 336, |x, y| {
                let (fx, fy, k) = (x as f32 / 448.0, y as f32 / 336.0, i as f32);
                let disc = ((fx - 0.5).powi(2) + (fy - 0.5).powi(2)).sqrt() < 0.2 + 0.01 * k;
                let blue = if disc { 200.0 + 3.0 * k } else { 16.0 * k };
                image::Rgb([
                    (255.0 * fx) as u8 ^ (16 * (i % 16)) as u8,
                    (255.0 * fy) as u8,
                    blue.min(255.0) as u8,
                ])
            });
            let path = dir.join(format!("{i}.png"));
            image.save(&path).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(BenchImages { dir, count })
    }

    /// A user message of image `i` and `question`.
    fn prompt(&self, i: usize, question: &str) -> Prompt {
        let path = self.dir.join(format!("{}.png", i % self.count));
        let parts =
            vec![Part::Image { path: Some(path), url: None }, Part::Text { text: question.to_string() }];
        Prompt::Messages(vec![Message { role: "user".into(), content: Content::Parts(parts) }])
    }
}

impl Drop for BenchImages {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn bench_phase(
    config: &KilnConfig,
    prompts: Vec<Prompt>,
    requests: usize,
    concurrency: usize,
) -> Result<serde_json::Value> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let generation = Arc::new(Generation::from_config(config.clone()).await?);
    let next = Arc::new(AtomicUsize::new(0));
    let prompts = Arc::new(prompts);
    let started = std::time::Instant::now();
    let mut callers = Vec::new();
    for _ in 0..concurrency {
        let (generation, next, prompts) = (generation.clone(), next.clone(), prompts.clone());
        callers.push(tokio::spawn(async move {
            let (mut tokens, mut errors, mut per_stream) = (0usize, 0usize, Vec::new());
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= requests {
                    break;
                }
                let prompt = prompts[i % prompts.len()].clone();
                match generation.stream(prompt) {
                    Ok(stream) => match stream.finish().await {
                        Ok(g) => {
                            tokens += g.tokens.len();
                            per_stream.push(g.tokens.len() as f64 / (g.elapsed_ms / 1000.0).max(1e-9));
                        }
                        Err(_) => errors += 1,
                    },
                    Err(_) => errors += 1,
                }
            }
            (tokens, errors, per_stream)
        }));
    }
    let (mut tokens, mut errors, mut per_stream) = (0, 0, Vec::new());
    for caller in callers {
        let (t, e, p) = caller.await?;
        tokens += t;
        errors += e;
        per_stream.extend(p);
    }
    let seconds = started.elapsed().as_secs_f64();
    let quantization = generation.info().quantization.clone();
    let load_s = generation.load_time().as_secs_f64();
    let warmup_s = generation.warmup_time().map(|d| d.as_secs_f64());
    let stats = Arc::into_inner(generation).expect("callers are done").shutdown().await;
    Ok(serde_json::json!({
        "requests": requests, "errors": errors, "generated_tokens": tokens, "seconds": seconds,
        "tokens_per_s": tokens as f64 / seconds.max(1e-9),
        "per_stream_tokens_per_s": per_stream.iter().sum::<f64>() / per_stream.len().max(1) as f64,
        "ttft_ms": {"p50": stats.ttft_ms[0], "p99": stats.ttft_ms[1]},
        "inter_token_ms": {"p50": stats.inter_token_ms[0], "p99": stats.inter_token_ms[1], "max": stats.inter_token_ms[2]},
        "mean_sequences_per_step": stats.mean_sequences_per_step, "weights": quantization,
        "load_s": load_s, "warmup_s": warmup_s,
    }))
}

fn print_phase(label: &str, r: &serde_json::Value) {
    println!(
        "{label}: {} prompts, {} tokens in {:.2} s: {:.1} tokens/s ({:.1} per stream), {:.1} sequences per step; \
         TTFT p50 {:.0} ms p99 {:.0} ms; inter-token p50 {:.1} ms p99 {:.1} ms; {} errors; loaded in {:.2} s{}",
        r["requests"],
        r["generated_tokens"],
        r["seconds"].as_f64().unwrap_or(0.0),
        r["tokens_per_s"].as_f64().unwrap_or(0.0),
        r["per_stream_tokens_per_s"].as_f64().unwrap_or(0.0),
        r["mean_sequences_per_step"].as_f64().unwrap_or(0.0),
        r["ttft_ms"]["p50"].as_f64().unwrap_or(0.0),
        r["ttft_ms"]["p99"].as_f64().unwrap_or(0.0),
        r["inter_token_ms"]["p50"].as_f64().unwrap_or(0.0),
        r["inter_token_ms"]["p99"].as_f64().unwrap_or(0.0),
        r["errors"],
        r["load_s"].as_f64().unwrap_or(0.0),
        r["warmup_s"].as_f64().map(|s| format!(", warmed up in {s:.2} s")).unwrap_or_default(),
    );
}
