//! `candela serve`: load the model, start the engine, serve the HTTP API
//! until SIGTERM/SIGINT, then drain in-flight requests (up to a timeout).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::api::{router, AppState, HttpConfig};
use crate::config::{CacheArgs, EngineArgs, ModelArgs};
use crate::engine::EngineHandle;
use crate::metrics::Metrics;
use crate::model::load_model;

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
    /// Model id in the API (default: the --model value, or stories260K).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Jinja chat template file overriding the model's.
    #[arg(long)]
    pub chat_template: Option<std::path::PathBuf>,
    /// Origins allowed by CORS (repeat or comma-separate; `*` for any). Default: none.
    #[arg(long, value_delimiter = ',')]
    pub allowed_origins: Vec<String>,
    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = 32 << 20)]
    pub max_request_body_bytes: usize,
    /// Seconds to let in-flight requests finish after SIGTERM/SIGINT.
    #[arg(long, default_value_t = 30)]
    pub shutdown_timeout: u64,
}

/// Loads the model, starts the engine and builds the router.
pub fn build_app(args: &ServeArgs) -> anyhow::Result<(axum::Router, Arc<AppState>)> {
    let loaded = load_model(&args.model.load_options()?)?;
    let max_model_len = args.model.max_model_len(loaded.model.as_ref());
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
    let vocab_size = loaded.model.vocab_size();
    let model_name = args
        .served_model_name
        .clone()
        .unwrap_or_else(|| args.model.display_name());
    let engine = EngineHandle::spawn(loaded, sizing, args.engine.engine_config(max_model_len)?)?;
    let state = Arc::new(AppState {
        engine,
        metrics: Arc::new(Metrics::new(&model_name)),
        model_name,
        model_root: args.model.display_name(),
        chat_template,
        max_model_len,
        vocab_size,
        created: crate::api::protocol::unix_now(),
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

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let (app, _state) = build_app(&args)?;
    // Compute runs on the engine thread; the async side only moves bytes.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let addr = format!("{}:{}", args.host, args.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        tracing::info!(
            "serving on http://{} (ready in {:.2?})",
            listener.local_addr()?,
            started.elapsed()
        );
        let timeout = Duration::from_secs(args.shutdown_timeout);
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                shutdown_signal().await;
                tracing::info!("shutting down: finishing in-flight requests (up to {timeout:?})");
                tokio::spawn(async move {
                    tokio::time::sleep(timeout).await;
                    tracing::warn!("shutdown timeout reached; exiting with requests in flight");
                    std::process::exit(0);
                });
            })
            .await?;
        tracing::info!("stopped");
        anyhow::Ok(())
    })
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
