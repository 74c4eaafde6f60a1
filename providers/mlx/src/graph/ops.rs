//! One step of a compiled graph: each operator on MLX arrays, or on host tensors for
//! shape arithmetic. Semantics follow the ONNX operator specification of the model's
//! opset.

use std::ops::Deref;

use kiln_core::{DType, Error, Result};

use super::{BinaryOp, Ctx, In, Op, Step, Value, device_const};
use crate::array::Array;
use crate::onnx::{self, HostData, HostTensor};

/// A step's input as it is now.
enum Arg<'a> {
    Host(&'a HostTensor),
    Device(&'a Array),
    None,
}

/// A device array, borrowed or made for this step.
enum Dev<'a> {
    Borrowed(&'a Array),
    Owned(Array),
}

impl Deref for Dev<'_> {
    type Target = Array;
    fn deref(&self) -> &Array {
        match self {
            Dev::Borrowed(a) => a,
            Dev::Owned(a) => a,
        }
    }
}

fn invalid(why: impl Into<String>) -> Error {
    Error::InvalidInput(why.into())
}

fn arg<'a>(input: &'a In, values: &'a [Option<Value>]) -> Result<Arg<'a>> {
    Ok(match input {
        In::Slot(s) => match values.get(*s).and_then(Option::as_ref) {
            Some(Value::Host(t)) => Arg::Host(t),
            Some(Value::Device(a)) => Arg::Device(a),
            None => return Err(invalid("an input that was not computed")),
        },
        In::Const(c) => Arg::Host(c),
        In::Device(a) => Arg::Device(a),
        In::None => Arg::None,
    })
}

fn dev<'a>(a: &Arg<'a>, dtype: DType) -> Result<Dev<'a>> {
    match a {
        Arg::Device(d) => Ok(Dev::Borrowed(d)),
        Arg::Host(t) => Ok(Dev::Owned(device_const(t, dtype)?)),
        Arg::None => Err(invalid("a required input is missing")),
    }
}

fn host<'a>(a: &Arg<'a>, what: &str) -> Result<&'a HostTensor> {
    match a {
        Arg::Host(t) => Ok(t),
        _ => Err(Error::Unsupported(format!(
            "{what} must be known before the graph runs (a constant, or computed from shapes and constants)"
        ))),
    }
}

fn shape_of(a: &Arg<'_>) -> Result<Vec<usize>> {
    match a {
        Arg::Host(t) => Ok(t.shape.clone()),
        Arg::Device(d) => Ok(d.shape()),
        Arg::None => Err(invalid("a required input is missing")),
    }
}

/// `axis` (negative: from the end) as an index into `rank` axes.
fn axis_index(axis: i64, rank: usize) -> Result<usize> {
    let a = if axis < 0 { axis + rank as i64 } else { axis };
    usize::try_from(a)
        .ok()
        .filter(|&a| a < rank)
        .ok_or_else(|| invalid(format!("axis {axis} of a rank-{rank} tensor")))
}

fn i32s(v: &[usize]) -> Vec<i32> {
    v.iter().map(|&d| d as i32).collect()
}

fn reshaped(a: &Arg<'_>, shape: Vec<usize>, dtype: DType) -> Result<Value> {
    Ok(match a {
        Arg::Host(t) => {
            if shape.iter().product::<usize>() != t.elements() {
                return Err(invalid(format!("cannot reshape {:?} to {shape:?}", t.shape)));
            }
            Value::Host(HostTensor { shape, data: t.data.clone() })
        }
        other => Value::Device(dev(other, dtype)?.reshape(&i32s(&shape))?),
    })
}

/// Row-major strides of `shape`.
fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// A host tensor of `shape` whose element at each index comes from `source(index)`.
fn host_gather(t: &HostTensor, shape: Vec<usize>, source: impl Fn(&[usize]) -> usize) -> HostTensor {
    let n: usize = shape.iter().product();
    let out_strides = strides(&shape);
    let index = |flat: usize| -> usize {
        let idx: Vec<usize> = out_strides.iter().zip(&shape).map(|(s, d)| flat / s % d).collect();
        source(&idx)
    };
    let data = match &t.data {
        HostData::F32(v) => HostData::F32((0..n).map(|i| v[index(i)]).collect()),
        HostData::I64(v) => HostData::I64((0..n).map(|i| v[index(i)]).collect()),
    };
    HostTensor { shape, data }
}

/// Numpy broadcasting of two host tensors.
fn host_binary(op: BinaryOp, a: &HostTensor, b: &HostTensor) -> Result<HostTensor> {
    let rank = a.shape.len().max(b.shape.len());
    let pad = |s: &[usize]| [vec![1; rank - s.len()], s.to_vec()].concat();
    let (sa, sb) = (pad(&a.shape), pad(&b.shape));
    let shape: Vec<usize> = sa
        .iter()
        .zip(&sb)
        .map(|(&x, &y)| match (x, y) {
            _ if x == y => Ok(x),
            (1, y) => Ok(y),
            (x, 1) => Ok(x),
            _ => Err(invalid(format!("shapes {:?} and {:?} do not broadcast", a.shape, b.shape))),
        })
        .collect::<Result<_>>()?;
    let at = |s: &[usize], idx: &[usize]| -> usize {
        strides(s).iter().zip(s).zip(idx).map(|((st, &d), &i)| if d == 1 { 0 } else { st * i }).sum()
    };
    let ints = matches!((&a.data, &b.data), (HostData::I64(_), HostData::I64(_)));
    let (fa, fb) =
        (host_gather(a, shape.clone(), |i| at(&sa, i)), host_gather(b, shape.clone(), |i| at(&sb, i)));
    let data = if ints {
        let (x, y) = (fa.ints(), fb.ints());
        let f = |p: i64, q: i64| match op {
            BinaryOp::Add => Ok(p.wrapping_add(q)),
            BinaryOp::Sub => Ok(p.wrapping_sub(q)),
            BinaryOp::Mul => Ok(p.wrapping_mul(q)),
            BinaryOp::Div => p.checked_div(q).ok_or_else(|| invalid("integer division by zero")),
        };
        HostData::I64(x.iter().zip(&y).map(|(&p, &q)| f(p, q)).collect::<Result<_>>()?)
    } else {
        let (x, y) = (fa.floats(), fb.floats());
        HostData::F32(
            x.iter()
                .zip(&y)
                .map(|(&p, &q)| match op {
                    BinaryOp::Add => p + q,
                    BinaryOp::Sub => p - q,
                    BinaryOp::Mul => p * q,
                    BinaryOp::Div => p / q,
                })
                .collect(),
        )
    };
    Ok(HostTensor { shape, data })
}

/// A 0-d array of `like`'s dtype, so f16 graphs stay f16.
fn scalar(v: f32, like: &Array) -> Result<Array> {
    Array::scalar(v, like.dtype())
}

fn clip(x: &Array, min: Option<f32>, max: Option<f32>) -> Result<Array> {
    let low = match min {
        Some(m) => x.maximum(&scalar(m, x)?)?,
        None => x.add(&scalar(0.0, x)?)?,
    };
    match max {
        Some(m) => low.minimum(&scalar(m, x)?),
        None => Ok(low),
    }
}

fn hard_sigmoid(x: &Array, alpha: f32, beta: f32) -> Result<Array> {
    clip(&x.mul(&scalar(alpha, x)?)?.add(&scalar(beta, x)?)?, Some(0.0), Some(1.0))
}

/// Padding for one spatial axis of a SAME-padded convolution.
fn same_pad(size: usize, kernel: i32, stride: i32, dilation: i32, upper: bool) -> [i32; 2] {
    let out = (size as i32 + stride - 1) / stride;
    let total = ((out - 1) * stride + (kernel - 1) * dilation + 1 - size as i32).max(0);
    if upper { [total / 2, total - total / 2] } else { [total - total / 2, total / 2] }
}

/// Output extent of ceil-mode pooling and the extra padding after that reaches it.
fn ceil_pad(size: i32, kernel: i32, stride: i32, lo: i32, hi: i32) -> i32 {
    let span = size + lo + hi - kernel;
    let mut out = (span + stride - 1) / stride + 1;
    // The last window must start inside the input or its leading padding.
    if (out - 1) * stride >= size + lo {
        out -= 1;
    }
    ((out - 1) * stride + kernel - (size + lo + hi)).max(0)
}

/// Runs one step.
pub(super) fn run_step(step: &Step, values: &[Option<Value>], ctx: Ctx) -> Result<Value> {
    let args: Vec<Arg<'_>> = step.inputs.iter().map(|i| arg(i, values)).collect::<Result<_>>()?;
    let x = || args.first().ok_or_else(|| invalid("no input")).and_then(|a| dev(a, ctx.dtype));
    let device = |a: Array| Ok(Value::Device(a));
    match &step.op {
        Op::Unary(u) => device(x()?.unary(*u)?),
        Op::Binary(op) => {
            let [a, b] = args.as_slice() else { return Err(invalid("two inputs expected")) };
            if let (Arg::Host(p), Arg::Host(q)) = (a, b) {
                return Ok(Value::Host(host_binary(*op, p, q)?));
            }
            let (a, b) = (dev(a, ctx.dtype)?, dev(b, ctx.dtype)?);
            device(match op {
                BinaryOp::Add => a.add(&b)?,
                BinaryOp::Sub => a.sub(&b)?,
                BinaryOp::Mul => a.mul(&b)?,
                BinaryOp::Div => a.div(&b)?,
            })
        }
        Op::Relu => {
            let x = x()?;
            device(x.maximum(&scalar(0.0, &x)?)?)
        }
        Op::Clip { min, max } => device(clip(&*x()?, *min, *max)?),
        Op::HardSigmoid { alpha, beta } => device(hard_sigmoid(&*x()?, *alpha, *beta)?),
        Op::HardSwish => {
            let x = x()?;
            device(x.mul(&hard_sigmoid(&x, 1.0 / 6.0, 0.5)?)?)
        }
        Op::Conv { weight, bias, stride, pads, upper, dilation, groups, kernel } => {
            let x = x()?;
            let shape = x.shape();
            let [_, _, h, w] = shape[..] else {
                return Err(invalid(format!("Conv takes [N, C, H, W], got {shape:?}")));
            };
            let pads = match pads {
                Some(p) => *p,
                None => {
                    let (ph, pw) = (
                        same_pad(h, kernel[0], stride[0], dilation[0], *upper),
                        same_pad(w, kernel[1], stride[1], dilation[1], *upper),
                    );
                    [[ph[0], pw[0]], [ph[1], pw[1]]]
                }
            };
            // MLX convolves channels-last.
            let mut y = x.transpose(&[0, 2, 3, 1])?.conv2d(weight, *stride, pads, *dilation, *groups)?;
            if let Some(b) = bias {
                y = y.add(b)?;
            }
            device(y.transpose(&[0, 3, 1, 2])?)
        }
        Op::Affine { scale, shift } => {
            let x = x()?;
            if x.shape().len() == 2 {
                device(x.mul(&scale.reshape(&[-1])?)?.add(&shift.reshape(&[-1])?)?)
            } else {
                device(x.mul(scale)?.add(shift)?)
            }
        }
        Op::MaxPool { kernel, stride, pads, ceil } => {
            let x = x()?;
            let shape = x.shape();
            let [_, _, h, w] = shape[..] else {
                return Err(invalid(format!("MaxPool takes [N, C, H, W], got {shape:?}")));
            };
            let mut pads = *pads;
            if *ceil {
                pads[1][0] += ceil_pad(h as i32, kernel[0], stride[0], pads[0][0], pads[1][0]);
                pads[1][1] += ceil_pad(w as i32, kernel[1], stride[1], pads[0][1], pads[1][1]);
            }
            device(x.max_pool2d(*kernel, *stride, pads)?)
        }
        Op::GlobalAveragePool => {
            let x = x()?;
            let rank = x.shape().len();
            let mut y = x.mean(rank as i32 - 1, true)?;
            for axis in (2..rank - 1).rev() {
                y = y.mean(axis as i32, true)?;
            }
            device(y)
        }
        Op::MatMul => device(x()?.matmul(&*dev(args.get(1).unwrap_or(&Arg::None), ctx.dtype)?)?),
        Op::Gemm { alpha, beta, trans_a, trans_b } => {
            let t = |a: Dev<'_>, yes: bool| -> Result<Array> {
                if yes { a.transpose(&[1, 0]) } else { a.reshape(&i32s(&a.shape())) }
            };
            let a = t(x()?, *trans_a)?;
            let b = t(dev(args.get(1).unwrap_or(&Arg::None), ctx.dtype)?, *trans_b)?;
            let mut y = a.matmul(&b)?;
            if *alpha != 1.0 {
                y = y.mul(&scalar(*alpha, &y)?)?;
            }
            if let Some(c) = args.get(2).filter(|c| !matches!(c, Arg::None)) {
                let c = dev(c, ctx.dtype)?;
                y = if *beta == 1.0 { y.add(&c)? } else { y.add(&c.mul(&scalar(*beta, &c)?)?)? };
            }
            device(y)
        }
        Op::Softmax { axis, coerce } => {
            let x = x()?;
            let shape = x.shape();
            let a = axis_index(*axis, shape.len())?;
            if !*coerce || a == shape.len() - 1 {
                return device(x.softmax(a as i32)?);
            }
            // Before opset 13: softmax over everything from `axis` on, as one row.
            let rows: usize = shape[..a].iter().product();
            let y = x.reshape(&[rows as i32, -1])?.softmax(-1)?;
            device(y.reshape(&i32s(&shape))?)
        }
        Op::Transpose(perm) => {
            let x = x()?;
            let rank = x.shape().len() as i32;
            let perm = perm.clone().unwrap_or_else(|| (0..rank).rev().collect());
            device(x.transpose(&perm)?)
        }
        Op::Shape => {
            let shape = shape_of(&args[0])?;
            Ok(Value::Host(HostTensor {
                shape: vec![shape.len()],
                data: HostData::I64(shape.iter().map(|&d| d as i64).collect()),
            }))
        }
        Op::Cast(to) => cast(&args[0], *to, ctx.dtype),
        Op::Reshape { allow_zero } => {
            let input = shape_of(&args[0])?;
            let target = host(args.get(1).unwrap_or(&Arg::None), "Reshape's shape")?.ints();
            let mut shape = Vec::with_capacity(target.len());
            let mut infer = None;
            for (i, &d) in target.iter().enumerate() {
                shape.push(match d {
                    0 if !allow_zero => {
                        *input.get(i).ok_or_else(|| invalid("Reshape copies a dimension the input lacks"))?
                    }
                    -1 if infer.is_none() => {
                        infer = Some(i);
                        1
                    }
                    d if d >= 0 => d as usize,
                    d => return Err(invalid(format!("Reshape to dimension {d}"))),
                });
            }
            if let Some(i) = infer {
                let known: usize = shape.iter().product();
                let total: usize = input.iter().product();
                if known == 0 || !total.is_multiple_of(known) {
                    return Err(invalid(format!("cannot reshape {input:?} to {target:?}")));
                }
                shape[i] = total / known;
            }
            reshaped(&args[0], shape, ctx.dtype)
        }
        Op::Flatten(axis) => {
            let input = shape_of(&args[0])?;
            let a = if *axis == input.len() as i64 { input.len() } else { axis_index(*axis, input.len())? };
            let shape = vec![input[..a].iter().product(), input[a..].iter().product()];
            reshaped(&args[0], shape, ctx.dtype)
        }
        Op::Unsqueeze(axes) | Op::Squeeze(axes) => {
            let input = shape_of(&args[0])?;
            let axes = match (axes, args.get(1)) {
                (Some(a), _) => Some(a.clone()),
                (None, Some(a @ Arg::Host(_))) => Some(host(a, "the axes")?.ints()),
                (None, Some(Arg::Device(_))) => {
                    return Err(Error::Unsupported("axes computed on the device".into()));
                }
                _ => None,
            };
            let shape = if matches!(step.op, Op::Unsqueeze(_)) {
                let axes = axes.ok_or_else(|| invalid("Unsqueeze without axes"))?;
                let rank = input.len() + axes.len();
                let mut at: Vec<usize> = axes.iter().map(|&a| axis_index(a, rank)).collect::<Result<_>>()?;
                at.sort_unstable();
                let mut dims = input.into_iter();
                (0..rank).map(|i| if at.contains(&i) { 1 } else { dims.next().unwrap_or(1) }).collect()
            } else {
                let at: Vec<usize> = match axes {
                    Some(a) => a.iter().map(|&a| axis_index(a, input.len())).collect::<Result<_>>()?,
                    None => (0..input.len()).filter(|&i| input[i] == 1).collect(),
                };
                input.iter().enumerate().filter(|(i, _)| !at.contains(i)).map(|(_, &d)| d).collect()
            };
            reshaped(&args[0], shape, ctx.dtype)
        }
        Op::Slice => slice(&args, ctx.dtype),
        Op::Concat(axis) => {
            let parts: Vec<&Arg<'_>> = args.iter().filter(|a| !matches!(a, Arg::None)).collect();
            let rank = shape_of(parts.first().ok_or_else(|| invalid("Concat of nothing"))?)?.len();
            let a = axis_index(*axis, rank)?;
            if parts.iter().all(|p| matches!(p, Arg::Host(_))) {
                let tensors: Vec<&HostTensor> = parts.iter().map(|p| host(p, "")).collect::<Result<_>>()?;
                return Ok(Value::Host(host_concat(&tensors, a)?));
            }
            let arrays: Vec<Dev<'_>> = parts.iter().map(|p| dev(p, ctx.dtype)).collect::<Result<_>>()?;
            let refs: Vec<&Array> = arrays.iter().map(|d| &**d).collect();
            device(Array::concat(&refs, a as i32)?)
        }
    }
}

fn cast(a: &Arg<'_>, to: i32, dtype: DType) -> Result<Value> {
    let float = matches!(to, onnx::FLOAT | onnx::FLOAT16 | onnx::DOUBLE | 16);
    let int = matches!(to, onnx::INT32 | onnx::INT64 | onnx::BOOL);
    if !float && !int {
        return Err(Error::Unsupported(format!("Cast to ONNX element type {to}")));
    }
    match a {
        Arg::Host(t) => Ok(Value::Host(HostTensor {
            shape: t.shape.clone(),
            data: if float {
                HostData::F32(t.floats())
            } else if to == onnx::BOOL {
                HostData::I64(t.floats().iter().map(|&v| i64::from(v != 0.0)).collect())
            } else {
                HostData::I64(t.ints())
            },
        })),
        other => {
            let target = match to {
                onnx::INT32 => DType::I32,
                onnx::INT64 | onnx::BOOL => DType::I64,
                _ => dtype,
            };
            Ok(Value::Device(dev(other, dtype)?.astype(target)?))
        }
    }
}

fn slice(args: &[Arg<'_>], dtype: DType) -> Result<Value> {
    let shape = shape_of(&args[0])?;
    let list = |i: usize, what: &str| -> Result<Option<Vec<i64>>> {
        match args.get(i) {
            None | Some(Arg::None) => Ok(None),
            Some(a) => Ok(Some(host(a, what)?.ints())),
        }
    };
    let starts = list(1, "Slice's starts")?.ok_or_else(|| invalid("Slice without starts"))?;
    let ends = list(2, "Slice's ends")?.ok_or_else(|| invalid("Slice without ends"))?;
    let axes = list(3, "Slice's axes")?.unwrap_or_else(|| (0..starts.len() as i64).collect());
    let steps = list(4, "Slice's steps")?.unwrap_or_else(|| vec![1; starts.len()]);
    let rank = shape.len();
    let (mut begin, mut step, mut out) = (vec![0i64; rank], vec![1i64; rank], shape.clone());
    for (k, &axis) in axes.iter().enumerate() {
        let a = axis_index(axis, rank)?;
        let dim = shape[a] as i64;
        let s = *steps.get(k).unwrap_or(&1);
        if s == 0 {
            return Err(invalid("Slice with step 0"));
        }
        let norm = |v: i64| if v < 0 { v + dim } else { v };
        let (lo, hi) = if s > 0 { (0, dim) } else { (-1, dim - 1) };
        let b = norm(starts[k]).clamp(lo, hi);
        let e = norm(ends[k]).clamp(lo, hi);
        let n = if s > 0 { (e - b + s - 1).div_euclid(s) } else { (b - e - s - 1).div_euclid(-s) };
        begin[a] = b;
        step[a] = s;
        out[a] = n.max(0) as usize;
    }
    match &args[0] {
        Arg::Host(t) => {
            let st = strides(&t.shape);
            Ok(Value::Host(host_gather(t, out, |idx| {
                idx.iter().enumerate().map(|(a, &i)| (begin[a] + step[a] * i as i64) as usize * st[a]).sum()
            })))
        }
        other => {
            if step.iter().any(|&s| s != 1) {
                return Err(Error::Unsupported("Slice with steps other than 1 on the device".into()));
            }
            let start: Vec<i32> = begin.iter().map(|&b| b as i32).collect();
            let stop: Vec<i32> = start.iter().zip(&out).map(|(&b, &n)| b + n as i32).collect();
            Ok(Value::Device(dev(other, dtype)?.slice(&start, &stop)?))
        }
    }
}

fn host_concat(parts: &[&HostTensor], axis: usize) -> Result<HostTensor> {
    let first = &parts[0].shape;
    let mut shape = first.clone();
    shape[axis] = 0;
    for p in parts {
        if p.shape.len() != first.len()
            || p.shape.iter().enumerate().any(|(i, &d)| i != axis && d != first[i])
        {
            return Err(invalid(format!("Concat of {:?} and {:?} along axis {axis}", first, p.shape)));
        }
        shape[axis] += p.shape[axis];
    }
    let outer: usize = first[..axis].iter().product();
    let floats = parts.iter().any(|p| matches!(p.data, HostData::F32(_)));
    let (mut f, mut i) = (Vec::new(), Vec::new());
    for o in 0..outer {
        for p in parts {
            let chunk = p.elements() / outer.max(1);
            let range = o * chunk..(o + 1) * chunk;
            if floats {
                f.extend_from_slice(&p.floats()[range]);
            } else {
                i.extend_from_slice(&p.ints()[range]);
            }
        }
    }
    Ok(HostTensor { shape, data: if floats { HostData::F32(f) } else { HostData::I64(i) } })
}
