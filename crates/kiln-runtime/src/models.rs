//! The model manager: loads models through their providers, admits a load only if its
//! estimated memory fits, and keeps at most `models.max_loaded` models and
//! `models.max_bytes` bytes, unloading the least recently used idle model to make room.
//!
//! A model is *idle* when nothing but the manager holds its worker: no optimizer serves
//! it by default and no caller is using it. Unloading an idle model ends its worker
//! thread, which frees its memory.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kiln_core::{
    DType, Device, EmbeddingHead, Error, ModelSpec, ModelsConfig, NoopProfiler, Profiler, Provider,
    Quantization, Result,
};
use serde::Serialize;

use crate::monitor::ResourceMonitor;
use crate::worker::{BatchPolicy, ModelWorker};

/// What identifies a loaded model.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct ModelKey {
    /// The provider that loaded it.
    pub provider: String,
    /// Its file or folder.
    pub path: PathBuf,
    /// Its device.
    pub device: Device,
    /// Its precision.
    pub dtype: DType,
    /// Its weight quantization.
    pub quantization: Quantization,
    /// Which copy, when one model is loaded more than once (replicas on one GPU).
    pub replica: usize,
    /// The embedding head asked of the provider (a model with a head returns other
    /// outputs than the same weights without).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head: Option<EmbeddingHead>,
}

impl std::fmt::Display for ModelKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}, {} on {}", self.path.display(), self.provider, self.dtype, self.device)?;
        if self.replica > 0 {
            write!(f, ", replica {}", self.replica)?;
        }
        f.write_str(")")
    }
}

/// A loaded model, as [`ModelManager::loaded`] lists it.
#[derive(Debug, Clone, Serialize)]
pub struct LoadedModel {
    /// Which model.
    pub key: ModelKey,
    /// Its estimated memory, bytes (0 when its provider gives no estimate).
    pub bytes: u64,
    /// Whether it could be unloaded now.
    pub idle: bool,
}

struct Entry {
    key: ModelKey,
    worker: Arc<ModelWorker>,
    bytes: u64,
    last_used: Instant,
}

impl Entry {
    fn idle(&self) -> bool {
        Arc::strong_count(&self.worker) == 1
    }
}

/// Loaded models, their memory, and the limits on both.
pub struct ModelManager {
    limits: ModelsConfig,
    entries: Mutex<Vec<Entry>>,
    /// Memory figures for admission.
    monitor: Arc<ResourceMonitor>,
    /// One load at a time, so each admission sees the memory the previous one took.
    loading: tokio::sync::Mutex<()>,
    profiler: Arc<dyn Profiler>,
}

impl ModelManager {
    /// A manager with these limits.
    pub fn new(limits: ModelsConfig) -> Self {
        ModelManager {
            limits,
            entries: Mutex::new(Vec::new()),
            monitor: ResourceMonitor::on_demand(),
            loading: tokio::sync::Mutex::new(()),
            profiler: Arc::new(NoopProfiler),
        }
    }

    /// Admission reads memory through `monitor` (the optimizer's one monitor) instead
    /// of an on-demand monitor of its own.
    pub fn with_monitor(mut self, monitor: Arc<ResourceMonitor>) -> Self {
        self.monitor = monitor;
        self
    }

    /// Workers started from now on record their spans into `profiler`.
    pub fn with_profiler(mut self, profiler: Arc<dyn Profiler>) -> Self {
        self.profiler = profiler;
        self
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Vec<Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn find(&self, key: &ModelKey) -> Option<Arc<ModelWorker>> {
        let mut entries = self.entries();
        let entry = entries.iter_mut().find(|e| &e.key == key)?;
        entry.last_used = Instant::now();
        Some(entry.worker.clone())
    }

    /// The model `spec` names: the loaded one, or a new load if it is admitted.
    pub async fn load(
        &self,
        provider: Arc<dyn Provider>,
        spec: ModelSpec,
        policy: BatchPolicy,
    ) -> Result<Arc<ModelWorker>> {
        self.load_replica(provider, spec, policy, 0).await
    }

    /// Copy number `replica` of the model `spec` names (0 is what [`load`](Self::load)
    /// gives): the loaded one, or a new load if it is admitted. Distinct numbers are
    /// distinct models, so one GPU can hold two replicas.
    pub async fn load_replica(
        &self,
        provider: Arc<dyn Provider>,
        spec: ModelSpec,
        policy: BatchPolicy,
        replica: usize,
    ) -> Result<Arc<ModelWorker>> {
        let key = ModelKey {
            provider: provider.name().to_string(),
            path: spec.path.clone(),
            device: spec.device,
            dtype: spec.dtype,
            quantization: spec.quantization,
            replica,
            head: spec.head,
        };
        if let Some(worker) = self.find(&key) {
            return Ok(worker);
        }
        let _one_at_a_time = self.loading.lock().await;
        if let Some(worker) = self.find(&key) {
            return Ok(worker);
        }
        // What the provider says it cannot do is refused before anything is read.
        let capabilities = provider.capabilities();
        capabilities.check(provider.name(), spec.device, spec.dtype)?;
        capabilities.check_quantization(provider.name(), spec.quantization)?;
        let required = provider.estimate_memory(&spec)?.unwrap_or(0);
        let refuse = |available: u64| Error::OutOfMemory {
            what: format!("model {key}"),
            required,
            available,
            device: spec.device,
        };
        if self.limits.max_bytes > 0 && required > self.limits.max_bytes {
            return Err(refuse(self.limits.max_bytes));
        }
        // Room under the manager's own limits, unloading idle models first.
        loop {
            let (count, bytes) = {
                let entries = self.entries();
                (entries.len(), entries.iter().map(|e| e.bytes).sum::<u64>())
            };
            let over_count = count + 1 > self.limits.max_loaded;
            let over_bytes = self.limits.max_bytes > 0 && bytes + required > self.limits.max_bytes;
            if !over_count && !over_bytes {
                break;
            }
            if !self.unload_lru_idle().await {
                return Err(if over_bytes {
                    refuse(self.limits.max_bytes.saturating_sub(bytes))
                } else {
                    Error::Unsupported(format!(
                        "cannot load model {key}: models.max_loaded = {} models are loaded and all are in use",
                        self.limits.max_loaded
                    ))
                });
            }
        }
        // Room on the device: the backend's cached buffers go back first (once), then
        // idle models are unloaded while the estimate does not fit.
        let mut released = false;
        loop {
            let available = self.monitor.sample_now().available(spec.device);
            match available {
                Some(available) if required > available => {
                    if !released {
                        released = true;
                        if provider.release_cached_memory() > 0 {
                            continue;
                        }
                    }
                    if !self.unload_lru_idle().await {
                        return Err(refuse(available));
                    }
                }
                _ => break,
            }
        }
        let worker =
            Arc::new(ModelWorker::start_profiled(provider, spec, policy, self.profiler.clone()).await?);
        self.entries().push(Entry {
            key,
            worker: worker.clone(),
            bytes: required,
            last_used: Instant::now(),
        });
        Ok(worker)
    }

    /// Unloads the least recently used idle model; false if none is idle.
    pub async fn unload_lru_idle(&self) -> bool {
        let entry = {
            let mut entries = self.entries();
            let Some(i) = entries
                .iter()
                .enumerate()
                .filter(|(_, e)| e.idle())
                .min_by_key(|(_, e)| e.last_used)
                .map(|(i, _)| i)
            else {
                return false;
            };
            entries.remove(i)
        };
        tracing::info!("unloading idle model {}", entry.key);
        ModelWorker::release(entry.worker).await;
        true
    }

    /// Unloads a model if it is idle; returns whether it was unloaded.
    pub async fn unload(&self, key: &ModelKey) -> bool {
        let entry = {
            let mut entries = self.entries();
            match entries.iter().position(|e| &e.key == key && e.idle()) {
                Some(i) => entries.remove(i),
                None => return false,
            }
        };
        ModelWorker::release(entry.worker).await;
        true
    }

    /// Unloads every idle model (memory pressure); returns how many.
    pub async fn unload_idle(&self) -> usize {
        let mut n = 0;
        while self.unload_lru_idle().await {
            n += 1;
        }
        n
    }

    /// The loaded models.
    pub fn loaded(&self) -> Vec<LoadedModel> {
        self.entries()
            .iter()
            .map(|e| LoadedModel { key: e.key.clone(), bytes: e.bytes, idle: e.idle() })
            .collect()
    }

    /// Drops the manager's hold on every model; workers end when their last user lets go.
    pub fn clear(&self) {
        self.entries().clear();
    }
}
