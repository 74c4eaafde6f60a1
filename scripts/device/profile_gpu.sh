#!/usr/bin/env bash
# Runs on the device machine (see docs/benchmarks.md): checks that the profiler's
# sampler reads real NVIDIA GPUs through NVML and that the tracker files open in the
# machine's own TensorBoard. kiln runs on the CPU here (candle CUDA is issue 7); a torch
# matrix-product loop keeps the GPU busy meanwhile so utilisation, memory and power move.
#
# Prepared here:  cargo build --release -p kiln-cli && strip -o .device/kiln target/release/kiln
#                 .kiln/readers/bin/python scripts/device/make_small_model.py .kiln/models/all-MiniLM-L6-v2 .device/small-minilm 2
# Run there with: carry [".device"], command "bash scripts/device/profile_gpu.sh"
set -euo pipefail
out="${OUT:-/tmp/out}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,utilization.gpu,temperature.gpu,power.draw \
    --format=csv | tee "$out/nvidia-smi-before.csv"
cat > "$out/gpu.toml" <<TOML
[model]
path = "$PWD/.device/small-minilm"
[profiler]
sample_interval_ms = 100
[tracking]
interval_ms = 500
dir = "$out/runs"
run_name = "gpu-host"
[[trackers]]
kind = "jsonl"
[[trackers]]
kind = "tensorboard"
TOML
python3 - <<'PY' &
import time, torch
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
b = torch.randn_like(a)
end = time.time() + 14
while time.time() < end:
    for _ in range(20):
        a @ b
    torch.cuda.synchronize()
PY
load=$!
sleep 4 # torch start-up; then the bench runs while the GPU is busy
.device/kiln bench "$out/gpu.toml" --requests 3000 --concurrency 32 --words 4-32 \
    --profile "$out/profile.json" --trace "$out/trace.json" 2>&1 | tail -4
wait "$load"
python3 tests/readers/read_tensorboard.py "$out/runs/tensorboard/gpu-host" > "$out/tensorboard.json"
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
p = json.load(open(f"{out}/profile.json"))
print("samples", p["samples"], "peak_rss_mib", round(p["peak_rss_bytes"] / 2**20, 1),
      "mean_cpu", round(p["mean_cpu_percent"] or 0, 1), "peak_gpu_memory_mib", round((p["peak_gpu_memory_bytes"] or 0) / 2**20))
for g in p["gpus"]:
    print("gpu", g)
t = json.load(open(f"{out}/trace.json"))["traceEvents"]
print("trace gpu counters:", sum(1 for e in t if e.get("ph") == "C" and e["name"].startswith("gpu")))
tb = json.load(open(f"{out}/tensorboard.json"))
print("tensorboard (device's own) scalar tags:", len(tb["scalars"]), "steps of throughput_rps:", len(tb["scalars"]["throughput_rps"]))
PY
