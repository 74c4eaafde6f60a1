//! The decoder's step on kiln's CUDA kernels (`kernels/llama.cu`): eight launches a
//! layer whatever the batch — the Q/K/V product; rotary with the keys and values
//! written into their slots (`rope_into_cache`); every row's attention over its own
//! slot up to its position (`slot_attention`: prompts and decoding rows alike, so a
//! step needs no per-sequence work); the output product; residual add + RMSNorm;
//! gate/up product; SiLU · up; the down product. The products stay cuBLAS's.

use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
use candle_core::{DType as CDType, IndexOp, Shape, Tensor};
use candle_nn::ops::rms_norm;

use super::kv::Pool;
use super::{DenseLlama, Span};
use crate::cuda::{Arg, Kernels, Launch, THREADS, blocks};

/// Keys a row may attend to on the kernel path: `slot_attention` keeps a row's scores
/// in shared memory (44 KiB of f32; with its query and partial sums under the 48 KiB a
/// block gets without opting in). Longer steps run on candle's operations.
pub(super) const MAX_KEYS: usize = 44 * 1024 / 4;

impl DenseLlama {
    /// `out` [2, rows, width]: x + o and its RMSNorm times `weight`.
    fn add_rms_norm(&self, x: &Tensor, o: &Tensor, weight: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let (rows, width) = x.dims2()?;
        let both = Launch {
            kernels: Kernels::Llama,
            kernel: "add_rms_norm",
            others: &[o, weight],
            out: (Shape::from((2, rows, width)), x.dtype()),
            scalars: &[Arg::I32(rows as i32), Arg::I32(width as i32), Arg::F32(self.eps)],
            config: blocks(rows, 1),
        }
        .run(x)?;
        Ok((both.i(0)?, both.i(1)?))
    }

    /// One step on the kernels; see the module docs. `spans` as `forward` takes them.
    pub(super) fn forward_kernels(
        &self,
        ids: &[u32],
        spans: &[Span],
        pool: &Pool,
    ) -> candle_core::Result<Tensor> {
        let (nh, nkv, hd, ffn) = (self.heads, self.kv_heads, self.head_dim, self.ffn);
        let (dev, dtype) = (&self.device, self.embed.dtype());
        let rows = ids.len();
        let mut positions = Vec::with_capacity(rows);
        let mut slots = Vec::with_capacity(rows);
        for s in spans {
            for p in s.pos..s.pos + s.tokens {
                positions.push(p as i64);
                slots.push(s.slot as i64);
            }
        }
        let keys = positions.iter().max().map_or(1, |&p| p as usize + 1);
        let positions = Tensor::from_vec(positions, rows, dev)?;
        let slots = Tensor::from_vec(slots, rows, dev)?;
        let scale = 1.0 / (hd as f32).sqrt();
        let shape = |cols: usize| Shape::from((rows, cols));
        let geometry =
            [Arg::I32(nh as i32), Arg::I32(nkv as i32), Arg::I32(hd as i32), Arg::I32(pool.capacity as i32)];

        let mut x = self.embed.index_select(&Tensor::from_slice(ids, rows, dev)?, 0)?;
        let mut h = rms_norm(&x, &self.layers[0].attn_norm, self.eps)?;
        for (l, (layer, (kc, vc))) in self.layers.iter().zip(&pool.layers).enumerate() {
            let qkv = h.matmul(&layer.qkv.t()?)?;
            let [a, b, c, d] = geometry;
            let q = Launch {
                kernels: Kernels::Llama,
                kernel: "rope_into_cache",
                others: &[&self.cos, &self.sin, &positions, &slots, kc, vc],
                out: (shape(nh * hd), dtype),
                scalars: &[a, b, c, d, Arg::F32(scale)],
                config: blocks(rows, nh + 2 * nkv),
            }
            .run(&qkv)?;
            let attn = Launch {
                kernels: Kernels::Llama,
                kernel: "slot_attention",
                others: &[kc, vc, &positions, &slots],
                out: (shape(nh * hd), dtype),
                scalars: &[a, b, c, d],
                config: LaunchConfig {
                    grid_dim: (rows as u32, nh as u32, 1),
                    block_dim: (THREADS as u32, 1, 1),
                    shared_mem_bytes: (keys * 4) as u32,
                },
            }
            .run(&q)?;
            (x, h) = self.add_rms_norm(&x, &attn.matmul(&layer.wo.t()?)?, &layer.ffn_norm)?;
            let gate_up = h.matmul(&layer.gate_up.t()?)?;
            let act = Launch {
                kernels: Kernels::Llama,
                kernel: "swiglu",
                others: &[],
                out: (shape(ffn), dtype),
                scalars: &[Arg::I64(rows as i64), Arg::I32(ffn as i32)],
                config: blocks((rows * ffn).div_ceil(THREADS).min(65_535), 1),
            }
            .run(&gate_up)?;
            // The next layer's input norm, or after the last layer the final one.
            let norm = self.layers.get(l + 1).map_or(&self.norm, |next| &next.attn_norm);
            (x, h) = self.add_rms_norm(&x, &act.matmul(&layer.down.t()?)?, norm)?;
        }
        // Only each sequence's last position is sampled from; `h` is already normed.
        let last: Vec<u32> = spans.iter().map(|s| (s.row + s.tokens - 1) as u32).collect();
        let last = h.index_select(&Tensor::from_vec(last, spans.len(), dev)?, 0)?;
        last.matmul(&self.output.t()?)?.to_dtype(CDType::F32)
    }
}
