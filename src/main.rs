//! The `candela` command line.

use tracing_subscriber::EnvFilter;

/// mimalloc reuses freed memory instead of returning large blocks to the OS,
/// so the per-step tensors of the forward pass do not page-fault every step.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How long mimalloc keeps freed memory before returning it to the OS, unless
/// `MIMALLOC_PURGE_DELAY` says otherwise. Its default (10 ms) is shorter than a
/// step, so the step's large tensors (logits, prompt activations) were handed
/// back and page-faulted in again, zeroed by the kernel, every step (about
/// 30,000 faults in two rounds of a 32-stream `candela bench`, 2,000 with
/// this). An idle server still gives the memory back after a minute.
const PURGE_DELAY_MS: std::os::raw::c_long = 60_000;

/// `mi_option_purge_delay` in mimalloc 2's and 3's `mi_option_t`.
const MI_OPTION_PURGE_DELAY: std::os::raw::c_int = 15;

extern "C" {
    // Part of the mimalloc library linked in for the global allocator.
    fn mi_option_set(option: std::os::raw::c_int, value: std::os::raw::c_long);
}

fn main() {
    // mimalloc reads its environment at process start, so setting the
    // variable here would be too late; the option itself can change any time.
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: a plain setter of an integer option.
        unsafe { mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
    }
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
