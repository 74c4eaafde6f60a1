"""Where the video pipeline's models spend their time on ONNX Runtime's CUDA provider, by
batch size (issue 33: batches of 8 keyframes or 16 midpoints ran ~30x slower per run
than batches of 1-2 on an H100).

    video_profile.py UNET.onnx RIFE.onnx OUT_DIR [--runs 20]

For each model and batch size, and each variant of the session —
  heuristic   the CUDA provider with cuDNN's heuristic algorithm choice (kiln's default)
  nhwc        the same with `prefer_nhwc` (convolutions in channels-last)
  bound       heuristic, inputs and outputs bound on the GPU (I/O binding: no host copies)
  graph       bound, plus `enable_cuda_graph` (one captured graph replayed per run; needs
              every node on the CUDA provider, so its failure says some are not)
— the median milliseconds of a run. Then one profiled session per batch size: the time by
operator and provider, and which nodes ONNX Runtime placed on the CPU. Prints JSON lines
and writes OUT_DIR/profile.json.
"""
import argparse
import collections
import glob
import json
import os
import statistics
import sys
import time

import numpy as np
import onnxruntime as ort


def options(variant):
    o = {"device_id": 0, "cudnn_conv_algo_search": "HEURISTIC"}
    if variant == "nhwc":
        o["prefer_nhwc"] = "1"
    if variant == "graph":
        o["enable_cuda_graph"] = "1"
    return o


def session(path, variant, profile_dir=None):
    so = ort.SessionOptions()
    if profile_dir:
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(profile_dir, os.path.basename(path))
    s = ort.InferenceSession(path, so, providers=[("CUDAExecutionProvider", options(variant))])
    if s.get_providers()[0] != "CUDAExecutionProvider":
        raise SystemExit(f"the CUDA provider did not start: {s.get_providers()}")
    return s


def feeds(kind, batch, rng):
    if kind == "unet":
        return {
            "noisy": (rng.standard_normal((batch, 1, 128, 128)) * 80).astype(np.float32),
            "sigma": np.full((batch,), 80.0, np.float32),
            "difficulty": np.full((batch,), 0.7, np.float32),
        }
    return {
        "img0": rng.random((batch, 3, 128, 128), dtype=np.float32),
        "img1": rng.random((batch, 3, 128, 128), dtype=np.float32),
    }


def timed(s, feed, runs, bound):
    if bound:
        binding = s.io_binding()
        for name, value in feed.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
        for out in s.get_outputs():
            binding.bind_output(out.name, "cuda", 0)

        def run():
            s.run_with_iobinding(binding)
            binding.synchronize_outputs()
    else:
        def run():
            s.run(None, feed)
    for _ in range(3):
        run()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times), min(times)


def profiled(path, feed, out_dir, runs=5):
    s = session(path, "heuristic", out_dir)
    for _ in range(2 + runs):
        s.run(None, feed)
    file = s.end_profiling()
    events = json.load(open(file))
    by_op = collections.defaultdict(float)
    cpu_nodes = collections.Counter()
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        args = e.get("args", {})
        provider = args.get("provider", "?")
        by_op[(args.get("op_name", "?"), provider)] += e.get("dur", 0) / 1e3
        if provider != "CUDAExecutionProvider":
            cpu_nodes[args.get("op_name", "?")] += 1
    os.remove(file)
    total = sum(by_op.values())
    top = sorted(by_op.items(), key=lambda kv: -kv[1])[:10]
    # Every run of the profiled session counted (warm-ups too): per run.
    n = 2 + runs
    return {
        "kernel_ms_per_run": round(total / n, 3),
        "top": [{"op": op, "provider": p, "ms_per_run": round(ms / n, 3), "share": round(ms / total, 3)}
                for (op, p), ms in top],
        "non_cuda_nodes_per_run": {op: c // n for op, c in cpu_nodes.items()},
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("unet")
    p.add_argument("rife")
    p.add_argument("out")
    p.add_argument("--runs", type=int, default=20)
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    print(json.dumps({"onnxruntime": ort.__version__, "providers": ort.get_available_providers()}), flush=True)
    rng = np.random.default_rng(7)
    results = []
    plan = [("unet", a.unet, [1, 2, 8]), ("rife", a.rife, [1, 2, 7, 16, 28])]
    for kind, path, batches in plan:
        for variant in ["heuristic", "nhwc", "bound", "graph"]:
            try:
                s = session(path, variant)
            except Exception as e:  # noqa: BLE001 - the failure is the finding
                results.append({"model": kind, "variant": variant, "error": str(e)[:300]})
                print(json.dumps(results[-1]), flush=True)
                continue
            for batch in batches:
                # A CUDA graph is captured for one shape: a session per batch size.
                if variant == "graph" and batch != batches[0]:
                    s = session(path, variant)
                try:
                    median, best = timed(s, feeds(kind, batch, rng), a.runs, variant in ("bound", "graph"))
                    row = {"model": kind, "variant": variant, "batch": batch, "median_ms": round(median, 3),
                           "min_ms": round(best, 3), "ms_per_item": round(median / batch, 3)}
                except Exception as e:  # noqa: BLE001
                    row = {"model": kind, "variant": variant, "batch": batch, "error": str(e)[:300]}
                results.append(row)
                print(json.dumps(row), flush=True)
        for batch in batches:
            row = {"model": kind, "profile_batch": batch, **profiled(path, feeds(kind, batch, rng), a.out)}
            results.append(row)
            print(json.dumps(row), flush=True)
    json.dump(results, open(os.path.join(a.out, "profile.json"), "w"), indent=1)
    for leftover in glob.glob(os.path.join(a.out, "*.json.*")):
        os.remove(leftover)


if __name__ == "__main__":
    sys.exit(main())
