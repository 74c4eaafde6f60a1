//! With the `cuda` feature: compiles kiln's CUDA kernels (`kernels/bert.cu`, `kernels/llama.cu`) to PTX with
//! nvcc, for `CUDA_COMPUTE_CAP` (as candle's own kernels are; `scripts/setup cuda` sets
//! it), so the driver can compile them for that GPU or a newer one.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    for file in ["kernels/bert.cu", "kernels/llama.cu", "kernels/common.cuh"] {
        println!("cargo::rerun-if-changed={file}");
    }
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap: String = cap.chars().filter(char::is_ascii_digit).collect();
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    for name in ["bert", "llama"] {
        let source = format!("kernels/{name}.cu");
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17"])
            .arg(format!("-arch=compute_{cap}"))
            .arg("-o")
            .arg(out_dir.join(format!("{name}.ptx")))
            .arg(&source)
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("{nvcc} failed ({s}) compiling {source} for compute capability {cap}"),
            Err(e) => panic!(
                "cannot run {nvcc} ({e}): the `cuda` feature compiles kiln's CUDA kernels with nvcc \
                 (`scripts/setup cuda` installs it and writes PATH into .kiln/env)"
            ),
        }
    }
}
