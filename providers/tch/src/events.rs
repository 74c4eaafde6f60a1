//! CUDA events, from the CUDA runtime libtorch itself loaded: how a started batch is
//! waited for without waiting for the batches queued after it.
//!
//! tch binds no event API, and the two ways it offers to wait for the GPU both wait for
//! too much: a blocking copy to the host runs on the stream behind everything queued
//! so far (the next batch's kernels too), and `Cuda::synchronize` waits for the whole
//! device. An event recorded right after a batch's result copy completes when that copy
//! does. libtorch runs its kernels and copies on the device's default (legacy) stream
//! unless told otherwise, so the event is recorded there; a later stream's work that
//! the legacy stream orders behind it is only the event itself, which costs nothing.

use std::ffi::{CStr, c_char, c_int, c_uint, c_void};
use std::path::Path;
use std::sync::OnceLock;

use libloading::os::unix::{Library, RTLD_NOW, Symbol};

type Status = c_int;
type RawEvent = *mut c_void;

/// `cudaEventDisableTiming`: an event only waited for is cheaper without a timestamp.
const DISABLE_TIMING: c_uint = 0x02;

/// The runtime functions an event needs.
struct Api {
    get_device: Symbol<unsafe extern "C" fn(*mut c_int) -> Status>,
    set_device: Symbol<unsafe extern "C" fn(c_int) -> Status>,
    create: Symbol<unsafe extern "C" fn(*mut RawEvent, c_uint) -> Status>,
    record: Symbol<unsafe extern "C" fn(RawEvent, *mut c_void) -> Status>,
    synchronize: Symbol<unsafe extern "C" fn(RawEvent) -> Status>,
    destroy: Symbol<unsafe extern "C" fn(RawEvent) -> Status>,
    error_string: Symbol<unsafe extern "C" fn(Status) -> *const c_char>,
}

// SAFETY: the symbols are plain function pointers into a library that stays loaded for
// the life of the process; the CUDA runtime's functions may be called from any thread.
unsafe impl Send for Api {}
unsafe impl Sync for Api {}

/// The CUDA runtime's event functions, or why there are none (then batches are waited
/// for on the model thread, as `Model::run` does).
fn api() -> Result<&'static Api, &'static str> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(load).as_ref().map_err(String::as_str)
}

fn load() -> Result<Api, String> {
    // The copy libtorch_cuda mapped, by path; else whichever the loader finds.
    let mapped = std::fs::read_to_string("/proc/self/maps").ok().and_then(|maps| {
        maps.lines().find_map(|line| {
            let path = line.split_whitespace().nth(5)?;
            let name = Path::new(path).file_name()?.to_str()?;
            name.starts_with("libcudart.so").then(|| path.to_string())
        })
    });
    let names =
        mapped.into_iter().chain(["libcudart.so.13", "libcudart.so.12", "libcudart.so"].map(String::from));
    let mut tried = Vec::new();
    for name in names {
        // SAFETY: the CUDA runtime's initialisers are what libtorch_cuda already ran.
        match unsafe { Library::open(Some(&name), RTLD_NOW) } {
            Ok(library) => {
                // Never unloaded, like libtorch_cuda: the symbols below live as long.
                let library: &'static Library = Box::leak(Box::new(library));
                return bind(library).map_err(|e| format!("{name}: {e}"));
            }
            Err(e) => tried.push(format!("{name}: {e}")),
        }
    }
    Err(format!("no CUDA runtime library to wait on events with ({})", tried.join("; ")))
}

fn bind(library: &'static Library) -> Result<Api, libloading::Error> {
    // SAFETY: each symbol is declared with the CUDA runtime API's signature.
    unsafe {
        Ok(Api {
            get_device: library.get(b"cudaGetDevice\0")?,
            set_device: library.get(b"cudaSetDevice\0")?,
            create: library.get(b"cudaEventCreateWithFlags\0")?,
            record: library.get(b"cudaEventRecord\0")?,
            synchronize: library.get(b"cudaEventSynchronize\0")?,
            destroy: library.get(b"cudaEventDestroy\0")?,
            error_string: library.get(b"cudaGetErrorString\0")?,
        })
    }
}

/// Whether events can be used here; the error says why not.
pub(crate) fn available() -> Result<(), &'static str> {
    api().map(|_| ())
}

fn check(api: &Api, status: Status, doing: &str) -> Result<(), String> {
    if status == 0 {
        return Ok(());
    }
    // SAFETY: cudaGetErrorString returns a static string for any status.
    let text = unsafe { CStr::from_ptr((api.error_string)(status)) };
    Err(format!("{doing}: CUDA error {status} ({})", text.to_string_lossy()))
}

/// An event recorded on a device's default stream after the work queued so far.
pub(crate) struct Event {
    raw: RawEvent,
    api: &'static Api,
}

// SAFETY: a CUDA event handle may be waited on and destroyed from any thread.
unsafe impl Send for Event {}

impl Event {
    /// Records an event on `device`'s default stream: it completes when everything
    /// queued there before it has.
    pub(crate) fn record(device: usize) -> Result<Event, String> {
        let api = api()?;
        let mut previous: c_int = 0;
        let mut raw: RawEvent = std::ptr::null_mut();
        // SAFETY: plain CUDA runtime calls with out-pointers to locals; the thread's
        // current device is put back as libtorch's device guards expect.
        unsafe {
            check(api, (api.get_device)(&mut previous), "cudaGetDevice")?;
            let device = device as c_int;
            if device != previous {
                check(api, (api.set_device)(device), "cudaSetDevice")?;
            }
            let recorded = check(api, (api.create)(&mut raw, DISABLE_TIMING), "cudaEventCreate")
                .and_then(|()| check(api, (api.record)(raw, std::ptr::null_mut()), "cudaEventRecord"));
            if device != previous {
                (api.set_device)(previous);
            }
            let event = Event { raw, api };
            recorded.map(|()| event)
        }
    }

    /// Blocks until the work before the event is done.
    pub(crate) fn wait(&self) -> Result<(), String> {
        // SAFETY: `raw` is a live event made by `record`.
        check(self.api, unsafe { (self.api.synchronize)(self.raw) }, "cudaEventSynchronize")
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        if !self.raw.is_null() {
            // SAFETY: made by cudaEventCreate and destroyed once.
            unsafe { (self.api.destroy)(self.raw) };
        }
    }
}
