//! `latency --rate R --seconds S`: open loop. Messages are sent on a fixed schedule (R per
//! second over P pairs) whether or not earlier ones were answered. Latency is reported twice:
//! from the *intended* send time (corrected for coordinated omission: a stall delays every
//! message scheduled during it) and from the actual send time. The schedule runs on tokio's
//! timer (1 ms granularity), which the corrected figure includes. With `receivers` (another
//! node of the same cluster), receivers connect there: the latency across nodes.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::SinkExt;
use serde_json::{Value, json};
use tern_proto::frames::*;
use tokio::sync::Mutex;

use crate::client::{self, encode, next_frame, read_stamp, send_frame};
use crate::report;
use crate::target::Target;

pub async fn run(
    target: &Target,
    receivers_at: Option<&str>,
    rate: u64,
    seconds: u64,
    pairs: usize,
    body: usize,
) -> anyhow::Result<(String, Value)> {
    let id = super::run_id();
    let pairs = pairs.max(1);
    let mut names = Vec::new();
    for i in 0..pairs {
        names.push(format!("l{id}s{i}"));
        names.push(format!("l{id}r{i}"));
    }
    let accounts = client::accounts(&target.url, names, 64).await?;
    let epoch = Instant::now();
    let corrected = Arc::new(Mutex::new(report::histogram()));
    let service = Arc::new(Mutex::new(report::histogram()));
    let sent = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let per_sender = rate as f64 / pairs as f64;
    let interval = Duration::from_secs_f64(1.0 / per_sender.max(0.001));
    let total_per_sender = (per_sender * seconds as f64).round() as u64;
    let start = tokio::time::Instant::now() + Duration::from_millis(500);
    let mut tasks = Vec::new();
    let mut receivers = Vec::new();
    for (i, pair) in accounts.chunks(2).enumerate() {
        let (s, r) = (pair[0].clone(), pair[1].clone());
        let (mut rtx, mut rrx) =
            client::connect_synced(receivers_at.unwrap_or(&target.addr), &r.token).await?;
        let (c2, s2, rec2, done2) = (
            corrected.clone(),
            service.clone(),
            received.clone(),
            done.clone(),
        );
        receivers.push(tokio::spawn(async move {
            let (mut hc, mut hs) = (report::histogram(), report::histogram());
            let (mut rid, mut got) = (10u64, 0u64);
            loop {
                let f = match tokio::time::timeout(Duration::from_millis(200), next_frame(&mut rrx))
                    .await
                {
                    Ok(Ok(Some(f))) => f,
                    Ok(_) => break,
                    Err(_) if done2.load(Ordering::Relaxed) => break,
                    Err(_) => continue,
                };
                let Some(server_frame::Kind::Event(e)) = f.kind else {
                    continue;
                };
                if let Some(event::Kind::Message(m)) = &e.kind
                    && m.body.len() >= 16
                    && let (Some(intended), Some(actual)) =
                        (read_stamp(&m.body), read_stamp(&m.body[8..]))
                {
                    let now = epoch.elapsed();
                    let _ = hc.record(now.saturating_sub(intended).as_micros().max(1) as u64);
                    let _ = hs.record(now.saturating_sub(actual).as_micros().max(1) as u64);
                    rec2.fetch_add(1, Ordering::Relaxed);
                    got += 1;
                }
                if got % 32 == 0 {
                    rid += 1;
                    let _ = rtx
                        .send(encode(
                            rid,
                            client_frame::Kind::Ack(Ack {
                                up_to: e.mailbox_seq,
                            }),
                        ))
                        .await;
                }
            }
            let _ = c2.lock().await.add(&hc);
            let _ = s2.lock().await.add(&hs);
        }));
        let (mut stx, mut srx) = client::connect_synced(&target.addr, &s.token).await?;
        tasks.push(tokio::spawn(async move {
            while let Ok(Some(_)) = next_frame(&mut srx).await {}
        }));
        let sent2 = sent.clone();
        // Spread the senders' schedules evenly over one interval.
        let offset = interval.mul_f64(i as f64 / pairs as f64);
        tasks.push(tokio::spawn(async move {
            for k in 0..total_per_sender {
                let due = start + offset + interval.mul_f64(k as f64);
                tokio::time::sleep_until(due).await;
                let intended = due.duration_since(tokio::time::Instant::from_std(epoch));
                let mut b = (intended.as_nanos() as u64).to_le_bytes().to_vec();
                b.extend_from_slice(&(epoch.elapsed().as_nanos() as u64).to_le_bytes());
                b.resize(body.max(16), b'.');
                if stx
                    .send(send_frame(
                        k + 10,
                        format!("m{k}"),
                        Peer::user(r.user_id),
                        b,
                        &[r.device_id],
                    ))
                    .await
                    .is_err()
                {
                    break;
                }
                sent2.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(seconds) + Duration::from_secs(10);
    tokio::time::sleep(Duration::from_millis(500) + Duration::from_secs(seconds)).await;
    let sent_n = sent.load(Ordering::Relaxed);
    while received.load(Ordering::Relaxed) < sent_n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done.store(true, Ordering::Relaxed);
    for t in tasks.drain(..) {
        t.abort();
    }
    for r in receivers {
        let _ = tokio::time::timeout(Duration::from_secs(2), r).await;
    }
    let (hc, hs) = (corrected.lock().await.clone(), service.lock().await.clone());
    let target_n = rate * seconds;
    let held = sent_n as f64 >= 0.99 * target_n as f64;
    let human = format!(
        "latency: {rate}/s for {seconds} s over {pairs} pairs{}; sent {sent_n} of {target_n} (rate {}), received {}\n  corrected: {}\n  service:   {}",
        match receivers_at {
            Some(r) => format!(", receivers at {r}"),
            None => String::new(),
        },
        if held { "held" } else { "NOT held" },
        received.load(Ordering::Relaxed),
        report::latency_text(&hc),
        report::latency_text(&hs)
    );
    let value = json!({
        "scenario": "latency", "rate": rate, "seconds": seconds, "pairs": pairs, "sent": sent_n,
        "receivers_at": receivers_at,
        "received": received.load(Ordering::Relaxed), "rate_held": held,
        "corrected": report::latency_json(&hc), "service": report::latency_json(&hs),
    });
    Ok((human, value))
}
