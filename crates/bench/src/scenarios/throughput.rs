//! `throughput --pairs P --window W --seconds S`: P sender/receiver pairs, at most W messages in
//! flight per sender (a permit comes back with each `Sent`). Counts messages delivered to and
//! acknowledged by receivers during the measured window, and their end-to-end latency (the send
//! time travels in the body).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use serde_json::{Value, json};
use tern_proto::frames::*;
use tokio::sync::{Mutex, Semaphore};

use crate::client::{self, encode, next_frame, read_stamp, send_frame, stamp};
use crate::report;
use crate::target::Target;

/// Acknowledge after this many events, or when the socket is idle.
const ACK_EVERY: u64 = 64;

pub async fn run(
    target: &Target,
    pairs: usize,
    window: usize,
    seconds: u64,
    body: usize,
) -> anyhow::Result<(String, Value)> {
    let id = super::run_id();
    let mut names = Vec::new();
    for i in 0..pairs {
        names.push(format!("t{id}s{i}"));
        names.push(format!("t{id}r{i}"));
    }
    let accounts = client::accounts(&target.url, names, 64).await?;
    let epoch = Instant::now();
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let delivered = Arc::new(AtomicU64::new(0));
    let hist = Arc::new(Mutex::new(report::histogram()));
    let sent = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for pair in accounts.chunks(2) {
        let (s, r) = (pair[0].clone(), pair[1].clone());
        // Receiver.
        let (mut rtx, mut rrx) = client::connect_synced(&target.addr, &r.token).await?;
        let (measuring2, stop2, delivered2, hist2) = (
            measuring.clone(),
            stop.clone(),
            delivered.clone(),
            hist.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut local = report::histogram();
            let (mut last, mut unacked, mut rid) = (0u64, 0u64, 10u64);
            loop {
                let frame = match tokio::time::timeout(
                    Duration::from_millis(5),
                    next_frame(&mut rrx),
                )
                .await
                {
                    Ok(Ok(Some(f))) => Some(f),
                    Ok(_) => break,
                    Err(_) => None,
                };
                if let Some(ServerFrame {
                    kind: Some(server_frame::Kind::Event(e)),
                    ..
                }) = &frame
                {
                    last = e.mailbox_seq;
                    unacked += 1;
                    if let Some(event::Kind::Message(m)) = &e.kind
                        && let Some(at) = read_stamp(&m.body)
                        && measuring2.load(Ordering::Relaxed)
                    {
                        let lat = epoch.elapsed().saturating_sub(at);
                        let _ = local.record(lat.as_micros().max(1) as u64);
                        delivered2.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if unacked >= ACK_EVERY || (frame.is_none() && unacked > 0) {
                    rid += 1;
                    if rtx
                        .send(encode(rid, client_frame::Kind::Ack(Ack { up_to: last })))
                        .await
                        .is_err()
                    {
                        break;
                    }
                    unacked = 0;
                }
                if frame.is_none() && stop2.load(Ordering::Relaxed) {
                    break;
                }
            }
            let _ = hist2.lock().await.add(&local);
        }));
        // Sender: a writer bounded by W permits, a reader returning them on Sent.
        let (mut stx, mut srx) = client::connect_synced(&target.addr, &s.token).await?;
        let permits = Arc::new(Semaphore::new(window.max(1)));
        let p2 = permits.clone();
        let stop3 = stop.clone();
        tasks.push(tokio::spawn(async move {
            while let Ok(Some(f)) = next_frame(&mut srx).await {
                if matches!(
                    f.kind,
                    Some(server_frame::Kind::Sent(_)) | Some(server_frame::Kind::Error(_))
                ) {
                    p2.add_permits(1);
                }
                if stop3.load(Ordering::Relaxed) && p2.available_permits() == window.max(1) {
                    break;
                }
            }
        }));
        let (stop4, sent2) = (stop.clone(), sent.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop4.load(Ordering::Relaxed) {
                let Ok(permit) = permits.acquire().await else {
                    break;
                };
                permit.forget();
                n += 1;
                let frame = send_frame(
                    n + 10,
                    format!("m{n}"),
                    Peer::user(r.user_id),
                    stamp(epoch, body),
                    &[r.device_id],
                );
                if stx.send(frame).await.is_err() {
                    break;
                }
                sent2.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Warm up, measure, stop.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let base = delivered.load(Ordering::Relaxed);
    measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let during = delivered.load(Ordering::Relaxed) - base;
    let elapsed = t0.elapsed();
    measuring.store(false, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(10), t).await;
    }
    let hist = hist.lock().await.clone();
    let rate = during as f64 / elapsed.as_secs_f64();
    let human = format!(
        "throughput: {pairs} pairs, window {window}, {seconds} s: {rate:.0} messages/s delivered and acknowledged; latency {}",
        report::latency_text(&hist)
    );
    let value = json!({
        "scenario": "throughput", "pairs": pairs, "window": window, "seconds": seconds, "body_bytes": body,
        "delivered": during, "messages_per_sec": rate, "latency": report::latency_json(&hist),
        "sent_total": sent.load(Ordering::Relaxed),
    });
    Ok((human, value))
}
