use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use redfuse::config::{Cli, Config, FileConfig, LogFormat};
use tracing::info;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(path) = &cli.check_config {
        return match FileConfig::load(path).and_then(|f| Config::merge(&Cli::default(), f)) {
            Ok(_) => {
                println!("{}: ok", path.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("redfuse: {e}");
                ExitCode::from(2)
            }
        };
    }
    let config = match Config::from_cli(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("redfuse: {e}");
            return ExitCode::from(2);
        }
    };
    init_tracing(&config);
    match run(config) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("redfuse: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::new(&config.log_level);
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    match config.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn run(config: Config) -> anyhow::Result<()> {
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
        let running = redfuse::start(config).await?;
        info!(client_addr = %running.client_addr, admin_addr = %running.admin_addr, "listening");
        wait_for_signal().await?;
        info!("signal received, shutting down");
        running.shutdown().await;
        info!("stopped");
        Ok(())
    })
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
