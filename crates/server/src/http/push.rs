//! Push registration (PROTOCOL.md §10); the rules are in [`crate::services::push`].

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use tern_proto::http::{PushSubscriptionRequest, PushSubscriptionResponse, VapidResponse};

use super::{ApiJson, Authed};
use crate::app::AppState;
use crate::error::ApiError;

fn device_id(id: &str) -> Result<u64, ApiError> {
    id.parse()
        .map_err(|_| ApiError::bad_request("device id must be a number"))
}

pub async fn vapid(State(state): State<AppState>) -> Json<VapidResponse> {
    Json(VapidResponse {
        public_key: state.push.vapid_public_key(),
    })
}

pub async fn register(
    State(state): State<AppState>,
    Authed(who): Authed,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<PushSubscriptionRequest>,
) -> Result<Json<PushSubscriptionResponse>, ApiError> {
    Ok(Json(state.push.register(&who, device_id(&id)?, req).await?))
}

pub async fn status(
    State(state): State<AppState>,
    Authed(who): Authed,
    Path(id): Path<String>,
) -> Result<Json<PushSubscriptionResponse>, ApiError> {
    Ok(Json(state.push.status(&who, device_id(&id)?).await?))
}

pub async fn unregister(
    State(state): State<AppState>,
    Authed(who): Authed,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.push.unregister(&who, device_id(&id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}
