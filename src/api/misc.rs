//! The small endpoints: models, tokenize/detokenize, health, version, metrics.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::chat::render_prompt;
use super::error::{ApiError, ErrorResponse};
use super::guard::ReadBody;
use super::logprobs::token_text;
use super::protocol::chat::ChatMessage;
use super::validate::parse_json;
use super::AppState;

/// OpenAI's model object, with vLLM's extra fields.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelObject {
    pub id: String,
    /// `model`
    pub object: &'static str,
    pub created: u64,
    pub owned_by: &'static str,
    /// The path or repo id the model came from.
    pub root: String,
    pub parent: Option<String>,
    pub max_model_len: usize,
    /// vLLM's task name: `generate` or `embed`.
    pub task: &'static str,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ModelList {
    /// `list`
    pub object: &'static str,
    pub data: Vec<ModelObject>,
}

/// The served model under one of its names.
fn model_object(st: &AppState, id: &str) -> ModelObject {
    ModelObject {
        id: id.to_string(),
        object: "model",
        created: st.created,
        owned_by: "candela",
        root: st.model_root.clone(),
        parent: None,
        max_model_len: st.max_model_len,
        task: st.engine.model_kind().task(),
    }
}

/// OpenAI's list of models: every served name.
#[utoipa::path(get, path = "/v1/models", operation_id = "listModels", tag = "models",
    responses((status = 200, body = ModelList)))]
pub async fn models(State(st): State<Arc<AppState>>) -> Response {
    let data = st
        .served_names
        .iter()
        .map(|n| model_object(&st, n))
        .collect();
    axum::Json(ModelList {
        object: "list",
        data,
    })
    .into_response()
}

/// `GET /v1/models/{id}`: OpenAI's retrieve; ids may contain `/` (a path or
/// a hub repo id), hence the wildcard route.
#[utoipa::path(get, path = "/v1/models/{id}", operation_id = "retrieveModel", tag = "models",
    params(("id" = String, Path, description = "A served model name (may contain `/`)")),
    responses((status = 200, body = ModelObject), (status = 404, body = ErrorResponse)))]
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

/// vLLM's `/tokenize`: `prompt`, or chat `messages` rendered with the chat
/// template.
#[derive(Deserialize, utoipa::ToSchema)]
pub struct TokenizeRequest {
    model: Option<String>,
    prompt: Option<String>,
    messages: Option<Vec<ChatMessage>>,
    add_special_tokens: Option<bool>,
    add_generation_prompt: Option<bool>,
    continue_final_message: Option<bool>,
    return_token_strs: Option<bool>,
    chat_template_kwargs: Option<serde_json::Map<String, Value>>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct TokenizeResponse {
    count: usize,
    max_model_len: usize,
    tokens: Vec<u32>,
    /// With `return_token_strs`.
    token_strs: Option<Vec<String>>,
}

#[utoipa::path(post, path = "/tokenize", operation_id = "tokenize", tag = "tokenizer", request_body = TokenizeRequest,
    responses((status = 200, body = TokenizeResponse), (status = 400, body = ErrorResponse)))]
pub async fn tokenize(State(st): State<Arc<AppState>>, ReadBody(body): ReadBody) -> Response {
    let run = move |st: &AppState| -> Result<TokenizeResponse, ApiError> {
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
        Ok(TokenizeResponse {
            count: ids.len(),
            max_model_len: st.max_model_len,
            tokens: ids,
            token_strs: strs,
        })
    };
    match st.offload(super::Lane::Utility, run).await {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
pub struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<u32>,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct DetokenizeResponse {
    prompt: String,
}

#[utoipa::path(post, path = "/detokenize", operation_id = "detokenize", tag = "tokenizer", request_body = DetokenizeRequest,
    responses((status = 200, body = DetokenizeResponse), (status = 400, body = ErrorResponse)))]
pub async fn detokenize(State(st): State<Arc<AppState>>, ReadBody(body): ReadBody) -> Response {
    let run = move |st: &AppState| -> Result<DetokenizeResponse, ApiError> {
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
        Ok(DetokenizeResponse { prompt: text })
    };
    match st.offload(super::Lane::Utility, run).await {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ResetResponse {
    reset: bool,
}

/// `POST /reset_prefix_cache` (vLLM's): forgets every cached prefix; blocks in
/// use keep serving their requests.
#[utoipa::path(post, path = "/reset_prefix_cache", operation_id = "resetPrefixCache", tag = "engine",
    responses((status = 200, body = ResetResponse), (status = 503, body = ErrorResponse)))]
pub async fn reset_prefix_cache(State(st): State<Arc<AppState>>) -> Response {
    match st.engine.reset_prefix_cache() {
        Ok(()) => axum::Json(ResetResponse { reset: true }).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// 200 while the engine thread runs, 503 once it has died (`/ping` is the
/// same, for SageMaker-style checks).
#[utoipa::path(get, path = "/health", operation_id = "health", tag = "operations",
    responses((status = 200, description = "The engine runs"), (status = 503, body = ErrorResponse)))]
pub async fn health(State(st): State<Arc<AppState>>) -> Response {
    if st.engine.is_alive() {
        StatusCode::OK.into_response()
    } else {
        ApiError::Unavailable("the engine has stopped".into()).into_response()
    }
}

/// `/health` under SageMaker's name.
#[utoipa::path(get, path = "/ping", operation_id = "ping", tag = "operations",
    responses((status = 200, description = "The engine runs"), (status = 503, body = ErrorResponse)))]
pub async fn ping(st: State<Arc<AppState>>) -> Response {
    health(st).await
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct VersionResponse {
    version: &'static str,
}

#[utoipa::path(get, path = "/version", operation_id = "version", tag = "operations",
    responses((status = 200, body = VersionResponse)))]
pub async fn version() -> Response {
    axum::Json(VersionResponse {
        version: env!("CARGO_PKG_VERSION"),
    })
    .into_response()
}

/// Prometheus text exposition (README: Metrics).
#[utoipa::path(get, path = "/metrics", operation_id = "metrics", tag = "operations",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
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
