//! Putting the inputs of many requests into one batch, and the outputs back.
//!
//! Each request ("item") carries tensors with a leading batch dim of 1. Collation
//! stacks them along dim 0 and right-pads dim 1 (the sequence) to the longest item
//! with zeros — the attention mask marks the padding. Splitting gives each item its row
//! of every output, trimmed back to the item's length on the output dims that the
//! model's [`ModelInfo`] names like the inputs' sequence dim.
//!
//! [`Buckets`] round a batch's shape up — zero rows, longer padding — so that a model
//! meets a few shapes again and again: libtorch on a GPU spends ~50 ms on the first
//! run of every new shape (docs/benchmarks.md, "shapes"), more than ten batches' work.

use kiln_core::{Dim, Error, Inputs, ModelInfo, NamedTensors, Outputs, Result, Tensor};

/// How collation rounds a batch's shape up. `Buckets::default()` rounds nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Buckets {
    /// Rows rounded up to a multiple of this with rows of zeros (1: none added).
    pub batch_multiple: usize,
    /// The sequence dim rounded up to a multiple of this (1: the longest item's length).
    pub sequence_multiple: usize,
    /// Added rows never take a batch past this many rows...
    pub max_rows: usize,
    /// ...nor past this many padded tokens (rows × sequence; 0: no limit).
    pub max_tokens: usize,
    /// Padding never takes the sequence past this (the model's positions), unless an
    /// item is longer.
    pub max_sequence: Option<usize>,
}

impl Default for Buckets {
    fn default() -> Self {
        Buckets {
            batch_multiple: 1,
            sequence_multiple: 1,
            max_rows: usize::MAX,
            max_tokens: 0,
            max_sequence: None,
        }
    }
}

impl Buckets {
    /// The padded sequence length for a batch whose longest item has `len`.
    pub fn sequence(&self, len: usize) -> usize {
        let rounded = len.div_ceil(self.sequence_multiple.max(1)) * self.sequence_multiple.max(1);
        self.max_sequence.map_or(rounded, |cap| rounded.min(cap)).max(len)
    }

    /// The rows a batch of `items` at padded length `sequence` runs with.
    pub fn rows(&self, items: usize, sequence: usize) -> usize {
        let mut rows = items.div_ceil(self.batch_multiple.max(1)) * self.batch_multiple.max(1);
        rows = rows.min(self.max_rows);
        if self.max_tokens > 0 {
            rows = rows.min(self.max_tokens / sequence.max(1));
        }
        rows.max(items)
    }
}

/// A collated batch.
#[derive(Debug)]
pub struct Batch {
    /// The inputs, `rows` × `sequence` where they have a sequence dim.
    pub inputs: Inputs,
    /// Dim 1 of the padded inputs (the longest item's, rounded up by the buckets).
    pub sequence: usize,
    /// Dim 0: the items first, then rows of zeros.
    pub rows: usize,
}

/// Stacks items into one batch, rounded up by `buckets`: dim 1 of every input of rank
/// 2 or more is padded to the longest item's, then to its bucket (buckets for a model
/// with no sequence dim pad none, so an image's channels stay as they are).
pub fn collate(items: &[&Inputs], buckets: &Buckets) -> Result<Batch> {
    let first = items.first().ok_or_else(|| Error::InvalidInput("an empty batch".into()))?;
    let mut longest = 0;
    for item in items {
        for (_, t) in item.iter() {
            if t.shape().len() >= 2 {
                longest = longest.max(t.shape()[1]);
            }
        }
    }
    let sequence = buckets.sequence(longest);
    let rows = buckets.rows(items.len(), sequence);
    let mut batch = Inputs::new();
    for name in first.names() {
        let tensors: Vec<&Tensor> = items.iter().map(|i| i.require(name)).collect::<Result<_>>()?;
        batch.insert(name, stack(name, &tensors, sequence, rows)?);
    }
    Ok(Batch { inputs: batch, sequence, rows })
}

fn stack(name: &str, tensors: &[&Tensor], padded: usize, rows: usize) -> Result<Tensor> {
    let first = tensors[0];
    let (dtype, rank) = (first.dtype(), first.shape().len());
    let inner: usize = first.shape().iter().skip(2).product();
    for t in tensors {
        let same_inner = t.shape().len() == rank && t.shape().iter().skip(2).product::<usize>() == inner;
        if t.dtype() != dtype || !same_inner || t.shape()[0] != 1 {
            return Err(Error::InvalidInput(format!(
                "input `{name}`: cannot batch {} {:?} with {} {:?}; items need batch dim 1 and the same dtype and trailing dims",
                t.dtype(),
                t.shape(),
                dtype,
                first.shape()
            )));
        }
    }
    if rank < 2 {
        let mut data: Vec<u8> = tensors.iter().flat_map(|t| t.bytes().iter().copied()).collect();
        data.resize(rows * first.bytes().len(), 0);
        let mut shape = first.shape().to_vec();
        if let Some(d) = shape.first_mut() {
            *d = rows;
        }
        return Tensor::from_bytes(dtype, shape, data);
    }
    let row = padded * inner * dtype.size();
    let mut data = vec![0u8; rows * row];
    for (i, t) in tensors.iter().enumerate() {
        data[i * row..][..t.bytes().len()].copy_from_slice(t.bytes());
    }
    let mut shape = vec![rows, padded];
    shape.extend(first.shape().iter().skip(2));
    Tensor::from_bytes(dtype, shape, data)
}

/// Whether any input has a sequence dim (a dynamic dim 1).
pub(crate) fn has_sequence_dim(info: &ModelInfo) -> bool {
    !sequence_dims(info).is_empty()
}

/// The names of dims that vary with an input's sequence length (dim 1 of the inputs).
fn sequence_dims(info: &ModelInfo) -> Vec<&str> {
    info.inputs
        .iter()
        .filter_map(|s| match s.shape.get(1) {
            Some(Dim::Dynamic(name)) => Some(name.as_str()),
            _ => None,
        })
        .collect()
}

/// Splits the outputs of a batch of `rows` rows, padded to `padded`, into one
/// `Outputs` per item (batch dim 1), trimming sequence dims back to each item's length;
/// rows past the items (a bucket's zeros) are dropped.
pub fn split(
    outputs: &Outputs,
    lengths: &[usize],
    padded: usize,
    rows: usize,
    info: &ModelInfo,
) -> Result<Vec<Outputs>> {
    let seq_names = sequence_dims(info);
    let mut per_item = vec![NamedTensors::new(); lengths.len()];
    for (name, t) in outputs.iter() {
        let shape = t.shape();
        if shape.first() != Some(&rows) {
            return Err(Error::InvalidInput(format!(
                "model output `{name}` has shape {shape:?}; expected a leading batch dim of {rows}"
            )));
        }
        // Trim dim 1 where the model says it is a sequence dim; without a spec, where
        // it has the padded length.
        let spec = info.outputs.iter().find(|s| s.name == name);
        let trim = shape.len() >= 2
            && match spec.and_then(|s| s.shape.get(1)) {
                Some(Dim::Dynamic(n)) => seq_names.contains(&n.as_str()),
                Some(Dim::Fixed(_)) => false,
                None => shape[1] == padded,
            };
        let es = t.dtype().size();
        let row_elems: usize = shape.iter().skip(1).product();
        let inner: usize = shape.iter().skip(2).product();
        for (i, &len) in lengths.iter().enumerate() {
            let row = &t.bytes()[i * row_elems * es..][..row_elems * es];
            let (bytes, mut item_shape) = match shape.len() {
                1 => (row.to_vec(), vec![1]),
                _ if trim => (row[..len * inner * es].to_vec(), vec![1, len]),
                _ => (row.to_vec(), vec![1, shape[1]]),
            };
            item_shape.extend(shape.iter().skip(2));
            per_item[i].insert(name, Tensor::from_bytes(t.dtype(), item_shape, bytes)?);
        }
    }
    Ok(per_item)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_core::{DType, Device, TensorSpec};

    fn ids(v: Vec<i64>) -> Inputs {
        let n = v.len();
        Inputs::new().with("input_ids", Tensor::from_vec(vec![1, n], v).unwrap())
    }

    #[test]
    fn collate_right_pads_with_zeros() {
        let (a, b) = (ids(vec![5, 6, 7]), ids(vec![8]));
        let batch = collate(&[&a, &b], &Buckets::default()).unwrap();
        assert_eq!((batch.sequence, batch.rows), (3, 2));
        let t = batch.inputs.require("input_ids").unwrap();
        assert_eq!(t.shape(), &[2, 3]);
        assert_eq!(t.to_vec::<i64>().unwrap(), vec![5, 6, 7, 8, 0, 0]);
    }

    #[test]
    fn buckets_round_rows_and_sequence_up_within_their_limits() {
        let buckets = Buckets {
            batch_multiple: 4,
            sequence_multiple: 8,
            max_rows: 6,
            max_tokens: 0,
            max_sequence: Some(12),
        };
        let (a, b) = (ids(vec![5, 6, 7]), ids(vec![8]));
        let batch = collate(&[&a, &b], &buckets).unwrap();
        assert_eq!((batch.sequence, batch.rows), (8, 4));
        let t = batch.inputs.require("input_ids").unwrap().to_vec::<i64>().unwrap();
        assert_eq!(t.len(), 32);
        assert_eq!(&t[..9], &[5, 6, 7, 0, 0, 0, 0, 0, 8]);
        assert!(t[16..].iter().all(|&x| x == 0), "added rows are zeros");
        // Capped: at max_rows, at the model's positions, never below the items.
        assert_eq!(buckets.rows(5, 8), 6);
        assert_eq!(buckets.rows(7, 8), 7);
        assert_eq!(buckets.sequence(10), 12);
        assert_eq!(buckets.sequence(13), 13);
        // A token budget bounds the added rows too.
        let budget = Buckets { max_tokens: 40, max_rows: 64, ..buckets };
        assert_eq!(budget.rows(3, 8), 4);
        assert_eq!(budget.rows(3, 12), 3);
        assert_eq!(budget.rows(5, 12), 5, "the items always go");
        assert_eq!(Buckets::default().rows(3, 100), 3);
        assert_eq!(Buckets::default().sequence(7), 7);
    }

    #[test]
    fn collate_refuses_mixed_dtypes() {
        let a = ids(vec![1]);
        let b = Inputs::new().with("input_ids", Tensor::from_vec(vec![1, 1], vec![1f32]).unwrap());
        assert!(
            collate(&[&a, &b], &Buckets::default()).unwrap_err().to_string().contains("cannot batch f32")
        );
    }

    #[test]
    fn split_trims_sequence_dims_and_keeps_others() {
        let mut info = ModelInfo::new("m", "p", Device::Cpu, DType::F32);
        let seq = || vec![Dim::Dynamic("batch".into()), Dim::Dynamic("sequence".into())];
        info.inputs = vec![TensorSpec::new("input_ids", DType::I64, seq())];
        let mut hidden = seq();
        hidden.push(Dim::Fixed(2));
        info.outputs = vec![
            TensorSpec::new("hidden", DType::F32, hidden),
            TensorSpec::new("pooled", DType::F32, vec![Dim::Dynamic("batch".into()), Dim::Fixed(2)]),
        ];
        // batch 2, padded 3, hidden 2
        let hidden: Vec<f32> = (0..12).map(|x| x as f32).collect();
        let outputs = Outputs::new()
            .with("hidden", Tensor::from_vec(vec![2, 3, 2], hidden).unwrap())
            .with("pooled", Tensor::from_vec(vec![2, 2], vec![1f32, 2., 3., 4.]).unwrap());
        let items = split(&outputs, &[3, 1], 3, 2, &info).unwrap();
        let h1 = items[1].require("hidden").unwrap();
        assert_eq!(h1.shape(), &[1, 1, 2]);
        assert_eq!(h1.to_vec::<f32>().unwrap(), vec![6.0, 7.0]);
        assert_eq!(items[0].require("hidden").unwrap().shape(), &[1, 3, 2]);
        assert_eq!(items[1].require("pooled").unwrap().to_vec::<f32>().unwrap(), vec![3.0, 4.0]);

        let flat = Outputs::new().with("score", Tensor::from_vec(vec![2], vec![0.5f32, 0.25]).unwrap());
        let items = split(&flat, &[3, 1], 3, 2, &info).unwrap();
        assert_eq!(items[1].require("score").unwrap().shape(), &[1]);
        assert_eq!(items[1].require("score").unwrap().to_vec::<f32>().unwrap(), vec![0.25]);

        // A bucket's added rows are dropped; a batch dim other than the rows sent is an error.
        let padded =
            Outputs::new().with("score", Tensor::from_vec(vec![4], vec![0.5f32, 0.25, 0., 0.]).unwrap());
        let items = split(&padded, &[3, 1], 3, 4, &info).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[1].require("score").unwrap().to_vec::<f32>().unwrap(), vec![0.25]);
        let err = split(&padded, &[3, 1], 3, 2, &info).unwrap_err().to_string();
        assert!(err.contains("expected a leading batch dim of 2"), "{err}");
    }
}
