//! `Authorization: Bearer <key>` on the API routes, compared in constant time.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};

/// True when `given` equals one of `keys`. Every key is compared, and each
/// comparison takes the same time whatever the bytes.
pub fn key_matches(keys: &[String], given: &str) -> bool {
    let mut ok = subtle::Choice::from(0);
    for k in keys {
        ok |= k.as_bytes().ct_eq(given.as_bytes());
    }
    ok.into()
}

pub async fn require_key(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    if state.api_keys.is_empty() {
        return next.run(req).await;
    }
    let given = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    match given {
        Some(key) if key_matches(&state.api_keys, key) => next.run(req).await,
        Some(_) => ApiError::Unauthorized("Incorrect API key provided.".into()).into_response(),
        None => ApiError::Unauthorized(
            "Missing API key: send it as 'Authorization: Bearer <key>'.".into(),
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_any_configured_key() {
        let keys = vec!["alpha".to_string(), "beta-key".to_string()];
        assert!(key_matches(&keys, "alpha"));
        assert!(key_matches(&keys, "beta-key"));
        assert!(!key_matches(&keys, "alph"));
        assert!(!key_matches(&keys, ""));
        assert!(!key_matches(&[], "alpha"));
    }
}
