//! Accounts, sessions and the caller's own devices; the rules are in
//! [`crate::services::accounts`].

use axum::Json;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use tern_proto::http::{
    DevicesResponse, LoginRequest, LoginResponse, RegisterRequest, RegisterResponse,
};

use super::{ApiJson, Authed};
use crate::app::AppState;
use crate::error::ApiError;
use crate::net::ClientAddr;

pub async fn register(
    State(state): State<AppState>,
    Extension(ClientAddr(client)): Extension<ClientAddr>,
    ApiJson(req): ApiJson<RegisterRequest>,
) -> Result<(StatusCode, Json<RegisterResponse>), ApiError> {
    let created = state
        .accounts
        .register(&req.username, req.password, client)
        .await?;
    Ok((StatusCode::CREATED, Json(created)))
}

pub async fn login(
    State(state): State<AppState>,
    Extension(ClientAddr(client)): Extension<ClientAddr>,
    ApiJson(req): ApiJson<LoginRequest>,
) -> Result<(StatusCode, Json<LoginResponse>), ApiError> {
    let session = state
        .accounts
        .login(&req.username, req.password, &req.device_name, client)
        .await?;
    Ok((StatusCode::CREATED, Json(session)))
}

pub async fn logout(
    State(state): State<AppState>,
    Authed(who): Authed,
) -> Result<StatusCode, ApiError> {
    state
        .accounts
        .remove_device(who.user_id, who.device_id)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn remove_device(
    State(state): State<AppState>,
    Authed(who): Authed,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id: u64 = id
        .parse()
        .map_err(|_| ApiError::bad_request("device id must be a number"))?;
    state.accounts.remove_device(who.user_id, id).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn list_devices(
    State(state): State<AppState>,
    Authed(who): Authed,
) -> Result<Json<DevicesResponse>, ApiError> {
    Ok(Json(DevicesResponse {
        devices: state.accounts.devices(&who).await?,
    }))
}
