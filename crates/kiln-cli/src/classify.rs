//! `kiln run` for `task = "classify"`: a folder, an image or a list of images through
//! the image pipeline and the model, the best classes of each written as JSON Lines in
//! input order; an image that cannot be read gets a row with its error.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use kiln::{KilnConfig, Optimizer, Task};

use crate::RunArgs;
use crate::output::{write_output, write_row};

/// The images `kiln run` classifies: a folder's images, one image, or a text file
/// listing image paths (one per line, relative to the list's folder).
fn image_list(input: &std::path::Path) -> Result<Vec<PathBuf>> {
    use kiln::vision::{expand_paths, has_image_extension};
    if input.is_dir() || has_image_extension(input) {
        return Ok(expand_paths(&[input.to_path_buf()])?);
    }
    let text = std::fs::read_to_string(input)
        .with_context(|| format!("reading the image list {}", input.display()))?;
    let base = input.parent().unwrap_or(std::path::Path::new("."));
    let paths: Vec<PathBuf> =
        text.lines().map(str::trim).filter(|l| !l.is_empty()).map(|l| base.join(l)).collect();
    if paths.is_empty() {
        anyhow::bail!("the image list {} names no images", input.display());
    }
    Ok(paths)
}

/// Images per call to the optimizer.
const IMAGE_CHUNK: usize = 256;

pub(crate) async fn run(config: KilnConfig, args: &RunArgs) -> Result<()> {
    use kiln::vision::ImageInput;
    let paths = image_list(args.input(Task::Classify)?)?;
    let optimizer = Optimizer::from_config(config).await?;
    let started = Instant::now();
    let mut failed = 0usize;
    let result = write_output(&args.output, async |out| {
        for (chunk_index, chunk) in paths.chunks(IMAGE_CHUNK).enumerate() {
            let inputs: Vec<ImageInput> = chunk.iter().map(ImageInput::path).collect();
            let results = optimizer.classify(&inputs).await?;
            for (i, (path, result)) in chunk.iter().zip(results).enumerate() {
                let id = chunk_index * IMAGE_CHUNK + i;
                let row = match result {
                    Ok(c) => serde_json::json!({"id": id, "path": path, "top_k": c.top_k}),
                    Err(e) => {
                        failed += 1;
                        eprintln!("kiln: {e}");
                        serde_json::json!({"id": id, "path": path, "error": e.to_string()})
                    }
                };
                write_row(out, &row)?;
            }
        }
        Ok(())
    })
    .await;
    let elapsed = started.elapsed().as_secs_f64();
    let written = args.profiler.write(optimizer.reports());
    let stats = optimizer.shutdown().await?;
    result?;
    written?;
    eprintln!(
        "kiln: classified {} of {} images in {:.2} s ({:.1} images/s) with {} on {}; model loaded in {:.2} s",
        paths.len() - failed,
        paths.len(),
        elapsed,
        (paths.len() - failed) as f64 / elapsed.max(1e-9),
        stats.model.provider,
        stats.model.device,
        stats.load_seconds
    );
    if failed > 0 {
        anyhow::bail!("{failed} of {} images could not be read (their rows carry the error)", paths.len());
    }
    Ok(())
}
