//! The `candela` command line.

use std::io::Write;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use candela::config::{CacheArgs, ModelArgs};
use candela::model::load_model;
use candela::runner::StepRunner;

#[derive(Debug, Parser)]
#[command(
    name = "candela",
    version,
    about = "An OpenAI-compatible LLM inference server"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load a model and greedily continue a prompt, printing tokens as they come.
    Generate {
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        cache: CacheArgs,
        /// The text to continue.
        #[arg(long, default_value = "Once upon a time")]
        prompt: String,
        /// Render the prompt as a user message with the model's chat template.
        #[arg(long)]
        chat: bool,
        /// Most tokens to generate.
        #[arg(long, default_value_t = 64)]
        max_tokens: usize,
        /// Keep going past end-of-sequence tokens.
        #[arg(long)]
        ignore_eos: bool,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(Cli::parse()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate {
            model,
            cache,
            prompt,
            chat,
            max_tokens,
            ignore_eos,
        } => {
            let started = std::time::Instant::now();
            let loaded = load_model(&model.load_options()?)?;
            tracing::info!("loaded {} in {:.2?}", model.model, started.elapsed());
            let max_len = model.max_model_len(loaded.model.as_ref());
            let sizing = cache.sizing(loaded.model.as_ref(), max_len)?;
            let tok = &loaded.tokenizer;
            let ids = if chat {
                let template = tok
                    .compile_chat_template(None)?
                    .context("this model has no chat template; drop --chat")?;
                let text = template.render(
                    &serde_json::json!([{"role": "user", "content": prompt}]),
                    true,
                    &serde_json::json!({}),
                )?;
                tok.encode(&text, false)?
            } else {
                tok.encode(&prompt, true)?
            };
            if ids.len() + max_tokens > max_len {
                anyhow::bail!(
                    "prompt ({} tokens) + max tokens ({max_tokens}) exceeds the maximum model length {max_len}",
                    ids.len()
                );
            }
            let mut runner = StepRunner::new(loaded.model.as_ref(), sizing)?;
            let mut out = Vec::new();
            let mut printed = 0;
            let mut stdout = std::io::stdout();
            let decode_start = std::time::Instant::now();
            let tokens = runner.greedy(loaded.model.as_ref(), 0, &ids, max_tokens, |t| {
                if !ignore_eos && tok.eos_token_ids.contains(&t) {
                    return false;
                }
                out.push(t);
                // Print only complete characters: decode everything, emit the new tail.
                if let Ok(text) = tok.decode(&out, true) {
                    if !text.ends_with('\u{FFFD}') && text.len() > printed {
                        let _ = write!(stdout, "{}", &text[printed..]);
                        let _ = stdout.flush();
                        printed = text.len();
                    }
                }
                true
            })?;
            println!();
            let secs = decode_start.elapsed().as_secs_f64();
            tracing::info!(
                "{} prompt tokens, {} generated in {secs:.2}s ({:.1} tokens/s)",
                ids.len(),
                tokens.len(),
                tokens.len() as f64 / secs
            );
            Ok(())
        }
    }
}
