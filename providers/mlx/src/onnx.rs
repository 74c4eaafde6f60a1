//! Reading ONNX files: the parts of `onnx.proto` (ModelProto, GraphProto, NodeProto,
//! AttributeProto, TensorProto, ValueInfoProto) a graph runner needs, decoded straight
//! from the protobuf wire format. Written from the two specifications; no generated
//! code, no protobuf dependency. Every malformed field is an error naming the file.

use std::collections::HashMap;
use std::path::Path;

use kiln_core::{Error, Result};

/// A decoded model: its graph and the default-domain opset it was written for.
#[derive(Debug, Clone, Default)]
pub struct OnnxModel {
    pub opset: i64,
    pub nodes: Vec<Node>,
    /// Initializers and `Constant` nodes' values, by name.
    pub constants: HashMap<String, HostTensor>,
    pub inputs: Vec<ValueInfo>,
    pub outputs: Vec<ValueInfo>,
}

/// One operator.
#[derive(Debug, Clone, Default)]
pub struct Node {
    pub name: String,
    pub op: String,
    pub domain: String,
    /// Input names; an empty name is an omitted optional input.
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    pub attributes: HashMap<String, Attribute>,
}

/// An attribute's value.
#[derive(Debug, Clone)]
pub enum Attribute {
    Float(f32),
    Int(i64),
    Bytes(Vec<u8>),
    Tensor(HostTensor),
    Ints(Vec<i64>),
    /// A kind this reader keeps no value of (graphs, strings lists, sparse tensors).
    Other,
}

/// A graph input or output: name, element type and dims (`None`: symbolic or unknown).
#[derive(Debug, Clone, Default)]
pub struct ValueInfo {
    pub name: String,
    pub elem_type: i32,
    pub dims: Vec<Option<i64>>,
}

/// A tensor held on the host: floats or integers (int32, int64 and bool all as i64).
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: HostData,
}

/// The elements of a [`HostTensor`].
#[derive(Debug, Clone, PartialEq)]
pub enum HostData {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

/// ONNX element types this reader decodes.
pub const FLOAT: i32 = 1;
pub const INT32: i32 = 6;
pub const INT64: i32 = 7;
pub const BOOL: i32 = 9;
pub const FLOAT16: i32 = 10;
pub const DOUBLE: i32 = 11;

impl HostTensor {
    pub fn elements(&self) -> usize {
        match &self.data {
            HostData::F32(v) => v.len(),
            HostData::I64(v) => v.len(),
        }
    }

    /// The elements as integers (floats truncated), for shape and index inputs.
    pub fn ints(&self) -> Vec<i64> {
        match &self.data {
            HostData::F32(v) => v.iter().map(|&x| x as i64).collect(),
            HostData::I64(v) => v.clone(),
        }
    }

    /// The elements as floats.
    pub fn floats(&self) -> Vec<f32> {
        match &self.data {
            HostData::F32(v) => v.clone(),
            HostData::I64(v) => v.iter().map(|&x| x as f32).collect(),
        }
    }
}

/// A protobuf field's payload.
enum Wire<'a> {
    Varint(u64),
    Fixed64(u64),
    Bytes(&'a [u8]),
    Fixed32(u32),
}

/// Fields of one protobuf message, in order.
struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Fields<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Fields { buf, pos: 0 }
    }

    fn varint(&mut self) -> std::result::Result<u64, String> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(&byte) = self.buf.get(self.pos) else { return Err("a varint runs past the end".into()) };
            self.pos += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("a varint longer than 10 bytes".into())
    }

    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        let end =
            self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or("a field runs past the end")?;
        let bytes = &self.buf[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn next_field(&mut self) -> std::result::Result<Option<(u64, Wire<'a>)>, String> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let wire = match key & 7 {
            0 => Wire::Varint(self.varint()?),
            1 => Wire::Fixed64(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes"))),
            2 => {
                let n = usize::try_from(self.varint()?).map_err(|_| "a length beyond memory")?;
                Wire::Bytes(self.take(n)?)
            }
            5 => Wire::Fixed32(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes"))),
            other => return Err(format!("wire type {other} (groups are not used by ONNX)")),
        };
        Ok(Some((key >> 3, wire)))
    }
}

type Parse<T> = std::result::Result<T, String>;

fn string(w: Wire<'_>) -> Parse<String> {
    match w {
        Wire::Bytes(b) => Ok(String::from_utf8_lossy(b).into_owned()),
        _ => Err("a string field with a non-length wire type".into()),
    }
}

fn int(w: &Wire<'_>) -> Parse<i64> {
    match w {
        Wire::Varint(v) | Wire::Fixed64(v) => Ok(*v as i64),
        Wire::Fixed32(v) => Ok(i64::from(*v as i32)),
        Wire::Bytes(_) => Err("an integer field holding bytes".into()),
    }
}

/// A repeated integer field: packed (one length-delimited run) or one value per field.
fn push_ints(out: &mut Vec<i64>, w: Wire<'_>) -> Parse<()> {
    match w {
        Wire::Bytes(b) => {
            let mut f = Fields::new(b);
            while f.pos < b.len() {
                out.push(f.varint()? as i64);
            }
            Ok(())
        }
        other => {
            out.push(int(&other)?);
            Ok(())
        }
    }
}

fn push_floats(out: &mut Vec<f32>, w: Wire<'_>) -> Parse<()> {
    match w {
        Wire::Bytes(b) if b.len().is_multiple_of(4) => {
            out.extend(b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes"))));
            Ok(())
        }
        Wire::Fixed32(v) => {
            out.push(f32::from_bits(v));
            Ok(())
        }
        _ => Err("a float field of the wrong wire type".into()),
    }
}

fn tensor(buf: &[u8]) -> Parse<(String, HostTensor)> {
    let (mut dims, mut elem, mut name) = (Vec::new(), 0i32, String::new());
    let (mut floats, mut ints, mut doubles, mut raw, mut external) =
        (Vec::new(), Vec::new(), Vec::new(), None, false);
    let mut f = Fields::new(buf);
    while let Some((field, w)) = f.next_field()? {
        match field {
            1 => push_ints(&mut dims, w)?,
            2 => elem = int(&w)? as i32,
            4 => push_floats(&mut floats, w)?,
            5 | 7 | 11 => push_ints(&mut ints, w)?,
            8 => name = string(w)?,
            9 => {
                raw = Some(match w {
                    Wire::Bytes(b) => b.to_vec(),
                    _ => return Err("raw_data of the wrong wire type".into()),
                })
            }
            10 => match w {
                Wire::Bytes(b) if b.len().is_multiple_of(8) => doubles
                    .extend(b.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))),
                Wire::Fixed64(v) => doubles.push(f64::from_bits(v)),
                _ => return Err("double_data of the wrong wire type".into()),
            },
            14 => external = int(&w)? == 1,
            _ => {}
        }
    }
    let what = || format!("tensor `{name}`");
    if external {
        return Err(format!("{}: external data (weights in a separate file) is not read yet", what()));
    }
    let shape: Vec<usize> = dims
        .iter()
        .map(|&d| usize::try_from(d).map_err(|_| format!("{}: negative dimension {d}", what())))
        .collect::<Parse<_>>()?;
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .ok_or_else(|| format!("{}: too many elements", what()))?;
    let data = match (elem, raw) {
        (FLOAT, Some(r)) => HostData::F32(
            fixed(&r, 4, n, &what)?.map(|c| f32::from_le_bytes(c.try_into().expect("4"))).collect(),
        ),
        (FLOAT, None) => HostData::F32(floats),
        (FLOAT16, Some(r)) => HostData::F32(
            fixed(&r, 2, n, &what)?
                .map(|c| half::f16::from_le_bytes(c.try_into().expect("2")).to_f32())
                .collect(),
        ),
        (FLOAT16, None) => {
            HostData::F32(ints.iter().map(|&b| half::f16::from_bits(b as u16).to_f32()).collect())
        }
        (DOUBLE, Some(r)) => HostData::F32(
            fixed(&r, 8, n, &what)?.map(|c| f64::from_le_bytes(c.try_into().expect("8")) as f32).collect(),
        ),
        (DOUBLE, None) => HostData::F32(doubles.iter().map(|&d| d as f32).collect()),
        (INT64, Some(r)) => HostData::I64(
            fixed(&r, 8, n, &what)?.map(|c| i64::from_le_bytes(c.try_into().expect("8"))).collect(),
        ),
        (INT32, Some(r)) => HostData::I64(
            fixed(&r, 4, n, &what)?
                .map(|c| i64::from(i32::from_le_bytes(c.try_into().expect("4"))))
                .collect(),
        ),
        (BOOL, Some(r)) => HostData::I64(fixed(&r, 1, n, &what)?.map(|c| i64::from(c[0] != 0)).collect()),
        (INT64 | INT32 | BOOL, None) => HostData::I64(ints),
        (other, _) => {
            return Err(format!(
                "{}: element type {other} is not read (float, float16, double, int32, int64 and bool are)",
                what()
            ));
        }
    };
    let t = HostTensor { shape, data };
    if t.elements() != n {
        return Err(format!("{}: {} values for shape {:?}", what(), t.elements(), t.shape));
    }
    Ok((name, t))
}

/// `raw` as `n` little-endian elements of `size` bytes.
fn fixed<'a>(
    raw: &'a [u8],
    size: usize,
    n: usize,
    what: &dyn Fn() -> String,
) -> Parse<std::slice::ChunksExact<'a, u8>> {
    if raw.len() != n * size {
        return Err(format!("{}: {} bytes of raw data for {n} elements of {size} bytes", what(), raw.len()));
    }
    Ok(raw.chunks_exact(size))
}

fn attribute(buf: &[u8]) -> Parse<(String, Attribute)> {
    let (mut name, mut kind) = (String::new(), 0i64);
    let (mut f32v, mut i64v, mut bytes, mut t) = (None, None, None, None);
    let mut ints = Vec::new();
    let mut f = Fields::new(buf);
    while let Some((field, w)) = f.next_field()? {
        match field {
            1 => name = string(w)?,
            2 => {
                f32v = Some(match w {
                    Wire::Fixed32(v) => f32::from_bits(v),
                    _ => return Err(format!("attribute `{name}`: a float of the wrong wire type")),
                })
            }
            3 => i64v = Some(int(&w)?),
            4 => {
                bytes = Some(match w {
                    Wire::Bytes(b) => b.to_vec(),
                    _ => return Err(format!("attribute `{name}`: bytes of the wrong wire type")),
                })
            }
            5 => {
                t = Some(match w {
                    Wire::Bytes(b) => tensor(b)?.1,
                    _ => return Err(format!("attribute `{name}`: a tensor of the wrong wire type")),
                })
            }
            8 => push_ints(&mut ints, w)?,
            20 => kind = int(&w)?,
            _ => {}
        }
    }
    // AttributeType: FLOAT 1, INT 2, STRING 3, TENSOR 4, INTS 7.
    let value = match kind {
        1 => Attribute::Float(f32v.unwrap_or(0.0)),
        2 => Attribute::Int(i64v.unwrap_or(0)),
        3 => Attribute::Bytes(bytes.unwrap_or_default()),
        4 => Attribute::Tensor(
            t.ok_or_else(|| format!("attribute `{name}`: a tensor attribute without a tensor"))?,
        ),
        7 => Attribute::Ints(ints),
        _ => Attribute::Other,
    };
    Ok((name, value))
}

fn node(buf: &[u8]) -> Parse<Node> {
    let mut n = Node::default();
    let mut f = Fields::new(buf);
    while let Some((field, w)) = f.next_field()? {
        match field {
            1 => n.inputs.push(string(w)?),
            2 => n.outputs.push(string(w)?),
            3 => n.name = string(w)?,
            4 => n.op = string(w)?,
            5 => {
                let Wire::Bytes(b) = w else { return Err("an attribute of the wrong wire type".into()) };
                let (name, value) = attribute(b)?;
                n.attributes.insert(name, value);
            }
            7 => n.domain = string(w)?,
            _ => {}
        }
    }
    Ok(n)
}

fn value_info(buf: &[u8]) -> Parse<ValueInfo> {
    let mut v = ValueInfo::default();
    let mut f = Fields::new(buf);
    while let Some((field, w)) = f.next_field()? {
        match (field, w) {
            (1, w) => v.name = string(w)?,
            // TypeProto.tensor_type → elem_type, shape.dim → dim_value | dim_param.
            (2, Wire::Bytes(ty)) => {
                let mut t = Fields::new(ty);
                while let Some((1, Wire::Bytes(tensor_type))) = t.next_field()? {
                    let mut tt = Fields::new(tensor_type);
                    while let Some((field, w)) = tt.next_field()? {
                        match (field, w) {
                            (1, w) => v.elem_type = int(&w)? as i32,
                            (2, Wire::Bytes(shape)) => {
                                let mut s = Fields::new(shape);
                                while let Some((field, w)) = s.next_field()? {
                                    let (1, Wire::Bytes(dim)) = (field, w) else { continue };
                                    let mut d = Fields::new(dim);
                                    let mut value = None;
                                    while let Some((field, w)) = d.next_field()? {
                                        if field == 1 {
                                            value = Some(int(&w)?).filter(|&x| x >= 0);
                                        }
                                    }
                                    v.dims.push(value);
                                }
                            }
                            _ => {}
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Ok(v)
}

fn graph(buf: &[u8], model: &mut OnnxModel) -> Parse<()> {
    let mut f = Fields::new(buf);
    while let Some((field, w)) = f.next_field()? {
        let Wire::Bytes(b) = w else { continue };
        match field {
            1 => model.nodes.push(node(b)?),
            5 => {
                let (name, t) = tensor(b)?;
                model.constants.insert(name, t);
            }
            11 => model.inputs.push(value_info(b)?),
            12 => model.outputs.push(value_info(b)?),
            _ => {}
        }
    }
    Ok(())
}

/// Decodes an ONNX model from its bytes.
pub fn parse(bytes: &[u8]) -> Parse<OnnxModel> {
    let mut model = OnnxModel::default();
    let mut seen_graph = false;
    let mut f = Fields::new(bytes);
    while let Some((field, w)) = f.next_field()? {
        match (field, w) {
            (7, Wire::Bytes(b)) => {
                graph(b, &mut model)?;
                seen_graph = true;
            }
            (8, Wire::Bytes(b)) => {
                let (mut domain, mut version) = (String::new(), 0);
                let mut o = Fields::new(b);
                while let Some((field, w)) = o.next_field()? {
                    match field {
                        1 => domain = string(w)?,
                        2 => version = int(&w)?,
                        _ => {}
                    }
                }
                if domain.is_empty() || domain == "ai.onnx" {
                    model.opset = version;
                }
            }
            _ => {}
        }
    }
    if !seen_graph {
        return Err("no graph (not an ONNX model?)".into());
    }
    // Graph inputs that are initializers are weights, not the caller's inputs.
    model.inputs.retain(|i| !model.constants.contains_key(&i.name));
    Ok(model)
}

/// Reads and decodes the ONNX model at `path`.
pub fn load(path: &Path) -> Result<OnnxModel> {
    let bytes = std::fs::read(path).map_err(|e| Error::io("reading", path, e))?;
    parse(&bytes).map_err(|why| Error::model_load(path, format!("not a readable ONNX model: {why}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A protobuf field: key then payload.
    fn field(number: u64, wire: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = varint(number << 3 | wire);
        if wire == 2 {
            out.extend(varint(payload.len() as u64));
        }
        out.extend_from_slice(payload);
        out
    }

    fn varint(mut v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return out;
            }
            out.push(byte | 0x80);
        }
    }

    #[test]
    fn a_hand_encoded_model_decodes() {
        let raw: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|f| f.to_le_bytes()).collect();
        let weight =
            [field(1, 0, &varint(2)), field(2, 0, &varint(1)), field(8, 2, b"w"), field(9, 2, &raw)].concat();
        let attr = [field(1, 2, b"axis"), field(3, 0, &varint(1)), field(20, 0, &varint(2))].concat();
        let node = [
            field(1, 2, b"x"),
            field(1, 2, b"w"),
            field(2, 2, b"y"),
            field(4, 2, b"Mul"),
            field(5, 2, &attr),
        ]
        .concat();
        let dim = |d: &[u8]| field(1, 2, d);
        let shape = [dim(&field(2, 2, b"batch")), dim(&field(1, 0, &varint(2)))].concat();
        let tensor_type = [field(1, 0, &varint(1)), field(2, 2, &shape)].concat();
        let input = [field(1, 2, b"x"), field(2, 2, &field(1, 2, &tensor_type))].concat();
        let graph = [field(1, 2, &node), field(5, 2, &weight), field(11, 2, &input)].concat();
        let opset = [field(2, 0, &varint(13))].concat();
        let model = parse(&[field(8, 2, &opset), field(7, 2, &graph)].concat()).unwrap();
        assert_eq!(model.opset, 13);
        assert_eq!(model.nodes[0].op, "Mul");
        assert_eq!(model.nodes[0].inputs, ["x", "w"]);
        assert!(matches!(model.nodes[0].attributes["axis"], Attribute::Int(1)));
        assert_eq!(model.constants["w"], HostTensor { shape: vec![2], data: HostData::F32(vec![1.5, -2.0]) });
        assert_eq!(model.inputs[0].dims, [None, Some(2)]);
    }

    #[test]
    fn damaged_bytes_are_errors_not_panics() {
        assert!(parse(b"").unwrap_err().contains("no graph"));
        // A length past the end, a varint that never ends, a group wire type.
        for bad in [
            &[0x3a, 0x10, 1][..],
            &[0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
            &[0x0b],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        // Raw data that does not fill the shape.
        let weight = [field(1, 0, &varint(3)), field(2, 0, &varint(1)), field(9, 2, &[0; 8])].concat();
        let err = parse(&field(7, 2, &field(5, 2, &weight))).unwrap_err();
        assert!(err.contains("8 bytes of raw data for 3 elements"), "{err}");
    }
}
