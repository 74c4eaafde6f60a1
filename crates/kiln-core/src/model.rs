//! The [`Model`] trait: a loaded model that runs one batch at a time, and [`ModelInfo`],
//! what it takes and gives.
//!
//! # Design
//!
//! A model runs one batch at a time, synchronously: `run` blocks, and the runtime calls
//! it from a thread of its own, never from an async executor, so a backend needs no
//! async code and no knowledge of batching, retries or caching — the runtime wraps
//! those around it. A GPU backend may also [`start`](Model::start) a batch and return
//! before its outputs are ready ([`Pending`]).
//!
//! Inputs and outputs are backend-neutral [`Tensor`](crate::Tensor)s by name. A model
//! describes what it expects in [`ModelInfo`]; the runtime's worker checks every request
//! against that ([`ModelInfo::validate`]) before the model sees it, so every provider
//! rejects bad input with the same clear message.
//!
//! The trait is object safe; the runtime holds `Arc<dyn Model>`.

use serde::{Deserialize, Serialize};

use crate::device::Device;
use crate::error::{Error, Result};
use crate::pooling::{EmbeddingHead, HeadSite, SENTENCE_EMBEDDING};
use crate::tensor::{DType, Inputs, Outputs, TensorSpec};

/// A loaded model: runs one batch at a time, blocking.
///
/// See the [`Provider`] example for an implementation.
pub trait Model: Send + Sync + 'static {
    /// What the model expects and produces.
    fn info(&self) -> &ModelInfo;

    /// Runs one batch. Blocking: the runtime calls it from its own worker thread.
    ///
    /// The runtime's worker checks every request against [`ModelInfo::inputs`]
    /// ([`ModelInfo::validate`]: names, dtypes, ranks, fixed dims) before it reaches
    /// `run` or [`start`](Self::start), so a model that declares its inputs need not check
    /// them again; a panic here is contained by the worker and becomes the batch's error.
    fn run(&self, inputs: &Inputs) -> Result<Outputs>;

    /// Starts one batch and returns before its outputs are ready, where the backend
    /// can: a GPU provider queues the batch's copies and kernels and returns a
    /// [`Pending`] that waits for the result. The runtime waits on it from another
    /// thread and meanwhile starts the next batch, so the device never idles between
    /// batches while the host copies a result back and launches the next one's work.
    ///
    /// Errors the inputs cause should come from here, not from [`Pending::wait`]: a
    /// shared batch that fails is retried item by item so only the culprit fails.
    /// The default runs the batch ([`run`](Self::run)) and returns its outputs ready.
    fn start(&self, inputs: &Inputs) -> Result<Pending> {
        self.run(inputs).map(Pending::ready)
    }
}

/// A batch [`Model::start`]ed: its outputs, now or once the device is done.
pub struct Pending(PendingState);

enum PendingState {
    Ready(Outputs),
    Later(Box<dyn FnOnce() -> Result<Outputs> + Send>),
}

impl Pending {
    /// Outputs that are already there.
    pub fn ready(outputs: Outputs) -> Self {
        Pending(PendingState::Ready(outputs))
    }

    /// Outputs that `wait` will produce, blocking until the device has them. It runs
    /// on another thread than the one that started the batch.
    pub fn later(wait: impl FnOnce() -> Result<Outputs> + Send + 'static) -> Self {
        Pending(PendingState::Later(Box::new(wait)))
    }

    /// Blocks until the outputs are there.
    pub fn wait(self) -> Result<Outputs> {
        match self.0 {
            PendingState::Ready(outputs) => Ok(outputs),
            PendingState::Later(wait) => wait(),
        }
    }
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            PendingState::Ready(_) => "Pending(ready)",
            PendingState::Later(_) => "Pending(on the device)",
        })
    }
}

/// What a loaded model expects and produces.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// The model's name (folder or file name).
    pub name: String,
    /// The provider that loaded it.
    pub provider: String,
    /// The device it runs on.
    pub device: Device,
    /// Its precision.
    pub dtype: DType,
    /// Inputs it accepts. Inputs it lists are required; others are rejected.
    pub inputs: Vec<TensorSpec>,
    /// Outputs it produces.
    pub outputs: Vec<TensorSpec>,
    /// Bytes of weights held, when known.
    pub weight_bytes: Option<u64>,
    /// Largest batch it accepts, if limited.
    pub max_batch_size: Option<usize>,
    /// Longest sequence it accepts (position embeddings), for text models.
    pub max_sequence_length: Option<usize>,
    /// The embedding head the model applies inside its run (the one
    /// [`ModelSpec::head`](crate::ModelSpec::head) asked for): its output is then [`SENTENCE_EMBEDDING`],
    /// f32 `[batch, hidden]`. `None`: it returns token vectors for the runtime to pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head: Option<EmbeddingHead>,
}

impl ModelInfo {
    /// Minimal info; fill the rest with struct update syntax or field assignment.
    pub fn new(name: impl Into<String>, provider: impl Into<String>, device: Device, dtype: DType) -> Self {
        ModelInfo {
            name: name.into(),
            provider: provider.into(),
            device,
            dtype,
            inputs: Vec::new(),
            outputs: Vec::new(),
            weight_bytes: None,
            max_batch_size: None,
            max_sequence_length: None,
            head: None,
        }
    }

    /// For a provider that pools inside its run: when `head` is asked for, the model
    /// takes an `attention_mask` input and its first float output is token vectors
    /// `[batch, sequence, hidden]`, declares the head — the outputs become
    /// [`SENTENCE_EMBEDDING`], f32 `[batch, hidden]`, and [`ModelInfo::head`] is set —
    /// and says where it applies. Otherwise changes nothing: the model keeps its
    /// outputs and the runtime pools on the host.
    pub fn declare_head(&mut self, head: Option<EmbeddingHead>) -> Option<HeadSite> {
        let head = head?;
        let mask = self.inputs.iter().position(|i| i.name == "attention_mask")?;
        let tokens = self.outputs.iter().position(|o| o.dtype.is_float())?;
        let spec = &self.outputs[tokens];
        let [batch, _, hidden] = spec.shape.as_slice() else { return None };
        let embedding = TensorSpec::new(SENTENCE_EMBEDDING, DType::F32, vec![batch.clone(), hidden.clone()]);
        let site = HeadSite { head, tokens, tokens_name: spec.name.clone(), mask };
        self.outputs = vec![embedding];
        self.head = Some(head);
        Some(site)
    }

    /// Checks a request against [`ModelInfo::inputs`]: every listed input present with
    /// the right dtype and shape, nothing unlisted. The error names the input, what was
    /// expected and what came.
    pub fn validate(&self, inputs: &Inputs) -> Result<()> {
        if self.inputs.is_empty() {
            return Ok(());
        }
        for spec in &self.inputs {
            spec.check(inputs.require(&spec.name)?)?;
        }
        for name in inputs.names() {
            if !self.inputs.iter().any(|s| s.name == name) {
                let accepted: Vec<_> = self.inputs.iter().map(|s| s.name.as_str()).collect();
                return Err(Error::InvalidInput(format!(
                    "model `{}` has no input `{name}`; its inputs are [{}]",
                    self.name,
                    accepted.join(", ")
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::{Dim, NamedTensors, Tensor};

    #[test]
    fn a_head_is_declared_only_on_token_vectors_with_a_mask() {
        use crate::config::Pooling;
        let head = EmbeddingHead { pooling: Pooling::Mean, normalize: true };
        let seq = |n: &str| Dim::Dynamic(n.into());
        let mut info = ModelInfo::new("bert", "test", Device::Cpu, DType::F32);
        info.inputs = vec![
            TensorSpec::new("input_ids", DType::I64, vec![seq("batch"), seq("sequence")]),
            TensorSpec::new("attention_mask", DType::I64, vec![seq("batch"), seq("sequence")]),
        ];
        info.outputs = vec![
            TensorSpec::new("lengths", DType::I64, vec![seq("batch")]),
            TensorSpec::new("hidden", DType::F16, vec![seq("batch"), seq("sequence"), Dim::Fixed(8)]),
        ];
        let mut no_mask = info.clone();
        no_mask.inputs.truncate(1);
        assert_eq!(no_mask.declare_head(Some(head)), None);
        assert_eq!(no_mask.head, None);
        assert_eq!(info.clone().declare_head(None), None);

        let site = info.declare_head(Some(head)).unwrap();
        assert_eq!((site.tokens, site.tokens_name.as_str(), site.mask), (1, "hidden", 1));
        assert_eq!(info.head, Some(head));
        assert_eq!(
            info.outputs,
            vec![TensorSpec::new(SENTENCE_EMBEDDING, DType::F32, vec![seq("batch"), Dim::Fixed(8)])]
        );

        let mut pooled = ModelInfo::new("pooled", "test", Device::Cpu, DType::F32);
        pooled.inputs =
            vec![TensorSpec::new("attention_mask", DType::I64, vec![seq("batch"), seq("sequence")])];
        pooled.outputs = vec![TensorSpec::new("vector", DType::F32, vec![seq("batch"), Dim::Fixed(8)])];
        assert_eq!(pooled.declare_head(Some(head)), None, "already one vector per text");
    }

    #[test]
    fn validate_rejects_missing_unknown_and_misshapen_inputs() {
        let mut info = ModelInfo::new("bert", "test", Device::Cpu, DType::F32);
        info.inputs = vec![TensorSpec::new(
            "input_ids",
            DType::I64,
            vec![Dim::Dynamic("batch".into()), Dim::Dynamic("sequence".into())],
        )];
        let ids = Tensor::from_vec(vec![1, 2], vec![1i64, 2]).unwrap();
        info.validate(&NamedTensors::new().with("input_ids", ids.clone())).unwrap();

        let err = info.validate(&NamedTensors::new()).unwrap_err().to_string();
        assert!(err.contains("missing tensor `input_ids`"), "{err}");

        let extra = NamedTensors::new().with("input_ids", ids.clone()).with("pixels", ids);
        let err = info.validate(&extra).unwrap_err().to_string();
        assert!(err.contains("no input `pixels`; its inputs are [input_ids]"), "{err}");

        let flat = Tensor::from_vec(vec![2], vec![1i64, 2]).unwrap();
        let err = info.validate(&NamedTensors::new().with("input_ids", flat)).unwrap_err().to_string();
        assert!(err.contains("expected i64 [batch, sequence], got i64 [2]"), "{err}");
    }
}
