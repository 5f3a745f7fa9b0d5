//! Mamba and Mamba-2 against transformers (random-weight fixtures), and the
//! engine serving them from one state slot per sequence: chunked prompts,
//! mixed batches, preemption, `n` samples and aborts.

mod common;

use std::time::{Duration, Instant};

use candela::engine::{EngineConfig, EngineEvent, EngineHandle, GenerateRequest};
use candela::kv_cache::KvCacheSizing;
use candela::layers::Logits;
use candela::runner::{SeqWork, StepRunner};
use candle_core::DType;
use common::*;
use rand::{Rng, SeedableRng};

/// Last-position logits of `prompt` fed in chunks of `chunk` tokens.
fn chunked_logits(
    r: &mut StepRunner,
    m: &dyn candela::models::Model,
    prompt: &[u32],
    chunk: usize,
) -> Vec<f32> {
    let mut last = Vec::new();
    for (i, c) in prompt.chunks(chunk).enumerate() {
        let is_last = (i + 1) * chunk >= prompt.len();
        let rows = r
            .step(
                m,
                &[SeqWork {
                    seq: 7,
                    tokens: c.to_vec(),
                    logits: if is_last { Logits::Last } else { Logits::None },
                }],
            )
            .unwrap();
        if is_last {
            last = rows[0][0].clone();
        }
    }
    r.free(7);
    last
}

#[test]
fn logits_match_transformers_whole_and_chunked() {
    for name in SSM_FIXTURES {
        let m = load(&fixture_dir(name), DType::F32);
        assert!(m.model.spec().cache.is_recurrent(), "{name}");
        let g = golden(name);
        let mut r = runner(&m, 16, 4);
        for (i, case) in g["logits"].as_array().unwrap().iter().enumerate() {
            let prompt = ids(&case["prompt"]);
            let want = floats(&case["last_logits"]);
            for chunk in [1, 7, 64] {
                let got = chunked_logits(&mut r, m.model.as_ref(), &prompt, chunk);
                let d = max_abs_diff(&got, &want);
                assert!(d < 1e-4, "{name} prompt {i} chunk {chunk}: max |Δ| {d}");
            }
        }
        // Every slot is free again.
        assert_eq!(r.kv().num_free_blocks(), 4, "{name}");
    }
}

#[test]
fn greedy_continuations_match_transformers() {
    for name in SSM_FIXTURES {
        let m = load(&fixture_dir(name), DType::F32);
        let g = golden(name);
        let mut r = runner(&m, 16, 2);
        for (i, case) in g["greedy"].as_array().unwrap().iter().enumerate() {
            let want = ids(&case["tokens"]);
            let got = r
                .greedy(
                    m.model.as_ref(),
                    0,
                    &ids(&case["prompt"]),
                    want.len(),
                    |_| true,
                )
                .unwrap();
            assert_eq!(got, want, "{name} prompt {i}");
        }
    }
}

#[test]
fn mixed_batch_equals_each_sequence_alone() {
    for name in SSM_FIXTURES {
        let m = load(&fixture_dir(name), DType::F32);
        let model = m.model.as_ref();
        let g = golden(name);
        let prompts: Vec<Vec<u32>> = g["logits"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| ids(&c["prompt"]))
            .collect();
        // Alone: each prompt, then 6 greedy steps, every step's logits.
        let mut r = runner(&m, 16, 8);
        let solo: Vec<Vec<Vec<f32>>> = prompts
            .iter()
            .map(|p| {
                let mut out = Vec::new();
                let mut next = p.clone();
                for _ in 0..7 {
                    let rows = r
                        .step(
                            model,
                            &[SeqWork {
                                seq: 1,
                                tokens: next,
                                logits: Logits::Last,
                            }],
                        )
                        .unwrap();
                    let l = rows[0][0].clone();
                    next = vec![candela::engine::sampler::argmax(&l)];
                    out.push(l);
                }
                r.free(1);
                out
            })
            .collect();
        // Together: sequence i joins at step i, its prompt in two chunks
        // when long, while the others decode.
        let mut r = runner(&m, 16, 8);
        let mut next: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
        let mut got: Vec<Vec<Vec<f32>>> = vec![Vec::new(); prompts.len()];
        let mut fed = vec![0usize; prompts.len()];
        for step in 0..12 {
            let mut work = Vec::new();
            let mut who = Vec::new();
            for (i, p) in prompts.iter().enumerate() {
                if step < i || got[i].len() == 7 {
                    continue;
                }
                let tokens = if fed[i] < p.len() {
                    let take = if p.len() > 10 && fed[i] == 0 {
                        p.len() / 2
                    } else {
                        p.len() - fed[i]
                    };
                    let t = p[fed[i]..fed[i] + take].to_vec();
                    fed[i] += take;
                    t
                } else {
                    next[i].clone()
                };
                let logits = if fed[i] < p.len() {
                    Logits::None
                } else {
                    Logits::Last
                };
                work.push(SeqWork {
                    seq: 10 + i as u64,
                    tokens,
                    logits,
                });
                who.push((i, logits));
            }
            if work.is_empty() {
                break;
            }
            let rows = r.step(model, &work).unwrap();
            for ((i, logits), rows) in who.into_iter().zip(rows) {
                if logits == Logits::Last {
                    let l = rows[0].clone();
                    next[i] = vec![candela::engine::sampler::argmax(&l)];
                    got[i].push(l);
                }
            }
        }
        for (i, (a, b)) in got.iter().zip(&solo).enumerate() {
            assert_eq!(a.len(), b.len(), "{name} sequence {i}");
            for (s, (x, y)) in a.iter().zip(b).enumerate() {
                let d = max_abs_diff(x, y);
                assert!(d < 1e-4, "{name} sequence {i} step {s}: max |Δ| {d}");
            }
        }
    }
}

fn cfg() -> EngineConfig {
    EngineConfig {
        max_model_len: 256,
        max_num_seqs: 256,
        max_num_batched_tokens: 64,
        max_waiting_requests: 1024,
        enable_prefix_caching: true,
    }
}

fn engine(name: &str, slots: usize) -> EngineHandle {
    let m = load(&fixture_dir(name), DType::F32);
    let cache = &m.model.spec().cache;
    let s =
        KvCacheSizing::for_states(256, cache.state_bytes_per_seq(), Some(slots), None, 0).unwrap();
    EngineHandle::spawn(m, s, cfg()).unwrap()
}

fn requests(n: usize, seed: u64) -> Vec<GenerateRequest> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|i| {
            let len = rng.random_range(1..80);
            let prompt: Vec<u32> = std::iter::once(1)
                .chain((1..len).map(|_| rng.random_range(3..512)))
                .collect();
            let mut r = GenerateRequest::new(prompt, 12 + i % 9);
            r.stop.ignore_eos = true;
            if i % 3 == 0 {
                // Two seeded samples: the second forks the first's state.
                r.n = 2;
                r.sampling.temperature = 0.8;
                r.sampling.seed = Some(i as u64);
            } else {
                r.sampling.temperature = 0.0;
            }
            r
        })
        .collect()
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn thirty_two_requests_in_a_small_pool_give_their_solo_outputs() {
    for name in ["mamba_bias", "mamba2_groups"] {
        let reqs = requests(32, 5);
        // Alone: one request at a time in a roomy pool.
        let big = engine(name, 8);
        let want: Vec<_> = reqs
            .iter()
            .map(|r| collect_tokens(big.submit(r.clone()).unwrap()))
            .collect();
        // Together in 5 slots: the forks of n = 2 need slots the running
        // sequences hold, so some are preempted and recomputed.
        let e = engine(name, 5);
        let streams: Vec<_> = reqs.iter().map(|r| e.submit(r.clone()).unwrap()).collect();
        for (i, s) in streams.into_iter().enumerate() {
            assert_eq!(collect_tokens(s), want[i], "{name} request {i}");
        }
        assert!(
            e.stats().num_preemptions > 0,
            "{name}: expected preemptions"
        );
        wait_until("every slot to be free", || {
            let st = e.stats();
            st.kv_cache_usage == 0.0 && st.num_running == 0 && st.num_waiting == 0
        });
    }
}

#[test]
fn aborted_requests_free_their_slots() {
    let e = engine("mamba2_onegroup", 6);
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut kept = Vec::new();
    for (i, r) in requests(24, 9).into_iter().enumerate() {
        let mut r = r;
        r.stop.max_tokens = 40;
        let mut s = e.submit(r).unwrap();
        if i % 2 == 0 {
            for _ in 0..rng.random_range(0..10) {
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
        assert!(collect_tokens(s).iter().all(|t| t.len() == 40));
    }
    wait_until("every slot to be free", || {
        let st = e.stats();
        st.kv_cache_usage == 0.0 && st.num_running == 0 && st.num_waiting == 0
    });
}

#[test]
fn mamba_gguf_files_are_the_same_models_as_their_folders() {
    // llama.cpp's `mamba` layout (scripts/make_fixtures.py writes it as its
    // converter does: A itself, the convolution squeezed, a tied head
    // omitted). The f32 files are transformers' models exactly; the Q8_0
    // ones multiply their matrices in the file's blocks (0.03-0.04 measured).
    for name in ["mamba_tied", "mamba_bias"] {
        let g = golden(name);
        for (file, tol) in [
            (format!("{name}.gguf"), 1e-4),
            (format!("{name}-q8_0.gguf"), 0.15),
        ] {
            let m = load(&fixture_dir(&file), DType::F32);
            assert_eq!(m.model.spec().architecture, "MambaForCausalLM", "{file}");
            let mut r = runner(&m, 16, 2);
            let mut worst = 0f32;
            for case in g["logits"].as_array().unwrap() {
                let got = chunked_logits(&mut r, m.model.as_ref(), &ids(&case["prompt"]), 64);
                worst = worst.max(max_abs_diff(&got, &floats(&case["last_logits"])));
            }
            assert!(worst <= tol, "{file}: max |Δ| {worst}");
            if tol < 1e-3 {
                for (i, case) in g["greedy"].as_array().unwrap().iter().enumerate() {
                    let want = ids(&case["tokens"]);
                    let got = r
                        .greedy(
                            m.model.as_ref(),
                            0,
                            &ids(&case["prompt"]),
                            want.len(),
                            |_| true,
                        )
                        .unwrap();
                    assert_eq!(got, want, "{file}: greedy {i}");
                }
            }
        }
    }
}

#[test]
fn every_position_logits_equal_each_prefix_alone() {
    // Prompt logprobs ask for logits at every position of a chunk: row j must
    // be what the prefix ending at j gives alone.
    for name in ["mamba_bias", "mamba2_groups"] {
        let m = load(&fixture_dir(name), DType::F32);
        let model = m.model.as_ref();
        let prompt = ids(&golden(name)["logits"][2]["prompt"]);
        let mut r = runner(&m, 16, 2);
        let mut all = Vec::new();
        for c in prompt.chunks(7) {
            let rows = r
                .step(
                    model,
                    &[SeqWork {
                        seq: 1,
                        tokens: c.to_vec(),
                        logits: Logits::All,
                    }],
                )
                .unwrap();
            all.extend(rows.into_iter().next().unwrap());
        }
        r.free(1);
        assert_eq!(all.len(), prompt.len());
        for (j, row) in all.iter().enumerate() {
            let alone = chunked_logits(&mut r, model, &prompt[..=j], 64);
            let d = max_abs_diff(row, &alone);
            assert!(d < 1e-4, "{name} position {j}: max |Δ| {d}");
        }
    }
}

#[test]
fn logprobs_and_stop_tokens_work_as_for_transformers() {
    let e = engine("mamba_tied", 4);
    let prompt = ids(&golden("mamba_tied")["greedy"][0]["prompt"]);
    let want = ids(&golden("mamba_tied")["greedy"][0]["tokens"]);
    let mut r = GenerateRequest::greedy(prompt.clone(), 32);
    r.stop.ignore_eos = true;
    r.logprobs = Some(3);
    r.prompt_logprobs = Some(1);
    // Stop at the first token that differs from the first generated one.
    let stop = *want.iter().find(|&&t| t != want[0]).unwrap();
    r.stop.stop_token_ids = vec![stop];
    let mut s = e.submit(r).unwrap();
    let (mut tokens, mut prompt_lps, mut finish) = (Vec::new(), None, None);
    while let Some(ev) = s.blocking_next() {
        match ev {
            EngineEvent::PromptLogprobs(p) => prompt_lps = Some(p),
            EngineEvent::Output(o) => {
                let lp = &o.logprobs[0];
                assert_eq!(lp.top.len(), 3);
                assert_eq!(
                    lp.top[0].0, lp.token_id,
                    "greedy takes the most likely token"
                );
                tokens.extend(o.token_ids);
                finish = o.finish_reason.or(finish);
            }
            EngineEvent::Error(e) => panic!("{e}"),
            _ => {}
        }
    }
    let at = want.iter().position(|&t| t == stop).unwrap();
    assert_eq!(
        tokens,
        want[..=at],
        "greedy up to and including the stop token"
    );
    assert_eq!(finish, Some(candela::engine::FinishReason::Stop));
    let p = prompt_lps.expect("prompt logprobs");
    assert_eq!(p.len(), prompt.len());
    assert!(p[0].is_none() && p[1..].iter().all(|x| x.is_some()));
}
