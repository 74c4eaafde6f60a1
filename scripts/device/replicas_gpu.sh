#!/usr/bin/env bash
# Replicas and longer runs on the GPU machine (device). Carried in .device/:
# kiln-cuda.xz, kiln-tch.xz and minilm-f16/ (see cuda_gpu.sh and tch_gpu.sh).
#
#   bash scripts/device/replicas_gpu.sh        # figures under $OUT
#
# 1. candle f16 on cuda:0: two replicas on the one GPU (model.gpu_ids = [0, 0]) against
#    one (`--compare model.gpu_ids=[]`), 16384 128-token texts at batch 256;
# 2. tch f16 on cuda:0: 32768 texts, one replica and two;
# 3. sentence-transformers f16 on the same texts, for the ratios.
set -euo pipefail
out="${OUT:-/tmp/kiln-out}"
mkdir -p "$out"
work=/tmp/kiln-replicas-work
mkdir -p "$work"
model=.device/minilm-f16
for bin in kiln-cuda kiln-tch; do
    xz -dc ".device/$bin.xz" > "$work/$bin" && chmod +x "$work/$bin"
done
site="$(python3 -c 'import torch, pathlib; print(pathlib.Path(torch.__file__).parent.parent)')"
export LD_LIBRARY_PATH="$site/torch/lib:$site/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
python3 scripts/trace_bert_torchscript.py "$model" "$work/minilm-tch"
python3 - "$work" <<'PY'
import random, sys
words = ("model inference batch latency throughput memory cache token vector embedding query document search "
         "rank score server request queue worker thread device tensor layer attention").split()
rng = random.Random(11)
open(f"{sys.argv[1]}/long.txt", "w").write("\n".join(" ".join(rng.choice(words) for _ in range(150)) for _ in range(32768)) + "\n")
PY
common=(--set 'model.device="cuda:0"' --set 'model.dtype="f16"' --set batching.max_batch_size=256
        --set batching.max_wait_ms=5 --set batching.queue_capacity=8192 --set text.max_length=128
        --set cache.enabled=false --texts "$work/long.txt" --concurrency 1024)
"$work/kiln-cuda" bench examples/embed.toml --requests 16384 "${common[@]}" --set "model.path=\"$model\"" \
    --set 'model.gpu_ids=[0, 0]' --compare 'model.gpu_ids=[]' --json "$out/candle_replicas.json"
"$work/kiln-tch" bench examples/embed-tch.toml --requests 32768 "${common[@]}" \
    --set "model.path=\"$work/minilm-tch\"" --json "$out/tch_long.json"
"$work/kiln-tch" bench examples/embed-tch.toml --requests 32768 "${common[@]}" \
    --set "model.path=\"$work/minilm-tch\"" --set 'model.gpu_ids=[0, 0]' --json "$out/tch_long_2replicas.json"
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
for _ in range(2):
    torch.cuda.synchronize(); t0 = time.perf_counter()
    model.encode(texts, batch_size=256, convert_to_numpy=True)
    torch.cuda.synchronize(); runs.append(time.perf_counter() - t0)
st = len(texts) / min(runs)
print(f"sentence-transformers f16: {len(texts)} texts, best of 2: {st:.1f} texts/s ({[round(r, 3) for r in runs]})")
for name in ["candle_replicas", "tch_long", "tch_long_2replicas"]:
    k = json.load(open(f"{out}/{name}.json"))
    line = f"{name}: {k['throughput_rps']:.1f} texts/s (ratio to sentence-transformers {k['throughput_rps'] / st:.3f})"
    if "baseline" in k:
        line += f"; one replica {k['baseline']['throughput_rps']:.1f} texts/s, two/one {k['throughput_ratio']:.3f}"
    line += "; replicas " + ", ".join(f"{r['device']} {r['rows']}" for r in k["replicas"])
    print(line)
json.dump({"st_texts_per_s": st, "st_runs_s": runs}, open(f"{out}/eager_32768.json", "w"))
PY
