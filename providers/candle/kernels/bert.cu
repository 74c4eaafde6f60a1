// kiln's CUDA kernels for the candle provider's BERT encoder (src/cuda.rs).
//
// candle's own element-wise kernels take the general strided path for every broadcast
// (a bias over rows, a mask over heads) and its softmax is five passes; on an H200 they
// held a MiniLM batch of 256 × 128 tokens to 47 ms, 30 of them in broadcast adds and
// divides. These fuse each step between two matrix products (which stay cuBLAS's,
// through candle) into one pass over memory. Arithmetic is f32 whatever the storage
// type; every kernel exists for __half, __nv_bfloat16 and float, named NAME_f16,
// NAME_bf16 and NAME_f32 as candle names its own.

#include "common.cuh"

// LayerNorm of one row whose values `value(c)` gives, written through `store`; one
// block per row. Two passes over the row (mean, then variance about it), as the
// definition; the row is re-read from cache rather than held.
template <typename T, typename Value>
__device__ void layer_norm_row(Value value, T* out, const T* gamma, const T* beta, int cols, float eps) {
    float sum = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) sum += value(c);
    const float mean = block_sum(sum) / cols;
    float squares = 0.0f;
    for (int c = threadIdx.x; c < cols; c += blockDim.x) {
        const float d = value(c) - mean;
        squares += d * d;
    }
    const float inv = rsqrtf(block_sum(squares) / cols + eps);
    for (int c = threadIdx.x; c < cols; c += blockDim.x)
        out[c] = from_f32<T>((value(c) - mean) * inv * to_f32(gamma[c]) + to_f32(beta[c]));
}

// Embeddings: out[r] = LayerNorm(word[ids[r]] + position[r % sequence] + type[types[r]]).
// One block per token row. Ids out of range read row 0 (the caller validates them).
template <typename T>
__device__ void embed(const int64_t* ids, const int64_t* types, const T* word, const T* position,
                      const T* token_type, const T* gamma, const T* beta, T* out, int sequence,
                      int hidden, int vocab, int type_vocab, float eps) {
    const int row = blockIdx.x;
    int64_t id = ids[row], type = types[row];
    if (id < 0 || id >= vocab) id = 0;
    if (type < 0 || type >= type_vocab) type = 0;
    const T* w = word + id * hidden;
    const T* p = position + (int64_t)(row % sequence) * hidden;
    const T* t = token_type + type * hidden;
    auto value = [&](int c) { return to_f32(w[c]) + to_f32(p[c]) + to_f32(t[c]); };
    layer_norm_row(value, out + (int64_t)row * hidden, gamma, beta, hidden, eps);
}

// out[r] = LayerNorm(x[r] + bias + residual[r]): a dense layer's bias, the residual
// connection and the norm after it. One block per row.
template <typename T>
__device__ void bias_residual_norm(const T* x, const T* bias, const T* residual, const T* gamma,
                                   const T* beta, T* out, int cols, float eps) {
    const int64_t base = (int64_t)blockIdx.x * cols;
    auto value = [&](int c) { return to_f32(x[base + c]) + to_f32(bias[c]) + to_f32(residual[base + c]); };
    layer_norm_row(value, out + base, gamma, beta, cols, eps);
}

// Index arithmetic below stays in 32 bits and away from division by a variable where
// it can: on the GPU a 64-bit division costs more than the memory traffic of these
// kernels (the first version, one flat 64-bit index per element, took 6x its bandwidth
// time). Each thread takes eight consecutive columns (hidden sizes, head sizes and
// feed-forward widths must be multiples of 8; the provider checks at load), a block's
// threads span the columns, and token rows go on the grid's y dimension, a block
// taking every gridDim.y-th row.

// out = gelu(x + bias), the exact (erf) GELU; grid (column blocks, rows).
template <typename T>
__device__ void bias_gelu(const T* x, const T* bias, T* out, int rows, int cols) {
    const int c = 8 * (blockIdx.x * blockDim.x + threadIdx.x);
    if (c >= cols) return;
    float b[8], v[8];
    load8(bias + c, b);
    for (int row = blockIdx.y; row < rows; row += gridDim.y) {
        const int64_t i = (int64_t)row * cols + c;
        load8(x + i, v);
#pragma unroll
        for (int k = 0; k < 8; ++k) {
            const float u = v[k] + b[k];
            v[k] = 0.5f * u * (1.0f + erff(u * 0.70710678118654752f));
        }
        store8(out + i, v);
    }
}

// The fused QKV product [batch * sequence, 3 * hidden] (columns q | k | v) plus its
// bias, split into heads: out [3, batch, heads, sequence, head_dim], q scaled by
// `scale`. Grid (column blocks of 3 * hidden, token rows).
template <typename T>
__device__ void split_heads(const T* qkv, const T* bias, T* out, int batch, int sequence, int heads,
                            int head_dim, float scale) {
    const int hidden = heads * head_dim;
    const int column = 8 * (blockIdx.x * blockDim.x + threadIdx.x);
    if (column >= 3 * hidden) return;
    const int which = column / hidden, within = column - which * hidden;
    const int h = within / head_dim, j = within - h * head_dim;
    const float factor = which == 0 ? scale : 1.0f;
    float add[8], v[8];
    load8(bias + column, add);
    for (int row = blockIdx.y; row < batch * sequence; row += gridDim.y) {  // row = b * sequence + s
        const int b = row / sequence, s = row - b * sequence;
        load8(qkv + (int64_t)row * 3 * hidden + column, v);
#pragma unroll
        for (int k = 0; k < 8; ++k) v[k] = (v[k] + add[k]) * factor;
        store8(out + (((int64_t)(which * batch + b) * heads + h) * sequence + s) * head_dim + j, v);
    }
}

// Attention probabilities: each row of scores [batch, heads, sequence, sequence]
// softmaxed over the keys the mask [batch, sequence] (1 real, 0 padding) keeps. A row
// whose keys are all padding (a batch's added rows) gets equal weights, as an additive
// finite minimum gives. One warp per row.
template <typename T>
__device__ void masked_softmax(const T* scores, const float* mask, T* out, int64_t rows, int heads, int sequence) {
    const int64_t row = (int64_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const int b = row / ((int64_t)heads * sequence);
    const T* x = scores + row * sequence;
    T* y = out + row * sequence;
    const float* m = mask + (int64_t)b * sequence;
    const float excluded = -1e30f;
    if (sequence % 8 == 0) {
        // Eight keys a lane, 16-byte loads; re-read from cache between the passes.
        float v[8], w[8];
        float top = -INFINITY;
        for (int c = 8 * lane; c < sequence; c += 256) {
            load8(x + c, v);
            load8(m + c, w);
#pragma unroll
            for (int k = 0; k < 8; ++k) top = fmaxf(top, w[k] != 0.0f ? v[k] : excluded);
        }
        top = warp_max(top);
        float sum = 0.0f;
        for (int c = 8 * lane; c < sequence; c += 256) {
            load8(x + c, v);
            load8(m + c, w);
#pragma unroll
            for (int k = 0; k < 8; ++k) sum += __expf((w[k] != 0.0f ? v[k] : excluded) - top);
        }
        const float inv = 1.0f / warp_sum(sum);
        for (int c = 8 * lane; c < sequence; c += 256) {
            load8(x + c, v);
            load8(m + c, w);
#pragma unroll
            for (int k = 0; k < 8; ++k) v[k] = __expf((w[k] != 0.0f ? v[k] : excluded) - top) * inv;
            store8(y + c, v);
        }
        return;
    }
    float top = -INFINITY;
    for (int c = lane; c < sequence; c += 32) top = fmaxf(top, m[c] != 0.0f ? to_f32(x[c]) : excluded);
    top = warp_max(top);
    float sum = 0.0f;
    for (int c = lane; c < sequence; c += 32) sum += __expf((m[c] != 0.0f ? to_f32(x[c]) : excluded) - top);
    const float inv = 1.0f / warp_sum(sum);
    for (int c = lane; c < sequence; c += 32)
        y[c] = from_f32<T>(__expf((m[c] != 0.0f ? to_f32(x[c]) : excluded) - top) * inv);
}

// Heads back together: ctx [batch, heads, sequence, head_dim] -> out [batch * sequence,
// hidden]. Grid (column blocks of hidden, token rows).
template <typename T>
__device__ void merge_heads(const T* ctx, T* out, int rows, int sequence, int heads, int head_dim) {
    const int hidden = heads * head_dim;
    const int column = 8 * (blockIdx.x * blockDim.x + threadIdx.x);
    if (column >= hidden) return;
    const int h = column / head_dim, j = column - h * head_dim;
    float v[8];
    for (int row = blockIdx.y; row < rows; row += gridDim.y) {
        const int b = row / sequence, s = row - b * sequence;
        load8(ctx + (((int64_t)b * heads + h) * sequence + s) * head_dim + j, v);
        store8(out + (int64_t)row * hidden + column, v);
    }
}

// The embedding head: hidden [batch, sequence, width] and mask [batch, sequence] to f32
// [batch, width], with kiln_core::pool_tokens' arithmetic. pooling: 0 CLS, 1 mean,
// 2 mean / sqrt(tokens), 3 max (a text of no real tokens gets zeros). One block per text.
template <typename T>
__device__ void pool(const T* hidden, const float* mask, float* out, int sequence, int width, int pooling,
                     int normalize) {
    const int b = blockIdx.x;
    const T* x = hidden + (int64_t)b * sequence * width;
    const float* m = mask + (int64_t)b * sequence;
    float count = 0.0f;
    for (int s = 0; s < sequence; ++s) count += m[s];
    float squares = 0.0f;
    for (int c = threadIdx.x; c < width; c += blockDim.x) {
        float v;
        if (pooling == 0) {
            v = to_f32(x[c]);
        } else if (pooling == 3) {
            v = -INFINITY;
            for (int s = 0; s < sequence; ++s)
                if (m[s] != 0.0f) v = fmaxf(v, to_f32(x[(int64_t)s * width + c]));
            if (count == 0.0f) v = 0.0f;
        } else {
            v = 0.0f;
            for (int s = 0; s < sequence; ++s) v += to_f32(x[(int64_t)s * width + c]) * m[s];
            const float n = fmaxf(count, 1e-9f);
            v /= pooling == 1 ? n : sqrtf(n);
        }
        out[(int64_t)b * width + c] = v;
        squares += v * v;
    }
    if (!normalize) return;
    const float inv = 1.0f / fmaxf(sqrtf(block_sum(squares)), 1e-12f);
    for (int c = threadIdx.x; c < width; c += blockDim.x) out[(int64_t)b * width + c] *= inv;
}

#define KERNELS(T, SUFFIX)                                                                                   \
    extern "C" __global__ void embed_##SUFFIX(const int64_t* ids, const int64_t* types, const T* word,       \
                                              const T* position, const T* token_type, const T* gamma,       \
                                              const T* beta, T* out, int sequence, int hidden, int vocab,   \
                                              int type_vocab, float eps) {                                  \
        embed(ids, types, word, position, token_type, gamma, beta, out, sequence, hidden, vocab, type_vocab, \
              eps);                                                                                          \
    }                                                                                                        \
    extern "C" __global__ void bias_residual_norm_##SUFFIX(const T* x, const T* bias, const T* residual,    \
                                                           const T* gamma, const T* beta, T* out, int cols, \
                                                           float eps) {                                     \
        bias_residual_norm(x, bias, residual, gamma, beta, out, cols, eps);                                  \
    }                                                                                                        \
    extern "C" __global__ void bias_gelu_##SUFFIX(const T* x, const T* bias, T* out, int rows, int cols) {  \
        bias_gelu(x, bias, out, rows, cols);                                                                 \
    }                                                                                                        \
    extern "C" __global__ void split_heads_##SUFFIX(const T* qkv, const T* bias, T* out, int batch,          \
                                                    int sequence, int heads, int head_dim, float scale) {    \
        split_heads(qkv, bias, out, batch, sequence, heads, head_dim, scale);                                \
    }                                                                                                        \
    extern "C" __global__ void masked_softmax_##SUFFIX(const T* scores, const float* mask, T* out,           \
                                                       int64_t rows, int heads, int sequence) {              \
        masked_softmax(scores, mask, out, rows, heads, sequence);                                            \
    }                                                                                                        \
    extern "C" __global__ void merge_heads_##SUFFIX(const T* ctx, T* out, int rows, int sequence, int heads, \
                                                    int head_dim) {                                          \
        merge_heads(ctx, out, rows, sequence, heads, head_dim);                                              \
    }                                                                                                        \
    extern "C" __global__ void pool_##SUFFIX(const T* hidden, const float* mask, float* out, int sequence,   \
                                             int width, int pooling, int normalize) {                        \
        pool(hidden, mask, out, sequence, width, pooling, normalize);                                        \
    }

KERNELS(__half, f16)
KERNELS(__nv_bfloat16, bf16)
KERNELS(float, f32)
