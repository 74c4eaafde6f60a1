#!/usr/bin/env bash
# Issue 33: the video pipeline (examples/video.toml: the terrain UNet and RIFE on ONNX
# Runtime) on the GPU machine's CUDA execution provider, against its Python reference
# (scripts/video_reference.py, one frame at a time) on the same GPU, in one call.
#
# Carried in .device/ (docs/benchmarks.md says how each is made):
#   kiln-tch.xz     release kiln with --features tch,ort
#   video/          terrain_unet.onnx and rife.onnx (`scripts/setup video`)
#   onnxruntime/    PyPI's onnxruntime-gpu 1.31.1 package, whole: the Python bindings the
#                   reference imports and libonnxruntime + its CUDA provider, which kiln
#                   loads (ORT_PKG names the folder holding it, default .device)
#
#   bash scripts/device/video_gpu.sh          (ROUNDS: timed renders per side, default 3)
#
# Configurations, each rendered ROUNDS times by `kiln bench`, each render followed by a
# render of the reference in a process of its own on cuda:0 (after its warm-up render; the
# reference keeps ONNX Runtime's default search); the median ratio and how far the frames
# differ (mean abs):
#   cuda     examples/video-cuda.toml: batches of 8 keyframes and 16 midpoints, padded to
#            whole batches and warmed up at load, one copy of each model
#   as-cpu   examples/video.toml with only the device changed (batches of 1 and 2, two
#            copies of each model); INTRA_THREADS sets its `provider.options.intra_threads`
#            (default 0, ONNX Runtime's own count: the example's 1 is for two copies
#            sharing 2 CPU cores, and starves the nodes the CUDA provider leaves to the CPU)
# for each cuDNN algorithm search in SEARCHES (default "heuristic"; "exhaustive" is ONNX
# Runtime's own default: `provider.options.cudnn_conv_algo_search`). TF32=true|false sets
# `provider.options.tf32` (which `kiln bench` passes to the reference too); unset, both
# keep ONNX Runtime's default (TF32 on). TAG names the outputs' variant.
. scripts/device/common.sh /tmp/kiln-video kiln-tch
kiln="$work/kiln-tch"
pkg="$(cd "${ORT_PKG:-.device}" && pwd)"
export ORT_DYLIB_PATH="$pkg/onnxruntime/capi/libonnxruntime.so.1.31.1"
# cuDNN (which the CUDA provider opens for convolutions) from the torch wheels.
export LD_LIBRARY_PATH="$site/nvidia/cudnn/lib:$LD_LIBRARY_PATH"
# The reference's onnxruntime is the carried onnxruntime-gpu, not the machine's CPU build.
export PYTHONPATH="$pkg${PYTHONPATH:+:$PYTHONPATH}"
python3 -c 'import onnxruntime as o; print("reference: onnxruntime", o.__version__, o.get_available_providers())' \
    | tee "$out/reference_ort.txt"
models="$(cd .device/video && pwd)"

bench() { # TAG CONFIG EXTRA_ARGS...
    local tag="$1" config="$2"
    shift 2
    "$kiln" bench "$config" --rounds "${ROUNDS:-3}" --reference python3 \
        --set "model.path=\"$models/terrain_unet.onnx\"" --set "video.interpolator=\"$models/rife.onnx\"" \
        --set 'model.device="cuda:0"' --set 'provider.options.execution_providers=["cuda"]' \
        ${TF32:+--set "provider.options.tf32=$TF32"} \
        "$@" --json "$out/$tag${TAG:-}.json" 2>&1 | tee "$out/$tag${TAG:-}.txt"
}
for search in ${SEARCHES:-heuristic}; do
    bench "cuda-$search" examples/video-cuda.toml --set "provider.options.cudnn_conv_algo_search=\"$search\""
    bench "as-cpu-$search" examples/video.toml --set "provider.options.cudnn_conv_algo_search=\"$search\"" \
        --set "provider.options.intra_threads=${INTRA_THREADS:-0}"
done
