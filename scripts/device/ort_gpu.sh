#!/usr/bin/env bash
# Issue 33: kiln's ort provider on ONNX Runtime's CUDA execution provider (PyPI's
# onnxruntime-gpu 1.31.1, its CUDA 13 libraries from the GPU machine's torch wheels)
# against eager PyTorch on the same texts, in one call.
#
# Carried in .device/ (docs/benchmarks.md says how each is made):
#   kiln-tch.xz        release kiln with --features tch,ort
#   minilm-f16/        the MiniLM folder (f16 safetensors, tokenizer, pooling)
#   ort-gpu.tar.xz.*   libonnxruntime.so.1.31.1, libonnxruntime_providers_shared.so and
#                      libonnxruntime_providers_cuda.so from the onnxruntime-gpu wheel,
#                      split in parts (or whole) that travel in consecutive calls (ORT_PARTS names the
#                      folder holding them, default .device)
#
#   bash scripts/device/ort_gpu.sh          (SKIP_COSINES=1: the benches and the ceiling only)
#
# 1. exports MiniLM to ONNX (scripts/export_bert_onnx.py) and puts the embedding head in
#    it, fused for the GPU and in float16 (scripts/onnx_head.py --f16);
# 2. `kiln run` over the fixture and the 8192 long texts: ort cuda f16 against ort cpu
#    f32 on the plain export (cosines);
# 3. `kiln bench`, ort f16 on cuda:0, 1024 concurrent single-text callers, the bench
#    compile_gpu.sh runs, runs overlapped with collation and not (ROUNDS rounds,
#    default 2);
# 4. `helpers.py ceiling` on the same texts (COMPILE_MODES, default none: eager f16 and
#    bf16 only) and kiln's ratio to it.
. scripts/device/common.sh /tmp/kiln-ort kiln-tch
kiln="$work/kiln-tch"
cat "${ORT_PARTS:-.device}"/ort-gpu.tar.xz* | xz -dc | tar -x -C "$work"
export ORT_DYLIB_PATH="$work/libonnxruntime.so.1.31.1"
# cuDNN (which the CUDA provider opens when a graph needs it) from the torch wheels.
export LD_LIBRARY_PATH="$site/nvidia/cudnn/lib:$LD_LIBRARY_PATH"
{ echo "libraries the CUDA provider cannot find:"; LD_LIBRARY_PATH="$work:$LD_LIBRARY_PATH" ldd "$work/libonnxruntime_providers_cuda.so" | grep "not found" || echo none; } | tee "$out/ldd.txt"

python3 scripts/export_bert_onnx.py .device/minilm-f16 "$work/minilm-onnx" > "$out/export.txt"
python3 scripts/onnx_head.py "$work/minilm-onnx" "$work/minilm-onnx-f16" --f16 >> "$out/export.txt" 2>&1
cat "$out/export.txt"
"$kiln" providers > "$out/providers.txt"
grep -A3 -i "^ort\|onnx" "$out/providers.txt" || true
$helpers texts "$work" 8192

run() { # TAG INPUT MODEL DEVICE DTYPE EPS
    "$kiln" run examples/embed-ort.toml --input "$2" --output "$work/$1.jsonl" \
        --set "model.path=\"$3\"" --set "model.device=\"$4\"" --set "model.dtype=\"$5\"" \
        --set "provider.options.execution_providers=$6" --set text.max_length=128 2>> "$out/run.log"
}
if [ -z "${SKIP_COSINES:-}" ]; then  # the CPU's run over the long texts takes ~30 s
    run fixture_cpu "$work/fixture.txt" "$work/minilm-onnx" cpu f32 '["cpu"]'
    run fixture_cuda "$work/fixture.txt" "$work/minilm-onnx-f16" cuda:0 f16 '["cuda"]'
    run long_cpu "$work/long.txt" "$work/minilm-onnx" cpu f32 '["cpu"]'
    run long_cuda "$work/long.txt" "$work/minilm-onnx-f16" cuda:0 f16 '["cuda"]'
    { $helpers cosines "$work" fixture_cpu fixture_cuda
      $helpers cosines "$work" long_cpu long_cuda; } | tee "$out/cosines.txt"
fi

bench() { # TAG OVERLAP
    "$kiln" bench examples/embed-ort.toml --texts "$work/long.txt" --concurrency 1024 --requests 32768 \
        --set "model.path=\"$work/minilm-onnx-f16\"" --set 'model.device="cuda:0"' --set 'model.dtype="f16"' \
        --set 'provider.options.execution_providers=["cuda"]' \
        --set batching.max_batch_size=256 --set batching.max_wait_ms=2 --set batching.queue_capacity=8192 \
        --set text.max_length=128 --set cache.enabled=false --set "provider.options.overlap=$2" \
        --json "$out/$1.json" 2>> "$out/bench.log" | tee "$out/$1.txt"
}
# ONNX Runtime's run blocks its caller until the outputs are on the host: with overlap
# (off by default: it measured slower on an H100) it runs on the responder thread while
# the model thread collates the next batch; off, on the model thread.
for round in $(seq "${ROUNDS:-2}"); do
    bench "ort_cuda_f16_overlap_off_$round" false
    bench "ort_cuda_f16_overlap_on_$round" true
done

COMPILE_MODES="${COMPILE_MODES:-none}" $helpers ceiling .device/minilm-f16 "$work/long.txt" 5 "$out/ceiling.json" "" \
    "$out"/ort_cuda_f16_*.json 2>> "$out/ceiling.log" | tee "$out/ceiling.txt"
