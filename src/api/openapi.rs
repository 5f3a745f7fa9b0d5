//! `GET /openapi.json`: the OpenAPI 3.1 description of every route, generated
//! by utoipa from the handlers' annotations and the request and response
//! types themselves (their serde attributes included), so it cannot drift
//! from what the server parses and sends.

use std::sync::OnceLock;

use axum::response::{IntoResponse, Response};
use utoipa::OpenApi;

use super::{chat, completions, dashboard, embeddings, misc, responses};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Candela",
        description = "OpenAI-compatible LLM inference server (with vLLM's extensions)."
    ),
    paths(
        completions::handle,
        chat::handle,
        responses::handle,
        embeddings::handle,
        misc::models,
        misc::model,
        misc::tokenize,
        misc::detokenize,
        misc::reset_prefix_cache,
        dashboard::engine_stats,
        dashboard::index,
        dashboard::script,
        dashboard::style,
        misc::health,
        misc::ping,
        misc::version,
        misc::metrics,
        openapi_json,
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "openai", description = "OpenAI's API (the API key applies)"),
        (name = "models", description = "The served model's names (the API key applies)"),
        (name = "tokenizer", description = "vLLM's tokenizer endpoints (the API key applies)"),
        (name = "engine", description = "Engine controls (the API key applies)"),
        (name = "operations", description = "Health, version, metrics: no API key"),
        (name = "dashboard", description = "The live dashboard's page (its data comes from /v1/engine/stats)"),
    )
)]
struct ApiDoc;

/// `Authorization: Bearer <key>` when the server has `--api-key`.
struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, api: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = api.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        for (path, item) in api.paths.paths.iter_mut() {
            if path.starts_with("/v1/")
                || ["/tokenize", "/detokenize", "/reset_prefix_cache"].contains(&path.as_str())
            {
                for op in [&mut item.get, &mut item.post].into_iter().flatten() {
                    op.security = Some(vec![utoipa::openapi::security::SecurityRequirement::new(
                        "api_key",
                        Vec::<String>::new(),
                    )]);
                }
            }
        }
    }
}

/// The document, built once.
pub fn document() -> &'static serde_json::Value {
    static DOC: OnceLock<serde_json::Value> = OnceLock::new();
    DOC.get_or_init(|| serde_json::to_value(ApiDoc::openapi()).expect("the document serializes"))
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", operation_id = "openapi", tag = "operations",
    responses((status = 200, description = "OpenAPI 3.1 JSON", content_type = "application/json")))]
pub async fn openapi_json() -> Response {
    axum::Json(document()).into_response()
}
