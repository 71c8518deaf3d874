//! End-to-end encryption in the SDK (PROTOCOL.md §9, SECURITY.md): nothing leaves this device
//! unencrypted.
//!
//! - **Keys**: at login the device creates its Olm account and publishes its identity keys,
//!   [`ONE_TIME_KEY_TARGET`] signed one-time keys and a signed fallback key; after every
//!   `Welcome` and every pre-key message received it tops them up (and replaces a used fallback
//!   key).
//! - **Direct messages**: every addressed device (the recipient's and my other ones) gets its
//!   own Olm ciphertext. Device lists and identity keys come from the key directory, are
//!   checked against their self-signatures and recorded (a change is reported as
//!   [`Event::KeysChanged`]); a device without a session gets one from a claimed one-time (or
//!   fallback) key. Encryption happens at every delivery attempt, so a `device_mismatch`
//!   simply means: refresh, encrypt again, resend.
//! - **Groups**: one Megolm session per (group, this device). Its key goes to member devices
//!   that lack it as Olm-encrypted `RoomKey`s in direct messages that are not shown (sent
//!   before the group message, so mailbox order delivers the key first); the group message is
//!   one ciphertext addressed to exactly every member device, so the server refuses it when my
//!   view of the members is stale. The session is replaced when a member leaves or is removed
//!   (the server's system message, or devices that disappeared from the set), and after 100
//!   messages or a week. A device that receives the key later decrypts from that point on only.
//! - **Receiving** (`store/e2ee.rs`): decryption runs inside the transaction that stores the
//!   message and advances the ratchet, before the acknowledgement. A failure is stored and
//!   reported ([`Event::DecryptionFailed`]), never a crash; the next message to that device
//!   starts a new Olm session.

use std::collections::{BTreeSet, HashMap};

use tern_crypto::megolm::RotationPolicy;
use tern_crypto::olm::PublicKey;
use tern_proto::ErrorCode;
use tern_proto::content::Content;
use tern_proto::e2ee::olm_payload;
use tern_proto::frames::{self, client_frame};
use tern_proto::http::UserKeys;

use crate::client::{Client, lock};
use crate::connection::Answer;
use crate::error::Error;
use crate::outbox::new_client_msg_id;
use crate::store::crypto::{Claimed, KeyChange, Target};
use crate::store::{OutboxItem, SavedSession};
use crate::types::{Event, KeysChanged};

/// One-time keys a device keeps published.
pub const ONE_TIME_KEY_TARGET: usize = 50;

/// Plaintext bytes kept free under the server's body limit for the encryption overhead (Olm
/// pre-key headers, payload ids, envelope).
pub(crate) const ENCRYPTION_OVERHEAD: usize = 1024;

impl Client {
    /// Creates this device's account if needed and publishes what the server lacks: identity
    /// keys, one-time keys up to the target, a fallback key (a new one if the old was used).
    pub(crate) async fn maintain_keys(&self, session: &SavedSession) -> Result<(), Error> {
        let (u, d) = (session.user_id, session.device_id);
        self.inner
            .store
            .run(move |s| s.ensure_account(u, d))
            .await?;
        let counts = self.inner.http.key_counts(&session.token).await?;
        let upload = self
            .inner
            .store
            .run(move |s| s.keys_to_publish(counts, ONE_TIME_KEY_TARGET))
            .await?;
        if let Some(up) = upload {
            let n = up.one_time_keys.len();
            self.inner.http.publish_keys(&session.token, &up).await?;
            self.inner.store.run(|s| s.mark_keys_published()).await?;
            tracing::debug!(one_time_keys = n, "keys published");
        }
        Ok(())
    }

    /// Records fetched device lists and reports key changes.
    async fn record(&self, lists: Vec<UserKeys>) -> Result<Vec<Target>, Error> {
        let names: HashMap<u64, String> = lists
            .iter()
            .map(|l| (l.user_id, l.username.clone()))
            .collect();
        let (targets, changes) = self
            .inner
            .store
            .run(move |s| s.record_devices(&lists))
            .await?;
        self.report(changes, &names);
        Ok(targets)
    }

    fn report(&self, changes: Vec<KeyChange>, names: &HashMap<u64, String>) {
        for c in changes {
            let username = names.get(&c.user_id).cloned().unwrap_or_default();
            // Apps warn the user (Event::KeysChanged); the log only records it.
            tracing::info!(user_id = c.user_id, %username, was_verified = c.was_verified, "a contact's keys changed");
            let _ = self.inner.events.send(Event::KeysChanged(KeysChanged {
                user_id: c.user_id,
                username,
                was_verified: c.was_verified,
            }));
        }
    }

    /// A user's devices with keys, from the cache or the server.
    async fn user_keys(&self, session: &SavedSession, username: &str) -> Result<UserKeys, Error> {
        let cached = {
            let d = lock(&self.inner.directory);
            d.user_by_name(username)
        };
        if let Some(k) = cached {
            return Ok(k);
        }
        let k = self.inner.http.user_keys(&session.token, username).await?;
        lock(&self.inner.directory).put_user(k.clone());
        Ok(k)
    }

    /// Fetches the device lists of users I know by id only through a batch of events, so that
    /// their messages can be attributed (called by the connection task before storing).
    pub(crate) async fn learn_senders(
        http: &crate::http::Http,
        store: &crate::store::LocalStore,
        token: &str,
        senders: Vec<(u64, String)>,
    ) -> Result<Vec<(KeyChange, String)>, Error> {
        use futures_util::StreamExt as _;
        let mut lists = Vec::new();
        // A few at a time: the batch waits for them before it is stored and acknowledged.
        let mut fetches = futures_util::stream::iter(senders)
            .map(|(user_id, name)| async move { (user_id, http.user_keys(token, &name).await) })
            .buffer_unordered(8);
        while let Some((user_id, r)) = fetches.next().await {
            match r {
                Ok(k) if k.user_id == user_id => lists.push(k),
                Ok(_) => tracing::warn!(user_id, "sender's name now belongs to another user"),
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => tracing::warn!(user_id, error = %e, "sender's keys unavailable"),
            }
        }
        drop(fetches);
        let names: HashMap<u64, String> = lists
            .iter()
            .map(|l| (l.user_id, l.username.clone()))
            .collect();
        let (_, changes) = store.run(move |s| s.record_devices(&lists)).await?;
        Ok(changes
            .into_iter()
            .map(|c| {
                let n = names.get(&c.user_id).cloned().unwrap_or_default();
                (c, n)
            })
            .collect())
    }

    /// Claims one-time keys for the targets that have no session yet.
    async fn claim_for(
        &self,
        session: &SavedSession,
        targets: &[Target],
    ) -> Result<Claimed, Error> {
        let t = targets.to_vec();
        let need = self.inner.store.run(move |s| s.need_sessions(&t)).await?;
        let mut claimed = Claimed::new();
        for chunk in need.chunks(tern_proto::Limits::default().max_key_claims) {
            let r = self.inner.http.claim_keys(&session.token, chunk).await?;
            for d in chunk {
                claimed.asked(*d);
            }
            for k in r.keys {
                if !chunk.contains(&k.device_id) {
                    continue;
                }
                if k.fallback {
                    tracing::debug!(
                        device_id = k.device_id,
                        "no one-time key left: fallback key"
                    );
                }
                claimed.insert(
                    k.device_id,
                    PublicKey {
                        id: k.key.id,
                        key: k.key.key,
                        signature: k.key.signature,
                    },
                );
            }
        }
        Ok(claimed)
    }

    /// The per-device bodies of a direct message.
    pub(crate) async fn encrypt_direct(
        &self,
        session: &SavedSession,
        item: &OutboxItem,
        peer_user: u64,
    ) -> Result<Vec<frames::DeviceBody>, Error> {
        let content = Content::decode_body(&item.body)
            .map_err(|e| Error::Invalid(format!("outbox body: {e}")))?;
        self.ensure_account(session).await?;
        let peer = self.user_keys(session, &item.conv_name).await?;
        if peer.user_id != peer_user {
            return Err(Error::server(
                ErrorCode::NotFound,
                format!("{} is another user now", item.conv_name),
            ));
        }
        let mut lists = vec![peer];
        if peer_user != session.user_id {
            lists.push(self.user_keys(session, &session.username).await?);
        }
        let mut targets = self.record(lists).await?;
        targets.retain(|t| t.device_id != session.device_id);
        let claimed = self.claim_for(session, &targets).await?;
        let (bodies, _) = self
            .inner
            .store
            .run(move |s| {
                s.encrypt_olm(&targets, &claimed, peer_user, |_| {
                    Some(olm_payload::Body::Content(content.clone()))
                })
            })
            .await?;
        Ok(bodies)
    }

    /// A profile opened before its keys were set up (an upgrade) gets them now.
    async fn ensure_account(&self, session: &SavedSession) -> Result<(), Error> {
        let (u, d) = (session.user_id, session.device_id);
        self.inner.store.run(move |s| s.ensure_account(u, d)).await
    }

    /// The shared body and the addressed devices of a group message; shares the session key
    /// with devices that lack it first.
    pub(crate) async fn encrypt_for_group(
        &self,
        session: &SavedSession,
        item: &OutboxItem,
        group_id: u64,
        mut rotate: bool,
    ) -> Result<(Vec<u8>, Vec<frames::DeviceBody>), Error> {
        let content = Content::decode_body(&item.body)
            .map_err(|e| Error::Invalid(format!("outbox body: {e}")))?;
        self.ensure_account(session).await?;
        let cached = lock(&self.inner.directory)
            .group(group_id)
            // Nobody else in a cached list: make sure with a fresh one (an empty `devices` is
            // not checked by the server).
            .filter(|m| {
                m.iter()
                    .any(|u| u.devices.len() > usize::from(u.user_id == session.user_id))
            });
        let members = match cached {
            Some(m) => m,
            None => {
                let k = self.inner.http.group_keys(&session.token, group_id).await?;
                lock(&self.inner.directory).put_group(group_id, k.members.clone());
                k.members
            }
        };
        let mut targets = self.record(members).await?;
        targets.retain(|t| t.device_id != session.device_id);
        // A membership event applied meanwhile may replace the session between these steps:
        // then plan again (a few times at most; it is a race with a rare event).
        let mut attempts = 0;
        let body = loop {
            attempts += 1;
            if attempts > 3 {
                return Err(Error::server(
                    ErrorCode::Unavailable,
                    "the group session keeps changing; retrying later",
                ));
            }
            let t = targets.clone();
            let plan = self
                .inner
                .store
                .run(move |s| s.plan_group(group_id, &t, rotate, RotationPolicy::default()))
                .await?;
            rotate = false;
            if !plan.needy.is_empty()
                && !self
                    .share_room_key(session, group_id, &plan.session_id, &plan.needy, &targets)
                    .await?
            {
                continue;
            }
            let (sid, c) = (plan.session_id.clone(), content.clone());
            if let Some(body) = self
                .inner
                .store
                .run(move |s| s.encrypt_group(group_id, &sid, c))
                .await?
            {
                break body;
            }
        };
        let devices = targets
            .iter()
            .map(|t| frames::DeviceBody {
                device_id: t.device_id,
                body: None,
            })
            .collect();
        Ok((body, devices))
    }

    /// Sends the group session key to `needy` devices: one hidden direct message per member
    /// (addressing all its devices and my other ones, as direct messages must; devices that do
    /// not need the key get an empty filler). Devices without published keys are skipped.
    /// `false` if the session was replaced meanwhile (nothing was sent).
    async fn share_room_key(
        &self,
        session: &SavedSession,
        group_id: u64,
        session_id: &str,
        needy: &[u64],
        targets: &[Target],
    ) -> Result<bool, Error> {
        let sid = session_id.to_owned();
        let Some(room_key) = self
            .inner
            .store
            .run(move |s| s.room_key(group_id, &sid))
            .await?
        else {
            return Ok(false);
        };
        let needy: BTreeSet<u64> = targets
            .iter()
            .filter(|t| t.device.is_some() && needy.contains(&t.device_id))
            .map(|t| t.device_id)
            .collect();
        if needy.is_empty() {
            return Ok(true);
        }
        let with_keys: Vec<Target> = targets
            .iter()
            .filter(|t| needy.contains(&t.device_id))
            .cloned()
            .collect();
        let claimed = self.claim_for(session, &with_keys).await?;
        let mine: Vec<Target> = targets
            .iter()
            .filter(|t| t.user_id == session.user_id)
            .cloned()
            .collect();
        let mut users: Vec<u64> = targets
            .iter()
            .filter(|t| needy.contains(&t.device_id))
            .map(|t| t.user_id)
            .collect();
        users.sort_unstable();
        users.dedup();
        for user in users {
            // The recipient's devices, plus my other devices (for me: those only).
            let mut addressed: Vec<Target> = targets
                .iter()
                .filter(|t| t.user_id == user)
                .cloned()
                .collect();
            if user != session.user_id {
                addressed.extend(mine.iter().cloned());
            }
            let for_key: Vec<u64> = addressed
                .iter()
                .filter(|t| t.user_id == user && needy.contains(&t.device_id))
                .map(|t| t.device_id)
                .collect();
            let (rk, fk, cl) = (room_key.clone(), for_key.clone(), claimed.clone());
            let (bodies, encrypted) = self
                .inner
                .store
                .run(move |s| {
                    s.encrypt_olm(&addressed, &cl, user, |t| {
                        fk.contains(&t.device_id)
                            .then(|| olm_payload::Body::RoomKey(rk.clone()))
                    })
                })
                .await?;
            // Only devices that really got the key count as shared.
            let for_key: Vec<u64> = for_key
                .into_iter()
                .filter(|d| encrypted.contains(d))
                .collect();
            let send = frames::Send {
                client_msg_id: new_client_msg_id(),
                to: Some(frames::Peer::user(user)),
                body: Vec::new(),
                devices: bodies,
            };
            self.send_hidden(send).await?;
            let sid = session_id.to_owned();
            self.inner
                .store
                .run(move |s| s.mark_shared(group_id, &sid, &for_key))
                .await?;
        }
        Ok(true)
    }

    /// Sends a message that is not part of the visible history (a key share) until `Sent`.
    /// A `device_mismatch` is returned to the caller, which refreshes its lists.
    async fn send_hidden(&self, send: frames::Send) -> Result<(), Error> {
        match self
            .request_until_answered(client_frame::Kind::Send(send))
            .await?
        {
            Answer::Sent(_) => Ok(()),
            // Not an answer to a Send: the caller tries again later.
            _ => Err(Error::server(
                ErrorCode::Unavailable,
                "the server answered a key share without Sent",
            )),
        }
    }

    /// The safety number with `username` (60 digits both sides see alike when nobody is in
    /// between), and whether their current keys are marked verified. Fetches their devices
    /// and mine first, so the number is current.
    pub async fn safety_number(&self, username: &str) -> Result<SafetyNumber, Error> {
        let session = self.saved_session()?;
        let name = crate::client::normalize_username(username)?;
        let (u, d) = (session.user_id, session.device_id);
        self.inner
            .store
            .run(move |s| s.ensure_account(u, d))
            .await?;
        {
            let mut dir = lock(&self.inner.directory);
            dir.invalidate(0, session.user_id);
            if let Some(k) = dir.user_by_name(&name) {
                dir.invalidate(k.user_id, session.user_id);
            }
        }
        let theirs = self.user_keys(&session, &name).await?;
        let mine = self.user_keys(&session, &session.username).await?;
        let their_id = theirs.user_id;
        self.record(vec![theirs, mine]).await?;
        let me = session.user_id;
        let (my_keys, their_keys, verified) = self
            .inner
            .store
            .run(move |s| {
                let (mine, _) = s.user_keys(me)?;
                let (theirs, verified) = s.user_keys(their_id)?;
                Ok((mine, theirs, verified))
            })
            .await?;
        if their_keys.is_empty() {
            return Err(Error::Crypto(format!("{name} has no device with keys")));
        }
        let number = tern_crypto::safety::safety_number((me, &my_keys), (their_id, &their_keys));
        Ok(SafetyNumber {
            username: name,
            user_id: their_id,
            number,
            their_devices: their_keys.len(),
            verified,
        })
    }

    /// Marks `username`'s current keys as verified (after comparing safety numbers). A later
    /// change of their keys is reported with `was_verified: true` and clears the mark.
    pub async fn mark_verified(&self, username: &str) -> Result<SafetyNumber, Error> {
        let sn = self.safety_number(username).await?;
        let id = sn.user_id;
        self.inner.store.run(move |s| s.mark_verified(id)).await?;
        Ok(SafetyNumber {
            verified: true,
            ..sn
        })
    }
}

/// What `tern verify` shows.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SafetyNumber {
    pub username: String,
    pub user_id: u64,
    /// 60 digits in twelve groups of five, separated by spaces.
    pub number: String,
    /// How many of their devices the number covers.
    pub their_devices: usize,
    /// Their current keys were marked verified.
    pub verified: bool,
}
