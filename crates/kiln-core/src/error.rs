//! kiln's one error type.
//!
//! Every crate of kiln returns [`Error`]. Variants keep their sources, and their messages
//! say what was wrong and what is accepted, because the person reading them is an ML
//! engineer looking at a terminal, not at our code.

use std::fmt;
use std::path::PathBuf;

/// A boxed error from a backend or a user's code, kept as the source of an [`Error`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The result type of kiln.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in kiln.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A config failed validation; every problem found is listed.
    #[error("invalid configuration:\n{}", ConfigIssue::list(.0))]
    Config(Vec<ConfigIssue>),

    /// A name was looked up in a registry (providers, trackers) and is not there.
    #[error("unknown {kind} `{name}`; known {kind}s: {}", list_or_none(.known))]
    UnknownName {
        /// What was looked up: "provider", "tracker".
        kind: &'static str,
        /// The name asked for.
        name: String,
        /// The names that are registered.
        known: Vec<String>,
    },

    /// Two plugins registered the same name.
    #[error("{kind} `{name}` is registered twice; each {kind} name must be unique")]
    DuplicateName {
        /// "provider" or "tracker".
        kind: &'static str,
        /// The name registered twice.
        name: String,
    },

    /// A model could not be loaded.
    #[error("cannot load model from {path}: {reason}")]
    ModelLoad {
        /// The file or folder the model was to come from.
        path: PathBuf,
        /// What was wrong, in words.
        reason: String,
        /// The underlying error, when there is one.
        #[source]
        source: Option<BoxError>,
    },

    /// A request's input was rejected before inference.
    #[error("invalid input: {0}")]
    InvalidInput(String),

    /// Something was asked that this provider, device or build does not support.
    #[error("unsupported: {0}")]
    Unsupported(String),

    /// Reading or writing a file failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done: "reading", "writing", "creating".
        action: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },

    /// A backend failed while running a model.
    #[error("{provider} failed: {source}")]
    Backend {
        /// The provider's name.
        provider: String,
        /// Whether trying again may succeed (a transient device error, say).
        retryable: bool,
        /// The backend's own error.
        #[source]
        source: BoxError,
    },

    /// A model's queue is full and the config says to refuse rather than wait.
    #[error(
        "overloaded: the queue of model `{model}` is full ({capacity} waiting); retry later, raise \
         `batching.queue_capacity`, or set `batching.when_full = \"wait\"`"
    )]
    Overloaded {
        /// The model whose queue is full.
        model: String,
        /// The queue's capacity, in items.
        capacity: usize,
    },

    /// A model does not fit in the memory that is available for it.
    #[error(
        "cannot load {what}: required {:.2} GiB, available {:.2} GiB on {device}",
        gib(*required),
        gib(*available)
    )]
    OutOfMemory {
        /// The model (or what is being allocated), in words.
        what: String,
        /// Bytes it needs, by estimate.
        required: u64,
        /// Bytes available to it.
        available: u64,
        /// Where.
        device: crate::Device,
    },

    /// A request passed its deadline; its remaining work was cancelled.
    #[error("timed out after {after_ms} ms (`{setting}`); its remaining work was cancelled")]
    Timeout {
        /// The deadline, in milliseconds.
        after_ms: u64,
        /// The setting that gave it (`scheduler.timeout_ms`, `generate.timeout_ms`).
        setting: &'static str,
    },

    /// The optimizer or one of its workers has shut down.
    #[error("kiln is shutting down: {0}")]
    Shutdown(String),
}

impl Error {
    /// A [`Error::ModelLoad`] without an underlying source.
    pub fn model_load(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::ModelLoad { path: path.into(), reason: reason.into(), source: None }
    }

    /// A [`Error::ModelLoad`] that keeps the error that caused it.
    pub fn model_load_with(
        path: impl Into<PathBuf>,
        reason: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Error::ModelLoad { path: path.into(), reason: reason.into(), source: Some(source.into()) }
    }

    /// A non-retryable [`Error::Backend`].
    pub fn backend(provider: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Backend { provider: provider.into(), retryable: false, source: source.into() }
    }

    /// A [`Error::Io`].
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { action, path: path.into(), source }
    }

    /// Whether the scheduler may retry the request that failed with this error.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Backend { retryable: true, .. })
    }

    /// A short, stable name for the kind of error, used to count errors by kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Config(_) => "config",
            Error::UnknownName { .. } => "unknown_name",
            Error::DuplicateName { .. } => "duplicate_name",
            Error::ModelLoad { .. } => "model_load",
            Error::InvalidInput(_) => "invalid_input",
            Error::Unsupported(_) => "unsupported",
            Error::Io { .. } => "io",
            Error::Backend { .. } => "backend",
            Error::Overloaded { .. } => "overloaded",
            Error::Timeout { .. } => "timeout",
            Error::OutOfMemory { .. } => "out_of_memory",
            Error::Shutdown(_) => "shutdown",
        }
    }

    /// A copy of this error for each request that shared the batch that failed. The
    /// kind, message and retryability are kept; sources become their messages.
    pub fn for_request(&self) -> Error {
        match self {
            Error::InvalidInput(m) => Error::InvalidInput(m.clone()),
            Error::Unsupported(m) => Error::Unsupported(m.clone()),
            Error::Shutdown(m) => Error::Shutdown(m.clone()),
            Error::Overloaded { model, capacity } => {
                Error::Overloaded { model: model.clone(), capacity: *capacity }
            }
            Error::Backend { provider, retryable, source } => Error::Backend {
                provider: provider.clone(),
                retryable: *retryable,
                source: source.to_string().into(),
            },
            other => {
                Error::Backend { provider: "kiln".into(), retryable: false, source: other.to_string().into() }
            }
        }
    }
}

/// One problem found in a config: which key, what value it had, what is accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// Dotted key, e.g. `model.dtype`.
    pub key: String,
    /// The offending value as written, or a description (`unknown key`).
    pub found: String,
    /// What would have been accepted.
    pub expected: String,
    /// Where the value came from (a file, an environment variable, `--set`), when known.
    pub origin: Option<String>,
}

impl ConfigIssue {
    /// A new issue without an origin.
    pub fn new(key: impl Into<String>, found: impl Into<String>, expected: impl Into<String>) -> Self {
        ConfigIssue { key: key.into(), found: found.into(), expected: expected.into(), origin: None }
    }

    fn list(issues: &[ConfigIssue]) -> String {
        issues.iter().map(|i| format!("  - {i}")).collect::<Vec<_>>().join("\n")
    }
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}`: found {}, expected {}", self.key, self.found, self.expected)?;
        if let Some(origin) = &self.origin {
            write!(f, " (set in {origin})")?;
        }
        Ok(())
    }
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

fn list_or_none(names: &[String]) -> String {
    if names.is_empty() { "none".to_string() } else { names.join(", ") }
}

/// The message a caught panic carried (`panic!("...")` payloads are `&str` or
/// `String`), for errors that report one; "unknown panic" for any other payload.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_name_lists_the_known_ones() {
        let e = Error::UnknownName {
            kind: "provider",
            name: "candel".into(),
            known: vec!["candle".into(), "ort".into()],
        };
        assert_eq!(e.to_string(), "unknown provider `candel`; known providers: candle, ort");
    }

    #[test]
    fn config_error_lists_every_issue_with_key_value_and_expectation() {
        let mut issue = ConfigIssue::new("model.dtype", "\"f64\"", "one of f32, f16, bf16");
        issue.origin = Some("kiln.toml".into());
        let e = Error::Config(vec![issue, ConfigIssue::new("batching.max_batch_size", "0", "1..=4096")]);
        let text = e.to_string();
        assert!(
            text.contains("`model.dtype`: found \"f64\", expected one of f32, f16, bf16 (set in kiln.toml)")
        );
        assert!(text.contains("`batching.max_batch_size`: found 0, expected 1..=4096"));
    }

    #[test]
    fn a_copy_per_request_keeps_kind_message_and_retryability() {
        let e = Error::Backend { provider: "x".into(), retryable: true, source: "device busy".into() };
        let copy = e.for_request();
        assert_eq!((copy.kind(), copy.to_string(), copy.is_retryable()), (e.kind(), e.to_string(), true));
        let e = Error::InvalidInput("bad".into());
        assert_eq!(e.for_request().to_string(), e.to_string());
    }

    #[test]
    fn out_of_memory_names_both_figures_in_gib() {
        let e = Error::OutOfMemory {
            what: "model big".into(),
            required: 3 << 30,
            available: 1 << 29,
            device: crate::Device::Cpu,
        };
        assert_eq!(e.to_string(), "cannot load model big: required 3.00 GiB, available 0.50 GiB on cpu");
    }

    #[test]
    fn only_backend_errors_marked_retryable_are_retryable() {
        let transient = Error::Backend { provider: "x".into(), retryable: true, source: "busy".into() };
        assert!(transient.is_retryable());
        assert!(!Error::backend("x", "bad").is_retryable());
        assert!(!Error::InvalidInput("empty".into()).is_retryable());
    }
}
