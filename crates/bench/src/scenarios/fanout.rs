//! `fanout --members G --rate R --seconds S`: one group of G members, every member online; one
//! member sends R messages a second. Reports deliveries per second and, per message, the time
//! until the last member had it.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::SinkExt;
use serde_json::{Value, json};
use tern_proto::frames::*;
use tokio::sync::Mutex;

use crate::client::{self, encode, next_frame, read_stamp, send_frame, stamp};
use crate::report;
use crate::target::Target;

pub async fn run(
    target: &Target,
    members: usize,
    rate: u64,
    seconds: u64,
    body: usize,
) -> anyhow::Result<(String, Value)> {
    if members < 2 {
        bail!("a group needs at least 2 members");
    }
    let id = super::run_id();
    let names: Vec<String> = (0..members).map(|i| format!("f{id}m{i}")).collect();
    let accounts = client::accounts(&target.url, names.clone(), 64).await?;
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("{}/v1/groups", target.url))
        .bearer_auth(&accounts[0].token)
        .json(&json!({"name": "fanout", "members": &names[1..]}))
        .send()
        .await?;
    if resp.status().as_u16() != 201 {
        bail!("create group: {}", resp.text().await?);
    }
    let group = resp.json::<Value>().await?["group_id"]
        .as_u64()
        .context("group id")?;
    let epoch = Instant::now();
    // seq -> (members that have it, latest arrival)
    let arrivals: Arc<Mutex<HashMap<u64, (usize, Duration)>>> = Arc::default();
    let deliveries = Arc::new(AtomicU64::new(0));
    let per_delivery = Arc::new(Mutex::new(report::histogram()));
    // A member stops listening 3 s after its last frame once the sends have begun; while the
    // others are still connecting, it waits (connecting 999 members can take longer than 3 s).
    let (began_tx, began) = tokio::sync::watch::channel(false);
    let mut receivers = Vec::new();
    for a in &accounts[1..] {
        let (mut tx, mut rx) = client::connect_synced(&target.addr, &a.token).await?;
        let (arr, del, hist) = (arrivals.clone(), deliveries.clone(), per_delivery.clone());
        let began = began.clone();
        receivers.push(tokio::spawn(async move {
            let mut local = report::histogram();
            let (mut rid, mut n) = (10u64, 0u64);
            loop {
                let idle = if *began.borrow() { 3 } else { 120 };
                let Ok(Ok(Some(f))) =
                    tokio::time::timeout(Duration::from_secs(idle), next_frame(&mut rx)).await
                else {
                    break;
                };
                let Some(server_frame::Kind::Event(e)) = f.kind else {
                    continue;
                };
                if let Some(event::Kind::Message(m)) = &e.kind
                    && let Some(at) = read_stamp(&m.body)
                {
                    let now = epoch.elapsed();
                    let _ = local.record(now.saturating_sub(at).as_micros().max(1) as u64);
                    del.fetch_add(1, Ordering::Relaxed);
                    let mut map = arr.lock().await;
                    let entry = map.entry(m.seq).or_insert((0, Duration::ZERO));
                    entry.0 += 1;
                    entry.1 = entry.1.max(now.saturating_sub(at));
                }
                n += 1;
                if n % 16 == 0 {
                    rid += 1;
                    let _ = tx
                        .send(encode(
                            rid,
                            client_frame::Kind::Ack(Ack {
                                up_to: e.mailbox_seq,
                            }),
                        ))
                        .await;
                }
            }
            let _ = hist.lock().await.add(&local);
        }));
    }
    let (mut stx, mut srx) = client::connect_synced(&target.addr, &accounts[0].token).await?;
    let reader = tokio::spawn(async move { while let Ok(Some(_)) = next_frame(&mut srx).await {} });
    let _ = began_tx.send(true);
    let total = rate * seconds;
    let interval = Duration::from_secs_f64(1.0 / rate.max(1) as f64);
    let started = Instant::now();
    let start = tokio::time::Instant::now();
    for k in 0..total {
        tokio::time::sleep_until(start + interval.mul_f64(k as f64)).await;
        stx.send(send_frame(
            k + 10,
            format!("f{k}"),
            Peer::group(group),
            stamp(epoch, body),
            &[],
        ))
        .await?;
    }
    let expected = total * (members as u64 - 1);
    let deadline = Instant::now() + Duration::from_secs(30);
    while deliveries.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed();
    reader.abort();
    for r in receivers {
        let _ = tokio::time::timeout(Duration::from_secs(5), r).await;
    }
    let mut complete = report::histogram();
    for (count, last) in arrivals.lock().await.values() {
        if *count == members - 1 {
            let _ = complete.record(last.as_micros().max(1) as u64);
        }
    }
    let per_delivery = per_delivery.lock().await.clone();
    let got = deliveries.load(Ordering::Relaxed);
    let dps = got as f64 / elapsed.as_secs_f64();
    let human = format!(
        "fanout: {members} members, {total} messages at {rate}/s: {got} of {expected} deliveries, {dps:.0} deliveries/s\n  until the last member: {}\n  each delivery:         {}",
        report::latency_text(&complete),
        report::latency_text(&per_delivery)
    );
    let value = json!({
        "scenario": "fanout", "members": members, "rate": rate, "seconds": seconds, "messages": total,
        "deliveries": got, "expected": expected, "deliveries_per_sec": dps,
        "until_last_member": report::latency_json(&complete), "per_delivery": report::latency_json(&per_delivery),
    });
    Ok((human, value))
}
