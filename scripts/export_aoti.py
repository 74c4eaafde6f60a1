"""Compiles a BERT encoder folder ahead of time with AOTInductor (torch.compile's code
generator, `torch._inductor.aoti_compile_and_package`) into `model.pt2` for kiln's tch
provider, which runs it through libtorch without Python.

The module is the one scripts/trace_bert_torchscript.py traces (input_ids /
attention_mask / token_type_ids, int64 [batch, sequence] -> last_hidden_state), exported
with the batch and the sequence length dynamic (1..--max-batch, 1..--max-length), so one
package serves every batch shape. Unlike a TorchScript trace, a package is compiled for
one device type and one precision: the weights are stored at --dtype and the kernels
are generated for --device (C++ for cpu, Triton for cuda). signature.json records both
("compiled": {"device", "dtype"}) and kiln refuses a config that asks for others.

--autotune turns on inductor's max_autotune (benchmarks matmul and other kernel
choices while compiling: slower to build, faster to run; what torch.compile's
mode="max-autotune" does).

Usage: export_aoti.py MODEL_DIR OUT_DIR [--device cpu|cuda] [--dtype f32|f16|bf16]
                      [--max-batch 256] [--max-length 512] [--autotune]
"""
import argparse
import json
import pathlib
import subprocess
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import model_folder  # noqa: E402
from trace_bert_torchscript import Bert, example, load  # noqa: E402

DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", type=pathlib.Path)
    parser.add_argument("out_dir", type=pathlib.Path)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="f32")
    parser.add_argument("--max-batch", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--autotune", action="store_true")
    args = parser.parse_args()

    config, weights = load(args.model_dir)
    reference = Bert(config, weights).eval()
    model = Bert(config, weights).eval().to(args.device, DTYPES[args.dtype])
    vocab = config["vocab_size"]
    max_length = min(args.max_length, config.get("max_position_embeddings", args.max_length))
    batch = torch.export.Dim("batch", min=1, max=args.max_batch)
    sequence = torch.export.Dim("sequence", min=1, max=max_length)
    shapes = {name: {0: batch, 1: sequence} for name in ("input_ids", "attention_mask", "token_type_ids")}
    # The example's sizes are the hints inductor generates and (with --autotune) tunes
    # kernels for: a full batch of kiln's GPU batching at 128 tokens.
    inputs = tuple(t.to(args.device) for t in example(min(args.max_batch, 256), min(max_length, 128), vocab))
    started = time.perf_counter()
    with torch.no_grad():
        exported = torch.export.export(model, inputs, dynamic_shapes=shapes)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        package = torch._inductor.aoti_compile_and_package(
            exported,
            package_path=str(args.out_dir / "model.pt2"),
            inductor_configs={"max_autotune": args.autotune},
        )
    compile_s = time.perf_counter() - started
    hidden = config["hidden_size"]
    signature = {
        "inputs": [{"name": n, "dtype": "i64", "shape": ["batch", "sequence"]}
                   for n in ["input_ids", "attention_mask", "token_type_ids"]],
        "outputs": [{"name": "last_hidden_state", "dtype": "model", "shape": ["batch", "sequence", hidden]}],
        "compiled": {"device": args.device, "dtype": args.dtype, "max_batch": args.max_batch,
                     "max_length": max_length},
    }
    (args.out_dir / "signature.json").write_text(json.dumps(signature, indent=2) + "\n")
    model_folder.copy_serving_files(args.model_dir, args.out_dir)
    # The check loads the package in a process of its own: torch 2.11's Python loader
    # crashed (a segmentation fault in _load_aoti) on a CUDA package on the H200, where
    # the package itself is what kiln loads and checks in its own run.
    check = subprocess.run([sys.executable, "-X", "faulthandler", __file__, "--check", str(args.model_dir),
                            str(package), args.device], capture_output=True, text=True)
    if check.returncode == 0:
        cos = float(check.stdout.split()[-1])
        if cos < 0.999:
            raise SystemExit(f"the package's tokens differ from the module's (worst cosine {cos:.6f}) on a [3, 21] batch")
        checked = f"worst token cosine against the f32 module {cos:.6f}"
    elif check.returncode > 0:
        raise SystemExit(f"checking the package failed:\n{check.stderr[-4000:]}")
    else:
        checked = f"NOT CHECKED: torch's Python loader died of signal {-check.returncode} loading it"
        print(f"warning: {checked}; kiln's own run of the package is the check", file=sys.stderr)
    print(f"compiled {args.model_dir} -> {package} ({args.device} {args.dtype}, autotune {args.autotune}, "
          f"{compile_s:.0f} s; {checked})")


def check(model_dir, package, device):
    """Another batch size and length than the export saw (the package must not have
    baked either in): the worst token cosine against the f32 module, on stdout."""
    config, weights = load(pathlib.Path(model_dir))
    reference = Bert(config, weights).eval()
    loaded = torch._inductor.aoti_load_package(package)
    inputs = example(3, 21, config["vocab_size"])
    with torch.no_grad():
        got = loaded(*(t.to(device) for t in inputs)).float().cpu()
        want = reference(*inputs)
    print(torch.nn.functional.cosine_similarity(got.flatten(0, 1), want.flatten(0, 1), dim=-1).min().item())


if __name__ == "__main__":
    if sys.argv[1:2] == ["--check"]:
        check(*sys.argv[2:5])
    else:
        main()
