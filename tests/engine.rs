//! The engine end to end (no HTTP): continuous batching, preemption, aborts,
//! sampling and stop handling, on fixture and real models.

mod common;

use std::time::{Duration, Instant};

use candela::engine::{
    EngineConfig, EngineCore, EngineError, EngineEvent, EngineHandle, EngineStats, FinishReason,
    GenerateRequest, RequestStream, Usage,
};
use candela::kv_cache::KvCacheSizing;
use candela::models::LoadedModel;
use candle_core::DType;
use common::*;
use rand::{Rng, SeedableRng};

fn cfg(max_model_len: usize) -> EngineConfig {
    EngineConfig {
        max_model_len,
        max_num_seqs: 256,
        max_num_batched_tokens: 512,
        max_waiting_requests: 1024,
        enable_prefix_caching: true,
    }
}

fn sizing(m: &LoadedModel, block_size: usize, num_blocks: usize) -> KvCacheSizing {
    let bpt = m.model.spec().cache.bytes_per_token(m.model.spec().dtype);
    KvCacheSizing::new(block_size, bpt, Some(num_blocks), None, 0).unwrap()
}

fn engine(path: &str, block_size: usize, num_blocks: usize, c: EngineConfig) -> EngineHandle {
    let m = load(&repo_path(path), DType::F32);
    let s = sizing(&m, block_size, num_blocks);
    EngineHandle::spawn(m, s, c).unwrap()
}

/// Everything a finished request produced, per sample index.
#[derive(Debug, Default, Clone)]
struct Collected {
    tokens: Vec<Vec<u32>>,
    text: Vec<String>,
    finish: Vec<Option<FinishReason>>,
    usage: Option<Usage>,
    logprob_counts: Vec<usize>,
}

fn collect(mut s: RequestStream) -> Collected {
    let mut c = Collected::default();
    while let Some(ev) = s.blocking_next() {
        match ev {
            EngineEvent::Output(o) => {
                if c.tokens.len() <= o.index {
                    c.tokens.resize(o.index + 1, Vec::new());
                    c.text.resize(o.index + 1, String::new());
                    c.finish.resize(o.index + 1, None);
                    c.logprob_counts.resize(o.index + 1, 0);
                }
                assert!(c.finish[o.index].is_none(), "output after finish");
                c.tokens[o.index].extend(&o.token_ids);
                c.text[o.index].push_str(&o.text);
                c.logprob_counts[o.index] += o.logprobs.len();
                c.finish[o.index] = o.finish_reason;
            }
            EngineEvent::Done { usage, .. } => c.usage = Some(usage),
            EngineEvent::Error(e) => panic!("engine error: {e}"),
            EngineEvent::PromptLogprobs(_) => {}
            EngineEvent::Embedding(_) => panic!("embedding event from a generative request"),
        }
    }
    c
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn random_prompts(n: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let len = rng.random_range(1..60);
            std::iter::once(1)
                .chain((1..len).map(|_| rng.random_range(3..512)))
                .collect()
        })
        .collect()
}

/// Validated against generous limits, for driving an `EngineCore` directly.
fn valid(req: GenerateRequest) -> candela::engine::ValidRequest {
    req.validate(&candela::engine::Limits {
        vocab_size: 512,
        max_model_len: 256,
        cache_tokens: 1024,
    })
    .unwrap()
}

fn greedy_req(prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    let mut r = GenerateRequest::greedy(prompt, max_tokens);
    r.stop.ignore_eos = true;
    r
}

/// Reference outputs: each prompt alone through the plain step runner.
fn alone(path: &str, prompts: &[Vec<u32>], max_tokens: usize) -> Vec<Vec<u32>> {
    let m = load(&repo_path(path), DType::F32);
    let mut r = runner(&m, 16, 64);
    prompts
        .iter()
        .map(|p| {
            r.greedy(m.model.as_ref(), 0, p, max_tokens, |_| true)
                .unwrap()
        })
        .collect()
}

const MODEL: &str = "tests/fixtures/llama_gqa";

#[test]
fn sixty_four_concurrent_requests_match_each_alone() {
    let prompts = random_prompts(64, 1);
    let want = alone(MODEL, &prompts, 24);
    let e = engine(MODEL, 16, 1024, cfg(256));
    let streams: Vec<_> = prompts
        .iter()
        .map(|p| e.submit(greedy_req(p.clone(), 24)).unwrap())
        .collect();
    for (i, s) in streams.into_iter().enumerate() {
        let c = collect(s);
        assert_eq!(c.tokens[0], want[i], "request {i}");
        assert_eq!(c.finish[0], Some(FinishReason::Length));
        assert_eq!(c.usage.unwrap().completion_tokens, 24);
        assert_eq!(c.usage.unwrap().prompt_tokens, prompts[i].len());
    }
    let st = e.stats();
    assert!(
        st.steps < 64 * 25,
        "requests were batched ({} steps)",
        st.steps
    );
    wait_until("gauges to settle", || e.stats().kv_cache_usage == 0.0);
}

#[test]
fn a_quarter_sized_pool_preempts_but_changes_nothing() {
    let prompts = random_prompts(64, 2);
    let want = alone(MODEL, &prompts, 24);
    // Each request needs up to ~83 tokens; all of them together ~3700. Give ~1/4.
    let needed: usize = prompts.iter().map(|p| (p.len() + 24).div_ceil(16)).sum();
    let e = engine(MODEL, 16, needed / 4, cfg(256));
    let streams: Vec<_> = prompts
        .iter()
        .map(|p| e.submit(greedy_req(p.clone(), 24)).unwrap())
        .collect();
    for (i, s) in streams.into_iter().enumerate() {
        assert_eq!(collect(s).tokens[0], want[i], "request {i}");
    }
    let st = e.stats();
    assert!(
        st.num_preemptions > 0,
        "expected preemptions with a quarter-sized pool"
    );
    wait_until("the pool to empty", || e.stats().kv_cache_usage == 0.0);
}

#[test]
fn aborting_half_at_random_moments_frees_every_block() {
    let prompts = random_prompts(64, 3);
    let e = engine(MODEL, 16, 256, cfg(256));
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    let mut streams: Vec<Option<RequestStream>> = prompts
        .iter()
        .map(|p| Some(e.submit(greedy_req(p.clone(), 64)).unwrap()))
        .collect();
    // Drop half of them after random numbers of events (some before any).
    let mut kept = Vec::new();
    for (i, slot) in streams.iter_mut().enumerate() {
        let mut s = slot.take().unwrap();
        if i % 2 == 0 {
            for _ in 0..rng.random_range(0..20) {
                if s.blocking_next().is_none() {
                    break;
                }
            }
            drop(s);
        } else {
            kept.push(s);
        }
    }
    for s in kept {
        let c = collect(s);
        assert_eq!(c.tokens[0].len(), 64);
    }
    wait_until("the pool to be completely free", || {
        let st = e.stats();
        st.kv_cache_usage == 0.0 && st.num_running == 0 && st.num_waiting == 0
    });
    assert!(e.stats().aborted_requests >= 1);
}

#[test]
fn seeded_sampling_is_the_same_alone_and_in_a_busy_batch() {
    let e = engine(MODEL, 16, 512, cfg(256));
    let mut req = GenerateRequest::new(vec![1, 40, 50, 60], 32);
    req.sampling.temperature = 0.9;
    req.sampling.top_p = 0.95;
    req.sampling.top_k = 50;
    req.sampling.seed = Some(1234);
    req.stop.ignore_eos = true;
    let solo = collect(e.submit(req.clone()).unwrap()).tokens[0].clone();
    let noise: Vec<_> = random_prompts(20, 4)
        .into_iter()
        .map(|p| {
            let mut r = GenerateRequest::new(p, 40);
            r.stop.ignore_eos = true;
            e.submit(r).unwrap()
        })
        .collect();
    let busy = collect(e.submit(req.clone()).unwrap()).tokens[0].clone();
    drop(noise);
    assert_eq!(solo, busy);
    let mut other = req.clone();
    other.sampling.seed = Some(99);
    assert_ne!(
        collect(e.submit(other).unwrap()).tokens[0],
        solo,
        "another seed, other tokens"
    );
}

#[test]
fn n_samples_share_the_prompt_blocks() {
    let m = load(&repo_path(MODEL), DType::F32);
    let s = sizing(&m, 16, 64);
    let tok = m.tokenizer.clone();
    let stats = std::sync::Arc::new(EngineStats::default());
    let mut core = EngineCore::new(m.model, tok, s, cfg(256), stats.clone()).unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut req = GenerateRequest::new(
        random_prompts(1, 5)[0]
            .iter()
            .copied()
            .cycle()
            .take(40)
            .collect(),
        8,
    );
    req.n = 4;
    req.sampling.seed = Some(3);
    req.stop.ignore_eos = true;
    core.add_request(0, valid(req), tx, stats.try_enqueue(1).unwrap());
    assert!(core.step().unwrap());
    // 40 prompt tokens = 2 full blocks + 1 partial, shared by the 4 samples.
    assert_eq!(core.scheduler().kv().pool().num_used(), 3);
    assert_eq!(core.scheduler().num_running(), 4);
    let first = core.scheduler().block_table(0).to_vec();
    for child in 1..4 {
        assert_eq!(core.scheduler().block_table(child)[..2], first[..2]);
    }
    // Writing token 41: three samples copy the partial block, one keeps it.
    assert!(core.step().unwrap());
    assert_eq!(core.scheduler().kv().pool().num_used(), 6);
    while core.step().unwrap() {}
    assert_eq!(core.scheduler().kv().pool().num_used(), 0);
    let mut outs: Vec<Vec<u32>> = vec![Vec::new(); 4];
    let mut usage = None;
    while let Ok(ev) = rx.try_recv() {
        match ev {
            EngineEvent::Output(o) => outs[o.index].extend(o.token_ids),
            EngineEvent::Done { usage: u, .. } => usage = Some(u),
            _ => {}
        }
    }
    assert!(outs.iter().all(|o| o.len() == 8));
    assert!(
        outs.iter().collect::<std::collections::HashSet<_>>().len() > 1,
        "samples differ"
    );
    assert_eq!(usage.unwrap().completion_tokens, 32);
}

#[test]
fn long_prompt_is_chunked_while_others_keep_decoding() {
    let m = load(&repo_path(MODEL), DType::F32);
    let s = sizing(&m, 16, 64);
    let tok = m.tokenizer.clone();
    let mut c = cfg(256);
    // With one sequence decoding, a step takes max(4, 128 / 8) = 16 tokens.
    c.max_num_batched_tokens = 128;
    let stats = std::sync::Arc::new(EngineStats::default());
    let mut core = EngineCore::new(m.model, tok, s, c, stats.clone()).unwrap();
    let (ta, mut ra) = tokio::sync::mpsc::unbounded_channel();
    let (tb, mut rb) = tokio::sync::mpsc::unbounded_channel();
    let slot = || stats.try_enqueue(8).unwrap();
    core.add_request(0, valid(greedy_req(vec![1, 5, 6], 20)), ta, slot());
    core.step().unwrap();
    assert!(matches!(ra.try_recv(), Ok(EngineEvent::Output(_))));
    core.add_request(
        1,
        valid(greedy_req(
            random_prompts(1, 6)[0]
                .iter()
                .copied()
                .cycle()
                .take(70)
                .collect(),
            4,
        )),
        tb,
        slot(),
    );
    // A decodes 1 token per step, B prefills 15 per step: 70 tokens take 5 steps.
    for step in 0..5 {
        core.step().unwrap();
        assert!(
            matches!(ra.try_recv(), Ok(EngineEvent::Output(_))),
            "A decodes in step {step}"
        );
        let b_out = rb.try_recv().is_ok();
        assert_eq!(
            b_out,
            step == 4,
            "B samples only after its last chunk (step {step})"
        );
    }
}

fn stories() -> EngineHandle {
    engine("models/stories260K", 16, 256, cfg(512))
}

fn stories_prompt(e: &EngineHandle) -> Vec<u32> {
    e.tokenizer().encode("Once upon a time", true).unwrap()
}

#[test]
fn stop_strings_spanning_tokens_are_cut_and_not_emitted() {
    let e = stories();
    let full = collect(
        e.submit(GenerateRequest::greedy(stories_prompt(&e), 30))
            .unwrap(),
    );
    assert!(
        full.text[0].starts_with(", there was a little girl named Lily."),
        "{:?}",
        full.text[0]
    );
    // "girl named" spans two tokens; "e was a li" starts and ends inside tokens.
    for (stop, want) in [
        ("girl named", ", there was a little "),
        ("e was a li", ", ther"),
    ] {
        let mut req = GenerateRequest::greedy(stories_prompt(&e), 30);
        req.stop.stop = vec!["nomatch".into(), stop.into()];
        let c = collect(e.submit(req).unwrap());
        assert_eq!(c.text[0], want);
        assert_eq!(c.finish[0], Some(FinishReason::Stop));
        assert!(c.tokens[0].len() < 30);
    }
}

#[test]
fn eos_min_tokens_stop_ids_and_max_tokens() {
    let e = stories();
    let prompt = stories_prompt(&e);
    let c = collect(
        e.submit(GenerateRequest::greedy(prompt.clone(), 40))
            .unwrap(),
    );
    assert_eq!(
        c.text[0],
        e.tokenizer()
            .decode(&[&prompt[..], &c.tokens[0]].concat(), true)
            .unwrap()[16..]
    );
    // stories260K never picks EOS on its own: a logit bias forces it. min_tokens
    // bans it for the first 3 tokens, so the 4th is EOS: counted, not shown.
    let mut r = GenerateRequest::greedy(prompt.clone(), 40);
    r.sampling.logit_bias = vec![(2, 100.0)];
    r.stop.min_tokens = 3;
    let c2 = collect(e.submit(r).unwrap());
    assert_eq!(c2.tokens[0].len(), 4);
    assert_eq!(c2.tokens[0][3], 2);
    assert!(!c2.tokens[0][..3].contains(&2));
    assert_eq!(c2.finish[0], Some(FinishReason::Stop));
    assert_eq!(c2.usage.unwrap().completion_tokens, 4);
    assert!(!c2.text[0].contains("</s>"));
    // ignore_eos keeps going to max_tokens.
    let mut r = GenerateRequest::greedy(prompt.clone(), 10);
    r.sampling.logit_bias = vec![(2, 100.0)];
    r.stop.ignore_eos = true;
    let c3 = collect(e.submit(r).unwrap());
    assert_eq!(c3.tokens[0], vec![2; 10]);
    assert_eq!(c3.finish[0], Some(FinishReason::Length));
    // A stop token id ends generation at that token.
    let third = c.tokens[0][2];
    let mut r = GenerateRequest::greedy(prompt.clone(), 300);
    r.stop.stop_token_ids = vec![third];
    let c4 = collect(e.submit(r).unwrap());
    assert_eq!(c4.tokens[0], c.tokens[0][..3]);
    assert_eq!(c4.finish[0], Some(FinishReason::Stop));
    // max_tokens.
    let c5 = collect(e.submit(GenerateRequest::greedy(prompt, 5)).unwrap());
    assert_eq!(c5.tokens[0].len(), 5);
    assert_eq!(c5.finish[0], Some(FinishReason::Length));
}

#[test]
fn logprobs_come_with_each_token() {
    let e = stories();
    let mut r = GenerateRequest::greedy(stories_prompt(&e), 6);
    r.logprobs = Some(5);
    r.prompt_logprobs = Some(2);
    let mut s = e.submit(r).unwrap();
    let mut prompt_lps = None;
    let mut count = 0;
    while let Some(ev) = s.blocking_next() {
        match ev {
            EngineEvent::PromptLogprobs(p) => prompt_lps = Some(p),
            EngineEvent::Output(o) => {
                let lp = &o.logprobs[0];
                assert_eq!(lp.token_id, o.token_ids[0]);
                assert_eq!(lp.top.len(), 5);
                // Greedy: the chosen token is the most likely one.
                assert_eq!(lp.top[0].0, lp.token_id);
                assert!((lp.top[0].1 - lp.logprob).abs() < 1e-6 && lp.logprob <= 0.0);
                count += 1;
            }
            _ => {}
        }
    }
    assert_eq!(count, 6);
    let p = prompt_lps.expect("prompt logprobs");
    assert_eq!(p.len(), 5);
    assert!(p[0].is_none() && p[1..].iter().all(|x| x.as_ref().unwrap().top.len() == 2));
}

#[test]
fn incremental_text_never_breaks_utf8_and_matches_full_decode() {
    // Byte-fallback tokens: emoji and CJK are several tokens per character.
    let m = load(&repo_path("models/stories260K"), DType::F32);
    let tok = &m.tokenizer;
    for text in ["Once upon a time 🦙 日本語 ü!", " naïve café 😀😀 end"] {
        let prompt = tok.encode("Hello", true).unwrap();
        let out = tok.encode(text, false).unwrap();
        let mut d = candela::engine::detokenizer::Detokenizer::new(&prompt, true);
        let mut pieces = String::new();
        for &t in &out {
            let p = d.push(tok, t);
            assert!(!p.contains('\u{FFFD}'), "broken UTF-8 piece {p:?}");
            pieces.push_str(&p);
        }
        pieces.push_str(&d.flush(tok));
        let all = [&prompt[..], &out[..]].concat();
        let want =
            tok.decode(&all, true).unwrap()[tok.decode(&prompt, true).unwrap().len()..].to_string();
        assert_eq!(pieces, want);
    }
}

#[test]
fn admission_rejects_what_can_never_run() {
    let c = EngineConfig {
        max_waiting_requests: 2,
        ..cfg(64)
    };
    let e = engine(MODEL, 16, 2, c);
    let err = e.submit(greedy_req(vec![1; 60], 10)).err().unwrap();
    assert!(
        matches!(
            err,
            EngineError::ContextLength {
                max_model_len: 64,
                requested: 70,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err
        .to_string()
        .starts_with("This model's maximum context length is 64 tokens."));
    // 40 tokens fit the context but never the 32-token pool.
    assert!(matches!(
        e.submit(greedy_req(vec![1; 30], 10)).err().unwrap(),
        EngineError::TooLargeForCache { .. }
    ));
    assert!(matches!(
        e.submit(greedy_req(vec![1, 9999], 1)).err().unwrap(),
        EngineError::InvalidParam { .. }
    ));
    let mut bad = greedy_req(vec![1], 1);
    bad.sampling.top_p = 0.0;
    assert!(
        matches!(e.submit(bad).err().unwrap(), EngineError::InvalidParam { param, .. } if param == "top_p")
    );
    // The waiting queue is bounded.
    let stats = std::sync::Arc::new(EngineStats::default());
    let held = stats.try_enqueue(1).unwrap();
    assert_eq!(stats.try_enqueue(1).unwrap_err(), 1);
    drop(held);
    assert!(stats.try_enqueue(1).is_ok());
}

#[test]
fn a_panicking_engine_fails_everything_and_keeps_counts_exact() {
    let e = engine(MODEL, 16, 64, cfg(256));
    let running = e.submit(greedy_req(vec![1, 2, 3], 200)).unwrap();
    e.inject_panic_for_tests();
    let mut running = running;
    let mut last = None;
    while let Some(ev) = running.blocking_next() {
        last = Some(ev);
    }
    assert!(matches!(
        last,
        Some(EngineEvent::Error(EngineError::EngineDead))
    ));
    wait_until("the engine is marked dead", || !e.is_alive());
    // Refusals never take a place in the queue: still EngineDead, never Overloaded.
    for _ in 0..1100 {
        assert_eq!(
            e.submit(greedy_req(vec![1, 2], 1)).err(),
            Some(EngineError::EngineDead)
        );
    }
    wait_until("the queue count drops to zero", || {
        e.stats().queued_requests == 0
    });
}

#[test]
fn a_prompt_longer_than_the_step_budget_is_prefilled_alone() {
    // Its first chunks sample nothing: the model's output head gets no rows.
    let mut c = cfg(256);
    c.max_num_batched_tokens = 16;
    let e = engine(MODEL, 16, 64, c);
    let prompt = random_prompts(1, 9)[0]
        .iter()
        .copied()
        .cycle()
        .take(100)
        .collect();
    let want = alone(MODEL, std::slice::from_ref(&prompt), 8);
    let got = collect(e.submit(greedy_req(prompt, 8)).unwrap());
    assert_eq!(got.tokens[0], want[0]);
}

#[test]
fn idle_engine_thread_sleeps() {
    let e = engine(MODEL, 16, 64, cfg(256));
    collect(e.submit(greedy_req(vec![1, 2, 3], 4)).unwrap());
    let steps = e.stats().steps;
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(e.stats().steps, steps, "no steps while idle");
}

#[test]
fn every_sample_of_a_constrained_request_follows_its_grammar() {
    use candela::engine::grammar::{GrammarCompiler, GrammarSpec};
    let e = stories();
    let compiler = GrammarCompiler::new(e.tokenizer_arc(), e.limits().vocab_size);
    let g = compiler
        .compile(&GrammarSpec::Regex(
            "(cat|dog|bird) (runs|sleeps)\\.".into(),
        ))
        .unwrap();
    let mut req = GenerateRequest::new(stories_prompt(&e), 30);
    req.n = 3;
    req.sampling.seed = Some(5);
    req.grammar = Some(g);
    // Chunked prefill and a busy batch around it change nothing.
    let others: Vec<_> = (0..4)
        .map(|i| {
            e.submit(greedy_req(random_prompts(1, 40 + i)[0].clone(), 20))
                .unwrap()
        })
        .collect();
    let got = collect(e.submit(req).unwrap());
    for s in others {
        collect(s);
    }
    for (text, finish) in got.text.iter().zip(&got.finish) {
        let ok = ["cat", "dog", "bird"].iter().any(|a| {
            ["runs", "sleeps"]
                .iter()
                .any(|v| *text == format!("{a} {v}."))
        });
        assert!(ok, "{text:?}");
        assert_eq!(
            *finish,
            Some(FinishReason::Stop),
            "the grammar's end stops the sample"
        );
    }
}

/// Prompts that share prefixes of random lengths (a few "system prompts",
/// each continued differently, some repeated whole).
fn shared_prefix_prompts(n: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let bases: Vec<Vec<u32>> = (0..4)
        .map(|_| {
            let len = rng.random_range(10..120);
            std::iter::once(1)
                .chain((1..len).map(|_| rng.random_range(3..512)))
                .collect()
        })
        .collect();
    (0..n)
        .map(|_| {
            let base = &bases[rng.random_range(0..bases.len())];
            let mut p = base[..rng.random_range(1..=base.len())].to_vec();
            if rng.random_bool(0.8) {
                p.extend((0..rng.random_range(1..30)).map(|_| rng.random_range(3..512)));
            }
            p
        })
        .collect()
}

/// Greedy, seeded-sampling and logprob requests over `prompts`.
fn mixed_requests(prompts: &[Vec<u32>]) -> Vec<GenerateRequest> {
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let mut r = greedy_req(p.clone(), 16);
            match i % 3 {
                0 => {}
                1 => {
                    r.sampling.temperature = 0.8;
                    r.sampling.seed = Some(i as u64);
                }
                _ => r.logprobs = Some(2),
            }
            r
        })
        .collect()
}

fn run_all(e: &EngineHandle, reqs: &[GenerateRequest]) -> Vec<Collected> {
    let streams: Vec<_> = reqs.iter().map(|r| e.submit(r.clone()).unwrap()).collect();
    streams.into_iter().map(collect).collect()
}

#[test]
fn prefix_caching_changes_no_output_even_when_evicting_and_preempting() {
    let prompts = shared_prefix_prompts(64, 21);
    let reqs = mixed_requests(&prompts);
    let off = EngineConfig {
        enable_prefix_caching: false,
        ..cfg(256)
    };
    let want = run_all(&engine(MODEL, 16, 1024, off), &reqs);
    // A pool of 48 blocks (768 tokens) for 64 concurrent requests of up to 150
    // tokens: cached blocks are evicted and sequences preempted all along.
    let e = engine(MODEL, 16, 48, cfg(256));
    for round in 0..2 {
        let got = run_all(&e, &reqs);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.tokens, w.tokens, "round {round}, request {i}");
            assert_eq!(g.text, w.text, "round {round}, request {i}");
        }
        let cached: usize = got.iter().map(|c| c.usage.unwrap().cached_tokens).sum();
        assert!(
            cached > 0,
            "round {round}: no prompt token came from the cache"
        );
    }
    let s = e.stats();
    assert!(s.prefix_cache_hits > 0 && s.prefix_cache_hits <= s.prefix_cache_queries);
    assert!(
        s.num_preemptions > 0,
        "the pool was meant to force preemption"
    );
    wait_until("every block is free", || e.stats().kv_cache_usage == 0.0);
}

#[test]
fn a_repeated_prompt_is_served_from_the_cache() {
    let e = engine(MODEL, 16, 256, cfg(256));
    let prompt: Vec<u32> = random_prompts(1, 77)[0]
        .iter()
        .copied()
        .cycle()
        .take(100)
        .collect();
    let first = collect(e.submit(greedy_req(prompt.clone(), 8)).unwrap());
    let second = collect(e.submit(greedy_req(prompt.clone(), 8)).unwrap());
    assert_eq!(first.tokens, second.tokens);
    assert_eq!(first.usage.unwrap().cached_tokens, 0);
    // All six full blocks; the last 4 tokens are computed again.
    assert_eq!(second.usage.unwrap().cached_tokens, 96);
    // Prompt logprobs need every position: such a request skips the cache.
    let mut r = greedy_req(prompt.clone(), 2);
    r.prompt_logprobs = Some(1);
    let mut s = e.submit(r).unwrap();
    let mut prompt_lps = None;
    while let Some(ev) = s.blocking_next() {
        match ev {
            EngineEvent::PromptLogprobs(l) => prompt_lps = Some(l),
            EngineEvent::Done { usage, .. } => assert_eq!(usage.cached_tokens, 0),
            _ => {}
        }
    }
    assert_eq!(prompt_lps.unwrap().len(), prompt.len());
    e.reset_prefix_cache().unwrap();
    let third = collect(e.submit(greedy_req(prompt, 8)).unwrap());
    assert_eq!(third.usage.unwrap().cached_tokens, 0, "the cache was reset");
}
