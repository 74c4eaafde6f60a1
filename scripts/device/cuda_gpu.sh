#!/usr/bin/env bash
# candle on CUDA on the GPU machine (device). Carried in .device/: kiln-cuda.xz (release
# kiln built with --features candle-cuda, stripped, xz), gpu_admission.xz (the example of
# that name, same build) and minilm-f16/ (scripts/device/make_small_model.py MINILM_DIR
# OUT 6: all-MiniLM-L6-v2 with float16 weights). libcuda comes from the machine's
# driver; cuBLAS, cuRAND, NVRTC and the runtime from its torch's nvidia/cu13/lib.
#
#   bash scripts/device/cuda_gpu.sh        # figures under $OUT
#
# 1. `kiln devices --json`, `kiln providers` (candle must list cuda);
# 2. the fixture texts on cuda:0 at f32 / f16 / bf16 -> cosines against cpu f32;
# 3. `kiln bench` at batch 256 on 8192 distinct 128-token texts, f16 on cuda:0, with
#    the profiler, next to sentence-transformers (PyTorch eager, model.half()) on the
#    same texts, folder and GPU;
# 4. 256 concurrent single-text callers, dynamic batching on vs off (`--compare`);
# 5. examples/gpu_admission: a 100 GiB model refused on cuda:0, serving goes on.
set -euo pipefail
out="${OUT:-/tmp/kiln-out}"
mkdir -p "$out"
work=/tmp/kiln-cuda-work
mkdir -p "$work"
model=.device/minilm-f16
for bin in kiln-cuda gpu_admission; do
    xz -dc ".device/$bin.xz" > "$work/$bin" && chmod +x "$work/$bin"
done
site="$(python3 -c 'import torch, pathlib; print(pathlib.Path(torch.__file__).parent.parent)')"
export LD_LIBRARY_PATH="$site/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
python3 -c 'import torch, sentence_transformers as st; print("torch", torch.__version__, "sentence-transformers", st.__version__, torch.cuda.get_device_name(0))'

"$work/kiln-cuda" devices --json > "$out/devices.json"
"$work/kiln-cuda" devices
"$work/kiln-cuda" providers | tee "$out/providers.txt"

python3 - "$work" <<'PY'
import json, random, sys
work = sys.argv[1]
texts = json.load(open("tests/fixtures/minilm_reference.json"))["texts"]
open(f"{work}/fixture.txt", "w").write("\n".join(t.replace("\n", " ") for t in texts) + "\n")
words = ("model inference batch latency throughput memory cache token vector embedding query document search "
         "rank score server request queue worker thread device tensor layer attention").split()
rng = random.Random(11)
open(f"{work}/long.txt", "w").write("\n".join(" ".join(rng.choice(words) for _ in range(150)) for _ in range(8192)) + "\n")
PY

run() { # TAG DEVICE DTYPE
    "$work/kiln-cuda" run examples/embed.toml --input "$work/fixture.txt" --output "$work/$1.jsonl" \
        --set "model.path=\"$model\"" --set "model.device=\"$2\"" --set "model.dtype=\"$3\""
}
run cpu_f32 cpu f32
run cuda_f32 cuda:0 f32
run cuda_f16 cuda:0 f16
run cuda_bf16 cuda:0 bf16
run auto_f32 auto f32
python3 - "$work" <<'PY' | tee "$out/cosines.txt"
import json, sys
import numpy as np
work = sys.argv[1]
load = lambda tag: np.array([json.loads(l)["embedding"] for l in open(f"{work}/{tag}.jsonl")])
base = load("cpu_f32")
for tag in ["cuda_f32", "cuda_f16", "cuda_bf16", "auto_f32"]:
    other = load(tag)
    cos = (base * other).sum(1) / np.linalg.norm(base, axis=1) / np.linalg.norm(other, axis=1)
    print(f"candle {tag} vs cpu_f32: min cosine {cos.min():.6f}, mean {cos.mean():.6f} over {len(cos)} texts")
PY

common=(--set "model.path=\"$model\"" --set 'model.device="cuda:0"' --set 'model.dtype="f16"'
        --set batching.max_batch_size=256 --set batching.max_wait_ms=5 --set batching.queue_capacity=4096
        --set text.max_length=128 --set cache.enabled=false)
"$work/kiln-cuda" bench examples/embed.toml --texts "$work/long.txt" --requests 8192 --concurrency 1024 \
    "${common[@]}" --json "$out/bench_candle_f16_b256.json" --profile "$out/profile_candle_f16.json"
"$work/kiln-cuda" bench examples/embed.toml --texts "$work/long.txt" --requests 16384 --concurrency 1024 \
    "${common[@]}" --json "$out/bench_candle_f16_b256_long.json"
"$work/kiln-cuda" bench examples/embed.toml --requests 4096 --concurrency 256 --words 4-64 \
    "${common[@]}" --compare batching.enabled=false --json "$out/bench_candle_batching_256_callers.json"

python3 - "$work" "$out" "$model" <<'PY'
import json, sys, time
import torch
from sentence_transformers import SentenceTransformer
work, out, model_dir = sys.argv[1:]
texts = [l.rstrip("\n") for l in open(f"{work}/long.txt")]
model = SentenceTransformer(model_dir, device="cuda").half()
model.max_seq_length = 128
model.encode(texts[:512], batch_size=256)
runs = []
for _ in range(3):
    torch.cuda.synchronize(); t0 = time.perf_counter()
    model.encode(texts, batch_size=256, convert_to_numpy=True)
    torch.cuda.synchronize(); runs.append(time.perf_counter() - t0)
best = min(runs)
st = len(texts) / best
print(f"sentence-transformers f16: {len(texts)} texts, best of 3 {best:.3f} s: {st:.1f} texts/s ({[round(r, 3) for r in runs]})")
for name in ["bench_candle_f16_b256", "bench_candle_f16_b256_long"]:
    k = json.load(open(f"{out}/{name}.json"))
    print(f"kiln candle f16 ({name}): {k['throughput_rps']:.1f} texts/s, mean batch {k['mean_batch_size']:.1f}, "
          f"errors {k['errors']}; ratio to sentence-transformers {k['throughput_rps'] / st:.3f}")
json.dump({"st_texts_per_s": st, "st_runs_s": runs}, open(f"{out}/eager.json", "w"))
PY

"$work/gpu_admission" "$model" cuda:0 | tee "$out/admission.txt"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
