//! Prometheus metrics, named like vLLM's with a `candela:` prefix
//! (`--metrics-prefix vllm` for routers that know only vLLM's names), plus
//! the standard `process_*` metrics of the server process.

use std::sync::Arc;
use std::time::Instant;

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry, TextEncoder,
};

use crate::engine::{FinishReason, StatsSnapshot, Timings, Usage};
use crate::layers::ExpertStats;

/// Token-count buckets (prompt and generation lengths, tokens per step), as
/// vLLM's 1-2-5 series.
const TOKEN_BUCKETS: &[f64] = &[
    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 20000.0,
    50000.0, 100000.0,
];

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0,
];

/// The memory side of the configuration, for [`Metrics::set_memory`].
#[derive(Debug, Clone)]
pub struct MemoryInfo {
    pub block_size: usize,
    pub num_blocks: usize,
    pub cache_dtype: String,
    pub prefix_caching: bool,
    pub kv_cache_bytes: u64,
    pub weights_bytes: u64,
}

/// A histogram's cumulative count, sum and buckets at one moment.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistogramTotals {
    pub count: u64,
    pub sum: f64,
    /// `(upper bound, observations at or below it)`, the last bound `+Inf`.
    pub buckets: Vec<(f64, u64)>,
}

impl HistogramTotals {
    fn of(h: &Histogram) -> Self {
        use prometheus::core::Metric;
        let m = h.metric();
        let h = m.get_histogram();
        let mut buckets: Vec<(f64, u64)> = h
            .get_bucket()
            .iter()
            .map(|b| (b.upper_bound(), b.cumulative_count()))
            .collect();
        buckets.push((f64::INFINITY, h.get_sample_count()));
        Self {
            count: h.get_sample_count(),
            sum: h.get_sample_sum(),
            buckets,
        }
    }
}

/// [`Metrics::latency_totals`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LatencyTotals {
    pub ttft: HistogramTotals,
    pub itl: HistogramTotals,
}

pub struct Metrics {
    model_name: String,
    /// `candela` or what `--metrics-prefix` says: every engine metric is
    /// `{prefix}:{vLLM's name}`.
    prefix: String,
    registry: Registry,
    ttft: Histogram,
    itl: Histogram,
    tpot: Histogram,
    e2e: Histogram,
    queue: Histogram,
    prefill_time: Histogram,
    decode_time: Histogram,
    inference_time: Histogram,
    request_prompt_tokens: Histogram,
    request_generation_tokens: Histogram,
    iteration_tokens: Histogram,
    prompt_tokens: IntCounter,
    generation_tokens: IntCounter,
    success: IntCounterVec,
    disconnects: IntCounter,
    preemptions: IntCounter,
    prefix_queries: IntCounter,
    prefix_hits: IntCounter,
    running: prometheus::Gauge,
    waiting: prometheus::Gauge,
    kv_usage: prometheus::Gauge,
    experts: Option<ExpertMetrics>,
}

/// The expert load balance of a Mixture-of-Experts model, per MoE layer.
struct ExpertMetrics {
    stats: Arc<ExpertStats>,
    routed: prometheus::IntCounterVec,
    imbalance: prometheus::GaugeVec,
}

impl Metrics {
    /// Metrics named `candela:*`.
    pub fn new(model_name: &str) -> Self {
        Self::with_prefix(model_name, "candela")
    }

    /// Metrics named `{prefix}:*` (`vllm` for routers that read only vLLM's
    /// names).
    pub fn with_prefix(model_name: &str, prefix: &str) -> Self {
        let registry = Registry::new();
        // The process's memory, CPU time, open files and threads (Linux).
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metric");
        let name = |n: &str| format!("{prefix}:{n}");
        let label = |o: Opts| o.const_label("model_name", model_name);
        let histogram = |n: &str, help: &str, buckets: &[f64]| {
            let h = Histogram::with_opts(
                HistogramOpts::new(name(n), help)
                    .const_label("model_name", model_name)
                    .buckets(buckets.to_vec()),
            )
            .expect("valid histogram");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        let hist = |n: &str, help: &str| histogram(n, help, LATENCY_BUCKETS);
        let tokens = |n: &str, help: &str| histogram(n, help, TOKEN_BUCKETS);
        let counter = |n: &str, help: &str| {
            let c = IntCounter::with_opts(label(Opts::new(name(n), help))).expect("valid counter");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |n: &str, help: &str| {
            let g =
                prometheus::Gauge::with_opts(label(Opts::new(name(n), help))).expect("valid gauge");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let success = IntCounterVec::new(
            label(Opts::new(
                name("request_success_total"),
                "Finished requests by finish reason.",
            )),
            &["finished_reason"],
        )
        .expect("valid counter");
        registry
            .register(Box::new(success.clone()))
            .expect("unique metric");
        Self {
            ttft: hist("time_to_first_token_seconds", "Time to first token."),
            itl: hist(
                "inter_token_latency_seconds",
                "Time between consecutive output tokens.",
            ),
            tpot: hist(
                "time_per_output_token_seconds",
                "Time per output token (each interval between output tokens, as vLLM observes it).",
            ),
            prefill_time: hist(
                "request_prefill_time_seconds",
                "Time from a request's first step to its first token.",
            ),
            decode_time: hist(
                "request_decode_time_seconds",
                "Time from a request's first token to its last.",
            ),
            inference_time: hist(
                "request_inference_time_seconds",
                "Time from a request's first step to its end.",
            ),
            request_prompt_tokens: tokens(
                "request_prompt_tokens",
                "Prompt tokens per finished request.",
            ),
            request_generation_tokens: tokens(
                "request_generation_tokens",
                "Generated tokens per finished request.",
            ),
            iteration_tokens: tokens(
                "iteration_tokens_total",
                "Tokens per engine step (prompt chunks and decoded tokens together).",
            ),
            e2e: hist("e2e_request_latency_seconds", "End-to-end request latency."),
            queue: hist(
                "request_queue_time_seconds",
                "Time spent waiting before the first step.",
            ),
            prompt_tokens: counter("prompt_tokens_total", "Prefilled prompt tokens."),
            generation_tokens: counter("generation_tokens_total", "Generated tokens."),
            disconnects: counter(
                "client_disconnects_total",
                "Requests whose client went away before the end.",
            ),
            preemptions: counter(
                "num_preemptions_total",
                "Sequences preempted for lack of KV blocks.",
            ),
            prefix_queries: counter(
                "prefix_cache_queries_total",
                "Prompt tokens looked up in the prefix cache.",
            ),
            prefix_hits: counter(
                "prefix_cache_hits_total",
                "Prompt tokens found in the prefix cache.",
            ),
            running: gauge("num_requests_running", "Sequences in the running batch."),
            waiting: gauge("num_requests_waiting", "Sequences waiting to be scheduled."),
            kv_usage: gauge(
                "kv_cache_usage_perc",
                "Fraction of KV cache blocks in use (0-1).",
            ),
            success,
            registry,
            model_name: model_name.to_string(),
            prefix: prefix.to_string(),
            experts: None,
        }
    }

    /// Exports a Mixture-of-Experts model's routing counters per MoE layer:
    /// `candela:moe_routed_tokens_total{layer}` (token-to-expert assignments,
    /// `k` per token) and `candela:moe_expert_load_imbalance{layer}`, the
    /// busiest expert's tokens over the mean (1 when the router spreads
    /// tokens evenly, the number of experts when one takes them all).
    pub fn set_expert_stats(&mut self, stats: Arc<ExpertStats>) {
        let opts = |name: &str, help: &str| {
            Opts::new(self.name(name), help).const_label("model_name", self.model_name.as_str())
        };
        let routed = IntCounterVec::new(
            opts(
                "moe_routed_tokens_total",
                "Tokens routed to experts (k per token) by MoE layer.",
            ),
            &["layer"],
        )
        .expect("valid counter");
        let imbalance = prometheus::GaugeVec::new(
            opts(
                "moe_expert_load_imbalance",
                "Tokens of the busiest expert over the mean, by MoE layer (1 = balanced).",
            ),
            &["layer"],
        )
        .expect("valid gauge");
        self.registry
            .register(Box::new(routed.clone()))
            .expect("unique metric");
        self.registry
            .register(Box::new(imbalance.clone()))
            .expect("unique metric");
        self.experts = Some(ExpertMetrics {
            stats,
            routed,
            imbalance,
        });
    }

    /// What the model and its cache hold, as fixed gauges: vLLM's
    /// `cache_config_info` (labels, value 1) and the bytes of each.
    pub fn set_memory(&self, mem: &MemoryInfo) {
        let info = prometheus::Gauge::with_opts(
            Opts::new(
                self.name("cache_config_info"),
                "KV cache configuration (labels; value 1).",
            )
            .const_label("model_name", &self.model_name)
            .const_label("block_size", mem.block_size.to_string())
            .const_label("num_gpu_blocks", mem.num_blocks.to_string())
            .const_label("num_cpu_blocks", "0")
            .const_label("cache_dtype", &mem.cache_dtype)
            .const_label("enable_prefix_caching", mem.prefix_caching.to_string()),
        )
        .expect("valid gauge");
        info.set(1.0);
        let bytes = |name: &str, help: &str, v: u64| {
            let g = prometheus::Gauge::with_opts(
                Opts::new(self.name(name), help).const_label("model_name", &self.model_name),
            )
            .expect("valid gauge");
            g.set(v as f64);
            g
        };
        let gauges = [
            info,
            bytes(
                "kv_cache_bytes",
                "Bytes of the KV cache pool.",
                mem.kv_cache_bytes,
            ),
            bytes(
                "model_weights_bytes",
                "Resident memory the model took when it loaded (weights and tokenizer).",
                mem.weights_bytes,
            ),
        ];
        for g in gauges {
            // Set once at startup; a second call keeps the first values.
            let _ = self.registry.register(Box::new(g));
        }
    }

    fn name(&self, n: &str) -> String {
        format!("{}:{n}", self.prefix)
    }

    /// The histogram of tokens per engine step, for the engine to observe
    /// ([`crate::engine::EngineHandle::observe_steps`]).
    pub fn iteration_tokens(&self) -> Histogram {
        self.iteration_tokens.clone()
    }

    /// A finished request: latencies and token counts.
    pub fn record_request(&self, usage: &Usage, timings: &Timings) {
        self.prompt_tokens.inc_by(usage.prompt_tokens as u64);
        self.generation_tokens
            .inc_by(usage.completion_tokens as u64);
        self.request_prompt_tokens
            .observe(usage.prompt_tokens as f64);
        self.request_generation_tokens
            .observe(usage.completion_tokens as f64);
        let secs = |from: Instant, to: Instant| to.saturating_duration_since(from).as_secs_f64();
        if let Some(first) = timings.first_token {
            self.ttft.observe(secs(timings.arrived, first));
            self.decode_time.observe(secs(first, timings.finished));
        }
        if let Some(s) = timings.scheduled {
            self.queue.observe(secs(timings.arrived, s));
            self.inference_time.observe(secs(s, timings.finished));
            if let Some(first) = timings.first_token {
                self.prefill_time.observe(secs(s, first));
            }
        }
        self.e2e.observe(secs(timings.arrived, timings.finished));
    }

    pub fn record_finish(&self, reason: FinishReason) {
        self.success.with_label_values(&[reason.as_str()]).inc();
    }

    pub fn record_inter_token(&self, seconds: f64) {
        self.itl.observe(seconds);
        self.tpot.observe(seconds);
    }

    /// Time to first token and inter-token latency so far, cumulative (the
    /// dashboard takes differences between two readings).
    pub fn latency_totals(&self) -> LatencyTotals {
        LatencyTotals {
            ttft: HistogramTotals::of(&self.ttft),
            itl: HistogramTotals::of(&self.itl),
        }
    }

    pub fn record_disconnect(&self) {
        self.disconnects.inc();
    }

    /// The Prometheus text exposition, with gauges read from the engine now.
    pub fn render(&self, stats: &StatsSnapshot) -> String {
        self.running.set(stats.num_running as f64);
        self.waiting.set(stats.num_waiting as f64);
        self.kv_usage.set(stats.kv_cache_usage);
        for (c, total) in [
            (&self.prefix_queries, stats.prefix_cache_queries),
            (&self.prefix_hits, stats.prefix_cache_hits),
        ] {
            let seen = c.get();
            if total > seen {
                c.inc_by(total - seen);
            }
        }
        let seen = self.preemptions.get();
        if stats.num_preemptions > seen {
            self.preemptions.inc_by(stats.num_preemptions - seen);
        }
        if let Some(e) = &self.experts {
            for (layer, counts) in e.stats.snapshot() {
                let label = layer.to_string();
                let total: u64 = counts.iter().sum();
                let c = e.routed.with_label_values(&[&label]);
                if total > c.get() {
                    c.inc_by(total - c.get());
                }
                let max = counts.iter().copied().max().unwrap_or(0);
                let mean = total as f64 / counts.len().max(1) as f64;
                let ratio = if total == 0 { 1.0 } else { max as f64 / mean };
                e.imbalance.with_label_values(&[&label]).set(ratio);
                tracing::debug!("MoE layer {layer}: tokens per expert {counts:?}");
            }
        }
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_vllm_style_names() {
        let m = Metrics::new("m");
        m.record_finish(FinishReason::Length);
        m.set_memory(&MemoryInfo {
            block_size: 16,
            num_blocks: 100,
            cache_dtype: "f16".into(),
            prefix_caching: true,
            kv_cache_bytes: 1 << 20,
            weights_bytes: 5 << 20,
        });
        let text = m.render(&StatsSnapshot {
            num_running: 2,
            kv_cache_usage: 0.5,
            ..Default::default()
        });
        for name in [
            "candela:time_to_first_token_seconds_bucket",
            "candela:num_requests_running{model_name=\"m\"} 2",
            "candela:kv_cache_usage_perc{model_name=\"m\"} 0.5",
            "candela:request_success_total{finished_reason=\"length\",model_name=\"m\"} 1",
            "candela:cache_config_info{block_size=\"16\",cache_dtype=\"f16\",enable_prefix_caching=\"true\",model_name=\"m\",num_cpu_blocks=\"0\",num_gpu_blocks=\"100\"} 1",
            "candela:kv_cache_bytes{model_name=\"m\"} 1048576",
            "candela:model_weights_bytes{model_name=\"m\"} 5242880",
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
    }

    #[test]
    fn vllm_prefix_request_histograms_and_process_metrics() {
        let m = Metrics::with_prefix("m", "vllm");
        let t0 = Instant::now();
        let ms = |n| t0 + std::time::Duration::from_millis(n);
        m.record_request(
            &Usage {
                prompt_tokens: 7,
                completion_tokens: 3,
                cached_tokens: 0,
            },
            &Timings {
                arrived: t0,
                scheduled: Some(ms(10)),
                first_token: Some(ms(30)),
                finished: ms(100),
            },
        );
        m.record_inter_token(0.02);
        m.iteration_tokens().observe(42.0);
        m.record_finish(FinishReason::Abort);
        let text = m.render(&StatsSnapshot::default());
        for name in [
            "vllm:num_requests_waiting{model_name=\"m\"} 0",
            "vllm:request_prefill_time_seconds_sum{model_name=\"m\"} 0.02",
            "vllm:request_decode_time_seconds_sum{model_name=\"m\"} 0.07",
            "vllm:request_inference_time_seconds_sum{model_name=\"m\"} 0.09",
            "vllm:request_prompt_tokens_sum{model_name=\"m\"} 7",
            "vllm:request_generation_tokens_bucket{model_name=\"m\",le=\"5\"} 1",
            "vllm:time_per_output_token_seconds_count{model_name=\"m\"} 1",
            "vllm:iteration_tokens_total_sum{model_name=\"m\"} 42",
            "vllm:request_success_total{finished_reason=\"abort\",model_name=\"m\"} 1",
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
        assert!(!text.contains("candela:"), "{text}");
        #[cfg(target_os = "linux")]
        for name in [
            "process_resident_memory_bytes",
            "process_cpu_seconds_total",
            "process_open_fds",
        ] {
            assert!(text.contains(name), "{name} missing in\n{text}");
        }
    }

    #[test]
    fn expert_load_per_moe_layer() {
        let stats = Arc::new(ExpertStats::new([(1, 4), (3, 4)]));
        let mut m = Metrics::new("m");
        m.set_expert_stats(stats.clone());
        let text = m.render(&StatsSnapshot::default());
        assert!(
            text.contains("candela:moe_routed_tokens_total{layer=\"1\",model_name=\"m\"} 0"),
            "{text}"
        );
        stats.add(1, &[6, 2, 0, 0]);
        stats.add(3, &[2, 2, 2, 2]);
        let text = m.render(&StatsSnapshot::default());
        for line in [
            "candela:moe_routed_tokens_total{layer=\"1\",model_name=\"m\"} 8",
            "candela:moe_expert_load_imbalance{layer=\"1\",model_name=\"m\"} 3",
            "candela:moe_expert_load_imbalance{layer=\"3\",model_name=\"m\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing in\n{text}");
        }
    }
}
