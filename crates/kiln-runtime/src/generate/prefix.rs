//! The prefix cache (`generate.prefix_cache_mb`): prompts' KV caches kept after their
//! prefill, so a later prompt starting with the same tokens and the same images computes
//! only what follows — what vLLM calls automatic prefix caching, for the case kiln's
//! users meet most: "Compare these images." asked again, or another question about the
//! same images after the same system prompt.
//!
//! # Design
//!
//! A prompt is matched by its *signature*: one `u64` per token — the token id, or, for
//! an image placeholder, the image's content key (with the top bit set, so it never
//! equals an id). Two prompts with the same placeholders but other images differ there.
//! The longest common prefix with a kept prompt is usable when neither prompt has an
//! image placeholder after it (the new prompt's images all lie in the reused part, and
//! the kept prompt's position offset — M-RoPE's rope delta, fixed by its last image —
//! holds for what follows) and is at least [`MIN_TOKENS`] long. A prompt kept whole
//! comes back whole, with the logits its prefill ended with: the same prompt again
//! computes nothing and answers exactly as the first time. Otherwise at least its last
//! token is computed, for its logits — then the answer is the one computed whole up to
//! float rounding (a shorter product sums in another order), so a greedy token can
//! differ where two candidates are within rounding of each other. Kept caches come from the
//! generator's [`fork`](kiln_core::Generator::fork) (views or copy-on-write handles of
//! the running sequence's buffers, so keeping one costs no copy); they are few (bytes
//! bounded), so a lookup compares the signature with each, and the least recently used
//! go first.

use kiln_core::{Generator, Result, SequenceCache};

/// Shorter common prefixes are computed again: reusing them saves less than it risks.
pub(super) const MIN_TOKENS: usize = 16;

/// Marks an image placeholder in a signature.
const IMAGE: u64 = 1 << 63;

/// A prompt's signature: ids, and each image placeholder as its image's key.
pub(super) fn signature(tokens: &[u32], image_token: Option<u32>, image_keys: &[u128]) -> Vec<u64> {
    let mut image = 0usize;
    let mut previous_was_image = false;
    tokens
        .iter()
        .map(|&t| {
            if Some(t) == image_token {
                if !previous_was_image && image_keys.len() > image {
                    image += 1;
                }
                previous_was_image = true;
                let key = image_keys.get(image.saturating_sub(1)).copied().unwrap_or(0);
                IMAGE | (((key as u64) ^ ((key >> 64) as u64)) & !IMAGE)
            } else {
                previous_was_image = false;
                u64::from(t)
            }
        })
        .collect()
}

struct Entry {
    signature: Vec<u64>,
    cache: Box<dyn SequenceCache>,
    /// The logits after the prompt's last token, so the same prompt again computes
    /// nothing and gets exactly the first answer's first token.
    logits: Vec<f32>,
    bytes: u64,
    last_used: u64,
}

/// Kept prompts' caches, bounded in bytes.
pub(super) struct PrefixCache {
    entries: Vec<Entry>,
    budget: u64,
    held: u64,
    clock: u64,
}

/// A usable prefix: how many tokens of the new prompt a kept cache covers, and a cache
/// of them for the new sequence; for the whole prompt, its logits too.
pub(super) struct Reuse {
    pub(super) tokens: usize,
    pub(super) cache: Box<dyn SequenceCache>,
    pub(super) logits: Option<Vec<f32>>,
}

impl PrefixCache {
    /// An empty cache of at most `budget` bytes.
    pub(super) fn new(budget: u64) -> PrefixCache {
        PrefixCache { entries: Vec::new(), budget, held: 0, clock: 0 }
    }

    /// Bytes the kept caches take.
    pub(super) fn bytes(&self) -> u64 {
        self.held
    }

    /// The longest usable prefix of `signature` among the kept prompts, forked for a new
    /// sequence.
    pub(super) fn lookup(&mut self, generator: &dyn Generator, signature: &[u64]) -> Result<Option<Reuse>> {
        let mut best: Option<(usize, usize)> = None;
        for (i, e) in self.entries.iter().enumerate() {
            if e.signature == signature {
                best = Some((i, signature.len()));
                break;
            }
            let common = e.signature.iter().zip(signature).take_while(|(a, b)| a == b).count();
            // Short of the whole prompt, at least its last token is computed, for the logits.
            let usable = common.min(signature.len().saturating_sub(1));
            let images_after =
                |s: &[u64]| s.get(usable..).is_some_and(|rest| rest.iter().any(|v| v & IMAGE != 0));
            if usable < MIN_TOKENS || images_after(signature) || images_after(&e.signature) {
                continue;
            }
            if best.is_none_or(|(_, n)| usable > n) {
                best = Some((i, usable));
            }
        }
        let Some((i, tokens)) = best else { return Ok(None) };
        self.clock += 1;
        let entry = &mut self.entries[i];
        entry.last_used = self.clock;
        let logits = (tokens == entry.signature.len()).then(|| entry.logits.clone());
        Ok(generator.fork(entry.cache.as_mut(), tokens)?.map(|cache| Reuse { tokens, cache, logits }))
    }

    /// Keeps the prompt `signature` whose prefill `cache` holds, and the `logits` after
    /// its last token (nothing when a kept prompt already covers it, when it is short, or
    /// when the generator cannot fork); the least recently used go to stay within the
    /// budget.
    pub(super) fn insert(
        &mut self,
        generator: &dyn Generator,
        signature: Vec<u64>,
        cache: &mut dyn SequenceCache,
        logits: &[f32],
    ) {
        if signature.len() < MIN_TOKENS || cache.len() != signature.len() {
            return;
        }
        if self
            .entries
            .iter()
            .any(|e| e.signature.len() >= signature.len() && e.signature.starts_with(&signature))
        {
            return;
        }
        let Ok(Some(kept)) = generator.fork(cache, signature.len()) else { return };
        let bytes = kept.bytes() + (logits.len() * 4) as u64;
        if bytes > self.budget {
            return;
        }
        // A kept prompt that this one extends is covered by it now.
        let (held, entries) = (&mut self.held, &mut self.entries);
        entries.retain(|e| {
            let covered = signature.starts_with(&e.signature);
            if covered {
                *held -= e.bytes;
            }
            !covered
        });
        while self.held + bytes > self.budget {
            let Some(oldest) =
                self.entries.iter().enumerate().min_by_key(|(_, e)| e.last_used).map(|(i, _)| i)
            else {
                break;
            };
            self.held -= self.entries.swap_remove(oldest).bytes;
        }
        self.clock += 1;
        self.held += bytes;
        self.entries.push(Entry {
            signature,
            cache: kept,
            logits: logits.to_vec(),
            bytes,
            last_used: self.clock,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_carry_their_image() {
        let pad = 9;
        let a = signature(&[1, 9, 9, 2, 9, 3], Some(pad), &[10, 20]);
        let b = signature(&[1, 9, 9, 2, 9, 3], Some(pad), &[10, 21]);
        assert_eq!(a[..4], b[..4]);
        assert_ne!(a[4], b[4], "another second image");
        assert!(a[1] & IMAGE != 0 && a[0] == 1 && a[3] == 2);
        assert_ne!(a[1], a[4], "each run is its own image");
        assert_eq!(signature(&[1, 2], None, &[]), vec![1, 2]);
    }
}
