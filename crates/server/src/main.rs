//! `ternd`: parses flags, sets up logging, and runs the server until SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tern_server::{AppState, Config, run};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "ternd", version, about = "The tern messaging server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Print the default configuration as TOML.
    DefaultConfig,
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML configuration file (optional; see ternd.example.toml).
    #[arg(long, env = "TERN_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:7070 (port 0: any free port).
    #[arg(long, env = "TERN_LISTEN")]
    listen: Option<SocketAddr>,
    /// Data directory (the SQLite database lives here).
    #[arg(long, env = "TERN_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Override any setting of the config file: `--set limits.max_frame_bytes=131072`
    /// (repeatable; also `TERN_SET_LIMITS__MAX_FRAME_BYTES=131072` in the environment).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Log format.
    #[arg(long, env = "TERN_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::DefaultConfig => {
            print!("{}", include_str!("../../../ternd.example.toml"));
            Ok(())
        }
        Command::Serve(args) => serve(args),
    }
}

fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TERN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if args.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    // Precedence: file < environment (TERN_SET_*) < --set < --listen/--data-dir.
    let mut overrides = Config::env_overrides(std::env::vars());
    for kv in &args.set {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--set {kv}: expected KEY=VALUE"))?;
        overrides.push((k.to_owned(), v.to_owned()));
    }
    config = config.with_overrides(overrides.iter().map(|(k, v)| (k.clone(), v.as_str())))?;
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(dir) = args.data_dir {
        config.data_dir = dir;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let state = AppState::build(config.clone()).context("cannot open the data directory")?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let shutdown = CancellationToken::new();
        tokio::spawn(signals(shutdown.clone()));
        tracing::info!(data_dir = %config.data_dir.display(), "starting");
        run(listener, state, shutdown).await
    })
}

/// Cancels `shutdown` on SIGTERM or Ctrl-C.
async fn signals(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot watch SIGTERM");
                    let _ = ctrl_c.await;
                    shutdown.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown requested");
    shutdown.cancel();
}
