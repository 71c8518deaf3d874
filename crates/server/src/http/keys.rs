//! The key directory's routes (PROTOCOL.md §9); the rules are in [`crate::services::keys`].

use axum::Json;
use axum::extract::{Path, State};
use tern_proto::http::{ClaimRequest, ClaimResponse, GroupKeys, KeyCounts, KeysUpload, UserKeys};

use super::{ApiJson, Authed};
use crate::app::AppState;
use crate::error::ApiError;

pub async fn publish(
    State(state): State<AppState>,
    Authed(who): Authed,
    ApiJson(up): ApiJson<KeysUpload>,
) -> Result<Json<KeyCounts>, ApiError> {
    Ok(Json(state.keys.publish(who.device_id, up).await?))
}

pub async fn own_counts(
    State(state): State<AppState>,
    Authed(who): Authed,
) -> Result<Json<KeyCounts>, ApiError> {
    Ok(Json(state.keys.counts(who.device_id).await?))
}

pub async fn user_keys(
    State(state): State<AppState>,
    Authed(_who): Authed,
    Path(name): Path<String>,
) -> Result<Json<UserKeys>, ApiError> {
    let u = state.accounts.user(&name).await?;
    Ok(Json(state.keys.of_user(u.id, u.username).await?))
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
        members.push(state.keys.of_user(m.user_id, m.username).await?);
    }
    Ok(Json(GroupKeys { group_id, members }))
}

pub async fn claim(
    State(state): State<AppState>,
    Authed(_who): Authed,
    ApiJson(req): ApiJson<ClaimRequest>,
) -> Result<Json<ClaimResponse>, ApiError> {
    Ok(Json(ClaimResponse {
        keys: state.keys.claim(req.devices).await?,
    }))
}
