//! The embed task: its text path (the pipeline and its tokenizer pool), the public
//! calls (`embed`, `token_lengths`, `token_counts`), cache lookups, single-flight,
//! tokenization, shared batches or calls of their own, pooling where the model does not.

use std::sync::Arc;
use std::time::Instant;

use kiln_core::{
    CacheKey, Error, KilnConfig, LAST_HIDDEN_STATE, ModelInfo, ModelSpec, NamedTensors, Outputs, Result,
    SENTENCE_EMBEDDING, Tensor,
};
use kiln_text::{TextPipeline, TokenRow};

use super::Optimizer;
use crate::cache::cache_key;
use crate::collate::collate;
use crate::inflight::{Claim, Leader, follow};
use crate::stats::{Counters, Stage};
use crate::tokenize::TokenizerPool;
use crate::worker::ModelWorker;

/// Name under which a cached embedding is stored.
const EMBEDDING: &str = "embedding";

/// Calls of [`Optimizer::embed_windows`] in flight at once: two, so that the next batch
/// is formed while one runs and no call waits behind more than one other — each call
/// has its own `scheduler.timeout_ms` deadline, and with four in flight a call of 32
/// texts of 200 words waited ~4 batches (over 30 s on 2 busy cores).
const CALLS_IN_FLIGHT: usize = 2;

/// Batches per window of [`Optimizer::embed_windows`]: enough texts that neighbours in
/// length order differ little, few enough that a window's embeddings wait in memory
/// only briefly (2,048 texts at batch 32: 3 MB of MiniLM vectors).
const WINDOW_BATCHES: usize = 64;

impl Optimizer {
    /// Embeds texts: one vector per text, in order. An empty text is embedded (as
    /// sentence-transformers does), not dropped; texts longer than the model's maximum
    /// are truncated to it. With batching on, the texts join those of concurrent
    /// callers in shared batches; repeated texts are answered from the cache.
    pub async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        // A retry runs the whole call again; texts that made it the first time are
        // cache hits by then (when the cache is on).
        let vectors =
            self.request(self.check_call_size(texts.len(), "texts"), || self.embed_inner(texts)).await?;
        Counters::add(&self.counters.texts, texts.len() as u64);
        Ok(vectors)
    }

    /// Embeds many texts the fast way, one vector per text, in order: in windows of 64
    /// batches, each window's texts sorted by token count (longest first) so the texts
    /// of a call have similar lengths and a batch pads little — what sentence-transformers'
    /// `encode` does over its whole input, by characters (tokens are what padding is made
    /// of: on the mixed-script texts of `scripts/compare_sentence_transformers.py`
    /// batches pad 39% in file order, 22% sorted by characters, 2% by tokens) — then
    /// sent in calls of one batch (`batching.max_batch_size`), two in flight so the next
    /// batch is formed while one runs, each call with its own deadline. The next window
    /// is tokenized for its order while this one is embedded.
    pub async fn embed_all(&self, texts: Vec<String>) -> Result<Vec<Vec<f32>>> {
        let mut all = vec![Vec::new(); texts.len()];
        self.embed_windows(&texts, &|_| {}, |window, vectors| {
            for (slot, vector) in all[window].iter_mut().zip(vectors) {
                *slot = vector;
            }
            Ok(())
        })
        .await?;
        Ok(all)
    }

    /// [`embed_all`](Self::embed_all) handing each window's vectors (in the texts'
    /// order) to `done` as soon as the window is embedded, and the count of each call's
    /// texts to `progress` as it returns: what `kiln run` writes a file with, a window
    /// at a time.
    pub async fn embed_windows(
        &self,
        texts: &[String],
        progress: &(dyn Fn(usize) + Sync),
        mut done: impl FnMut(std::ops::Range<usize>, Vec<Vec<f32>>) -> Result<()>,
    ) -> Result<()> {
        use futures_util::StreamExt;
        let chunk = self.config.batching.max_batch_size.max(1);
        let windows: Vec<std::ops::Range<usize>> = (0..texts.len())
            .step_by(WINDOW_BATCHES * chunk)
            .map(|start| start..(start + WINDOW_BATCHES * chunk).min(texts.len()))
            .collect();
        // Plain closures returning futures over owned values (not async closures over
        // borrowed slices), so the whole future is provably `Send` for callers that
        // spawn it (the Python package releases the GIL around it).
        let sorted = |window: std::ops::Range<usize>| {
            let batch = texts[window.clone()].to_vec();
            async move {
                let lengths = self.token_lengths(batch).await?;
                let start = window.start;
                let mut order: Vec<usize> = window.collect();
                order.sort_by_key(|&i| std::cmp::Reverse(lengths[i - start]));
                Ok::<_, Error>(order)
            }
        };
        let mut next = match windows.first() {
            Some(first) => Some(sorted(first.clone()).await?),
            None => None,
        };
        for (w, window) in windows.iter().enumerate() {
            let order = next.take().unwrap_or_default();
            let (vectors, upcoming) = tokio::join!(
                futures_util::stream::iter(
                    order
                        .chunks(chunk)
                        .map(|picks| picks.iter().map(|&i| texts[i].clone()).collect::<Vec<String>>())
                        .collect::<Vec<_>>(),
                )
                .map(|batch| async move {
                    let vectors = self.embed(&batch).await;
                    progress(batch.len());
                    vectors
                })
                .buffered(CALLS_IN_FLIGHT)
                .collect::<Vec<_>>(),
                async {
                    match windows.get(w + 1) {
                        Some(following) => sorted(following.clone()).await.map(Some),
                        None => Ok(None),
                    }
                }
            );
            next = upcoming?;
            let mut by_place: Vec<Vec<f32>> = vec![Vec::new(); window.len()];
            for (picks, vectors) in order.chunks(chunk).zip(vectors) {
                for (&i, vector) in picks.iter().zip(vectors?) {
                    by_place[i - window.start] = vector;
                }
            }
            done(window.clone(), by_place)?;
        }
        Ok(())
    }

    /// Tokens each text becomes (special tokens included, after truncation to the
    /// model's maximum), from the tokenizer pool, without running the model: what a
    /// caller that orders texts by length (as `kiln run` does, to pad less) sorts by.
    pub async fn token_lengths(&self, texts: Vec<String>) -> Result<Vec<usize>> {
        Ok(self.token_counts(texts).await?.into_iter().map(|(tokens, _)| tokens).collect())
    }

    /// Each text's token count, as [`token_lengths`](Self::token_lengths), and whether
    /// the text was cut to fit the model (`text.max_length` tokens, or `text.max_chars`
    /// characters): what a server that refuses over-long inputs (TEI's `truncate: false`)
    /// checks.
    pub async fn token_counts(&self, texts: Vec<String>) -> Result<Vec<(usize, bool)>> {
        let rows = self.text_path("token_counts")?.tokenizers.encode(texts).await?;
        Ok(rows.iter().map(|r| (r.len(), r.truncated)).collect())
    }

    /// The text path, which only the embed task has; `what` names the call refused.
    fn text_path(&self, what: &str) -> Result<&TextPath> {
        self.text.as_ref().ok_or_else(|| {
            Error::Unsupported(format!(
                "{what} needs task = \"embed\"; this optimizer runs {:?}",
                self.config.task
            ))
        })
    }

    async fn embed_inner(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        let text = self.text_path("embed")?;
        let mut out: Vec<Option<Vec<f32>>> = vec![None; texts.len()];
        let mut todo: Vec<usize> = (0..texts.len()).collect();
        // A pass leaves only texts whose leader (another call) gave up; they go again.
        while !todo.is_empty() {
            let mut claimed: Vec<(usize, CacheKey, Leader)> = Vec::new();
            let mut followers = Vec::new();
            let lookup = self.profiler.span("cache_lookup");
            for &i in &todo {
                let key = cache_key(&[self.identity.as_bytes(), texts[i].as_bytes()]);
                match self.inflight.claim(key) {
                    Claim::Lead(leader) => claimed.push((i, key, leader)),
                    Claim::Follow(running) => followers.push((i, running)),
                }
            }
            // One lookup for the call's texts: one round trip to a shared cache.
            let keys: Vec<CacheKey> = claimed.iter().map(|&(_, key, _)| key).collect();
            let mut leaders = Vec::with_capacity(claimed.len());
            for ((i, key, leader), hit) in claimed.into_iter().zip(self.cache.get_many(&keys)) {
                match hit.and_then(|hit| self.valid_entry(&hit)) {
                    // Handed to whoever follows this text (the same call's duplicates too),
                    // so they need no second pass.
                    Some(vector) => out[i] = Some(leader.publish_and_keep(vector)),
                    None => leaders.push((i, key, leader)),
                }
            }
            drop(lookup);
            if !leaders.is_empty() {
                // Longest first, as sentence-transformers does, so that runs of a call
                // that goes alone hold texts of similar length.
                leaders.sort_by_key(|&(i, _, _)| std::cmp::Reverse(texts[i].len()));
                let own: Vec<String> = leaders.iter().map(|&(i, _, _)| texts[i].clone()).collect();
                let vectors = self.embed_texts(text, own).await?;
                if let Some(first) = vectors.first() {
                    let _ = text.width.set(first.len());
                }
                for ((i, key, leader), vector) in leaders.into_iter().zip(vectors) {
                    let entry = NamedTensors::new()
                        .with(EMBEDDING, Tensor::from_vec(vec![vector.len()], vector.clone())?);
                    self.cache.insert(key, Arc::new(entry));
                    out[i] = Some(leader.publish_and_keep(vector));
                }
            }
            todo.clear();
            for (i, running) in followers {
                match follow(running).await {
                    Some(vector) => {
                        Counters::add(&self.counters.coalesced, 1);
                        out[i] = Some(vector.to_vec());
                    }
                    None => todo.push(i),
                }
            }
        }
        Ok(out
            .into_iter()
            .map(|v| v.expect("every text was answered by the cache, a run or a leader"))
            .collect())
    }

    /// A cached embedding, if it fits this model's: one dimension, the width the model's
    /// embeddings have, finite values. Anything else — a shared cache holds what any
    /// client wrote — is a miss, counted (`stats().cache_invalid`) and warned of once.
    fn valid_entry(&self, hit: &NamedTensors) -> Option<Vec<f32>> {
        let text = self.text.as_ref()?;
        let tensor = hit.get(EMBEDDING)?;
        let vector = tensor.to_vec::<f32>().ok();
        let width = text.width.get().copied();
        let fits = |v: &Vec<f32>| {
            tensor.shape().len() == 1
                && !v.is_empty()
                && width.is_none_or(|w| v.len() == w)
                && v.iter().all(|x| x.is_finite())
        };
        match vector {
            Some(v) if fits(&v) => Some(v),
            _ => {
                Counters::add(&self.counters.cache_invalid, 1);
                if !text.warned_invalid.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::warn!(
                        "a cache entry of shape {:?} does not fit this model's embeddings (width {width:?}, finite \
                         values); it is recomputed, and further ones are counted in stats().cache_invalid",
                        tensor.shape()
                    );
                }
                None
            }
        }
    }

    /// Embeddings of texts nobody has computed: tokenized by the pool, then batched with
    /// other callers' texts (or, with batching off, run as this call's own batches).
    async fn embed_texts(&self, text: &TextPath, texts: Vec<String>) -> Result<Vec<Vec<f32>>> {
        let started = Instant::now();
        let rows = text.tokenizers.encode(texts).await?;
        self.timed(Stage::Tokenize, "tokenize", started);
        if self.config.batching.enabled {
            self.embed_shared(text, rows).await
        } else {
            let mut vectors = Vec::with_capacity(rows.len());
            for own in rows.chunks(self.config.batching.max_batch_size) {
                vectors.extend(self.embed_alone(text, own).await?);
            }
            Ok(vectors)
        }
    }

    /// Each row becomes an item of a worker's queue, batched with other callers'.
    async fn embed_shared(&self, text: &TextPath, rows: Vec<TokenRow>) -> Result<Vec<Vec<f32>>> {
        let request = ModelWorker::request_id();
        let submits = rows.iter().map(|row| async move {
            let inputs = self.model_inputs(row.inputs()?);
            self.replicas.pick().submit_as(request, inputs, row.len()).await
        });
        let outputs = futures_util::future::join_all(submits).await;
        let started = Instant::now();
        let mut vectors = Vec::with_capacity(outputs.len());
        for (out, row) in outputs.into_iter().zip(&rows) {
            let out = out?;
            self.counters.queue_wait(out.queue_wait);
            self.counters.time(Stage::Inference, out.run_time.div_f64(out.batch_size as f64));
            let mut one = embeddings(text, &out.outputs, &[row.len()], row.len(), 1)?;
            vectors.push(one.pop().ok_or_else(|| Error::backend("kiln", "the model returned no rows"))?);
        }
        if !text.pooled {
            self.timed(Stage::Pooling, "pool", started);
        }
        Ok(vectors)
    }

    /// The caller's rows run as one batch of their own, collated here.
    async fn embed_alone(&self, text: &TextPath, rows: &[TokenRow]) -> Result<Vec<Vec<f32>>> {
        let items =
            rows.iter().map(|r| r.inputs().map(|i| self.model_inputs(i))).collect::<Result<Vec<_>>>()?;
        let batch = collate(&items.iter().collect::<Vec<_>>(), &self.replicas.first().buckets())?;
        let run = self.run_model(batch.inputs).await?;
        let started = Instant::now();
        let lengths: Vec<usize> = rows.iter().map(TokenRow::len).collect();
        let vectors = embeddings(text, &run, &lengths, batch.sequence, batch.rows)?;
        if !text.pooled {
            self.timed(Stage::Pooling, "pool", started);
        }
        Ok(vectors)
    }
}

/// The embed task's parts: the text pipeline, its tokenizer pool, and whether the
/// model applies the embedding head itself.
pub(super) struct TextPath {
    pub(super) pipeline: TextPipeline,
    tokenizers: TokenizerPool,
    /// The model returns [`SENTENCE_EMBEDDING`] with the pipeline's head applied.
    pooled: bool,
    /// The embeddings' width, once one was computed: what a cached entry must have.
    width: std::sync::OnceLock<usize>,
    /// Whether a misfit cache entry was warned of.
    warned_invalid: std::sync::atomic::AtomicBool,
}

impl TextPath {
    /// The pipeline of the model folder `config` names, for the loaded model `info`
    /// (loaded from `spec`, on `provider`), with its tokenizer pool started.
    pub(super) fn new(
        config: &KilnConfig,
        info: &ModelInfo,
        spec: &ModelSpec,
        provider: &str,
    ) -> Result<Self> {
        let pipeline =
            TextPipeline::from_model_dir(&config.model.path, &config.text, info.max_sequence_length)?;
        let tokenizers = TokenizerPool::start(&pipeline, config.text.tokenizer_threads)?;
        let pooled = info.head.is_some() && info.head == spec.head;
        if !pooled {
            tracing::info!("provider `{provider}` returns token vectors: kiln pools them on the host");
        }
        // Known from the model's output spec when its last dim is fixed (else learned
        // from the first embedding computed).
        let width = std::sync::OnceLock::new();
        if let Some(kiln_core::Dim::Fixed(n)) = info.outputs.first().and_then(|o| o.shape.last()) {
            let _ = width.set(*n);
        }
        Ok(TextPath { pipeline, tokenizers, pooled, width, warned_invalid: Default::default() })
    }
}

/// One vector per text from the model's outputs for texts of `lengths` tokens, padded
/// to `padded`: [`SENTENCE_EMBEDDING`] when the model pooled on its device; otherwise
/// `last_hidden_state` (or the only output there is), pooled here on the host.
fn embeddings(
    text: &TextPath,
    outputs: &Outputs,
    lengths: &[usize],
    padded: usize,
    rows: usize,
) -> Result<Vec<Vec<f32>>> {
    let mut vectors = if text.pooled {
        let tensor = outputs.require(SENTENCE_EMBEDDING)?;
        let values = tensor.to_f32_vec()?;
        let hidden = values.len() / rows.max(1);
        values.chunks_exact(hidden.max(1)).map(<[f32]>::to_vec).collect()
    } else {
        let tensor = match outputs.get(LAST_HIDDEN_STATE) {
            Some(t) => t,
            None => outputs.iter().next().map(|(_, t)| t).ok_or_else(|| {
                Error::InvalidInput(
                    "the model returned no outputs; an embedding model must return one".into(),
                )
            })?,
        };
        // A bucket's added rows are all padding.
        let mask: Vec<i64> = (0..rows)
            .flat_map(|r| {
                let len = lengths.get(r).copied().unwrap_or(0);
                (0..padded).map(move |s| i64::from(s < len))
            })
            .collect();
        text.pipeline.pool(tensor, &mask)?
    };
    vectors.truncate(lengths.len());
    Ok(vectors)
}
