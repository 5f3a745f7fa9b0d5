//! T5 (`T5ForConditionalGeneration`) against transformers' golden outputs
//! (tests/fixtures/t5_*/golden.json, made by scripts/make_fixtures.py t5),
//! through the step runner that the engine uses: a sequence is the encoder
//! input, the decoder's start token, then the generated tokens.

mod common;

use std::time::{Duration, Instant};

use candela::engine::{EngineConfig, EngineHandle, GenerateRequest};
use candela::kv_cache::KvCacheSizing;
use candela::layers::Logits;
use candela::models::t5::relative_bucket;
use candela::runner::{SeqWork, StepRunner};
use candle_core::DType;
use common::*;
use rand::{Rng, SeedableRng};

const FIXTURES: [&str; 3] = ["t5_relu_tied", "t5_gated_untied", "t5_deep_decoder"];
const TOL: f32 = 1e-4;

fn start(g: &serde_json::Value) -> u32 {
    g["decoder_start_token_id"].as_u64().unwrap() as u32
}

/// The logits after `input`'s encoder pass and the decoder tokens `dec`
/// (start token first), run as one first step and then token by token.
fn decoder_logits(
    r: &mut StepRunner,
    m: &candela::models::LoadedModel,
    seq: u64,
    input: &[u32],
    dec: &[u32],
) -> Vec<Vec<f32>> {
    let mut first = input.to_vec();
    first.push(dec[0]);
    let mut rows = Vec::new();
    for tokens in std::iter::once(first).chain(dec[1..].iter().map(|&t| vec![t])) {
        let out = r
            .step(
                m.model.as_ref(),
                &[SeqWork {
                    seq,
                    tokens,
                    logits: Logits::Last,
                }],
            )
            .unwrap();
        rows.push(out[0][0].clone());
    }
    rows
}

#[test]
fn relative_buckets_are_transformers_own() {
    for name in FIXTURES {
        let g = golden(name);
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fixture_dir(name).join("config.json")).unwrap(),
        )
        .unwrap();
        let nb = cfg["relative_attention_num_buckets"].as_u64().unwrap() as usize;
        let md = cfg["relative_attention_max_distance"].as_u64().unwrap() as usize;
        let rel = &g["relative_positions"];
        let from = rel["from"].as_i64().unwrap();
        for (dir, bidirectional) in [("bidirectional", true), ("unidirectional", false)] {
            for (i, want) in rel[dir].as_array().unwrap().iter().enumerate() {
                let r = from + i as i64;
                assert_eq!(
                    relative_bucket(r, bidirectional, nb, md) as u64,
                    want.as_u64().unwrap(),
                    "{name} {dir} relative position {r}"
                );
            }
        }
    }
}

#[test]
fn first_step_logits_match_transformers() {
    for name in FIXTURES {
        let m = load(&fixture_dir(name), DType::F32);
        let g = golden(name);
        for block_size in [1, 16, 32] {
            let mut r = runner(&m, block_size, 512 / block_size.min(16) * 4);
            for (i, case) in g["logits"].as_array().unwrap().iter().enumerate() {
                let got = decoder_logits(&mut r, &m, i as u64, &ids(&case["input"]), &[start(&g)]);
                let d = max_abs_diff(&got[0], &floats(&case["first_logits"]));
                assert!(d <= TOL, "{name} block {block_size} input {i}: max |Δ| {d}");
                r.free(i as u64);
            }
            assert_eq!(r.kv().num_free_blocks(), r.kv().pool().num_blocks());
        }
    }
}

#[test]
fn greedy_continuations_and_their_last_logits_match_transformers() {
    for name in FIXTURES {
        let m = load(&fixture_dir(name), DType::F32);
        let g = golden(name);
        for block_size in [1, 16, 32] {
            let mut r = runner(&m, block_size, 512 / block_size.min(16) * 4);
            for (i, case) in g["greedy"].as_array().unwrap().iter().enumerate() {
                let input = ids(&case["input"]);
                let want = ids(&case["tokens"]);
                let mut prompt = input.clone();
                prompt.push(start(&g));
                let got = r
                    .greedy(m.model.as_ref(), i as u64, &prompt, want.len(), |_| true)
                    .unwrap();
                assert_eq!(got, want, "{name} block size {block_size} input {i}");
                // The logits at the last generated token, with the decoder fed
                // token by token.
                let mut dec = vec![start(&g)];
                dec.extend(&want[..want.len() - 1]);
                let rows = decoder_logits(&mut r, &m, 100 + i as u64, &input, &dec);
                let d = max_abs_diff(rows.last().unwrap(), &floats(&case["last_logits"]));
                assert!(d <= TOL, "{name} block {block_size} input {i}: max |Δ| {d}");
                r.free(100 + i as u64);
            }
            assert_eq!(r.kv().num_free_blocks(), r.kv().pool().num_blocks());
        }
    }
}

/// Sequences in one batch (an encoder pass beside others' decoder steps, a
/// recomputation of input plus generated tokens in one step) give the
/// logits each gives alone.
#[test]
fn mixed_batch_equals_each_sequence_alone() {
    for name in FIXTURES {
        let m = load(&fixture_dir(name), DType::F32);
        let g = golden(name);
        let s = start(&g);
        let cases = g["greedy"].as_array().unwrap();
        let (a_in, a_toks) = (ids(&cases[0]["input"]), ids(&cases[0]["tokens"]));
        let (b_in, b_toks) = (ids(&cases[1]["input"]), ids(&cases[1]["tokens"]));
        let c_in = ids(&cases[2]["input"]);
        let dec = |toks: &[u32], n: usize| {
            let mut d = vec![s];
            d.extend(&toks[..n]);
            d
        };
        // Alone: A decodes 6 tokens, B 4; C's first step.
        let a_solo = decoder_logits(&mut runner(&m, 16, 64), &m, 0, &a_in, &dec(&a_toks, 6));
        let b_solo = decoder_logits(&mut runner(&m, 16, 64), &m, 0, &b_in, &dec(&b_toks, 4));
        let c_solo = decoder_logits(&mut runner(&m, 16, 64), &m, 0, &c_in, &[s]);

        // Together: A runs its first 3 decoder tokens alone, then in one step
        // A decodes its 4th, B recomputes input + start + 3 tokens whole
        // (as after a preemption) and C runs its encoder.
        let mut r = runner(&m, 16, 128);
        decoder_logits(&mut r, &m, 1, &a_in, &dec(&a_toks, 2));
        let mut b_first = b_in.clone();
        b_first.extend(dec(&b_toks, 3));
        r.set_encoder_len(2, b_in.len());
        let mut c_first = c_in.clone();
        c_first.push(s);
        let out = r
            .step(
                m.model.as_ref(),
                &[
                    SeqWork {
                        seq: 1,
                        tokens: vec![a_toks[2]],
                        logits: Logits::Last,
                    },
                    SeqWork {
                        seq: 2,
                        tokens: b_first,
                        logits: Logits::Last,
                    },
                    SeqWork {
                        seq: 3,
                        tokens: c_first,
                        logits: Logits::Last,
                    },
                ],
            )
            .unwrap();
        let close = |got: &[f32], want: &[f32], what: &str| {
            let d = max_abs_diff(got, want);
            assert!(d <= 1e-5, "{name}: {what}: max |Δ| {d}");
        };
        close(&out[0][0], &a_solo[3], "A's decode step");
        close(&out[1][0], &b_solo[3], "B's recomputation");
        close(&out[2][0], &c_solo[0], "C's encoder step");
        // And they go on together.
        let out = r
            .step(
                m.model.as_ref(),
                &[
                    SeqWork {
                        seq: 1,
                        tokens: vec![a_toks[3]],
                        logits: Logits::Last,
                    },
                    SeqWork {
                        seq: 2,
                        tokens: vec![b_toks[3]],
                        logits: Logits::Last,
                    },
                ],
            )
            .unwrap();
        close(&out[0][0], &a_solo[4], "A's next step");
        close(&out[1][0], &b_solo[4], "B's next step");
        for seq in 1..=3 {
            r.free(seq);
        }
        assert_eq!(r.kv().num_free_blocks(), r.kv().pool().num_blocks());
    }
}

fn engine(name: &str, num_blocks: usize) -> EngineHandle {
    let m = load(&fixture_dir(name), DType::F32);
    let bpt = m.model.spec().cache.bytes_per_token(DType::F32);
    let sizing = KvCacheSizing::new(16, bpt, Some(num_blocks), None, 0).unwrap();
    let cfg = EngineConfig {
        max_model_len: 256,
        max_num_seqs: 256,
        max_num_batched_tokens: 256,
        max_waiting_requests: 1024,
        enable_prefix_caching: true,
    };
    EngineHandle::spawn(m, sizing, cfg).unwrap()
}

#[test]
fn the_engine_generates_transformers_greedy_tokens() {
    for name in FIXTURES {
        let g = golden(name);
        let e = engine(name, 64);
        for case in g["greedy"].as_array().unwrap() {
            let want = ids(&case["tokens"]);
            let mut r = GenerateRequest::new(ids(&case["input"]), want.len());
            r.stop.ignore_eos = true;
            r.sampling.temperature = 0.0;
            assert_eq!(collect_tokens(e.submit(r).unwrap()), vec![want], "{name}");
        }
    }
}

/// Many requests in a pool too small for them all: encoder passes and
/// decoder steps share steps, sequences are preempted (their cross-attention
/// blocks freed) and recomputed, `n = 2` forks share the input's blocks;
/// every request gets what it gets alone, and every block is free after.
#[test]
fn requests_in_a_small_pool_give_their_solo_outputs_and_free_every_block() {
    let name = "t5_gated_untied";
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let reqs: Vec<GenerateRequest> = (0..24)
        .map(|i| {
            let len = rng.random_range(1..80);
            let input: Vec<u32> = (0..len)
                .map(|_| rng.random_range(3..512))
                .chain([1])
                .collect();
            let mut r = GenerateRequest::new(input, 10 + i % 9);
            r.stop.ignore_eos = true;
            if i % 3 == 0 {
                r.n = 2;
                r.sampling.temperature = 0.8;
                r.sampling.seed = Some(i as u64);
            } else {
                r.sampling.temperature = 0.0;
            }
            r
        })
        .collect();
    let big = engine(name, 64);
    let want: Vec<_> = reqs
        .iter()
        .map(|r| collect_tokens(big.submit(r.clone()).unwrap()))
        .collect();
    let e = engine(name, 12);
    let streams: Vec<_> = reqs.iter().map(|r| e.submit(r.clone()).unwrap()).collect();
    for (i, s) in streams.into_iter().enumerate() {
        assert_eq!(collect_tokens(s), want[i], "request {i}");
    }
    assert!(e.stats().num_preemptions > 0, "expected preemptions");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = e.stats();
        if st.kv_cache_usage == 0.0 && st.num_running == 0 && st.num_waiting == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "blocks still held: {st:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn prompt_logprobs_are_refused_for_an_encoder_decoder() {
    let e = engine("t5_relu_tied", 16);
    let mut r = GenerateRequest::new(vec![5, 6, 1], 4);
    r.prompt_logprobs = Some(1);
    let err = e.submit(r).err().expect("prompt logprobs were accepted");
    assert!(err.to_string().contains("encoder-decoder"), "{err}");
}

#[test]
fn served_over_http_completions_give_transformers_greedy_tokens() {
    use common::server::{assert_error, start_model};
    use serde_json::json;

    let name = "t5_gated_untied";
    let g = golden(name);
    let s = start_model(&format!("tests/fixtures/{name}"), &[]);
    let (_, models) = s.get("/v1/models");
    assert!(models.contains("\"task\":\"generate\""), "{models}");
    let case = &g["greedy"][1];
    let want = ids(&case["tokens"]);
    let tok = load(&fixture_dir(name), DType::F32).tokenizer;
    let (status, body) = s.post(
        "/v1/completions",
        json!({"model": "stories", "prompt": ids(&case["input"]), "max_tokens": want.len(),
               "temperature": 0, "ignore_eos": true}),
    );
    assert_eq!(status, 200, "{body}");
    // Random weights pick byte tokens that do not form UTF-8 later on (the
    // streamed text and a whole decode replace them differently): the
    // engine tests compare every token id; here the text's start.
    let text = body["choices"][0]["text"].as_str().unwrap();
    let head = tok.decode(&want[..8], true).unwrap();
    assert!(
        text.starts_with(&head),
        "{text:?} does not start with {head:?}"
    );
    assert_eq!(
        body["usage"]["prompt_tokens"],
        json!(ids(&case["input"]).len())
    );
    assert_eq!(body["usage"]["completion_tokens"], json!(want.len()));
    let (status, body) = s.post(
        "/v1/completions",
        json!({"model": "stories", "prompt": "Once upon a time", "max_tokens": 3, "echo": true,
               "logprobs": 1}),
    );
    assert_error(status, &body, 400, Some("echo"));
}
