//! `push --devices N --rate R`: N devices registered for push (each with keys of its own, an
//! endpoint on a push service this tool runs on 127.0.0.1) and offline; one sender sends each
//! device one message, R per second (open loop). Reports the delay from sending a message to
//! its push arriving at the push service (p50, p99, max), the time until every device had its
//! push, and the server's CPU time and memory over the run. Every push is then decrypted with
//! its device's keys (one wake-up announcing one message, per device, exactly once).
//!
//! `--no-push` runs the same messages with no subscription: the difference in CPU time is what
//! the pushes cost.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use futures_util::SinkExt;
use serde_json::{Value, json};
use tern_proto::frames::*;
use tern_webpush::Receiver;

use crate::client::{self, next_frame, send_frame};
use crate::target::{Target, cpu_time};

/// What the push service saw: per device index, when and what.
type Arrivals = Arc<Mutex<HashMap<usize, Vec<(Instant, Vec<u8>)>>>>;

/// A push service on 127.0.0.1: takes `POST /push/{i}`, answers 201.
async fn push_service(arrivals: Arrivals) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let origin = format!("http://{}", listener.local_addr()?);
    let app = axum::Router::new().route(
        "/push/{i}",
        axum::routing::post(
            move |axum::extract::Path(i): axum::extract::Path<usize>, body: axum::body::Bytes| {
                let arrivals = arrivals.clone();
                async move {
                    let at = Instant::now();
                    if let Ok(mut a) = arrivals.lock() {
                        a.entry(i).or_default().push((at, body.to_vec()));
                    }
                    axum::http::StatusCode::CREATED
                }
            },
        ),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok(origin)
}

pub async fn run(
    target: &Target,
    pid: Option<u32>,
    devices: usize,
    rate: u64,
    no_push: bool,
    body: usize,
) -> anyhow::Result<(String, Value)> {
    if devices == 0 || rate == 0 {
        bail!("--devices and --rate must be positive");
    }
    let id = super::run_id();
    let names: Vec<String> = std::iter::once(format!("p{id}s"))
        .chain((0..devices).map(|i| format!("p{id}r{i}")))
        .collect();
    let mut accounts = client::accounts(&target.url, names, 64).await?;
    let receivers_acc = accounts.split_off(1);
    let sender = accounts.remove(0);

    let arrivals: Arrivals = Arc::default();
    let origin = push_service(arrivals.clone()).await?;
    let keys: Vec<Receiver> = (0..devices).map(|_| Receiver::generate()).collect();
    if !no_push {
        let http = reqwest::Client::new();
        let all: Vec<(usize, &client::Account)> = receivers_acc.iter().enumerate().collect();
        for chunk in all.chunks(64) {
            let mut tasks = Vec::new();
            for &(i, a) in chunk {
                let k = &keys[i];
                let url = format!("{}/v1/devices/{}/push", target.url, a.device_id);
                let sub = json!({
                    "endpoint": format!("{origin}/push/{i}"),
                    "keys": {"p256dh": B64.encode(k.p256dh()), "auth": B64.encode(k.auth())},
                });
                let request = http.put(url).bearer_auth(&a.token).json(&sub);
                tasks.push(tokio::spawn(async move { request.send().await }));
            }
            for t in tasks {
                let r = t.await??;
                if !r.status().is_success() {
                    bail!("push registration: {}", r.text().await?);
                }
            }
        }
    }

    let (mut tx, mut rx) = client::connect_synced(&target.addr, &sender.token).await?;
    let reader = tokio::spawn(async move {
        let mut sent = 0usize;
        while sent < devices {
            match next_frame(&mut rx).await? {
                Some(ServerFrame {
                    kind: Some(server_frame::Kind::Sent(_)),
                    ..
                }) => sent += 1,
                Some(ServerFrame {
                    kind: Some(server_frame::Kind::Error(e)),
                    ..
                }) => bail!("send failed: {}", e.message),
                Some(_) => {}
                None => bail!("sender socket closed"),
            }
        }
        Ok(())
    });

    let cpu_before = pid.and_then(cpu_time);
    let start = Instant::now();
    let interval = Duration::from_nanos(1_000_000_000 / rate);
    let mut sent_at = Vec::with_capacity(devices);
    for (i, r) in receivers_acc.iter().enumerate() {
        tokio::time::sleep_until((start + interval * i as u32).into()).await;
        sent_at.push(Instant::now());
        tx.send(send_frame(
            i as u64 + 10,
            format!("m{i}"),
            Peer::user(r.user_id),
            vec![b'x'; body],
            &[r.device_id],
        ))
        .await?;
    }
    reader.await??;
    let all_sent = start.elapsed();
    let deadline = Instant::now() + Duration::from_secs(120);
    if !no_push {
        loop {
            let got = arrivals.lock().map(|a| a.len()).unwrap_or(0);
            if got == devices {
                break;
            }
            if Instant::now() > deadline {
                bail!("{got} of {devices} devices got a push within 120 s");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let all_pushed = start.elapsed();
    let cpu = match (cpu_before, pid.and_then(cpu_time)) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    // Later duplicates would show now.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let arrivals = std::mem::take(&mut *arrivals.lock().map_err(|_| anyhow::anyhow!("lock"))?);
    let mut delays = hdrhistogram::Histogram::<u64>::new(3)?;
    for (i, got) in &arrivals {
        if got.len() != 1 {
            bail!("device {i} got {} pushes", got.len());
        }
        let (at, body) = &got[0];
        let plain = keys[*i].decrypt(body).context("decrypting a push")?;
        let wake: Value = serde_json::from_slice(&plain)?;
        if wake["n"] != 1 || wake.as_object().map(|o| o.len()) != Some(2) {
            bail!("unexpected wake-up {wake}");
        }
        delays.record(at.duration_since(sent_at[*i]).as_micros() as u64)?;
    }
    let ms = |q: f64| delays.value_at_quantile(q) as f64 / 1000.0;
    let cpu_ms = cpu.map(|c| c.as_secs_f64() * 1000.0);
    let human = if no_push {
        format!(
            "push (baseline, no subscriptions): {devices} messages at {rate}/s sent in {:.2} s; server CPU {}",
            all_sent.as_secs_f64(),
            cpu_ms.map_or("n/a".into(), |c| format!("{c:.0} ms")),
        )
    } else {
        format!(
            "push: {devices} offline devices, one message each at {rate}/s: message to push p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; every push in {:.2} s; server CPU {}",
            ms(0.5),
            ms(0.99),
            delays.max() as f64 / 1000.0,
            all_pushed.as_secs_f64(),
            cpu_ms.map_or("n/a".into(), |c| format!("{c:.0} ms")),
        )
    };
    let value = json!({
        "scenario": "push", "devices": devices, "rate": rate, "no_push": no_push,
        "p50_ms": ms(0.5), "p99_ms": ms(0.99), "max_ms": delays.max() as f64 / 1000.0,
        "all_sent_s": all_sent.as_secs_f64(), "all_pushed_s": all_pushed.as_secs_f64(),
        "server_cpu_ms": cpu_ms,
    });
    Ok((human, value))
}
