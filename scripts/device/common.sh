# Sourced by the scripts in scripts/device/: unpacks carried binaries and points the
# loader at the GPU machine's own torch (libtorch, and cuBLAS / cuRAND / NVRTC / the CUDA
# runtime in its nvidia/cu13/lib; libcuda comes from the driver).
#
#   . scripts/device/common.sh WORK BIN..     unpacks .device/BIN.xz into WORK/BIN
set -euo pipefail
out="${OUT:-/tmp/kiln-out}"
work="$1"
shift
mkdir -p "$out" "$work"
# The device brings back only a few files a call: on the device (where $OUT is set) every
# file the script wrote goes into one archive, $OUT/all.tgz, when it exits.
if [ -n "${OUT:-}" ]; then
    trap 'cd "$out" && tar -czf /tmp/kiln-out-all.tgz . && find . -mindepth 1 -delete && mv /tmp/kiln-out-all.tgz all.tgz' EXIT
fi
for bin in "$@"; do
    xz -dc ".device/$bin.xz" > "$work/$bin" && chmod +x "$work/$bin"
done
site="$(python3 -c 'import torch, pathlib; print(pathlib.Path(torch.__file__).parent.parent)')"
export LD_LIBRARY_PATH="$site/torch/lib:$site/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
python3 -c 'import torch, sentence_transformers as st; print("torch", torch.__version__, "sentence-transformers", st.__version__, torch.cuda.get_device_name(0))'
helpers="python3 scripts/device/helpers.py"
