//! Command implementations. Each command opens the profile, does its work through the SDK
//! and hands results to the [`Printer`]. Network work is bounded by `--timeout`.

mod account;
mod messaging;

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use tern_client::{Client, ClientConfig};

use crate::args::{Cli, Command};
use crate::output::{Printer, cli_error};

/// Network bound when `--timeout` is not given.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn run(cli: Cli, out: &Printer) -> anyhow::Result<()> {
    let client = open(&cli)?;
    let timeout = cli.timeout.unwrap_or(DEFAULT_TIMEOUT);
    match cli.command {
        Command::Register(c) => account::register(&client, out, &c).await,
        Command::Login(c) => account::login(&client, out, &c).await,
        Command::Logout => account::logout(&client, out).await,
        Command::Whoami => account::whoami(&client, out),
        Command::Devices { action } => account::devices(&client, out, action).await,
        Command::LastSeen { user } => account::last_seen(&client, out, &user).await,
        Command::Privacy { setting } => account::privacy(&client, out, setting).await,
        Command::Send { user, text } => messaging::send(&client, out, &user, &text, timeout).await,
        Command::Sync => messaging::sync(&client, out, timeout).await,
        Command::Listen { count } => messaging::listen(&client, out, count, cli.timeout).await,
        Command::Read { user } => messaging::read(&client, out, &user, timeout).await,
        Command::History { user, limit, local } => {
            messaging::history(&client, out, &user, limit, (!local).then_some(timeout)).await
        }
        Command::Status { limit, local } => {
            messaging::status(&client, out, limit, (!local).then_some(timeout)).await
        }
    }
}

fn open(cli: &Cli) -> anyhow::Result<Client> {
    let home = match &cli.home {
        Some(h) => h.clone(),
        None => default_home()?,
    };
    let mut config = ClientConfig::new(cli.server.clone(), home.clone());
    config.device_name = cli.device_name.clone();
    Client::open(config).with_context(|| format!("cannot open the profile in {}", home.display()))
}

fn default_home() -> anyhow::Result<PathBuf> {
    dirs::data_dir().map(|d| d.join("tern")).ok_or_else(|| {
        cli_error(
            "invalid_input",
            "no data directory on this system; pass --home or set TERN_HOME",
        )
    })
}

/// Runs `f` with a deadline; on expiry, a `timeout` error saying what was being waited for.
async fn bounded<T>(
    limit: Duration,
    what: &str,
    f: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r,
        Err(_) => Err(cli_error(
            "timeout",
            format!("timed out after {:.1}s {what}", limit.as_secs_f64()),
        )),
    }
}
