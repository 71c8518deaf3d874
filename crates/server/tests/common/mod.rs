//! Test harness: the real server on 127.0.0.1:0 with a temporary data directory, plus small raw
//! HTTP and WebSocket helpers for protocol-level tests.
#![allow(dead_code)]

pub mod sdk;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use tern_proto::frames::*;
use tern_server::{AppState, Config};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::sync::CancellationToken;

pub struct TestServer {
    pub addr: SocketAddr,
    /// The running server's state (services, store), for tests that look inside.
    pub state: AppState,
    pub dir: tempfile::TempDir,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(dir, tweak).await
    }

    pub async fn start_in(dir: tempfile::TempDir, tweak: impl FnOnce(&mut Config)) -> TestServer {
        let mut config = Config {
            data_dir: dir.path().to_owned(),
            ..Config::default()
        };
        config.last_seen_flush_secs = 1;
        // Tests are not about password cost: keep argon2id cheap so that many accounts are quick.
        config.password_hashing = tern_server::auth::PasswordHashing {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
            max_waiting: 4096,
            ..Default::default()
        };
        // Tests create many accounts, devices and connections from 127.0.0.1 and send in
        // bursts; the abuse limits are tested where they are the subject (tests/abuse.rs).
        config.rate_limits = tern_server::config::RateLimits {
            registrations_per_hour_per_address: 0,
            logins_per_minute_per_address: 0,
            logins_per_minute_per_user_and_address: 0,
            logins_per_hour_per_user: 0,
            sends_per_second: 0,
            send_burst: 0,
        };
        config.connections.max_per_address = 0;
        tweak(&mut config);
        let state = AppState::build(config).expect("state");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(tern_server::run(listener, state.clone(), shutdown.clone()));
        TestServer {
            addr,
            state,
            dir,
            shutdown,
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Graceful shutdown; returns the data directory for a restart.
    pub async fn stop(mut self) -> tempfile::TempDir {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(15), t)
                .await
                .expect("server stops in time")
                .expect("join")
                .expect("server ran cleanly");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        std::mem::replace(&mut self.dir, dir)
    }

    pub fn http(&self) -> Http {
        Http {
            base: self.url(),
            client: client(),
        }
    }

    /// An HTTP client whose connections come from the local address `from`.
    pub fn http_from(&self, from: std::net::IpAddr) -> Http {
        Http {
            base: self.url(),
            client: reqwest::Client::builder()
                .pool_idle_timeout(Duration::from_secs(5))
                .local_address(from)
                .build()
                .expect("client"),
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub struct Http {
    pub base: String,
    pub client: reqwest::Client,
}

impl Http {
    pub async fn post(
        &self,
        path: &str,
        body: serde_json::Value,
        token: Option<&str>,
    ) -> (u16, serde_json::Value) {
        let mut req = self.client.post(format!("{}{path}", self.base)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        Self::answer(req.send().await.expect("request")).await
    }

    /// A GET whose answer is text (metrics).
    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let r = self
            .client
            .get(format!("{}{path}", self.base))
            .send()
            .await
            .expect("request");
        (r.status().as_u16(), r.text().await.expect("text"))
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> (u16, serde_json::Value) {
        let mut req = self.client.get(format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        Self::answer(req.send().await.expect("request")).await
    }

    pub async fn put_json(
        &self,
        path: &str,
        body: serde_json::Value,
        token: Option<&str>,
    ) -> (u16, serde_json::Value) {
        let mut req = self.client.put(format!("{}{path}", self.base)).json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        Self::answer(req.send().await.expect("request")).await
    }

    pub async fn put(&self, path: &str, token: Option<&str>) -> (u16, serde_json::Value) {
        let mut req = self.client.put(format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        Self::answer(req.send().await.expect("request")).await
    }

    pub async fn patch(
        &self,
        path: &str,
        body: serde_json::Value,
        token: Option<&str>,
    ) -> (u16, serde_json::Value) {
        let mut req = self
            .client
            .patch(format!("{}{path}", self.base))
            .json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        Self::answer(req.send().await.expect("request")).await
    }

    pub async fn delete(&self, path: &str, token: Option<&str>) -> (u16, serde_json::Value) {
        let mut req = self.client.delete(format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        Self::answer(req.send().await.expect("request")).await
    }

    async fn answer(resp: reqwest::Response) -> (u16, serde_json::Value) {
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
        )
    }

    /// Registers and logs in; returns (user_id, device_id, token).
    pub async fn account(&self, name: &str) -> (u64, u64, String) {
        let (s, _) = self
            .post(
                "/v1/accounts",
                serde_json::json!({"username": name, "password": "correct horse"}),
                None,
            )
            .await;
        assert!(s == 201 || s == 409, "register {name}: {s}");
        self.login(name).await
    }

    pub async fn login(&self, name: &str) -> (u64, u64, String) {
        let (s, v) = self
            .post("/v1/sessions", serde_json::json!({"username": name, "password": "correct horse", "device_name": "test"}), None)
            .await;
        assert_eq!(s, 201, "login {name}: {v}");
        (
            v["user_id"].as_u64().expect("uid"),
            v["device_id"].as_u64().expect("did"),
            v["token"].as_str().expect("token").to_owned(),
        )
    }
}

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A raw protocol connection.
pub struct Raw {
    pub ws: Ws,
    next_id: u64,
}

pub const WAIT: Duration = Duration::from_secs(10);

impl Raw {
    pub async fn open(addr: SocketAddr) -> Raw {
        let (ws, _) =
            tokio_tungstenite::connect_async_with_config(format!("ws://{addr}/v1/ws"), None, true)
                .await
                .expect("connect");
        Raw { ws, next_id: 1 }
    }

    /// Like `open`, with a small kernel receive buffer, for tests of clients that stop reading.
    pub async fn open_small_buffer(addr: SocketAddr) -> Raw {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(8 * 1024).expect("buffer size");
        Raw::open_on(addr, socket).await
    }

    /// Like `open`, from the local address `from` (any of 127.0.0.0/8 on loopback).
    pub async fn open_from(addr: SocketAddr, from: std::net::IpAddr) -> Raw {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.bind(SocketAddr::new(from, 0)).expect("bind");
        Raw::open_on(addr, socket).await
    }

    /// Connects `socket` to the server and upgrades to the WebSocket.
    async fn open_on(addr: SocketAddr, socket: tokio::net::TcpSocket) -> Raw {
        let stream = socket.connect(addr).await.expect("connect");
        let stream = tokio_tungstenite::MaybeTlsStream::Plain(stream);
        let (ws, _) = tokio_tungstenite::client_async(format!("ws://{addr}/v1/ws"), stream)
            .await
            .expect("handshake");
        Raw { ws, next_id: 1 }
    }

    /// Opens, says Hello with `token`, and expects Welcome then reads up to Synced.
    pub async fn connect(addr: SocketAddr, token: &str) -> (Raw, Welcome, Vec<Event>) {
        Raw::greet(Raw::open(addr).await, token).await
    }

    /// Says Hello on an open socket and reads up to Synced.
    pub async fn greet(mut raw: Raw, token: &str) -> (Raw, Welcome, Vec<Event>) {
        let rid = raw
            .request(client_frame::Kind::Hello(Hello {
                protocol_version: 1,
                token: token.into(),
            }))
            .await;
        let welcome = match raw.recv().await.kind {
            Some(server_frame::Kind::Welcome(w)) => w,
            other => panic!("expected Welcome to {rid}, got {other:?}"),
        };
        let mut events = Vec::new();
        loop {
            match raw.recv().await.kind {
                Some(server_frame::Kind::Event(e)) => events.push(e),
                Some(server_frame::Kind::Synced(_)) => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        (raw, welcome, events)
    }

    pub async fn send_bytes(&mut self, bytes: Vec<u8>) {
        self.ws
            .send(WsMessage::Binary(bytes.into()))
            .await
            .expect("send");
    }

    pub async fn request(&mut self, kind: client_frame::Kind) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.send_bytes(
            ClientFrame {
                request_id: id,
                kind: Some(kind),
            }
            .encode_to_vec(),
        )
        .await;
        id
    }

    /// The next server frame (skipping WebSocket pings).
    pub async fn recv(&mut self) -> ServerFrame {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("frame in time");
            match msg.expect("open").expect("frame") {
                WsMessage::Binary(b) => return ServerFrame::decode(&b[..]).expect("decodes"),
                WsMessage::Ping(_) | WsMessage::Pong(_) => continue,
                other => panic!("unexpected message {other:?}"),
            }
        }
    }

    /// Waits for the answer to request `rid`, collecting events that come first.
    pub async fn answer(&mut self, rid: u64, events: &mut Vec<Event>) -> server_frame::Kind {
        loop {
            let f = self.recv().await;
            match f.kind {
                Some(server_frame::Kind::Event(e)) => events.push(e),
                Some(k) if f.request_id == rid => return k,
                other => panic!("unexpected {other:?} while waiting for {rid}"),
            }
        }
    }

    /// Reads until the server closes; returns the close code.
    pub async fn closed(&mut self) -> Option<u16> {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("close in time");
            match msg {
                Some(Ok(WsMessage::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => continue,
                Some(Err(_)) | None => return None,
            }
        }
    }

    pub async fn send_text_msg(&mut self, to: u64, id: &str, body: &[u8], devices: &[u64]) -> u64 {
        self.try_send_text_msg(to, id, body, devices)
            .await
            .expect("send")
    }

    /// Like `send_text_msg`, but `None` if the socket is gone.
    pub async fn try_send_text_msg(
        &mut self,
        to: u64,
        id: &str,
        body: &[u8],
        devices: &[u64],
    ) -> Option<u64> {
        let rid = self.next_id;
        self.next_id += 1;
        let frame = ClientFrame {
            request_id: rid,
            kind: Some(client_frame::Kind::Send(Send {
                client_msg_id: id.into(),
                to: Some(Peer::user(to)),
                body: body.to_vec(),
                devices: devices
                    .iter()
                    .map(|d| DeviceBody {
                        device_id: *d,
                        body: None,
                    })
                    .collect(),
            })),
        };
        self.ws
            .send(WsMessage::Binary(frame.encode_to_vec().into()))
            .await
            .ok()?;
        Some(rid)
    }
}

/// The real `ternd` binary, killed when dropped.
pub struct Ternd {
    pub child: Child,
    pub addr: SocketAddr,
}

/// Settings that lift the per-address and per-device limits for tests whose load all comes
/// from 127.0.0.1 (the limits themselves are tested in tests/abuse.rs).
pub const LIFTED: &[&str] = &[
    "rate_limits.registrations_per_hour_per_address=0",
    "rate_limits.logins_per_minute_per_address=0",
    "rate_limits.sends_per_second=0",
    "connections.max_per_address=0",
];

/// Starts `ternd serve` on a free port and reads the bound address from its log.
pub fn spawn_ternd(data_dir: &std::path::Path) -> Ternd {
    spawn_ternd_logging(data_dir, "info", None)
}

/// Like [`spawn_ternd`], at log level `level`, copying every log line to `log` if given.
pub fn spawn_ternd_logging(
    data_dir: &std::path::Path,
    level: &str,
    log: Option<&std::path::Path>,
) -> Ternd {
    spawn_ternd_with(data_dir, level, log, LIFTED)
}

/// Starts `ternd serve` with `--set` for each of `settings` (and nothing lifted).
pub fn spawn_ternd_with(
    data_dir: &std::path::Path,
    level: &str,
    log: Option<&std::path::Path>,
    settings: &[&str],
) -> Ternd {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ternd"));
    ternd_args(&mut cmd, data_dir, settings);
    spawn_ternd_command(cmd, level, log)
}

/// The arguments of `ternd serve` on a free port in `data_dir`, with `--set` for each setting.
pub fn ternd_args(cmd: &mut Command, data_dir: &std::path::Path, settings: &[&str]) {
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir);
    for s in settings {
        cmd.args(["--set", s]);
    }
}

/// Starts `cmd` (which runs `ternd serve`, perhaps through a wrapper) and reads the bound
/// address from its log.
pub fn spawn_ternd_command(mut cmd: Command, level: &str, log: Option<&std::path::Path>) -> Ternd {
    let mut log = log.map(|p| std::fs::File::create(p).expect("log file"));
    let mut child = cmd
        .env("TERN_LOG", level)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ternd");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            if let Some(f) = log.as_mut() {
                use std::io::Write as _;
                let _ = writeln!(f, "{line}");
            }
            if !sent && let Some(rest) = line.split("addr=").nth(1) {
                let addr: String = rest.chars().take_while(|c| !c.is_whitespace()).collect();
                let _ = tx.send(addr);
                sent = true;
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(20))
        .expect("ternd logs its address");
    let addr = addr
        .trim_matches(|c: char| !c.is_ascii_digit() && c != '.' && c != ':')
        .parse()
        .expect("address");
    Ternd { child, addr }
}

impl Drop for Ternd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn http_for(addr: SocketAddr) -> Http {
    Http {
        base: format!("http://{addr}"),
        client: client(),
    }
}

/// An HTTP client whose idle connections are dropped before the server's header timeout
/// closes them (a request sent on a connection the server is closing fails).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_secs(5))
        .build()
        .expect("client")
}

#[cfg(feature = "s3")]
/// A fresh bucket on the S3-compatible server at `TERN_TEST_S3_ENDPOINT`, or `None`.
pub async fn s3_bucket(name: &str) -> Option<tern_server::config::S3Config> {
    let endpoint = std::env::var("TERN_TEST_S3_ENDPOINT").ok()?;
    let bucket = format!("{name}-{}", std::process::id());
    let r = reqwest::Client::new()
        .put(format!("{endpoint}/{bucket}"))
        .send()
        .await
        .expect("create bucket");
    assert!(r.status().is_success(), "create bucket: {}", r.status());
    Some(tern_server::config::S3Config {
        bucket,
        region: "us-east-1".into(),
        endpoint,
        access_key_id: "test".into(),
        secret_access_key: "test".into(),
        allow_http: true,
    })
}
