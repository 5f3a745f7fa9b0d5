//! The scheduling policy: every step, which sequences run and how many tokens
//! each gets. One loop, no prefill/decode phases (as vLLM v1): a sequence's
//! work is simply `tokens - computed`, capped by the step's token budget, which
//! gives chunked prefill for free. Pure bookkeeping over the block tables, so
//! it is tested without a model.

use std::collections::{HashMap, VecDeque};

use crate::kv_cache::{BlockId, KvCacheManager, SeqId};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Token budget of one step (`--max-num-batched-tokens`).
    pub max_num_batched_tokens: usize,
    /// Most sequences in one step (`--max-num-seqs`).
    pub max_num_seqs: usize,
    /// Prompts are never chunked: an encoder's bidirectional attention needs
    /// the whole sequence in one step. A prompt waits for a step with room
    /// for all of it, or runs alone when it is longer than a step's budget.
    pub whole_prompts: bool,
}

/// A sequence as the scheduler sees it: its tokens and how many are in the cache.
#[derive(Debug, Clone)]
pub struct SchedSeq {
    /// Prompt followed by the generated tokens.
    pub tokens: Vec<u32>,
    pub num_prompt: usize,
    /// Tokens whose keys/values are in the cache.
    pub num_computed: usize,
    /// Arrival order of its request: larger is younger (preempted first).
    pub arrival: u64,
    /// May take cached prefix blocks (not when every prompt position's
    /// logits are wanted: a cached block has none).
    pub cacheable: bool,
}

/// One sequence's work in a step: tokens `start..start + len` of its tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheduled {
    pub seq: SeqId,
    pub start: usize,
    pub len: usize,
    /// The step reaches the end of the known tokens, so the next token is sampled.
    pub sample: bool,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StepPlan {
    pub scheduled: Vec<Scheduled>,
    /// Block copies (source, destination) to do before the step: copy on write.
    pub copies: Vec<(BlockId, BlockId)>,
    /// Sequences that lost their blocks this step and went back to the queue.
    pub preempted: Vec<SeqId>,
}

impl StepPlan {
    pub fn is_empty(&self) -> bool {
        self.scheduled.is_empty()
    }

    pub fn num_tokens(&self) -> usize {
        self.scheduled.iter().map(|s| s.len).sum()
    }
}

#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    kv: KvCacheManager,
    seqs: HashMap<SeqId, SchedSeq>,
    waiting: VecDeque<SeqId>,
    running: Vec<SeqId>,
    num_preemptions: u64,
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig, kv: KvCacheManager) -> Self {
        assert!(cfg.max_num_batched_tokens > 0 && cfg.max_num_seqs > 0);
        Self {
            cfg,
            kv,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            num_preemptions: 0,
        }
    }

    pub fn kv(&self) -> &KvCacheManager {
        &self.kv
    }

    pub fn seq(&self, id: SeqId) -> Option<&SchedSeq> {
        self.seqs.get(&id)
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    pub fn num_preemptions(&self) -> u64 {
        self.num_preemptions
    }

    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// Queues a new sequence with `tokens` to compute; a `cacheable` one
    /// starts from the longest cached prefix of them.
    pub fn add(&mut self, id: SeqId, tokens: Vec<u32>, arrival: u64, cacheable: bool) {
        let num_prompt = tokens.len();
        self.seqs.insert(
            id,
            SchedSeq {
                tokens,
                num_prompt,
                num_computed: 0,
                arrival,
                cacheable,
            },
        );
        self.waiting.push_back(id);
    }

    /// A new running sequence sharing all of `parent`'s blocks and tokens.
    pub fn fork(&mut self, parent: SeqId, child: SeqId) {
        let seq = self.seqs[&parent].clone();
        self.kv.fork(parent, child);
        self.seqs.insert(child, seq);
        self.running.push(child);
    }

    /// Appends a sampled token (not yet in the cache).
    pub fn append_token(&mut self, id: SeqId, token: u32) {
        if let Some(s) = self.seqs.get_mut(&id) {
            s.tokens.push(token);
        }
    }

    /// Removes a sequence wherever it is and frees its blocks.
    pub fn remove(&mut self, id: SeqId) {
        if self.seqs.remove(&id).is_some() {
            self.kv.free(id);
            self.waiting.retain(|&s| s != id);
            self.running.retain(|&s| s != id);
        }
    }

    pub fn block_table(&self, id: SeqId) -> &[BlockId] {
        self.kv.block_table(id)
    }

    /// Plans one step: running decodes first, then running prompts' next
    /// chunks, then waiting sequences in arrival order, within the token
    /// budget and sequence limit. When a running sequence cannot get a block,
    /// the youngest running sequence is preempted (its blocks freed, recomputed
    /// later) until it can, or it is preempted itself.
    pub fn schedule(&mut self) -> StepPlan {
        let mut plan = StepPlan::default();
        let mut done: Vec<SeqId> = Vec::new();

        // Decodes (one token outstanding) before prompt chunks.
        let mut order: Vec<SeqId> = self.running.clone();
        order.sort_by_key(|id| {
            let s = &self.seqs[id];
            (s.tokens.len() - s.num_computed > 1, s.arrival, *id)
        });
        let decodes = order
            .iter()
            .filter(|id| self.seqs[id].tokens.len() - self.seqs[id].num_computed == 1)
            .count();
        let mut budget = self.step_budget(decodes);
        for id in order {
            if budget == 0 {
                break;
            }
            if !self.running.contains(&id) {
                continue; // preempted earlier in this loop
            }
            let (start, want) = {
                let s = &self.seqs[&id];
                (s.num_computed, s.tokens.len() - s.num_computed)
            };
            let len = want.min(budget);
            loop {
                if self.try_allocate(id, start, len, &mut plan) {
                    plan.scheduled.push(Scheduled {
                        seq: id,
                        start,
                        len,
                        sample: len == want,
                    });
                    done.push(id);
                    budget -= len;
                    break;
                }
                // Preempt the youngest running sequence not already in the plan.
                let victim = self
                    .running
                    .iter()
                    .copied()
                    .filter(|v| !done.contains(v))
                    .max_by_key(|v| (self.seqs[v].arrival, *v))
                    .expect("the sequence itself is a candidate");
                self.preempt(victim, &mut plan);
                if victim == id {
                    break;
                }
            }
        }

        // Then new (or preempted) sequences, first come first served. Each
        // starts from the longest cached prefix of its tokens: those blocks
        // are taken, not computed.
        while budget > 0 && self.running.len() < self.cfg.max_num_seqs {
            let Some(&id) = self.waiting.front() else {
                break;
            };
            let s = &self.seqs[&id];
            let start = if s.cacheable {
                self.kv.take_prefix(id, &s.tokens)
            } else {
                0
            };
            let want = self.seqs[&id].tokens.len() - start;
            let mut len = want.min(budget);
            if self.cfg.whole_prompts && len < want {
                if !plan.scheduled.is_empty() {
                    self.kv.free(id);
                    break;
                }
                len = want;
            }
            if !self.try_allocate(id, start, len, &mut plan) {
                // Give back what the cache lent; wait for blocks, never skip
                // ahead of the queue's head.
                self.kv.free(id);
                break;
            }
            self.seqs.get_mut(&id).expect("queued").num_computed = start;
            self.waiting.pop_front();
            self.running.push(id);
            plan.scheduled.push(Scheduled {
                seq: id,
                start,
                len,
                sample: len == want,
            });
            budget = budget.saturating_sub(len);
        }
        plan
    }

    /// Tokens this step may take when `decodes` sequences are decoding. With
    /// nothing decoding, `--max-num-batched-tokens` (prompts go through as
    /// fast as possible). While sequences decode, every token of a prompt
    /// chunk in the step delays all of their next tokens, so a step takes at
    /// most four tokens per decode (a step then costs at most about four
    /// decode-only steps: inter-token latency stays within 4x of its median),
    /// and never less than an eighth of the budget (so prompts still advance
    /// quickly next to a few decodes).
    fn step_budget(&self, decodes: usize) -> usize {
        let max = self.cfg.max_num_batched_tokens;
        if decodes == 0 {
            return max;
        }
        (4 * decodes).max(max / 8).max(decodes).min(max)
    }

    /// Asks the cache for room for the tokens; a copy-on-write copy it needs
    /// goes into the plan.
    fn try_allocate(&mut self, id: SeqId, start: usize, len: usize, plan: &mut StepPlan) -> bool {
        match self.kv.allocate(id, start, len) {
            Ok(copy) => {
                plan.copies.extend(copy);
                true
            }
            Err(_) => false,
        }
    }

    fn preempt(&mut self, id: SeqId, plan: &mut StepPlan) {
        self.kv.free(id);
        self.running.retain(|&s| s != id);
        if let Some(s) = self.seqs.get_mut(&id) {
            s.num_computed = 0;
        }
        self.waiting.push_front(id);
        plan.preempted.push(id);
        self.num_preemptions += 1;
    }

    pub fn num_seqs(&self) -> usize {
        self.seqs.len()
    }

    /// Checks that the queues, the sequences and the cache agree: every
    /// sequence is either waiting or running (once), running ones hold blocks
    /// for what they computed, waiting ones computed nothing, and the pool's
    /// reference counts match the block tables.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for &id in self.waiting.iter().chain(&self.running) {
            if !seen.insert(id) {
                return Err(format!("sequence {id} is queued twice"));
            }
            if !self.seqs.contains_key(&id) {
                return Err(format!("queued sequence {id} is unknown"));
            }
        }
        if seen.len() != self.seqs.len() {
            return Err(format!(
                "{} sequences but {} waiting or running",
                self.seqs.len(),
                seen.len()
            ));
        }
        for (&id, s) in &self.seqs {
            if s.num_computed > s.tokens.len() || s.num_prompt > s.tokens.len() {
                return Err(format!(
                    "sequence {id}: {} computed, {} prompt, {} tokens",
                    s.num_computed,
                    s.num_prompt,
                    s.tokens.len()
                ));
            }
            let blocks = self.kv.block_table(id).len();
            if blocks < self.kv.blocks_for(s.num_computed) {
                return Err(format!(
                    "sequence {id} computed {} tokens but holds {blocks} blocks",
                    s.num_computed
                ));
            }
        }
        for &id in &self.waiting {
            if self.kv.contains(id) || self.seqs[&id].num_computed != 0 {
                return Err(format!("waiting sequence {id} holds cache state"));
            }
        }
        if let Some(id) = self.kv.seq_ids().find(|id| !self.seqs.contains_key(id)) {
            return Err(format!("the cache holds blocks of unknown sequence {id}"));
        }
        self.kv.check_invariants()
    }

    /// Records that the plan ran: its tokens are now in the cache, and the
    /// full blocks among them can be shared with later prompts.
    pub fn advance(&mut self, plan: &StepPlan) {
        for s in &plan.scheduled {
            if let Some(seq) = self.seqs.get_mut(&s.seq) {
                seq.num_computed = s.start + s.len;
                self.kv
                    .cache_full_blocks(s.seq, &seq.tokens, seq.num_computed);
            }
        }
    }

    /// Forgets every cached prefix.
    pub fn reset_prefix_cache(&mut self) {
        self.kv.reset_prefix_cache();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sched(blocks: usize, block_size: usize, budget: usize, max_seqs: usize) -> Scheduler {
        Scheduler::new(
            SchedulerConfig {
                max_num_batched_tokens: budget,
                max_num_seqs: max_seqs,
                whole_prompts: false,
            },
            KvCacheManager::new(blocks, block_size),
        )
    }

    /// Runs a plan with a fake model: every sampling sequence gets token 7.
    fn fake_step(s: &mut Scheduler) -> StepPlan {
        let plan = s.schedule();
        for &(src, dst) in &plan.copies {
            assert_ne!(src, dst);
        }
        s.advance(&plan);
        for sc in &plan.scheduled {
            if sc.sample {
                s.append_token(sc.seq, 7);
            }
        }
        plan
    }

    #[test]
    fn long_prompt_is_chunked_while_decodes_continue() {
        // Budget 64; alone, a prompt takes all of it.
        let mut s = sched(100, 4, 64, 8);
        s.add(1, vec![1; 3], 0, true);
        let p = fake_step(&mut s);
        assert_eq!(
            p.scheduled,
            vec![Scheduled {
                seq: 1,
                start: 0,
                len: 3,
                sample: true
            }]
        );
        // Next to one decode a step takes max(4 x 1, 64 / 8) = 8 tokens:
        // the decode's one, and 7 of the new prompt's 20, then 7, then 6.
        s.add(2, vec![1; 20], 1, true);
        for (start, len, sample) in [(0, 7, false), (7, 7, false), (14, 6, true)] {
            let p = fake_step(&mut s);
            assert_eq!(p.scheduled.len(), 2);
            assert!(p.scheduled[0].seq == 1 && p.scheduled[0].len == 1 && p.scheduled[0].sample);
            assert_eq!(
                p.scheduled[1],
                Scheduled {
                    seq: 2,
                    start,
                    len,
                    sample
                }
            );
        }
        // Now both decode.
        let p = fake_step(&mut s);
        assert_eq!(p.num_tokens(), 2);
        assert!(p.scheduled.iter().all(|x| x.sample && x.len == 1));
    }

    #[test]
    fn step_budget_shrinks_while_many_sequences_decode() {
        let s = sched(10, 4, 2048, 1024);
        assert_eq!(s.step_budget(0), 2048, "nothing decoding: the whole budget");
        assert_eq!(s.step_budget(1), 256, "an eighth of it at least");
        assert_eq!(s.step_budget(64), 256, "four tokens per decode");
        assert_eq!(s.step_budget(100), 400);
        assert_eq!(s.step_budget(1000), 2048, "never more than the budget");
    }

    #[test]
    fn max_num_seqs_limits_admission() {
        let mut s = sched(100, 4, 100, 2);
        for i in 0..3 {
            s.add(i, vec![1; 2], i, true);
        }
        let p = fake_step(&mut s);
        assert_eq!(p.scheduled.len(), 2);
        assert_eq!(s.num_waiting(), 1);
        s.remove(0);
        let p = fake_step(&mut s);
        assert_eq!(p.scheduled.len(), 2);
        assert_eq!(s.num_waiting(), 0);
    }

    #[test]
    fn head_of_queue_waits_for_blocks() {
        let mut s = sched(3, 4, 100, 8);
        s.add(1, vec![1; 8], 0, true); // 2 blocks
        s.add(2, vec![1; 8], 1, true); // 2 blocks: does not fit
        s.add(3, vec![1; 2], 2, true); // would fit, but must not overtake
        let p = fake_step(&mut s);
        assert_eq!(p.scheduled.len(), 1);
        assert_eq!(s.num_waiting(), 2);
    }

    #[test]
    fn preempts_youngest_and_resumes_by_recompute() {
        // 4 blocks of 2 tokens. Two sequences of 3 tokens each take 2 blocks.
        let mut s = sched(4, 2, 100, 8);
        s.add(1, vec![1; 3], 0, true);
        s.add(2, vec![1; 3], 1, true);
        fake_step(&mut s); // both prefilled and sampled: 4 tokens each
        fake_step(&mut s); // token 4 still fits the second block: 5 tokens each
        assert_eq!(s.kv().num_free_blocks(), 0);
        // Each needs a third block for its 5th token: the younger (2) is preempted.
        let p = fake_step(&mut s);
        assert_eq!(p.preempted, vec![2]);
        let one = Scheduled {
            seq: 1,
            start: 4,
            len: 1,
            sample: true,
        };
        assert_eq!(p.scheduled, vec![one]);
        assert_eq!(s.seq(2).unwrap().num_computed, 0);
        assert_eq!(
            s.seq(2).unwrap().tokens.len(),
            5,
            "generated tokens are kept"
        );
        assert_eq!(s.num_preemptions(), 1);
        // Once seq 1 is gone, seq 2 recomputes all 5 tokens and samples the 6th.
        s.remove(1);
        let p = fake_step(&mut s);
        let two = Scheduled {
            seq: 2,
            start: 0,
            len: 5,
            sample: true,
        };
        assert_eq!(p.scheduled, vec![two]);
        assert_eq!(s.seq(2).unwrap().tokens.len(), 6);
    }

    #[test]
    fn lone_sequence_preempts_itself_rather_than_deadlock() {
        let mut s = sched(2, 2, 100, 8);
        s.add(1, vec![1; 4], 0, true);
        fake_step(&mut s);
        // Its 5th token needs a third block that does not exist: it preempts itself.
        let p = fake_step(&mut s);
        assert_eq!(p.preempted, vec![1]);
        assert!(p.scheduled.is_empty());
        assert_eq!(s.kv().num_free_blocks(), 2);
    }

    #[test]
    fn whole_prompts_are_never_chunked() {
        let mut s = sched(64, 4, 16, 8);
        s.cfg.whole_prompts = true;
        s.add(1, vec![1; 10], 0, false);
        s.add(2, vec![1; 10], 1, false);
        s.add(3, vec![1; 40], 2, false);
        // 10 fit; the next 10 do not fit the 6 left: they wait for the next step.
        let p = s.schedule();
        assert_eq!(p.scheduled.len(), 1);
        assert_eq!((p.scheduled[0].len, p.scheduled[0].sample), (10, true));
        s.advance(&p);
        s.remove(1);
        let p = s.schedule();
        assert_eq!(
            p.scheduled.iter().map(|x| x.seq).collect::<Vec<_>>(),
            vec![2]
        );
        s.advance(&p);
        s.remove(2);
        // Longer than a step's budget: alone, whole.
        let p = s.schedule();
        assert_eq!(
            (
                p.scheduled[0].seq,
                p.scheduled[0].len,
                p.scheduled[0].sample
            ),
            (3, 40, true)
        );
    }

    #[test]
    fn forked_samples_share_blocks_and_copy_on_write() {
        let mut s = sched(10, 4, 100, 8);
        s.add(1, vec![1; 6], 0, true); // blocks: full + partial
        let p = s.schedule();
        s.advance(&p);
        for child in [2, 3, 4] {
            s.fork(1, child);
        }
        assert_eq!(s.kv().num_free_blocks(), 8, "4 samples share 2 blocks");
        for id in 1..=4 {
            s.append_token(id, 10 + id as u32);
        }
        let p = fake_step(&mut s);
        assert_eq!(p.scheduled.len(), 4);
        // Three of the four copy the shared partial block; the last one owns it.
        assert_eq!(p.copies.len(), 3);
        assert_eq!(s.kv().num_free_blocks(), 5);
        let first = s.block_table(1)[0];
        assert!(
            (2..=4).all(|c| s.block_table(c)[0] == first),
            "full prompt block still shared"
        );
        for id in 1..=4 {
            s.remove(id);
        }
        assert_eq!(s.kv().num_free_blocks(), 10);
    }
}
