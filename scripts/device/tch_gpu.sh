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
. scripts/device/common.sh /tmp/kiln-tch-work kiln-tch
kiln="$work/kiln-tch"
python3 scripts/trace_bert_torchscript.py .device/minilm-f16 "$work/minilm-tch"
"$kiln" providers | tee "$out/providers.txt"
$helpers texts "$work" 8192

run() { # TAG DEVICE DTYPE
    "$kiln" run examples/embed-tch.toml --input "$work/fixture.txt" --output "$work/$1.jsonl" \
        --set "model.path=\"$work/minilm-tch\"" --set "model.device=\"$2\"" --set "model.dtype=\"$3\""
}
run cpu_f32 cpu f32
run cuda_f32 cuda:0 f32
run cuda_f16 cuda:0 f16
run cuda_bf16 cuda:0 bf16
$helpers cosines "$work" cpu_f32 cuda_f32 cuda_f16 cuda_bf16 | tee "$out/cosines.txt"

bench() { # JSON EXTRA_ARGS...
    local json="$1"; shift
    "$kiln" bench examples/embed-tch.toml --texts "$work/long.txt" --requests 8192 --concurrency 1024 \
        --set "model.path=\"$work/minilm-tch\"" --set 'model.device="cuda:0"' --set 'model.dtype="f16"' \
        --set batching.max_batch_size=256 --set batching.max_wait_ms=5 --set batching.queue_capacity=4096 \
        --set text.max_length=128 --set cache.enabled=false --json "$out/$json" "$@"
}
bench bench_tch_f16_b256.json
bench bench_tch_f16_b256_profiled.json --profile "$out/profile_tch_f16.json"
$helpers eager .device/minilm-f16 "$work/long.txt" 3 "$out/eager.json" \
    "$out/bench_tch_f16_b256.json" "$out/bench_tch_f16_b256_profiled.json"
