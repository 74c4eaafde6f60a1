// Helpers shared by kiln's CUDA kernels (bert.cu, llama.cu): conversions to and from f32
// for the three storage types, warp and block reductions, 16-byte loads and stores.
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
    return __float2bfloat16(x);
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, offset));
    return v;
}

// Eight consecutive elements, loaded and stored 16 bytes at a time for 2-byte types
// (one 2-byte access per thread left these kernels at a fifth of the memory's
// bandwidth). The address must be aligned to 8 elements.
template <typename T>
__device__ __forceinline__ void load8(const T* p, float out[8]) {
    if constexpr (sizeof(T) == 2) {
        const uint4 raw = *reinterpret_cast<const uint4*>(p);
        const T* h = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int k = 0; k < 8; ++k) out[k] = to_f32(h[k]);
    } else {
        const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
        out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w, out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
    }
}

template <typename T>
__device__ __forceinline__ void store8(T* p, const float in[8]) {
    if constexpr (sizeof(T) == 2) {
        uint4 raw;
        T* h = reinterpret_cast<T*>(&raw);
#pragma unroll
        for (int k = 0; k < 8; ++k) h[k] = from_f32<T>(in[k]);
        *reinterpret_cast<uint4*>(p) = raw;
    } else {
        reinterpret_cast<float4*>(p)[0] = make_float4(in[0], in[1], in[2], in[3]);
        reinterpret_cast<float4*>(p)[1] = make_float4(in[4], in[5], in[6], in[7]);
    }
}

// `warp_op` (warp_sum or warp_max) over a block of up to 1024 threads, `identity` for
// the lanes past the last warp; every thread gets the result.
template <typename WarpOp>
__device__ __forceinline__ float block_reduce(float v, WarpOp warp_op, float identity) {
    __shared__ float partial[32];
    __shared__ float total;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    v = warp_op(v);
    if (lane == 0) partial[warp] = v;
    __syncthreads();
    if (warp == 0) {
        const int warps = (blockDim.x + 31) / 32;
        float w = lane < warps ? partial[lane] : identity;
        w = warp_op(w);
        if (lane == 0) total = w;
    }
    __syncthreads();
    const float result = total;
    __syncthreads();  // `partial` and `total` are reused by the next call
    return result;
}

// Sum over a block; every thread gets the total.
__device__ float block_sum(float v) { return block_reduce(v, warp_sum, 0.0f); }

// Maximum over a block; every thread gets it.
__device__ float block_max(float v) { return block_reduce(v, warp_max, -__int_as_float(0x7f800000)); }
