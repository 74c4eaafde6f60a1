#!/usr/bin/env bash
# The tch provider on the GPU machine (device), with that machine's own torch 2.11 as
# libtorch. Carried in .device/: kiln-tch.xz (release kiln built with --features tch,
# stripped, xz) and minilm-f16/ (scripts/device/make_small_model.py MINILM_DIR OUT 6:
# all-MiniLM-L6-v2 with float16 weights; 87 MiB of f32 weights do not fit the carry).
#
#   bash scripts/device/tch_gpu.sh        # figures under $OUT
#
# 1. traces the carried MiniLM there with scripts/trace_bert_torchscript.py;
# 2. `kiln providers` (tch must list cuda);
# 3. the fixture texts at cpu f32, cuda:0 f32 / f16 / bf16 -> cosines against cpu f32;
# 4. `kiln bench` at batch 256 on 8192 distinct 128-token texts, f16 on cuda:0, next to
#    sentence-transformers (PyTorch eager, model.half()) on the same texts and GPU.
set -euo pipefail
out="${OUT:-/tmp/kiln-out}"
mkdir -p "$out"
work=/tmp/kiln-tch-work
mkdir -p "$work"
xz -dc .device/kiln-tch.xz > "$work/kiln" && chmod +x "$work/kiln"
site="$(python3 -c 'import torch, pathlib; print(pathlib.Path(torch.__file__).parent.parent)')"
export LD_LIBRARY_PATH="$site/torch/lib:$site/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0))'
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader

python3 scripts/trace_bert_torchscript.py .device/minilm-f16 "$work/minilm-tch"
"$work/kiln" providers | tee "$out/providers.txt"

python3 - "$work" <<'PY'
import json, random, sys
work = sys.argv[1]
texts = json.load(open("tests/fixtures/minilm_reference.json"))["texts"]
open(f"{work}/fixture.txt", "w").write("\n".join(t.replace("\n", " ") for t in texts) + "\n")
words = ("model inference batch latency throughput memory cache token vector embedding query document search "
         "rank score server request queue worker thread device tensor layer attention").split()
rng = random.Random(11)
# 150 words: more than 128 word pieces, so every text is truncated to exactly 128.
open(f"{work}/long.txt", "w").write("\n".join(" ".join(rng.choice(words) for _ in range(150)) for _ in range(8192)) + "\n")
PY

run() { # TAG DEVICE DTYPE
    "$work/kiln" run examples/embed-tch.toml --input "$work/fixture.txt" --output "$work/$1.jsonl" \
        --set "model.path=\"$work/minilm-tch\"" --set "model.device=\"$2\"" --set "model.dtype=\"$3\""
}
run cpu_f32 cpu f32
run cuda_f32 cuda:0 f32
run cuda_f16 cuda:0 f16
run cuda_bf16 cuda:0 bf16
python3 - "$work" <<'PY' | tee "$out/cosines.txt"
import json, sys
import numpy as np
work = sys.argv[1]
load = lambda tag: np.array([json.loads(l)["embedding"] for l in open(f"{work}/{tag}.jsonl")])
base = load("cpu_f32")
for tag in ["cuda_f32", "cuda_f16", "cuda_bf16"]:
    other = load(tag)
    cos = (base * other).sum(1) / np.linalg.norm(base, axis=1) / np.linalg.norm(other, axis=1)
    print(f"{tag} vs cpu_f32: min cosine {cos.min():.6f}, mean {cos.mean():.6f} over {len(cos)} texts")
PY

bench() { # JSON EXTRA_SETS...
    local json="$1"; shift
    "$work/kiln" bench examples/embed-tch.toml --texts "$work/long.txt" --requests 8192 --concurrency 1024 \
        --set "model.path=\"$work/minilm-tch\"" --set 'model.device="cuda:0"' --set 'model.dtype="f16"' \
        --set batching.max_batch_size=256 --set batching.max_wait_ms=5 --set batching.queue_capacity=4096 \
        --set text.max_length=128 --set cache.enabled=false --json "$out/$json" "$@"
}
bench bench_tch_f16_b256.json
bench bench_tch_f16_b256_profiled.json --profile "$out/profile_tch_f16.json"

python3 - "$work" "$out" <<'PY'
"""PyTorch eager f16 on the same texts and GPU: sentence-transformers encode (tokenise,
forward, pool, normalise), batch 256, max_seq_length 128, after a warm-up."""
import json, sys, time
import torch
from sentence_transformers import SentenceTransformer
work, out = sys.argv[1:]
texts = [l.rstrip("\n") for l in open(f"{work}/long.txt")]
model = SentenceTransformer(".device/minilm-f16", device="cuda").half()
model.max_seq_length = 128
model.encode(texts[:512], batch_size=256)
runs = []
for _ in range(3):
    torch.cuda.synchronize(); t0 = time.perf_counter()
    model.encode(texts, batch_size=256, convert_to_numpy=True)
    torch.cuda.synchronize(); runs.append(time.perf_counter() - t0)
best = min(runs)
print(f"sentence-transformers f16: {len(texts)} texts, best of 3 {best:.3f} s: {len(texts)/best:.1f} texts/s ({[round(r,3) for r in runs]})")
kiln = json.load(open(f"{out}/bench_tch_f16_b256.json"))
print(f"kiln tch f16: {kiln['throughput_rps']:.1f} texts/s, mean batch {kiln['mean_batch_size']:.1f}, errors {kiln['errors']}")
print(f"ratio kiln / sentence-transformers: {kiln['throughput_rps'] / (len(texts)/best):.3f}")
json.dump({"st_texts_per_s": len(texts)/best, "st_runs_s": runs, "kiln_texts_per_s": kiln["throughput_rps"]}, open(f"{out}/eager.json", "w"))
PY
