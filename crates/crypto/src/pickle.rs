//! The key that encrypts a device's secrets at rest (vodozemac pickles: AES-256-CBC +
//! HMAC-SHA-256 under keys derived from it). It comes either from a random key file in the
//! profile directory or from a passphrase through argon2id with a per-profile salt.

use rand::RngCore;

use crate::CryptoError;

/// 32 secret bytes. `Debug` does not print them.
#[derive(Clone, PartialEq, Eq)]
pub struct PickleKey([u8; 32]);

impl std::fmt::Debug for PickleKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PickleKey(<secret>)")
    }
}

/// Salt length for [`PickleKey::from_passphrase`].
pub const SALT_LEN: usize = 16;

impl PickleKey {
    /// A fresh random key (to be kept in a key file readable only by its owner).
    pub fn generate() -> PickleKey {
        let mut k = [0u8; 32];
        rand::rng().fill_bytes(&mut k);
        PickleKey(k)
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<PickleKey, CryptoError> {
        <[u8; 32]>::try_from(bytes)
            .map(PickleKey)
            .map_err(|_| CryptoError::Malformed("pickle key (need 32 bytes)"))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A fresh random salt for a new passphrase-protected profile.
    pub fn new_salt() -> [u8; SALT_LEN] {
        let mut s = [0u8; SALT_LEN];
        rand::rng().fill_bytes(&mut s);
        s
    }

    /// Derives the key from a passphrase with argon2id (19 MiB, 2 passes: OWASP's minimum).
    pub fn from_passphrase(passphrase: &str, salt: &[u8]) -> Result<PickleKey, CryptoError> {
        let params = argon2::Params::new(19 * 1024, 2, 1, Some(32))
            .map_err(|e| CryptoError::Kdf(e.to_string()))?;
        let argon =
            argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut k = [0u8; 32];
        argon
            .hash_password_into(passphrase.as_bytes(), salt, &mut k)
            .map_err(|e| CryptoError::Kdf(e.to_string()))?;
        Ok(PickleKey(k))
    }
}

/// Nonce and tag around a sealed secret.
const SEAL_NONCE: usize = 24;
const SEAL_TAG: usize = 16;

impl PickleKey {
    /// The key for secrets sealed under `label`: SHA-256 over a domain tag, the label and the
    /// key, so that sealed secrets and pickles never share a key.
    fn seal_key(&self, label: &str) -> chacha20poly1305::Key {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(b"tern seal v1\0");
        h.update(label.as_bytes());
        h.update([0]);
        h.update(self.0);
        chacha20poly1305::aead::array::Array(h.finalize().into())
    }

    /// Encrypts a small secret to keep at rest beside the pickles (XChaCha20-Poly1305 under a
    /// key derived for `label`, a random nonce; `label` is also the associated data, so a
    /// secret cannot be passed off as another).
    pub fn seal(&self, label: &str, secret: &[u8]) -> Result<Vec<u8>, CryptoError> {
        use chacha20poly1305::aead::{Aead, KeyInit, Payload};
        let cipher = chacha20poly1305::XChaCha20Poly1305::new(&self.seal_key(label));
        let mut nonce = [0u8; SEAL_NONCE];
        rand::rng().fill_bytes(&mut nonce);
        let sealed = cipher
            .encrypt(
                &chacha20poly1305::aead::array::Array(nonce),
                Payload {
                    msg: secret,
                    aad: label.as_bytes(),
                },
            )
            .map_err(|_| CryptoError::Encrypt("sealing a secret".into()))?;
        Ok([&nonce[..], &sealed].concat())
    }

    /// Decrypts what [`PickleKey::seal`] sealed under `label`.
    pub fn open(&self, label: &str, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        use chacha20poly1305::aead::{Aead, KeyInit, Payload};
        if sealed.len() < SEAL_NONCE + SEAL_TAG {
            return Err(CryptoError::Malformed("sealed secret"));
        }
        let (nonce, body) = sealed.split_at(SEAL_NONCE);
        let nonce: [u8; SEAL_NONCE] = nonce
            .try_into()
            .map_err(|_| CryptoError::Malformed("sealed secret"))?;
        let cipher = chacha20poly1305::XChaCha20Poly1305::new(&self.seal_key(label));
        cipher
            .decrypt(
                &chacha20poly1305::aead::array::Array(nonce),
                Payload {
                    msg: body,
                    aad: label.as_bytes(),
                },
            )
            .map_err(|_| CryptoError::Unpickle("a sealed secret"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_secrets_open_only_with_their_key_and_label() {
        let key = PickleKey::generate();
        let sealed = key.seal("push", b"secret bytes").expect("seal");
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(key.open("push", &sealed).expect("open"), b"secret bytes");
        assert!(key.open("other", &sealed).is_err(), "another label");
        assert!(
            PickleKey::generate().open("push", &sealed).is_err(),
            "another key"
        );
        let mut tampered = sealed.clone();
        tampered[30] ^= 1;
        assert!(key.open("push", &tampered).is_err());
        assert!(key.open("push", &sealed[..20]).is_err());
        assert_ne!(
            key.seal("push", b"secret bytes").expect("seal"),
            sealed,
            "fresh nonce"
        );
    }

    #[test]
    fn passphrase_keys_depend_on_passphrase_and_salt() {
        let salt = PickleKey::new_salt();
        let a = PickleKey::from_passphrase("correct horse", &salt).expect("kdf");
        assert_eq!(
            a,
            PickleKey::from_passphrase("correct horse", &salt).expect("kdf")
        );
        assert_ne!(
            a,
            PickleKey::from_passphrase("correct horsf", &salt).expect("kdf")
        );
        assert_ne!(
            a,
            PickleKey::from_passphrase("correct horse", &PickleKey::new_salt()).expect("kdf")
        );
        assert_eq!(format!("{a:?}"), "PickleKey(<secret>)");
        assert!(PickleKey::from_bytes(&[0; 31]).is_err());
    }
}
