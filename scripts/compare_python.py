#!/usr/bin/env python3
"""The Python package's overhead (issue 31): `encode` of the same texts, same config, from
Python against `kiln run`, alternated, in one run.

    pip install ./python          # the release build, into the Python that runs this
    python scripts/compare_python.py [--kiln target/release/kiln] [--texts 1000] [--rounds 3]

`kiln run` reports its own texts/s (model loaded, file read and written); Python times
`encode` on an optimizer already loaded. The texts: 5-200 words, seeded. The result
cache is off on both sides (the rounds repeat the texts).
"""
import argparse
import json
import pathlib
import random
import re
import statistics
import subprocess
import tempfile
import time

import kiln

ROOT = pathlib.Path(__file__).resolve().parent.parent
WORDS = ("model inference batch latency throughput memory cache token vector embedding query document search "
         "rank score server request queue worker thread device tensor layer attention river mountain city "
         "music light garden window paper story").split()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kiln", default=str(ROOT / "target/release/kiln"))
    ap.add_argument("--config", default=str(ROOT / "examples/embed.toml"))
    ap.add_argument("--texts", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    rng = random.Random(31)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 200))) for _ in range(args.texts)]
    with tempfile.TemporaryDirectory() as tmp:
        src = pathlib.Path(tmp) / "texts.txt"
        src.write_text("\n".join(texts) + "\n")
        # The result cache off on both sides: the rounds repeat the same texts.
        opt = kiln.Optimizer(args.config, cache={"enabled": False})
        opt.encode(texts[:64])  # warm
        runs, pys = [], []
        for _ in range(args.rounds):
            out = subprocess.run([args.kiln, "run", args.config, "--input", str(src), "--output",
                                  str(pathlib.Path(tmp) / "out.jsonl"), "--set", "cache.enabled=false"],
                                 capture_output=True, text=True, check=True)
            rate = float(re.search(r"\(([\d.]+) texts/s\)", out.stderr).group(1))
            runs.append(rate)
            t = time.perf_counter()
            opt.encode(texts)
            pys.append(len(texts) / (time.perf_counter() - t))
        opt.shutdown()
    result = {"texts": args.texts, "kiln_run_texts_per_s": runs, "python_encode_texts_per_s": pys,
              "ratio_medians": statistics.median(pys) / statistics.median(runs)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
