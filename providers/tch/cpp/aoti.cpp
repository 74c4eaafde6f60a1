// AOTInductor packages for kiln's tch provider: a C ABI over libtorch's
// torch::inductor::AOTIModelPackageLoader, which tch does not bind.
//
// A package (model.pt2, from torch._inductor.aoti_compile_and_package) holds code that
// torch.compile's inductor generated and compiled ahead of time for one device type and
// precision, with the weights. Built by build.rs into a static library linked into the
// provider; it needs only libtorch_cpu (the CUDA runner registers itself from
// libtorch_cuda, which the provider loads when CUDA is used).
//
// Tensors cross the boundary as tch's C tensors (at::Tensor*). Every function catches
// C++ exceptions (a Rust caller cannot unwind them) and returns 0 on success; the
// failure's message is kiln_aoti_error()'s, per thread.

#include "guarded.h"

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <algorithm>
#include <memory>
#include <stdexcept>
#include <vector>

extern "C" {

const char* kiln_aoti_error() { return last_error.c_str(); }

// Loads a package for `device` (-1: the package's own default). One runner: kiln calls
// a model from one thread.
int kiln_aoti_load(const char* path, int device, void** out) {
    return guarded([&] {
        auto loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(
            path, "model", false, 1, static_cast<c10::DeviceIndex>(device));
        *out = loader.release();
    });
}

// The package's metadata value for `key` (AOTI_DEVICE_KEY: the device type it was
// compiled for), copied into `buffer` (NUL-terminated, truncated to `capacity`).
int kiln_aoti_metadata(void* handle, const char* key, char* buffer, size_t capacity) {
    return guarded([&] {
        auto metadata = static_cast<torch::inductor::AOTIModelPackageLoader*>(handle)->get_metadata();
        auto found = metadata.find(key);
        std::string value = found == metadata.end() ? std::string() : found->second;
        if (capacity == 0) return;
        size_t n = std::min(value.size(), capacity - 1);
        value.copy(buffer, n);
        buffer[n] = '\0';
    });
}

// Runs the package on `n` input tensors, on the thread's current stream of their
// device; writes up to `capacity` new output tensors (the caller owns them) and their
// number to `count`.
int kiln_aoti_run(void* handle, void* const* inputs, size_t n, void** outputs, size_t capacity, size_t* count) {
    return guarded([&] {
        std::vector<at::Tensor> args;
        args.reserve(n);
        for (size_t i = 0; i < n; ++i) args.push_back(*static_cast<at::Tensor*>(inputs[i]));
        auto results = static_cast<torch::inductor::AOTIModelPackageLoader*>(handle)->run(args);
        if (results.size() > capacity) {
            throw std::runtime_error("the package returned " + std::to_string(results.size()) +
                                     " outputs; kiln expected at most " + std::to_string(capacity));
        }
        for (size_t i = 0; i < results.size(); ++i) outputs[i] = new at::Tensor(std::move(results[i]));
        *count = results.size();
    });
}

void kiln_aoti_free(void* handle) { delete static_cast<torch::inductor::AOTIModelPackageLoader*>(handle); }

}  // extern "C"
