//! Other users (device lists, last seen) and the caller's privacy settings.

use axum::Json;
use axum::extract::{Path, State};
use tern_proto::http::{LastSeenResponse, PrivacySettings, UserDevicesResponse};
use tern_store::UserRecord;

use super::{ApiJson, Authed};
use crate::app::AppState;
use crate::error::ApiError;

pub(crate) async fn user(state: &AppState, name: &str) -> Result<UserRecord, ApiError> {
    let name = name.trim().to_ascii_lowercase();
    if name.len() > tern_proto::limits::USERNAME_MAX {
        return Err(ApiError::new(
            tern_proto::ErrorCode::NotFound,
            "user not found",
        ));
    }
    state
        .store
        .user_by_name(&name)
        .await?
        .ok_or_else(|| ApiError::new(tern_proto::ErrorCode::NotFound, "user not found"))
}

pub async fn user_devices(
    State(state): State<AppState>,
    Authed(_who): Authed,
    Path(name): Path<String>,
) -> Result<Json<UserDevicesResponse>, ApiError> {
    let u = user(&state, &name).await?;
    let devices = state
        .store
        .list_devices(u.id)
        .await?
        .into_iter()
        .map(|d| d.id)
        .collect();
    Ok(Json(UserDevicesResponse {
        user_id: u.id,
        username: u.username,
        devices,
    }))
}

pub async fn last_seen(
    State(state): State<AppState>,
    Authed(who): Authed,
    Path(name): Path<String>,
) -> Result<Json<LastSeenResponse>, ApiError> {
    let target = user(&state, &name).await?;
    let viewer = user(&state, &who.username).await?;
    Ok(Json(state.presence.last_seen(&viewer, &target).await?))
}

pub async fn get_privacy(
    State(state): State<AppState>,
    Authed(who): Authed,
) -> Result<Json<PrivacySettings>, ApiError> {
    let me = user(&state, &who.username).await?;
    Ok(Json(PrivacySettings {
        last_seen: me.last_seen_privacy,
    }))
}

pub async fn put_privacy(
    State(state): State<AppState>,
    Authed(who): Authed,
    ApiJson(settings): ApiJson<PrivacySettings>,
) -> Result<Json<PrivacySettings>, ApiError> {
    state
        .store
        .set_last_seen_privacy(who.user_id, settings.last_seen)
        .await?;
    Ok(Json(settings))
}
