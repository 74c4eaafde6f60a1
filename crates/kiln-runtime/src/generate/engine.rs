//! The generation thread: the [`Engine`] and its named steps (receive, admit with the
//! prompts' images, evict cancelled, step, emit, finish), the stop-string hold-back and
//! the warm-up. What it counts is in `stats.rs`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use kiln_core::{
    Error, GenerateConfig, Generator, ImagePatches, Next, Profiler, SequenceCache, StepImage, StepItem,
    Tensor,
};
use kiln_text::gguf::IncrementalDecoder;
use tokenizers::Tokenizer;

use super::prefix::{self, PrefixCache};
use super::sampler::Sampler;
use super::stats::{Counters, record};
use super::{Event, FinishReason, Generated};

/// A request waiting for a slot.
pub(super) struct Job {
    pub(super) tokens: Vec<u32>,
    pub(super) settings: GenerateConfig,
    pub(super) events: flume::Sender<Event>,
    pub(super) submitted: Instant,
    /// KV-cache bytes its whole context takes.
    pub(super) reserve: u64,
    /// A vision-language prompt's images, processed, in placeholder order.
    pub(super) images: Vec<JobImage>,
    /// The prompt tokens its images take.
    pub(super) image_tokens: usize,
}

/// One image of a prompt: the processor's patches and their content key.
pub(super) struct JobImage {
    pub(super) patches: ImagePatches,
    /// Hash of the patches (and so of the image and the processor's settings): the
    /// image cache's key.
    pub(super) key: u128,
}

/// An encoded image and its grid, ready for a prompt's step.
type Encoded = (Arc<Tensor>, [usize; 3]);

pub(super) struct Limits {
    pub(super) max_sequences: usize,
    /// 0: unbounded.
    pub(super) kv_budget: u64,
    /// Set while memory is above the high watermark: nothing joins a running batch.
    pub(super) pressure: Option<Arc<AtomicBool>>,
    /// Prompt tokens one step feeds at most, over all the prompts being read
    /// (`generate.prefill_chunk`; 0: whole prompts). Prompts with images go whole.
    pub(super) prefill_chunk: usize,
}

/// A sequence in the running batch.
struct Running {
    job: Job,
    cache: Box<dyn SequenceCache>,
    /// Prompt and generated tokens (for the repetition penalty).
    history: Vec<u32>,
    generated: Vec<u32>,
    /// What the next step feeds: the prompt first, then the last sampled token.
    feed: Vec<u32>,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    text: String,
    /// Bytes of `text` already sent.
    sent: usize,
    first_token: Option<Instant>,
    last_token: Instant,
    /// The prompt's encoded images, until its first step has read them.
    images: Vec<Encoded>,
    /// The prompt's prefix-cache signature, until its prefill is kept there.
    signature: Option<Vec<u64>>,
    /// Logits of a prompt found whole in the prefix cache: its first token comes from
    /// them, with nothing to compute.
    kept_logits: Option<Vec<f32>>,
}

impl Running {
    /// A sequence for `job` whose first `reused` prompt tokens `cache` already holds.
    fn new(
        job: Job,
        cache: Box<dyn SequenceCache>,
        images: Vec<Encoded>,
        reused: usize,
        signature: Option<Vec<u64>>,
    ) -> Self {
        Running {
            images,
            signature,
            kept_logits: None,
            history: job.tokens.clone(),
            feed: job.tokens[reused.min(job.tokens.len())..].to_vec(),
            sampler: Sampler::new(&job.settings),
            job,
            cache,
            generated: Vec::new(),
            decoder: IncrementalDecoder::new(),
            text: String::new(),
            sent: 0,
            first_token: None,
            last_token: Instant::now(),
        }
    }
}

/// The generation thread's state and its steps. [`run`](Self::run) loops over them:
/// [`receive`](Self::receive) new requests, [`admit`](Self::admit) what fits,
/// [`evict_cancelled`](Self::evict_cancelled) sequences whose stream was dropped,
/// [`step`](Self::step) every running sequence at once, [`emit`](Self::emit) each one's
/// sampled token and text, and [`finish`](Self::finish) the ones that ended.
pub(super) struct Engine {
    generator: Arc<dyn Generator>,
    tokenizer: Arc<Tokenizer>,
    limits: Limits,
    counters: Arc<Counters>,
    profiler: Arc<dyn Profiler>,
    eos: Vec<u32>,
    context: usize,
    /// Requests not yet admitted, oldest first.
    waiting: VecDeque<Job>,
    running: Vec<Running>,
    /// KV-cache bytes the running sequences' whole contexts take.
    reserved: u64,
    /// Encoded images by content, bounded in bytes (`generate.image_cache_mb`).
    image_cache: Option<moka::sync::Cache<u128, Arc<Tensor>>>,
    /// Prompts' caches kept after their prefill (`generate.prefix_cache_mb`).
    prefix: Option<PrefixCache>,
    /// The image placeholder token of a vision-language model.
    image_token: Option<u32>,
}

impl Engine {
    pub(super) fn new(
        generator: Arc<dyn Generator>,
        tokenizer: Arc<Tokenizer>,
        limits: Limits,
        counters: Arc<Counters>,
        profiler: Arc<dyn Profiler>,
        image_cache_bytes: u64,
        prefix_cache_bytes: u64,
    ) -> Self {
        let image_cache = (image_cache_bytes > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(image_cache_bytes)
                .weigher(|_: &u128, t: &Arc<Tensor>| t.bytes().len().try_into().unwrap_or(u32::MAX))
                .build()
        });
        let eos = generator.info().eos_token_ids.clone();
        let context = generator.info().context_length;
        let image_token = generator.info().vision.as_ref().map(|v| v.image_token_id);
        Engine {
            generator,
            tokenizer,
            limits,
            counters,
            profiler,
            eos,
            context,
            waiting: VecDeque::new(),
            running: Vec::new(),
            reserved: 0,
            image_cache,
            prefix: (prefix_cache_bytes > 0).then(|| PrefixCache::new(prefix_cache_bytes)),
            image_token,
        }
    }

    /// The engine loop; returns when the queue is closed and nothing runs.
    pub(super) fn run(mut self, queue: flume::Receiver<Job>) {
        while self.receive(&queue) {
            self.admit();
            self.evict_cancelled();
            self.publish_levels();
            if self.running.is_empty() {
                continue;
            }
            let mut ended = Vec::new();
            if let Some((logits, now)) = self.step() {
                let finished = self.emit(logits, now);
                ended = self.finish(finished, now);
            }
            // Levels as they are after the step — before the ended sequences hear of it,
            // so a caller that reads stats() after its answer never sees its own sequence
            // still running, and the gauges do not stay at the last step's while idle.
            self.publish_levels();
            for (events, event) in ended {
                let _ = events.send(event);
            }
        }
    }

    /// Takes what is queued, blocking only when there is nothing to do; false when the
    /// queue is closed and nothing is left.
    fn receive(&mut self, queue: &flume::Receiver<Job>) -> bool {
        if self.running.is_empty() && self.waiting.is_empty() {
            match queue.recv() {
                Ok(job) => self.waiting.push_back(job),
                Err(_) => return false,
            }
        }
        self.waiting.extend(queue.try_iter());
        true
    }

    /// Starts waiting requests, oldest first, while there is a free sequence slot, their
    /// KV reservation fits `generate.kv_cache_mb` (a lone request always runs) and
    /// memory is not under pressure (then only an empty batch takes one). Requests whose
    /// stream is gone are dropped first.
    fn admit(&mut self) {
        let counters = &self.counters;
        let now = Instant::now();
        self.waiting.retain(|j| {
            let alive = !j.events.is_disconnected();
            if !alive {
                counters.with(|s| s.stats.cancelled += 1);
                return false;
            }
            // Past its deadline before it could start: it fails, and its slot goes to others.
            let limit = j.settings.timeout_ms;
            if limit > 0 && now.duration_since(j.submitted).as_millis() as u64 >= limit {
                counters.with(|s| s.stats.failed += 1);
                let _ = j
                    .events
                    .send(Event::Failed(Error::Timeout { after_ms: limit, setting: "generate.timeout_ms" }));
                return false;
            }
            true
        });
        let limits = &self.limits;
        let pressure = limits.pressure.as_ref().is_some_and(|p| p.load(Ordering::Relaxed));
        if pressure
            && !self.running.is_empty()
            && self.running.len() < limits.max_sequences
            && !self.waiting.is_empty()
        {
            counters.with(|s| s.stats.pressure_holds += 1);
        }
        let mut admitted = Vec::new();
        let mut reserving = 0u64;
        while self.running.len() + admitted.len() < limits.max_sequences
            && (!pressure || (self.running.is_empty() && admitted.is_empty()))
            && let Some(job) = self.waiting.front()
            && (limits.kv_budget == 0
                || self.reserved + reserving + job.reserve <= limits.kv_budget
                || (self.running.is_empty() && admitted.is_empty()))
        {
            let job = self.waiting.pop_front().expect("front exists");
            reserving += job.reserve;
            admitted.push(job);
        }
        // A prompt that starts like a kept one continues from its cache, which holds its
        // images too; a failed fork only means the prompt is computed whole.
        let mut reuses = Vec::with_capacity(admitted.len());
        for job in admitted.iter_mut() {
            let Some(prefixes) = self.prefix.as_mut() else {
                reuses.push((None, None));
                continue;
            };
            let keys: Vec<u128> = job.images.iter().map(|i| i.key).collect();
            let signature = prefix::signature(&job.tokens, self.image_token, &keys);
            let reuse = prefixes.lookup(self.generator.as_ref(), &signature).unwrap_or(None);
            if let Some(r) = &reuse {
                let images = std::mem::take(&mut job.images).len() as u64;
                self.counters.with(|s| {
                    s.stats.prefix_cache_hits += 1;
                    s.stats.prefix_cached_tokens += r.tokens as u64;
                    s.stats.images += images;
                    s.stats.image_cache_hits += images;
                });
            }
            reuses.push((reuse, Some(signature)));
        }
        // The other admitted prompts' images go through the vision tower together.
        let images = self.encode_images(&admitted);
        for ((job, images), (reuse, signature)) in admitted.into_iter().zip(images).zip(reuses) {
            let started = images.and_then(|images| match reuse {
                Some(r) => Ok((r.cache, images, r.tokens, r.logits)),
                None => self.generator.new_sequence().map(|cache| (cache, images, 0, None)),
            });
            match started {
                Ok((cache, images, reused, logits)) => {
                    self.reserved += job.reserve;
                    let mut running = Running::new(job, cache, images, reused, signature);
                    if logits.is_some() {
                        running.kept_logits = logits;
                        running.signature = None;
                    }
                    self.running.push(running);
                }
                Err(e) => {
                    self.counters.with(|s| s.stats.failed += 1);
                    let _ = job.events.send(Event::Failed(e));
                }
            }
        }
    }

    /// Each job's images, encoded: from the image cache where it holds them, the rest
    /// through the vision tower in one batch (span `generate_image_encode`). If the
    /// batch fails, each job's images are encoded alone, so only the job whose image
    /// causes the failure fails.
    fn encode_images(&self, jobs: &[Job]) -> Vec<kiln_core::Result<Vec<Encoded>>> {
        let mut found: Vec<Vec<Option<Arc<Tensor>>>> = jobs
            .iter()
            .map(|j| j.images.iter().map(|i| self.image_cache.as_ref().and_then(|c| c.get(&i.key))).collect())
            .collect();
        let hits = found.iter().flatten().filter(|f| f.is_some()).count() as u64;
        let total: u64 = jobs.iter().map(|j| j.images.len() as u64).sum();
        let missing: Vec<(usize, usize)> = found
            .iter()
            .enumerate()
            .flat_map(|(j, images)| {
                images.iter().enumerate().filter(|(_, f)| f.is_none()).map(move |(i, _)| (j, i))
            })
            .collect();
        let mut failed: Vec<Option<kiln_core::Error>> = jobs.iter().map(|_| None).collect();
        if !missing.is_empty() {
            let started = Instant::now();
            let run = |which: &[(usize, usize)]| {
                let patches: Vec<ImagePatches> =
                    which.iter().map(|&(j, i)| jobs[j].images[i].patches.clone()).collect();
                self.generator.encode_images(&patches).and_then(|out| {
                    if out.len() == which.len() {
                        Ok(out)
                    } else {
                        Err(kiln_core::Error::backend(
                            "kiln",
                            format!("{} encodings for {} images", out.len(), which.len()),
                        ))
                    }
                })
            };
            let mut place = |which: &[(usize, usize)], out: Vec<Tensor>| {
                for (&(j, i), tensor) in which.iter().zip(out) {
                    let tensor = Arc::new(tensor);
                    if let Some(cache) = &self.image_cache {
                        cache.insert(jobs[j].images[i].key, tensor.clone());
                    }
                    self.counters.with(|s| {
                        s.stats.image_tokens += tensor.shape().first().copied().unwrap_or(0) as u64
                    });
                    found[j][i] = Some(tensor);
                }
            };
            match run(&missing) {
                Ok(out) => place(&missing, out),
                Err(_) if jobs.len() > 1 => {
                    for (j, failure) in failed.iter_mut().enumerate() {
                        let alone: Vec<(usize, usize)> =
                            missing.iter().copied().filter(|&(jj, _)| jj == j).collect();
                        if alone.is_empty() {
                            continue;
                        }
                        match run(&alone) {
                            Ok(out) => place(&alone, out),
                            Err(e) => *failure = Some(e),
                        }
                    }
                }
                Err(e) => failed[0] = Some(e),
            }
            self.profiler.record("generate_image_encode", started, started.elapsed());
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            self.counters.with(|s| s.stats.image_encode_ms += ms);
        }
        self.counters.with(|s| {
            s.stats.images += total;
            s.stats.image_cache_hits += hits;
        });
        jobs.iter()
            .zip(found)
            .zip(failed)
            .map(|((job, images), failed)| match failed {
                Some(e) => Err(e.for_request()),
                None => Ok(images
                    .into_iter()
                    .zip(&job.images)
                    .map(|(t, i)| (t.expect("every image found or encoded"), i.patches.grid_thw))
                    .collect()),
            })
            .collect()
    }

    /// Sequences whose stream was dropped since the last step leave now, freeing
    /// their caches.
    fn evict_cancelled(&mut self) {
        let (counters, reserved) = (&self.counters, &mut self.reserved);
        self.running.retain(|r| {
            let alive = !r.job.events.is_disconnected();
            if !alive {
                *reserved -= r.job.reserve;
                counters.with(|s| s.stats.cancelled += 1);
            }
            alive
        });
    }

    /// The gauges of [`GenerationStats`]: waiting, running, KV-cache bytes held.
    fn publish_levels(&self) {
        let kv: u64 = self.running.iter().map(|r| r.cache.bytes()).sum();
        let kept = self.prefix.as_ref().map_or(0, PrefixCache::bytes);
        self.counters.with(|s| {
            s.stats.prefix_cache_bytes = kept;
            s.stats.waiting = self.waiting.len() as u64;
            s.stats.running = self.running.len() as u64;
            s.stats.kv_cache_bytes = kv;
            s.stats.peak_kv_cache_bytes = s.stats.peak_kv_cache_bytes.max(kv);
        });
    }

    /// One step of the model over the running sequences: one token of each decoding
    /// one, and of the prompts being read as many tokens as `prefill_chunk` allows (the
    /// oldest first; a longer prompt goes on in the next steps, so a long prompt never
    /// stops the running streams for longer than one such step). Logits per running
    /// sequence — `None` for one that took no part or is still reading its prompt — and
    /// when they came; on a failure every sequence in the step fails and `None` is
    /// returned.
    fn step(&mut self) -> Option<(Vec<Option<Next>>, Instant)> {
        // A vision-language prompt goes whole: its image tokens must meet their images
        // in one step.
        let chunked = self.limits.prefill_chunk > 0 && self.generator.info().vision.is_none();
        let mut left = self.limits.prefill_chunk;
        let fed: Vec<usize> = self
            .running
            .iter()
            .map(|r| {
                if !r.generated.is_empty() || !chunked {
                    return r.feed.len();
                }
                let n = r.feed.len().min(left);
                left -= n;
                n
            })
            .collect();
        let prefill: u64 = self
            .running
            .iter()
            .zip(&fed)
            .filter(|(r, _)| r.generated.is_empty())
            .map(|(_, &n)| n as u64)
            .sum();
        let started = Instant::now();
        // A prompt's images go with its first step only.
        let images: Vec<Vec<Encoded>> = self
            .running
            .iter_mut()
            .zip(&fed)
            .map(|(r, &n)| if n > 0 { std::mem::take(&mut r.images) } else { Vec::new() })
            .collect();
        let step_images: Vec<Vec<StepImage<'_>>> = images
            .iter()
            .map(|list| list.iter().map(|(t, grid)| StepImage { embedding: t, grid_thw: *grid }).collect())
            .collect();
        let stepped = fed.iter().filter(|&&n| n > 0).count();
        let result = if stepped == 0 {
            Ok(Vec::new())
        } else {
            let mut items: Vec<StepItem<'_>> = self
                .running
                .iter_mut()
                .zip(&step_images)
                .zip(&fed)
                .filter(|(_, n)| **n > 0)
                .map(|((r, images), &n)| StepItem {
                    tokens: &r.feed[..n],
                    // A prompt whose logits the prefix cache keeps needs them whole.
                    greedy: r.sampler.is_greedy() && r.signature.is_none(),
                    cache: r.cache.as_mut(),
                    images,
                })
                .collect();
            let greedy: Vec<bool> = items.iter().map(|i| i.greedy).collect();
            self.generator.step_next(&mut items).and_then(|next| {
                // A token alone where logits were needed would be sampled wrongly.
                match next.iter().zip(&greedy).position(|(n, &g)| matches!(n, Next::Token(_)) && !g) {
                    Some(i) => Err(Error::backend(
                        "kiln",
                        format!("the generator gave a token alone for step item {i}, which asked for logits"),
                    )),
                    None => Ok(next),
                }
            })
        };
        let logits = match result {
            Ok(l) if l.len() == stepped => l,
            Ok(l) => {
                let e = Error::backend("kiln", format!("{} logits rows for {stepped} sequences", l.len()));
                self.fail_all(e);
                return None;
            }
            Err(e) => {
                self.fail_all(e);
                return None;
            }
        };
        let now = Instant::now();
        self.profiler.record("generate_step", started, now - started);
        // Logits back in running order; a prompt read only in part drops what it fed and
        // samples nothing yet.
        let mut rows = logits.into_iter();
        let mut sampled = 0u64;
        let aligned: Vec<Option<Next>> = self
            .running
            .iter_mut()
            .zip(&fed)
            .map(|(r, &n)| {
                if n == 0 {
                    // A prompt found whole in the prefix cache: its kept logits.
                    let kept = r.kept_logits.take();
                    sampled += kept.is_some() as u64;
                    return kept.map(Next::Logits);
                }
                let row = rows.next();
                if n < r.feed.len() {
                    r.feed.drain(..n);
                    return None;
                }
                sampled += 1;
                row
            })
            .collect();
        // Prompts whose prefill just ended are kept for later prompts that start the same.
        if let Some(prefixes) = self.prefix.as_mut() {
            for (r, row) in self.running.iter_mut().zip(&aligned) {
                if let Some(Next::Logits(logits)) = row
                    && r.generated.is_empty()
                    && let Some(signature) = r.signature.take()
                {
                    prefixes.insert(self.generator.as_ref(), signature, r.cache.as_mut(), logits);
                }
            }
        }
        let sequences = stepped as u64;
        let kv: u64 = self.running.iter().map(|r| r.cache.bytes()).sum();
        self.counters.with(|s| {
            s.stats.steps += 1;
            s.sequences_in_steps += sequences;
            s.stats.max_sequences_per_step = s.stats.max_sequences_per_step.max(sequences);
            s.stats.prompt_tokens += prefill;
            s.stats.generated_tokens += sampled;
            s.stats.kv_cache_bytes = kv;
            s.stats.peak_kv_cache_bytes = s.stats.peak_kv_cache_bytes.max(kv);
        });
        Some((aligned, now))
    }

    /// Samples each sequence's next token from its logits (or takes the one the
    /// generator picked) and sends the text it completes — all of it but what may still
    /// become a stop string. Returns the sequences that ended, by index, and why.
    fn emit(&mut self, next: Vec<Option<Next>>, now: Instant) -> Vec<(usize, FinishReason)> {
        let mut finished = Vec::new();
        for (i, (r, next)) in self.running.iter_mut().zip(next).enumerate() {
            let token = match next {
                // Still reading its prompt (or not in this step): nothing to sample yet.
                None => continue,
                Some(Next::Logits(mut logits)) => r.sampler.next(&mut logits, &r.history),
                Some(Next::Token(token)) => token,
            };
            match r.first_token {
                None => {
                    r.first_token = Some(now);
                    self.counters.with(|s| record(&mut s.ttft, now - r.job.submitted));
                }
                Some(_) => self.counters.with(|s| record(&mut s.itl, now - r.last_token)),
            }
            r.last_token = now;
            if self.eos.contains(&token) {
                finished.push((i, FinishReason::Stop));
                continue;
            }
            r.generated.push(token);
            r.history.push(token);
            r.feed = vec![token];
            let piece = match r.decoder.push(&self.tokenizer, token) {
                Ok(p) => p.unwrap_or_default(),
                Err(e) => {
                    let _ = r.job.events.send(Event::Failed(e));
                    finished.push((i, FinishReason::Stop));
                    continue;
                }
            };
            r.text.push_str(&piece);
            let until = match release(&r.text, &r.job.settings.stop) {
                Release::Stop(at) => {
                    r.text.truncate(at);
                    finished.push((i, FinishReason::StopString));
                    continue;
                }
                Release::Until(until) => until,
            };
            let text = if until > r.sent { r.text[r.sent..until].to_string() } else { String::new() };
            r.sent = r.sent.max(until);
            let _ = r.job.events.send(Event::Token { id: token, text });
            let limit = r.job.settings.timeout_ms;
            if r.generated.len() >= r.job.settings.max_new_tokens {
                finished.push((i, FinishReason::Length));
            } else if r.history.len() >= self.context {
                finished.push((i, FinishReason::Context));
            } else if limit > 0 && now.duration_since(r.job.submitted).as_millis() as u64 >= limit {
                finished.push((i, FinishReason::Timeout));
            }
        }
        self.profiler.record("generate_sample", now, now.elapsed());
        finished
    }

    /// Ends the `finished` sequences, freeing their caches and reservations; returns
    /// what each one's stream gets last, in order: the text held back, then the whole
    /// answer.
    fn finish(
        &mut self,
        finished: Vec<(usize, FinishReason)>,
        now: Instant,
    ) -> Vec<(flume::Sender<Event>, Event)> {
        let mut last = Vec::with_capacity(finished.len() * 2);
        // Highest index first, so swap_remove leaves the lower indices in place.
        for &(i, reason) in finished.iter().rev() {
            let r = self.running.swap_remove(i);
            self.reserved -= r.job.reserve;
            if r.text.len() > r.sent {
                let id = r.generated.last().copied().unwrap_or_default();
                last.push((r.job.events.clone(), Event::Token { id, text: r.text[r.sent..].to_string() }));
            }
            let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
            let done = Generated {
                prompt_tokens: r.job.tokens.len(),
                image_tokens: r.job.image_tokens,
                tokens: r.generated,
                finish_reason: reason,
                time_to_first_token_ms: r.first_token.map_or(0.0, |t| ms(t - r.job.submitted)),
                elapsed_ms: ms(now - r.job.submitted),
                text: r.text,
            };
            self.counters.with(|s| s.stats.completed += 1);
            self.profiler.record("generate_request", r.job.submitted, now - r.job.submitted);
            last.push((r.job.events, Event::Done(done)));
        }
        last
    }

    /// A step failed: every sequence in it fails with the error (the others are not
    /// affected, since they were all in it); their caches are dropped.
    fn fail_all(&mut self, e: Error) {
        tracing::warn!("a generation step of {} sequences failed: {e}", self.running.len());
        for r in self.running.drain(..) {
            self.reserved -= r.job.reserve;
            self.counters.with(|s| s.stats.failed += 1);
            let _ = r.job.events.send(Event::Failed(e.for_request()));
        }
    }
}

/// What of a sequence's text may be sent, given its stop strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Release {
    /// A stop string starts at this byte: the text ends there (the stop string is not
    /// part of it).
    Stop(usize),
    /// The text up to this byte may be sent; what follows is the start of a stop string
    /// and waits until the next tokens show whether it becomes one.
    Until(usize),
}

/// The stop-string hold-back: where `text` ends if a stop string has come (the
/// earliest), else how much of it is safe to send — all but its longest suffix that is
/// a proper prefix of some stop string (cut at character boundaries).
pub(super) fn release(text: &str, stops: &[String]) -> Release {
    if let Some(at) = stops.iter().filter_map(|s| text.find(s.as_str())).min() {
        return Release::Stop(at);
    }
    let hold = stops
        .iter()
        .flat_map(|s| (1..s.len()).filter(|&n| s.is_char_boundary(n)).map(move |n| &s[..n]))
        .filter(|p| text.ends_with(p))
        .map(str::len)
        .max()
        .unwrap_or(0);
    Release::Until(text.len() - hold)
}

/// `generate.warmup`: steps on throwaway sequences of every kind the engine runs — a
/// prompt alone, one token alone, a prompt joining a decoding sequence, and
/// `sequences` sequences decoding together, twice — dropped afterwards (their caches
/// freed). The steps go through [`Generator::step_next`] as the engine's do, greedy
/// items fed the tokens they got and one joining prompt wanting its logits, so a
/// generator's every path — tokens picked on the device, a step queued ahead and
/// taken, logits rows read back — meets its kernels here rather than in the first
/// requests (MLX compiles each at first use). Returns the steps taken.
///
/// Kernels are also chosen by size: MLX's quantized matmul on CUDA compiles one kernel
/// per power-of-two tile height from 16 to 64 rows (tens of seconds each on a fresh
/// machine), and cuBLAS picks its algorithm by row count. So the warm-up also steps one
/// prompt of each power-of-two length from 16 to 64 tokens (the rows of a prompt step)
/// and each power-of-two count of decoding sequences between 2 and `sequences` (the
/// rows of a decode step and of its logits), not only the sizes above.
pub(super) fn warm_up(generator: &dyn Generator, sequences: usize) -> kiln_core::Result<usize> {
    let info = generator.info();
    let vocab = info.vocab_size.max(2) as u32;
    // Ordinary token ids; the outputs are discarded.
    let ids = |n: usize| -> Vec<u32> { (0..n as u32).map(|i| (i * 7 + 1) % vocab).collect() };
    let prompt = ids((info.context_length / 4).clamp(1, 8));
    let mut caches: Vec<Box<dyn SequenceCache>> = Vec::new();
    let mut steps = 0;
    // A step of `tokens`, items greedy where `greedy` says; what each item is fed next.
    let mut step = |caches: &mut [Box<dyn SequenceCache>],
                    tokens: &[Vec<u32>],
                    greedy: &[bool]|
     -> kiln_core::Result<Vec<Vec<u32>>> {
        let mut batch: Vec<StepItem<'_>> = caches
            .iter_mut()
            .zip(tokens)
            .zip(greedy)
            .map(|((cache, tokens), &greedy)| StepItem { greedy, ..StepItem::new(tokens, &mut **cache) })
            .collect();
        let next = generator.step_next(&mut batch)?;
        steps += 1;
        Ok(next
            .into_iter()
            .map(|n| match n {
                Next::Token(t) if t < vocab => vec![t],
                _ => vec![prompt[0]],
            })
            .collect())
    };
    // Prompt steps of 16, 32 and 64 rows, each on a sequence of its own dropped at once
    // (so a generator with `sequences` slots never holds more).
    for rows in [16, 32, 64].into_iter().filter(|&rows| rows <= info.context_length / 2) {
        let mut alone = vec![generator.new_sequence()?];
        step(&mut alone, &[ids(rows)], &[true])?;
    }
    caches.push(generator.new_sequence()?);
    let mut fed = step(&mut caches, std::slice::from_ref(&prompt), &[true])?;
    fed = step(&mut caches, &fed, &[true])?;
    if sequences > 1 {
        caches.push(generator.new_sequence()?);
        fed.push(prompt.clone());
        fed = step(&mut caches, &fed, &[true, false])?;
        fed = step(&mut caches, &fed, &[true, true])?;
    }
    if sequences > 2 {
        let joining = sequences - caches.len();
        fed.extend(std::iter::repeat_n(prompt.clone(), joining));
        caches.extend((0..joining).map(|_| generator.new_sequence()).collect::<kiln_core::Result<Vec<_>>>()?);
        let all = vec![true; sequences];
        fed = step(&mut caches, &fed, &all)?;
        fed = step(&mut caches, &fed, &all)?;
        fed = step(&mut caches, &fed, &all)?;
        // Fewer sequences decoding: every power of two between 2 and `sequences`.
        for n in (2..).map(|k| 1usize << k).take_while(|&n| n < sequences) {
            let got = step(&mut caches[..n], &fed[..n], &all[..n])?;
            fed.splice(..n, got);
        }
    }
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use kiln_core::{Device, GeneratorInfo, Result, TokenizerSource};

    use super::*;

    /// Records each step's token counts per sequence and checks every sequence's
    /// positions stay within what it holds.
    struct Recorder(GeneratorInfo, Mutex<Vec<Vec<usize>>>, bool);
    struct Held(usize);
    impl SequenceCache for Held {
        fn len(&self) -> usize {
            self.0
        }
        fn bytes(&self) -> u64 {
            self.0 as u64
        }
        fn as_any_mut(&mut self) -> &mut dyn std::any::Any {
            self
        }
    }
    impl Generator for Recorder {
        fn info(&self) -> &GeneratorInfo {
            &self.0
        }
        fn new_sequence(&self) -> Result<Box<dyn SequenceCache>> {
            Ok(Box::new(Held(0)))
        }
        /// A recorder made by `forking_recorder` copies its caches (a count).
        fn fork(
            &self,
            cache: &mut dyn SequenceCache,
            tokens: usize,
        ) -> Result<Option<Box<dyn SequenceCache>>> {
            assert!(tokens <= cache.len());
            Ok(self.2.then(|| Box::new(Held(tokens)) as Box<dyn SequenceCache>))
        }
        fn step(&self, batch: &mut [StepItem<'_>]) -> Result<Vec<Vec<f32>>> {
            self.1.lock().unwrap().push(batch.iter().map(|item| item.tokens.len()).collect());
            for item in batch.iter_mut() {
                self.0.check_step(item.tokens, item.cache.len())?;
                assert!(item.tokens.iter().all(|&t| (t as usize) < self.0.vocab_size));
                item.cache.as_any_mut().downcast_mut::<Held>().unwrap().0 += item.tokens.len();
            }
            Ok(batch.iter().map(|_| vec![0.0; self.0.vocab_size]).collect())
        }
    }

    /// An engine over `generator` with `max_sequences` slots and `kv_budget` bytes, and
    /// a tokenizer that knows no words (the steps tested here decode nothing).
    fn engine(generator: &Arc<Recorder>, max_sequences: usize, kv_budget: u64) -> Engine {
        let tokenizer = Tokenizer::new(tokenizers::models::wordlevel::WordLevel::default());
        let limits = Limits { max_sequences, kv_budget, pressure: None, prefill_chunk: 0 };
        Engine::new(
            generator.clone(),
            Arc::new(tokenizer),
            limits,
            Arc::new(Counters::default()),
            Arc::new(kiln_core::NoopProfiler),
            0,
            0,
        )
    }

    /// A request of `tokens` prompt tokens reserving `reserve` KV bytes, and its stream.
    fn job(tokens: usize, reserve: u64) -> (Job, flume::Receiver<Event>) {
        let (events, stream) = flume::unbounded();
        let settings = GenerateConfig { max_new_tokens: 2, ..Default::default() };
        (
            Job {
                tokens: vec![1; tokens],
                settings,
                events,
                submitted: Instant::now(),
                reserve,
                images: Vec::new(),
                image_tokens: 0,
            },
            stream,
        )
    }

    fn recorder() -> Arc<Recorder> {
        let info = GeneratorInfo::new("recorder", "test", Device::Cpu, 50, 64, TokenizerSource::None);
        Arc::new(Recorder(info, Mutex::new(Vec::new()), false))
    }

    fn forking_recorder() -> Arc<Recorder> {
        let info = GeneratorInfo::new("recorder", "test", Device::Cpu, 50, 64, TokenizerSource::None);
        Arc::new(Recorder(info, Mutex::new(Vec::new()), true))
    }

    /// With a prefix cache, a prompt asked again computes nothing (its kept logits give
    /// its first token); one that shares its first 20 tokens computes the other 20; one that shares fewer than
    /// `MIN_TOKENS`, and every prompt when the generator cannot fork, is computed whole.
    #[test]
    fn prompts_that_start_like_a_kept_one_continue_from_its_cache() {
        let answer = |generator: &Arc<Recorder>, prompts: &[Vec<u32>]| {
            let mut e = engine(generator, 1, 0);
            e.prefix = Some(PrefixCache::new(1 << 20));
            // Per prompt, the tokens its prompt step fed the model (0: none was run).
            let mut firsts = Vec::new();
            for tokens in prompts {
                let (mut j, _stream) = job(0, 1);
                j.tokens = tokens.clone();
                e.waiting.push_back(j);
                e.admit();
                let before = generator.1.lock().unwrap().len();
                while !e.running.is_empty() {
                    let (logits, now) = e.step().expect("the recorder steps");
                    let finished = e.emit(logits, now);
                    e.finish(finished, now);
                }
                let steps = generator.1.lock().unwrap()[before..].to_vec();
                // Two new tokens: a prompt step and a decode step, or the decode alone.
                firsts.push(if steps.len() == 2 { steps[0][0] } else { 0 });
            }
            e.publish_levels();
            (firsts, e.counters.snapshot())
        };
        let base: Vec<u32> = (0..40).map(|i| 1 + i % 45).collect();
        let mut other = base[..20].to_vec();
        other.extend((0..20).map(|i| 46 + i % 3));
        let mut short = base[..10].to_vec();
        short.extend(std::iter::repeat_n(49, 30));
        let prompts = [base.clone(), base.clone(), other, short];
        let (firsts, stats) = answer(&forking_recorder(), &prompts);
        // The same prompt again runs nothing: its first token comes from the kept logits.
        assert_eq!(firsts, vec![40, 0, 20, 40]);
        assert_eq!((stats.prefix_cache_hits, stats.prefix_cached_tokens), (2, 40 + 20));
        assert_eq!(stats.generated_tokens, 8, "every prompt got its two tokens");
        assert!(stats.prefix_cache_bytes > 0);
        let (firsts, stats) = answer(&recorder(), &prompts);
        assert_eq!(firsts, vec![40, 40, 40, 40]);
        assert_eq!(stats.prefix_cache_hits, 0);
    }

    #[test]
    fn admit_fills_the_free_slots_within_the_kv_budget_oldest_first() {
        let mut e = engine(&recorder(), 3, 100);
        let streams: Vec<_> = [(4, 40), (4, 40), (4, 40), (4, 10)]
            .into_iter()
            .map(|(n, kv)| {
                let (j, s) = job(n, kv);
                e.waiting.push_back(j);
                s
            })
            .collect();
        e.admit();
        // Two fit the 100-byte budget; the third (40) would not, so nothing after it jumps the queue.
        assert_eq!((e.running.len(), e.waiting.len(), e.reserved), (2, 2, 80));
        // A request whose stream is gone leaves the queue without a slot.
        drop(streams);
        e.admit();
        e.evict_cancelled();
        assert_eq!((e.running.len(), e.waiting.len(), e.reserved), (0, 0, 0));
        assert_eq!(e.counters.snapshot().cancelled, 4);
    }

    #[test]
    fn a_lone_request_runs_even_over_the_budget() {
        let mut e = engine(&recorder(), 3, 10);
        let (j, _stream) = job(4, 1000);
        e.waiting.push_back(j);
        e.admit();
        assert_eq!(e.running.len(), 1);
    }

    #[test]
    fn step_emit_and_finish_end_a_sequence_at_max_new_tokens_and_free_it() {
        let generator = recorder();
        let mut e = engine(&generator, 2, 0);
        let (j, stream) = job(3, 7);
        e.waiting.push_back(j);
        e.admit();
        let mut ended = Vec::new();
        for _ in 0..2 {
            let (logits, now) = e.step().expect("the recorder steps");
            let finished = e.emit(logits, now);
            ended = e.finish(finished, now);
        }
        // Prompt, then one token: two steps, two new tokens, max_new_tokens reached.
        assert_eq!(*generator.1.lock().unwrap(), vec![vec![3], vec![1]]);
        assert!(e.running.is_empty() && e.reserved == 0);
        e.publish_levels();
        let stats = e.counters.snapshot();
        assert_eq!((stats.running, stats.completed, stats.generated_tokens), (0, 1, 2));
        // The answer goes out only now, after the levels.
        assert!(stream.try_recv().is_ok_and(|ev| matches!(ev, Event::Token { .. })));
        let done = ended.into_iter().find_map(|(_, ev)| match ev {
            Event::Done(g) => Some(g),
            _ => None,
        });
        let done = done.expect("a Done event to send");
        assert_eq!((done.tokens.len(), done.finish_reason), (2, FinishReason::Length));
    }

    /// `prefill_chunk` 4: a 10-token prompt is read as 4, 4 and 2 tokens over three
    /// steps while a decoding sequence goes on in each, and its first token comes only
    /// once the whole prompt is in.
    #[test]
    fn a_long_prompt_is_read_in_chunks_beside_the_running_streams() {
        let generator = recorder();
        let mut e = engine(&generator, 2, 0);
        e.limits.prefill_chunk = 4;
        let (short, _s) = job(3, 1);
        e.waiting.push_back(short);
        e.admit();
        let step = |e: &mut Engine| {
            let (logits, now) = e.step().expect("the recorder steps");
            let sampled = logits.iter().filter(|l| l.is_some()).count();
            let finished = e.emit(logits, now);
            e.finish(finished, now);
            sampled
        };
        assert_eq!(step(&mut e), 1); // the short prompt, whole (3 < 4)
        let (long, _l) = job(10, 1);
        e.waiting.push_back(long);
        e.admit();
        let sampled: Vec<usize> = (0..3).map(|_| step(&mut e)).collect();
        let steps = generator.1.lock().unwrap().clone();
        // The short one decodes a token a step; the long one feeds 4, 4, 2.
        assert_eq!(steps[1..], [vec![1, 4], vec![4], vec![2]]);
        assert_eq!(sampled, vec![1, 0, 1], "the long prompt samples only when it is all in");
    }

    /// Counts: the token after `t` is `(t + 1) % vocab`, as logits or, for an item marked
    /// greedy, as the token alone (a device-side argmax's contract). Records each step's
    /// greedy marks. `liar` also answers items that asked for logits with a token.
    struct Picker {
        info: GeneratorInfo,
        marks: Mutex<Vec<Vec<bool>>>,
        liar: bool,
    }
    impl Generator for Picker {
        fn info(&self) -> &GeneratorInfo {
            &self.info
        }
        fn new_sequence(&self) -> Result<Box<dyn SequenceCache>> {
            Ok(Box::new(Held(0)))
        }
        fn step(&self, batch: &mut [StepItem<'_>]) -> Result<Vec<Vec<f32>>> {
            let next = self.step_next(batch)?;
            let vocab = self.info.vocab_size;
            Ok(next
                .into_iter()
                .map(|n| match n {
                    Next::Logits(l) => l,
                    Next::Token(t) => (0..vocab).map(|i| if i == t as usize { 100.0 } else { 0.0 }).collect(),
                })
                .collect())
        }
        fn step_next(&self, batch: &mut [StepItem<'_>]) -> Result<Vec<Next>> {
            self.marks.lock().unwrap().push(batch.iter().map(|i| i.greedy).collect());
            let vocab = self.info.vocab_size;
            Ok(batch
                .iter_mut()
                .map(|item| {
                    item.cache.as_any_mut().downcast_mut::<Held>().unwrap().0 += item.tokens.len();
                    let after = (*item.tokens.last().unwrap() + 1) % vocab as u32;
                    if item.greedy || self.liar {
                        Next::Token(after)
                    } else {
                        let mut logits = vec![0.0; vocab];
                        logits[after as usize] = 100.0;
                        Next::Logits(logits)
                    }
                })
                .collect())
        }
    }

    /// Greedy sequences get their tokens from the generator through `step_next`, sampled
    /// ones (temperature) and prompts the prefix cache keeps get logits, and the answers
    /// are the same tokens either way; a generator that answers a logits item with a
    /// token alone fails the step with an error that says so.
    #[test]
    fn greedy_items_take_the_generators_token_and_the_others_their_logits() {
        let run = |liar: bool, temperature: f32, prefix: bool| {
            let info = GeneratorInfo::new("picker", "test", Device::Cpu, 50, 64, TokenizerSource::None);
            let generator = Arc::new(Picker { info, marks: Mutex::new(Vec::new()), liar });
            let tokenizer = Tokenizer::new(tokenizers::models::wordlevel::WordLevel::default());
            let limits = Limits { max_sequences: 1, kv_budget: 0, pressure: None, prefill_chunk: 0 };
            let counters = Arc::new(Counters::default());
            let mut e = Engine::new(
                generator.clone(),
                Arc::new(tokenizer),
                limits,
                counters,
                Arc::new(kiln_core::NoopProfiler),
                0,
                0,
            );
            if prefix {
                e.prefix = Some(PrefixCache::new(1 << 20));
            }
            let (mut j, stream) = job(0, 1);
            j.tokens = (1..=20).collect();
            j.settings.max_new_tokens = 4;
            j.settings.temperature = temperature;
            e.waiting.push_back(j);
            e.admit();
            let mut failed = None;
            while !e.running.is_empty() {
                let Some((next, now)) = e.step() else {
                    failed = stream.try_iter().find_map(|ev| match ev {
                        Event::Failed(err) => Some(err.to_string()),
                        _ => None,
                    });
                    break;
                };
                let finished = e.emit(next, now);
                for (_, ev) in e.finish(finished, now) {
                    if let Event::Done(g) = ev {
                        return (g.tokens, generator.marks.lock().unwrap().clone(), None);
                    }
                }
            }
            (Vec::new(), generator.marks.lock().unwrap().clone(), failed)
        };
        let counted = vec![21, 22, 23, 24];
        let (tokens, marks, _) = run(false, 0.0, false);
        assert_eq!(tokens, counted);
        assert_eq!(marks, vec![vec![true]; 4], "every step of a greedy sequence may pick on the device");
        // With a prefix cache the prompt's logits are kept: its step asks for them.
        let (tokens, marks, _) = run(false, 0.0, true);
        assert_eq!(tokens, counted);
        assert_eq!(marks, [vec![false], vec![true], vec![true], vec![true]]);
        // Sampling needs the logits (peaked enough that 0.7 picks the same tokens).
        let (tokens, marks, _) = run(false, 0.7, false);
        assert_eq!(tokens, counted);
        assert_eq!(marks, vec![vec![false]; 4]);
        let (tokens, _, failed) = run(true, 0.7, false);
        assert!(tokens.is_empty());
        let failed = failed.expect("the step fails");
        assert!(failed.contains("token alone") && failed.contains("asked for logits"), "{failed}");
    }

    #[test]
    fn a_request_past_generate_timeout_ms_fails_waiting_or_ends_running() {
        let generator = recorder();
        let mut e = engine(&generator, 1, 0);
        // One running (it got the only slot), one waiting behind it; both 10 ms old of a
        // 5 ms deadline by the time of the next step.
        let old = Instant::now() - std::time::Duration::from_millis(10);
        let (mut running, running_stream) = job(3, 0);
        running.settings.timeout_ms = 5;
        running.settings.max_new_tokens = 100;
        e.waiting.push_back(running);
        e.admit(); // it starts in time...
        assert_eq!(e.running.len(), 1);
        e.running[0].job.submitted = old; // ...and its deadline passes while it runs
        let (mut waiting, waiting_stream) = job(3, 0);
        waiting.settings.timeout_ms = 5;
        waiting.submitted = old;
        e.waiting.push_back(waiting); // one waiting behind it (one slot)
        let (logits, now) = e.step().unwrap();
        let finished = e.emit(logits, now);
        assert_eq!(finished.iter().map(|(_, r)| *r).collect::<Vec<_>>(), vec![FinishReason::Timeout]);
        let ended = e.finish(finished, now);
        assert!(
            ended
                .iter()
                .any(|(_, ev)| matches!(ev, Event::Done(g) if g.finish_reason == FinishReason::Timeout))
        );
        drop(running_stream);
        e.admit(); // ...and has passed its deadline while waiting: it fails.
        assert!(e.running.is_empty() && e.waiting.is_empty());
        let failure = waiting_stream.try_recv().unwrap();
        assert!(
            matches!(&failure, Event::Failed(err) if err.to_string().contains("generate.timeout_ms")),
            "{failure:?}"
        );
    }

    fn stops(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn without_stop_strings_all_the_text_goes_out() {
        assert_eq!(release("Hello, world", &[]), Release::Until(12));
        assert_eq!(release("", &stops(&["END"])), Release::Until(0));
    }

    #[test]
    fn a_stop_string_ends_the_text_where_it_starts() {
        assert_eq!(release("one two END three", &stops(&["END"])), Release::Stop(8));
        // The earliest of several, whichever is listed first.
        assert_eq!(release("a STOP b END", &stops(&["END", "STOP"])), Release::Stop(2));
        // At the very start, and as the whole text.
        assert_eq!(release("END", &stops(&["END"])), Release::Stop(0));
    }

    #[test]
    fn the_start_of_a_stop_string_is_held_back_until_it_is_known() {
        // "EN" may become "END": held; "E" alone too.
        assert_eq!(release("one two EN", &stops(&["END"])), Release::Until(8));
        assert_eq!(release("one two E", &stops(&["END"])), Release::Until(8));
        // The longest prefix that matches is held.
        assert_eq!(release("x ab", &stops(&["abc", "bd"])), Release::Until(2));
        // A suffix that is no prefix of a stop string is not held.
        assert_eq!(release("one two NX", &stops(&["END"])), Release::Until(10));
    }

    #[test]
    fn the_hold_back_never_cuts_a_character_in_two() {
        // "→x": the held prefix is "→" (3 bytes), never a part of it.
        let text = "go →";
        assert_eq!(release(text, &stops(&["→x"])), Release::Until(3));
        assert!(text.is_char_boundary(3));
        // A text ending in a character whose bytes begin a stop string's character is
        // not held for a partial byte match.
        assert_eq!(release("é", &stops(&["ê"])), Release::Until(2));
    }

    /// The warm-up runs every kind of step the engine does: a prompt alone, a token
    /// alone, a prompt joining a decoding sequence, and a full batch decoding (three
    /// times) — and every power-of-two size of them: prompts of 16 and 32 tokens (the
    /// context of 64 allows no 64), and 4, 8 and 16 of 20 sequences decoding.
    #[test]
    fn the_warm_up_steps_through_every_kind_and_size_of_batch() {
        let info = GeneratorInfo::new("recorder", "test", Device::Cpu, 50, 64, TokenizerSource::None);
        let ones = |n: usize| vec![1; n];
        let mut twenty = vec![vec![16], vec![32], vec![8], vec![1], vec![1, 8], vec![1, 1]];
        twenty.push([vec![1, 1], vec![8; 18]].concat());
        twenty.extend([ones(20), ones(20), ones(4), ones(8), ones(16)]);
        for (sequences, want) in [
            (1, vec![vec![16], vec![32], vec![8], vec![1]]),
            (2, vec![vec![16], vec![32], vec![8], vec![1], vec![1, 8], vec![1, 1]]),
            (
                4,
                vec![
                    vec![16],
                    vec![32],
                    vec![8],
                    vec![1],
                    vec![1, 8],
                    vec![1, 1],
                    vec![1, 1, 8, 8],
                    ones(4),
                    ones(4),
                ],
            ),
            (20, twenty),
        ] {
            let g = Recorder(info.clone(), Mutex::new(Vec::new()), false);
            assert_eq!(warm_up(&g, sequences).unwrap(), want.len());
            assert_eq!(*g.1.lock().unwrap(), want, "{sequences} sequences");
        }
        // A tiny context still warms up, with a shorter prompt.
        let g = Recorder(
            GeneratorInfo::new("tiny", "test", Device::Cpu, 50, 8, TokenizerSource::None),
            Mutex::new(Vec::new()),
            false,
        );
        warm_up(&g, 2).unwrap();
        assert_eq!(g.1.lock().unwrap()[0], vec![2]);
    }

    /// The warm-up steps through `step_next` as the engine does: each greedy item is fed
    /// the token it got back (so a generator's queued next step is taken), and the
    /// prompt joining a decoding sequence wants its logits once.
    #[test]
    fn the_warm_up_feeds_greedy_items_the_tokens_they_got() {
        /// Answers a greedy item with its token + 1; records (first token, greedy).
        struct Echo(GeneratorInfo, Mutex<Vec<Vec<(u32, bool)>>>);
        impl Generator for Echo {
            fn info(&self) -> &GeneratorInfo {
                &self.0
            }
            fn new_sequence(&self) -> Result<Box<dyn SequenceCache>> {
                Ok(Box::new(Held(0)))
            }
            fn step(&self, _: &mut [StepItem<'_>]) -> Result<Vec<Vec<f32>>> {
                unreachable!("the warm-up steps through step_next")
            }
            fn step_next(&self, batch: &mut [StepItem<'_>]) -> Result<Vec<Next>> {
                self.1.lock().unwrap().push(batch.iter().map(|item| (item.tokens[0], item.greedy)).collect());
                for item in batch.iter_mut() {
                    item.cache.as_any_mut().downcast_mut::<Held>().unwrap().0 += item.tokens.len();
                }
                Ok(batch
                    .iter()
                    .map(|item| match item.greedy {
                        true => Next::Token(item.tokens[0] + 1),
                        false => Next::Logits(vec![0.0; self.0.vocab_size]),
                    })
                    .collect())
            }
        }
        let info = GeneratorInfo::new("echo", "test", Device::Cpu, 50, 64, TokenizerSource::None);
        let g = Echo(info, Mutex::new(Vec::new()));
        assert_eq!(warm_up(&g, 3).unwrap(), 9);
        // Every prompt starts with token 1 (the first two are the 16- and 32-token ones);
        // the item wanting logits is fed it again.
        let want = vec![
            vec![(1, true)],
            vec![(1, true)],
            vec![(1, true)],
            vec![(2, true)],
            vec![(3, true), (1, false)],
            vec![(4, true), (1, true)],
            vec![(5, true), (2, true), (1, true)],
            vec![(6, true), (3, true), (2, true)],
            vec![(7, true), (4, true), (3, true)],
        ];
        assert_eq!(*g.1.lock().unwrap(), want);
    }
}
