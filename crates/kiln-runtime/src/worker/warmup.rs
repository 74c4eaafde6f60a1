//! Warming a model up: every batch shape the buckets can produce, run before the first
//! request (`batching.warmup`, on for GPUs).

use std::time::{Duration, Instant};

use kiln_core::{Dim, Error, Inputs, Result, Tensor};

use super::handle::ModelWorker;
use crate::collate::has_sequence_dim;

/// What [`ModelWorker::warm_up`] did.
#[derive(Debug, Clone)]
pub struct WarmUp {
    /// The (rows, sequence) shapes run, largest first; sequence 0 without a sequence dim.
    pub shapes: Vec<(usize, usize)>,
    /// Time it took.
    pub elapsed: Duration,
    /// Why nothing ran, if so.
    pub skipped: Option<String>,
}

impl ModelWorker {
    /// Runs every batch shape the [`buckets`](Self::buckets) can produce — rows up to
    /// `max_batch_size`, sequences up to `max_sequence` — three times each, largest
    /// first, with inputs of zeros: a GPU backend sets up its kernels per shape on the
    /// first runs (and libtorch's profiling executor optimises on the second), which
    /// would otherwise land on the first requests. The largest batch going first also
    /// shows at once whether it fits in the device's memory: an error here names the
    /// shape and the settings that bound it.
    ///
    /// Inputs need their shapes known: dim 0 the batch, dim 1 a sequence (given
    /// `max_sequence`) or fixed, the others fixed or given by `item` (one item's shape
    /// without the batch dim, as the image pipeline makes it); otherwise nothing runs and
    /// the answer says why.
    pub async fn warm_up(&self, max_sequence: Option<usize>, item: Option<&[usize]>) -> Result<WarmUp> {
        let started = Instant::now();
        let skipped =
            |why: String| Ok(WarmUp { shapes: Vec::new(), elapsed: Duration::ZERO, skipped: Some(why) });
        let shapes = match self.warmup_shapes(max_sequence) {
            Ok(shapes) => shapes,
            Err(why) => return skipped(why),
        };
        if let Some(&(_, sequence)) = shapes.first()
            && let Err(why) = self.zero_inputs(1, sequence, item)
        {
            return skipped(why.to_string());
        }
        for &(rows, sequence) in &shapes {
            let inputs = self.zero_inputs(rows, sequence, item)?;
            for _ in 0..3 {
                self.run_whole(inputs.clone(), true).await.map_err(|e| {
                    let limits = if sequence > 0 {
                        "batching.max_batch_size, batching.max_batch_tokens or text.max_length"
                    } else {
                        "batching.max_batch_size"
                    };
                    Error::backend(
                        "kiln",
                        format!(
                            "warming up {} with a batch of {rows}{}: {e} (a smaller {limits} bounds the batches; \
                             batching.warmup = false skips the warm-up)",
                            self.info().name,
                            if sequence > 0 { format!(" x {sequence} tokens") } else { String::new() },
                        ),
                    )
                })?;
            }
        }
        Ok(WarmUp { shapes, elapsed: started.elapsed(), skipped: None })
    }

    /// (rows, sequence) of every bucket, largest first; sequence 0 for models without one.
    fn warmup_shapes(&self, max_sequence: Option<usize>) -> std::result::Result<Vec<(usize, usize)>, String> {
        let buckets = self.buckets();
        if self.info().inputs.is_empty() {
            return Err("the model does not declare its inputs".into());
        }
        let sequences: Vec<usize> = if has_sequence_dim(self.info()) {
            let max = max_sequence.or(self.info().max_sequence_length).ok_or(
                "its sequence dim has no known maximum (no max_sequence_length, no text.max_length)",
            )?;
            let mut lengths: Vec<usize> = (1..=max).map(|len| buckets.sequence(len)).collect();
            lengths.dedup();
            lengths
        } else {
            vec![0]
        };
        let mut shapes = Vec::new();
        for &sequence in sequences.iter().rev() {
            let mut rows: Vec<usize> =
                (1..=self.policy().max_batch_size).map(|n| buckets.rows(n, sequence.max(1))).collect();
            // Batches over the token budget never form (a lone long item aside).
            rows.retain(|&r| buckets.max_tokens == 0 || r * sequence.max(1) <= buckets.max_tokens || r == 1);
            rows.dedup();
            shapes.extend(rows.into_iter().rev().map(|r| (r, sequence)));
        }
        Ok(shapes)
    }

    /// Inputs of zeros (token id 0 is padding, mask 0, type 0: valid for every text model).
    fn zero_inputs(&self, rows: usize, sequence: usize, item: Option<&[usize]>) -> Result<Inputs> {
        let mut inputs = Inputs::new();
        for spec in &self.info().inputs {
            let shape = spec
                .shape
                .iter()
                .enumerate()
                .map(|(i, dim)| match (i, dim) {
                    (0, _) => Ok(rows),
                    (_, Dim::Fixed(n)) => Ok(*n),
                    (i, Dim::Dynamic(_)) if item.is_some_and(|s| s.len() + 1 == spec.shape.len()) => {
                        Ok(item.expect("checked")[i - 1])
                    }
                    (1, Dim::Dynamic(_)) if sequence > 0 => Ok(sequence),
                    (_, Dim::Dynamic(name)) => Err(Error::Unsupported(format!(
                        "warm-up: input `{}` has a dynamic dim `{name}` kiln cannot size",
                        spec.name
                    ))),
                })
                .collect::<Result<Vec<_>>>()?;
            let bytes =
                shape.iter().try_fold(spec.dtype.size(), |n, &d| n.checked_mul(d)).ok_or_else(|| {
                    Error::Unsupported(format!(
                        "warm-up: input `{}` of shape {shape:?} is too large",
                        spec.name
                    ))
                })?;
            inputs.insert(&spec.name, Tensor::from_bytes(spec.dtype, shape, vec![0; bytes])?);
        }
        Ok(inputs)
    }
}
