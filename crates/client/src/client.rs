//! The [`Client`] handle: the app-facing API. It owns the local store, the HTTP client, the
//! event fan-out and the handle of the connection task; clones share all of it.
//!
//! Sending and reading live in `outbox.rs`; this file covers opening a profile, accounts and
//! sessions, starting and stopping the connection, and the HTTP calls about devices, last seen
//! and privacy.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use tern_proto::ErrorCode;
use tern_proto::http::{
    DeviceInfo, LastSeenResponse, PrivacySettings, TurnCredentials, Visibility,
};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::config::ClientConfig;
use crate::connection::{self, COMMAND_QUEUE, Command, Ctx, Status};
use crate::directory::Directory;
use crate::error::Error;
use crate::events::{EVENT_CAPACITY, EventStream};
use crate::http::Http;
use crate::media::{Busy, MediaHttp};
use crate::store::{LocalStore, SavedSession};
use crate::types::{CloseReason, ConnectionState, Event, Session, StoredMessage};

/// How long `close` waits for the connection task to say goodbye before aborting it.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// A handle to one profile: cheap to clone, all clones share the same state and connection.
#[derive(Clone)]
pub struct Client {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("server", &self.inner.config.server)
            .field("home", &self.inner.config.home)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Inner {
    pub config: ClientConfig,
    pub store: LocalStore,
    pub http: Http,
    pub session: Mutex<Option<SavedSession>>,
    pub events: broadcast::Sender<Event>,
    pub status: watch::Sender<Status>,
    pub conn: tokio::sync::Mutex<Option<ConnHandle>>,
    pub directory: Arc<Mutex<Directory>>,
    /// client_msg_ids being delivered right now, so the outbox flush skips them.
    pub in_flight: Mutex<HashSet<String>>,
    /// Media uploads and downloads: their HTTP client, and the files in transfer.
    pub media_http: MediaHttp,
    pub media_busy: Busy,
    /// Told when one-time keys should be topped up.
    pub keys_wanted: Arc<tokio::sync::Notify>,
}

pub(crate) struct ConnHandle {
    pub commands: mpsc::Sender<Command>,
    shutdown: watch::Sender<Option<CloseReason>>,
    task: JoinHandle<()>,
    outbox: JoinHandle<()>,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded values are plain data that stay consistent if a holder panicked.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Client {
    /// Opens the profile in `config.home` (creating it if needed) and restores a saved session.
    pub fn open(config: ClientConfig) -> Result<Client, Error> {
        let store = LocalStore::open_protected(&config.home, config.passphrase.as_deref())?;
        let session = store.load_session()?;
        if let Some(s) = &session
            && s.server.trim_end_matches('/') != config.base_url()
        {
            tracing::warn!(saved = %s.server, configured = %config.server, "profile was logged in on another server");
        }
        let http = Http::new(config.base_url(), config.request_timeout)?;
        let media_http = MediaHttp::new(config.base_url(), config.request_timeout)?;
        let (events, _) = broadcast::channel(EVENT_CAPACITY);
        let (status, _) = watch::channel(Status::initial());
        Ok(Client {
            inner: Arc::new(Inner {
                config,
                store,
                http,
                session: Mutex::new(session),
                events,
                status,
                conn: tokio::sync::Mutex::new(None),
                directory: Arc::new(Mutex::new(Directory::default())),
                in_flight: Mutex::new(HashSet::new()),
                media_http,
                media_busy: Busy::default(),
                keys_wanted: Arc::new(tokio::sync::Notify::new()),
            }),
        })
    }

    /// The logged-in identity, if any.
    pub fn session(&self) -> Option<Session> {
        lock(&self.inner.session).as_ref().map(|s| Session {
            user_id: s.user_id,
            username: s.username.clone(),
            device_id: s.device_id,
            server: s.server.clone(),
        })
    }

    pub(crate) fn saved_session(&self) -> Result<SavedSession, Error> {
        lock(&self.inner.session).clone().ok_or(Error::NotLoggedIn)
    }

    /// Creates the account, then logs in as its first device.
    pub async fn register(&self, username: &str, password: &str) -> Result<Session, Error> {
        let username = normalize_username(username)?;
        tern_proto::validate::password(password, &username).map_err(Error::Invalid)?;
        self.inner.http.register(&username, password).await?;
        self.login(&username, password).await
    }

    /// Logs in, creating a new device for this profile. A previous session of the profile is
    /// replaced (its connection is closed).
    pub async fn login(&self, username: &str, password: &str) -> Result<Session, Error> {
        let username = normalize_username(username)?;
        let device_name = &self.inner.config.device_name;
        tern_proto::validate::device_name(device_name).map_err(Error::Invalid)?;
        let r = self
            .inner
            .http
            .login(&username, password, device_name)
            .await?;
        self.stop(CloseReason::ClientClosed).await;
        let saved = SavedSession {
            server: self.inner.config.base_url().to_owned(),
            user_id: r.user_id,
            username: r.username,
            device_id: r.device_id,
            token: r.token,
        };
        let to_save = saved.clone();
        self.inner
            .store
            .run(move |s| s.save_session(&to_save))
            .await?;
        *lock(&self.inner.session) = Some(saved.clone());
        lock(&self.inner.directory).clear();
        tracing::info!(device_id = r.device_id, "logged in");
        // The new device's keys, before anyone can try to write to it.
        self.maintain_keys(&saved).await?;
        self.session().ok_or(Error::NotLoggedIn)
    }

    /// Starts the connection task and waits for the first `Welcome`. The task then keeps the
    /// connection up (reconnecting with backoff and jitter) until `close`, `logout`, or a
    /// refusal of the token. If the task is already running this waits until it is connected.
    ///
    /// Errors: [`Error::NotLoggedIn`]; [`Error::Server`] with `unauthorized` when the token is
    /// refused. An unreachable server is not an error: the task keeps trying (wrap the call
    /// in a timeout to bound it).
    pub async fn connect(&self) -> Result<(), Error> {
        let session = self.saved_session()?;
        let first_rx = {
            let mut conn = self.inner.conn.lock().await;
            if conn.as_ref().is_some_and(|h| !h.task.is_finished()) {
                drop(conn);
                return self.wait_connected().await;
            }
            let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
            let (shutdown_tx, shutdown_rx) = watch::channel(None);
            let (first_tx, first_rx) = oneshot::channel();
            let ctx = Ctx {
                ws_url: self.inner.config.ws_url(),
                token: session.token.clone(),
                user_id: session.user_id,
                handshake_timeout: self.inner.config.request_timeout,
                reconnect_initial: self.inner.config.reconnect_initial,
                reconnect_max: self.inner.config.reconnect_max,
                store: self.inner.store.clone(),
                events: self.inner.events.clone(),
                status: self.inner.status.clone(),
                http: self.inner.http.clone(),
                keys_wanted: self.inner.keys_wanted.clone(),
                directory: self.inner.directory.clone(),
            };
            ctx.set_state(ConnectionState::Connecting);
            let task = tokio::spawn(connection::run(ctx, cmd_rx, shutdown_rx, first_tx));
            let outbox = tokio::spawn(outbox_watcher(Arc::downgrade(&self.inner)));
            *conn = Some(ConnHandle {
                commands: cmd_tx,
                shutdown: shutdown_tx,
                task,
                outbox,
            });
            first_rx
        };
        match first_rx.await {
            Ok(result) => result,
            // The task ended before a handshake finished: it was told to stop.
            Err(_) => Err(Error::Closed(
                self.closed_reason().unwrap_or(CloseReason::ClientClosed),
            )),
        }
    }

    /// The connection task's current state.
    pub fn connection_state(&self) -> ConnectionState {
        self.inner.status.borrow().state.clone()
    }

    fn closed_reason(&self) -> Option<CloseReason> {
        match self.inner.status.borrow().state {
            ConnectionState::Closed { reason } => Some(reason),
            _ => None,
        }
    }

    /// Waits until the connection is up (`Welcome` received); fails if the task has stopped.
    pub async fn wait_connected(&self) -> Result<(), Error> {
        let mut rx = self.inner.status.subscribe();
        let s = rx
            .wait_for(|s| s.state == ConnectionState::Connected || s.state.is_closed())
            .await
            .map_err(|_| Error::Closed(CloseReason::ClientClosed))?;
        match s.state {
            ConnectionState::Closed { reason } => Err(Error::Closed(reason)),
            _ => Ok(()),
        }
    }

    /// Waits until the current connection has drained the mailbox (`Synced`): everything that
    /// was waiting is stored locally and acknowledged. Fails if the task has stopped.
    pub async fn wait_synced(&self) -> Result<(), Error> {
        let mut rx = self.inner.status.subscribe();
        let s = rx
            .wait_for(|s| s.synced || s.state.is_closed())
            .await
            .map_err(|_| Error::Closed(CloseReason::ClientClosed))?;
        match s.state {
            ConnectionState::Closed { reason } => Err(Error::Closed(reason)),
            _ => Ok(()),
        }
    }

    /// Subscribes to events from now on (see [`EventStream`]).
    pub fn events(&self) -> EventStream {
        EventStream::new(self.inner.events.subscribe())
    }

    /// Stops the connection task cleanly (close code 1000). Unsent messages stay in the
    /// outbox and go out on the next `connect`.
    pub async fn close(&self) {
        self.stop(CloseReason::ClientClosed).await;
    }

    async fn stop(&self, reason: CloseReason) {
        let handle = self.inner.conn.lock().await.take();
        let Some(h) = handle else { return };
        let _ = h.shutdown.send(Some(reason));
        let mut task = h.task;
        if tokio::time::timeout(CLOSE_GRACE, &mut task).await.is_err() {
            tracing::warn!("connection task did not stop in time; aborting it");
            task.abort();
        }
        // The watcher ends by itself on the Closed state; make sure of it.
        h.outbox.abort();
        let _ = h.outbox.await;
    }

    /// Logs out: the server removes this device; the local session is forgotten (history is
    /// kept; unsent messages are marked failed).
    pub async fn logout(&self) -> Result<(), Error> {
        let session = self.saved_session()?;
        self.stop(CloseReason::LoggedOut).await;
        match self.inner.http.logout(&session.token).await {
            Ok(()) => {}
            // Already removed (e.g. from another device): the local logout still stands.
            Err(e) if e.code() == Some(ErrorCode::Unauthorized) => {}
            Err(e) => return Err(e),
        }
        self.inner.store.run(|s| s.clear_session()).await?;
        *lock(&self.inner.session) = None;
        lock(&self.inner.directory).clear();
        let closed = ConnectionState::Closed {
            reason: CloseReason::LoggedOut,
        };
        let changed = self.inner.status.send_if_modified(|s| {
            s.synced = false;
            if s.state == closed {
                return false;
            }
            s.state = closed.clone();
            true
        });
        if changed {
            let _ = self.inner.events.send(Event::Connection(closed));
        }
        Ok(())
    }

    /// My devices, as the server knows them.
    pub async fn devices(&self) -> Result<Vec<DeviceInfo>, Error> {
        let s = self.saved_session()?;
        self.inner.http.devices(&s.token).await
    }

    /// Removes one of my devices (its token stops working; its socket is closed with 4001).
    pub async fn remove_device(&self, device_id: u64) -> Result<(), Error> {
        let s = self.saved_session()?;
        self.inner.http.remove_device(&s.token, device_id).await?;
        lock(&self.inner.directory).invalidate_own();
        Ok(())
    }

    /// Short-lived credentials for the server's TURN relay (PROTOCOL.md §11), for a WebRTC
    /// peer connection's `iceServers`; `not_found` when the server has none.
    pub async fn turn_credentials(&self) -> Result<TurnCredentials, Error> {
        let s = self.saved_session()?;
        self.inner.http.turn(&s.token).await
    }

    pub async fn last_seen(&self, username: &str) -> Result<LastSeenResponse, Error> {
        let s = self.saved_session()?;
        let username = normalize_username(username)?;
        self.inner.http.last_seen(&s.token, &username).await
    }

    pub async fn privacy(&self) -> Result<PrivacySettings, Error> {
        let s = self.saved_session()?;
        self.inner.http.privacy(&s.token).await
    }

    pub async fn set_last_seen_privacy(&self, v: Visibility) -> Result<(), Error> {
        let s = self.saved_session()?;
        self.inner
            .http
            .set_privacy(&s.token, &PrivacySettings { last_seen: v })
            .await?;
        Ok(())
    }

    /// The last `limit` messages of the direct conversation with `username`, ordered by seq
    /// (pending ones last). Local. For a group, see [`group_history`](Client::group_history).
    pub fn history(&self, username: &str, limit: usize) -> Result<Vec<StoredMessage>, Error> {
        let username = normalize_username(username)?;
        self.inner.store.history(&username, limit)
    }

    /// My last `limit` outgoing messages (from any of my devices; direct and group) with their
    /// ticks. Local.
    pub fn sent_status(&self, limit: usize) -> Result<Vec<StoredMessage>, Error> {
        self.inner.store.sent_status(limit)
    }

    /// The highest mailbox sequence stored locally (the acknowledgement cursor).
    pub fn mailbox_cursor(&self) -> Result<u64, Error> {
        self.inner.store.mailbox_cursor()
    }
}

/// Lowercases and checks a username (it ends up in URL paths, so it must be checked).
pub(crate) fn normalize_username(name: &str) -> Result<String, Error> {
    let name = name.trim().to_ascii_lowercase();
    tern_proto::validate::username(&name).map_err(Error::Invalid)?;
    Ok(name)
}

/// After every new connection: tops up the device's published keys, then sends the outbox (a
/// restarted client resends with the same client_msg_ids). Between connections, tops up keys
/// when a pre-key message used one. Holds only a weak reference, so it never keeps a dropped
/// client alive.
async fn outbox_watcher(inner: Weak<Inner>) {
    let Some((mut rx, keys_wanted)) = inner
        .upgrade()
        .map(|i| (i.status.subscribe(), i.keys_wanted.clone()))
    else {
        return;
    };
    let mut seen = 0;
    loop {
        let generation = tokio::select! {
            s = rx.wait_for(|s| {
                s.state.is_closed()
                    || (s.state == ConnectionState::Connected && s.generation != seen)
            }) => match s {
                Ok(s) if !s.state.is_closed() => Some(s.generation),
                _ => return,
            },
            () = keys_wanted.notified() => None,
        };
        let Some(inner) = inner.upgrade() else { return };
        let client = Client { inner };
        if let Ok(session) = client.saved_session()
            && let Err(e) = client.maintain_keys(&session).await
        {
            tracing::warn!(error = %e, "cannot publish keys");
        }
        if let Some(g) = generation {
            seen = g;
            if let Err(e) = client.flush_outbox().await {
                tracing::warn!(error = %e, "outbox flush stopped");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_are_lowercased_and_checked() {
        assert_eq!(normalize_username(" Bob ").expect("valid"), "bob");
        assert!(normalize_username("../etc").is_err());
        assert!(normalize_username("a/b").is_err());
    }
}
