// kiln's binding to MLX: a small C interface over MLX's C++ API, only what kiln's
// models use. Written for kiln (not generated); compiled by build.rs against the
// headers and libmlx of the `mlx-cpu` / `mlx-cuda-13` / `mlx` wheels.
//
// Conventions: arrays are opaque heap handles the caller frees; a function that can
// fail returns NULL (or nonzero) and leaves the message in kiln_mlx_last_error(), per
// thread. Every op runs on the calling thread's device (kiln_mlx_set_device).

#include <mlx/backend/cpu/encoder.h>
#include <mlx/mlx.h>
#include <mlx/primitives.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <optional>
#include <string>

namespace mx = mlx::core;

struct kiln_mlx_array {
  mx::array a;
};

struct kiln_mlx_weights {
  std::unordered_map<std::string, mx::array> arrays;
};

namespace {

thread_local std::string last_error;
thread_local mx::Device current_device = mx::Device(mx::Device::cpu, 0);

template <class F>
kiln_mlx_array* wrap(F&& f) {
  try {
    return new kiln_mlx_array{f()};
  } catch (const std::exception& e) {
    last_error = e.what();
  } catch (...) {
    last_error = "unknown MLX error";
  }
  return nullptr;
}

template <class F>
int status(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
  } catch (...) {
    last_error = "unknown MLX error";
  }
  return 1;
}

// kiln's dtype codes, shared with src/ffi.rs.
mx::Dtype dtype_of(int code) {
  switch (code) {
    case 0: return mx::float32;
    case 1: return mx::float16;
    case 2: return mx::bfloat16;
    case 3: return mx::int64;
    case 4: return mx::int32;
    case 5: return mx::uint8;
    case 6: return mx::uint32;
    case 7: return mx::bool_;
  }
  throw std::invalid_argument("kiln_mlx: unknown dtype code " + std::to_string(code));
}

int code_of(mx::Dtype d) {
  if (d == mx::float32) return 0;
  if (d == mx::float16) return 1;
  if (d == mx::bfloat16) return 2;
  if (d == mx::int64) return 3;
  if (d == mx::int32) return 4;
  if (d == mx::uint8) return 5;
  if (d == mx::uint32) return 6;
  if (d == mx::bool_) return 7;
  return -1;
}

mx::Shape shape_of(const int* shape, int ndim) { return mx::Shape(shape, shape + ndim); }

}  // namespace

extern "C" {

const char* kiln_mlx_last_error() { return last_error.c_str(); }

const char* kiln_mlx_version() { return mx::version(); }

#ifdef KILN_MLX_OPENBLAS
extern "C" char* openblas_get_config(void);
#endif

// The BLAS linked ahead of MLX's own, or "" (MLX's: the reference BLAS on Linux CPU
// wheels, Accelerate on macOS).
const char* kiln_mlx_blas() {
#ifdef KILN_MLX_OPENBLAS
  return openblas_get_config();
#else
  return "";
#endif
}

void kiln_mlx_free(kiln_mlx_array* a) { delete a; }

// A second handle on the same array (its buffer shared, not copied).
kiln_mlx_array* kiln_mlx_share(const kiln_mlx_array* a) { return wrap([&] { return a->a; }); }

int kiln_mlx_gpu_count() {
  try {
    if (!mx::is_available(mx::Device(mx::Device::gpu, 0))) return 0;
    return static_cast<int>(mx::device_count(mx::Device::gpu));
  } catch (...) {
    return 0;
  }
}

// 1 when this libmlx runs its GPU through CUDA (the mlx-cuda wheels), else 0.
int kiln_mlx_is_cuda() {
  try {
    return mx::cu::is_available() ? 1 : 0;
  } catch (...) {
    return 0;
  }
}

// kind 0: cpu, 1: gpu (Metal on Apple, CUDA elsewhere).
int kiln_mlx_set_device(int kind, int index) {
  return status([&] {
    mx::Device d(kind == 0 ? mx::Device::cpu : mx::Device::gpu, index);
    if (!mx::is_available(d)) {
      throw std::invalid_argument(kind == 0 ? "the MLX CPU device is not available"
                                            : "this MLX build has no GPU device (or none is present)");
    }
    current_device = d;
  });
}

kiln_mlx_array* kiln_mlx_from_data(const void* data, int dtype, const int* shape, int ndim) {
  return wrap([&] {
    auto t = dtype_of(dtype);
    auto s = shape_of(shape, ndim);
    size_t n = 1;
    for (auto d : s) n *= static_cast<size_t>(d);
    // MLX gets a copy: the caller's buffer may go away before evaluation.
    void* copy = std::malloc(n * t.size() + 1);
    if (copy == nullptr) throw std::bad_alloc();
    std::memcpy(copy, data, n * t.size());
    return mx::array(copy, s, t, [](void* p) { std::free(p); });
  });
}

kiln_mlx_array* kiln_mlx_scalar(float value, int dtype) {
  return wrap([&] { return mx::array(value, dtype_of(dtype)); });
}

int kiln_mlx_ndim(const kiln_mlx_array* a) { return static_cast<int>(a->a.ndim()); }
int kiln_mlx_dim(const kiln_mlx_array* a, int axis) { return a->a.shape(axis); }
int kiln_mlx_dtype(const kiln_mlx_array* a) { return code_of(a->a.dtype()); }

// Evaluates `a` as a row-contiguous array of `dtype` and copies it into `out`, which
// must hold `bytes` bytes (the element count times the dtype's size).
int kiln_mlx_to_host(const kiln_mlx_array* a, int dtype, void* out, size_t bytes) {
  return status([&] {
    auto t = dtype_of(dtype);
    // An array already evaluated at `dtype` and row-contiguous (a step's logits or
    // tokens, evaluated with its caches) is copied as it is: the cast and copy ops would
    // cost another evaluation, a round trip to the device, for nothing.
    mx::array c = a->a;
    if (!c.is_available() || c.dtype() != t || !c.flags().row_contiguous) {
      c = mx::contiguous(mx::astype(c, t, current_device), false, current_device);
      mx::eval(c);
    }
    if (c.nbytes() != bytes) {
      throw std::invalid_argument("kiln_mlx_to_host: the array has " + std::to_string(c.nbytes()) +
                                  " bytes, the buffer " + std::to_string(bytes));
    }
    std::memcpy(out, c.data<uint8_t>(), bytes);
  });
}

// The arrays behind `n` handles.
static std::vector<mx::array> arrays_of(kiln_mlx_array* const* arrays, size_t n) {
  std::vector<mx::array> all;
  for (size_t i = 0; i < n; i++) all.push_back(arrays[i]->a);
  return all;
}

int kiln_mlx_eval(kiln_mlx_array* const* arrays, size_t n) {
  return status([&] { mx::eval(arrays_of(arrays, n)); });
}

// Queues the arrays' evaluation and returns at once; a later eval of any of them (or of
// anything built on them) waits for it.
int kiln_mlx_async_eval(kiln_mlx_array* const* arrays, size_t n) {
  return status([&] { mx::async_eval(arrays_of(arrays, n)); });
}

// Queues `a`'s evaluation as a row-contiguous f32 array and returns that array at once;
// kiln_mlx_read, on any thread, waits for it. The waiting thread only waits on the
// array's event (it schedules nothing), so the thread that queued it may go on building
// and queueing the next batch meanwhile.
kiln_mlx_array* kiln_mlx_start_f32(const kiln_mlx_array* a) {
  return wrap([&] {
    auto c = mx::contiguous(mx::astype(a->a, mx::float32, current_device), false, current_device);
    mx::async_eval({c});
    return c;
  });
}

// Waits for an array kiln_mlx_start_f32 queued and copies its `bytes` bytes into `out`.
int kiln_mlx_read(kiln_mlx_array* a, void* out, size_t bytes) {
  return status([&] {
    a->a.eval();
    if (a->a.nbytes() != bytes) {
      throw std::invalid_argument("kiln_mlx_read: the array has " + std::to_string(a->a.nbytes()) +
                                  " bytes, the buffer " + std::to_string(bytes));
    }
    std::memcpy(out, a->a.data<uint8_t>(), bytes);
  });
}

kiln_mlx_array* kiln_mlx_astype(const kiln_mlx_array* a, int dtype) {
  return wrap([&] { return mx::astype(a->a, dtype_of(dtype), current_device); });
}

// 0 add, 1 subtract, 2 multiply, 3 divide, 4 maximum, 5 minimum
kiln_mlx_array* kiln_mlx_binary(int op, const kiln_mlx_array* a, const kiln_mlx_array* b) {
  return wrap([&] {
    switch (op) {
      case 0: return mx::add(a->a, b->a, current_device);
      case 1: return mx::subtract(a->a, b->a, current_device);
      case 2: return mx::multiply(a->a, b->a, current_device);
      case 3: return mx::divide(a->a, b->a, current_device);
      case 4: return mx::maximum(a->a, b->a, current_device);
      case 5: return mx::minimum(a->a, b->a, current_device);
    }
    throw std::invalid_argument("kiln_mlx_binary: unknown op " + std::to_string(op));
  });
}

// 0 sqrt, 1 sigmoid, 2 exp, 3 tanh, 4 erf, 5 negative
kiln_mlx_array* kiln_mlx_unary(int op, const kiln_mlx_array* a) {
  return wrap([&] {
    switch (op) {
      case 0: return mx::sqrt(a->a, current_device);
      case 1: return mx::sigmoid(a->a, current_device);
      case 2: return mx::exp(a->a, current_device);
      case 3: return mx::tanh(a->a, current_device);
      case 4: return mx::erf(a->a, current_device);
      case 5: return mx::negative(a->a, current_device);
    }
    throw std::invalid_argument("kiln_mlx_unary: unknown op " + std::to_string(op));
  });
}

kiln_mlx_array* kiln_mlx_matmul(const kiln_mlx_array* a, const kiln_mlx_array* b) {
  return wrap([&] { return mx::matmul(a->a, b->a, current_device); });
}

// A depthwise convolution (one input channel per group, one output per channel) on the
// CPU, as an MLX primitive of kiln's: MLX's CPU backend runs grouped convolutions with
// its naive reference loops, and composing it from slices and elementwise ops costs a
// pass over memory per kernel tap (~10x this loop on MobileNets). Inputs: the padded
// input [N, H, W, C] and the taps [kH, kW, C], both f32 and row-contiguous.
class DepthwiseConv2d : public mx::UnaryPrimitive {
 public:
  DepthwiseConv2d(mx::Stream stream, int sy, int sx, int dy, int dx)
      : mx::UnaryPrimitive(stream), sy_(sy), sx_(sx), dy_(dy), dx_(dx) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    const auto& x = inputs[0];
    const auto& w = inputs[1];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    auto& encoder = mx::cpu::get_command_encoder(stream());
    encoder.set_input_array(x);
    encoder.set_input_array(w);
    encoder.set_output_array(out);
    int n = out.shape(0), oh = out.shape(1), ow = out.shape(2), c = out.shape(3);
    int h = x.shape(1), wd = x.shape(2), kh = w.shape(0), kw = w.shape(1);
    encoder.dispatch([xp = x.data<float>(), wp = w.data<float>(), op = out.data<float>(), n, oh, ow, c, h, wd, kh, kw,
                      sy = sy_, sx = sx_, dy = dy_, dx = dx_]() {
      for (int b = 0; b < n; b++) {
        for (int y = 0; y < oh; y++) {
          for (int x0 = 0; x0 < ow; x0++) {
            float* o = op + ((static_cast<size_t>(b) * oh + y) * ow + x0) * c;
            for (int k = 0; k < c; k++) o[k] = 0.0f;
            for (int ty = 0; ty < kh; ty++) {
              const float* row = xp + (static_cast<size_t>(b) * h + y * sy + ty * dy) * wd * c;
              for (int tx = 0; tx < kw; tx++) {
                const float* in = row + static_cast<size_t>(x0 * sx + tx * dx) * c;
                const float* tap = wp + (static_cast<size_t>(ty) * kw + tx) * c;
                for (int k = 0; k < c; k++) o[k] += in[k] * tap[k];
              }
            }
          }
        }
      }
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override {
    throw std::runtime_error("kiln's depthwise convolution runs on the CPU only");
  }

  const char* name() const override { return "KilnDepthwiseConv2d"; }

 private:
  int sy_, sx_, dy_, dx_;
};

static mx::array depthwise_conv2d(const mx::array& x, const mx::array& w, const int* stride, const int* pad_lo,
                                  const int* pad_hi, const int* dilation) {
  auto p = mx::astype(x, mx::float32, current_device);
  if (pad_lo[0] || pad_lo[1] || pad_hi[0] || pad_hi[1]) {
    p = mx::pad(p, {1, 2}, {pad_lo[0], pad_lo[1]}, {pad_hi[0], pad_hi[1]}, mx::array(0.0f), "constant",
                current_device);
  }
  p = mx::contiguous(p, false, current_device);
  int n = p.shape(0), h = p.shape(1), wd = p.shape(2), c = p.shape(3);
  int kh = w.shape(1), kw = w.shape(2);
  int oh = (h - (kh - 1) * dilation[0] - 1) / stride[0] + 1;
  int ow = (wd - (kw - 1) * dilation[1] - 1) / stride[1] + 1;
  if (oh <= 0 || ow <= 0) throw std::invalid_argument("conv2d: the kernel is larger than the padded input");
  // [C, kH, kW, 1] -> [kH, kW, C]: one row of channel weights per tap.
  auto taps = mx::contiguous(
      mx::transpose(mx::reshape(mx::astype(w, mx::float32, current_device), {c, kh, kw}, current_device), {1, 2, 0},
                    current_device),
      false, current_device);
  auto stream = mx::to_stream(current_device);
  auto out = mx::array({n, oh, ow, c}, mx::float32,
                       std::make_shared<DepthwiseConv2d>(stream, stride[0], stride[1], dilation[0], dilation[1]),
                       {p, taps});
  return mx::astype(out, x.dtype(), current_device);
}

// A 2-D convolution: x [N, H, W, C_in], w [C_out, kH, kW, C_in / groups] (MLX's layout);
// the padding before (top, left) and after (bottom, right) may differ, as ONNX allows.
kiln_mlx_array* kiln_mlx_conv2d(const kiln_mlx_array* x, const kiln_mlx_array* w, const int* stride,
                                const int* pad_lo, const int* pad_hi, const int* dilation, int groups) {
  return wrap([&] {
    const auto& in = x->a;
    const auto& wt = w->a;
    bool depthwise = groups > 1 && in.ndim() == 4 && wt.ndim() == 4 && wt.shape(3) == 1 && wt.shape(0) == groups &&
                     in.shape(3) == groups;
    if (depthwise && current_device.type == mx::Device::cpu) {
      return depthwise_conv2d(in, wt, stride, pad_lo, pad_hi, dilation);
    }
    return mx::conv_general(in, wt, {stride[0], stride[1]}, {pad_lo[0], pad_lo[1]}, {pad_hi[0], pad_hi[1]},
                            {dilation[0], dilation[1]}, {1, 1}, groups, false, current_device);
  });
}

// Max pooling of x [N, C, H, W] over kernel windows at the given strides, after padding
// with -inf (before: top, left; after: bottom, right): a strided view of the windows,
// reduced.
kiln_mlx_array* kiln_mlx_max_pool2d(const kiln_mlx_array* x, const int* kernel, const int* stride,
                                    const int* pad_lo, const int* pad_hi) {
  return wrap([&] {
    auto p = x->a;
    if (p.ndim() != 4) throw std::invalid_argument("max pooling takes [N, C, H, W]");
    if (pad_lo[0] || pad_lo[1] || pad_hi[0] || pad_hi[1]) {
      auto low = mx::array(-std::numeric_limits<float>::infinity(), p.dtype());
      p = mx::pad(p, {2, 3}, {pad_lo[0], pad_lo[1]}, {pad_hi[0], pad_hi[1]}, low, "constant", current_device);
    }
    p = mx::contiguous(p, false, current_device);
    int64_t n = p.shape(0), c = p.shape(1), h = p.shape(2), w = p.shape(3);
    if (h < kernel[0] || w < kernel[1]) throw std::invalid_argument("max pooling: the kernel is larger than the input");
    int ho = static_cast<int>((h - kernel[0]) / stride[0] + 1);
    int wo = static_cast<int>((w - kernel[1]) / stride[1] + 1);
    auto windows = mx::as_strided(p, {static_cast<int>(n), static_cast<int>(c), ho, wo, kernel[0], kernel[1]},
                                  {c * h * w, h * w, stride[0] * w, stride[1], w, 1}, 0, current_device);
    return mx::max(windows, std::vector<int>{4, 5}, false, current_device);
  });
}

kiln_mlx_array* kiln_mlx_softmax(const kiln_mlx_array* a, int axis) {
  return wrap([&] { return mx::softmax(a->a, axis, true, current_device); });
}

kiln_mlx_array* kiln_mlx_concat(kiln_mlx_array* const* arrays, size_t n, int axis) {
  return wrap([&] {
    std::vector<mx::array> all;
    for (size_t i = 0; i < n; i++) all.push_back(arrays[i]->a);
    return mx::concatenate(all, axis, current_device);
  });
}

kiln_mlx_array* kiln_mlx_addmm(const kiln_mlx_array* c, const kiln_mlx_array* a, const kiln_mlx_array* b) {
  return wrap([&] { return mx::addmm(c->a, a->a, b->a, 1.0f, 1.0f, current_device); });
}

kiln_mlx_array* kiln_mlx_transpose(const kiln_mlx_array* a, const int* axes, int n) {
  return wrap([&] { return mx::transpose(a->a, std::vector<int>(axes, axes + n), current_device); });
}

kiln_mlx_array* kiln_mlx_reshape(const kiln_mlx_array* a, const int* shape, int n) {
  return wrap([&] { return mx::reshape(a->a, shape_of(shape, n), current_device); });
}

// Rows of an embedding table [vocab, width] picked by flat ids: `take` moved as 8-byte
// words when a row allows it (MLX's gather costs per element; a quarter of the
// elements for f16 rows, half for f32).
kiln_mlx_array* kiln_mlx_embedding(const kiln_mlx_array* table, const kiln_mlx_array* ids) {
  return wrap([&] {
    const auto& t = table->a;
    if (t.ndim() == 2 && (t.shape(1) * t.itemsize()) % 8 == 0) {
      auto words = mx::view(t, mx::uint64, current_device);
      return mx::view(mx::take(words, ids->a, 0, current_device), t.dtype(), current_device);
    }
    return mx::take(t, ids->a, 0, current_device);
  });
}

kiln_mlx_array* kiln_mlx_slice(const kiln_mlx_array* a, const int* start, const int* stop, int n) {
  return wrap([&] {
    return mx::slice(a->a, mx::Shape(start, start + n), mx::Shape(stop, stop + n), current_device);
  });
}

// 0 sum, 1 max, 2 mean, 3 argmax (uint32: the first index of the largest)
kiln_mlx_array* kiln_mlx_reduce(int op, const kiln_mlx_array* a, int axis, int keepdims) {
  return wrap([&] {
    switch (op) {
      case 0: return mx::sum(a->a, axis, keepdims != 0, current_device);
      case 1: return mx::max(a->a, axis, keepdims != 0, current_device);
      case 2: return mx::mean(a->a, axis, keepdims != 0, current_device);
      case 3: return mx::argmax(a->a, axis, keepdims != 0, current_device);
    }
    throw std::invalid_argument("kiln_mlx_reduce: unknown op " + std::to_string(op));
  });
}

kiln_mlx_array* kiln_mlx_where(const kiln_mlx_array* c, const kiln_mlx_array* x, const kiln_mlx_array* y) {
  return wrap([&] { return mx::where(c->a, x->a, y->a, current_device); });
}

// BERT's exact GELU, x/2 (1 + erf(x/sqrt 2)). Constants take x's dtype, so f16 stays f16.
static mx::array gelu_of(const mx::array& x) {
  auto half = mx::array(0.5f, x.dtype());
  auto one = mx::array(1.0f, x.dtype());
  auto scale = mx::array(0.70710678118654752f, x.dtype());
  return mx::multiply(mx::multiply(x, half, current_device),
                      mx::add(one, mx::erf(mx::multiply(x, scale, current_device), current_device), current_device),
                      current_device);
}

// silu(gate) * up = gate * sigmoid(gate) * up, a llama MLP's activation.
static mx::array swiglu_of(const mx::array& gate, const mx::array& up) {
  return mx::multiply(mx::multiply(gate, mx::sigmoid(gate, current_device), current_device), up, current_device);
}

// GELU compiled by MLX into one kernel on a GPU (five separate elementwise passes
// otherwise).
kiln_mlx_array* kiln_mlx_gelu(const kiln_mlx_array* x) {
  static auto gelu = mx::compile([](const std::vector<mx::array>& in) { return std::vector<mx::array>{gelu_of(in[0])}; });
  return wrap([&] {
    // On the CPU, MLX compiles by running the system's C++ compiler at run time, which a
    // machine may lack or reject; the five passes are cheap there anyway.
    if (current_device.type == mx::Device::cpu) return gelu_of(x->a);
    return gelu({x->a})[0];
  });
}

// SwiGLU compiled by MLX into one kernel on a GPU (three launches otherwise, each layer
// of each decode step; mlx-lm compiles it the same way). Shapeless: one compilation
// serves every batch.
kiln_mlx_array* kiln_mlx_swiglu(const kiln_mlx_array* gate, const kiln_mlx_array* up) {
  static auto swiglu = mx::compile(
      [](const std::vector<mx::array>& in) { return std::vector<mx::array>{swiglu_of(in[0], in[1])}; },
      /* shapeless = */ true);
  return wrap([&] {
    // The CPU: see kiln_mlx_gelu.
    if (current_device.type == mx::Device::cpu) return swiglu_of(gate->a, up->a);
    return swiglu({gate->a, up->a})[0];
  });
}

kiln_mlx_array* kiln_mlx_layer_norm(const kiln_mlx_array* x, const kiln_mlx_array* w, const kiln_mlx_array* b,
                                    float eps) {
  return wrap([&] { return mx::fast::layer_norm(x->a, w->a, b->a, eps, current_device); });
}

// queries, keys, values: [batch, heads, sequence, head_dim]; mask (nullable): additive,
// broadcastable to [batch, heads, sequence, sequence].
kiln_mlx_array* kiln_mlx_attention(const kiln_mlx_array* q, const kiln_mlx_array* k, const kiln_mlx_array* v,
                                   float scale, const kiln_mlx_array* mask) {
  return wrap([&] {
    if (mask == nullptr) return mx::fast::scaled_dot_product_attention(q->a, k->a, v->a, scale, "", {}, {}, false, current_device);
    return mx::fast::scaled_dot_product_attention(q->a, k->a, v->a, scale, "array", mask->a, {}, false, current_device);
  });
}

// Causal attention where the queries are the last rows of the keys' sequence (MLX's
// "causal" mode aligns the query block to the end of the keys).
kiln_mlx_array* kiln_mlx_causal_attention(const kiln_mlx_array* q, const kiln_mlx_array* k, const kiln_mlx_array* v,
                                          float scale) {
  return wrap([&] {
    return mx::fast::scaled_dot_product_attention(q->a, k->a, v->a, scale, "causal", {}, {}, false, current_device);
  });
}

// RMS norm over the last axis (MLX's fused kernel).
kiln_mlx_array* kiln_mlx_rms_norm(const kiln_mlx_array* x, const kiln_mlx_array* w, float eps) {
  return wrap([&] { return mx::fast::rms_norm(x->a, w->a, eps, current_device); });
}

// Rotary position embedding of x [..., tokens, dims] from position `offset`; traditional:
// the rotated pairs are adjacent elements (2i, 2i + 1), as GGUF's llama layout has them.
kiln_mlx_array* kiln_mlx_rope(const kiln_mlx_array* x, int dims, int traditional, float base, int offset) {
  return wrap([&] { return mx::fast::rope(x->a, dims, traditional != 0, base, 1.0f, offset, std::nullopt, current_device); });
}

// `src` with the box [start, stop) replaced by `update` (in place when MLX can donate
// `src`'s buffer).
kiln_mlx_array* kiln_mlx_slice_update(const kiln_mlx_array* src, const kiln_mlx_array* update, const int* start,
                                      const int* stop, int n) {
  return wrap([&] {
    return mx::slice_update(src->a, update->a, mx::Shape(start, start + n), mx::Shape(stop, stop + n), current_device);
  });
}

// Rotary embedding of x [batch, heads, 1, dims] with one position per batch row.
kiln_mlx_array* kiln_mlx_rope_at(const kiln_mlx_array* x, int dims, int traditional, float base,
                                 const kiln_mlx_array* offsets) {
  return wrap([&] {
    return mx::fast::rope(x->a, dims, traditional != 0, base, 1.0f, offsets->a, std::nullopt, current_device);
  });
}

// `a` with, for each i, the slice at (rows[i], :, cols[i], :) of a 4-d array replaced by
// updates[i] (updates: [n, 1, d1, 1, d3]).
kiln_mlx_array* kiln_mlx_scatter_rows(const kiln_mlx_array* a, const kiln_mlx_array* rows,
                                      const kiln_mlx_array* cols, const kiln_mlx_array* updates) {
  return wrap([&] { return mx::scatter(a->a, {rows->a, cols->a}, updates->a, {0, 2}, current_device); });
}

// BERT's embedding sum on a CUDA GPU, one kernel: word rows [vocab, width] gathered by
// `ids` [batch, sequence] (int32), plus token-type row 0 of `types`, plus position rows
// 0..sequence of `positions`, rounded to the tables' dtype after each add as the two
// separate adds round. MLX's own gather (`take`) costs per element with general
// indexing: 1.6 ms of a 5.4 ms MiniLM batch of 256 x 128 tokens on an H200, for 25 MB.
// One thread an element, a row's threads reading one contiguous word row.
kiln_mlx_array* kiln_mlx_bert_embed_cuda(const kiln_mlx_array* words, const kiln_mlx_array* positions,
                                         const kiln_mlx_array* types, const kiln_mlx_array* ids) {
  return wrap([&] {
    static const auto kernel = mx::fast::cuda_kernel(
        "kiln_bert_embed", {"words", "positions", "types", "ids"}, {"out"},
        R"(
  const long long width = words_shape[1];
  const long long sequence = ids_shape[1];
  const long long total = (long long)ids_shape[0] * sequence * width;
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const long long token = i / width;
  const long long c = i - token * width;
  const long long row = ids[token];
  const T first = static_cast<T>(static_cast<float>(words[row * width + c]) + static_cast<float>(types[c]));
  out[i] = static_cast<T>(static_cast<float>(first) +
                          static_cast<float>(positions[(token % sequence) * width + c]));
)");
    const auto& w = words->a;
    if (w.ndim() != 2 || ids->a.ndim() != 2 || ids->a.dtype() != mx::int32) {
      throw std::invalid_argument("kiln_mlx_bert_embed_cuda takes a [vocab, width] table and int32 ids [batch, sequence]");
    }
    const int width = w.shape(1);
    const int tokens = ids->a.shape(0) * ids->a.shape(1);
    const long long total = static_cast<long long>(tokens) * width;
    if (total > std::numeric_limits<int>::max()) throw std::invalid_argument("kiln_mlx_bert_embed_cuda: batch too large");
    auto out = kernel({w, mx::astype(positions->a, w.dtype(), current_device),
                       mx::astype(types->a, w.dtype(), current_device), ids->a},
                      {{tokens, width}}, {w.dtype()}, {static_cast<int>(total), 1, 1}, {256, 1, 1},
                      {{"T", w.dtype()}}, std::nullopt, false, current_device);
    return out[0];
  });
}

kiln_mlx_array* kiln_mlx_take(const kiln_mlx_array* a, const kiln_mlx_array* ids, int axis) {
  return wrap([&] { return mx::take(a->a, ids->a, axis, current_device); });
}

kiln_mlx_array* kiln_mlx_zeros(const int* shape, int ndim, int dtype) {
  return wrap([&] { return mx::zeros(shape_of(shape, ndim), dtype_of(dtype), current_device); });
}

// The same bytes as another dtype of the same width (packed weights as uint32).
kiln_mlx_array* kiln_mlx_view(const kiln_mlx_array* a, int dtype) {
  return wrap([&] { return mx::view(a->a, dtype_of(dtype), current_device); });
}

// Groupwise affine quantization of `w` along its last axis: out[0] the packed weights,
// out[1] the scales, out[2] the biases.
int kiln_mlx_quantize(const kiln_mlx_array* w, int group_size, int bits, kiln_mlx_array** out) {
  return status([&] {
    auto q = mx::quantize(w->a, group_size, bits, "affine", std::nullopt, current_device);
    if (q.size() != 3) throw std::runtime_error("mx::quantize returned " + std::to_string(q.size()) + " arrays");
    for (int i = 0; i < 3; i++) out[i] = new kiln_mlx_array{q[i]};
  });
}

// x @ dequantize(w)^T
kiln_mlx_array* kiln_mlx_quantized_matmul(const kiln_mlx_array* x, const kiln_mlx_array* w,
                                          const kiln_mlx_array* scales, const kiln_mlx_array* biases,
                                          int group_size, int bits) {
  return wrap([&] {
    return mx::quantized_matmul(x->a, w->a, scales->a, biases->a, true, group_size, bits, "affine",
                                current_device);
  });
}

// dequantize(w, scales, biases): the affine-quantized rows back as dense values (the
// scales' dtype).
kiln_mlx_array* kiln_mlx_dequantize(const kiln_mlx_array* w, const kiln_mlx_array* scales,
                                    const kiln_mlx_array* biases, int group_size, int bits) {
  return wrap([&] {
    return mx::dequantize(w->a, scales->a, biases->a, group_size, bits, "affine", std::nullopt, std::nullopt,
                          current_device);
  });
}

kiln_mlx_weights* kiln_mlx_load_safetensors(const char* path) {
  try {
    auto loaded = mx::load_safetensors(std::string(path), mx::StreamOrDevice(mx::Device(mx::Device::cpu, 0)));
    auto* w = new kiln_mlx_weights{};
    for (auto& [name, array] : loaded.first) {
      w->arrays.emplace(name, array);
    }
    return w;
  } catch (const std::exception& e) {
    last_error = e.what();
  } catch (...) {
    last_error = "unknown MLX error";
  }
  return nullptr;
}

// The named array (NULL if absent, without an error).
kiln_mlx_array* kiln_mlx_weights_get(const kiln_mlx_weights* w, const char* name) {
  auto it = w->arrays.find(name);
  if (it == w->arrays.end()) return nullptr;
  return new kiln_mlx_array{it->second};
}

void kiln_mlx_weights_free(kiln_mlx_weights* w) { delete w; }

// MLX's allocator: bytes in live arrays, the peak since the last reset, and the
// buffer cache it keeps for reuse.
void kiln_mlx_memory(size_t* active, size_t* peak, size_t* cache) {
  *active = mx::get_active_memory();
  *peak = mx::get_peak_memory();
  *cache = mx::get_cache_memory();
}

void kiln_mlx_clear_cache() { mx::clear_cache(); }

}  // extern "C"
