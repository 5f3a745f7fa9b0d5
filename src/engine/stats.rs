//! Counters and gauges the engine thread updates and the API layer reads
//! (for `/metrics`). Plain atomics: written by one thread, read by any.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};

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
    aborted: AtomicU64,
    finished_stop: AtomicU64,
    finished_length: AtomicU64,
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
    pub aborted_requests: u64,
    pub finished_stop: u64,
    pub finished_length: u64,
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
            aborted_requests: self.aborted.load(Relaxed),
            finished_stop: self.finished_stop.load(Relaxed),
            finished_length: self.finished_length.load(Relaxed),
        }
    }

    /// Takes a place in the admission queue unless `limit` are already queued.
    pub fn try_enqueue(&self, limit: usize) -> Result<(), usize> {
        let before = self.queued_requests.fetch_add(1, Relaxed);
        if before >= limit {
            self.queued_requests.fetch_sub(1, Relaxed);
            return Err(before);
        }
        Ok(())
    }

    pub(super) fn left_queue(&self) {
        let _ = self
            .queued_requests
            .fetch_update(Relaxed, Relaxed, |v| v.checked_sub(1));
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

    pub(super) fn record_step(&self, tokens: usize) {
        self.steps.fetch_add(1, Relaxed);
        self.step_tokens.fetch_add(tokens as u64, Relaxed);
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
