//! A real server on an ephemeral port, in-process, for the HTTP tests.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use candela::cli::{Cli, Command};
use clap::Parser;
use serde_json::Value;

use super::repo_path;

pub struct Server {
    pub base: String,
    pub addr: std::net::SocketAddr,
    /// Resolves the server's shutdown signal (as SIGTERM would).
    stop: std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    /// The server's exit, once it has stopped.
    exit: std::sync::Mutex<std::sync::mpsc::Receiver<candela::cli::serve::Exit>>,
    pub state: std::sync::Arc<candela::api::AppState>,
}

/// Starts `candela serve` in-process with extra flags; returns its base URL.
pub fn start(extra: &[&str]) -> Server {
    start_model("models/stories260K", extra)
}

/// The same with another model (a path relative to the repository).
pub fn start_model(model: &str, extra: &[&str]) -> Server {
    let model = repo_path(model);
    let template = repo_path("tests/fixtures/chatml.jinja");
    let mut argv = vec![
        "candela".to_string(),
        "serve".into(),
        "--model".into(),
        model.to_str().unwrap().into(),
        "--served-model-name".into(),
        "stories".into(),
        "--kv-cache-memory".into(),
        "32MiB".into(),
        "--chat-template".into(),
        template.to_str().unwrap().into(),
    ];
    argv.extend(extra.iter().map(|s| s.to_string()));
    let Command::Serve(args) = Cli::parse_from(argv).command else {
        unreachable!()
    };
    let (app, state) = candela::cli::serve::build_app(&args).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (exit_tx, exit_rx) = std::sync::mpsc::channel();
    let served = state.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let exit = rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            let signal = async {
                // A dropped sender (the test ended) is no signal.
                if stop_rx.await.is_err() {
                    std::future::pending::<()>().await;
                }
            };
            candela::cli::serve::serve_until_stopped(listener, app, &served, &args, signal).await
        });
        let _ = exit_tx.send(exit);
        rt.shutdown_timeout(Duration::from_millis(100));
    });
    let addr = rx.recv().unwrap();
    Server {
        base: format!("http://{addr}"),
        addr,
        stop: std::sync::Mutex::new(Some(stop_tx)),
        exit: std::sync::Mutex::new(exit_rx),
        state,
    }
}

impl Server {
    /// Sends the shutdown signal (what SIGTERM does).
    pub fn signal_shutdown(&self) {
        if let Some(tx) = self.stop.lock().unwrap().take() {
            let _ = tx.send(());
        }
    }

    /// How the server ended; waits up to `within` for it.
    pub fn wait_exit(&self, within: Duration) -> candela::cli::serve::Exit {
        self.exit
            .lock()
            .unwrap()
            .recv_timeout(within)
            .expect("the server did not stop in time")
    }

    /// The value of a metric (summed over its labels), or -1 if absent.
    pub fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        let values: Vec<f64> = text
            .lines()
            .filter(|l| {
                l.starts_with(name)
                    && matches!(l.as_bytes().get(name.len()), Some(b' ') | Some(b'{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        if values.is_empty() {
            -1.0
        } else {
            values.iter().sum()
        }
    }

    /// Waits until nothing runs, waits or holds a KV block.
    pub fn wait_idle(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.metric("candela:num_requests_running") == 0.0
                && self.metric("candela:num_requests_waiting") == 0.0
                && self.metric("candela:kv_cache_usage_perc") == 0.0
            {
                return;
            }
            assert!(Instant::now() < deadline, "the server did not become idle");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

impl Server {
    pub fn post_raw(&self, path: &str, body: &str, key: Option<&str>) -> (u16, String) {
        let mut req = agent()
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json");
        if let Some(k) = key {
            req = req.header("authorization", format!("Bearer {k}"));
        }
        let mut resp = req.send(body).unwrap();
        (
            resp.status().as_u16(),
            resp.body_mut().read_to_string().unwrap(),
        )
    }

    pub fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let (status, text) = self.post_raw(path, &body.to_string(), None);
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        let mut resp = agent().get(format!("{}{path}", self.base)).call().unwrap();
        (
            resp.status().as_u16(),
            resp.body_mut().read_to_string().unwrap(),
        )
    }
}

pub fn server() -> &'static Server {
    static S: std::sync::OnceLock<Server> = std::sync::OnceLock::new();
    S.get_or_init(|| start(&[]))
}

pub fn assert_error(status: u16, body: &Value, want_status: u16, param: Option<&str>) {
    assert_eq!(status, want_status, "{body}");
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(e["type"].is_string(), "{body}");
    assert!(
        e.get("code").is_some() && e.get("param").is_some(),
        "{body}"
    );
    if let Some(p) = param {
        assert_eq!(e["param"], p, "{body}");
    }
}

/// Parses an SSE body at the byte level: every event is exactly `data: <payload>\n\n`.
pub fn sse_payloads(body: &str) -> Vec<String> {
    assert!(
        body.ends_with("data: [DONE]\n\n"),
        "stream must end with [DONE]: {body:?}"
    );
    let events: Vec<&str> = body.split_terminator("\n\n").collect();
    events
        .iter()
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("bad SSE event {e:?}"))
                .to_string()
        })
        .inspect(|p| assert!(!p.contains('\n'), "one line per event"))
        .collect()
}
