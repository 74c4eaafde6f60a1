//! Checks, at build time, that the libtorch torch-sys linked is the PyTorch release tch
//! binds. torch-sys checks this itself for `LIBTORCH_USE_PYTORCH` and for a libtorch
//! archive's `build-version`, but not for `LIBTORCH` pointing into a pip-installed
//! torch (what `scripts/setup tch` does), whose version is in `version.py`.

use std::path::Path;

#[path = "src/version.rs"]
mod version;

/// The PyTorch release tch 0.24 binds.
const EXPECTED: &str = "2.11.0";

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rustc-env=TCH_PROVIDER_EXPECTED_TORCH={EXPECTED}");
    // torch-sys (links = "tch") hands its lib dir on as DEP_TCH_LIBTORCH_LIB.
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else { return };
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
}
