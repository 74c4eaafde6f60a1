//! The embedding head: how a text model's token vectors become one vector per text.
//!
//! # Design
//!
//! Pooling and normalisation belong inside the model run, where the token vectors
//! already are: on a GPU, copying `[batch, sequence, hidden]` to the host to average it
//! there moves `sequence` times the bytes of the answer and leaves the device idle while
//! the host works. So the runtime hands the head it wants to the provider in
//! [`ModelSpec::head`](crate::ModelSpec::head); a provider that applies it says so in
//! [`ModelInfo::head`](crate::ModelInfo::head) and returns [`SENTENCE_EMBEDDING`]
//! (`[batch, hidden]`, f32, already normalised if asked). A provider that ignores the
//! head keeps returning token vectors, and the runtime pools them on the host with
//! [`pool_tokens`] — the same arithmetic, so results do not depend on where it ran.

use serde::{Deserialize, Serialize};

use crate::config::Pooling;

/// The output a model with an embedding head returns: one f32 vector per text.
pub const SENTENCE_EMBEDDING: &str = "sentence_embedding";

/// The output a text encoder without a head returns: one vector per token,
/// `[batch, sequence, hidden]`, which kiln pools on the host.
pub const LAST_HIDDEN_STATE: &str = "last_hidden_state";

/// Pooling plus optional L2 normalisation, as sentence-transformers' `Pooling` and
/// `Normalize` modules do them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct EmbeddingHead {
    /// How token vectors become one vector (over real tokens: attention mask 1).
    pub pooling: Pooling,
    /// Divide by the L2 norm (at least 1e-12, as `torch.nn.functional.normalize`).
    pub normalize: bool,
}

/// Where a provider applies an [`EmbeddingHead`] inside its run, as
/// [`ModelInfo::declare_head`](crate::ModelInfo::declare_head) found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeadSite {
    /// The head to apply.
    pub head: EmbeddingHead,
    /// Position of the token-vector output among the model's own outputs.
    pub tokens: usize,
    /// Its name.
    pub tokens_name: String,
    /// Position of the `attention_mask` input among the model's inputs.
    pub mask: usize,
}

/// Pools `[batch, sequence, hidden]` row-major values under a `[batch, sequence]` mask
/// (non-zero = real token) into `[batch, hidden]`, row-major.
///
/// Mean divides by the real-token count clamped at 1e-9 (an all-padding row gives
/// zeros, as sentence-transformers does); max over no tokens gives zeros.
///
/// ```
/// use kiln_core::{EmbeddingHead, Pooling, pool_tokens};
/// let head = EmbeddingHead { pooling: Pooling::Mean, normalize: false };
/// // one text, two tokens of which the second is padding, hidden 2
/// assert_eq!(pool_tokens(&[1.0, 2.0, 9.0, 9.0], &[1, 0], 1, 2, 2, head), vec![1.0, 2.0]);
/// ```
pub fn pool_tokens(
    values: &[f32],
    mask: &[i64],
    batch: usize,
    sequence: usize,
    hidden: usize,
    head: EmbeddingHead,
) -> Vec<f32> {
    let mut out = vec![0f32; batch * hidden];
    for (b, v) in out.chunks_exact_mut(hidden.max(1)).enumerate().take(batch) {
        let rows = (0..sequence)
            .filter(|&s| mask[b * sequence + s] != 0)
            .map(|s| &values[(b * sequence + s) * hidden..][..hidden]);
        pool_rows(rows, Some(&values[b * sequence * hidden..][..hidden]), head, v);
    }
    out
}

/// Pools one text into `out`: `rows` are its real tokens' vectors, `first` the vector
/// at position 0 (CLS pooling takes it; `None` gives zeros). The arithmetic of
/// [`pool_tokens`], for callers that hold real tokens without padding.
pub fn pool_rows<'a>(
    rows: impl Iterator<Item = &'a [f32]>,
    first: Option<&[f32]>,
    head: EmbeddingHead,
    out: &mut [f32],
) {
    out.fill(0.0);
    match head.pooling {
        Pooling::Cls => {
            if let Some(first) = first {
                out.copy_from_slice(first);
            }
        }
        Pooling::Mean | Pooling::MeanSqrtLen => {
            let mut count = 0f32;
            for row in rows {
                out.iter_mut().zip(row).for_each(|(s, x)| *s += x);
                count += 1.0;
            }
            let div = if head.pooling == Pooling::Mean { count.max(1e-9) } else { count.max(1e-9).sqrt() };
            out.iter_mut().for_each(|s| *s /= div);
        }
        Pooling::Max => {
            out.fill(f32::NEG_INFINITY);
            for row in rows {
                out.iter_mut().zip(row).for_each(|(m, &x)| *m = m.max(x));
            }
            out.iter_mut().filter(|m| m.is_infinite()).for_each(|m| *m = 0.0);
        }
    }
    if head.normalize {
        normalize(out);
    }
}

/// L2-normalises `v` in place, dividing by max(norm, 1e-12).
pub fn normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(pooling: Pooling, normalize: bool) -> EmbeddingHead {
        EmbeddingHead { pooling, normalize }
    }

    // Two texts, three positions, hidden 2; the second text has one padding position.
    const VALUES: [f32; 12] = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 10.0, 0.0, 0.0, 10.0, 99.0, 99.0];
    const MASK: [i64; 6] = [1, 1, 1, 1, 1, 0];

    #[test]
    fn mean_pooling_ignores_padding() {
        let out = pool_tokens(&VALUES, &MASK, 2, 3, 2, head(Pooling::Mean, false));
        assert_eq!(out, vec![3.0, 4.0, 5.0, 5.0]);
    }

    #[test]
    fn cls_max_and_sqrt_len_pooling() {
        assert_eq!(pool_tokens(&VALUES, &MASK, 2, 3, 2, head(Pooling::Cls, false))[2..], [10.0, 0.0]);
        assert_eq!(pool_tokens(&VALUES, &MASK, 2, 3, 2, head(Pooling::Max, false))[2..], [10.0, 10.0]);
        let s = pool_tokens(&VALUES, &MASK, 2, 3, 2, head(Pooling::MeanSqrtLen, false));
        assert!((s[2] - 10.0 / 2f32.sqrt()).abs() < 1e-6);
    }

    #[test]
    fn normalisation_gives_unit_vectors_and_survives_zeros() {
        let out = pool_tokens(&VALUES, &MASK, 2, 3, 2, head(Pooling::Mean, true));
        let norm = (out[0].powi(2) + out[1].powi(2)).sqrt();
        assert!((norm - 1.0).abs() < 1e-6);
        let zeros = pool_tokens(&[0.0; 4], &[0, 0], 1, 2, 2, head(Pooling::Mean, true));
        assert_eq!(zeros, vec![0.0, 0.0]);
        let max_of_nothing = pool_tokens(&[5.0; 4], &[0, 0], 1, 2, 2, head(Pooling::Max, false));
        assert_eq!(max_of_nothing, vec![0.0, 0.0]);
    }
}
