//! Calls (PROTOCOL.md §11); the rules are in [`crate::services::calls`].

use axum::Json;
use axum::extract::State;
use tern_proto::http::TurnCredentials;

use super::Authed;
use crate::app::AppState;
use crate::error::ApiError;

pub async fn turn(
    State(state): State<AppState>,
    Authed(who): Authed,
) -> Result<Json<TurnCredentials>, ApiError> {
    Ok(Json(state.calls.turn(&who).await?))
}
