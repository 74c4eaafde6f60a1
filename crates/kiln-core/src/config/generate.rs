//! `[generate]`: the generate task's decoding settings.

use serde::{Deserialize, Serialize};

use crate::ConfigIssue;

/// Most stop strings a request may set.
pub const MAX_STOPS: usize = 16;
/// Longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 256;

/// `[generate]`: how the generate task decodes. Greedy (`temperature = 0`, the default)
/// is deterministic; sampling repeats for the same `seed`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenerateConfig {
    /// Tokens generated at most per prompt.
    pub max_new_tokens: usize,
    /// 0: greedy (the most likely token); above 0: sampling at this temperature.
    pub temperature: f32,
    /// Sampling: only the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Sampling: only the most likely tokens whose probabilities sum to `top_p` (1: all).
    pub top_p: f32,
    /// Above 1: tokens already in the sequence become less likely (logits above 0
    /// divided by it, below 0 multiplied, as llama.cpp and Hugging Face do).
    pub repetition_penalty: f32,
    /// Sampling seed; a request's sequence samples from its own generator seeded with it.
    pub seed: u64,
    /// Generation stops before any of these strings (not included in the text).
    pub stop: Vec<String>,
    /// Render `messages` and plain prompts with the model's chat template (a prompt
    /// becomes one user message); off: prompts go to the model as they are.
    pub chat_template: bool,
    /// Bytes all running sequences' KV caches may take together (MiB); a sequence
    /// waits until its whole context (prompt + `max_new_tokens`) fits. 0: no bound but
    /// `batching.max_batch_size` sequences.
    pub kv_cache_mb: u64,
    /// At load, before the first request: a few steps on throwaway sequences (a prompt
    /// alone, one token alone, a prompt beside a decoding sequence, and
    /// `batching.max_batch_size` sequences decoding together), so a backend that
    /// compiles kernels for each kind of step on first use (MLX on a GPU) does so while
    /// loading, not in the first requests' latency. Ignored in a request's settings.
    pub warmup: bool,
    /// Longest a request may take, milliseconds, from its submission to its end: one
    /// still waiting then fails (`timeout`); one running ends with what it has generated
    /// (finish reason `timeout`). 0: no deadline.
    pub timeout_ms: u64,
    /// Vision-language models: images one prompt may carry at most.
    pub max_images: usize,
    /// Vision-language models: most pixels an image is resized to, overriding the
    /// checkpoint's `max_pixels` when lower (0: the checkpoint's). Bounds the image tokens.
    pub max_image_pixels: u64,
    /// Vision-language models: MiB of encoded images kept, by content, so an image seen
    /// again skips the vision tower (0: no cache).
    pub image_cache_mb: u64,
    /// Prompt tokens one step of the model reads at most, over all the prompts being
    /// read: a longer prompt is read over several steps, between which the running
    /// streams go on, so a long prompt delays them by one such step, not by its whole
    /// prefill (vLLM's and llama.cpp's chunked prefill). 0: whole prompts in one step.
    /// Prompts with images are read whole. Ignored in a request's settings.
    pub prefill_chunk: usize,
    /// MiB of prompts' KV caches kept after their prefill (the prefix cache), so a later
    /// prompt that starts with the same tokens and the same images — a question asked
    /// again, another question about the same images after the same system prompt —
    /// computes only what follows (0: none). Only prefixes of 16 tokens or more that end
    /// after the prompt's last image are reused. Generators that cannot copy a cache
    /// (MLX's GGUF decoder so far) keep nothing. Ignored in a request's settings.
    pub prefix_cache_mb: u64,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        GenerateConfig {
            max_new_tokens: 256,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
            stop: Vec::new(),
            chat_template: true,
            kv_cache_mb: 1024,
            warmup: true,
            timeout_ms: 300_000,
            max_images: 8,
            max_image_pixels: 0,
            image_cache_mb: 256,
            prefill_chunk: 128,
            prefix_cache_mb: 256,
        }
    }
}

impl GenerateConfig {
    /// What is out of range, by key.
    pub fn issues(&self) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        if self.max_new_tokens == 0 {
            issues.push(ConfigIssue::new("generate.max_new_tokens", "0", "1 or more"));
        }
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            issues.push(ConfigIssue::new(
                "generate.temperature",
                self.temperature.to_string(),
                "0 (greedy) or more",
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            issues.push(ConfigIssue::new("generate.top_p", self.top_p.to_string(), "above 0, at most 1"));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            issues.push(ConfigIssue::new(
                "generate.repetition_penalty",
                self.repetition_penalty.to_string(),
                "above 0 (1: off)",
            ));
        }
        if self.max_images == 0 {
            issues.push(ConfigIssue::new("generate.max_images", "0", "1 or more"));
        }
        if self.stop.iter().any(String::is_empty) {
            issues.push(ConfigIssue::new("generate.stop", "\"\"", "non-empty strings"));
        }
        // Every token is checked against every stop string: bounded, so one request's
        // stop strings cannot slow the engine's other streams.
        if self.stop.len() > MAX_STOPS || self.stop.iter().any(|s| s.len() > MAX_STOP_BYTES) {
            let longest = self.stop.iter().map(String::len).max().unwrap_or(0);
            issues.push(ConfigIssue::new(
                "generate.stop",
                format!("{} strings, the longest {longest} bytes", self.stop.len()),
                format!("at most {MAX_STOPS} strings of at most {MAX_STOP_BYTES} bytes each"),
            ));
        }
        issues
    }
}
