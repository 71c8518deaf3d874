//! `drain --messages M`: a device is offline while M messages wait for it; then it connects.
//! Reports the time from opening the socket to the last message (and to `Synced`), and checks
//! that the messages came in order, each once.

use std::sync::Arc;
use std::time::Instant;

use anyhow::bail;
use futures_util::SinkExt;
use serde_json::{Value, json};
use tern_proto::frames::*;
use tokio::sync::Semaphore;

use crate::client::{self, next_frame, send_frame};
use crate::target::Target;

pub async fn run(target: &Target, messages: u64, body: usize) -> anyhow::Result<(String, Value)> {
    let id = super::run_id();
    let acc = client::accounts(&target.url, vec![format!("d{id}s"), format!("d{id}r")], 2).await?;
    let (sender, receiver) = (&acc[0], &acc[1]);
    // Fill the mailbox: pipelined sends, 256 in flight.
    let (mut tx, mut rx) = client::connect_synced(&target.addr, &sender.token).await?;
    let permits = Arc::new(Semaphore::new(256));
    let p2 = permits.clone();
    let reader = tokio::spawn(async move {
        let mut sent = 0u64;
        while sent < messages {
            match next_frame(&mut rx).await {
                Ok(Some(ServerFrame {
                    kind: Some(server_frame::Kind::Sent(_)),
                    ..
                })) => {
                    sent += 1;
                    p2.add_permits(1);
                }
                Ok(Some(ServerFrame {
                    kind: Some(server_frame::Kind::Error(e)),
                    ..
                })) => bail!("send failed: {}", e.message),
                Ok(Some(_)) => {}
                _ => bail!("sender socket closed"),
            }
        }
        Ok(())
    });
    for k in 0..messages {
        permits.acquire().await?.forget();
        tx.send(send_frame(
            k + 10,
            format!("m{k}"),
            Peer::user(receiver.user_id),
            vec![b'x'; body],
            &[receiver.device_id],
        ))
        .await?;
    }
    reader.await??;
    // The drain.
    let t0 = Instant::now();
    let (_rtx, mut rrx) = client::connect(&target.addr, &receiver.token).await?;
    let mut expected = 1u64;
    let mut last_at = None;
    loop {
        match next_frame(&mut rrx).await? {
            Some(ServerFrame {
                kind: Some(server_frame::Kind::Event(e)),
                ..
            }) => {
                if let Some(event::Kind::Message(m)) = e.kind {
                    if m.seq != expected {
                        bail!("out of order: got seq {} expecting {expected}", m.seq);
                    }
                    expected += 1;
                    last_at = Some(t0.elapsed());
                }
            }
            Some(ServerFrame {
                kind: Some(server_frame::Kind::Synced(_)),
                ..
            }) => break,
            Some(_) => {}
            None => bail!("closed during the drain"),
        }
    }
    let synced = t0.elapsed();
    if expected - 1 != messages {
        bail!("drained {} of {messages} messages", expected - 1);
    }
    let last = last_at.unwrap_or(synced);
    let human = format!(
        "drain: {messages} waiting messages delivered in order in {:.1} ms (Synced after {:.1} ms)",
        last.as_secs_f64() * 1000.0,
        synced.as_secs_f64() * 1000.0
    );
    let value = json!({
        "scenario": "drain", "messages": messages, "in_order": true,
        "last_message_ms": last.as_secs_f64() * 1000.0, "synced_ms": synced.as_secs_f64() * 1000.0,
    });
    Ok((human, value))
}
