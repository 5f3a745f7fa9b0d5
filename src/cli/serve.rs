//! `candela serve`: load the model, start the engine, serve the HTTP API
//! until SIGTERM/SIGINT, then drain in-flight requests (up to a timeout).
//!
//! Exit codes: 0 after a signal once every in-flight request finished; 3
//! after a signal when the shutdown timeout ended requests still in flight
//! (each got an error: an SSE error event and `[DONE]`, or a 503); 70 when
//! the engine thread failed (a bug: every in-flight request got an error,
//! and exiting lets Kubernetes or the container runtime restart the
//! server); 1 for errors at start (bad flags, a model that does not load);
//! 2 for command-line usage errors.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::api::guard::BodyLimits;
use crate::api::server::{self, ServerConfig};
use crate::api::{router, AppState, HttpConfig};
use crate::config::{CacheArgs, EngineArgs, ModelArgs};
use crate::engine::EngineHandle;
use crate::metrics::Metrics;
use crate::models::load_model;

#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct ServeArgs {
    /// TOML file with any of these settings (keys in snake_case, e.g. max_num_seqs = 64);
    /// flags on the command line override it.
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    #[command(flatten)]
    #[serde(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub cache: CacheArgs,
    #[command(flatten)]
    #[serde(flatten)]
    pub engine: EngineArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// API keys accepted as `Authorization: Bearer <key>` (repeat, or comma-separate).
    #[arg(long, env = "CANDELA_API_KEY", value_delimiter = ',')]
    pub api_key: Vec<String>,
    /// Prefix of the engine's Prometheus metrics: `candela` (`candela:num_requests_waiting`,
    /// ...) or, for routers and dashboards that know only vLLM's names, `vllm`.
    #[arg(long, default_value = "candela", value_parser = parse_metrics_prefix)]
    pub metrics_prefix: String,
    /// Model ids in the API (default: the --model value, or stories260K). Several names are
    /// all accepted in `model` and listed by /v1/models; responses report the first.
    #[arg(long, num_args = 1..)]
    pub served_model_name: Vec<String>,
    /// Jinja chat template file overriding the model's.
    #[arg(long)]
    pub chat_template: Option<std::path::PathBuf>,
    /// Let `tool_choice: "auto"` (the default when tools are given) parse the model's own
    /// tool calls (vLLM's flag); needs a --tool-call-parser or a template that describes calls.
    #[arg(long)]
    pub enable_auto_tool_choice: bool,
    /// The model's tool-call syntax for "auto": hermes (Qwen, Hermes), llama3_json, mistral.
    /// Default: guessed from the chat template.
    #[arg(long)]
    pub tool_call_parser: Option<String>,
    /// Split a thinking model's `<think>...</think>` into `reasoning_content`:
    /// deepseek_r1 or qwen3.
    #[arg(long)]
    pub reasoning_parser: Option<String>,
    /// Origins allowed by CORS (repeat or comma-separate; `*` for any). Default: none.
    #[arg(long, value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// Largest request body accepted, in bytes (a larger declared Content-Length
    /// is refused with 413 before anything is read).
    #[arg(long, default_value_t = 32 << 20)]
    pub max_request_body_bytes: usize,
    /// Seconds a client has to send a request's headers, and again its body; also
    /// how long an idle kept-alive connection stays open.
    #[arg(long, default_value_t = 30)]
    pub http_read_timeout: u64,
    /// Connections served at once; more are answered at once with 503 and closed.
    #[arg(long, default_value_t = 4096)]
    pub max_connections: usize,
    /// Seconds to let in-flight requests finish after SIGTERM/SIGINT; then they are
    /// ended with an error and the server exits with code 3.
    #[arg(long, default_value_t = 30)]
    pub shutdown_timeout: u64,
}

/// How the server ended; the process exits with its code (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Stopped by a signal; every in-flight request finished.
    Drained = 0,
    /// Stopped by a signal; the shutdown timeout ended requests in flight.
    Aborted = 3,
    /// The engine thread failed.
    EngineFailed = 70,
}

/// Time for the last responses (errors) to go out once the engine has ended
/// or the shutdown deadline has passed; a client that does not read them
/// does not hold the process any longer.
const FINAL_FLUSH: Duration = Duration::from_secs(5);

/// How long a server whose engine has died keeps answering (`/health` and
/// every request with 503) before it exits, so that probes and load
/// balancers see why it goes away rather than only a refused connection.
const DEAD_ENGINE_LINGER: Duration = Duration::from_secs(2);

impl ServeArgs {
    fn server_config(&self) -> ServerConfig {
        ServerConfig {
            max_connections: self.max_connections,
            read_timeout: Duration::from_secs(self.http_read_timeout.max(1)),
        }
    }
}

/// Loads the model, starts the engine and builds the router.
pub fn build_app(args: &ServeArgs) -> anyhow::Result<(axum::Router, Arc<AppState>)> {
    let loaded = load_model(&args.model.load_options()?)?;
    let max_model_len = args.model.max_model_len(loaded.model.as_ref())?;
    let sizing = args.cache.sizing(
        loaded.model.as_ref(),
        max_model_len,
        args.engine.max_num_seqs,
    )?;
    let template_src = match &args.chat_template {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("reading --chat-template {}", p.display()))?,
        ),
        None => None,
    };
    let chat_template = loaded
        .tokenizer
        .compile_chat_template(template_src.as_deref())?;
    if chat_template.is_none() {
        tracing::warn!("the model has no chat template: /v1/chat/completions will answer 400 (see --chat-template)");
    }
    let vocab_size = loaded.model.spec().vocab_size;
    let served_names: Vec<String> = if args.served_model_name.is_empty() {
        vec![args.model.display_name()]
    } else {
        args.served_model_name.clone()
    };
    let model_name = served_names[0].clone();
    let mut engine_cfg = args.engine.engine_config(max_model_len)?;
    // A recurrent state is not in blocks of tokens, and an encoder's keys
    // depend on the whole input: nothing to share.
    let cacheable = loaded.model.spec().supports_prefix_caching();
    if args.cache.prefix_caching() && !cacheable {
        tracing::info!(
            "prefix caching is off: {} keeps a recurrent state or an encoder's output, \
             not per-token blocks that depend only on the tokens before",
            loaded.model.spec().architecture
        );
    }
    engine_cfg.enable_prefix_caching = args.cache.prefix_caching() && cacheable;
    let memory = crate::metrics::MemoryInfo {
        block_size: sizing.block_size,
        num_blocks: sizing.num_blocks,
        cache_dtype: sizing
            .dtype
            .unwrap_or(loaded.model.spec().dtype.into())
            .name()
            .into(),
        prefix_caching: engine_cfg.enable_prefix_caching,
        kv_cache_bytes: sizing.total_bytes(),
        weights_bytes: loaded.resident_bytes.unwrap_or(0),
    };
    let expert_stats = loaded.model.expert_stats();
    let engine = EngineHandle::spawn(loaded, sizing, engine_cfg)?;
    let grammars = crate::engine::grammar::GrammarCompiler::new(engine.tokenizer_arc(), vocab_size);
    let parser = match &args.tool_call_parser {
        Some(name) => Some(crate::api::tools::ParserKind::from_name(name)?),
        None => chat_template
            .as_ref()
            .and_then(|t| crate::api::tools::ParserKind::from_template(t.source())),
    };
    let tools = crate::api::tools::ToolConfig {
        auto: args.enable_auto_tool_choice,
        parser,
    };
    if tools.auto && tools.parser.is_none() {
        anyhow::bail!(
            "--enable-auto-tool-choice needs a --tool-call-parser ({}): the chat template does \
             not show which tool-call syntax the model uses",
            crate::api::tools::ParserKind::NAMES
        );
    }
    let reasoning = args
        .reasoning_parser
        .as_deref()
        .map(crate::api::reasoning::ReasoningKind::from_name)
        .transpose()?;
    let state = Arc::new(AppState {
        metrics: {
            let mut m = Metrics::with_prefix(&model_name, &args.metrics_prefix);
            let steps = m.iteration_tokens();
            engine.observe_steps(move |n| steps.observe(n as f64));
            m.set_memory(&memory);

            if let Some(stats) = expert_stats {
                m.set_expert_stats(stats);
            }
            Arc::new(m)
        },
        engine,
        model_name,
        served_names,
        model_root: args.model.display_name(),
        chat_template,
        max_model_len,
        vocab_size,
        created: crate::api::protocol::unix_now(),
        body_limits: BodyLimits {
            max_bytes: args.max_request_body_bytes,
            read_timeout: Duration::from_secs(args.http_read_timeout.max(1)),
        },
        max_seqs_per_request: args.engine.max_seqs_per_request,
        preprocess: AppState::preprocess_permits(),
        utility: AppState::preprocess_permits(),
        grammars,
        tools,
        reasoning,
        memory,
        history: Default::default(),
        api_keys: args
            .api_key
            .iter()
            .filter(|k| !k.is_empty())
            .cloned()
            .collect(),
    });
    let app = router(
        state.clone(),
        &HttpConfig {
            allowed_origins: args.allowed_origins.clone(),
            max_body_bytes: args.max_request_body_bytes,
        },
    );
    Ok((app, state))
}

/// A Prometheus metric name's first part: letters, digits and `_`, not
/// starting with a digit.
fn parse_metrics_prefix(s: &str) -> Result<String, String> {
    let ok = s
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "{s:?} is not a metric name prefix (letters, digits and _, e.g. candela or vllm)"
        ))
    }
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    raise_fd_limit(args.max_connections);
    let (app, state) = build_app(&args)?;
    // Compute runs on the engine thread and tokenization on the blocking
    // pool; the async side only moves bytes.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let exit = rt.block_on(async move {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        tracing::info!(
            "serving on http://{} (ready in {:.2?})",
            listener.local_addr()?,
            started.elapsed()
        );
        anyhow::Ok(serve_until_stopped(listener, app, &state, &args, shutdown_signal()).await)
    })?;
    // Handlers still waiting on the blocking pool must not hold the exit.
    rt.shutdown_timeout(Duration::from_millis(100));
    tracing::info!("stopped ({exit:?}, exit code {})", exit as i32);
    if exit != Exit::Drained {
        std::process::exit(exit as i32);
    }
    Ok(())
}

/// Serves `app` until `signal` resolves or the engine ends, then drains:
/// after a signal, in-flight requests get `--shutdown-timeout` to finish and
/// are then ended with an error; after the engine's end, every request has
/// its error already and only the responses are let out.
pub async fn serve_until_stopped(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    state: &Arc<AppState>,
    args: &ServeArgs,
    signal: impl std::future::Future<Output = ()>,
) -> Exit {
    crate::api::dashboard::spawn_sampler(state);
    enum Why {
        Signal,
        EngineEnded,
    }
    let engine = state.engine.clone();
    let stop = async {
        tokio::select! {
            () = signal => Why::Signal,
            () = async {
                engine.stopped().await;
                tokio::time::sleep(DEAD_ENGINE_LINGER).await;
            } => Why::EngineEnded,
        }
    };
    let (connections, why) = server::serve(listener, app, args.server_config(), stop).await;
    let drained = connections.shutdown();
    let mut drained = std::pin::pin!(drained);
    let exit = match why {
        Why::Signal => {
            let timeout = Duration::from_secs(args.shutdown_timeout);
            tracing::info!("shutting down: finishing in-flight requests (up to {timeout:?})");
            if tokio::time::timeout(timeout, &mut drained).await.is_ok() {
                Exit::Drained
            } else {
                tracing::warn!("shutdown timeout reached: ending the requests still in flight");
                state.engine.shut_down_now();
                let _ = tokio::time::timeout(FINAL_FLUSH, &mut drained).await;
                Exit::Aborted
            }
        }
        Why::EngineEnded => {
            tracing::error!("the engine has stopped; exiting so that the server is restarted");
            let _ = tokio::time::timeout(FINAL_FLUSH, &mut drained).await;
            Exit::EngineFailed
        }
    };
    if state.engine.is_alive() {
        exit
    } else {
        Exit::EngineFailed
    }
}

/// Raises the soft limit on open files to the hard one, so that
/// `--max-connections` connections (plus the model's files and the like) fit;
/// warns when they still do not.
fn raise_fd_limit(max_connections: usize) {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if (limit as usize) < max_connections.saturating_add(64) => tracing::warn!(
            "the open-file limit is {limit}: fewer than --max-connections {max_connections} \
             connections can be served; raise it (ulimit -n) or lower --max-connections"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!("could not raise the open-file limit: {e}"),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
