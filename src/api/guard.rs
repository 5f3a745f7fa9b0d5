//! Guards every request passes before a handler does any work: the origin
//! check against browser drive-by requests, and reading the body within a
//! size limit and a deadline.

use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Request, State};
use axum::http::{header, HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::AppState;

/// Which browser origins may call the API (`--allowed-origins`).
#[derive(Debug, Clone, Default)]
pub struct Origins {
    any: bool,
    list: Vec<String>,
}

impl Origins {
    pub fn new(allowed: &[String]) -> Self {
        Self {
            any: allowed.iter().any(|o| o == "*"),
            list: allowed
                .iter()
                .map(|o| o.trim_end_matches('/').to_string())
                .collect(),
        }
    }

    /// A request without an `Origin` header (curl, SDKs, probes) is not a
    /// browser's cross-origin request and always passes. A browser's request
    /// passes when its origin is listed, or is the server itself (same
    /// origin: the `Origin`'s host is the `Host` the request was sent to).
    fn allows(&self, headers: &HeaderMap) -> Result<(), String> {
        let Some(origin) = headers.get(header::ORIGIN) else {
            return Ok(());
        };
        let origin = origin.to_str().unwrap_or("").trim_end_matches('/');
        if self.any || self.list.iter().any(|o| o == origin) {
            return Ok(());
        }
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        let origin_host = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        if host.is_some() && origin_host == host {
            return Ok(());
        }
        Err(origin.to_string())
    }
}

/// Refuses (403) any request a browser sends from an origin that
/// `--allowed-origins` does not list, CORS preflights included. Without it,
/// a web page could make the server generate with a "simple" cross-origin
/// POST (`Content-Type: text/plain` needs no preflight), or read nothing but
/// still spend its compute.
pub async fn check_origin(
    State(origins): State<Arc<Origins>>,
    req: Request,
    next: Next,
) -> Response {
    match origins.allows(req.headers()) {
        Ok(()) => next.run(req).await,
        Err(origin) => {
            let what = if req.method() == Method::OPTIONS {
                "CORS preflight"
            } else {
                "cross-origin request"
            };
            ApiError::Forbidden(format!(
                "{what} from origin {origin:?} is not allowed; start the server with \
                 --allowed-origins to allow it"
            ))
            .into_response()
        }
    }
}

/// How much of a body is read, and for how long.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    pub max_bytes: usize,
    /// The whole body must arrive within this time.
    pub read_timeout: Duration,
}

/// A request body read whole: refused with 413 before reading anything when
/// its declared `Content-Length` is over the limit, with 413 when more
/// arrives than that, and with 408 when it does not arrive in time (a slow
/// client cannot hold a handler, or the connection, for ever).
pub struct ReadBody(pub Bytes);

impl FromRequest<Arc<AppState>> for ReadBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, st: &Arc<AppState>) -> Result<Self, ApiError> {
        read(req.into_parts(), st.body_limits).await.map(ReadBody)
    }
}

async fn read(
    (parts, body): (axum::http::request::Parts, Body),
    limits: BodyLimits,
) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::PayloadTooLarge(format!(
            "the request body is larger than {} bytes (--max-request-body-bytes)",
            limits.max_bytes
        ))
    };
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limits.max_bytes as u64) {
        return Err(too_large());
    }
    match tokio::time::timeout(
        limits.read_timeout,
        axum::body::to_bytes(body, limits.max_bytes),
    )
    .await
    {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) => {
            let length_limit = std::error::Error::source(&e)
                .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
            if length_limit {
                Err(too_large())
            } else {
                Err(ApiError::BadRequest {
                    message: format!("could not read the request body: {e}"),
                    param: None,
                })
            }
        }
        Err(_) => Err(ApiError::RequestTimeout(format!(
            "the request body did not arrive within {} s",
            limits.read_timeout.as_secs_f64()
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, host.parse().unwrap());
        if let Some(o) = origin {
            h.insert(header::ORIGIN, o.parse().unwrap());
        }
        h
    }

    #[test]
    fn origins_allow_tools_listed_pages_and_the_server_itself() {
        let none = Origins::new(&[]);
        assert!(none.allows(&headers(None, "127.0.0.1:8000")).is_ok());
        assert!(none
            .allows(&headers(Some("http://127.0.0.1:8000"), "127.0.0.1:8000"))
            .is_ok());
        assert_eq!(
            none.allows(&headers(Some("http://evil.example"), "127.0.0.1:8000")),
            Err("http://evil.example".into())
        );
        assert!(none
            .allows(&headers(Some("null"), "127.0.0.1:8000"))
            .is_err());
        let listed = Origins::new(&["http://app.example/".into()]);
        assert!(listed
            .allows(&headers(Some("http://app.example"), "x"))
            .is_ok());
        assert!(listed
            .allows(&headers(Some("http://app.example.evil"), "x"))
            .is_err());
        let any = Origins::new(&["*".into()]);
        assert!(any
            .allows(&headers(Some("http://evil.example"), "x"))
            .is_ok());
    }
}
