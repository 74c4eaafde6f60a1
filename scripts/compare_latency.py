#!/usr/bin/env python3
"""One short query at a time (batch 1, 8-16 tokens): p50 and p99 latency of kiln (the
Python package, in process, cache off) against OpenVINO on kiln's ONNX export (its
defaults and f32) and sentence-transformers, on this machine, in one run (issue 32).

    scripts/setup compare ort python
    VIRTUAL_ENV=$PWD/.kiln/compare .kiln/python/bin/maturin develop --release -m python/Cargo.toml
    .kiln/compare/bin/python scripts/compare_latency.py [--queries 300] [CONFIG ...]

Each side embeds the same queries one by one, tokenization and pooling included, after
20 warm-up queries; sides alternate query by query so the machine's noise is shared.
"""
import argparse
import pathlib
import statistics
import sys
import time

root = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(root / "scripts"))

WORDS = ("search latency request summary archive meeting station breakfast library train "
         "signal market bridge weather history movie model memory cache").split()


def queries(n: int) -> list:
    """Short queries of 6-14 words: 8-16 word pieces with [CLS] and [SEP]."""
    return [" ".join(WORDS[(i * 5 + j * 3) % len(WORDS)] for j in range(6 + i % 9)) for i in range(n)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("configs", nargs="*", default=["examples/embed.toml", "examples/embed-bf16.toml"])
    ap.add_argument("--queries", type=int, default=300)
    args = ap.parse_args()

    from compare_sentence_transformers import openvino_encoder
    from sentence_transformers import SentenceTransformer

    import kiln

    data = queries(args.queries)
    sides = {}
    st = SentenceTransformer(str(root / ".kiln/models/all-MiniLM-L6-v2"), device="cpu")
    sides["sentence-transformers (torch f32)"] = lambda q: st.encode([q], batch_size=1)
    ov_default, ov_f32 = openvino_encoder(None), openvino_encoder("f32")
    sides["OpenVINO (defaults)"] = lambda q: ov_default([q], 1)
    sides["OpenVINO (f32 precision hint)"] = lambda q: ov_f32([q], 1)
    optimizers = []
    for config in args.configs:
        opt = kiln.Optimizer(str(root / config), cache={"enabled": False}, batching={"max_wait_ms": 0})
        optimizers.append(opt)
        sides[f"kiln {pathlib.Path(config).name}"] = lambda q, opt=opt: opt.embed([q])
    times = {name: [] for name in sides}
    for q in data[:20]:  # warm-up
        for embed in sides.values():
            embed(q)
    for q in data:
        for name, embed in sides.items():
            start = time.perf_counter()
            embed(q)
            times[name].append((time.perf_counter() - start) * 1e3)
    for opt in optimizers:
        opt.shutdown()
    tokens = [len(ids) for ids in st.tokenizer(data)["input_ids"]]
    print(f"{len(data)} single queries of {min(tokens)}-{max(tokens)} tokens, one at a time, alternated")
    print(f"{'':44} {'p50 ms':>8} {'p99 ms':>8}")
    for name, t in times.items():
        t = sorted(t)
        print(f"{name:44} {statistics.median(t):8.2f} {t[int(len(t) * 0.99) - 1]:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
