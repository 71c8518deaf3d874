//! Megolm group sessions: one outbound session per (group, sending device), whose key is sent
//! to every member device over Olm; a group message is encrypted once and fanned out by the
//! server. Sessions rotate after a bounded number of messages or time, and whenever the set of
//! recipients shrinks (the SDK decides that; [`RotationPolicy`] covers count and age).
//!
//! A session key is shared at the session's *current* index, so a member who receives it can
//! decrypt from there on, never what was sent before.

use vodozemac::megolm::{
    GroupSession, GroupSessionPickle, InboundGroupSession, InboundGroupSessionPickle,
    MegolmMessage, SessionConfig, SessionKey,
};

use crate::CryptoError;
use crate::pickle::PickleKey;

/// When an outbound session must be replaced regardless of membership.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotationPolicy {
    pub max_messages: u32,
    pub max_age_ms: i64,
}

impl Default for RotationPolicy {
    /// 100 messages or a week, like Matrix clients' defaults.
    fn default() -> Self {
        RotationPolicy {
            max_messages: 100,
            max_age_ms: 7 * 24 * 3_600_000,
        }
    }
}

pub struct OutboundGroup {
    inner: GroupSession,
    created_at_ms: i64,
}

impl std::fmt::Debug for OutboundGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OutboundGroup({}, index {})", self.id(), self.index())
    }
}

impl OutboundGroup {
    pub fn new(now_ms: i64) -> OutboundGroup {
        OutboundGroup {
            inner: GroupSession::new(SessionConfig::version_1()),
            created_at_ms: now_ms,
        }
    }

    pub fn id(&self) -> String {
        self.inner.session_id()
    }

    /// The index of the next message.
    pub fn index(&self) -> u32 {
        self.inner.message_index()
    }

    pub fn created_at_ms(&self) -> i64 {
        self.created_at_ms
    }

    /// The key to share with recipients, valid from the next message on.
    pub fn session_key(&self) -> Vec<u8> {
        self.inner.session_key().to_bytes()
    }

    pub fn must_rotate(&self, now_ms: i64, policy: RotationPolicy) -> bool {
        self.index() >= policy.max_messages
            || now_ms.saturating_sub(self.created_at_ms) >= policy.max_age_ms
    }

    pub fn encrypt(&mut self, plaintext: &[u8]) -> Vec<u8> {
        self.inner.encrypt(plaintext).to_bytes()
    }

    pub fn pickle(&self, key: &PickleKey) -> String {
        self.inner.pickle().encrypt(key.as_bytes())
    }

    pub fn unpickle(text: &str, key: &PickleKey, created_at_ms: i64) -> Result<Self, CryptoError> {
        let p = GroupSessionPickle::from_encrypted(text, key.as_bytes())
            .map_err(|_| CryptoError::Unpickle("group session"))?;
        Ok(OutboundGroup {
            inner: GroupSession::from_pickle(p),
            created_at_ms,
        })
    }
}

/// The receiving side of one sender device's group session.
pub struct InboundGroup {
    inner: InboundGroupSession,
}

impl std::fmt::Debug for InboundGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "InboundGroup({}, from {})",
            self.id(),
            self.first_known_index()
        )
    }
}

/// A decrypted group message and its index in the session (for replay detection).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPlaintext {
    pub plaintext: Vec<u8>,
    pub index: u32,
}

impl InboundGroup {
    /// From a session key received over Olm (signed by the session's own Ed25519 key, which
    /// vodozemac checks on every message).
    pub fn from_key(session_key: &[u8]) -> Result<InboundGroup, CryptoError> {
        let key = SessionKey::from_bytes(session_key)
            .map_err(|_| CryptoError::Malformed("Megolm session key"))?;
        Ok(InboundGroup {
            inner: InboundGroupSession::new(&key, SessionConfig::version_1()),
        })
    }

    pub fn id(&self) -> String {
        self.inner.session_id()
    }

    pub fn first_known_index(&self) -> u32 {
        self.inner.first_known_index()
    }

    pub fn decrypt(&mut self, message: &[u8]) -> Result<GroupPlaintext, CryptoError> {
        let m = MegolmMessage::from_bytes(message)
            .map_err(|_| CryptoError::Malformed("Megolm message"))?;
        match self.inner.decrypt(&m) {
            Ok(d) => Ok(GroupPlaintext {
                plaintext: d.plaintext,
                index: d.message_index,
            }),
            Err(vodozemac::megolm::DecryptionError::UnknownMessageIndex(first_known, index)) => {
                Err(CryptoError::UnknownMessageIndex { index, first_known })
            }
            Err(e) => Err(CryptoError::Decrypt(e.to_string())),
        }
    }

    /// Keeps the better of two copies of the same session (the one known from earlier).
    pub fn merge(&mut self, other: InboundGroup) {
        if other.first_known_index() < self.first_known_index() && other.id() == self.id() {
            *self = other;
        }
    }

    pub fn pickle(&self, key: &PickleKey) -> String {
        self.inner.pickle().encrypt(key.as_bytes())
    }

    pub fn unpickle(text: &str, key: &PickleKey) -> Result<InboundGroup, CryptoError> {
        let p = InboundGroupSessionPickle::from_encrypted(text, key.as_bytes())
            .map_err(|_| CryptoError::Unpickle("inbound group session"))?;
        Ok(InboundGroup {
            inner: InboundGroupSession::from_pickle(p),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_decrypt_from_the_index_they_were_given() {
        let mut out = OutboundGroup::new(0);
        let early_key = out.session_key();
        let m0 = out.encrypt(b"zero");
        let m1 = out.encrypt(b"one");
        // A member added now gets the key at index 2: the past stays closed to it.
        let late_key = out.session_key();
        let m2 = out.encrypt(b"two");

        let mut early = InboundGroup::from_key(&early_key).expect("key");
        let mut late = InboundGroup::from_key(&late_key).expect("key");
        assert_eq!(early.id(), out.id());
        assert_eq!(late.first_known_index(), 2);
        assert_eq!(early.decrypt(&m1).expect("m1").plaintext, b"one");
        assert_eq!(early.decrypt(&m0).expect("out of order").index, 0);
        assert_eq!(
            early.decrypt(&m0).expect("again").index,
            0,
            "the index exposes replays"
        );
        assert_eq!(late.decrypt(&m2).expect("m2").plaintext, b"two");
        assert!(matches!(
            late.decrypt(&m0),
            Err(CryptoError::UnknownMessageIndex {
                index: 0,
                first_known: 2
            })
        ));

        let mut tampered = out.encrypt(b"three");
        tampered[20] ^= 1;
        assert!(early.decrypt(&tampered).is_err());
        assert!(matches!(
            early.decrypt(b"junk"),
            Err(CryptoError::Malformed(_))
        ));
        assert!(InboundGroup::from_key(b"not a key").is_err());

        // Another session's messages do not decrypt.
        let mut other = OutboundGroup::new(0);
        assert!(early.decrypt(&other.encrypt(b"x")).is_err());
    }

    #[test]
    fn rotation_and_pickles() {
        let policy = RotationPolicy {
            max_messages: 2,
            max_age_ms: 1000,
        };
        let mut out = OutboundGroup::new(5000);
        assert!(!out.must_rotate(5999, policy));
        assert!(out.must_rotate(6000, policy));
        out.encrypt(b"a");
        out.encrypt(b"b");
        assert!(out.must_rotate(5000, policy));

        let key = PickleKey::generate();
        let restored = OutboundGroup::unpickle(&out.pickle(&key), &key, 5000).expect("pickle");
        assert_eq!((restored.id(), restored.index()), (out.id(), 2));
        let inbound = InboundGroup::from_key(&out.session_key()).expect("key");
        let mut restored = InboundGroup::unpickle(&inbound.pickle(&key), &key).expect("pickle");
        assert_eq!(
            restored.decrypt(&out.encrypt(b"c")).expect("c").plaintext,
            b"c"
        );
        assert!(InboundGroup::unpickle(&inbound.pickle(&key), &PickleKey::generate()).is_err());
    }
}
