//! The WebSocket gateway at `/v1/ws`: one task per connection.
//!
//! A connection goes through: handshake (`Hello` → `Welcome`, within `handshake_timeout`),
//! registration with the hub (live entries start queueing in its [`Outbox`]), the drain of
//! the mailbox from the store, `Synced`, and then the main loop, which answers requests and
//! forwards live entries in mailbox order (see [`cursor`]).
//!
//! Memory per idle connection is kept small on purpose (DESIGN.md §9): tungstenite's read buffer
//! is 768 bytes instead of 128 KiB (512 saved more but cost 40 % of p99 latency at 10,000
//! messages/s; BENCHMARKS.md), there is no write buffer (each frame is flushed as it is
//! written), and the outbox allocates nothing until something is queued.

pub mod cursor;
mod render;

use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::response::{IntoResponse, Response};
use futures_util::FutureExt;
use prost::Message as _;
use tern_proto::frames::{
    ClientFrame, DecodeError, Done, Pong, Sent, ServerFrame, Synced, Welcome, client_frame,
    server_frame,
};
use tern_proto::{ErrorCode, PROTOCOL_VERSION};
use tern_store::{DeviceAuth, MailboxEntry};
use tokio::time::Instant;

use crate::app::AppState;
use crate::delivery::{CloseReason, Outbox};
use crate::error::ApiError;
use crate::net::ConnControl;
use cursor::{Cursor, Next};

/// Mailbox entries read from the store at a time while draining.
const DRAIN_PAGE: usize = 512;
/// Most frames taken from the socket at once (pipelined requests answered together).
const PIPELINE: usize = 64;

/// Close codes (PROTOCOL.md §3).
pub mod close {
    pub const NORMAL: u16 = 1000;
    pub const GOING_AWAY: u16 = 1001;
    pub const TOO_BIG: u16 = 1009;
    pub const UNAUTHORIZED: u16 = 4001;
    pub const SLOW_CONSUMER: u16 = 4002;
    pub const IDLE: u16 = 4003;
    pub const UNSUPPORTED_VERSION: u16 = 4004;
    pub const HANDSHAKE: u16 = 4005;
    pub const REPLACED: u16 = 4006;
}

/// tungstenite's read chunk per connection (module docs).
const READ_BUFFER: usize = 768;

/// How long the server tries to deliver a close frame. A client that has stopped reading
/// (a slow consumer, typically) has full buffers and would never take it: after this the
/// connection is reset instead (PROTOCOL.md §3).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

pub async fn upgrade(
    State(state): State<AppState>,
    control: Option<Extension<ConnControl>>,
    ws: WebSocketUpgrade,
) -> Response {
    if state.shutdown.is_cancelled() {
        return ApiError::new(ErrorCode::Unavailable, "the server is shutting down")
            .into_response();
    }
    let max = state.config.limits.max_frame_bytes;
    let tracker = state.connections.clone();
    ws.read_buffer_size(READ_BUFFER)
        .write_buffer_size(0)
        .max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| {
            tracker.track_future(connection(socket, state, control.map(|c| c.0)))
        })
}

/// Why the main loop ended.
enum End {
    Close(u16, &'static str),
    /// The peer closed or the socket broke: nothing more to send.
    Gone,
    /// A write did not complete in `send_timeout_secs`: the peer stopped reading.
    Stalled,
}

type SendResult = Result<(), End>;

/// How a connection whose outbox was closed ends.
fn closed_end(reason: CloseReason) -> End {
    match reason {
        CloseReason::SlowConsumer => End::Close(close::SLOW_CONSUMER, "slow consumer; reconnect"),
        CloseReason::Revoked => End::Close(close::UNAUTHORIZED, "device removed"),
        CloseReason::Replaced => End::Close(
            close::REPLACED,
            "a newer connection of this device took over",
        ),
    }
}

/// Writes one frame. Used for the handshake, where the read timeout bounds the exchange.
async fn send_frame(socket: &mut WebSocket, frame: &ServerFrame) -> SendResult {
    socket
        .send(Message::Binary(frame.encode_to_vec().into()))
        .await
        .map_err(|_| End::Gone)
}

/// Sends a close frame within [`CLOSE_TIMEOUT`]; if it cannot be written by then, the
/// connection is reset when the socket is dropped.
async fn close_with(
    socket: &mut WebSocket,
    control: Option<&ConnControl>,
    code: u16,
    reason: &'static str,
) {
    let frame = Message::Close(Some(CloseFrame {
        code,
        reason: Utf8Bytes::from_static(reason),
    }));
    let sent = tokio::time::timeout(CLOSE_TIMEOUT, socket.send(frame)).await;
    if !matches!(sent, Ok(Ok(()))) {
        metrics::counter!("tern_connection_resets_total").increment(1);
        if let Some(c) = control {
            c.reset_on_close();
        }
    }
}

async fn connection(mut socket: WebSocket, state: AppState, control: Option<ConnControl>) {
    // The handshake, the drain and request handling are boxed: they run briefly, and inline
    // they would make every idle connection's task as large as their largest state (measured:
    // 3,000 bytes per connection future before, see BENCHMARKS.md).
    let who = match Box::pin(handshake(&mut socket, &state)).await {
        Ok(who) => who,
        Err((code, reason)) => {
            Box::pin(close_with(&mut socket, control.as_ref(), code, reason)).await;
            return;
        }
    };
    let outbox = Outbox::new(state.config.limits.outbound_queue);
    // Subscribe first, then drain: an entry committed in between is both queued and in the
    // store, and the cursor sends it once.
    state
        .hub
        .register(who.user_id, who.device_id, outbox.clone())
        .await;
    state.presence.touch(who.user_id, who.device_id);
    metrics::counter!("tern_connections_opened_total").increment(1);
    let end = Conn {
        socket: &mut socket,
        state: &state,
        who: &who,
        outbox: &outbox,
        cursor: Cursor::default(),
    }
    .run()
    .await;
    state
        .hub
        .unregister(
            who.user_id,
            who.device_id,
            outbox.id(),
            state.clock.now_ms(),
        )
        .await;
    state.presence.touch(who.user_id, who.device_id);
    match end {
        End::Close(code, reason) => {
            Box::pin(close_with(&mut socket, control.as_ref(), code, reason)).await
        }
        // Gone after a write timed out: the peer is not reading; drop it for good.
        End::Stalled => {
            if let Some(c) = &control {
                c.reset_on_close();
            }
        }
        End::Gone => {}
    }
    tracing::debug!(device_id = who.device_id, "connection closed");
}

/// Reads `Hello`, checks version and token, answers `Welcome`.
async fn handshake(
    socket: &mut WebSocket,
    state: &AppState,
) -> Result<DeviceAuth, (u16, &'static str)> {
    let limits = &state.config.limits;
    let wait = Duration::from_secs(limits.handshake_timeout_secs.into());
    let first = tokio::select! {
        m = tokio::time::timeout(wait, socket.recv()) => m,
        _ = state.shutdown.cancelled() => return Err((close::GOING_AWAY, "shutting down")),
    };
    let bytes = match first {
        Ok(Some(Ok(Message::Binary(b)))) => b,
        Ok(Some(Ok(_))) => return Err((close::HANDSHAKE, "expected a binary Hello frame")),
        Ok(Some(Err(_)) | None) => return Err((close::NORMAL, "closed")),
        Err(_) => return Err((close::HANDSHAKE, "no Hello in time")),
    };
    let reply_err = |code, msg: &'static str| ApiError::new(code, msg).to_frame(0);
    let frame = match ClientFrame::decode_frame(&bytes, limits.max_frame_bytes) {
        Ok(f) => f,
        Err(_) => {
            let _ = send_frame(socket, &reply_err(ErrorCode::BadRequest, "malformed Hello")).await;
            return Err((close::HANDSHAKE, "malformed Hello"));
        }
    };
    let Some(client_frame::Kind::Hello(hello)) = frame.kind else {
        let _ = send_frame(
            socket,
            &reply_err(ErrorCode::BadRequest, "the first frame must be Hello"),
        )
        .await;
        return Err((close::HANDSHAKE, "the first frame must be Hello"));
    };
    if hello.protocol_version != PROTOCOL_VERSION {
        let e = ApiError::new(
            ErrorCode::UnsupportedVersion,
            format!(
                "protocol version {} is not supported; this server speaks {PROTOCOL_VERSION}",
                hello.protocol_version
            ),
        );
        let _ = send_frame(socket, &e.to_frame(frame.request_id)).await;
        return Err((close::UNSUPPORTED_VERSION, "unsupported protocol version"));
    }
    let who = match state.accounts.authenticate(&hello.token).await {
        Ok(who) => who,
        Err(e) => {
            let _ = send_frame(socket, &e.to_frame(frame.request_id)).await;
            return Err(if e.code == ErrorCode::Unauthorized {
                (close::UNAUTHORIZED, "unauthorized")
            } else {
                (close::GOING_AWAY, "try again later")
            });
        }
    };
    let welcome = ServerFrame {
        request_id: frame.request_id,
        kind: Some(server_frame::Kind::Welcome(Welcome {
            protocol_version: PROTOCOL_VERSION,
            user_id: who.user_id,
            username: who.username.clone(),
            device_id: who.device_id,
            server_time_ms: state.clock.now_ms(),
            heartbeat_secs: limits.heartbeat_secs,
            max_frame_bytes: limits.max_frame_bytes as u32,
            max_body_bytes: limits.max_body_bytes as u32,
        })),
    };
    send_frame(socket, &welcome)
        .await
        .map_err(|_| (close::NORMAL, "closed"))?;
    Ok(who)
}

struct Conn<'a> {
    socket: &'a mut WebSocket,
    state: &'a AppState,
    who: &'a DeviceAuth,
    outbox: &'a Arc<Outbox>,
    cursor: Cursor,
}

impl Conn<'_> {
    async fn run(&mut self) -> End {
        if let Err(end) = Box::pin(self.drain()).await {
            return end;
        }
        let synced = ServerFrame {
            request_id: 0,
            kind: Some(server_frame::Kind::Synced(Synced {
                up_to: self.cursor.sent(),
            })),
        };
        if let Err(end) = Box::pin(self.send(&synced)).await {
            return end;
        }
        let idle = Duration::from_secs(self.state.config.limits.idle_timeout_secs.into());
        let mut deadline = Instant::now() + idle;
        let mut live = Vec::new();
        loop {
            if let Err(end) = Box::pin(self.forward_live(&mut live)).await {
                return end;
            }
            tokio::select! {
                _ = self.state.shutdown.cancelled() => return End::Close(close::GOING_AWAY, "server shutting down"),
                _ = tokio::time::sleep_until(deadline) => return End::Close(close::IDLE, "idle timeout"),
                _ = self.outbox.wait() => {}
                msg = self.socket.recv() => {
                    deadline = Instant::now() + idle;
                    if let Err(end) = Box::pin(self.incoming(msg)).await {
                        return end;
                    }
                }
            }
        }
    }

    /// Handles what the client sent. Binary frames that are already waiting are taken together
    /// (up to [`PIPELINE`]) so that one device's pipelined sends share a commit.
    async fn incoming(&mut self, mut msg: Option<Result<Message, axum::Error>>) -> SendResult {
        loop {
            match msg {
                Some(Ok(Message::Binary(first))) => {
                    let mut frames = vec![first];
                    let mut next = None;
                    while frames.len() < PIPELINE {
                        match self.socket.recv().now_or_never() {
                            Some(Some(Ok(Message::Binary(b)))) => frames.push(b),
                            Some(other) => {
                                next = Some(other);
                                break;
                            }
                            None => break,
                        }
                    }
                    self.requests(frames).await?;
                    match next {
                        Some(other) => msg = other,
                        None => return Ok(()),
                    }
                }
                Some(Ok(Message::Text(_))) => {
                    let e = ApiError::bad_request(
                        "text frames are not part of the protocol; send binary protobuf frames",
                    );
                    return self.send(&e.to_frame(0)).await;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => return Ok(()),
                Some(Ok(Message::Close(_))) | None => return Err(End::Gone),
                Some(Err(_)) => {
                    return Err(End::Close(close::TOO_BIG, "frame too large or malformed"));
                }
            }
        }
    }

    /// Answers frames in order; consecutive sends go to the store together.
    async fn requests(&mut self, frames: Vec<bytes::Bytes>) -> SendResult {
        let limit = self.state.config.limits.max_frame_bytes;
        let mut sends: Vec<(u64, tern_proto::frames::Send)> = Vec::new();
        for bytes in frames {
            match ClientFrame::decode_frame(&bytes, limit) {
                Ok(ClientFrame {
                    request_id,
                    kind: Some(client_frame::Kind::Send(send)),
                }) if request_id != 0 => sends.push((request_id, send)),
                frame => {
                    self.flush_sends(&mut sends).await?;
                    self.request(frame).await?;
                }
            }
        }
        self.flush_sends(&mut sends).await
    }

    async fn flush_sends(
        &mut self,
        sends: &mut Vec<(u64, tern_proto::frames::Send)>,
    ) -> SendResult {
        if sends.is_empty() {
            return Ok(());
        }
        let (ids, batch): (Vec<(u64, String)>, Vec<_>) = sends
            .drain(..)
            .map(|(rid, s)| ((rid, s.client_msg_id.clone()), s))
            .unzip();
        let answers = self.state.messaging.send_many(self.who, batch).await;
        for ((rid, client_msg_id), answer) in ids.into_iter().zip(answers) {
            let frame = match answer {
                Ok(r) => ServerFrame {
                    request_id: rid,
                    kind: Some(server_frame::Kind::Sent(Sent {
                        client_msg_id,
                        seq: r.seq,
                        server_ts_ms: r.server_ts_ms,
                    })),
                },
                Err(e) => e.to_frame(rid),
            };
            self.send(&frame).await?;
        }
        Ok(())
    }

    /// Sends every entry in the store after the cursor, page by page.
    async fn drain(&mut self) -> SendResult {
        loop {
            let page = self
                .state
                .store
                .mailbox_after(self.who.device_id, self.cursor.sent(), DRAIN_PAGE)
                .await
                .map_err(|e| {
                    tracing::warn!(error = %e, "mailbox read failed");
                    End::Close(close::GOING_AWAY, "storage unavailable; reconnect")
                })?;
            let n = page.len();
            for entry in &page {
                self.send_entry(entry).await?;
            }
            if n < DRAIN_PAGE {
                return Ok(());
            }
        }
    }

    /// Writes one frame, giving up after `send_timeout_secs`: a client that stopped reading
    /// is dropped (its mailbox keeps everything) rather than holding this task forever.
    ///
    /// While a write is blocked (the client's buffers are full), an overflowing outbox ends it
    /// at once as a slow consumer instead of after the timeout.
    async fn send(&mut self, frame: &ServerFrame) -> SendResult {
        let limit = Duration::from_secs(self.state.config.limits.send_timeout_secs.into());
        tokio::select! {
            biased;
            written = tokio::time::timeout(limit, send_frame(self.socket, frame)) => match written {
                Ok(result) => result,
                Err(_) => {
                    metrics::counter!("tern_send_timeouts_total").increment(1);
                    Err(End::Stalled)
                }
            },
            reason = self.outbox.closed() => Err(closed_end(reason)),
        }
    }

    async fn send_entry(&mut self, entry: &MailboxEntry) -> SendResult {
        self.send(&render::event_frame(entry, self.who.user_id))
            .await?;
        self.cursor.sent_up_to(entry.mseq);
        Ok(())
    }

    /// Forwards queued live entries in mailbox order, filling gaps (and what a wake-up names)
    /// from the store.
    async fn forward_live(&mut self, buf: &mut Vec<MailboxEntry>) -> SendResult {
        let woken = self.outbox.take(buf).map_err(closed_end)?;
        // Entries of one commit come in order, but commits may race to the hub.
        buf.sort_unstable_by_key(|e| e.mseq);
        for entry in std::mem::take(buf) {
            match self.cursor.classify(entry.mseq) {
                Next::Skip => {}
                Next::Send => self.send_entry(&entry).await?,
                Next::FillGap { .. } => {
                    self.drain().await?;
                    if self.cursor.classify(entry.mseq) == Next::Send {
                        self.send_entry(&entry).await?;
                    }
                }
            }
        }
        // Entries committed on another node arrive as a wake-up only: read them from the store.
        if woken > self.cursor.sent() {
            self.drain().await?;
        }
        Ok(())
    }

    async fn request(&mut self, frame: Result<ClientFrame, DecodeError>) -> SendResult {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                metrics::counter!("tern_malformed_frames_total").increment(1);
                let err = ApiError::bad_request(format!("cannot decode frame: {e}"));
                return self.send(&err.to_frame(0)).await;
            }
        };
        let rid = frame.request_id;
        let reply = match frame.kind {
            _ if rid == 0 => Err(ApiError::bad_request("requests need a non-zero request_id")),
            Some(client_frame::Kind::Hello(_)) => Err(ApiError::bad_request("already greeted")),
            // `requests` batches every send; one arriving here still takes the same path.
            Some(client_frame::Kind::Send(send)) => {
                return self.flush_sends(&mut vec![(rid, send)]).await;
            }
            Some(client_frame::Kind::Ack(ack)) => {
                // A device can only acknowledge what it was sent.
                let up_to = ack.up_to.min(self.cursor.sent());
                self.state
                    .messaging
                    .ack(self.who, up_to)
                    .await
                    .map(|()| server_frame::Kind::Done(Done {}))
            }
            Some(client_frame::Kind::Read(read)) => self
                .state
                .messaging
                .read(self.who, read)
                .await
                .map(|()| server_frame::Kind::Done(Done {})),
            Some(client_frame::Kind::Ping(_)) => {
                self.state
                    .presence
                    .touch(self.who.user_id, self.who.device_id);
                Ok(server_frame::Kind::Pong(Pong {
                    server_time_ms: self.state.clock.now_ms(),
                }))
            }
            None => Err(ApiError::bad_request("empty frame")),
        };
        let frame = match reply {
            Ok(kind) => ServerFrame {
                request_id: rid,
                kind: Some(kind),
            },
            Err(e) => e.to_frame(rid),
        };
        self.send(&frame).await
    }
}
