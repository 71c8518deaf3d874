//! End-to-end encryption state (PROTOCOL.md §9), next to the history it protects so that a
//! decrypted message and the ratchet step that decrypted it are committed together.
//!
//! Secrets (the Olm account, Olm and Megolm sessions) are vodozemac pickles encrypted with the
//! profile's [`PickleKey`]; identity keys of other devices are public and stored as they were
//! verified. Everything here is synchronous and runs inside the caller's transaction.

use std::collections::HashMap;

use rusqlite::{Connection, OptionalExtension, params};
use tern_crypto::CryptoError;
use tern_crypto::megolm::{InboundGroup, OutboundGroup};
use tern_crypto::olm::{Account, PublicIdentity, Session, VerifiedDevice};
use tern_crypto::pickle::PickleKey;
use tern_proto::http::DeviceKeys;

use crate::error::Error;

impl From<CryptoError> for Error {
    fn from(e: CryptoError) -> Self {
        Error::Crypto(e.to_string())
    }
}

// ---- account -------------------------------------------------------------------------------

pub(crate) fn load_account(c: &Connection, key: &PickleKey) -> Result<Option<Account>, Error> {
    let row: Option<(u64, u64, String)> = c
        .query_row(
            "SELECT user_id, device_id, pickle FROM crypto_account WHERE id = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    match row {
        None => Ok(None),
        Some((user, device, pickle)) => Ok(Some(Account::unpickle(&pickle, key, user, device)?)),
    }
}

pub(crate) fn save_account(c: &Connection, key: &PickleKey, a: &Account) -> Result<(), Error> {
    let (user, device) = a.ids();
    c.execute(
        "INSERT OR REPLACE INTO crypto_account (id, user_id, device_id, pickle)
         VALUES (1, ?1, ?2, ?3)",
        params![user, device, a.pickle(key)],
    )?;
    Ok(())
}

/// The account of this device, or an error if there is none (keys not set up yet).
pub(crate) fn account(c: &Connection, key: &PickleKey) -> Result<Account, Error> {
    load_account(c, key)?.ok_or_else(|| Error::Crypto("no device keys yet".into()))
}

pub(crate) fn meta_blob(c: &Connection, name: &str) -> Result<Option<Vec<u8>>, Error> {
    Ok(c.query_row(
        "SELECT value FROM crypto_meta WHERE key = ?1",
        [name],
        |r| r.get(0),
    )
    .optional()?)
}

pub(crate) fn set_meta_blob(c: &Connection, name: &str, value: &[u8]) -> Result<(), Error> {
    c.execute(
        "INSERT OR REPLACE INTO crypto_meta (key, value) VALUES (?1, ?2)",
        params![name, value],
    )?;
    Ok(())
}

// ---- identity keys of other devices --------------------------------------------------------

/// A user's keys changed since I last saw them (a device added, removed or replaced).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyChange {
    pub user_id: u64,
    /// The user had been verified with the old keys (and is not any more).
    pub was_verified: bool,
}

/// A device as the sending code needs it: its ids and, if it published valid keys, its
/// verified identity.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    pub user_id: u64,
    pub device_id: u64,
    pub device: Option<VerifiedDevice>,
}

fn key_set(devices: &[VerifiedDevice]) -> String {
    let mut keys: Vec<String> = devices
        .iter()
        .map(|d| format!("{}:{}", d.device_id, d.ed25519()))
        .collect();
    keys.sort();
    keys.join(",")
}

/// Records the device list the server gave for `user_id`: checks every self-signature (a
/// device whose keys do not verify is treated as having none), replaces the stored list, and
/// reports a change of keys against what was seen before (the first sight is trusted).
pub(crate) fn record_devices(
    c: &Connection,
    user_id: u64,
    devices: &[DeviceKeys],
) -> Result<(Vec<Target>, Option<KeyChange>), Error> {
    let mut targets = Vec::with_capacity(devices.len());
    let mut verified = Vec::new();
    for d in devices {
        let device = d.identity.as_ref().and_then(|i| {
            let p = PublicIdentity {
                curve25519: i.curve25519.clone(),
                ed25519: i.ed25519.clone(),
                signature: i.signature.clone(),
            };
            match VerifiedDevice::verify(user_id, d.device_id, &p) {
                Ok(v) => Some(v),
                Err(e) => {
                    tracing::warn!(user_id, device_id = d.device_id, error = %e, "device keys refused");
                    None
                }
            }
        });
        if let Some(v) = &device {
            verified.push(v.clone());
        }
        targets.push(Target {
            user_id,
            device_id: d.device_id,
            device,
        });
    }
    let now = key_set(&verified);
    let before: Option<(String, Option<String>)> = c
        .query_row(
            "SELECT seen_keys, verified_keys FROM key_trust WHERE user_id = ?1",
            [user_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let change = match &before {
        Some((seen, v)) if *seen != now => Some(KeyChange {
            user_id,
            was_verified: v.as_deref() == Some(seen.as_str()),
        }),
        _ => None,
    };
    if before.as_ref().map(|b| &b.0) != Some(&now) {
        c.execute(
            "INSERT INTO key_trust (user_id, seen_keys) VALUES (?1, ?2)
             ON CONFLICT (user_id) DO UPDATE SET seen_keys = excluded.seen_keys",
            params![user_id, now],
        )?;
        // Devices no longer listed stay known for decryption only.
        c.execute(
            "UPDATE device_keys SET current = 0 WHERE user_id = ?1",
            [user_id],
        )?;
        let mut upsert = c.prepare_cached(
            "INSERT INTO device_keys (user_id, device_id, curve25519, ed25519, signature, current)
             VALUES (?1, ?2, ?3, ?4, ?5, 1)
             ON CONFLICT (user_id, device_id) DO UPDATE SET curve25519 = excluded.curve25519,
                 ed25519 = excluded.ed25519, signature = excluded.signature, current = 1",
        )?;
        for d in devices {
            if let Some(i) = &d.identity
                && verified.iter().any(|v| v.device_id == d.device_id)
            {
                upsert.execute(params![
                    user_id,
                    d.device_id,
                    i.curve25519,
                    i.ed25519,
                    i.signature
                ])?;
            }
        }
    }
    Ok((targets, change))
}

/// A device's verified identity as last recorded (also for a device since removed).
pub(crate) fn known_device(
    c: &Connection,
    user_id: u64,
    device_id: u64,
) -> Result<Option<VerifiedDevice>, Error> {
    let row: Option<(String, String, String)> = c
        .prepare_cached(
            "SELECT curve25519, ed25519, signature FROM device_keys
             WHERE user_id = ?1 AND device_id = ?2",
        )?
        .query_row(params![user_id, device_id], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()?;
    let Some((curve25519, ed25519, signature)) = row else {
        return Ok(None);
    };
    let p = PublicIdentity {
        curve25519,
        ed25519,
        signature,
    };
    Ok(VerifiedDevice::verify(user_id, device_id, &p).ok())
}

/// The Ed25519 keys of a user's devices as last recorded, and whether they are verified.
pub(crate) fn user_keys(c: &Connection, user_id: u64) -> Result<(Vec<String>, bool), Error> {
    let mut stmt = c.prepare(
        "SELECT ed25519 FROM device_keys WHERE user_id = ?1 AND current = 1 ORDER BY device_id",
    )?;
    let keys = stmt
        .query_map([user_id], |r| r.get(0))?
        .collect::<Result<Vec<String>, _>>()?;
    let verified: bool = c
        .query_row(
            "SELECT verified_keys IS NOT NULL AND verified_keys = seen_keys
             FROM key_trust WHERE user_id = ?1",
            [user_id],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(false);
    Ok((keys, verified))
}

/// Marks the user's current keys as verified (compared out of band).
pub(crate) fn mark_verified(c: &Connection, user_id: u64) -> Result<bool, Error> {
    let n = c.execute(
        "UPDATE key_trust SET verified_keys = seen_keys WHERE user_id = ?1",
        [user_id],
    )?;
    Ok(n > 0)
}

// ---- Olm sessions --------------------------------------------------------------------------

/// Sessions with the device that owns `sender_key`, most recently used first.
pub(crate) fn olm_sessions(
    c: &Connection,
    key: &PickleKey,
    sender_key: &str,
) -> Result<Vec<Session>, Error> {
    let mut stmt = c.prepare_cached(
        "SELECT pickle FROM olm_sessions WHERE sender_key = ?1 ORDER BY last_used_ms DESC, rowid DESC",
    )?;
    let pickles = stmt
        .query_map([sender_key], |r| r.get::<_, String>(0))?
        .collect::<Result<Vec<_>, _>>()?;
    let mut out = Vec::with_capacity(pickles.len());
    for p in pickles {
        match Session::unpickle(&p, key) {
            Ok(s) => out.push(s),
            Err(e) => tracing::warn!(error = %e, "unreadable Olm session skipped"),
        }
    }
    Ok(out)
}

pub(crate) fn save_olm_session(
    c: &Connection,
    key: &PickleKey,
    device: &VerifiedDevice,
    s: &Session,
    now_ms: i64,
) -> Result<(), Error> {
    c.prepare_cached(
        "INSERT OR REPLACE INTO olm_sessions
             (session_id, user_id, device_id, sender_key, pickle, last_used_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        s.id(),
        device.user_id,
        device.device_id,
        device.curve25519(),
        s.pickle(key),
        now_ms
    ])?;
    // Bounded: the sessions used least recently with this device go.
    c.prepare_cached(
        "DELETE FROM olm_sessions WHERE sender_key = ?1 AND session_id NOT IN (
             SELECT session_id FROM olm_sessions WHERE sender_key = ?1
             ORDER BY last_used_ms DESC, rowid DESC LIMIT ?2)",
    )?
    .execute(params![device.curve25519(), MAX_OLM_SESSIONS_PER_DEVICE])?;
    Ok(())
}

/// Olm sessions kept per peer device (new ones come from decryption failures and races).
const MAX_OLM_SESSIONS_PER_DEVICE: i64 = 8;

/// The session to encrypt for `device` with, unless a decryption failure asked for a new one.
pub(crate) fn outbound_olm(
    c: &Connection,
    key: &PickleKey,
    device: &VerifiedDevice,
) -> Result<Option<Session>, Error> {
    let wedged: bool = c
        .prepare_cached("SELECT 1 FROM olm_wedged WHERE device_id = ?1")?
        .query_row([device.device_id], |_| Ok(true))
        .optional()?
        .unwrap_or(false);
    if wedged {
        return Ok(None);
    }
    Ok(olm_sessions(c, key, &device.curve25519())?
        .into_iter()
        .next())
}

pub(crate) fn inbound_created(c: &Connection, session_id: &str) -> Result<bool, Error> {
    Ok(
        c.prepare_cached("SELECT 1 FROM olm_inbound_created WHERE session_id = ?1")?
            .query_row([session_id], |_| Ok(true))
            .optional()?
            .unwrap_or(false),
    )
}

pub(crate) fn note_inbound_created(c: &Connection, session_id: &str) -> Result<(), Error> {
    c.prepare_cached("INSERT OR IGNORE INTO olm_inbound_created (session_id) VALUES (?1)")?
        .execute([session_id])?;
    Ok(())
}

pub(crate) fn set_wedged(c: &Connection, device_id: u64, wedged: bool) -> Result<(), Error> {
    if wedged {
        c.execute(
            "INSERT OR IGNORE INTO olm_wedged (device_id) VALUES (?1)",
            [device_id],
        )?;
    } else {
        c.execute("DELETE FROM olm_wedged WHERE device_id = ?1", [device_id])?;
    }
    Ok(())
}

// ---- Megolm --------------------------------------------------------------------------------

pub(crate) fn outbound_group(
    c: &Connection,
    key: &PickleKey,
    group_id: u64,
) -> Result<Option<OutboundGroup>, Error> {
    let row: Option<(String, i64)> = c
        .query_row(
            "SELECT pickle, created_ms FROM megolm_outbound WHERE group_id = ?1",
            [group_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    match row {
        None => Ok(None),
        Some((p, created)) => Ok(Some(OutboundGroup::unpickle(&p, key, created)?)),
    }
}

pub(crate) fn save_outbound_group(
    c: &Connection,
    key: &PickleKey,
    group_id: u64,
    s: &OutboundGroup,
) -> Result<(), Error> {
    c.execute(
        "INSERT OR REPLACE INTO megolm_outbound (group_id, session_id, pickle, created_ms)
         VALUES (?1, ?2, ?3, ?4)",
        params![group_id, s.id(), s.pickle(key), s.created_at_ms()],
    )?;
    Ok(())
}

/// Forgets my outbound session for a group: the next message starts a new one, shared only
/// with the members of that moment.
pub(crate) fn discard_outbound_group(c: &Connection, group_id: u64) -> Result<(), Error> {
    c.execute(
        "DELETE FROM megolm_outbound WHERE group_id = ?1",
        [group_id],
    )?;
    c.execute("DELETE FROM megolm_shared WHERE group_id = ?1", [group_id])?;
    Ok(())
}

pub(crate) fn shared_with(
    c: &Connection,
    group_id: u64,
    session_id: &str,
) -> Result<Vec<u64>, Error> {
    let mut stmt = c.prepare_cached(
        "SELECT device_id FROM megolm_shared WHERE group_id = ?1 AND session_id = ?2",
    )?;
    let ids = stmt
        .query_map(params![group_id, session_id], |r| r.get(0))?
        .collect::<Result<Vec<u64>, _>>()?;
    Ok(ids)
}

pub(crate) fn mark_shared(
    c: &Connection,
    group_id: u64,
    session_id: &str,
    devices: &[u64],
) -> Result<(), Error> {
    let mut stmt = c.prepare_cached(
        "INSERT OR IGNORE INTO megolm_shared (group_id, session_id, device_id) VALUES (?1, ?2, ?3)",
    )?;
    for d in devices {
        stmt.execute(params![group_id, session_id, d])?;
    }
    Ok(())
}

/// Where an inbound session came from: the group and device it was shared for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InboundOrigin {
    pub group_id: u64,
    pub sender_user: u64,
    pub sender_device: u64,
}

pub(crate) fn inbound_group(
    c: &Connection,
    key: &PickleKey,
    sender_key: &str,
    session_id: &str,
) -> Result<Option<(InboundGroup, InboundOrigin)>, Error> {
    let row: Option<(String, InboundOrigin)> = c
        .prepare_cached(
            "SELECT pickle, group_id, sender_user, sender_device FROM megolm_inbound
             WHERE sender_key = ?1 AND session_id = ?2",
        )?
        .query_row(params![sender_key, session_id], |r| {
            Ok((
                r.get(0)?,
                InboundOrigin {
                    group_id: r.get(1)?,
                    sender_user: r.get(2)?,
                    sender_device: r.get(3)?,
                },
            ))
        })
        .optional()?;
    match row {
        None => Ok(None),
        Some((p, origin)) => Ok(Some((InboundGroup::unpickle(&p, key)?, origin))),
    }
}

/// Stores a session key received over Olm; a copy known from an earlier index wins.
pub(crate) fn add_inbound_group(
    c: &Connection,
    key: &PickleKey,
    sender_key: &str,
    origin: InboundOrigin,
    session: InboundGroup,
) -> Result<(), Error> {
    let session_id = session.id();
    let merged = match inbound_group(c, key, sender_key, &session_id)? {
        Some((mut old, old_origin)) => {
            if old_origin != origin {
                return Err(Error::Crypto(
                    "a group session key was re-shared for another group or sender".into(),
                ));
            }
            old.merge(session);
            old
        }
        None => session,
    };
    c.prepare_cached(
        "INSERT OR REPLACE INTO megolm_inbound
             (sender_key, session_id, group_id, sender_user, sender_device, pickle)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        sender_key,
        session_id,
        origin.group_id,
        origin.sender_user,
        origin.sender_device,
        merged.pickle(key)
    ])?;
    Ok(())
}

pub(crate) fn save_inbound_group(
    c: &Connection,
    key: &PickleKey,
    sender_key: &str,
    session: &InboundGroup,
) -> Result<(), Error> {
    c.prepare_cached(
        "UPDATE megolm_inbound SET pickle = ?3 WHERE sender_key = ?1 AND session_id = ?2",
    )?
    .execute(params![sender_key, session.id(), session.pickle(key)])?;
    Ok(())
}

/// Records that `index` of a session was decrypted as (group, seq); false if it was already
/// decrypted under another seq (a replay).
pub(crate) fn note_megolm_index(
    c: &Connection,
    session_id: &str,
    index: u32,
    group_id: u64,
    seq: u64,
) -> Result<bool, Error> {
    let seen: Option<(u64, u64)> = c
        .prepare_cached("SELECT conv_id, seq FROM megolm_seen WHERE session_id = ?1 AND idx = ?2")?
        .query_row(params![session_id, index], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    if let Some(s) = seen {
        return Ok(s == (group_id, seq));
    }
    c.prepare_cached(
        "INSERT INTO megolm_seen (session_id, idx, conv_id, seq) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![session_id, index, group_id, seq])?;
    Ok(true)
}

/// Which of `targets` have no usable Olm session yet (and published keys to make one).
pub(crate) fn need_sessions(
    c: &Connection,
    key: &PickleKey,
    targets: &[Target],
) -> Result<Vec<u64>, Error> {
    let mut out = Vec::new();
    for t in targets {
        if let Some(d) = &t.device
            && outbound_olm(c, key, d)?.is_none()
        {
            out.push(t.device_id);
        }
    }
    Ok(out)
}

/// Keys claimed for devices without a session, and which devices were asked for (a device
/// asked for that got no key has none left to give).
#[derive(Debug, Clone, Default)]
pub(crate) struct Claimed {
    keys: HashMap<u64, tern_crypto::olm::PublicKey>,
    asked: std::collections::HashSet<u64>,
}

impl Claimed {
    pub fn new() -> Claimed {
        Claimed::default()
    }

    pub fn asked(&mut self, device_id: u64) {
        self.asked.insert(device_id);
    }

    pub fn insert(&mut self, device_id: u64, key: tern_crypto::olm::PublicKey) {
        self.asked.insert(device_id);
        self.keys.insert(device_id, key);
    }

    pub fn get(&self, device_id: u64) -> Option<&tern_crypto::olm::PublicKey> {
        self.keys.get(&device_id)
    }

    pub fn was_asked(&self, device_id: u64) -> bool {
        self.asked.contains(&device_id)
    }
}
