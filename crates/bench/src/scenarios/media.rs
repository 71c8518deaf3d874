//! `media --size BYTES`: one object uploaded with tus (in `--chunk`-sized `PATCH` requests,
//! streamed) and downloaded again (streamed, hash verified). Reports both throughputs and how
//! much the server's peak resident memory grew, which is the constant-memory check.

use std::time::Instant;

use anyhow::{Context, bail};
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::client;
use crate::target::{Target, rss};

/// Bytes per body chunk the generator hands to the HTTP client.
const PIECE: usize = 1 << 20;

/// A 1 MiB block of pseudo-random bytes; the object is this block repeated.
fn block() -> Bytes {
    let mut x = 0x2545_f491_u32;
    (0..PIECE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

/// The object's bytes from `from` to `to`, as body chunks that share one buffer.
fn pieces(
    block: &Bytes,
    from: u64,
    to: u64,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + use<> {
    let block = block.clone();
    let mut at = from;
    futures_util::stream::iter(std::iter::from_fn(move || {
        if at >= to {
            return None;
        }
        let start = (at % PIECE as u64) as usize;
        let n = ((to - at) as usize).min(PIECE - start);
        at += n as u64;
        Some(Ok(block.slice(start..start + n)))
    }))
}

fn mb_per_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs.max(1e-9) / 1e6
}

pub async fn run(
    target: &Target,
    pid: Option<u32>,
    size: u64,
    chunk: u64,
) -> anyhow::Result<(String, Value)> {
    let id = super::run_id();
    let acc = client::accounts(&target.url, vec![format!("media{id}")], 1).await?;
    let token = &acc[0].token;
    let http = reqwest::Client::new();
    let block = block();
    let chunk = if chunk == 0 { size.max(1) } else { chunk };
    let before = pid.and_then(rss).map(|(_, hwm)| hwm);

    let t0 = Instant::now();
    let created = http
        .post(format!("{}/v1/uploads", target.url))
        .bearer_auth(token)
        .header("Tus-Resumable", "1.0.0")
        .header("Upload-Length", size.to_string())
        .send()
        .await?;
    if created.status().as_u16() != 201 {
        bail!(
            "create upload: {} {}",
            created.status(),
            created.text().await?
        );
    }
    let location = created.headers()["location"].to_str()?.to_owned();
    let mut offset = 0u64;
    let mut media_id = None;
    loop {
        let end = (offset + chunk).min(size);
        let r = http
            .patch(format!("{}{location}", target.url))
            .bearer_auth(token)
            .header("Tus-Resumable", "1.0.0")
            .header("Content-Type", "application/offset+octet-stream")
            .header("Upload-Offset", offset.to_string())
            .header("Content-Length", (end - offset).to_string())
            .body(reqwest::Body::wrap_stream(pieces(&block, offset, end)))
            .send()
            .await?;
        if r.status().as_u16() != 204 {
            bail!("patch at {offset}: {} {}", r.status(), r.text().await?);
        }
        offset = r.headers()["upload-offset"].to_str()?.parse()?;
        if let Some(m) = r.headers().get("tern-media-id") {
            media_id = Some(m.to_str()?.to_owned());
        }
        if offset >= size {
            break;
        }
    }
    let upload = t0.elapsed().as_secs_f64();
    let media_id = media_id.context("the last PATCH names the media id")?;
    let after_upload = pid.and_then(rss).map(|(_, hwm)| hwm);

    let t1 = Instant::now();
    let resp = http
        .get(format!("{}/v1/media/{media_id}", target.url))
        .bearer_auth(token)
        .send()
        .await?;
    if !resp.status().is_success() {
        bail!("download: {}", resp.status());
    }
    let mut stream = resp.bytes_stream();
    let mut hash = Sha256::new();
    let mut received = 0u64;
    while let Some(c) = stream.next().await {
        let c = c?;
        received += c.len() as u64;
        hash.update(&c);
    }
    let download = t1.elapsed().as_secs_f64();
    if received != size || hex::encode(hash.finalize()) != media_id {
        bail!("downloaded {received} of {size} bytes, or they hash to another id");
    }
    let after = pid.and_then(rss).map(|(_, hwm)| hwm);
    let grew = |a: Option<u64>| a.zip(before).map(|(a, b)| a.saturating_sub(b));
    let mib = |v: Option<u64>| v.map_or("?".to_owned(), |b| format!("{:.1}", b as f64 / 1048576.0));
    let human = format!(
        "media: {:.0} MiB up in {upload:.2} s ({:.0} MB/s, {} PATCH of {:.0} MiB), down in {download:.2} s ({:.0} MB/s, verified); server peak RSS {} MiB -> {} MiB (+{} MiB)",
        size as f64 / 1048576.0,
        mb_per_s(size, upload),
        size.div_ceil(chunk),
        chunk as f64 / 1048576.0,
        mb_per_s(size, download),
        mib(before),
        mib(after),
        mib(grew(after)),
    );
    let value = json!({
        "scenario": "media", "size": size, "chunk": chunk,
        "upload_secs": upload, "upload_mb_per_s": mb_per_s(size, upload),
        "download_secs": download, "download_mb_per_s": mb_per_s(size, download),
        "server_peak_rss_before": before, "server_peak_rss_growth_upload": grew(after_upload),
        "server_peak_rss_growth": grew(after),
    });
    Ok((human, value))
}
