//! Command implementations. Each command opens the profile, does its work through the SDK
//! and hands results to the [`Printer`]. Network work is bounded by `--timeout`.

mod account;
mod groups;
mod media;
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
        Command::Verify { user, confirm } => {
            bounded(
                timeout,
                "fetching keys",
                account::verify(&client, out, &user, confirm),
            )
            .await
        }
        Command::Privacy { setting } => account::privacy(&client, out, setting).await,
        Command::Push { action } => account::push(&client, out, action).await,
        Command::Send { first, text, group } => {
            let (target, text) = Target::with_payload(
                first,
                text,
                group,
                "with --group, give only the text (quote it if it has spaces)",
                "give USER and TEXT, or --group GROUP and TEXT",
            )?;
            messaging::send(&client, out, &target, &text, timeout).await
        }
        Command::SendFile {
            first,
            path,
            group,
            caption,
        } => {
            let (target, path) = Target::with_payload(
                first,
                path,
                group,
                "with --group, give only the file",
                "give USER and PATH, or --group GROUP and PATH",
            )?;
            media::send_file(
                &client,
                out,
                &target,
                &path,
                caption.as_deref(),
                cli.timeout,
            )
            .await
        }
        Command::Download {
            message,
            out: dest,
            force,
            local,
        } => {
            media::download(
                &client,
                out,
                &message,
                dest,
                force,
                (!local).then_some(timeout),
                cli.timeout,
            )
            .await
        }
        Command::Sync => messaging::sync(&client, out, timeout).await,
        Command::Listen { count } => messaging::listen(&client, out, count, cli.timeout).await,
        Command::Read { user, group } => {
            messaging::read(&client, out, &Target::from_args(user, group)?, timeout).await
        }
        Command::History {
            user,
            group,
            limit,
            local,
        } => {
            let target = Target::from_args(user, group)?;
            messaging::history(&client, out, &target, limit, (!local).then_some(timeout)).await
        }
        Command::Status { limit, local } => {
            messaging::status(&client, out, limit, (!local).then_some(timeout)).await
        }
        Command::Group { action } => groups::group(&client, out, action, timeout).await,
        Command::Groups => groups::list(&client, out, timeout).await,
        Command::Info { message } => groups::message_info(&client, out, &message, timeout).await,
    }
}

/// Who a messaging command is about: a user, or a group as typed (an id or a name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    User(String),
    Group(String),
}

impl Target {
    fn from_args(user: Option<String>, group: Option<String>) -> anyhow::Result<Target> {
        match (user, group) {
            (Some(u), None) => Ok(Target::User(u)),
            (None, Some(g)) => Ok(Target::Group(g)),
            _ => Err(cli_error("invalid_input", "give USER or --group GROUP")),
        }
    }

    /// `CMD USER PAYLOAD` or `CMD --group GROUP PAYLOAD`: with `--group` the first positional
    /// argument is the payload (a text, a file).
    fn with_payload<T: From<String>>(
        first: String,
        second: Option<T>,
        group: Option<String>,
        both: &str,
        neither: &str,
    ) -> anyhow::Result<(Target, T)> {
        match (group, second) {
            (Some(g), None) => Ok((Target::Group(g), T::from(first))),
            (None, Some(payload)) => Ok((Target::User(first), payload)),
            (Some(_), Some(_)) => Err(cli_error("invalid_input", both)),
            (None, None) => Err(cli_error("invalid_input", neither)),
        }
    }
}

/// A [`Target`] with its group found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Conversation {
    User(String),
    Group(u64),
}

impl Target {
    async fn resolve(&self, client: &Client, timeout: Duration) -> anyhow::Result<Conversation> {
        Ok(match self {
            Target::User(u) => Conversation::User(u.clone()),
            Target::Group(g) => Conversation::Group(resolve_group(client, g, timeout).await?),
        })
    }
}

/// A group as typed on the command line: its id, or else its exact name among my groups
/// (which needs the server; ids work offline).
async fn resolve_group(client: &Client, group: &str, timeout: Duration) -> anyhow::Result<u64> {
    let group = group.trim();
    if let Ok(id) = group.parse::<u64>() {
        return Ok(id);
    }
    let groups = bounded(timeout, "listing groups to find the name", async {
        Ok(client.groups().await?)
    })
    .await?;
    let matches: Vec<u64> = groups
        .iter()
        .filter(|g| g.name == group)
        .map(|g| g.group_id)
        .collect();
    match matches[..] {
        [id] => Ok(id),
        [] => Err(cli_error(
            "not_found",
            format!("no group of mine is named {group:?}; use its id (see `tern groups`)"),
        )),
        _ => Err(cli_error(
            "invalid_input",
            format!("several of my groups are named {group:?} ({matches:?}); use the id"),
        )),
    }
}

fn open(cli: &Cli) -> anyhow::Result<Client> {
    let home = match &cli.home {
        Some(h) => h.clone(),
        None => default_home()?,
    };
    let mut config = ClientConfig::new(cli.server.clone(), home.clone());
    config.device_name = cli.device_name.clone();
    config.passphrase = cli.passphrase.clone();
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
