#!/usr/bin/env bash
# Issue 33's first measurement on the GPU machine: kiln (tch, f16) against the stronger
# ceilings — torch.compile of the same model, f16 and bf16, next to eager — in one call.
# Carried in .device/: kiln-tch.xz (release kiln with --features tch) and minilm-f16/
# (docs/benchmarks.md says how both are made).
#
#   COMPILE_MODES="max-autotune" bash scripts/device/compile_gpu.sh
#
# 1. traces the carried MiniLM with scripts/trace_bert_torchscript.py;
# 2. `kiln run` over the fixture and the 8192 long texts at cuda:0 f16, CUDA graphs on
#    and off, and cpu f32 over the fixture: cosines between them;
# 3. `kiln bench`, tch f16 on cuda:0, 1024 concurrent single-text callers, cache off,
#    32 768 requests cycling 8192 distinct 150-word texts (128 tokens each), CUDA
#    graphs off and on, alternated (ROUNDS rounds, default 2);
# 4. the same MiniLM compiled ahead of time by AOTInductor (scripts/export_aoti.py, cuda
#    f16, max-autotune): its cosines against the trace, and `kiln bench` on it, graphs
#    off and on (SKIP_AOTI=1 skips this);
# 5. `helpers.py ceiling` on the same texts: eager f16, torch.compile (COMPILE_MODES) f16
#    and bf16, eager bf16, kiln's TorchScript trace from Python; kiln's ratio to each.
. scripts/device/common.sh /tmp/kiln-compile kiln-tch
kiln="$work/kiln-tch"
python3 scripts/trace_bert_torchscript.py .device/minilm-f16 "$work/minilm-tch" > "$out/trace.txt"
"$kiln" providers > "$out/providers.txt"
$helpers texts "$work" 8192

model="$work/minilm-tch"
run() { # TAG INPUT DEVICE DTYPE GRAPHS
    "$kiln" run examples/embed-tch.toml --input "$2" --output "$work/$1.jsonl" \
        --set "model.path=\"$model\"" --set "model.device=\"$3\"" --set "model.dtype=\"$4\"" \
        --set "provider.options.cuda_graphs=$5" --set text.max_length=128 2>> "$out/run.log"
}
run fixture_cpu "$work/fixture.txt" cpu f32 0
run fixture_eager "$work/fixture.txt" cuda:0 f16 0
run fixture_graphs "$work/fixture.txt" cuda:0 f16 128
run long_eager "$work/long.txt" cuda:0 f16 0
run long_graphs "$work/long.txt" cuda:0 f16 128
{ $helpers cosines "$work" fixture_cpu fixture_eager fixture_graphs
  $helpers cosines "$work" long_eager long_graphs; } | tee "$out/cosines.txt"

bench() { # TAG GRAPHS
    "$kiln" bench examples/embed-tch.toml --texts "$work/long.txt" --concurrency 1024 --requests 32768 \
        --set "model.path=\"$model\"" --set 'model.device="cuda:0"' --set 'model.dtype="f16"' \
        --set batching.max_batch_size=256 --set batching.max_wait_ms=2 --set batching.queue_capacity=8192 \
        --set text.max_length=128 --set cache.enabled=false --set "provider.options.cuda_graphs=$2" \
        --json "$out/$1.json" 2>> "$out/bench.log" | tee "$out/$1.txt"
}
for round in $(seq "${ROUNDS:-2}"); do
    bench "tch_f16_eager_$round" 0
    bench "tch_f16_graphs_$round" 128
done

# A failure here is reported and the ceiling still measured.
export_aoti() { # EXTRA_ARGS...
    python3 -X faulthandler scripts/export_aoti.py .device/minilm-f16 "$work/minilm-aoti" --device cuda --dtype f16 \
        --max-batch 256 --max-length 128 "$@" 2>> "$out/aoti.log" >> "$out/aoti.txt"
}
if [ -n "${SKIP_AOTI:-}" ]; then
    echo "AOTI package skipped (SKIP_AOTI)"
elif export_aoti --autotune || { echo "autotuned export failed; again without --autotune"; export_aoti; }; then
    cat "$out/aoti.txt"
    model="$work/minilm-aoti"
    run long_aoti "$work/long.txt" cuda:0 f16 128 || echo "kiln run on the AOTI package failed"
    $helpers cosines "$work" long_eager long_aoti | tee -a "$out/cosines.txt" || true
    bench aoti_f16_eager 0 || echo "kiln bench on the AOTI package failed"
    bench aoti_f16_graphs 128 || echo "kiln bench on the AOTI package with graphs failed"
else
    echo "export_aoti.py failed:"; grep -v AUTOTUNE "$out/aoti.log" | tail -40
fi

$helpers ceiling .device/minilm-f16 "$work/long.txt" 5 "$out/ceiling.json" "$work/minilm-tch" \
    "$out"/tch_f16_*.json "$out"/aoti_f16_eager.json "$out"/aoti_f16_graphs.json \
    2>> "$out/ceiling.log" | tee "$out/ceiling.txt"
