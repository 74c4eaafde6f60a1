#!/usr/bin/env bash
# candle's embeddings on CUDA with texts that are not plain ASCII, where the tokenizer
# threads can be what limits the GPU: kiln built before the pool's WordPiece path took
# such texts (kiln-cuda-old.xz) against kiln built after it (kiln-cuda.xz), alternated,
# next to the model-only eager ceiling, in one call. Plain ASCII texts once with each,
# for reference. Carried in .device/: kiln-cuda.xz, kiln-cuda-old.xz, minilm-f16/
# (weights made here by helpers.py random_bert, as for candle_kernels.sh).
#
#   python3 scripts/device/helpers.py random_bert .device/minilm-f16 && ROUNDS=2 bash scripts/device/tokenizer_gpu.sh
. scripts/device/common.sh /tmp/kiln-tokenizer kiln-cuda kiln-cuda-old
model=.device/minilm-f16
bench() { # BIN TEXTS JSON
    timeout 150 "$work/$1" bench examples/embed.toml --texts "$2" --concurrency 1024 --requests 32768 \
        --set "model.path=\"$model\"" --set 'model.device="cuda:0"' --set 'model.dtype="f16"' \
        --set batching.max_batch_size=256 --set batching.max_wait_ms=2 --set batching.queue_capacity=8192 \
        --set text.max_length=128 --set cache.enabled=false --json "$out/$3" 2>> "$out/bench.log" \
        | tee -a "$out/bench.txt"
}
mkdir -p "$work/ascii" "$work/mixed"
python3 scripts/device/helpers.py texts "$work/ascii" 8192
python3 scripts/device/helpers.py texts "$work/mixed" 8192 mixed
for round in $(seq "${ROUNDS:-1}"); do
    echo "== round $round, mixed-script texts: before, after"
    bench kiln-cuda-old "$work/mixed/long.txt" "mixed_old_r$round.json" || true
    bench kiln-cuda "$work/mixed/long.txt" "mixed_new_r$round.json" || true
done
echo "== ASCII texts: before, after"
bench kiln-cuda-old "$work/ascii/long.txt" ascii_old.json || true
bench kiln-cuda "$work/ascii/long.txt" ascii_new.json || true
COMPILE_MODES=none python3 scripts/device/helpers.py ceiling "$model" "$work/mixed/long.txt" 5 "$out/ceiling.json" "" \
    "$out"/*_r*.json "$out"/ascii_*.json | tee "$out/ceiling.txt"
