//! From logits to the next token: penalties, logit bias, temperature, top-k,
//! top-p, min-p, a per-sequence seeded RNG, and logprobs.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use llguidance::toktrie::SimpleVob;

use super::request::{SamplingParams, TokenLogprob};

/// Per-sequence sampling state: the parameters, the RNG, and token counts for
/// the penalties.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// Occurrences of each token in the output (presence/frequency penalties).
    output_counts: Vec<(u32, u32)>,
    /// Tokens of the prompt and output (repetition penalty).
    seen: Vec<u32>,
}

impl Sampler {
    /// `index` distinguishes the `n` samples of one seeded request, so they
    /// differ from each other but are each reproducible.
    pub fn new(params: SamplingParams, prompt: &[u32], index: usize) -> Self {
        let rng = match params.seed {
            Some(seed) => StdRng::seed_from_u64(seed.wrapping_add(index as u64)),
            None => StdRng::from_os_rng(),
        };
        let mut seen = if params.repetition_penalty != 1.0 {
            prompt.to_vec()
        } else {
            Vec::new()
        };
        seen.sort_unstable();
        seen.dedup();
        Self {
            params,
            rng,
            output_counts: Vec::new(),
            seen,
        }
    }

    /// Records a token that became part of the output.
    pub fn observe(&mut self, token: u32) {
        match self.output_counts.iter_mut().find(|(t, _)| *t == token) {
            Some((_, c)) => *c += 1,
            None => self.output_counts.push((token, 1)),
        }
        if self.params.repetition_penalty != 1.0 {
            if let Err(i) = self.seen.binary_search(&token) {
                self.seen.insert(i, token);
            }
        }
    }

    /// Applies penalties and bias in place; `banned` tokens, and those
    /// `allowed` does not allow, get -inf.
    fn process(&self, logits: &mut [f32], banned: &[u32], allowed: Option<&SimpleVob>) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            for &t in &self.seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for &(t, c) in &self.output_counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.frequency_penalty * c as f32 + p.presence_penalty;
                }
            }
        }
        for &(t, b) in &p.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += b;
            }
        }
        for &t in banned {
            if let Some(l) = logits.get_mut(t as usize) {
                *l = f32::NEG_INFINITY;
            }
        }
        if let Some(mask) = allowed {
            let n = logits.len();
            mask.iter_unset_entries(|i| {
                if i < n {
                    logits[i] = f32::NEG_INFINITY;
                }
            });
            // Past the mask's end (a vocabulary larger than the grammar's).
            logits[mask.len().min(n)..].fill(f32::NEG_INFINITY);
        }
    }

    /// Picks the next token from `logits` (the model's raw output for this
    /// position). Returns the token and, when `logprobs` is set, its log
    /// probability under the raw distribution with that many alternatives
    /// (vLLM's default: logprobs before any sampling adjustment).
    /// `allowed`, when given, is the set of tokens a grammar allows next.
    pub fn sample(
        &mut self,
        logits: &[f32],
        banned: &[u32],
        allowed: Option<&SimpleVob>,
        logprobs: Option<usize>,
    ) -> (u32, Option<TokenLogprob>) {
        let p = &self.params;
        let adjusts = p.repetition_penalty != 1.0
            || p.presence_penalty != 0.0
            || p.frequency_penalty != 0.0
            || !p.logit_bias.is_empty()
            || !banned.is_empty()
            || allowed.is_some();
        let token = if p.is_greedy() && !adjusts {
            // The common greedy case reads the logits in place.
            argmax(logits)
        } else {
            let mut work = logits.to_vec();
            self.process(&mut work, banned, allowed);
            if self.params.is_greedy() {
                argmax(&work)
            } else {
                self.sample_random(&mut work)
            }
        };
        let lp = logprobs.map(|k| token_logprob(logits, token, k));
        (token, lp)
    }

    fn sample_random(&mut self, logits: &mut [f32]) -> u32 {
        let p = &self.params;
        let inv_t = 1.0 / p.temperature;
        // Candidates sorted by logit, most likely first; truncated by top-k.
        let mut idx: Vec<u32> = (0..logits.len() as u32)
            .filter(|&i| logits[i as usize].is_finite())
            .collect();
        if idx.is_empty() {
            return argmax(logits);
        }
        let k = if p.top_k > 0 {
            p.top_k.min(idx.len())
        } else {
            idx.len()
        };
        if k == idx.len() && p.top_p >= 1.0 && p.min_p <= 0.0 {
            return self.sample_full(logits, &idx, inv_t);
        }
        let cmp = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]);
        if k < idx.len() {
            idx.select_nth_unstable_by(k - 1, cmp);
            idx.truncate(k);
        }
        idx.sort_unstable_by(cmp);
        let max = logits[idx[0] as usize] * inv_t;
        let mut probs: Vec<f32> = idx
            .iter()
            .map(|&i| (logits[i as usize] * inv_t - max).exp())
            .collect();
        let total: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|x| *x /= total);
        // min-p: relative to the most likely token.
        let mut keep = probs.len();
        if p.min_p > 0.0 {
            let floor = probs[0] * p.min_p;
            keep = probs.iter().take_while(|&&x| x >= floor).count().max(1);
        }
        // top-p: the smallest prefix reaching the mass.
        if p.top_p < 1.0 {
            let mut acc = 0.0;
            let mut n = 0;
            for &x in &probs[..keep] {
                acc += x;
                n += 1;
                if acc >= p.top_p {
                    break;
                }
            }
            keep = n.max(1);
        }
        let mass: f32 = probs[..keep].iter().sum();
        let mut r = self.rng.random::<f32>() * mass;
        for (i, &x) in probs[..keep].iter().enumerate() {
            if r < x {
                return idx[i];
            }
            r -= x;
        }
        idx[keep - 1]
    }
}

impl Sampler {
    /// Plain multinomial sampling over every candidate: linear, no sorting.
    fn sample_full(&mut self, logits: &[f32], idx: &[u32], inv_t: f32) -> u32 {
        let max = idx
            .iter()
            .map(|&i| logits[i as usize])
            .fold(f32::NEG_INFINITY, f32::max)
            * inv_t;
        let total: f32 = idx
            .iter()
            .map(|&i| (logits[i as usize] * inv_t - max).exp())
            .sum();
        let mut r = self.rng.random::<f32>() * total;
        for &i in idx {
            let x = (logits[i as usize] * inv_t - max).exp();
            if r < x {
                return i;
            }
            r -= x;
        }
        *idx.last().expect("non-empty")
    }
}

/// Index of the largest value (the first on ties).
/// The first position of the largest value (NaNs ignored; 0 if there is none).
///
/// Two passes that vectorize (lane-wise maxima, then a search for the first
/// match) instead of one loop in which each step waits for the previous: the
/// greedy path runs this over the whole vocabulary for every sequence, every step.
pub fn argmax(v: &[f32]) -> u32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = v.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for (l, x) in lanes.iter_mut().zip(c) {
            *l = l.max(*x);
        }
    }
    let max = lanes
        .iter()
        .chain(tail)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    v.iter().position(|&x| x == max).unwrap_or(0) as u32
}

/// `token`'s log-softmax value in `logits`, with the `k` most likely tokens.
pub fn token_logprob(logits: &[f32], token: u32, k: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|x| (x - max).exp()).sum::<f32>().ln();
    let mut top: Vec<(u32, f32)> = Vec::new();
    if k > 0 {
        let mut idx: Vec<u32> = (0..logits.len() as u32).collect();
        let cmp = |a: &u32, b: &u32| {
            logits[*b as usize]
                .total_cmp(&logits[*a as usize])
                .then(a.cmp(b))
        };
        let k = k.min(idx.len());
        idx.select_nth_unstable_by(k - 1, cmp);
        idx.truncate(k);
        idx.sort_unstable_by(cmp);
        top = idx
            .into_iter()
            .map(|i| (i, logits[i as usize] - lse))
            .collect();
    }
    TokenLogprob {
        token_id: token,
        logprob: logits[token as usize] - lse,
        top,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams::default();
        f(&mut p);
        p
    }

    #[test]
    fn argmax_takes_the_first_largest_and_skips_nans() {
        let mut v: Vec<f32> = (0..100).map(|i| ((i * 37) % 101) as f32).collect();
        let want = v
            .iter()
            .enumerate()
            .fold(0, |b, (i, x)| if *x > v[b] { i } else { b });
        assert_eq!(argmax(&v) as usize, want);
        v[99] = 1000.0; // in the tail after whole chunks of 16
        v[3] = 1000.0;
        assert_eq!(argmax(&v), 3);
        v[0] = f32::NAN;
        assert_eq!(argmax(&v), 3);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 40]), 0);
        assert_eq!(argmax(&[]), 0);
    }

    #[test]
    fn greedy_takes_argmax_and_bias_changes_it() {
        let logits = [0.0, 3.0, 1.0];
        let mut s = Sampler::new(SamplingParams::greedy(), &[], 0);
        assert_eq!(s.sample(&logits, &[], None, None).0, 1);
        assert_eq!(
            s.sample(&logits, &[1], None, None).0,
            2,
            "banned token skipped"
        );
        let mut s = Sampler::new(
            params(|p| {
                p.temperature = 0.0;
                p.logit_bias = vec![(0, 10.0)];
            }),
            &[],
            0,
        );
        assert_eq!(s.sample(&logits, &[], None, None).0, 0);
    }

    #[test]
    fn a_grammar_mask_allows_only_its_tokens() {
        let logits = [5.0, 3.0, 1.0, 0.5];
        let mut mask = SimpleVob::alloc(4);
        mask.allow_token(2);
        mask.allow_token(3);
        let mut s = Sampler::new(SamplingParams::greedy(), &[], 0);
        assert_eq!(s.sample(&logits, &[], Some(&mask), None).0, 2);
        let mut s = Sampler::new(params(|p| p.seed = Some(1)), &[], 0);
        for _ in 0..50 {
            assert!(s.sample(&logits, &[], Some(&mask), None).0 >= 2);
        }
        // Logprobs stay those of the model's own distribution.
        let (_, lp) = s.sample(&logits, &[], Some(&mask), Some(0));
        assert!(lp.unwrap().logprob < -2.0);
    }

    #[test]
    fn penalties_follow_openai_and_hf() {
        let mut s = Sampler::new(
            params(|p| {
                p.temperature = 0.0;
                p.frequency_penalty = 1.0;
                p.presence_penalty = 0.5;
            }),
            &[],
            0,
        );
        s.observe(1);
        s.observe(1);
        let mut l = vec![0.0, 3.0, 1.0];
        s.process(&mut l, &[], None);
        assert_eq!(l, vec![0.0, 3.0 - 2.0 - 0.5, 1.0]);
        let s = Sampler::new(params(|p| p.repetition_penalty = 2.0), &[0, 1], 0);
        let mut l = vec![-1.0, 3.0, 1.0];
        s.process(&mut l, &[], None);
        assert_eq!(l, vec![-2.0, 1.5, 1.0]);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_respects_top_k() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let p = params(|p| {
            p.seed = Some(42);
            p.top_k = 3;
            p.temperature = 0.8;
        });
        let run = |index| {
            let mut s = Sampler::new(p.clone(), &[], index);
            (0..64)
                .map(|_| s.sample(&logits, &[], None, None).0)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(0), run(0));
        assert_ne!(run(0), run(1), "samples of one request differ");
        // top-k 3 of values with 6 * 0.3 maximal: tokens 6, 13, 20, ... tie; only 3 allowed.
        let distinct: std::collections::BTreeSet<u32> = run(0).into_iter().collect();
        assert!(distinct.len() <= 3, "{distinct:?}");
    }

    #[test]
    fn top_p_and_min_p_truncate() {
        let logits = [5.0, 4.9, 0.0, -1.0];
        let mut s = Sampler::new(
            params(|p| {
                p.seed = Some(1);
                p.top_p = 0.5;
            }),
            &[],
            0,
        );
        assert!((0..100).all(|_| s.sample(&logits, &[], None, None).0 == 0));
        let mut s = Sampler::new(
            params(|p| {
                p.seed = Some(1);
                p.min_p = 0.5;
            }),
            &[],
            0,
        );
        assert!((0..100).all(|_| s.sample(&logits, &[], None, None).0 < 2));
    }

    #[test]
    fn logprobs_are_log_softmax_with_sorted_alternatives() {
        let logits = [1.0f32, 2.0, 3.0];
        let lp = token_logprob(&logits, 0, 2);
        let z = (1f32.exp() + 2f32.exp() + 3f32.exp()).ln();
        assert!((lp.logprob - (1.0 - z)).abs() < 1e-6);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![2, 1]);
    }
}
