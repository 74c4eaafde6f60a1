#!/usr/bin/env bash
# Issue 33's first measurement on the GPU machine: kiln (tch, f16) against the stronger
# ceilings — torch.compile of the same model, f16 and bf16, next to eager — in one call.
# Carried in .device/: kiln-tch.xz (release kiln with --features tch) and minilm-f16/
# (docs/benchmarks.md says how both are made).
#
#   COMPILE_MODES="max-autotune" bash scripts/device/compile_gpu.sh
#
# 1. traces the carried MiniLM with scripts/trace_bert_torchscript.py;
# 2. `kiln bench`, tch f16 on cuda:0, 1024 concurrent single-text callers, cache off,
#    32 768 requests cycling 8192 distinct 150-word texts (128 tokens each);
# 3. `helpers.py ceiling` on the same texts: eager f16, torch.compile (COMPILE_MODES) f16
#    and bf16, eager bf16, kiln's TorchScript trace from Python; kiln's ratio to each.
. scripts/device/common.sh /tmp/kiln-compile kiln-tch
kiln="$work/kiln-tch"
python3 scripts/trace_bert_torchscript.py .device/minilm-f16 "$work/minilm-tch" > "$out/trace.txt"
$helpers texts "$work" 8192
"$kiln" bench examples/embed-tch.toml --texts "$work/long.txt" --concurrency 1024 --requests 32768 \
    --set "model.path=\"$work/minilm-tch\"" --set 'model.device="cuda:0"' --set 'model.dtype="f16"' \
    --set batching.max_batch_size=256 --set batching.max_wait_ms=2 --set batching.queue_capacity=8192 \
    --set text.max_length=128 --set cache.enabled=false --json "$out/tch_f16.json" 2>> "$out/bench.log" \
    | tee "$out/bench.txt"
$helpers ceiling .device/minilm-f16 "$work/long.txt" 5 "$out/ceiling.json" "$work/minilm-tch" "$out/tch_f16.json" \
    2>> "$out/ceiling.log" | tee "$out/ceiling.txt"
