//! The command line, declared with clap. Every command takes the global options; `--json`
//! switches all output to one JSON object per line.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "tern",
    version,
    about = "tern: a self-hostable messenger, from the command line"
)]
pub struct Cli {
    /// Server URL.
    #[arg(
        long,
        global = true,
        env = "TERN_SERVER",
        default_value = "http://127.0.0.1:7070"
    )]
    pub server: String,
    /// Profile directory (session, history, outbox). Default: <data dir>/tern.
    #[arg(long, global = true, env = "TERN_HOME")]
    pub home: Option<PathBuf>,
    /// Print one JSON object per line.
    #[arg(long, global = true)]
    pub json: bool,
    /// Bound on network commands, e.g. 30s, 500ms, 2m (default 30s; `listen`: none).
    #[arg(long, global = true, env = "TERN_TIMEOUT", value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Name of the device created by register/login.
    #[arg(
        long,
        global = true,
        env = "TERN_DEVICE_NAME",
        default_value = "tern-cli"
    )]
    pub device_name: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create an account and log this profile in as its first device.
    Register(Credentials),
    /// Log this profile in as a new device of an existing account.
    Login(Credentials),
    /// Log out: the server removes this device.
    Logout,
    /// Show who this profile is logged in as.
    Whoami,
    /// Send a text message and wait for the server's tick.
    Send {
        /// Recipient username (your own for a note to self).
        user: String,
        /// The message text.
        text: String,
    },
    /// Connect, fetch and store everything waiting, print it, acknowledge it, exit.
    Sync,
    /// Print events as they arrive, until Ctrl-C (or `--count`).
    Listen {
        /// Exit after this many messages and receipts.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Mark the conversation with USER read.
    Read { user: String },
    /// Show the conversation with USER.
    History {
        user: String,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Do not sync with the server first.
        #[arg(long)]
        local: bool,
    },
    /// Show the ticks of the messages I sent.
    Status {
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Do not sync with the server first.
        #[arg(long)]
        local: bool,
    },
    /// List my devices, or remove one.
    Devices {
        #[command(subcommand)]
        action: Option<DevicesAction>,
    },
    /// When USER was last online (as far as privacy settings allow).
    LastSeen { user: String },
    /// Show or change privacy settings.
    Privacy {
        #[command(subcommand)]
        setting: Option<PrivacySetting>,
    },
}

#[derive(Debug, Args)]
pub struct Credentials {
    pub user: String,
    /// Read the password from the first line of standard input.
    #[arg(long)]
    pub password_stdin: bool,
    /// The password (prefer TERN_PASSWORD or --password-stdin: argv is visible to others).
    #[arg(long, env = "TERN_PASSWORD", hide_env_values = true)]
    pub password: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum DevicesAction {
    /// Remove one of my devices (it is logged out at once).
    Remove { id: u64 },
}

#[derive(Debug, Subcommand)]
pub enum PrivacySetting {
    /// Who may see my last seen: everyone, contacts or nobody (no value: show it).
    LastSeen {
        #[arg(value_parser = ["everyone", "contacts", "nobody"])]
        value: Option<String>,
    },
}

/// Parses `30s`, `500ms`, `2m`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("invalid duration {s:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        "h" => Ok(Duration::from_secs(n.saturating_mul(3600))),
        _ => Err(format!(
            "invalid duration unit in {s:?} (use ms, s, m or h)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("3 days").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
