"""Fuses a BERT ONNX export for ONNX Runtime's CPU kernels and writes its int8 variant.

    optimize_onnx.py MODEL_DIR        (needs onnx and onnxruntime; scripts/setup ort runs it)

MODEL_DIR holds model.onnx from scripts/export_bert_onnx.py and the Hugging Face
config.json. This script:

1. Runs ONNX Runtime's transformer optimizer (`onnxruntime.transformers`, model type
   bert) over model.onnx and replaces it with the fused graph: Attention (the mask
   becomes per-row lengths: rows are right-padded, as kiln-text pads them),
   EmbedLayerNormalization, SkipLayerNormalization, BiasGelu. The counts of fused
   operators it reports go to fusions.json, and the script fails if one is missing —
   an export that stops matching the fusion patterns is caught at setup.
2. Quantizes the fused graph dynamically to int8 (`model_int8.onnx`: weights int8 per
   output channel, activations uint8 per tensor at run time, as ORT's MatMulInteger and
   QAttention take them), leaving the embeddings and the feed-forward output projections (the MatMuls after BiasGelu) in f32: quantizing their GELU-shaped inputs
   per tensor costs the most accuracy (MiniLM, mixed-script texts: worst cosine to
   sentence-transformers 0.966 with them, 0.991 without, at 1.6x the f32 speed either
   way; see docs/benchmarks.md).
"""
import collections
import json
import pathlib
import sys

import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic
from onnxruntime.transformers import optimizer

EXPECTED = {"Attention", "EmbedLayerNormalization", "SkipLayerNormalization", "BiasGelu"}

folder = pathlib.Path(sys.argv[1])
config = json.loads((folder / "config.json").read_text())
source = folder / "model.onnx"

fused = optimizer.optimize_model(
    str(source),
    model_type="bert",
    num_heads=config["num_attention_heads"],
    hidden_size=config["hidden_size"],
    # The fusions only (in Python); ONNX Runtime's own graph optimisations run when kiln
    # loads the model, at the session's optimization_level.
    opt_level=0,
)
counts = {k: v for k, v in fused.get_fused_operator_statistics().items() if v}
missing = EXPECTED - counts.keys()
if missing:
    sys.exit(f"the export did not fuse {sorted(missing)} (fused: {counts})")
fused.save_model_to_file(str(source))
(folder / "fusions.json").write_text(json.dumps(counts, indent=2) + "\n")

graph = onnx.load(str(source)).graph
producer = {out: n for n in graph.node for out in n.output}
down = [
    n.name
    for n in graph.node
    if n.op_type == "MatMul" and n.input[0] in producer and producer[n.input[0]].op_type == "BiasGelu"
]
quantize_dynamic(
    str(source),
    str(folder / "model_int8.onnx"),
    weight_type=QuantType.QInt8,
    per_channel=True,
    op_types_to_quantize=["MatMul", "Attention"],
    nodes_to_exclude=down,
    # Shape inference does not know the fused (com.microsoft) operators.
    extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
)
ops = collections.Counter(n.op_type for n in onnx.load(str(folder / "model_int8.onnx")).graph.node)
print(f"{source}: fused {counts}")
print(f"{folder / 'model_int8.onnx'}: {dict(ops)} ({len(down)} feed-forward output MatMuls left in f32)")
