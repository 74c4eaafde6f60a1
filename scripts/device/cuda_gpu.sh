#!/usr/bin/env bash
# candle on CUDA on the GPU machine (device). Carried in .device/: kiln-cuda.xz (release
# kiln built with --features candle-cuda, stripped, xz), gpu_admission.xz (the example of
# that name, same build) and minilm-f16/ (scripts/device/make_small_model.py MINILM_DIR
# OUT 6: all-MiniLM-L6-v2 with float16 weights).
#
#   bash scripts/device/cuda_gpu.sh        # figures under $OUT
#
# 1. `kiln devices --json`, `kiln providers` (candle must list cuda);
# 2. the fixture texts on cuda:0 at f32 / f16 / bf16 and on `auto` -> cosines against
#    cpu f32;
# 3. `kiln bench` at batch 256 on 8192 (profiled) and 16384 distinct 128-token texts,
#    f16 on cuda:0, next to sentence-transformers (PyTorch eager, model.half()) on the
#    same texts, folder and GPU;
# 4. 256 concurrent single-text callers, dynamic batching on vs off (`--compare`);
# 5. examples/gpu_admission: a 100 GiB model refused on cuda:0, serving goes on.
. scripts/device/common.sh /tmp/kiln-cuda-work kiln-cuda gpu_admission
kiln="$work/kiln-cuda"
model=.device/minilm-f16
"$kiln" devices --json > "$out/devices.json"
"$kiln" devices
"$kiln" providers | tee "$out/providers.txt"
$helpers texts "$work" 16384

run() { # TAG DEVICE DTYPE
    "$kiln" run examples/embed.toml --input "$work/fixture.txt" --output "$work/$1.jsonl" \
        --set "model.path=\"$model\"" --set "model.device=\"$2\"" --set "model.dtype=\"$3\""
}
run cpu_f32 cpu f32
run cuda_f32 cuda:0 f32
run cuda_f16 cuda:0 f16
run cuda_bf16 cuda:0 bf16
run auto_f32 auto f32
$helpers cosines "$work" cpu_f32 cuda_f32 cuda_f16 cuda_bf16 auto_f32 | tee "$out/cosines.txt"

common=(--set "model.path=\"$model\"" --set 'model.device="cuda:0"' --set 'model.dtype="f16"'
        --set batching.max_batch_size=256 --set batching.max_wait_ms=5 --set batching.queue_capacity=4096
        --set text.max_length=128 --set cache.enabled=false)
"$kiln" bench examples/embed.toml --texts "$work/long.txt" --requests 8192 --concurrency 1024 \
    "${common[@]}" --json "$out/bench_candle_f16_b256.json" --profile "$out/profile_candle_f16.json"
"$kiln" bench examples/embed.toml --texts "$work/long.txt" --requests 16384 --concurrency 1024 \
    "${common[@]}" --json "$out/bench_candle_f16_b256_long.json"
"$kiln" bench examples/embed.toml --requests 4096 --concurrency 256 --words 4-64 \
    "${common[@]}" --compare batching.enabled=false --json "$out/bench_candle_batching_256_callers.json"
head -n 8192 "$work/long.txt" > "$work/long8192.txt"
$helpers eager "$model" "$work/long8192.txt" 3 "$out/eager.json" \
    "$out/bench_candle_f16_b256.json" "$out/bench_candle_f16_b256_long.json"

"$work/gpu_admission" "$model" cuda:0 | tee "$out/admission.txt"
