//! `connect --n N`: N authenticated idle connections. Reports the connect rate and the server's
//! resident memory per connection (VmRSS of the server process before and after), also as the
//! *marginal* cost: the growth over the second half of the connections only. The first figure
//! depends on how much freed memory the server happened to hold after setting up the accounts
//! (the first connections reuse it); the marginal one does not.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::bail;
use serde_json::{Value, json};
use tokio::sync::Semaphore;

use crate::client;
use crate::target::{Target, rss};

pub async fn run(
    target: &Target,
    pid: Option<u32>,
    n: usize,
    concurrency: usize,
) -> anyhow::Result<(String, Value)> {
    if n > 19_000 {
        bail!("one process holds at most ~19,000 sockets here (open-file limit 20,000)");
    }
    let id = super::run_id();
    let names: Vec<String> = (0..n).map(|i| format!("c{id}x{i}")).collect();
    let t = Instant::now();
    let accounts = client::accounts(&target.url, names, 64).await?;
    let setup = t.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = pid.and_then(rss);
    let gate = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut conns = Vec::with_capacity(n);
    let mut elapsed = Duration::ZERO;
    let mut mid = None;
    let mut accounts = accounts.into_iter();
    let half = n / 2;
    for count in [half, n - half] {
        let started = Instant::now();
        let mut tasks = Vec::with_capacity(count);
        for a in accounts.by_ref().take(count) {
            let (gate, addr) = (gate.clone(), target.addr.clone());
            tasks.push(tokio::spawn(async move {
                let _permit = gate.acquire_owned().await?;
                client::connect_synced(&addr, &a.token).await
            }));
        }
        for t in tasks {
            conns.push(t.await??);
        }
        elapsed += started.elapsed();
        // Let allocations settle (handshake buffers freed) before reading memory.
        tokio::time::sleep(Duration::from_secs(2)).await;
        if mid.is_none() {
            mid = Some(pid.and_then(rss));
        }
    }
    let mid = mid.flatten();
    let after = pid.and_then(rss);
    let rate = n as f64 / elapsed.as_secs_f64();
    let per_conn = match (before, after) {
        (Some((b, _)), Some((a, _))) => Some((a as f64 - b as f64) / n as f64),
        _ => None,
    };
    let marginal = match (mid, after) {
        (Some((m, _)), Some((a, _))) if n - half > 0 => {
            Some((a as f64 - m as f64) / (n - half) as f64)
        }
        _ => None,
    };
    let human = format!(
        "connect: {n} connections in {:.2} s = {:.0}/s; server RSS {} -> {} ({}; {} over the second half); accounts set up in {:.1} s",
        elapsed.as_secs_f64(),
        rate,
        before.map_or("?".into(), |b| format!("{:.1} MiB", b.0 as f64 / 1048576.0)),
        after.map_or("?".into(), |a| format!("{:.1} MiB", a.0 as f64 / 1048576.0)),
        per_conn.map_or("per-connection memory unknown".into(), |p| format!(
            "{:.0} bytes per connection",
            p
        )),
        marginal.map_or("?".into(), |p| format!("{p:.0} bytes each")),
        setup.as_secs_f64(),
    );
    let value = json!({
        "scenario": "connect", "connections": n, "seconds": elapsed.as_secs_f64(),
        "connects_per_sec": rate,
        "server_rss_before": before.map(|b| b.0), "server_rss_after": after.map(|a| a.0),
        "server_rss_per_connection": per_conn,
        "server_rss_per_connection_marginal": marginal,
    });
    drop(conns);
    Ok((human, value))
}
