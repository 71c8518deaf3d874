//! Commands that use the connection: send, sync, listen, read — and history/status, which
//! sync first unless `--local`. Each closes the connection cleanly before returning.

use std::time::Duration;

use tern_client::{Client, ConnectionState, Event};

use super::{Conversation, Target, bounded};
use crate::output::{Printer, cli_error};

/// Connects and waits until the mailbox is drained (stored and acknowledged).
async fn connect_and_sync(client: &Client) -> anyhow::Result<()> {
    client.connect().await?;
    client.wait_synced().await?;
    Ok(())
}

pub async fn send(
    client: &Client,
    out: &Printer,
    target: &Target,
    text: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let conversation = target.resolve(client, timeout).await?;
    let mut events = client.events();
    let result = bounded(
        timeout,
        "waiting for the server's tick (the message stays in the outbox)",
        async {
            client.connect().await?;
            Ok(match &conversation {
                Conversation::Group(id) => client.send_group_text(*id, text).await?,
                Conversation::User(user) => client.send_text(user, text).await?,
            })
        },
    )
    .await;
    client.close().await;
    key_warnings(&mut events, out);
    out.sent(&result?);
    Ok(())
}

/// Prints the key-change warnings a command ran into (the recipient's devices changed since
/// they were last seen; loudly if they were verified).
pub(super) fn key_warnings(events: &mut tern_client::EventStream, out: &Printer) {
    while let Some(e) = events.try_next() {
        if let Event::KeysChanged(k) = e {
            out.keys_changed(&k);
        }
    }
}

pub async fn sync(client: &Client, out: &Printer, timeout: Duration) -> anyhow::Result<()> {
    let mut events = client.events();
    let result = bounded(timeout, "syncing", async {
        client.connect().await?;
        let mut new = 0u64;
        loop {
            match events.next().await {
                Some(Event::Synced) => return Ok(new),
                Some(Event::Connection(_)) => {}
                Some(e) => {
                    if out.event(&e) {
                        new += 1;
                    }
                }
                None => return Err(cli_error("closed", "client closed")),
            }
        }
    })
    .await;
    client.close().await;
    out.synced(result?);
    Ok(())
}

pub async fn listen(
    client: &Client,
    out: &Printer,
    count: Option<u64>,
    limit: Option<Duration>,
) -> anyhow::Result<()> {
    let mut events = client.events();
    let connect = client.connect();
    tokio::pin!(connect);
    let mut connected = false;
    let mut seen = 0u64;
    let deadline = limit.map(|l| tokio::time::Instant::now() + l);
    let result: anyhow::Result<()> = loop {
        if count.is_some_and(|c| seen >= c) {
            break Ok(());
        }
        tokio::select! {
            r = &mut connect, if !connected => {
                if let Err(e) = r {
                    break Err(e.into());
                }
                connected = true;
            }
            e = events.next() => match e {
                Some(Event::Connection(ConnectionState::Closed { reason })) => {
                    out.connection(&ConnectionState::Closed { reason });
                    break Err(tern_client::Error::Closed(reason).into());
                }
                Some(e) => {
                    if out.event(&e) {
                        seen += 1;
                    }
                }
                None => break Ok(()),
            },
            r = tokio::signal::ctrl_c() => {
                break r.map_err(Into::into);
            }
            () = sleep_until(deadline) => {
                break Err(cli_error("timeout", format!("listened for {:.1}s", limit.unwrap_or_default().as_secs_f64())));
            }
        }
    };
    client.close().await;
    result
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

pub async fn read(
    client: &Client,
    out: &Printer,
    target: &Target,
    timeout: Duration,
) -> anyhow::Result<()> {
    let conversation = target.resolve(client, timeout).await?;
    let result = bounded(timeout, "marking read", async {
        connect_and_sync(client).await?;
        Ok(match &conversation {
            Conversation::Group(id) => client.mark_group_read(*id).await?,
            Conversation::User(user) => client.mark_read(user).await?,
        })
    })
    .await;
    client.close().await;
    let seq = result?;
    match &conversation {
        Conversation::Group(id) => out.read(&id.to_string(), Some(*id), seq),
        Conversation::User(user) => out.read(&user.trim().to_ascii_lowercase(), None, seq),
    }
    Ok(())
}

/// Syncs first (if `sync` is a timeout), so the view includes what is waiting on the server.
pub(super) async fn maybe_sync(client: &Client, sync: Option<Duration>) -> anyhow::Result<()> {
    let Some(timeout) = sync else { return Ok(()) };
    let result = bounded(
        timeout,
        "syncing (use --local to skip)",
        connect_and_sync(client),
    )
    .await;
    client.close().await;
    result
}

pub async fn history(
    client: &Client,
    out: &Printer,
    target: &Target,
    limit: usize,
    sync: Option<Duration>,
) -> anyhow::Result<()> {
    let conversation = target
        .resolve(client, sync.unwrap_or(super::DEFAULT_TIMEOUT))
        .await?;
    maybe_sync(client, sync).await?;
    let messages = match &conversation {
        Conversation::User(user) => client.history(user, limit)?,
        Conversation::Group(id) => client.group_history(*id, limit)?,
    };
    for m in messages {
        out.message(&m);
    }
    Ok(())
}

pub async fn status(
    client: &Client,
    out: &Printer,
    limit: usize,
    sync: Option<Duration>,
) -> anyhow::Result<()> {
    maybe_sync(client, sync).await?;
    for m in client.sent_status(limit)? {
        out.message(&m);
    }
    Ok(())
}
