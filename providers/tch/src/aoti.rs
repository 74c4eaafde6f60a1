//! AOTInductor packages (`model.pt2`): torch.compile's generated code, compiled ahead of
//! time (`scripts/export_aoti.py`), run through libtorch's own loader.
//!
//! A TorchScript module runs op by op through libtorch's interpreter; a package runs
//! what inductor generated for the whole model — fused pointwise kernels, on a GPU
//! Triton kernels (and with `--autotune` its chosen matmuls) — without Python, which
//! is what torch.compile gives a Python user. tch binds no AOTI API, so `cpp/aoti.cpp`
//! is a C ABI over `torch::inductor::AOTIModelPackageLoader`, linked in statically.

use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::path::Path;

unsafe extern "C" {
    fn kiln_aoti_error() -> *const c_char;
    fn kiln_aoti_load(path: *const c_char, device: c_int, out: *mut *mut c_void) -> c_int;
    fn kiln_aoti_metadata(
        handle: *mut c_void,
        key: *const c_char,
        buffer: *mut c_char,
        capacity: usize,
    ) -> c_int;
    fn kiln_aoti_run(
        handle: *mut c_void,
        inputs: *const *mut c_void,
        n: usize,
        outputs: *mut *mut c_void,
        capacity: usize,
        count: *mut usize,
    ) -> c_int;
    fn kiln_aoti_free(handle: *mut c_void);
}

/// The most outputs a package may return (kiln's signatures list a few).
const MAX_OUTPUTS: usize = 16;

fn check(status: c_int, doing: &str) -> Result<(), String> {
    if status == 0 {
        return Ok(());
    }
    // SAFETY: the thread's last message, valid until its next failure.
    let text = unsafe { CStr::from_ptr(kiln_aoti_error()) };
    Err(format!("{doing}: {}", text.to_string_lossy()))
}

/// A loaded package.
pub(crate) struct Package {
    raw: *mut c_void,
}

// SAFETY: the loader may be called from any thread; the model keeps it behind a lock.
unsafe impl Send for Package {}

impl Package {
    /// Loads `file` for `device` (its index on a GPU).
    pub(crate) fn load(file: &Path, device: tch::Device) -> Result<Package, String> {
        let path =
            CString::new(file.as_os_str().as_encoded_bytes()).map_err(|_| "the path holds a NUL byte")?;
        let index = match device {
            tch::Device::Cuda(n) => n as c_int,
            _ => -1,
        };
        let mut raw = std::ptr::null_mut();
        // SAFETY: a NUL-terminated path and an out-pointer to a local.
        check(
            unsafe { kiln_aoti_load(path.as_ptr(), index, &mut raw) },
            "libtorch cannot load it as an AOTInductor package",
        )?;
        Ok(Package { raw })
    }

    /// The device type the package was compiled for (`cpu`, `cuda`), from its metadata.
    pub(crate) fn device_type(&self) -> Result<String, String> {
        let mut buffer = [0 as c_char; 64];
        // SAFETY: a live package, a NUL-terminated key and a buffer of the size given.
        check(
            unsafe {
                kiln_aoti_metadata(self.raw, c"AOTI_DEVICE_KEY".as_ptr(), buffer.as_mut_ptr(), buffer.len())
            },
            "reading the package's metadata",
        )?;
        // SAFETY: the C side always NUL-terminates within the buffer.
        Ok(unsafe { CStr::from_ptr(buffer.as_ptr()) }.to_string_lossy().into_owned())
    }

    /// Queues the package's work on `inputs` (on the thread's current stream of their
    /// device) and returns its outputs.
    pub(crate) fn run(&self, inputs: &[tch::Tensor]) -> Result<Vec<tch::Tensor>, String> {
        let pointers: Vec<*mut c_void> = inputs.iter().map(|t| t.as_ptr() as *mut c_void).collect();
        let mut outputs = [std::ptr::null_mut::<c_void>(); MAX_OUTPUTS];
        let mut count = 0usize;
        // SAFETY: live tensors, an output array of the capacity given and a count.
        check(
            unsafe {
                kiln_aoti_run(
                    self.raw,
                    pointers.as_ptr(),
                    pointers.len(),
                    outputs.as_mut_ptr(),
                    MAX_OUTPUTS,
                    &mut count,
                )
            },
            "the AOTInductor package failed",
        )?;
        // SAFETY: each pointer is a new at::Tensor the C side handed over.
        Ok(outputs[..count].iter().map(|&t| unsafe { tch::Tensor::from_ptr(t.cast()) }).collect())
    }
}

impl Drop for Package {
    fn drop(&mut self) {
        // SAFETY: made by kiln_aoti_load and freed once.
        unsafe { kiln_aoti_free(self.raw) };
    }
}
