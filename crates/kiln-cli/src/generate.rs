//! `kiln run` for `task = "generate"`: every prompt of the input submitted at once (the
//! engine batches them step by step), answers written in input order; a single prompt
//! on a terminal streams its text as it comes.

use std::io::{IsTerminal, Write};

use anyhow::{Context, Result, bail};
use kiln::KilnConfig;
use kiln::runtime::{Event, Generation, Prompt};
use kiln::text::chat::Message;
use serde::Deserialize;

use crate::RunArgs;

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
            (None, Some(m)) => Prompt::Messages(m),
            _ => bail!("{}: give exactly one of \"prompt\" (a string) and \"messages\" (a list)", at()),
        };
        prompts.push((record.id.unwrap_or_else(|| n.into()), prompt));
    }
    if prompts.is_empty() {
        bail!("{} holds no prompts", path.display());
    }
    Ok(prompts)
}

pub(crate) async fn generate_file(config: KilnConfig, args: &RunArgs) -> Result<()> {
    let prompts = read_prompts(&args.input)?;
    let generation = Generation::from_config(config).await?;
    let started = std::time::Instant::now();
    let live = prompts.len() == 1 && std::io::stdout().is_terminal();
    // Submitted together; the engine admits them as slots and KV-cache budget allow.
    let streams: Vec<_> = prompts.iter().map(|(_, p)| generation.stream(p.clone())).collect();
    let mut failed = 0;
    let mut rows = Vec::with_capacity(prompts.len());
    for ((id, _), stream) in prompts.iter().zip(streams) {
        let row = match stream {
            Err(e) => Err(e),
            Ok(mut stream) => loop {
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
            },
        };
        if live {
            println!();
        }
        rows.push(match row {
            Ok(g) => serde_json::json!({
                "id": id, "text": g.text, "tokens": g.tokens.len(), "token_ids": g.tokens, "prompt_tokens": g.prompt_tokens,
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
    crate::run::write_output(&args.output, async |out| {
        for row in &rows {
            serde_json::to_writer(&mut *out, row)?;
            out.write_all(b"\n")?;
        }
        Ok(())
    })
    .await?;
    let info = generation.info().clone();
    let load = generation.load_time().as_secs_f64();
    let stats = generation.shutdown().await;
    eprintln!(
        "kiln: generated {} tokens for {} of {} prompts in {:.2} s ({:.1} tokens/s; {:.1} sequences per step) with {} \
         ({}) on {}; model loaded in {load:.2} s",
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
