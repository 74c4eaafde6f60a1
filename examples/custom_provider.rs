//! A provider written outside kiln, registered with one line and chosen by name.
//!
//! `hashing` embeds text by feature hashing: every token id gets a fixed pseudo-random
//! ±1 vector, and kiln's text pipeline mean-pools and normalises them, so texts that
//! share words get similar vectors. No weights, no training — but a real computation
//! that goes through the same registry, worker thread and pipeline as candle does.
//!
//! Run it (after `scripts/setup`, whose MiniLM folder supplies the tokenizer):
//!
//! ```text
//! cargo run --example custom_provider
//! ```

use std::path::Path;
use std::sync::Arc;

use kiln::{
    Capabilities, DType, Device, Dim, Error, Inputs, KilnConfig, Model, ModelInfo, ModelSpec, Optimizer,
    Outputs, Provider, ProviderConfig, Result, Tensor, TensorSpec, async_trait,
};
use serde::Deserialize;

/// `[provider.options]` of the hashing provider.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HashingOptions {
    /// Embedding size.
    #[serde(default = "default_dim")]
    dim: usize,
    /// Changes every token's vector.
    #[serde(default)]
    seed: u64,
}

fn default_dim() -> usize {
    128
}

struct HashingProvider {
    options: HashingOptions,
}

#[async_trait]
impl Provider for HashingProvider {
    fn name(&self) -> &str {
        "hashing"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            formats: vec!["any folder with a tokenizer.json".into()],
            ..Capabilities::cpu_only(vec![DType::F32])
        }
    }

    async fn load(&self, spec: &ModelSpec) -> Result<Arc<dyn Model>> {
        if spec.device != Device::Cpu || spec.dtype != DType::F32 {
            return Err(Error::Unsupported(format!(
                "hashing runs f32 on cpu, not {} on {}",
                spec.dtype, spec.device
            )));
        }
        if !spec.path.join("tokenizer.json").is_file() {
            return Err(Error::model_load(&spec.path, "hashing needs a folder with a tokenizer.json"));
        }
        let tokens = || vec![Dim::Dynamic("batch".into()), Dim::Dynamic("sequence".into())];
        let mut info = ModelInfo::new("hashing", "hashing", spec.device, spec.dtype);
        // It reads no token_type_ids; kiln sends a model only the inputs it declares.
        info.inputs = vec![
            TensorSpec::new("input_ids", DType::I64, tokens()),
            TensorSpec::new("attention_mask", DType::I64, tokens()),
        ];
        let mut out = tokens();
        out.push(Dim::Fixed(self.options.dim));
        info.outputs = vec![TensorSpec::new("last_hidden_state", DType::F32, out)];
        Ok(Arc::new(HashingModel { info, dim: self.options.dim, seed: self.options.seed }))
    }
}

struct HashingModel {
    info: ModelInfo,
    dim: usize,
    seed: u64,
}

/// SplitMix64: a fast, well-mixed 64-bit hash.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

impl Model for HashingModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn run(&self, inputs: &Inputs) -> Result<Outputs> {
        let ids = inputs.require("input_ids")?;
        let (batch, sequence) = (ids.shape()[0], ids.shape()[1]);
        let mut hidden = Vec::with_capacity(batch * sequence * self.dim);
        for id in ids.to_vec::<i64>()? {
            let base = mix(self.seed ^ id as u64);
            hidden.extend((0..self.dim as u64).map(|j| if mix(base ^ j) & 1 == 0 { 1.0f32 } else { -1.0 }));
        }
        Ok(Outputs::new()
            .with("last_hidden_state", Tensor::from_vec(vec![batch, sequence, self.dim], hidden)?))
    }
}

fn build(config: &ProviderConfig) -> Result<Arc<dyn Provider>> {
    Ok(Arc::new(HashingProvider { options: config.options()? }))
}

kiln::register_provider!(
    "hashing",
    "feature-hashing bag-of-words embeddings (examples/custom_provider.rs)",
    build
);

/// Embeds `texts` with the provider the config at `config` names.
pub async fn embed_with(config: &Path, texts: &[String]) -> Result<Vec<Vec<f32>>> {
    let optimizer = Optimizer::from_config(KilnConfig::load(Some(config), &[])?).await?;
    let vectors = optimizer.embed(texts).await?;
    optimizer.shutdown().await?;
    Ok(vectors)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let texts: Vec<String> =
        ["the cat sat on the mat", "a cat sat on a mat", "quarterly revenue grew by ten percent"]
            .map(String::from)
            .to_vec();
    let vectors = embed_with(Path::new("examples/custom_provider.toml"), &texts).await?;
    for (i, a) in vectors.iter().enumerate() {
        for (j, b) in vectors.iter().enumerate().skip(i + 1) {
            let cosine: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
            println!("cos({:?}, {:?}) = {cosine:.3}", texts[i], texts[j]);
        }
    }
    Ok(())
}
