//! Fuzz harnesses for what kiln reads from users and what it writes for other tools.
//!
//! Each [`Target`] takes arbitrary bytes and panics only when kiln misbehaves: a panic
//! inside kiln, an error that is not one clear line, or output another tool could not
//! read back (a TFRecord with a bad checksum, a `.npy` whose header disagrees with its
//! data, a printed config that does not load again). The same functions run two ways:
//!
//! - **coverage-guided**, under libFuzzer: `scripts/fuzz <target> <seconds>` builds the
//!   `kiln-fuzz` binary (feature `libfuzzer`) with LLVM's sanitizer-coverage passes,
//!   which stable Rust accepts (`-C passes=sancov-module`), and runs it on the
//!   committed seeds in `seeds/<target>/`;
//! - **briefly in `cargo test`**: every seed, then a fixed number of deterministic
//!   mutations of them ([`mutate`]), so CI catches a regression without a fuzzing
//!   toolchain.
//!
//! docs/fuzzing.md lists the targets, how to run them and what they found.

use std::path::PathBuf;

// The tracker targets build trackers by kind through the registry: link the crate
// that registers them.
use kiln_trackers as _;

pub mod formats;
pub mod mutate;
mod targets;

pub use targets::{HTTP_KEY, http_call};

/// One fuzz target.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// Name used by `scripts/fuzz`, `KILN_FUZZ_TARGET` and the seed folder.
    pub name: &'static str,
    /// What it feeds and what it checks.
    pub about: &'static str,
    /// Runs one input; panics on a finding.
    pub run: fn(&[u8]),
}

/// Every target.
pub const TARGETS: &[Target] = &[
    Target {
        name: "config",
        about: "TOML config file (bytes before a NUL) plus --set flags (lines after it): loads or \
                errors; a loaded config validates, prints as TOML and loads back equal",
        run: targets::config,
    },
    Target {
        name: "text_input",
        about: "text input as lines and as JSON Lines: records or one error line naming the source",
        run: targets::text_input,
    },
    Target {
        name: "tokenize",
        about: "a text through MiniLM's tokenizer: kiln's fast rows equal the reference tokenizer's ids \
                and never exceed max_length",
        run: targets::tokenize,
    },
    Target {
        name: "image",
        about: "image bytes (first byte picks resize mode, layout, dtype, fast JPEG) through decode, \
                resize and normalise: a tensor of the configured shape with finite values, or one error \
                line naming the image",
        run: targets::image,
    },
    Target {
        name: "tensor_request",
        about: "tensors built from arbitrary dtypes, shapes and byte counts, checked by \
                ModelInfo::validate: whatever passes matches every input spec",
        run: targets::tensor_request,
    },
    Target {
        name: "npy",
        about: "a tensor written as .npy: header and data read back as written",
        run: targets::npy,
    },
    Target {
        name: "tensorboard",
        about: "config, metrics (any names, NaN, infinities) and summaries through the TensorBoard \
                tracker: every TFRecord's checksums hold and every event parses",
        run: targets::tensorboard,
    },
    Target {
        name: "http",
        about: "an HTTP/1.1 request to kiln serve's routes (MiniLM loaded, an API key set): never an \
                internal error, every refusal JSON with one line naming the problem, no response over \
                16 MiB",
        run: targets::http,
    },
    Target {
        name: "wandb",
        about: "the same through the W&B tracker: every log block's checksum holds, records number \
                1..n, each parses, wandb-summary.json is a JSON object",
        run: targets::wandb,
    },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}

/// `seeds/<name>`: the committed starting corpus of a target.
pub fn seeds_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("seeds").join(name)
}

/// The seed inputs of a target, in file-name order.
pub fn seeds(name: &str) -> std::io::Result<Vec<Vec<u8>>> {
    let mut paths: Vec<PathBuf> =
        std::fs::read_dir(seeds_dir(name))?.map(|e| e.map(|e| e.path())).collect::<std::io::Result<_>>()?;
    paths.sort();
    paths.iter().map(std::fs::read).collect()
}
