//! The `candela` subcommands.

pub mod bench;
pub mod generate;
pub mod serve;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "candela",
    version,
    about = "An OpenAI-compatible LLM inference server"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the OpenAI-compatible HTTP API.
    Serve(serve::ServeArgs),
    /// Load a model and greedily continue a prompt, printing tokens as they come.
    Generate(generate::GenerateArgs),
    /// Offline throughput: batches of concurrent requests through the engine.
    Bench(bench::BenchArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
    }
}
