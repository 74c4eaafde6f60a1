//! # kiln
//!
//! Fast, observable ML inference on any backend. This facade re-exports kiln's crates
//! and links the providers whose cargo features are on (`candle` by default), so they
//! register themselves and can be chosen by name in a config.
//!
//! ```no_run
//! # async fn demo() -> kiln::Result<()> {
//! let config = kiln::KilnConfig::load(Some("examples/embed.toml".as_ref()), &[])?;
//! let optimizer = kiln::Optimizer::from_config(config).await?;
//! let vectors = optimizer.embed(&["kiln is fast".to_string()]).await?;
//! println!("{} dimensions", vectors[0].len());
//! optimizer.shutdown().await?;
//! # Ok(()) }
//! ```

pub use kiln_core as core;
pub use kiln_core::*;
pub use kiln_runtime as runtime;
pub use kiln_runtime::{Optimizer, Stats};
pub use kiln_text as text;
pub use kiln_trackers as trackers;
pub use kiln_video as video;
pub use kiln_vision as vision;

// A crate that only registers plugins is dropped by the linker unless something names
// it; these lines keep each enabled provider's registration in the binary.
#[cfg(feature = "redis")]
use kiln_cache_redis as _;
#[cfg(feature = "hub")]
use kiln_hub as _;
#[cfg(feature = "candle")]
use kiln_provider_candle as _;
#[cfg(feature = "mlx")]
use kiln_provider_mlx as _;
#[cfg(feature = "ort")]
use kiln_provider_ort as _;
#[cfg(feature = "tch")]
use kiln_provider_tch as _;

/// Which instruction sets the candle provider's CPU kernels use (AMX, AVX-512 VNNI,
/// AVX-512, AVX2, portable): detected once per process, capped by `KILN_CPU_ISA` or
/// [`cpu_kernels::set_max_isa`] to compare or test the lower paths.
#[cfg(feature = "candle")]
pub mod cpu_kernels {
    pub use kiln_provider_candle::{Isa, cpu_isa as active, detected_cpu_isa as detected, set_max_isa};
}

/// Kinds of the trackers built into kiln (custom ones register the same way).
pub const BUILTIN_TRACKERS: &[&str] = kiln_trackers::KINDS;

/// Names of the providers whose cargo features are on in this build.
pub const ENABLED_PROVIDERS: &[&str] = &[
    #[cfg(feature = "candle")]
    "candle",
    #[cfg(feature = "ort")]
    "ort",
    #[cfg(feature = "tch")]
    "tch",
    #[cfg(feature = "mlx")]
    "mlx",
];
