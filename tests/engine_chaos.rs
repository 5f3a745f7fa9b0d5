//! Chaos test of the engine (no HTTP): thousands of random operations against
//! the real engine on the embedded model (or an MoE / latent-attention
//! fixture), with tiny KV pools that force
//! preemption. Submits with random `n`, prompts, stops, seeds and lengths;
//! aborts at random points (waiting, mid-prompt, between the prompt's last
//! chunk and the first token, while forking, while preempted); clients that
//! vanish during a step. After every operation the request table, the
//! scheduler and the cache must agree (`check_invariants`), every stream
//! must follow the event protocol, and at the end every block is free.
//!
//! Seeded and reproducible: a failure prints its seed. `CANDELA_CHAOS_SEED=N`
//! reruns one seed; `CANDELA_CHAOS_SEEDS=N` runs more of them.

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use candela::engine::{
    EngineConfig, EngineCore, EngineEvent, EngineStats, FinishReason, GenerateRequest, Limits,
};
use candela::kv_cache::{KvCacheSizing, KvDtype};
use candela::models::{load_model, LoadOptions};
use candle_core::DType;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// What the test knows of one submitted request.
struct Live {
    rx: Option<UnboundedReceiver<EngineEvent>>,
    n: usize,
    max_tokens: usize,
    /// Tokens received per sample, and which samples finished.
    tokens: Vec<usize>,
    finished: Vec<bool>,
    done: bool,
    /// Aborted or disconnected by the test: no more events are owed.
    gone: bool,
}

impl Live {
    /// Reads every event that arrived, checking the protocol.
    fn drain(&mut self, id: u64, seed: u64) {
        let Some(rx) = self.rx.as_mut() else { return };
        while let Ok(ev) = rx.try_recv() {
            assert!(
                !self.done,
                "seed {seed}: request {id} got an event after Done"
            );
            match ev {
                EngineEvent::Output(o) => {
                    assert!(
                        o.index < self.n,
                        "seed {seed}: request {id} sample {}",
                        o.index
                    );
                    assert!(
                        !self.finished[o.index],
                        "seed {seed}: request {id} sample {} output after finishing",
                        o.index
                    );
                    self.tokens[o.index] += o.token_ids.len();
                    assert!(
                        self.tokens[o.index] <= self.max_tokens,
                        "seed {seed}: request {id} sample {} exceeded max_tokens",
                        o.index
                    );
                    if let Some(f) = o.finish_reason {
                        assert_ne!(f, FinishReason::Abort);
                        self.finished[o.index] = true;
                    }
                }
                EngineEvent::Done { usage, .. } => {
                    assert!(
                        self.finished.iter().all(|&f| f),
                        "seed {seed}: request {id} done with unfinished samples"
                    );
                    assert_eq!(usage.completion_tokens, self.tokens.iter().sum::<usize>());
                    self.done = true;
                }
                EngineEvent::Error(e) => panic!("seed {seed}: request {id} failed: {e}"),
                EngineEvent::PromptLogprobs(_) => {}
                EngineEvent::Embedding(_) => {
                    panic!("seed {seed}: embedding event from a generative request")
                }
            }
        }
    }
}

/// Prompts often share a prefix with earlier ones (one of a few "system
/// prompts" cut anywhere), so that the prefix cache is hit, shared, evicted.
fn random_request(
    rng: &mut StdRng,
    vocab: u32,
    room: usize,
    bases: &[Vec<u32>],
    encoder_decoder: bool,
) -> GenerateRequest {
    let prompt_len = rng.random_range(1..=room.saturating_sub(1).clamp(1, 80));
    let max_tokens = rng.random_range(1..=(room - prompt_len).clamp(1, 24));
    let base = &bases[rng.random_range(0..bases.len())];
    let shared = if rng.random_bool(0.6) {
        rng.random_range(0..=prompt_len.min(base.len()))
    } else {
        0
    };
    let prompt: Vec<u32> = (0..prompt_len)
        .map(|i| match i {
            0 => 1,
            i if i < shared => base[i],
            _ => rng.random_range(3..vocab),
        })
        .collect();
    let mut r = GenerateRequest::new(prompt, max_tokens);
    r.n = *[1, 1, 2, 3, 4].get(rng.random_range(0..5)).unwrap();
    r.sampling.temperature = if rng.random_bool(0.5) { 0.0 } else { 0.9 };
    r.sampling.seed = rng.random_bool(0.7).then(|| rng.random());
    r.stop.ignore_eos = rng.random_bool(0.5);
    if rng.random_bool(0.3) {
        r.stop.stop = vec![[" the", "a", "ly", ".", " was"][rng.random_range(0..5)].to_string()];
    }
    if rng.random_bool(0.2) {
        r.stop.stop_token_ids = vec![rng.random_range(3..vocab), rng.random_range(3..vocab)];
    }
    if rng.random_bool(0.2) {
        r.stop.min_tokens = rng.random_range(0..=max_tokens);
    }
    if rng.random_bool(0.2) {
        r.logprobs = Some(rng.random_range(0..3));
    }
    // An encoder's input has no logprobs (validation refuses them).
    if rng.random_bool(0.1) && !encoder_decoder {
        r.prompt_logprobs = Some(1);
    }
    r
}

/// Returns the prompt tokens served from the prefix cache.
fn run_seed(seed: u64, ops: usize) -> u64 {
    let mut rng = StdRng::seed_from_u64(seed);
    // The embedded model most of the time; else a Mixture-of-Experts
    // fixture, DeepSeek-V2's latent attention, whose cache stores keys only,
    // Mamba-2, whose cache is one state slot per sequence, or T5, whose
    // sequences' first blocks hold the encoder's cross-attention keys and
    // values (block copies and preemption must hold for them too).
    let model = [
        None,
        None,
        None,
        Some("qwen2_moe_shared"),
        Some("deepseek_v2_lite"),
        Some("mamba2_groups"),
        Some("t5_gated_untied"),
    ][rng.random_range(0..7)]
    .map(|name| common::fixture_dir(name).to_str().unwrap().to_string());
    let loaded = load_model(&LoadOptions {
        model,
        dtype: DType::F32,
        quantization: Default::default(),
        ..Default::default()
    })
    .unwrap();
    let vocab = loaded.model.spec().vocab_size as u32;
    let enc_dec = loaded.model.spec().kind.is_encoder_decoder();
    let block_size = [1, 4, 16][rng.random_range(0..3)];
    let num_blocks = rng.random_range(4..=40) * 16 / block_size;
    let capacity = num_blocks * block_size;
    let cfg = EngineConfig {
        max_model_len: 512,
        max_num_seqs: [1, 2, 8, 256][rng.random_range(0..4)],
        max_num_batched_tokens: [4, 16, 64, 512][rng.random_range(0..4)],
        max_waiting_requests: 1024,
        enable_prefix_caching: rng.random_bool(0.7),
    };
    // Every cache format: the 8-bit ones carry scales that block copies
    // (copy on write for n > 1) must move with their rows.
    let cache_dtype =
        [KvDtype::F32, KvDtype::F16, KvDtype::Q8_0, KvDtype::Fp8E4M3][rng.random_range(0..4)];
    let bpt = loaded.model.spec().cache.bytes_per_token(cache_dtype);
    let cache = &loaded.model.spec().cache;
    let (sizing, capacity) = if cache.is_recurrent() {
        // 2-12 state slots, each as long as the longest sequence.
        let slots = rng.random_range(2..=12);
        let s = KvCacheSizing::for_states(
            cfg.max_model_len,
            cache.state_bytes_per_seq(),
            Some(slots),
            None,
            0,
        )
        .unwrap()
        .with_dtype(KvDtype::F32);
        (s, slots * cfg.max_model_len)
    } else {
        let s = KvCacheSizing::new(block_size, bpt, Some(num_blocks), None, 0)
            .unwrap()
            .with_dtype(cache_dtype);
        (s, capacity)
    };
    let stats = Arc::new(EngineStats::default());
    let mut core =
        EngineCore::new(loaded.model, loaded.tokenizer, sizing, cfg, stats.clone()).unwrap();
    let room = capacity.min(cfg.max_model_len);
    let limits = Limits {
        vocab_size: vocab as usize,
        max_model_len: cfg.max_model_len,
        cache_tokens: capacity,
    };
    let bases: Vec<Vec<u32>> = (0..3)
        .map(|_| (0..80).map(|_| rng.random_range(3..vocab)).collect())
        .collect();
    let mut live: HashMap<u64, Live> = HashMap::new();
    let mut next_id = 0u64;
    let check = |core: &EngineCore, what: &str| {
        if let Err(e) = core.check_invariants() {
            panic!("seed {seed}: invariant broken after {what}: {e}");
        }
    };

    for op in 0..ops {
        let ids: Vec<u64> = live
            .iter()
            .filter(|(_, l)| !l.gone && !l.done)
            .map(|(&id, _)| id)
            .collect();
        let pick = |rng: &mut StdRng| ids[rng.random_range(0..ids.len())];
        match rng.random_range(0..100) {
            0..=19 => {
                let req = random_request(&mut rng, vocab, room, &bases, enc_dec);
                let (tx, rx) = unbounded_channel();
                let n = req.n;
                let max_tokens = req.stop.max_tokens;
                let slot = stats.try_enqueue(cfg.max_waiting_requests).unwrap();
                let req = req
                    .validate(&limits)
                    .expect("random requests fit the limits");
                core.add_request(next_id, req, tx, slot);
                live.insert(
                    next_id,
                    Live {
                        rx: Some(rx),
                        n,
                        max_tokens,
                        tokens: vec![0; n],
                        finished: vec![false; n],
                        done: false,
                        gone: false,
                    },
                );
                next_id += 1;
                check(&core, "submit");
            }
            20..=26 if !ids.is_empty() => {
                let id = pick(&mut rng);
                core.abort(id);
                live.get_mut(&id).unwrap().gone = true;
                check(&core, "abort");
            }
            34 => {
                core.reset_prefix_cache();
                check(&core, "resetting the prefix cache");
            }
            27..=33 if !ids.is_empty() => {
                // The client vanishes; the engine notices during its next step
                // (a send fails, possibly while it forks the samples) or
                // before it.
                let id = pick(&mut rng);
                let l = live.get_mut(&id).unwrap();
                l.rx = None;
                l.gone = true;
            }
            _ => {
                if rng.random_bool(0.5) {
                    core.drop_disconnected();
                    check(&core, "dropping disconnected requests");
                }
                core.step()
                    .unwrap_or_else(|e| panic!("seed {seed}: step {op} failed: {e:#}"));
                check(&core, "a step");
            }
        }
        for (&id, l) in live.iter_mut() {
            l.drain(id, seed);
        }
        live.retain(|_, l| !(l.done || l.gone && l.rx.is_none()));
        // The engine holds a queue place exactly for each request it has not
        // scheduled yet.
        let queued = stats.snapshot().queued_requests;
        assert!(
            queued <= core.num_requests(),
            "seed {seed}: {queued} queued but {} requests",
            core.num_requests()
        );
    }

    // Everything still running must finish on its own.
    let mut steps = 0;
    while core.has_work() {
        core.drop_disconnected();
        core.step()
            .unwrap_or_else(|e| panic!("seed {seed}: final step failed: {e:#}"));
        check(&core, "a final step");
        for (&id, l) in live.iter_mut() {
            l.drain(id, seed);
        }
        steps += 1;
        assert!(
            steps < 100_000,
            "seed {seed}: the engine does not finish its work"
        );
    }
    for (id, l) in &live {
        assert!(
            l.done || l.gone,
            "seed {seed}: request {id} was never finished"
        );
    }
    assert!(
        core.is_drained(),
        "seed {seed}: blocks or sequences left behind"
    );
    assert_eq!(stats.snapshot().queued_requests, 0, "seed {seed}");
    core.scheduler().kv().prefix_cache_counts().1
}

#[test]
fn random_operations_keep_the_engine_consistent() {
    let env = |k: &str| std::env::var(k).ok().and_then(|v| v.parse::<u64>().ok());
    let seeds: Vec<u64> = match env("CANDELA_CHAOS_SEED") {
        Some(s) => vec![s],
        None => (0..env("CANDELA_CHAOS_SEEDS").unwrap_or(24)).collect(),
    };
    let ops = env("CANDELA_CHAOS_OPS").unwrap_or(600) as usize;
    let mut cache_hits = 0;
    for seed in seeds {
        let result = std::panic::catch_unwind(|| run_seed(seed, ops));
        if let Ok(hits) = result {
            cache_hits += hits;
        }
        if let Err(e) = result {
            eprintln!(
                "engine chaos failed at seed {seed}; rerun it with \
                 CANDELA_CHAOS_SEED={seed} cargo test --release --test engine_chaos"
            );
            std::panic::resume_unwind(e);
        }
    }
    eprintln!("prompt tokens served from the prefix cache: {cache_hits}");
    assert!(
        cache_hits > 0,
        "the random prompts were meant to share prefixes"
    );
}
