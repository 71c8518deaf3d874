//! `send-file` and `download`. Transfers are not bounded by the default timeout (a large file
//! takes as long as it takes; the SDK gives up after repeated failures and resumes when run
//! again); an explicit `--timeout` bounds the whole command.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tern_client::{Client, Recipient, StoredMessage, sanitize_file_name};

use super::messaging::maybe_sync;
use super::{Conversation, Target, bounded};
use crate::output::{Printer, cli_error};

/// Runs `f`, bounded only if the user asked for a bound.
async fn maybe_bounded<T>(
    limit: Option<Duration>,
    what: &str,
    f: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    match limit {
        Some(l) => bounded(l, what, f).await,
        None => f.await,
    }
}

pub async fn send_file(
    client: &Client,
    out: &Printer,
    target: &Target,
    path: &Path,
    caption: Option<&str>,
    limit: Option<Duration>,
) -> anyhow::Result<()> {
    let to = match target
        .resolve(client, limit.unwrap_or(super::DEFAULT_TIMEOUT))
        .await?
    {
        Conversation::User(u) => Recipient::User(u),
        Conversation::Group(id) => Recipient::Group(id),
    };
    let mut events = client.events();
    let bar = out.bar();
    let result = maybe_bounded(limit, "sending the file (run it again to resume)", async {
        bounded(super::DEFAULT_TIMEOUT, "connecting", async {
            Ok(client.connect().await?)
        })
        .await?;
        Ok(client
            .send_file(&to, path, caption, |p| bar.update(p))
            .await?)
    })
    .await;
    bar.finish();
    client.close().await;
    super::messaging::key_warnings(&mut events, out);
    let sent = result?;
    let media = client
        .sent_message(&sent.client_msg_id)?
        .and_then(|m| m.media());
    out.file_sent(&sent, media.as_ref());
    Ok(())
}

/// Which message `download` is about.
#[derive(Debug, PartialEq, Eq)]
enum MessageRef<'a> {
    /// `CONVERSATION/SEQ`: a username or a group id, and a seq.
    At(&'a str, u64),
    /// The client_msg_id of one of my messages.
    Mine(&'a str),
}

fn parse_message_ref(s: &str) -> MessageRef<'_> {
    let s = s.trim();
    if let Some((conv, seq)) = s.rsplit_once('/')
        && let Ok(seq) = seq.parse::<u64>()
        && !conv.is_empty()
    {
        return MessageRef::At(conv, seq);
    }
    MessageRef::Mine(s)
}

fn find(client: &Client, message: &str) -> anyhow::Result<StoredMessage> {
    let found = match parse_message_ref(message) {
        MessageRef::At(conv, seq) => client.find_message(conv, seq)?,
        MessageRef::Mine(id) => client.sent_message(id)?,
    };
    found.ok_or_else(|| {
        cli_error(
            "not_found",
            format!(
                "no message {message:?} here; name it CONVERSATION/SEQ as `tern history` shows it"
            ),
        )
    })
}

/// Where a download goes: `--out` (into it, if it is a directory), else the sender's file
/// name, sanitised, in the current directory. Never a path taken from the message.
fn output_path(out: Option<PathBuf>, file_name: &str, media_id: &str) -> PathBuf {
    let name = sanitize_file_name(file_name)
        .unwrap_or_else(|| format!("tern-{}", media_id.get(..12).unwrap_or(media_id)));
    match out {
        Some(p) if p.is_dir() => p.join(name),
        Some(p) => p,
        None => PathBuf::from(name),
    }
}

pub async fn download(
    client: &Client,
    out: &Printer,
    message: &str,
    dest: Option<PathBuf>,
    force: bool,
    sync: Option<Duration>,
    limit: Option<Duration>,
) -> anyhow::Result<()> {
    maybe_sync(client, sync).await?;
    let m = find(client, message)?;
    let Some(media) = m.media() else {
        return Err(cli_error(
            "not_media",
            format!("message {message:?} carries no file"),
        ));
    };
    let path = output_path(dest, &media.file_name, &media.id);
    if path.exists() && !force {
        return Err(cli_error(
            "exists",
            format!(
                "{} exists; pass --force to replace it, or --out",
                path.display()
            ),
        ));
    }
    let bar = out.bar();
    let result = maybe_bounded(limit, "downloading (run it again to resume)", async {
        Ok(client.download(&m, &path, |p| bar.update(p)).await?)
    })
    .await;
    bar.finish();
    out.downloaded(&result?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_conversation_slash_seq_or_an_id() {
        assert_eq!(parse_message_ref("alice/12"), MessageRef::At("alice", 12));
        assert_eq!(parse_message_ref(" 5/3 "), MessageRef::At("5", 3));
        assert_eq!(parse_message_ref("0a1b2c"), MessageRef::Mine("0a1b2c"));
        assert_eq!(parse_message_ref("alice/x"), MessageRef::Mine("alice/x"));
        assert_eq!(parse_message_ref("/4"), MessageRef::Mine("/4"));
    }

    #[test]
    fn downloads_never_take_a_path_from_the_message() {
        let id = "ab".repeat(32);
        assert_eq!(
            output_path(None, "photo.jpg", &id),
            PathBuf::from("photo.jpg")
        );
        assert_eq!(
            output_path(None, "../../.ssh/authorized_keys", &id),
            PathBuf::from("authorized_keys")
        );
        assert_eq!(
            output_path(None, "/etc/passwd", &id),
            PathBuf::from("passwd")
        );
        assert_eq!(
            output_path(None, "..", &id),
            PathBuf::from("tern-abababababab")
        );
        assert_eq!(
            output_path(None, "", &id),
            PathBuf::from("tern-abababababab")
        );
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            output_path(Some(dir.path().to_owned()), "a/b.png", &id),
            dir.path().join("b.png")
        );
        assert_eq!(
            output_path(Some(PathBuf::from("x/y.png")), "../z", &id),
            PathBuf::from("x/y.png"),
            "an explicit --out is the user's choice"
        );
    }
}
