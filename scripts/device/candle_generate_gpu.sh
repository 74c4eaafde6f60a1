#!/usr/bin/env bash
# Issue 33: generation with candle on the GPU (cuda:0) against Hugging Face transformers'
# batched `generate` on the same GGUF file and GPU, in one call. What travels (made here,
# under .device/, at most 64 MiB a call; a warm machine keeps /tmp/keep between calls):
#
#   kiln-cuda.xz         release kiln built with --features kiln-cli/candle-cuda, stripped, xz
#   smollm2.gguf.part-*  the GGUF file of `scripts/setup generate`, split
#   gguf-*.whl           pip download gguf==0.19.0 --no-deps (transformers reads GGUF with it)
#
#   (split -b 30000000: parts aa-ad)
#   call 1: carry .device-c1 (kiln-cuda.xz, part-aa) and .device-c3 (part-ad, gguf-*.whl):
#           mkdir -p /tmp/keep && cp .device-c1/* .device-c3/* /tmp/keep/
#   call 2: carry .device-c2 (parts ab, ac): cp .device-c2/* /tmp/keep/ && bash scripts/device/candle_generate_gpu.sh
#
# Measured: the example prompts' answers at f16 and f32 on cuda:0 (and on the CPU, for
# the same greedy text); `kiln bench` with 1, 16 and 64 streams of 128 new tokens at f16;
# a 64-prompt `kiln run` with the profile (the generator's share of the wall time);
# transformers f16 at batch 1, 16 and 64 (scripts/device/hf_generate.py), then kiln's 64
# streams again, so the baseline sits between kiln's runs.
#
# STASH=DIR: the parts wait in DIR instead of /tmp/keep (after generate_gpu.sh on the same
# warm machine, STASH=$HOME/kiln-mlx finds the GGUF parts and the gguf wheel there, and
# only kiln-cuda.xz travels). LEAN=1, for a call with little device time: no answers, no
# candle-operations runs, no profile; 64 streams once to warm up, transformers, then the
# greedy host/device benches alternated at 64 and 16 streams and one stream.
set -euo pipefail
stash="${STASH:-/tmp/keep}"
. scripts/device/stash.sh
mkdir -p .device && cp "$stash/kiln-cuda.xz" .device/ 2>/dev/null || true
. scripts/device/common.sh /tmp/kiln-cgen kiln-cuda
kiln="$work/kiln-cuda"
mkdir -p "$work/model"
gguf="$work/model/SmolLM2-135M-Instruct.Q4_1.gguf"
cat "$stash"/smollm2.gguf.part-* > "$gguf"
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $gguf" | sha256sum -c
"$kiln" providers | tee "$out/providers.txt"
gpu=(--set "model.path=\"$gguf\"")
bench() { # TAG STREAMS [--set ...]
    local tag="$1" streams="$2"
    shift 2
    timeout 300 "$kiln" bench examples/generate-cuda.toml "${gpu[@]}" "$@" --requests "$streams" --concurrency "$streams" \
        --set "batching.max_batch_size=$streams" --set generate.max_new_tokens=128 --json "$out/$tag.json" \
        2>> "$out/bench.log" | tee -a "$out/bench.txt" || true
}
transformers() {
    python3 -m pip install --no-deps --target "$work/py" "$stash"/gguf-*.whl -q 2>> "$out/hf.log" || true
    PYTHONPATH="$work/py" timeout 400 python3 scripts/device/hf_generate.py "$gguf" cuda:0 float16 128 1 16 64 \
        > "$out/hf_f16.json" 2>> "$out/hf.log" || true
    grep -E "transformers|Error|error" "$out/hf.log" | tail -n 8
}
# Greedy tokens picked on the host from every row of logits (before `step_next`),
# against the device's pick, alternated.
greedy_ab() {
    bench candle_f16_64_host 64 --set provider.options.greedy_on_device=false
    bench candle_f16_64_device 64
    bench candle_f16_16_host 16 --set provider.options.greedy_on_device=false
    bench candle_f16_16_device 16
}
if [ -n "${LEAN:-}" ]; then
    bench candle_f16_64 64
    transformers
    greedy_ab
    bench candle_f16_1 1
    nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv | tee "$out/gpu.txt"
    exit 0
fi
for dtype in f16 f32; do
    timeout 300 "$kiln" run examples/generate-cuda.toml --input examples/data/prompts.jsonl \
        --output "$out/answers_cuda_$dtype.jsonl" "${gpu[@]}" --set "model.dtype=\"$dtype\"" \
        --set generate.max_new_tokens=48 --set generate.temperature=0.0 2>&1 | tail -n 2 | tee -a "$out/answers.txt" || true
done
timeout 300 "$kiln" run examples/generate.toml --input examples/data/prompts.jsonl --output "$out/answers_cpu.jsonl" \
    --set "model.path=\"$gguf\"" --set generate.max_new_tokens=48 2>&1 | tail -n 1 | tee -a "$out/answers.txt" || true
python3 - "$out" <<'PY' | tee -a "$out/answers.txt"
import json, sys
rows = {k: {r["id"]: r for r in map(json.loads, open(f"{sys.argv[1]}/answers_{k}.jsonl"))} for k in ("cuda_f16", "cuda_f32", "cpu")}
for key in rows["cpu"]:
    cpu = rows["cpu"][key]["token_ids"]
    for k in ("cuda_f32", "cuda_f16"):
        got = rows[k].get(key, {}).get("token_ids", [])
        same = next((i for i, (a, b) in enumerate(zip(cpu, got)) if a != b), min(len(cpu), len(got)))
        print(f"{key} {k}: first {same} of {len(cpu)} greedy tokens as on the CPU; {rows[k].get(key, {}).get('text', '')[:60]!r}")
PY
bench candle_f16_1 1
bench candle_f16_16 16
bench candle_f16_64 64
# The same step from candle's own operations (about 24 launches a layer, not 8).
bench candle_ops_f16_1 1 --set provider.options.cuda_kernels=false
bench candle_ops_f16_64 64 --set provider.options.cuda_kernels=false
# The CPU's default chunk of prompt tokens a step (the example reads 2048).
bench candle_f16_64_chunk128 64 --set generate.prefill_chunk=128
python3 - "$work/stories.jsonl" <<'PY'
import json, sys
topics = ["a dragon", "the sea", "a robot", "a city at night", "a lost key", "winter", "a baker", "the moon",
          "a train", "a garden", "an old map", "a storm", "a violin", "a lighthouse", "a fox", "a desert"]
with open(sys.argv[1], "w") as f:
    for i in range(64):
        f.write(json.dumps({"id": i, "prompt": f"Write a long story about {topics[i % 16]}."}) + "\n")
PY
timeout 300 "$kiln" run examples/generate-cuda.toml --input "$work/stories.jsonl" --output "$out/stories.jsonl" \
    "${gpu[@]}" --set generate.max_new_tokens=128 --profile "$out/profile_f16_64.json" 2>&1 | tail -n 1 | tee -a "$out/bench.txt" || true
python3 - "$out/profile_f16_64.json" <<'PY' | tee -a "$out/bench.txt" || true
import json, sys
p = json.load(open(sys.argv[1]))
s = p["spans"]
step, sample = s["generate_step"], s["generate_sample"]
print(f"profile: {p['duration_s']:.2f} s; generate_step {step['count']} x, {step['total_ms'] / 1000:.2f} s "
      f"(p50 {step['p50_ms']:.2f} ms); generate_sample {sample['total_ms'] / 1000:.2f} s")
PY
transformers
bench candle_f16_64_again 64
bench candle_f16_1_again 1
greedy_ab
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv | tee "$out/gpu.txt"
