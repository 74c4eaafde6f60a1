//! With the `libmlx` feature: compiles kiln's MLX binding (`shim/kiln_mlx.cpp`) against
//! the MLX in `MLX_DIR` (a folder with `include/mlx/` and `lib/libmlx.so`, as the
//! `mlx-cpu`, `mlx-cuda-13` and macOS `mlx` wheels lay it out; `scripts/setup mlx`
//! writes it into `.kiln/env`) and links libmlx. `MLX_BLAS_DIR`, when set, is a folder
//! holding `libopenblas.so` (and `libgfortran.so`): linked ahead of libmlx, its BLAS
//! replaces the slow reference BLAS the Linux CPU wheel bundles.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=shim/kiln_mlx.cpp");
    println!("cargo:rerun-if-env-changed=MLX_DIR");
    println!("cargo:rerun-if-env-changed=MLX_BLAS_DIR");
    if std::env::var_os("CARGO_FEATURE_LIBMLX").is_none() {
        return;
    }
    let Some(dir) = std::env::var_os("MLX_DIR").map(PathBuf::from) else {
        panic!(
            "\n\nkiln-provider-mlx: MLX_DIR is not set. It names the folder with include/mlx and lib/libmlx.so \
             (the `mlx` folder of the mlx-cpu wheel). Run `scripts/setup mlx`, then `. .kiln/env`.\n\n"
        );
    };
    let include = dir.join("include");
    let lib = dir.join("lib");
    if !include.join("mlx/mlx.h").is_file() {
        panic!("\n\nkiln-provider-mlx: MLX_DIR={} has no include/mlx/mlx.h\n\n", dir.display());
    }
    let blas = std::env::var_os("MLX_BLAS_DIR").map(PathBuf::from);
    let mut shim = cc::Build::new();
    // MLX's headers trip -Wextra's unused-parameter; the shim's own code is clean.
    shim.cpp(true)
        .std("c++20")
        .include(&include)
        .file("shim/kiln_mlx.cpp")
        .flag_if_supported("-Wno-unused-parameter");
    if blas.is_some() {
        // The shim then names an OpenBLAS function, so the linker keeps the library
        // (it drops libraries nothing refers to).
        shim.define("KILN_MLX_OPENBLAS", None);
    }
    shim.compile("kiln_mlx");
    // BLAS before libmlx, so its cblas_* symbols are found before those of the
    // reference BLAS libmlx was linked against.
    if let Some(blas) = blas {
        println!("cargo:rustc-link-search=native={}", blas.display());
        println!("cargo:rustc-link-lib=dylib=openblas");
    }
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=mlx");
    if cfg!(target_os = "macos") {
        println!("cargo:rustc-link-lib=dylib=c++");
    } else {
        println!("cargo:rustc-link-lib=dylib=stdc++");
    }
    println!("cargo:rustc-env=KILN_MLX_BUILD_DIR={}", dir.display());
}
