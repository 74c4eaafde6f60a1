//! The Open Inference Protocol v2 (KServe, NVIDIA Triton) over HTTP/JSON: health,
//! server and model metadata, and `infer` on the model's own tensors (its inputs and
//! outputs as [`kiln::ModelInfo`] lists them, through [`kiln::Optimizer::infer`]), so
//! `tritonclient[http]` works as it is. Tensors travel as JSON (`data` flat, row-major);
//! the binary-data extension is not offered. Errors are `{"error": "message"}`, the
//! protocol's shape.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State as Shared};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use kiln::{DType, Dim, Inputs, Tensor, TensorSpec};
use serde::Deserialize;

use crate::routes::{Raw, authorize, body};
use crate::{ApiError, State};

/// An OIP answer: the protocol's error shape on failure.
pub(crate) struct Oip(Result<Response, ApiError>);

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

fn optimizer<'a>(
    state: &'a State,
    headers: &HeaderMap,
    name: &str,
) -> Result<&'a Arc<kiln::Optimizer>, ApiError> {
    authorize(state, headers)?;
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
    Json(serde_json::json!({"name": "kiln", "version": env!("CARGO_PKG_VERSION"), "extensions": []}))
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
pub(crate) async fn metadata(
    Shared(state): Shared<Arc<State>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Oip {
    Oip(optimizer(&state, &headers, &name).map(|o| {
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

#[derive(Deserialize)]
struct InferInput {
    name: String,
    shape: Vec<usize>,
    datatype: String,
    data: serde_json::Value,
}

#[derive(Deserialize)]
struct InferOutput {
    name: String,
}

#[derive(Deserialize)]
struct InferRequest {
    #[serde(default)]
    id: Option<String>,
    inputs: Vec<InferInput>,
    #[serde(default)]
    outputs: Option<Vec<InferOutput>>,
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

fn tensor(input: &InferInput) -> Result<Tensor, ApiError> {
    let mut values = Vec::new();
    if !flatten(&input.data, &mut values) {
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
    raw: Raw,
) -> Oip {
    Oip(run(&state, &headers, &name, raw).await)
}

async fn run(state: &State, headers: &HeaderMap, name: &str, raw: Raw) -> Result<Response, ApiError> {
    let optimizer = optimizer(state, headers, name)?;
    let request: InferRequest = body(raw, state.config.server.max_body_bytes)?;
    let mut inputs = Inputs::new();
    for input in &request.inputs {
        inputs.insert(input.name.clone(), tensor(input)?);
    }
    let outputs = optimizer.infer(inputs).await?;
    let wanted: Option<Vec<&str>> =
        request.outputs.as_ref().map(|o| o.iter().map(|o| o.name.as_str()).collect());
    let mut answer = Vec::new();
    for (name, t) in outputs.iter() {
        if wanted.as_ref().is_some_and(|w| !w.contains(&name)) {
            continue;
        }
        let data = t.to_f32_vec().map_err(ApiError::from)?;
        let datatype = if t.dtype().is_float() { "FP32" } else { datatype(t.dtype()) };
        answer
            .push(serde_json::json!({"name": name, "shape": t.shape(), "datatype": datatype, "data": data}));
    }
    let mut body =
        serde_json::json!({"model_name": state.model_name(), "model_version": "1", "outputs": answer});
    if let Some(id) = request.id {
        body["id"] = serde_json::json!(id);
    }
    Ok(Json(body).into_response())
}
