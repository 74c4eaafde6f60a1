//! kiln provider for [candle](https://github.com/huggingface/candle): BERT-family
//! encoders from Hugging Face folders (`config.json` + `model.safetensors`), on CPU, and
//! on NVIDIA GPUs (`cuda:N`) with the crate's `cuda` feature (`kiln`'s `candle-cuda`).
//!
//! Registered as `candle`. The model takes the `input_ids`, `attention_mask` and
//! `token_type_ids` that `kiln-text` produces. Asked for an embedding head
//! ([`ModelSpec::head`]), it pools and normalises on its device, in f32, and returns
//! `sentence_embedding` (`[batch, hidden]`): only that leaves a GPU. Without one it
//! returns `last_hidden_state` (`[batch, sequence, hidden]`: f16 for f16 models and f32
//! otherwise). Weights are converted to the model's dtype at load.
//!
//! Which code runs the encoder: f32 and bf16 on the CPU, kiln's packed kernels
//! (`cpu.rs`: no padding computed; bf16 linear layers on AMX tiles where the CPU has
//! them, `cpu/bf16.rs`; int8 with `model.quantization`); on a GPU, kiln's CUDA kernels
//! between cuBLAS's matrix products (`cuda.rs`, `kernels/bert.cu`, compiled to PTX by
//! nvcc at build time with the `cuda` feature); otherwise (f16 on the CPU, a BERT the
//! kernels do not take, or `provider.options.cpu_kernels` / `cuda_kernels` off)
//! candle-transformers' graph. Which CPU kernels run ([`Isa`]) is detected once and
//! can be capped with `KILN_CPU_ISA` ([`set_max_isa`]). LayerNorm, softmax and pooling compute in f32 in all
//! three.

use std::sync::Arc;

use candle_core::{DType as CDType, Device as CDevice, Tensor as CTensor};
use candle_nn::{Embedding, LayerNorm, Module, VarBuilder};
use candle_transformers::models::bert::{BertEncoder as CandleBertEncoder, Config as BertConfig};
use kiln_core::hf::{bert_config, bert_model_info, probe_encoder, weight_bytes, weight_files};
use kiln_core::{
    Capabilities, DType, Device, EmbeddingHead, Error, Inputs, Model, ModelInfo, ModelSpec, Outputs, Pooling,
    Provider, ProviderConfig, Quantization, Result, SENTENCE_EMBEDDING, Tensor, async_trait,
};
use serde::Deserialize;

mod cpu;
#[cfg(feature = "cuda")]
mod cuda;
mod dense_llama;
mod llama;
pub mod qwen2vl;
mod weights;

/// Whether `dir` is a Qwen2.5-VL checkpoint folder (its config.json says so).
fn qwen2vl_folder(dir: &std::path::Path) -> bool {
    std::fs::read(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_slice::<serde_json::Value>(&t).ok())
        .and_then(|c| {
            c.get("model_type").and_then(|m| m.as_str()).map(|m| matches!(m, "qwen2_5_vl" | "qwen2_vl"))
        })
        .unwrap_or(false)
}

/// Bytes a Qwen2.5-VL folder's weights take as candle holds them, from the safetensors
/// headers: on the CPU (`compact`) matrices as stored and the rest in f32 — with `bf16`
/// everything in bf16, mlx-community's packed layers dequantized (an upper bound: norms
/// stay f32 but are small); elsewhere all in f32, packed layers dequantized.
fn qwen2vl_bytes(dir: &std::path::Path, compact: bool, bf16: bool) -> Result<u64> {
    let files = weight_files(dir)?;
    if compact && !bf16 {
        return kiln_core::hf::compact_weight_bytes(&files);
    }
    let dtype = if compact { DType::BF16 } else { DType::F32 };
    let bits = std::fs::read(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_slice::<serde_json::Value>(&t).ok())
        .and_then(|c| c.get("quantization")?.get("bits")?.as_u64());
    match bits {
        Some(bits) => kiln_core::hf::dequantized_weight_bytes(&files, dtype, bits as usize),
        None => weight_bytes(&files, dtype, None),
    }
}

/// The registered name.
pub const NAME: &str = "candle";

/// Name of the output this provider's models produce.
pub use cpu::isa::{Isa, active as cpu_isa, detected as detected_cpu_isa, set_max_isa};
pub use kiln_core::LAST_HIDDEN_STATE;

/// Options under `[provider.options]` for candle; unknown keys are rejected.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CandleOptions {
    /// f32 models on the CPU run kiln's packed BERT kernels (`cpu.rs`: no padding
    /// computed, fused passes); `false` runs candle-transformers' graph there too, as
    /// on GPUs and for f16/bf16 (to compare, or for a model the kernels do not take).
    pub cpu_kernels: bool,
    /// Models on a GPU run kiln's CUDA kernels between cuBLAS's matrix products
    /// (`cuda.rs`, `kernels/bert.cu`); `false` runs candle-transformers' graph there.
    pub cuda_kernels: bool,
    /// Generation (GGUF models): what the weight matrices become at load — `"auto"`
    /// (the default, where the CPU has AVX-512 VNNI: `Q4_1` and `Q8_0` matrices as the
    /// file has them through kiln's block kernel, other types through kiln's int8 kernel;
    /// without VNNI `"q8_0"`), `"none"` (as the file has them: kiln's block kernel where
    /// it takes the type, else candle's), `"int8"` (kiln's per-channel int8 kernel),
    /// `"q8_0"`, `"q4_0"`, `"q4_k"`, `"f16"`, `"f32"` (candle's).
    pub requantize: String,
    /// On a GPU, embedding batches are started without waiting for them: the next
    /// batch's kernels queue behind the running one, and its result's copy back is
    /// waited for on kiln's responder thread (`false`: each batch waited for on the
    /// model thread).
    pub overlap_batches: bool,
    /// On a GPU with kiln's kernels, a BERT layer's attention in one kernel on tensor
    /// cores (f16/bf16 models, head size 32, up to 128 tokens; others keep five
    /// launches): scores never go through memory. On by default; `false` to compare.
    pub fused_attention: bool,
    /// Generation on a GPU: a greedy sequence's next token is picked on the device (the
    /// first index of its largest logit), so only its id comes back instead of its row
    /// of logits; `false`: every row copied out and sampled on the host.
    pub greedy_on_device: bool,
}

impl Default for CandleOptions {
    fn default() -> Self {
        CandleOptions {
            cpu_kernels: true,
            cuda_kernels: true,
            requantize: "auto".into(),
            overlap_batches: true,
            fused_attention: true,
            greedy_on_device: true,
        }
    }
}

/// The candle provider.
#[derive(Debug, Default)]
pub struct CandleProvider {
    options: CandleOptions,
}

fn build(config: &ProviderConfig) -> Result<Arc<dyn Provider>> {
    let options: CandleOptions = config.options()?;
    requantize(&options)?;
    Ok(Arc::new(CandleProvider { options }))
}

/// `provider.options.requantize` as what the llama loader takes.
fn requantize(options: &CandleOptions) -> Result<llama::Weights> {
    use candle_core::quantized::GgmlDType;
    use llama::Weights;
    match options.requantize.as_str() {
        "auto" if cpu::int8::QDense::fast() => Ok(Weights::Auto),
        "auto" | "q8_0" => Ok(Weights::Ggml(GgmlDType::Q8_0)),
        "int8" => Ok(Weights::Int8),
        "none" => Ok(Weights::File),
        "q4_0" => Ok(Weights::Ggml(GgmlDType::Q4_0)),
        "q4k" | "q4_k" => Ok(Weights::Ggml(GgmlDType::Q4K)),
        "f32" => Ok(Weights::Ggml(GgmlDType::F32)),
        "f16" => Ok(Weights::Ggml(GgmlDType::F16)),
        other => Err(Error::Config(vec![kiln_core::ConfigIssue::new(
            "provider.options.requantize",
            other,
            "\"auto\", \"int8\", \"q8_0\", \"q4_0\", \"q4_k\", \"f16\", \"f32\" or \"none\"",
        )])),
    }
}

fn backend(e: candle_core::Error) -> Error {
    Error::backend(NAME, e)
}

fn candle_device(device: Device) -> Result<CDevice> {
    match device {
        Device::Cpu => Ok(CDevice::Cpu),
        #[cfg(feature = "cuda")]
        Device::Cuda(n) => CDevice::new_cuda(n).map_err(|e| {
            Error::Unsupported(format!(
                "provider `candle` cannot open cuda:{n}: {}",
                first_line(&e.to_string())
            ))
        }),
        #[cfg(feature = "cuda")]
        other => Err(Error::Unsupported(format!("provider `candle` runs on cpu or cuda:N, not {other}"))),
        #[cfg(not(feature = "cuda"))]
        other => Err(Error::Unsupported(format!(
            "provider `candle` in this build runs on cpu only, not {other}; CUDA support comes with the \
             `candle-cuda` feature"
        ))),
    }
}

/// candle's CUDA errors carry a backtrace after the first line.
#[cfg(feature = "cuda")]
fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

/// Whether this build can run on a GPU here: built with `cuda` and cuda:0 opens.
fn cuda_available() -> bool {
    #[cfg(feature = "cuda")]
    {
        static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *AVAILABLE.get_or_init(|| CDevice::new_cuda(0).is_ok())
    }
    #[cfg(not(feature = "cuda"))]
    false
}

fn candle_dtype(dtype: DType) -> Result<CDType> {
    match dtype {
        DType::F32 => Ok(CDType::F32),
        DType::F16 => Ok(CDType::F16),
        DType::BF16 => Ok(CDType::BF16),
        other => {
            Err(Error::Unsupported(format!("provider `candle` runs models in f32, f16 or bf16, not {other}")))
        }
    }
}

#[async_trait]
impl Provider for CandleProvider {
    fn name(&self) -> &str {
        NAME
    }

    fn capabilities(&self) -> Capabilities {
        let mut caps = Capabilities {
            formats: vec![
                "Hugging Face BERT folder (config.json + model.safetensors)".into(),
                "GGUF llama-architecture decoder (task = \"generate\"; cpu, and cuda:N dequantized)".into(),
                "Qwen2.5-VL checkpoint folder (task = \"generate\" with images, cpu, f32)".into(),
            ],
            quantization: vec![Quantization::Int8],
            ..Capabilities::cpu_only(vec![DType::F32, DType::F16, DType::BF16])
        };
        let level = cpu::isa::active();
        caps.notes.push(format!(
            "int8: on the CPU at f32 (per-channel weights, per-token activations); {}",
            if level >= cpu::isa::Isa::Amx {
                format!("AMX tiles from {} rows a call (prompts, batches), VNNI below", cpu::int8::AMX_ROWS)
            } else if level >= cpu::isa::Isa::Avx512Vnni {
                "AVX-512 VNNI kernel".into()
            } else {
                "no VNNI here: plain kernel".into()
            }
        ));
        caps.notes.push(format!(
            "bf16: on the CPU, bf16 products summed in f32 ({}); CPU kernels: {}",
            if cpu::isa::active() >= cpu::isa::Isa::Amx { "AMX tiles" } else { "no AMX here: plain kernel" },
            cpu::isa::active()
        ));
        if cuda_available() {
            caps.devices.push(kiln_core::DeviceKind::Cuda);
        } else if cfg!(feature = "cuda") {
            caps.notes.push("CUDA: cuda:0 does not open here (no GPU or driver)".into());
        } else {
            caps.notes.push("CUDA support comes with the `candle-cuda` feature".into());
        }
        caps
    }

    /// Weights at the model's dtype, from the safetensors headers, plus 10% for
    /// activations and buffers. Only headers are read. A GGUF file (generation): its
    /// tensors as `provider.options.requantize` turns them on the CPU
    /// (`llama::estimate_bytes`), or dequantized to the model's dtype on a GPU
    /// (`dense_llama::estimate_bytes`), from the header.
    fn estimate_memory(&self, spec: &ModelSpec) -> Result<Option<u64>> {
        if spec.path.is_file() && spec.path.extension().is_some_and(|e| e == "gguf") {
            if spec.device != Device::Cpu {
                return Ok(dense_llama::estimate_bytes(&spec.path, candle_dtype(spec.dtype)?));
            }
            return Ok(llama::estimate_bytes(&spec.path, requantize(&self.options)?));
        }
        if spec.path.is_dir() && qwen2vl_folder(&spec.path) {
            let bf16 = spec.dtype == DType::BF16 && spec.quantization == Quantization::None;
            let bytes = qwen2vl_bytes(&spec.path, spec.device == Device::Cpu, bf16)?;
            return Ok(Some(bytes + bytes / 10));
        }
        // An incomplete folder gets no estimate: load() reports what is wrong with it,
        // checking in the order a user would fix things.
        if !spec.path.join("config.json").is_file() {
            return Ok(None);
        }
        let Ok(files) = weight_files(&spec.path) else {
            return Ok(None);
        };
        let bytes = match (spec.device, spec.dtype, spec.quantization) {
            // The packed bf16 kernels keep embeddings and norms in f32 (see `load`).
            (Device::Cpu, DType::BF16, Quantization::None) if self.options.cpu_kernels => {
                weight_bytes(&files, DType::F32, Some(2.0))?
            }
            (_, dtype, quantization) => {
                weight_bytes(&files, dtype, (quantization == Quantization::Int8).then_some(1.0))?
            }
        };
        Ok(Some(bytes + bytes / 10))
    }

    /// llama-architecture GGUF files: quantized on the CPU (`llama.rs`), dequantized to
    /// the model's dtype on a GPU (`dense_llama/`). Qwen2.5-VL
    /// checkpoint folders (vision-language; f32, bf16/f16, or mlx-community's quantized
    /// layers kept packed), on the CPU; see `qwen2vl/`.
    async fn load_generator(&self, spec: &ModelSpec) -> Result<Arc<dyn kiln_core::Generator>> {
        if spec.device != Device::Cpu {
            if spec.path.is_dir() && qwen2vl_folder(&spec.path) {
                return Err(Error::Unsupported(format!(
                    "provider `candle` runs Qwen2.5-VL checkpoints on the cpu only so far, not {} (provider `mlx` \
                     runs them on a GPU)",
                    spec.device
                )));
            }
            if !spec.path.is_file() {
                return Err(Error::model_load(&spec.path, "no such GGUF file"));
            }
            if spec.quantization != Quantization::None {
                return Err(Error::Unsupported(format!(
                    "provider `candle` on {} dequantizes a GGUF file's matrices to model.dtype at load; \
                     model.quantization = \"{}\" is not taken there",
                    spec.device, spec.quantization
                )));
            }
            let device = candle_device(spec.device)?;
            let dtype = candle_dtype(spec.dtype)?;
            let kernels = self.options.cuda_kernels;
            let mut llama = dense_llama::DenseLlama::load(&spec.path, &device, dtype, spec.device, kernels)?;
            llama.greedy_on_device = self.options.greedy_on_device;
            return Ok(Arc::new(llama));
        }
        if spec.path.is_dir() && qwen2vl_folder(&spec.path) {
            if !matches!(spec.quantization, Quantization::None | Quantization::Int8) {
                return Err(Error::Unsupported(format!(
                    "provider `candle` runs Qwen2.5-VL checkpoints at the precision they are stored in (f32, bf16, \
                     f16, or mlx-community's packed bits), or with model.quantization = \"int8\" their 4-bit layers \
                     with int8 activations; {} is not taken for them",
                    spec.quantization
                )));
            }
            let arithmetic = match (spec.quantization, spec.dtype) {
                (Quantization::Int8, _) => qwen2vl::Arithmetic::Int8Activations,
                (_, DType::BF16) => qwen2vl::Arithmetic::Bf16,
                (_, DType::F32) => qwen2vl::Arithmetic::AsStored,
                (_, other) => {
                    return Err(Error::Unsupported(format!(
                        "provider `candle` computes Qwen2.5-VL in f32 (weights as stored) or bf16 (AMX tiles where \
                         the CPU has them); model.dtype = \"{other}\" is not taken"
                    )));
                }
            };
            let bytes = qwen2vl_bytes(&spec.path, true, arithmetic == qwen2vl::Arithmetic::Bf16)?;
            return Ok(Arc::new(qwen2vl::QwenVlGenerator::load_with(&spec.path, bytes, arithmetic)?));
        }
        if !spec.path.is_file() {
            return Err(Error::model_load(
                &spec.path,
                if spec.path.exists() {
                    "not a GGUF file nor a Qwen2.5-VL checkpoint folder; candle generates from those"
                } else {
                    "no such file"
                },
            ));
        }
        Ok(Arc::new(llama::Llama::load(&spec.path, requantize(&self.options)?)?))
    }

    async fn load(&self, spec: &ModelSpec) -> Result<Arc<dyn Model>> {
        let dir = &spec.path;
        let device = candle_device(spec.device)?;
        let dtype = candle_dtype(spec.dtype)?;
        if !dir.exists() {
            return Err(Error::model_load(dir, "no such folder (run `scripts/setup` for the default model)"));
        }
        if !dir.is_dir() {
            return Err(Error::model_load(
                dir,
                "not a folder; candle loads Hugging Face folders (config.json + model.safetensors)",
            ));
        }
        let config: BertConfig = bert_config(dir, NAME)?;
        let files = weight_files(dir)?;
        let int8 = spec.quantization == Quantization::Int8;
        // Why the packed CPU kernels do not take this load, if they do not.
        let not_packed = if spec.device != Device::Cpu || !matches!(spec.dtype, DType::F32 | DType::BF16) {
            Some("they run f32 or bf16 on the cpu")
        } else if !self.options.cpu_kernels {
            Some("provider.options.cpu_kernels = false")
        } else {
            cpu::unsupported(&config)
        };
        let not_int8 = match not_packed {
            Some(why) => Some(why),
            None if spec.dtype != DType::F32 => Some("int8 quantizes f32 weights"),
            None => None,
        };
        if let (true, Some(why)) = (int8, not_int8) {
            return Err(Error::Unsupported(format!(
                "provider `candle` runs int8 (model.quantization) with its CPU kernels only: device cpu, dtype f32, \
                 cpu_kernels on, a BERT with exact gelu; not {} {} ({why})",
                spec.device, spec.dtype
            )));
        }
        let precision = match (int8, spec.dtype) {
            (true, _) => cpu::Precision::Int8,
            (false, DType::BF16) => cpu::Precision::Bf16,
            _ => cpu::Precision::F32,
        };
        // The packed kernels read f32 and lay the encoder's matrices out in their own
        // precision; embeddings and norms stay f32.
        let (dtype, weight_bytes) = match (not_packed, precision) {
            (Some(_), _) => (dtype, weight_bytes(&files, spec.dtype, None)?),
            (None, cpu::Precision::F32) => (CDType::F32, weight_bytes(&files, DType::F32, None)?),
            (None, cpu::Precision::Bf16) => (CDType::F32, weight_bytes(&files, DType::F32, Some(2.0))?),
            (None, cpu::Precision::Int8) => (CDType::F32, weight_bytes(&files, DType::F32, Some(1.0))?),
        };

        // SAFETY: the files are memory-mapped read-only; kiln does not modify model files
        // while they are loaded, and candle copies what it converts.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, dtype, &device) }
            .map_err(|e| Error::model_load_with(dir, "cannot read weights", e))?;
        let mismatch = |e| Error::model_load_with(dir, "weights do not match a BERT model", e);
        let model = if not_packed.is_none() {
            Graph::Cpu(cpu::CpuBert::load(&vb, &config, precision).map_err(mismatch)?)
        } else {
            #[cfg(feature = "cuda")]
            if spec.device != Device::Cpu
                && self.options.cuda_kernels
                && cuda::CudaBert::unsupported(&config).is_none()
            {
                Graph::Cuda(
                    cuda::CudaBert::load(
                        &vb,
                        &config,
                        self.options.overlap_batches,
                        self.options.fused_attention,
                    )
                    .map_err(mismatch)?,
                )
            } else {
                Graph::Candle(Bert::load(vb, &config, dtype).map_err(mismatch)?)
            }
            #[cfg(not(feature = "cuda"))]
            Graph::Candle(Bert::load(vb, &config, dtype).map_err(mismatch)?)
        };

        let info = bert_model_info(
            spec,
            NAME,
            output_dtype(spec.dtype),
            config.hidden_size,
            config.max_position_embeddings,
            weight_bytes,
        );
        let model = BertEncoder { model, device, info };
        probe_encoder(&model, NAME, spec)?;
        Ok(Arc::new(model))
    }
}

/// BERT: embeddings (ours) and candle-transformers' encoder stack.
///
/// candle-transformers' `BertModel` builds the additive attention mask as
/// `(1 - mask) * f32::MIN` cast to the model dtype; in f16 that is `-inf`, and
/// `0 * -inf` is NaN for every real token. Like Hugging Face, we use the dtype's
/// finite minimum, so f16 and bf16 work.
struct Bert {
    embeddings: Embeddings,
    encoder: CandleBertEncoder,
    dtype: CDType,
}

struct Embeddings {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    norm: LayerNorm,
}

impl Bert {
    fn load(vb: VarBuilder, config: &BertConfig, dtype: CDType) -> candle_core::Result<Self> {
        let load_at = |vb: VarBuilder| -> candle_core::Result<(Embeddings, CandleBertEncoder)> {
            let e = vb.pp("embeddings");
            let h = config.hidden_size;
            let embeddings = Embeddings {
                word: candle_nn::embedding(config.vocab_size, h, e.pp("word_embeddings"))?,
                position: candle_nn::embedding(
                    config.max_position_embeddings,
                    h,
                    e.pp("position_embeddings"),
                )?,
                token_type: candle_nn::embedding(config.type_vocab_size, h, e.pp("token_type_embeddings"))?,
                norm: candle_nn::layer_norm(h, config.layer_norm_eps, e.pp("LayerNorm"))?,
            };
            Ok((embeddings, CandleBertEncoder::load(vb.pp("encoder"), config)?))
        };
        let (embeddings, encoder) = weights::at_bert_root(&vb, |vb| load_at(vb.clone()))?;
        Ok(Bert { embeddings, encoder, dtype })
    }

    fn forward(&self, ids: &CTensor, types: &CTensor, mask: &CTensor) -> candle_core::Result<CTensor> {
        let (_, sequence) = ids.dims2()?;
        let positions = CTensor::arange(0u32, sequence as u32, ids.device())?;
        let e = &self.embeddings;
        let x = (e.word.forward(ids)? + e.token_type.forward(types)?)?
            .broadcast_add(&e.position.forward(&positions)?)?;
        let x = e.norm.forward(&x)?;
        let min = match self.dtype {
            CDType::F16 => f64::from(half::f16::MIN),
            CDType::BF16 => f64::from(half::bf16::MIN),
            _ => f64::from(f32::MIN),
        };
        // [batch, sequence] of 1/0 -> additive [batch, 1, 1, sequence] of 0/min.
        let additive = mask
            .to_dtype(CDType::F32)?
            .affine(-min, min)?
            .to_dtype(self.dtype)?
            .unsqueeze(1)?
            .unsqueeze(1)?;
        self.encoder.forward(&x, &additive)
    }
}

/// Which implementation runs the model.
enum Graph {
    /// candle-transformers' encoder (GPUs, f16/bf16, `cpu_kernels = false`).
    Candle(Bert),
    /// kiln's packed kernels (f32, bf16 or int8 on the CPU).
    Cpu(cpu::CpuBert),
    /// kiln's CUDA kernels between cuBLAS's products (GPUs, `cuda_kernels`).
    #[cfg(feature = "cuda")]
    Cuda(cuda::CudaBert),
}

/// A BERT encoder loaded by candle.
struct BertEncoder {
    model: Graph,
    device: CDevice,
    info: ModelInfo,
}

impl BertEncoder {
    fn tensor(&self, inputs: &Inputs, name: &str) -> Result<CTensor> {
        let t = inputs.require(name)?;
        CTensor::from_vec(t.to_vec::<i64>()?, t.shape(), &self.device).map_err(backend)
    }

    fn run_packed(&self, model: &cpu::CpuBert, inputs: &Inputs) -> Result<Outputs> {
        let ids = inputs.require("input_ids")?;
        let &[batch, sequence] = ids.shape() else {
            return Err(Error::InvalidInput(format!(
                "input_ids has shape {:?}; expected [batch, sequence]",
                ids.shape()
            )));
        };
        let [ids, mask, types] = ["input_ids", "attention_mask", "token_type_ids"].map(|name| {
            let t = inputs.require(name)?;
            if t.shape() != [batch, sequence] {
                return Err(Error::InvalidInput(format!(
                    "{name} has shape {:?}; input_ids has [{batch}, {sequence}]",
                    t.shape()
                )));
            }
            t.to_vec::<i64>()
        });
        let packed = model.forward(&ids?, &types?, &mask?, batch, sequence)?;
        let hidden = packed.width();
        Ok(match self.info.head {
            Some(head) => Outputs::new()
                .with(SENTENCE_EMBEDDING, Tensor::from_vec(vec![batch, hidden], packed.pooled(head))?),
            None => Outputs::new()
                .with(LAST_HIDDEN_STATE, Tensor::from_vec(vec![batch, sequence, hidden], packed.unpacked())?),
        })
    }
}

impl Model for BertEncoder {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn run(&self, inputs: &Inputs) -> Result<Outputs> {
        let model = match &self.model {
            Graph::Candle(model) => model,
            Graph::Cpu(model) => return self.run_packed(model, inputs),
            #[cfg(feature = "cuda")]
            Graph::Cuda(model) => return self.run_cuda(model, inputs),
        };
        let ids = self.tensor(inputs, "input_ids")?;
        let mask = self.tensor(inputs, "attention_mask")?;
        let types = self.tensor(inputs, "token_type_ids")?;
        let hidden = model.forward(&ids, &types, &mask).map_err(backend)?;
        if let Some(head) = self.info.head {
            let pooled = pool(&hidden, &mask, head).map_err(backend)?;
            let shape = pooled.dims().to_vec();
            let values = pooled
                .to_device(&CDevice::Cpu)
                .and_then(|p| p.flatten_all()?.to_vec1::<f32>())
                .map_err(backend)?;
            return Ok(Outputs::new().with(SENTENCE_EMBEDDING, Tensor::from_vec(shape, values)?));
        }
        let shape = hidden.dims().to_vec();
        let host = |h: CTensor| h.to_device(&CDevice::Cpu).and_then(|h| h.flatten_all());
        let tensor = if output_dtype(self.info.dtype) == DType::F16 {
            let values = host(hidden).and_then(|h| h.to_vec1::<half::f16>()).map_err(backend)?;
            Tensor::from_vec(shape, values)?
        } else {
            let values = hidden
                .to_dtype(CDType::F32)
                .and_then(host)
                .and_then(|h| h.to_vec1::<f32>())
                .map_err(backend)?;
            Tensor::from_vec(shape, values)?
        };
        Ok(Outputs::new().with(LAST_HIDDEN_STATE, tensor))
    }

    /// On a GPU with kiln's kernels, a batch with an embedding head is queued and its
    /// result waited for on the responder thread (`cuda::BertEncoder::start_cuda`);
    /// everything else runs as [`run`](Self::run).
    fn start(&self, inputs: &Inputs) -> Result<kiln_core::Pending> {
        match &self.model {
            #[cfg(feature = "cuda")]
            Graph::Cuda(model) => self.start_cuda(model, inputs),
            _ => self.run(inputs).map(kiln_core::Pending::ready),
        }
    }
}

/// The embedding head on the device, in f32: `[batch, sequence, hidden]` token vectors
/// and the `[batch, sequence]` attention mask to `[batch, hidden]`, with the arithmetic
/// of [`kiln_core::pool_tokens`].
fn pool(hidden: &CTensor, mask: &CTensor, head: EmbeddingHead) -> candle_core::Result<CTensor> {
    let hidden = hidden.to_dtype(CDType::F32)?;
    let mask = mask.to_dtype(CDType::F32)?.unsqueeze(2)?; // [batch, sequence, 1]
    let pooled = match head.pooling {
        Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?,
        Pooling::Mean | Pooling::MeanSqrtLen => {
            let sum = hidden.broadcast_mul(&mask)?.sum(1)?;
            let count = mask.sum(1)?.clamp(1e-9f32, f32::MAX)?;
            let count = if head.pooling == Pooling::Mean { count } else { count.sqrt()? };
            sum.broadcast_div(&count)?
        }
        Pooling::Max => {
            // Padding gets the lowest value, so it never wins; a text of no real tokens
            // gets zeros, as on the host.
            let lowest = ((mask.ones_like()? - &mask)? * f64::from(f32::MIN))?;
            let max = hidden.broadcast_add(&lowest)?.max(1)?;
            let any = mask.max(1)?; // [batch, 1]: 1 if the text has a real token
            max.broadcast_mul(&any)?
        }
    };
    if !head.normalize {
        return Ok(pooled);
    }
    let norm = pooled.sqr()?.sum_keepdim(1)?.sqrt()?.clamp(1e-12f32, f32::MAX)?;
    pooled.broadcast_div(&norm)
}

/// What `last_hidden_state` leaves the model as: f16 stays f16 (half the bytes off a
/// GPU); bf16 widens to f32 on the device.
fn output_dtype(dtype: DType) -> DType {
    if dtype == DType::F16 { DType::F16 } else { DType::F32 }
}

kiln_core::register_provider!(
    NAME,
    if cfg!(feature = "cuda") {
        "candle: BERT-family encoders from Hugging Face folders (cpu, cuda:N)"
    } else {
        "candle: BERT-family encoders from Hugging Face folders (cpu)"
    },
    build
);

#[cfg(test)]
mod tests;
