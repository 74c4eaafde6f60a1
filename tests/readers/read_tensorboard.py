"""Reads a TensorBoard run folder with TensorBoard's own event reader and prints what it
sees as JSON: {"scalars": {tag: [[step, value], ...]}, "texts": {tag: [text, ...]}}.

Usage: read_tensorboard.py RUN_DIR
"""
import json
import sys

from tensorboard.backend.event_processing import event_accumulator

# size_guidance 0 = keep everything (the default samples scalars down to 10 000).
acc = event_accumulator.EventAccumulator(
    sys.argv[1], size_guidance={event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0}
)
acc.Reload()
tags = acc.Tags()
out = {"scalars": {}, "texts": {}}
for tag in tags["scalars"]:
    out["scalars"][tag] = [[e.step, e.value] for e in acc.Scalars(tag)]
for tag in tags["tensors"]:
    texts = []
    for e in acc.Tensors(tag):
        values = list(e.tensor_proto.string_val)
        texts.extend(v.decode("utf-8") for v in values)
    out["texts"][tag] = texts
json.dump(out, sys.stdout)
