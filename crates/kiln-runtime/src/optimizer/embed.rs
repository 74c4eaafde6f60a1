//! The embed task's path: cache lookups, single-flight, tokenization, shared batches or
//! calls of their own, pooling where the model does not.

// The optimizer's own imports: this is the optimizer, split by concern.
use super::*;

impl Optimizer {
    pub(super) async fn embed_inner(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
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
                match hit.and_then(|hit| hit.get(EMBEDDING).and_then(|v| v.to_vec::<f32>().ok())) {
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
        let submits = rows.iter().map(|row| async move {
            let inputs = self.model_inputs(row.inputs()?);
            self.replicas.pick().submit(inputs, row.len()).await
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
