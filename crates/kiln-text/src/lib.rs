//! kiln's text pipeline: texts to token rows (unpadded, for the batcher) or padded
//! batches, and token vectors back to one embedding per text — the way
//! sentence-transformers does it for the same model folder.
//!
//! A [`TextPipeline`] reads a Hugging Face / sentence-transformers folder:
//! `tokenizer.json` (required), `sentence_bert_config.json` (`max_seq_length`),
//! `modules.json` (is there a Pooling and a Normalize step?) and the pooling module's
//! `config.json` (which pooling). Values in [`TextConfig`] override what the folder says.

use std::path::{Path, PathBuf};

use kiln_core::{EmbeddingHead, Error, NamedTensors, Pooling, Result, Tensor, TextConfig, pool_tokens};
use serde::Deserialize;
use tokenizers::{PaddingParams, PaddingStrategy, Tokenizer, TruncationParams, TruncationStrategy};

pub mod chat;
pub mod gguf;
pub mod input;
mod rows;
use rows::RowTokenizer;

/// Input names the pipeline produces, as BERT-family models call them.
pub const INPUT_IDS: &str = "input_ids";
/// Mask of real (1) versus padding (0) tokens.
pub const ATTENTION_MASK: &str = "attention_mask";
/// Segment ids (all 0 for single texts).
pub const TOKEN_TYPE_IDS: &str = "token_type_ids";

/// What the pipeline decided from the folder and the overrides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextSettings {
    /// Word pieces per text at most, special tokens included.
    pub max_length: usize,
    /// How token vectors become one vector.
    pub pooling: Pooling,
    /// Whether the result is L2-normalised.
    pub normalize: bool,
    /// Characters of a text tokenized at most (0: all); see [`default_max_chars`].
    pub max_chars: usize,
}

/// `text.max_chars` when unset: 128 characters per token of `max_length`. Every word
/// of up to 100 characters gives at least one token, so a text is only cut short of
/// its `max_length` tokens when runs of whitespace or words over 100 characters (one
/// `[UNK]` each, however long) fill its first `128 × max_length` characters; without a
/// cut, one 10 MB line of CJK text took 26 s and 2.3 GB to tokenize.
pub fn default_max_chars(max_length: usize) -> usize {
    max_length.saturating_mul(128)
}

/// A batch of tokenized texts, padded to the longest.
#[derive(Debug, Clone)]
pub struct Encoded {
    /// `input_ids`, `attention_mask`, `token_type_ids`, each i64 `[batch, sequence]`.
    pub inputs: NamedTensors,
    /// Number of texts.
    pub batch: usize,
    /// Padded length.
    pub sequence: usize,
    /// Real tokens per text (before padding).
    pub lengths: Vec<usize>,
    /// The attention mask, row-major, for pooling.
    pub mask: Vec<i64>,
}

/// Tokenizer plus pooling and normalisation rules of one model folder.
#[derive(Clone)]
pub struct TextPipeline {
    tokenizer: Tokenizer,
    /// The same tokenizer, faster, for [`encode_rows`](Self::encode_rows).
    rows: RowTokenizer,
    settings: TextSettings,
}

impl std::fmt::Debug for TextPipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextPipeline").field("settings", &self.settings).finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct SentenceBertConfig {
    max_seq_length: Option<usize>,
}

#[derive(Deserialize)]
struct Module {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    path: String,
}

#[derive(Deserialize, Default)]
struct PoolingFlags {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
    #[serde(default)]
    pooling_mode_weightedmean_tokens: bool,
    #[serde(default)]
    pooling_mode_lasttoken: bool,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| Error::model_load_with(path, "invalid JSON", e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io("reading", path, e)),
    }
}

/// Pooling and normalisation as the folder's `modules.json` describes them.
fn folder_pooling(dir: &Path) -> Result<(Option<Pooling>, bool)> {
    let Some(modules) = read_json::<Vec<Module>>(&dir.join("modules.json"))? else {
        return Ok((None, false));
    };
    let normalize = modules.iter().any(|m| m.kind.ends_with(".Normalize"));
    let Some(pooling_module) = modules.iter().find(|m| m.kind.ends_with(".Pooling")) else {
        return Ok((None, normalize));
    };
    let config_path: PathBuf = dir.join(&pooling_module.path).join("config.json");
    let flags: PoolingFlags = read_json(&config_path)?.unwrap_or_default();
    let chosen: Vec<Pooling> = [
        (flags.pooling_mode_cls_token, Pooling::Cls),
        (flags.pooling_mode_mean_tokens, Pooling::Mean),
        (flags.pooling_mode_max_tokens, Pooling::Max),
        (flags.pooling_mode_mean_sqrt_len_tokens, Pooling::MeanSqrtLen),
    ]
    .into_iter()
    .filter_map(|(on, p)| on.then_some(p))
    .collect();
    if flags.pooling_mode_weightedmean_tokens || flags.pooling_mode_lasttoken || chosen.len() > 1 {
        return Err(Error::Unsupported(format!(
            "{}: pooling modes other than exactly one of cls, mean, max, mean_sqrt_len; \
             set `text.pooling` to choose one",
            config_path.display()
        )));
    }
    Ok((chosen.first().copied(), normalize))
}

impl TextSettings {
    /// The pooling and normalisation these settings ask for.
    pub fn head(&self) -> EmbeddingHead {
        EmbeddingHead { pooling: self.pooling, normalize: self.normalize }
    }
}

/// The embedding head a model folder asks for — pooling from its pooling module's
/// config (mean when none), normalisation when `modules.json` lists a Normalize step —
/// with `overrides` winning. Known before the model loads, so the provider can apply it
/// inside the model run.
pub fn embedding_head(dir: &Path, overrides: &TextConfig) -> Result<EmbeddingHead> {
    let (pooling, normalize) = folder_pooling(dir)?;
    Ok(EmbeddingHead {
        pooling: overrides.pooling.or(pooling).unwrap_or(Pooling::Mean),
        normalize: overrides.normalize.unwrap_or(normalize),
    })
}

/// One tokenized text, unpadded: what the batcher collates with other texts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRow {
    /// Word-piece ids, special tokens included.
    pub ids: Vec<i64>,
    /// Segment ids, one per id.
    pub type_ids: Vec<i64>,
    /// Whether the text was cut to fit `max_length` tokens (or `max_chars` characters).
    pub truncated: bool,
}

impl TokenRow {
    /// Tokens in the row.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether it has no tokens (never, for a BERT tokenizer: [CLS] and [SEP] are added).
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The row as model inputs `[1, len]`: ids, an all-ones attention mask, type ids.
    pub fn inputs(&self) -> Result<NamedTensors> {
        let len = self.ids.len();
        Ok(NamedTensors::new()
            .with(INPUT_IDS, Tensor::from_vec(vec![1, len], self.ids.clone())?)
            .with(ATTENTION_MASK, Tensor::from_vec(vec![1, len], vec![1i64; len])?)
            .with(TOKEN_TYPE_IDS, Tensor::from_vec(vec![1, len], self.type_ids.clone())?))
    }
}

impl TextPipeline {
    /// Reads the folder's tokenizer and settings; `overrides` win over the folder;
    /// `model_max` (the model's position embeddings) caps the length.
    pub fn from_model_dir(dir: &Path, overrides: &TextConfig, model_max: Option<usize>) -> Result<Self> {
        let tokenizer_path = dir.join("tokenizer.json");
        if !tokenizer_path.is_file() {
            return Err(Error::model_load(
                dir,
                "no tokenizer.json; a text model folder needs one to tokenize",
            ));
        }
        let tokenizer = Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| Error::model_load_with(&tokenizer_path, "cannot read tokenizer", e))?;

        let folder_max = read_json::<SentenceBertConfig>(&dir.join("sentence_bert_config.json"))?
            .and_then(|c| c.max_seq_length);
        let max_length = overrides.max_length.or(folder_max).or(model_max).unwrap_or(512);
        if let Some(model_max) = model_max.filter(|&m| max_length > m) {
            return Err(Error::InvalidInput(format!(
                "text.max_length {max_length} exceeds what the model accepts ({model_max} positions)"
            )));
        }
        let head = embedding_head(dir, overrides)?;
        let max_chars = overrides.max_chars.unwrap_or_else(|| default_max_chars(max_length));
        let settings =
            TextSettings { max_length, pooling: head.pooling, normalize: head.normalize, max_chars };
        Self::new(tokenizer, settings)
    }

    /// A pipeline from a tokenizer and explicit settings.
    pub fn new(mut tokenizer: Tokenizer, settings: TextSettings) -> Result<Self> {
        // The folder's tokenizer.json may carry its own padding (MiniLM's pads every text
        // to 128) and truncation; ours replace them: pad to the longest in the batch,
        // truncate to max_length, as sentence-transformers does.
        let pad = tokenizer.get_padding().cloned().unwrap_or_default();
        tokenizer.with_padding(Some(PaddingParams { strategy: PaddingStrategy::BatchLongest, ..pad }));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: settings.max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                ..Default::default()
            }))
            .map_err(|e| Error::InvalidInput(format!("cannot truncate to {}: {e}", settings.max_length)))?;
        let rows = RowTokenizer::new(&tokenizer, settings.max_length, settings.max_chars)
            .map_err(|e| Error::InvalidInput(format!("cannot prepare the tokenizer: {e}")))?;
        Ok(TextPipeline { tokenizer, rows, settings })
    }

    /// The settings in force.
    pub fn settings(&self) -> &TextSettings {
        &self.settings
    }

    /// Tokenizes texts one by one, each truncated to `max_length` and left unpadded:
    /// the batcher pads once, to the longest text of the batch it forms.
    pub fn encode_rows<S: AsRef<str>>(&self, texts: &[S]) -> Result<Vec<TokenRow>> {
        texts
            .iter()
            .map(|text| {
                let (ids, types, truncated) = self
                    .rows
                    .row(text.as_ref())
                    .map_err(|e| Error::InvalidInput(format!("tokenization failed: {e}")))?;
                Ok(TokenRow {
                    ids: ids.into_iter().map(i64::from).collect(),
                    type_ids: types.into_iter().map(i64::from).collect(),
                    truncated,
                })
            })
            .collect()
    }

    /// Tokenizes a batch with the folder's tokenizer as it is — no fast paths, no word
    /// or character cut — padded to its longest text: the reference the fast rows are
    /// tested against, and what benches feed a model directly.
    pub fn encode<S: AsRef<str>>(&self, texts: &[S]) -> Result<Encoded> {
        let inputs: Vec<&str> = texts.iter().map(AsRef::as_ref).collect();
        let encodings = self
            .tokenizer
            .encode_batch(inputs, true)
            .map_err(|e| Error::InvalidInput(format!("tokenization failed: {e}")))?;
        let batch = encodings.len();
        let sequence = encodings.first().map_or(0, |e| e.get_ids().len());
        let mut ids = Vec::with_capacity(batch * sequence);
        let mut mask = Vec::with_capacity(batch * sequence);
        let mut types = Vec::with_capacity(batch * sequence);
        let mut lengths = Vec::with_capacity(batch);
        for e in &encodings {
            ids.extend(e.get_ids().iter().map(|&v| i64::from(v)));
            mask.extend(e.get_attention_mask().iter().map(|&v| i64::from(v)));
            types.extend(e.get_type_ids().iter().map(|&v| i64::from(v)));
            lengths.push(e.get_attention_mask().iter().filter(|&&m| m == 1).count());
        }
        let shape = vec![batch, sequence];
        let inputs = NamedTensors::new()
            .with(INPUT_IDS, Tensor::from_vec(shape.clone(), ids)?)
            .with(ATTENTION_MASK, Tensor::from_vec(shape.clone(), mask.clone())?)
            .with(TOKEN_TYPE_IDS, Tensor::from_vec(shape, types)?);
        Ok(Encoded { inputs, batch, sequence, lengths, mask })
    }

    /// One vector per text from a model output: token vectors (f32 `[batch, sequence,
    /// hidden]`) are pooled under `mask` (`[batch, sequence]`, row-major, 1 = real
    /// token); an output that is already one vector per text (`[batch, hidden]`) is used
    /// as is. Either way the result is normalised if the settings say so.
    pub fn pool(&self, output: &Tensor, mask: &[i64]) -> Result<Vec<Vec<f32>>> {
        let values = output.to_f32_vec()?;
        match *output.shape() {
            [batch, sequence, hidden] if batch * sequence == mask.len() => {
                Ok(pool(&values, mask, batch, sequence, hidden, &self.settings))
            }
            [batch, hidden] => Ok(pool(&values, &vec![1; batch], batch, 1, hidden, &self.settings)),
            ref shape => Err(Error::InvalidInput(format!(
                "model output: expected float [batch, sequence, hidden] matching the attention mask ({} tokens) \
                 or [batch, hidden], got {:?}",
                mask.len(),
                shape
            ))),
        }
    }
}

/// Pools `[batch, sequence, hidden]` row-major values under a `[batch, sequence]` mask:
/// [`kiln_core::pool_tokens`], one `Vec` per text.
pub fn pool(
    values: &[f32],
    mask: &[i64],
    batch: usize,
    sequence: usize,
    hidden: usize,
    settings: &TextSettings,
) -> Vec<Vec<f32>> {
    pool_tokens(values, mask, batch, sequence, hidden, settings.head())
        .chunks_exact(hidden.max(1))
        .map(<[f32]>::to_vec)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pooling: Pooling, normalize: bool) -> TextSettings {
        TextSettings { max_length: 8, pooling, normalize, max_chars: 0 }
    }

    // Two texts, three positions, hidden 2; the second text has one padding position.
    const VALUES: [f32; 12] = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 10.0, 0.0, 0.0, 10.0, 99.0, 99.0];
    const MASK: [i64; 6] = [1, 1, 1, 1, 1, 0];

    #[test]
    fn pipeline_pools_token_vectors_and_passes_pooled_outputs_through() {
        let tokenizer = Tokenizer::new(tokenizers::models::wordpiece::WordPiece::default());
        let text = TextPipeline::new(tokenizer, settings(Pooling::Mean, false)).unwrap();
        let tokens = Tensor::from_vec(vec![2, 3, 2], VALUES.to_vec()).unwrap();
        assert_eq!(text.pool(&tokens, &MASK).unwrap(), vec![vec![3.0, 4.0], vec![5.0, 5.0]]);
        let pooled = Tensor::from_vec(vec![2, 2], vec![1f32, 2., 3., 4.]).unwrap();
        assert_eq!(text.pool(&pooled, &MASK).unwrap(), vec![vec![1.0, 2.0], vec![3.0, 4.0]]);
        let err = text.pool(&tokens, &MASK[..4]).unwrap_err().to_string();
        assert!(
            err.contains("matching the attention mask (4 tokens) or [batch, hidden], got [2, 3, 2]"),
            "{err}"
        );
    }

    #[test]
    fn folder_without_tokenizer_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = TextPipeline::from_model_dir(dir.path(), &TextConfig::default(), None).unwrap_err();
        assert!(err.to_string().contains("no tokenizer.json"), "{err}");
    }

    #[test]
    fn modules_json_decides_pooling_and_normalisation() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("modules.json"),
            r#"[{"idx":0,"name":"0","path":"","type":"sentence_transformers.models.Transformer"},
                {"idx":1,"name":"1","path":"1_Pooling","type":"sentence_transformers.models.Pooling"},
                {"idx":2,"name":"2","path":"2_Normalize","type":"sentence_transformers.models.Normalize"}]"#,
        )
        .unwrap();
        std::fs::create_dir(dir.path().join("1_Pooling")).unwrap();
        std::fs::write(dir.path().join("1_Pooling/config.json"), r#"{"pooling_mode_cls_token": true}"#)
            .unwrap();
        assert_eq!(folder_pooling(dir.path()).unwrap(), (Some(Pooling::Cls), true));

        std::fs::write(
            dir.path().join("1_Pooling/config.json"),
            r#"{"pooling_mode_cls_token": true, "pooling_mode_mean_tokens": true}"#,
        )
        .unwrap();
        let err = folder_pooling(dir.path()).unwrap_err().to_string();
        assert!(err.contains("set `text.pooling` to choose one"), "{err}");
    }
}
