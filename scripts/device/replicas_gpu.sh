#!/usr/bin/env bash
# Replicas and longer runs on the GPU machine (device). Carried in .device/:
# kiln-cuda.xz, kiln-tch.xz and minilm-f16/ (see cuda_gpu.sh and tch_gpu.sh).
#
#   bash scripts/device/replicas_gpu.sh        # figures under $OUT
#
# 1. candle f16 on cuda:0: two replicas on the one GPU (model.gpu_ids = [0, 0]) against
#    one (`--compare model.gpu_ids=[]`), 16384 128-token texts at batch 256;
# 2. tch f16 on cuda:0: 32768 texts, one replica and two;
# 3. sentence-transformers f16 on the same 32768 texts, for the ratios.
. scripts/device/common.sh /tmp/kiln-replicas-work kiln-cuda kiln-tch
model=.device/minilm-f16
python3 scripts/trace_bert_torchscript.py "$model" "$work/minilm-tch"
$helpers texts "$work" 32768
common=(--set 'model.device="cuda:0"' --set 'model.dtype="f16"' --set batching.max_batch_size=256
        --set batching.max_wait_ms=5 --set batching.queue_capacity=8192 --set text.max_length=128
        --set cache.enabled=false --texts "$work/long.txt" --concurrency 1024)
"$work/kiln-cuda" bench examples/embed.toml --requests 16384 "${common[@]}" --set "model.path=\"$model\"" \
    --set 'model.gpu_ids=[0, 0]' --compare 'model.gpu_ids=[]' --json "$out/candle_replicas.json"
"$work/kiln-tch" bench examples/embed-tch.toml --requests 32768 "${common[@]}" \
    --set "model.path=\"$work/minilm-tch\"" --json "$out/tch_long.json"
"$work/kiln-tch" bench examples/embed-tch.toml --requests 32768 "${common[@]}" \
    --set "model.path=\"$work/minilm-tch\"" --set 'model.gpu_ids=[0, 0]' --json "$out/tch_long_2replicas.json"
$helpers eager "$model" "$work/long.txt" 2 "$out/eager_32768.json" \
    "$out/candle_replicas.json" "$out/tch_long.json" "$out/tch_long_2replicas.json"
