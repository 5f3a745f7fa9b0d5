//! Encoder models for embeddings: BERT-family and ModernBERT fixtures against transformers (with
//! sentence-transformers' pooling), the engine batching whole sequences,
//! and `/v1/embeddings` as OpenAI defines it.

mod common;

use base64::Engine as _;
use candela::engine::{EngineConfig, EngineError, EngineEvent, EngineHandle, GenerateRequest};
use candela::kv_cache::KvCacheSizing;
use candela::models::{LoadOptions, ModelKind, Runner};
use candle_core::DType;
use common::server::{assert_error, start_model};
use common::*;
use serde_json::json;

/// BERT, XLM-RoBERTa and RoBERTa fixtures (the RoBERTa ones with pad ids
/// inside an input, which move the positions after them), and ModernBERT
/// ones (RoPE; local layers whose band the longer inputs cross; one with
/// biases everywhere and its config in the published checkpoints' form), and
/// a NomicBERT one in the published checkpoints' layout.
const ENCODERS: &[&str] = &[
    "bert_mean",
    "bert_cls",
    "xlmr_mean",
    "roberta_cls",
    "modernbert_mean",
    "modernbert_cls",
    "nomic_mean",
];

/// Decoders served with `--runner pooling` (Qwen3-Embedding's layout, and a
/// LlamaForCausalLM checkpoint with the default pooling).
const DECODERS: &[&str] = &["qwen3_embed", "llama_embed"];

fn load_as(name: &str, runner: Runner) -> anyhow::Result<candela::models::LoadedModel> {
    candela::models::load_model(&LoadOptions {
        model: Some(fixture_dir(name).to_str().unwrap().to_string()),
        runner,
        ..Default::default()
    })
}

fn engine(name: &str, num_blocks: usize, budget: usize) -> EngineHandle {
    let runner = if DECODERS.contains(&name) {
        Runner::Pooling
    } else {
        Runner::Auto
    };
    let m = load_as(name, runner).unwrap();
    let max_len = m.model.spec().max_position_embeddings;
    let bpt = m.model.spec().cache.bytes_per_token(DType::F32);
    let s = KvCacheSizing::new(16, bpt, Some(num_blocks), None, 0).unwrap();
    let cfg = EngineConfig {
        max_model_len: max_len,
        max_num_seqs: 256,
        max_num_batched_tokens: budget,
        max_waiting_requests: 1024,
        enable_prefix_caching: true,
    };
    EngineHandle::spawn(m, s, cfg).unwrap()
}

fn embed(e: &EngineHandle, ids: Vec<u32>) -> candela::engine::RequestStream {
    e.submit(GenerateRequest::embedding(ids)).unwrap()
}

fn vector(mut s: candela::engine::RequestStream) -> (Vec<f32>, usize) {
    let (mut v, mut tokens) = (None, 0);
    while let Some(ev) = s.blocking_next() {
        match ev {
            EngineEvent::Embedding(x) => v = Some(x),
            EngineEvent::Done { usage, .. } => tokens = usage.prompt_tokens,
            EngineEvent::Error(e) => panic!("{e}"),
            _ => panic!("an embedding request got {ev:?}"),
        }
    }
    (v.expect("an embedding"), tokens)
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (n(a) * n(b))
}

#[test]
fn embeddings_match_transformers_alone_and_batched() {
    for name in ENCODERS.iter().chain(DECODERS) {
        let g = golden(name);
        let cases = g["embeddings"].as_array().unwrap();
        // A small step budget: the 60- and 96-token inputs run alone, whole.
        for budget in [2048, 32] {
            let e = engine(name, 64, budget);
            let streams: Vec<_> = cases.iter().map(|c| embed(&e, ids(&c["input"]))).collect();
            for (c, s) in cases.iter().zip(streams) {
                let want = floats(&c["embedding"]);
                let (got, tokens) = vector(s);
                assert_eq!(tokens, c["input"].as_array().unwrap().len());
                let d = max_abs_diff(&got, &want);
                assert!(d < 1e-4, "{name} budget {budget}: max |Δ| {d}");
                assert!(cosine(&got, &want) > 0.99999);
            }
            assert!(e.stats().num_preemptions == 0);
        }
    }
}

#[test]
fn the_runner_picks_the_task_and_refuses_the_wrong_one() {
    let kind = |name, runner| load_as(name, runner).map(|m| m.model.spec().kind);
    // A decoder generates unless asked to pool; Qwen3-Embedding's layout (no
    // `model.` prefix, no head) loads either way only as what it can be.
    assert_eq!(
        kind("llama_embed", Runner::Auto).unwrap(),
        ModelKind::CausalLm
    );
    assert_eq!(
        kind("qwen3_embed", Runner::Pooling).unwrap(),
        ModelKind::Embedding {
            dim: 64,
            matryoshka: true
        }
    );
    assert!(kind("bert_mean", Runner::Auto).unwrap().is_embedding());
    let err = format!("{:#}", kind("bert_mean", Runner::Generate).unwrap_err());
    assert!(err.contains("--runner generate"), "{err}");
    let err = format!("{:#}", kind("gpt2_4heads", Runner::Pooling).unwrap_err());
    assert!(err.contains("cannot serve embeddings"), "{err}");
    // Saved as the bare stack (`Qwen3Model`, as e5-mistral's `MistralModel`):
    // an embedding model without being told.
    let dir = std::env::temp_dir().join(format!("candela-qwen3-bare-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for f in std::fs::read_dir(fixture_dir("qwen3_embed")).unwrap() {
        let f = f.unwrap().path();
        // Without sentence-transformers' files: the default pooling, last
        // token, normalized (what this fixture's golden vectors are).
        if f.is_file() && !f.ends_with("modules.json") {
            std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
        }
    }
    let cfg = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        cfg.replace("Qwen3ForCausalLM", "Qwen3Model"),
    )
    .unwrap();
    let m = candela::models::load_model(&LoadOptions {
        model: Some(dir.to_str().unwrap().into()),
        ..Default::default()
    });
    std::fs::remove_dir_all(&dir).unwrap();
    let m = m.unwrap();
    assert!(m.model.spec().kind.is_embedding());
    let bpt = m.model.spec().cache.bytes_per_token(DType::F32);
    let e = EngineHandle::spawn(
        m,
        KvCacheSizing::new(16, bpt, Some(16), None, 0).unwrap(),
        EngineConfig {
            max_model_len: 256,
            max_num_seqs: 16,
            max_num_batched_tokens: 512,
            max_waiting_requests: 16,
            enable_prefix_caching: false,
        },
    )
    .unwrap();
    let c = &golden("qwen3_embed")["embeddings"][2];
    let (got, _) = vector(embed(&e, ids(&c["input"])));
    assert!(max_abs_diff(&got, &floats(&c["embedding"])) < 1e-4);
    // A GGUF decoder pools too (llama.cpp's `pooling_type`, else the last token).
    let m = candela::models::load_model(&LoadOptions {
        model: Some(
            repo_path("tests/fixtures/gpt2_4heads.gguf")
                .to_str()
                .unwrap()
                .into(),
        ),
        runner: Runner::Pooling,
        ..Default::default()
    });
    assert!(m.is_err(), "GPT-2 has no embedding mode");
    let m = candela::models::load_model(&LoadOptions {
        model: Some(
            repo_path("tests/fixtures/mixtral_8e.gguf")
                .to_str()
                .unwrap()
                .into(),
        ),
        runner: Runner::Pooling,
        ..Default::default()
    })
    .unwrap();
    assert!(m.model.spec().kind.is_embedding());
}

#[test]
fn a_decoder_serves_v1_embeddings_with_runner_pooling() {
    let s = start_model("tests/fixtures/qwen3_embed", &["--runner", "pooling"]);
    let g = golden("qwen3_embed");
    let c = &g["embeddings"].as_array().unwrap()[3];
    let (st, body) = s.get("/v1/models");
    assert_eq!(st, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["data"][0]["task"], "embed");
    let (st, v) = s.post("/v1/embeddings", json!({"input": c["input"]}));
    assert_eq!(st, 200, "{v}");
    let got = floats(&v["data"][0]["embedding"]);
    assert!(max_abs_diff(&got, &floats(&c["embedding"])) < 1e-4);
    // Declared Matryoshka: a prefix, renormalized.
    let (st, v) = s.post(
        "/v1/embeddings",
        json!({"input": c["input"], "dimensions": 16}),
    );
    assert_eq!(st, 200, "{v}");
    let short = floats(&v["data"][0]["embedding"]);
    let norm = got[..16].iter().map(|x| x * x).sum::<f32>().sqrt();
    let want: Vec<f32> = got[..16].iter().map(|x| x / norm).collect();
    assert!(max_abs_diff(&short, &want) < 1e-5);
    // It does not generate.
    let (st, v) = s.post(
        "/v1/completions",
        json!({"prompt": "Once", "max_tokens": 2}),
    );
    assert_eq!(st, 400, "{v}");
}

#[test]
fn tasks_and_lengths_are_checked() {
    let e = engine("bert_mean", 16, 512);
    // sentence_bert_config.json's max_seq_length (96) bounds the input.
    assert_eq!(e.config().max_model_len, 96);
    assert!(matches!(
        e.submit(GenerateRequest::embedding(vec![5; 97])),
        Err(EngineError::ContextLength { .. })
    ));
    let err = e
        .submit(GenerateRequest::greedy(vec![5, 6], 4))
        .err()
        .unwrap();
    assert!(
        matches!(&err, EngineError::WrongTask(m) if m.contains("embed")),
        "{err:?}"
    );
    let m = load(&fixture_dir("llama_gqa"), DType::F32);
    let bpt = m.model.spec().cache.bytes_per_token(DType::F32);
    let g = EngineHandle::spawn(
        m,
        KvCacheSizing::new(16, bpt, Some(16), None, 0).unwrap(),
        EngineConfig {
            max_model_len: 256,
            max_num_seqs: 8,
            max_num_batched_tokens: 256,
            max_waiting_requests: 8,
            enable_prefix_caching: false,
        },
    )
    .unwrap();
    let err = g
        .submit(GenerateRequest::embedding(vec![5, 6]))
        .err()
        .unwrap();
    assert!(
        matches!(&err, EngineError::WrongTask(m) if m.contains("generate")),
        "{err:?}"
    );
}

#[test]
fn v1_embeddings_follows_openai() {
    let s = start_model("tests/fixtures/bert_mean", &[]);
    let g = golden("bert_mean");
    let cases = g["embeddings"].as_array().unwrap();
    // Token-id inputs, one and several.
    let (st, v) = s.post(
        "/v1/embeddings",
        json!({"model": "stories", "input": cases[2]["input"]}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "list");
    assert_eq!(v["model"], "stories");
    assert_eq!(v["data"][0]["object"], "embedding");
    assert_eq!(v["data"][0]["index"], 0);
    let got: Vec<f32> = floats(&v["data"][0]["embedding"]);
    assert!(max_abs_diff(&got, &floats(&cases[2]["embedding"])) < 1e-4);
    assert_eq!(v["usage"], json!({"prompt_tokens": 17, "total_tokens": 17}));
    let lists: Vec<_> = cases.iter().map(|c| c["input"].clone()).collect();
    let (st, v) = s.post(
        "/v1/embeddings",
        json!({"input": lists, "encoding_format": "base64"}),
    );
    assert_eq!(st, 200, "{v}");
    for (i, c) in cases.iter().enumerate() {
        assert_eq!(v["data"][i]["index"], i);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(v["data"][i]["embedding"].as_str().unwrap())
            .unwrap();
        let got: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        assert!(max_abs_diff(&got, &floats(&c["embedding"])) < 1e-4);
    }
    // Text inputs (stories' tokenizer here), a string and a list.
    let (st, v) = s.post(
        "/v1/embeddings",
        json!({"input": ["Once upon a time", "a cat"]}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["data"].as_array().unwrap().len(), 2);
    let (st, _) = s.post("/v1/embeddings", json!({"input": "hello", "user": "me"}));
    assert_eq!(st, 200);
    // Too long: 400 unless truncate_prompt_tokens asks for a cut.
    let (st, v) = s.post("/v1/embeddings", json!({"input": vec![7; 120]}));
    assert_error(st, &v, 400, Some("input"));
    let (st, v) = s.post(
        "/v1/embeddings",
        json!({"input": vec![7; 120], "truncate_prompt_tokens": -1}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["usage"]["prompt_tokens"], 96);
    // What the model cannot do, and malformed requests.
    for (body, param) in [
        (json!({"input": "x", "dimensions": 8}), "dimensions"),
        (
            json!({"input": "x", "encoding_format": "hex"}),
            "encoding_format",
        ),
        (json!({"input": ""}), "input"),
        (json!({"input": []}), "input"),
        (
            json!({"input": "x", "truncate_prompt_tokens": 0}),
            "truncate_prompt_tokens",
        ),
    ] {
        let (st, v) = s.post("/v1/embeddings", body.clone());
        assert_error(st, &v, 400, Some(param));
    }
    let (st, v) = s.post("/v1/embeddings", json!({"model": "nope", "input": "x"}));
    assert_error(st, &v, 404, Some("model"));
    // An embedding model asked to generate: a 400 naming its task.
    for path in ["/v1/completions", "/v1/chat/completions"] {
        let body = json!({"prompt": "x", "messages": [{"role": "user", "content": "x"}]});
        let (st, v) = s.post(path, body);
        assert_error(st, &v, 400, Some("model"));
        assert!(
            v["error"]["message"].as_str().unwrap().contains("embed"),
            "{v}"
        );
    }
    let (_, models) = s.get("/v1/models");
    assert!(models.contains("\"task\":\"embed\""), "{models}");
}

#[test]
fn a_generative_model_asked_for_embeddings_is_a_400() {
    let s = common::server::server();
    let (st, v) = s.post("/v1/embeddings", json!({"input": "Once upon a time"}));
    assert_error(st, &v, 400, Some("model"));
    assert!(
        v["error"]["message"].as_str().unwrap().contains("generate"),
        "{v}"
    );
}

/// The real all-MiniLM-L6-v2 (scripts/fetch_models.sh) served as `candela serve`
/// serves it, against sentence-transformers' own vectors (scripts/make_fixtures.py
/// minilm): its WordPiece tokenizer, mean pooling and Normalize, and its truncation
/// to `max_seq_length` (256) when the request asks for it.
#[test]
fn all_minilm_l6_v2_matches_sentence_transformers() {
    let Some(path) = real_model(&repo_path("models-cache/all-MiniLM-L6-v2")) else {
        return;
    };
    let text = std::fs::read_to_string(repo_path("tests/fixtures/minilm_golden.json")).unwrap();
    let g: serde_json::Value = serde_json::from_str(&text).unwrap();
    let cases = g["cases"].as_array().unwrap();
    let s = start_model(path.to_str().unwrap(), &[]);
    let (_, models) = s.get("/v1/models");
    assert!(models.contains("\"task\":\"embed\""), "{models}");
    let inputs: Vec<_> = cases.iter().map(|c| c["input"].clone()).collect();
    // One batched request: every sentence, the long one cut as sentence-transformers cuts it.
    let (st, v) = s.post(
        "/v1/embeddings",
        json!({"input": inputs, "truncate_prompt_tokens": -1}),
    );
    assert_eq!(st, 200, "{v}");
    let mut total = 0;
    for (i, c) in cases.iter().enumerate() {
        let got = floats(&v["data"][i]["embedding"]);
        assert_eq!(got.len(), 384);
        let want = floats(&c["embedding"]);
        let cos = cosine(&got, &want);
        assert!(cos >= 0.99999, "{:?}: cosine {cos}", c["input"]);
        total += c["prompt_tokens"].as_u64().unwrap();
    }
    assert_eq!(v["usage"]["prompt_tokens"], total);
    // Alone, each short sentence gives the same vector as in the batch.
    for (i, c) in cases.iter().enumerate().take(cases.len() - 1) {
        let (st, one) = s.post("/v1/embeddings", json!({"input": c["input"]}));
        assert_eq!(st, 200, "{one}");
        assert_eq!(one["usage"]["prompt_tokens"], c["prompt_tokens"]);
        let a = floats(&one["data"][0]["embedding"]);
        assert!(max_abs_diff(&a, &floats(&v["data"][i]["embedding"])) < 1e-5);
    }
    // Without truncate_prompt_tokens the long sentence is a 400, as in vLLM.
    let long = cases.last().unwrap()["input"].clone();
    let (st, v) = s.post("/v1/embeddings", json!({"input": long}));
    assert_error(st, &v, 400, Some("input"));
    assert!(
        v["error"]["message"].as_str().unwrap().contains("256"),
        "{v}"
    );
}
