//! The vision tower: patches in, one vector per merged patch out, in the language
//! model's width.
//!
//! # Design
//!
//! The processor gives patch rows in merge-block order. The tower embeds them (the
//! patch convolution is one matrix product: kernel = stride = one patch), gives each a
//! 2D rotary position (its row on half the rotary frequencies, its column on the
//! other), and reorders them — whole merge units at a time — window by window
//! (`window_size` pixels a side), so that each window's tokens are contiguous. Blocks
//! then attend within each window, except the `fullatt_block_indexes` blocks, which
//! attend within each whole image; attention never crosses images. The merger
//! concatenates each merge unit's patches and projects them; the output goes back to
//! the processor's order.

use candle_core::{D, Device, IndexOp, Tensor};
use kiln_core::Result;

use super::config::VisionConfig;
use super::host::{self, Heads, Span};
use super::weights::{Linear, Mlp, Weights, add_rms_norm, rms_norm};
use crate::backend;
use crate::cpu::tile_attention::{Context, Qkv};
use kiln_core::qwen2vl::WindowLayout;

struct Block {
    norm1: Tensor,
    norm2: Tensor,
    qkv: Linear,
    proj: Linear,
    mlp: Mlp,
}

/// The vision tower of a Qwen2.5-VL checkpoint.
pub struct VisionTower {
    config: VisionConfig,
    /// `[hidden, C·T·P·P]`: the patch convolution as a matrix.
    patch_embed: Tensor,
    blocks: Vec<Block>,
    merger_norm: Tensor,
    merger_fc1: Linear,
    merger_fc2: Linear,
    device: Device,
    /// Attention on AMX tiles in bf16, where the blocks' layers are bf16 tiles already.
    tile_attention: bool,
}

impl VisionTower {
    /// The tower's weights from `weights`.
    pub fn load(weights: &Weights, config: &VisionConfig) -> Result<Self> {
        let p = weights.vision_prefix();
        let hidden = config.hidden_size;
        let patch = weights.get(&format!("{p}patch_embed.proj.weight"))?;
        let patch_embed = weights.patch_matrix(patch, hidden)?;
        let blocks = (0..config.depth)
            .map(|i| {
                let b = format!("{p}blocks.{i}.");
                Ok(Block {
                    norm1: weights.get(&format!("{b}norm1.weight"))?,
                    norm2: weights.get(&format!("{b}norm2.weight"))?,
                    qkv: weights.linear(&format!("{b}attn.qkv"), true)?,
                    proj: weights.linear(&format!("{b}attn.proj"), true)?,
                    mlp: Mlp::new(
                        weights.linear(&format!("{b}mlp.gate_proj"), true)?,
                        weights.linear(&format!("{b}mlp.up_proj"), true)?,
                        weights.linear(&format!("{b}mlp.down_proj"), true)?,
                    ),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let head_dim = hidden / config.num_heads.max(1);
        let tile_attention = weights.device().is_cpu()
            && blocks.first().is_some_and(|b| b.qkv.is_reduced())
            && hidden.is_multiple_of(config.num_heads.max(1))
            && crate::cpu::tile_attention::supported(head_dim);
        Ok(VisionTower {
            tile_attention,
            config: config.clone(),
            patch_embed,
            blocks,
            merger_norm: weights.get(&format!("{p}merger.ln_q.weight"))?,
            merger_fc1: weights.linear(&format!("{p}merger.mlp.0"), true)?,
            merger_fc2: weights.linear(&format!("{p}merger.mlp.2"), true)?,
            device: weights.device().clone(),
        })
    }

    /// The images' patch rows (`[Σ t·h·w, C·T·P·P]`, each image's in merge-block order,
    /// images one after another) and grids → `[Σ t·h·w / merge², out_hidden]`, one row
    /// per image token in prompt order.
    pub fn forward(&self, pixels: &Tensor, grids: &[[usize; 3]]) -> Result<Tensor> {
        let c = &self.config;
        let unit = c.spatial_merge_size * c.spatial_merge_size;
        let heads = c.num_heads;
        let head_dim = c.hidden_size / heads;
        let patches = pixels.dim(0).map_err(backend)?;
        let layout = WindowLayout::new(grids, c);
        let (cos_rows, sin_rows) = layout.rotary(grids, c.spatial_merge_size, head_dim);
        // The CPU rotates the layers' rows in place (`host.rs`); a GPU needs the tensors.
        let graph_rotary = if self.device.is_cpu() {
            None
        } else {
            Some(rotary_tensors(&cos_rows, &sin_rows, head_dim, &self.device)?)
        };
        let mut x = pixels.matmul(&self.patch_embed.t().map_err(backend)?).map_err(backend)?;
        // Window order, whole merge units at a time.
        let order = Tensor::new(layout.window_index.as_slice(), &self.device).map_err(backend)?;
        x = x
            .reshape((patches / unit, unit * c.hidden_size))
            .and_then(|x| x.index_select(&order, 0))
            .and_then(|x| x.reshape((patches, c.hidden_size)))
            .map_err(backend)?;
        // Each block's input norm, and at the end the merger's, is computed with the
        // residual add before it (`add_rms_norm`).
        let first_norm = self.blocks.first().map_or(&self.merger_norm, |b| &b.norm1);
        let mut h = rms_norm(&x, first_norm, 1e-6)?;
        for (i, block) in self.blocks.iter().enumerate() {
            let segments =
                if c.fullatt_block_indexes.contains(&i) { &layout.images } else { &layout.windows };
            let attended = if let Some((cos, sin)) = &graph_rotary {
                let qkv = block.qkv.forward(&h)?.reshape((patches, 3, heads, head_dim)).map_err(backend)?;
                let q = rotate(&qkv.i((.., 0)).map_err(backend)?, cos, sin)?;
                let k = rotate(&qkv.i((.., 1)).map_err(backend)?, cos, sin)?;
                let v = qkv.i((.., 2)).map_err(backend)?;
                attend_segments(&q, &k, &v, segments, head_dim)?
            } else {
                let mut qkv = block.qkv.forward_rows(&h)?;
                let hidden = c.hidden_size;
                host::rotate(&mut qkv, 3 * hidden, 0, 2 * heads, head_dim, &cos_rows, &sin_rows);
                let mut out = vec![0f32; patches * hidden];
                if self.tile_attention {
                    // Rows of `q | k | v`, each window (or image) a text of its own.
                    let rows: Vec<(usize, usize)> =
                        segments.windows(2).map(|s| (s[0], s[1] - s[0])).collect();
                    let (qkv, context) = (Qkv::F32(&qkv), Context::F32(&mut out));
                    crate::cpu::tile_attention::attention(qkv, &rows, hidden, heads, context);
                } else {
                    let spans: Vec<Span> = segments
                        .windows(2)
                        .map(|s| Span { queries: s[0]..s[1], keys: s[0]..s[1], causal: None })
                        .collect();
                    let at = |at| Heads::in_rows(&qkv, at, 3 * hidden, head_dim);
                    host::attention(
                        at(0),
                        at(hidden),
                        at(2 * hidden),
                        (heads, heads, head_dim),
                        &spans,
                        &mut out,
                    );
                }
                Tensor::from_vec(out, (patches, hidden), &self.device).map_err(backend)?
            };
            let (sum, h2) = add_rms_norm(&x, &block.proj.forward(&attended)?, &block.norm2, 1e-6)?;
            let next_norm = self.blocks.get(i + 1).map_or(&self.merger_norm, |b| &b.norm1);
            (x, h) = add_rms_norm(&sum, &block.mlp.forward(&h2)?, next_norm, 1e-6)?;
        }
        let merged = h.reshape((patches / unit, unit * c.hidden_size)).map_err(backend)?;
        let merged =
            self.merger_fc2.forward(&self.merger_fc1.forward(&merged)?.gelu_erf().map_err(backend)?)?;
        // Back to the processor's order: out[window_index[i]] = merged[i].
        let inverse = Tensor::new(layout.inverse().as_slice(), &self.device).map_err(backend)?;
        merged.index_select(&inverse, 0).map_err(backend)
    }
}

/// A rotary table's cos and sin rows (`head_dim` values a token, as `rope` and
/// `WindowLayout::rotary` write them) as `[tokens, head_dim]` tensors for [`rotate`].
pub(super) fn rotary_tensors(
    cos: &[f32],
    sin: &[f32],
    head_dim: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let table =
        |rows: &[f32]| Tensor::from_slice(rows, (rows.len() / head_dim, head_dim), device).map_err(backend);
    Ok((table(cos)?, table(sin)?))
}

/// `x · cos + rotate_half(x) · sin` for `x` `[tokens, heads, head_dim]` and cos/sin
/// `[tokens, head_dim]` (the same for every head).
pub(super) fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1).map_err(backend)? / 2;
    let (cos, sin) = (cos.unsqueeze(1).map_err(backend)?, sin.unsqueeze(1).map_err(backend)?);
    let first = x.narrow(D::Minus1, 0, half).map_err(backend)?;
    let second = x.narrow(D::Minus1, half, half).map_err(backend)?;
    let rotated = Tensor::cat(&[&second.neg().map_err(backend)?, &first], D::Minus1).map_err(backend)?;
    (x.broadcast_mul(&cos).map_err(backend)? + rotated.broadcast_mul(&sin).map_err(backend)?).map_err(backend)
}

/// Softmax attention of q, k, v (`[tokens, heads, head_dim]`) within each segment
/// `[segments[i], segments[i + 1])`, not across; `[tokens, heads · head_dim]` out.
fn attend_segments(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    segments: &[usize],
    head_dim: usize,
) -> Result<Tensor> {
    let scale = 1.0 / (head_dim as f64).sqrt();
    let mut outs = Vec::with_capacity(segments.len());
    for pair in segments.windows(2) {
        let (start, len) = (pair[0], pair[1] - pair[0]);
        if len == 0 {
            continue;
        }
        let part =
            |t: &Tensor| t.narrow(0, start, len).and_then(|t| t.transpose(0, 1)).and_then(|t| t.contiguous());
        let (qs, ks, vs) = (part(q).map_err(backend)?, part(k).map_err(backend)?, part(v).map_err(backend)?);
        let scores = (qs.matmul(&ks.t().map_err(backend)?).map_err(backend)? * scale).map_err(backend)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores).map_err(backend)?;
        let out = probs.matmul(&vs).map_err(backend)?.transpose(0, 1).map_err(backend)?;
        outs.push(out);
    }
    let all = Tensor::cat(&outs, 0).map_err(backend)?;
    let (tokens, heads, d) = all.dims3().map_err(backend)?;
    all.reshape((tokens, heads * d)).map_err(backend)
}
