#!/usr/bin/env python3
"""Times `kiln run` and sentence-transformers on the same texts, in one run, on this
machine, and prints both throughputs and their ratio.

    scripts/setup && cargo build --release -p kiln-cli
    /path/to/venv/bin/python scripts/compare_sentence_transformers.py [--texts 2000] [--batch 32]

    # ONNX Runtime instead of candle:
    scripts/setup ort && . .kiln/env && cargo build --release -p kiln-cli --features ort
    /path/to/venv/bin/python scripts/compare_sentence_transformers.py --config examples/embed-ort.toml

The venv needs torch==2.11.0 and sentence-transformers (see
scripts/make_reference_embeddings.py). The texts are generated from a fixed seed, with
lengths from 4 to 120 words, so both sides see exactly the same input. kiln's figure is
the embedding time it reports (model load excluded); sentence-transformers' is the
time of `encode` after one warm-up call. Both use every core of the machine.
"""
import argparse
import os
import pathlib
import random
import re
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

root = pathlib.Path(__file__).resolve().parent.parent
WORDS = (
    "model inference batch latency throughput memory cache token vector embedding query "
    "document search rank score server request queue worker thread device tensor layer "
    "attention head weight precision the a of to and in is for on with as by at from"
).split()


def texts(n: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 120))) for _ in range(n)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--config", default="examples/embed.toml")
    args = ap.parse_args()

    data = texts(args.texts)
    with tempfile.TemporaryDirectory() as tmp:
        inp = pathlib.Path(tmp) / "texts.txt"
        inp.write_text("\n".join(data) + "\n")
        out = pathlib.Path(tmp) / "out.jsonl"
        cmd = [
            str(root / "target/release/kiln"), "run", str(root / args.config),
            "--input", str(inp), "--output", str(out), "--set", f"batching.max_batch_size={args.batch}",
        ]
        run = subprocess.run(cmd, capture_output=True, text=True, check=True)
        m = re.search(r"embedded (\d+) texts in ([\d.]+) s .*with (\w+) on", run.stderr)
        provider = m.group(3)
        kiln_tps = int(m.group(1)) / float(m.group(2))

    from sentence_transformers import SentenceTransformer
    import torch

    model = SentenceTransformer(str(root / ".kiln/models/all-MiniLM-L6-v2"), device="cpu")
    model.encode(data[: args.batch], batch_size=args.batch)
    start = time.perf_counter()
    model.encode(data, batch_size=args.batch)
    st_tps = len(data) / (time.perf_counter() - start)

    print(f"texts: {len(data)}, batch {args.batch}, cores {os.cpu_count()}, torch threads {torch.get_num_threads()}")
    print(f"kiln ({provider}, cpu, f32):{' ' * (10 - len(provider))}{kiln_tps:8.1f} texts/s")
    print(f"sentence-transformers (cpu):  {st_tps:8.1f} texts/s")
    print(f"ratio kiln / sentence-transformers: {kiln_tps / st_tps:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
