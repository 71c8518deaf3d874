//! Olm: a device's long-term account (identity keys, one-time and fallback keys) and the
//! pairwise double-ratchet sessions between two devices, as implemented by vodozemac.
//!
//! Everything a device publishes is signed with its Ed25519 identity key over a statement that
//! names the user and device it belongs to, so that the server (which only relays keys) cannot
//! attribute one device's keys to another or swap in its own one-time keys unnoticed.

use vodozemac::olm::{
    Account as OlmAccount, AccountPickle, OlmMessage, Session as OlmSession, SessionConfig,
    SessionPickle,
};
use vodozemac::{Curve25519PublicKey, Ed25519PublicKey, Ed25519Signature};

use crate::CryptoError;
use crate::pickle::PickleKey;

/// Signed statements are prefixed with these, so that no signature means two things.
const IDENTITY_CONTEXT: &str = "tern-identity-v1";
const KEY_CONTEXT: &str = "tern-device-key-v1";

/// Identity keys as published (unpadded base64) with the device's self-signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicIdentity {
    pub curve25519: String,
    pub ed25519: String,
    pub signature: String,
}

/// A one-time or fallback key as published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub id: String,
    pub key: String,
    pub signature: String,
}

/// A device whose identity keys carry a valid self-signature for this (user, device).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedDevice {
    pub user_id: u64,
    pub device_id: u64,
    curve25519: Curve25519PublicKey,
    ed25519: Ed25519PublicKey,
}

fn identity_statement(user: u64, device: u64, curve: &str, ed: &str) -> String {
    format!("{IDENTITY_CONTEXT}\n{user}\n{device}\n{curve}\n{ed}")
}

fn key_statement(user: u64, device: u64, id: &str, key: &str) -> String {
    format!("{KEY_CONTEXT}\n{user}\n{device}\n{id}\n{key}")
}

impl VerifiedDevice {
    /// Checks published identity keys against their self-signature.
    pub fn verify(user_id: u64, device_id: u64, p: &PublicIdentity) -> Result<Self, CryptoError> {
        let curve25519 = Curve25519PublicKey::from_base64(&p.curve25519)
            .map_err(|_| CryptoError::Malformed("Curve25519 identity key"))?;
        let ed25519 = Ed25519PublicKey::from_base64(&p.ed25519)
            .map_err(|_| CryptoError::Malformed("Ed25519 identity key"))?;
        let sig = Ed25519Signature::from_base64(&p.signature)
            .map_err(|_| CryptoError::Malformed("identity signature"))?;
        let statement = identity_statement(user_id, device_id, &p.curve25519, &p.ed25519);
        ed25519
            .verify(statement.as_bytes(), &sig)
            .map_err(|_| CryptoError::BadSignature("identity keys"))?;
        Ok(VerifiedDevice {
            user_id,
            device_id,
            curve25519,
            ed25519,
        })
    }

    pub fn curve25519(&self) -> String {
        self.curve25519.to_base64()
    }

    pub fn ed25519(&self) -> String {
        self.ed25519.to_base64()
    }

    /// Checks a one-time or fallback key claimed for this device.
    fn verify_key(&self, k: &PublicKey) -> Result<Curve25519PublicKey, CryptoError> {
        let key = Curve25519PublicKey::from_base64(&k.key)
            .map_err(|_| CryptoError::Malformed("one-time key"))?;
        let sig = Ed25519Signature::from_base64(&k.signature)
            .map_err(|_| CryptoError::Malformed("one-time key signature"))?;
        self.ed25519
            .verify(
                key_statement(self.user_id, self.device_id, &k.id, &k.key).as_bytes(),
                &sig,
            )
            .map_err(|_| CryptoError::BadSignature("one-time key"))?;
        Ok(key)
    }
}

/// An Olm message on the wire: its type (0 pre-key, 1 normal) and bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OlmCiphertext {
    pub message_type: u32,
    pub body: Vec<u8>,
}

impl OlmCiphertext {
    fn from_message(m: OlmMessage) -> Self {
        let (t, body) = m.to_parts();
        OlmCiphertext {
            message_type: t as u32,
            body,
        }
    }

    fn to_message(&self) -> Result<OlmMessage, CryptoError> {
        OlmMessage::from_parts(self.message_type as usize, &self.body)
            .map_err(|_| CryptoError::Malformed("Olm message"))
    }

    pub fn is_pre_key(&self) -> bool {
        self.message_type == 0
    }

    /// The session a pre-key message belongs to (to find an existing inbound session).
    pub fn pre_key_session_id(&self) -> Option<String> {
        match self.to_message().ok()? {
            OlmMessage::PreKey(m) => Some(m.session_id()),
            OlmMessage::Normal(_) => None,
        }
    }
}

/// A device's Olm account. Create it once per device, after login (it is bound to the ids).
pub struct Account {
    inner: OlmAccount,
    user_id: u64,
    device_id: u64,
}

impl std::fmt::Debug for Account {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Account(user {}, device {})",
            self.user_id, self.device_id
        )
    }
}

/// Olm sessions use vodozemac's libolm-compatible configuration (version 1).
fn olm_config() -> SessionConfig {
    SessionConfig::version_1()
}

impl Account {
    pub fn new(user_id: u64, device_id: u64) -> Account {
        Account {
            inner: OlmAccount::new(),
            user_id,
            device_id,
        }
    }

    /// Most unpublished one-time keys an account holds (vodozemac's limit).
    pub fn max_one_time_keys(&self) -> usize {
        self.inner.max_number_of_one_time_keys()
    }

    pub fn ids(&self) -> (u64, u64) {
        (self.user_id, self.device_id)
    }

    fn sign(&self, statement: &str) -> String {
        self.inner.sign(statement).to_base64()
    }

    /// The identity keys with their self-signature, for `PUT /v1/keys`.
    pub fn public_identity(&self) -> PublicIdentity {
        let ik = self.inner.identity_keys();
        let (curve25519, ed25519) = (ik.curve25519.to_base64(), ik.ed25519.to_base64());
        let signature = self.sign(&identity_statement(
            self.user_id,
            self.device_id,
            &curve25519,
            &ed25519,
        ));
        PublicIdentity {
            curve25519,
            ed25519,
            signature,
        }
    }

    pub fn curve25519(&self) -> String {
        self.inner.curve25519_key().to_base64()
    }

    pub fn ed25519(&self) -> String {
        self.inner.ed25519_key().to_base64()
    }

    fn signed(&self, id: String, key: Curve25519PublicKey) -> PublicKey {
        let key = key.to_base64();
        let signature = self.sign(&key_statement(self.user_id, self.device_id, &id, &key));
        PublicKey { id, key, signature }
    }

    /// Generates one-time keys so that `unclaimed` (the server's count) reaches `target`, and
    /// returns every key not yet published, signed. Publish them, then [`Self::mark_published`];
    /// if publishing fails, the same keys come back next time (the server ignores repeats).
    pub fn one_time_keys_to_publish(&mut self, unclaimed: usize, target: usize) -> Vec<PublicKey> {
        let pending = self.inner.one_time_keys().len();
        let want = target
            .min(self.max_one_time_keys())
            .saturating_sub(unclaimed + pending);
        if want > 0 {
            self.inner.generate_one_time_keys(want);
        }
        let mut keys: Vec<_> = self
            .inner
            .one_time_keys()
            .into_iter()
            .map(|(id, key)| self.signed(id.to_base64(), key))
            .collect();
        keys.sort_by(|a, b| a.id.cmp(&b.id));
        keys
    }

    /// A new fallback key (the old one keeps working for sessions being set up with it).
    pub fn rotate_fallback_key(&mut self) -> Option<PublicKey> {
        self.inner.generate_fallback_key();
        self.unpublished_fallback_key()
    }

    /// The fallback key if it has not been published yet.
    pub fn unpublished_fallback_key(&self) -> Option<PublicKey> {
        let (id, key) = self.inner.fallback_key().into_iter().next()?;
        Some(self.signed(id.to_base64(), key))
    }

    pub fn mark_published(&mut self) {
        self.inner.mark_keys_as_published();
    }

    /// Starts a session with a device from a key claimed for it (checked against the device's
    /// signature first).
    pub fn outbound_session(
        &self,
        device: &VerifiedDevice,
        claimed: &PublicKey,
    ) -> Result<Session, CryptoError> {
        let otk = device.verify_key(claimed)?;
        let session = self
            .inner
            .create_outbound_session(olm_config(), device.curve25519, otk)
            .map_err(|e| CryptoError::Session(e.to_string()))?;
        Ok(Session { inner: session })
    }

    /// Creates the inbound session of a pre-key message from `device` and decrypts it. The
    /// one-time key it used is removed from the account (a replay cannot create it again).
    pub fn inbound_session(
        &mut self,
        device: &VerifiedDevice,
        message: &OlmCiphertext,
    ) -> Result<(Session, Vec<u8>), CryptoError> {
        let OlmMessage::PreKey(m) = message.to_message()? else {
            return Err(CryptoError::Session("not a pre-key message".into()));
        };
        let created = self
            .inner
            .create_inbound_session(olm_config(), device.curve25519, &m)
            .map_err(|e| CryptoError::Session(e.to_string()))?;
        Ok((
            Session {
                inner: created.session,
            },
            created.plaintext,
        ))
    }

    /// Encrypted with `key`; only [`Self::unpickle`] with the same key reads it.
    pub fn pickle(&self, key: &PickleKey) -> String {
        self.inner.pickle().encrypt(key.as_bytes())
    }

    pub fn unpickle(
        text: &str,
        key: &PickleKey,
        user_id: u64,
        device_id: u64,
    ) -> Result<Account, CryptoError> {
        let p = AccountPickle::from_encrypted(text, key.as_bytes())
            .map_err(|_| CryptoError::Unpickle("account"))?;
        Ok(Account {
            inner: OlmAccount::from_pickle(p),
            user_id,
            device_id,
        })
    }
}

/// A pairwise Olm session with one other device.
pub struct Session {
    inner: OlmSession,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Session({})", self.inner.session_id())
    }
}

impl Session {
    pub fn id(&self) -> String {
        self.inner.session_id()
    }

    /// Whether the other side has answered on this session (until then, messages are pre-key
    /// messages that can establish it).
    pub fn has_received(&self) -> bool {
        self.inner.has_received_message()
    }

    pub fn encrypt(&mut self, plaintext: &[u8]) -> Result<OlmCiphertext, CryptoError> {
        self.inner
            .encrypt(plaintext)
            .map(OlmCiphertext::from_message)
            .map_err(|e| CryptoError::Encrypt(e.to_string()))
    }

    pub fn decrypt(&mut self, message: &OlmCiphertext) -> Result<Vec<u8>, CryptoError> {
        self.inner
            .decrypt(&message.to_message()?)
            .map_err(|e| CryptoError::Decrypt(e.to_string()))
    }

    pub fn pickle(&self, key: &PickleKey) -> String {
        self.inner.pickle().encrypt(key.as_bytes())
    }

    pub fn unpickle(text: &str, key: &PickleKey) -> Result<Session, CryptoError> {
        let p = SessionPickle::from_encrypted(text, key.as_bytes())
            .map_err(|_| CryptoError::Unpickle("session"))?;
        Ok(Session {
            inner: OlmSession::from_pickle(p),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(a: &Account) -> VerifiedDevice {
        let (u, d) = a.ids();
        VerifiedDevice::verify(u, d, &a.public_identity()).expect("verifies")
    }

    #[test]
    fn identity_signatures_bind_user_and_device() {
        let a = Account::new(1, 10);
        let id = a.public_identity();
        assert!(VerifiedDevice::verify(1, 10, &id).is_ok());
        assert!(matches!(
            VerifiedDevice::verify(1, 11, &id),
            Err(CryptoError::BadSignature(_))
        ));
        assert!(VerifiedDevice::verify(2, 10, &id).is_err());
        let mut forged = id.clone();
        forged.curve25519 = Account::new(1, 10).curve25519();
        assert!(VerifiedDevice::verify(1, 10, &forged).is_err());
        let mut junk = id;
        junk.ed25519 = "!!".into();
        assert!(matches!(
            VerifiedDevice::verify(1, 10, &junk),
            Err(CryptoError::Malformed(_))
        ));
    }

    #[test]
    fn sessions_from_claimed_keys_and_tampering() {
        let alice = Account::new(1, 10);
        let mut bob = Account::new(2, 20);
        let keys = bob.one_time_keys_to_publish(0, 5);
        assert_eq!(keys.len(), 5);
        bob.mark_published();
        assert!(bob.one_time_keys_to_publish(5, 5).is_empty());
        let bob_dev = device(&bob);
        let alice_dev = device(&alice);

        // A key the server swapped in (signed by someone else) is refused.
        let mut swapped = Account::new(2, 20).one_time_keys_to_publish(0, 1).remove(0);
        swapped.id = keys[0].id.clone();
        assert!(matches!(
            alice.outbound_session(&bob_dev, &swapped),
            Err(CryptoError::BadSignature(_))
        ));

        let mut a_s = alice
            .outbound_session(&bob_dev, &keys[0])
            .expect("outbound");
        let first = a_s.encrypt(b"hello bob").expect("encrypt");
        assert!(first.is_pre_key());
        let (mut b_s, plain) = bob.inbound_session(&alice_dev, &first).expect("inbound");
        assert_eq!(plain, b"hello bob");
        assert_eq!(first.pre_key_session_id(), Some(b_s.id()));
        // The one-time key is used up: the same pre-key message cannot make a second session.
        assert!(bob.inbound_session(&alice_dev, &first).is_err());

        let reply = b_s.encrypt(b"hi alice").expect("encrypt");
        assert!(!reply.is_pre_key());
        assert_eq!(a_s.decrypt(&reply).expect("decrypt"), b"hi alice");
        assert!(a_s.has_received());

        // Out of order is fine; duplicates and tampering are errors, not panics.
        let m1 = a_s.encrypt(b"one").expect("encrypt");
        let m2 = a_s.encrypt(b"two").expect("encrypt");
        assert_eq!(b_s.decrypt(&m2).expect("decrypt"), b"two");
        assert_eq!(b_s.decrypt(&m1).expect("decrypt"), b"one");
        assert!(b_s.decrypt(&m1).is_err(), "a replay fails");
        let mut bad = a_s.encrypt(b"three").expect("encrypt");
        let last = bad.body.len() - 1;
        bad.body[last] ^= 1;
        assert!(matches!(b_s.decrypt(&bad), Err(CryptoError::Decrypt(_))));
        let junk = OlmCiphertext {
            message_type: 7,
            body: vec![1, 2, 3],
        };
        assert!(b_s.decrypt(&junk).is_err());
    }

    #[test]
    fn fallback_key_and_pickles() {
        let alice = Account::new(1, 10);
        let mut bob = Account::new(2, 20);
        let fb = bob.rotate_fallback_key().expect("fallback");
        bob.mark_published();
        assert_eq!(bob.unpublished_fallback_key(), None);
        let bob_dev = device(&bob);
        let mut s = alice
            .outbound_session(&bob_dev, &fb)
            .expect("with the fallback key");
        let m = s.encrypt(b"via fallback").expect("encrypt");

        let key = PickleKey::generate();
        let pickled = bob.pickle(&key);
        assert!(!pickled.contains(&bob.curve25519()));
        assert!(Account::unpickle(&pickled, &PickleKey::generate(), 2, 20).is_err());
        let mut bob = Account::unpickle(&pickled, &key, 2, 20).expect("unpickle");
        let (bs, plain) = bob.inbound_session(&device(&alice), &m).expect("inbound");
        assert_eq!(plain, b"via fallback");
        let mut bs = Session::unpickle(&bs.pickle(&key), &key).expect("session");
        let m2 = s.encrypt(b"again").expect("encrypt");
        assert_eq!(bs.decrypt(&m2).expect("decrypt"), b"again");
    }
}
