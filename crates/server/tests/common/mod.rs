//! Test harness: the real server on 127.0.0.1:0 with a temporary data directory, plus small raw
//! HTTP and WebSocket helpers for protocol-level tests.
//!
//! With `TERN_TEST_POSTGRES` set to a URL (e.g. `postgres://root@127.0.0.1:5432/test`), every
//! server (in-process or a spawned `ternd`) stores its state in PostgreSQL instead, in a schema
//! of its own tied to its data directory: a restart on the same directory finds the same data,
//! and the schema is dropped once nothing uses the directory any more (see [`PgSchema`]).
#![allow(dead_code)]

pub mod media;
pub mod push;
pub mod sdk;
pub mod turn;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use tern_proto::frames::*;
use tern_server::{AppState, Config};
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::sync::CancellationToken;

/// The PostgreSQL server the tests use instead of SQLite: `TERN_TEST_POSTGRES`, if set and
/// not empty.
pub fn postgres_url() -> Option<String> {
    std::env::var("TERN_TEST_POSTGRES")
        .ok()
        .filter(|s| !s.trim().is_empty())
}

/// The file in a data directory that names the directory's PostgreSQL schema.
const SCHEMA_FILE: &str = "postgres-schema";

/// The PostgreSQL schema of the data directory `dir`: the one named in its `postgres-schema`
/// file, else a fresh `t_<16 hex digits>`, written there so that a restart on the directory
/// finds it.
fn schema_name_for(dir: &Path) -> String {
    let file = dir.join(SCHEMA_FILE);
    if let Ok(name) = std::fs::read_to_string(&file) {
        let name = name.trim();
        if tern_store::postgres::valid_schema_name(name) {
            return name.to_owned();
        }
    }
    let name = format!("t_{:016x}", rand::random::<u64>());
    std::fs::write(&file, &name).expect("write the schema file");
    name
}

/// The live guards by schema name, so that everything using one schema shares one guard.
fn schemas() -> &'static Mutex<HashMap<String, Weak<PgSchema>>> {
    static SCHEMAS: OnceLock<Mutex<HashMap<String, Weak<PgSchema>>>> = OnceLock::new();
    SCHEMAS.get_or_init(Mutex::default)
}

/// The guard of schema `name` on `url`: the live one if any holder remains, else a new one.
fn schema_guard(url: &str, name: &str) -> Arc<PgSchema> {
    let mut live = schemas().lock().unwrap_or_else(|e| e.into_inner());
    if let Some(guard) = live.get(name).and_then(Weak::upgrade) {
        return guard;
    }
    let guard = Arc::new(PgSchema {
        url: url.to_owned(),
        name: name.to_owned(),
    });
    live.insert(name.to_owned(), Arc::downgrade(&guard));
    guard
}

/// The guard of `dir`'s schema, with `TERN_TEST_POSTGRES` set.
fn schema_for(dir: &Path) -> Option<Arc<PgSchema>> {
    let url = postgres_url()?;
    Some(schema_guard(&url, &schema_name_for(dir)))
}

/// A test server's PostgreSQL schema (created by the server when it migrates). Shared through
/// an `Arc` by the servers and data directories using it; when the last holder goes, the
/// schema is dropped with everything in it.
pub struct PgSchema {
    url: String,
    pub name: String,
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        // Held while dropping, so that a new guard of this name cannot see the schema vanish
        // under a server it started.
        let mut live = schemas().lock().unwrap_or_else(|e| e.into_inner());
        if live.get(&self.name).is_some_and(|w| w.strong_count() == 0) {
            live.remove(&self.name);
        }
        // A fresh thread with its own runtime: this may run inside (or outside) any runtime,
        // including one whose only thread is this one.
        let (url, name) = (self.url.clone(), self.name.clone());
        let outcome = std::thread::spawn(move || drop_schema(&url, &name)).join();
        drop(live);
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("warning: cannot drop PostgreSQL schema {}: {e}", self.name),
            Err(_) => eprintln!("warning: dropping PostgreSQL schema {} panicked", self.name),
        }
    }
}

/// `DROP SCHEMA name CASCADE`. A server that was not stopped may still hold locks in it (a
/// transaction whose task can no longer run): after a lock timeout, the sessions holding locks
/// on the schema's tables are terminated and the drop is tried again.
fn drop_schema(url: &str, name: &str) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    runtime.block_on(async {
        let (client, conn) = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_postgres::connect(url, tokio_postgres::NoTls),
        )
        .await
        .map_err(|_| "connecting timed out".to_owned())?
        .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        client
            .batch_execute("SET lock_timeout = '3s'")
            .await
            .map_err(|e| e.to_string())?;
        let mut attempt = 1;
        loop {
            match client
                .batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
                .await
            {
                Ok(()) => return Ok(()),
                Err(e) if attempt >= 3 => return Err(e.to_string()),
                Err(_) => {
                    client
                        .query(
                            "SELECT pg_terminate_backend(pid) FROM (
                                 SELECT DISTINCT l.pid FROM pg_locks l
                                 JOIN pg_class c ON c.oid = l.relation
                                 JOIN pg_namespace n ON n.oid = c.relnamespace
                                 WHERE n.nspname = $1 AND l.pid <> pg_backend_pid()
                             ) holders",
                            &[&name],
                        )
                        .await
                        .map_err(|e| e.to_string())?;
                    attempt += 1;
                }
            }
        }
    })
}

/// A test's data directory: a temporary directory and, with `TERN_TEST_POSTGRES`, the
/// PostgreSQL schema that goes with it (dropped when the last of the directory and the servers
/// using it is dropped). Derefs to the `TempDir`; [`TestServer::stop`] returns one for a
/// restart, and `TestServer::start_in` also takes a plain `TempDir`.
pub struct DataDir {
    pub dir: tempfile::TempDir,
    pub pg: Option<Arc<PgSchema>>,
}

impl DataDir {
    pub fn new() -> DataDir {
        tempfile::tempdir().expect("tempdir").into()
    }
}

impl Default for DataDir {
    fn default() -> Self {
        DataDir::new()
    }
}

impl From<tempfile::TempDir> for DataDir {
    fn from(dir: tempfile::TempDir) -> DataDir {
        let pg = schema_for(dir.path());
        DataDir { dir, pg }
    }
}

impl std::ops::Deref for DataDir {
    type Target = tempfile::TempDir;
    fn deref(&self) -> &tempfile::TempDir {
        &self.dir
    }
}

pub struct TestServer {
    pub addr: SocketAddr,
    /// The running server's state (services, store), for tests that look inside.
    pub state: AppState,
    pub dir: tempfile::TempDir,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    /// With `TERN_TEST_POSTGRES`: the server's schema (last, so dropped after the rest).
    pg: Option<Arc<PgSchema>>,
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(dir, tweak).await
    }

    /// Starts on `dir`: a fresh `TempDir`, or the [`DataDir`] a stopped server returned (with
    /// PostgreSQL, the same schema).
    pub async fn start_in(dir: impl Into<DataDir>, tweak: impl FnOnce(&mut Config)) -> TestServer {
        let DataDir { dir, pg } = dir.into();
        let mut config = Config {
            data_dir: dir.path().to_owned(),
            ..Config::default()
        };
        if let (Some(url), Some(schema)) = (postgres_url(), &pg) {
            let storage = &mut config.storage;
            storage.backend = tern_server::config::StorageBackend::Postgres;
            storage.postgres.url = url;
            storage.postgres.schema = schema.name.clone();
            storage.postgres.pool_size = 4;
            // Its own, so that a test can find (and terminate) this server's connections.
            storage.postgres.application_name = format!("ternd-{}", schema.name);
        }
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
            turn_per_hour_per_user: 0,
        };
        config.connections.max_per_address = 0;
        tweak(&mut config);
        let state = AppState::build(config).await.expect("state");
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
            pg,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Graceful shutdown; returns the data directory (and its schema) for a restart.
    pub async fn stop(mut self) -> DataDir {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(15), t)
                .await
                .expect("server stops in time")
                .expect("join")
                .expect("server ran cleanly");
        }
        let dir = tempfile::tempdir().expect("tempdir");
        DataDir {
            dir: std::mem::replace(&mut self.dir, dir),
            pg: self.pg.take(),
        }
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
    /// With `TERN_TEST_POSTGRES`: its schema, dropped (once the process is killed) unless
    /// something else still uses it.
    pg: Option<Arc<PgSchema>>,
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
/// With `TERN_TEST_POSTGRES`, first the settings of the PostgreSQL backend, in the schema of
/// `data_dir` (see [`DataDir`]).
pub fn ternd_args(cmd: &mut Command, data_dir: &std::path::Path, settings: &[&str]) {
    cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(data_dir);
    if let Some(url) = postgres_url() {
        let schema = schema_name_for(data_dir);
        // Quoted as TOML, so that any URL is taken as the string it is.
        let url = format!("\"{}\"", url.replace('\\', "\\\\").replace('"', "\\\""));
        cmd.args(["--set", "storage.backend=postgres"])
            .args(["--set", &format!("storage.postgres.url={url}")])
            .args(["--set", &format!("{SCHEMA_SETTING}{schema}")])
            .args(["--set", "storage.postgres.pool_size=4"])
            .args([
                "--set",
                &format!("storage.postgres.application_name=\"ternd-{schema}\""),
            ]);
    }
    for s in settings {
        cmd.args(["--set", s]);
    }
}

const SCHEMA_SETTING: &str = "storage.postgres.schema=";

/// Starts `cmd` (which runs `ternd serve`, perhaps through a wrapper) and reads the bound
/// address from its log.
pub fn spawn_ternd_command(mut cmd: Command, level: &str, log: Option<&std::path::Path>) -> Ternd {
    // The schema [`ternd_args`] chose (the last one given wins in ternd too): held while the
    // process runs.
    let pg = postgres_url().and_then(|url| {
        let name = cmd
            .get_args()
            .filter_map(|a| a.to_str()?.strip_prefix(SCHEMA_SETTING))
            .last()?
            .trim_matches('"')
            .to_owned();
        tern_store::postgres::valid_schema_name(&name).then(|| schema_guard(&url, &name))
    });
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
    Ternd { child, addr, pg }
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

/// Redis, NATS and S3 for cluster tests: `TERN_TEST_REDIS`, `TERN_TEST_NATS` (URLs) and
/// `TERN_TEST_S3_ENDPOINT` (an S3-compatible server taking unsigned bucket creation, as moto
/// does), beside `TERN_TEST_POSTGRES`, in a build with `--features s3`; `.ci/run` sets them all.
/// The keys, subjects and bucket of one test are its own; its Redis keys are deleted when it
/// is dropped.
pub struct ClusterEnv {
    pub redis: String,
    pub nats: String,
    pub prefix: String,
    pub s3: tern_server::config::S3Config,
}

impl ClusterEnv {
    /// The machine's Redis and NATS; `None`, after saying so on stderr, when a service of
    /// cluster mode is not configured.
    pub fn from_env(test: &str) -> Option<ClusterEnv> {
        let var = |name: &str| std::env::var(name).ok().filter(|s| !s.trim().is_empty());
        match (
            postgres_url(),
            var("TERN_TEST_REDIS"),
            var("TERN_TEST_NATS"),
            var("TERN_TEST_S3_ENDPOINT").filter(|_| cfg!(feature = "s3")),
        ) {
            (Some(_), Some(redis), Some(nats), Some(s3)) => Some(ClusterEnv::on(redis, nats, s3)),
            // Redis and NATS named: cluster tests were asked for, and must not skip silently.
            (Some(_), Some(_), Some(_), None) => panic!(
                "{test}: cluster mode keeps media on S3: set TERN_TEST_S3_ENDPOINT and build with --features s3"
            ),
            _ => {
                eprintln!(
                    "skipped {test}: cluster tests need TERN_TEST_POSTGRES, TERN_TEST_REDIS, TERN_TEST_NATS and TERN_TEST_S3_ENDPOINT, and --features s3 (.ci/run sets them)"
                );
                None
            }
        }
    }

    /// A test's own Redis and NATS (see [`Service`]), under the same condition as `from_env`.
    pub fn private(test: &str, redis: &Service, nats: &Service) -> Option<ClusterEnv> {
        let shared = ClusterEnv::from_env(test)?;
        Some(ClusterEnv {
            redis: redis.url(),
            nats: nats.url(),
            prefix: shared.prefix.clone(),
            s3: shared.s3.clone(),
        })
    }

    fn on(redis: String, nats: String, s3_endpoint: String) -> ClusterEnv {
        let prefix = format!("t{:016x}", rand::random::<u64>());
        ClusterEnv {
            s3: create_bucket(&s3_endpoint, &prefix),
            redis,
            nats,
            prefix,
        }
    }

    /// Cluster settings for node `node`.
    pub fn apply(&self, config: &mut Config, node: &str) {
        let c = &mut config.cluster;
        c.enabled = true;
        c.node_id = node.to_owned();
        c.redis_url = self.redis.clone();
        c.nats_url = self.nats.clone();
        c.prefix = self.prefix.clone();
        config.media.backend = tern_server::config::BlobBackend::S3;
        config.media.s3 = self.s3.clone();
    }

    /// The same, as `ternd --set` settings.
    pub fn settings(&self, node: &str) -> Vec<String> {
        let s3 = &self.s3;
        vec![
            "cluster.enabled=true".to_owned(),
            format!("cluster.node_id=\"{node}\""),
            format!("cluster.redis_url=\"{}\"", self.redis),
            format!("cluster.nats_url=\"{}\"", self.nats),
            format!("cluster.prefix=\"{}\"", self.prefix),
            "media.backend=\"s3\"".to_owned(),
            format!("media.s3.bucket=\"{}\"", s3.bucket),
            format!("media.s3.endpoint=\"{}\"", s3.endpoint),
            format!("media.s3.region=\"{}\"", s3.region),
            format!("media.s3.access_key_id=\"{}\"", s3.access_key_id),
            format!("media.s3.secret_access_key=\"{}\"", s3.secret_access_key),
            "media.s3.allow_http=true".to_owned(),
        ]
    }
}

/// Creates bucket `name` on the S3-compatible server at `endpoint` (`http://host:port`) with
/// one unsigned request.
fn create_bucket(endpoint: &str, name: &str) -> tern_server::config::S3Config {
    use std::io::{Read, Write};
    let host = endpoint
        .strip_prefix("http://")
        .expect("TERN_TEST_S3_ENDPOINT is an http:// URL")
        .trim_end_matches('/');
    let mut conn = std::net::TcpStream::connect(host).expect("connect to the S3 endpoint");
    write!(
        conn,
        "PUT /{name} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .expect("create bucket");
    let mut answer = String::new();
    conn.read_to_string(&mut answer).expect("bucket answer");
    assert!(
        answer.starts_with("HTTP/1.1 200"),
        "create bucket: {answer}"
    );
    tern_server::config::S3Config {
        bucket: name.to_owned(),
        region: "us-east-1".into(),
        endpoint: endpoint.trim_end_matches('/').to_owned(),
        access_key_id: "test".into(),
        secret_access_key: "test".into(),
        allow_http: true,
    }
}

impl Drop for ClusterEnv {
    fn drop(&mut self) {
        let (url, pattern) = (self.redis.clone(), format!("{}:*", self.prefix));
        let outcome = std::thread::spawn(move || -> redis::RedisResult<()> {
            let mut conn = redis::Client::open(url)?.get_connection()?;
            let keys: Vec<String> = redis::cmd("KEYS").arg(&pattern).query(&mut conn)?;
            if !keys.is_empty() {
                redis::cmd("DEL").arg(keys).query::<()>(&mut conn)?;
            }
            Ok(())
        })
        .join();
        if !matches!(outcome, Ok(Ok(()))) {
            eprintln!("warning: cannot delete the Redis keys of {}", self.prefix);
        }
    }
}

/// Several in-process nodes on one PostgreSQL schema, one Redis and one NATS.
pub struct TestCluster {
    pub nodes: Vec<TestServer>,
    /// Last: the keys go once the nodes are stopped.
    pub env: ClusterEnv,
}

impl TestCluster {
    /// `n` nodes named `a`, `b`, …; `None` (skipped) without the services.
    pub async fn start(test: &str, n: usize, tweak: impl Fn(&mut Config)) -> Option<TestCluster> {
        Some(TestCluster::start_on(ClusterEnv::from_env(test)?, n, tweak).await)
    }

    /// `n` nodes on `env`'s Redis and NATS.
    pub async fn start_on(env: ClusterEnv, n: usize, tweak: impl Fn(&mut Config)) -> TestCluster {
        let mut nodes: Vec<TestServer> = Vec::new();
        for i in 0..n {
            let dir = tempfile::tempdir().expect("tempdir");
            if let Some(first) = nodes.first() {
                let name = &first.pg.as_ref().expect("a PostgreSQL schema").name;
                std::fs::write(dir.path().join(SCHEMA_FILE), name).expect("schema file");
            }
            let node = ((b'a' + i as u8) as char).to_string();
            let server = TestServer::start_in(dir, |c| {
                env.apply(c, &node);
                tweak(c);
            })
            .await;
            nodes.push(server);
        }
        TestCluster { nodes, env }
    }
}

/// A Redis or NATS server of a test's own on a free loopback port, for tests that stop and
/// start it (the machine's own is shared by every test). Killed when dropped.
pub struct Service {
    kind: ServiceKind,
    pub port: u16,
    child: Option<Child>,
}

#[derive(Clone, Copy)]
pub enum ServiceKind {
    Redis,
    Nats,
}

impl Service {
    pub fn start(kind: ServiceKind) -> Service {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut s = Service {
            kind,
            port,
            child: None,
        };
        s.restart();
        s
    }

    pub fn url(&self) -> String {
        match self.kind {
            ServiceKind::Redis => format!("redis://127.0.0.1:{}", self.port),
            ServiceKind::Nats => format!("nats://127.0.0.1:{}", self.port),
        }
    }

    /// SIGKILL, and wait until it is gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it (again, on the same port) and waits until it accepts connections.
    pub fn restart(&mut self) {
        self.kill();
        let port = self.port.to_string();
        let mut cmd = match self.kind {
            ServiceKind::Redis => {
                let mut c = Command::new("redis-server");
                c.args(["--bind", "127.0.0.1", "--port", &port, "--save", ""])
                    .args(["--appendonly", "no"]);
                c
            }
            ServiceKind::Nats => {
                // Debian puts it in /usr/sbin.
                let bin = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
                    .into_iter()
                    .find(|p| Path::new(p).exists())
                    .unwrap_or("nats-server");
                let mut c = Command::new(bin);
                c.args(["-a", "127.0.0.1", "-p", &port]);
                c
            }
        };
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server / nats-server installed (.ci/run needs them)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "the service did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

/// nginx (Debian's package; `.ci/run` installs it) in front of `ternd` nodes on a free
/// loopback port: WebSocket proxying, round robin, no stickiness, a node that refuses
/// connections skipped for the next. Stopped when dropped.
pub struct Nginx {
    child: Child,
    pub addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Nginx {
    /// The binary, if installed.
    pub fn binary() -> Option<&'static str> {
        ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| Path::new(p).exists())
    }

    pub fn start(upstreams: &[SocketAddr]) -> Nginx {
        let bin = Nginx::binary().expect("nginx installed (.ci/run installs it)");
        let dir = tempfile::tempdir().expect("tempdir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let servers: String = upstreams
            .iter()
            .map(|a| format!("        server {a} max_fails=1 fail_timeout=30s;\n"))
            .collect();
        let conf = include_str!("../../../../deploy/cluster/nginx.conf.in")
            .replace("@DIR@", &dir.path().display().to_string())
            .replace("@PORT@", &port.to_string())
            .replace("@SERVERS@", &servers);
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, conf).expect("nginx.conf");
        let child = Command::new(bin)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nginx");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "nginx did not start: {}",
                std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Nginx {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGKILL takes the master only; its worker sees the master gone and exits, but
        // a graceful stop (SIGQUIT) is cleaner.
        let _ = Command::new("kill")
            .args(["-QUIT", &self.child.id().to_string()])
            .status();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ternd` processes of one cluster (one PostgreSQL schema, a key and subject prefix of their
/// own) behind nginx.
pub struct ProcessCluster {
    pub nginx: Nginx,
    pub nodes: Vec<Option<Ternd>>,
    _dirs: Vec<DataDir>,
    pub env: ClusterEnv,
}

impl ProcessCluster {
    /// `n` nodes; `None` (skipped, saying so) without PostgreSQL, Redis and NATS.
    pub fn start(test: &str, n: usize, settings: &[&str]) -> Option<ProcessCluster> {
        let env = ClusterEnv::from_env(test)?;
        let first = DataDir::new();
        let schema = first.pg.as_ref().expect("a PostgreSQL schema").name.clone();
        let mut dirs = vec![first];
        for _ in 1..n {
            let dir = tempfile::tempdir().expect("tempdir");
            std::fs::write(dir.path().join(SCHEMA_FILE), &schema).expect("schema file");
            dirs.push(DataDir::from(dir));
        }
        let mut nodes = Vec::new();
        for (i, dir) in dirs.iter().enumerate() {
            let mut all: Vec<String> = LIFTED.iter().map(|s| s.to_string()).collect();
            all.extend(env.settings(&format!("n{i}")));
            // nginx, on 127.0.0.1, names the client in X-Forwarded-For.
            all.push("connections.trusted_proxies=[\"127.0.0.1\"]".to_owned());
            all.extend(settings.iter().map(|s| s.to_string()));
            let refs: Vec<&str> = all.iter().map(String::as_str).collect();
            nodes.push(Some(spawn_ternd_with(dir.path(), "info", None, &refs)));
        }
        let addrs: Vec<SocketAddr> = nodes.iter().flatten().map(|t| t.addr).collect();
        let nginx = Nginx::start(&addrs);
        Some(ProcessCluster {
            nginx,
            nodes,
            _dirs: dirs,
            env,
        })
    }

    /// SIGKILL node `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut t) = self.nodes[i].take() {
            t.child.kill().expect("SIGKILL");
            t.child.wait().expect("reaped");
        }
    }
}
