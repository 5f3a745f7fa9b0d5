//! What careless or hostile clients do, over real HTTP: disconnects at any
//! moment, a dead engine, shutdown deadlines, huge prompts and stop strings,
//! slow and piled-up connections, malformed HTTP, limits, and browser
//! cross-origin requests. Each test is the regression test of a defect that
//! once killed or degraded the server.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candela::cli::serve::Exit;
use common::server::*;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// Sends raw bytes, then reads until the server closes or `wait` passes.
fn raw(s: &Server, bytes: &[u8], wait: Duration) -> String {
    let mut c = TcpStream::connect(s.addr).unwrap();
    c.write_all(bytes).unwrap();
    read_until_closed(&mut c, wait)
}

fn read_until_closed(c: &mut TcpStream, wait: Duration) -> String {
    c.set_read_timeout(Some(wait)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match c.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The JSON body of a raw HTTP response, checked to be an OpenAI error.
fn error_body(response: &str, status: u16) -> Value {
    assert!(
        response.starts_with(&format!("HTTP/1.1 {status} ")),
        "expected {status}: {response:?}"
    );
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let v: Value = serde_json::from_str(body).unwrap_or_else(|_| panic!("no JSON: {response:?}"));
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    assert!(v["error"]["type"].is_string(), "{v}");
    v
}

fn request(path: &str, body: &Value, extra_headers: &str) -> Vec<u8> {
    let body = body.to_string();
    format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n{extra_headers}Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A streamed body's events end with `[DONE]`; returns the payloads.
fn stream_events(body: &str) -> Vec<String> {
    let payloads = sse_payloads(body);
    assert_eq!(payloads.last().map(String::as_str), Some("[DONE]"));
    payloads
}

fn normal_request_works(s: &Server) {
    let (st, v) = s.post(
        "/v1/completions",
        json!({"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}),
    );
    assert_eq!(st, 200, "{v}");
    assert!(v["choices"][0]["text"]
        .as_str()
        .unwrap()
        .starts_with(", there was"));
}

#[test]
fn disconnect_storm_with_n_up_to_3_leaves_the_engine_healthy() {
    // A tiny pool (two 500-token prompts at a time) so requests wait, are
    // preempted and fork while clients vanish at random moments, the first
    // token of an n >= 2 request included (that once panicked the engine).
    let s = Arc::new(start(&["--num-kv-blocks", "80", "--block-size", "16"]));
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(t);
                for _ in 0..8 {
                    let body = json!({
                        "prompt": vec![5; rng.random_range(100..500)],
                        "n": rng.random_range(1..=3),
                        "max_tokens": 8,
                        "stream": rng.random_bool(0.5),
                    });
                    let mut c = TcpStream::connect(s.addr).unwrap();
                    c.write_all(&request("/v1/completions", &body, "")).unwrap();
                    if rng.random_bool(0.8) {
                        std::thread::sleep(Duration::from_micros(rng.random_range(0..60_000)));
                    } else {
                        read_until_closed(&mut c, Duration::from_secs(30));
                    }
                    drop(c);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(s.get("/health").0, 200);
    normal_request_works(&s);
    s.wait_idle();
}

#[test]
fn a_dead_engine_fails_every_request_and_says_so() {
    let s = Arc::new(start(&["--max-num-seqs", "1"]));
    let long = json!({"prompt": "Once upon a time", "max_tokens": 500, "ignore_eos": true});
    // One streaming request running, non-streaming ones waiting behind it.
    let mut streamed = agent()
        .post(format!("{}/v1/completions", s.base))
        .header("content-type", "application/json")
        .send({
            let mut b = long.clone();
            b["stream"] = json!(true);
            b.to_string()
        })
        .unwrap();
    let mut reader = streamed.body_mut().as_reader();
    let mut first = [0u8; 8];
    reader.read_exact(&mut first).unwrap();
    let waiting: Vec<_> = (0..3)
        .map(|_| {
            let s = s.clone();
            let body = long.clone();
            std::thread::spawn(move || s.post("/v1/completions", body))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.metric("candela:num_requests_waiting") < 3.0 {
        assert!(Instant::now() < deadline, "requests did not queue");
        std::thread::sleep(Duration::from_millis(5));
    }

    s.state.engine.inject_panic_for_tests();

    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    let events = stream_events(&format!(
        "data: {}",
        &rest[rest.find("\n\n").unwrap() + 2..]
    ));
    let error = &events[events.len() - 2];
    assert!(
        error.contains("\"error\"") && error.contains("the engine has stopped"),
        "{error}"
    );
    for t in waiting {
        let (st, v) = t.join().unwrap();
        assert_error(st, &v, 503, None);
    }
    // Until it exits, the server says what is wrong.
    let (st, body) = s.get("/health");
    assert_error(st, &serde_json::from_str(&body).unwrap(), 503, None);
    for _ in 0..20 {
        let (st, v) = s.post("/v1/completions", json!({"prompt": "x", "max_tokens": 1}));
        assert_error(st, &v, 503, None);
    }
    assert_eq!(s.wait_exit(Duration::from_secs(20)), Exit::EngineFailed);
}

#[test]
fn the_shutdown_deadline_ends_open_requests_with_errors() {
    let s = Arc::new(start(&["--max-num-seqs", "1", "--shutdown-timeout", "1"]));
    // Far more work than the 1 s deadline allows, on any machine: the
    // embedded model decodes thousands of tokens a second, and 12 requests
    // of 500 tokens (the first version) could all finish inside it.
    let long = json!({"prompt": "Once upon a time", "max_tokens": 500, "ignore_eos": true});
    let clients: Vec<_> = (0..48)
        .map(|i| {
            let s = s.clone();
            let mut body = long.clone();
            body["stream"] = json!(i % 2 == 0);
            std::thread::spawn(move || s.post_raw("/v1/completions", &body.to_string(), None))
        })
        .collect();
    // Shut down once the server has seen every request (finished, running or
    // waiting): a client still connecting would find the listener closed.
    let deadline = Instant::now() + Duration::from_secs(20);
    let seen = |s: &Server| {
        [
            "num_requests_running",
            "num_requests_waiting",
            "request_success_total",
        ]
        .iter()
        .map(|m| s.metric(&format!("candela:{m}")).max(0.0))
        .sum::<f64>()
    };
    while seen(&s) < 48.0 {
        assert!(Instant::now() < deadline, "requests did not queue");
        std::thread::sleep(Duration::from_millis(5));
    }
    s.signal_shutdown();
    let (mut cut_streams, mut refused) = (0, 0);
    for (i, c) in clients.into_iter().enumerate() {
        let (st, body) = c.join().unwrap();
        if i % 2 == 0 {
            assert_eq!(st, 200);
            let events = stream_events(&body);
            if body.contains("\"error\"") {
                assert!(body.contains("the server is shutting down"), "{body}");
                cut_streams += 1;
            } else {
                assert!(events[events.len() - 2].contains("\"finish_reason\":\"length\""));
            }
        } else if st != 200 {
            assert_error(st, &serde_json::from_str(&body).unwrap(), 503, None);
            refused += 1;
        }
    }
    assert!(cut_streams > 0 && refused > 0, "{cut_streams} {refused}");
    assert_eq!(s.wait_exit(Duration::from_secs(20)), Exit::Aborted);
    assert!(
        TcpStream::connect(s.addr).is_err(),
        "the listener is closed"
    );
}

#[test]
fn a_shutdown_with_nothing_in_flight_drains_cleanly() {
    let s = start(&[]);
    normal_request_works(&s);
    s.signal_shutdown();
    assert_eq!(s.wait_exit(Duration::from_secs(20)), Exit::Drained);
}

#[test]
fn huge_prompts_neither_stall_the_server_nor_reach_the_tokenizer() {
    let s = Arc::new(start(&[]));
    let huge = "Once upon a time ".repeat(10 << 20 >> 4);
    // Can never fit 512 tokens: refused before tokenizing.
    let (st, v) = s.post("/v1/completions", json!({"prompt": huge, "max_tokens": 1}));
    assert_error(st, &v, 400, Some("prompt"));
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("maximum context length is 512 tokens"));
    // /tokenize has no context limit: it tokenizes, on the blocking pool.
    let done = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..3)
        .map(|_| {
            let (s, huge, done) = (s.clone(), huge.clone(), done.clone());
            std::thread::spawn(move || {
                let mut resp = agent()
                    .post(format!("{}/tokenize", s.base))
                    .header("content-type", "application/json")
                    .send(json!({"prompt": huge}).to_string())
                    .unwrap();
                let body = resp
                    .body_mut()
                    .with_config()
                    .limit(1 << 30)
                    .read_to_string()
                    .unwrap();
                done.store(true, Ordering::SeqCst);
                let v: Value = serde_json::from_str(&body).unwrap();
                (resp.status().as_u16(), v["count"].as_u64().unwrap_or(0))
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(s.get("/health").0, 200);
    assert!(
        !done.load(Ordering::SeqCst),
        "/health answered only after the tokenizer finished"
    );
    for w in workers {
        let (st, count) = w.join().unwrap();
        assert_eq!(st, 200);
        assert!(count > 2_000_000, "{count} tokens");
    }
}

#[test]
fn stop_strings_are_bounded() {
    let s = server();
    let many: Vec<String> = (0..17).map(|i| format!("s{i}")).collect();
    let (st, v) = s.post("/v1/completions", json!({"prompt": "Once", "stop": many}));
    assert_error(st, &v, 400, Some("stop"));
    let (st, v) = s.post(
        "/v1/completions",
        json!({"prompt": "Once", "stop": ["a".repeat(1025)]}),
    );
    assert_error(st, &v, 400, Some("stop"));
    // At the bounds, a request is served.
    let sixteen: Vec<String> = (0..16)
        .map(|i| format!("{}{i}", "z".repeat(1000)))
        .collect();
    let (st, v) = s.post(
        "/v1/completions",
        json!({"prompt": "Once upon a time", "stop": sixteen, "max_tokens": 8, "temperature": 0}),
    );
    assert_eq!(st, 200, "{v}");
}

#[test]
fn slow_clients_are_cut_off() {
    let s = start(&["--http-read-timeout", "1"]);
    // Headers that never finish: the connection is closed.
    let mut c = TcpStream::connect(s.addr).unwrap();
    c.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let started = Instant::now();
    let got = read_until_closed(&mut c, Duration::from_secs(10));
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "not closed: {got:?}"
    );
    // An idle kept-alive connection is closed too.
    let mut c = TcpStream::connect(s.addr).unwrap();
    let started = Instant::now();
    assert_eq!(read_until_closed(&mut c, Duration::from_secs(10)), "");
    assert!(started.elapsed() < Duration::from_secs(9));
    // A body that stops arriving: 408 with an error object.
    let mut c = TcpStream::connect(s.addr).unwrap();
    c.write_all(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"prompt\":",
    )
    .unwrap();
    error_body(&read_until_closed(&mut c, Duration::from_secs(10)), 408);
    // A declared body over the limit: 413 before a byte of it is sent.
    let got = raw(
        &s,
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n",
        Duration::from_secs(5),
    );
    error_body(&got, 413);
}

#[test]
fn connections_over_the_limit_are_refused_at_once() {
    let s = start(&["--max-connections", "4"]);
    let held: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(s.addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let got = raw(
        &s,
        b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_secs(5),
    );
    let v = error_body(&got, 503);
    assert!(v["error"]["message"]
        .as_str()
        .unwrap()
        .contains("--max-connections"));
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(10);
    while s
        .post_raw("/v1/completions", "{\"prompt\": \"Once\"}", None)
        .0
        != 200
    {
        assert!(Instant::now() < deadline, "connections were not given back");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn every_error_has_an_openai_body_whichever_layer_made_it() {
    let s = server();
    // The router's 405, with the allowed method named.
    let got = raw(
        s,
        b"GET /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    error_body(&got, 405);
    assert!(got.to_ascii_lowercase().contains("allow: post"), "{got}");
    // hyper's own answers to requests it cannot parse.
    error_body(&raw(s, b"GARBAGE\r\n\r\n", Duration::from_secs(5)), 400);
    let many_headers: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    let got = raw(
        s,
        format!("GET /health HTTP/1.1\r\nHost: x\r\n{many_headers}\r\n").as_bytes(),
        Duration::from_secs(5),
    );
    error_body(&got, 431);
    let long_uri = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70_000));
    error_body(&raw(s, long_uri.as_bytes(), Duration::from_secs(5)), 414);
    // Not JSON at all, and a body that is not the JSON it claims.
    let got = raw(
        s,
        &request("/v1/completions", &json!("just a string"), ""),
        Duration::from_secs(5),
    );
    error_body(&got, 400);
}

#[test]
fn tiny_temperatures_are_greedy() {
    let s = server();
    let greedy = s
        .post(
            "/v1/completions",
            json!({"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0}),
        )
        .1;
    for t in [1e-39, 1e-30, 1e-6] {
        let (st, v) = s.post(
            "/v1/completions",
            json!({"prompt": "Once upon a time", "max_tokens": 24, "temperature": t}),
        );
        assert_eq!(st, 200, "{v}");
        assert_eq!(
            v["choices"][0]["text"], greedy["choices"][0]["text"],
            "T = {t}"
        );
    }
}

#[test]
fn request_size_limits_are_400s_naming_the_parameter() {
    let s = server();
    let prompts: Vec<&str> = vec!["Once"; 1025];
    let (st, v) = s.post(
        "/v1/completions",
        json!({"prompt": prompts, "max_tokens": 1}),
    );
    assert_error(st, &v, 400, Some("prompt"));
    let prompts: Vec<&str> = vec!["Once"; 100];
    let (st, v) = s.post(
        "/v1/completions",
        json!({"prompt": prompts, "n": 128, "max_tokens": 1}),
    );
    assert_error(st, &v, 400, Some("n"));
    let (st, v) = s.post(
        "/v1/chat/completions",
        json!({"messages": [{"role": "user", "content": "hi"}], "n": 1025}),
    );
    assert_error(st, &v, 400, Some("n"));
}

#[test]
fn echoed_logprob_offsets_index_the_returned_text() {
    let s = server();
    let check = |choice: &Value| {
        let text = choice["text"].as_str().unwrap();
        let chars: Vec<char> = text.chars().collect();
        let lp = &choice["logprobs"];
        let tokens = lp["tokens"].as_array().unwrap();
        let offsets: Vec<usize> = lp["text_offset"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(tokens.len(), offsets.len());
        assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "{offsets:?}");
        for (t, &o) in tokens.iter().zip(&offsets) {
            let t = t.as_str().unwrap();
            assert!(o <= chars.len());
            if t == "<s>" {
                continue; // BOS has no text
            }
            let at: String = chars[o..].iter().collect();
            // A word's first token may carry the space SentencePiece puts before it.
            assert!(
                at.starts_with(t) || (o == 0 && at.starts_with(t.trim_start())),
                "token {t:?} at {o} in {text:?}"
            );
        }
        offsets
    };
    for prompt in [json!("Once upon a time"), json!([1, 403, 407, 261, 378])] {
        let body = json!({"prompt": prompt, "max_tokens": 12, "temperature": 0,
                          "echo": true, "logprobs": 1});
        let (st, v) = s.post("/v1/completions", body.clone());
        assert_eq!(st, 200, "{v}");
        let offsets = check(&v["choices"][0]);
        // Streaming gives the same offsets.
        let mut sb = body;
        sb["stream"] = json!(true);
        let (_, text) = s.post_raw("/v1/completions", &sb.to_string(), None);
        let streamed: Vec<usize> = sse_payloads(&text)
            .iter()
            .filter(|p| p.as_str() != "[DONE]")
            .flat_map(|p| {
                let v: Value = serde_json::from_str(p).unwrap();
                v["choices"][0]["logprobs"]["text_offset"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .map(|o| o.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(streamed, offsets);
    }
}

#[test]
fn browsers_from_other_origins_are_refused() {
    let s = server();
    let post = |origin: Option<&str>, content_type: Option<&str>| {
        let mut headers = String::new();
        if let Some(o) = origin {
            headers.push_str(&format!("Origin: {o}\r\n"));
        }
        if let Some(c) = content_type {
            headers.push_str(&format!("Content-Type: {c}\r\n"));
        }
        let body = "{\"prompt\": \"Once\", \"max_tokens\": 1}";
        raw(
            s,
            format!(
                "POST /v1/completions HTTP/1.1\r\nHost: {}\r\n{headers}Content-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                s.addr,
                body.len()
            )
            .as_bytes(),
            Duration::from_secs(5),
        )
    };
    // The drive-by: a "simple" cross-origin POST that needs no preflight.
    let got = post(Some("http://evil.example"), Some("text/plain"));
    assert_eq!(error_body(&got, 403)["error"]["code"], "origin_not_allowed");
    // curl with no Content-Type, and the server's own origin, are fine.
    assert!(post(None, None).starts_with("HTTP/1.1 200"));
    let own = format!("http://{}", s.addr);
    assert!(post(Some(&own), None).starts_with("HTTP/1.1 200"));
    // A refused preflight is an error object too.
    let preflight = |s: &Server, origin: &str| {
        raw(
            s,
            format!(
                "OPTIONS /v1/completions HTTP/1.1\r\nHost: x\r\nOrigin: {origin}\r\n\
                 Access-Control-Request-Method: POST\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
            Duration::from_secs(5),
        )
    };
    error_body(&preflight(s, "http://evil.example"), 403);
    let allowed = start(&["--allowed-origins", "http://app.example"]);
    let ok = preflight(&allowed, "http://app.example");
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok
        .to_ascii_lowercase()
        .contains("access-control-allow-origin: http://app.example"));
    error_body(&preflight(&allowed, "http://evil.example"), 403);
}
