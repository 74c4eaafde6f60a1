//! OpenAI's `POST /v1/chat/completions` and `POST /v1/completions` over a
//! [`Generation`](kiln::runtime::Generation) (a `task = "generate"` config): whole
//! answers, or server-sent events with `stream: true` (one chunk per piece of text, a
//! last chunk with the finish reason, then `data: [DONE]`). A client that goes away
//! drops its stream, which cancels the generation and frees its KV cache.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::State as Shared;
use axum::http::StatusCode;
use axum::response::sse::{Event as Sse, Sse as SseResponse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream};
use kiln::runtime::{Event, FinishReason, Generated, Prompt, TokenStream};
use kiln::text::chat::{Content, Message, Part};
use serde::Deserialize;

use crate::layers::Body;
use crate::{ApiError, State};

/// `stop`: one string or several.
#[derive(Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// The fields both routes read; others (`n` above 1 aside) are ignored, as OpenAI
/// clients send fields a server may not know.
#[derive(Deserialize)]
struct Request {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    messages: Option<Vec<Message>>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    n: Option<usize>,
}

fn finish(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop | FinishReason::StopString => "stop",
        FinishReason::Length | FinishReason::Context | FinishReason::Timeout => "length",
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `POST /v1/chat/completions`.
pub(crate) async fn chat_completions(
    Shared(state): Shared<Arc<State>>,
    body: Body,
) -> Result<Response, ApiError> {
    complete(state, body, true).await
}

/// `POST /v1/completions`: the prompt goes to the model as it is (no chat template).
pub(crate) async fn completions(Shared(state): Shared<Arc<State>>, body: Body) -> Result<Response, ApiError> {
    complete(state, body, false).await
}

async fn complete(state: Arc<State>, body: Body, chat: bool) -> Result<Response, ApiError> {
    let generation = state.generation().ok_or_else(|| match state.optimizer() {
        Some(_) => ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "this server embeds (task = \"embed\"); completions need a task = \"generate\" config",
        ),
        None => ApiError::loading(),
    })?;
    let request: Request = body.json()?;
    state.check_model(request.model.as_deref())?;
    if request.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("`n`: kiln makes one choice per request; send n = 1 or leave it out"));
    }
    let prompt = match (chat, request.messages, request.prompt) {
        (true, Some(messages), None) => Prompt::Messages(media_paths(messages, &state)?),
        (false, None, Some(prompt)) => Prompt::Text(prompt),
        (true, ..) => {
            return Err(ApiError::invalid("`messages`: a list of {\"role\", \"content\"} is required"));
        }
        (false, ..) => return Err(ApiError::invalid("`prompt`: a string is required")),
    };
    let mut settings = state.config.generate.clone();
    settings.chat_template = chat;
    if let Some(n) = request.max_completion_tokens.or(request.max_tokens) {
        settings.max_new_tokens = n;
    }
    if let Some(t) = request.temperature {
        settings.temperature = t;
    }
    if let Some(p) = request.top_p {
        settings.top_p = p;
    }
    if let Some(seed) = request.seed {
        settings.seed = seed;
    }
    match request.stop {
        Some(Stop::One(s)) => settings.stop = vec![s],
        Some(Stop::Many(v)) => settings.stop = v,
        None => {}
    }
    // Images are read, decoded and resized in stream_with: off the async threads.
    let engine = generation.clone();
    let tokens =
        tokio::task::spawn_blocking(move || engine.stream_with(prompt, settings)).await.map_err(|e| {
            ApiError::from(kiln::Error::backend("kiln", format!("the request's task failed: {e}")))
        })??;
    let id = format!("kiln-{}", uuid_ish());
    let model = state.model_name().to_string();
    if request.stream {
        let events = chunks(tokens, id, model, chat);
        return Ok(SseResponse::new(events).into_response());
    }
    let done = tokens.finish().await?;
    Ok(Json(whole(&done, &id, &model, chat)).into_response())
}

/// `messages` with each image part's `path` checked against `server.allowed_media_dir`
/// (and made absolute under it): unset, paths are refused — only `data:` URLs are taken,
/// so no client makes the server read its files; set, a path must resolve inside it.
fn media_paths(mut messages: Vec<Message>, state: &State) -> Result<Vec<Message>, ApiError> {
    for message in &mut messages {
        let Content::Parts(parts) = &mut message.content else { continue };
        for part in parts {
            let Part::Image { path: Some(path), .. } = part else { continue };
            let Some(root) = &state.config.server.allowed_media_dir else {
                return Err(ApiError::invalid(format!(
                    "image path `{}`: this server reads no files for clients (server.allowed_media_dir is not set); \
                     send the image as a data: URL",
                    path.display()
                )));
            };
            let inside = root.canonicalize().ok().and_then(|root| {
                let full = root.join(&*path).canonicalize().ok()?;
                full.starts_with(&root).then_some(full)
            });
            match inside {
                Some(full) => *path = full,
                None => {
                    return Err(ApiError::invalid(format!(
                        "image path `{}` is not a file inside server.allowed_media_dir",
                        path.display()
                    )));
                }
            }
        }
    }
    Ok(messages)
}

/// A request id: time and a counter, unique within the process.
fn uuid_ish() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{:x}{:04x}", now(), NEXT.fetch_add(1, Ordering::Relaxed))
}

fn usage(g: &Generated) -> serde_json::Value {
    serde_json::json!({
        "prompt_tokens": g.prompt_tokens,
        "completion_tokens": g.tokens.len(),
        "total_tokens": g.prompt_tokens + g.tokens.len(),
    })
}

fn whole(g: &Generated, id: &str, model: &str, chat: bool) -> serde_json::Value {
    let reason = finish(g.finish_reason);
    let choice = match chat {
        true => {
            serde_json::json!({"index": 0, "message": {"role": "assistant", "content": g.text}, "finish_reason": reason})
        }
        false => serde_json::json!({"index": 0, "text": g.text, "finish_reason": reason}),
    };
    let object = if chat { "chat.completion" } else { "text_completion" };
    serde_json::json!({"id": id, "object": object, "created": now(), "model": model, "choices": [choice], "usage": usage(g)})
}

/// The stream's chunks as server-sent events.
fn chunks(
    tokens: TokenStream,
    id: String,
    model: String,
    chat: bool,
) -> impl Stream<Item = Result<Sse, Infallible>> + Send + 'static {
    let object = if chat { "chat.completion.chunk" } else { "text_completion" };
    let chunk = move |delta: serde_json::Value, reason: Option<&str>| {
        let choice = match chat {
            true => serde_json::json!({"index": 0, "delta": delta, "finish_reason": reason}),
            false => {
                serde_json::json!({"index": 0, "text": delta["content"].as_str().unwrap_or(""), "finish_reason": reason})
            }
        };
        serde_json::json!({"id": id, "object": object, "created": now(), "model": model, "choices": [choice]})
    };
    // States: the role first (chat), then pieces, then the finish chunk, then [DONE].
    stream::unfold((tokens, 0u8), move |(mut tokens, phase)| {
        let chunk = chunk.clone();
        async move {
            if phase == 0 && chat {
                let first = chunk(serde_json::json!({"role": "assistant", "content": ""}), None);
                return Some((Ok(Sse::default().data(first.to_string())), (tokens, 1)));
            }
            if phase == 2 {
                return Some((Ok(Sse::default().data("[DONE]")), (tokens, 3)));
            }
            if phase == 3 {
                return None;
            }
            loop {
                match tokens.next().await {
                    Some(Event::Token { text, .. }) if text.is_empty() => continue,
                    Some(Event::Token { text, .. }) => {
                        let piece = chunk(serde_json::json!({"content": text}), None);
                        return Some((Ok(Sse::default().data(piece.to_string())), (tokens, 1)));
                    }
                    Some(Event::Done(g)) => {
                        let mut last = chunk(serde_json::json!({}), Some(finish(g.finish_reason)));
                        last["usage"] = usage(&g);
                        return Some((Ok(Sse::default().data(last.to_string())), (tokens, 2)));
                    }
                    Some(Event::Failed(e)) => {
                        let error =
                            serde_json::json!({"error": {"message": e.to_string(), "type": "server_error"}});
                        return Some((Ok(Sse::default().data(error.to_string())), (tokens, 2)));
                    }
                    None => return None,
                }
            }
        }
    })
}
