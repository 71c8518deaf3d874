//! The group endpoints: thin wrappers over [`crate::services::groups::Groups`].

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use tern_proto::http::{
    AddMembersRequest, CreateGroupRequest, GroupInfo, GroupsResponse, MessageInfo,
    UpdateGroupRequest,
};
use tern_store::GroupOp;

use super::{ApiJson, Authed};
use crate::app::AppState;
use crate::error::ApiError;

fn id(raw: &str) -> Result<u64, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::bad_request("a group id is a number"))
}

pub async fn create(
    State(state): State<AppState>,
    Authed(who): Authed,
    ApiJson(req): ApiJson<CreateGroupRequest>,
) -> Result<(StatusCode, Json<GroupInfo>), ApiError> {
    let g = state.groups.create(&who, req).await?;
    Ok((StatusCode::CREATED, Json(g)))
}

pub async fn list(
    State(state): State<AppState>,
    Authed(who): Authed,
) -> Result<Json<GroupsResponse>, ApiError> {
    Ok(Json(GroupsResponse {
        groups: state.groups.list(&who).await?,
    }))
}

pub async fn get(
    State(state): State<AppState>,
    Authed(who): Authed,
    Path(g): Path<String>,
) -> Result<Json<GroupInfo>, ApiError> {
    Ok(Json(state.groups.get(&who, id(&g)?).await?))
}

pub async fn update(
    State(state): State<AppState>,
    Authed(who): Authed,
    Path(g): Path<String>,
    ApiJson(req): ApiJson<UpdateGroupRequest>,
) -> Result<Json<GroupInfo>, ApiError> {
    Ok(Json(state.groups.update(&who, id(&g)?, req).await?))
}

pub async fn add_members(
    State(state): State<AppState>,
    Authed(who): Authed,
    Path(g): Path<String>,
    ApiJson(req): ApiJson<AddMembersRequest>,
) -> Result<Json<GroupInfo>, ApiError> {
    Ok(Json(state.groups.add(&who, id(&g)?, &req.members).await?))
}

pub async fn remove_member(
    State(state): State<AppState>,
    Authed(who): Authed,
    Path((g, user)): Path<(String, String)>,
) -> Result<Json<GroupInfo>, ApiError> {
    Ok(Json(
        state
            .groups
            .on_member(&who, id(&g)?, &user, GroupOp::Remove)
            .await?,
    ))
}

pub async fn leave(
    State(state): State<AppState>,
    Authed(who): Authed,
    Path(g): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.groups.leave(&who, id(&g)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn promote(
    State(state): State<AppState>,
    Authed(who): Authed,
    Path((g, user)): Path<(String, String)>,
) -> Result<Json<GroupInfo>, ApiError> {
    Ok(Json(
        state
            .groups
            .on_member(&who, id(&g)?, &user, GroupOp::Promote)
            .await?,
    ))
}

pub async fn demote(
    State(state): State<AppState>,
    Authed(who): Authed,
    Path((g, user)): Path<(String, String)>,
) -> Result<Json<GroupInfo>, ApiError> {
    Ok(Json(
        state
            .groups
            .on_member(&who, id(&g)?, &user, GroupOp::Demote)
            .await?,
    ))
}

pub async fn message_info(
    State(state): State<AppState>,
    Authed(who): Authed,
    Path((g, seq)): Path<(String, String)>,
) -> Result<Json<MessageInfo>, ApiError> {
    let seq: u64 = seq
        .parse()
        .map_err(|_| ApiError::bad_request("a sequence number is a number"))?;
    Ok(Json(state.groups.message_info(&who, id(&g)?, seq).await?))
}
