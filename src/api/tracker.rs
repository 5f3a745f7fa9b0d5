//! Per-request bookkeeping for metrics and logs: inter-token latency, finish
//! reasons, latencies, and client disconnects (a tracker dropped before its
//! request finished).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::{Request, Response};
use tracing::Span;

use crate::engine::{FinishReason, SeqOutput, Timings, Usage};
use crate::metrics::Metrics;

pub struct Tracker {
    metrics: Arc<Metrics>,
    last: Vec<Option<Instant>>,
    /// Which choices have a finish reason.
    finished: Vec<bool>,
    ended: bool,
}

impl Tracker {
    pub fn new(metrics: Arc<Metrics>, choices: usize) -> Self {
        Self {
            metrics,
            last: vec![None; choices],
            finished: vec![false; choices],
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
            if let Some(f) = self.finished.get_mut(choice) {
                *f = true;
            }
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

    /// The request ended normally.
    pub fn end(&mut self) {
        self.ended = true;
    }

    /// The request ended with an error (the engine died, the shutdown
    /// deadline passed): its unfinished choices count as aborted.
    pub fn fail(&mut self) {
        self.ended = true;
        self.count_aborted();
    }

    fn count_aborted(&mut self) {
        for f in &mut self.finished {
            if !*f {
                *f = true;
                self.metrics.record_finish(FinishReason::Abort);
            }
        }
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        if !self.ended {
            self.metrics.record_disconnect();
            self.count_aborted();
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
    tracing::info_span!(
        "request",
        id = %id,
        method = %req.method(),
        path = %req.uri().path(),
        engine_ids = tracing::field::Empty,
    )
}

/// One log line per request with its status and time.
pub fn on_response<B>(res: &Response<B>, latency: Duration, _span: &Span) {
    tracing::info!(
        status = res.status().as_u16(),
        latency_ms = latency.as_millis() as u64,
        "request done"
    );
}

/// Notes the engine's ids of a request's prompts in its log span, so that
/// the engine's own logs (a panic names the requests of its step) can be
/// matched with HTTP requests.
pub fn note_engine_ids(streams: &[crate::engine::RequestStream]) {
    let ids: Vec<u64> = streams.iter().map(|s| s.id()).collect();
    Span::current().record("engine_ids", tracing::field::debug(&ids));
}
