//! Sending with retry, and read markers.
//!
//! Every body is a `Content` (PROTOCOL.md §8.5); `send_text` sends `Content::text`, and
//! `send_file` (in `media/`) a `Content::media` through the same outbox.
//!
//! `send_text` first writes the message to the local outbox (it is in the history as
//! `pending` from then on), then delivers it: address the right devices, send, and retry with
//! the *same* `client_msg_id` until the server answers `Sent` — across lost connections,
//! `device_mismatch` (refresh the device lists), and transient refusals (`internal`,
//! `unavailable`, `rate_limited`, with backoff). The server makes retries idempotent, so a
//! message is stored once however often it is sent. Whatever is still in the outbox when a
//! connection comes up (after a crash, a `close`, a timed-out caller) is delivered again by
//! the outbox watcher started in `connect`.
//!
//! Every attempt encrypts the body afresh for the devices known then (`e2ee.rs`): per device
//! with Olm for a direct message, once with Megolm for a group (addressed to exactly every
//! member device, so the server can tell me when my view is stale). There is no plaintext
//! path.

use tern_proto::ErrorCode;
use tern_proto::content::Content;
use tern_proto::frames::{self, client_frame};
use tokio::sync::oneshot;

use crate::backoff::Backoff;
use crate::client::{Client, lock, normalize_username};
use crate::connection::{Answer, Command};
use crate::error::Error;
use crate::media::Recipient;
use crate::store::{Conv, OutboxItem, SavedSession};
use crate::types::{CloseReason, ConnectionState, Event, SentMessage};

/// `device_mismatch` answers in a row before retries start to back off (a device being added
/// while we look would otherwise make us spin).
const MISMATCH_FREE_RETRIES: u32 = 3;

/// Removes a client_msg_id from the in-flight set when its delivery attempt ends.
struct InFlight<'a> {
    client: &'a Client,
    id: String,
}

impl<'a> InFlight<'a> {
    fn claim(client: &'a Client, id: &str) -> Option<InFlight<'a>> {
        lock(&client.inner.in_flight)
            .insert(id.to_owned())
            .then(|| InFlight {
                client,
                id: id.to_owned(),
            })
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        lock(&self.client.inner.in_flight).remove(&self.id);
    }
}

impl Client {
    /// Sends a text message: stores it in the outbox, then retries until the server answers
    /// `Sent` (one tick). Needs a running connection task (`connect`); if the task stops before
    /// the message is sent, it stays in the outbox and goes out on the next `connect`.
    pub async fn send_text(&self, to_username: &str, text: &str) -> Result<SentMessage, Error> {
        self.send_text_to(&Recipient::User(to_username.to_owned()), text)
            .await
    }

    /// Sends a text message to a group, like [`send_text`](Client::send_text): outbox first,
    /// then retried until `Sent`. The server refuses it (`forbidden`, and the message is
    /// marked failed) if I am not a member.
    pub async fn send_group_text(&self, group_id: u64, text: &str) -> Result<SentMessage, Error> {
        self.send_text_to(&Recipient::Group(group_id), text).await
    }

    async fn send_text_to(&self, to: &Recipient, text: &str) -> Result<SentMessage, Error> {
        let session = self.saved_session()?;
        if text.is_empty() {
            return Err(Error::Invalid("empty message".into()));
        }
        let body = Content::text(text).encode_body();
        self.check_body_len(body.len())?;
        self.check_running()?;
        let (conv, conv_name) = self.conversation(&session, to).await?;
        let item = OutboxItem {
            conv,
            conv_name,
            client_msg_id: new_client_msg_id(),
            body,
        };
        self.enqueue_and_deliver(session, item).await
    }

    /// The conversation to write to, and its name as the outbox keeps it (the peer's
    /// username, or the group's name as last seen).
    pub(crate) async fn conversation(
        &self,
        session: &SavedSession,
        to: &Recipient,
    ) -> Result<(Conv, String), Error> {
        match to {
            Recipient::User(name) => {
                let name = normalize_username(name)?;
                let peer_user = self.resolve_peer(session, &name).await?;
                Ok((Conv::Direct(peer_user), name))
            }
            Recipient::Group(id) => {
                let id = *id;
                let name = self
                    .inner
                    .store
                    .run(move |s| s.group_name(id))
                    .await?
                    .unwrap_or_default();
                Ok((Conv::Group(id), name))
            }
        }
    }

    /// Refuses a body over the server's limit, before anything is stored.
    pub(crate) fn check_body_len(&self, len: usize) -> Result<(), Error> {
        let max = self
            .inner
            .status
            .borrow()
            .max_body_bytes
            .saturating_sub(crate::e2ee::ENCRYPTION_OVERHEAD);
        if len > max {
            return Err(Error::Invalid(format!(
                "message is {len} bytes; the limit is {max}"
            )));
        }
        Ok(())
    }

    /// Without a running connection task nothing would deliver a message: refuse before
    /// storing it.
    pub(crate) fn check_running(&self) -> Result<(), Error> {
        if let ConnectionState::Closed { reason } = self.connection_state() {
            return Err(match reason {
                CloseReason::NotStarted => Error::NotConnected,
                other => Error::Closed(other),
            });
        }
        Ok(())
    }

    async fn enqueue_and_deliver(
        &self,
        session: SavedSession,
        item: OutboxItem,
    ) -> Result<SentMessage, Error> {
        let (me, it) = (session.clone(), item.clone());
        self.inner
            .store
            .run(move |s| s.enqueue(&me, &it, crate::connection::now_ms()))
            .await?;
        self.deliver_enqueued(&session, &item).await
    }

    /// Delivers a message just put into the outbox.
    pub(crate) async fn deliver_enqueued(
        &self,
        session: &SavedSession,
        item: &OutboxItem,
    ) -> Result<SentMessage, Error> {
        let _guard = InFlight::claim(self, &item.client_msg_id);
        self.deliver(session, item).await
    }

    /// Delivers every message left in this device's outbox, oldest first.
    pub(crate) async fn flush_outbox(&self) -> Result<(), Error> {
        let session = self.saved_session()?;
        let device = session.device_id;
        let items = self.inner.store.run(move |s| s.outbox(device)).await?;
        for item in items {
            let Some(_guard) = InFlight::claim(self, &item.client_msg_id) else {
                continue; // a send_text call is on it
            };
            match self.deliver(&session, &item).await {
                Ok(_) => {}
                Err(Error::Closed(r)) => return Err(Error::Closed(r)),
                // Refused for good: marked failed by deliver; go on with the others.
                Err(e) => tracing::warn!(error = %e, "outbox message refused"),
            }
        }
        Ok(())
    }

    /// The retry loop of one message. Encrypted at every attempt, for the devices the
    /// directory lists then (`e2ee.rs`); the server makes the retries idempotent.
    async fn deliver(
        &self,
        session: &SavedSession,
        item: &OutboxItem,
    ) -> Result<SentMessage, Error> {
        let mut backoff = Backoff::new(
            self.inner.config.reconnect_initial,
            self.inner.config.reconnect_max,
        );
        let mut mismatches = 0u32;
        let mut rotate = false;
        loop {
            self.wait_connected().await?;
            let encrypted = match item.conv {
                Conv::Direct(peer) => self
                    .encrypt_direct(session, item, peer)
                    .await
                    .map(|devices| (Vec::new(), devices)),
                Conv::Group(group) => self.encrypt_for_group(session, item, group, rotate).await,
            };
            let (body, devices) = match encrypted {
                Ok(e) => e,
                Err(e) if e.code() == Some(ErrorCode::DeviceMismatch) => {
                    // A key share found a user's devices changed.
                    self.forget_devices(session, item.conv);
                    mismatches += 1;
                    if mismatches > MISMATCH_FREE_RETRIES {
                        tokio::time::sleep(backoff.next_delay()).await;
                    }
                    continue;
                }
                Err(e) if e.is_transient() => {
                    tracing::debug!(error = %e, "cannot encrypt yet; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                    continue;
                }
                Err(e) => return Err(self.fail(session, item, e).await),
            };
            rotate = false;
            let send = frames::Send {
                client_msg_id: item.client_msg_id.clone(),
                to: Some(item.conv.to_peer()),
                body,
                devices,
            };
            match self.request(client_frame::Kind::Send(send)).await {
                Ok(Answer::Sent(s)) => return self.record_sent(session, item, s).await,
                Ok(Answer::Error(e)) => {
                    let code = ErrorCode::from_i32(e.code).unwrap_or(ErrorCode::Internal);
                    if code == ErrorCode::DeviceMismatch {
                        tracing::debug!(missing = ?e.missing_devices, extra = ?e.extra_devices, "device mismatch");
                        self.forget_devices(session, item.conv);
                        // Devices went away: the group session must not reach them any more.
                        rotate = item.conv.group().is_some() && !e.extra_devices.is_empty();
                        mismatches += 1;
                        if mismatches > MISMATCH_FREE_RETRIES {
                            tokio::time::sleep(backoff.next_delay()).await;
                        }
                        continue;
                    }
                    let err = Error::from_frame(&e);
                    if err.is_transient() {
                        // `rate_limited` and `mailbox_full` say how long to wait.
                        tracing::debug!(error = %err, retry_after_ms = e.retry_after_ms, "send refused for now; retrying");
                        tokio::time::sleep(backoff.next_honouring(e.retry_after_ms)).await;
                        continue;
                    }
                    return Err(self.fail(session, item, err).await);
                }
                Ok(Answer::Done) => {
                    tracing::warn!("server answered Send with Done; retrying");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                // Connection lost before the answer: wait for the next one and resend.
                Err(_) => {}
            }
        }
    }

    /// Drops the cached device lists a mismatch showed stale.
    fn forget_devices(&self, session: &SavedSession, conv: Conv) {
        let mut d = lock(&self.inner.directory);
        match conv {
            Conv::Direct(peer) => d.invalidate(peer, session.user_id),
            // Any member's list may be the stale one.
            Conv::Group(g) => {
                d.invalidate_group(g);
                d.clear();
            }
        }
    }

    async fn record_sent(
        &self,
        session: &SavedSession,
        item: &OutboxItem,
        s: frames::Sent,
    ) -> Result<SentMessage, Error> {
        let sent = SentMessage {
            conversation: item.conv.public_name(&item.conv_name),
            group: item.conv.group(),
            client_msg_id: item.client_msg_id.clone(),
            seq: s.seq,
            server_ts_ms: s.server_ts_ms,
        };
        let (device, peer, to_store) = (session.device_id, item.conv, sent.clone());
        self.inner
            .store
            .run(move |st| st.mark_sent(device, &to_store, peer))
            .await?;
        let _ = self.inner.events.send(Event::Sent(sent.clone()));
        Ok(sent)
    }

    /// Marks the message failed (it leaves the outbox) and returns the error.
    async fn fail(&self, session: &SavedSession, item: &OutboxItem, err: Error) -> Error {
        let (device, id, reason) = (
            session.device_id,
            item.client_msg_id.clone(),
            err.to_string(),
        );
        if let Err(e) = self
            .inner
            .store
            .run(move |s| s.mark_failed(device, &id, &reason))
            .await
        {
            tracing::error!(error = %e, "cannot mark message failed");
        }
        err
    }

    /// The user id of `username`: from the local store, else from the server (which also
    /// fills the device cache).
    async fn resolve_peer(&self, session: &SavedSession, username: &str) -> Result<u64, Error> {
        let name = username.to_owned();
        if let Some(id) = self.inner.store.run(move |s| s.peer_id(&name)).await? {
            return Ok(id);
        }
        let r = self.inner.http.user_keys(&session.token, username).await?;
        let (id, name) = (r.user_id, r.username.clone());
        lock(&self.inner.directory).put_user(r);
        self.inner
            .store
            .run(move |s| s.remember_peer(id, &name))
            .await?;
        Ok(id)
    }

    /// Sends a request until the server answers it: across lost connections, and with
    /// backoff after transient refusals. A refusal for good is the error; `Sent` and `Done`
    /// are returned (`deliver` has its own loop: it must encrypt anew at every attempt).
    pub(crate) async fn request_until_answered(
        &self,
        kind: client_frame::Kind,
    ) -> Result<Answer, Error> {
        let mut backoff = Backoff::new(
            self.inner.config.reconnect_initial,
            self.inner.config.reconnect_max,
        );
        loop {
            self.wait_connected().await?;
            match self.request(kind.clone()).await {
                Ok(Answer::Error(e)) => {
                    let err = Error::from_frame(&e);
                    if !err.is_transient() {
                        return Err(err);
                    }
                    tokio::time::sleep(backoff.next_honouring(e.retry_after_ms)).await;
                }
                Ok(answer) => return Ok(answer),
                // Connection lost before the answer: wait for the next one and resend.
                Err(_) => {}
            }
        }
    }

    /// Sends one request on the current connection and waits for its answer.
    /// `Err(NotConnected)` means the connection went away first: wait and retry.
    pub(crate) async fn request(&self, kind: client_frame::Kind) -> Result<Answer, Error> {
        let commands = {
            let conn = self.inner.conn.lock().await;
            conn.as_ref()
                .map(|h| h.commands.clone())
                .ok_or(Error::NotConnected)?
        };
        let (reply, answer) = oneshot::channel();
        commands
            .send(Command { kind, reply })
            .await
            .map_err(|_| Error::NotConnected)?;
        answer.await.map_err(|_| Error::NotConnected)
    }

    /// Tells the server (and so the peer and my other devices) that I have read the
    /// conversation with `username` up to its latest received message. Returns the seq marked,
    /// or `None` if there was nothing new to mark.
    pub async fn mark_read(&self, username: &str) -> Result<Option<u64>, Error> {
        let session = self.saved_session()?;
        let name = normalize_username(username)?;
        let peer_user = self.resolve_peer(&session, &name).await?;
        self.mark_conv_read(Conv::Direct(peer_user)).await
    }

    /// Tells the server (and so the members who sent messages, and my other devices) that I
    /// have read the group up to its latest message from someone else. Returns the seq
    /// marked, or `None` if there was nothing new to mark.
    pub async fn mark_group_read(&self, group_id: u64) -> Result<Option<u64>, Error> {
        self.saved_session()?;
        self.mark_conv_read(Conv::Group(group_id)).await
    }

    async fn mark_conv_read(&self, conv: Conv) -> Result<Option<u64>, Error> {
        let (latest, read) = self.inner.store.run(move |s| s.read_position(conv)).await?;
        let Some(up_to) = latest.filter(|l| *l > read) else {
            return Ok(None);
        };
        let read = frames::Read {
            conversation: Some(conv.to_peer()),
            up_to_seq: up_to,
        };
        match self
            .request_until_answered(client_frame::Kind::Read(read))
            .await?
        {
            Answer::Done => {}
            _ => return Err(Error::Protocol("Read answered with Sent".into())),
        }
        self.inner
            .store
            .run(move |s| s.set_my_read(conv, up_to))
            .await?;
        Ok(Some(up_to))
    }
}

/// 16 random bytes, hex: unique per device without coordination.
pub(crate) fn new_client_msg_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}
