"""Puts the embedding head (pooling, then L2 normalisation if the folder has it) inside
an ONNX text encoder, optionally in float16 for the GPU: the graph kiln's ort provider
runs on CUDA.

    onnx_head.py MODEL_DIR OUT_DIR [--f16]      (needs onnx and onnxruntime)

MODEL_DIR holds model.onnx whose output is last_hidden_state [batch, sequence, hidden]
(scripts/export_bert_onnx.py writes one; scripts/optimize_onnx.py's fused graph works
too) and the sentence-transformers files saying the head (1_Pooling/config.json,
modules.json), read as kiln reads them.

Why: on a GPU the token vectors are `sequence` times the bytes of the answer; ONNX
Runtime copies every output back to the host, where kiln would then pool them on one
thread while the GPU waits. With the head in the graph the copy is [batch, hidden].

--f16 first runs ONNX Runtime's transformer optimizer for the GPU (fused Attention,
SkipLayerNormalization, BiasGelu, EmbedLayerNormalization) and converts the weights and
the encoder's arithmetic to float16 with float32 inputs and outputs kept, so the head
pools in float32 (sums of up to `sequence` values).

The output is `sentence_embedding` [batch, hidden] float32. The graph's metadata says
what it computes, which kiln checks at load:
  kiln.embedding_head  {"pooling": "mean", "normalize": true}   (kiln's EmbeddingHead)
  kiln.dtype           "f32" or "f16": the precision the encoder runs in
"""
import argparse
import json
import pathlib
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import model_folder  # noqa: E402

POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
}


def folder_head(folder):
    """The head kiln reads from the folder: 1_Pooling's one set flag (mean when there is no
    pooling config), normalisation when modules.json lists a Normalize step."""
    modules = json.loads((folder / "modules.json").read_text()) if (folder / "modules.json").is_file() else []
    normalize = any(m.get("type", "").endswith(".Normalize") for m in modules)
    pooling_dir = next((folder / m["path"] for m in modules if m.get("type", "").endswith(".Pooling")), None)
    config_file = pooling_dir / "config.json" if pooling_dir else folder / "1_Pooling" / "config.json"
    if not config_file.is_file():
        return {"pooling": "mean", "normalize": normalize}
    flags = json.loads(config_file.read_text())
    chosen = [name for flag, name in POOLING_FLAGS.items() if flags.get(flag)]
    unsupported = [f for f, v in flags.items() if f.startswith("pooling_mode") and v and f not in POOLING_FLAGS]
    if unsupported or len(chosen) != 1:
        sys.exit(f"{config_file}: this script puts one of {sorted(POOLING_FLAGS)} in the graph; the folder sets "
                 f"{[f for f, v in flags.items() if f.startswith('pooling_mode') and v]}")
    return {"pooling": chosen[0], "normalize": normalize}


def fuse_f16(path, config):
    from onnxruntime.transformers import optimizer

    fused = optimizer.optimize_model(str(path), model_type="bert", num_heads=config["num_attention_heads"],
                                     hidden_size=config["hidden_size"], use_gpu=True, opt_level=0)
    counts = {k: v for k, v in fused.get_fused_operator_statistics().items() if v}
    fused.convert_float_to_float16(keep_io_types=True)
    print(f"fused for the GPU: {counts}; float16 with float32 inputs and outputs")
    return fused.model


def add_head(model, head):
    graph = model.graph
    tokens = next((o for o in graph.output if o.name == "last_hidden_state"), None)
    if tokens is None:
        sys.exit(f"the graph has no last_hidden_state output (outputs: {[o.name for o in graph.output]})")
    if tokens.type.tensor_type.elem_type != TensorProto.FLOAT:
        sys.exit("last_hidden_state is not float32")
    nodes = []

    def node(op, inputs, **attrs):
        name = f"head_{op.lower()}_{len(nodes)}"
        nodes.append(helper.make_node(op, inputs, [name], name=name, **attrs))
        return name

    def const(name, value, dtype=np.float32):
        graph.initializer.append(numpy_helper.from_array(np.array(value, dtype), name))
        return name

    h = "last_hidden_state"
    if head["pooling"] == "cls":
        pooled = node("Gather", [h, const("head_zero", 0, np.int64)], axis=1)
    else:
        mask = node("Unsqueeze", [node("Cast", ["attention_mask"], to=TensorProto.FLOAT), const("head_axis2", [2], np.int64)])
        axis1 = const("head_axis1", [1], np.int64)
        summed = node("ReduceSum", [node("Mul", [h, mask]), axis1], keepdims=0)
        # As sentence-transformers: the real-token count clamped at 1e-9.
        count = node("Max", [node("ReduceSum", [mask, axis1], keepdims=0), const("head_min_count", 1e-9)])
        if head["pooling"] == "mean_sqrt_len":
            count = node("Sqrt", [count])
        pooled = node("Div", [summed, count])
    if head["normalize"]:
        norm = node("Max", [node("ReduceL2", [pooled], axes=[1], keepdims=1), const("head_min_norm", 1e-12)])
        pooled = node("Div", [pooled, norm])
    nodes.append(helper.make_node("Identity", [pooled], ["sentence_embedding"], name="head_output"))
    graph.node.extend(nodes)
    batch = tokens.type.tensor_type.shape.dim[0]
    hidden = tokens.type.tensor_type.shape.dim[2]
    out = helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, [None, None])
    out.type.tensor_type.shape.dim[0].CopyFrom(batch)
    out.type.tensor_type.shape.dim[1].CopyFrom(hidden)
    graph.output.remove(tokens)
    graph.output.append(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model_dir", type=pathlib.Path)
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--f16", action="store_true", help="fuse for the GPU and compute in float16")
    args = parser.parse_args()
    config = json.loads((args.model_dir / "config.json").read_text())
    head = folder_head(args.model_dir)
    source = args.model_dir / "model.onnx"
    model = fuse_f16(source, config) if args.f16 else onnx.load(str(source))
    add_head(model, head)
    for key, value in {"kiln.embedding_head": json.dumps(head), "kiln.dtype": "f16" if args.f16 else "f32"}.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(args.out_dir / "model.onnx"))
    model_folder.copy_serving_files(args.model_dir, args.out_dir)
    print(f"{args.out_dir / 'model.onnx'}: head {head}, {'f16' if args.f16 else 'f32'}")


if __name__ == "__main__":
    main()
