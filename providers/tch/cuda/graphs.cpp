// CUDA graphs for kiln's tch provider: a C ABI over libtorch's at::cuda::CUDAGraph,
// which tch does not bind.
//
// libtorch's caching allocator has to know a capture is running (the graph's memory
// comes from a private pool that outlives the capture), so raw CUDA stream capture
// around tch calls would not do; the allocator and the capture stream are both
// libtorch's. Built by build.rs into a shared library of its own, linked against
// libtorch_cuda, and loaded by the provider only once CUDA is in use: a binary with
// this in it still starts with a CPU-only libtorch.
//
// Every function catches C++ exceptions (a Rust caller cannot unwind them) and
// returns 0 on success; the failure's message is kiln_graph_error()'s, per thread.

#include "../cpp/guarded.h"

#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <memory>
#include <optional>

namespace {

// A graph and, while it is being captured, the guard that made the capture stream
// current (libtorch refuses to capture on the default stream).
struct Graph {
    at::cuda::CUDAGraph graph;
    std::optional<c10::cuda::CUDAStreamGuard> guard;
};

}  // namespace

extern "C" {

// The message of this thread's last failure.
const char* kiln_graph_error() { return last_error.c_str(); }

// A new memory pool's id, for several graphs to share: graphs replayed one at a time
// on one stream may reuse each other's intermediate buffers, so one model's graphs
// together need about the memory of its largest one.
int kiln_graph_pool(unsigned long long* id) {
    return guarded([&] {
        auto pool = at::cuda::graph_pool_handle();
        id[0] = pool.first;
        id[1] = pool.second;
    });
}

// Starts capturing what this thread queues on `device` next, on a side stream made
// current until kiln_graph_end. Earlier work on the device is waited for first, so
// the capture never races the eager runs that warmed the shape up. Capture mode is
// thread-local: other threads may go on using CUDA meanwhile.
int kiln_graph_begin(int device, const unsigned long long* pool, void** out) {
    // Made inside the guard: the graph's constructor asks CUDA for the current stream.
    std::unique_ptr<Graph> graph;
    int status = guarded([&] {
        auto index = static_cast<c10::DeviceIndex>(device);
        c10::cuda::CUDAGuard on(index);
        C10_CUDA_CHECK(cudaDeviceSynchronize());
        graph = std::make_unique<Graph>();
        graph->guard.emplace(c10::cuda::getStreamFromPool(false, index));
        graph->graph.capture_begin({pool[0], pool[1]}, cudaStreamCaptureModeThreadLocal);
    });
    if (status == 0) {
        *out = graph.release();
    }
    return status;
}

// Ends the capture (and instantiates the graph); the previous stream is current again
// whether or not it succeeded. A failed graph must still be freed.
int kiln_graph_end(void* handle) {
    auto* graph = static_cast<Graph*>(handle);
    int status = guarded([&] { graph->graph.capture_end(); });
    graph->guard.reset();
    return status;
}

// Queues the graph's work on the thread's current stream of its device.
int kiln_graph_replay(void* handle) {
    return guarded([&] { static_cast<Graph*>(handle)->graph.replay(); });
}

void kiln_graph_free(void* handle) {
    auto* graph = static_cast<Graph*>(handle);
    graph->guard.reset();
    delete graph;
}

}  // extern "C"
