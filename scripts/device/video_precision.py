"""How far the video models' outputs on ONNX Runtime's CUDA provider are from the CPU's
f32, by batch size and TF32 setting (issue 33: kiln's frames in batches of 8 differ from
the reference's, run one frame at a time, by up to 9.5e-4 mean abs; which side is nearer
f32?).

    video_precision.py UNET.onnx RIFE.onnx

For the UNet (8 noisy inputs) and RIFE (16 pairs of frames), the CPU provider's outputs
are the baseline; then the CUDA provider with cuDNN's heuristic search, TF32 on and off,
runs them one at a time and all in one batch. Prints one JSON line per case: the mean
and largest absolute difference to the CPU's outputs.
"""
import json
import sys

import numpy as np
import onnxruntime as ort


def session(path, provider):
    if provider == "cpu":
        return ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    tf32 = provider.endswith("tf32")
    options = {"device_id": 0, "cudnn_conv_algo_search": "HEURISTIC", "use_tf32": "1" if tf32 else "0"}
    s = ort.InferenceSession(path, providers=[("CUDAExecutionProvider", options)])
    if s.get_providers()[0] != "CUDAExecutionProvider":
        raise SystemExit(f"the CUDA provider did not start: {s.get_providers()}")
    return s


def run(s, feeds, batched):
    if batched:
        return s.run(None, feeds)[0]
    n = next(iter(feeds.values())).shape[0]
    return np.concatenate([s.run(None, {k: v[i : i + 1] for k, v in feeds.items()})[0] for i in range(n)])


def main():
    unet, rife = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(7)
    cases = {
        "unet": (
            unet,
            {
                "noisy": (rng.standard_normal((8, 1, 128, 128)) * 80).astype(np.float32),
                "sigma": np.full((8,), 80.0, np.float32),
                "difficulty": np.linspace(0.5, 0.9, 8).astype(np.float32),
            },
        ),
        "rife": (
            rife,
            {
                "img0": rng.random((16, 3, 128, 128), dtype=np.float32),
                "img1": rng.random((16, 3, 128, 128), dtype=np.float32),
            },
        ),
    }
    for name, (path, feeds) in cases.items():
        base = run(session(path, "cpu"), feeds, batched=False)
        outs = {}
        for provider in ["cuda", "cuda-tf32"]:
            s = session(path, provider)
            for batched in [False, True]:
                out = run(s, feeds, batched)
                key = f"{provider}, {'batched' if batched else 'one at a time'}"
                outs[key] = out
                d = np.abs(out - base)
                print(json.dumps({"model": name, "case": key, "vs_cpu_mean": float(d.mean()), "vs_cpu_max": float(d.max())}), flush=True)
        for a, b in [("cuda-tf32, one at a time", "cuda-tf32, batched"), ("cuda-tf32, one at a time", "cuda, batched"), ("cuda, one at a time", "cuda, batched")]:
            d = np.abs(outs[a] - outs[b])
            print(json.dumps({"model": name, "case": f"{a} vs {b}", "mean": float(d.mean()), "max": float(d.max())}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
