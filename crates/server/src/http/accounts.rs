//! Accounts, sessions and the caller's own devices.

use std::net::SocketAddr;

use axum::Json;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::StatusCode;
use tern_proto::ErrorCode;
use tern_proto::http::{
    DeviceInfo, DevicesResponse, LoginRequest, LoginResponse, RegisterRequest, RegisterResponse,
};
use tern_proto::validate;

use super::{ApiJson, Authed};
use crate::app::AppState;
use crate::auth::{self, HashError};
use crate::delivery::CloseReason;
use crate::error::ApiError;

/// Password hashing's refusals as API errors: a full pool is `unavailable` with a short
/// retry-after (the queue drains in well under a second per waiting place).
fn hashing_error(e: HashError) -> ApiError {
    match e {
        HashError::Busy => ApiError::busy("the server is busy; retry in a moment", 1),
        HashError::Failed(m) => {
            tracing::error!(error = %m, "password hashing failed");
            ApiError::new(ErrorCode::Internal, "internal error; retry later")
        }
    }
}

pub async fn register(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiJson(req): ApiJson<RegisterRequest>,
) -> Result<(StatusCode, Json<RegisterResponse>), ApiError> {
    let username = req.username.trim().to_ascii_lowercase();
    validate::username(&username).map_err(ApiError::bad_request)?;
    validate::password(&req.password, &username).map_err(ApiError::bad_request)?;
    if let Err(wait) = state.rate_limits.registration(peer.ip()).await {
        return Err(ApiError::rate_limited(
            "too many accounts created from this address; retry later",
            wait,
        ));
    }
    if state.store.user_by_name(&username).await?.is_some() {
        return Err(ApiError::new(ErrorCode::Conflict, "username is taken"));
    }
    let hash = state
        .passwords
        .hash(req.password)
        .await
        .map_err(hashing_error)?;
    let user_id = state
        .store
        .create_user(&username, &hash, state.clock.now_ms())
        .await?;
    tracing::info!(user_id, "account created");
    Ok((
        StatusCode::CREATED,
        Json(RegisterResponse { user_id, username }),
    ))
}

pub async fn login(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ApiJson(req): ApiJson<LoginRequest>,
) -> Result<(StatusCode, Json<LoginResponse>), ApiError> {
    let username = req.username.trim().to_ascii_lowercase();
    let device_name = if req.device_name.trim().is_empty() {
        "device".to_owned()
    } else {
        req.device_name.trim().to_owned()
    };
    validate::device_name(&device_name).map_err(ApiError::bad_request)?;
    if req.password.len() > tern_proto::limits::PASSWORD_MAX
        || username.len() > tern_proto::limits::USERNAME_MAX
    {
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            "wrong username or password",
        ));
    }
    if let Err(wait) = state.rate_limits.login(&username, peer.ip()).await {
        return Err(ApiError::rate_limited(
            "too many login attempts; retry later",
            wait,
        ));
    }
    let user = state.store.user_by_name(&username).await?;
    let (hash, user) = match user {
        Some(u) => (u.password_hash.clone(), Some(u)),
        None => (state.decoy_hash.to_string(), None),
    };
    let ok = state
        .passwords
        .verify(req.password, hash)
        .await
        .map_err(hashing_error)?;
    let user = match (ok, user) {
        (true, Some(u)) => u,
        _ => {
            metrics::counter!("tern_login_failures_total").increment(1);
            return Err(ApiError::new(
                ErrorCode::Unauthorized,
                "wrong username or password",
            ));
        }
    };
    state
        .rate_limits
        .login_succeeded(&username, peer.ip())
        .await;
    let token = auth::new_token();
    let device_id = state
        .store
        .create_device(
            user.id,
            &device_name,
            &auth::token_hash(&token),
            state.config.limits.max_devices_per_user,
            state.clock.now_ms(),
        )
        .await?;
    tracing::info!(user_id = user.id, device_id, "device logged in");
    Ok((
        StatusCode::CREATED,
        Json(LoginResponse {
            user_id: user.id,
            username: user.username,
            device_id,
            token,
        }),
    ))
}

async fn remove(state: &AppState, user: u64, device: u64) -> Result<StatusCode, ApiError> {
    state.store.remove_device(user, device).await?;
    state
        .hub
        .disconnect(user, device, CloseReason::Revoked)
        .await;
    tracing::info!(user_id = user, device_id = device, "device removed");
    Ok(StatusCode::NO_CONTENT)
}

pub async fn logout(
    State(state): State<AppState>,
    Authed(who): Authed,
) -> Result<StatusCode, ApiError> {
    remove(&state, who.user_id, who.device_id).await
}

pub async fn remove_device(
    State(state): State<AppState>,
    Authed(who): Authed,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id: u64 = id
        .parse()
        .map_err(|_| ApiError::bad_request("device id must be a number"))?;
    remove(&state, who.user_id, id).await
}

pub async fn list_devices(
    State(state): State<AppState>,
    Authed(who): Authed,
) -> Result<Json<DevicesResponse>, ApiError> {
    let devices = state
        .store
        .list_devices(who.user_id)
        .await?
        .into_iter()
        .map(|d| DeviceInfo {
            device_id: d.id,
            current: d.id == who.device_id,
            name: d.name,
            created_at_ms: d.created_at_ms,
            last_seen_ms: d.last_seen_ms,
        })
        .collect();
    Ok(Json(DevicesResponse { devices }))
}
