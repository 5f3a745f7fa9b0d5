//! The HTTP API end to end: a real server on an ephemeral port, real HTTP.

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use candela::cli::{Cli, Command};
use clap::Parser;
use common::repo_path;
use common::server::*;
use serde_json::{json, Value};

const STORY: &str = ", there was a little girl named Lily.";

#[test]
fn health_version_models_and_unknown_routes() {
    let s = server();
    assert_eq!(s.get("/health").0, 200);
    let (st, v) = s.get("/version");
    assert_eq!(st, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&v).unwrap()["version"],
        env!("CARGO_PKG_VERSION")
    );
    let (st, m) = s.get("/v1/models");
    assert_eq!(st, 200);
    let m: Value = serde_json::from_str(&m).unwrap();
    assert_eq!(m["object"], "list");
    assert_eq!(m["data"][0]["id"], "stories");
    assert_eq!(m["data"][0]["object"], "model");
    assert_eq!(m["data"][0]["max_model_len"], 512);
    // SageMaker's health path, and OpenAI's retrieve by id (ids may hold slashes).
    assert_eq!(s.get("/ping").0, 200);
    let (st, one) = s.get("/v1/models/stories");
    assert_eq!(st, 200);
    assert_eq!(serde_json::from_str::<Value>(&one).unwrap(), m["data"][0]);
    let (st, body) = s.get("/v1/models/org/other-model");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_error(st, &body, 404, Some("model"));
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .ends_with("This server serves: `stories`."),
        "{body}"
    );
    let (st, body) = s.get("/v1/nothing");
    assert_error(st, &serde_json::from_str(&body).unwrap(), 404, None);
}

#[test]
fn completion_greedy_with_exact_usage() {
    let s = server();
    let (st, v) = s.post(
        "/v1/completions",
        json!({"model": "stories", "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "text_completion");
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(v["model"], "stories");
    let text = v["choices"][0]["text"].as_str().unwrap();
    assert!(text.starts_with(STORY), "{text:?}");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(v["choices"][0]["index"], 0);
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 5, "completion_tokens": 12, "total_tokens": 17,
                                  "prompt_tokens_details": {"cached_tokens": 0}})
    );
}

#[test]
fn completion_prompt_forms_and_choice_indexes() {
    let s = server();
    let ids = json!([1, 403, 407, 261, 378]);
    for prompt in [
        json!("Once upon a time"),
        ids.clone(),
        json!(["Once upon a time", "Once upon a time"]),
        json!([ids, ids]),
    ] {
        let (st, v) = s.post(
            "/v1/completions",
            json!({"prompt": prompt, "max_tokens": 8, "temperature": 0, "n": 2}),
        );
        assert_eq!(st, 200, "{v}");
        let choices = v["choices"].as_array().unwrap();
        let indexes: Vec<u64> = choices
            .iter()
            .map(|c| c["index"].as_u64().unwrap())
            .collect();
        assert_eq!(indexes, (0..choices.len() as u64).collect::<Vec<_>>());
        for c in choices {
            assert!(
                c["text"].as_str().unwrap().starts_with(", there was"),
                "{c}"
            );
        }
        assert_eq!(v["usage"]["completion_tokens"], 8 * choices.len());
    }
}

#[test]
fn echo_and_logprobs_shapes() {
    let s = server();
    let (st, v) = s.post(
        "/v1/completions",
        json!({"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0, "logprobs": 3, "echo": true}),
    );
    assert_eq!(st, 200, "{v}");
    let c = &v["choices"][0];
    assert!(
        c["text"]
            .as_str()
            .unwrap()
            .starts_with("Once upon a time, there"),
        "{c}"
    );
    let lp = &c["logprobs"];
    // 5 prompt tokens (the first without a logprob) + 4 generated.
    assert_eq!(lp["tokens"].as_array().unwrap().len(), 9);
    assert_eq!(lp["token_logprobs"][0], Value::Null);
    assert!(lp["token_logprobs"][5].as_f64().unwrap() <= 0.0);
    assert_eq!(lp["top_logprobs"][8].as_object().unwrap().len(), 3);
    assert_eq!(lp["text_offset"].as_array().unwrap().len(), 9);
    // Chat format.
    let (st, v) = s.post(
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0,
               "logprobs": true, "top_logprobs": 2}),
    );
    assert_eq!(st, 200, "{v}");
    let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(content.len(), 3);
    for t in content {
        assert!(
            t["token"].is_string()
                && t["logprob"].as_f64().unwrap() <= 0.0
                && t["bytes"].is_array()
        );
        assert_eq!(t["top_logprobs"].as_array().unwrap().len(), 2);
    }
}

#[test]
fn streaming_completion_is_framed_and_joins_to_the_plain_text() {
    let s = server();
    let body = json!({"prompt": "Once upon a time", "max_tokens": 20, "temperature": 0});
    let (_, plain) = s.post("/v1/completions", body.clone());
    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    stream_body["stream_options"] = json!({"include_usage": true});
    let (st, raw) = s.post_raw("/v1/completions", &stream_body.to_string(), None);
    assert_eq!(st, 200);
    let payloads = sse_payloads(&raw);
    let (usage_chunk, chunks) = payloads[..payloads.len() - 1].split_last().unwrap();
    let mut joined = String::new();
    let mut finishes = 0;
    for p in chunks {
        let v: Value = serde_json::from_str(p).unwrap();
        assert_eq!(v["object"], "text_completion");
        joined.push_str(v["choices"][0]["text"].as_str().unwrap());
        finishes += usize::from(!v["choices"][0]["finish_reason"].is_null());
    }
    assert_eq!(joined, plain["choices"][0]["text"].as_str().unwrap());
    assert_eq!(finishes, 1);
    let u: Value = serde_json::from_str(usage_chunk).unwrap();
    assert_eq!(u["choices"], json!([]));
    assert_eq!(u["usage"]["completion_tokens"], 20);
    assert_eq!(u["usage"]["prompt_tokens"], 5);
}

#[test]
fn chat_plain_and_streaming() {
    let s = server();
    let msgs = json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Tell a story"}]}]);
    let (st, v) = s.post(
        "/v1/chat/completions",
        json!({"messages": msgs, "max_tokens": 10, "temperature": 0}),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let plain = v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(v["usage"]["completion_tokens"], 10);
    let (st, raw) = s.post_raw(
        "/v1/chat/completions",
        &json!({"messages": msgs, "max_tokens": 10, "temperature": 0, "stream": true, "n": 2})
            .to_string(),
        None,
    );
    assert_eq!(st, 200);
    let mut text = [String::new(), String::new()];
    let mut roles = [0, 0];
    let mut finishes = [0, 0];
    for p in &sse_payloads(&raw)[..] {
        if p == "[DONE]" {
            continue;
        }
        let v: Value = serde_json::from_str(p).unwrap();
        assert_eq!(v["object"], "chat.completion.chunk");
        let c = &v["choices"][0];
        let i = c["index"].as_u64().unwrap() as usize;
        if c["delta"]["role"] == "assistant" {
            assert_eq!(finishes[i] + text[i].len(), 0, "role comes first");
            roles[i] += 1;
        }
        text[i].push_str(c["delta"]["content"].as_str().unwrap_or(""));
        finishes[i] += usize::from(!c["finish_reason"].is_null());
    }
    assert_eq!(roles, [1, 1]);
    assert_eq!(finishes, [1, 1]);
    assert_eq!(text[0], plain);
    assert_eq!(text[1], plain);
}

#[test]
fn client_errors_are_openai_errors() {
    let s = server();
    let cases = [
        (
            json!({"prompt": "x", "temperature": -1}),
            400,
            Some("temperature"),
        ),
        (
            json!({"prompt": "x", "max_tokens": "lots"}),
            400,
            Some("max_tokens"),
        ),
        (json!({"prompt": ""}), 400, Some("prompt")),
        (json!({"prompt": []}), 400, Some("prompt")),
        (json!({"prompt": [1, 2, 99999]}), 400, Some("prompt")),
        (
            json!({"prompt": "x", "logprobs": 21}),
            400,
            Some("logprobs"),
        ),
        (json!({"prompt": "x", "suffix": "y"}), 400, Some("suffix")),
        (json!({"prompt": "x", "best_of": 3}), 400, Some("best_of")),
        (json!({"prompt": "x", "n": 0}), 400, Some("n")),
        (json!({"prompt": "x", "model": "gpt-4"}), 404, Some("model")),
        (json!({"max_tokens": 3}), 400, Some("prompt")),
    ];
    for (body, status, param) in cases {
        let (st, v) = s.post("/v1/completions", body.clone());
        assert_error(st, &v, status, param);
    }
    let (st, text) = s.post_raw("/v1/completions", "{\"prompt\": ", None);
    assert_error(st, &serde_json::from_str(&text).unwrap(), 400, None);
    let (st, v) = s.post(
        "/v1/completions",
        json!({"prompt": "Once upon a time", "max_tokens": 600}),
    );
    assert_error(st, &v, 400, None);
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .starts_with("This model's maximum context length is 512 tokens."));
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let (st, v) = s.post(
        "/v1/chat/completions",
        json!({"messages": [{"role": "wizard", "content": "x"}]}),
    );
    assert_error(st, &v, 400, Some("messages[0].role"));
    let (st, v) = s.post("/v1/chat/completions", json!({"messages": []}));
    assert_error(st, &v, 400, Some("messages"));
    let (st, v) = s.post("/detokenize", json!({"tokens": [1, 100000]}));
    assert_error(st, &v, 400, Some("tokens"));
}

#[test]
fn tokenize_and_detokenize_round_trip() {
    let s = server();
    let (st, v) = s.post("/tokenize", json!({"prompt": "Once upon a time"}));
    assert_eq!(st, 200);
    assert_eq!(
        v,
        json!({"count": 5, "max_model_len": 512, "tokens": [1, 403, 407, 261, 378], "token_strs": null})
    );
    let (_, v) = s.post(
        "/tokenize",
        json!({"prompt": "Once upon a time", "add_special_tokens": false}),
    );
    assert_eq!(v["count"], 4);
    let (_, v) = s.post("/detokenize", json!({"tokens": [403, 407, 261, 378]}));
    assert_eq!(v["prompt"], "Once upon a time");
    let (st, v) = s.post(
        "/tokenize",
        json!({"messages": [{"role": "user", "content": "Hi"}]}),
    );
    assert_eq!(st, 200, "{v}");
    assert!(v["count"].as_u64().unwrap() > 3);
}

#[test]
fn metrics_are_prometheus_text() {
    let s = server();
    s.post(
        "/v1/completions",
        json!({"prompt": "Once", "max_tokens": 3}),
    );
    let (st, text) = s.get("/metrics");
    assert_eq!(st, 200);
    for name in [
        "candela:time_to_first_token_seconds",
        "candela:inter_token_latency_seconds",
        "candela:e2e_request_latency_seconds",
        "candela:request_queue_time_seconds",
        "candela:num_requests_running",
        "candela:num_requests_waiting",
        "candela:kv_cache_usage_perc",
        "candela:num_preemptions_total",
        "candela:prompt_tokens_total",
        "candela:generation_tokens_total",
        "candela:request_success_total",
        "candela:client_disconnects_total",
    ] {
        assert!(text.contains(&format!("# TYPE {name}")), "{name} missing");
    }
}

#[test]
fn api_keys_guard_the_api_but_not_health_or_metrics() {
    let s = start(&["--api-key", "k1,k2"]);
    let body = json!({"prompt": "Once", "max_tokens": 2}).to_string();
    let (st, text) = s.post_raw("/v1/completions", &body, None);
    assert_error(st, &serde_json::from_str(&text).unwrap(), 401, None);
    let (st, _) = s.post_raw("/v1/completions", &body, Some("wrong"));
    assert_eq!(st, 401);
    assert_eq!(s.post_raw("/v1/completions", &body, Some("k2")).0, 200);
    assert_eq!(s.post_raw("/tokenize", "{\"prompt\": \"x\"}", None).0, 401);
    assert_eq!(s.get("/health").0, 200);
    assert_eq!(s.get("/metrics").0, 200);
}

#[test]
fn oversized_bodies_and_full_queues() {
    let s = std::sync::Arc::new(start(&[
        "--max-request-body-bytes",
        "1000",
        "--max-waiting-requests",
        "2",
        "--max-num-seqs",
        "1",
    ]));
    let big = json!({"prompt": "x".repeat(5000)}).to_string();
    let (st, text) = s.post_raw("/v1/completions", &big, None);
    assert_error(st, &serde_json::from_str(&text).unwrap(), 413, None);
    // One request runs (one sequence at a time) and two wait: the queue is
    // full. Six clients at once, so that two are waiting at some moment
    // whatever the timing; those that find the queue full get 429 too. On a
    // busy machine a round of six can finish before the queue is seen full:
    // then another round starts.
    let long = json!({"prompt": "Once upon a time", "max_tokens": 500, "ignore_eos": true});
    let round = || -> Vec<_> {
        (0..6)
            .map(|_| {
                let (s, body) = (s.clone(), long.clone());
                std::thread::spawn(move || s.post("/v1/completions", body).0)
            })
            .collect()
    };
    let mut busy = round();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if s.metric("candela:num_requests_waiting") >= 2.0 {
            let (st, v) = s.post(
                "/v1/completions",
                json!({"prompt": "Once", "max_tokens": 2}),
            );
            if st == 429 {
                assert_error(st, &v, 429, None);
                break;
            }
        }
        if busy.iter().all(|b| b.is_finished()) {
            for b in busy.drain(..) {
                assert!(matches!(b.join().unwrap(), 200 | 429));
            }
            busy = round();
        }
        assert!(Instant::now() < deadline, "the queue never filled");
        std::thread::sleep(Duration::from_millis(2));
    }
    for b in busy {
        assert!(matches!(b.join().unwrap(), 200 | 429));
    }
}

#[test]
fn cors_only_for_allowed_origins() {
    let s = start(&["--allowed-origins", "http://app.example"]);
    let call = |origin: &str| {
        agent()
            .get(format!("{}/v1/models", s.base))
            .header("origin", origin)
            .call()
            .unwrap()
            .headers()
            .get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap().to_string())
    };
    assert_eq!(
        call("http://app.example").as_deref(),
        Some("http://app.example")
    );
    assert_eq!(call("http://evil.example"), None);
    // Without --allowed-origins there are no CORS headers at all.
    let resp = agent()
        .get(format!("{}/v1/models", server().base))
        .header("origin", "http://app.example")
        .call()
        .unwrap();
    assert!(resp.headers().get("access-control-allow-origin").is_none());
    assert!(resp.headers().get("x-request-id").is_some());
}

#[test]
fn chat_without_a_template_is_a_clear_400() {
    let model = repo_path("models/stories260K");
    let argv = [
        "candela",
        "serve",
        "--model",
        model.to_str().unwrap(),
        "--kv-cache-memory",
        "8MiB",
    ];
    let Command::Serve(args) = Cli::parse_from(argv).command else {
        unreachable!()
    };
    let (app, _) = candela::cli::serve::build_app(&args).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (status, body) = rt.block_on(async {
        use tower::ServiceExt;
        let req = axum::http::Request::post("/v1/chat/completions")
            .body(axum::body::Body::from(
                json!({"messages": [{"role": "user", "content": "hi"}]}).to_string(),
            ))
            .unwrap();
        let resp = app.oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let bytes = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .unwrap()
            .to_bytes();
        (status, serde_json::from_slice::<Value>(&bytes).unwrap())
    });
    assert_error(status, &body, 400, Some("messages"));
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("chat template"));
}

#[test]
fn a_disconnected_stream_is_aborted_and_its_blocks_freed() {
    let s = start(&[]);
    let body = json!({"prompt": "Once upon a time", "max_tokens": 500, "ignore_eos": true, "stream": true});
    let mut resp = agent()
        .post(format!("{}/v1/completions", s.base))
        .header("content-type", "application/json")
        .send(body.to_string())
        .unwrap();
    let mut buf = [0u8; 256];
    let mut reader = resp.body_mut().as_reader();
    reader.read_exact(&mut buf).unwrap();
    drop(reader);
    drop(resp);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, text) = s.get("/metrics");
        let value = |name: &str| -> f64 {
            text.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(-1.0)
        };
        if value("candela:client_disconnects_total") >= 1.0
            && value("candela:request_success_total{finished_reason=\"abort\"") >= 1.0
            && value("candela:num_requests_running") == 0.0
            && value("candela:kv_cache_usage_perc") == 0.0
        {
            break;
        }
        assert!(Instant::now() < deadline, "request not aborted:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn every_fixture_architecture_serves_its_golden_continuation() {
    // Folders and a GGUF file through `candela serve --model`: the greedy text
    // over HTTP is transformers' greedy continuation, detokenized. Random
    // weights also emit byte-fallback tokens (ids 3-258 of the stories
    // tokenizer) that make invalid UTF-8, whose text depends on how it is
    // split; the continuation is compared up to the first of those.
    let mut compared = 0;
    for (model, fixture) in [
        ("tests/fixtures/gemma3_mqa_window", "gemma3_mqa_window"),
        ("tests/fixtures/gemma3_gqa", "gemma3_gqa"),
        ("tests/fixtures/gpt2_8heads", "gpt2_8heads"),
        ("tests/fixtures/gpt2_4heads.gguf", "gpt2_4heads"),
        ("tests/fixtures/llama_yarn_rope", "llama_yarn_rope"),
    ] {
        let s = start_model(model, &[]);
        let g = common::golden(fixture);
        for case in g["greedy"].as_array().unwrap() {
            let want: Vec<u32> = common::ids(&case["tokens"])
                .into_iter()
                .take_while(|t| !(3..259).contains(t))
                .collect();
            if want.is_empty() {
                continue;
            }
            let (st, v) = s.post(
                "/v1/completions",
                json!({"prompt": case["prompt"], "max_tokens": want.len(), "temperature": 0,
                       "ignore_eos": true, "skip_special_tokens": false}),
            );
            assert_eq!(st, 200, "{model}: {v}");
            assert_eq!(v["usage"]["completion_tokens"], want.len());
            let (_, d) = s.post("/detokenize", json!({"tokens": want}));
            assert_eq!(v["choices"][0]["text"], d["prompt"], "{model}");
            compared += want.len();
        }
    }
    assert!(compared >= 40, "only {compared} tokens compared");
}

#[test]
fn chat_features_that_cannot_be_honoured_are_400s() {
    let s = server();
    let msgs = json!([{"role": "user", "content": "hi"}]);
    for (field, value, param) in [
        ("functions", json!([{"name": "f"}]), "functions"),
        ("function_call", json!("auto"), "function_call"),
        ("modalities", json!(["text", "audio"]), "modalities"),
        ("audio", json!({"voice": "alloy"}), "audio"),
    ] {
        let mut body = json!({"messages": msgs, "max_tokens": 2});
        body[field] = value;
        let (st, v) = s.post("/v1/chat/completions", body);
        assert_error(st, &v, 400, Some(param));
    }
    let (st, _) = s.post(
        "/v1/chat/completions",
        json!({"messages": msgs, "max_tokens": 2, "modalities": ["text"]}),
    );
    assert_eq!(st, 200);
}

#[test]
fn repeated_prompts_report_cached_tokens_and_the_cache_can_be_reset() {
    let s = start(&[]);
    let prompt: String = "Once upon a time, there was a little girl named Lily. ".repeat(6);
    let body = json!({"prompt": prompt, "max_tokens": 4, "temperature": 0});
    let cached = |v: &Value| {
        v["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
    };
    let (_, first) = s.post("/v1/completions", body.clone());
    let (_, second) = s.post("/v1/completions", body.clone());
    assert_eq!(cached(&first), 0);
    let prompt_tokens = second["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(cached(&second) >= prompt_tokens - 16, "{second}");
    assert_eq!(first["choices"][0]["text"], second["choices"][0]["text"]);
    // Also in the streamed usage chunk, and in chat.
    let mut sb = body.clone();
    sb["stream"] = json!(true);
    sb["stream_options"] = json!({"include_usage": true});
    let (_, text) = s.post_raw("/v1/completions", &sb.to_string(), None);
    let payloads = sse_payloads(&text);
    let usage: Value = serde_json::from_str(&payloads[payloads.len() - 2]).unwrap();
    assert!(cached(&usage) > 0, "{usage}");
    assert!(s.metric("candela:prefix_cache_hits_total") > 0.0);
    assert!(
        s.metric("candela:prefix_cache_queries_total")
            >= s.metric("candela:prefix_cache_hits_total")
    );
    let (st, _) = s.post("/reset_prefix_cache", json!({}));
    assert_eq!(st, 200);
    let (_, after) = s.post("/v1/completions", body);
    assert_eq!(cached(&after), 0);
    // Turned off, nothing is ever cached.
    let off = start(&["--no-enable-prefix-caching"]);
    let body = json!({"prompt": prompt, "max_tokens": 2});
    off.post("/v1/completions", body.clone());
    let (_, v) = off.post("/v1/completions", body);
    assert_eq!(cached(&v), 0);
}

#[test]
fn several_served_names_all_answer_the_first_is_reported_and_metrics_take_vllm_names() {
    let s = start(&[
        "--served-model-name",
        "alias-a",
        "org/alias-b",
        "--metrics-prefix",
        "vllm",
    ]);
    let (st, models) = s.get("/v1/models");
    assert_eq!(st, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["stories", "alias-a", "org/alias-b"]);
    let (st, one) = s.get("/v1/models/org/alias-b");
    assert_eq!(st, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&one).unwrap()["id"],
        "org/alias-b"
    );
    for name in ["stories", "alias-a", "org/alias-b"] {
        let (st, v) = s.post(
            "/v1/completions",
            json!({"model": name, "prompt": "Once", "max_tokens": 2}),
        );
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["model"], "stories", "responses report the first name");
    }
    let (st, body) = s.post(
        "/v1/completions",
        json!({"model": "gpt-4o", "prompt": "Once", "max_tokens": 2}),
    );
    assert_error(st, &body, 404, Some("model"));
    let msg = body["error"]["message"].as_str().unwrap();
    assert!(
        msg.ends_with("This server serves: `stories`, `alias-a`, `org/alias-b`."),
        "{msg}"
    );
    let (_, metrics) = s.get("/metrics");
    for name in [
        "vllm:num_requests_waiting{model_name=\"stories\"}",
        "vllm:kv_cache_usage_perc{",
        "vllm:request_success_total{finished_reason=\"length\",model_name=\"stories\"} 3",
        "vllm:iteration_tokens_total_count{",
        "vllm:request_prefill_time_seconds_count{model_name=\"stories\"} 3",
        "vllm:cache_config_info{",
        "process_resident_memory_bytes",
    ] {
        assert!(metrics.contains(name), "{name} missing in\n{metrics}");
    }
    assert!(!metrics.contains("candela:"), "{metrics}");
}

#[test]
fn continuous_usage_stats_put_the_usage_so_far_in_every_chunk() {
    let s = server();
    let opts = json!({"include_usage": true, "continuous_usage_stats": true});
    for (path, body) in [
        (
            "/v1/completions",
            json!({"model": "stories", "prompt": "Once upon a time", "max_tokens": 6,
                   "temperature": 0, "ignore_eos": true, "stream": true, "stream_options": opts}),
        ),
        (
            "/v1/chat/completions",
            json!({"model": "stories", "messages": [{"role": "user", "content": "Hi"}],
                   "max_tokens": 6, "temperature": 0, "ignore_eos": true, "stream": true,
                   "stream_options": opts}),
        ),
    ] {
        let (st, text) = s.post_raw(path, &body.to_string(), None);
        assert_eq!(st, 200, "{text}");
        let chunks: Vec<Value> = sse_payloads(&text)
            .iter()
            .filter(|p| *p != "[DONE]")
            .map(|p| serde_json::from_str(p).unwrap())
            .collect();
        let last = chunks.last().unwrap();
        assert!(last["choices"].as_array().unwrap().is_empty(), "{last}");
        let prompt = last["usage"]["prompt_tokens"].as_u64().unwrap();
        assert_eq!(last["usage"]["completion_tokens"], 6);
        let mut seen = 0;
        for c in &chunks {
            let u = &c["usage"];
            assert_eq!(u["prompt_tokens"].as_u64(), Some(prompt), "{path}: {c}");
            let done = u["completion_tokens"].as_u64().unwrap();
            assert!(done >= seen, "{path}: usage went back: {c}");
            assert_eq!(u["total_tokens"].as_u64(), Some(prompt + done));
            seen = done;
        }
        assert_eq!(seen, 6, "{path}");
        // Without the flag, only the last chunk has usage (OpenAI's).
        let mut plain = body.clone();
        plain["stream_options"] = json!({"include_usage": true});
        let (_, text) = s.post_raw(path, &plain.to_string(), None);
        let with_usage = sse_payloads(&text)
            .iter()
            .filter(|p| *p != "[DONE]")
            .filter(|p| !serde_json::from_str::<Value>(p).unwrap()["usage"].is_null())
            .count();
        assert_eq!(with_usage, 1, "{path}");
    }
}
