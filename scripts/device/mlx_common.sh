# Sourced by the MLX scripts in scripts/device/ after common.sh: unpacks what the calls
# staged in $stash (libmlx of mlx-cuda-13 in parts, OpenBLAS, the CUDA C++ headers MLX's
# run-time compiler includes — cccl, and cute/cutlass when staged — and kiln built with
# the mlx feature) into $work, and points the loader and MLX at them. Sets $kiln.
cat "$stash"/libmlx-part-* | tar -xJf - -C "$work"
tar -xJf "$stash/blas.tar.xz" -C "$work"
tar -xJf "$stash/cccl.tar.xz" -C "$work"
if [ -f "$stash/cutlass.tar.xz" ]; then tar -xJf "$stash/cutlass.tar.xz" -C "$work"; fi
xz -dc "$stash/kiln-mlx.xz" > "$work/kiln" && chmod +x "$work/kiln"
# libmlx's rpath looks for the CUDA libraries in ../../nvidia: the machine's torch has them.
ln -sfn "$site/nvidia" "$work/nvidia"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"   # MLX compiles kernels with NVRTC
export LD_LIBRARY_PATH="$work/mlx/lib:$work/blas:$LD_LIBRARY_PATH"
kiln="$work/kiln"
