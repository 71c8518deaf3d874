//! Other users (device lists, last seen) and the caller's privacy settings.

use axum::Json;
use axum::extract::{Path, State};
use tern_proto::http::{LastSeenResponse, PrivacySettings, UserDevicesResponse};

use super::{ApiJson, Authed};
use crate::app::AppState;
use crate::error::ApiError;

pub async fn user_devices(
    State(state): State<AppState>,
    Authed(_who): Authed,
    Path(name): Path<String>,
) -> Result<Json<UserDevicesResponse>, ApiError> {
    let u = state.accounts.user(&name).await?;
    Ok(Json(UserDevicesResponse {
        user_id: u.id,
        devices: state.accounts.device_ids(u.id).await?,
        username: u.username,
    }))
}

pub async fn last_seen(
    State(state): State<AppState>,
    Authed(who): Authed,
    Path(name): Path<String>,
) -> Result<Json<LastSeenResponse>, ApiError> {
    let target = state.accounts.user(&name).await?;
    let viewer = state.accounts.user(&who.username).await?;
    Ok(Json(state.presence.last_seen(&viewer, &target).await?))
}

pub async fn get_privacy(
    State(state): State<AppState>,
    Authed(who): Authed,
) -> Result<Json<PrivacySettings>, ApiError> {
    let me = state.accounts.user(&who.username).await?;
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
        .accounts
        .set_last_seen_privacy(who.user_id, settings.last_seen)
        .await?;
    Ok(Json(settings))
}
