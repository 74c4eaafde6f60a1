//! The [`Provider`] trait: how a backend is chosen, what it can do, and how it loads
//! models ([`Model`], in `model.rs`).
//!
//! # Design
//!
//! A *provider* is a backend (candle, ONNX Runtime, libtorch, or one of yours). It is
//! built once from its config section by a plain constructor function registered with
//! [`register_provider!`](crate::register_provider), and it loads *models* from a
//! [`ModelSpec`] (where from, on which device, at which precision and quantization). What
//! it cannot do at all it says in [`Capabilities`], which the runtime checks before it
//! asks for a load, so a provider's `load` need not refuse a device or dtype itself.
//!
//! The trait is object safe; the runtime holds `Arc<dyn Provider>`.

use std::path::PathBuf;
use std::sync::Arc;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::config::ProviderConfig;
use crate::device::{Device, DeviceKind};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::pooling::EmbeddingHead;
use crate::registry::Registry;
use crate::tensor::DType;

/// A backend that loads models.
///
/// ```
/// use std::sync::Arc;
/// use kiln_core::{async_trait, Capabilities, Device, DType, Inputs, Model, ModelInfo,
///                 ModelSpec, Outputs, Provider, Result};
///
/// /// A provider whose models return their inputs.
/// struct Echo;
/// struct EchoModel(ModelInfo);
///
/// impl Model for EchoModel {
///     fn info(&self) -> &ModelInfo { &self.0 }
///     fn run(&self, inputs: &Inputs) -> Result<Outputs> { Ok(inputs.clone()) }
/// }
///
/// #[async_trait]
/// impl Provider for Echo {
///     fn name(&self) -> &str { "echo" }
///     fn capabilities(&self) -> Capabilities {
///         Capabilities::cpu_only(vec![DType::F32])
///     }
///     async fn load(&self, spec: &ModelSpec) -> Result<Arc<dyn Model>> {
///         Ok(Arc::new(EchoModel(ModelInfo::new("echo", "echo", spec.device, spec.dtype))))
///     }
/// }
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let provider: Arc<dyn Provider> = Arc::new(Echo);
/// let model = provider.load(&ModelSpec::new("unused", Device::Cpu, DType::F32)).await?;
/// assert_eq!(model.info().provider, "echo");
/// # Ok::<(), kiln_core::Error>(()) }).unwrap();
/// ```
#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// The name it is registered under.
    fn name(&self) -> &str;

    /// What this provider can do in this build (devices, dtypes, formats).
    fn capabilities(&self) -> Capabilities;

    /// Loads the model `spec` describes. May take seconds; kiln calls it on the model's
    /// own worker thread.
    async fn load(&self, spec: &ModelSpec) -> Result<Arc<dyn Model>>;

    /// Bytes the model will take on its device once loaded, estimated without loading
    /// it (from file headers, say), so kiln can refuse a model that does not fit before
    /// spending the memory. `None`: no estimate; the model is loaded unchecked.
    fn estimate_memory(&self, _spec: &ModelSpec) -> Result<Option<u64>> {
        Ok(None)
    }

    /// What the backend's own allocator holds now, for backends that keep one (MLX
    /// reports its active, peak and cached bytes); `None` for the rest. The runtime's
    /// memory governor reads it with each of its samples (`stats().memory`).
    fn allocator_memory(&self) -> Option<AllocatorMemory> {
        None
    }

    /// Loads a model that generates (`task = "generate"`), see [`crate::generate`]. The
    /// default: this provider does not generate.
    async fn load_generator(&self, spec: &ModelSpec) -> Result<Arc<dyn crate::Generator>> {
        Err(crate::Error::Unsupported(format!(
            "provider `{}` does not generate (task = \"generate\"); {} is not loaded",
            self.name(),
            spec.path.display()
        )))
    }

    /// Returns the buffers the backend's allocator keeps cached for reuse to the system;
    /// the memory governor calls it under memory pressure, before it unloads idle
    /// models. Returns the bytes released. The default has nothing to release.
    fn release_cached_memory(&self) -> u64 {
        0
    }
}

/// A backend allocator's own figures, in bytes ([`Provider::allocator_memory`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocatorMemory {
    /// In live tensors.
    pub active: u64,
    /// The highest `active` seen.
    pub peak: u64,
    /// Freed buffers kept for reuse; [`Provider::release_cached_memory`] returns them.
    pub cached: u64,
}

/// What to load: where from, on which device, at which precision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// A model file or folder (an HF-style folder for BERT models).
    pub path: PathBuf,
    /// Where to run it.
    pub device: Device,
    /// Weight and compute precision.
    pub dtype: DType,
    /// For text embedding models: the pooling (and normalisation) the runtime wants
    /// applied inside the model run, so only `[batch, hidden]` leaves the device. A
    /// provider that applies it says so in [`ModelInfo::head`]; one that does not keeps
    /// returning token vectors, and the runtime pools them. See [`crate::pooling`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<EmbeddingHead>,
    /// Weight quantization, a precision choice beside `dtype` (`model.quantization`).
    #[serde(default)]
    pub quantization: Quantization,
}

/// How a model's weights are quantized: `model.quantization`. A choice of precision
/// like `dtype` (which stays the precision of what is not quantized): providers list
/// what they take in [`Capabilities::quantization`], and a load asks for one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quantization {
    /// Weights at `dtype`.
    #[default]
    None,
    /// 8-bit integer weights; what that means in detail is the provider's (candle:
    /// per output channel with activations quantized at run time; ort: ONNX Runtime's
    /// dynamic quantization, the model's `model_int8.onnx`; mlx: groupwise affine).
    Int8,
    /// 4-bit integer weights (mlx: groupwise affine, a scale and a bias per group).
    Int4,
}

impl std::fmt::Display for Quantization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Quantization::None => "none",
            Quantization::Int8 => "int8",
            Quantization::Int4 => "int4",
        })
    }
}

impl ModelSpec {
    /// A spec from its parts, with no embedding head.
    pub fn new(path: impl Into<PathBuf>, device: Device, dtype: DType) -> Self {
        ModelSpec { path: path.into(), device, dtype, head: None, quantization: Quantization::None }
    }

    /// The same spec with quantized weights.
    pub fn with_quantization(mut self, quantization: Quantization) -> Self {
        self.quantization = quantization;
        self
    }

    /// The same spec asking for an embedding head.
    pub fn with_head(mut self, head: EmbeddingHead) -> Self {
        self.head = Some(head);
        self
    }
}

/// What a provider supports in this build.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Device families it can run on.
    pub devices: Vec<DeviceKind>,
    /// Precisions it accepts for models.
    pub dtypes: Vec<DType>,
    /// Quantization schemes it loads besides unquantized weights (empty: none).
    pub quantization: Vec<Quantization>,
    /// Model formats it loads, in words ("HF BERT folder (safetensors)").
    pub formats: Vec<String>,
    /// Largest batch, if the backend limits it.
    pub max_batch_size: Option<usize>,
    /// Why something the provider can do elsewhere is missing here ("CUDA: this build
    /// has no `candle-cuda` feature"); quoted when a load is refused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

impl Capabilities {
    /// Whether a model may be loaded on `device` at `dtype`, checked before any loading:
    /// the error names what the provider accepts.
    pub fn check(&self, provider: &str, device: Device, dtype: DType) -> Result<()> {
        if !self.devices.contains(&device.kind()) {
            let accepted: Vec<String> = self.devices.iter().map(|d| d.to_string()).collect();
            let why =
                if self.notes.is_empty() { String::new() } else { format!(" ({})", self.notes.join("; ")) };
            return Err(Error::Unsupported(format!(
                "provider `{provider}` in this build runs on {}, not {device}{why}",
                accepted.join(", ")
            )));
        }
        if !self.dtypes.contains(&dtype) {
            let accepted: Vec<String> = self.dtypes.iter().map(|d| d.to_string()).collect();
            return Err(Error::Unsupported(format!(
                "provider `{provider}` runs models in {}, not {dtype}",
                accepted.join(", ")
            )));
        }
        Ok(())
    }

    /// Whether the provider loads weights quantized as `quantization`; the error names
    /// what it takes.
    pub fn check_quantization(&self, provider: &str, quantization: Quantization) -> Result<()> {
        if quantization == Quantization::None || self.quantization.contains(&quantization) {
            return Ok(());
        }
        let accepted: Vec<String> = std::iter::once(Quantization::None)
            .chain(self.quantization.iter().copied())
            .map(|q| q.to_string())
            .collect();
        Err(Error::Unsupported(format!(
            "provider `{provider}` loads model.quantization {}, not {quantization}",
            accepted.join(", ")
        )))
    }

    /// CPU only, the given dtypes, nothing else declared.
    pub fn cpu_only(dtypes: Vec<DType>) -> Self {
        Capabilities {
            devices: vec![DeviceKind::Cpu],
            dtypes,
            quantization: Vec::new(),
            formats: Vec::new(),
            max_batch_size: None,
            notes: Vec::new(),
        }
    }
}

crate::plugin_kind!(
    /// A provider's entry in the registry: `provider.name` chooses it; `build` gets the
    /// `[provider]` section.
    ProviderRegistration,
    "provider",
    ProviderConfig,
    Arc<dyn Provider>
);

/// Every provider linked into this binary.
pub fn providers() -> Result<Registry<ProviderRegistration>> {
    Registry::collect(inventory::iter::<ProviderRegistration>)
}

/// Builds the provider a config names.
pub fn build_provider(config: &ProviderConfig) -> Result<Arc<dyn Provider>> {
    (providers()?.get(&config.name)?.build)(config)
}

/// Registers a provider under a name: one line at the end of a provider crate.
///
/// ```
/// use std::sync::Arc;
/// use kiln_core::{async_trait, Capabilities, DType, Error, Model, ModelSpec, Provider,
///                 ProviderConfig, Result};
///
/// struct Mine;
/// #[async_trait]
/// impl Provider for Mine {
///     fn name(&self) -> &str { "mine" }
///     fn capabilities(&self) -> Capabilities { Capabilities::cpu_only(vec![DType::F32]) }
///     async fn load(&self, spec: &ModelSpec) -> Result<Arc<dyn Model>> {
///         Err(Error::model_load(&spec.path, "this example loads nothing"))
///     }
/// }
///
/// fn build(_config: &ProviderConfig) -> Result<Arc<dyn Provider>> {
///     Ok(Arc::new(Mine))
/// }
///
/// kiln_core::register_provider!("mine", "an example provider", build);
///
/// assert!(kiln_core::providers()?.names().contains(&"mine"));
/// # Ok::<(), kiln_core::Error>(())
/// ```
///
/// `build` is a `fn(&ProviderConfig) -> Result<Arc<dyn Provider>>`; it runs only when a
/// config chooses this provider. A crate that only registers plugins must be linked
/// (`use kiln_provider_x as _;`) for its registration to be seen.
#[macro_export]
macro_rules! register_provider {
    ($name:expr, $description:expr, $build:expr $(,)?) => {
        $crate::__private::inventory::submit! {
            $crate::ProviderRegistration::new($name, $description, $build)
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nothing;
    #[async_trait]
    impl Provider for Nothing {
        fn name(&self) -> &str {
            "nothing"
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities::cpu_only(vec![DType::F32])
        }
        async fn load(&self, spec: &ModelSpec) -> Result<Arc<dyn Model>> {
            Err(Error::model_load(&spec.path, "nothing loads"))
        }
    }

    #[test]
    fn a_quantization_the_provider_does_not_list_is_refused_naming_what_it_takes() {
        let caps = Capabilities::cpu_only(vec![DType::F32]);
        caps.check_quantization("nothing", Quantization::None).unwrap();
        let e = caps.check_quantization("nothing", Quantization::Int8).unwrap_err().to_string();
        assert!(e.contains("provider `nothing` loads model.quantization none, not int8"), "{e}");
        let caps = Capabilities { quantization: vec![Quantization::Int8], ..caps };
        caps.check_quantization("nothing", Quantization::Int8).unwrap();

        let config = crate::KilnConfig::load(None, &["model.quantization=\"int8\"".into()]).unwrap();
        assert_eq!(config.model.quantization, Quantization::Int8);
        let e =
            crate::KilnConfig::load(None, &["model.quantization=\"int3\"".into()]).unwrap_err().to_string();
        assert!(e.contains("model.quantization") && e.contains("int3") && e.contains("int8, int4"), "{e}");
    }

    #[test]
    fn provider_and_model_are_object_safe() {
        let _provider: Arc<dyn Provider> = Arc::new(Nothing);
        let _model: Option<Arc<dyn Model>> = None;
    }
}
