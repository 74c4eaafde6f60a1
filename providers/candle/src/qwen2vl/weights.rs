//! A Qwen2.5-VL checkpoint's tensors, whatever layout wrote them: the names the hub and
//! transformers' `save_pretrained` write (`visual.*`, `model.layers.*`, `lm_head.weight`
//! unless tied) and the ones transformers uses in memory (`model.visual.*`,
//! `model.language_model.*`), from one `model.safetensors` or the shards an index names.
//! Also mlx-vlm's names (`vision_tower.*`, `language_model.model.*`,
//! `language_model.lm_head.*`, the patch kernel channels-last), and mlx-community's
//! quantized layers (config.json `quantization: {group_size, bits}`; per layer a packed
//! uint32 `weight` with `scales` and `biases` — a layer is quantized exactly when its
//! `scales` are there, as mlx-vlm decides).
//!
//! # What is held how
//!
//! On the CPU a linear layer (and a quantized embedding) stays as the file stores it:
//! packed, or bf16/f16, widened to f32 a panel at a time as it computes
//! (`cpu/panels.rs`) — a 4-bit checkpoint takes about its file's bytes in memory,
//! not eight times them, and a decode step reads that many bytes. With int8 activations
//! (`model.quantization = "int8"`) 4-bit layers are re-laid as GGML `Q4_1` blocks for
//! `cpu/blocks.rs`. Norms, biases and the patch kernel are small and held in f32.
//! On a GPU everything is widened to f32 at load. Tensors are read from the files one at
//! a time, so loading never holds a whole file beside the weights it is turning into.

use std::cell::RefCell;
use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use kiln_core::{Error, Result};
use rayon::prelude::*;

use crate::backend;
use crate::cpu::bf16::{Bf16Dense, Bits, Sink};
use crate::cpu::blocks::BlockDense;
use crate::cpu::int8::{QDense, QRows};
use crate::cpu::panels::{PanelDense, Stored};

/// What a CPU model's linear layers compute in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Arithmetic {
    /// Weights as stored (packed bits, bf16, f16) widened to f32, f32 activations:
    /// mlx-vlm's and transformers-f32's arithmetic.
    #[default]
    AsStored,
    /// `model.quantization = "int8"`. On a checkpoint of 4-bit layers: those re-laid as
    /// GGML `Q4_1` blocks, activations quantized to int8 per 32 inputs — faster
    /// decoding, no longer exactly MLX's; on AMX, calls of many rows (a prompt, the
    /// image tokens) widen the blocks to bf16 tiles (`BlockDense::forward_widened`) and
    /// the unquantized layers (the vision tower) are bf16 tiles: prompts and images at
    /// bf16's speed, decoding at 4 bits'. On a checkpoint of floats (f32, bf16, f16):
    /// every linear layer but the token embedding quantized at load to int8 per output
    /// channel, activations to int8 per row (`cpu/int8.rs`, the embeddings' int8
    /// arithmetic) — prompts and images on AMX int8 tiles (twice bf16's products a
    /// cycle), decoding on VNNI over half bf16's bytes a token.
    Int8Activations,
    /// Every linear layer but the token embedding in bf16, in AMX tile order, with
    /// activations rounded to bf16 and f32 sums (`model.dtype = "bf16"`): the
    /// arithmetic of transformers in bf16; prompts and images run on the tile units
    /// (`cpu/bf16.rs`). A 4-bit checkpoint's layers take bf16's bytes (4x).
    Bf16,
}

/// Rows from which a 4-bit layer's call (a prompt's, an image's) widens its blocks to
/// bf16 and runs on AMX tiles ([`BlockDense::forward_widened`]); decoding steps keep
/// the block kernel, which reads the 4-bit weights as stored.
const WIDEN_ROWS: usize = 32;

/// `y = x · Wᵀ + b`; also an embedding table (`rows`), the weights being its rows.
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

/// A linear layer's weights: an f32 tensor, or compact ones widened as they compute.
#[derive(Clone)]
enum Weight {
    Tensor(Tensor),
    Panel(Arc<PanelDense>),
    /// 4-bit weights re-laid as GGML `Q4_1` blocks for the VNNI kernel, activations
    /// quantized to int8 per block of 32 (`model.quantization = "int8"`).
    Blocks(Arc<BlockDense>),
    /// bf16 weights in AMX tile order ([`Arithmetic::Bf16`]).
    Bf16(Arc<Bf16Dense>),
    /// int8 weights per output channel, int8 activations per row
    /// ([`Arithmetic::Int8Activations`] on a checkpoint of floats).
    Int8(Arc<Int8Layer>),
}

/// A float layer quantized to int8 ([`QDense`]), which takes outputs in multiples of
/// 16: a layer of other widths (the 3B tower's 3 420) is padded with zero rows and its
/// extra columns dropped from each result row.
pub(crate) struct Int8Layer {
    q: QDense,
    outputs: usize,
}

impl Int8Layer {
    /// `w` as `outputs` rows of `inputs` values (PyTorch's order) and its bias.
    fn quantize(w: &[f32], bias: Option<Vec<f32>>, inputs: usize, outputs: usize) -> Option<Self> {
        let n = outputs.next_multiple_of(16);
        let mut bias = bias.unwrap_or_else(|| vec![0.0; outputs]);
        bias.resize(n, 0.0);
        let q = if n == outputs {
            QDense::from_output_rows(w, bias, inputs, n)?
        } else {
            let mut padded = w.to_vec();
            padded.resize(n * inputs, 0.0);
            QDense::from_output_rows(&padded, bias, inputs, n)?
        };
        Some(Int8Layer { q, outputs })
    }

    fn inputs(&self) -> usize {
        self.q.inputs()
    }

    fn forward(&self, x: &[f32], rows: usize, out: &mut Vec<f32>) {
        self.q.forward(x, rows, out);
        self.trim(out, rows);
    }

    /// `rows` result rows of the padded layer in `out` as rows of its real outputs.
    fn trim(&self, out: &mut Vec<f32>, rows: usize) {
        let n = self.q.outputs();
        if n != self.outputs {
            for r in 1..rows {
                out.copy_within(r * n..r * n + self.outputs, r * self.outputs);
            }
            out.truncate(rows * self.outputs);
        }
    }

    fn concat(parts: &[&Int8Layer]) -> Option<Self> {
        if parts.iter().any(|p| p.outputs != p.q.outputs()) {
            return None;
        }
        let q = QDense::concat(&parts.iter().map(|p| &p.q).collect::<Vec<_>>())?;
        Some(Int8Layer { outputs: q.outputs(), q })
    }
}

impl Linear {
    /// `x · Wᵀ + b` over the last dim of `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            Weight::Tensor(w) => x.broadcast_matmul(&w.t().map_err(backend)?).map_err(backend)?,
            Weight::Panel(w) => return self.forward_shaped(x, w.outputs()),
            Weight::Blocks(w) => return self.forward_shaped(x, w.outputs()),
            Weight::Bf16(w) => return self.forward_shaped(x, w.outputs()),
            Weight::Int8(w) => return self.forward_shaped(x, w.outputs),
        };
        match &self.bias {
            Some(b) => y.broadcast_add(b).map_err(backend),
            None => Ok(y),
        }
    }

    /// [`Linear::forward_rows`] as a tensor `[.., outputs]`.
    fn forward_shaped(&self, x: &Tensor, outputs: usize) -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = outputs;
        }
        Tensor::from_vec(self.forward_rows(x)?, dims, x.device()).map_err(backend)
    }

    /// [`Linear::forward`] of `x` (`[.., inputs]`) as row-major f32 rows of `outputs`
    /// values: what the CPU path's fused steps (`host.rs`) work on.
    pub fn forward_rows(&self, x: &Tensor) -> Result<Vec<f32>> {
        let mut y = match &self.weight {
            Weight::Tensor(_) => {
                let y = self.forward(x)?;
                return y.flatten_all().and_then(|y| y.to_vec1::<f32>()).map_err(backend);
            }
            Weight::Panel(w) => on_rows(x, w.inputs(), |x, rows, out| w.forward(x, rows, out))?,
            Weight::Blocks(w) => on_rows(x, w.inputs(), |x, rows, out| {
                if rows >= WIDEN_ROWS && BlockDense::widens() {
                    w.forward_widened(x, rows, out)
                } else {
                    w.forward(x, rows, out)
                }
            })?,
            Weight::Bf16(w) => on_rows(x, w.inputs(), |x, rows, out| {
                out.resize(rows * w.outputs(), 0.0);
                w.forward(x, rows, Sink::F32(out))
            })?,
            Weight::Int8(w) => on_rows(x, w.inputs(), |x, rows, out| w.forward(x, rows, out))?,
        };
        if let Some(b) = &self.bias {
            let b = b.to_vec1::<f32>().map_err(backend)?;
            y.par_chunks_mut(b.len() * 64).for_each(|rows| {
                for row in rows.chunks_exact_mut(b.len()) {
                    row.iter_mut().zip(&b).for_each(|(y, b)| *y += b);
                }
            });
        }
        Ok(y)
    }

    /// Whether this layer computes in bf16 on AMX tiles (`model.dtype = "bf16"`, or the
    /// unquantized layers with `model.quantization = "int8"` where AMX runs), or in
    /// int8 from a float checkpoint: arithmetic rounded as the tiles' attention's is.
    pub(super) fn is_reduced(&self) -> bool {
        matches!(self.weight, Weight::Bf16(_) | Weight::Int8(_))
    }

    /// The bf16 tile layer behind this one, with its bias inside (`model.dtype =
    /// "bf16"` on the CPU).
    fn bf16(&self) -> Option<&Arc<Bf16Dense>> {
        match (&self.weight, &self.bias) {
            (Weight::Bf16(w), None) => Some(w),
            _ => None,
        }
    }

    /// `parts` side by side as one layer (their outputs one after another), when all
    /// are bf16 tile layers that can be joined ([`Bf16Dense::concat`]) — a prompt's q, k
    /// and v then take one pass over its rows — or all 4-bit block layers
    /// ([`BlockDense::concat`]: a step quantizes its activations, and a prompt widens its
    /// weights, once for the three), their biases joined too.
    pub fn concat(parts: &[&Linear]) -> Option<Linear> {
        if let Some(layers) = parts.iter().map(|p| p.bf16().map(Arc::as_ref)).collect::<Option<Vec<_>>>() {
            return Some(Linear { weight: Weight::Bf16(Arc::new(Bf16Dense::concat(&layers)?)), bias: None });
        }
        let int8 = parts
            .iter()
            .map(|p| match (&p.weight, &p.bias) {
                (Weight::Int8(w), None) => Some(w.as_ref()),
                _ => None,
            })
            .collect::<Option<Vec<_>>>();
        if let Some(layers) = int8 {
            return Some(Linear { weight: Weight::Int8(Arc::new(Int8Layer::concat(&layers)?)), bias: None });
        }
        let blocks = parts
            .iter()
            .map(|p| match &p.weight {
                Weight::Blocks(b) => Some(b.as_ref()),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()?;
        let bias = match parts.iter().map(|p| p.bias.as_ref()).collect::<Option<Vec<_>>>() {
            Some(biases) => Some(Tensor::cat(&biases, 0).ok()?),
            None if parts.iter().all(|p| p.bias.is_none()) => None,
            None => return None,
        };
        Some(Linear { weight: Weight::Blocks(Arc::new(BlockDense::concat(&blocks)?)), bias })
    }

    /// Rows `ids` of the weights, `[ids, inputs]`: the lookup of an embedding table.
    pub fn rows(&self, ids: &[u32], device: &Device) -> Result<Tensor> {
        match &self.weight {
            Weight::Tensor(w) => {
                let index = Tensor::new(ids, device).map_err(backend)?;
                w.index_select(&index, 0).map_err(backend)
            }
            Weight::Blocks(..) | Weight::Bf16(..) | Weight::Int8(..) => {
                Err(Error::Unsupported("an embedding table kept in a matrix kernel's layout".into()))
            }
            Weight::Panel(w) => {
                let k = w.inputs();
                let mut out = vec![0f32; ids.len() * k];
                for (&id, row) in ids.iter().zip(out.chunks_mut(k)) {
                    w.widen_row(id as usize, row);
                }
                Tensor::from_vec(out, (ids.len(), k), device).map_err(backend)
            }
        }
    }

    /// The same weights with no bias (a tied output head); with `blocks`, 4-bit
    /// weights re-laid for the int8-activation kernel (an embedding table keeps its
    /// packed copy for lookups, the head gets its own).
    pub fn without_bias(&self, blocks: bool) -> Linear {
        if blocks
            && let Weight::Panel(w) = &self.weight
            && let Some(b) = w.q4_1_blocks()
        {
            return Linear { weight: Weight::Blocks(Arc::new(b)), bias: None };
        }
        Linear { weight: self.weight.clone(), bias: None }
    }
}

/// A tensor's values in row-major order, widened to f32.
fn f32_values(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32).and_then(|t| t.flatten_all()?.to_vec1::<f32>()).map_err(backend)
}

/// `x` (`[.., inputs]`) through a kernel over row-major f32 rows (`kernel(x, rows,
/// out)`), the rows it writes.
fn on_rows(x: &Tensor, inputs: usize, kernel: impl FnOnce(&[f32], usize, &mut Vec<f32>)) -> Result<Vec<f32>> {
    let mut out = Vec::new();
    with_rows(x, |flat| kernel(flat, flat.len() / inputs, &mut out))?;
    Ok(out)
}

/// `f` of `x`'s values in row-major order: its own storage when it is a contiguous f32
/// tensor on the CPU (no copy: a prompt's activations are megabytes), else a copy.
pub(super) fn with_rows<T>(x: &Tensor, f: impl FnOnce(&[f32]) -> T) -> Result<T> {
    if x.is_contiguous() {
        let (storage, layout) = x.storage_and_layout();
        if let candle_core::Storage::Cpu(candle_core::CpuStorage::F32(all)) = &*storage {
            let start = layout.start_offset();
            return Ok(f(&all[start..start + x.elem_count()]));
        }
    }
    let flat = x.flatten_all().and_then(|x| x.to_vec1::<f32>()).map_err(backend)?;
    Ok(f(&flat))
}

/// A SwiGLU feed-forward, `down(SiLU(gate(x)) · up(x))`. With bf16 tile layers gate
/// and up are one layer ([`Bf16Dense::swiglu`]) whose results become the down
/// layer's bf16 rows as they are made: the two intermediates never exist in f32, and
/// SiLU, the product and the rounding cost no passes of their own.
pub struct Mlp(Layers);

enum Layers {
    Fused {
        gate_up: Bf16Dense,
        down: Arc<Bf16Dense>,
    },
    /// int8 layers from a float checkpoint: gate and up as one layer whose results, 16
    /// columns of each at a time ([`QDense::swiglu`]), become the down layer's quantized
    /// rows in one pass ([`QRows::quantize_swiglu`]); `width` the (padded) intermediate.
    Int8 {
        gate_up: QDense,
        down: Arc<Int8Layer>,
        width: usize,
    },
    /// Gate and up as one layer ([`Linear::concat`], 4-bit blocks): rows of `gate | up`,
    /// `width` values each half.
    Joined {
        gate_up: Linear,
        down: Linear,
        width: usize,
    },
    Split {
        gate: Linear,
        up: Linear,
        down: Linear,
    },
}

thread_local! {
    /// The calling thread's intermediate rows of a fused feed-forward, kept between
    /// calls (a prompt's are megabytes; fresh ones cost page faults every layer).
    static SWIGLU_ROWS: std::cell::Cell<Bits> = const { std::cell::Cell::new(Bits::new()) };
    /// The same for an int8 feed-forward: gate and up's f32 results, and the down
    /// layer's quantized rows.
    static INT8_SWIGLU: std::cell::Cell<(Vec<f32>, QRows)> = std::cell::Cell::default();
}

impl Mlp {
    /// The feed-forward of `gate`, `up` and `down` layers.
    pub fn new(gate: Linear, up: Linear, down: Linear) -> Mlp {
        if let (Some(g), Some(u), Some(d)) = (gate.bf16(), up.bf16(), down.bf16())
            && d.inputs().div_ceil(32) == g.outputs().div_ceil(32)
            && let Some(gate_up) = Bf16Dense::swiglu(g, u)
        {
            return Mlp(Layers::Fused { gate_up, down: d.clone() });
        }
        if let (Weight::Int8(g), Weight::Int8(u), Weight::Int8(d)) = (&gate.weight, &up.weight, &down.weight)
            && d.inputs() == g.outputs
            && let Some(gate_up) = QDense::swiglu(&g.q, &u.q)
        {
            return Mlp(Layers::Int8 { width: g.q.outputs(), gate_up, down: d.clone() });
        }
        if let (Weight::Blocks(g), Weight::Blocks(u)) = (&gate.weight, &up.weight)
            && g.outputs() == u.outputs()
            && let Some(gate_up) = Linear::concat(&[&gate, &up])
        {
            return Mlp(Layers::Joined { gate_up, down, width: g.outputs() });
        }
        Mlp(Layers::Split { gate, up, down })
    }

    /// `down(SiLU(gate(h)) · up(h))` for `h` `[tokens, inputs]`.
    pub fn forward(&self, h: &Tensor) -> Result<Tensor> {
        match &self.0 {
            Layers::Split { gate, up, down } => {
                let gate = gate.forward(h)?.silu().map_err(backend)?;
                down.forward(&(gate * up.forward(h)?).map_err(backend)?)
            }
            Layers::Joined { gate_up, down, width } => {
                let both = gate_up.forward_rows(h)?;
                let tokens = both.len() / (2 * width);
                let mut act = vec![0f32; tokens * width];
                act.par_chunks_mut(*width).zip(both.par_chunks(2 * width)).for_each(|(act, both)| {
                    let (gate, up) = both.split_at(*width);
                    for ((a, &g), &u) in act.iter_mut().zip(gate).zip(up) {
                        *a = g / (1.0 + (-g).exp()) * u;
                    }
                });
                let mut dims = h.dims().to_vec();
                if let Some(last) = dims.last_mut() {
                    *last = *width;
                }
                down.forward(&Tensor::from_vec(act, dims, h.device()).map_err(backend)?)
            }
            Layers::Int8 { gate_up, down, width } => {
                let (tokens, _) = h.dims2().map_err(backend)?;
                let mut out = Vec::new();
                crate::cpu::with_taken(&INT8_SWIGLU, |(both, rows)| {
                    with_rows(h, |x| gate_up.forward(x, tokens, both))?;
                    rows.quantize_swiglu(both, tokens, *width, down.inputs());
                    down.q.rows_forward(rows, &mut out, false);
                    Ok::<_, Error>(())
                })?;
                down.trim(&mut out, tokens);
                Tensor::from_vec(out, (tokens, down.outputs), h.device()).map_err(backend)
            }
            Layers::Fused { gate_up, down } => {
                let (tokens, _) = h.dims2().map_err(backend)?;
                let mut out = vec![0f32; tokens * down.outputs()];
                crate::cpu::with_taken(&SWIGLU_ROWS, |rows| {
                    with_rows(h, |x| gate_up.forward(x, tokens, Sink::SwiGluRows(rows)))?;
                    down.run(rows, tokens, Sink::F32(&mut out));
                    Ok::<_, Error>(())
                })?;
                Tensor::from_vec(out, (tokens, down.outputs()), h.device()).map_err(backend)
            }
        }
    }
}

/// RMSNorm as transformers computes it: `x · rsqrt(mean(x²) + eps) · weight`, in f32.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.sqr().and_then(|s| s.mean_keepdim(candle_core::D::Minus1)).map_err(backend)?;
    let scale = (mean + eps).and_then(|v| v.sqrt()).and_then(|v| v.recip()).map_err(backend)?;
    x.broadcast_mul(&scale).and_then(|h| h.broadcast_mul(weight)).map_err(backend)
}

/// `(x + delta, RMSNorm(x + delta) · weight)`: the residual stream's next value and the
/// next sublayer's input. On the CPU one pass over each row (as graph ops, the add and
/// the norm were five passes and as many fresh buffers a sublayer: 5–7 % of a prompt's
/// time in perf); on other devices, graph ops.
pub fn add_rms_norm(x: &Tensor, delta: &Tensor, weight: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let f32s = [x, delta, weight].iter().all(|t| t.dtype() == DType::F32);
    if !(x.device().is_cpu() && f32s && x.dims() == delta.dims() && x.rank() == 2) {
        let sum = (x + delta).map_err(backend)?;
        let h = rms_norm(&sum, weight, eps)?;
        return Ok((sum, h));
    }
    let width = weight.elem_count();
    let w = weight.to_vec1::<f32>().map_err(backend)?;
    let mut sum = with_rows(x, <[f32]>::to_vec)?;
    let mut h = vec![0f32; sum.len()];
    with_rows(delta, |d| {
        // Enough rows a job that a thread's wake-up is worth it.
        let rows = 16 * width;
        sum.par_chunks_mut(rows).zip(d.par_chunks(rows)).zip(h.par_chunks_mut(rows)).for_each(
            |((x, d), h)| {
                for ((x, d), h) in
                    x.chunks_exact_mut(width).zip(d.chunks_exact(width)).zip(h.chunks_exact_mut(width))
                {
                    crate::cpu::add_rms_norm(x, d, &w, eps as f32, h);
                }
            },
        )
    })?;
    let dims = x.dims();
    let tensor = |v| Tensor::from_vec(v, dims, x.device()).map_err(backend);
    Ok((tensor(sum)?, tensor(h)?))
}

/// The checkpoint's tensors by name, as stored (dtype included), handed out once each
/// to the layer that takes them.
pub struct Weights {
    tensors: RefCell<HashMap<String, Tensor>>,
    device: Device,
    /// Whether linear layers stay compact ([`Linear`]'s panels): on the CPU unless told.
    compact: bool,
    /// What linear layers compute in (with `compact`).
    arithmetic: Arithmetic,
    quantization: Option<(usize, usize)>,
    path: PathBuf,
    vision: &'static str,
    text: &'static str,
}

impl Weights {
    /// Reads every safetensors file of the folder `dir`, for `device`.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Self::load_as(dir, device, device.is_cpu())
    }

    /// As [`Weights::load`]; `compact` false widens every linear layer to f32 at load
    /// (the reference the compact path is tested against).
    pub fn load_as(dir: &Path, device: &Device, compact: bool) -> Result<Self> {
        Self::load_with(dir, device, compact, Arithmetic::AsStored)
    }

    /// As [`Weights::load_as`], the compact layers computing in `arithmetic`.
    pub fn load_with(dir: &Path, device: &Device, compact: bool, arithmetic: Arithmetic) -> Result<Self> {
        let files = kiln_core::hf::weight_files(dir)?;
        let mut tensors = HashMap::new();
        for file in &files {
            read_safetensors(file, &mut tensors)?;
        }
        let quantization = if tensors.keys().any(|k| k.ends_with(".scales")) {
            Some(kiln_core::qwen2vl::quantization(dir)?.ok_or_else(|| {
                Error::model_load(
                    dir.join("config.json"),
                    "the weights have quantized layers (`scales`) but config.json has no `quantization`",
                )
            })?)
        } else {
            None
        };
        let layout = kiln_core::qwen2vl::TensorLayout::detect(tensors.keys().map(String::as_str));
        let (vision, text) = (layout.vision, layout.text);
        for suffix in ["weight", "scales", "biases"] {
            if let Some(head) = tensors.remove(&format!("{}.{suffix}", layout.lm_head)) {
                tensors.insert(format!("lm_head.{suffix}"), head);
            }
        }
        let tensors = tensors
            .into_iter()
            .map(|(name, t)| t.to_device(device).map(|t| (name, t)))
            .collect::<candle_core::Result<_>>()
            .map_err(backend)?;
        Ok(Weights {
            tensors: RefCell::new(tensors),
            device: device.clone(),
            compact,
            arithmetic: if compact { arithmetic } else { Arithmetic::AsStored },
            quantization,
            path: dir.to_path_buf(),
            vision,
            text,
        })
    }

    /// Where the tensors are.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Whether 4-bit layers run on the int8-activation block kernel.
    pub fn blocks(&self) -> bool {
        self.arithmetic == Arithmetic::Int8Activations
    }

    /// Whether float layers are quantized to int8 at load: int8 arithmetic asked for a
    /// checkpoint with no quantized layers, on a CPU whose VNNI runs it (elsewhere the
    /// int8 kernel is plain Rust, for correctness only, and the layers stay as stored).
    fn int8_floats(&self) -> bool {
        self.arithmetic == Arithmetic::Int8Activations && self.quantization.is_none() && QDense::fast()
    }

    /// The output head of a checkpoint whose head is its token embedding: the same
    /// weights with no bias, re-laid for the arithmetic asked for where the embedding's
    /// own layout serves lookups (4-bit blocks; int8 from a float checkpoint — the head
    /// gets its own int8 copy, the table keeps its stored rows).
    pub fn tied_head(&self, embed: &Linear) -> Result<Linear> {
        if self.int8_floats()
            && let Weight::Panel(w) = &embed.weight
        {
            let (inputs, outputs) = (w.inputs(), w.outputs());
            let mut rows = vec![0f32; outputs * inputs];
            rows.par_chunks_mut(inputs).enumerate().for_each(|(n, row)| w.widen_row(n, row));
            let layer = Int8Layer::quantize(&rows, None, inputs, outputs).ok_or_else(|| {
                Error::model_load(&self.path, format!("the tied output head ({outputs} × {inputs}) as int8"))
            })?;
            return Ok(Linear { weight: Weight::Int8(Arc::new(layer)), bias: None });
        }
        Ok(embed.without_bias(self.blocks()))
    }

    /// `visual.` or `model.visual.`, as the checkpoint names the vision tower.
    pub fn vision_prefix(&self) -> &'static str {
        self.vision
    }

    /// `model.` or `model.language_model.`, as the checkpoint names the text model.
    pub fn text_prefix(&self) -> &'static str {
        self.text
    }

    /// The tensor `name` in f32, or an error naming it and the folder.
    pub fn get(&self, name: &str) -> Result<Tensor> {
        let t = self.tensors.borrow().get(name).cloned().ok_or_else(|| self.missing(name))?;
        if t.dtype() == DType::F32 { Ok(t) } else { t.to_dtype(DType::F32).map_err(backend) }
    }

    fn missing(&self, name: &str) -> Error {
        Error::model_load(&self.path, format!("no tensor `{name}`; is this a Qwen2.5-VL checkpoint?"))
    }

    /// Removes and returns the tensor `name` as stored.
    fn take(&self, name: &str) -> Result<Tensor> {
        self.tensors.borrow_mut().remove(name).ok_or_else(|| self.missing(name))
    }

    /// Whether the checkpoint has `name`.
    pub fn has(&self, name: &str) -> bool {
        self.tensors.borrow().contains_key(name)
    }

    /// The linear layer `prefix` (`prefix.weight`, and `prefix.bias` when `bias`);
    /// quantized when the checkpoint has `prefix.scales`. Its tensors are handed over:
    /// a second call for the same prefix fails.
    pub fn linear(&self, prefix: &str, bias: bool) -> Result<Linear> {
        let mut bias = if bias { Some(self.get(&format!("{prefix}.bias"))?) } else { None };
        // A bf16 tile layer adds its bias as its results leave the tiles.
        let tile_bias = || bias.as_ref().map(|b| b.to_vec1::<f32>()).transpose().map_err(backend);
        let weight = self.take(&format!("{prefix}.weight"))?;
        let failed = |why: String| Error::model_load(&self.path, format!("layer `{prefix}`: {why}"));
        let weight = if self.has(&format!("{prefix}.scales")) {
            let (group, bits) =
                self.quantization.ok_or_else(|| failed("quantized with no `quantization`".into()))?;
            let (scales, biases) =
                (self.take(&format!("{prefix}.scales"))?, self.take(&format!("{prefix}.biases"))?);
            let layer = affine(&weight, &scales, &biases, group, bits).map_err(failed)?;
            if self.blocks()
                && !prefix.ends_with("embed_tokens")
                && let Some(b) = layer.q4_1_blocks()
            {
                Weight::Blocks(Arc::new(b))
            } else if self.compact {
                self.panel(prefix, layer, tile_bias()?, false)
            } else {
                Weight::Tensor(widened(&layer, &self.device).map_err(failed)?)
            }
        } else if self.int8_floats() && weight.rank() == 2 && !prefix.ends_with("embed_tokens") {
            let (outputs, inputs) = weight.dims2().map_err(backend)?;
            let w = f32_values(&weight)?;
            let layer = Int8Layer::quantize(&w, tile_bias()?, inputs, outputs)
                .ok_or_else(|| failed(format!("{outputs} × {inputs} not taken by the int8 kernel")))?;
            Weight::Int8(Arc::new(layer))
        } else if self.compact && matches!(weight.dtype(), DType::BF16 | DType::F16) && weight.rank() == 2 {
            let (outputs, inputs) = weight.dims2().map_err(backend)?;
            let flat = weight.flatten_all().map_err(backend)?;
            let stored = if weight.dtype() == DType::BF16 {
                Stored::Bf16(flat.to_vec1::<bf16>().map_err(backend)?)
            } else {
                Stored::F16(flat.to_vec1::<f16>().map_err(backend)?)
            };
            self.panel(prefix, PanelDense::half(stored, outputs, inputs).map_err(failed)?, tile_bias()?, true)
        } else if self.arithmetic == Arithmetic::Bf16
            && weight.rank() == 2
            && !prefix.ends_with("embed_tokens")
        {
            let (outputs, inputs) = weight.dims2().map_err(backend)?;
            let w = f32_values(&weight)?;
            Weight::Bf16(Arc::new(Bf16Dense::pack(inputs, outputs, tile_bias()?, |n, out| {
                out.copy_from_slice(&w[n * inputs..(n + 1) * inputs])
            })))
        } else {
            Weight::Tensor(weight.to_dtype(DType::F32).map_err(backend)?)
        };
        if matches!(weight, Weight::Bf16(_) | Weight::Int8(_)) {
            bias = None;
        }
        Ok(Linear { weight, bias })
    }

    /// A compact layer as [`Arithmetic`] says: kept as stored, or re-laid in bf16 tile
    /// order — every layer for bf16, and with int8 activations on AMX the checkpoint's
    /// unquantized (bf16 / f16) layers, a 4-bit checkpoint's vision tower: tiles at the
    /// bytes it stores them in — the token embedding excepted, whose rows are looked up.
    fn panel(&self, prefix: &str, layer: PanelDense, bias: Option<Vec<f32>>, unquantized: bool) -> Weight {
        let tiles = match self.arithmetic {
            Arithmetic::Bf16 => true,
            Arithmetic::Int8Activations => unquantized && BlockDense::widens(),
            Arithmetic::AsStored => false,
        };
        if tiles && !prefix.ends_with("embed_tokens") {
            return Weight::Bf16(Arc::new(Bf16Dense::pack(
                layer.inputs(),
                layer.outputs(),
                bias,
                |n, out| layer.widen_row(n, out),
            )));
        }
        Weight::Panel(Arc::new(layer))
    }

    /// The patch convolution's kernel as a `[hidden, C·T·P·P]` matrix whose columns are
    /// in the processor's (channel, time, row, column) order: torch's `[hidden, C, T, P,
    /// P]` reshaped, or MLX's channels-last `[hidden, T, P, P, C]` permuted first.
    pub fn patch_matrix(&self, kernel: Tensor, hidden: usize) -> Result<Tensor> {
        let dims = kernel.dims().to_vec();
        let kernel = match dims.as_slice() {
            [_, 3, _, _, _] => kernel,
            [_, _, _, _, 3] => kernel.permute((0, 4, 1, 2, 3)).map_err(backend)?,
            other => {
                return Err(Error::model_load(
                    &self.path,
                    format!("patch_embed.proj.weight has shape {other:?}; expected [hidden, 3, T, P, P]"),
                ));
            }
        };
        let columns = kernel.elem_count() / hidden;
        kernel.contiguous().and_then(|k| k.reshape((hidden, columns))).map_err(backend)
    }
}

/// Reads the safetensors file `file` into `into`, one tensor at a time (the header, then
/// each tensor's bytes at its offset), each in its stored dtype on the CPU.
fn read_safetensors(file: &Path, into: &mut HashMap<String, Tensor>) -> Result<()> {
    let bad = |why: String| Error::model_load(file, format!("cannot read its safetensors: {why}"));
    let kiln_core::hf::SafetensorsHeader { file: handle, size, tensors, data_start: start } =
        kiln_core::hf::safetensors_header(file)?;
    for (name, info) in tensors {
        let dtype = match info.get("dtype").and_then(serde_json::Value::as_str) {
            Some("F32") => DType::F32,
            Some("BF16") => DType::BF16,
            Some("F16") => DType::F16,
            Some("U32") => DType::U32,
            Some("U8") => DType::U8,
            Some("I64") => DType::I64,
            other => {
                return Err(bad(format!(
                    "tensor `{name}` has dtype {other:?}; kiln reads F32, BF16, F16, U32, U8, I64"
                )));
            }
        };
        let numbers = |key: &str| -> Option<Vec<usize>> {
            info.get(key)?.as_array()?.iter().map(|v| v.as_u64().map(|v| v as usize)).collect()
        };
        let (Some(shape), Some(offsets)) = (numbers("shape"), numbers("data_offsets")) else {
            return Err(bad(format!("tensor `{name}` has no shape or data_offsets")));
        };
        let [from, to] = offsets[..] else {
            return Err(bad(format!("tensor `{name}`: data_offsets {offsets:?}")));
        };
        let bytes = shape.iter().product::<usize>() * dtype.size_in_bytes();
        if to < from || to - from != bytes || start + to as u64 > size {
            return Err(bad(format!(
                "tensor `{name}`: shape {shape:?} of {dtype:?} does not match bytes {from}..{to}"
            )));
        }
        let mut data = vec![0u8; bytes];
        handle.read_exact_at(&mut data, start + from as u64).map_err(|e| Error::io("reading", file, e))?;
        let tensor = Tensor::from_raw_buffer(&data, dtype, &shape, &Device::Cpu).map_err(backend)?;
        into.insert(name, tensor);
    }
    Ok(())
}

/// One MLX affine-quantized layer from its tensors: `packed` (u32 `[out, in·bits/32]`,
/// each row a little-endian bit stream, element j at bits `[j·bits, (j+1)·bits)`),
/// `scales` and `biases` (`[out, in/group]`); `w = scale · q + bias` per group.
fn affine(
    packed: &Tensor,
    scales: &Tensor,
    biases: &Tensor,
    group: usize,
    bits: usize,
) -> std::result::Result<PanelDense, String> {
    if packed.dtype() != DType::U32 {
        return Err(format!("its weight is {:?}, not the packed u32 of a quantized layer", packed.dtype()));
    }
    let (out, words) = packed.dims2().map_err(|e| e.to_string())?;
    let inputs = words * 32 / bits;
    let read = |t: &Tensor| -> std::result::Result<Vec<f32>, String> {
        let (rows, cols) = t.dims2().map_err(|e| e.to_string())?;
        if rows != out || cols * group != inputs {
            return Err(format!(
                "scales/biases of [{rows}, {cols}] for a [{out}, {inputs}] weight in groups of {group}"
            ));
        }
        t.to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(|e| e.to_string())
    };
    let (scales, biases) = (read(scales)?, read(biases)?);
    let packed = packed.flatten_all().and_then(|t| t.to_vec1::<u32>()).map_err(|e| e.to_string())?;
    PanelDense::affine(packed, scales, biases, out, group, bits)
}

/// `layer`'s weights widened to an f32 `[out, in]` tensor on `device`.
fn widened(layer: &PanelDense, device: &Device) -> std::result::Result<Tensor, String> {
    let k = layer.inputs();
    let mut values = vec![0f32; layer.outputs() * k];
    for (r, row) in values.chunks_mut(k).enumerate() {
        layer.widen_row(r, row);
    }
    Tensor::from_vec(values, (layer.outputs(), k), device).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::panels::tests::pack;

    #[test]
    fn every_bit_width_unpacks_to_its_values_scaled_and_offset() {
        let device = Device::Cpu;
        for bits in [2usize, 3, 4, 5, 6, 8] {
            let n = 64;
            let q: Vec<u64> = (0..n as u64).map(|j| (j * 7 + 3) % (1 << bits)).collect();
            let packed = Tensor::from_vec(pack(&q, bits), (1, n * bits / 32), &device).unwrap();
            let scales = Tensor::from_vec(vec![0.5f32, 2.0], (1, 2), &device).unwrap();
            let biases = Tensor::from_vec(vec![-1.0f32, 3.0], (1, 2), &device).unwrap();
            let layer = affine(&packed, &scales, &biases, 32, bits).unwrap();
            let w = widened(&layer, &device).unwrap().to_vec2::<f32>().unwrap();
            for (j, &v) in q.iter().enumerate() {
                let (s, b) = if j < 32 { (0.5, -1.0) } else { (2.0, 3.0) };
                assert_eq!(w[0][j], s * v as f32 + b, "bits {bits}, element {j}");
            }
        }
    }
}
