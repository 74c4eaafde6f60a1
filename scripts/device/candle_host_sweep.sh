#!/usr/bin/env bash
# candle on CUDA: how kiln's host side (the tokenizer pool) affects the GPU's throughput,
# in one call. Carried in .device/ as for candle_kernels.sh: kiln-cuda.xz, minilm-f16/.
#
#   TOKENIZERS="0 4 8 32" ROUNDS=2 bash scripts/device/candle_host_sweep.sh
#
# `kiln bench` as candle_kernels.sh runs it (1024 callers, batch 256, f16, cache off) but
# 65 536 requests (about a second, so the ramp weighs less), once per value of
# `text.tokenizer_threads` in TOKENIZERS (0: one per core), alternated over ROUNDS
# rounds; then the eager model-only ceiling (COMPILE_MODES, default none) and each run's
# ratio to it.
. scripts/device/common.sh /tmp/kiln-host-sweep kiln-cuda
kiln="$work/kiln-cuda"
model=.device/minilm-f16
$helpers texts "$work" 8192
for round in $(seq "${ROUNDS:-2}"); do
    for threads in ${TOKENIZERS:-0 4 8 32}; do
        timeout 150 "$kiln" bench examples/embed.toml --texts "$work/long.txt" --concurrency 1024 --requests 65536 \
            --set "model.path=\"$model\"" --set 'model.device="cuda:0"' --set 'model.dtype="f16"' \
            --set batching.max_batch_size=256 --set batching.max_wait_ms=2 --set batching.queue_capacity=8192 \
            --set text.max_length=128 --set cache.enabled=false --set "text.tokenizer_threads=$threads" \
            --json "$out/candle_tokenizers_${threads}_r$round.json" 2>> "$out/bench.log" | head -1 || true
    done
done
COMPILE_MODES="${COMPILE_MODES:-none}" $helpers ceiling "$model" "$work/long.txt" 5 "$out/ceiling.json" "" \
    "$out"/candle_*.json | tee "$out/ceiling.txt"
