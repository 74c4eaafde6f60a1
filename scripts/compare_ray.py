#!/usr/bin/env python3
"""kiln.ray against sentence-transformers in the same Ray Data pipeline (issue 31): the
same texts, the same `map_batches` call (2 actors, 256 rows a call), each side's model
loaded once per actor, on a local Ray cluster of this machine.

    scripts/setup compare python
    .kiln/compare/bin/pip install "ray[data]==2.60.0"
    VIRTUAL_ENV=$PWD/.kiln/compare .kiln/python/bin/maturin develop --release -m python/Cargo.toml
    .kiln/compare/bin/python scripts/compare_ray.py [--texts 2000] [CONFIG ...]

The texts are scripts/compare_sentence_transformers.py's mixed-script ones. Each figure is
the pipeline's wall time from `map_batches` to the last row (actor start and model load
included, as a batch job pays them), and the worst cosine of each row against one
direct sentence-transformers `encode` of the same texts.
"""
import argparse
import pathlib
import sys
import time

import numpy as np

root = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(root / "scripts"))
MINILM = root / ".kiln/models/all-MiniLM-L6-v2"


class SentenceTransformersEmbedder:
    """sentence-transformers as a Ray Data callable class, as its users write one."""

    def __init__(self):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(MINILM), device="cpu")

    def __call__(self, batch):
        out = dict(batch)
        out["embedding"] = self.model.encode(list(batch["text"]), batch_size=32)
        return out


def pipeline(ray, data, fn, kwargs):
    ds = ray.data.from_items([{"text": t, "i": i} for i, t in enumerate(data)])
    start = time.perf_counter()
    rows = ds.map_batches(fn, fn_constructor_kwargs=kwargs, concurrency=2, batch_size=256, num_cpus=1).take_all()
    took = time.perf_counter() - start
    assert [r["i"] for r in rows] == list(range(len(data))), "rows out of order"
    return len(data) / took, np.stack([r["embedding"] for r in rows])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("configs", nargs="*", default=["examples/embed.toml", "examples/embed-bf16.toml"])
    ap.add_argument("--texts", type=int, default=2000)
    args = ap.parse_args()

    import ray
    from compare_sentence_transformers import cosines, texts
    from sentence_transformers import SentenceTransformer

    import kiln.ray

    data = texts(args.texts)
    reference = SentenceTransformer(str(MINILM), device="cpu").encode(data, batch_size=32)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    results = []
    rate, rows = pipeline(ray, data, SentenceTransformersEmbedder, {})
    results.append(("sentence-transformers 5.1.2 (torch, f32)", rate, cosines(rows, reference)))
    for config in args.configs:
        rate, rows = pipeline(ray, data, kiln.ray.Embedder, {"config": str(root / config)})
        results.append((f"kiln.ray {pathlib.Path(config).name}", rate, cosines(rows, reference)))
    ray.shutdown()
    base = results[0][1]
    print(f"{len(data)} texts, Ray {ray.__version__}, 2 actors, 256 rows a call, local cluster of 2 CPUs")
    print(f"{'':44} {'texts/s':>8} {'ratio':>6}  cosine to sentence-transformers (worst / mean)")
    for name, rate, (worst, mean) in results:
        print(f"{name:44} {rate:8.1f} {rate / base:6.2f}  {worst:.6f} / {mean:.6f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
