//! One error type for the HTTP API: each variant knows its status, OpenAI
//! error type and code, and renders as `{"error": {...}}`, in a normal
//! response or as an SSE event.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::engine::EngineError;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// 400: a parameter is invalid; `param` names it.
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<String>,
    },
    /// 400: the prompt (and `max_tokens`) do not fit the context; OpenAI's
    /// `context_length_exceeded` code, which SDK and LiteLLM users match on.
    #[error("{message}")]
    ContextLength {
        message: String,
        param: Option<String>,
    },
    #[error("{0}")]
    Unauthorized(String),
    /// 403: a browser request from an origin that is not allowed.
    #[error("{0}")]
    Forbidden(String),
    /// 405: the route exists, the method does not.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 408: the body did not arrive in time.
    #[error("{0}")]
    RequestTimeout(String),
    /// 404: OpenAI's wording, then the names this server answers to (clients
    /// configured for another server send whatever name they were given).
    #[error("The model `{requested}` does not exist. This server serves: {served}.")]
    ModelNotFound { requested: String, served: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    /// 429: the engine's queue is full.
    #[error("{0}")]
    Overloaded(String),
    /// 503: the engine is gone.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn bad_request(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::BadRequest {
            message: message.into(),
            param: Some(param.into()),
        }
    }

    /// A 400 with OpenAI's `context_length_exceeded` code.
    pub fn context_length(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::ContextLength {
            message: message.into(),
            param: Some(param.into()),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } | Self::ContextLength { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::ModelNotFound { .. } | Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Overloaded(_) => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn kind_and_code(&self) -> (&'static str, Option<&'static str>) {
        match self {
            Self::BadRequest { .. } => ("invalid_request_error", None),
            Self::ContextLength { .. } => {
                ("invalid_request_error", Some("context_length_exceeded"))
            }
            Self::Unauthorized(_) => ("invalid_request_error", Some("invalid_api_key")),
            Self::Forbidden(_) => ("invalid_request_error", Some("origin_not_allowed")),
            Self::MethodNotAllowed(_) => ("invalid_request_error", Some("method_not_allowed")),
            Self::RequestTimeout(_) => ("invalid_request_error", Some("request_timeout")),
            Self::ModelNotFound { .. } => ("invalid_request_error", Some("model_not_found")),
            Self::NotFound(_) => ("invalid_request_error", Some("not_found")),
            Self::PayloadTooLarge(_) => ("invalid_request_error", Some("request_too_large")),
            Self::Overloaded(_) => ("server_overloaded", Some("rate_limit_exceeded")),
            Self::Unavailable(_) => ("server_error", Some("service_unavailable")),
            Self::Internal(_) => ("server_error", None),
        }
    }

    /// The OpenAI error object.
    pub fn body(&self) -> serde_json::Value {
        let (kind, code) = self.kind_and_code();
        let param = match self {
            Self::BadRequest { param, .. } | Self::ContextLength { param, .. } => param.clone(),
            Self::ModelNotFound { .. } => Some("model".into()),
            _ => None,
        };
        let body = ErrorResponse {
            error: ErrorObject {
                message: self.to_string(),
                kind: kind.to_string(),
                param,
                code: code.map(str::to_string),
            },
        };
        serde_json::to_value(body).expect("an error object serializes")
    }
}

/// OpenAI's error response: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorResponse {
    pub error: ErrorObject,
}

#[derive(Debug, Clone, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorObject {
    pub message: String,
    /// `invalid_request_error`, `server_error`, `server_overloaded`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault, when one is.
    pub param: Option<String>,
    /// A machine-readable code (`context_length_exceeded`, `model_not_found`, ...).
    pub code: Option<String>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status().is_server_error() {
            tracing::error!("request failed: {self}");
        }
        (self.status(), axum::Json(self.body())).into_response()
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::InvalidParam { param, message } => Self::BadRequest {
                message,
                param: Some(param),
            },
            EngineError::ContextLength { .. } => Self::ContextLength {
                message: e.to_string(),
                param: None,
            },
            EngineError::TooLargeForCache { .. } => Self::BadRequest {
                message: e.to_string(),
                param: None,
            },
            EngineError::WrongTask(message) => Self::BadRequest {
                message,
                param: Some("model".into()),
            },
            EngineError::Overloaded { .. } => Self::Overloaded(e.to_string()),
            EngineError::EngineDead | EngineError::ShuttingDown => Self::Unavailable(e.to_string()),
            EngineError::Internal(m) => Self::Internal(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn error_objects_follow_openai() {
        let e = ApiError::bad_request("temperature", "temperature must be non-negative");
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            e.body(),
            json!({"error": {"message": "temperature must be non-negative", "type": "invalid_request_error",
                             "param": "temperature", "code": null}})
        );
        let e = ApiError::ModelNotFound {
            requested: "gpt-9".into(),
            served: "`stories`".into(),
        };
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        assert_eq!(e.body()["error"]["code"], "model_not_found");
        assert_eq!(
            e.body()["error"]["message"],
            "The model `gpt-9` does not exist. This server serves: `stories`."
        );
        let e = ApiError::from(EngineError::ContextLength {
            max_model_len: 8,
            requested: 9,
            prompt: 5,
            max_tokens: 4,
        });
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert_eq!(e.body()["error"]["code"], "context_length_exceeded");
        assert_eq!(
            ApiError::from(EngineError::Overloaded { waiting: 3 }).status(),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            ApiError::from(EngineError::EngineDead).status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
