"""The video pipeline of `task = "video"` in plain Python, the way seed 000's loop runs
it: ONNX Runtime sessions as they come (all cores), one frame at a time — keyframes
from the terrain consistency UNet along a path in noise space, colour-mapped, then RIFE
midpoints recursively between neighbours. kiln's frames must equal these (its tests),
and kiln must be faster (`kiln bench examples/video.toml --reference PYTHON`,
docs/benchmarks.md).

    video_reference.py UNET.onnx RIFE.onnx OUT.npy [--seed 7] [--keyframes 8]
        [--anchors 3] [--difficulty 0.5 0.9] [--sigmas 80] [--interpolation 8] [--rounds 1]
        [--device cpu | cuda:N] [--tf32 0|1]

`--device cuda:N` runs both sessions on ONNX Runtime's CUDA execution provider (PyPI's
onnxruntime-gpu), as kiln does for a config with `model.device = "cuda:N"`; a runtime
without it, or a provider that fails to start, is an error rather than a CPU run.
`--tf32 0|1` sets the CUDA provider's `use_tf32` (unset: ONNX Runtime's default, TF32 on),
as kiln's `provider.options.tf32` does; `kiln bench` passes the config's.

Renders `--rounds` times in one process (the first round pays ONNX Runtime's first-run
costs), writes the frames as float32 `[frames, 3, 128, 128]` RGB in [0, 1] (OUT.npy) and
prints `{"frames", "rounds": [{"seconds", "keyframe_seconds"}, ...]}` as JSON.

The noise is kiln's own generator (SplitMix64, Box-Muller in f64), so both sides draw
the same numbers: anchor `a` of step `k` is the stream seeded `seed + 1000 k + a`.
"""
import argparse
import json
import sys
import time

import numpy as np
import onnxruntime as ort

SIZE = 128
MASK = (1 << 64) - 1

# Height in [-1, 1] → RGB, placed where this model's heights fall (mostly -0.9..0.1):
# deep water, water, shallows, sand, grass, forest, rock, snow.
STOPS = [
    (-1.0, (0.04, 0.08, 0.30)),
    (-0.45, (0.10, 0.30, 0.62)),
    (-0.22, (0.30, 0.55, 0.80)),
    (-0.18, (0.86, 0.80, 0.56)),
    (-0.12, (0.30, 0.58, 0.24)),
    (0.0, (0.20, 0.42, 0.16)),
    (0.08, (0.50, 0.40, 0.30)),
    (0.2, (0.95, 0.95, 0.95)),
    (1.0, (1.00, 1.00, 1.00)),
]


def splitmix64(seed: int, n: int) -> np.ndarray:
    """n outputs of SplitMix64 from `seed` (uint64)."""
    state = (seed + 0x9E3779B97F4A7C15 * np.arange(1, n + 1, dtype=np.uint64)) & MASK
    with np.errstate(over="ignore"):
        z = state.astype(np.uint64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return z


def normal(seed: int, n: int) -> np.ndarray:
    """n standard normal samples (f64): Box-Muller over pairs of SplitMix64 uniforms."""
    pairs = (n + 1) // 2
    bits = splitmix64(seed, 2 * pairs)
    u = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / (1 << 53))
    u1, u2 = u[0::2], u[1::2]
    r = np.sqrt(-2.0 * np.log(u1))
    z = np.empty(2 * pairs)
    z[0::2] = r * np.cos(2.0 * np.pi * u2)
    z[1::2] = r * np.sin(2.0 * np.pi * u2)
    return z[:n]


def slerp(a: np.ndarray, b: np.ndarray, u: float) -> np.ndarray:
    cos = float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))
    theta = np.arccos(min(1.0, max(-1.0, cos)))
    if theta < 1e-6:
        return (1.0 - u) * a + u * b
    return (np.sin((1.0 - u) * theta) * a + np.sin(u * theta) * b) / np.sin(theta)


def path_noise(seed: int, step: int, anchors: int, t: float) -> np.ndarray:
    """The noise at t in [0, 1] along the slerp path through the step's anchors."""
    position = t * (anchors - 1)
    segment = min(int(np.floor(position)), anchors - 2)
    u = position - segment
    a = normal(seed + 1000 * step + segment, SIZE * SIZE)
    b = normal(seed + 1000 * step + segment + 1, SIZE * SIZE)
    return slerp(a, b, u).astype(np.float32).reshape(1, 1, SIZE, SIZE)


def colormap(height: np.ndarray) -> np.ndarray:
    """[128, 128] heights → [3, 128, 128] RGB, piecewise linear between the stops."""
    h = np.clip(height.astype(np.float32), -1.0, 1.0)
    xs = np.array([s[0] for s in STOPS], dtype=np.float32)
    # np.interp works in f64; kiln does the same, then rounds to f32.
    return np.stack([np.interp(h, xs, np.array([s[1][c] for s in STOPS], dtype=np.float32)) for c in range(3)]).astype(
        np.float32
    )


def main():
    p = argparse.ArgumentParser()
    p.add_argument("unet")
    p.add_argument("rife")
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--keyframes", type=int, default=8)
    p.add_argument("--anchors", type=int, default=3)
    p.add_argument("--difficulty", type=float, nargs=2, default=[0.5, 0.9])
    p.add_argument("--sigmas", type=float, nargs="+", default=[80.0])
    p.add_argument("--interpolation", type=int, default=8)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda:N")
    p.add_argument("--tf32", choices=["0", "1"], help="the CUDA provider's use_tf32 (unset: its default)")
    a = p.parse_args()
    levels = int(np.log2(a.interpolation))
    if 1 << levels != a.interpolation:
        raise SystemExit("--interpolation must be a power of two")

    unet, rife = (session(path, a.device, a.tf32) for path in (a.unet, a.rife))
    rounds = []
    for _ in range(a.rounds):
        started = time.perf_counter()
        frames = render(unet, rife, a, levels)
        keyframe_seconds, seconds = frames.pop(), time.perf_counter() - started
        rounds.append({"seconds": seconds, "keyframe_seconds": keyframe_seconds})
    np.save(a.out, np.stack(frames).astype(np.float32))
    print(json.dumps({"frames": len(frames), "rounds": rounds}))


def session(path, device, tf32=None):
    """An ONNX Runtime session on `device` (cpu or cuda:N), never silently on another."""
    if device == "cpu":
        return ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    kind, _, index = device.partition(":")
    if kind != "cuda" or not (index or "0").isdigit():
        raise SystemExit(f"--device {device!r}: cpu or cuda:N")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise SystemExit(f"--device {device}: this onnxruntime ({ort.__version__}, {ort.__file__}) has no CUDA "
                         "execution provider; install onnxruntime-gpu")
    options = {"device_id": int(index or 0)}
    if tf32 is not None:
        options["use_tf32"] = tf32
    s = ort.InferenceSession(path, providers=[("CUDAExecutionProvider", options)])
    # ONNX Runtime falls back to the CPU when the CUDA provider fails to start (a missing library).
    if s.get_providers()[0] != "CUDAExecutionProvider":
        raise SystemExit(f"--device {device}: the CUDA execution provider did not start ({s.get_providers()})")
    return s


def render(unet, rife, a, levels):
    """The frames, then (last) the seconds the keyframes took."""
    started = time.perf_counter()
    frames = []
    for i in range(a.keyframes):
        t = i / (a.keyframes - 1) if a.keyframes > 1 else 0.0
        difficulty = np.array([a.difficulty[0] + (a.difficulty[1] - a.difficulty[0]) * t], dtype=np.float32)
        denoised = None
        for k, sigma in enumerate(a.sigmas):
            noise = path_noise(a.seed, k, a.anchors, t)
            x = noise * np.float32(sigma) if denoised is None else denoised + np.float32(sigma) * noise
            feed = {"noisy": x, "sigma": np.array([sigma], dtype=np.float32), "difficulty": difficulty}
            denoised = unet.run(None, feed)[0]
        frames.append(colormap(denoised[0, 0]))
    keyframe_seconds = time.perf_counter() - started
    for _ in range(levels):
        out = []
        for left, right in zip(frames, frames[1:]):
            mid = rife.run(None, {"img0": left[None], "img1": right[None]})[0][0]
            out += [left, mid]
        frames = out + [frames[-1]]
    return frames + [keyframe_seconds]


if __name__ == "__main__":
    sys.exit(main())
