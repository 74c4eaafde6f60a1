//! The Open Inference Protocol v2 (KServe, NVIDIA Triton) over HTTP/JSON: health,
//! server and model metadata, and `infer` on the model's own tensors (its inputs and
//! outputs as [`kiln::ModelInfo`] lists them, through [`kiln::Optimizer::infer`]), so
//! `tritonclient[http]` works as it is. Tensors travel as JSON (`data` flat, row-major)
//! or, with Triton's binary tensor data extension (tritonclient's default), as raw
//! little-endian bytes after the JSON header (`Inference-Header-Content-Length`), in
//! both directions. Errors are `{"error": "message"}`, the protocol's shape.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State as Shared};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use kiln::{DType, Dim, Inputs, Tensor, TensorSpec};
use serde::Deserialize;

use crate::layers::Body;
use crate::{ApiError, State};

/// An OIP answer: the protocol's error shape on failure.
pub(crate) struct Oip(Result<Response, ApiError>);

impl Oip {
    /// A refusal in the protocol's shape.
    pub(crate) fn refused(error: ApiError) -> Self {
        Oip(Err(error))
    }
}

impl IntoResponse for Oip {
    fn into_response(self) -> Response {
        match self.0 {
            Ok(r) => r,
            Err(e) => {
                let (status, message) = e.parts();
                (status, Json(serde_json::json!({"error": message}))).into_response()
            }
        }
    }
}

fn datatype(d: DType) -> &'static str {
    match d {
        DType::F32 => "FP32",
        DType::F16 => "FP16",
        DType::BF16 => "BF16",
        DType::I64 => "INT64",
        DType::I32 => "INT32",
        DType::U8 => "UINT8",
        _ => "BYTES",
    }
}

fn spec(t: &TensorSpec) -> serde_json::Value {
    let shape: Vec<i64> = t
        .shape
        .iter()
        .map(|d| match d {
            Dim::Fixed(n) => *n as i64,
            Dim::Dynamic(_) => -1,
        })
        .collect();
    serde_json::json!({"name": t.name, "datatype": datatype(t.dtype), "shape": shape})
}

fn optimizer<'a>(state: &'a State, name: &str) -> Result<&'a Arc<kiln::Optimizer>, ApiError> {
    state.check_model(Some(name))?;
    state.optimizer().ok_or_else(|| match state.generation() {
        Some(_) => ApiError::invalid(
            "the Open Inference Protocol routes serve task = \"embed\" and \"classify\" configs",
        ),
        None => ApiError::loading(),
    })
}

/// `GET /v2`: server metadata.
pub(crate) async fn server() -> Json<serde_json::Value> {
    Json(
        serde_json::json!({"name": "kiln", "version": env!("CARGO_PKG_VERSION"), "extensions": ["binary_tensor_data"]}),
    )
}

/// `GET /v2/health/live`: the process answers.
pub(crate) async fn live() -> StatusCode {
    StatusCode::OK
}

/// `GET /v2/health/ready` and `GET /v2/models/{name}/ready`: 200 once the model serves.
pub(crate) async fn ready(Shared(state): Shared<Arc<State>>) -> StatusCode {
    match state.optimizer() {
        Some(_) => StatusCode::OK,
        None => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// `GET /v2/models/{name}/ready`.
pub(crate) async fn model_ready(Shared(state): Shared<Arc<State>>, Path(name): Path<String>) -> StatusCode {
    match state.optimizer() {
        Some(_) if name == state.model_name() => StatusCode::OK,
        Some(_) => StatusCode::NOT_FOUND,
        None => StatusCode::SERVICE_UNAVAILABLE,
    }
}

/// `GET /v2/models/{name}`: the model's tensors.
pub(crate) async fn metadata(Shared(state): Shared<Arc<State>>, Path(name): Path<String>) -> Oip {
    Oip(optimizer(&state, &name).map(|o| {
        let info = o.model_info();
        Json(serde_json::json!({
            "name": state.model_name(),
            "versions": ["1"],
            "platform": format!("kiln_{}", info.provider),
            "inputs": info.inputs.iter().map(spec).collect::<Vec<_>>(),
            "outputs": info.outputs.iter().map(spec).collect::<Vec<_>>(),
        }))
        .into_response()
    }))
}

/// The binary extension's header: how many leading bytes of the body are JSON.
const HEADER_LENGTH: &str = "inference-header-content-length";

#[derive(Deserialize, Default)]
struct Parameters {
    /// An input's bytes in the binary part (then it has no `data`).
    #[serde(default)]
    binary_data_size: Option<usize>,
    /// An output asked for as bytes.
    #[serde(default)]
    binary_data: Option<bool>,
    /// Every output as bytes (request-level).
    #[serde(default)]
    binary_data_output: Option<bool>,
}

#[derive(Deserialize)]
struct InferInput {
    name: String,
    shape: Vec<usize>,
    datatype: String,
    #[serde(default)]
    data: Option<serde_json::Value>,
    #[serde(default)]
    parameters: Parameters,
}

#[derive(Deserialize)]
struct InferOutput {
    name: String,
    #[serde(default)]
    parameters: Parameters,
}

#[derive(Deserialize)]
struct InferRequest {
    #[serde(default)]
    id: Option<String>,
    inputs: Vec<InferInput>,
    #[serde(default)]
    outputs: Option<Vec<InferOutput>>,
    #[serde(default)]
    parameters: Parameters,
}

/// The flat numbers of a JSON `data` (nested lists allowed).
fn flatten(v: &serde_json::Value, out: &mut Vec<f64>) -> bool {
    match v {
        serde_json::Value::Array(items) => items.iter().all(|i| flatten(i, out)),
        serde_json::Value::Number(n) => n.as_f64().map(|x| out.push(x)).is_some(),
        serde_json::Value::Bool(b) => {
            out.push(f64::from(u8::from(*b)));
            true
        }
        _ => false,
    }
}

/// The dtype of a protocol datatype name, for the ones kiln takes.
fn dtype(input: &InferInput) -> Result<DType, ApiError> {
    Ok(match input.datatype.as_str() {
        "INT64" => DType::I64,
        "INT32" => DType::I32,
        "UINT8" | "BOOL" => DType::U8,
        "FP32" => DType::F32,
        "FP16" => DType::F16,
        other => {
            return Err(ApiError::invalid(format!(
                "input `{}`: datatype {other}; accepted: INT64, INT32, UINT8, BOOL, FP32, FP16",
                input.name
            )));
        }
    })
}

/// An input from its JSON `data`, or from `binary` (its slice of the binary part).
fn tensor(input: &InferInput, binary: Option<&[u8]>) -> Result<Tensor, ApiError> {
    if let Some(bytes) = binary {
        return Tensor::from_bytes(dtype(input)?, input.shape.clone(), bytes.to_vec())
            .map_err(|e| ApiError::invalid(format!("input `{}`: {e}", input.name)));
    }
    let Some(data) = &input.data else {
        return Err(ApiError::invalid(format!(
            "input `{}` has neither `data` nor `parameters.binary_data_size`",
            input.name
        )));
    };
    let mut values = Vec::new();
    if !flatten(data, &mut values) {
        return Err(ApiError::invalid(format!("input `{}`: `data` must be numbers (JSON)", input.name)));
    }
    let shape = input.shape.clone();
    let made = match input.datatype.as_str() {
        "INT64" => Tensor::from_vec(shape, values.iter().map(|&x| x as i64).collect()),
        "INT32" => Tensor::from_vec(shape, values.iter().map(|&x| x as i32).collect()),
        "UINT8" | "BOOL" => Tensor::from_vec(shape, values.iter().map(|&x| x as u8).collect()),
        "FP32" => Tensor::from_vec(shape, values.iter().map(|&x| x as f32).collect()),
        "FP16" => Tensor::from_vec(shape, values.iter().map(|&x| half::f16::from_f64(x)).collect()),
        other => {
            return Err(ApiError::invalid(format!(
                "input `{}`: datatype {other}; accepted: INT64, INT32, UINT8, BOOL, FP32, FP16",
                input.name
            )));
        }
    };
    made.map_err(|e| ApiError::invalid(format!("input `{}`: {e}", input.name)))
}

/// `POST /v2/models/{name}/infer`.
pub(crate) async fn infer(
    Shared(state): Shared<Arc<State>>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Result<Body, ApiError>,
) -> Oip {
    Oip(run(&state, &headers, &name, body).await)
}

async fn run(
    state: &State,
    headers: &HeaderMap,
    name: &str,
    body: Result<Body, ApiError>,
) -> Result<Response, ApiError> {
    let optimizer = optimizer(state, name)?;
    let raw = body?.0;
    let json_length = match headers.get(HEADER_LENGTH) {
        None => raw.len(),
        Some(v) => {
            v.to_str().ok().and_then(|v| v.parse().ok()).filter(|&n| n <= raw.len()).ok_or_else(|| {
                ApiError::invalid(format!(
                    "{HEADER_LENGTH}: {v:?} is not a length within the {}-byte body",
                    raw.len()
                ))
            })?
        }
    };
    let (json, mut binary) = raw.split_at(json_length);
    let mut json = serde_json::Deserializer::from_slice(json);
    let request: InferRequest = serde_path_to_error::deserialize(&mut json)
        .map_err(|e| ApiError::invalid(format!("the request body's `{}`: {}", e.path(), e.inner())))?;
    // The same bounds as the embedding routes: rows as inputs (server.max_inputs, the
    // queue), and no sequence longer than the model takes — checked on the declared
    // shapes, before any tensor is built.
    let info = optimizer.model_info();
    for input in &request.inputs {
        let rows = input.shape.first().copied().unwrap_or(1);
        let limit = state.config.server.max_inputs.min(state.config.batching.queue_capacity);
        if rows > limit {
            return Err(ApiError::too_large(format!(
                "input `{}` has {rows} rows; this server takes at most {limit} in one request (server.max_inputs, \
                 batching.queue_capacity)",
                crate::shown(&input.name)
            )));
        }
        if let (Some(&sequence), Some(max)) = (input.shape.get(1), info.max_sequence_length)
            && input.shape.len() >= 2
            && sequence > max
            && info.inputs.iter().any(|s| s.name == input.name)
        {
            return Err(ApiError::too_large(format!(
                "input `{}` has sequences of {sequence}; the model takes at most {max}",
                crate::shown(&input.name)
            )));
        }
    }
    let mut inputs = Inputs::new();
    for input in &request.inputs {
        let part = match input.parameters.binary_data_size {
            Some(n) if n > binary.len() => {
                return Err(ApiError::invalid(format!(
                    "input `{}`: binary_data_size {n}, but only {} bytes of binary data are left",
                    input.name,
                    binary.len()
                )));
            }
            Some(n) => {
                let (part, rest) = binary.split_at(n);
                binary = rest;
                Some(part)
            }
            None => None,
        };
        inputs.insert(input.name.clone(), tensor(input, part)?);
    }
    // The request's batches together get one deadline, `scheduler.timeout_ms`, as one
    // call does: a request of many rows cannot run past it batch after batch.
    let deadline = state.config.scheduler.timeout_ms;
    let batches = infer_in_batches(optimizer, inputs, state.config.batching.max_batch_size);
    let outputs = if deadline > 0 {
        tokio::time::timeout(std::time::Duration::from_millis(deadline), batches).await.map_err(|_| {
            ApiError::from(kiln::Error::Timeout { after_ms: deadline, setting: "scheduler.timeout_ms" })
        })??
    } else {
        batches.await?
    };
    let all_binary = request.parameters.binary_data_output.unwrap_or(false);
    let wanted: Option<Vec<(&str, bool)>> = request.outputs.as_ref().map(|o| {
        o.iter().map(|o| (o.name.as_str(), o.parameters.binary_data.unwrap_or(all_binary))).collect()
    });
    let mut answer = Vec::new();
    let mut tail = Vec::new();
    for (name, t) in outputs.iter() {
        let as_binary = match &wanted {
            Some(w) => match w.iter().find(|(n, _)| *n == name) {
                Some(&(_, b)) => b,
                None => continue,
            },
            None => all_binary,
        };
        let data = t.to_f32_vec().map_err(ApiError::from)?;
        let datatype = if t.dtype().is_float() { "FP32" } else { datatype(t.dtype()) };
        let mut entry = serde_json::json!({"name": name, "shape": t.shape(), "datatype": datatype});
        if as_binary {
            let start = tail.len();
            if t.dtype().is_float() {
                tail.extend(data.iter().flat_map(|x| x.to_le_bytes()));
            } else {
                tail.extend_from_slice(t.bytes());
            }
            entry["parameters"] = serde_json::json!({"binary_data_size": tail.len() - start});
        } else {
            entry["data"] = serde_json::json!(data);
        }
        answer.push(entry);
    }
    let mut body =
        serde_json::json!({"model_name": state.model_name(), "model_version": "1", "outputs": answer});
    if let Some(id) = request.id {
        body["id"] = serde_json::json!(id);
    }
    if tail.is_empty() {
        return Ok(Json(body).into_response());
    }
    let mut bytes = serde_json::to_vec(&body).map_err(|e| ApiError::invalid(e.to_string()))?;
    let header_length = HeaderValue::from(bytes.len());
    bytes.extend_from_slice(&tail);
    Ok((
        [
            (header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream")),
            (HeaderName::from_static(HEADER_LENGTH), header_length),
        ],
        bytes,
    )
        .into_response())
}

/// `inputs` through the model `max_batch` rows at a time when every input has the same
/// rows and there are more than that, the outputs joined back along their first
/// dimension: a request's memory is bounded by the batch size, not by its own size, and
/// a request whose client goes away (its future dropped) runs no further batch.
async fn infer_in_batches(
    optimizer: &kiln::Optimizer,
    inputs: Inputs,
    max_batch: usize,
) -> Result<kiln::Outputs, ApiError> {
    let rows: Vec<usize> = inputs.iter().map(|(_, t)| t.shape().first().copied().unwrap_or(1)).collect();
    let total = rows.first().copied().unwrap_or(0);
    let splittable = !rows.is_empty()
        && rows.iter().all(|&r| r == total)
        && inputs.iter().all(|(_, t)| !t.shape().is_empty())
        && total > max_batch.max(1);
    if !splittable {
        return Ok(optimizer.infer(inputs).await?);
    }
    let mut parts: Vec<kiln::Outputs> = Vec::new();
    for start in (0..total).step_by(max_batch) {
        let range = start..(start + max_batch).min(total);
        let mut batch = Inputs::new();
        for (name, t) in inputs.iter() {
            batch.insert(name, rows_of(t, range.clone())?);
        }
        parts.push(optimizer.infer(batch).await?);
    }
    let mut joined = kiln::Outputs::new();
    let first = parts.first().cloned().unwrap_or_default();
    for (name, _) in first.iter() {
        let pieces: Vec<&Tensor> = parts.iter().filter_map(|p| p.get(name)).collect();
        joined.insert(name, join_rows(&pieces)?);
    }
    Ok(joined)
}

/// Rows `range` of `t`'s first dimension.
fn rows_of(t: &Tensor, range: std::ops::Range<usize>) -> Result<Tensor, ApiError> {
    let per = t.bytes().len() / t.shape()[0].max(1);
    let mut shape = t.shape().to_vec();
    shape[0] = range.len();
    Ok(Tensor::from_bytes(t.dtype(), shape, t.bytes()[range.start * per..range.end * per].to_vec())?)
}

/// `pieces` joined along their first dimension (the model's outputs of consecutive
/// batches: the same dtype and trailing shape).
fn join_rows(pieces: &[&Tensor]) -> Result<Tensor, ApiError> {
    let first = pieces.first().ok_or_else(|| ApiError::invalid("no output to join"))?;
    if pieces.iter().any(|p| p.dtype() != first.dtype() || p.shape().get(1..) != first.shape().get(1..)) {
        return Err(ApiError::invalid(
            "the model's outputs differ in shape from one batch of rows to the next; send at most \
             batching.max_batch_size rows",
        ));
    }
    let mut shape = first.shape().to_vec();
    shape[0] = pieces.iter().map(|p| p.shape()[0]).sum();
    let bytes = pieces.iter().flat_map(|p| p.bytes().iter().copied()).collect();
    Ok(Tensor::from_bytes(first.dtype(), shape, bytes)?)
}
