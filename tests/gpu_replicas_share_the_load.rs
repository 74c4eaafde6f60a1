//! `model.gpu_ids` loads one replica per listed GPU and sends each request to the
//! replica with the shortest queue; `model.device = "auto"` falls back to the CPU where
//! NVML sees no GPU. No GPU is needed: the provider here is a test double (`pretend-gpu`)
//! that claims CUDA devices and records where each batch ran. Real replicas on the
//! H100 are in docs/benchmarks.md.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use kiln::{
    Capabilities, DType, Device, DeviceKind, Inputs, Model, ModelInfo, ModelSpec, Optimizer, Outputs,
    Provider, ProviderConfig, Result, Tensor, async_trait,
};

/// Devices each batch ran on, across every model this process loaded.
static RAN_ON: Mutex<Vec<(Device, usize)>> = Mutex::new(Vec::new());

#[derive(Debug)]
struct PretendGpu;

struct PretendModel {
    info: ModelInfo,
}

impl Model for PretendModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn run(&self, inputs: &Inputs) -> Result<Outputs> {
        let batch = inputs.require("input_ids")?.shape()[0];
        // Long enough that concurrent callers queue up behind a busy replica.
        std::thread::sleep(Duration::from_millis(20));
        RAN_ON.lock().unwrap().push((self.info.device, batch));
        Ok(Outputs::new().with("pooled", Tensor::from_vec(vec![batch, 4], vec![1.0f32; batch * 4])?))
    }
}

#[async_trait]
impl Provider for PretendGpu {
    fn name(&self) -> &str {
        "pretend-gpu"
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            devices: vec![DeviceKind::Cpu, DeviceKind::Cuda],
            ..Capabilities::cpu_only(vec![DType::F32])
        }
    }

    async fn load(&self, spec: &ModelSpec) -> Result<Arc<dyn Model>> {
        Ok(Arc::new(PretendModel { info: ModelInfo::new("pretend", "pretend-gpu", spec.device, spec.dtype) }))
    }
}

fn build(_: &ProviderConfig) -> Result<Arc<dyn Provider>> {
    Ok(Arc::new(PretendGpu))
}

kiln::register_provider!("pretend-gpu", "test double: claims CUDA devices, runs nothing", build);

fn config(sets: &[&str]) -> kiln::KilnConfig {
    // Rows as sent (no bucket rows, the GPU default), so the rows the model ran are the texts.
    let mut all = vec![
        "provider.name=\"pretend-gpu\"",
        "cache.enabled=false",
        "batching.max_wait_ms=2",
        "batching.batch_multiple=1",
    ];
    all.extend(sets);
    support::minilm_config(&all)
}

async fn embed_concurrently(optimizer: Arc<Optimizer>, n: usize) {
    let calls: Vec<_> = (0..n)
        .map(|i| {
            let optimizer = optimizer.clone();
            tokio::spawn(async move { optimizer.embed(&[format!("text number {i}")]).await.unwrap() })
        })
        .collect();
    for call in calls {
        assert_eq!(call.await.unwrap()[0].len(), 4);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_spread_over_the_replicas_of_the_listed_gpus() {
    for (ids, devices) in [
        ("[0, 1]", vec![Device::Cuda(0), Device::Cuda(1)]),
        // One GPU listed twice: two replicas on it, each its own model and queue.
        ("[3, 3]", vec![Device::Cuda(3), Device::Cuda(3)]),
    ] {
        RAN_ON.lock().unwrap().clear();
        let set = format!("model.gpu_ids={ids}");
        let optimizer =
            Arc::new(Optimizer::from_config(config(&["model.device=\"auto\"", &set])).await.unwrap());
        embed_concurrently(optimizer.clone(), 96).await;
        let stats = optimizer.stats();
        let got: Vec<Device> = stats.replicas.iter().map(|r| r.device).collect();
        assert_eq!(got, devices, "one replica per listed id, in order");
        for r in &stats.replicas {
            assert!(r.rows >= 16, "every replica takes a share of 96 texts: {:?}", stats.replicas);
        }
        assert_eq!(stats.replicas.iter().map(|r| r.rows).sum::<u64>(), 96, "{:?}", stats.replicas);
        assert_eq!(stats.rows(), 96);
        let ran: usize = RAN_ON.lock().unwrap().iter().map(|(_, n)| n).sum();
        assert_eq!(ran, 96);
        let optimizer = Arc::try_unwrap(optimizer).ok().unwrap();
        optimizer.shutdown().await.unwrap();
    }
}

#[tokio::test]
async fn auto_without_a_visible_gpu_is_the_cpu_and_gpu_ids_need_a_gpu_device() {
    // On a machine whose NVML sees a GPU, auto must pick one (the test double runs
    // anywhere); elsewhere it must fall back to the CPU. Both are checked, never skipped.
    let gpu_here = !kiln::runtime::discover_devices().gpus.is_empty();
    let optimizer = Optimizer::from_config(config(&["model.device=\"auto\""])).await.unwrap();
    let device = optimizer.model_info().device;
    if gpu_here {
        assert!(matches!(device, Device::Cuda(_)), "a GPU is visible, auto chose {device}");
    } else {
        assert_eq!(device, Device::Cpu);
    }
    assert_eq!(optimizer.stats().replicas.len(), 1);
    optimizer.shutdown().await.unwrap();

    let e = kiln::KilnConfig::load(None, &["model.gpu_ids=[0]".to_string()]).err().unwrap().to_string();
    assert!(e.contains("model.device") && e.contains("gpu_ids"), "{e}");
}
