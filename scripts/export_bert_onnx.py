"""Writes an ONNX graph of a BERT encoder (all-MiniLM-L6-v2 and its family) from a
Hugging Face folder's config.json and model.safetensors, with the `onnx` package only
(no torch): inputs input_ids / attention_mask / token_type_ids [batch, sequence] int64,
output last_hidden_state [batch, sequence, hidden] float32 — what kiln's text pipeline
pools. The tokenizer and sentence-transformers files are copied beside it, so the
output folder serves like the original.

It follows BertModel: word + position + token-type embeddings, LayerNorm; per layer
self-attention (scores / sqrt(head_dim) plus a mask of the float32 minimum where
attention_mask is 0, softmax), output projection, residual, LayerNorm, feed-forward
with exact (erf) GELU, residual, LayerNorm.

Usage: export_bert_onnx.py MODEL_DIR OUT_DIR     (needs onnx and numpy)
"""
import json
import pathlib
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import model_folder  # noqa: E402
import safetensors_np  # noqa: E402

src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
config = json.loads((src / "config.json").read_text())
hidden, heads = config["hidden_size"], config["num_attention_heads"]
head_dim = hidden // heads
eps = config.get("layer_norm_eps", 1e-12)
if config.get("hidden_act", "gelu") != "gelu":
    sys.exit(f"hidden_act {config['hidden_act']!r} is not supported (only exact gelu)")

weights = {
    name.removeprefix("bert."): array if array.dtype == np.int64 else array.astype(np.float32)
    for name, array in safetensors_np.load(src / "model.safetensors").items()
}

nodes, inits = [], []
counter = [0]


def init(name, array):
    inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
    return name


def node(op, inputs, **attrs):
    counter[0] += 1
    name = f"{op.lower()}_{counter[0]}"
    nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
    return name


def w(name):
    return init(name, weights[name])


def linear(x, prefix):
    # y = x W^T + b, with W^T stored so MatMul needs no transpose at run time.
    wt = init(prefix + ".weight.T", weights[prefix + ".weight"].T)
    return node("Add", [node("MatMul", [x, wt]), w(prefix + ".bias")])


def layer_norm(x, prefix):
    return node("LayerNormalization", [x, w(prefix + ".weight"), w(prefix + ".bias")], axis=-1, epsilon=eps)


# Embeddings.
# Position ids 0..sequence-1 for every row: a cumulative sum of ones along the sequence.
one_i64 = init("one_i64", np.array(1, np.int64))
ones = node("Add", [node("Mul", ["input_ids", init("zero_i64", np.array(0, np.int64))]), one_i64])
positions = node("Sub", [node("CumSum", [ones, one_i64]), one_i64])
emb = node("Add", [
    node("Add", [
        node("Gather", [w("embeddings.word_embeddings.weight"), "input_ids"], axis=0),
        node("Gather", [w("embeddings.position_embeddings.weight"), positions], axis=0),
    ]),
    node("Gather", [w("embeddings.token_type_embeddings.weight"), "token_type_ids"], axis=0),
])
h = layer_norm(emb, "embeddings.LayerNorm")

# Additive mask [batch, 1, 1, sequence]: 0 where attended, float32 min where padded.
# Unsqueeze, Cast, Sub, Mul in this order is the shape ONNX Runtime's attention fusion
# recognises (that of PyTorch's BertModel export).
mask = node("Unsqueeze", [node("Unsqueeze", ["attention_mask", init("axis_1", np.array([1], np.int64))]),
                          init("axis_2", np.array([2], np.int64))])
mask = node("Cast", [mask], to=TensorProto.FLOAT)
mask = node("Mul", [node("Sub", [init("one_f32", np.array(1.0, np.float32)), mask]),
                    init("min_f32", np.array(np.finfo(np.float32).min, np.float32))])

split_shape = init("split_heads", np.array([0, 0, heads, head_dim], np.int64))
merge_shape = init("merge_heads", np.array([0, 0, hidden], np.int64))
sqrt_head_dim = init("sqrt_head_dim", np.array(np.sqrt(head_dim), np.float32))
half = init("half", np.array(0.5, np.float32))
sqrt2 = init("sqrt2", np.array(np.sqrt(2.0), np.float32))

for i in range(config["num_hidden_layers"]):
    p = f"encoder.layer.{i}"

    def heads_of(x, perm=(0, 2, 1, 3)):
        return node("Transpose", [node("Reshape", [x, split_shape])], perm=list(perm))

    # As PyTorch exports BertSelfAttention (what the attention fusion matches): K goes
    # straight to [batch, heads, head_dim, sequence].
    q = heads_of(linear(h, f"{p}.attention.self.query"))
    k = heads_of(linear(h, f"{p}.attention.self.key"), perm=(0, 2, 3, 1))
    v = heads_of(linear(h, f"{p}.attention.self.value"))
    # Div rather than Mul by the inverse: the fusion tells the scale from the mask's Mul
    # by op type.
    scores = node("Div", [node("MatMul", [q, k]), sqrt_head_dim])
    probs = node("Softmax", [node("Add", [scores, mask])], axis=-1)
    context = node("Reshape", [node("Transpose", [node("MatMul", [probs, v])], perm=[0, 2, 1, 3]), merge_shape])
    h1 = layer_norm(node("Add", [linear(context, f"{p}.attention.output.dense"), h]), f"{p}.attention.output.LayerNorm")
    x = linear(h1, f"{p}.intermediate.dense")
    # x/2 (1 + erf(x / sqrt 2)), with Div as the GELU fusion expects.
    gelu = node("Mul", [node("Mul", [x, half]), node("Add", [node("Erf", [node("Div", [x, sqrt2])]), "one_f32"])])
    h = layer_norm(node("Add", [linear(gelu, f"{p}.output.dense"), h1]), f"{p}.output.LayerNorm")

nodes.append(helper.make_node("Identity", [h], ["last_hidden_state"], name="output"))
dims = ["batch", "sequence"]
graph = helper.make_graph(
    nodes,
    "bert",
    [helper.make_tensor_value_info(name, TensorProto.INT64, dims) for name in ["input_ids", "attention_mask", "token_type_ids"]],
    [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, dims + [hidden])],
    inits,
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="kiln export_bert_onnx.py")
model.ir_version = 8
onnx.checker.check_model(model)
out.mkdir(parents=True, exist_ok=True)
onnx.save(model, out / "model.onnx")
model_folder.copy_serving_files(src, out)
print(f"{out / 'model.onnx'}: {config['num_hidden_layers']} layers, hidden {hidden}, {len(nodes)} nodes")
