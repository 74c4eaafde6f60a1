//! kiln from Python: the native half of the `kiln` package (`kiln._kiln`).
//!
//! # Design
//!
//! One [`Engine`] per Python `kiln.Optimizer`: kiln's own `Optimizer` (embedding,
//! classification) or `Generation` (text and vision-language generation), chosen by the
//! config's `task`, on a tokio runtime the engine owns. Nothing is implemented twice:
//! each method is a call into those types. Every call that waits on kiln
//! releases the GIL ([`Python::detach`]) and wakes every 50 ms to let Python check its
//! signals, so Ctrl-C interrupts a long call (the call is dropped; kiln's own request
//! cancellation frees its slot). Errors become `kiln.KilnError` (or `ValueError` for a
//! bad input or config) carrying kiln's message. Results that are tables (`stats`, the
//! profiler's report, a finished generation) cross as JSON text the Python layer
//! parses; embeddings cross as one float32 `[n, dim]` array, never as per-row objects.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln::runtime::{Event, Generation, Optimizer, Prompt, TokenStream};
use kiln::{Error, KilnConfig, Task};
use numpy::{PyArray1, PyArrayMethods};
use pyo3::create_exception;
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

create_exception!(kiln, KilnError, PyRuntimeError, "An error kiln reports; its message says what and where.");

fn to_py(error: Error) -> PyErr {
    match error {
        Error::InvalidInput(_) | Error::Config(_) => PyValueError::new_err(error.to_string()),
        other => KilnError::new_err(other.to_string()),
    }
}

/// Runs `future` on `runtime` with the GIL released, checking Python's signals every
/// 50 ms: Ctrl-C drops the future and raises `KeyboardInterrupt`.
fn wait<T: Send>(
    py: Python<'_>,
    runtime: &tokio::runtime::Runtime,
    future: impl Future<Output = T> + Send,
) -> PyResult<T> {
    let mut future = std::pin::pin!(future);
    loop {
        let step = py.detach(|| {
            runtime
                .block_on(async { tokio::time::timeout(Duration::from_millis(50), &mut future).await.ok() })
        });
        if let Some(value) = step {
            return Ok(value);
        }
        // Ctrl-C raises KeyboardInterrupt here; the future is dropped with it.
        py.check_signals()?;
    }
}

/// The kiln type the config's task runs; shared with open streams.
#[derive(Clone)]
enum Front {
    Optimizer(Arc<Optimizer>),
    Generation(Arc<Generation>),
    Video(Arc<kiln::video::VideoPipeline>),
}

impl Front {
    /// The profiler's outputs of any.
    fn reports(&self) -> &kiln::runtime::Reports {
        match self {
            Front::Optimizer(o) => o.reports(),
            Front::Generation(g) => g.reports(),
            Front::Video(v) => v.reports(),
        }
    }
}

/// A loaded model with kiln around it.
#[pyclass(module = "kiln._kiln", frozen)]
struct Engine {
    front: std::sync::Mutex<Option<Front>>,
    runtime: Arc<tokio::runtime::Runtime>,
    task: String,
}

fn poisoned<T>(_: T) -> PyErr {
    KilnError::new_err("a previous call panicked")
}

impl Engine {
    fn front(&self) -> PyResult<Front> {
        self.front
            .lock()
            .map_err(poisoned)?
            .clone()
            .ok_or_else(|| KilnError::new_err("this kiln.Optimizer was shut down"))
    }

    /// The error for a call the config's task does not take.
    fn wrong_task(&self, calls: &str, needs: &str) -> PyErr {
        PyValueError::new_err(format!("this model's task is `{}`: {calls} need {needs}", self.task))
    }

    fn optimizer(&self) -> PyResult<Arc<Optimizer>> {
        match self.front()? {
            Front::Optimizer(o) => Ok(o),
            _ => Err(self.wrong_task("embed and classify", "task = \"embed\" or \"classify\"")),
        }
    }

    fn generation(&self) -> PyResult<Arc<Generation>> {
        match self.front()? {
            Front::Generation(g) => Ok(g),
            _ => Err(self.wrong_task("generate and stream", "task = \"generate\"")),
        }
    }

    fn video_pipeline(&self) -> PyResult<Arc<kiln::video::VideoPipeline>> {
        match self.front()? {
            Front::Video(v) => Ok(v),
            _ => Err(self.wrong_task("video", "task = \"video\"")),
        }
    }
}

fn prompt_from(text: Option<String>, messages_json: Option<String>) -> PyResult<Prompt> {
    match (text, messages_json) {
        (Some(t), None) => Ok(Prompt::Text(t)),
        (None, Some(m)) => serde_json::from_str(&m).map(Prompt::Messages).map_err(|e| {
            PyValueError::new_err(format!("messages: {e}; expected [{{\"role\", \"content\"}}, ...]"))
        }),
        _ => Err(PyValueError::new_err("give a prompt (a string) or messages (a list of {role, content})")),
    }
}

#[pymethods]
impl Engine {
    /// Loads the config at `path` (or kiln's defaults when `None`) with `sets`
    /// (`SECTION.KEY=VALUE`, as `--set`), then its model.
    #[new]
    #[pyo3(signature = (path, sets))]
    fn new(py: Python<'_>, path: Option<std::path::PathBuf>, sets: Vec<String>) -> PyResult<Self> {
        let config = KilnConfig::load(path.as_deref(), &sets).map_err(to_py)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(|e| KilnError::new_err(format!("starting kiln's runtime: {e}")))?;
        let task = serde_json::to_value(config.task)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let front = match config.task {
            Task::Generate => {
                wait(py, &runtime, Generation::from_config(config))?.map(|g| Front::Generation(Arc::new(g)))
            }
            Task::Video => wait(py, &runtime, kiln::video::VideoPipeline::from_config(config))?
                .map(|v| Front::Video(Arc::new(v))),
            _ => wait(py, &runtime, Optimizer::from_config(config))?.map(|o| Front::Optimizer(Arc::new(o))),
        }
        .map_err(to_py)?;
        Ok(Engine { front: std::sync::Mutex::new(Some(front)), runtime: Arc::new(runtime), task })
    }

    /// The config's task: `embed`, `classify`, `generate` or `video`.
    #[getter]
    fn task(&self) -> &str {
        &self.task
    }

    /// `texts` embedded, as float32 `[len(texts), dim]`, in order. Calls of one batch
    /// each, the texts sorted by length first so a batch pads little, two in flight.
    fn embed<'py>(&self, py: Python<'py>, texts: Vec<String>) -> PyResult<Bound<'py, PyAny>> {
        let optimizer = self.optimizer()?;
        let n = texts.len();
        let vectors = wait(py, &self.runtime, optimizer.embed_all(texts))?.map_err(to_py)?;
        let dim = vectors.first().map_or(0, Vec::len);
        let mut flat = Vec::with_capacity(n * dim);
        for v in &vectors {
            flat.extend_from_slice(v);
        }
        let array = PyArray1::from_vec(py, flat);
        Ok(array.reshape([n, dim])?.into_any())
    }

    /// Images (paths or encoded bytes) classified: per image, JSON of its top classes or
    /// `{"error": message}`.
    fn classify(&self, py: Python<'_>, images: Vec<Bound<'_, PyAny>>) -> PyResult<Vec<String>> {
        let optimizer = self.optimizer()?;
        let mut inputs = Vec::with_capacity(images.len());
        for (i, image) in images.iter().enumerate() {
            if let Ok(bytes) = image.extract::<Vec<u8>>() {
                inputs.push(kiln::vision::ImageInput::Bytes {
                    name: format!("image {i}"),
                    bytes: bytes.into(),
                });
            } else if let Ok(path) = image.extract::<std::path::PathBuf>() {
                inputs.push(kiln::vision::ImageInput::Path(path));
            } else {
                return Err(PyValueError::new_err(format!("image {i}: expected a path or bytes")));
            }
        }
        let results = wait(py, &self.runtime, optimizer.classify(&inputs))?.map_err(to_py)?;
        Ok(results
            .into_iter()
            .map(|r| match r {
                Ok(c) => serde_json::to_string(&c).unwrap_or_default(),
                Err(e) => serde_json::json!({"error": e.to_string()}).to_string(),
            })
            .collect())
    }

    /// One generation to its end: JSON of kiln's `Generated`.
    #[pyo3(signature = (prompt=None, messages=None))]
    fn generate(&self, py: Python<'_>, prompt: Option<String>, messages: Option<String>) -> PyResult<String> {
        let generation = self.generation()?;
        let prompt = prompt_from(prompt, messages)?;
        let done = wait(py, &self.runtime, generation.generate(prompt))?.map_err(to_py)?;
        serde_json::to_string(&done).map_err(|e| KilnError::new_err(e.to_string()))
    }

    /// A generation's pieces as they come.
    #[pyo3(signature = (prompt=None, messages=None))]
    fn stream(&self, prompt: Option<String>, messages: Option<String>) -> PyResult<Stream> {
        let generation = self.generation()?;
        let tokens = generation.stream(prompt_from(prompt, messages)?).map_err(to_py)?;
        Ok(Stream {
            tokens: std::sync::Mutex::new(Some(tokens)),
            generation: std::sync::Mutex::new(Some(generation)),
            runtime: self.runtime.clone(),
            done: std::sync::Mutex::new(None),
        })
    }

    /// Renders the configured video (`task = "video"`): its frames as float32
    /// `[frames, 3, height, width]` (RGB, as the `.npy` output holds them), and JSON of the
    /// render (fps, keyframe indices, seconds, cached keyframes). With `path`, also
    /// written there as `kiln run` writes it (.gif, .mp4, .png, .npy).
    #[pyo3(signature = (path=None))]
    fn video<'py>(
        &self,
        py: Python<'py>,
        path: Option<std::path::PathBuf>,
    ) -> PyResult<(Bound<'py, PyAny>, String)> {
        let pipeline = self.video_pipeline()?;
        if let Some(path) = &path {
            kiln::video::write::check_path(path).map_err(to_py)?;
        }
        let video =
            wait(py, &self.runtime, async { pipeline.render(&|_, _, _| {}).await })?.map_err(to_py)?;
        if let Some(path) = &path {
            kiln::video::write::write(&video, path).map_err(to_py)?;
        }
        let (n, h, w) = (video.frames.len(), video.height, video.width);
        let mut flat = Vec::with_capacity(n * 3 * h * w);
        for frame in &video.frames {
            flat.extend_from_slice(frame);
        }
        let frames = PyArray1::from_vec(py, flat).reshape([n, 3, h, w])?.into_any();
        let info = serde_json::json!({
            "fps": video.fps,
            "keyframes": video.keyframes,
            "keyframe_seconds": video.keyframe_seconds,
            "seconds": video.seconds,
            "cached_keyframes": video.cached_keyframes,
        });
        Ok((frames, info.to_string()))
    }

    /// JSON of what kiln has done so far (`Stats`, `GenerationStats`, or the video's
    /// two stages' batch stats).
    fn stats(&self) -> PyResult<String> {
        let json = match self.front()? {
            Front::Optimizer(o) => serde_json::to_string(&o.stats()),
            Front::Generation(g) => serde_json::to_string(&g.stats()),
            Front::Video(v) => {
                let (denoise, interpolate) = v.batch_stats();
                serde_json::to_string(&serde_json::json!({"denoise": denoise, "interpolate": interpolate}))
            }
        };
        json.map_err(|e| KilnError::new_err(e.to_string()))
    }

    /// JSON of the profiler's report (durations, peak memory, CPU, GPU, the MLX
    /// allocator), or `null` with `profiler.enabled` off.
    fn report(&self) -> PyResult<String> {
        let report = self.front()?.reports().report();
        serde_json::to_string(&report).map_err(|e| KilnError::new_err(e.to_string()))
    }

    /// Records a span `name` that started `seconds_ago` and ends now in the profiler
    /// (the Python layer's `monitor(name)` context manager).
    fn record_span(&self, name: &str, seconds_ago: f64) -> PyResult<()> {
        let elapsed = Duration::from_secs_f64(seconds_ago.max(0.0));
        let start = Instant::now().checked_sub(elapsed).unwrap_or_else(Instant::now);
        self.front()?.reports().profiler().record(name, start, elapsed);
        Ok(())
    }

    /// Stops the model and the trackers; JSON of the final stats. Later calls fail.
    fn shutdown(&self, py: Python<'_>) -> PyResult<String> {
        let mut slot = self.front.lock().map_err(poisoned)?;
        // An open stream shares the model: then it stays, usable, until the stream ends.
        let still_open =
            || KilnError::new_err("a stream of this optimizer is still open; finish or close it first");
        let json = match slot.take() {
            None => return Ok("null".into()),
            Some(Front::Optimizer(o)) => match Arc::try_unwrap(o) {
                Ok(o) => {
                    drop(slot);
                    serde_json::to_string(&wait(py, &self.runtime, o.shutdown())?.map_err(to_py)?)
                }
                Err(o) => {
                    *slot = Some(Front::Optimizer(o));
                    return Err(still_open());
                }
            },
            Some(Front::Generation(g)) => match Arc::try_unwrap(g) {
                Ok(g) => {
                    drop(slot);
                    serde_json::to_string(&wait(py, &self.runtime, g.shutdown())?)
                }
                Err(g) => {
                    *slot = Some(Front::Generation(g));
                    return Err(still_open());
                }
            },
            Some(Front::Video(v)) => match Arc::try_unwrap(v) {
                Ok(v) => {
                    drop(slot);
                    let (denoise, interpolate) = v.batch_stats();
                    wait(py, &self.runtime, v.shutdown())?;
                    serde_json::to_string(
                        &serde_json::json!({"denoise": denoise, "interpolate": interpolate}),
                    )
                }
                Err(v) => {
                    *slot = Some(Front::Video(v));
                    return Err(still_open());
                }
            },
        };
        json.map_err(|e| KilnError::new_err(e.to_string()))
    }
}

/// A generation's pieces: each `next` is `(token id, text)`; the finished generation's
/// JSON is `done` once the iterator ends.
#[pyclass(module = "kiln._kiln", frozen)]
struct Stream {
    tokens: std::sync::Mutex<Option<TokenStream>>,
    /// Keeps the generation running while the stream is open; let go when it ends.
    generation: std::sync::Mutex<Option<Arc<Generation>>>,
    runtime: Arc<tokio::runtime::Runtime>,
    done: std::sync::Mutex<Option<String>>,
}

#[pymethods]
impl Stream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<(u32, String)>> {
        let mut guard = self.tokens.lock().map_err(poisoned)?;
        let Some(tokens) = guard.as_mut() else { return Ok(None) };
        let event = wait(py, &self.runtime, tokens.next())?;
        if let Some(Event::Token { id, text }) = event {
            return Ok(Some((id, text)));
        }
        // The end, one way or another: the stream lets go of the generation.
        *guard = None;
        self.release();
        match event {
            Some(Event::Done(generated)) => {
                *self.done.lock().map_err(poisoned)? = serde_json::to_string(&generated).ok();
                Ok(None)
            }
            Some(Event::Failed(e)) => Err(to_py(e)),
            _ => Ok(None),
        }
    }

    /// JSON of the finished generation, once the iterator has ended.
    #[getter]
    fn done(&self) -> Option<String> {
        self.done.lock().ok().and_then(|d| d.clone())
    }

    /// Stops the generation (its slot and KV cache are freed before the next step).
    fn close(&self) {
        if let Ok(mut guard) = self.tokens.lock() {
            guard.take();
        }
        self.release();
    }
}

impl Stream {
    fn release(&self) {
        if let Ok(mut generation) = self.generation.lock() {
            generation.take();
        }
    }
}

/// The native module.
#[pymodule]
fn _kiln(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Engine>()?;
    m.add_class::<Stream>()?;
    m.add("KilnError", m.py().get_type::<KilnError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("PROVIDERS", kiln::ENABLED_PROVIDERS.to_vec())?;
    Ok(())
}
