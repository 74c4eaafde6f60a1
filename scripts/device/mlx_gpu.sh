#!/usr/bin/env bash
# Issue 14's GPU run: the MLX provider on the GPU machine, with mlx-cuda-13's libmlx.
# The files travel in two calls (a call carries at most 64 MiB; libmlx of mlx-cuda-13
# is 146 MB, 73 MB as xz) and wait in ~/kiln-mlx between them:
#
#   call 1, .device/: libmlx-part-aa, kiln-mlx.xz, blas.tar.xz    STAGE=1 bash scripts/device/mlx_gpu.sh
#   call 2, .device/: libmlx-part-ab, cccl.tar.xz, minilm-f16/     bash scripts/device/mlx_gpu.sh
#
# (blas.tar.xz may travel in either call: whichever has room.)
#
# made here (docs/benchmarks.md): libmlx-cuda.tar.xz = mlx/lib + mlx_cuda_13.libs of the
# mlx-cuda-13==0.32.4 wheel, split -b 56000000; cccl.tar.xz = its mlx/include/cccl (the
# CUDA C++ headers MLX's run-time kernel compiler includes, found beside libmlx);
# kiln-mlx.xz = release kiln built with --features mlx (stripped); blas.tar.xz = the
# OpenBLAS + libgfortran it links.
#
# CLASSIFY=1 on call 2 runs the image classifier instead (see below).
#
# Call 2: agreement (the fixture texts at cpu f32 and cuda:0 f32 / f16 / bf16, same
# binary, same libmlx; on the GPU with kiln's embedding kernel, and f16 with MLX's gather),
# then `kiln bench` with mlx f16 on cuda:0 exactly as throughput_gpu.sh runs the other
# providers (ROUNDS, below), and the model-only ceiling in the same call.
set -euo pipefail
stash="$HOME/kiln-mlx"
mkdir -p "$stash"
if [ -n "${STAGE:-}" ]; then
    for part in libmlx-part-aa kiln-mlx.xz blas.tar.xz; do
        [ -f ".device/$part" ] && cp ".device/$part" "$stash/"
    done
    ls -la "$stash"
    exit 0
fi
for part in libmlx-part-ab cccl.tar.xz blas.tar.xz; do
    [ -f ".device/$part" ] && cp ".device/$part" "$stash/"
done
. scripts/device/common.sh /tmp/kiln-mlx
returned="$out"
out="$work/out"
mkdir -p "$out"
trap 'tar -cJf "$returned/results.tar.xz" -C "$work" out' EXIT
. scripts/device/mlx_common.sh
"$kiln" providers | tee "$out/providers.txt"
if [ -n "${CLASSIFY:-}" ]; then
    # The PP-OCR classifier's ONNX file on MLX (cpu; cuda:0 f32 / f16) against ONNX Runtime
    # on the CPU (the machine's onnxruntime wheel, same binary), over 2000 rendered text
    # lines; model_run-only rates from each run's profile. Call 2 also carries
    # .device/ppocr-cls/ (model.onnx, labels.txt).
    ort_lib="$(ls "$site"/onnxruntime/capi/libonnxruntime.so.* | head -1)"
    mkdir -p "$work/lines"
    python3 tests/readers/pil_reference.py text-lines "$work/lines" 1000 > "$work/truth.json"
    cls() { # TAG CONFIG DEVICE DTYPE [K=V..]
        local tag="$1" config="$2" device="$3" dtype="$4" sets=()
        shift 4
        for s in "$@"; do sets+=(--set "$s"); done
        ORT_DYLIB_PATH="$ort_lib" timeout 300 "$kiln" run "$config" --input "$work/lines" \
            --output "$work/$tag.jsonl" --profile "$out/profile_$tag.json" \
            --set 'model.path=".device/ppocr-cls/model.onnx"' --set 'classify.labels=".device/ppocr-cls/labels.txt"' \
            --set "model.device=\"$device\"" --set "model.dtype=\"$dtype\"" "${sets[@]}" 2>&1 \
            | tail -n 1 | tee -a "$out/classify.txt" || true
        $helpers model_rate "$out/profile_$tag.json" 2000 | tee -a "$out/classify.txt" || true
    }
    cls ort_cpu examples/classify.toml cpu f32
    cls mlx_cpu examples/classify-mlx.toml cpu f32
    cls mlx_cuda_f32 examples/classify-mlx.toml cuda:0 f32
    cls mlx_cuda_f16 examples/classify-mlx.toml cuda:0 f16
    cls mlx_cuda_f16_b256 examples/classify-mlx.toml cuda:0 f16 batching.max_batch_size=256
    $helpers scores "$work/ort_cpu.jsonl" "$work"/mlx_*.jsonl | tee -a "$out/classify.txt" || true
    exit 0
fi
$helpers texts "$work" 8192
kernel=(--set provider.options.embedding_kernel=true)
if [ -n "${KERNELS:-}" ]; then
    # Where a batch of 256 x 128 tokens spends its GPU time (ncu, durations only, clocks
    # as found), and the bench with cuDNN's attention instead of MLX's own.
    head -n 256 "$work/long.txt" > "$work/batch.txt"
    timeout 300 ncu --metrics gpu__time_duration.sum --csv --print-units base --clock-control none \
        "$kiln" run examples/embed-mlx.toml --input "$work/batch.txt" --output "$work/ncu.jsonl" \
        --set 'model.path=".device/minilm-f16"' --set 'model.device="cuda:0"' --set 'model.dtype="f16"' \
        --set batching.max_batch_size=256 --set batching.warmup=false --set text.max_length=128 "${kernel[@]}" \
        > "$out/kernels.csv" 2>> "$out/ncu.log" || tail -5 "$out/ncu.log"
    $helpers kernels "$out/kernels.csv" mlx
fi
run() { # TAG DEVICE DTYPE EXTRA..
    local tag="$1" device="$2" dtype="$3"; shift 3
    timeout 600 "$kiln" run examples/embed-mlx.toml --input "$work/fixture.txt" --output "$work/$tag.jsonl" \
        --set 'model.path=".device/minilm-f16"' --set "model.device=\"$device\"" --set "model.dtype=\"$dtype\"" \
        "$@" 2>> "$out/runs.log" || echo "$tag: failed (runs.log)"
}
run mlx_cpu_f32 cpu f32
run mlx_cuda_f32 cuda:0 f32 "${kernel[@]}"
run mlx_cuda_f16 cuda:0 f16 "${kernel[@]}"
run mlx_cuda_bf16 cuda:0 bf16 "${kernel[@]}"
run mlx_cuda_f16_take cuda:0 f16 --set provider.options.embedding_kernel=false
tail -n 20 "$out/runs.log"
$helpers cosines "$work" mlx_cpu_f32 mlx_cuda_f32 mlx_cuda_f16 mlx_cuda_bf16 mlx_cuda_f16_take | tee "$out/cosines.txt"
bench() { # JSON EXTRA_ARGS...
    local json="$1"; shift
    timeout 600 "$kiln" bench examples/embed-mlx.toml --texts "$work/long.txt" --concurrency 1024 \
        --set 'model.path=".device/minilm-f16"' --set 'model.device="cuda:0"' --set 'model.dtype="f16"' \
        --set batching.max_batch_size=256 --set batching.max_wait_ms=2 --set batching.queue_capacity=8192 \
        --set text.max_length=128 --set cache.enabled=false --json "$out/$json" "$@" 2>> "$out/bench.log" \
        | tee -a "$out/bench.txt" || { echo "$json: failed (bench.log)"; tail -3 "$out/bench.log"; }
}
# ROUNDS=N (default 1) alternated rounds of: batches overlapped with kiln's embedding
# kernel; overlapped with MLX's gather (`provider.options.embedding_kernel = false`);
# the kernel without the overlap (`provider.options.overlap_batches = false`).
for round in $(seq "${ROUNDS:-1}"); do
    bench "mlx_f16_kernel_r$round.json" --requests 32768 "${kernel[@]}"
    bench "mlx_f16_take_r$round.json" --requests 32768 --set provider.options.embedding_kernel=false
    bench "mlx_f16_no_overlap_r$round.json" --requests 32768 "${kernel[@]}" --set provider.options.overlap_batches=false
done
bench mlx_f16_profiled.json --requests 32768 --profile "$out/profile_mlx.json" "${kernel[@]}"
if [ -n "${KERNELS:-}" ]; then
    MLX_CUDA_USE_CUDNN_SDPA=1 bench mlx_f16_cudnn_sdpa.json --requests 32768 "${kernel[@]}"
fi
$helpers ceiling .device/minilm-f16 "$work/long.txt" 5 "$out/ceiling.json" "" "$out"/mlx_f16*.json \
    | tee "$out/ceiling.txt"
$helpers spans "$out"/profile_mlx.json
