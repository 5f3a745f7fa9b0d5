//! The engine's step: schedule, execute, update. Owns the model, the cache
//! memory, the scheduler and every request's output state. Runs on the engine
//! thread; tests drive it directly.

use std::collections::HashMap;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::detokenizer::{Detokenizer, StopStrings};
use super::grammar::Constraint;
use super::model_runner::{ModelRunner, SeqStep};
use super::request::{
    EngineError, EngineEvent, FinishReason, GenerateRequest, SeqOutput, Timings, TokenLogprob,
    Usage, ValidRequest,
};
use super::sampler::{token_logprob, Sampler};
use super::scheduler::{Scheduler, SchedulerConfig, StepPlan};
use super::stats::{EngineStats, QueueSlot};
use crate::kv_cache::{KvCacheManager, KvCacheSizing, SeqId};
use crate::layers::Logits;
use crate::models::{Model, ModelKind};
use crate::tokenizer::Tokenizer;

pub type RequestId = u64;

/// Engine limits and batch shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EngineConfig {
    pub max_model_len: usize,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub max_waiting_requests: usize,
    /// Reuse the KV blocks of prompt prefixes already computed.
    pub enable_prefix_caching: bool,
}

/// Output state of one of a request's `n` sequences.
struct SeqState {
    seq: SeqId,
    sampler: Sampler,
    /// The grammar's matcher, when the output is constrained.
    constraint: Option<Constraint>,
    detok: Detokenizer,
    stops: StopStrings,
    num_output: usize,
    finished: bool,
}

struct RequestState {
    req: GenerateRequest,
    tx: UnboundedSender<EngineEvent>,
    seqs: Vec<SeqState>,
    /// The `n - 1` other samples exist once the prompt is computed.
    forked: bool,
    prompt_logprobs: Vec<Option<TokenLogprob>>,
    timings: Timings,
    completion_tokens: usize,
    /// The request's place in the admission queue, given back (dropped) when
    /// it is first scheduled.
    slot: Option<QueueSlot>,
    /// Prompt tokens found in the prefix cache when it was first scheduled.
    cached_tokens: usize,
}

pub struct EngineCore {
    model: Box<dyn Model>,
    runner: ModelRunner,
    tokenizer: Tokenizer,
    sched: Scheduler,
    cfg: EngineConfig,
    requests: HashMap<RequestId, RequestState>,
    /// Which request and which of its samples each sequence is.
    owners: HashMap<SeqId, (RequestId, usize)>,
    next_seq: SeqId,
    next_arrival: u64,
    /// Requests whose client went away during the step (a send failed): they
    /// are aborted once the step is over, never while it still walks their
    /// sequences.
    disconnected: Vec<RequestId>,
    /// The requests of the step being run, for the log if it panics.
    in_step: Vec<RequestId>,
    stats: std::sync::Arc<EngineStats>,
}

impl EngineCore {
    pub fn new(
        model: Box<dyn Model>,
        tokenizer: Tokenizer,
        sizing: KvCacheSizing,
        cfg: EngineConfig,
        stats: std::sync::Arc<EngineStats>,
    ) -> anyhow::Result<Self> {
        let runner = ModelRunner::new(model.as_ref(), &sizing)?;
        let sched = Scheduler::new(
            SchedulerConfig {
                max_num_batched_tokens: cfg.max_num_batched_tokens,
                max_num_seqs: cfg.max_num_seqs,
                whole_prompts: model.spec().kind.needs_whole_prompts(),
            },
            KvCacheManager::with_prefix_caching(
                sizing.num_blocks,
                sizing.block_size,
                cfg.enable_prefix_caching && model.spec().supports_prefix_caching(),
            ),
        );
        Ok(Self {
            model,
            runner,
            tokenizer,
            sched,
            cfg,
            requests: HashMap::new(),
            owners: HashMap::new(),
            next_seq: 0,
            next_arrival: 0,
            disconnected: Vec::new(),
            in_step: Vec::new(),
            stats,
        })
    }

    pub fn scheduler(&self) -> &Scheduler {
        &self.sched
    }

    pub fn has_work(&self) -> bool {
        !self.requests.is_empty()
    }

    pub fn num_requests(&self) -> usize {
        self.requests.len()
    }

    /// Admits a validated request holding its place in the queue; its events
    /// go to `tx`.
    pub fn add_request(
        &mut self,
        id: RequestId,
        req: ValidRequest,
        tx: UnboundedSender<EngineEvent>,
        slot: QueueSlot,
    ) {
        let arrived = slot.arrived();
        let req = req.into_inner();
        if req.embed != self.sched_embeds() || (req.embed && req.n != 1) {
            // EngineHandle::validate refuses these; a direct caller gets told.
            let _ = tx.send(EngineEvent::Error(EngineError::WrongTask(format!(
                "{} does not serve this kind of request",
                self.model.spec().architecture
            ))));
            return;
        }
        let seq = self.new_seq(id, 0);
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        // Prompt logprobs need every position's logits: no cached blocks.
        let cacheable = req.prompt_logprobs.is_none();
        self.sched
            .add(seq, self.sched_tokens(&req.prompt_ids), arrival, cacheable);
        let first = self.seq_state(&req, seq, 0);
        self.requests.insert(
            id,
            RequestState {
                tx,
                seqs: vec![first],
                forked: req.n == 1,
                prompt_logprobs: Vec::new(),
                timings: Timings {
                    arrived,
                    scheduled: None,
                    first_token: None,
                    finished: arrived,
                },
                completion_tokens: 0,
                slot: Some(slot),
                cached_tokens: 0,
                req,
            },
        );
    }

    /// The tokens a prompt is computed as: itself, or for an
    /// encoder-decoder model the encoder input followed by the decoder's
    /// start token (whose logits give the first output token).
    fn sched_tokens(&self, prompt: &[u32]) -> Vec<u32> {
        let mut tokens = prompt.to_vec();
        if let ModelKind::EncoderDecoder { decoder_start } = self.model.spec().kind {
            tokens.push(decoder_start);
        }
        tokens
    }

    /// The context the output is detokenized and penalized after: the
    /// prompt, or an encoder-decoder's decoder start token alone (its output
    /// is text of its own, not a continuation of the input).
    fn output_context<'a>(&self, prompt: &'a [u32]) -> std::borrow::Cow<'a, [u32]> {
        match self.model.spec().kind {
            ModelKind::EncoderDecoder { decoder_start } => vec![decoder_start].into(),
            _ => prompt.into(),
        }
    }

    fn new_seq(&mut self, req: RequestId, index: usize) -> SeqId {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.owners.insert(seq, (req, index));
        seq
    }

    fn seq_state(&self, req: &GenerateRequest, seq: SeqId, index: usize) -> SeqState {
        let context = self.output_context(&req.prompt_ids);
        SeqState {
            seq,
            sampler: Sampler::new(req.sampling.clone(), &context, index),
            constraint: req.grammar.as_ref().map(Constraint::new),
            detok: Detokenizer::new(&context, req.stop.skip_special_tokens),
            stops: StopStrings::new(req.stop.stop.clone()),
            num_output: 0,
            finished: false,
        }
    }

    /// Removes a request wherever it is, freeing every block it holds.
    pub fn abort(&mut self, id: RequestId) {
        if let Some(r) = self.requests.remove(&id) {
            self.release(r);
            self.stats.record_abort();
        }
    }

    /// Aborts requests whose receiver is gone (the client disconnected).
    pub fn drop_disconnected(&mut self) {
        let gone: Vec<RequestId> = self
            .requests
            .iter()
            .filter(|(_, r)| r.tx.is_closed())
            .map(|(&id, _)| id)
            .collect();
        for id in gone {
            self.abort(id);
        }
    }

    /// Fails every request (the model errored): each gets the error event.
    pub fn fail_all(&mut self, err: &EngineError) {
        let all: Vec<RequestState> = self.requests.drain().map(|(_, r)| r).collect();
        for r in all {
            let _ = r.tx.send(EngineEvent::Error(err.clone()));
            self.release(r);
        }
    }

    /// Ends every request with `err`, counted as aborted (the server is
    /// shutting down and its deadline has passed).
    pub fn abort_all(&mut self, err: &EngineError) {
        let n = self.requests.len();
        self.fail_all(err);
        for _ in 0..n {
            self.stats.record_abort();
        }
    }

    /// After a panic in the step: the scheduler and cache may be half
    /// updated, so nothing of them is touched. Every request gets `err` and
    /// its state (queue slot included) is dropped.
    pub fn fail_all_after_panic(&mut self, err: &EngineError) {
        for (_, r) in self.requests.drain() {
            let _ = r.tx.send(EngineEvent::Error(err.clone()));
        }
        self.owners.clear();
    }

    /// The requests of the step that was running (for the log of a panic).
    pub fn requests_in_step(&self) -> &[RequestId] {
        &self.in_step
    }

    /// Frees a removed request's sequences (its queue slot goes with it).
    fn release(&mut self, r: RequestState) {
        for s in &r.seqs {
            self.sched.remove(s.seq);
            self.owners.remove(&s.seq);
        }
    }

    /// One schedule → execute → update round. Returns false when there was
    /// nothing to run.
    pub fn step(&mut self) -> anyhow::Result<bool> {
        let plan = self.sched.schedule();
        if plan.is_empty() {
            self.publish_stats();
            return Ok(false);
        }
        let now = Instant::now();
        self.in_step.clear();
        for s in &plan.scheduled {
            if let Some(&(rid, _)) = self.owners.get(&s.seq) {
                self.in_step.push(rid);
            }
            if let Some(r) = self.owner_mut(s.seq) {
                if r.timings.scheduled.is_none() {
                    r.timings.scheduled = Some(now);
                    r.slot = None; // out of the admission queue
                                   // Its first chunk starts after the prompt's cached prefix.
                    r.cached_tokens = s.start;
                }
            }
        }
        self.in_step.sort_unstable();
        self.in_step.dedup();
        let kinds = self.logits_kinds(&plan);
        let enc_dec = self.model.spec().kind.is_encoder_decoder();
        // Prompt tokens computed in this step (the rest are decode tokens).
        let prefill_tokens: usize = plan
            .scheduled
            .iter()
            .filter_map(|s| {
                let prompt = self.sched.seq(s.seq)?.num_prompt;
                Some((s.start + s.len).min(prompt).saturating_sub(s.start))
            })
            .sum();
        let forward_start = Instant::now();
        let steps: Vec<SeqStep> = plan
            .scheduled
            .iter()
            .zip(&kinds)
            .map(|(s, &logits)| {
                let seq = self.sched.seq(s.seq).expect("scheduled sequence exists");
                SeqStep {
                    tokens: &seq.tokens[s.start..s.start + s.len],
                    num_cached: s.start,
                    block_table: self.sched.block_table(s.seq),
                    logits,
                    // The prompt is the encoder input and the start token.
                    encoder_len: if enc_dec { seq.num_prompt - 1 } else { 0 },
                }
            })
            .collect();
        let rows = self
            .runner
            .execute(self.model.as_ref(), &plan.copies, &steps)?;
        drop(steps);
        let forward_time = forward_start.elapsed();
        let mask_start = Instant::now();
        self.prepare_masks(&plan);
        let mask_time = mask_start.elapsed();
        self.sched.advance(&plan);
        self.stats.record_step(plan.num_tokens(), prefill_tokens);

        let mut row = 0;
        for (s, kind) in plan.scheduled.iter().zip(kinds) {
            let n = match kind {
                Logits::None => 0,
                Logits::Last => 1,
                Logits::All => s.len,
            };
            let seq_rows = &rows[row..row + n];
            row += n;
            if kind == Logits::All {
                self.collect_prompt_logprobs(s.seq, s.start, seq_rows);
            }
            if s.sample && self.sched_embeds() {
                let row = seq_rows
                    .last()
                    .expect("an embedded sequence has its vector");
                self.emit_embedding(s.seq, row);
            } else if s.sample {
                let last = seq_rows.last().expect("a sampling sequence has logits");
                self.sample_and_emit(s.seq, last);
            }
        }
        for rid in std::mem::take(&mut self.disconnected) {
            self.abort(rid);
        }
        self.publish_stats();
        tracing::debug!(
            seqs = plan.scheduled.len(),
            tokens = plan.num_tokens(),
            forward_ms = forward_time.as_secs_f64() * 1e3,
            grammar_mask_ms = mask_time.as_secs_f64() * 1e3,
            step_ms = now.elapsed().as_secs_f64() * 1e3,
            "step"
        );
        Ok(true)
    }

    fn sched_embeds(&self) -> bool {
        self.model.spec().kind.is_embedding()
    }

    /// An embedding request's one result: the vector, then `Done`; the
    /// sequence and its blocks are freed at once.
    fn emit_embedding(&mut self, seq: SeqId, row: &[f32]) {
        let Some(&(rid, _)) = self.owners.get(&seq) else {
            return;
        };
        let Some(r) = self.requests.get_mut(&rid) else {
            return;
        };
        if r.tx.send(EngineEvent::Embedding(row.to_vec())).is_err() {
            self.disconnected.push(rid);
            return;
        }
        r.timings.first_token.get_or_insert_with(Instant::now);
        r.seqs[0].finished = true;
        self.sched.remove(seq);
        self.owners.remove(&seq);
        self.stats.record_finished_seq(FinishReason::Stop);
        self.finish_request_if_done(rid);
    }

    fn owner_mut(&mut self, seq: SeqId) -> Option<&mut RequestState> {
        let (rid, _) = *self.owners.get(&seq)?;
        self.requests.get_mut(&rid)
    }

    /// Prompt logprobs are gathered once, by the first sample while it prefills;
    /// `prompt_logprobs` is cleared once they are sent, so a recompute after
    /// preemption does not gather them again.
    fn wants_prompt_logprobs(&self, seq: SeqId, start: usize) -> bool {
        let Some(&(rid, index)) = self.owners.get(&seq) else {
            return false;
        };
        let r = &self.requests[&rid];
        index == 0 && r.req.prompt_logprobs.is_some() && start < r.req.prompt_ids.len()
    }

    /// Computes the grammar masks of the step's constrained samples on the
    /// compute threads, in parallel: a slow grammar costs its own sample's
    /// time, not the batch's times the number of constrained samples.
    fn prepare_masks(&mut self, plan: &StepPlan) {
        let sampling: std::collections::HashSet<SeqId> = plan
            .scheduled
            .iter()
            .filter(|s| s.sample)
            .map(|s| s.seq)
            .collect();
        let mut todo: Vec<&mut Constraint> = self
            .requests
            .values_mut()
            .flat_map(|r| r.seqs.iter_mut())
            .filter(|st| sampling.contains(&st.seq))
            .filter_map(|st| st.constraint.as_mut())
            .collect();
        match todo.len() {
            0 => {}
            1 => todo[0].prepare(),
            _ => self.runner.install(|| {
                use rayon::prelude::*;
                todo.par_iter_mut().for_each(|c| c.prepare());
            }),
        }
    }

    /// Which logits each scheduled sequence needs.
    fn logits_kinds(&self, plan: &StepPlan) -> Vec<Logits> {
        plan.scheduled
            .iter()
            .map(|s| {
                if self.wants_prompt_logprobs(s.seq, s.start) {
                    Logits::All
                } else if s.sample {
                    Logits::Last
                } else {
                    Logits::None
                }
            })
            .collect()
    }

    fn collect_prompt_logprobs(&mut self, seq: SeqId, start: usize, rows: &[Vec<f32>]) {
        let Some(r) = self.owner_mut(seq) else { return };
        let k = r.req.prompt_logprobs.unwrap_or(0);
        let prompt = &r.req.prompt_ids;
        if r.prompt_logprobs.is_empty() {
            r.prompt_logprobs.push(None);
        }
        for (j, row) in rows.iter().enumerate() {
            let next = start + j + 1;
            if next < prompt.len() && next == r.prompt_logprobs.len() {
                r.prompt_logprobs
                    .push(Some(token_logprob(row, prompt[next], k)));
            }
        }
        if r.prompt_logprobs.len() == prompt.len() {
            let _ =
                r.tx.send(EngineEvent::PromptLogprobs(r.prompt_logprobs.clone()));
            r.req.prompt_logprobs = None; // delivered; recomputation after preemption needs none
        }
    }

    /// Samples the next token of `seq` from `logits`, updates its text and
    /// stop state, and sends what became final.
    fn sample_and_emit(&mut self, seq: SeqId, logits: &[f32]) {
        let Some(&(rid, _)) = self.owners.get(&seq) else {
            return;
        };
        let Some(r) = self.requests.get_mut(&rid) else {
            return;
        };
        if r.tx.is_closed() {
            // Nobody is listening: no sampling, no forking; aborted after the step.
            self.disconnected.push(rid);
            return;
        }
        // The first sample of an n > 1 request: the prompt is in the cache, so
        // the other samples start now, sharing its blocks.
        if !r.forked {
            r.forked = true;
            let n = r.req.n;
            let mut children = Vec::with_capacity(n.saturating_sub(1));
            for index in 1..n {
                let child = self.next_seq;
                self.next_seq += 1;
                self.owners.insert(child, (rid, index));
                self.sched.fork(seq, child);
                children.push(child);
            }
            let r = &self.requests[&rid];
            let states: Vec<SeqState> = children
                .iter()
                .enumerate()
                .map(|(i, &child)| {
                    let mut st = self.seq_state(&r.req, child, i + 1);
                    // At the same point of the grammar as the parent (the
                    // start of the output), with its mask already computed.
                    st.constraint = r.seqs[0].constraint.as_ref().map(Constraint::fork);
                    st
                })
                .collect();
            self.requests
                .get_mut(&rid)
                .expect("checked above")
                .seqs
                .extend(states);
            for child in children {
                self.sample_one(rid, child, logits);
            }
        }
        self.sample_one(rid, seq, logits);
    }

    /// Samples one token of one of `rid`'s sequences. A request that finishes
    /// or whose client is gone is never removed from under a caller that
    /// still iterates over its sequences: a finished request is removed only
    /// once all its samples are done, and a disconnected one after the step.
    fn sample_one(&mut self, rid: RequestId, seq: SeqId, logits: &[f32]) {
        let Some(&(_, index)) = self.owners.get(&seq) else {
            return;
        };
        let total_len = self.sched.seq(seq).map_or(0, |s| s.tokens.len());
        let Some(r) = self.requests.get_mut(&rid) else {
            return;
        };
        let st = &mut r.seqs[index];
        let stop = &r.req.stop;
        let eos = &self.tokenizer.eos_token_ids;
        let banned: Vec<u32> = if st.num_output < stop.min_tokens {
            let mut b: Vec<u32> = stop.stop_token_ids.clone();
            if !stop.ignore_eos {
                b.extend(eos);
            }
            b
        } else {
            Vec::new()
        };
        let mask = st.constraint.as_mut().map(|c| c.mask());
        if let Some(None) = mask {
            // The matcher failed: the grammar cannot go on.
            tracing::warn!("request {rid}: the grammar matcher failed; ending the sample");
        }
        let (token, lp) = st
            .sampler
            .sample(logits, &banned, mask.flatten(), r.req.logprobs);
        st.sampler.observe(token);
        let grammar_done = st.constraint.as_mut().is_some_and(|c| c.advance(token));
        st.num_output += 1;
        r.completion_tokens += 1;
        r.timings.first_token.get_or_insert_with(Instant::now);
        self.stats.record_generated(1);

        let mut finish = None;
        let mut text;
        if (!stop.ignore_eos && eos.contains(&token))
            || stop.stop_token_ids.binary_search(&token).is_ok()
        {
            // The stop token itself has no text; release anything held back.
            finish = Some(FinishReason::Stop);
            text = flush_text(st, &self.tokenizer);
        } else {
            let piece = st.detok.push(&self.tokenizer, token);
            let (out, hit) = st.stops.push(&piece);
            text = out;
            if hit {
                finish = Some(FinishReason::Stop);
            } else if grammar_done {
                // The grammar is complete: nothing may follow.
                finish = Some(FinishReason::Stop);
                text.push_str(&flush_text(st, &self.tokenizer));
            } else if st.num_output >= stop.max_tokens || total_len + 1 >= self.cfg.max_model_len {
                finish = Some(FinishReason::Length);
                text.push_str(&flush_text(st, &self.tokenizer));
            }
        }
        let out = SeqOutput {
            index,
            token_ids: vec![token],
            text,
            logprobs: lp.into_iter().collect(),
            finish_reason: finish,
            time: Instant::now(),
        };
        if r.tx.send(EngineEvent::Output(out)).is_err() {
            self.disconnected.push(rid);
        }
        if let Some(f) = finish {
            st.finished = true;
            self.sched.remove(seq);
            self.owners.remove(&seq);
            self.stats.record_finished_seq(f);
            self.finish_request_if_done(rid);
        } else {
            self.sched.append_token(seq, token);
        }
    }

    fn finish_request_if_done(&mut self, rid: RequestId) {
        let done = self
            .requests
            .get(&rid)
            .is_some_and(|r| r.forked && r.seqs.iter().all(|s| s.finished));
        if !done {
            return;
        }
        let mut r = self.requests.remove(&rid).expect("checked");
        r.timings.finished = Instant::now();
        let usage = Usage {
            prompt_tokens: r.req.prompt_ids.len(),
            completion_tokens: r.completion_tokens,
            cached_tokens: r.cached_tokens,
        };
        self.stats.record_request_done(r.req.prompt_ids.len());
        let _ = r.tx.send(EngineEvent::Done {
            usage,
            timings: r.timings,
        });
    }

    /// Checks that the request table, the scheduler and the cache agree, for
    /// tests that drive the engine through random operations. Returns what
    /// is wrong. Cost: a walk over every sequence and block.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.sched.check_invariants()?;
        for (&seq, &(rid, index)) in &self.owners {
            let r = self
                .requests
                .get(&rid)
                .ok_or_else(|| format!("sequence {seq} belongs to missing request {rid}"))?;
            let st = r
                .seqs
                .get(index)
                .ok_or_else(|| format!("request {rid} has no sample {index}"))?;
            if st.seq != seq || st.finished {
                return Err(format!(
                    "owner of sequence {seq} is sample {index} of request {rid}, which is \
                     sequence {} (finished: {})",
                    st.seq, st.finished
                ));
            }
        }
        for (&rid, r) in &self.requests {
            let expected = if r.forked { r.req.n } else { 1 };
            if r.seqs.len() != expected {
                return Err(format!(
                    "request {rid} has {} samples, expected {expected}",
                    r.seqs.len()
                ));
            }
            if r.slot.is_some() != r.timings.scheduled.is_none() {
                return Err(format!(
                    "request {rid}: queue slot held {} but scheduled {}",
                    r.slot.is_some(),
                    r.timings.scheduled.is_some()
                ));
            }
            for (i, st) in r.seqs.iter().enumerate() {
                let owned = self.owners.get(&st.seq) == Some(&(rid, i));
                let scheduled = self.sched.seq(st.seq).is_some();
                if st.finished == owned || st.finished == scheduled {
                    return Err(format!(
                        "request {rid} sample {i} (sequence {}): finished {}, owned {owned}, \
                         in the scheduler {scheduled}",
                        st.seq, st.finished
                    ));
                }
            }
            if r.seqs.iter().all(|s| s.finished) && r.forked {
                return Err(format!("request {rid} is done but still listed"));
            }
        }
        if self.owners.len() != self.sched.num_seqs() {
            return Err(format!(
                "{} owned sequences but the scheduler has {}",
                self.owners.len(),
                self.sched.num_seqs()
            ));
        }
        Ok(())
    }

    /// True when no request, sequence or block is left (every block free).
    pub fn is_drained(&self) -> bool {
        self.requests.is_empty()
            && self.owners.is_empty()
            && self.sched.num_seqs() == 0
            && self.sched.kv().num_free_blocks() == self.sched.kv().pool().num_blocks()
    }

    /// Forgets every cached prefix (`POST /reset_prefix_cache`).
    pub fn reset_prefix_cache(&mut self) {
        self.sched.reset_prefix_cache();
    }

    /// Every KV block's state, by block id.
    pub fn block_states(&self) -> Vec<crate::kv_cache::BlockState> {
        self.sched.kv().pool().block_states()
    }

    fn publish_stats(&self) {
        let (queried, hit) = self.sched.kv().prefix_cache_counts();
        self.stats.set_prefix_cache(queried, hit);
        self.stats.set_gauges(
            self.sched.num_running(),
            self.sched.num_waiting(),
            self.sched.kv().usage(),
            self.sched.num_preemptions(),
        );
    }
}

/// Text still held back when a sequence ends without a stop string.
fn flush_text(st: &mut SeqState, tok: &Tokenizer) -> String {
    let rest = st.detok.flush(tok);
    let (mut out, hit) = st.stops.push(&rest);
    if !hit {
        out.push_str(&st.stops.flush());
    }
    out
}
