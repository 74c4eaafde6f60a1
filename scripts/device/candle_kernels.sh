#!/usr/bin/env bash
# candle on CUDA with kiln's kernels (providers/candle/kernels/bert.cu), in one call.
# Carried in .device/: kiln-cuda.xz (release kiln, --features candle-cuda), minilm-f16/.
#
#   bash scripts/device/candle_kernels.sh      # figures on stdout, files under $OUT
#
# 1. agreement: the fixture texts on cuda:0 at f32 / f16 / bf16 against cpu f32;
# 2. every kernel of one batch of 256 texts of 128 tokens, timed by Nsight Compute
#    (`ncu`, the kernel's duration only; clocks left as they are);
# 3. `kiln bench` as scripts/device/throughput_gpu.sh runs it (1024 callers, batch
#    256, f16, cache off, 32 768 requests) against the model-only ceiling (helpers.py
#    ceiling) in the same call.
# GRAPH=1 adds candle-transformers' graph (`provider.options.cuda_kernels = false`) to
# each step; NCU=0 skips step 2; ROUNDS=N (default 1) benches N alternated rounds of
# kiln's defaults (batches overlapped, attention in one kernel), batches not overlapped
# (`provider.options.overlap_batches = false`) and attention in five launches
# (`provider.options.fused_attention = false`, which steps 1 and 2 also run). The
# ceiling's torch.compile runs as helpers.py's COMPILE_MODES / COMPILE_DTYPES say.
# Every kiln command has a time limit: a CUDA fault must not hang the call.
. scripts/device/common.sh /tmp/kiln-candle-kernels kiln-cuda
kiln="$work/kiln-cuda"
model=.device/minilm-f16
graph="${GRAPH:-}"
python3 scripts/device/helpers.py texts "$work" 8192
head -256 "$work/long.txt" > "$work/batch.txt"
set_model=(--set "model.path=\"$model\"")

run() { # TAG DEVICE DTYPE EXTRA..
    local tag="$1" device="$2" dtype="$3"; shift 3
    timeout 120 "$kiln" run examples/embed.toml --input "$work/fixture.txt" --output "$work/$tag.jsonl" \
        "${set_model[@]}" --set "model.device=\"$device\"" --set "model.dtype=\"$dtype\"" \
        --set batching.warmup=false "$@" 2>> "$out/runs.log"
}
run cpu_f32 cpu f32
tags=()
for dtype in f32 f16 bf16; do
    run "kiln_$dtype" cuda:0 "$dtype" && tags+=("kiln_$dtype")
    if [ "$dtype" != f32 ]; then
        run "unfused_$dtype" cuda:0 "$dtype" --set provider.options.fused_attention=false && tags+=("unfused_$dtype")
    fi
    if [ -n "$graph" ]; then
        run "candle_$dtype" cuda:0 "$dtype" --set provider.options.cuda_kernels=false && tags+=("candle_$dtype")
    fi
done
[ ${#tags[@]} -gt 0 ] && python3 scripts/device/helpers.py cosines "$work" cpu_f32 "${tags[@]}" | tee "$out/cosines.txt"
tail -3 "$out/runs.log"

kernels() { # TAG EXTRA..
    local tag="$1"; shift
    timeout 180 ncu --metrics gpu__time_duration.sum --csv --print-units base --clock-control none \
        "$kiln" run examples/embed.toml --input "$work/batch.txt" --output "$work/ncu_$tag.jsonl" \
        "${set_model[@]}" --set 'model.device="cuda:0"' --set 'model.dtype="f16"' \
        --set batching.max_batch_size=256 --set batching.warmup=false --set text.max_length=128 "$@" \
        > "$out/kernels_$tag.csv" 2>> "$out/ncu.log" || { tail -5 "$out/ncu.log"; return 0; }
    python3 scripts/device/helpers.py kernels "$out/kernels_$tag.csv" "$tag" 12
}
if [ "${NCU:-1}" != 0 ]; then
    kernels kiln
    kernels kiln_unfused --set provider.options.fused_attention=false
    [ -n "$graph" ] && kernels candle --set provider.options.cuda_kernels=false
fi

bench() { # JSON EXTRA..
    local json="$1"; shift
    timeout 150 "$kiln" bench examples/embed.toml --texts "$work/long.txt" --concurrency 1024 --requests 32768 \
        "${set_model[@]}" --set 'model.device="cuda:0"' --set 'model.dtype="f16"' \
        --set batching.max_batch_size=256 --set batching.max_wait_ms=2 --set batching.queue_capacity=8192 \
        --set text.max_length=128 --set cache.enabled=false --json "$out/$json" "$@" 2>> "$out/bench.log" \
        | tee -a "$out/bench.txt"
}
for round in $(seq "${ROUNDS:-1}"); do
    bench "candle_kiln_kernels_r$round.json" || true
    bench "candle_kiln_no_overlap_r$round.json" --set provider.options.overlap_batches=false || true
    bench "candle_kiln_unfused_r$round.json" --set provider.options.fused_attention=false || true
done
bench candle_kiln_kernels_profiled.json --profile "$out/profile_candle_kiln.json" || true
[ -n "$graph" ] && bench candle_graph.json --set provider.options.cuda_kernels=false
python3 scripts/device/helpers.py ceiling "$model" "$work/long.txt" 5 "$out/ceiling.json" "" \
    "$out"/candle_*.json | tee "$out/ceiling.txt"
python3 scripts/device/helpers.py spans "$out/profile_candle_kiln.json"
