#!/usr/bin/env bash
# Issue 12's acceptance run on the GPU machine: kiln's request path against the
# model-only ceiling, in one call. Carried in .device/: kiln-tch.xz (release kiln with
# --features tch), optionally kiln-cuda.xz (--features candle-cuda), and minilm-f16/
# (see docs/benchmarks.md for how both are made).
#
#   bash scripts/device/throughput_gpu.sh      # figures on stdout, logs in $OUT/results.tar.xz
#
# 1. traces the carried MiniLM with scripts/trace_bert_torchscript.py;
#    with SHAPES=1, `helpers.py shapes`: what each new batch size costs the trace;
# 2. agreement: the fixture texts at cpu f32 and cuda:0 f32 / f16 (pooling on the GPU);
# 3. the ceiling (scripts/device/helpers.py ceiling): eager PyTorch f16 forward + mean
#    pooling + L2 on pre-tokenized batches of 256 of the same 8192 texts, and kiln's
#    TorchScript trace run the same way from Python;
# 4. `kiln bench`, tch f16 on cuda:0, 1024 concurrent single-text callers, cache off,
#    the texts cycled to 32 768 requests: as configured below, profiled, without
#    overlapped batches, and (VARIANTS=1) executor and batching variants;
#    candle on CUDA the same way when kiln-cuda.xz was carried.
bins=(kiln-tch)
[ -f .device/kiln-cuda.xz ] && bins+=(kiln-cuda)
. scripts/device/common.sh /tmp/kiln-throughput "${bins[@]}"
# At most 8 files come back from the machine: everything goes in one archive, made
# also when a step fails.
returned="$out"
out="$work/out"
mkdir -p "$out"
trap 'tar -cJf "$returned/results.tar.xz" -C "$work" out' EXIT
kiln="$work/kiln-tch"
python3 scripts/trace_bert_torchscript.py .device/minilm-f16 "$work/minilm-tch" > "$out/trace.txt"
$helpers texts "$work" 8192
# What a new batch shape costs TorchScript on the GPU, per executor mode (SHAPES=1).
if [ -n "${SHAPES:-}" ]; then
    $helpers shapes "$work/minilm-tch" "$out/shapes.json" | tee "$out/shapes.txt"
fi

run() { # BIN CONFIG MODEL TAG DEVICE DTYPE
    "$1" run "$2" --input "$work/fixture.txt" --output "$work/$4.jsonl" \
        --set "model.path=\"$3\"" --set "model.device=\"$5\"" --set "model.dtype=\"$6\"" 2>> "$out/runs.log"
}
run "$kiln" examples/embed-tch.toml "$work/minilm-tch" tch_cpu_f32 cpu f32
run "$kiln" examples/embed-tch.toml "$work/minilm-tch" tch_cuda_f32 cuda:0 f32
run "$kiln" examples/embed-tch.toml "$work/minilm-tch" tch_cuda_f16 cuda:0 f16
tags=(tch_cuda_f32 tch_cuda_f16)
if [ -x "$work/kiln-cuda" ]; then
    run "$work/kiln-cuda" examples/embed.toml .device/minilm-f16 candle_cuda_f16 cuda:0 f16
    tags+=(candle_cuda_f16)
fi
$helpers cosines "$work" tch_cpu_f32 "${tags[@]}" | tee "$out/cosines.txt"

bench() { # BIN CONFIG MODEL JSON EXTRA_ARGS...
    local bin="$1" config="$2" model="$3" json="$4"; shift 4
    "$bin" bench "$config" --texts "$work/long.txt" --concurrency 1024 \
        --set "model.path=\"$model\"" --set 'model.device="cuda:0"' --set 'model.dtype="f16"' \
        --set batching.max_batch_size=256 --set batching.max_wait_ms=2 --set batching.queue_capacity=8192 \
        --set text.max_length=128 --set cache.enabled=false --json "$out/$json" "$@" 2>> "$out/bench.log" \
        | tee -a "$out/bench.txt"
}
tch() { local json="$1"; shift; bench "$kiln" examples/embed-tch.toml "$work/minilm-tch" "$json" --requests "${REQUESTS:-32768}" "$@"; }
tch tch_f16.json
tch tch_f16_profiled.json --profile "$out/profile_tch.json"
# Each batch waited for on the model thread, as before batches overlapped.
tch tch_f16_nooverlap.json --set provider.options.overlap_batches=false
if [ -n "${VARIANTS:-}" ]; then
    tch tch_f16_noprofiling.json --set provider.options.jit_profiling=false
    # Every batch at its own shape, no warm-up: as before shape buckets.
    tch tch_f16_unbucketed.json --set batching.batch_multiple=1 --set batching.sequence_multiple=1 \
        --set batching.warmup=false
    tch tch_f16_nooptimize.json --set provider.options.jit_optimize=false
    # Two replicas of the model on the one GPU.
    tch tch_f16_replicas.json --set 'model.gpu_ids=[0, 0]'
fi
# Four times as long: steady state.
REQUESTS=131072 tch tch_f16_long.json --profile "$out/profile_tch_long.json"
jsons=("$out"/tch_f16*.json)
if [ -x "$work/kiln-cuda" ]; then
    bench "$work/kiln-cuda" examples/embed.toml .device/minilm-f16 candle_f16.json --requests 32768
    bench "$work/kiln-cuda" examples/embed.toml .device/minilm-f16 candle_f16_profiled.json --requests 32768 \
        --profile "$out/profile_candle.json"
    jsons+=("$out"/candle_f16*.json)
fi
$helpers ceiling .device/minilm-f16 "$work/long.txt" 5 "$out/ceiling.json" "$work/minilm-tch" "${jsons[@]}" \
    | tee "$out/ceiling.txt"
$helpers spans "$out"/profile_*.json
