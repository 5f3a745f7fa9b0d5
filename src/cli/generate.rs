//! `candela generate`: one prompt, greedy, straight through the step runner.

use std::io::Write;

use anyhow::Context;
use clap::Args;

use crate::config::{CacheArgs, ModelArgs};
use crate::models::load_model;
use crate::runner::StepRunner;

#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
    /// The text to continue.
    #[arg(long, default_value = "Once upon a time")]
    pub prompt: String,
    /// Render the prompt as a user message with the model's chat template.
    #[arg(long)]
    pub chat: bool,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Keep going past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let loaded = load_model(&args.model.load_options()?)?;
    tracing::info!(
        "loaded {} in {:.2?}",
        args.model.display_name(),
        started.elapsed()
    );
    let max_len = args.model.max_model_len(loaded.model.as_ref())?;
    let sizing = args.cache.sizing(loaded.model.as_ref(), max_len, 1)?;
    let tok = &loaded.tokenizer;
    let ids = if args.chat {
        let template = tok
            .compile_chat_template(None)?
            .context("this model has no chat template; drop --chat")?;
        let text = template.render(
            &serde_json::json!([{"role": "user", "content": args.prompt}]),
            true,
            &serde_json::json!({}),
        )?;
        tok.encode(&text, false)?
    } else {
        tok.encode(&args.prompt, true)?
    };
    if ids.len() + args.max_tokens > max_len {
        anyhow::bail!(
            "prompt ({} tokens) + max tokens ({}) exceeds the maximum model length {max_len}",
            ids.len(),
            args.max_tokens
        );
    }
    let mut runner = StepRunner::new(loaded.model.as_ref(), sizing)?;
    let mut detok = crate::engine::detokenizer::Detokenizer::new(&ids, true);
    let mut stdout = std::io::stdout();
    let decode_start = std::time::Instant::now();
    let tokens = runner.greedy(loaded.model.as_ref(), 0, &ids, args.max_tokens, |t| {
        if !args.ignore_eos && tok.eos_token_ids.contains(&t) {
            return false;
        }
        let _ = write!(stdout, "{}", detok.push(tok, t));
        let _ = stdout.flush();
        true
    })?;
    println!("{}", detok.flush(tok));
    let secs = decode_start.elapsed().as_secs_f64();
    tracing::info!(
        "{} prompt tokens, {} generated in {secs:.2}s ({:.1} tokens/s)",
        ids.len(),
        tokens.len(),
        tokens.len() as f64 / secs
    );
    Ok(())
}
