//! The vision tower on MLX: patch rows in, one row per merged patch out, in the
//! language model's width. The same computation as the candle provider's tower (its
//! layout and rotary table are `kiln_core::qwen2vl`'s): the patch convolution as one
//! matrix product, the patches reordered window by window, blocks attending within
//! windows (or whole images at `fullatt_block_indexes`) through MLX's fused attention,
//! the 2×2 merger, and the rows put back in the processor's order.
//!
//! On a GPU the attention is written out (scores, softmax, product) per image, the
//! windows as a block-diagonal mask, instead of MLX's fused attention per window: that
//! runs cuDNN, which builds a graph for every new window or image length (MLX keeps them
//! per thread) — 200 of the 395 ms of a first request on an H100 — and launches a dozen
//! kernels per window. An image's full scores are a few MB, nothing to a GPU; on the
//! CPU the windows' own products are less work, so it keeps them.

use kiln_core::qwen2vl::{VisionConfig, WindowLayout};
use kiln_core::{DType, Result};

use super::rotate;
use super::weights::{Checkpoint, Linear};
use crate::array::Array;

struct Block {
    norm1: Array,
    norm2: Array,
    qkv: Linear,
    proj: Linear,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// The vision tower of a Qwen2.5-VL checkpoint.
pub struct VisionTower {
    config: VisionConfig,
    /// `[C·T·P·P, hidden]`.
    patch_t: Array,
    blocks: Vec<Block>,
    merger_norm: Array,
    merger_fc1: Linear,
    merger_fc2: Linear,
    dtype: DType,
    /// Attention per image with a window mask (a GPU) rather than per window.
    masked: bool,
}

impl VisionTower {
    /// The tower's tensors from `weights`.
    /// `masked`: attention per image with a window mask (for a GPU; see the module).
    pub fn load(weights: &Checkpoint, config: &VisionConfig, dtype: DType, masked: bool) -> Result<Self> {
        let p = weights.layout.vision;
        let blocks = (0..config.depth)
            .map(|i| {
                let b = format!("{p}blocks.{i}.");
                Ok(Block {
                    norm1: weights.get(&format!("{b}norm1.weight"))?,
                    norm2: weights.get(&format!("{b}norm2.weight"))?,
                    qkv: weights.linear(&format!("{b}attn.qkv"), true)?,
                    proj: weights.linear(&format!("{b}attn.proj"), true)?,
                    gate: weights.linear(&format!("{b}mlp.gate_proj"), true)?,
                    up: weights.linear(&format!("{b}mlp.up_proj"), true)?,
                    down: weights.linear(&format!("{b}mlp.down_proj"), true)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(VisionTower {
            config: config.clone(),
            patch_t: weights.patch_matrix(&format!("{p}patch_embed.proj.weight"))?,
            blocks,
            merger_norm: weights.get(&format!("{p}merger.ln_q.weight"))?,
            merger_fc1: weights.linear(&format!("{p}merger.mlp.0"), true)?,
            merger_fc2: weights.linear(&format!("{p}merger.mlp.2"), true)?,
            dtype,
            masked,
        })
    }

    /// Attention per image with a window mask (`true`, a GPU's way) or per window.
    #[cfg(test)]
    pub fn set_masked(&mut self, masked: bool) {
        self.masked = masked;
    }

    /// Its arrays, to evaluate at load.
    pub fn arrays(&self) -> Vec<&Array> {
        let mut all = vec![&self.patch_t, &self.merger_norm];
        all.extend(self.merger_fc1.arrays());
        all.extend(self.merger_fc2.arrays());
        for b in &self.blocks {
            all.extend([&b.norm1, &b.norm2]);
            for l in [&b.qkv, &b.proj, &b.gate, &b.up, &b.down] {
                all.extend(l.arrays());
            }
        }
        all
    }

    /// The images' patch rows (`patches × C·T·P·P` values, each image's in merge-block
    /// order, images one after another) and grids → `[patches / merge², out_hidden]`
    /// (lazy), one row per image token in prompt order.
    pub fn forward(&self, pixels: &[f32], patches: usize, grids: &[[usize; 3]]) -> Result<Array> {
        let c = &self.config;
        let unit = (c.spatial_merge_size * c.spatial_merge_size) as i32;
        let (heads, hidden) = (c.num_heads as i32, c.hidden_size as i32);
        let head_dim = hidden / heads;
        let n = patches as i32;
        let layout = WindowLayout::new(grids, c);
        let (cos, sin) = layout.rotary(grids, c.spatial_merge_size, head_dim as usize);
        let cos = Array::from_f32(&cos, &[patches, 1, head_dim as usize])?.astype(self.dtype)?;
        let sin = Array::from_f32(&sin, &[patches, 1, head_dim as usize])?.astype(self.dtype)?;
        let width = pixels.len() / patches;
        let x = Array::from_f32(pixels, &[patches, width])?.astype(self.dtype)?.matmul(&self.patch_t)?;
        // Window order, whole merge units at a time.
        let order = Array::from_i32(&layout.window_index.iter().map(|&w| w as i32).collect::<Vec<_>>())?;
        let mut x = x.reshape(&[n / unit, unit * hidden])?.take(&order, 0)?.reshape(&[n, hidden])?;
        let scale = 1.0 / (head_dim as f32).sqrt();
        let masks = if self.masked { window_masks(&layout)? } else { Vec::new() };
        for (i, block) in self.blocks.iter().enumerate() {
            let segments =
                if c.fullatt_block_indexes.contains(&i) { &layout.images } else { &layout.windows };
            let h = x.rms_norm(&block.norm1, 1e-6)?;
            let qkv = block.qkv.forward(&h)?.reshape(&[n, 3, heads, head_dim])?;
            let part = |k: i32| -> Result<Array> {
                qkv.slice(&[0, k, 0, 0], &[n, k + 1, heads, head_dim])?.reshape(&[n, heads, head_dim])
            };
            let q = rotate(&part(0)?, &cos, &sin)?;
            let k = rotate(&part(1)?, &cos, &sin)?;
            let v = part(2)?;
            let outs = if self.masked {
                let full = c.fullatt_block_indexes.contains(&i);
                self.masked_attention(
                    &q,
                    &k,
                    &v,
                    &layout.images,
                    if full { None } else { Some(&masks) },
                    scale,
                )?
            } else {
                let mut outs = Vec::with_capacity(segments.len());
                for pair in segments.windows(2) {
                    let (start, end) = (pair[0] as i32, pair[1] as i32);
                    if end == start {
                        continue;
                    }
                    let len = end - start;
                    // [len, heads, d] → [1, heads, len, d]
                    let seg = |t: &Array| -> Result<Array> {
                        t.slice(&[start, 0, 0], &[end, heads, head_dim])?
                            .transpose(&[1, 0, 2])?
                            .reshape(&[1, heads, len, head_dim])
                    };
                    let o = seg(&q)?.attention(&seg(&k)?, &seg(&v)?, scale, None)?;
                    outs.push(
                        o.reshape(&[heads, len, head_dim])?.transpose(&[1, 0, 2])?.reshape(&[len, hidden])?,
                    );
                }
                outs
            };
            let attended = Array::concat(&outs.iter().collect::<Vec<_>>(), 0)?;
            x = x.add(&block.proj.forward(&attended)?)?;
            let h = x.rms_norm(&block.norm2, 1e-6)?;
            let gate = block.gate.forward(&h)?;
            let act = gate.swiglu(&block.up.forward(&h)?)?;
            x = x.add(&block.down.forward(&act)?)?;
        }
        let merged = x.rms_norm(&self.merger_norm, 1e-6)?.reshape(&[n / unit, unit * hidden])?;
        let merged = self.merger_fc2.forward(&self.merger_fc1.forward(&merged)?.gelu()?)?;
        // Back to the processor's order.
        let inverse = Array::from_i32(&layout.inverse().iter().map(|&w| w as i32).collect::<Vec<_>>())?;
        merged.take(&inverse, 0)
    }

    /// Attention of `q`, `k`, `v` (`[patches, heads, d]`, window order) within each image
    /// of `images` (boundaries), restricted to the windows by `masks` (one per image, from
    /// [`window_masks`]) when given: one `[len, hidden]` array per image. Scores and
    /// softmax in f32.
    fn masked_attention(
        &self,
        q: &Array,
        k: &Array,
        v: &Array,
        images: &[usize],
        masks: Option<&[Array]>,
        scale: f32,
    ) -> Result<Vec<Array>> {
        let (heads, hidden) = (self.config.num_heads as i32, self.config.hidden_size as i32);
        let d = hidden / heads;
        let scale = Array::scalar(scale, DType::F32)?;
        let mut outs = Vec::with_capacity(images.len());
        // Images without patches have no mask either: `outs.len()` counts the others.
        for pair in images.windows(2) {
            let (start, end) = (pair[0] as i32, pair[1] as i32);
            if end == start {
                continue;
            }
            // [len, heads, d] → [heads, len, d]
            let part = |t: &Array| t.slice(&[start, 0, 0], &[end, heads, d])?.transpose(&[1, 0, 2]);
            let (qh, kh, vh) = (part(q)?, part(k)?, part(v)?);
            let mut scores = qh.matmul(&kh.transpose(&[0, 2, 1])?)?.astype(DType::F32)?.mul(&scale)?;
            if let Some(masks) = masks {
                scores = scores.add(&masks[outs.len()])?;
            }
            let p = scores.softmax(-1)?.astype(self.dtype)?;
            outs.push(p.matmul(&vh)?.transpose(&[1, 0, 2])?.reshape(&[end - start, hidden])?);
        }
        Ok(outs)
    }
}

/// Per image of `layout`, `[1, len, len]` f32: 0 where two patches share a window,
/// -inf elsewhere (added to the scores, so each patch attends within its window).
fn window_masks(layout: &WindowLayout) -> Result<Vec<Array>> {
    let mut masks = Vec::new();
    for pair in layout.images.windows(2) {
        let (start, end) = (pair[0], pair[1]);
        if end == start {
            continue;
        }
        let len = end - start;
        let mut window = vec![0usize; len];
        for (w, bounds) in layout.windows.windows(2).enumerate() {
            for p in bounds[0].max(start)..bounds[1].min(end) {
                window[p - start] = w;
            }
        }
        let mut mask = vec![f32::NEG_INFINITY; len * len];
        for (row, &wr) in mask.chunks_mut(len).zip(&window) {
            for (m, &wc) in row.iter_mut().zip(&window) {
                if wc == wr {
                    *m = 0.0;
                }
            }
        }
        masks.push(Array::from_f32(&mask, &[1, len, len])?);
    }
    Ok(masks)
}
