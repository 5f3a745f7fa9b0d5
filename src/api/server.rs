//! The HTTP server under the router: accepts connections, at most
//! `--max-connections` at a time (more are answered at once with a 503 and
//! closed), serves HTTP/1.1 on each with hyper, closes a connection whose
//! request headers do not arrive within the read timeout (counted from the
//! connection's start, and again after each response: it also bounds an
//! idle kept-alive connection), and drains gracefully on shutdown.
//!
//! HTTP/1.1 only, as vLLM's server: the OpenAI SDKs and the gateways in
//! front of model servers speak it, and hyper's HTTP/2 autodetection reads
//! a connection's first bytes with no timeout, which a slow client could
//! hold for ever.
//!
//! hyper answers unparseable requests itself (400, 414, 431) with an empty
//! body; [`ErrorBodies`] gives those responses an OpenAI error object too.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::http::StatusCode;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tower::ServiceExt;

use super::error::ApiError;

/// Connection-level limits.
#[derive(Debug, Clone, Copy)]
pub struct ServerConfig {
    /// Connections served at once; more are refused with a 503.
    pub max_connections: usize,
    /// Time a client has to send a request's headers, counted from when the
    /// server starts waiting for them (so also an idle kept-alive
    /// connection's lifetime between requests).
    pub read_timeout: Duration,
}

/// Refusals being written at once; past this, an over-limit connection is
/// closed without an answer, so a flood cannot pile up refusal tasks either.
const MAX_REFUSALS_IN_FLIGHT: usize = 256;

/// Accepts and serves connections until `stop` resolves, then stops
/// accepting (the listener is closed) and returns the handle that drains the
/// connections still open, with what `stop` gave.
pub async fn serve<R>(
    listener: TcpListener,
    app: Router,
    cfg: ServerConfig,
    stop: impl Future<Output = R>,
) -> (GracefulShutdown, R) {
    let graceful = GracefulShutdown::new();
    let connections = Arc::new(Semaphore::new(cfg.max_connections.max(1)));
    let refusals = Arc::new(Semaphore::new(MAX_REFUSALS_IN_FLIGHT));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.read_timeout);
    let mut stop = std::pin::pin!(stop);
    let why = loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: the listener stays
                    // fine, so wait a little instead of spinning on the error.
                    tracing::warn!("accepting a connection failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            why = &mut stop => break why,
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            if let Ok(refusal) = refusals.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    refuse(stream, cfg.max_connections).await;
                    drop(refusal);
                });
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(
            app.clone()
                .map_request(|req: axum::http::Request<Incoming>| req.map(Body::new)),
        );
        let conn = builder.serve_connection(TokioIo::new(ErrorBodies::new(stream)), service);
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("connection ended with an error: {e}");
            }
            drop(permit);
        });
    };
    drop(listener);
    (graceful, why)
}

/// Answers a connection over the limit with a 503 and closes it, reading
/// what the client sent meanwhile so that closing does not reset the
/// connection before the client has read the answer. Bounded to a second.
async fn refuse(mut stream: TcpStream, limit: usize) {
    let body = ApiError::Unavailable(format!(
        "the server is serving its maximum of {limit} connections (--max-connections); retry later"
    ))
    .body()
    .to_string();
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        io::Result::Ok(())
    })
    .await;
}

/// A connection's byte stream, passed through except for the responses hyper
/// writes on its own when it cannot parse a request (400, 414, 431, with an
/// empty body): those get an OpenAI error object as their body.
///
/// They are recognised by shape: hyper writes them only when no response is
/// in progress (it parses a request only once the previous response has
/// been flushed), so such a response starts a write, and unlike every
/// response of the router it has no `x-request-id` header (set on all of
/// them by the request-id layer) and a zero `content-length`.
struct ErrorBodies<T> {
    inner: T,
    /// A rewritten response still to be written, and how much of it is out.
    pending: Option<(Vec<u8>, usize)>,
}

impl<T> ErrorBodies<T> {
    fn new(inner: T) -> Self {
        Self {
            inner,
            pending: None,
        }
    }
}

impl<T: AsyncWrite + Unpin> ErrorBodies<T> {
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, written)) = &mut self.pending {
            if *written == bytes.len() {
                self.pending = None;
                break;
            }
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &bytes[*written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            *written += n;
        }
        Poll::Ready(Ok(()))
    }
}

/// The JSON-bodied replacement for one of hyper's own error responses, or
/// `None` if `buf` does not start with one.
fn rewrite_error_response(buf: &[u8]) -> Option<Vec<u8>> {
    let rest = buf
        .strip_prefix(b"HTTP/1.1 ")
        .or_else(|| buf.strip_prefix(b"HTTP/1.0 "))?;
    let code: u16 = std::str::from_utf8(rest.get(..3)?).ok()?.parse().ok()?;
    let status = StatusCode::from_u16(code).ok()?;
    if !status.is_client_error() && !status.is_server_error() {
        return None;
    }
    let head_len = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..head_len]).ok()?;
    // Header lines with their names lowercased for matching.
    let headers: Vec<(String, &str)> = head
        .split("\r\n")
        .skip(1)
        .map(|h| (h.to_ascii_lowercase(), h))
        .collect();
    if headers.iter().any(|(h, _)| h.starts_with("x-request-id:"))
        || !headers
            .iter()
            .any(|(h, _)| h.replace(' ', "") == "content-length:0")
    {
        return None;
    }
    let message = match status {
        StatusCode::BAD_REQUEST => "malformed HTTP request".to_string(),
        StatusCode::URI_TOO_LONG => "the request URI is too long".to_string(),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => {
            "the request's header fields are too large".to_string()
        }
        s => s
            .canonical_reason()
            .unwrap_or("the request could not be handled")
            .to_string(),
    };
    let kind = if status.is_client_error() {
        "invalid_request_error"
    } else {
        "server_error"
    };
    let body = serde_json::json!({
        "error": {"message": message, "type": kind, "param": null, "code": null}
    })
    .to_string();
    let mut out = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    for (lower, h) in &headers {
        if !lower.starts_with("content-length:") && !lower.starts_with("connection:") {
            out.push_str(h);
            out.push_str("\r\n");
        }
    }
    out.push_str("\r\n");
    out.push_str(&body);
    Some(out.into_bytes())
}

impl<T: AsyncRead + Unpin> AsyncRead for ErrorBodies<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ErrorBodies<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_pending(cx))?;
        if let Some(replacement) = rewrite_error_response(buf) {
            // hyper's bytes count as written; the replacement goes out in
            // their place (now, or on the next write, flush or shutdown).
            self.pending = Some((replacement, 0));
            if let Poll::Ready(Err(e)) = self.poll_pending(cx) {
                return Poll::Ready(Err(e));
            }
            return Poll::Ready(Ok(buf.len()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_pending(cx))?;
        let first = bufs.iter().find(|b| !b.is_empty());
        if first.is_some_and(|b| b.starts_with(b"HTTP/1.")) {
            // Writing only the first buffer is a valid partial vectored write.
            return self.poll_write(cx, first.expect("checked"));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_pending(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypers_own_error_responses_get_a_body_and_ours_pass() {
        let hyper_400 = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\ndate: Mon, 30 Nov 2026 22:00:00 GMT\r\n\r\n";
        let out = String::from_utf8(rewrite_error_response(hyper_400).unwrap()).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{head}");
        assert!(head.contains(&format!("content-length: {}", body.len())));
        assert!(head.contains("date: Mon, 30 Nov"), "{head}");
        let v: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(rewrite_error_response(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-length: 0\r\n\r\n"
        )
        .is_some());
        // The router's responses carry a request id, or a body, or succeed.
        assert!(rewrite_error_response(
            b"HTTP/1.1 400 Bad Request\r\nx-request-id: req-1\r\ncontent-length: 0\r\n\r\n"
        )
        .is_none());
        assert!(rewrite_error_response(
            b"HTTP/1.1 400 Bad Request\r\ncontent-length: 20\r\n\r\n{\"error\": {}}"
        )
        .is_none());
        assert!(rewrite_error_response(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_none());
        assert!(rewrite_error_response(b"data: HTTP/1.1 400").is_none());
    }
}
