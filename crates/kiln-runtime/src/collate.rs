//! Putting the inputs of many requests into one batch, and the outputs back.
//!
//! Each request ("item") carries tensors with a leading batch dim of 1. Collation
//! stacks them along dim 0 and right-pads dim 1 (the sequence) to the longest item
//! with zeros — the attention mask marks the padding. Splitting gives each item its row
//! of every output, trimmed back to the item's length on the output dims that the
//! model's [`ModelInfo`] names like the inputs' sequence dim.

use kiln_core::{Dim, Error, Inputs, ModelInfo, NamedTensors, Outputs, Result, Tensor};

/// Stacks items into one batch; returns it and the padded sequence length.
pub fn collate(items: &[&Inputs]) -> Result<(Inputs, usize)> {
    let first = items.first().ok_or_else(|| Error::InvalidInput("an empty batch".into()))?;
    let mut padded = 0;
    for item in items {
        for (_, t) in item.iter() {
            if t.shape().len() >= 2 {
                padded = padded.max(t.shape()[1]);
            }
        }
    }
    let mut batch = Inputs::new();
    for name in first.names() {
        let tensors: Vec<&Tensor> = items.iter().map(|i| i.require(name)).collect::<Result<_>>()?;
        batch.insert(name, stack(name, &tensors, padded)?);
    }
    Ok((batch, padded))
}

fn stack(name: &str, tensors: &[&Tensor], padded: usize) -> Result<Tensor> {
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
        let data: Vec<u8> = tensors.iter().flat_map(|t| t.bytes().iter().copied()).collect();
        let mut shape = first.shape().to_vec();
        if let Some(d) = shape.first_mut() {
            *d = tensors.len();
        }
        return Tensor::from_bytes(dtype, shape, data);
    }
    let row = padded * inner * dtype.size();
    let mut data = vec![0u8; tensors.len() * row];
    for (i, t) in tensors.iter().enumerate() {
        data[i * row..][..t.bytes().len()].copy_from_slice(t.bytes());
    }
    let mut shape = vec![tensors.len(), padded];
    shape.extend(first.shape().iter().skip(2));
    Tensor::from_bytes(dtype, shape, data)
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

/// Splits batch outputs into one `Outputs` per item (batch dim 1), trimming sequence
/// dims back to each item's length.
pub fn split(outputs: &Outputs, lengths: &[usize], padded: usize, info: &ModelInfo) -> Result<Vec<Outputs>> {
    let seq_names = sequence_dims(info);
    let mut per_item = vec![NamedTensors::new(); lengths.len()];
    for (name, t) in outputs.iter() {
        let shape = t.shape();
        if shape.first() != Some(&lengths.len()) {
            return Err(Error::InvalidInput(format!(
                "model output `{name}` has shape {shape:?}; expected a leading batch dim of {}",
                lengths.len()
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
        let (batch, padded) = collate(&[&a, &b]).unwrap();
        assert_eq!(padded, 3);
        let t = batch.require("input_ids").unwrap();
        assert_eq!(t.shape(), &[2, 3]);
        assert_eq!(t.to_vec::<i64>().unwrap(), vec![5, 6, 7, 8, 0, 0]);
    }

    #[test]
    fn collate_refuses_mixed_dtypes() {
        let a = ids(vec![1]);
        let b = Inputs::new().with("input_ids", Tensor::from_vec(vec![1, 1], vec![1f32]).unwrap());
        assert!(collate(&[&a, &b]).unwrap_err().to_string().contains("cannot batch f32"));
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
        let items = split(&outputs, &[3, 1], 3, &info).unwrap();
        let h1 = items[1].require("hidden").unwrap();
        assert_eq!(h1.shape(), &[1, 1, 2]);
        assert_eq!(h1.to_vec::<f32>().unwrap(), vec![6.0, 7.0]);
        assert_eq!(items[0].require("hidden").unwrap().shape(), &[1, 3, 2]);
        assert_eq!(items[1].require("pooled").unwrap().to_vec::<f32>().unwrap(), vec![3.0, 4.0]);

        let flat = Outputs::new().with("score", Tensor::from_vec(vec![2], vec![0.5f32, 0.25]).unwrap());
        let items = split(&flat, &[3, 1], 3, &info).unwrap();
        assert_eq!(items[1].require("score").unwrap().shape(), &[1]);
        assert_eq!(items[1].require("score").unwrap().to_vec::<f32>().unwrap(), vec![0.25]);
    }
}
