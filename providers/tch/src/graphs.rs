//! CUDA graphs: a batch shape's whole forward (module, embedding head) recorded once
//! and replayed with one launch.
//!
//! kiln's TorchScript forward launches ~150 kernels a batch from the model thread,
//! and on a fast GPU that thread, not the GPU, was the limit (86% busy launching,
//! docs/benchmarks.md). A replayed graph costs the host one call. Shapes repeat
//! because kiln pads batches to buckets (`batching.batch_multiple`,
//! `batching.sequence_multiple`) and warms each up at load, so a model captures one
//! graph per bucket during warm-up and replays it from then on.
//!
//! tch binds no graph API, and libtorch's caching allocator must know a capture is
//! running (a graph's buffers come from a pool that outlives the capture), so the
//! capture goes through libtorch's own `at::cuda::CUDAGraph`: `cuda/graphs.cpp`, a C
//! ABI over it, built by build.rs into a library of its own against libtorch_cuda.
//! The library's bytes are embedded in this binary and loaded from memory only once
//! CUDA is in use, so the binary still starts with a CPU-only libtorch.

use std::ffi::{CStr, c_char, c_int, c_void};
use std::sync::OnceLock;

use libloading::os::unix::{Library, RTLD_NOW, Symbol};

type Status = c_int;

/// The library's functions (see `cuda/graphs.cpp`).
struct Api {
    error: Symbol<unsafe extern "C" fn() -> *const c_char>,
    pool: Symbol<unsafe extern "C" fn(*mut u64) -> Status>,
    begin: Symbol<unsafe extern "C" fn(c_int, *const u64, *mut *mut c_void) -> Status>,
    end: Symbol<unsafe extern "C" fn(*mut c_void) -> Status>,
    replay: Symbol<unsafe extern "C" fn(*mut c_void) -> Status>,
    free: Symbol<unsafe extern "C" fn(*mut c_void)>,
}

// SAFETY: plain function pointers into a library loaded for the life of the process;
// libtorch's graph calls may be made from any thread.
unsafe impl Send for Api {}
unsafe impl Sync for Api {}

/// The graph library, or why there is none. libtorch_cuda must be loaded first (the
/// provider's `cuda()` does it): the library links against it.
fn api() -> Result<&'static Api, &'static str> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(load).as_ref().map_err(String::as_str)
}

/// Whether graphs can be captured here; the error says why not.
pub(crate) fn available() -> Result<(), &'static str> {
    api().map(|_| ())
}

#[cfg(not(kiln_tch_graphs))]
fn load() -> Result<Api, String> {
    Err(format!("CUDA graphs were not built into this kiln: {}", env!("TCH_PROVIDER_GRAPHS_WHY")))
}

#[cfg(kiln_tch_graphs)]
fn load() -> Result<Api, String> {
    use std::io::Write;
    use std::os::fd::FromRawFd;

    static BYTES: &[u8] = include_bytes!(env!("TCH_PROVIDER_GRAPHS_SO"));
    // An anonymous in-memory file: nothing written to disk, nothing left behind.
    // SAFETY: memfd_create with a NUL-terminated name; the fd is owned by `file` below.
    let fd = unsafe { libc::memfd_create(c"kiln-tch-graphs".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(format!("memfd_create: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh descriptor nothing else owns.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(BYTES).map_err(|e| format!("writing the graph library to memory: {e}"))?;
    let path = format!("/proc/self/fd/{fd}");
    // SAFETY: the library's only initialisers are the C++ runtime's for its statics.
    let library = unsafe { Library::open(Some(&path), RTLD_NOW) }
        .map_err(|e| format!("cannot load kiln's CUDA graph library: {e}"))?;
    drop(file);
    // Never unloaded: graphs point into it until the process ends.
    let library: &'static Library = Box::leak(Box::new(library));
    // SAFETY: each symbol is declared with its signature in cuda/graphs.cpp.
    unsafe {
        Ok(Api {
            error: library.get(b"kiln_graph_error\0").map_err(|e| e.to_string())?,
            pool: library.get(b"kiln_graph_pool\0").map_err(|e| e.to_string())?,
            begin: library.get(b"kiln_graph_begin\0").map_err(|e| e.to_string())?,
            end: library.get(b"kiln_graph_end\0").map_err(|e| e.to_string())?,
            replay: library.get(b"kiln_graph_replay\0").map_err(|e| e.to_string())?,
            free: library.get(b"kiln_graph_free\0").map_err(|e| e.to_string())?,
        })
    }
}

fn check(api: &Api, status: Status, doing: &str) -> Result<(), String> {
    if status == 0 {
        return Ok(());
    }
    // SAFETY: a pointer to the thread's last message, valid until its next failure.
    let text = unsafe { CStr::from_ptr((api.error)()) };
    Err(format!("{doing}: {}", text.to_string_lossy()))
}

/// A memory pool one model's graphs share: replayed one at a time on one stream, they
/// may reuse each other's intermediate buffers, so together they need about what the
/// largest needs.
pub(crate) struct Pool([u64; 2]);

impl Pool {
    pub(crate) fn new() -> Result<Pool, String> {
        let api = api()?;
        let mut id = [0u64; 2];
        // SAFETY: writes two ids into `id`.
        check(api, unsafe { (api.pool)(id.as_mut_ptr()) }, "creating a graph memory pool")?;
        Ok(Pool(id))
    }
}

/// One captured graph.
pub(crate) struct Graph {
    raw: *mut c_void,
    api: &'static Api,
}

// SAFETY: a CUDA graph may be replayed and destroyed from any thread; the model keeps
// it behind a lock.
unsafe impl Send for Graph {}

impl Graph {
    /// Records what `queue` launches on `device` (from this thread, which must not
    /// wait on the GPU meanwhile) into a graph, and returns it with `queue`'s result —
    /// tensors that each replay writes again. Nothing runs until the first replay.
    pub(crate) fn capture<T, E: std::fmt::Display>(
        device: usize,
        pool: &Pool,
        queue: impl FnOnce() -> Result<T, E>,
    ) -> Result<(Graph, T), String> {
        let api = api()?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: `pool.0` is two ids; `raw` receives a graph owned by the `Graph` below.
        check(
            api,
            unsafe { (api.begin)(device as c_int, pool.0.as_ptr(), &mut raw) },
            "beginning a capture",
        )?;
        let graph = Graph { raw, api };
        let queued = queue();
        // Ended in every case: the capture stream stays current until then.
        // SAFETY: a graph begun above.
        let ended = check(api, unsafe { (api.end)(graph.raw) }, "ending the capture");
        let result = queued.map_err(|e| format!("the forward failed while captured: {e}"))?;
        ended?;
        Ok((graph, result))
    }

    /// Queues the graph's work on the thread's current stream.
    pub(crate) fn replay(&self) -> Result<(), String> {
        // SAFETY: a graph whose capture ended.
        check(self.api, unsafe { (self.api.replay)(self.raw) }, "replaying a CUDA graph")
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        // SAFETY: made by kiln_graph_begin and freed once.
        unsafe { (self.api.free)(self.raw) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The embedded library loads next to the CUDA libtorch with or without a GPU,
    /// and a capture on a machine without one fails with CUDA's reason instead of
    /// taking the process down (the provider then runs eagerly).
    #[test]
    fn the_graph_library_loads_and_a_capture_without_a_gpu_is_an_error() {
        // Loads libtorch_cuda (the graph library links against it); no GPU is needed.
        let gpu = crate::imp::cuda();
        if let Err(why) = available() {
            panic!("the CUDA graph library is not available: {why}");
        }
        let pool = Pool::new().expect("a pool id needs no GPU");
        if gpu.is_err() {
            let Err(why) = Graph::capture(0, &pool, || Ok::<_, String>(())) else {
                panic!("a capture succeeded with no GPU");
            };
            assert!(why.starts_with("beginning a capture: ") && why.len() > 25, "{why}");
        }
    }
}
