//! The key directory (PROTOCOL.md §9): devices publish public keys, others fetch identity keys
//! and claim one-time keys. Keys are opaque to the server; only their sizes are checked.

use std::sync::Arc;

use tern_proto::http::{
    ClaimedKey, DeviceKeys, IdentityKeys, KeyCounts, KeysUpload, SignedKey, UserKeys,
};
use tern_proto::validate::key_text;
use tern_proto::{ErrorCode, Limits};
use tern_store::{IdentityKeysRecord, KeyCountRecord, KeyUpload, SignedKeyRecord, Store};

use crate::error::ApiError;

pub struct Keys {
    store: Arc<dyn Store>,
    limits: Limits,
}

fn signed(k: SignedKey) -> Result<SignedKeyRecord, ApiError> {
    key_text("a key id", &k.id).map_err(ApiError::bad_request)?;
    key_text("a key", &k.key).map_err(ApiError::bad_request)?;
    key_text("a signature", &k.signature).map_err(ApiError::bad_request)?;
    Ok(SignedKeyRecord {
        id: k.id,
        key: k.key,
        signature: k.signature,
    })
}

fn wire_signed(k: SignedKeyRecord) -> SignedKey {
    SignedKey {
        id: k.id,
        key: k.key,
        signature: k.signature,
    }
}

fn counts(c: KeyCountRecord) -> KeyCounts {
    KeyCounts {
        one_time_keys: c.one_time_keys,
        fallback_key_used: c.fallback_key_used,
    }
}

impl Keys {
    pub fn new(store: Arc<dyn Store>, limits: Limits) -> Self {
        Keys { store, limits }
    }

    /// Publishes a device's keys (identity, one-time keys, fallback key); checked whole first,
    /// so bad input stores nothing.
    pub async fn publish(&self, device: u64, up: KeysUpload) -> Result<KeyCounts, ApiError> {
        let max = self.limits.max_one_time_keys;
        if up.one_time_keys.len() > max {
            return Err(ApiError::new(
                ErrorCode::TooLarge,
                format!("at most {max} one-time keys per upload"),
            ));
        }
        let identity = match up.identity {
            Some(i) => {
                for (what, text) in [
                    ("curve25519", &i.curve25519),
                    ("ed25519", &i.ed25519),
                    ("signature", &i.signature),
                ] {
                    key_text(what, text).map_err(ApiError::bad_request)?;
                }
                Some(IdentityKeysRecord {
                    curve25519: i.curve25519,
                    ed25519: i.ed25519,
                    signature: i.signature,
                })
            }
            None => None,
        };
        let keys = KeyUpload {
            identity,
            one_time_keys: up
                .one_time_keys
                .into_iter()
                .map(signed)
                .collect::<Result<_, _>>()?,
            fallback_key: up.fallback_key.map(signed).transpose()?,
        };
        Ok(counts(self.store.publish_keys(device, keys, max).await?))
    }

    /// How many one-time keys a device has left.
    pub async fn counts(&self, device: u64) -> Result<KeyCounts, ApiError> {
        Ok(counts(self.store.key_counts(device).await?))
    }

    /// A user's devices with their identity keys.
    pub async fn of_user(&self, user_id: u64, username: String) -> Result<UserKeys, ApiError> {
        let devices = self
            .store
            .device_keys(user_id)
            .await?
            .into_iter()
            .map(|d| DeviceKeys {
                device_id: d.device,
                identity: d.identity.map(|i| IdentityKeys {
                    curve25519: i.curve25519,
                    ed25519: i.ed25519,
                    signature: i.signature,
                }),
            })
            .collect();
        Ok(UserKeys {
            user_id,
            username,
            devices,
        })
    }

    /// Claims one one-time key (or the fallback key) of each device, atomically.
    pub async fn claim(&self, mut devices: Vec<u64>) -> Result<Vec<ClaimedKey>, ApiError> {
        let max = self.limits.max_key_claims;
        if devices.len() > max {
            return Err(ApiError::new(
                ErrorCode::TooLarge,
                format!("at most {max} devices per claim"),
            ));
        }
        devices.sort_unstable();
        devices.dedup();
        let keys = self
            .store
            .claim_keys(devices)
            .await?
            .into_iter()
            .map(|k| ClaimedKey {
                user_id: k.user,
                device_id: k.device,
                key: wire_signed(k.key),
                fallback: k.fallback,
            })
            .collect();
        metrics::counter!("tern_keys_claimed_total").increment(1);
        Ok(keys)
    }
}
