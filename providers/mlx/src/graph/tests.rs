//! The operators the PP-OCR classifier does not use (its own run is checked against ONNX
//! Runtime in crates/kiln-cli/tests), each against values computed here by hand or by a
//! naive loop.

use std::collections::HashMap;

use kiln_core::DType;

use super::Graph;
use crate::array::Array;
use crate::onnx::{Attribute, HostData, HostTensor, Node, OnnxModel, ValueInfo};

fn tensor(shape: &[usize], v: Vec<f32>) -> HostTensor {
    HostTensor { shape: shape.to_vec(), data: HostData::F32(v) }
}

fn node(op: &str, inputs: &[&str], attributes: Vec<(&str, Attribute)>) -> Node {
    Node {
        name: format!("{op}_node"),
        op: op.into(),
        inputs: inputs.iter().map(|s| s.to_string()).collect(),
        outputs: vec!["y".into()],
        attributes: attributes.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
        ..Node::default()
    }
}

/// Runs one node on `x` (constants `c`), returns y's shape and values.
fn run(opset: i64, n: Node, x: &HostTensor, c: Vec<(&str, HostTensor)>) -> (Vec<usize>, Vec<f32>) {
    let model = OnnxModel {
        opset,
        nodes: vec![n],
        constants: c.into_iter().map(|(k, v)| (k.to_string(), v)).collect::<HashMap<_, _>>(),
        inputs: vec![ValueInfo { name: "x".into(), elem_type: 1, dims: vec![] }],
        outputs: vec![ValueInfo { name: "y".into(), elem_type: 1, dims: vec![] }],
    };
    let graph = Graph::compile(&model, DType::F32).unwrap();
    let bytes: Vec<u8> = x.floats().iter().flat_map(|v| v.to_le_bytes()).collect();
    let input = Array::from_bytes(&bytes, DType::F32, &x.shape).unwrap();
    graph.run(vec![input]).unwrap().remove(0)
}

fn close(a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() <= 1e-5 * (1.0 + y.abs()), "{a:?} vs {b:?}");
    }
}

#[test]
fn elementwise_functions() {
    let x = tensor(&[4], vec![-1.5, -0.25, 0.5, 2.0]);
    let check = |op: &str, f: fn(f32) -> f32| {
        let (_, y) = run(13, node(op, &["x"], vec![]), &x, vec![]);
        close(&y, &x.floats().iter().map(|&v| f(v)).collect::<Vec<_>>());
    };
    check("Sigmoid", |v| 1.0 / (1.0 + (-v).exp()));
    check("Tanh", f32::tanh);
    check("Exp", f32::exp);
    check("Neg", |v| -v);
    check("Relu", |v| v.max(0.0));
    check("HardSwish", |v| v * (v / 6.0 + 0.5).clamp(0.0, 1.0));
    // erf(0.5) and erf(2) from tables.
    let (_, y) = run(13, node("Erf", &["x"], vec![]), &tensor(&[2], vec![0.5, 2.0]), vec![]);
    close(&y, &[0.520_499_9, 0.995_322_3]);
    let (_, y) = run(13, node("Sqrt", &["x"], vec![]), &tensor(&[2], vec![4.0, 2.25]), vec![]);
    close(&y, &[2.0, 1.5]);
    let (_, y) = run(13, node("Sub", &["x", "c"], vec![]), &x, vec![("c", tensor(&[1], vec![1.0]))]);
    close(&y, &[-2.5, -1.25, -0.5, 1.0]);
}

#[test]
fn gemm_transpose_and_shapes() {
    // y = 2 * x @ w^T + 0.5 * c, x [2, 3], w [2, 3].
    let x = tensor(&[2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    let w = tensor(&[2, 3], vec![1.0, 0.0, -1.0, 0.5, 0.5, 0.5]);
    let attrs = vec![
        ("alpha", Attribute::Float(2.0)),
        ("beta", Attribute::Float(0.5)),
        ("transB", Attribute::Int(1)),
    ];
    let (shape, y) = run(
        13,
        node("Gemm", &["x", "w", "c"], attrs),
        &x,
        vec![("w", w), ("c", tensor(&[2], vec![2.0, 4.0]))],
    );
    assert_eq!(shape, [2, 2]);
    close(&y, &[2.0 * -2.0 + 1.0, 2.0 * 3.0 + 2.0, 2.0 * -2.0 + 1.0, 2.0 * 7.5 + 2.0]);

    let (shape, y) = run(13, node("Transpose", &["x"], vec![]), &x, vec![]);
    assert_eq!(shape, [3, 2]);
    close(&y, &[1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    let x4 = tensor(&[2, 3, 1, 2], (0..12).map(|v| v as f32).collect());
    assert_eq!(run(13, node("Flatten", &["x"], vec![("axis", Attribute::Int(2))]), &x4, vec![]).0, [6, 2]);
    let axes = HostTensor { shape: vec![2], data: HostData::I64(vec![0, -1]) };
    assert_eq!(run(13, node("Unsqueeze", &["x", "a"], vec![]), &x, vec![("a", axes)]).0, [1, 2, 3, 1]);
    assert_eq!(
        run(11, node("Squeeze", &["x"], vec![("axes", Attribute::Ints(vec![2]))]), &x4, vec![]).0,
        [2, 3, 2]
    );
}

#[test]
fn softmax_before_opset_13_spans_the_trailing_axes() {
    let x = tensor(&[1, 2, 2], vec![0.0, 1.0, 2.0, 3.0]);
    let (_, y) = run(11, node("Softmax", &["x"], vec![("axis", Attribute::Int(1))]), &x, vec![]);
    let e: Vec<f32> = x.floats().iter().map(|v| v.exp()).collect();
    let sum: f32 = e.iter().sum();
    close(&y, &e.iter().map(|v| v / sum).collect::<Vec<_>>());
    // From opset 13: one axis.
    let (_, y) = run(13, node("Softmax", &["x"], vec![("axis", Attribute::Int(1))]), &x, vec![]);
    let (a, b) = (1.0 / (1.0 + 2f32.exp()), 1.0 / (1.0 + (-2f32).exp()));
    close(&y, &[a, a, b, b]);
}

/// A naive NCHW convolution with explicit padding, for comparison.
#[allow(clippy::too_many_arguments)]
fn conv_reference(
    x: &[f32],
    [c, h, w]: [usize; 3],
    k: &[f32],
    [o, kh, kw]: [usize; 3],
    s: usize,
    pad: [usize; 2],
    out: [usize; 2],
) -> Vec<f32> {
    let mut y = vec![0f32; o * out[0] * out[1]];
    for oc in 0..o {
        for oy in 0..out[0] {
            for ox in 0..out[1] {
                let mut acc = 0.0;
                for ic in 0..c {
                    for dy in 0..kh {
                        for dx in 0..kw {
                            let (iy, ix) = (
                                (oy * s + dy) as isize - pad[0] as isize,
                                (ox * s + dx) as isize - pad[1] as isize,
                            );
                            if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                acc += x[(ic * h + iy as usize) * w + ix as usize]
                                    * k[((oc * c + ic) * kh + dy) * kw + dx];
                            }
                        }
                    }
                }
                y[(oc * out[0] + oy) * out[1] + ox] = acc;
            }
        }
    }
    y
}

#[test]
fn same_padded_strided_convolution_matches_a_naive_loop() {
    let (c, h, w, o) = (2, 5, 6, 3);
    let x: Vec<f32> = (0..c * h * w).map(|i| ((i * 7 % 11) as f32 - 5.0) / 4.0).collect();
    let k: Vec<f32> = (0..o * c * 9).map(|i| ((i * 5 % 13) as f32 - 6.0) / 8.0).collect();
    let attrs = vec![
        ("auto_pad", Attribute::Bytes(b"SAME_UPPER".to_vec())),
        ("strides", Attribute::Ints(vec![2, 2])),
    ];
    let (shape, y) = run(
        13,
        node("Conv", &["x", "k"], attrs),
        &tensor(&[1, c, h, w], x.clone()),
        vec![("k", tensor(&[o, c, 3, 3], k.clone()))],
    );
    // out = ceil(5/2) x ceil(6/2) = 3 x 3; total padding 2 and 1: SAME_UPPER puts the odd one after.
    assert_eq!(shape, [1, o, 3, 3]);
    close(&y, &conv_reference(&x, [c, h, w], &k, [o, 3, 3], 2, [1, 0], [3, 3]));
}

#[test]
fn ceil_mode_max_pooling_keeps_the_partial_window() {
    let x = tensor(&[1, 1, 3, 3], (1..=9).map(|v| v as f32).collect());
    let attrs = |ceil| {
        vec![
            ("kernel_shape", Attribute::Ints(vec![2, 2])),
            ("strides", Attribute::Ints(vec![2, 2])),
            ("ceil_mode", Attribute::Int(ceil)),
        ]
    };
    let (shape, y) = run(13, node("MaxPool", &["x"], attrs(1)), &x, vec![]);
    assert_eq!(shape, [1, 1, 2, 2]);
    close(&y, &[5.0, 6.0, 8.0, 9.0]);
    let (shape, y) = run(13, node("MaxPool", &["x"], attrs(0)), &x, vec![]);
    assert_eq!(shape, [1, 1, 1, 1]);
    close(&y, &[5.0]);
}

#[test]
fn depthwise_convolution_with_stride_and_dilation_matches_a_naive_loop() {
    let (c, h, w) = (3, 7, 6);
    let x: Vec<f32> = (0..c * h * w).map(|i| ((i * 7 % 11) as f32 - 5.0) / 4.0).collect();
    let k: Vec<f32> = (0..c * 9).map(|i| ((i * 5 % 13) as f32 - 6.0) / 8.0).collect();
    let attrs = vec![
        ("group", Attribute::Int(c as i64)),
        ("pads", Attribute::Ints(vec![2, 1, 2, 1])),
        ("strides", Attribute::Ints(vec![2, 1])),
        ("dilations", Attribute::Ints(vec![2, 1])),
    ];
    let (shape, y) = run(
        13,
        node("Conv", &["x", "k"], attrs),
        &tensor(&[1, c, h, w], x.clone()),
        vec![("k", tensor(&[c, 1, 3, 3], k.clone()))],
    );
    // Height: (7 + 4 - 5) / 2 + 1 = 4; width: (6 + 2 - 3) + 1 = 6.
    assert_eq!(shape, [1, c, 4, 6]);
    let mut expected = vec![0f32; c * 4 * 6];
    for ch in 0..c {
        for oy in 0..4 {
            for ox in 0..6 {
                let mut acc = 0.0;
                for dy in 0..3 {
                    for dx in 0..3 {
                        let (iy, ix) = ((oy * 2 + dy * 2) as isize - 2, (ox + dx) as isize - 1);
                        if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                            acc += x[(ch * h + iy as usize) * w + ix as usize] * k[(ch * 3 + dy) * 3 + dx];
                        }
                    }
                }
                expected[(ch * 4 + oy) * 6 + ox] = acc;
            }
        }
    }
    close(&y, &expected);
}
