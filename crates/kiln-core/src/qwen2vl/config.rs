//! A Qwen2.5-VL checkpoint's `config.json`, in both layouts it comes in: the hub's (text
//! fields at the root beside `vision_config`, `rope_scaling.type = "mrope"`) and the one
//! newer transformers writes (the text fields again under `text_config`, the rope type
//! rewritten to "default" but `mrope_section` kept; transformers 5 names the block
//! `rope_parameters` and moves `rope_theta` into it). Token ids are read from the root:
//! `text_config` may carry them as null.

use std::path::Path;

use crate::{Error, Result};
use serde_json::Value;

/// The vision tower's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionConfig {
    /// Transformer blocks.
    pub depth: usize,
    /// Width of the tower.
    pub hidden_size: usize,
    /// Width of each block's SwiGLU.
    pub intermediate_size: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Side of a patch, in pixels.
    pub patch_size: usize,
    /// Frames per patch.
    pub temporal_patch_size: usize,
    /// Patches merged per side into one token.
    pub spatial_merge_size: usize,
    /// In pixels: windows are `window_size / merge / patch` merged tokens a side.
    pub window_size: usize,
    /// Blocks that attend over a whole image instead of a window.
    pub fullatt_block_indexes: Vec<usize>,
    /// Width of the merger's output: the language model's.
    pub out_hidden_size: usize,
}

/// The language model's shape and the special tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct QwenVlConfig {
    /// Tokens in the vocabulary (rows of the embedding).
    pub vocab_size: usize,
    /// Width of the decoder.
    pub hidden_size: usize,
    /// Width of each layer's SwiGLU.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key and value heads (grouped-query attention).
    pub num_key_value_heads: usize,
    /// RMSNorm's epsilon.
    pub rms_norm_eps: f64,
    /// RoPE's base.
    pub rope_theta: f64,
    /// Frequencies of each head's rotary half given to time, height and width.
    pub mrope_section: [usize; 3],
    /// The context the checkpoint was trained for.
    pub max_position_embeddings: usize,
    /// Whether the output projection is the embedding.
    pub tie_word_embeddings: bool,
    /// `<|image_pad|>`: one per image token in a prompt.
    pub image_token_id: u32,
    /// `<|vision_start|>`.
    pub vision_start_token_id: u32,
    /// `<|vision_end|>`.
    pub vision_end_token_id: u32,
    /// Tokens that end a turn.
    pub eos_token_ids: Vec<u32>,
    /// The vision tower's config.
    pub vision: VisionConfig,
}

impl QwenVlConfig {
    /// Reads `dir/config.json`; an error names the missing or wrong key.
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read(&path).map_err(|e| Error::io("reading", &path, e))?;
        let root: Value =
            serde_json::from_slice(&text).map_err(|e| Error::model_load_with(&path, "invalid JSON", e))?;
        Self::from_json(&root).map_err(|why| Error::model_load(&path, why))
    }

    /// The config from its parsed JSON; the error says which key is missing or wrong.
    pub fn from_json(root: &Value) -> std::result::Result<Self, String> {
        let model_type = root.get("model_type").and_then(Value::as_str).unwrap_or("");
        if !matches!(model_type, "qwen2_5_vl" | "qwen2_vl") {
            return Err(format!(
                "model_type `{model_type}`; this loader reads qwen2_5_vl (Qwen2.5-VL) checkpoints"
            ));
        }
        let text = root.get("text_config").filter(|v| v.is_object());
        // A text field from text_config when it has it (non-null), else from the root.
        let field = |key: &str| -> Option<&Value> {
            text.and_then(|t| t.get(key))
                .filter(|v| !v.is_null())
                .or_else(|| root.get(key).filter(|v| !v.is_null()))
        };
        let int = |key: &str| -> std::result::Result<usize, String> {
            field(key)
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .ok_or_else(|| format!("no integer `{key}`"))
        };
        let float = |key: &str, default: f64| field(key).and_then(Value::as_f64).unwrap_or(default);
        let token = |key: &str| -> std::result::Result<u32, String> {
            root.get(key)
                .and_then(Value::as_u64)
                .or_else(|| text.and_then(|t| t.get(key)).and_then(Value::as_u64))
                .map(|v| v as u32)
                .ok_or_else(|| format!("no `{key}`"))
        };
        let rope = field("rope_scaling")
            .filter(|r| r.get("mrope_section").is_some())
            .or_else(|| field("rope_parameters"))
            .or_else(|| field("rope_scaling"))
            .ok_or("no `rope_scaling` or `rope_parameters` (with `mrope_section`)")?;
        let section: Vec<usize> = rope
            .get("mrope_section")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_u64).map(|v| v as usize).collect())
            .ok_or("`rope_scaling` (or `rope_parameters`) has no `mrope_section`")?;
        let mrope_section: [usize; 3] = section
            .try_into()
            .map_err(|s: Vec<usize>| format!("`mrope_section` has {} entries, not 3", s.len()))?;
        let eos_token_ids = match field("eos_token_id") {
            Some(Value::Array(ids)) => ids.iter().filter_map(Value::as_u64).map(|v| v as u32).collect(),
            Some(v) => v.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            None => Vec::new(),
        };
        let v = root.get("vision_config").ok_or("no `vision_config`")?;
        let vint = |key: &str, default: Option<usize>| -> std::result::Result<usize, String> {
            v.get(key)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .or(default)
                .ok_or_else(|| format!("no integer `vision_config.{key}`"))
        };
        let vision = VisionConfig {
            depth: vint("depth", None)?,
            hidden_size: vint("hidden_size", None)?,
            intermediate_size: vint("intermediate_size", None)?,
            num_heads: vint("num_heads", None)?,
            patch_size: vint("patch_size", Some(14))?,
            temporal_patch_size: vint("temporal_patch_size", Some(2))?,
            spatial_merge_size: vint("spatial_merge_size", Some(2))?,
            window_size: vint("window_size", Some(112))?,
            fullatt_block_indexes: v
                .get("fullatt_block_indexes")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_u64).map(|x| x as usize).collect())
                .unwrap_or_default(),
            out_hidden_size: vint("out_hidden_size", None)?,
        };
        let config = QwenVlConfig {
            vocab_size: int("vocab_size")?,
            hidden_size: int("hidden_size")?,
            intermediate_size: int("intermediate_size")?,
            num_hidden_layers: int("num_hidden_layers")?,
            num_attention_heads: int("num_attention_heads")?,
            num_key_value_heads: int("num_key_value_heads")?,
            rms_norm_eps: float("rms_norm_eps", 1e-6),
            rope_theta: field("rope_theta")
                .or_else(|| rope.get("rope_theta"))
                .and_then(Value::as_f64)
                .unwrap_or(1e6),
            mrope_section,
            max_position_embeddings: int("max_position_embeddings").unwrap_or(32_768),
            tie_word_embeddings: field("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
            image_token_id: token("image_token_id")?,
            vision_start_token_id: token("vision_start_token_id")?,
            vision_end_token_id: token("vision_end_token_id")?,
            eos_token_ids,
            vision,
        };
        config.check()?;
        Ok(config)
    }

    /// Shapes that cannot work, named.
    fn check(&self) -> std::result::Result<(), String> {
        let heads = self.num_attention_heads;
        if heads == 0 || !self.hidden_size.is_multiple_of(heads) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {heads}",
                self.hidden_size
            ));
        }
        if self.num_key_value_heads == 0 || !heads.is_multiple_of(self.num_key_value_heads) {
            return Err(format!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {}",
                self.num_key_value_heads
            ));
        }
        let half = self.head_dim() / 2;
        if self.mrope_section.iter().sum::<usize>() != half {
            return Err(format!(
                "mrope_section {:?} sums to {}, not head_dim / 2 = {half}",
                self.mrope_section,
                self.mrope_section.iter().sum::<usize>()
            ));
        }
        let v = &self.vision;
        if v.num_heads == 0
            || !v.hidden_size.is_multiple_of(v.num_heads)
            || !(v.hidden_size / v.num_heads).is_multiple_of(4)
        {
            return Err(format!(
                "vision_config: hidden_size {} over num_heads {} must give a head size divisible by 4",
                v.hidden_size, v.num_heads
            ));
        }
        if v.spatial_merge_size == 0
            || v.patch_size == 0
            || v.window_size < v.spatial_merge_size * v.patch_size
        {
            return Err("vision_config: window_size must hold at least one merged patch".into());
        }
        Ok(())
    }

    /// Size of one attention head of the language model.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The config.json transformers 5 writes (`save_pretrained` of 5.17): the text fields
    /// under `text_config`, M-RoPE's sections and theta in `rope_parameters`.
    #[test]
    fn transformers_5_configs_read_rope_parameters() {
        let config = serde_json::json!({
            "model_type": "qwen2_5_vl", "image_token_id": 6, "vision_start_token_id": 3,
            "vision_end_token_id": 4, "video_token_id": 7, "tie_word_embeddings": true,
            "text_config": {
                "hidden_size": 2048, "intermediate_size": 11008, "num_attention_heads": 16,
                "num_hidden_layers": 36, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
                "vocab_size": 151936, "max_position_embeddings": 128000, "eos_token_id": 151935,
                "rope_parameters": {"mrope_section": [16, 24, 24], "rope_theta": 500000.0, "rope_type": "default"}
            },
            "vision_config": {
                "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                "out_hidden_size": 2048, "fullatt_block_indexes": [7, 15, 23, 31],
                "rope_parameters": {"rope_theta": 10000.0, "rope_type": "axial"}
            }
        });
        let c = QwenVlConfig::from_json(&config).expect("a transformers 5 config reads");
        assert_eq!(c.mrope_section, [16, 24, 24]);
        assert_eq!(c.rope_theta, 500_000.0);
        assert_eq!((c.hidden_size, c.num_hidden_layers, c.vision.depth), (2048, 36, 32));
        let mut none = config.clone();
        none["text_config"].as_object_mut().unwrap().remove("rope_parameters");
        let why = QwenVlConfig::from_json(&none).unwrap_err();
        assert!(why.contains("rope_parameters"), "{why}");
    }
}
