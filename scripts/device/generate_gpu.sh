#!/usr/bin/env bash
# Issue 15's GPU run: generation on MLX (cuda:0, mlx-cuda-13's libmlx) with the SmolLM2
# GGUF, against Hugging Face transformers' `generate` on the same file and GPU (the
# Python baseline), in one call. The files travel in three calls (at most 64 MiB each)
# and wait in ~/kiln-mlx between them; every call copies what .device/ holds there:
#
#   call 1, .device/: libmlx-part-aa, kiln-mlx.xz, cccl.tar.xz, cutlass.tar.xz, gguf-*.whl   STAGE=1 bash scripts/device/generate_gpu.sh
#   call 2, .device/: libmlx-part-ab, blas.tar.xz, smollm2.gguf.part-aa     STAGE=1 bash scripts/device/generate_gpu.sh
#   call 3, .device/: smollm2.gguf.part-ab, smollm2.gguf.part-ac           bash scripts/device/generate_gpu.sh
#
# (The GGUF file split -b 36000000 fits these calls beside the libmlx parts: three parts,
# call 2 takes part-aa with libmlx-part-ab and blas.tar.xz, call 3 the other two.)
#
# made here: the libmlx parts, cccl.tar.xz and blas.tar.xz as scripts/device/mlx_gpu.sh
# says; cutlass.tar.xz = the wheel's mlx/include/cute and mlx/include/cutlass (MLX's
# run-time compiler includes them for its quantized matmuls); kiln-mlx.xz = release kiln with --features mlx, stripped; the GGUF file (from
# `scripts/setup generate`) split -b 42000000 into smollm2.gguf.part-*; gguf-*.whl =
# `pip download gguf==0.19.0 --no-deps` (transformers reads GGUF files with it).
#
# WARMUP_ONLY=1 on call 3: only generate.warmup's effect (16 prompts at once, f16): off
# and on over an empty MLX kernel cache, then on and off over the filled one (~6 min).
#
# Measured: the example's answers at f32 and f16; `kiln bench` (1 stream, then 16 and 64
# streams, 128 new tokens each, each twice: the first pays MLX's kernel compilation) at
# f16 and f32, 64 streams with the matrices quantized and dense (QUICK=1: f16 only, no candle run; DTYPES=f16: answers at f16 only); a 16-prompt `kiln run` with the profile,
# for the share of wall time in the generator's steps; transformers at batch 1, 16, 64.
set -euo pipefail
stash="$HOME/kiln-mlx"
. scripts/device/stash.sh
. scripts/device/common.sh /tmp/kiln-gen
returned="$out"
if [ -n "${LEAN:-}" ]; then
    # LEAN=1, for a call with little device time left: no answers run, transformers
    # and then only the 64/16/1-stream benches below. Each bench's line is printed as it
    # comes: run the call without piping it through `tail`, so a call cut short at its
    # limit still shows them (the files under $OUT are archived only at exit). On a
    # fresh machine every process first waits for MLX's kernel compiler: give it
    # 600 s (2026-12-07: 420 s was not enough).
    DTYPES=none
else
    out="$work/out"
    mkdir -p "$out"
    trap 'tar -cJf "$returned/results.tar.xz" -C "$work" out' EXIT
fi
. scripts/device/mlx_common.sh
mkdir -p "$work/model"
gguf="$work/model/SmolLM2-135M-Instruct.Q4_1.gguf"
cat "$stash"/smollm2.gguf.part-* > "$gguf"
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $gguf" | sha256sum -c
"$kiln" providers | tee "$out/providers.txt"
on_gpu=(--set "model.path=\"$gguf\"" --set 'model.device="cuda:0"')
# 16 story prompts, one per line of $work/stories.jsonl.
stories() {
    python3 - "$work/stories.jsonl" <<'PY'
import json, sys
topics = ["a dragon", "the sea", "a robot", "a city at night", "a lost key", "winter", "a baker", "the moon",
          "a train", "a garden", "an old map", "a storm", "a violin", "a lighthouse", "a fox", "a desert"]
with open(sys.argv[1], "w") as f:
    for i, t in enumerate(topics):
        f.write(json.dumps({"id": i, "prompt": f"Write a long story about {t}."}) + "\n")
PY
}
if [ -n "${WARMUP_ONLY:-}" ]; then
    # generate.warmup on a fresh machine: each run gets an empty MLX kernel cache
    # (MLX_PTX_CACHE_DIR), so the first steps compile every kernel they use. Without the
    # warm-up that lands in the first requests' time to first token; with it, in the load.
    stories
    # Each cold run takes ~165 s on the H200 (MLX's compiler); two fit a call. Then both
    # again over the first run's now-filled cache, as a restarted server would find it.
    first="$work/ptx-first"
    for run in off:fresh on:fresh on:cached off:cached; do
        warm="${run%%:*}"
        case "$run" in
            off:fresh) cache="$first" ;;
            *:fresh) cache="$work/ptx-$RANDOM" ;;
            *) cache="$first" ;;
        esac
        started=$(date +%s.%N)
        MLX_PTX_CACHE_DIR="$cache" timeout 250 "$kiln" run examples/generate-mlx.toml --input "$work/stories.jsonl" \
            --output "$out/warmup_${run/:/_}.jsonl" "${on_gpu[@]}" --set 'model.dtype="f16"' \
            --set generate.max_new_tokens=64 --set batching.max_batch_size=16 \
            --set "generate.warmup=$([ "$warm" = on ] && echo true || echo false)" 2> "$out/warmup_${run/:/_}.log" || true
        ended=$(date +%s.%N)
        python3 - "$out/warmup_${run/:/_}.jsonl" "$run" "$started" "$ended" "$out/warmup_${run/:/_}.log" <<'PY' | tee -a "$out/warmup.txt"
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
ttft = sorted(r["ttft_ms"] for r in rows)
summary = open(sys.argv[5]).read().strip().splitlines()[-1]
print(f"warmup {sys.argv[2]}: process {float(sys.argv[4]) - float(sys.argv[3]):.1f} s; {len(rows)} prompts; "
      f"TTFT min {ttft[0]:.0f} ms, max {ttft[-1]:.0f} ms | {summary[summary.find('prompts in'):]}")
PY
    done
    nvidia-smi --query-gpu=name --format=csv,noheader | tee "$out/gpu.txt"
    exit 0
fi
for dtype in ${DTYPES:-f32 f16}; do
    [ "$dtype" = none ] && continue
    timeout 300 "$kiln" run examples/generate-mlx.toml --input examples/data/prompts.jsonl \
        --output "$out/answers_$dtype.jsonl" "${on_gpu[@]}" --set "model.dtype=\"$dtype\"" \
        --set generate.max_new_tokens=48 2>&1 | tail -n 2 | tee -a "$out/answers.txt" || true
done
# The baseline first, so a call cut short still has it: transformers' batched
# `generate` on the same file and GPU at batch 1, 16 and 64.
python3 -m pip install --no-deps --target "$work/py" "$stash"/gguf-*.whl -q 2>> "$out/hf.log" || true
PYTHONPATH="$work/py" timeout 300 python3 scripts/device/hf_generate.py "$gguf" cuda:0 float16 128 1 16 64 \
    > "$out/hf_f16.json" 2>> "$out/hf.log" || true
grep -E "transformers|Error|error" "$out/hf.log" | tail -n 8
bench() { # TAG DTYPE STREAMS [EXTRA..]
    local tag="$1" dtype="$2" streams="$3"
    shift 3
    timeout 300 "$kiln" bench examples/generate-mlx.toml "${on_gpu[@]}" --set "model.dtype=\"$dtype\"" \
        --requests "$streams" --concurrency "$streams" --set "batching.max_batch_size=$streams" \
        --set generate.max_new_tokens=128 --set generate.kv_cache_mb=4096 --json "$out/$tag.json" "$@" \
        2>> "$out/bench.log" | tee -a "$out/bench.txt" || true
}
# The first bench of a shape waits for MLX's run-time kernel compilation; the repeat
# (a new process) finds the compiled kernels in MLX's cache.
if [ -z "${LEAN:-}" ]; then
    bench mlx_f16_16 f16 16
    bench mlx_f16_16_again f16 16
    bench mlx_f16_64 f16 64
    bench mlx_f16_64_again f16 64
else
    bench mlx_f16_64 f16 64
fi
# Greedy tokens picked on the host from every row of logits (the path before
# `Generator::step_next`), against the device's argmax again, alternated.
bench mlx_f16_64_host f16 64 --set provider.options.greedy_on_device=false
bench mlx_f16_64_device f16 64
# The next decode step queued before the tokens are read, off (the default) against on.
bench mlx_f16_64_not_ahead f16 64
bench mlx_f16_64_ahead f16 64 --set provider.options.decode_ahead=true
# The file's blocks dequantized to f16 at load: cuBLAS's dense products against MLX's
# quantized matmul at 64 rows a step (candle's GPU decoder runs dense f16).
bench mlx_f16_64_dense f16 64 --set 'provider.options.gguf_matrices="dense"'
bench mlx_f16_64_quantized f16 64
bench mlx_f16_16_host f16 16 --set provider.options.greedy_on_device=false
bench mlx_f16_16_device f16 16
bench mlx_f16_1 f16 1
bench mlx_f16_1_again f16 1
if [ -n "${LEAN:-}" ]; then
    nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
    exit 0
fi
if [ -z "${QUICK:-}" ]; then
    bench mlx_f32_16 f32 16
fi
stories
timeout 300 "$kiln" run examples/generate-mlx.toml --input "$work/stories.jsonl" --output "$out/stories.jsonl" \
    "${on_gpu[@]}" --set 'model.dtype="f16"' --set generate.max_new_tokens=128 \
    --profile "$out/profile_f16_16.json" 2>&1 | tail -n 1 | tee -a "$out/bench.txt" || true
python3 - "$out/profile_f16_16.json" <<'PY' | tee -a "$out/bench.txt" || true
import json, sys
p = json.load(open(sys.argv[1]))
s = p["spans"]
step, sample = s["generate_step"], s["generate_sample"]
print(f"profile: {p['duration_s']:.2f} s; generate_step {step['count']} x, {step['total_ms'] / 1000:.2f} s "
      f"(p50 {step['p50_ms']:.2f} ms); generate_sample {sample['total_ms'] / 1000:.2f} s")
PY
[ -n "${QUICK:-}" ] || timeout 300 "$kiln" bench examples/generate.toml --set "model.path=\"$gguf\"" --requests 16 --concurrency 16 \
    --set generate.max_new_tokens=128 --json "$out/candle_cpu_16.json" 2>> "$out/bench.log" \
    | tee -a "$out/bench.txt" || true
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw --format=csv | tee "$out/gpu.txt"
