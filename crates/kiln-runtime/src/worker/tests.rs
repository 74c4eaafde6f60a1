//! The worker's tests: batching, faults, cancellation, started batches, warm-up.
use super::*;
use kiln_core::{Capabilities, DType, Device, Dim, Tensor, TensorSpec, async_trait};
use kiln_core::{Error, Inputs, Model, ModelInfo, ModelSpec, Outputs, Pending, Provider, Result, WhenFull};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Fault injection: a model that panics on input id 13 and otherwise returns its
/// input ids as floats, with the batch size it saw.
struct Faulty(ModelInfo);
impl Model for Faulty {
    fn info(&self) -> &ModelInfo {
        &self.0
    }
    fn run(&self, inputs: &Inputs) -> Result<Outputs> {
        let ids = inputs.require("input_ids")?;
        let values = ids.to_vec::<i64>()?;
        assert!(!values.contains(&13), "fault injected: id 13");
        let batch = ids.shape()[0];
        Ok(Outputs::new()
            .with("echo", Tensor::from_vec(ids.shape().to_vec(), values.iter().map(|&v| v as f32).collect())?)
            .with("batch", Tensor::from_vec(vec![batch], vec![batch as f32; batch])?))
    }
}
/// Fault injection for started batches: `start` returns before the batch's work
/// is done, like a GPU provider's. The first batch's outputs come only once a
/// second batch was started (the worker must not wait for one batch before
/// starting the next), and a batch with id 13 fails while it is waited for.
struct OnDevice {
    model: Arc<Faulty>,
    started: Arc<std::sync::atomic::AtomicUsize>,
}
impl Model for OnDevice {
    fn info(&self) -> &ModelInfo {
        self.model.info()
    }
    fn run(&self, inputs: &Inputs) -> Result<Outputs> {
        self.model.run(inputs)
    }
    fn start(&self, inputs: &Inputs) -> Result<Pending> {
        use std::sync::atomic::Ordering::SeqCst;
        let number = self.started.fetch_add(1, SeqCst) + 1;
        let (model, started, inputs) = (self.model.clone(), self.started.clone(), inputs.clone());
        Ok(Pending::later(move || {
            let deadline = Instant::now() + Duration::from_secs(10);
            while number == 1 && started.load(SeqCst) < 2 {
                if Instant::now() > deadline {
                    return Err(Error::backend("on-device", "batch 2 never started while batch 1 ran"));
                }
                std::thread::yield_now();
            }
            model.run(&inputs)
        }))
    }
}

/// Holds its first run until the test opens [`GATE`]: a model busy for as long as
/// the test needs.
struct Gated {
    model: Faulty,
    runs: std::sync::atomic::AtomicUsize,
}
static GATE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// Set once the first run is held at the gate.
static HELD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
impl Model for Gated {
    fn info(&self) -> &ModelInfo {
        self.model.info()
    }
    fn run(&self, inputs: &Inputs) -> Result<Outputs> {
        use std::sync::atomic::Ordering::SeqCst;
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.runs.fetch_add(1, SeqCst) == 0 && !GATE.load(SeqCst) {
            self.runs.store(0, SeqCst);
            HELD.store(true, SeqCst);
            assert!(Instant::now() < deadline, "the test never opened the gate");
            std::thread::yield_now();
        }
        self.model.run(inputs)
    }
}

struct FaultyProvider;
#[async_trait]
impl Provider for FaultyProvider {
    fn name(&self) -> &str {
        "faulty"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::cpu_only(vec![DType::F32])
    }
    async fn load(&self, spec: &ModelSpec) -> Result<Arc<dyn Model>> {
        if spec.path.as_os_str() == "panic" {
            panic!("fault injected: load");
        }
        let seq = || vec![Dim::Dynamic("batch".into()), Dim::Dynamic("sequence".into())];
        let mut info = ModelInfo::new("faulty", "faulty", spec.device, spec.dtype);
        // A model that declares a batch limit of its own.
        if spec.path.as_os_str() == "max2" {
            info.max_batch_size = Some(2);
        }
        info.inputs = vec![TensorSpec::new("input_ids", DType::I64, seq())];
        info.outputs = vec![
            TensorSpec::new("echo", DType::F32, seq()),
            TensorSpec::new("batch", DType::F32, vec![Dim::Dynamic("batch".into())]),
        ];
        if spec.path.as_os_str() == "gate" {
            return Ok(Arc::new(Gated { model: Faulty(info), runs: Default::default() }));
        }
        if spec.path.as_os_str() == "device" {
            return Ok(Arc::new(OnDevice { model: Arc::new(Faulty(info)), started: Arc::default() }));
        }
        Ok(Arc::new(Faulty(info)))
    }
}

async fn worker(policy: BatchPolicy) -> Arc<ModelWorker> {
    Arc::new(
        ModelWorker::start(Arc::new(FaultyProvider), ModelSpec::new("m", Device::Cpu, DType::F32), policy)
            .await
            .unwrap(),
    )
}

fn item(ids: Vec<i64>) -> (Inputs, usize) {
    let n = ids.len();
    (Inputs::new().with("input_ids", Tensor::from_vec(vec![1, n], ids).unwrap()), n)
}

#[tokio::test]
async fn concurrent_items_share_batches_and_each_gets_its_own_row() {
    let policy = BatchPolicy { max_wait: Duration::from_millis(50), ..BatchPolicy::default() };
    let w = worker(policy).await;
    let calls: Vec<_> = (0..40i64)
        .map(|i| {
            let w = w.clone();
            tokio::spawn(async move {
                let (inputs, len) = item((0..(i % 5 + 1)).map(|k| 100 * i + k).collect());
                (i, w.submit(inputs, len).await.unwrap())
            })
        })
        .collect();
    let mut shared = 0;
    for call in calls {
        let (i, out) = call.await.unwrap();
        let echo = out.outputs.require("echo").unwrap();
        let want: Vec<f32> = (0..(i % 5 + 1)).map(|k| (100 * i + k) as f32).collect();
        assert_eq!(echo.to_vec::<f32>().unwrap(), want, "item {i} got its own row, trimmed to its length");
        shared += usize::from(out.batch_size > 1);
    }
    assert!(shared > 0, "with 40 concurrent callers some batches are shared: {:?}", w.batch_stats());
    assert!(w.batch_stats().mean_batch_size() > 1.0);
}

#[tokio::test]
async fn a_failing_item_fails_alone_and_the_worker_keeps_serving() {
    let policy = BatchPolicy { max_wait: Duration::from_millis(50), ..BatchPolicy::default() };
    let w = worker(policy).await;
    let calls: Vec<_> = [vec![1, 2], vec![13], vec![3]]
        .into_iter()
        .map(|ids| {
            let w = w.clone();
            tokio::spawn(async move {
                let (inputs, len) = item(ids);
                w.submit(inputs, len).await
            })
        })
        .collect();
    let mut results = Vec::new();
    for c in calls {
        results.push(c.await.unwrap());
    }
    assert!(results[0].is_ok() && results[2].is_ok());
    let err = results[1].as_ref().unwrap_err().to_string();
    assert!(err.contains("panicked while running: fault injected: id 13"), "{err}");
    let (inputs, len) = item(vec![4]);
    assert!(w.submit(inputs, len).await.is_ok(), "still serving");
}

#[tokio::test]
async fn the_next_batch_starts_while_one_is_on_the_device_and_a_failed_wait_fails_only_its_culprit() {
    let policy = BatchPolicy { max_wait: Duration::from_millis(50), ..BatchPolicy::default() };
    let w = Arc::new(
        ModelWorker::start(
            Arc::new(FaultyProvider),
            ModelSpec::new("device", Device::Cpu, DType::F32),
            policy,
        )
        .await
        .unwrap(),
    );
    let submit = |ids: Vec<i64>| {
        let w = w.clone();
        tokio::spawn(async move {
            let (inputs, len) = item(ids);
            w.submit(inputs, len).await
        })
    };
    let first = submit(vec![1]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while w.batch_stats().batches < 1 {
        assert!(Instant::now() < deadline, "batch 1 never started");
        tokio::task::yield_now().await;
    }
    let rest: Vec<_> = [vec![2, 3], vec![13], vec![4]].into_iter().map(submit).collect();
    let first = first.await.unwrap();
    assert!(first.is_ok(), "{first:?}");
    let mut results = Vec::new();
    for call in rest {
        results.push(call.await.unwrap());
    }
    assert_eq!(
        results[0].as_ref().unwrap().outputs.require("echo").unwrap().to_vec::<f32>().unwrap(),
        [2.0, 3.0]
    );
    assert!(results[2].is_ok(), "{:?}", results[2]);
    let err = results[1].as_ref().unwrap_err().to_string();
    assert!(err.contains("fault injected: id 13"), "{err}");
}

#[tokio::test]
async fn a_due_batch_keeps_gathering_while_the_model_is_busy() {
    // Every item is due at once; the batches still wait for the model.
    let policy = BatchPolicy { max_wait: Duration::ZERO, max_batch_size: 64, ..BatchPolicy::default() };
    let w = Arc::new(
        ModelWorker::start(Arc::new(FaultyProvider), ModelSpec::new("gate", Device::Cpu, DType::F32), policy)
            .await
            .unwrap(),
    );
    let submit = |i: i64| {
        let w = w.clone();
        tokio::spawn(async move {
            let (inputs, len) = item(vec![100 + i]);
            w.submit(inputs, len).await.map(|out| out.batch_size)
        })
    };
    let first = submit(0);
    let deadline = Instant::now() + Duration::from_secs(10);
    let wait_for = |n: usize| {
        let w = w.clone();
        async move {
            while w.queue_depth() < n {
                assert!(Instant::now() < deadline, "{} of {n} items queued", w.queue_depth());
                tokio::task::yield_now().await;
            }
        }
    };
    while !HELD.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "batch 1 never started");
        tokio::task::yield_now().await;
    }
    // One at a time, each one due before the next comes, while batch 1 runs.
    let mut rest = Vec::new();
    for i in 1..=20 {
        rest.push(submit(i));
        wait_for(1 + i as usize).await;
    }
    GATE.store(true, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(first.await.unwrap().unwrap(), 1);
    for call in rest {
        assert_eq!(call.await.unwrap().unwrap(), 20, "the 20 items that came during batch 1 share batch 2");
    }
    assert_eq!(w.batch_stats().batches, 2);
}

#[tokio::test]
async fn a_full_queue_answers_overloaded_and_recovers() {
    // Capacity 1 and a long wait keep the first item queued while the others arrive.
    let policy = BatchPolicy {
        max_wait: Duration::from_millis(300),
        queue_capacity: 1,
        when_full: WhenFull::Reject,
        max_batch_size: 64,
        ..BatchPolicy::default()
    };
    let w = worker(policy).await;
    let calls: Vec<_> = (0..20)
        .map(|i| {
            let w = w.clone();
            tokio::spawn(async move {
                let (inputs, len) = item(vec![100 + i]); // clear of the fault-injecting id 13
                w.submit(inputs, len).await
            })
        })
        .collect();
    let mut overloaded = 0;
    for c in calls {
        match c.await.unwrap() {
            Ok(_) => {}
            Err(Error::Overloaded { capacity: 1, .. }) => overloaded += 1,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!(overloaded, 19, "one item holds the only slot; every other caller meets the full queue");
    let (inputs, len) = item(vec![1]);
    assert!(w.submit(inputs, len).await.is_ok(), "recovered once the queue drained");
}

#[tokio::test]
async fn a_dropped_caller_cancels_its_queued_item() {
    let policy = BatchPolicy { max_wait: Duration::from_millis(200), ..BatchPolicy::default() };
    let w = worker(policy).await;
    // The caller gives up after 20 ms, while its item waits for company.
    let (inputs, len) = item(vec![13]); // would panic the model if it ever ran
    assert!(tokio::time::timeout(Duration::from_millis(20), w.submit(inputs, len)).await.is_err());
    // No waiting needed: the next item goes into the same batching window, and the
    // abandoned one, had it not been dropped, would have joined it and panicked the
    // model.
    let (inputs, len) = item(vec![1]);
    assert!(w.submit(inputs, len).await.is_ok());
    let stats = w.batch_stats();
    assert_eq!((stats.batches, stats.batch_sizes.get(&1)), (1, Some(&1)), "one run of one item: {stats:?}");
}

#[tokio::test]
async fn a_panicking_load_is_an_error_not_a_crash() {
    let err = ModelWorker::start(
        Arc::new(FaultyProvider),
        ModelSpec::new("panic", Device::Cpu, DType::F32),
        BatchPolicy::default(),
    )
    .await
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("panicked while loading: fault injected: load"), "{err}");
}

#[tokio::test]
async fn a_model_that_declares_a_batch_limit_never_gets_more() {
    let policy = BatchPolicy { max_wait: Duration::from_millis(50), ..BatchPolicy::default() };
    let w = Arc::new(
        ModelWorker::start(Arc::new(FaultyProvider), ModelSpec::new("max2", Device::Cpu, DType::F32), policy)
            .await
            .unwrap(),
    );
    assert_eq!(w.policy().max_batch_size, 2);
    let calls: Vec<_> = (0..12i64)
        .map(|i| {
            let w = w.clone();
            tokio::spawn(async move {
                let (inputs, len) = item(vec![100 + i]);
                w.submit(inputs, len).await.unwrap().batch_size
            })
        })
        .collect();
    for call in calls {
        assert!(call.await.unwrap() <= 2);
    }
    let stats = w.batch_stats();
    assert_eq!(rows(&stats.batch_sizes), 12, "{stats:?}");
    assert!(stats.batch_sizes.keys().all(|&size| size <= 2), "{stats:?}");
}

/// Records the shape of every run; fault injection: fails like a device out of
/// memory above a number of tokens.
struct ShapeRecorder {
    info: ModelInfo,
    seen: Arc<Mutex<Vec<(usize, usize)>>>,
    max_tokens: usize,
}
impl Model for ShapeRecorder {
    fn info(&self) -> &ModelInfo {
        &self.info
    }
    fn run(&self, inputs: &Inputs) -> Result<Outputs> {
        let ids = inputs.require("input_ids")?;
        let (rows, sequence) = (ids.shape()[0], ids.shape()[1]);
        if rows * sequence > self.max_tokens {
            return Err(Error::backend("recorder", "fault injected: out of memory"));
        }
        self.seen.lock().unwrap().push((rows, sequence));
        Ok(Outputs::new().with("score", Tensor::from_vec(vec![rows], vec![1f32; rows])?))
    }
}
struct RecorderProvider(Arc<Mutex<Vec<(usize, usize)>>>, usize);
#[async_trait]
impl Provider for RecorderProvider {
    fn name(&self) -> &str {
        "recorder"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::cpu_only(vec![DType::F32])
    }
    async fn load(&self, spec: &ModelSpec) -> Result<Arc<dyn Model>> {
        let mut info = ModelInfo::new("recorder", "recorder", spec.device, spec.dtype);
        info.inputs = vec![TensorSpec::new(
            "input_ids",
            DType::I64,
            vec![Dim::Dynamic("batch".into()), Dim::Dynamic("sequence".into())],
        )];
        info.outputs = vec![TensorSpec::new("score", DType::F32, vec![Dim::Dynamic("batch".into())])];
        info.max_sequence_length = Some(20);
        Ok(Arc::new(ShapeRecorder { info, seen: self.0.clone(), max_tokens: self.1 }))
    }
}

async fn recorder(max_tokens: usize) -> (ModelWorker, Arc<Mutex<Vec<(usize, usize)>>>) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let policy = BatchPolicy {
        max_batch_size: 8,
        batch_multiple: 4,
        sequence_multiple: 8,
        max_wait: Duration::from_millis(1),
        ..BatchPolicy::default()
    };
    let provider = Arc::new(RecorderProvider(seen.clone(), max_tokens));
    let w = ModelWorker::start(provider, ModelSpec::new("m", Device::Cpu, DType::F32), policy).await.unwrap();
    (w, seen)
}

#[tokio::test]
async fn warm_up_runs_every_bucket_largest_first_and_batches_use_the_buckets() {
    let (w, seen) = recorder(usize::MAX).await;
    let warm = w.warm_up(None, None).await.unwrap();
    // Sequences 8, 16 and 20 (the model's 20 positions cap the third bucket), rows 4 and 8.
    let shapes = vec![(8, 20), (4, 20), (8, 16), (4, 16), (8, 8), (4, 8)];
    assert_eq!(warm.shapes, shapes);
    let runs: Vec<_> = shapes.iter().flat_map(|&s| [s; 3]).collect();
    assert_eq!(*seen.lock().unwrap(), runs, "each shape three times, in order");
    assert_eq!(w.batch_stats().batches, 0, "warm-up runs are not the model's batches");
    // text.max_length bounds the sequences warmed up.
    seen.lock().unwrap().clear();
    assert_eq!(w.warm_up(Some(5), None).await.unwrap().shapes, vec![(8, 8), (4, 8)]);

    seen.lock().unwrap().clear();
    let (inputs, len) = item(vec![1, 2, 3]);
    let out = w.submit(inputs, len).await.unwrap();
    assert_eq!(out.outputs.require("score").unwrap().shape(), &[1], "the item gets its own row");
    assert_eq!(*seen.lock().unwrap(), vec![(4, 8)], "one item runs as a bucket of 4 x 8");
    assert_eq!(w.batch_stats().batch_sizes.get(&1), Some(&1), "counted by items, not added rows");
}

#[tokio::test]
async fn a_warm_up_that_does_not_fit_names_the_shape_and_the_settings() {
    let (w, _) = recorder(100).await;
    let err = w.warm_up(None, None).await.unwrap_err().to_string();
    assert!(err.contains("a batch of 8 x 20 tokens"), "{err}");
    assert!(err.contains("fault injected: out of memory"), "{err}");
    assert!(err.contains("batching.max_batch_size"), "{err}");
    // The worker still serves what fits.
    let (inputs, len) = item(vec![1, 2]);
    assert!(w.submit(inputs, len).await.is_ok());
}

#[tokio::test]
async fn a_model_without_known_shapes_is_not_warmed_up() {
    let w = worker(BatchPolicy::default()).await;
    let warm = w.warm_up(None, None).await.unwrap();
    assert!(warm.shapes.is_empty());
    assert!(warm.skipped.unwrap().contains("no known maximum"));
}

/// An image model whose height and width are dynamic (as exported ONNX vision models
/// often are): records the shapes it runs.
struct ImageShapes(ModelInfo, Arc<Mutex<Vec<Vec<usize>>>>);
impl Model for ImageShapes {
    fn info(&self) -> &ModelInfo {
        &self.0
    }
    fn run(&self, inputs: &Inputs) -> Result<Outputs> {
        let x = inputs.require("x")?;
        self.1.lock().unwrap().push(x.shape().to_vec());
        Ok(Outputs::new().with("y", Tensor::from_vec(vec![x.shape()[0]], vec![0f32; x.shape()[0]])?))
    }
}
struct ImageProvider(Arc<Mutex<Vec<Vec<usize>>>>);
#[async_trait]
impl Provider for ImageProvider {
    fn name(&self) -> &str {
        "images"
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::cpu_only(vec![DType::F32])
    }
    async fn load(&self, spec: &ModelSpec) -> Result<Arc<dyn Model>> {
        let mut info = ModelInfo::new("images", "images", spec.device, spec.dtype);
        let dims = ["batch", "", "h", "w"]
            .map(|d| if d.is_empty() { Dim::Fixed(3) } else { Dim::Dynamic(d.into()) });
        info.inputs = vec![TensorSpec::new("x", DType::F32, dims.to_vec())];
        info.outputs = vec![TensorSpec::new("y", DType::F32, vec![Dim::Dynamic("batch".into())])];
        Ok(Arc::new(ImageShapes(info, self.0.clone())))
    }
}

#[tokio::test]
async fn an_image_model_warms_up_at_the_pipeline_s_size_and_is_skipped_without_it() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let policy =
        BatchPolicy { max_batch_size: 2, max_wait: Duration::from_millis(1), ..BatchPolicy::default() };
    let provider = Arc::new(ImageProvider(seen.clone()));
    let w = ModelWorker::start(provider, ModelSpec::new("m", Device::Cpu, DType::F32), policy).await.unwrap();
    // Without the image size the dynamic height and width cannot be sized: skipped, not failed.
    let warm = w.warm_up(None, None).await.unwrap();
    assert!(warm.skipped.as_deref().is_some_and(|s| s.contains("dynamic dim `h`")), "{warm:?}");
    assert!(seen.lock().unwrap().is_empty());
    let warm = w.warm_up(None, Some(&[3, 48, 192])).await.unwrap();
    assert!(warm.skipped.is_none(), "{warm:?}");
    let seen = seen.lock().unwrap();
    assert!(!seen.is_empty() && seen.iter().all(|s| s[1..] == [3, 48, 192]), "{seen:?}");
    assert_eq!(seen[0][0], 2, "the largest batch first");
}
