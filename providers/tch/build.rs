//! Two jobs at build time.
//!
//! 1. Checks that the libtorch torch-sys linked is the PyTorch release tch binds.
//!    torch-sys checks this itself for `LIBTORCH_USE_PYTORCH` and for a libtorch
//!    archive's `build-version`, but not for `LIBTORCH` pointing into a pip-installed
//!    torch (what `scripts/setup tch` does), whose version is in `version.py`.
//! 2. Builds `cpp/aoti.cpp` (AOTInductor packages through libtorch's C++ loader, which
//!    tch does not bind) into a static library linked into the provider.
//! 3. Builds `cuda/graphs.cpp` (CUDA graphs through libtorch's C++ API, which tch does
//!    not bind) into a small shared library of its own that the provider embeds and
//!    loads only once CUDA is in use — when the libtorch is a CUDA build and the CUDA
//!    runtime's headers are found. Otherwise the provider runs without graphs and
//!    says why (`TCH_PROVIDER_GRAPHS_WHY`).

use std::path::{Path, PathBuf};
use std::process::Command;

#[path = "src/version.rs"]
mod version;

/// The PyTorch release tch 0.24 binds.
const EXPECTED: &str = "2.11.0";

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    println!("cargo:rerun-if-env-changed=CXX");
    println!("cargo:rerun-if-changed=cuda/graphs.cpp");
    println!("cargo:rerun-if-changed=cpp/aoti.cpp");
    println!("cargo:rerun-if-changed=cpp/guarded.h");
    println!("cargo::rustc-check-cfg=cfg(kiln_tch_graphs)");
    println!("cargo:rustc-env=TCH_PROVIDER_EXPECTED_TORCH={EXPECTED}");
    // torch-sys (links = "tch") hands its lib dir on as DEP_TCH_LIBTORCH_LIB.
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:rustc-env=TCH_PROVIDER_GRAPHS_WHY=kiln was built without libtorch");
        return;
    };
    println!("cargo:rustc-env=TCH_PROVIDER_BUILD_LIBTORCH={lib}");
    if let Some(found) = version::torch_version(Path::new(&lib))
        && !version::same_release(&found, EXPECTED)
    {
        panic!(
            "\n\nkiln-provider-tch: the libtorch in {} is PyTorch {found}; tch 0.24 needs PyTorch {EXPECTED}.\n\
             Run `scripts/setup tch` (installs torch=={EXPECTED} from PyPI and writes LIBTORCH into .kiln/env), \
             then `. .kiln/env`, or point LIBTORCH at a libtorch {EXPECTED}.\n\n",
            Path::new(&lib).parent().unwrap_or(Path::new(&lib)).display()
        );
    }
    build_aoti(Path::new(&lib));
    match build_graphs(Path::new(&lib)) {
        Ok(library) => {
            println!("cargo:rustc-cfg=kiln_tch_graphs");
            println!("cargo:rustc-env=TCH_PROVIDER_GRAPHS_SO={}", library.display());
        }
        Err(why) => println!("cargo:rustc-env=TCH_PROVIDER_GRAPHS_WHY={why}"),
    }
}

/// The C++ compiler and the flags libtorch's headers need.
fn compiler(root: &Path) -> Command {
    let mut command = Command::new(std::env::var("CXX").unwrap_or_else(|_| "c++".into()));
    command.args(["-std=c++17", "-O2", "-fPIC", "-D_GLIBCXX_USE_CXX11_ABI=1"]);
    command.arg(format!("-I{}", root.join("include").display()));
    command.arg(format!("-I{}", root.join("include/torch/csrc/api/include").display()));
    command
}

fn run(mut command: Command, what: &str) {
    let status =
        command.status().unwrap_or_else(|e| panic!("\n\nkiln-provider-tch: cannot run {command:?}: {e}\n\n"));
    if !status.success() {
        panic!("\n\nkiln-provider-tch: {what} failed ({status}): {command:?}\n\n");
    }
}

/// `cpp/aoti.cpp` as a static library, linked ahead of libtorch_cpu (which it calls).
fn build_aoti(lib: &Path) {
    let root = lib.parent().expect("libtorch's lib folder has a parent");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let object = out.join("aoti.o");
    let mut compile = compiler(root);
    compile.args(["-c", "cpp/aoti.cpp", "-o"]).arg(&object);
    run(compile, "compiling cpp/aoti.cpp against libtorch");
    let mut archive = Command::new(std::env::var("AR").unwrap_or_else(|_| "ar".into()));
    archive.arg("crs").arg(out.join("libkiln_tch_aoti.a")).arg(&object);
    run(archive, "archiving cpp/aoti.cpp");
    println!("cargo:rustc-link-search=native={}", out.display());
    println!("cargo:rustc-link-lib=static=kiln_tch_aoti");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-link-lib=dylib=stdc++");
}

/// Where the CUDA runtime's headers are: PyPI's nvidia wheels beside a pip-installed
/// torch (CUDA 13's layout, then 12's), else a CUDA toolkit.
fn cuda_include(torch_root: &Path) -> Option<PathBuf> {
    let site = torch_root.parent()?;
    let mut candidates = vec![site.join("nvidia/cu13/include"), site.join("nvidia/cuda_runtime/include")];
    if let Ok(home) = std::env::var("CUDA_HOME") {
        candidates.push(Path::new(&home).join("include"));
    }
    candidates.push("/usr/local/cuda/include".into());
    // cuda_runtime.h includes crt/host_config.h, which PyPI ships apart
    // (nvidia-cuda-crt; `scripts/setup tch` installs it).
    candidates
        .into_iter()
        .find(|dir| dir.join("cuda_runtime_api.h").is_file() && dir.join("crt/host_config.h").is_file())
}

/// Compiles the graphs library against `lib`'s libtorch, or says why not.
fn build_graphs(lib: &Path) -> Result<PathBuf, String> {
    if !lib.join("libtorch_cuda.so").is_file() {
        return Err(format!("the libtorch in {} is a CPU-only build", lib.display()));
    }
    let root = lib.parent().ok_or("libtorch's lib folder has no parent")?;
    let include = root.join("include");
    if !include.join("ATen/cuda/CUDAGraph.h").is_file() {
        return Err(format!("{} has no ATen/cuda/CUDAGraph.h", include.display()));
    }
    let cuda = cuda_include(root).ok_or(
        "the CUDA runtime's headers (cuda_runtime_api.h and crt/host_config.h) were not found beside torch, \
         in $CUDA_HOME/include or in /usr/local/cuda/include (`scripts/setup tch` installs them from PyPI)",
    )?;
    let out =
        PathBuf::from(std::env::var("OUT_DIR").map_err(|e| e.to_string())?).join("libkiln_tch_graphs.so");
    let mut command = compiler(root);
    command
        .arg("-shared")
        .arg(format!("-I{}", cuda.display()))
        .arg("cuda/graphs.cpp")
        .arg(format!("-L{}", lib.display()))
        .args(["-ltorch_cuda", "-lc10_cuda", "-ltorch_cpu", "-lc10", "-o"])
        .arg(&out);
    run(command, "compiling cuda/graphs.cpp against the CUDA libtorch");
    Ok(out)
}
