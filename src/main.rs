//! The `authgres` command: parses the CLI, loads the config, starts tracing
//! and hands over to the libraries. See README.md.

mod admin;
mod check;
mod cli;
mod config;
mod console_api;
mod demo;
mod handover;
mod init_db;
mod serve;
mod token;

use clap::Parser as _;

/// How long an exiting process waits for blocking work left running.
const EXIT_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

/// The allocator: mimalloc, whose per-thread free lists take a request's
/// many small allocations (hyper's, axum's, the JSON's) without glibc's
/// bin management.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Machines with this many cores or fewer run the proxy on one thread
/// unless told otherwise: on two cores shared with Postgres and clients,
/// a work-stealing pool spent a quarter more CPU per transaction on
/// cross-thread wake-ups than one thread did (`benches/compare.sh`,
/// README "Benchmarks"), as pgbouncer's single thread shows.
const ONE_THREAD_UP_TO_CORES: usize = 2;

/// The async runtime: `threads` (default: one on small machines, else one
/// per core); one thread runs everything with no cross-thread wake-ups,
/// more are a work-stealing pool.
fn runtime(threads: Option<std::num::NonZeroUsize>) -> std::io::Result<tokio::runtime::Runtime> {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let threads = threads.map_or_else(
        || {
            if cores <= ONE_THREAD_UP_TO_CORES {
                1
            } else {
                cores
            }
        },
        std::num::NonZeroUsize::get,
    );
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(threads);
        builder
    };
    builder.enable_all().build()
}

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("AUTHGRES_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal: not in journald,
        // files or a container's log (nor with NO_COLOR set).
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()),
        );
    match cli.log_format {
        cli::LogFormat::Text => logs.init(),
        cli::LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init(),
    }
    // One TLS crypto provider for rustls in the whole process.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = match runtime(cli.threads) {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(cli::run(cli));
    // Blocking work still running (a file read, a handover step) must not
    // keep a process that is done from exiting.
    runtime.shutdown_timeout(EXIT_GRACE);
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
