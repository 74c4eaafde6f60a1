//! `kiln run` for `task = "embed"`: a file of texts embedded into JSON Lines in input
//! order, in calls of `batching.max_batch_size` with a few in flight, each window of
//! texts ordered by token count first so a batch pads little.

use std::time::Instant;

use anyhow::Result;
use kiln::{KilnConfig, Optimizer, Task};

use crate::RunArgs;
use crate::input::read_texts;
use crate::output::{progress_bar, write_output, write_row};

/// One output line of the embed task.
#[derive(serde::Serialize)]
struct EmbeddingRow<'a> {
    id: &'a serde_json::Value,
    embedding: &'a [f32],
}

pub(crate) async fn run(config: KilnConfig, args: &RunArgs) -> Result<()> {
    let (input, output) = (args.input(Task::Embed)?, args.output.as_path());
    let records = read_texts(input, args.format)?;
    // A file is a job, not a request: it goes in calls of one batch each
    // (`embed_windows`), so the request deadline bounds each call, never the whole file.
    let optimizer = Optimizer::from_config(config).await?;
    let started = Instant::now();
    let bar = progress_bar(records.len(), "texts");
    let result = write_output(output, async |out| {
        let texts: Vec<String> = records.iter().map(|r| r.text.clone()).collect();
        let progress = |n: usize| bar.inc(n as u64);
        optimizer
            .embed_windows(&texts, &progress, |window, vectors| {
                for (record, embedding) in records[window].iter().zip(&vectors) {
                    write_row(out, &EmbeddingRow { id: &record.id, embedding }).map_err(|e| {
                        kiln::Error::io("writing", output, std::io::Error::other(e.to_string()))
                    })?;
                }
                Ok(())
            })
            .await?;
        Ok(())
    })
    .await;
    bar.finish_and_clear();
    let elapsed = started.elapsed().as_secs_f64();
    let written = args.profiler.write(optimizer.reports());
    let quantization = optimizer.config().model.quantization;
    let stats = optimizer.shutdown().await?;
    result?;
    written?;
    let info = &stats.model;
    let precision = match quantization {
        kiln::Quantization::None => info.dtype.to_string(),
        q => format!("{}, {q}", info.dtype),
    };
    eprintln!(
        "kiln: embedded {} texts in {:.2} s ({:.1} texts/s) with {} on {} ({precision}); model loaded in {:.2} s",
        records.len(),
        elapsed,
        records.len() as f64 / elapsed.max(1e-9),
        info.provider,
        info.device,
        stats.load_seconds
    );
    Ok(())
}
