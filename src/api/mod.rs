//! The OpenAI-compatible HTTP API over the engine.

mod auth;
mod chat;
mod chat_output;
mod completions;
pub mod dashboard;
mod embeddings;
pub mod error;
pub mod guard;
mod logprobs;
mod misc;
pub mod openapi;
pub mod protocol;
pub mod reasoning;
mod responses;
pub mod server;
mod sse;
mod structured;
pub mod tools;
mod tracker;
pub mod validate;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, HeaderValue, Method};
use axum::routing::{get, post};
use axum::Router;
use tokio::sync::Semaphore;
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
    /// The first `--served-model-name`, or the model path: what responses
    /// report.
    pub model_name: String,
    /// Every `--served-model-name` (the first is `model_name`): all accepted
    /// in `model`, all listed by `/v1/models`.
    pub served_names: Vec<String>,
    /// The path or repo id the model came from (also accepted as `model`).
    pub model_root: String,
    pub chat_template: Option<ChatTemplate>,
    pub max_model_len: usize,
    pub vocab_size: usize,
    pub metrics: Arc<Metrics>,
    pub created: u64,
    /// Accepted API keys; empty means no authentication.
    pub api_keys: Vec<String>,
    pub body_limits: guard::BodyLimits,
    /// Most sequences (prompts x `n`) one request may ask for.
    pub max_seqs_per_request: usize,
    /// Bounds how many requests tokenize or render templates at once, on
    /// tokio's blocking threads (see [`AppState::offload`]).
    pub preprocess: Semaphore,
    /// The same for `/tokenize` and `/detokenize`, whose input is only bounded
    /// by the body limit: a few huge ones queue among themselves instead of
    /// holding up generation requests.
    pub utility: Semaphore,
    /// Compiles structured-output grammars against the vocabulary.
    pub grammars: crate::engine::grammar::GrammarCompiler,
    /// Whether `tool_choice: "auto"` works, and with which call syntax.
    pub tools: tools::ToolConfig,
    /// `--reasoning-parser`.
    pub reasoning: Option<reasoning::ReasoningKind>,
    /// The KV cache's shape and the weights' size (the dashboard shows them).
    pub memory: crate::metrics::MemoryInfo,
    /// The engine's last minutes, for the dashboard
    /// ([`dashboard::spawn_sampler`] fills it).
    pub history: dashboard::History,
}

/// Which permits a job of [`AppState::offload`] takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Preparing a generation request: its text is bounded by the context
    /// length before it is tokenized, so a job is short.
    Generate,
    /// `/tokenize` and `/detokenize`.
    Utility,
}

impl AppState {
    /// Runs CPU work of a request (tokenizing, rendering a chat template,
    /// detokenizing) on tokio's blocking threads, never on the async ones
    /// that serve every connection: a 10 MB prompt must not stall `/health`.
    /// At most one such job per core runs at a time in each lane; the others
    /// wait here without holding a thread.
    pub async fn offload<T, F>(self: &Arc<Self>, lane: Lane, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&AppState) -> Result<T, ApiError> + Send + 'static,
    {
        let permits = match lane {
            Lane::Generate => &self.preprocess,
            Lane::Utility => &self.utility,
        };
        let _permit = permits
            .acquire()
            .await
            .map_err(|_| ApiError::Unavailable("the server is shutting down".into()))?;
        let st = self.clone();
        tokio::task::spawn_blocking(move || f(&st))
            .await
            .map_err(|e| ApiError::Internal(format!("preparing the request failed: {e}")))?
    }

    /// Permits for [`AppState::offload`]: one per core.
    pub fn preprocess_permits() -> Semaphore {
        Semaphore::new(std::thread::available_parallelism().map_or(2, |n| n.get()))
    }

    /// The requested model must be the one served (if named at all).
    /// Text generation needs a generative model: an embedding model gets a
    /// 400 naming its task (before any template or tokenizer work).
    pub fn check_generates(&self) -> Result<(), ApiError> {
        let kind = self.engine.model_kind();
        if kind.is_embedding() {
            return Err(ApiError::bad_request(
                "model",
                format!(
                    "this model serves the {} task, not text generation: use /v1/embeddings",
                    kind.task()
                ),
            ));
        }
        Ok(())
    }

    pub fn check_model(&self, requested: Option<&str>) -> Result<(), ApiError> {
        match requested {
            None => Ok(()),
            Some(m) if self.served_names.iter().any(|n| n == m) || m == self.model_root => Ok(()),
            Some(m) => Err(ApiError::ModelNotFound {
                requested: m.to_string(),
                served: self
                    .served_names
                    .iter()
                    .map(|n| format!("`{n}`"))
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }
}

/// HTTP-level settings.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// Origins allowed by CORS; `*` allows any; empty disables CORS headers
    /// and refuses every cross-origin browser request.
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
        .route("/v1/responses", post(responses::handle))
        .route("/v1/embeddings", post(embeddings::handle))
        .route("/v1/models", get(misc::models))
        .route("/v1/models/{*id}", get(misc::model))
        .route("/tokenize", post(misc::tokenize))
        .route("/detokenize", post(misc::detokenize))
        .route("/reset_prefix_cache", post(misc::reset_prefix_cache))
        .route("/v1/engine/stats", get(dashboard::engine_stats))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ));
    let open = Router::new()
        // The dashboard's page and assets hold no data (what they show comes
        // from /v1/engine/stats, behind the key).
        .route("/", get(dashboard::index))
        .route("/dashboard/app.js", get(dashboard::script))
        .route("/dashboard/style.css", get(dashboard::style))
        .route("/health", get(misc::health))
        // SageMaker's name for the health check.
        .route("/ping", get(misc::ping))
        .route("/version", get(misc::version))
        .route("/openapi.json", get(openapi::openapi_json))
        .route("/metrics", get(misc::metrics));
    let request_id = HeaderName::from_static("x-request-id");
    let mut app = protected
        .merge(open)
        .fallback(misc::not_found)
        .method_not_allowed_fallback(misc::method_not_allowed)
        .with_state(state)
        .layer(DefaultBodyLimit::max(http.max_body_bytes));
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
    // Layers run outside in: request id, trace, origin check, CORS, routes.
    app.layer(axum::middleware::from_fn_with_state(
        Arc::new(guard::Origins::new(&http.allowed_origins)),
        guard::check_origin,
    ))
    .layer(PropagateRequestIdLayer::new(request_id.clone()))
    .layer(
        TraceLayer::new_for_http()
            .make_span_with(tracker::span)
            .on_response(tracker::on_response),
    )
    .layer(SetRequestIdLayer::new(request_id, MakeId))
}
