//! The `candela` subcommands.

pub mod bench;
pub mod generate;
pub mod probe;
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
    /// Check that a server answers (for container health checks).
    Probe(probe::ProbeArgs),
    /// Offline throughput: batches of concurrent requests through the engine.
    Bench(bench::BenchArgs),
}

/// Parses the command line (and `serve --config FILE`) and runs the subcommand.
pub fn main_with_args(argv: impl IntoIterator<Item = std::ffi::OsString>) -> anyhow::Result<()> {
    use clap::{CommandFactory, FromArgMatches};
    let matches = Cli::command().get_matches_from(argv);
    let mut cli = Cli::from_arg_matches(&matches)?;
    if let Command::Serve(args) = &mut cli.command {
        if let (Some(path), Some(sub)) = (args.config.clone(), matches.subcommand_matches("serve"))
        {
            crate::config::apply_config_file(args, sub, &path)?;
        }
    }
    run(cli)
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Probe(args) => probe::run(args),
    }
}
