"""Reads a .safetensors file into numpy arrays (numpy only): F32, F16 and I64 as they
are, BF16 widened to float32 (numpy has no bfloat16). Shared by kiln's model scripts.
"""
import json
import struct

import numpy as np

_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64}


def load(path):
    """{tensor name: array}, in the file's order."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    tensors = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        if meta["dtype"] == "BF16":
            array = (np.frombuffer(data[start:end], dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
        elif meta["dtype"] in _DTYPES:
            array = np.frombuffer(data[start:end], dtype=_DTYPES[meta["dtype"]])
        else:
            raise SystemExit(f"{path}: tensor {name} has dtype {meta['dtype']}, not F32, F16, BF16 or I64")
        tensors[name] = array.reshape(meta["shape"])
    return tensors
