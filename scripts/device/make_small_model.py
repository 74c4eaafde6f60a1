"""Writes a small BERT folder for runs on the device machine, where the 87 MiB MiniLM
does not fit the 64 MiB carried with a command: MiniLM's first N layers, weights in
float16, the same tokenizer and pooling files. Not MiniLM's embeddings — a real model
of the same shape family, for profiling and plumbing checks only.

Usage: make_small_model.py MINILM_DIR OUT_DIR [LAYERS]   (needs numpy)
"""
import json
import pathlib
import struct
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
import model_folder  # noqa: E402
import safetensors_np  # noqa: E402

src, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
layers = int(sys.argv[3]) if len(sys.argv) > 3 else 2

tensors = {
    name: array if array.dtype == np.int64 else array.astype(np.float16)
    for name, array in safetensors_np.load(src / "model.safetensors").items()
    if not (name.startswith("encoder.layer.") and int(name.split(".")[2]) >= layers)
}

new_header, blobs, offset = {}, [], 0
for name, array in tensors.items():
    blob = array.tobytes()
    new_header[name] = {
        "dtype": {np.float16: "F16", np.int64: "I64"}[array.dtype.type],
        "shape": list(array.shape),
        "data_offsets": [offset, offset + len(blob)],
    }
    blobs.append(blob)
    offset += len(blob)
encoded = json.dumps(new_header).encode()
encoded += b" " * (-len(encoded) % 8)

out.mkdir(parents=True, exist_ok=True)
with open(out / "model.safetensors", "wb") as f:
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    for blob in blobs:
        f.write(blob)
config = json.loads((src / "config.json").read_text())
config["num_hidden_layers"] = layers
(out / "config.json").write_text(json.dumps(config, indent=2))
model_folder.copy_serving_files(src, out, skip=["config.json"])
print(f"{out}: {layers} layers, {offset / 2**20:.1f} MiB of weights")
