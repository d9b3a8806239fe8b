use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use std::path::Path;

use redfuse::config::{Cli, Config, LogFormat};
use redfuse::reload::{LogLevelSetter, Source};
use tracing::info;

/// mimalloc rather than glibc's malloc: the data path allocates and frees small buffers on
/// every request (request arguments, reply slots, cache entries), and glibc's malloc and
/// free were a tenth of redfuse's CPU time (bench/profile.sh random, cache churned first:
/// 1.78 us of CPU per pipelined GET with glibc, 1.64 with mimalloc). Built without
/// transparent huge pages (`no_thp` in Cargo.toml): with them idle RSS was 19.5 MiB instead
/// of 11, and the full cache's RSS 0.72 of its own accounting instead of 0.86.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(file) = &cli.check_config {
        return check_config(&cli, file.as_deref().or(cli.config.as_deref()));
    }
    let config = match Config::from_cli(&cli) {
        Ok(c) => c,
        Err(e) => {
            for line in e.to_string().lines() {
                eprintln!("redfuse: {line}");
            }
            return ExitCode::from(2);
        }
    };
    let log_level = init_tracing(&config);
    let checks = redfuse::preflight(&config, false);
    for w in &checks.warnings {
        tracing::warn!("{w}");
    }
    if !checks.errors.is_empty() {
        for e in &checks.errors {
            eprintln!("redfuse: {e}");
        }
        return ExitCode::from(2);
    }
    let source = redfuse::reload::Source {
        path: cli.config.clone(),
        cli,
    };
    match run(config, source, log_level) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("redfuse: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `--check-config`: validates what this same invocation would run (flags, environment,
/// and the file), prints it with secrets redacted, and exits 0, or 2 naming every bad field.
fn check_config(cli: &Cli, file: Option<&Path>) -> ExitCode {
    let source = file.map_or("flags, environment and defaults".to_owned(), |p| {
        p.display().to_string()
    });
    match Config::load(cli, file, std::env::vars_os()) {
        Ok(config) => {
            use std::io::Write;
            let checks = redfuse::preflight(&config, true);
            if !checks.errors.is_empty() {
                for e in &checks.errors {
                    eprintln!("redfuse: {e}");
                }
                eprintln!("redfuse: {source}: invalid configuration");
                return ExitCode::from(2);
            }
            let warnings: String = checks
                .warnings
                .iter()
                .map(|w| format!("# warning: {w}\n"))
                .collect();
            let text = format!(
                "# redfuse effective configuration (flag > environment > file > default; \
                 secrets redacted)\n{}{warnings}# {source}: ok\n",
                config.effective_toml()
            );
            // A closed stdout (`| head`) is not an invalid configuration.
            let _ = std::io::stdout().write_all(text.as_bytes());
            ExitCode::SUCCESS
        }
        Err(e) => {
            for line in e.to_string().lines() {
                eprintln!("redfuse: {line}");
            }
            eprintln!("redfuse: {source}: invalid configuration");
            ExitCode::from(2)
        }
    }
}

/// Installs the log subscriber; returns what a reload changes `log_level` with.
fn init_tracing(config: &Config) -> LogLevelSetter {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::new(&config.log_level);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    fn parse(level: &str) -> Result<EnvFilter, String> {
        EnvFilter::try_new(level).map_err(|e| e.to_string())
    }
    match config.log_format {
        LogFormat::Json => {
            let builder = builder.json().with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            Box::new(move |level| handle.reload(parse(level)?).map_err(|e| e.to_string()))
        }
        LogFormat::Text => {
            let builder = builder.with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            Box::new(move |level| handle.reload(parse(level)?).map_err(|e| e.to_string()))
        }
    }
}

fn run(config: Config, source: Source, log_level: LogLevelSetter) -> anyhow::Result<()> {
    // One worker runs everything on the thread that polls the sockets: no cross-thread
    // wake-ups, like Redis's own event loop. More workers help only with cores to spare.
    let mut rt = if config.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        if config.threads > 1 {
            b.worker_threads(config.threads);
        }
        b
    };
    let rt = rt
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    rt.block_on(async move {
        tokio::spawn(return_free_memory());
        let running = redfuse::start(config).await?;
        running.watch_config(source, Some(log_level))?;
        info!(client_addr = %running.client_addr, admin_addr = %running.admin_addr, "listening");
        wait_for_signal().await?;
        info!("signal received, shutting down");
        running.shutdown().await;
        info!("stopped");
        Ok(())
    })
}

/// Hands memory the allocator holds free back to the OS once a second. mimalloc returns
/// freed pages only when the thread that freed them allocates again: after a burst (a long
/// pipeline's buffers, a cache filled to its cap) a sidecar that then goes quiet kept tens
/// of MiB it no longer used. A fresh redfuse filled with 250,000 keys through pipelines of
/// 5,000 held 78 to 100 MiB of RSS ten seconds later, from one run to the next, for the
/// same 64 MiB of cache; with this, 69 to 70 MiB. Collecting the thread's heap did not show
/// in a `perf record` of pipelined reads (no sample in 1,500). The task runs on the thread
/// whose heap the data path uses (one worker by default).
async fn return_free_memory() {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        // SAFETY: mi_collect only frees pages of the calling thread's heap that hold no
        // live allocation; it has no preconditions.
        unsafe { libmimalloc_sys::mi_collect(false) };
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install SIGINT handler")?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}
