//! The small endpoints: models, tokenize/detokenize, health, version, metrics.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{json, Value};

use super::chat::render_prompt;
use super::error::ApiError;
use super::guard::ReadBody;
use super::logprobs::token_text;
use super::protocol::chat::ChatMessage;
use super::validate::parse_json;
use super::AppState;

/// The served model under one of its names as OpenAI's model object (with
/// vLLM's extra fields).
fn model_object(st: &AppState, id: &str) -> Value {
    json!({
        "id": id,
        "object": "model",
        "created": st.created,
        "owned_by": "candela",
        "root": st.model_root,
        "parent": null,
        "max_model_len": st.max_model_len,
        // vLLM's task names: "generate" or "embed".
        "task": st.engine.model_kind().task(),
    })
}

pub async fn models(State(st): State<Arc<AppState>>) -> Response {
    let data: Vec<Value> = st
        .served_names
        .iter()
        .map(|n| model_object(&st, n))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// `GET /v1/models/{id}`: OpenAI's retrieve; ids may contain `/` (a path or
/// a hub repo id), hence the wildcard route.
pub async fn model(
    State(st): State<Arc<AppState>>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    match st.check_model(Some(&id)) {
        // The model's own path (also accepted) is reported as its first name.
        Ok(()) => {
            let id = if st.served_names.contains(&id) {
                &id
            } else {
                &st.model_name
            };
            axum::Json(model_object(&st, id)).into_response()
        }
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
struct TokenizeRequest {
    model: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<ChatMessage>>,
    add_special_tokens: Option<bool>,
    add_generation_prompt: Option<bool>,
    continue_final_message: Option<bool>,
    return_token_strs: Option<bool>,
    chat_template_kwargs: Option<serde_json::Map<String, Value>>,
}

pub async fn tokenize(State(st): State<Arc<AppState>>, ReadBody(body): ReadBody) -> Response {
    let run = move |st: &AppState| -> Result<Value, ApiError> {
        let req: TokenizeRequest = parse_json(&body)?;
        st.check_model(req.model.as_deref())?;
        let tok = st.engine.tokenizer();
        let ids = match (&req.prompt, &req.messages) {
            (Some(p), None) => tok.encode(p, req.add_special_tokens.unwrap_or(true)),
            (None, Some(m)) => {
                let extra = Value::Object(req.chat_template_kwargs.clone().unwrap_or_default());
                let text = render_prompt(
                    st,
                    m,
                    req.add_generation_prompt.unwrap_or(true),
                    req.continue_final_message.unwrap_or(false),
                    extra,
                )?;
                tok.encode(&text, req.add_special_tokens.unwrap_or(false))
            }
            _ => {
                return Err(ApiError::bad_request(
                    "prompt",
                    "give either `prompt` or `messages`",
                ))
            }
        }
        .map_err(|e| ApiError::bad_request("prompt", e.to_string()))?;
        let strs = req
            .return_token_strs
            .unwrap_or(false)
            .then(|| ids.iter().map(|&t| token_text(tok, t)).collect::<Vec<_>>());
        Ok(
            json!({"count": ids.len(), "max_model_len": st.max_model_len, "tokens": ids, "token_strs": strs}),
        )
    };
    match st.offload(super::Lane::Utility, run).await {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize)]
struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<u32>,
}

pub async fn detokenize(State(st): State<Arc<AppState>>, ReadBody(body): ReadBody) -> Response {
    let run = move |st: &AppState| -> Result<Value, ApiError> {
        let req: DetokenizeRequest = parse_json(&body)?;
        st.check_model(req.model.as_deref())?;
        if let Some(&bad) = req.tokens.iter().find(|&&t| t as usize >= st.vocab_size) {
            return Err(ApiError::bad_request(
                "tokens",
                format!("token id {bad} is out of vocabulary"),
            ));
        }
        let text = st
            .engine
            .tokenizer()
            .decode(&req.tokens, false)
            .map_err(|e| ApiError::bad_request("tokens", e.to_string()))?;
        Ok(json!({"prompt": text}))
    };
    match st.offload(super::Lane::Utility, run).await {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `POST /reset_prefix_cache` (vLLM's): forgets every cached prefix; blocks in
/// use keep serving their requests.
pub async fn reset_prefix_cache(State(st): State<Arc<AppState>>) -> Response {
    match st.engine.reset_prefix_cache() {
        Ok(()) => axum::Json(json!({"reset": true})).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// 200 while the engine thread runs, 503 once it has died.
pub async fn health(State(st): State<Arc<AppState>>) -> Response {
    if st.engine.is_alive() {
        StatusCode::OK.into_response()
    } else {
        ApiError::Unavailable("the engine has stopped".into()).into_response()
    }
}

pub async fn version() -> Response {
    axum::Json(json!({"version": env!("CARGO_PKG_VERSION")})).into_response()
}

pub async fn metrics(State(st): State<Arc<AppState>>) -> Response {
    let text = st.metrics.render(&st.engine.stats());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

pub async fn not_found(uri: Uri) -> Response {
    ApiError::NotFound(format!("no route for {}", uri.path())).into_response()
}

pub async fn method_not_allowed(method: Method, uri: Uri) -> Response {
    ApiError::MethodNotAllowed(format!("{method} is not allowed on {}", uri.path())).into_response()
}
