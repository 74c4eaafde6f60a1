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

// bias_residual_norm with one warp a row (four rows a block) for rows of up to 1024
// values, held in registers between the passes: the block-a-row version spent most of
// its time in its two block-wide reductions (0.78 ms of a MiniLM batch of 256 x 128
// tokens on an H100, against ~0.3 ms its bytes need). Sums in another order than the
// block version's, so results may differ in the last bit.
template <typename T>
__device__ void bias_residual_norm_warp(const T* x, const T* bias, const T* residual, const T* gamma,
                                        const T* beta, T* out, int rows, int cols, float eps) {
    const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;
    const int64_t base = (int64_t)row * cols;
    float v[4][8];
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int c = 8 * lane + 256 * i;
        if (c < cols) {
            float a[8], b[8], r[8];
            load8(x + base + c, a);
            load8(bias + c, b);
            load8(residual + base + c, r);
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                v[i][k] = a[k] + b[k] + r[k];
                sum += v[i][k];
            }
        }
    }
    const float mean = warp_sum(sum) / cols;
    float squares = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        if (8 * lane + 256 * i < cols) {
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                const float d = v[i][k] - mean;
                squares += d * d;
            }
        }
    }
    const float inv = rsqrtf(warp_sum(squares) / cols + eps);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int c = 8 * lane + 256 * i;
        if (c < cols) {
            float g[8], b[8];
            load8(gamma + c, g);
            load8(beta + c, b);
#pragma unroll
            for (int k = 0; k < 8; ++k) v[i][k] = (v[i][k] - mean) * inv * g[k] + b[k];
            store8(out + base + c, v[i]);
        }
    }
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

// Attention in one kernel, for head_dim 32 and up to 128 tokens (f16 and bf16, on
// tensor cores): from the QKV product [batch * sequence, 3 * hidden] and its bias
// straight to the context [batch * sequence, hidden] with heads merged — what
// split_heads, the scores' product, masked_softmax, the context's product and
// merge_heads do in five launches, whose scores [batch, heads, sequence, sequence] went
// through memory three times. One block of four warps per (text, head): K and V (bias
// added; V transposed) in shared memory once; each warp takes 16 queries at a time and
// keeps their scores, probabilities and context in registers, as `mma.sync` m16n8k16
// lays them out (the scores' accumulator tiles are, two by two, the probabilities'
// operand tiles of the product with V). Scores are rounded to the storage type before
// the softmax and probabilities before their product with V, as the unfused path
// stores them; sums are f32. Padding keys and keys past the text's length are excluded
// as masked_softmax excludes them.
//
// (A first version on WMMA's opaque fragments went through shared memory for the
// softmax: 0.29 ms a layer for 256 x 128 tokens on an H100, against 0.37 ms for the five
// launches it replaced.)
constexpr int FA_D = 32, FA_KEYS = 128, FA_WARPS = 4;

template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <> __device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
}
template <> __device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
}

// d += a (16 x 16, row-major fragment) * b (16 x 8, column-major fragment), f32 sums.
template <typename T> __device__ __forceinline__ void mma16816(float d[4], const uint32_t a[4], const uint32_t b[2]);
template <> __device__ __forceinline__ void mma16816<__half>(float d[4], const uint32_t a[4], const uint32_t b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float d[4], const uint32_t a[4], const uint32_t b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <typename T>
__device__ void fused_attention(const T* qkv, const T* bias, const float* mask, T* out, int sequence, int heads,
                                float scale) {
    // Rows padded by 8 values (16 bytes): a fragment's eight rows then start in
    // different banks.
    constexpr int KS = FA_D + 8, VS = FA_KEYS + 8;
    __shared__ __align__(16) T ks[FA_KEYS * KS];   // K [key][d]
    __shared__ __align__(16) T vt[FA_D * VS];      // V transposed [d][key]
    __shared__ float ms[FA_KEYS];
    const int hidden = heads * FA_D;
    const int b = blockIdx.x / heads, h = blockIdx.x - b * heads;
    const int keys = (sequence + 15) / 16 * 16;
    const int64_t first = (int64_t)b * sequence;
    for (int i = threadIdx.x; i < keys * (FA_D / 8); i += blockDim.x) {
        const int row = i / (FA_D / 8), c = (i % (FA_D / 8)) * 8;
        float k[8] = {0, 0, 0, 0, 0, 0, 0, 0}, v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        if (row < sequence) {
            const T* at = qkv + (first + row) * 3 * hidden + h * FA_D + c;
            float kadd[8], vadd[8];
            load8(at + hidden, k);
            load8(at + 2 * hidden, v);
            load8(bias + hidden + h * FA_D + c, kadd);
            load8(bias + 2 * hidden + h * FA_D + c, vadd);
#pragma unroll
            for (int j = 0; j < 8; ++j) k[j] += kadd[j], v[j] += vadd[j];
        }
        store8(ks + row * KS + c, k);
#pragma unroll
        for (int j = 0; j < 8; ++j) vt[(c + j) * VS + row] = from_f32<T>(v[j]);
    }
    for (int i = threadIdx.x; i < keys; i += blockDim.x) ms[i] = i < sequence ? mask[first + i] : 0.0f;
    __syncthreads();
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    // A fragment's rows r and r + 8, its column pair c, c + 1 (and c + 8, c + 9).
    const int r = lane / 4, c = (lane % 4) * 2;
    const float excluded = -1e30f;
    for (int q0 = warp * 16; q0 < keys; q0 += FA_WARPS * 16) {
        // Q (bias added, scaled) as two 16 x 16 operand tiles over head_dim.
        uint32_t qa[2][4];
#pragma unroll
        for (int kk = 0; kk < 2; ++kk) {
#pragma unroll
            for (int part = 0; part < 4; ++part) {
                const int row = r + (part % 2) * 8, col = kk * 16 + c + (part / 2) * 8;
                float lo = 0.0f, hi = 0.0f;
                if (q0 + row < sequence) {
                    const T* at = qkv + (first + q0 + row) * 3 * hidden + h * FA_D + col;
                    lo = (to_f32(at[0]) + to_f32(bias[h * FA_D + col])) * scale;
                    hi = (to_f32(at[1]) + to_f32(bias[h * FA_D + col + 1])) * scale;
                }
                qa[kk][part] = pack2<T>(lo, hi);
            }
        }
        // Scores: 16 tiles of 8 keys; s[t] holds rows r, r + 8 at keys 8t + c, + 1.
        float s[FA_KEYS / 8][4];
        float top0 = -INFINITY, top1 = -INFINITY;
#pragma unroll
        for (int t = 0; t < FA_KEYS / 8; ++t) {
            s[t][0] = s[t][1] = s[t][2] = s[t][3] = 0.0f;
            if (8 * t < keys) {
#pragma unroll
                for (int kk = 0; kk < 2; ++kk) {
                    const T* kr = ks + (8 * t + r) * KS + kk * 16 + c;
                    const uint32_t kb[2] = {*reinterpret_cast<const uint32_t*>(kr),
                                            *reinterpret_cast<const uint32_t*>(kr + 8)};
                    mma16816<T>(s[t], qa[kk], kb);
                }
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int key = 8 * t + c + (e % 2);
                    // Rounded as the unfused path stores scores.
                    const float v = to_f32(from_f32<T>(s[t][e]));
                    s[t][e] = ms[key] != 0.0f ? v : excluded;
                }
                top0 = fmaxf(top0, fmaxf(s[t][0], s[t][1]));
                top1 = fmaxf(top1, fmaxf(s[t][2], s[t][3]));
            }
        }
        // The four lanes of a row hold its keys between them.
        top0 = fmaxf(top0, __shfl_xor_sync(0xffffffff, top0, 1));
        top0 = fmaxf(top0, __shfl_xor_sync(0xffffffff, top0, 2));
        top1 = fmaxf(top1, __shfl_xor_sync(0xffffffff, top1, 1));
        top1 = fmaxf(top1, __shfl_xor_sync(0xffffffff, top1, 2));
        float sum0 = 0.0f, sum1 = 0.0f;
#pragma unroll
        for (int t = 0; t < FA_KEYS / 8; ++t) {
            if (8 * t < keys) {
                s[t][0] = __expf(s[t][0] - top0), s[t][1] = __expf(s[t][1] - top0);
                s[t][2] = __expf(s[t][2] - top1), s[t][3] = __expf(s[t][3] - top1);
                sum0 += s[t][0] + s[t][1];
                sum1 += s[t][2] + s[t][3];
            }
        }
        sum0 += __shfl_xor_sync(0xffffffff, sum0, 1);
        sum0 += __shfl_xor_sync(0xffffffff, sum0, 2);
        sum1 += __shfl_xor_sync(0xffffffff, sum1, 1);
        sum1 += __shfl_xor_sync(0xffffffff, sum1, 2);
        const float inv0 = 1.0f / sum0, inv1 = 1.0f / sum1;
        // The context: P (16 x keys; score tiles 2kk and 2kk + 1 are operand tile kk)
        // times V, four tiles of 8 of the head's columns.
        float o[FA_D / 8][4];
#pragma unroll
        for (int n = 0; n < FA_D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < FA_KEYS / 16; ++kk) {
            if (16 * kk < keys) {
                const uint32_t pa[4] = {
                    pack2<T>(s[2 * kk][0] * inv0, s[2 * kk][1] * inv0),
                    pack2<T>(s[2 * kk][2] * inv1, s[2 * kk][3] * inv1),
                    pack2<T>(s[2 * kk + 1][0] * inv0, s[2 * kk + 1][1] * inv0),
                    pack2<T>(s[2 * kk + 1][2] * inv1, s[2 * kk + 1][3] * inv1),
                };
#pragma unroll
                for (int n = 0; n < FA_D / 8; ++n) {
                    const T* vr = vt + (8 * n + r) * VS + 16 * kk + c;
                    const uint32_t vb[2] = {*reinterpret_cast<const uint32_t*>(vr),
                                            *reinterpret_cast<const uint32_t*>(vr + 8)};
                    mma16816<T>(o[n], pa, vb);
                }
            }
        }
#pragma unroll
        for (int n = 0; n < FA_D / 8; ++n) {
#pragma unroll
            for (int half = 0; half < 2; ++half) {
                const int q = q0 + r + 8 * half;
                if (q < sequence)
                    *reinterpret_cast<uint32_t*>(out + (first + q) * hidden + h * FA_D + 8 * n + c) =
                        pack2<T>(o[n][2 * half], o[n][2 * half + 1]);
            }
        }
    }
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
    extern "C" __global__ void bias_residual_norm_warp_##SUFFIX(const T* x, const T* bias, const T* residual, \
                                                                const T* gamma, const T* beta, T* out,        \
                                                                int rows, int cols, float eps) {              \
        bias_residual_norm_warp(x, bias, residual, gamma, beta, out, rows, cols, eps);                        \
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

// Tensor cores take f16 and bf16 only: an f32 model keeps the unfused path.
#define FUSED_ATTENTION(T, SUFFIX)                                                                         \
    extern "C" __global__ void fused_attention_##SUFFIX(const T* qkv, const T* bias, const float* mask,    \
                                                        T* out, int sequence, int heads, float scale) {    \
        fused_attention(qkv, bias, mask, out, sequence, heads, scale);                                     \
    }

FUSED_ATTENTION(__half, f16)
FUSED_ATTENTION(__nv_bfloat16, bf16)
