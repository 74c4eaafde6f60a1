//! Errors as HTTP responses: a status and `{"error": {"message", "type"}}`, the shape
//! OpenAI's clients read (TEI's read `error` too).

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl ApiError {
    /// An error of `status`, OpenAI's `kind` (`invalid_request_error`, ...), and a
    /// message naming what was wrong and what is accepted.
    pub fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, kind, message: message.into() }
    }

    /// 422: the request is well-formed HTTP but its content is not acceptable.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error", message)
    }

    /// 413: too large.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", message)
    }

    /// The status and the message.
    pub fn parts(self) -> (StatusCode, String) {
        (self.status, self.message)
    }

    /// 503: the model is still loading.
    pub fn loading() -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", "the model is loading; retry shortly")
    }
}

impl From<kiln::Error> for ApiError {
    fn from(e: kiln::Error) -> Self {
        let (status, kind) = match &e {
            kiln::Error::InvalidInput(_) | kiln::Error::Config(_) => {
                (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request_error")
            }
            kiln::Error::Overloaded { .. } => (StatusCode::TOO_MANY_REQUESTS, "overloaded"),
            kiln::Error::Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "timeout"),
            kiln::Error::Unsupported(_) => (StatusCode::UNPROCESSABLE_ENTITY, "unsupported"),
            kiln::Error::Shutdown(_) | kiln::Error::OutOfMemory { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            }
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error"),
        };
        ApiError::new(status, kind, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"message": self.message, "type": self.kind}});
        let mut response = (self.status, axum::Json(body)).into_response();
        if self.status == StatusCode::TOO_MANY_REQUESTS || self.status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}
