//! The key directory (PROTOCOL.md §9): devices publish public keys, others fetch identity keys
//! and claim one-time keys. Keys are opaque to the server; only their sizes are checked.

use axum::Json;
use axum::extract::{Path, State};
use tern_proto::ErrorCode;
use tern_proto::http::{
    ClaimRequest, ClaimResponse, ClaimedKey, DeviceKeys, GroupKeys, IdentityKeys, KeyCounts,
    KeysUpload, SignedKey, UserKeys,
};
use tern_proto::validate::key_text;
use tern_store::{IdentityKeysRecord, KeyCountRecord, KeyUpload, SignedKeyRecord};

use super::users::user;
use super::{ApiJson, Authed};
use crate::app::AppState;
use crate::error::ApiError;

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

pub async fn publish(
    State(state): State<AppState>,
    Authed(who): Authed,
    ApiJson(up): ApiJson<KeysUpload>,
) -> Result<Json<KeyCounts>, ApiError> {
    let max = state.config.limits.max_one_time_keys;
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
    let c = state.store.publish_keys(who.device_id, keys, max).await?;
    Ok(Json(counts(c)))
}

pub async fn own_counts(
    State(state): State<AppState>,
    Authed(who): Authed,
) -> Result<Json<KeyCounts>, ApiError> {
    Ok(Json(counts(state.store.key_counts(who.device_id).await?)))
}

pub async fn user_keys(
    State(state): State<AppState>,
    Authed(_who): Authed,
    Path(name): Path<String>,
) -> Result<Json<UserKeys>, ApiError> {
    let u = user(&state, &name).await?;
    Ok(Json(keys_of(&state, u.id, u.username).await?))
}

/// `GET /v1/groups/{id}/keys`: every member's devices and identity keys, for members only.
pub async fn group_keys(
    State(state): State<AppState>,
    Authed(who): Authed,
    Path(g): Path<String>,
) -> Result<Json<GroupKeys>, ApiError> {
    let group_id: u64 = g
        .parse()
        .map_err(|_| ApiError::bad_request("a group id is a number"))?;
    let info = state.groups.get(&who, group_id).await?;
    let mut members = Vec::with_capacity(info.members.len());
    for m in info.members {
        members.push(keys_of(&state, m.user_id, m.username).await?);
    }
    Ok(Json(GroupKeys { group_id, members }))
}

async fn keys_of(state: &AppState, user_id: u64, username: String) -> Result<UserKeys, ApiError> {
    let devices = state
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

pub async fn claim(
    State(state): State<AppState>,
    Authed(_who): Authed,
    ApiJson(req): ApiJson<ClaimRequest>,
) -> Result<Json<ClaimResponse>, ApiError> {
    let max = state.config.limits.max_key_claims;
    if req.devices.len() > max {
        return Err(ApiError::new(
            ErrorCode::TooLarge,
            format!("at most {max} devices per claim"),
        ));
    }
    let mut devices = req.devices;
    devices.sort_unstable();
    devices.dedup();
    let keys = state
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
    Ok(Json(ClaimResponse { keys }))
}
