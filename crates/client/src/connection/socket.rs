//! One WebSocket connection, from `Hello` to close: the handshake, then a single loop that
//! reads frames, writes queued requests, pings, and watches for silence.
//!
//! Mailbox events are stored before they are acknowledged: consecutive `Event` frames that are
//! already buffered are collected into one batch (up to `MAX_BATCH`), committed in one SQLite
//! transaction, emitted, and only then covered by one cumulative `Ack`. A frame that is not an
//! event ends the batch and is handled after it, so `Synced` is seen only once everything
//! before it is stored and acknowledged.

use std::collections::HashMap;

use futures_util::{FutureExt, SinkExt, StreamExt};
use prost::Message as _;
use tern_proto::frames::{self, ClientFrame, ServerFrame, client_frame, server_frame};
use tern_proto::{ErrorCode, PROTOCOL_VERSION};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::{
    Answer, Command, Ctx, DEFAULT_HEARTBEAT, MAX_BATCH, MAX_IN_FLIGHT, MAX_SERVER_FRAME, Outcome,
    stop_requested,
};
use crate::error::Error;
use crate::types::{CloseReason, ConnectionState, Event};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;
type WsItem = Option<Result<WsMessage, tungstenite::Error>>;

/// Runs one connection to its end.
pub(super) async fn connection(
    ctx: &Ctx,
    commands: &mut mpsc::Receiver<Command>,
    shutdown: &mut watch::Receiver<Option<CloseReason>>,
    first: &mut Option<oneshot::Sender<Result<(), Error>>>,
) -> Outcome {
    let (mut ws, welcome) = tokio::select! {
        r = handshake(ctx) => match r {
            Ok(ok) => ok,
            Err(outcome) => return outcome,
        },
        reason = stop_requested(shutdown) => return Outcome::Shutdown(reason),
    };
    if welcome.user_id != ctx.user_id {
        tracing::warn!(
            welcome.user_id,
            session_user = ctx.user_id,
            "server names another user"
        );
    }
    let heartbeat = match welcome.heartbeat_secs {
        0 => DEFAULT_HEARTBEAT,
        s => std::time::Duration::from_secs(u64::from(s)),
    };
    ctx.status.send_modify(|s| {
        s.generation += 1;
        s.synced = false;
        if welcome.max_body_bytes > 0 {
            s.max_body_bytes = welcome.max_body_bytes as usize;
        }
    });
    ctx.set_state(ConnectionState::Connected);
    tracing::info!(device_id = welcome.device_id, "connected");
    if let Some(tx) = first.take() {
        let _ = tx.send(Ok(()));
    }

    let mut conn = Conn {
        ctx,
        ws: &mut ws,
        pending: HashMap::new(),
        next_id: 1,
    };
    let outcome = conn.run(commands, shutdown, heartbeat).await;
    if let Outcome::Shutdown(_) = outcome {
        let close = CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        };
        // Best effort: the server drops the socket anyway when we go.
        let _ = tokio::time::timeout(ctx.handshake_timeout, ws.close(Some(close))).await;
    }
    outcome
}

/// Opens the socket and exchanges `Hello`/`Welcome`.
async fn handshake(ctx: &Ctx) -> Result<(Ws, frames::Welcome), Outcome> {
    let retry = |why: String| Outcome::Retry {
        connected: false,
        why,
    };
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_SERVER_FRAME))
        .max_frame_size(Some(MAX_SERVER_FRAME));
    let connect =
        tokio_tungstenite::connect_async_with_config(ctx.ws_url.as_str(), Some(config), true);
    let (mut ws, _) = match tokio::time::timeout(ctx.handshake_timeout, connect).await {
        Ok(Ok(ok)) => ok,
        Ok(Err(e)) => return Err(retry(format!("connect: {e}"))),
        Err(_) => return Err(retry("connect: timed out".into())),
    };
    let hello = ClientFrame {
        request_id: 0,
        kind: Some(client_frame::Kind::Hello(frames::Hello {
            protocol_version: PROTOCOL_VERSION,
            token: ctx.token.clone(),
        })),
    };
    if let Err(e) = ws
        .send(WsMessage::Binary(hello.encode_to_vec().into()))
        .await
    {
        return Err(retry(format!("send hello: {e}")));
    }
    let deadline = Instant::now() + ctx.handshake_timeout;
    loop {
        let item = match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(item) => item,
            Err(_) => return Err(retry("no welcome in time".into())),
        };
        match item {
            Some(Ok(WsMessage::Binary(b))) => match ServerFrame::decode_frame(&b, MAX_SERVER_FRAME)
            {
                Ok(ServerFrame {
                    kind: Some(server_frame::Kind::Welcome(w)),
                    ..
                }) => return Ok((ws, w)),
                Ok(ServerFrame {
                    kind: Some(server_frame::Kind::Error(e)),
                    ..
                }) => return Err(refused(&e)),
                Ok(_) => return Err(retry("unexpected frame before welcome".into())),
                Err(e) => return Err(retry(format!("bad frame before welcome: {e}"))),
            },
            Some(Ok(WsMessage::Close(frame))) => return Err(closed_by_server(frame, false)),
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(retry(format!("read: {e}"))),
            None => return Err(retry("closed before welcome".into())),
        }
    }
}

/// The server's `Error` answer to `Hello`.
fn refused(e: &frames::Error) -> Outcome {
    let code = ErrorCode::from_i32(e.code);
    let err = Error::server(code.unwrap_or(ErrorCode::Internal), e.message.clone());
    match code {
        Some(ErrorCode::Unauthorized) => Outcome::Terminal(CloseReason::Unauthorized, err),
        Some(ErrorCode::UnsupportedVersion) => {
            Outcome::Terminal(CloseReason::UnsupportedVersion, err)
        }
        _ => Outcome::Retry {
            connected: false,
            why: format!("hello refused: {err}"),
        },
    }
}

/// Maps the server's close code (PROTOCOL.md §3) to what to do next.
fn closed_by_server(frame: Option<CloseFrame>, connected: bool) -> Outcome {
    let code = frame.as_ref().map(|f| u16::from(f.code));
    match code {
        Some(4001) => Outcome::Terminal(
            CloseReason::Unauthorized,
            Error::server(ErrorCode::Unauthorized, "token refused or device removed"),
        ),
        Some(4004) => Outcome::Terminal(
            CloseReason::UnsupportedVersion,
            Error::server(ErrorCode::UnsupportedVersion, "protocol version refused"),
        ),
        _ => Outcome::Retry {
            connected,
            why: format!("closed by server (code {code:?})"),
        },
    }
}

/// The state of an established connection.
struct Conn<'a> {
    ctx: &'a Ctx,
    ws: &'a mut Ws,
    /// Requests awaiting their answer, by request id.
    pending: HashMap<u64, oneshot::Sender<Answer>>,
    next_id: u64,
}

impl Conn<'_> {
    async fn run(
        &mut self,
        commands: &mut mpsc::Receiver<Command>,
        shutdown: &mut watch::Receiver<Option<CloseReason>>,
        heartbeat: std::time::Duration,
    ) -> Outcome {
        let mut ping = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
        let mut last_rx = Instant::now();
        // A frame read while batching events, to handle after the batch.
        let mut lookahead: Option<WsItem> = None;
        loop {
            let item = if let Some(item) = lookahead.take() {
                item
            } else {
                let can_take = self.pending.len() < MAX_IN_FLIGHT;
                tokio::select! {
                    item = self.ws.next() => item,
                    reason = stop_requested(shutdown) => return Outcome::Shutdown(reason),
                    cmd = commands.recv(), if can_take => match cmd {
                        Some(cmd) => {
                            if let Err(o) = self.request(cmd).await {
                                return o;
                            }
                            continue;
                        }
                        None => return Outcome::Shutdown(CloseReason::ClientClosed),
                    },
                    _ = ping.tick() => {
                        let id = self.take_id();
                        let kind = client_frame::Kind::Ping(frames::Ping { client_time_ms: now_ms() });
                        if let Err(o) = self.write(id, kind).await {
                            return o;
                        }
                        continue;
                    }
                    () = tokio::time::sleep_until(last_rx + heartbeat * 2) => {
                        return lost("server silent for two heartbeats".into());
                    }
                }
            };
            last_rx = Instant::now();
            let frame = match item {
                Some(Ok(WsMessage::Binary(b))) => {
                    match ServerFrame::decode_frame(&b, MAX_SERVER_FRAME) {
                        Ok(f) => f,
                        Err(e) => {
                            tracing::warn!(error = %e, "undecodable frame from server, ignored");
                            continue;
                        }
                    }
                }
                Some(Ok(WsMessage::Close(frame))) => return closed_by_server(frame, true),
                Some(Ok(_)) => continue,
                Some(Err(e)) => return lost(format!("read: {e}")),
                None => return lost("socket closed".into()),
            };
            let result = match frame.kind {
                Some(server_frame::Kind::Event(ev)) => {
                    let (batch, next) = self.collect_batch(ev);
                    lookahead = next;
                    self.store_and_ack(batch).await
                }
                Some(kind) => {
                    self.answer(frame.request_id, kind);
                    Ok(())
                }
                None => Ok(()),
            };
            if let Err(o) = result {
                return o;
            }
        }
    }

    /// Takes the events that are already buffered behind `first`, without waiting.
    fn collect_batch(&mut self, first: frames::Event) -> (Vec<frames::Event>, Option<WsItem>) {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            let Some(item) = self.ws.next().now_or_never() else {
                break;
            };
            if let Some(Ok(WsMessage::Binary(b))) = &item
                && let Ok(ServerFrame {
                    kind: Some(server_frame::Kind::Event(ev)),
                    ..
                }) = ServerFrame::decode_frame(b, MAX_SERVER_FRAME)
            {
                batch.push(ev);
                continue;
            }
            return (batch, Some(item));
        }
        (batch, None)
    }

    /// Stores a batch durably, emits what is new, then acknowledges it.
    async fn store_and_ack(&mut self, batch: Vec<frames::Event>) -> Result<(), Outcome> {
        let me = self.ctx.user_id;
        // Messages are attributed to their sending device by its identity keys: learn the
        // keys of senders not seen before (a failure to is reported per message).
        let senders = {
            let candidates = crate::store::senders(&batch);
            self.ctx
                .store
                .run(move |s| s.unknown_senders(&candidates))
                .await
        };
        match senders {
            Ok(s) if !s.is_empty() => {
                match crate::Client::learn_senders(
                    &self.ctx.http,
                    &self.ctx.store,
                    &self.ctx.token,
                    s,
                )
                .await
                {
                    Ok(changes) => {
                        for (c, username) in changes {
                            self.ctx.emit(Event::KeysChanged(crate::types::KeysChanged {
                                user_id: c.user_id,
                                username,
                                was_verified: c.was_verified,
                            }));
                        }
                    }
                    // Not acknowledged: the server keeps the events for the next connection.
                    Err(e) => return Err(lost(format!("sender keys: {e}"))),
                }
            }
            Ok(_) => {}
            Err(e) => return Err(lost(format!("local store: {e}"))),
        }
        let applied = match self
            .ctx
            .store
            .run(move |s| s.apply_events(me, &batch))
            .await
        {
            Ok(a) => a,
            Err(e) => {
                // Not acknowledged, so the server keeps the events; try again on a new connection.
                tracing::error!(error = %e, "cannot store events");
                self.ctx
                    .emit(Event::Error(format!("cannot store events: {e}")));
                return Err(lost(format!("local store: {e}")));
            }
        };
        if applied.one_time_key_used {
            self.ctx.keys_wanted.notify_one();
        }
        for event in applied.events {
            if let Event::Message(m) = &event
                && let (Some(_), Some(g)) = (&m.system, m.group)
            {
                crate::client::lock(&self.ctx.directory).invalidate_group(g);
            }
            self.ctx.emit(event);
        }
        let id = self.take_id();
        let ack = client_frame::Kind::Ack(frames::Ack {
            up_to: applied.ack_up_to,
        });
        self.write(id, ack).await
    }

    /// Handles a non-event frame: answers, `Synced`, stray errors.
    fn answer(&mut self, request_id: u64, kind: server_frame::Kind) {
        let answer = match kind {
            server_frame::Kind::Synced(s) => {
                tracing::debug!(up_to = s.up_to, "synced");
                self.ctx.status.send_modify(|st| st.synced = true);
                self.ctx.emit(Event::Synced);
                return;
            }
            server_frame::Kind::Sent(s) => Answer::Sent(s),
            server_frame::Kind::Done(_) => Answer::Done,
            server_frame::Kind::Error(e) => Answer::Error(e),
            server_frame::Kind::Pong(_)
            | server_frame::Kind::Welcome(_)
            | server_frame::Kind::Event(_) => {
                return;
            }
        };
        match self.pending.remove(&request_id) {
            Some(reply) => {
                let _ = reply.send(answer);
            }
            None => {
                if let Answer::Error(e) = answer {
                    // Answers to Ack/Ping, or to a frame the server could not decode.
                    tracing::warn!(request_id, code = e.code, message = %e.message, "server error");
                }
            }
        }
    }

    async fn request(&mut self, cmd: Command) -> Result<(), Outcome> {
        if cmd.reply.is_closed() {
            return Ok(()); // the caller gave up
        }
        let id = self.take_id();
        self.pending.insert(id, cmd.reply);
        self.write(id, cmd.kind).await
    }

    async fn write(&mut self, request_id: u64, kind: client_frame::Kind) -> Result<(), Outcome> {
        let frame = ClientFrame {
            request_id,
            kind: Some(kind),
        };
        self.ws
            .send(WsMessage::Binary(frame.encode_to_vec().into()))
            .await
            .map_err(|e| lost(format!("write: {e}")))
    }

    fn take_id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        id
    }
}

fn lost(why: String) -> Outcome {
    Outcome::Retry {
        connected: true,
        why,
    }
}

pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
