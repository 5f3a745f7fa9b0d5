//! `candela bench`: offline throughput of the engine at several concurrency
//! levels (all requests of a level submitted at once, fixed input and output
//! lengths, EOS ignored), printed as a Markdown table.

use std::time::Instant;

use clap::Args;
use rand::{Rng, SeedableRng};

use crate::config::{CacheArgs, EngineArgs, ModelArgs};
use crate::engine::{EngineEvent, EngineHandle, GenerateRequest};
use crate::models::load_model;

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub cache: CacheArgs,
    #[command(flatten)]
    pub engine: EngineArgs,
    /// Concurrency levels, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1usize, 8, 32, 64])]
    pub concurrency: Vec<usize>,
    /// Prompt length in tokens (random ids).
    #[arg(long, default_value_t = 128)]
    pub input_len: usize,
    /// Generated tokens per request.
    #[arg(long, default_value_t = 128)]
    pub output_len: usize,
    /// Constrain every request's output to this JSON schema (a file), to
    /// measure structured outputs; pick one that cannot end before
    /// --output-len (e.g. an array with a large minItems).
    #[arg(long)]
    pub json_schema: Option<std::path::PathBuf>,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let loaded = load_model(&args.model.load_options()?)?;
    let vocab = loaded.model.spec().vocab_size as u32;
    let max_len = args.model.max_model_len(loaded.model.as_ref())?;
    let sizing = args
        .cache
        .sizing(loaded.model.as_ref(), max_len, args.engine.max_num_seqs)?;
    let grammar = match &args.json_schema {
        Some(path) => {
            let schema: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
            let compiler = crate::engine::grammar::GrammarCompiler::new(
                std::sync::Arc::new(loaded.tokenizer.clone()),
                loaded.model.spec().vocab_size,
            );
            let spec = crate::engine::grammar::GrammarSpec::JsonSchema(schema);
            Some(compiler.compile(&spec).map_err(anyhow::Error::msg)?)
        }
        None => None,
    };
    let mut engine_cfg = args.engine.engine_config(max_len)?;
    engine_cfg.enable_prefix_caching = args.cache.prefix_caching();
    let engine = EngineHandle::spawn(loaded, sizing, engine_cfg)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);

    println!("| concurrency | requests | output tokens | wall s | output tok/s | mean TTFT s | mean TPOT ms |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for &c in &args.concurrency {
        let start = Instant::now();
        let streams = (0..c)
            .map(|_| {
                let prompt: Vec<u32> = (0..args.input_len)
                    .map(|_| rng.random_range(100..vocab))
                    .collect();
                let mut req = GenerateRequest::greedy(prompt, args.output_len);
                req.stop.ignore_eos = true;
                req.grammar = grammar.clone();
                engine.submit(req).map_err(anyhow::Error::from)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let (mut tokens, mut ttft, mut tpot) = (0usize, 0f64, 0f64);
        for mut s in streams {
            while let Some(ev) = s.blocking_next() {
                if let EngineEvent::Done { usage, timings } = ev {
                    tokens += usage.completion_tokens;
                    let first = timings.first_token.unwrap_or(timings.finished);
                    ttft += (first - timings.arrived).as_secs_f64();
                    let decode = (timings.finished - first).as_secs_f64();
                    tpot += decode / (usage.completion_tokens.max(2) - 1) as f64;
                }
            }
        }
        let wall = start.elapsed().as_secs_f64();
        println!(
            "| {c} | {c} | {tokens} | {wall:.1} | {:.1} | {:.2} | {:.1} |",
            tokens as f64 / wall,
            ttft / c as f64,
            tpot / c as f64 * 1e3
        );
    }
    Ok(())
}
