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
    /// Protect this profile's encryption keys with a passphrase (argon2id) instead of the key
    /// file `store.key` in the profile directory. Set it when the profile is created; it is
    /// then needed every time.
    #[arg(long, global = true, env = "TERN_PASSPHRASE", hide_env_values = true)]
    pub passphrase: Option<String>,
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
    #[command(override_usage = "tern send USER TEXT\n       tern send --group GROUP TEXT")]
    Send {
        /// Recipient username (your own for a note to self); with --group, the text.
        #[arg(value_name = "USER")]
        first: String,
        /// The message text.
        #[arg(value_name = "TEXT")]
        text: Option<String>,
        /// Send to this group (id, or its exact name) instead of a user.
        #[arg(long, value_name = "GROUP")]
        group: Option<String>,
    },
    /// Send a file (encrypted end to end; resumes an interrupted upload of the same file).
    #[command(
        name = "send-file",
        override_usage = "tern send-file USER PATH [--caption TEXT]\n       tern send-file --group GROUP PATH [--caption TEXT]"
    )]
    SendFile {
        /// Recipient username; with --group, the file.
        #[arg(value_name = "USER")]
        first: String,
        /// The file to send.
        #[arg(value_name = "PATH")]
        path: Option<PathBuf>,
        /// Send to this group (id, or its exact name) instead of a user.
        #[arg(long, value_name = "GROUP")]
        group: Option<String>,
        /// A text shown with the file.
        #[arg(long, value_name = "TEXT")]
        caption: Option<String>,
    },
    /// Download, verify and decrypt the file of a message.
    #[command(
        after_help = "MESSAGE names a message as `tern history` shows it: CONVERSATION/SEQ, where \
CONVERSATION is the peer's username or the group id (alice/12, 5/3), or the client_msg_id of a \
message I sent.\nThe file is written to --out, or else to the sender's file name (directories \
stripped) in the current directory. An interrupted download resumes when run again."
    )]
    Download {
        /// CONVERSATION/SEQ (e.g. alice/12, or 5/3 for group 5), or a client_msg_id of mine.
        message: String,
        /// Where to write the file (default: the sender's file name, here).
        #[arg(long, value_name = "PATH")]
        out: Option<PathBuf>,
        /// Replace the output file if it exists.
        #[arg(long)]
        force: bool,
        /// Do not sync with the server first (the message must be stored here already).
        #[arg(long)]
        local: bool,
    },
    /// Connect, fetch and store everything waiting, print it, acknowledge it, exit.
    Sync,
    /// Print events as they arrive, until Ctrl-C (or `--count`).
    Listen {
        /// Exit after this many messages and receipts.
        #[arg(long)]
        count: Option<u64>,
    },
    /// Mark the conversation with USER (or --group GROUP) read.
    Read {
        #[arg(required_unless_present = "group")]
        user: Option<String>,
        /// Mark this group (id or exact name) read instead.
        #[arg(long, value_name = "GROUP", conflicts_with = "user")]
        group: Option<String>,
    },
    /// Show the conversation with USER (or --group GROUP).
    History {
        #[arg(required_unless_present = "group")]
        user: Option<String>,
        /// Show this group (id or exact name) instead.
        #[arg(long, value_name = "GROUP", conflicts_with = "user")]
        group: Option<String>,
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
    /// Show the safety number with USER, to compare in person or over a call; `--confirm`
    /// marks USER verified once both sides see the same digits (a later change of USER's keys
    /// is then flagged loudly).
    Verify {
        user: String,
        /// The numbers matched: mark USER's current keys as verified.
        #[arg(long)]
        confirm: bool,
    },
    /// Show or change privacy settings.
    Privacy {
        #[command(subcommand)]
        setting: Option<PrivacySetting>,
    },
    /// Be woken by a push (Web Push, UnifiedPush) when messages arrive while this device is
    /// offline.
    Push {
        #[command(subcommand)]
        action: PushAction,
    },
    /// Create and manage groups. GROUP is a group id, or a group's exact name.
    Group {
        #[command(subcommand)]
        action: GroupCommand,
    },
    /// List my groups.
    Groups,
    /// Who has delivered and read one of my group messages.
    Info {
        /// GROUP/SEQ (e.g. 12/5), or the client_msg_id of a message I sent.
        message: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum GroupCommand {
    /// Create a group with me as its owner; prints its id.
    Create {
        name: String,
        /// First members besides me: usernames, comma-separated (or repeated).
        #[arg(long, value_delimiter = ',', value_name = "USERS")]
        members: Vec<String>,
        /// Let every member add members (default: admins only).
        #[arg(long)]
        members_can_add: bool,
    },
    /// Add members.
    Add {
        group: String,
        #[arg(required = true)]
        users: Vec<String>,
    },
    /// Remove a member (admins).
    Remove { group: String, user: String },
    /// Leave a group.
    Leave { group: String },
    /// Make a member an admin (admins).
    Promote { group: String, user: String },
    /// Make an admin a plain member (admins).
    Demote { group: String, user: String },
    /// Rename a group (admins).
    Rename { group: String, name: String },
    /// Set a group's description; "" removes it (admins).
    Describe { group: String, description: String },
    /// Show a group's settings and members.
    Info { group: String },
    /// Change a group's settings (admins).
    Settings {
        group: String,
        /// Whether every member may add members.
        #[arg(long, action = clap::ArgAction::Set, value_name = "true|false")]
        members_can_add: bool,
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
pub enum PushAction {
    /// Register ENDPOINT (a push service's or UnifiedPush distributor's URL for this device)
    /// as where the server sends wake-ups; replaces an earlier one. Without --p256dh and
    /// --auth, tern makes the keys and keeps them (`tern push decrypt` reads the pushes).
    Register {
        endpoint: String,
        /// The subscription's P-256 public key, unpadded base64url (keys made elsewhere).
        #[arg(long, requires = "auth")]
        p256dh: Option<String>,
        /// The subscription's auth secret, unpadded base64url.
        #[arg(long, requires = "p256dh")]
        auth: Option<String>,
    },
    /// Show this device's push subscription.
    Status,
    /// Stop pushes to this device.
    Remove,
    /// Decrypt a push body this device received (a file, or standard input) and say what it
    /// announces.
    Decrypt { file: Option<std::path::PathBuf> },
    /// Print the server's VAPID public key (a browser's applicationServerKey).
    Vapid,
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
    fn group_forms_parse() {
        let cli = Cli::try_parse_from(["tern", "send", "--group", "12", "hi all"]).expect("parse");
        match cli.command {
            Command::Send { first, text, group } => {
                assert_eq!(
                    (first.as_str(), text, group.as_deref()),
                    ("hi all", None, Some("12"))
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        let cli = Cli::try_parse_from(["tern", "send", "bob", "hi"]).expect("parse");
        assert!(matches!(
            cli.command,
            Command::Send {
                group: None,
                text: Some(_),
                ..
            }
        ));
        let cli = Cli::try_parse_from(["tern", "group", "create", "Fam", "--members", "a1b,c2d"])
            .expect("parse");
        match cli.command {
            Command::Group {
                action:
                    GroupCommand::Create {
                        members,
                        members_can_add,
                        ..
                    },
            } => {
                assert_eq!(members, ["a1b", "c2d"]);
                assert!(!members_can_add);
            }
            other => panic!("unexpected {other:?}"),
        }
        let cli = Cli::try_parse_from([
            "tern",
            "group",
            "settings",
            "12",
            "--members-can-add",
            "true",
        ])
        .expect("parse");
        assert!(matches!(
            cli.command,
            Command::Group {
                action: GroupCommand::Settings {
                    members_can_add: true,
                    ..
                }
            }
        ));
        assert!(Cli::try_parse_from(["tern", "group", "settings", "12"]).is_err());
        assert!(Cli::try_parse_from(["tern", "read"]).is_err());
        let cli = Cli::try_parse_from(["tern", "send-file", "bob", "a.jpg", "--caption", "hi"])
            .expect("parse");
        match cli.command {
            Command::SendFile {
                first,
                path,
                group,
                caption,
            } => {
                assert_eq!(first, "bob");
                assert_eq!(path, Some(PathBuf::from("a.jpg")));
                assert_eq!((group, caption.as_deref()), (None, Some("hi")));
            }
            other => panic!("unexpected {other:?}"),
        }
        let cli =
            Cli::try_parse_from(["tern", "send-file", "--group", "7", "a.jpg"]).expect("parse");
        assert!(matches!(
            cli.command,
            Command::SendFile {
                path: None,
                group: Some(_),
                ..
            }
        ));
        let cli =
            Cli::try_parse_from(["tern", "download", "alice/12", "--out", "x.jpg"]).expect("parse");
        assert!(matches!(
            cli.command,
            Command::Download {
                out: Some(_),
                force: false,
                ..
            }
        ));
        assert!(Cli::try_parse_from(["tern", "read", "bob", "--group", "1"]).is_err());
        let cli = Cli::try_parse_from(["tern", "history", "--group", "1"]).expect("parse");
        assert!(matches!(
            cli.command,
            Command::History {
                user: None,
                group: Some(_),
                ..
            }
        ));
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
