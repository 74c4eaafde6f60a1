"""Traces a BERT encoder folder (Hugging Face layout: config.json + model.safetensors)
to TorchScript for kiln's tch provider, with torch alone (no transformers).

The module takes input_ids / attention_mask / token_type_ids, int64 [batch, sequence],
and returns last_hidden_state [batch, sequence, hidden] at the module's precision —
what kiln's text pipeline pools. It is written so that one trace serves every batch
size, sequence length, device and dtype: positions come from the input (not a
constant arange), the attention mask takes the hidden state's dtype with type_as, and
no tensor is created on a fixed device. Attention is torch's scaled_dot_product_attention
(the fused kernels sentence-transformers also gets on a GPU); GELU is the exact erf
form BERT was trained with.

Beside model.pt it writes signature.json (the inputs and outputs kiln validates
requests against) and copies the tokenizer, pooling and config files, so the output
folder serves like the original. The trace is checked against an untraced run on
inputs of another shape before it is saved.

Usage: trace_bert_torchscript.py MODEL_DIR OUT_DIR [--dtype f32|f16]
  --dtype f16 stores the weights in float16 (half the file; kiln converts at load to
  the configured model.dtype).
"""
import argparse
import json
import pathlib
import sys

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import model_folder  # noqa: E402
import safetensors_np  # noqa: E402


class Bert(nn.Module):
    def __init__(self, config, weights):
        super().__init__()
        self.heads = config["num_attention_heads"]
        # Python ints, not sizes read from a tensor: arithmetic on a traced size becomes
        # a tensor op, which a module loaded onto a GPU runs there and reads back with a
        # blocking copy every forward (it stalled the stream, and CUDA graph capture
        # refuses it).
        self.hidden = config["hidden_size"]
        self.head = self.hidden // self.heads
        self.layers = config["num_hidden_layers"]
        self.eps = config.get("layer_norm_eps", 1e-12)
        # Parameters keep the checkpoint's names, dots as underscores (nn.Module's rule).
        prefix = "bert." if any(k.startswith("bert.") for k in weights) else ""
        self.names = {}
        for name, array in weights.items():
            if not name.startswith(prefix) or name.endswith("position_ids"):
                continue
            key = name[len(prefix):]
            if key.startswith("pooler."):
                continue
            attr = key.replace(".", "_")
            self.register_parameter(attr, nn.Parameter(torch.from_numpy(np.array(array)), requires_grad=False))
            self.names[key] = attr

    def w(self, key):
        return getattr(self, self.names[key])

    def linear(self, x, key):
        return F.linear(x, self.w(key + ".weight"), self.w(key + ".bias"))

    def norm(self, x, key):
        return F.layer_norm(x, x.shape[-1:], self.w(key + ".weight"), self.w(key + ".bias"), self.eps)

    def forward(self, input_ids, attention_mask, token_type_ids):
        positions = torch.cumsum(torch.ones_like(input_ids), dim=1) - 1
        e = "embeddings."
        h = (
            F.embedding(input_ids, self.w(e + "word_embeddings.weight"))
            + F.embedding(positions, self.w(e + "position_embeddings.weight"))
            + F.embedding(token_type_ids, self.w(e + "token_type_embeddings.weight"))
        )
        h = self.norm(h, e + "LayerNorm")
        head, hidden = self.head, self.hidden
        # Additive mask in the hidden state's dtype: 0 for tokens, -10000 for padding
        # (representable in f16, and exp(-10000) is 0 in every precision).
        mask = (1.0 - attention_mask[:, None, None, :].type_as(h)) * -10000.0
        for i in range(self.layers):
            p = f"encoder.layer.{i}."

            def split(x):
                return x.view(x.shape[0], x.shape[1], self.heads, head).transpose(1, 2)

            q = split(self.linear(h, p + "attention.self.query"))
            k = split(self.linear(h, p + "attention.self.key"))
            v = split(self.linear(h, p + "attention.self.value"))
            context = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            context = context.transpose(1, 2).flatten(2)
            h = self.norm(self.linear(context, p + "attention.output.dense") + h, p + "attention.output.LayerNorm")
            inner = F.gelu(self.linear(h, p + "intermediate.dense"))
            h = self.norm(self.linear(inner, p + "output.dense") + h, p + "output.LayerNorm")
        return h


def load(model_dir):
    """A BERT folder's config and weights (floating ones as f32, numpy arrays)."""
    config = json.loads((model_dir / "config.json").read_text())
    weights = {
        name: array.astype(np.float32) if array.dtype != np.int64 else array
        for name, array in safetensors_np.load(model_dir / "model.safetensors").items()
    }
    return config, weights


def example(batch, sequence, vocab):
    g = torch.Generator().manual_seed(batch * 1000 + sequence)
    ids = torch.randint(1000, vocab, (batch, sequence), generator=g)
    mask = torch.ones(batch, sequence, dtype=torch.int64)
    mask[0, sequence // 2:] = 0
    return ids, mask, torch.zeros(batch, sequence, dtype=torch.int64)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", type=pathlib.Path)
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--dtype", choices=["f32", "f16"], default="f32")
    args = parser.parse_args()

    config, weights = load(args.model_dir)
    model = Bert(config, weights).eval()
    vocab = config["vocab_size"]
    with torch.no_grad():
        traced = torch.jit.trace(model, example(2, 16, vocab), check_trace=False)
        # Another batch size and length than the trace saw: the graph must not have
        # baked either in.
        check = example(3, 21, vocab)
        diff = (traced(*check) - model(*check)).abs().max().item()
        if diff > 1e-5:
            raise SystemExit(f"the trace differs from the module by {diff} on a [3, 21] batch")
    if args.dtype == "f16":
        traced = traced.half()

    args.out_dir.mkdir(parents=True, exist_ok=True)
    traced.save(str(args.out_dir / "model.pt"))
    hidden = config["hidden_size"]
    signature = {
        "inputs": [{"name": n, "dtype": "i64", "shape": ["batch", "sequence"]}
                   for n in ["input_ids", "attention_mask", "token_type_ids"]],
        "outputs": [{"name": "last_hidden_state", "dtype": "model", "shape": ["batch", "sequence", hidden]}],
    }
    (args.out_dir / "signature.json").write_text(json.dumps(signature, indent=2) + "\n")
    model_folder.copy_serving_files(args.model_dir, args.out_dir)
    print(f"traced {args.model_dir} -> {args.out_dir / 'model.pt'} ({args.dtype}; trace vs module {diff:.2e})")


if __name__ == "__main__":
    main()
