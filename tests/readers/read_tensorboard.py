"""Reads a TensorBoard run folder with TensorBoard's own event reader and prints what it
sees as JSON: {"scalars": {tag: [[step, value], ...]}, "texts": {tag: [text, ...]},
"images": {tag: [{"step", "width", "height", "format", "bytes"}, ...]}} (format: the
encoded image's first bytes, "GIF89a" or "PNG").

Usage: read_tensorboard.py RUN_DIR
"""
import json
import sys

from tensorboard.backend.event_processing import event_accumulator

# size_guidance 0 = keep everything (the default samples scalars down to 10 000).
acc = event_accumulator.EventAccumulator(
    sys.argv[1],
    size_guidance={event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0, event_accumulator.IMAGES: 0},
)
acc.Reload()
tags = acc.Tags()
out = {"scalars": {}, "texts": {}, "images": {}}
for tag in tags["scalars"]:
    out["scalars"][tag] = [[e.step, e.value] for e in acc.Scalars(tag)]
for tag in tags["tensors"]:
    texts = []
    for e in acc.Tensors(tag):
        values = list(e.tensor_proto.string_val)
        texts.extend(v.decode("utf-8") for v in values)
    out["texts"][tag] = texts
for tag in tags["images"]:
    out["images"][tag] = [
        {
            "step": e.step,
            "width": e.width,
            "height": e.height,
            "format": "GIF89a" if e.encoded_image_string[:6] == b"GIF89a" else e.encoded_image_string[1:4].decode("ascii", "replace"),
            "bytes": len(e.encoded_image_string),
        }
        for e in acc.Images(tag)
    ]
json.dump(out, sys.stdout)
