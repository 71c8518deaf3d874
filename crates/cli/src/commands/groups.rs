//! Group commands: `group create|add|remove|leave|promote|demote|rename|info|settings`,
//! `groups` and `info MESSAGE`. They are HTTP-only (no socket): group changes reach every
//! member, this device included, as system messages on the next `sync` or `listen`.

use std::future::Future;
use std::time::Duration;

use tern_client::{Client, GroupInfo};

use super::{bounded, resolve_group};
use crate::args::GroupCommand;
use crate::output::{Printer, cli_error};

pub async fn group(
    client: &Client,
    out: &Printer,
    action: GroupCommand,
    timeout: Duration,
) -> anyhow::Result<()> {
    let id = |group: String| async move { resolve_group(client, &group, timeout).await };
    match action {
        GroupCommand::Create {
            name,
            members,
            members_can_add,
        } => {
            let members: Vec<&str> = members
                .iter()
                .map(|m| m.trim())
                .filter(|m| !m.is_empty())
                .collect();
            let info = bounded(timeout, "creating the group", async {
                Ok(client
                    .create_group(&name, &members, members_can_add)
                    .await?)
            })
            .await?;
            out.group_created(&info);
            Ok(())
        }
        GroupCommand::Add { group, users } => {
            let id = id(group).await?;
            let users: Vec<&str> = users.iter().map(String::as_str).collect();
            show(out, timeout, client.add_members(id, &users)).await
        }
        GroupCommand::Remove { group, user } => {
            let id = id(group).await?;
            show(out, timeout, client.remove_member(id, &user)).await
        }
        GroupCommand::Leave { group } => {
            let id = id(group).await?;
            bounded(timeout, "leaving the group", async {
                Ok(client.leave_group(id).await?)
            })
            .await?;
            out.left_group(id);
            Ok(())
        }
        GroupCommand::Promote { group, user } => {
            let id = id(group).await?;
            show(out, timeout, client.promote(id, &user)).await
        }
        GroupCommand::Demote { group, user } => {
            let id = id(group).await?;
            show(out, timeout, client.demote(id, &user)).await
        }
        GroupCommand::Rename { group, name } => {
            let id = id(group).await?;
            show(out, timeout, client.rename_group(id, &name)).await
        }
        GroupCommand::Describe { group, description } => {
            let id = id(group).await?;
            show(out, timeout, client.describe_group(id, &description)).await
        }
        GroupCommand::Info { group } => {
            let id = id(group).await?;
            show(out, timeout, client.group_info(id)).await
        }
        GroupCommand::Settings {
            group,
            members_can_add,
        } => {
            let id = id(group).await?;
            show(
                out,
                timeout,
                client.set_members_can_add(id, members_can_add),
            )
            .await
        }
    }
}

/// Runs a group call that answers with the group's new state, and prints that state.
async fn show(
    out: &Printer,
    timeout: Duration,
    call: impl Future<Output = Result<GroupInfo, tern_client::Error>>,
) -> anyhow::Result<()> {
    let info = bounded(timeout, "waiting for the server", async { Ok(call.await?) }).await?;
    out.group(&info);
    Ok(())
}

pub async fn list(client: &Client, out: &Printer, timeout: Duration) -> anyhow::Result<()> {
    let groups = bounded(timeout, "listing groups", async {
        Ok(client.groups().await?)
    })
    .await?;
    if groups.is_empty() {
        out.note_empty("no groups");
    }
    for g in &groups {
        out.group_summary(g);
    }
    Ok(())
}

/// Which message `info` is about.
#[derive(Debug, PartialEq, Eq)]
enum MessageRef<'a> {
    /// `GROUP/SEQ`, both numbers.
    GroupSeq(u64, u64),
    /// Anything else: the client_msg_id of one of my messages.
    ClientMsgId(&'a str),
}

fn parse_message_ref(s: &str) -> MessageRef<'_> {
    let s = s.trim();
    if let Some((g, seq)) = s.split_once('/')
        && let (Ok(g), Ok(seq)) = (g.parse::<u64>(), seq.parse::<u64>())
    {
        return MessageRef::GroupSeq(g, seq);
    }
    MessageRef::ClientMsgId(s)
}

pub async fn message_info(
    client: &Client,
    out: &Printer,
    message: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let (group, seq) = match parse_message_ref(message) {
        MessageRef::GroupSeq(g, s) => (g, s),
        MessageRef::ClientMsgId(id) => {
            let m = client.sent_message(id)?.ok_or_else(|| {
                cli_error(
                    "not_found",
                    format!("no message of mine with id {id:?} here; use GROUP/SEQ"),
                )
            })?;
            let Some(group) = m.group else {
                return Err(cli_error(
                    "invalid_input",
                    "message info is for group messages; `tern status` shows direct ticks",
                ));
            };
            let Some(seq) = m.seq else {
                return Err(cli_error(
                    "invalid_input",
                    "that message is not sent yet (it is in the outbox)",
                ));
            };
            (group, seq)
        }
    };
    let info = bounded(timeout, "fetching message info", async {
        Ok(client.message_info(group, seq).await?)
    })
    .await?;
    out.message_info(&info);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_refs_are_group_slash_seq_or_an_id() {
        assert_eq!(parse_message_ref("12/5"), MessageRef::GroupSeq(12, 5));
        assert_eq!(parse_message_ref(" 12/5 "), MessageRef::GroupSeq(12, 5));
        assert_eq!(
            parse_message_ref("0a1b2c"),
            MessageRef::ClientMsgId("0a1b2c")
        );
        assert_eq!(parse_message_ref("12/x"), MessageRef::ClientMsgId("12/x"));
        assert_eq!(parse_message_ref("a/5"), MessageRef::ClientMsgId("a/5"));
    }
}
