//! [`Generation`]: the generate task — prompts in, text out token by token, many
//! sequences sharing each step (continuous batching).
//!
//! One thread owns the provider's [`Generator`] and loops: it takes new requests
//! between steps (up to `batching.max_batch_size` sequences, and only while every
//! admitted sequence's whole context fits `generate.kv_cache_mb`), runs one step over
//! all of them — a new sequence's whole prompt (prefill) next to one token of each
//! running one (decode) — samples each sequence's next token, and sends it to that
//! sequence's stream. A sequence leaves when it ends (end-of-turn token,
//! `max_new_tokens`, a stop string, the context) or when its stream is dropped; its KV
//! cache is freed then, and a waiting request can take its place at the next step.
//!
//! Memory: loading is admitted only when the weights (the provider's estimate) plus
//! `generate.kv_cache_mb` fit what the device has free and `models.max_bytes`. While
//! memory is above `memory.high_watermark` (until it is back under the low one) no
//! new sequence joins a running batch: the running ones finish, one waiting request at
//! a time runs, and `stats().pressure_holds` counts the steps that held one back.

mod engine;
mod prefix;
mod sampler;
mod stats;
mod vision;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kiln_core::{Error, GenerateConfig, Generator, GeneratorInfo, KilnConfig, ModelSpec, Profiler, Result};
use kiln_text::chat::{Message, render_chat};
use serde::Serialize;
use tokenizers::Tokenizer;

use engine::{Engine, Job, JobImage, warm_up};
use stats::Counters;
pub use stats::GenerationStats;
use vision::{Vision, image_input};

use crate::monitor::{ResourceMonitor, Subscription};
use crate::parts::{Parts, Reports, start_monitor};
use crate::profilers::build_profiler;
use crate::tracking::{TrackerFailures, TrackerHub};

/// What to generate from.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// Text: one user message with the chat template on (`generate.chat_template`), or
    /// the model's input as it is with it off.
    Text(String),
    /// Chat messages, rendered with the model's chat template.
    Messages(Vec<Message>),
    /// Token ids, as they are (no template, no BOS added).
    Tokens(Vec<u32>),
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model ended its turn (an end-of-sequence token).
    Stop,
    /// `max_new_tokens` were generated.
    Length,
    /// A `generate.stop` string came (it is not in the text).
    StopString,
    /// The model's context is full.
    Context,
    /// `generate.timeout_ms` passed: the text is what came before it.
    Timeout,
}

/// A finished generation.
#[derive(Debug, Clone, Serialize)]
pub struct Generated {
    /// The generated text (without the prompt, end tokens or stop strings).
    pub text: String,
    /// Generated token ids (the end-of-sequence token excluded).
    pub tokens: Vec<u32>,
    /// Tokens of the prompt as the model saw it.
    pub prompt_tokens: usize,
    /// Of those, the image tokens (a vision-language prompt's images; 0 otherwise).
    pub image_tokens: usize,
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// From the request to its first token, milliseconds.
    pub time_to_first_token_ms: f64,
    /// From the request to its end, milliseconds.
    pub elapsed_ms: f64,
}

/// What a stream yields.
#[derive(Debug)]
pub enum Event {
    /// A new piece of text (whole UTF-8 characters; a token that ends inside a
    /// character waits for the next) and the id of the token that completed it.
    Token {
        /// The token id.
        id: u32,
        /// Text it completes (may be empty while a stop string is being matched).
        text: String,
    },
    /// The end, with everything.
    Done(Generated),
    /// The sequence failed; the others go on.
    Failed(Error),
}

/// One request's tokens as they are made. Dropping it cancels the request: its slot
/// and KV cache are freed before the next step.
pub struct TokenStream {
    events: flume::Receiver<Event>,
}

impl TokenStream {
    /// The next event; `None` after `Done` or `Failed`.
    pub async fn next(&mut self) -> Option<Event> {
        self.events.recv_async().await.ok()
    }

    /// Waits for the end; the text pieces are dropped.
    pub async fn finish(mut self) -> Result<Generated> {
        while let Some(event) = self.next().await {
            match event {
                Event::Token { .. } => {}
                Event::Done(g) => return Ok(g),
                Event::Failed(e) => return Err(e),
            }
        }
        Err(Error::Shutdown("the generation engine stopped".into()))
    }
}

/// The generate task's front: tokenizer, chat template, and the engine thread.
pub struct Generation {
    /// A vision-language model's image side; `None` for a text model.
    vision: Option<Vision>,
    jobs: Option<flume::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
    tokenizer: Arc<Tokenizer>,
    info: GeneratorInfo,
    config: GenerateConfig,
    counters: Arc<Counters>,
    load_time: Duration,
    warmup_time: Option<Duration>,
    profiler: Arc<dyn Profiler>,
    /// The profiler's outputs.
    reports: Reports,
    trackers: Option<TrackerHub>,
    /// The memory readings behind admission, the pressure flag and the profiler.
    _monitor: Arc<ResourceMonitor>,
    _pressure: Option<Subscription>,
}

impl Generation {
    /// Builds the provider the config names and loads the model as a generator:
    /// [`Parts::from_config`], then [`from_parts`](Self::from_parts).
    pub async fn from_config(config: KilnConfig) -> Result<Self> {
        Self::from_parts(Parts::from_config(config)?).await
    }

    /// Loads the model of `parts` as a generator on its device — admitted only when its
    /// weights and `generate.kv_cache_mb` fit — warms it up, and starts the engine and
    /// the trackers. Generation runs one copy of its model: `model.gpu_ids` may list one
    /// GPU.
    pub async fn from_parts(mut parts: Parts) -> Result<Self> {
        let config = parts.config.clone();
        if parts.devices.len() > 1 {
            return Err(Error::Unsupported(format!(
                "generation runs one copy of its model; model.gpu_ids lists {} GPUs ({:?}): list one",
                parts.devices.len(),
                config.model.gpu_ids
            )));
        }
        let started = parts.started;
        let spec = parts.spec();
        admit(&config, &spec, parts.provider.estimate_memory(&spec)?.unwrap_or(0), &parts.monitor)?;
        let generator = parts.provider.load_generator(&spec).await?;
        let loaded = started.elapsed();
        let warmed = Instant::now();
        let warmup = match config.generate.warmup {
            true => {
                let (generator, sequences) = (generator.clone(), config.batching.max_batch_size.max(1));
                tokio::task::spawn_blocking(move || warm_up(&*generator, sequences))
                    .await
                    .map_err(|e| Error::backend("kiln", format!("the warm-up thread failed: {e}")))??;
                Some(warmed.elapsed())
            }
            false => None,
        };
        let reports = parts.reports();
        let mut generation =
            Self::start_on(generator, &config, parts.monitor.clone(), parts.profiler.clone(), reports)?;
        generation.load_time = loaded;
        generation.warmup_time = warmup;
        generation.profiler.record("load_model", started, loaded);
        if let Some(took) = warmup {
            generation.profiler.record("generate_warmup", warmed, took);
        }
        let counters = generation.counters.clone();
        generation.trackers = parts
            .start_trackers(Box::new(move || metrics(&counters.snapshot())), TrackerFailures::default())?;
        Ok(generation)
    }

    /// Starts the engine on a loaded generator (a custom provider's, or a test's).
    pub fn start(generator: Arc<dyn Generator>, config: &KilnConfig) -> Result<Self> {
        config.validate()?;
        let monitor = start_monitor(config);
        let profiler = build_profiler(&config.profiler, &monitor)?;
        let reports = Reports::new(profiler.clone(), None, config);
        Self::start_on(generator, config, monitor, profiler, reports)
    }

    fn start_on(
        generator: Arc<dyn Generator>,
        config: &KilnConfig,
        monitor: Arc<ResourceMonitor>,
        profiler: Arc<dyn Profiler>,
        reports: Reports,
    ) -> Result<Self> {
        let info = generator.info().clone();
        let tokenizer = Arc::new(kiln_text::gguf::generation_tokenizer(&info.tokenizer)?);
        let counters = Arc::new(Counters::default());
        let (jobs, queue) = flume::bounded::<Job>(config.batching.queue_capacity.max(1));
        let high = config.memory.high_watermark;
        let pressure = config.memory.enabled.then(|| {
            let reading = monitor.latest().unwrap_or_else(|| monitor.sample_now());
            Arc::new(AtomicBool::new(reading.fullest_fraction() > high))
        });
        let subscription = pressure.clone().map(|flag| {
            let low = config.memory.low_watermark;
            monitor.subscribe(move |reading| {
                let used = reading.fullest_fraction();
                if used > high {
                    flag.store(true, Ordering::Relaxed);
                } else if used < low {
                    flag.store(false, Ordering::Relaxed);
                }
            })
        });
        let limits = engine::Limits {
            max_sequences: config.batching.max_batch_size.max(1),
            kv_budget: config.generate.kv_cache_mb.saturating_mul(1 << 20),
            pressure,
            prefill_chunk: config.generate.prefill_chunk,
        };
        let vision = match &info.vision {
            Some(v) => Some(Vision::new(v, config)?),
            None => None,
        };
        let engine = Engine::new(
            generator,
            tokenizer.clone(),
            limits,
            counters.clone(),
            profiler.clone(),
            config.generate.image_cache_mb.saturating_mul(1 << 20),
            config.generate.prefix_cache_mb.saturating_mul(1 << 20),
        );
        let thread = std::thread::Builder::new()
            .name("kiln-generate".into())
            .spawn(move || engine.run(queue))
            .map_err(|e| Error::backend("kiln", format!("starting the generation thread: {e}")))?;
        Ok(Generation {
            vision,
            jobs: Some(jobs),
            thread: Some(thread),
            tokenizer,
            info,
            config: config.generate.clone(),
            counters,
            load_time: Duration::ZERO,
            warmup_time: None,
            profiler,
            reports,
            trackers: None,
            _monitor: monitor,
            _pressure: subscription,
        })
    }

    /// The model's description.
    pub fn info(&self) -> &GeneratorInfo {
        &self.info
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// How long loading took.
    pub fn load_time(&self) -> Duration {
        self.load_time
    }

    /// How long the warm-up after loading took (`generate.warmup`); `None` without one.
    pub fn warmup_time(&self) -> Option<Duration> {
        self.warmup_time
    }

    /// The token ids the model sees for `prompt` (template applied, BOS added as the
    /// model asks; each image's placeholder repeated once per image token).
    pub fn prompt_tokens(&self, prompt: &Prompt, chat_template: bool) -> Result<Vec<u32>> {
        Ok(self.prompt_parts(prompt, chat_template)?.0)
    }

    /// The prompt's tokens and its images, processed. Images are read and processed
    /// here (each error names its image); the vision tower runs on the engine thread.
    fn prompt_parts(&self, prompt: &Prompt, chat_template: bool) -> Result<(Vec<u32>, Vec<JobImage>)> {
        let inputs = match prompt {
            Prompt::Messages(m) => {
                m.iter().flat_map(Message::images).map(image_input).collect::<Result<Vec<_>>>()?
            }
            _ => Vec::new(),
        };
        if !inputs.is_empty() && self.vision.is_none() {
            return Err(Error::InvalidInput(format!(
                "{} is a text model and takes no images; send text only, or serve a vision-language model",
                self.info.name
            )));
        }
        let text = match prompt {
            Prompt::Tokens(ids) => return Ok((ids.clone(), Vec::new())),
            Prompt::Text(t) if !chat_template => t.clone(),
            Prompt::Text(t) => self.chat(&[Message::text("user", t.clone())])?,
            Prompt::Messages(_) if !inputs.is_empty() && !chat_template => {
                return Err(Error::InvalidInput(
                    "a prompt with images needs the chat template (generate.chat_template = true): it places them"
                        .into(),
                ));
            }
            Prompt::Messages(m) => self.chat(m)?,
        };
        let (text, images) = match &self.vision {
            Some(vision) if !inputs.is_empty() => vision.expand(&text, &inputs)?,
            _ => (text, Vec::new()),
        };
        let encoding = self
            .tokenizer
            .encode(text.as_str(), false)
            .map_err(|e| Error::InvalidInput(format!("tokenizing the prompt: {e}")))?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        if let (true, Some(bos)) = (self.info.add_bos, self.info.bos_token_id) {
            ids.push(bos);
        }
        ids.extend_from_slice(encoding.get_ids());
        Ok((ids, images))
    }

    fn chat(&self, messages: &[Message]) -> Result<String> {
        let template = self.info.chat_template.as_deref().ok_or_else(|| {
            Error::Unsupported(format!(
                "{} has no chat template; send a plain prompt with generate.chat_template = false",
                self.info.name
            ))
        })?;
        let token = |id: Option<u32>| id.and_then(|i| self.tokenizer.id_to_token(i)).unwrap_or_default();
        render_chat(
            template,
            messages,
            &token(self.info.bos_token_id),
            &token(self.info.eos_token_ids.first().copied()),
        )
    }

    /// Streams the tokens of `prompt` with the config's `[generate]` settings.
    pub fn stream(&self, prompt: Prompt) -> Result<TokenStream> {
        self.stream_with(prompt, self.config.clone())
    }

    /// Streams the tokens of `prompt` with `settings` (a request's own temperature,
    /// seed, ...).
    pub fn stream_with(&self, prompt: Prompt, settings: GenerateConfig) -> Result<TokenStream> {
        if let Some(issue) = settings.issues().into_iter().next() {
            return Err(Error::Config(vec![issue]));
        }
        let (tokens, images) = self.prompt_parts(&prompt, settings.chat_template)?;
        let context = self.info.context_length;
        if tokens.is_empty() {
            return Err(Error::InvalidInput("an empty prompt (no tokens); send some text".into()));
        }
        if tokens.len() >= context {
            return Err(Error::InvalidInput(format!(
                "a prompt of {} tokens leaves no room in {}'s context of {context} tokens; shorten it",
                tokens.len(),
                self.info.name
            )));
        }
        let need =
            (tokens.len() + settings.max_new_tokens).min(context) as u64 * self.info.kv_bytes_per_token;
        let budget = self.config.kv_cache_mb.saturating_mul(1 << 20);
        if budget > 0 && need > budget {
            return Err(Error::InvalidInput(format!(
                "this request needs {:.1} MiB of KV cache ({} prompt + {} new tokens), more than generate.kv_cache_mb = {}",
                need as f64 / (1 << 20) as f64,
                tokens.len(),
                settings.max_new_tokens,
                self.config.kv_cache_mb
            )));
        }
        let (events, receiver) = flume::unbounded();
        let image_tokens = images.iter().map(|i| i.patches.grid_thw.iter().product::<usize>()).sum::<usize>()
            / self.vision.as_ref().map_or(1, Vision::tokens_per_patch_divisor);
        let job =
            Job { tokens, settings, events, submitted: Instant::now(), reserve: need, images, image_tokens };
        let jobs = self.jobs.as_ref().ok_or_else(|| Error::Shutdown("generation is shutting down".into()))?;
        self.counters.submitted();
        jobs.try_send(job).map_err(|e| match e {
            flume::TrySendError::Full(_) => {
                self.counters.rejected();
                Error::Overloaded { model: self.info.name.clone(), capacity: jobs.capacity().unwrap_or(0) }
            }
            flume::TrySendError::Disconnected(_) => Error::Shutdown("the generation engine stopped".into()),
        })?;
        Ok(TokenStream { events: receiver })
    }

    /// Generates the whole text of `prompt`.
    pub async fn generate(&self, prompt: Prompt) -> Result<Generated> {
        self.stream(prompt)?.finish().await
    }

    /// The profiler's outputs, as every front writes them: `reports().report()` (the
    /// report so far, with the backend allocator's figures; `None` with
    /// `profiler.enabled` off), `write_profile(path)` and `write_trace(path)`.
    pub fn reports(&self) -> &Reports {
        &self.reports
    }

    /// Counters, gauges and latency percentiles so far.
    pub fn stats(&self) -> GenerationStats {
        self.counters.snapshot()
    }

    /// Stops taking requests, lets running ones finish, stops the engine, and gives the
    /// trackers the summary and the profile.
    pub async fn shutdown(mut self) -> GenerationStats {
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        let stats = self.counters.snapshot();
        if let Some(hub) = self.trackers.take() {
            hub.finish(metrics(&stats), self.reports.report()).await;
        }
        stats
    }
}

/// Refuses a load whose weights (`weights`, the provider's estimate) and KV-cache
/// budget do not fit `models.max_bytes` or what `spec.device` has free.
fn admit(config: &KilnConfig, spec: &ModelSpec, weights: u64, monitor: &ResourceMonitor) -> Result<()> {
    let kv = config.generate.kv_cache_mb.saturating_mul(1 << 20);
    let required = weights.saturating_add(kv);
    let refuse = |available| Error::OutOfMemory {
        what: format!(
            "model {} ({} MiB of weights + generate.kv_cache_mb = {} MiB of KV cache)",
            spec.path.display(),
            weights >> 20,
            config.generate.kv_cache_mb
        ),
        required,
        available,
        device: spec.device,
    };
    let limit = config.models.max_bytes;
    if limit > 0 && required > limit {
        return Err(refuse(limit));
    }
    match monitor.sample_now().available(spec.device) {
        Some(available) if required > available => Err(refuse(available)),
        _ => Ok(()),
    }
}

/// What the trackers get each step and at the end (`generate/...` keys).
fn metrics(s: &GenerationStats) -> kiln_core::Metrics {
    [
        ("generate/requests", s.requests as f64),
        ("generate/completed", s.completed as f64),
        ("generate/cancelled", s.cancelled as f64),
        ("generate/failed", s.failed as f64),
        ("generate/prompt_tokens", s.prompt_tokens as f64),
        ("generate/generated_tokens", s.generated_tokens as f64),
        ("generate/running", s.running as f64),
        ("generate/waiting", s.waiting as f64),
        ("generate/sequences_per_step", s.mean_sequences_per_step),
        ("generate/kv_cache_mb", s.kv_cache_bytes as f64 / (1 << 20) as f64),
        ("generate/pressure_holds", s.pressure_holds as f64),
        ("generate/images", s.images as f64),
        ("generate/image_cache_hits", s.image_cache_hits as f64),
        ("generate/image_tokens", s.image_tokens as f64),
        ("generate/image_encode_ms", s.image_encode_ms),
        ("generate/prefix_cache_hits", s.prefix_cache_hits as f64),
        ("generate/prefix_cached_tokens", s.prefix_cached_tokens as f64),
        ("generate/ttft_p50_ms", s.ttft_ms[0]),
        ("generate/ttft_p99_ms", s.ttft_ms[1]),
        ("generate/inter_token_p50_ms", s.inter_token_ms[0]),
        ("generate/inter_token_p99_ms", s.inter_token_ms[1]),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

impl Drop for Generation {
    fn drop(&mut self) {
        // Closing the queue ends the engine once running sequences finish.
        self.jobs.take();
    }
}
