//! Every front — the optimizer and generation here — is built from the same
//! [`Parts`](kiln::runtime::Parts): the provider's capabilities are checked before
//! anything loads, `model.device = "auto"` and `model.gpu_ids` choose the device, and
//! the profile report carries the backend allocator's figures. Generation once did
//! none of the four; each test pins one. No GPU is needed: the provider is a test
//! double (`pretend-generator`) that claims CUDA, records where it was asked to load,
//! and reports an allocator of its own; `Parts::with_gpus` stands in for NVML.

mod support;

use std::sync::{Arc, Mutex};

use kiln::runtime::{Generation, Parts};
use kiln::{
    AllocatorMemory, Capabilities, DType, Device, DeviceKind, Generator, GeneratorInfo, Inputs, MemoryInfo,
    Model, ModelInfo, ModelSpec, Optimizer, Outputs, Provider, ProviderConfig, Result, SequenceCache,
    StepItem, Tensor, TokenizerSource, async_trait,
};

/// Where each load of this process was asked to go, generators and models alike.
static LOADED_ON: Mutex<Vec<Device>> = Mutex::new(Vec::new());

struct PretendGenerator;

struct Tiny(GeneratorInfo);

struct Held(usize);

impl SequenceCache for Held {
    fn len(&self) -> usize {
        self.0
    }
    fn bytes(&self) -> u64 {
        self.0 as u64 * 64
    }
    fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
        self
    }
}

impl Generator for Tiny {
    fn info(&self) -> &GeneratorInfo {
        &self.0
    }
    fn new_sequence(&self) -> Result<Box<dyn SequenceCache>> {
        Ok(Box::new(Held(0)))
    }
    fn step(&self, batch: &mut [StepItem<'_>]) -> Result<Vec<Vec<f32>>> {
        for item in batch.iter_mut() {
            item.cache.as_any_mut().downcast_mut::<Held>().expect("our cache").0 += item.tokens.len();
        }
        Ok(batch.iter().map(|_| vec![0.0; self.0.vocab_size]).collect())
    }
}

struct Echo(ModelInfo);

impl Model for Echo {
    fn info(&self) -> &ModelInfo {
        &self.0
    }
    fn run(&self, inputs: &Inputs) -> Result<Outputs> {
        let ids = inputs.require("input_ids")?;
        let (batch, sequence) = (ids.shape()[0], ids.shape()[1]);
        Ok(Outputs::new().with(
            "last_hidden_state",
            Tensor::from_vec(vec![batch, sequence, 4], vec![1.0f32; batch * sequence * 4])?,
        ))
    }
}

#[async_trait]
impl Provider for PretendGenerator {
    fn name(&self) -> &str {
        "pretend-generator"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            devices: vec![DeviceKind::Cpu, DeviceKind::Cuda],
            ..Capabilities::cpu_only(vec![DType::F32])
        }
    }

    fn allocator_memory(&self) -> Option<AllocatorMemory> {
        Some(AllocatorMemory { active: 1 << 20, peak: 3 << 20, cached: 2 << 20 })
    }

    async fn load(&self, spec: &ModelSpec) -> Result<Arc<dyn Model>> {
        LOADED_ON.lock().unwrap().push(spec.device);
        Ok(Arc::new(Echo(ModelInfo::new("echo", "pretend-generator", spec.device, spec.dtype))))
    }

    async fn load_generator(&self, spec: &ModelSpec) -> Result<Arc<dyn Generator>> {
        LOADED_ON.lock().unwrap().push(spec.device);
        let tokenizer = support::minilm_dir().join("tokenizer.json");
        Ok(Arc::new(Tiny(GeneratorInfo::new(
            "tiny",
            "pretend-generator",
            spec.device,
            64,
            128,
            TokenizerSource::File(tokenizer),
        ))))
    }
}

fn build(_: &ProviderConfig) -> Result<Arc<dyn Provider>> {
    Ok(Arc::new(PretendGenerator))
}

kiln::register_provider!("pretend-generator", "test double: claims CUDA, generates zeros", build);

/// A generate config on the test double, with `sets` applied.
fn generate_config(sets: &[&str]) -> kiln::KilnConfig {
    let mut all = vec!["task=\"generate\"", "provider.name=\"pretend-generator\"", "generate.kv_cache_mb=1"];
    all.extend(sets);
    support::minilm_config(&all)
}

fn gib(free: u64) -> MemoryInfo {
    MemoryInfo { total: 80 << 30, used: (80 - free) << 30, free: free << 30 }
}

#[tokio::test]
async fn generation_checks_the_providers_capabilities_before_loading() {
    // The tests of this file run at once and share LOADED_ON: this one's device is its own.
    let refused =
        Generation::from_config(generate_config(&["model.device=\"cuda:7\"", "model.dtype=\"bf16\""]))
            .await
            .err()
            .unwrap();
    let message = refused.to_string();
    assert!(message.contains("`pretend-generator` runs models in f32, not bf16"), "{message}");
    let refused =
        Generation::from_config(generate_config(&["model.device=\"cuda:7\"", "model.quantization=\"int8\""]))
            .await
            .err()
            .unwrap();
    assert!(refused.to_string().contains("model.quantization none, not int8"), "{refused}");
    assert!(!LOADED_ON.lock().unwrap().contains(&Device::Cuda(7)), "loaded before the check");
}

#[tokio::test]
async fn auto_puts_generation_and_the_optimizer_on_the_gpu_with_the_most_free_memory() {
    let gpus = vec![(0, gib(10)), (1, gib(70)), (2, gib(40))];
    let parts = Parts::with_gpus(generate_config(&["model.device=\"auto\""]), gpus.clone()).unwrap();
    assert_eq!(parts.devices, vec![Device::Cuda(1)]);
    let generation = Generation::from_parts(parts).await.unwrap();
    assert_eq!(generation.info().device, Device::Cuda(1));
    generation.shutdown().await;

    let embed = support::minilm_config(&[
        "provider.name=\"pretend-generator\"",
        "model.device=\"auto\"",
        "cache.enabled=false",
    ]);
    let optimizer = Optimizer::from_parts(Parts::with_gpus(embed, gpus).unwrap()).await.unwrap();
    assert_eq!(optimizer.model_info().device, Device::Cuda(1));
    optimizer.shutdown().await.unwrap();
}

#[tokio::test]
async fn generation_loads_on_the_gpu_gpu_ids_lists() {
    let generation =
        Generation::from_config(generate_config(&["model.device=\"auto\"", "model.gpu_ids=[2]"]))
            .await
            .unwrap();
    assert_eq!(generation.info().device, Device::Cuda(2));
    assert!(LOADED_ON.lock().unwrap().contains(&Device::Cuda(2)));
    generation.shutdown().await;
    // One copy only: two GPUs are refused, naming the setting.
    let refused =
        Generation::from_config(generate_config(&["model.device=\"auto\"", "model.gpu_ids=[0, 3]"]))
            .await
            .err()
            .unwrap();
    assert!(refused.to_string().contains("model.gpu_ids lists 2 GPUs"), "{refused}");
    assert!(!LOADED_ON.lock().unwrap().contains(&Device::Cuda(3)));
}

#[tokio::test]
async fn the_generation_profile_reports_the_backend_allocator() {
    let generation = Generation::from_config(generate_config(&["profiler.enabled=true"])).await.unwrap();
    let answer = generation.generate(kiln::runtime::Prompt::Tokens(vec![1, 2, 3])).await.unwrap();
    assert!(!answer.tokens.is_empty() || answer.finish_reason == kiln::runtime::FinishReason::Stop);
    let report = generation.reports().report().expect("profiling is on");
    let allocator = report.allocator.expect("the provider keeps an allocator");
    assert_eq!(allocator.provider, "pretend-generator");
    assert_eq!(
        (allocator.active_bytes, allocator.peak_bytes, allocator.cached_bytes),
        (1 << 20, 3 << 20, 2 << 20)
    );
    assert!(report.spans.contains_key("generate_step"), "{:?}", report.spans.keys());
    generation.shutdown().await;
}
