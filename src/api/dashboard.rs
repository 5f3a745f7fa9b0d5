//! The live dashboard: `GET /` serves a static page (embedded in the binary:
//! no CDN, no build step) that polls `GET /v1/engine/stats` every second and
//! has a playground that streams from the server's own API.
//!
//! A sampler task reads the engine's counters once a second into a ring of
//! the last five minutes, so that the page shows history as soon as it opens
//! (and several open pages cost one sampler). The stats endpoint sits behind
//! the API key like every `/v1/` route; the page itself holds no data and is
//! open, and asks for the key when the endpoint answers 401.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::json;

use super::AppState;
use crate::engine::StatsSnapshot;
use crate::kv_cache::BlockState;
use crate::metrics::{HistogramTotals, LatencyTotals};

const INDEX_HTML: &str = include_str!("dashboard/index.html");
const APP_JS: &str = include_str!("dashboard/app.js");
const STYLE_CSS: &str = include_str!("dashboard/style.css");

/// Seconds between samples.
const INTERVAL: Duration = Duration::from_secs(1);
/// Samples kept: five minutes.
const KEEP: usize = 300;
/// The window of the latency percentiles.
const LATENCY_WINDOW: Duration = Duration::from_secs(60);
/// How long the stats endpoint waits for the engine's block map (it answers
/// between two steps) before answering without one.
const BLOCK_MAP_WAIT: Duration = Duration::from_secs(2);

/// Assets are served with this policy: the page may talk to its own origin
/// only (which also proves that it needs nothing from outside).
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   connect-src 'self'; img-src 'self' data:; base-uri 'none'; \
                   form-action 'none'; frame-ancestors 'none'";

#[derive(Debug, Clone)]
struct Sample {
    /// Seconds since the server started.
    at: f64,
    stats: StatsSnapshot,
    latency: LatencyTotals,
}

/// The last five minutes of the engine's counters, one sample a second.
#[derive(Debug)]
pub struct History {
    started: Instant,
    samples: Mutex<VecDeque<Sample>>,
}

impl Default for History {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            samples: Mutex::new(VecDeque::with_capacity(KEEP + 1)),
        }
    }
}

impl History {
    fn record(&self, stats: StatsSnapshot, latency: LatencyTotals) {
        let at = self.started.elapsed().as_secs_f64();
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        samples.push_back(Sample { at, stats, latency });
        while samples.len() > KEEP {
            samples.pop_front();
        }
    }

    fn samples(&self) -> Vec<Sample> {
        let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        samples.iter().cloned().collect()
    }
}

/// Starts the task that samples the engine once a second; it ends with the
/// server (when the state is dropped).
pub fn spawn_sampler(state: &Arc<AppState>) {
    let weak: Weak<AppState> = Arc::downgrade(state);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            let Some(st) = weak.upgrade() else { break };
            // Reading atomics and two histograms: no work for a blocking thread.
            st.history
                .record(st.engine.stats(), st.metrics.latency_totals());
        }
    });
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// `GET /`: the dashboard page.
#[utoipa::path(get, path = "/", operation_id = "dashboard", tag = "dashboard",
    responses((status = 200, description = "The dashboard (HTML)", content_type = "text/html")))]
pub async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

/// `GET /dashboard/app.js`.
#[utoipa::path(get, path = "/dashboard/app.js", operation_id = "dashboard_script", tag = "dashboard",
    responses((status = 200, description = "The dashboard's script", content_type = "text/javascript")))]
pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

/// `GET /dashboard/style.css`.
#[utoipa::path(get, path = "/dashboard/style.css", operation_id = "dashboard_style", tag = "dashboard",
    responses((status = 200, description = "The dashboard's style sheet", content_type = "text/css")))]
pub async fn style() -> Response {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

/// The engine now, its last five minutes and its block map (the dashboard's
/// feed).
#[utoipa::path(get, path = "/v1/engine/stats", operation_id = "engine_stats", tag = "engine",
    responses((status = 200, description = "The engine's live state: gauges and counters now, \
        per-second series over the last five minutes, latency percentiles over the last minute, \
        and every KV block's state", content_type = "application/json"),
        (status = 401, description = "Missing or wrong API key", body = super::error::ErrorResponse)))]
pub async fn engine_stats(State(st): State<Arc<AppState>>) -> Response {
    let now = st.engine.stats();
    let samples = st.history.samples();
    let blocks = tokio::time::timeout(BLOCK_MAP_WAIT, st.engine.block_states())
        .await
        .ok()
        .flatten();
    let mem = &st.memory;
    let finished = now.finished_stop + now.finished_length + now.aborted_requests;
    let body = json!({
        "model": st.model_name,
        "architecture": st.engine.architecture(),
        "task": st.engine.model_kind().task(),
        "chat": st.chat_template.is_some(),
        "alive": st.engine.is_alive(),
        "uptime_s": st.history.started.elapsed().as_secs_f64(),
        "config": {
            "max_model_len": st.max_model_len,
            "max_num_seqs": st.engine.config().max_num_seqs,
            "max_num_batched_tokens": st.engine.config().max_num_batched_tokens,
            "block_size": mem.block_size,
            "num_blocks": mem.num_blocks,
            "kv_cache_dtype": mem.cache_dtype,
            "kv_cache_bytes": mem.kv_cache_bytes,
            "weights_bytes": mem.weights_bytes,
            "prefix_caching": mem.prefix_caching,
        },
        "now": {
            "running": now.num_running,
            "waiting": now.num_waiting,
            "kv_cache_usage": now.kv_cache_usage,
            "preemptions_total": now.num_preemptions,
            "prompt_tokens_total": now.prompt_tokens,
            "prefill_tokens_total": now.prefill_tokens,
            "generation_tokens_total": now.generation_tokens,
            "steps_total": now.steps,
            "requests_finished_total": finished,
            "requests_finished": {
                "stop": now.finished_stop,
                "length": now.finished_length,
                "abort": now.aborted_requests,
            },
            "prefix_cache_queries_total": now.prefix_cache_queries,
            "prefix_cache_hits_total": now.prefix_cache_hits,
        },
        "history": Series::of(&samples),
        "latency": latency_window(&samples),
        "blocks": blocks.map(|b| BlockMap::of(&b)),
    });
    ([(header::CACHE_CONTROL, "no-store")], Json(body)).into_response()
}

/// Per-second series, one entry per interval between two samples (rates and
/// means over that interval; gauges at its end). `null` where an interval
/// has nothing to average.
#[derive(Debug, Default, Serialize)]
struct Series {
    interval_s: f64,
    /// Seconds since the server started, at each interval's end.
    t: Vec<f64>,
    running: Vec<usize>,
    waiting: Vec<usize>,
    kv_cache_usage: Vec<f64>,
    /// Prompt tokens computed per second (prefix-cache hits are not computed).
    prefill_tokens_per_s: Vec<f64>,
    generation_tokens_per_s: Vec<f64>,
    /// Mean time to first token of the requests that finished in the
    /// interval (a request's TTFT is recorded when it ends).
    ttft_mean_s: Vec<Option<f64>>,
    /// Mean time between two output tokens, over the tokens of the interval.
    itl_mean_s: Vec<Option<f64>>,
    preemptions: Vec<u64>,
    /// Prompt tokens found in the prefix cache / looked up, in the interval.
    prefix_cache_hit_rate: Vec<Option<f64>>,
}

impl Series {
    fn of(samples: &[Sample]) -> Self {
        let mut s = Series {
            interval_s: INTERVAL.as_secs_f64(),
            ..Default::default()
        };
        for w in samples.windows(2) {
            let (a, b) = (&w[0], &w[1]);
            let dt = (b.at - a.at).max(1e-3);
            let rate = |x: u64, y: u64| y.saturating_sub(x) as f64 / dt;
            s.t.push(b.at);
            s.running.push(b.stats.num_running);
            s.waiting.push(b.stats.num_waiting);
            s.kv_cache_usage.push(b.stats.kv_cache_usage);
            s.prefill_tokens_per_s
                .push(rate(a.stats.prefill_tokens, b.stats.prefill_tokens));
            s.generation_tokens_per_s
                .push(rate(a.stats.generation_tokens, b.stats.generation_tokens));
            s.ttft_mean_s.push(mean(&a.latency.ttft, &b.latency.ttft));
            s.itl_mean_s.push(mean(&a.latency.itl, &b.latency.itl));
            s.preemptions.push(
                b.stats
                    .num_preemptions
                    .saturating_sub(a.stats.num_preemptions),
            );
            let queried = b
                .stats
                .prefix_cache_queries
                .saturating_sub(a.stats.prefix_cache_queries);
            let hit = b
                .stats
                .prefix_cache_hits
                .saturating_sub(a.stats.prefix_cache_hits);
            s.prefix_cache_hit_rate
                .push((queried > 0).then(|| hit as f64 / queried as f64));
        }
        s
    }
}

/// The mean of the observations between two readings of a histogram.
fn mean(a: &HistogramTotals, b: &HistogramTotals) -> Option<f64> {
    let n = b.count.saturating_sub(a.count);
    (n > 0).then(|| (b.sum - a.sum).max(0.0) / n as f64)
}

/// TTFT and inter-token latency over the last minute: count, mean, p50, p95.
fn latency_window(samples: &[Sample]) -> serde_json::Value {
    let Some(last) = samples.last() else {
        return serde_json::Value::Null;
    };
    let since = last.at - LATENCY_WINDOW.as_secs_f64();
    let first = samples.iter().find(|s| s.at >= since).unwrap_or(last);
    let summary = |a: &HistogramTotals, b: &HistogramTotals| {
        let counts = bucket_deltas(a, b);
        json!({
            "count": b.count.saturating_sub(a.count),
            "mean_s": mean(a, b),
            "p50_s": quantile(&counts, 0.5),
            "p95_s": quantile(&counts, 0.95),
        })
    };
    json!({
        "window_s": last.at - first.at,
        "ttft": summary(&first.latency.ttft, &last.latency.ttft),
        "itl": summary(&first.latency.itl, &last.latency.itl),
    })
}

/// The cumulative bucket counts of `b` minus those of `a`.
fn bucket_deltas(a: &HistogramTotals, b: &HistogramTotals) -> Vec<(f64, u64)> {
    b.buckets
        .iter()
        .enumerate()
        .map(|(i, &(le, c))| {
            let before = a.buckets.get(i).map_or(0, |&(_, c)| c);
            (le, c.saturating_sub(before))
        })
        .collect()
}

/// The `q` quantile of cumulative bucket counts, interpolated linearly inside
/// its bucket as Prometheus' `histogram_quantile` does; `None` without
/// observations.
fn quantile(cumulative: &[(f64, u64)], q: f64) -> Option<f64> {
    let total = cumulative.last()?.1;
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut lower = (0.0, 0u64);
    for &(le, c) in cumulative {
        if c as f64 >= rank {
            if le.is_infinite() {
                // Past the largest bound: the best that can be said.
                return Some(lower.0);
            }
            let in_bucket = (c - lower.1) as f64;
            let frac = if in_bucket > 0.0 {
                (rank - lower.1 as f64) / in_bucket
            } else {
                1.0
            };
            return Some(lower.0 + (le - lower.0) * frac);
        }
        lower = (le, c);
    }
    Some(lower.0)
}

/// Every block's state as one character (`0` free, `1` free but holding a
/// cached prefix, `2` in use, `3` shared by several sequences), and the
/// count of each.
#[derive(Debug, Serialize)]
struct BlockMap {
    num_blocks: usize,
    free: usize,
    cached: usize,
    in_use: usize,
    shared: usize,
    map: String,
}

impl BlockMap {
    fn of(states: &[BlockState]) -> Self {
        let count = |s: BlockState| states.iter().filter(|&&x| x == s).count();
        Self {
            num_blocks: states.len(),
            free: count(BlockState::Free),
            cached: count(BlockState::Cached),
            in_use: count(BlockState::InUse),
            shared: count(BlockState::Shared),
            map: states.iter().map(|&s| char::from(b'0' + s as u8)).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist(count: u64, sum: f64, buckets: &[(f64, u64)]) -> HistogramTotals {
        HistogramTotals {
            count,
            sum,
            buckets: buckets.to_vec(),
        }
    }

    #[test]
    fn quantiles_interpolate_inside_buckets() {
        let c = [(0.1, 0), (0.2, 50), (0.4, 100), (f64::INFINITY, 100)];
        assert_eq!(quantile(&c, 0.5), Some(0.2));
        let p75 = quantile(&c, 0.75).unwrap();
        assert!((p75 - 0.3).abs() < 1e-9, "{p75}");
        assert_eq!(quantile(&[(1.0, 0), (f64::INFINITY, 0)], 0.5), None);
        // Everything past the last bound: the last bound.
        assert_eq!(quantile(&[(1.0, 0), (f64::INFINITY, 4)], 0.5), Some(1.0));
    }

    #[test]
    fn series_are_rates_and_means_per_interval() {
        let snap = |gen: u64, prefill: u64, q: u64, h: u64| StatsSnapshot {
            generation_tokens: gen,
            prefill_tokens: prefill,
            prefix_cache_queries: q,
            prefix_cache_hits: h,
            num_running: 3,
            ..Default::default()
        };
        let lat = |n: u64, sum: f64| LatencyTotals {
            ttft: hist(n, sum, &[(1.0, n), (f64::INFINITY, n)]),
            itl: HistogramTotals::default(),
        };
        let samples = [
            Sample {
                at: 1.0,
                stats: snap(10, 100, 0, 0),
                latency: lat(1, 0.5),
            },
            Sample {
                at: 3.0,
                stats: snap(50, 100, 40, 10),
                latency: lat(3, 1.5),
            },
        ];
        let s = Series::of(&samples);
        assert_eq!(s.t, [3.0]);
        assert_eq!(s.generation_tokens_per_s, [20.0]);
        assert_eq!(s.prefill_tokens_per_s, [0.0]);
        assert_eq!(s.ttft_mean_s, [Some(0.5)]);
        assert_eq!(s.itl_mean_s, [None]);
        assert_eq!(s.prefix_cache_hit_rate, [Some(0.25)]);
        assert_eq!(s.running, [3]);
        let w = latency_window(&samples);
        assert_eq!(w["ttft"]["count"], 2);
        assert_eq!(w["itl"]["p50_s"], serde_json::Value::Null);
    }

    #[test]
    fn block_map_is_one_character_per_block() {
        use BlockState::*;
        let m = BlockMap::of(&[Free, InUse, Shared, Cached, InUse]);
        assert_eq!(m.map, "02312");
        assert_eq!((m.free, m.cached, m.in_use, m.shared), (1, 1, 2, 1));
    }

    #[test]
    fn the_page_loads_nothing_from_elsewhere() {
        for (name, text) in [
            ("index.html", INDEX_HTML),
            ("app.js", APP_JS),
            ("style.css", STYLE_CSS),
        ] {
            for bad in ["http://", "https://", "//cdn", "@import"] {
                assert!(!text.contains(bad), "{name} refers to {bad}");
            }
        }
        assert!(
            INDEX_HTML.contains("/dashboard/app.js") && INDEX_HTML.contains("/dashboard/style.css")
        );
    }
}
