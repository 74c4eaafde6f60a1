//! The OpenAI and TEI embedding routes, `/info` and `/health`.

use std::sync::Arc;

use axum::Json;
use axum::extract::State as Shared;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::Deserialize;

use kiln::Task;

use crate::layers::Body;
use crate::{ApiError, State};

/// One string or a list of strings.
#[derive(Deserialize)]
#[serde(untagged)]
enum Texts {
    One(String),
    Many(Vec<String>),
}

impl Texts {
    fn into_vec(self) -> Vec<String> {
        match self {
            Texts::One(t) => vec![t],
            Texts::Many(v) => v,
        }
    }
}

/// The optimizer, for a route of `task`: another task's server answers 404 naming what
/// it serves.
pub(crate) fn ready_for(state: &State, task: Task) -> Result<&Arc<kiln::Optimizer>, ApiError> {
    if state.config.task != task {
        let serves = match state.config.task {
            Task::Embed => "embeds (task = \"embed\"): POST /v1/embeddings, POST /embed",
            Task::Classify => "classifies images (task = \"classify\"): POST /classify",
            Task::Generate => {
                "generates (task = \"generate\"): POST /v1/chat/completions, POST /v1/completions"
            }
            Task::Video => "renders videos (task = \"video\")",
        };
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("this route needs a task = \"{}\" config; this server {serves}", task.as_str()),
        ));
    }
    state.optimizer().ok_or_else(ApiError::loading)
}

/// Refuses an empty request (422) or one of more than `server.max_inputs` texts (413).
fn check_inputs(state: &State, count: usize) -> Result<(), ApiError> {
    let limit = state.config.server.max_inputs;
    if count == 0 {
        return Err(ApiError::invalid("no input: send a string or a non-empty list of strings"));
    }
    if count > limit {
        return Err(ApiError::too_large(format!(
            "{count} inputs in one request; this server takes at most {limit} (server.max_inputs)"
        )));
    }
    // More than the queue holds could never be served, however idle the server.
    let queue = state.config.batching.queue_capacity;
    if count > queue {
        return Err(ApiError::too_large(format!(
            "{count} inputs in one request; the model's queue holds {queue} (batching.queue_capacity): \
             split the request"
        )));
    }
    Ok(())
}

/// Embeds `texts`, checking the count; `dimensions` keeps the first ones and
/// normalises again when the pipeline normalises or `normalize` asks.
async fn embed(
    state: &State,
    optimizer: &kiln::Optimizer,
    texts: Vec<String>,
    dimensions: Option<usize>,
    normalize: bool,
) -> Result<Vec<Vec<f32>>, ApiError> {
    check_inputs(state, texts.len())?;
    let mut vectors = optimizer.embed(&texts).await?;
    let width = vectors.first().map_or(0, Vec::len);
    if let Some(d) = dimensions
        && (d == 0 || d > width)
    {
        return Err(ApiError::invalid(format!("dimensions = {d}; this model gives 1 to {width}")));
    }
    for v in &mut vectors {
        if let Some(d) = dimensions {
            v.truncate(d);
        }
        if normalize && (dimensions.is_some() || !state.head.normalize) {
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            v.iter_mut().for_each(|x| *x /= norm);
        }
    }
    Ok(vectors)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OpenAiRequest {
    input: Texts,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<usize>,
    #[serde(default)]
    #[allow(dead_code)]
    user: Option<String>,
}

/// `POST /v1/embeddings`.
pub(crate) async fn openai_embeddings(
    Shared(state): Shared<Arc<State>>,
    body: Body,
) -> Result<Response, ApiError> {
    let optimizer = ready_for(&state, Task::Embed)?;
    let request: OpenAiRequest = body.json()?;
    state.check_model(request.model.as_deref())?;
    let base64 = match request.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "encoding_format `{other}`; accepted: \"float\", \"base64\""
            )));
        }
    };
    let texts = request.input.into_vec();
    check_inputs(&state, texts.len())?;
    // The usage count tokenizes the texts a second time (a cache hit never tokenizes):
    // on the tokenizer pool, alongside the embedding rather than before it.
    let (tokens, vectors) = tokio::join!(
        optimizer.token_lengths(texts.clone()),
        embed(&state, optimizer, texts, request.dimensions, true)
    );
    let (tokens, vectors): (usize, _) = (tokens?.iter().sum(), vectors?);
    let data: Vec<serde_json::Value> = vectors
        .into_iter()
        .enumerate()
        .map(|(index, v)| {
            let embedding = if base64 {
                let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                serde_json::Value::String(base64::engine::general_purpose::STANDARD.encode(bytes))
            } else {
                serde_json::json!(v)
            };
            serde_json::json!({"object": "embedding", "index": index, "embedding": embedding})
        })
        .collect();
    Ok(Json(serde_json::json!({
        "object": "list",
        "data": data,
        "model": state.model_name(),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }))
    .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TeiRequest {
    inputs: Texts,
    #[serde(default = "yes")]
    normalize: bool,
    /// `None`: `server.auto_truncate` decides.
    #[serde(default)]
    truncate: Option<bool>,
    #[serde(default)]
    dimensions: Option<usize>,
    #[serde(default)]
    #[allow(dead_code)]
    truncation_direction: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    prompt_name: Option<String>,
}

fn yes() -> bool {
    true
}

/// `POST /embed` (TEI): a list of vectors.
pub(crate) async fn tei_embed(Shared(state): Shared<Arc<State>>, body: Body) -> Result<Response, ApiError> {
    let optimizer = ready_for(&state, Task::Embed)?;
    let request: TeiRequest = body.json()?;
    if !request.normalize && state.head.normalize {
        return Err(ApiError::invalid(
            "normalize = false: this server's pipeline normalises (the model's Normalize module or text.normalize); \
             serve it with --set text.normalize=false for raw vectors",
        ));
    }
    let texts = request.inputs.into_vec();
    check_inputs(&state, texts.len())?;
    if !request.truncate.unwrap_or(state.config.server.auto_truncate) {
        let counts = optimizer.token_counts(texts.clone()).await?;
        if let Some(i) = counts.iter().position(|&(_, truncated)| truncated) {
            let max = counts[i].0;
            return Err(ApiError::too_large(format!(
                "inputs[{i}] is longer than the model's {max} tokens and truncate is false; send truncate: true \
                 to cut it to {max} (server.auto_truncate sets the default)"
            )));
        }
    }
    let vectors = embed(&state, optimizer, texts, request.dimensions, request.normalize).await?;
    Ok(Json(vectors).into_response())
}

/// `GET /info` (TEI's shape).
pub(crate) async fn tei_info(Shared(state): Shared<Arc<State>>) -> Result<Response, ApiError> {
    if let Some(g) = state.generation() {
        let info = g.info();
        return Ok(Json(serde_json::json!({
            "model_id": state.model_name(),
            "model_type": {"generation": {}},
            "max_input_length": info.context_length,
            "provider": info.provider,
            "device": info.device.to_string(),
            "quantization": info.quantization,
            "version": env!("CARGO_PKG_VERSION"),
        }))
        .into_response());
    }
    let optimizer = state.optimizer().ok_or_else(ApiError::loading)?;
    let info = optimizer.model_info();
    if state.config.task == Task::Classify {
        // TEI's shape for classifiers: class index → label.
        let id2label: serde_json::Map<String, serde_json::Value> = optimizer
            .labels()
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(i, label)| (i.to_string(), label.clone().into()))
            .collect();
        return Ok(Json(serde_json::json!({
            "model_id": state.model_name(),
            "model_dtype": info.dtype.to_string(),
            "model_type": {"classifier": {"id2label": id2label}},
            "top_k": state.config.classify.top_k,
            "max_client_batch_size": state.config.server.max_inputs,
            "provider": info.provider,
            "device": info.device.to_string(),
            "version": env!("CARGO_PKG_VERSION"),
        }))
        .into_response());
    }
    Ok(Json(serde_json::json!({
        "model_id": state.model_name(),
        "model_dtype": info.dtype.to_string(),
        "model_type": {"embedding": {"pooling": format!("{:?}", state.head.pooling).to_lowercase()}},
        "max_input_length": state.config.text.max_length.or(info.max_sequence_length),
        "max_client_batch_size": state.config.server.max_inputs,
        "max_batch_tokens": state.config.batching.max_batch_tokens,
        "max_concurrent_requests": state.config.batching.queue_capacity,
        "provider": info.provider,
        "device": info.device.to_string(),
        "version": env!("CARGO_PKG_VERSION"),
    }))
    .into_response())
}

/// `GET /health`: 200 once the model serves, 503 before.
pub(crate) async fn health(Shared(state): Shared<Arc<State>>) -> Response {
    match state.optimizer().is_some() || state.generation().is_some() {
        true => Json(serde_json::json!({"status": "ok"})).into_response(),
        false => ApiError::loading().into_response(),
    }
}

/// Anything else: 404 naming the routes.
pub(crate) async fn not_found() -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        "no such route; kiln serves POST /v1/embeddings, POST /embed, POST /v1/chat/completions, POST /v1/completions, \
         GET /info, GET /health, GET /metrics",
    )
}
