//! ONNX graphs on MLX: a model file's operators compiled once at load into steps over
//! MLX arrays, then run per batch as one lazy MLX graph, evaluated once at the end.
//!
//! Compiling does what can be done once: constant folding of everything computable
//! from weights and constants (shape arithmetic), weights moved to the device at the
//! model's dtype, convolution weights re-laid for MLX (`[O, kH, kW, I]`, MLX's
//! convolutions are channels-last), batch normalisation reduced to a scale and a
//! shift. Values computed from input shapes (`Shape` → `Slice` → `Concat` → `Reshape`)
//! stay on the host. An operator outside [`OPS`] is refused at load, by name.

use std::collections::HashMap;
use std::sync::Arc;

use kiln_core::{DType, Error, Result};

use crate::array::{Array, Unary};
use crate::onnx::{Attribute, HostData, HostTensor, Node, OnnxModel};

/// The operators this runner executes (default ONNX domain).
pub const OPS: &[&str] = &[
    "Add",
    "BatchNormalization",
    "Cast",
    "Clip",
    "Concat",
    "Constant",
    "Conv",
    "Div",
    "Erf",
    "Exp",
    "Flatten",
    "Gemm",
    "GlobalAveragePool",
    "HardSigmoid",
    "HardSwish",
    "Identity",
    "MatMul",
    "MaxPool",
    "Mul",
    "Neg",
    "Relu",
    "Reshape",
    "Shape",
    "Sigmoid",
    "Slice",
    "Softmax",
    "Sqrt",
    "Squeeze",
    "Sub",
    "Tanh",
    "Transpose",
    "Unsqueeze",
];

/// A value while the graph runs.
enum Value {
    Host(HostTensor),
    Device(Array),
}

/// Elementwise arithmetic, on the device or (shape arithmetic) the host.
#[derive(Clone, Copy)]
enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
}

/// What a step needs besides its inputs.
#[derive(Clone, Copy)]
struct Ctx {
    /// The model's float dtype on the device.
    dtype: DType,
}

/// Where a step's input comes from.
#[derive(Clone)]
enum In {
    /// Computed by an earlier step (or a graph input).
    Slot(usize),
    /// A constant on the host (shape arithmetic, and until compiling ends).
    Const(Arc<HostTensor>),
    /// A float constant on the device, at the model's dtype.
    Device(Arc<Array>),
    /// An omitted optional input.
    None,
}

/// An operator with its attributes read and its weights prepared.
enum Op {
    Unary(Unary),
    Binary(BinaryOp),
    Relu,
    Clip {
        min: Option<f32>,
        max: Option<f32>,
    },
    HardSigmoid {
        alpha: f32,
        beta: f32,
    },
    HardSwish,
    Conv {
        weight: Array,
        bias: Option<Array>,
        stride: [i32; 2],
        pads: Option<[[i32; 2]; 2]>,
        upper: bool,
        dilation: [i32; 2],
        groups: i32,
        kernel: [i32; 2],
    },
    Affine {
        scale: Array,
        shift: Array,
    },
    MaxPool {
        kernel: [i32; 2],
        stride: [i32; 2],
        pads: [[i32; 2]; 2],
        ceil: bool,
    },
    GlobalAveragePool,
    MatMul,
    Gemm {
        alpha: f32,
        beta: f32,
        trans_a: bool,
        trans_b: bool,
    },
    Softmax {
        axis: i64,
        coerce: bool,
    },
    Transpose(Option<Vec<i32>>),
    Shape,
    Cast(i32),
    Reshape {
        allow_zero: bool,
    },
    Flatten(i64),
    Unsqueeze(Option<Vec<i64>>),
    Squeeze(Option<Vec<i64>>),
    Slice,
    Concat(i64),
}

struct Step {
    op: Op,
    /// The node, for errors.
    name: String,
    inputs: Vec<In>,
    output: usize,
}

/// A compiled graph.
pub struct Graph {
    steps: Vec<Step>,
    slots: usize,
    inputs: Vec<(String, usize)>,
    outputs: Vec<(String, usize)>,
    ctx: Ctx,
}

fn attr_i(node: &Node, name: &str, default: i64) -> i64 {
    match node.attributes.get(name) {
        Some(Attribute::Int(v)) => *v,
        _ => default,
    }
}

fn attr_f(node: &Node, name: &str, default: f32) -> f32 {
    match node.attributes.get(name) {
        Some(Attribute::Float(v)) => *v,
        _ => default,
    }
}

fn attr_ints(node: &Node, name: &str) -> Option<Vec<i64>> {
    match node.attributes.get(name) {
        Some(Attribute::Ints(v)) => Some(v.clone()),
        _ => None,
    }
}

fn pair(v: Option<Vec<i64>>, default: i32, what: &str) -> std::result::Result<[i32; 2], String> {
    match v.as_deref() {
        None => Ok([default; 2]),
        Some([a, b]) => Ok([*a as i32, *b as i32]),
        Some(other) => Err(format!("{what} {other:?}: only 2-D (two values) is run")),
    }
}

/// ONNX pads `[top, left, bottom, right]` as (before, after) pairs.
fn pads(v: Option<Vec<i64>>) -> std::result::Result<[[i32; 2]; 2], String> {
    match v.as_deref() {
        None => Ok([[0; 2]; 2]),
        Some([t, l, b, r]) => Ok([[*t as i32, *l as i32], [*b as i32, *r as i32]]),
        Some(other) => Err(format!("pads {other:?}: only 2-D (four values) is run")),
    }
}

fn device_const(t: &HostTensor, dtype: DType) -> Result<Array> {
    Array::from_f32(&t.floats(), &t.shape)?.astype(dtype)
}

impl Graph {
    /// Compiles `model` to run at `dtype` (f32, f16 or bf16).
    pub fn compile(model: &OnnxModel, dtype: DType) -> std::result::Result<Graph, String> {
        let mut names: HashMap<String, In> = HashMap::new();
        let add_const = |names: &mut HashMap<String, In>, name: &str, t: HostTensor| {
            names.insert(name.to_string(), In::Const(Arc::new(t)));
        };
        for (name, t) in &model.constants {
            add_const(&mut names, name, t.clone());
        }
        let mut slots = 0;
        let mut inputs = Vec::new();
        for i in &model.inputs {
            names.insert(i.name.clone(), In::Slot(slots));
            inputs.push((i.name.clone(), slots));
            slots += 1;
        }
        // How many nodes (and graph outputs) read each value.
        let mut readers: HashMap<&str, usize> = HashMap::new();
        for name in model.nodes.iter().flat_map(|n| &n.inputs).chain(model.outputs.iter().map(|o| &o.name)) {
            *readers.entry(name.as_str()).or_default() += 1;
        }
        let mut steps: Vec<Step> = Vec::new();
        for node in &model.nodes {
            let at = |why: String| format!("node `{}` ({}): {why}", node.name, node.op);
            if !(node.domain.is_empty() || node.domain == "ai.onnx") || !OPS.contains(&node.op.as_str()) {
                return Err(at(format!(
                    "operator {}{} is not run by provider `mlx` (it runs {})",
                    if node.domain.is_empty() { String::new() } else { format!("{}.", node.domain) },
                    node.op,
                    OPS.join(", ")
                )));
            }
            let [output] = node.outputs.as_slice() else {
                return Err(at(format!(
                    "{} outputs; only single-output operators are run",
                    node.outputs.len()
                )));
            };
            if node.op == "Constant" {
                let Some(Attribute::Tensor(t)) = node.attributes.get("value") else {
                    return Err(at("a Constant without a tensor `value`".into()));
                };
                add_const(&mut names, output, t.clone());
                continue;
            }
            let step_inputs: Vec<In> = node
                .inputs
                .iter()
                .map(|i| {
                    if i.is_empty() {
                        Ok(In::None)
                    } else {
                        names
                            .get(i)
                            .cloned()
                            .ok_or_else(|| at(format!("input `{i}` is produced by no earlier node")))
                    }
                })
                .collect::<std::result::Result<_, _>>()?;
            if node.op == "Identity" {
                names.insert(output.clone(), step_inputs[0].clone());
                continue;
            }
            let op = Self::op(node, model.opset, &step_inputs, dtype).map_err(&at)?;
            // Fold what depends on constants alone and runs on the host.
            let all_const = step_inputs.iter().all(|i| !matches!(i, In::Slot(_)));
            if all_const && (host_op(&op) || matches!(op, Op::Binary(_))) {
                let step = Step { op, name: node.name.clone(), inputs: step_inputs, output: 0 };
                let folded = run_step(&step, &[], Ctx { dtype }).map_err(|e| at(e.to_string()))?;
                match folded {
                    Value::Host(t) => add_const(&mut names, output, t),
                    Value::Device(_) => return Err(at("folding constants gave a device array".into())),
                }
                continue;
            }
            // A batch norm of a convolution's output that nothing else reads becomes
            // the convolution's weights and bias: two passes over the activations fewer.
            if let (Op::Affine { scale, shift }, Some(In::Slot(s))) = (&op, step_inputs.first())
                && readers.get(node.inputs[0].as_str()) == Some(&1)
                && let Some(prev) = steps.last_mut().filter(|p| p.output == *s)
                && let Op::Conv { weight, bias, .. } = &mut prev.op
            {
                fold_affine(weight, bias, scale, shift).map_err(|e| at(e.to_string()))?;
                names.insert(output.clone(), In::Slot(*s));
                continue;
            }
            names.insert(output.clone(), In::Slot(slots));
            steps.push(Step { op, name: node.name.clone(), inputs: step_inputs, output: slots });
            slots += 1;
        }
        // Folded weights are computed now, not on the first batch.
        let prepared: Vec<&Array> = steps
            .iter()
            .filter_map(|s| match &s.op {
                Op::Conv { weight, bias, .. } => Some(std::iter::once(weight).chain(bias.as_ref())),
                _ => None,
            })
            .flatten()
            .collect();
        crate::array::eval(&prepared).map_err(|e| e.to_string())?;
        // Float constants that steps read go to the device once each, however many
        // steps read them; convolutions, batch norms and clips hold what they need already.
        let mut on_device: HashMap<*const HostTensor, Arc<Array>> = HashMap::new();
        for step in &mut steps {
            if matches!(step.op, Op::Conv { .. } | Op::Affine { .. } | Op::Clip { .. }) {
                step.inputs.truncate(1);
            }
            for input in &mut step.inputs {
                if let In::Const(c) = input
                    && matches!(c.data, HostData::F32(_))
                    && !host_op(&step.op)
                {
                    let device = match on_device.get(&Arc::as_ptr(c)) {
                        Some(d) => d.clone(),
                        None => {
                            let d = Arc::new(device_const(c, dtype).map_err(|e| e.to_string())?);
                            on_device.insert(Arc::as_ptr(c), d.clone());
                            d
                        }
                    };
                    *input = In::Device(device);
                }
            }
        }
        let outputs = model
            .outputs
            .iter()
            .map(|o| match names.get(&o.name) {
                Some(In::Slot(s)) => Ok((o.name.clone(), *s)),
                _ => Err(format!("graph output `{}` is a constant or produced by no node", o.name)),
            })
            .collect::<std::result::Result<_, _>>()?;
        Ok(Graph { steps, slots, inputs, outputs, ctx: Ctx { dtype } })
    }

    fn op(node: &Node, opset: i64, inputs: &[In], dtype: DType) -> std::result::Result<Op, String> {
        let const_input = |i: usize| -> Option<HostTensor> {
            match inputs.get(i) {
                Some(In::Const(c)) => Some((**c).clone()),
                _ => None,
            }
        };
        let scalar = |i: usize| const_input(i).and_then(|t| t.floats().first().copied());
        let dev = |t: &HostTensor| device_const(t, dtype).map_err(|e| e.to_string());
        Ok(match node.op.as_str() {
            "Add" => Op::Binary(BinaryOp::Add),
            "Sub" => Op::Binary(BinaryOp::Sub),
            "Mul" => Op::Binary(BinaryOp::Mul),
            "Div" => Op::Binary(BinaryOp::Div),
            "Relu" => Op::Relu,
            "Sigmoid" => Op::Unary(Unary::Sigmoid),
            "Tanh" => Op::Unary(Unary::Tanh),
            "Exp" => Op::Unary(Unary::Exp),
            "Erf" => Op::Unary(Unary::Erf),
            "Neg" => Op::Unary(Unary::Negative),
            "Sqrt" => Op::Unary(Unary::Sqrt),
            "Clip" if opset < 11 => Op::Clip {
                min: Some(attr_f(node, "min", f32::MIN)),
                max: Some(attr_f(node, "max", f32::MAX)),
            },
            "Clip" => {
                for i in [1, 2] {
                    if matches!(inputs.get(i), Some(In::Slot(_))) {
                        return Err("Clip bounds computed at run time are not run; constants are".into());
                    }
                }
                Op::Clip { min: scalar(1), max: scalar(2) }
            }
            "HardSigmoid" => {
                Op::HardSigmoid { alpha: attr_f(node, "alpha", 0.2), beta: attr_f(node, "beta", 0.5) }
            }
            "HardSwish" => Op::HardSwish,
            "Conv" => {
                let w = const_input(1)
                    .ok_or("Conv weights computed at run time are not run; initializers are")?;
                let [o, i, kh, kw] = w.shape[..] else {
                    return Err(format!("Conv weights {:?}: only 2-D convolutions are run", w.shape));
                };
                let f = w.floats();
                // [O, I, kH, kW] → MLX's [O, kH, kW, I].
                let mut ohwi = vec![0f32; f.len()];
                for (n, v) in f.iter().enumerate() {
                    let (oi, rest) = (n / (i * kh * kw), n % (i * kh * kw));
                    let (ii, rest) = (rest / (kh * kw), rest % (kh * kw));
                    let (y, x) = (rest / kw, rest % kw);
                    ohwi[((oi * kh + y) * kw + x) * i + ii] = *v;
                }
                let weight = dev(&HostTensor { shape: vec![o, kh, kw, i], data: HostData::F32(ohwi) })?;
                let bias = match inputs.get(2) {
                    None | Some(In::None) => None,
                    Some(In::Const(c)) => Some(dev(c)?),
                    Some(In::Slot(_) | In::Device(_)) => {
                        return Err("a Conv bias computed at run time is not run".into());
                    }
                };
                let auto_pad = match node.attributes.get("auto_pad") {
                    Some(Attribute::Bytes(b)) => String::from_utf8_lossy(b).into_owned(),
                    _ => "NOTSET".into(),
                };
                let (pads, upper) = match auto_pad.as_str() {
                    "NOTSET" => (Some(pads(attr_ints(node, "pads"))?), false),
                    "VALID" => (Some([[0; 2]; 2]), false),
                    "SAME_UPPER" => (None, true),
                    "SAME_LOWER" => (None, false),
                    other => return Err(format!("auto_pad {other}")),
                };
                Op::Conv {
                    weight,
                    bias,
                    stride: pair(attr_ints(node, "strides"), 1, "strides")?,
                    pads,
                    upper,
                    dilation: pair(attr_ints(node, "dilations"), 1, "dilations")?,
                    groups: attr_i(node, "group", 1) as i32,
                    kernel: [kh as i32, kw as i32],
                }
            }
            "BatchNormalization" => {
                let p: Vec<HostTensor> = (1..5)
                    .map(|i| {
                        const_input(i).ok_or("BatchNormalization parameters computed at run time are not run")
                    })
                    .collect::<std::result::Result<_, _>>()?;
                let eps = attr_f(node, "epsilon", 1e-5);
                let (gamma, beta, mean, var) = (p[0].floats(), p[1].floats(), p[2].floats(), p[3].floats());
                let scale: Vec<f32> = gamma.iter().zip(&var).map(|(g, v)| g / (v + eps).sqrt()).collect();
                let shift: Vec<f32> =
                    beta.iter().zip(&mean).zip(&scale).map(|((b, m), s)| b - m * s).collect();
                // [C, 1, 1]: broadcast over NCHW's channel axis.
                let column = |v: Vec<f32>| HostTensor { shape: vec![v.len(), 1, 1], data: HostData::F32(v) };
                Op::Affine { scale: dev(&column(scale))?, shift: dev(&column(shift))? }
            }
            "MaxPool" => {
                if attr_ints(node, "dilations").is_some_and(|d| d.iter().any(|&x| x != 1))
                    || attr_i(node, "storage_order", 0) != 0
                {
                    return Err("MaxPool with dilations or column-major storage order is not run".into());
                }
                if matches!(node.attributes.get("auto_pad"), Some(Attribute::Bytes(b)) if b != b"NOTSET" && b != b"VALID")
                {
                    return Err("MaxPool with SAME auto_pad is not run".into());
                }
                let kernel = pair(attr_ints(node, "kernel_shape"), 1, "kernel_shape")?;
                Op::MaxPool {
                    kernel,
                    stride: pair(attr_ints(node, "strides"), 1, "strides")?,
                    pads: pads(attr_ints(node, "pads"))?,
                    ceil: attr_i(node, "ceil_mode", 0) != 0,
                }
            }
            "GlobalAveragePool" => Op::GlobalAveragePool,
            "MatMul" => Op::MatMul,
            "Gemm" => Op::Gemm {
                alpha: attr_f(node, "alpha", 1.0),
                beta: attr_f(node, "beta", 1.0),
                trans_a: attr_i(node, "transA", 0) != 0,
                trans_b: attr_i(node, "transB", 0) != 0,
            },
            "Softmax" => Op::Softmax {
                axis: attr_i(node, "axis", if opset < 13 { 1 } else { -1 }),
                coerce: opset < 13,
            },
            "Transpose" => {
                Op::Transpose(attr_ints(node, "perm").map(|p| p.iter().map(|&x| x as i32).collect()))
            }
            "Shape" => {
                if node.attributes.contains_key("start") || node.attributes.contains_key("end") {
                    return Err("Shape with start/end is not run".into());
                }
                Op::Shape
            }
            "Cast" => Op::Cast(attr_i(node, "to", 1) as i32),
            "Reshape" => Op::Reshape { allow_zero: attr_i(node, "allowzero", 0) != 0 },
            "Flatten" => Op::Flatten(attr_i(node, "axis", 1)),
            "Unsqueeze" => Op::Unsqueeze(attr_ints(node, "axes")),
            "Squeeze" => Op::Squeeze(attr_ints(node, "axes")),
            "Slice" => {
                if opset < 10 {
                    return Err("Slice before opset 10 (attributes) is not run".into());
                }
                Op::Slice
            }
            "Concat" => Op::Concat(attr_i(node, "axis", 0)),
            other => return Err(format!("operator {other} has no compiler")),
        })
    }

    /// The graph's inputs, in order.
    pub fn input_names(&self) -> impl Iterator<Item = &str> {
        self.inputs.iter().map(|(n, _)| n.as_str())
    }

    /// Runs the graph on `inputs` (one array per graph input, in order); returns each
    /// output as `(shape, f32 values)`.
    pub fn run(&self, inputs: Vec<Array>) -> Result<Vec<(Vec<usize>, Vec<f32>)>> {
        let mut values: Vec<Option<Value>> = (0..self.slots).map(|_| None).collect();
        for ((_, slot), array) in self.inputs.iter().zip(inputs) {
            values[*slot] = Some(Value::Device(array.astype(self.ctx.dtype)?));
        }
        for step in &self.steps {
            let value = run_step(step, &values, self.ctx)
                .map_err(|e| Error::backend(crate::NAME, format!("node `{}`: {e}", step.name)))?;
            values[step.output] = Some(value);
        }
        self.outputs
            .iter()
            .map(|(name, slot)| match values[*slot].take() {
                Some(Value::Device(a)) => Ok((a.shape(), a.astype(DType::F32)?.to_f32()?)),
                Some(Value::Host(t)) => Ok((t.shape.clone(), t.floats())),
                None => Err(Error::backend(crate::NAME, format!("output `{name}` was not computed"))),
            })
            .collect()
    }
}

/// `weight` `[O, kH, kW, I]` and `bias` `[O]` of a convolution followed by `y * scale +
/// shift` (`[O, 1, 1]` each) in one.
fn fold_affine(weight: &mut Array, bias: &mut Option<Array>, scale: &Array, shift: &Array) -> Result<()> {
    let o = scale.shape()[0] as i32;
    *weight = weight.mul(&scale.reshape(&[o, 1, 1, 1])?)?;
    let shift = shift.reshape(&[o])?;
    *bias = Some(match bias.take() {
        Some(b) => b.mul(&scale.reshape(&[o])?)?.add(&shift)?,
        None => shift,
    });
    Ok(())
}

/// Ops that run on host values when every input is one (shape arithmetic).
fn host_op(op: &Op) -> bool {
    matches!(
        op,
        Op::Shape
            | Op::Cast(_)
            | Op::Reshape { .. }
            | Op::Flatten(_)
            | Op::Unsqueeze(_)
            | Op::Squeeze(_)
            | Op::Slice
            | Op::Concat(_)
    )
}

mod ops;
#[cfg(test)]
mod tests;
use ops::run_step;
