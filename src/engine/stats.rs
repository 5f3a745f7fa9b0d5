//! Counters and gauges the engine thread updates and the API layer reads
//! (for `/metrics`). Plain atomics: written by one thread, read by any.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use super::request::FinishReason;

#[derive(Debug, Default)]
pub struct EngineStats {
    num_running: AtomicUsize,
    num_waiting: AtomicUsize,
    /// Requests submitted but not yet scheduled once (the admission queue).
    queued_requests: AtomicUsize,
    kv_usage_bits: AtomicU64,
    preemptions: AtomicU64,
    prompt_tokens: AtomicU64,
    generation_tokens: AtomicU64,
    steps: AtomicU64,
    step_tokens: AtomicU64,
    prefill_tokens: AtomicU64,
    aborted: AtomicU64,
    finished_stop: AtomicU64,
    finished_length: AtomicU64,
    prefix_queried: AtomicU64,
    prefix_hit: AtomicU64,
    /// Told the tokens of every step (the metrics' per-step histogram).
    step_observer: std::sync::OnceLock<StepObserver>,
}

/// A function told the tokens of each engine step.
pub struct StepObserver(pub Box<dyn Fn(usize) + Send + Sync>);

impl std::fmt::Debug for StepObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StepObserver")
    }
}

/// A consistent-enough copy of the stats.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StatsSnapshot {
    pub num_running: usize,
    pub num_waiting: usize,
    pub queued_requests: usize,
    /// Fraction of KV blocks in use, 0 to 1.
    pub kv_cache_usage: f64,
    pub num_preemptions: u64,
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    pub steps: u64,
    pub step_tokens: u64,
    /// Prompt tokens computed (prefix-cache hits are not computed).
    pub prefill_tokens: u64,
    pub aborted_requests: u64,
    pub finished_stop: u64,
    pub finished_length: u64,
    /// Prompt tokens looked up in the prefix cache, and found there.
    pub prefix_cache_queries: u64,
    pub prefix_cache_hits: u64,
}

impl EngineStats {
    pub fn snapshot(&self) -> StatsSnapshot {
        StatsSnapshot {
            num_running: self.num_running.load(Relaxed),
            num_waiting: self.num_waiting.load(Relaxed),
            queued_requests: self.queued_requests.load(Relaxed),
            kv_cache_usage: f64::from_bits(self.kv_usage_bits.load(Relaxed)),
            num_preemptions: self.preemptions.load(Relaxed),
            prompt_tokens: self.prompt_tokens.load(Relaxed),
            generation_tokens: self.generation_tokens.load(Relaxed),
            steps: self.steps.load(Relaxed),
            step_tokens: self.step_tokens.load(Relaxed),
            prefill_tokens: self.prefill_tokens.load(Relaxed),
            aborted_requests: self.aborted.load(Relaxed),
            finished_stop: self.finished_stop.load(Relaxed),
            finished_length: self.finished_length.load(Relaxed),
            prefix_cache_queries: self.prefix_queried.load(Relaxed),
            prefix_cache_hits: self.prefix_hit.load(Relaxed),
        }
    }

    /// Takes a place in the admission queue unless `limit` are already queued.
    /// The place is given back when the slot is dropped: when its request is
    /// first scheduled, or whenever the request goes away before that
    /// (aborted, refused, or lost with a dead engine).
    pub fn try_enqueue(self: &Arc<Self>, limit: usize) -> Result<QueueSlot, usize> {
        Ok(self
            .try_enqueue_many(1, limit)?
            .pop()
            .expect("one slot asked for"))
    }

    /// Takes `n` places at once, or none: a request with several prompts is
    /// admitted whole or refused whole.
    pub fn try_enqueue_many(
        self: &Arc<Self>,
        n: usize,
        limit: usize,
    ) -> Result<Vec<QueueSlot>, usize> {
        self.queued_requests.fetch_update(Relaxed, Relaxed, |q| {
            q.checked_add(n).filter(|&after| after <= limit)
        })?;
        let arrived = Instant::now();
        Ok((0..n)
            .map(|_| QueueSlot {
                stats: self.clone(),
                arrived,
            })
            .collect())
    }

    pub(super) fn set_gauges(
        &self,
        running: usize,
        waiting: usize,
        kv_usage: f64,
        preemptions: u64,
    ) {
        self.num_running.store(running, Relaxed);
        self.num_waiting.store(waiting, Relaxed);
        self.kv_usage_bits.store(kv_usage.to_bits(), Relaxed);
        self.preemptions.store(preemptions, Relaxed);
    }

    pub(super) fn set_prefix_cache(&self, queried: u64, hit: u64) {
        self.prefix_queried.store(queried, Relaxed);
        self.prefix_hit.store(hit, Relaxed);
    }

    /// One step computed `tokens` tokens, `prefill` of them prompt tokens.
    pub(super) fn record_step(&self, tokens: usize, prefill: usize) {
        self.steps.fetch_add(1, Relaxed);
        self.step_tokens.fetch_add(tokens as u64, Relaxed);
        self.prefill_tokens.fetch_add(prefill as u64, Relaxed);
        if let Some(o) = self.step_observer.get() {
            (o.0)(tokens);
        }
    }

    /// Sets the function told each step's tokens (once; later calls are
    /// ignored).
    pub fn observe_steps(&self, f: impl Fn(usize) + Send + Sync + 'static) {
        let _ = self.step_observer.set(StepObserver(Box::new(f)));
    }

    pub(super) fn record_generated(&self, n: u64) {
        self.generation_tokens.fetch_add(n, Relaxed);
    }

    pub(super) fn record_request_done(&self, prompt_tokens: usize) {
        self.prompt_tokens.fetch_add(prompt_tokens as u64, Relaxed);
    }

    pub(super) fn record_finished_seq(&self, reason: FinishReason) {
        match reason {
            FinishReason::Stop => &self.finished_stop,
            FinishReason::Length => &self.finished_length,
            FinishReason::Abort => &self.aborted,
        }
        .fetch_add(1, Relaxed);
    }

    pub(super) fn record_abort(&self) {
        self.aborted.fetch_add(1, Relaxed);
    }
}

/// One request's place in the admission queue (counted in
/// `queued_requests`). Dropping it gives the place back, so the count stays
/// exact however the request ends, even if the engine thread dies.
#[derive(Debug)]
pub struct QueueSlot {
    stats: Arc<EngineStats>,
    arrived: Instant,
}

impl QueueSlot {
    /// When the request was admitted.
    pub fn arrived(&self) -> Instant {
        self.arrived
    }
}

impl Drop for QueueSlot {
    fn drop(&mut self) {
        self.stats.queued_requests.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_slots_are_counted_until_dropped() {
        let stats = Arc::new(EngineStats::default());
        let a = stats.try_enqueue(2).unwrap();
        let many = stats.try_enqueue_many(2, 2);
        assert_eq!(many.unwrap_err(), 1, "all or nothing");
        let b = stats.try_enqueue(2).unwrap();
        assert_eq!(stats.try_enqueue(2).unwrap_err(), 2);
        drop(a);
        assert_eq!(stats.snapshot().queued_requests, 1);
        drop(b);
        let four = stats.try_enqueue_many(4, 4).unwrap();
        assert_eq!(stats.snapshot().queued_requests, 4);
        drop(four);
        assert_eq!(stats.snapshot().queued_requests, 0);
    }
}
