//! One model on one dedicated thread, fed by a channel, answering on oneshots.
//!
//! The thread loads the model (so a slow load never blocks the async runtime) and then
//! runs jobs one at a time, timing each where the work happens. A panic inside a
//! backend is caught and returned as that request's error; the worker keeps serving.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kiln_core::{Error, Inputs, Model, ModelInfo, ModelSpec, Outputs, Provider, Result};
use tokio::sync::oneshot;

/// What a model run returns: the outputs and how long the model itself took.
#[derive(Debug)]
pub struct RunOutput {
    /// The model's outputs.
    pub outputs: Outputs,
    /// Time spent in `Model::run`, measured on the worker thread.
    pub elapsed: Duration,
}

struct Job {
    inputs: Inputs,
    reply: oneshot::Sender<Result<RunOutput>>,
}

/// A handle to a model running on its own thread.
pub struct ModelWorker {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    info: ModelInfo,
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}

impl ModelWorker {
    /// Starts the thread, loads the model there, and returns once it is ready.
    pub async fn start(provider: Arc<dyn Provider>, spec: ModelSpec) -> Result<Self> {
        let (jobs, queue) = mpsc::channel::<Job>();
        let (ready, is_ready) = oneshot::channel::<Result<ModelInfo>>();
        let runtime = tokio::runtime::Handle::current();
        let name = format!("kiln-model-{}", provider.name());
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                let provider_name = provider.name().to_string();
                let loaded = catch_unwind(AssertUnwindSafe(|| runtime.block_on(provider.load(&spec))))
                    .unwrap_or_else(|p| {
                        Err(Error::backend(
                            &provider_name,
                            format!("panicked while loading: {}", panic_message(p)),
                        ))
                    });
                let model: Arc<dyn Model> = match loaded {
                    Ok(model) => {
                        let _ = ready.send(Ok(model.info().clone()));
                        model
                    }
                    Err(e) => {
                        let _ = ready.send(Err(e));
                        return;
                    }
                };
                for job in queue {
                    if job.reply.is_closed() {
                        continue; // the caller gave up; skip the work
                    }
                    let start = Instant::now();
                    let result =
                        catch_unwind(AssertUnwindSafe(|| model.run(&job.inputs))).unwrap_or_else(|p| {
                            Err(Error::backend(
                                &provider_name,
                                format!("panicked while running: {}", panic_message(p)),
                            ))
                        });
                    let _ =
                        job.reply.send(result.map(|outputs| RunOutput { outputs, elapsed: start.elapsed() }));
                }
            })
            .map_err(|e| Error::io("starting a thread for", "the model worker", e))?;
        let info =
            is_ready.await.map_err(|_| Error::Shutdown("the model worker exited while loading".into()))??;
        Ok(ModelWorker { jobs: Some(jobs), thread: Some(thread), info })
    }

    /// The loaded model's description.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Runs one batch on the worker thread.
    pub async fn run(&self, inputs: Inputs) -> Result<RunOutput> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .as_ref()
            .ok_or_else(|| Error::Shutdown("the model worker is stopped".into()))?
            .send(Job { inputs, reply })
            .map_err(|_| Error::Shutdown("the model worker has stopped".into()))?;
        answer.await.map_err(|_| Error::Shutdown("the model worker stopped before answering".into()))?
    }

    /// Stops taking jobs, lets queued ones finish, and waits for the thread to end.
    pub async fn shutdown(mut self) {
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

impl Drop for ModelWorker {
    fn drop(&mut self) {
        // Closing the channel ends the thread after its current job; not joined here,
        // since drop may run on an async worker thread.
        self.jobs.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::{Capabilities, DType, Device, Tensor, async_trait};

    /// Fault injection: a model that panics on an empty input and echoes otherwise.
    struct Flaky(ModelInfo);
    impl Model for Flaky {
        fn info(&self) -> &ModelInfo {
            &self.0
        }
        fn run(&self, inputs: &Inputs) -> Result<Outputs> {
            assert!(!inputs.is_empty(), "fault injected: empty input");
            Ok(inputs.clone())
        }
    }
    struct FlakyProvider;
    #[async_trait]
    impl Provider for FlakyProvider {
        fn name(&self) -> &str {
            "flaky"
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities::cpu_only(vec![DType::F32])
        }
        async fn load(&self, spec: &ModelSpec) -> Result<Arc<dyn Model>> {
            if spec.path.as_os_str() == "panic" {
                panic!("fault injected: load");
            }
            Ok(Arc::new(Flaky(ModelInfo::new("flaky", "flaky", spec.device, spec.dtype))))
        }
    }

    #[tokio::test]
    async fn a_panicking_run_fails_that_request_and_the_worker_keeps_serving() {
        let worker =
            ModelWorker::start(Arc::new(FlakyProvider), ModelSpec::new("m", Device::Cpu, DType::F32))
                .await
                .unwrap();
        let err = worker.run(Inputs::new()).await.unwrap_err().to_string();
        assert!(err.contains("panicked while running: fault injected: empty input"), "{err}");
        let one = Inputs::new().with("x", Tensor::from_vec(vec![1], vec![1f32]).unwrap());
        let out = worker.run(one.clone()).await.unwrap();
        assert_eq!(out.outputs, one);
        worker.shutdown().await;
    }

    #[tokio::test]
    async fn a_panicking_load_is_an_error_not_a_crash() {
        let err =
            ModelWorker::start(Arc::new(FlakyProvider), ModelSpec::new("panic", Device::Cpu, DType::F32))
                .await
                .err()
                .unwrap()
                .to_string();
        assert!(err.contains("panicked while loading: fault injected: load"), "{err}");
    }
}
