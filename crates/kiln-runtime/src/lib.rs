//! kiln's runtime: the [`Optimizer`] and what it wraps around a model.
//!
//! The optimizer looks the provider up by name, loads the model on a dedicated worker
//! thread ([`worker`]), tokenizes and pools on blocking tasks, and keeps [`Stats`].
//! Batching, scheduling, caching, profiling and tracking grow here as layers around the
//! worker; none of them names a backend.

pub mod optimizer;
pub mod stats;
pub mod worker;

pub use optimizer::{LAST_HIDDEN_STATE, Optimizer};
pub use stats::Stats;
pub use worker::{ModelWorker, RunOutput};
