//! Encrypting and decrypting message bodies (PROTOCOL.md §9.1) against the state in
//! `crypto.rs`, each in one transaction with the ratchet state it advances.

use prost::Message as _;
use rusqlite::{Connection, OptionalExtension};
use tern_crypto::megolm::{InboundGroup, OutboundGroup, RotationPolicy};
use tern_crypto::olm::{Account, OlmCiphertext, VerifiedDevice};
use tern_crypto::pickle::PickleKey;
use tern_proto::content::Content;
use tern_proto::e2ee::{
    CURRENT_ENVELOPE_VERSION, Envelope, GroupPayload, MegolmEnvelope, OlmEnvelope, OlmPayload,
    RoomKey, envelope, olm_payload,
};
use tern_proto::frames;

use super::crypto::{self as c, Claimed, InboundOrigin, Target};
use super::{Conv, LocalStore};
use crate::connection::now_ms;
use crate::error::Error;

/// A body for a device I could not encrypt for (it has published no keys, or none could be
/// claimed): an envelope without ciphertext, which its SDK reports as undecryptable. Never
/// plaintext.
pub(crate) fn no_keys_body() -> Vec<u8> {
    Envelope {
        version: CURRENT_ENVELOPE_VERSION,
        kind: None,
    }
    .encode_to_vec()
}

/// What the group send path needs to know before encrypting.
#[derive(Debug)]
pub(crate) struct GroupPlan {
    pub session_id: String,
    /// Devices (among the targets) that do not have the current session key yet.
    pub needy: Vec<u64>,
}

/// What decrypting one received body gave.
#[derive(Debug)]
pub(crate) enum Decrypted {
    /// A message to show: the encoded `Content`.
    Content(Vec<u8>),
    /// Nothing to show (a key share or a filler); remember the seq only.
    Hidden,
    /// Could not be decrypted: why.
    Failed(String),
}

/// Per-batch decryption context: the account is loaded once and saved once if it changed.
pub(crate) struct Decryptor<'k> {
    key: &'k PickleKey,
    account: Option<Account>,
    account_dirty: bool,
    /// A pre-key message used up one of my one-time keys: top up.
    pub one_time_key_used: bool,
}

impl<'k> Decryptor<'k> {
    pub fn new(key: &'k PickleKey) -> Self {
        Decryptor {
            key,
            account: None,
            account_dirty: false,
            one_time_key_used: false,
        }
    }

    fn account(&mut self, conn: &Connection) -> Result<&mut Account, Error> {
        if self.account.is_none() {
            self.account = Some(c::account(conn, self.key)?);
        }
        self.account
            .as_mut()
            .ok_or_else(|| Error::Crypto("no account".into()))
    }

    pub fn finish(self, conn: &Connection) -> Result<(), Error> {
        if self.account_dirty
            && let Some(a) = &self.account
        {
            c::save_account(conn, self.key, a)?;
        }
        Ok(())
    }

    /// Decrypts the body of `m` (a user message in `conv`). Crypto state changes are written
    /// to `conn` (the caller's transaction). A failure of the local store is an error (the
    /// batch is not stored, so not acknowledged, and comes again); anything wrong with the
    /// message itself is [`Decrypted::Failed`].
    pub fn decrypt(
        &mut self,
        conn: &Connection,
        conv: Conv,
        m: &frames::Message,
    ) -> Result<Decrypted, Error> {
        if m.body.is_empty() {
            return Ok(Decrypted::Hidden);
        }
        match self.try_decrypt(conn, conv, m) {
            Ok(d) => Ok(d),
            Err(Error::Store(e)) => Err(Error::Store(e)),
            Err(e) => Ok(Decrypted::Failed(e.to_string())),
        }
    }

    fn try_decrypt(
        &mut self,
        conn: &Connection,
        conv: Conv,
        m: &frames::Message,
    ) -> Result<Decrypted, Error> {
        let env = Envelope::decode(m.body.as_slice())
            .map_err(|_| Error::Crypto("not an encrypted envelope".into()))?;
        if env.version != CURRENT_ENVELOPE_VERSION {
            return Err(Error::Crypto(format!(
                "envelope version {} is not supported",
                env.version
            )));
        }
        match env.kind {
            None => Err(Error::Crypto(
                "the sender had no keys for this device".into(),
            )),
            Some(envelope::Kind::Olm(o)) => self.olm(conn, conv, m, &o),
            Some(envelope::Kind::Megolm(g)) => self.megolm(conn, conv, m, &g),
        }
    }

    fn olm(
        &mut self,
        conn: &Connection,
        conv: Conv,
        m: &frames::Message,
        o: &OlmEnvelope,
    ) -> Result<Decrypted, Error> {
        let sender = c::known_device(conn, m.sender_user, m.sender_device)?
            .ok_or_else(|| Error::Crypto("the sending device's keys are unknown".into()))?;
        if sender.curve25519() != o.sender_key {
            return Err(Error::Crypto(
                "the message names another device's key".into(),
            ));
        }
        let ct = OlmCiphertext {
            message_type: o.message_type,
            body: o.ciphertext.clone(),
        };
        let result = self.olm_decrypt(conn, &sender, &ct);
        let plaintext = match result {
            Ok(p) => p,
            Err(e) => {
                // Recover: the next message to this device starts a new session.
                c::set_wedged(conn, sender.device_id, true)?;
                return Err(e);
            }
        };
        let payload = OlmPayload::decode(plaintext.as_slice())
            .map_err(|_| Error::Crypto("undecodable Olm payload".into()))?;
        let (my_user, my_device) = self.account(conn)?.ids();
        let my_ed = self.account(conn)?.ed25519();
        if payload.sender_user != m.sender_user
            || payload.sender_device != m.sender_device
            || payload.recipient_user != my_user
            || payload.recipient_device != my_device
            || payload.recipient_ed25519 != my_ed
        {
            return Err(Error::Crypto(
                "the message was encrypted for another device or by another sender".into(),
            ));
        }
        match payload.body {
            Some(olm_payload::Body::Content(content)) => {
                // The conversation the server files it under must be the one the sender
                // wrote to: with the recipient, or (a copy of mine) the one I wrote to.
                let Conv::Direct(peer) = conv else {
                    return Err(Error::Crypto("a direct payload in a group".into()));
                };
                let intended = if m.sender_user == my_user {
                    payload.to_user
                } else if payload.to_user == my_user {
                    m.sender_user
                } else {
                    return Err(Error::Crypto("a message to someone else".into()));
                };
                if peer != intended {
                    return Err(Error::Crypto(
                        "the message is filed under another conversation".into(),
                    ));
                }
                Ok(Decrypted::Content(content.encode_body()))
            }
            Some(olm_payload::Body::RoomKey(k)) => {
                let session = InboundGroup::from_key(&k.session_key)?;
                if session.id() != k.session_id {
                    return Err(Error::Crypto("a room key with the wrong session id".into()));
                }
                let origin = InboundOrigin {
                    group_id: k.group_id,
                    sender_user: m.sender_user,
                    sender_device: m.sender_device,
                };
                c::add_inbound_group(conn, self.key, &o.sender_key, origin, session)?;
                Ok(Decrypted::Hidden)
            }
            None => Err(Error::Crypto("an empty Olm payload".into())),
        }
    }

    fn olm_decrypt(
        &mut self,
        conn: &Connection,
        sender: &VerifiedDevice,
        ct: &OlmCiphertext,
    ) -> Result<Vec<u8>, Error> {
        let key = self.key;
        let now = now_ms();
        let sessions = c::olm_sessions(conn, key, &sender.curve25519())?;
        let pre_key_id = ct.pre_key_session_id();
        for mut s in sessions {
            if ct.is_pre_key() && pre_key_id.as_deref() != Some(s.id().as_str()) {
                continue;
            }
            if let Ok(p) = s.decrypt(ct) {
                c::save_olm_session(conn, key, sender, &s, now)?;
                return Ok(p);
            }
        }
        if !ct.is_pre_key() {
            return Err(Error::Crypto("no Olm session decrypts this message".into()));
        }
        // A pre-key message of a session I already made (still kept or not) that the session
        // does not decrypt is a replay or a duplicate: never start that session again (a
        // fallback key would let it).
        if let Some(id) = &pre_key_id
            && c::inbound_created(conn, id)?
        {
            return Err(Error::Crypto("a replayed pre-key message".into()));
        }
        let account = self.account(conn)?;
        let (session, plaintext) = account.inbound_session(sender, ct)?;
        self.account_dirty = true;
        self.one_time_key_used = true;
        c::note_inbound_created(conn, &session.id())?;
        c::save_olm_session(conn, key, sender, &session, now)?;
        // A working session from this device again.
        c::set_wedged(conn, sender.device_id, false)?;
        Ok(plaintext)
    }

    fn megolm(
        &mut self,
        conn: &Connection,
        conv: Conv,
        m: &frames::Message,
        g: &MegolmEnvelope,
    ) -> Result<Decrypted, Error> {
        let Conv::Group(group_id) = conv else {
            return Err(Error::Crypto("a group message outside a group".into()));
        };
        let (mut session, origin) = c::inbound_group(conn, self.key, &g.sender_key, &g.session_id)?
            .ok_or_else(|| {
                Error::Crypto(
                    "the group session key has not arrived (sent before I joined?)".into(),
                )
            })?;
        if origin.group_id != group_id
            || origin.sender_user != m.sender_user
            || origin.sender_device != m.sender_device
        {
            return Err(Error::Crypto(
                "the group session belongs to another group or sender".into(),
            ));
        }
        let out = session.decrypt(&g.ciphertext)?;
        if !c::note_megolm_index(conn, &g.session_id, out.index, group_id, m.seq)? {
            return Err(Error::Crypto(format!(
                "replayed group message (index {} seen before)",
                out.index
            )));
        }
        c::save_inbound_group(conn, self.key, &g.sender_key, &session)?;
        let payload = GroupPayload::decode(out.plaintext.as_slice())
            .map_err(|_| Error::Crypto("undecodable group payload".into()))?;
        if payload.group_id != group_id
            || payload.sender_user != m.sender_user
            || payload.sender_device != m.sender_device
        {
            return Err(Error::Crypto(
                "the group message names another group or sender".into(),
            ));
        }
        let content = payload
            .content
            .ok_or_else(|| Error::Crypto("a group message without content".into()))?;
        Ok(Decrypted::Content(content.encode_body()))
    }
}

impl LocalStore {
    /// Records device lists fetched from the server; returns the targets and any key changes.
    pub fn record_devices(
        &self,
        lists: &[tern_proto::http::UserKeys],
    ) -> Result<(Vec<Target>, Vec<c::KeyChange>), Error> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let mut targets = Vec::new();
        let mut changes = Vec::new();
        for l in lists {
            super::upsert_peer(&tx, l.user_id, &l.username)?;
            let (t, change) = c::record_devices(&tx, l.user_id, &l.devices)?;
            targets.extend(t);
            changes.extend(change);
        }
        tx.commit()?;
        Ok((targets, changes))
    }

    /// The devices among `targets` that need a one-time key claimed before encrypting.
    pub fn need_sessions(&self, targets: &[Target]) -> Result<Vec<u64>, Error> {
        let conn = self.lock();
        c::need_sessions(&conn, &self.key, targets)
    }

    /// Encrypts one Olm payload per target (`body(target)`; `None` gives an empty filler
    /// body), creating sessions from `claimed` keys where needed; all session state is saved in
    /// one transaction before the bodies are returned, with the devices that got a ciphertext
    /// (the others got a filler or, having no keys, an envelope without ciphertext).
    pub fn encrypt_olm(
        &self,
        targets: &[Target],
        claimed: &Claimed,
        to_user: u64,
        body: impl Fn(&Target) -> Option<olm_payload::Body>,
    ) -> Result<(Vec<frames::DeviceBody>, Vec<u64>), Error> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let account = c::account(&tx, &self.key)?;
        let (my_user, my_device) = account.ids();
        let my_curve = account.curve25519();
        let now = now_ms();
        let mut out = Vec::with_capacity(targets.len());
        let mut encrypted = Vec::new();
        for t in targets {
            let Some(inner) = body(t) else {
                out.push(frames::DeviceBody {
                    device_id: t.device_id,
                    body: Some(Vec::new()),
                });
                continue;
            };
            let session = match &t.device {
                None => None,
                Some(d) => match c::outbound_olm(&tx, &self.key, d)? {
                    Some(s) => Some((d, s)),
                    // The session went away since the caller looked (a decryption failure
                    // asked for a new one): claim a key and encrypt again.
                    None if !claimed.was_asked(t.device_id) => {
                        return Err(Error::server(
                            tern_proto::ErrorCode::Unavailable,
                            "a session to renew; retrying",
                        ));
                    }
                    None => match claimed.get(t.device_id) {
                        Some(k) => match account.outbound_session(d, k) {
                            Ok(s) => {
                                c::set_wedged(&tx, d.device_id, false)?;
                                Some((d, s))
                            }
                            Err(e) => {
                                tracing::warn!(device_id = t.device_id, error = %e, "claimed key refused");
                                None
                            }
                        },
                        None => None,
                    },
                },
            };
            let Some((d, mut session)) = session else {
                tracing::warn!(
                    user_id = t.user_id,
                    device_id = t.device_id,
                    "no keys to encrypt for this device"
                );
                out.push(frames::DeviceBody {
                    device_id: t.device_id,
                    body: Some(no_keys_body()),
                });
                continue;
            };
            let payload = OlmPayload {
                sender_user: my_user,
                sender_device: my_device,
                recipient_user: t.user_id,
                recipient_device: t.device_id,
                recipient_ed25519: d.ed25519(),
                to_user,
                body: Some(inner),
            };
            let ct = session.encrypt(&payload.encode_to_vec())?;
            c::save_olm_session(&tx, &self.key, d, &session, now)?;
            let env = Envelope {
                version: CURRENT_ENVELOPE_VERSION,
                kind: Some(envelope::Kind::Olm(OlmEnvelope {
                    sender_key: my_curve.clone(),
                    message_type: ct.message_type,
                    ciphertext: ct.body,
                })),
            };
            out.push(frames::DeviceBody {
                device_id: t.device_id,
                body: Some(env.encode_to_vec()),
            });
            encrypted.push(t.device_id);
        }
        tx.commit()?;
        Ok((out, encrypted))
    }

    /// My outbound session for a group, rotated if the policy or `rotate` says so; and which
    /// of `targets` still need its key.
    pub fn plan_group(
        &self,
        group_id: u64,
        targets: &[Target],
        rotate: bool,
        policy: RotationPolicy,
    ) -> Result<GroupPlan, Error> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let now = now_ms();
        let current = c::outbound_group(&tx, &self.key, group_id)?;
        // A device that has the key but is not a target any more (removed, or its user left)
        // must not read what comes next.
        let departed = match &current {
            Some(s) => c::shared_with(&tx, group_id, &s.id())?
                .iter()
                .any(|d| !targets.iter().any(|t| t.device_id == *d)),
            None => false,
        };
        let session = match current {
            Some(s) if !rotate && !departed && !s.must_rotate(now, policy) => s,
            _ => {
                c::discard_outbound_group(&tx, group_id)?;
                let s = OutboundGroup::new(now);
                c::save_outbound_group(&tx, &self.key, group_id, &s)?;
                s
            }
        };
        let session_id = session.id();
        let shared = c::shared_with(&tx, group_id, &session_id)?;
        let needy = targets
            .iter()
            .filter(|t| !shared.contains(&t.device_id))
            .map(|t| t.device_id)
            .collect();
        tx.commit()?;
        Ok(GroupPlan { session_id, needy })
    }

    /// The key of my current outbound session for a group, as a room key to share; `None` if
    /// that session has just been replaced (a member left meanwhile).
    pub fn room_key(&self, group_id: u64, session_id: &str) -> Result<Option<RoomKey>, Error> {
        let conn = self.lock();
        let s = c::outbound_group(&conn, &self.key, group_id)?.filter(|s| s.id() == session_id);
        Ok(s.map(|s| RoomKey {
            group_id,
            session_id: s.id(),
            session_key: s.session_key(),
        }))
    }

    pub fn mark_shared(
        &self,
        group_id: u64,
        session_id: &str,
        devices: &[u64],
    ) -> Result<(), Error> {
        let conn = self.lock();
        c::mark_shared(&conn, group_id, session_id, devices)
    }

    /// Encrypts a group message with the current outbound session, which must be
    /// `session_id` (the one whose key was shared); `None` if it has just been replaced.
    pub fn encrypt_group(
        &self,
        group_id: u64,
        session_id: &str,
        content: Content,
    ) -> Result<Option<Vec<u8>>, Error> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let account = c::account(&tx, &self.key)?;
        let (me, my_device) = account.ids();
        let Some(mut s) =
            c::outbound_group(&tx, &self.key, group_id)?.filter(|s| s.id() == session_id)
        else {
            return Ok(None);
        };
        let payload = GroupPayload {
            group_id,
            sender_user: me,
            sender_device: my_device,
            content: Some(content),
        };
        let ciphertext = s.encrypt(&payload.encode_to_vec());
        c::save_outbound_group(&tx, &self.key, group_id, &s)?;
        tx.commit()?;
        Ok(Some(
            Envelope {
                version: CURRENT_ENVELOPE_VERSION,
                kind: Some(envelope::Kind::Megolm(MegolmEnvelope {
                    sender_key: account.curve25519(),
                    session_id: s.id(),
                    ciphertext,
                })),
            }
            .encode_to_vec(),
        ))
    }

    // ---- the account and its published keys ----------------------------------------------

    /// Creates this device's account if there is none (or it belongs to another device).
    /// Called before every send: reads the ids only (no unpickling, no write) when the
    /// account is there.
    pub fn ensure_account(&self, user_id: u64, device_id: u64) -> Result<(), Error> {
        let mut conn = self.lock();
        let ids: Option<(u64, u64)> = conn
            .query_row(
                "SELECT user_id, device_id FROM crypto_account WHERE id = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        if ids == Some((user_id, device_id)) {
            return Ok(());
        }
        let tx = conn.transaction()?;
        {
            // A new device: everything keyed to the old one goes.
            tx.execute_batch(
                "DELETE FROM olm_sessions; DELETE FROM olm_wedged; DELETE FROM megolm_outbound;
                 DELETE FROM megolm_shared; DELETE FROM megolm_inbound; DELETE FROM megolm_seen;
                 DELETE FROM olm_inbound_created; DELETE FROM crypto_meta WHERE key = 'published';",
            )?;
            c::save_account(&tx, &self.key, &Account::new(user_id, device_id))?;
        }
        tx.commit()?;
        Ok(())
    }

    /// What to publish so that the server holds `target` one-time keys and a fresh fallback
    /// key; the account is saved with any keys generated (before they are uploaded).
    pub fn keys_to_publish(
        &self,
        counts: tern_proto::http::KeyCounts,
        target: usize,
    ) -> Result<Option<tern_proto::http::KeysUpload>, Error> {
        use tern_proto::http::{IdentityKeys, KeysUpload, SignedKey};
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let mut account = c::account(&tx, &self.key)?;
        let published = c::meta_blob(&tx, "published")?.is_some();
        let unclaimed = usize::try_from(counts.one_time_keys).unwrap_or(usize::MAX);
        let otks = account.one_time_keys_to_publish(unclaimed, target);
        let fallback = if counts.fallback_key_used || !published {
            account.rotate_fallback_key()
        } else {
            account.unpublished_fallback_key()
        };
        c::save_account(&tx, &self.key, &account)?;
        tx.commit()?;
        if published && otks.is_empty() && fallback.is_none() {
            return Ok(None);
        }
        let wire = |k: tern_crypto::olm::PublicKey| SignedKey {
            id: k.id,
            key: k.key,
            signature: k.signature,
        };
        let id = account.public_identity();
        Ok(Some(KeysUpload {
            identity: Some(IdentityKeys {
                curve25519: id.curve25519,
                ed25519: id.ed25519,
                signature: id.signature,
            }),
            one_time_keys: otks.into_iter().map(wire).collect(),
            fallback_key: fallback.map(wire),
        }))
    }

    /// The upload went through: those keys are the server's now.
    pub fn mark_keys_published(&self) -> Result<(), Error> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let mut account = c::account(&tx, &self.key)?;
        account.mark_published();
        c::save_account(&tx, &self.key, &account)?;
        c::set_meta_blob(&tx, "published", &[1])?;
        tx.commit()?;
        Ok(())
    }

    pub fn user_keys(&self, user_id: u64) -> Result<(Vec<String>, bool), Error> {
        let conn = self.lock();
        c::user_keys(&conn, user_id)
    }

    pub fn mark_verified(&self, user_id: u64) -> Result<bool, Error> {
        let conn = self.lock();
        c::mark_verified(&conn, user_id)
    }

    /// Of the (user id, device id, username) senders of a batch, those whose device keys I
    /// do not have: (user id, username), once per user.
    pub fn unknown_senders(
        &self,
        senders: &[(u64, u64, String)],
    ) -> Result<Vec<(u64, String)>, Error> {
        let conn = self.lock();
        let mut out: Vec<(u64, String)> = Vec::new();
        for (user, device, name) in senders {
            if out.iter().any(|(u, _)| u == user) {
                continue;
            }
            if c::known_device(&conn, *user, *device)?.is_none() {
                out.push((*user, name.clone()));
            }
        }
        Ok(out)
    }
}

/// The senders of the encrypted user messages of a batch: (user id, device id, username),
/// without repeats (the bodies stay where they are).
pub(crate) fn senders(batch: &[frames::Event]) -> Vec<(u64, u64, String)> {
    let mut out: Vec<(u64, u64, String)> = Vec::new();
    for ev in batch {
        let Some(frames::event::Kind::Message(m)) = &ev.kind else {
            continue;
        };
        if m.kind == frames::MessageKind::System as i32 || m.body.is_empty() {
            continue;
        }
        if !out
            .iter()
            .any(|(u, d, _)| *u == m.sender_user && *d == m.sender_device)
        {
            out.push((m.sender_user, m.sender_device, m.sender_username.clone()));
        }
    }
    out
}
