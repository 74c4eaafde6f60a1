#!/usr/bin/env bash
# Issue 29's GPU run: Qwen2.5-VL at the 3B's shapes (random weights) on the GPU machine —
# kiln's MLX provider on mlx-cuda-13, bf16 and mlx-community 4-bit, against transformers
# bf16 on the same GPU, the 2-image "Compare these images." prompt of scripts/compare_vlm.py.
# Two calls, back to back (the machine keeps its files only between consecutive calls):
#
#   call 1, .device/: libmlx-part-aa, kiln-mlx.xz, vlm3b/config.json
#       STAGE=1 bash scripts/device/vlm_gpu.sh
#       stages the files in ~/kiln-mlx and builds the checkpoints in ~/vlm3b with the
#       machine's transformers (scripts/device/vlm_gpu.py build): bf16 and 4-bit
#   call 2, .device/: libmlx-part-ab, cccl.tar.xz, cutlass.tar.xz, blas.tar.xz, vlm3b/ (tokenizer, chat
#       template, processor settings: the 3B folder's small files but config.json), images/,
#       wheels/ (optional, for mlx-vlm: `pip download --no-deps mlx-vlm==0.7.10` and
#       `pip download --no-deps --python-version 3.12 --only-binary=:all: --platform
#       manylinux_2_35_x86_64 mlx==0.32.4`)
#       bash scripts/device/vlm_gpu.sh
#
# made here: libmlx-part-* and cccl.tar.xz as for mlx_gpu.sh (docs/benchmarks.md, issue 14);
# cutlass.tar.xz = the same wheel's mlx/include/cute and mlx/include/cutlass (MLX compiles
# its quantized matmul for the GPU at run time and includes them);
# kiln-mlx.xz = `cargo build --release -p kiln-cli --features mlx`, stripped, xz;
# blas.tar.xz = `tar -chJf .device/blas.tar.xz -C .kiln/mlx blas`.
set -euo pipefail
stash="$HOME/kiln-mlx"
models="$HOME/vlm3b"
tokens="${TOKENS:-64}"
mkdir -p "$stash" "$models"
if [ -n "${STAGE:-}" ]; then
    cp .device/libmlx-part-aa .device/kiln-mlx.xz "$stash/"
    nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
    python3 scripts/device/vlm_gpu.py build .device/vlm3b "$models"
    ls -la "$stash" "$models"/*
    exit 0
fi
cp .device/libmlx-part-ab .device/cccl.tar.xz .device/cutlass.tar.xz .device/blas.tar.xz "$stash/"
. scripts/device/common.sh /tmp/kiln-vlm
. scripts/device/mlx_common.sh
for f in .device/vlm3b/*; do
    cp "$f" "$models/bf16/"
    cp "$f" "$models/q4/"
done
"$kiln" providers | tail -n 4
images="$PWD/.device/images"
python3 - "$images" > "$work/prompts.jsonl" <<'EOF'
import json, sys
content = [{"type": "image", "path": f"{sys.argv[1]}/{n}"} for n in ("landscape.png", "portrait.png")]
content.append({"type": "text", "text": "Compare these images."})
print(json.dumps({"id": "compare", "messages": [{"role": "user", "content": content}]}))
EOF
# The same two images with other questions (prompt lengths kiln has not run yet).
python3 - "$images" > "$work/questions.jsonl" <<'EOF2'
import json, sys
for i, q in enumerate(["What differs between these two pictures?", "Which image is brighter, and why do you think so?",
                       "Describe the colours in both images in one sentence each."]):
    content = [{"type": "image", "path": f"{sys.argv[1]}/{n}"} for n in ("landscape.png", "portrait.png")]
    content.append({"type": "text", "text": q})
    print(json.dumps({"id": f"q{i}", "messages": [{"role": "user", "content": content}]}))
EOF2
timeout 400 python3 scripts/device/vlm_gpu.py transformers "$models/bf16" "$images" "$tokens" \
    > "$out/transformers.json" 2> "$out/transformers.log" || tail -n 20 "$out/transformers.log"
# mlx-vlm on the same GPU: its wheel and MLX's Python bindings (.device/wheels) beside the
# libmlx unpacked above. With MLX's cuDNN attention (its default on CUDA) mlx-vlm 0.7.10
# dies of a SIGFPE inside the eval of its prefill (generate/ar.py), so it runs without.
if ls .device/wheels/*.whl > /dev/null 2>&1; then
    for w in .device/wheels/*.whl; do python3 -m zipfile -e "$w" "$work/py"; done
    cp -r "$work/py/mlx/." "$work/mlx/"
    for f in bf16 q4; do
        MLX_CUDA_USE_CUDNN_SDPA=0 PYTHONPATH="$work:$work/py" timeout 300 \
            python3 scripts/device/vlm_gpu.py mlxvlm "$models/$f" "$images" "$tokens" \
            > "$out/mlxvlm_$f.json" 2>> "$out/mlxvlm.log" || { echo "mlx-vlm $f failed"; tail -n 20 "$out/mlxvlm.log"; }
    done
fi
bench() { # NAME FOLDER CONCURRENCY [ARGS..]
    local name="$1" folder="$2" concurrency="$3"
    shift 3
    timeout 500 "$kiln" bench examples/vlm-mlx.toml --set "model.path=\"$folder\"" \
        --set 'model.device="cuda:0"' --set 'model.dtype="bf16"' --set "generate.max_new_tokens=$tokens" \
        --set generate.image_cache_mb=256 --requests "$((concurrency > 3 ? concurrency : 3))" \
        --concurrency "$concurrency" --json "$out/$name.json" "$@" 2>> "$out/bench.log" | tee -a "$out/bench.txt" \
        || { echo "$name failed"; tail -n 20 "$out/bench.log"; }
}
# Time to first token three ways: the image cache's "first time" (an engine's first
# request: every shape new to its thread — MLX keeps cuDNN's attention graphs per
# thread), warm (the same prompt again with both caches off: what transformers' best of
# three measures), and other questions about the same images (caches off: the tower's
# shapes warm, each prompt length new).
uncached=(--set generate.image_cache_mb=0 --set generate.prefix_cache_mb=0)
for f in bf16 q4; do
    echo "== $f"
    bench "kiln_$f" "$models/$f" 1 --texts "$work/prompts.jsonl"
    bench "kiln_${f}_warm" "$models/$f" 1 --texts "$work/prompts.jsonl" "${uncached[@]}"
    bench "kiln_${f}_new" "$models/$f" 1 --texts "$work/questions.jsonl" "${uncached[@]}"
done
bench kiln_q4_8 "$models/q4" 8
nvidia-smi --query-gpu=name,memory.used --format=csv
cat "$models/sizes.json"; echo
python3 scripts/device/vlm_gpu.py table "$out"
# Few files come back from a call: the results in one.
tar -cf "$out/results.tar" -C "$out" $(cd "$out" && ls *.json) && rm -f "$out"/*.json
