//! The `candela` command line.

use tracing_subscriber::EnvFilter;

/// mimalloc reuses freed memory instead of returning large blocks to the OS,
/// so the per-step tensors of the forward pass do not page-fault every step.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = candela::cli::main_with_args(std::env::args_os()) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
