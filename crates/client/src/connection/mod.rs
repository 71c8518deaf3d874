//! The connection task: one tokio task per connected client that owns the WebSocket.
//!
//! It loops over connections: open the socket, `Hello`, wait for `Welcome`, then read frames
//! (storing mailbox events in batches and acknowledging them after the commit), send the
//! requests that the [`Client`](crate::Client) queues on a bounded channel, ping every
//! `heartbeat_secs`, and drop the socket when the server has been silent for two heartbeats.
//! When a connection ends it waits a backoff delay with full jitter and starts again, until it
//! is told to stop, or the server refuses the token (close 4001 or `Error{unauthorized}`) or
//! the protocol version (4004): those end the task, because retrying cannot help.
//!
//! The task publishes its state in a `watch` channel ([`Status`]) that `connect`,
//! `wait_synced` and the senders wait on, and mirrors every change as an
//! [`Event::Connection`](crate::Event::Connection) on the event fan-out.

mod socket;

pub(crate) use socket::now_ms;

use std::time::Duration;

use tern_proto::frames::{self, client_frame};
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::backoff::Backoff;
use crate::error::Error;
use crate::store::LocalStore;
use crate::types::{CloseReason, ConnectionState, Event};

/// Requests queued for the socket before the task stops reading new ones.
pub(crate) const COMMAND_QUEUE: usize = 64;
/// Requests awaiting their answer on one connection; past this the task applies backpressure.
const MAX_IN_FLIGHT: usize = 256;
/// Events stored and acknowledged together; one transaction (and fsync) per batch.
const MAX_BATCH: usize = 512;
/// Largest frame accepted from the server. The server's own limit is 64 KiB; a generous
/// ceiling keeps a future server with bigger limits working while bounding memory.
const MAX_SERVER_FRAME: usize = 1024 * 1024;
/// Heartbeat interval if the server's `Welcome` says 0.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(25);

/// The answer to a request (`Send` → `Sent`, `Read` → `Done`), or the server's refusal.
#[derive(Debug)]
pub(crate) enum Answer {
    Sent(frames::Sent),
    Done,
    Error(frames::Error),
}

/// A request for the server. If the connection is lost before the answer arrives the reply
/// sender is dropped, and the caller waits for the next connection and retries.
pub(crate) struct Command {
    pub kind: client_frame::Kind,
    pub reply: oneshot::Sender<Answer>,
}

/// What the task publishes about itself.
#[derive(Debug, Clone)]
pub(crate) struct Status {
    pub state: ConnectionState,
    /// The current connection has received `Synced`.
    pub synced: bool,
    /// Incremented at every `Welcome`, so watchers can tell connections apart.
    pub generation: u64,
    /// The server's body limit from the last `Welcome`.
    pub max_body_bytes: usize,
}

impl Status {
    pub fn initial() -> Status {
        Status {
            state: ConnectionState::Closed {
                reason: CloseReason::NotStarted,
            },
            synced: false,
            generation: 0,
            max_body_bytes: tern_proto::Limits::default().max_body_bytes,
        }
    }
}

/// Everything the task needs, handed over at spawn time (it holds no reference to the
/// `Client`, so dropping every `Client` handle closes the command channel and ends the task).
pub(crate) struct Ctx {
    pub ws_url: String,
    pub token: String,
    pub user_id: u64,
    pub handshake_timeout: Duration,
    pub reconnect_initial: Duration,
    pub reconnect_max: Duration,
    pub store: LocalStore,
    pub events: broadcast::Sender<Event>,
    pub status: watch::Sender<Status>,
    /// To fetch the keys of senders not seen before.
    pub http: crate::http::Http,
    /// Told when a pre-key message used up a one-time key.
    pub keys_wanted: std::sync::Arc<tokio::sync::Notify>,
    /// Cached device lists: a group's membership change makes its list stale.
    pub directory: std::sync::Arc<std::sync::Mutex<crate::directory::Directory>>,
}

impl Ctx {
    fn emit(&self, event: Event) {
        // No subscriber is fine: everything is in the local store.
        let _ = self.events.send(event);
    }

    pub(crate) fn set_state(&self, state: ConnectionState) {
        let changed = self.status.send_if_modified(|s| {
            if s.state == state {
                return false;
            }
            s.state = state.clone();
            if s.state != ConnectionState::Connected {
                s.synced = false;
            }
            true
        });
        if changed {
            self.emit(Event::Connection(state));
        }
    }
}

/// How one connection ended.
pub(crate) enum Outcome {
    /// Told to stop.
    Shutdown(CloseReason),
    /// Refused for good.
    Terminal(CloseReason, Error),
    /// Lost; try again. `connected` says whether `Welcome` was received.
    Retry { connected: bool, why: String },
}

/// The task body. `first` learns the outcome of the first handshake (`connect` waits on it).
pub(crate) async fn run(
    ctx: Ctx,
    mut commands: mpsc::Receiver<Command>,
    mut shutdown: watch::Receiver<Option<CloseReason>>,
    first: oneshot::Sender<Result<(), Error>>,
) {
    let mut first = Some(first);
    let mut backoff = Backoff::new(ctx.reconnect_initial, ctx.reconnect_max);
    loop {
        ctx.set_state(ConnectionState::Connecting);
        let outcome = socket::connection(&ctx, &mut commands, &mut shutdown, &mut first).await;
        let delay = match outcome {
            Outcome::Shutdown(reason) => {
                ctx.set_state(ConnectionState::Closed { reason });
                return;
            }
            Outcome::Terminal(reason, err) => {
                tracing::warn!(%reason, "connection refused for good");
                if let Some(tx) = first.take() {
                    let _ = tx.send(Err(err));
                }
                ctx.set_state(ConnectionState::Closed { reason });
                return;
            }
            Outcome::Retry { connected, why } => {
                if connected {
                    backoff.reset();
                }
                let delay = backoff.next_delay();
                tracing::info!(%why, retry_in_ms = delay.as_millis() as u64, "connection lost");
                delay
            }
        };
        ctx.set_state(ConnectionState::Disconnected { retry_in: delay });
        let sleep = tokio::time::sleep(delay);
        tokio::pin!(sleep);
        loop {
            tokio::select! {
                () = &mut sleep => break,
                reason = stop_requested(&mut shutdown) => {
                    ctx.set_state(ConnectionState::Closed { reason });
                    return;
                }
                cmd = commands.recv() => match cmd {
                    // Dropping the reply tells the caller to wait for the next connection.
                    Some(cmd) => drop(cmd),
                    None => {
                        ctx.set_state(ConnectionState::Closed { reason: CloseReason::ClientClosed });
                        return;
                    }
                },
            }
        }
    }
}

/// Resolves when the client asks the task to stop (or drops the handle).
async fn stop_requested(shutdown: &mut watch::Receiver<Option<CloseReason>>) -> CloseReason {
    match shutdown.wait_for(Option::is_some).await {
        Ok(reason) => (*reason).unwrap_or(CloseReason::ClientClosed),
        Err(_) => CloseReason::ClientClosed,
    }
}
