//! `kiln run` for `task = "embed"`: a file of texts embedded into JSON Lines in input
//! order, in calls of `batching.max_batch_size` with a few in flight, each window of
//! texts ordered by token count first so a batch pads little.

use std::ops::Range;
use std::time::Instant;

use anyhow::Result;
use kiln::{KilnConfig, Optimizer, Task};

use crate::RunArgs;
use crate::input::{TextRecord, read_texts};
use crate::output::{progress_bar, write_output, write_row};

/// One output line of the embed task.
#[derive(serde::Serialize)]
struct EmbeddingRow<'a> {
    id: &'a serde_json::Value,
    embedding: &'a [f32],
}

/// Calls to the optimizer in flight at once while embedding a file: two, so that the
/// next batch is formed while one runs and no call waits behind more than one other —
/// each call has its own `scheduler.timeout_ms` deadline, and with four in flight a call
/// of 32 texts of 200 words waited ~4 batches (over 30 s on 2 busy cores).
const CALLS_IN_FLIGHT: usize = 2;

/// Batches per window of [`length_sorted_windows`]: enough texts that neighbours in
/// length order differ little, few enough that a window's embeddings wait in memory
/// only briefly (2,048 texts at batch 32: 3 MB of MiniLM vectors).
const WINDOW_BATCHES: usize = 64;

/// The record indices of `window`, sorted by token count, longest first, so the texts
/// of a call have similar lengths and a batch pads little — what sentence-transformers'
/// `encode` does over its whole input (by characters; tokens are what padding is made
/// of: on the mixed-script texts of `scripts/compare_sentence_transformers.py` batches
/// pad 39% in file order, 22% sorted by characters, 2% by tokens). `kiln run` writes a
/// window back in file order.
async fn length_sorted(
    optimizer: &Optimizer,
    records: &[TextRecord],
    window: Range<usize>,
) -> Result<Vec<usize>> {
    let texts: Vec<String> = records[window.clone()].iter().map(|r| r.text.clone()).collect();
    let lengths = optimizer.token_lengths(texts).await?;
    let start = window.start;
    let mut order: Vec<usize> = window.collect();
    order.sort_by_key(|&i| std::cmp::Reverse(lengths[i - start]));
    Ok(order)
}

pub(crate) async fn run(config: KilnConfig, args: &RunArgs) -> Result<()> {
    use futures_util::StreamExt;
    let (input, output) = (args.input(Task::Embed)?, args.output.as_path());
    let records = read_texts(input, args.format)?;
    // A file is a job, not a request: it goes in calls of one batch each, so the
    // request deadline bounds each call, never the whole file.
    let chunk = config.batching.max_batch_size.max(1);
    let optimizer = Optimizer::from_config(config).await?;
    let started = Instant::now();
    let bar = progress_bar(records.len(), "texts");
    let result = write_output(output, async |out| {
        let (optimizer, records, bar) = (&optimizer, &records, &bar);
        let windows: Vec<Range<usize>> = (0..records.len())
            .step_by(WINDOW_BATCHES * chunk)
            .map(|start| start..(start + WINDOW_BATCHES * chunk).min(records.len()))
            .collect();
        let mut next = match windows.first() {
            Some(first) => Some(length_sorted(optimizer, records, first.clone()).await?),
            None => None,
        };
        for (w, window) in windows.iter().enumerate() {
            let order = next.take().unwrap_or_default();
            // The next window is tokenized for its order while this one is embedded.
            let (vectors, upcoming) = tokio::join!(
                futures_util::stream::iter(order.chunks(chunk))
                    .map(|picks| async move {
                        let texts: Vec<String> = picks.iter().map(|&i| records[i].text.clone()).collect();
                        let vectors = optimizer.embed(&texts).await;
                        bar.inc(picks.len() as u64);
                        vectors
                    })
                    .buffered(CALLS_IN_FLIGHT)
                    .collect::<Vec<_>>(),
                async {
                    match windows.get(w + 1) {
                        Some(following) => {
                            length_sorted(optimizer, records, following.clone()).await.map(Some)
                        }
                        None => Ok(None),
                    }
                }
            );
            next = upcoming?;
            let mut by_place: Vec<Vec<f32>> = vec![Vec::new(); window.len()];
            for (picks, vectors) in order.chunks(chunk).zip(vectors) {
                for (&i, vector) in picks.iter().zip(vectors?) {
                    by_place[i - window.start] = vector;
                }
            }
            for (record, embedding) in records[window.clone()].iter().zip(&by_place) {
                write_row(out, &EmbeddingRow { id: &record.id, embedding })?;
            }
        }
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
