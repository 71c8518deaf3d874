//! A lean protocol client on `tern-proto` (no local database, no retries): the generator must not
//! be the bottleneck. Accounts are made concurrently over HTTP.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use tern_proto::frames::*;
use tokio_tungstenite::tungstenite::Message as WsMessage;

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;
pub type Tx = SplitSink<Ws, WsMessage>;
pub type Rx = SplitStream<Ws>;

#[derive(Debug, Clone)]
pub struct Account {
    pub user_id: u64,
    pub device_id: u64,
    pub token: String,
}

const PASSWORD: &str = "bench password";

/// Registers and logs in `names`, `concurrency` at a time.
pub async fn accounts(
    url: &str,
    names: Vec<String>,
    concurrency: usize,
) -> anyhow::Result<Vec<Account>> {
    let http = reqwest::Client::new();
    let mut out = Vec::with_capacity(names.len());
    for chunk in names.chunks(concurrency.max(1)) {
        let mut tasks = Vec::new();
        for name in chunk {
            let (http, url, name) = (http.clone(), url.to_owned(), name.clone());
            tasks.push(tokio::spawn(
                async move { account(&http, &url, &name).await },
            ));
        }
        for t in tasks {
            out.push(t.await??);
        }
    }
    Ok(out)
}

async fn account(http: &reqwest::Client, url: &str, name: &str) -> anyhow::Result<Account> {
    let r = http
        .post(format!("{url}/v1/accounts"))
        .json(&serde_json::json!({"username": name, "password": PASSWORD}))
        .send()
        .await?;
    if !(r.status().as_u16() == 201 || r.status().as_u16() == 409) {
        bail!("register {name}: {}", r.text().await?);
    }
    let r = http
        .post(format!("{url}/v1/sessions"))
        .json(&serde_json::json!({"username": name, "password": PASSWORD, "device_name": "bench"}))
        .send()
        .await?;
    if r.status().as_u16() != 201 {
        bail!("login {name}: {}", r.text().await?);
    }
    let v: serde_json::Value = r.json().await?;
    Ok(Account {
        user_id: v["user_id"].as_u64().context("user_id")?,
        device_id: v["device_id"].as_u64().context("device_id")?,
        token: v["token"].as_str().context("token")?.to_owned(),
    })
}

pub fn encode(request_id: u64, kind: client_frame::Kind) -> WsMessage {
    WsMessage::Binary(
        ClientFrame {
            request_id,
            kind: Some(kind),
        }
        .encode_to_vec()
        .into(),
    )
}

/// Reads the next server frame; `None` when the socket closed.
pub async fn next_frame(rx: &mut Rx) -> anyhow::Result<Option<ServerFrame>> {
    loop {
        match rx.next().await {
            None | Some(Ok(WsMessage::Close(_))) => return Ok(None),
            Some(Ok(WsMessage::Binary(b))) => return Ok(Some(ServerFrame::decode(&b[..])?)),
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(e.into()),
        }
    }
}

/// Opens a socket and says Hello; returns the halves once Welcome arrived, and the events
/// drained before `Synced` (when `drain` is set; otherwise the caller reads them).
pub async fn connect(addr: &str, token: &str) -> anyhow::Result<(Tx, Rx)> {
    let (ws, _) =
        tokio_tungstenite::connect_async_with_config(format!("ws://{addr}/v1/ws"), None, true)
            .await?;
    let (mut tx, mut rx) = ws.split();
    tx.send(encode(
        1,
        client_frame::Kind::Hello(Hello {
            protocol_version: tern_proto::PROTOCOL_VERSION,
            token: token.to_owned(),
        }),
    ))
    .await?;
    match next_frame(&mut rx).await?.and_then(|f| f.kind) {
        Some(server_frame::Kind::Welcome(_)) => Ok((tx, rx)),
        other => bail!("expected Welcome, got {other:?}"),
    }
}

/// Connects and reads up to `Synced`, acknowledging what was drained.
pub async fn connect_synced(addr: &str, token: &str) -> anyhow::Result<(Tx, Rx)> {
    let (mut tx, mut rx) = connect(addr, token).await?;
    let mut last = 0;
    loop {
        match next_frame(&mut rx).await?.and_then(|f| f.kind) {
            Some(server_frame::Kind::Event(e)) => last = e.mailbox_seq,
            Some(server_frame::Kind::Synced(_)) => break,
            Some(_) => {}
            None => bail!("closed before Synced"),
        }
    }
    if last > 0 {
        tx.send(encode(2, client_frame::Kind::Ack(Ack { up_to: last })))
            .await?;
    }
    Ok((tx, rx))
}

pub fn send_frame(
    request_id: u64,
    client_msg_id: String,
    to: Peer,
    body: Vec<u8>,
    devices: &[u64],
) -> WsMessage {
    encode(
        request_id,
        client_frame::Kind::Send(Send {
            client_msg_id,
            to: Some(to),
            body,
            devices: devices
                .iter()
                .map(|d| DeviceBody {
                    device_id: *d,
                    body: None,
                })
                .collect(),
        }),
    )
}

/// Nanoseconds since `epoch`, as a body prefix for latency measurement.
pub fn stamp(epoch: Instant, size: usize) -> Vec<u8> {
    let mut body = (epoch.elapsed().as_nanos() as u64).to_le_bytes().to_vec();
    body.resize(size.max(8), b'.');
    body
}

pub fn read_stamp(body: &[u8]) -> Option<Duration> {
    let b: [u8; 8] = body.get(..8)?.try_into().ok()?;
    Some(Duration::from_nanos(u64::from_le_bytes(b)))
}
