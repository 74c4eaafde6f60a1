//! What every provider's Qwen2.5-VL shares, independent of the arrays it computes with:
//! the checkpoint's `config.json` ([`config`]), the rotary positions ([`rope`]), and the
//! folder's other parts — which tensor-naming layout wrote it ([`TensorLayout`]), its
//! quantization ([`quantization`]), end-of-turn tokens, chat template.
//!
//! candle (`kiln-provider-candle`'s `qwen2vl`) and MLX (`kiln-provider-mlx`'s `qwen2vl`)
//! each write the model in their own arrays over these, so a prompt gets the same
//! positions and the same checkpoint reading on both.

pub mod config;
pub mod rope;

use std::path::Path;

use serde_json::Value;

pub use config::{QwenVlConfig, VisionConfig};
pub use rope::{RopeIndex, inverse_frequencies, mrope_cos_sin, rope_index};

use crate::{Error, Result};

/// Whether `dir/config.json` names a Qwen2-VL or Qwen2.5-VL model.
pub fn is_checkpoint(dir: &Path) -> bool {
    std::fs::read(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_slice::<Value>(&t).ok())
        .and_then(|c| {
            c.get("model_type").and_then(Value::as_str).map(|m| matches!(m, "qwen2_5_vl" | "qwen2_vl"))
        })
        .unwrap_or(false)
}

/// The tensor-name prefixes of a checkpoint: the hub's and `save_pretrained`'s
/// (`visual.`, `model.`), transformers' in-memory names (`model.visual.`,
/// `model.language_model.`), or mlx-vlm's (`vision_tower.`, `language_model.model.`,
/// with its head at `language_model.lm_head`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorLayout {
    /// Prefix of the vision tower's tensors.
    pub vision: &'static str,
    /// Prefix of the decoder's tensors (`layers.N.`, `embed_tokens`, `norm`).
    pub text: &'static str,
    /// Name of the output projection (without `.weight`), when the checkpoint has one.
    pub lm_head: &'static str,
}

impl TensorLayout {
    /// The layout the tensor `names` were written in.
    pub fn detect<'a>(names: impl Iterator<Item = &'a str> + Clone) -> TensorLayout {
        let has = |prefix: &str| names.clone().any(|k| k.starts_with(prefix));
        let vision = if has("vision_tower.") {
            "vision_tower."
        } else if has("model.visual.") {
            "model.visual."
        } else {
            "visual."
        };
        let text = if has("language_model.model.") {
            "language_model.model."
        } else if has("model.language_model.") {
            "model.language_model."
        } else {
            "model."
        };
        let lm_head = if has("language_model.lm_head.") { "language_model.lm_head" } else { "lm_head" };
        TensorLayout { vision, text, lm_head }
    }
}

/// `quantization: {group_size, bits}` of the folder's config.json (mlx-community's
/// layout), as `(group_size, bits)`; `None` when it has none. Per-module overrides and
/// modes other than `affine` are refused by name.
pub fn quantization(dir: &Path) -> Result<Option<(usize, usize)>> {
    let path = dir.join("config.json");
    let text = std::fs::read(&path).map_err(|e| Error::io("reading", &path, e))?;
    let json: Value =
        serde_json::from_slice(&text).map_err(|e| Error::model_load_with(&path, "invalid JSON", e))?;
    let Some(q) = json.get("quantization") else { return Ok(None) };
    let field = |k: &str| q.get(k).and_then(Value::as_u64).map(|v| v as usize);
    let (Some(group), Some(bits)) = (field("group_size"), field("bits")) else {
        return Err(Error::model_load(&path, "`quantization` needs `group_size` and `bits`"));
    };
    if let Some(mode) = q.get("mode").and_then(Value::as_str).filter(|m| *m != "affine") {
        return Err(Error::Unsupported(format!(
            "{}: quantization mode `{mode}`; kiln reads `affine`",
            path.display()
        )));
    }
    let known = |k: &String| matches!(k.as_str(), "group_size" | "bits" | "mode");
    if let Some(other) = q.as_object().and_then(|o| o.keys().find(|k| !known(k))) {
        return Err(Error::Unsupported(format!(
            "{}: per-module quantization (`{other}`) is not read yet; one group_size and bits for every layer is",
            path.display()
        )));
    }
    if !(2..=8).contains(&bits) || group == 0 {
        return Err(Error::model_load(
            &path,
            format!("quantization bits {bits}, group_size {group}: out of range"),
        ));
    }
    Ok(Some((group, bits)))
}

/// `eos_token_id` of `generation_config.json`, when the folder has one.
pub fn generation_eos(dir: &Path) -> Vec<u32> {
    let Ok(text) = std::fs::read(dir.join("generation_config.json")) else { return Vec::new() };
    let Ok(json) = serde_json::from_slice::<Value>(&text) else { return Vec::new() };
    match json.get("eos_token_id") {
        Some(Value::Array(ids)) => ids.iter().filter_map(Value::as_u64).map(|v| v as u32).collect(),
        Some(v) => v.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
        None => Vec::new(),
    }
}

/// The tokens that end a turn: config.json's and generation_config.json's, sorted.
pub fn eos_tokens(dir: &Path, config: &QwenVlConfig) -> Vec<u32> {
    let mut eos = config.eos_token_ids.clone();
    eos.extend(generation_eos(dir));
    eos.sort_unstable();
    eos.dedup();
    eos
}

/// The checkpoint's chat template: `chat_template.jinja`, else `chat_template.json`'s,
/// else `tokenizer_config.json`'s — where transformers' writers put it.
pub fn chat_template(dir: &Path) -> Option<String> {
    if let Ok(text) = std::fs::read_to_string(dir.join("chat_template.jinja")) {
        return Some(text);
    }
    ["chat_template.json", "tokenizer_config.json"].iter().find_map(|file| {
        let json: Value = serde_json::from_slice(&std::fs::read(dir.join(file)).ok()?).ok()?;
        json.get("chat_template")?.as_str().map(str::to_string)
    })
}

/// The text of token `id` in `tokenizer.json`'s added tokens.
pub fn token_text(tokenizer: &Path, id: u32) -> Option<String> {
    let json: Value = serde_json::from_slice(&std::fs::read(tokenizer).ok()?).ok()?;
    json.get("added_tokens")?
        .as_array()?
        .iter()
        .find(|t| t.get("id").and_then(Value::as_u64) == Some(u64::from(id)))?
        .get("content")?
        .as_str()
        .map(str::to_string)
}

/// The encoded images of a prompt (`[tokens, hidden]` each, in placeholder order) as
/// one row-major `[Σ tokens, hidden]`: its values and shape.
pub fn joined_image_rows<'a>(
    images: impl Iterator<Item = &'a crate::Tensor>,
) -> Result<(Vec<f32>, [usize; 2])> {
    let (mut values, mut rows, mut hidden) = (Vec::new(), 0, 0);
    for t in images {
        let [n, h] = t.shape() else {
            return Err(Error::InvalidInput(format!(
                "an image embedding of shape {:?}; expected [tokens, hidden]",
                t.shape()
            )));
        };
        values.extend(t.to_f32_vec()?);
        rows += n;
        hidden = *h;
    }
    Ok((values, [rows, hidden]))
}

/// The vision tower's rows for a batch of images (row-major `[Σ tokens, hidden]`) split
/// back into one `[tokens, hidden]` tensor per image: an image of `grid_thw` holds
/// `t · h · w / merge²` rows. The inverse of [`joined_image_rows`].
pub fn split_image_rows(
    rows: &[f32],
    hidden: usize,
    grids: &[[usize; 3]],
    merge: usize,
) -> Result<Vec<crate::Tensor>> {
    let mut at = 0;
    grids
        .iter()
        .map(|g| {
            let n = g.iter().product::<usize>() / (merge * merge);
            let part = rows
                .get(at * hidden..(at + n) * hidden)
                .ok_or_else(|| {
                    Error::InvalidInput(format!(
                        "{} image rows of {hidden} for grids {grids:?}",
                        rows.len() / hidden.max(1)
                    ))
                })?
                .to_vec();
            at += n;
            crate::Tensor::from_vec(vec![n, hidden], part)
        })
        .collect()
}

/// Where each prompt position's embedding comes from when `image_rows` rows of images
/// fill its `image_token` placeholders: position i takes row i of the token embeddings,
/// the k-th placeholder row `ids.len() + k` of the token embeddings and the image rows
/// stacked — one gather from both, so the image rows come through exactly. `None` when
/// the prompt has no placeholders (nothing to replace); an error when the counts differ.
pub fn image_row_picks(ids: &[u32], image_token: u32, image_rows: usize) -> Result<Option<Vec<u32>>> {
    let pads = ids.iter().filter(|&&t| t == image_token).count();
    if pads != image_rows {
        return Err(Error::InvalidInput(format!(
            "the prompt has {pads} image tokens and its images give {image_rows}"
        )));
    }
    if pads == 0 {
        return Ok(None);
    }
    let mut k = 0;
    Ok(Some(
        ids.iter()
            .enumerate()
            .map(|(i, &t)| {
                if t == image_token {
                    k += 1;
                    (ids.len() + k - 1) as u32
                } else {
                    i as u32
                }
            })
            .collect(),
    ))
}

/// `dir/tokenizer.json`, or an error saying a checkpoint folder carries one.
pub fn tokenizer_file(dir: &Path) -> Result<std::path::PathBuf> {
    let tokenizer = dir.join("tokenizer.json");
    if !tokenizer.is_file() {
        return Err(Error::model_load(dir, "no tokenizer.json; a Qwen2.5-VL checkpoint folder carries one"));
    }
    Ok(tokenizer)
}

/// The pixel values of `patches` images (`[Σ patches, C·T·P·P]`, images one after
/// another) checked against their `grids` and the tower's `config`: every grid divides
/// into merge units, and the values are exactly that many patches of the tower's size.
/// Returns the patch count.
pub fn check_patches(pixels: usize, grids: &[[usize; 3]], config: &VisionConfig) -> Result<usize> {
    let patches: usize = grids.iter().map(|g| g.iter().product::<usize>()).sum();
    let m = config.spatial_merge_size;
    if let Some(g) = grids.iter().find(|g| !g[1].is_multiple_of(m) || !g[2].is_multiple_of(m) || g[0] == 0) {
        return Err(Error::InvalidInput(format!(
            "an image grid of {g:?} patches does not divide into {m}×{m} merge units"
        )));
    }
    let values = 3 * config.temporal_patch_size * config.patch_size * config.patch_size;
    if patches == 0 || patches * values != pixels {
        return Err(Error::InvalidInput(format!(
            "{pixels} pixel values for {patches} patches of {values} values (grids {grids:?})"
        )));
    }
    Ok(patches)
}

/// The vision tower's layout of `grids`' images: the merge units in window order and the
/// attention segments (token ranges that attend among themselves) of the window blocks
/// and of the full-attention blocks.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowLayout {
    /// `window_index[i]` is the processor-order merge unit at window-order place i.
    pub window_index: Vec<u32>,
    /// Boundaries (in patches, window order) of the windows: window k is
    /// `windows[k]..windows[k + 1]`.
    pub windows: Vec<usize>,
    /// Boundaries of the images (each frame of a video its own).
    pub images: Vec<usize>,
}

impl WindowLayout {
    /// The layout of `grids` under `config` (`window_size` pixels a side).
    pub fn new(grids: &[[usize; 3]], config: &VisionConfig) -> WindowLayout {
        let m = config.spatial_merge_size;
        let unit = m * m;
        let side = (config.window_size / m / config.patch_size).max(1);
        let (mut window_index, mut windows, mut images) = (Vec::new(), vec![0usize], vec![0usize]);
        let mut base = 0u32;
        for &[t, h, w] in grids {
            let (gh, gw) = (h / m, w / m);
            for frame in 0..t {
                for wr in 0..gh.div_ceil(side) {
                    for wc in 0..gw.div_ceil(side) {
                        let mut count = 0;
                        for r in wr * side..((wr + 1) * side).min(gh) {
                            for col in wc * side..((wc + 1) * side).min(gw) {
                                window_index.push(base + (frame * gh * gw + r * gw + col) as u32);
                                count += 1;
                            }
                        }
                        windows.push(windows.last().copied().unwrap_or(0) + count * unit);
                    }
                }
                images.push(images.last().copied().unwrap_or(0) + gh * gw * unit);
            }
            base += (t * gh * gw) as u32;
        }
        WindowLayout { window_index, windows, images }
    }

    /// `inverse[window_index[i]] = i`: where each processor-order merge unit sits in
    /// window order.
    pub fn inverse(&self) -> Vec<u32> {
        let mut inverse = vec![0u32; self.window_index.len()];
        for (i, &w) in self.window_index.iter().enumerate() {
            inverse[w as usize] = i as u32;
        }
        inverse
    }

    /// The vision tower's rotary cos and sin, `[patches, head_dim]` each, row-major, in
    /// window order: each patch's row position on the first half of the frequencies
    /// (`head_dim / 4` of them), its column on the second, both halves of the head
    /// repeating them.
    pub fn rotary(&self, grids: &[[usize; 3]], merge: usize, head_dim: usize) -> (Vec<f32>, Vec<f32>) {
        let unit = merge * merge;
        let inv = inverse_frequencies(head_dim / 2, 10_000.0);
        // (row, column) of every patch in processor (merge-block) order.
        let mut at = Vec::new();
        for &[t, h, w] in grids {
            for _ in 0..t {
                for hb in 0..h / merge {
                    for wb in 0..w / merge {
                        for mh in 0..merge {
                            for mw in 0..merge {
                                at.push((hb * merge + mh, wb * merge + mw));
                            }
                        }
                    }
                }
            }
        }
        let patches = at.len();
        let (mut cos, mut sin) =
            (Vec::with_capacity(patches * head_dim), Vec::with_capacity(patches * head_dim));
        let mut angles = Vec::with_capacity(head_dim / 2);
        for &u in &self.window_index {
            for k in 0..unit {
                let (row, col) = at[u as usize * unit + k];
                angles.clear();
                angles.extend(inv.iter().map(|f| row as f32 * f));
                angles.extend(inv.iter().map(|f| col as f32 * f));
                for _ in 0..2 {
                    cos.extend(angles.iter().map(|a| a.cos()));
                    sin.extend(angles.iter().map(|a| a.sin()));
                }
            }
        }
        (cos, sin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two images of 2 · 2 · 2 and 1 · 2 · 4 patches, merge 2: 2 and 2 rows of 3 values,
    /// split apart and joined back; too few rows for the grids is an error.
    #[test]
    fn image_rows_split_per_image_and_join_back() {
        let rows: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let grids = [[2, 2, 2], [1, 2, 4]];
        let images = split_image_rows(&rows, 3, &grids, 2).unwrap();
        assert_eq!(images.iter().map(|t| t.shape().to_vec()).collect::<Vec<_>>(), [[2, 3], [2, 3]]);
        assert_eq!(joined_image_rows(images.iter()).unwrap(), (rows.clone(), [4, 3]));
        let e = split_image_rows(&rows[..9], 3, &grids, 2).unwrap_err().to_string();
        assert!(e.contains("3 image rows of 3"), "{e}");
    }

    #[test]
    fn image_rows_replace_the_placeholders_in_order() {
        // Tokens 1, pad, pad, 2, pad: rows 0 and 3 are the tokens', the pads take image
        // rows 0, 1, 2 (at 5, 6, 7 of the stacked embeddings).
        assert_eq!(image_row_picks(&[1, 9, 9, 2, 9], 9, 3).unwrap(), Some(vec![0, 5, 6, 3, 7]));
        assert_eq!(image_row_picks(&[1, 2], 9, 0).unwrap(), None);
        let e = image_row_picks(&[1, 9], 9, 2).unwrap_err().to_string();
        assert!(e.contains("1 image tokens and its images give 2"), "{e}");
    }

    #[test]
    fn tensor_layouts_are_told_apart_by_their_names() {
        let hub = ["visual.blocks.0.attn.qkv.weight", "model.layers.0.mlp.up_proj.weight", "lm_head.weight"];
        assert_eq!(
            TensorLayout::detect(hub.iter().copied()),
            TensorLayout { vision: "visual.", text: "model.", lm_head: "lm_head" }
        );
        let mlx = [
            "vision_tower.blocks.0.attn.qkv.weight",
            "language_model.model.norm.weight",
            "language_model.lm_head.weight",
        ];
        assert_eq!(
            TensorLayout::detect(mlx.iter().copied()),
            TensorLayout {
                vision: "vision_tower.",
                text: "language_model.model.",
                lm_head: "language_model.lm_head"
            }
        );
    }

    #[test]
    fn a_window_layout_keeps_each_window_contiguous() {
        let v = VisionConfig {
            depth: 1,
            hidden_size: 16,
            intermediate_size: 16,
            num_heads: 1,
            patch_size: 14,
            temporal_patch_size: 2,
            spatial_merge_size: 2,
            window_size: 56, // 2 merged units a side
            fullatt_block_indexes: vec![],
            out_hidden_size: 16,
        };
        // 6×6 patches: 3×3 merge units, windows of 2×2 units → 4 windows (4, 2, 2, 1 units).
        let layout = WindowLayout::new(&[[1, 6, 6]], &v);
        assert_eq!(layout.window_index, vec![0, 1, 3, 4, 2, 5, 6, 7, 8]);
        assert_eq!(layout.windows, vec![0, 16, 24, 32, 36]);
        assert_eq!(layout.images, vec![0, 36]);
        let inverse = layout.inverse();
        for (i, &w) in layout.window_index.iter().enumerate() {
            assert_eq!(inverse[w as usize] as usize, i);
        }
        assert_eq!(check_patches(36 * 1176, &[[1, 6, 6]], &v).unwrap(), 36);
        assert!(check_patches(35 * 1176, &[[1, 6, 6]], &v).unwrap_err().to_string().contains("pixel values"));
        assert!(check_patches(5 * 1176, &[[1, 5, 1]], &v).unwrap_err().to_string().contains("merge units"));
    }
}
