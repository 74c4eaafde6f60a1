//! `[server]`: `kiln serve`'s address and request limits.

use serde::{Deserialize, Serialize};

use crate::ConfigIssue;

/// `[server]`: where `kiln serve` listens and what it accepts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to bind (`127.0.0.1`: this machine only; `0.0.0.0`: every interface).
    pub host: String,
    /// Port (0: any free one, printed at start).
    pub port: u16,
    /// Largest request body, bytes; larger is refused with 413.
    pub max_body_bytes: usize,
    /// MiB of request bodies held at once, all connections together: a body reserves
    /// its declared length (or `max_body_bytes` when it declares none) before it is read
    /// and holds it until its request is answered; bodies past the budget wait (their
    /// bytes stay in the kernel's socket buffers) within `body_timeout_ms`. So stalled or
    /// slow uploads cannot hold more than this of the process's memory.
    pub max_buffered_body_mb: usize,
    /// Most inputs (texts) in one request; more is refused with 413.
    pub max_inputs: usize,
    /// When not empty, every route but `/health` and `/metrics` needs
    /// `Authorization: Bearer <one of these>` (401 otherwise).
    pub api_keys: Vec<String>,
    /// Browser origins allowed to call (CORS), e.g. `["https://app.example"]`; `["*"]`:
    /// any. Empty (the default): no CORS headers, browsers on other origins are refused.
    pub cors_origins: Vec<String>,
    /// What TEI's `POST /embed` does with a text longer than the model takes when the
    /// request does not say (`truncate`): cut it (`true`, kiln's way everywhere else) or
    /// refuse the request with 413 naming the input (`false`, TEI's default).
    pub auto_truncate: bool,
    /// Vision-language models: the one folder (and its subfolders) a chat message's image
    /// part may name by `path`. Unset (the default): only `data:` URLs are accepted, so
    /// no client can make the server read its files.
    pub allowed_media_dir: Option<std::path::PathBuf>,
    /// Longest a request's body may take to arrive, milliseconds, from the first byte
    /// read to the last: a client that sends part of its body and stalls gets 408 and
    /// its connection and buffer go, instead of holding them for as long as it likes.
    pub body_timeout_ms: u64,
    /// Longest a request's headers may take to arrive, milliseconds — and longest a
    /// kept-alive connection may sit idle waiting for its next request. A slow or silent
    /// client's connection is closed after it.
    pub header_timeout_ms: u64,
    /// Most connections open at once; one more is answered 503 with `Retry-After` and
    /// closed before anything of it is read. Keep it under the process's file limit
    /// (`ulimit -n`, 1024 by default on Linux).
    pub max_connections: usize,
    /// On SIGTERM, longest the server waits for requests in flight (streams included)
    /// before it drops them and exits, milliseconds. Keep it under the orchestrator's
    /// grace period (Kubernetes: 30 s by default; the shipped manifest sets 45 s).
    pub shutdown_timeout_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: "127.0.0.1".into(),
            port: 8080,
            max_body_bytes: 2 << 20,
            max_buffered_body_mb: 64,
            max_inputs: 512,
            api_keys: Vec::new(),
            cors_origins: Vec::new(),
            auto_truncate: true,
            allowed_media_dir: None,
            body_timeout_ms: 30_000,
            header_timeout_ms: 10_000,
            max_connections: 512,
            shutdown_timeout_ms: 30_000,
        }
    }
}

impl ServerConfig {
    /// What is out of range, by key.
    pub fn issues(&self) -> Vec<ConfigIssue> {
        let mut issues = Vec::new();
        if self.max_body_bytes < 1024 {
            issues.push(ConfigIssue::new(
                "server.max_body_bytes",
                self.max_body_bytes.to_string(),
                "1024 or more",
            ));
        }
        if self.max_inputs == 0 {
            issues.push(ConfigIssue::new("server.max_inputs", "0", "1 or more"));
        }
        if self.max_buffered_body_mb == 0 || self.max_buffered_body_mb > 1 << 20 {
            issues.push(ConfigIssue::new(
                "server.max_buffered_body_mb",
                self.max_buffered_body_mb.to_string(),
                "1..=1048576 (MiB)",
            ));
        }
        for (key, value) in [
            ("server.body_timeout_ms", self.body_timeout_ms),
            ("server.header_timeout_ms", self.header_timeout_ms),
            ("server.shutdown_timeout_ms", self.shutdown_timeout_ms),
        ] {
            if value == 0 {
                issues.push(ConfigIssue::new(key, "0", "1 or more (milliseconds)"));
            }
        }
        if self.max_connections == 0 {
            issues.push(ConfigIssue::new("server.max_connections", "0", "1 or more"));
        }
        if self.host.trim().is_empty() {
            issues.push(ConfigIssue::new(
                "server.host",
                "\"\"",
                "an address such as \"127.0.0.1\" or \"0.0.0.0\"",
            ));
        }
        if let Some(bad) = self.cors_origins.iter().find(|o| {
            *o != "*" && !(o.starts_with("http://") || o.starts_with("https://")) || o.ends_with('/')
        }) {
            issues.push(ConfigIssue::new(
                "server.cors_origins",
                format!("{bad:?}"),
                "\"*\" or origins such as \"https://app.example\" (scheme and host, no path)",
            ));
        }
        if self.api_keys.iter().any(|k| k.trim().is_empty()) {
            issues.push(ConfigIssue::new("server.api_keys", "\"\"", "non-empty keys"));
        }
        issues
    }
}
