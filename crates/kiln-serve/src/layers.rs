//! What wraps the protected routes, once, instead of calls at the top of every handler:
//! the API key (a middleware layer, so the key is checked before a byte of the body is
//! read) and the body limit (axum's `DefaultBodyLimit` layer, read through [`Body`],
//! which answers an oversized body with kiln's JSON error naming the limit).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State as Shared};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;

use crate::oip::Oip;
use crate::{ApiError, State};

/// The middleware of the protected routes: with `server.api_keys` set, a request
/// without `Authorization: Bearer <one of them>` is answered 401 before its body is
/// read — in the Open Inference Protocol's error shape on its `/v2` routes.
pub(crate) async fn require_key(Shared(state): Shared<Arc<State>>, request: Request, next: Next) -> Response {
    let keys = &state.config.server.api_keys;
    if keys.is_empty() {
        return next.run(request).await;
    }
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Every key is compared, each in time that depends on its length only.
    let known =
        given.is_some_and(|g| keys.iter().fold(false, |found, k| found | same(g.as_bytes(), k.as_bytes())));
    if known {
        return next.run(request).await;
    }
    let refusal = ApiError::new(
        StatusCode::UNAUTHORIZED,
        "authentication_error",
        "missing or unknown API key: send `Authorization: Bearer <key>` with one of server.api_keys",
    );
    if request.uri().path().starts_with("/v2") {
        return Oip::refused(refusal).into_response();
    }
    refusal.into_response()
}

/// Whether `a` and `b` are equal, looking at every byte: no early exit for an attacker
/// to time.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

/// A request's body, read within `server.max_body_bytes` and `server.body_timeout_ms`;
/// past the size, 413 naming the setting; past the time, 408; a body that cannot be read
/// is a 422. It holds its part of `server.max_buffered_body_mb` (reserved before the
/// first byte is read: its declared length, else `max_body_bytes`) until it is dropped,
/// when its request is answered.
pub(crate) struct Body(pub Bytes, #[allow(dead_code)] tokio::sync::OwnedSemaphorePermit);

impl FromRequest<Arc<State>> for Body {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &Arc<State>) -> Result<Self, ApiError> {
        let limit = state.config.server.max_body_bytes;
        let within = std::time::Duration::from_millis(state.config.server.body_timeout_ms);
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok())
            .map_or(limit, |n| n.min(limit));
        // KiB of the budget, never more than the whole of it (then it waits for all).
        let kib = (declared.div_ceil(1024).max(1)).min(state.bodies_budget_kib()) as u32;
        let bodies = state.bodies();
        let read = tokio::time::timeout(within, async move {
            let permit = bodies.acquire_many_owned(kib).await.expect("the budget is never closed");
            Bytes::from_request(request, state).await.map(|bytes| (bytes, permit))
        })
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the request body did not arrive within {} ms (server.body_timeout_ms)",
                    state.config.server.body_timeout_ms
                ),
            )
        })?;
        read.map(|(bytes, permit)| Body(bytes, permit)).map_err(|e| match e.status() {
            StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::too_large(format!("the request body is over {limit} bytes (server.max_body_bytes)"))
            }
            _ => ApiError::invalid(format!("the request body: {e}")),
        })
    }
}

impl Body {
    /// The body as JSON of type `T`: malformed JSON or a wrong field is a 422 naming the
    /// field and what it expected.
    pub(crate) fn json<T: DeserializeOwned>(&self) -> Result<T, ApiError> {
        let mut json = serde_json::Deserializer::from_slice(&self.0);
        let value =
            serde_path_to_error::deserialize(&mut json).map_err(|e| match e.path().to_string().as_str() {
                "." => ApiError::invalid(format!("the request body: {}", e.inner())),
                path => ApiError::invalid(format!("the request body's `{path}`: {}", e.inner())),
            })?;
        // One JSON value and nothing after it (whitespace aside).
        json.end()
            .map_err(|e| ApiError::invalid(format!("the request body: bytes after the JSON value ({e})")))?;
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_only_when_equal() {
        assert!(same(b"secret-key", b"secret-key"));
        assert!(!same(b"secret-key", b"secret-kez"));
        assert!(!same(b"secret", b"secret-key"));
        assert!(same(b"", b""));
    }

    #[test]
    fn bytes_after_the_json_value_are_refused() {
        #[derive(serde::Deserialize)]
        struct Request {
            #[allow(dead_code)]
            input: String,
        }
        let budget = Arc::new(tokio::sync::Semaphore::new(2));
        let body = |bytes: &'static [u8]| {
            Body(Bytes::from_static(bytes), budget.clone().try_acquire_owned().unwrap())
        };
        assert!(body(b"{\"input\": \"x\"}  \n").json::<Request>().is_ok());
        let e = body(b"{\"input\": \"x\"}garbage").json::<Request>().err().unwrap();
        let (status, message) = e.parts();
        assert!(
            status == StatusCode::UNPROCESSABLE_ENTITY && message.contains("bytes after the JSON value"),
            "{message}"
        );
    }

    #[test]
    fn long_names_are_shown_cut() {
        let long = "m".repeat(1 << 20);
        let shown = crate::shown(&long);
        assert!(shown.len() < 100 && shown.ends_with("(1048576 bytes)"), "{shown}");
        assert_eq!(crate::shown("all-MiniLM-L6-v2"), "all-MiniLM-L6-v2");
    }
}
