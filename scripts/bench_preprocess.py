"""Same-run comparison of kiln's image pipeline with the PIL + numpy way.

Writes N 1920x1080 JPEGs (photo-like 1/f noise, quality 90; with --noisy, white noise
as well, the worst case for a JPEG decoder), times the PIL way one image at a time
(open -> RGB -> LANCZOS resize -> paste on black -> float32 -> normalise -> transpose;
tests/readers/pil_reference.py), then `kiln preprocess` on the same files (best of
--repeat batch runs, the cache off), and prints images/s and the ratio.

Usage (after `scripts/setup readers` and a release build):
  .kiln/readers/bin/python scripts/bench_preprocess.py [--images 32] [--repeat 5] [--noisy]
"""
import argparse
import contextlib
import io
import json
import pathlib
import re
import subprocess
import sys
import tempfile

import numpy as np
from PIL import Image

root = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(root / "tests/readers"))
import pil_reference  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--images", type=int, default=32)
parser.add_argument("--repeat", type=int, default=5)
parser.add_argument("--noisy", action="store_true")
parser.add_argument("--kiln", default=str(root / "target/release/kiln"))
args = parser.parse_args()

results = []
with tempfile.TemporaryDirectory() as d:
    kinds = ["photo"] + (["noisy"] if args.noisy else [])
    for kind in kinds:
        files = []
        for i in range(args.images):
            if kind == "photo":
                pixels = pil_reference.photo(1080, 1920, 100 + i)
            else:
                r = np.random.default_rng(200 + i)
                pixels = np.clip(128 + 40 * r.normal(size=(1080, 1920, 3)), 0, 255).astype(np.uint8)
            path = f"{d}/{kind}_{i:03}.jpg"
            Image.fromarray(pixels).save(path, quality=90)
            files.append(path)
        size_kib = sum(pathlib.Path(f).stat().st_size for f in files) / len(files) / 1024
        best_pil = 0.0
        for _ in range(2):  # best of two, as kiln gets the best of --repeat
            buffer = io.StringIO()
            with contextlib.redirect_stdout(buffer):
                pil_reference.bench(files)  # warms up on two images first
            best_pil = max(best_pil, json.loads(buffer.getvalue())["images_per_s"])
        run = subprocess.run(
            [args.kiln, "preprocess", str(root / "examples/preprocess.toml"), *files, "--out", f"{d}/out.npy",
             "--repeat", str(args.repeat)],
            capture_output=True, text=True, check=True,
        )
        kiln_rate = float(re.search(r"\(([\d.]+) images/s", run.stderr).group(1))
        results.append({"images": kind, "count": len(files), "mean_kib": round(size_kib), "pil_images_per_s": round(best_pil, 1),
                        "kiln_images_per_s": kiln_rate, "ratio": round(kiln_rate / best_pil, 2)})

print(f"{'images':8} {'KiB':>6} {'PIL img/s':>10} {'kiln img/s':>11} {'ratio':>7}")
for r in results:
    print(f"{r['images']:8} {r['mean_kib']:>6} {r['pil_images_per_s']:>10} {r['kiln_images_per_s']:>11} {r['ratio']:>6}x")
print(json.dumps(results))
