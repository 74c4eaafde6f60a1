//! `kiln preprocess`: only the image pipeline (the config's `[preprocess]` section; no
//! model), its batch written as a NumPy `.npy`.

use std::time::Instant;

use anyhow::Result;

use crate::PreprocessArgs;

pub(crate) fn run(args: PreprocessArgs) -> Result<()> {
    use kiln::vision::{ImageInput, ImagePipeline, expand_paths, write_npy};
    let mut config = kiln::PreprocessConfig::load(Some(&args.config), &args.sets)?;
    // Repeats measure the pipeline, not the cache.
    if args.repeat > 1 {
        config.cache_bytes = 0;
    }
    let paths = expand_paths(&args.images)?;
    let inputs: Vec<ImageInput> = paths.iter().map(ImageInput::path).collect();
    let pipeline = ImagePipeline::new(&config)?;
    let mut best = f64::INFINITY;
    let mut batch = None;
    for _ in 0..args.repeat.max(1) {
        let started = Instant::now();
        batch = Some(pipeline.process(&inputs)?);
        best = best.min(started.elapsed().as_secs_f64());
    }
    let batch = batch.expect("ran at least once");
    let failed: Vec<String> =
        batch.rows.iter().filter_map(|r| r.as_ref().err().map(|e| e.to_string())).collect();
    for e in &failed {
        eprintln!("kiln: skipped {e}");
    }
    let done = inputs.len() - failed.len();
    if done > 0 {
        write_npy(&args.out, &batch.tensor)?;
    }
    eprintln!(
        "kiln: preprocessed {done} of {} images in {:.3} s ({:.1} images/s{}); {:?} {} written to {}",
        inputs.len(),
        best,
        done as f64 / best.max(1e-9),
        if args.repeat > 1 { format!(", best of {}", args.repeat) } else { String::new() },
        batch.tensor.shape(),
        batch.tensor.dtype(),
        if done > 0 { args.out.display().to_string() } else { "nothing".into() }
    );
    if !failed.is_empty() {
        anyhow::bail!("{} of {} images could not be read (listed above)", failed.len(), inputs.len());
    }
    Ok(())
}
