//! Passwords (argon2id, PHC strings with their own salt) and access tokens (32 random bytes,
//! hex; the server stores only their SHA-256, so a leaked database holds no usable token).

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// argon2id cost. The defaults are the argon2 crate's (OWASP's first recommendation: 19 MiB,
/// 2 passes, 1 lane); lower them only for tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PasswordCost {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Default for PasswordCost {
    fn default() -> Self {
        PasswordCost {
            memory_kib: Params::DEFAULT_M_COST,
            iterations: Params::DEFAULT_T_COST,
            parallelism: Params::DEFAULT_P_COST,
        }
    }
}

impl PasswordCost {
    pub fn hasher(&self) -> Result<Argon2<'static>, String> {
        let params = Params::new(self.memory_kib, self.iterations, self.parallelism, None)
            .map_err(|e| e.to_string())?;
        Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
    }
}

/// Hashes a password with argon2id. CPU-heavy: call from a blocking thread.
pub fn hash_password(password: &str, cost: PasswordCost) -> Result<String, String> {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    cost.hasher()?
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

/// Checks a password against a stored hash. CPU-heavy: call from a blocking thread.
pub fn verify_password(password: &str, hash: &str) -> bool {
    PasswordHash::new(hash)
        .map(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false)
}

/// A hash to verify against when the user does not exist, so that an unknown username costs
/// the same time as a wrong password (no user enumeration by timing). Made once at start-up
/// with the configured cost.
pub fn decoy_hash(cost: PasswordCost) -> Result<String, String> {
    hash_password(&new_token(), cost)
}

/// A fresh access token: 32 random bytes as hex.
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// What the store keeps of a token.
pub fn token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_round_trip() {
        for cost in [
            PasswordCost::default(),
            PasswordCost {
                memory_kib: 64,
                iterations: 1,
                parallelism: 1,
            },
        ] {
            let h = hash_password("correct horse", cost).expect("hash");
            assert!(h.starts_with("$argon2id$"));
            assert!(verify_password("correct horse", &h));
            assert!(!verify_password("wrong horse", &h));
            assert!(!verify_password(
                "anything",
                &decoy_hash(cost).expect("decoy")
            ));
        }
        assert!(!verify_password("x", "not a hash"));
        assert!(
            PasswordCost {
                memory_kib: 1,
                iterations: 0,
                parallelism: 1
            }
            .hasher()
            .is_err()
        );
    }

    #[test]
    fn tokens_are_random_and_hashed() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
        assert_eq!(token_hash(&a).len(), 32);
        assert_ne!(token_hash(&a), token_hash(&b));
    }
}
