//! The provider contract for autoregressive generation (`task = "generate"`).
//!
//! A provider that generates returns a [`Generator`] from
//! [`Provider::load_generator`](crate::Provider::load_generator). The runtime owns
//! everything around it — the tokenizer, sampling, stop conditions, streaming and the
//! continuous batching of many sequences — and asks the generator for one thing: a
//! **step**. A step takes a batch of sequences, each with its own KV cache
//! ([`SequenceCache`]) and its new tokens (a whole prompt when it joins, one sampled
//! token afterwards), appends them to the caches, and returns each sequence's logits for
//! its next token. Sequences join and leave the batch between steps; a sequence's cache
//! is dropped when it leaves, which frees its memory at once.
//!
//! Why a step over sequences with their own caches, not a `generate(prompt)` call: the
//! runtime can then run prefill of new sequences and decode of running ones together,
//! bound the batch by `batching.max_batch_size` and by the caches' memory, and cancel
//! one stream without disturbing the others — what continuous batching needs — while a
//! provider only writes its model's forward pass.
//!
//! ```
//! use kiln_core::{Device, Generator, GeneratorInfo, Result, SequenceCache, StepItem, TokenizerSource};
//!
//! /// Predicts "the token after the last one": logits peak at (last + 1) % vocab.
//! struct Counter(GeneratorInfo);
//! struct Seen(Vec<u32>);
//! impl SequenceCache for Seen {
//!     fn len(&self) -> usize { self.0.len() }
//!     fn bytes(&self) -> u64 { 4 * self.0.len() as u64 }
//!     fn as_any_mut(&mut self) -> &mut dyn std::any::Any { self }
//! }
//! impl Generator for Counter {
//!     fn info(&self) -> &GeneratorInfo { &self.0 }
//!     fn new_sequence(&self) -> Result<Box<dyn SequenceCache>> { Ok(Box::new(Seen(Vec::new()))) }
//!     fn step(&self, batch: &mut [StepItem<'_>]) -> Result<Vec<Vec<f32>>> {
//!         let vocab = self.0.vocab_size;
//!         Ok(batch.iter_mut().map(|item| {
//!             let seen = item.cache.as_any_mut().downcast_mut::<Seen>().expect("our cache");
//!             seen.0.extend_from_slice(item.tokens);
//!             let mut logits = vec![0.0; vocab];
//!             logits[(*seen.0.last().unwrap() as usize + 1) % vocab] = 1.0;
//!             logits
//!         }).collect())
//!     }
//! }
//! let g = Counter(GeneratorInfo::new("counter", "demo", Device::Cpu, 8, 64, TokenizerSource::None));
//! let mut cache = g.new_sequence()?;
//! let logits = g.step(&mut [StepItem::new(&[3, 4], cache.as_mut())])?;
//! assert_eq!(logits[0].iter().position(|&l| l == 1.0), Some(5));
//! assert_eq!(cache.len(), 2);
//! # Ok::<(), kiln_core::Error>(())
//! ```

use std::any::Any;
use std::path::PathBuf;

use crate::{Device, Error, Result};

/// A model that generates, one step at a time over a batch of sequences.
pub trait Generator: Send + Sync + 'static {
    /// What it is and how to talk to it.
    fn info(&self) -> &GeneratorInfo;

    /// An empty KV cache for a new sequence.
    fn new_sequence(&self) -> Result<Box<dyn SequenceCache>>;

    /// Appends each item's `tokens` to its cache and returns, per item in order, the
    /// logits (`vocab_size` values) for the token after its last one. Items may mix a
    /// whole prompt (prefill) and single tokens (decode). On an error no cache may be
    /// left half-updated in a way that breaks the next step; the runtime fails the
    /// step's sequences and drops their caches.
    fn step(&self, batch: &mut [StepItem<'_>]) -> Result<Vec<Vec<f32>>>;

    /// [`step`](Self::step), where an item marked [`greedy`](StepItem::greedy) may come
    /// back as its most likely token alone ([`Next::Token`]) instead of its logits. The
    /// runtime calls this one. A generator whose logits live on a device overrides it to
    /// pick those tokens there: with many streams, copying every row of logits to the
    /// host and scanning it there is a large part of a decode step (64 rows of a 49 152
    /// token vocabulary are 12.6 MB a step). The token must be the one the runtime would
    /// pick from the logits: the first index of the largest value. Items not marked
    /// greedy always get [`Next::Logits`]. The default: `step`'s logits for every item.
    fn step_next(&self, batch: &mut [StepItem<'_>]) -> Result<Vec<Next>> {
        Ok(self.step(batch)?.into_iter().map(Next::Logits).collect())
    }

    /// For a vision-language model ([`GeneratorInfo::vision`] set): the vision tower over
    /// processed images, one `[image tokens, hidden]` f32 tensor per image, in order.
    /// The default: this generator takes no images.
    fn encode_images(&self, images: &[ImagePatches]) -> Result<Vec<crate::Tensor>> {
        let _ = images;
        Err(Error::Unsupported(format!("{} takes no images; it is a text model", self.info().name)))
    }

    /// A new cache holding the first `tokens` of `cache` (which keeps its own), for the
    /// runtime's prefix cache: a later prompt that starts with the same tokens (and the
    /// same images) continues from it instead of computing them again. The runtime asks
    /// only for prefixes that end after the prompt's last image, so a decoder whose
    /// positions depend on the images (M-RoPE) keeps the offset it had. `Ok(None)`, the
    /// default: this generator's caches are not copied, and prompts are always computed
    /// whole. A copy may share storage with `cache` as long as neither sees the other's
    /// later tokens.
    fn fork(&self, cache: &mut dyn SequenceCache, tokens: usize) -> Result<Option<Box<dyn SequenceCache>>> {
        let _ = (cache, tokens);
        Ok(None)
    }
}

/// A sequence's KV cache. The generator that made it downcasts it back in `step`.
pub trait SequenceCache: Send + 'static {
    /// Tokens it holds.
    fn len(&self) -> usize;

    /// Whether it holds none.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes it holds (counted against the runtime's KV-cache budget).
    fn bytes(&self) -> u64;

    /// For the generator's downcast.
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// Slot ids for a generator whose running sequences share device buffers, one slot
/// each (KV tensors `[slots, kv_heads, capacity, head_dim]`, as candle's GPU decoder and
/// MLX's keep them): every id handed out stays below [`issued`](Self::issued), so the
/// buffers need that many slots; ids come back when a sequence's cache is dropped and
/// are handed out again before new ones.
#[derive(Debug, Default, Clone)]
pub struct SlotIds {
    issued: usize,
    free: Vec<usize>,
}

impl SlotIds {
    /// A free id: one given back, else the next new one.
    pub fn acquire(&mut self) -> usize {
        self.free.pop().unwrap_or_else(|| {
            self.issued += 1;
            self.issued - 1
        })
    }

    /// Gives `id` back; `true` when no id is taken any more, so the buffers can go (the
    /// ids then start again from 0).
    pub fn release(&mut self, id: usize) -> bool {
        debug_assert!(id < self.issued && !self.free.contains(&id), "slot {id} given back twice");
        self.free.push(id);
        let empty = self.free.len() == self.issued;
        if empty {
            *self = SlotIds::default();
        }
        empty
    }

    /// Ids handed out so far: every id in use is below it.
    pub fn issued(&self) -> usize {
        self.issued
    }
}

/// One sequence of a step.
pub struct StepItem<'a> {
    /// Its new tokens: the prompt when it joins, then one token per step.
    pub tokens: &'a [u32],
    /// Its cache, which the step extends.
    pub cache: &'a mut dyn SequenceCache,
    /// For a vision-language model, on the prompt's step: its images, in the order of
    /// their placeholder runs in `tokens` (empty otherwise).
    pub images: &'a [StepImage<'a>],
    /// Whether the runtime needs only this item's most likely token (greedy sampling
    /// with no repetition penalty, logits not kept for the prefix cache), so
    /// [`Generator::step_next`] may give the token alone.
    pub greedy: bool,
}

impl<'a> StepItem<'a> {
    /// An item of `tokens` and no images, wanting its logits.
    pub fn new(tokens: &'a [u32], cache: &'a mut dyn SequenceCache) -> Self {
        StepItem { tokens, cache, images: &[], greedy: false }
    }
}

/// What [`Generator::step_next`] gives for one item.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// The logits (`vocab_size` values) for the token after the item's last one.
    Logits(Vec<f32>),
    /// The most likely next token (the first index of the largest logit), for an item
    /// marked [`StepItem::greedy`].
    Token(u32),
}

impl Next {
    /// The logits; a token alone is an error. For a generator whose
    /// [`step`](Generator::step) runs its `step_next` with no item picked.
    ///
    /// ```
    /// use kiln_core::Next;
    /// assert_eq!(Next::Logits(vec![0.5, 2.0]).into_logits().unwrap(), [0.5, 2.0]);
    /// assert!(Next::Token(7).into_logits().unwrap_err().to_string().contains("token 7 alone"));
    /// ```
    pub fn into_logits(self) -> Result<Vec<f32>> {
        match self {
            Next::Logits(logits) => Ok(logits),
            Next::Token(t) => {
                Err(Error::backend("kiln", format!("token {t} alone where logits were asked for")))
            }
        }
    }
}

/// One image of a prompt, as the vision tower encoded it.
#[derive(Debug, Clone, Copy)]
pub struct StepImage<'a> {
    /// `[image tokens, hidden]`, f32: what [`Generator::encode_images`] gave for it.
    pub embedding: &'a crate::Tensor,
    /// Its patches in time, height and width (the processor's `grid_thw`).
    pub grid_thw: [usize; 3],
}

/// One image as the model's processor made it, for [`Generator::encode_images`].
#[derive(Debug, Clone, PartialEq)]
pub struct ImagePatches {
    /// Patch rows, `[patches, values per patch]`, row-major, in the processor's order.
    pub values: Vec<f32>,
    /// Patches in time, height and width.
    pub grid_thw: [usize; 3],
}

/// What a vision-language generator needs of the runtime to put images in a prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionInfo {
    /// The processor family that prepares its images (`"qwen2-vl"`).
    pub processor: String,
    /// The checkpoint folder, whose `preprocessor_config.json` holds the processor's
    /// settings.
    pub dir: PathBuf,
    /// The placeholder the chat template writes once per image, which the runtime
    /// repeats once per image token (`<|image_pad|>`).
    pub image_token: String,
    /// Its id.
    pub image_token_id: u32,
    /// Patches merged per side into one image token.
    pub merge_size: usize,
    /// Bytes the vision tower's weights take (for admission).
    pub weight_bytes: u64,
}

/// What a generator is and how to talk to it.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct GeneratorInfo {
    /// Model name (file stem).
    pub name: String,
    /// The provider that loaded it.
    pub provider: String,
    /// Where it runs.
    pub device: Device,
    /// Tokens a sequence may hold (prompt and generated).
    pub context_length: usize,
    /// Logits per step and item.
    pub vocab_size: usize,
    /// Where the tokenizer comes from.
    pub tokenizer: TokenizerSource,
    /// Tokens that end a sequence (end of text, end of turn).
    pub eos_token_ids: Vec<u32>,
    /// The beginning-of-sequence token, prepended to prompts when `add_bos` is set.
    pub bos_token_id: Option<u32>,
    /// Whether prompts start with `bos_token_id`.
    pub add_bos: bool,
    /// The model's chat template (Jinja, as Hugging Face and GGUF files carry it).
    pub chat_template: Option<String>,
    /// Bytes one token takes in a sequence's cache (all layers, keys and values).
    pub kv_bytes_per_token: u64,
    /// Bytes of the weights as loaded.
    pub weight_bytes: Option<u64>,
    /// Precision notes for people: e.g. `q8_0 (re-quantized from q4_1)`.
    pub quantization: String,
    /// For a vision-language model: how images go into its prompts. `None`: text only.
    pub vision: Option<VisionInfo>,
}

impl GeneratorInfo {
    /// Checks one step item against the model: some tokens, all inside the vocabulary,
    /// and room for them after the `held` tokens its cache has. What a generator's `step`
    /// checks before it touches any cache.
    pub fn check_step(&self, tokens: &[u32], held: usize) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::InvalidInput("a step item without tokens".into()));
        }
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(Error::InvalidInput(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.vocab_size
            )));
        }
        if held + tokens.len() > self.context_length {
            return Err(Error::InvalidInput(format!(
                "{} tokens would exceed the context of {}",
                held + tokens.len(),
                self.context_length
            )));
        }
        Ok(())
    }

    /// Info with the required parts; the rest empty.
    pub fn new(
        name: impl Into<String>,
        provider: impl Into<String>,
        device: Device,
        vocab_size: usize,
        context_length: usize,
        tokenizer: TokenizerSource,
    ) -> Self {
        GeneratorInfo {
            name: name.into(),
            provider: provider.into(),
            device,
            context_length,
            vocab_size,
            tokenizer,
            eos_token_ids: Vec::new(),
            bos_token_id: None,
            add_bos: false,
            chat_template: None,
            kv_bytes_per_token: 0,
            weight_bytes: None,
            quantization: String::new(),
            vision: None,
        }
    }
}

/// Where a generator's tokenizer comes from.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum TokenizerSource {
    /// A byte-level BPE described by a GGUF file's `tokenizer.ggml.*` metadata.
    GgufBpe {
        /// `tokenizer.ggml.pre`: the pre-tokenizer's name (`smollm`, `gpt2`, ...).
        pre: String,
        /// Token strings by id.
        tokens: Vec<String>,
        /// Merge rules, `"a b"`, highest priority first.
        merges: Vec<String>,
        /// `tokenizer.ggml.token_type` by id (3: control, 4: user-defined).
        token_types: Vec<i32>,
    },
    /// A Hugging Face `tokenizer.json`.
    File(PathBuf),
    /// None: the caller passes token ids (tests, custom providers).
    None,
}

#[cfg(test)]
mod slot_tests {
    use super::SlotIds;

    #[test]
    fn slot_ids_are_reused_and_start_over_when_all_are_back() {
        let mut ids = SlotIds::default();
        let (a, b, c) = (ids.acquire(), ids.acquire(), ids.acquire());
        assert_eq!((a, b, c, ids.issued()), (0, 1, 2, 3));
        assert!(!ids.release(b));
        // A freed id is handed out before a new one, so the buffers do not grow.
        assert_eq!(ids.acquire(), 1);
        assert_eq!(ids.issued(), 3);
        assert!(!ids.release(a));
        assert!(!ids.release(1));
        assert!(ids.release(c), "the last id back empties the set");
        assert_eq!((ids.issued(), ids.acquire()), (0, 0));
    }
}
