//! `kiln serve`: the HTTP routes people already call, over one [`Optimizer`].
//!
//! | route | API |
//! |---|---|
//! | `POST /v1/embeddings` | OpenAI embeddings: `input` (a string or a list), `model`, `encoding_format` (`float`, `base64`), `dimensions` (truncated, then re-normalised), `user` (ignored); usage counts tokens |
//! | `POST /embed` | Hugging Face TEI: `inputs`, `normalize`, `truncate` (`false`: a text longer than the model takes is refused with 413; unset: `server.auto_truncate`), `dimensions` |
//! | `POST /classify` | for a `task = "classify"` config: `{"images": [base64, ...]}` or one image as the body; each image's best classes, or its own error |
//! | `POST /v1/chat/completions`, `POST /v1/completions` | OpenAI, for a `task = "generate"` config: `messages` / `prompt`, `max_tokens`, `temperature`, `top_p`, `seed`, `stop`, `stream` (server-sent events) |
//! | `GET /info` | TEI's model description |
//! | `GET /health` | 200 once the model is loaded and warmed, 503 before |
//! | `GET /metrics` | Prometheus text from [`Optimizer::stats`] |
//! | `GET /v2/health/live`, `/v2/health/ready`, `/v2/models/{name}`, `/v2/models/{name}/ready`, `POST /v2/models/{name}/infer` | Open Inference Protocol v2 (KServe, Triton; `tritonclient[http]`): the model's own tensors as JSON or binary tensor data |
//!
//! The port opens before the model loads, so an orchestrator's readiness probe sees
//! 503 until it can serve. Errors are JSON, `{"error": {"message", "type"}}`: 413 for a
//! body over `server.max_body_bytes` or more inputs than `server.max_inputs`, 422 for
//! malformed JSON or a wrong field (named), 429 with `Retry-After` when the queue is
//! full, 504 past the deadline, 401 without one of `server.api_keys` (when set, checked
//! before the body is read; `/health`, `/metrics` and `/v2/health/live` stay open). CORS is off unless `server.cors_origins` names origins.
//! [`serve`] bounds every connection (header, idle and body timeouts, a cap on open
//! connections) and stops on the future it is given: no new connections, in-flight
//! requests finish within `server.shutdown_timeout_ms` (`connections.rs`).

mod chat;
mod classify;
mod connections;
mod error;
mod layers;
mod metrics;
mod oip;
mod routes;

use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::routing::{get, post};
use kiln::runtime::Generation;
use kiln::{EmbeddingHead, KilnConfig, Optimizer};

pub use connections::{Limits, serve};
pub use error::ApiError;

/// What the handlers share.
pub struct State {
    optimizer: OnceLock<Arc<Optimizer>>,
    generation: OnceLock<Arc<Generation>>,
    /// Request bodies' budget, in KiB (`server.max_buffered_body_mb`).
    bodies: Arc<tokio::sync::Semaphore>,
    config: KilnConfig,
    head: EmbeddingHead,
    name: String,
}

impl State {
    /// A state for `config`'s model; [`State::ready`] hands it the loaded optimizer.
    /// `head` is the embedding head the text pipeline applies (its normalisation is
    /// what `normalize` and `dimensions` build on).
    pub fn new(config: KilnConfig, head: EmbeddingHead) -> Arc<State> {
        let name = config
            .model
            .path
            .file_name()
            .map_or_else(|| config.model.path.display().to_string(), |n| n.to_string_lossy().into_owned());
        let bodies = Arc::new(tokio::sync::Semaphore::new(config.server.max_buffered_body_mb << 10));
        Arc::new(State {
            optimizer: OnceLock::new(),
            generation: OnceLock::new(),
            bodies,
            config,
            head,
            name,
        })
    }

    /// The model is loaded: routes answer from now on.
    pub fn ready(&self, optimizer: Arc<Optimizer>) {
        let _ = self.optimizer.set(optimizer);
    }

    /// A generate-task model is loaded: the completion routes answer from now on.
    pub fn ready_generation(&self, generation: Arc<Generation>) {
        let _ = self.generation.set(generation);
    }

    /// The request bodies' budget (KiB permits), shared by every connection.
    pub(crate) fn bodies(&self) -> Arc<tokio::sync::Semaphore> {
        self.bodies.clone()
    }

    /// The budget's size, KiB.
    pub(crate) fn bodies_budget_kib(&self) -> usize {
        self.config.server.max_buffered_body_mb << 10
    }

    /// The generation engine, once loaded.
    pub fn generation(&self) -> Option<&Arc<Generation>> {
        self.generation.get()
    }

    /// The optimizer, once loaded.
    pub fn optimizer(&self) -> Option<&Arc<Optimizer>> {
        self.optimizer.get()
    }

    /// Refuses (404) a request for a model this server does not serve, naming the one it
    /// does; `None` (no `model` given) is this one.
    pub fn check_model(&self, requested: Option<&str>) -> Result<(), ApiError> {
        match requested.filter(|m| *m != self.name) {
            None => Ok(()),
            Some(model) => Err(ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "model_not_found",
                format!("model `{}` is not served here; this server serves `{}`", shown(model), self.name),
            )),
        }
    }

    /// The name clients pass as `model` (the model folder's name).
    pub fn model_name(&self) -> &str {
        &self.name
    }
}

/// A client's string as an error message quotes it: at most 64 characters, so a
/// megabyte of `model` is not echoed back whole.
pub(crate) fn shown(text: &str) -> String {
    const MOST: usize = 64;
    match text.char_indices().nth(MOST) {
        Some((cut, _)) => format!("{}… ({} bytes)", &text[..cut], text.len()),
        None => text.to_string(),
    }
}

/// Every route over `state`. The model's routes are behind one layer that checks the
/// API key (when `server.api_keys` is set) before the body is read, and the body limit;
/// `/health`, `/metrics` and `/v2/health/live` stay open for probes and scrapers.
pub fn router(state: Arc<State>) -> Router {
    let limit = state.config.server.max_body_bytes;
    let cors = cors(&state.config.server.cors_origins);
    let protected = Router::new()
        .route("/v1/embeddings", post(routes::openai_embeddings))
        .route("/embed", post(routes::tei_embed))
        .route("/classify", post(classify::classify))
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(chat::completions))
        .route("/info", get(routes::tei_info))
        .route("/v2", get(oip::server))
        .route("/v2/health/ready", get(oip::ready))
        .route("/v2/models/{name}", get(oip::metadata))
        .route("/v2/models/{name}/ready", get(oip::model_ready))
        .route("/v2/models/{name}/infer", post(oip::infer))
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(state.clone(), layers::require_key));
    let router = Router::new()
        .route("/health", get(routes::health))
        .route("/metrics", get(metrics::prometheus))
        .route("/v2/health/live", get(oip::live))
        .merge(protected)
        .fallback(routes::not_found)
        .with_state(state);
    match cors {
        Some(layer) => router.layer(layer),
        None => router,
    }
}

/// The CORS layer `server.cors_origins` asks for (none when empty).
fn cors(origins: &[String]) -> Option<tower_http::cors::CorsLayer> {
    use axum::http::{HeaderValue, Method, header};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    if origins.is_empty() {
        return None;
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST])
            .allow_headers([header::CONTENT_TYPE, header::AUTHORIZATION]),
    )
}

/// Completes on SIGTERM or Ctrl-C.
pub async fn termination() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = interrupt.await;
                return;
            }
        };
        tokio::select! {
            _ = interrupt => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
