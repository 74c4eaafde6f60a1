//! Embed a few texts with kiln as a library: the README's example.
//!
//! ```text
//! scripts/setup && . .kiln/env && cargo run --release --example embed
//! ```

use kiln::{KilnConfig, Optimizer};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Defaults < examples/embed.toml < KILN_* environment < these overrides.
    let config = KilnConfig::load(Some("examples/embed.toml".as_ref()), &["model.dtype=f32".into()])?;
    let optimizer = Optimizer::from_config(config).await?;

    let texts = vec!["kiln is fast".to_string(), "kiln is quick".to_string(), "the sky is blue".to_string()];
    let vectors = optimizer.embed(&texts).await?;

    let cosine = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    println!("{} texts, {} dimensions", vectors.len(), vectors[0].len());
    println!(
        "fast~quick {:.3}, fast~sky {:.3}",
        cosine(&vectors[0], &vectors[1]),
        cosine(&vectors[0], &vectors[2])
    );

    let stats = optimizer.shutdown().await?;
    println!("{}", serde_json::to_string_pretty(&stats)?);
    Ok(())
}
