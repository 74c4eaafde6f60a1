#!/usr/bin/env bash
# Issue 33's generation targets in one call: SmolLM2-135M-Instruct (the Q4_1 GGUF) on
# MLX (cuda:0) and on candle (cuda:0) against Hugging Face transformers' batched
# `generate` on the same file and GPU, 64 streams and one stream, 128 new tokens each,
# f16, greedy. The files travel as generate_gpu.sh's do, plus kiln-cuda.xz (release kiln
# with --features candle-cuda), which any earlier call on the warm machine leaves in
# ~/kiln-mlx:
#
#   call 1, .device/: libmlx-part-aa, kiln-mlx.xz, cccl.tar.xz, cutlass.tar.xz, gguf-*.whl   STAGE=1 bash scripts/device/generate_gpu.sh
#   call 2, .device/: libmlx-part-ab, blas.tar.xz, smollm2.gguf.part-aa     STAGE=1 bash scripts/device/generate_gpu.sh
#   call 3, .device/: smollm2.gguf.part-ab, smollm2.gguf.part-ac           bash scripts/device/generate_one_call.sh
#
# Order: transformers first (batches 1 and 64), then MLX at 64 streams twice (on a fresh
# machine the first run's warm-up waits for MLX's run-time kernel compiler, ~3-5 min), MLX at one
# stream, candle at 64 streams twice and one stream, transformers again, so the baseline
# brackets kiln's runs. Every line is printed as it comes: run the call with a 600 s limit
# and without piping it through `tail` (files under $OUT are archived only at exit).
set -euo pipefail
stash="$HOME/kiln-mlx"
. scripts/device/stash.sh
mkdir -p .device && cp "$stash/kiln-cuda.xz" .device/
. scripts/device/common.sh /tmp/kiln-one kiln-cuda
candle="$work/kiln-cuda"
. scripts/device/mlx_common.sh
mkdir -p "$work/model"
gguf="$work/model/SmolLM2-135M-Instruct.Q4_1.gguf"
cat "$stash"/smollm2.gguf.part-* > "$gguf"
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $gguf" | sha256sum -c
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -m pip install --no-deps --target "$work/py" "$stash"/gguf-*.whl -q 2>> "$out/hf.log" || true
transformers() { # TAG
    PYTHONPATH="$work/py" timeout 200 python3 scripts/device/hf_generate.py "$gguf" cuda:0 float16 128 1 64 \
        > "$out/$1.json" 2>> "$out/hf.log" || true
    python3 - "$out/$1.json" "$1" <<'PY' || true
import json, sys
r = json.load(open(sys.argv[1]))
print(sys.argv[2], " | ".join(f"batch {x['batch']}: {x['tokens_per_s']:.0f} tokens/s" for x in r["runs"]))
PY
}
bench() { # TAG BIN EXAMPLE STREAMS [--set ...]
    local tag="$1" bin="$2" example="$3" streams="$4"
    shift 4
    echo "== $tag"
    timeout "${LIMIT:-300}" "$bin" bench "$example" --set "model.path=\"$gguf\"" --set 'model.device="cuda:0"' \
        --set 'model.dtype="f16"' --requests "$streams" --concurrency "$streams" \
        --set "batching.max_batch_size=$streams" --set generate.max_new_tokens=128 \
        --set generate.kv_cache_mb=4096 --set generate.prefill_chunk=2048 --json "$out/$tag.json" "$@" \
        2>> "$out/bench.log" | tee -a "$out/bench.txt" || true
}
transformers hf_first
LIMIT=450 bench mlx_64_cold "$kiln" examples/generate-mlx.toml 64
bench mlx_64 "$kiln" examples/generate-mlx.toml 64
bench mlx_1 "$kiln" examples/generate-mlx.toml 1
bench candle_64 "$candle" examples/generate-cuda.toml 64
bench candle_1 "$candle" examples/generate-cuda.toml 1
bench mlx_64_again "$kiln" examples/generate-mlx.toml 64
bench candle_64_again "$candle" examples/generate-cuda.toml 64
transformers hf_second
