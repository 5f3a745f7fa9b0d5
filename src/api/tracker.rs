//! Per-request bookkeeping for metrics and logs: inter-token latency, finish
//! reasons, latencies, and client disconnects (a tracker dropped before its
//! request finished).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{Request, Response};
use tracing::Span;

use crate::engine::{SeqOutput, Timings, Usage};
use crate::metrics::Metrics;

pub struct Tracker {
    metrics: Arc<Metrics>,
    last: Vec<Option<Instant>>,
    ended: bool,
}

impl Tracker {
    pub fn new(metrics: Arc<Metrics>, choices: usize) -> Self {
        Self {
            metrics,
            last: vec![None; choices],
            ended: false,
        }
    }

    pub fn on_output(&mut self, choice: usize, o: &SeqOutput) {
        if let Some(prev) = self.last.get(choice).copied().flatten() {
            let gap = o.time.saturating_duration_since(prev).as_secs_f64();
            for _ in 0..o.token_ids.len() {
                self.metrics
                    .record_inter_token(gap / o.token_ids.len() as f64);
            }
        }
        if let Some(slot) = self.last.get_mut(choice) {
            *slot = Some(o.time);
        }
        if let Some(r) = o.finish_reason {
            self.metrics.record_finish(r);
        }
    }

    pub fn on_done(&mut self, usage: &Usage, timings: &Timings) {
        self.metrics.record_request(usage, timings);
        let ms = |t: Option<Instant>| {
            t.map_or(-1.0, |t| {
                t.saturating_duration_since(timings.arrived).as_secs_f64() * 1e3
            })
        };
        tracing::info!(
            prompt_tokens = usage.prompt_tokens,
            completion_tokens = usage.completion_tokens,
            queue_ms = ms(timings.scheduled),
            ttft_ms = ms(timings.first_token),
            e2e_ms = ms(Some(timings.finished)),
            "generation finished"
        );
    }

    /// The request ended (normally or with an error): not a disconnect.
    pub fn end(&mut self) {
        self.ended = true;
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        if !self.ended {
            self.metrics.record_disconnect();
            tracing::info!("client disconnected; request aborted");
        }
    }
}

/// Tracing span per HTTP request, carrying the request id.
pub fn span<B>(req: &Request<B>) -> Span {
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    tracing::info_span!("request", id = %id, method = %req.method(), path = %req.uri().path())
}

/// One log line per request with its status and time.
pub fn on_response<B>(res: &Response<B>, latency: Duration, _span: &Span) {
    tracing::info!(
        status = res.status().as_u16(),
        latency_ms = latency.as_millis() as u64,
        "request done"
    );
}
