//! `ternd`: parses flags, sets up logging, and runs the server until SIGTERM or Ctrl-C
//! (`serve`), or applies the store's pending schema migrations (`migrate`).

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
    /// Run the server (applying pending schema migrations first).
    Serve(ConfigArgs),
    /// Apply the pending schema migrations of the configured store, then exit.
    Migrate(ConfigArgs),
    /// Print the default configuration as TOML.
    DefaultConfig,
}

/// Where the configuration comes from; shared by `serve` and `migrate`.
#[derive(clap::Args)]
struct ConfigArgs {
    /// TOML configuration file (optional; see ternd.example.toml).
    #[arg(long, env = "TERN_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on, e.g. 127.0.0.1:7070 (port 0: any free port); `migrate` does
    /// not listen.
    #[arg(long, env = "TERN_LISTEN")]
    listen: Option<SocketAddr>,
    /// Data directory (the SQLite database, media and uploads live here).
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
        Command::Migrate(args) => migrate(args),
    }
}

/// Logs to stderr, filtered by `TERN_LOG` (default `info`), as text or JSON.
fn init_logging(format: &str, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TERN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// The configuration. Precedence: defaults < file < environment (TERN_SET_*) < --set <
/// --listen/--data-dir (and their TERN_LISTEN/TERN_DATA_DIR).
fn load_config(args: &ConfigArgs) -> anyhow::Result<Config> {
    let config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    let mut overrides = Config::env_overrides(std::env::vars());
    for kv in &args.set {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--set {kv}: expected KEY=VALUE"))?;
        overrides.push((k.to_owned(), v.to_owned()));
    }
    let mut config =
        config.with_overrides(overrides.iter().map(|(k, v)| (k.clone(), v.as_str())))?;
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(dir) = &args.data_dir {
        config.data_dir = dir.clone();
    }
    Ok(config)
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn serve(args: ConfigArgs) -> anyhow::Result<()> {
    init_logging(&args.log_format, "info");
    let config = load_config(&args)?;
    runtime()?.block_on(async move {
        let state = AppState::build(config.clone()).await?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        let shutdown = CancellationToken::new();
        tokio::spawn(signals(shutdown.clone()));
        tracing::info!(data_dir = %config.data_dir.display(), "starting");
        run(listener, state, shutdown).await
    })
}

/// `ternd migrate`: applies the pending migrations and prints one line saying so.
fn migrate(args: ConfigArgs) -> anyhow::Result<()> {
    // Only warnings by default: the outcome is the line on stdout.
    init_logging(&args.log_format, "warn");
    let config = load_config(&args)?;
    let line = runtime()?.block_on(tern_server::app::migrate(&config))?;
    println!("{line}");
    Ok(())
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
