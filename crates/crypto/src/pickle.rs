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

#[cfg(test)]
mod tests {
    use super::*;

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
