//! The OpenAI-compatible HTTP API over the engine.

mod auth;
mod chat;
mod completions;
pub mod error;
mod logprobs;
mod misc;
pub mod protocol;
mod sse;
mod tracker;
pub mod validate;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, HeaderValue, Method};
use axum::routing::{get, post};
use axum::Router;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;

use crate::engine::EngineHandle;
use crate::metrics::Metrics;
use crate::tokenizer::ChatTemplate;

pub use error::ApiError;

/// Everything the handlers share (read-only; the engine handle is the only
/// path to mutable state).
pub struct AppState {
    pub engine: EngineHandle,
    /// `--served-model-name`, or the model path.
    pub model_name: String,
    /// The path or repo id the model came from (also accepted as `model`).
    pub model_root: String,
    pub chat_template: Option<ChatTemplate>,
    pub max_model_len: usize,
    pub vocab_size: usize,
    pub metrics: Arc<Metrics>,
    pub created: u64,
    /// Accepted API keys; empty means no authentication.
    pub api_keys: Vec<String>,
}

impl AppState {
    /// The requested model must be the one served (if named at all).
    pub fn check_model(&self, requested: Option<&str>) -> Result<(), ApiError> {
        match requested {
            None => Ok(()),
            Some(m) if m == self.model_name || m == self.model_root => Ok(()),
            Some(m) => Err(ApiError::ModelNotFound(m.to_string())),
        }
    }
}

/// HTTP-level settings.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Origins allowed by CORS; `*` allows any; empty disables CORS headers.
    pub allowed_origins: Vec<String>,
    pub max_body_bytes: usize,
}

#[derive(Clone, Default)]
struct MakeId;

impl MakeRequestId for MakeId {
    fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
        HeaderValue::from_str(&protocol::random_id("req-"))
            .ok()
            .map(RequestId::new)
    }
}

pub fn router(state: Arc<AppState>, http: &HttpConfig) -> Router {
    let protected = Router::new()
        .route("/v1/completions", post(completions::handle))
        .route("/v1/chat/completions", post(chat::handle))
        .route("/v1/models", get(misc::models))
        .route("/tokenize", post(misc::tokenize))
        .route("/detokenize", post(misc::detokenize))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ));
    let open = Router::new()
        .route("/health", get(misc::health))
        .route("/version", get(misc::version))
        .route("/metrics", get(misc::metrics));
    let request_id = HeaderName::from_static("x-request-id");
    let mut app = protected
        .merge(open)
        .fallback(misc::not_found)
        .with_state(state)
        .layer(DefaultBodyLimit::max(http.max_body_bytes))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(tracker::span)
                .on_response(tracker::on_response),
        )
        .layer(SetRequestIdLayer::new(request_id, MakeId));
    if !http.allowed_origins.is_empty() {
        let origins = if http.allowed_origins.iter().any(|o| o == "*") {
            AllowOrigin::any()
        } else {
            AllowOrigin::list(
                http.allowed_origins
                    .iter()
                    .filter_map(|o| HeaderValue::from_str(o).ok()),
            )
        };
        app = app.layer(
            CorsLayer::new()
                .allow_origin(origins)
                .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
                .allow_headers(tower_http::cors::Any)
                .max_age(Duration::from_secs(3600)),
        );
    }
    app
}
