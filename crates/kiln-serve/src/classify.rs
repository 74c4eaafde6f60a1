//! `POST /classify`, for a `task = "classify"` config: images in, each one's best
//! classes out.
//!
//! The body is JSON, `{"images": ["<base64>", ...]}` (one string is one image; a
//! `data:image/...;base64,` prefix is allowed), or one encoded image as it is, sent with
//! an `image/*` or `application/octet-stream` content type (`curl --data-binary
//! @cat.jpg`). The answer has one prediction per image, in order: `{"top_k": [{"label",
//! "index", "score"}, ...]}` (best first, `classify.top_k` of them), or, for an image
//! that could not be read, `{"error": {"message", "type"}}` — the other images are
//! still classified.

use std::sync::Arc;

use axum::Json;
use axum::extract::State as Shared;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use kiln::Task;
use kiln::vision::ImageInput;
use serde::Deserialize;

use crate::layers::Body;
use crate::routes::ready_for;
use crate::{ApiError, State};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClassifyRequest {
    images: Images,
}

/// One base64 image or a list of them.
#[derive(Deserialize)]
#[serde(untagged)]
enum Images {
    One(String),
    Many(Vec<String>),
}

/// `POST /classify`.
pub(crate) async fn classify(
    Shared(state): Shared<Arc<State>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let optimizer = ready_for(&state, Task::Classify)?;
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let images = if content_type.starts_with("image/") || content_type == "application/octet-stream" {
        vec![ImageInput::Bytes { name: "the request body".into(), bytes: body.0.to_vec().into() }]
    } else {
        let request: ClassifyRequest = body.json()?;
        let encoded = match request.images {
            Images::One(one) => vec![one],
            Images::Many(many) => many,
        };
        encoded.iter().enumerate().map(|(i, text)| decode(i, text)).collect::<Result<Vec<_>, _>>()?
    };
    let max = state.config.server.max_inputs;
    if images.is_empty() {
        return Err(ApiError::invalid(
            "no images: send `images`, a base64 string or a non-empty list of them",
        ));
    }
    if images.len() > max {
        return Err(ApiError::too_large(format!(
            "{} images in one request; this server takes at most {max} (server.max_inputs)",
            images.len()
        )));
    }
    let predictions: Vec<serde_json::Value> = optimizer
        .classify(&images)
        .await?
        .into_iter()
        .map(|result| match result {
            Ok(c) => serde_json::json!({"top_k": c.top_k}),
            Err(e) => serde_json::json!({"error": {"message": e.to_string(), "type": e.kind()}}),
        })
        .collect();
    Ok(Json(serde_json::json!({"model": state.model_name(), "predictions": predictions})).into_response())
}

/// The `i`-th image's bytes from base64 (standard alphabet, padded or not), after any
/// `data:` URL prefix.
fn decode(i: usize, text: &str) -> Result<ImageInput, ApiError> {
    let payload = match text.strip_prefix("data:") {
        Some(url) => url.split_once(',').map_or(url, |(_, data)| data),
        None => text,
    };
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let bytes = engine.decode(payload.trim()).map_err(|e| {
        ApiError::invalid(format!(
            "the request body's `images[{i}]` is not base64 ({e}); send each image's file, base64-encoded"
        ))
    })?;
    Ok(ImageInput::Bytes { name: format!("images[{i}]"), bytes: bytes.into() })
}
