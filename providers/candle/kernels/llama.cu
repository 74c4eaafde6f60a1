// kiln's CUDA kernels for the candle provider's llama decoder on a GPU
// (src/dense_llama/gpu.rs). Built from candle's operations, a decoding step launched
// about 24 kernels a layer (copies of the heads out of the joined Q/K/V product, two
// rotary passes, two scatters into the key/value tensors, the queries scattered into
// slots, two products, scale, mask, softmax, a gather, SiLU, a product, adds, norms),
// and with a small model each costs more on the host than on the GPU. Here each step
// between two matrix products (which stay cuBLAS's, through candle) is one kernel:
// rotary + the keys and values into their slots, attention of every row over its slot,
// residual add + RMSNorm, SiLU(gate) · up. Arithmetic is f32 whatever the storage type;
// every kernel exists for __half, __nv_bfloat16 and float (NAME_f16, NAME_bf16,
// NAME_f32).

#include "common.cuh"

// One block per (row, head of Q, K or V): the row's query heads rotated (and scaled by
// `scale`) into `q_out` [rows, heads, head_dim]; its key heads rotated and its value
// heads copied into the row's slot at the row's position in `kc` / `vc` [slots,
// kv_heads, capacity, head_dim]. Rotation as GGUF's llama layout: pairs (2i, 2i + 1)
// by position · base^(-2i / head_dim), from the f32 tables `cos` / `sin` [position,
// head_dim / 2].
template <typename T>
__device__ void rope_into_cache(const T* qkv, const float* cos, const float* sin, const int64_t* positions,
                                const int64_t* slots, T* kc, T* vc, T* q_out, int heads, int kv_heads,
                                int head_dim, int capacity, float scale) {
    const int64_t r = blockIdx.x;
    const int h = blockIdx.y;
    const int64_t pos = positions[r], slot = slots[r];
    const int half = head_dim / 2;
    const T* src = qkv + (r * (heads + 2 * kv_heads) + h) * head_dim;
    if (h < heads + kv_heads) {
        const bool query = h < heads;
        T* dst = query ? q_out + (r * heads + h) * head_dim
                       : kc + ((slot * kv_heads + (h - heads)) * capacity + pos) * head_dim;
        const float by = query ? scale : 1.0f;
        for (int i = threadIdx.x; i < half; i += blockDim.x) {
            const float c = cos[pos * half + i], s = sin[pos * half + i];
            const float a = to_f32(src[2 * i]), b = to_f32(src[2 * i + 1]);
            dst[2 * i] = from_f32<T>((a * c - b * s) * by);
            dst[2 * i + 1] = from_f32<T>((a * s + b * c) * by);
        }
    } else {
        T* dst = vc + ((slot * kv_heads + (h - heads - kv_heads)) * capacity + pos) * head_dim;
        for (int i = threadIdx.x; i < head_dim; i += blockDim.x) dst[i] = src[i];
    }
}

// One block per (row, query head), at most 128 threads: the row's attention over the first `position + 1`
// keys of its slot (causal; a decoding row sees its whole sequence, a prompt's row the
// tokens up to its own). The queries come scaled. Scores in dynamic shared memory (the
// caller sizes it for the step's longest row), softmax in f32, then each thread sums
// one output dimension over the keys. Grouped-query: head h reads key/value head
// h / (heads / kv_heads).
template <typename T>
__device__ void slot_attention(const T* q, const T* kc, const T* vc, const int64_t* positions, const int64_t* slots,
                               T* out, int heads, int kv_heads, int head_dim, int capacity) {
    extern __shared__ float scores[];
    __shared__ float query[256];
    const int64_t r = blockIdx.x;
    const int h = blockIdx.y;
    const int kv = h / (heads / kv_heads);
    const int keys = (int)positions[r] + 1;
    const int64_t base = (slots[r] * kv_heads + kv) * (int64_t)capacity * head_dim;
    const T* qr = q + (r * heads + h) * head_dim;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) query[d] = to_f32(qr[d]);
    __syncthreads();
    float best = -__int_as_float(0x7f800000);
    for (int j = threadIdx.x; j < keys; j += blockDim.x) {
        const T* k = kc + base + (int64_t)j * head_dim;
        float s = 0.0f;
        for (int d = 0; d < head_dim; ++d) s += query[d] * to_f32(k[d]);
        scores[j] = s;
        best = fmaxf(best, s);
    }
    best = block_max(best);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < keys; j += blockDim.x) {
        const float e = __expf(scores[j] - best);
        scores[j] = e;
        sum += e;
    }
    const float inv = 1.0f / block_sum(sum);  // block_sum syncs: every score is written
    T* o = out + (r * heads + h) * head_dim;
    if (head_dim > blockDim.x) {
        for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
            const T* v = vc + base + d;
            float acc = 0.0f;
            for (int j = 0; j < keys; ++j) acc += scores[j] * to_f32(v[(int64_t)j * head_dim]);
            o[d] = from_f32<T>(acc * inv);
        }
        return;
    }
    // blockDim.x / head_dim groups of threads each sum every groups-th key for all
    // dimensions (a thread per dimension, reads coalesced), then the groups add up.
    __shared__ float part[128];
    const int groups = blockDim.x / head_dim;
    const int g = threadIdx.x / head_dim, d = threadIdx.x % head_dim;
    float acc = 0.0f;
    if (g < groups) {
        const T* v = vc + base + d;
        for (int j = g; j < keys; j += groups) acc += scores[j] * to_f32(v[(int64_t)j * head_dim]);
    }
    part[threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.x < head_dim) {
        float total = 0.0f;
        for (int k = 0; k < groups; ++k) total += part[k * head_dim + threadIdx.x];
        o[threadIdx.x] = from_f32<T>(total * inv);
    }
}

// One block per row: `out` [2, rows, cols] gets x + o (the new residual stream) and
// RMSNorm of it times `weight`.
template <typename T>
__device__ void add_rms_norm(const T* x, const T* o, const T* weight, T* out, int rows, int cols, float eps) {
    const int64_t r = blockIdx.x;
    const T* xr = x + r * cols;
    const T* orow = o + r * cols;
    T* sum_out = out + r * cols;
    T* norm_out = out + ((int64_t)rows + r) * cols;
    float squares = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        // The sum as stored, so the norm sees what the next layer adds to.
        const float v = to_f32(from_f32<T>(to_f32(xr[c]) + to_f32(orow[c])));
        sum_out[c] = from_f32<T>(v);
        squares += v * v;
    }
    const float inv = rsqrtf(block_sum(squares) / cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x)
        norm_out[c] = from_f32<T>(to_f32(sum_out[c]) * inv * to_f32(weight[c]));
}

// `out` [rows, cols] = SiLU(gate) · up of `gate_up` [rows, 2 · cols] (gate | up).
template <typename T>
__device__ void swiglu(const T* gate_up, T* out, int64_t rows, int cols) {
    const int64_t total = rows * cols;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = i / cols, c = i % cols;
        const float g = to_f32(gate_up[r * 2 * cols + c]), u = to_f32(gate_up[r * 2 * cols + cols + c]);
        out[i] = from_f32<T>(g / (1.0f + __expf(-g)) * u);
    }
}

#define KERNELS(T, SUFFIX)                                                                                     \
    extern "C" __global__ void rope_into_cache_##SUFFIX(const T* qkv, const float* cos, const float* sin,     \
                                                        const int64_t* positions, const int64_t* slots, T* kc, \
                                                        T* vc, T* q_out, int heads, int kv_heads,              \
                                                        int head_dim, int capacity, float scale) {             \
        rope_into_cache(qkv, cos, sin, positions, slots, kc, vc, q_out, heads, kv_heads, head_dim, capacity,   \
                        scale);                                                                                \
    }                                                                                                          \
    extern "C" __global__ void slot_attention_##SUFFIX(const T* q, const T* kc, const T* vc,                  \
                                                       const int64_t* positions, const int64_t* slots, T* out, \
                                                       int heads, int kv_heads, int head_dim, int capacity) {  \
        slot_attention(q, kc, vc, positions, slots, out, heads, kv_heads, head_dim, capacity);                 \
    }                                                                                                          \
    extern "C" __global__ void add_rms_norm_##SUFFIX(const T* x, const T* o, const T* weight, T* out, int rows, \
                                                     int cols, float eps) {                                    \
        add_rms_norm(x, o, weight, out, rows, cols, eps);                                                      \
    }                                                                                                          \
    extern "C" __global__ void swiglu_##SUFFIX(const T* gate_up, T* out, int64_t rows, int cols) {            \
        swiglu(gate_up, out, rows, cols);                                                                      \
    }

KERNELS(__half, f16)
KERNELS(__nv_bfloat16, bf16)
KERNELS(float, f32)
