//! The HTTP API under `/v1` (JSON), health, readiness and metrics. Handlers take [`AppState`]
//! and return `Result<_, ApiError>`, so every failure has a typed code and status.

mod accounts;
pub mod extract;
mod groups;
mod keys;
mod media;
mod uploads;
mod users;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::routing::{delete, get, head, options, post, put};

use crate::app::AppState;

pub use extract::{ApiJson, Authed};

pub fn router(state: AppState) -> Router {
    let body_limit = state.config.limits.max_http_body_bytes;
    Router::new()
        .route("/v1/accounts", post(accounts::register))
        .route("/v1/sessions", post(accounts::login))
        .route("/v1/sessions/current", delete(accounts::logout))
        .route("/v1/devices", get(accounts::list_devices))
        .route("/v1/devices/{id}", delete(accounts::remove_device))
        .route("/v1/users/{username}/devices", get(users::user_devices))
        .route("/v1/users/{username}/last-seen", get(users::last_seen))
        .route(
            "/v1/settings/privacy",
            get(users::get_privacy).put(users::put_privacy),
        )
        .route("/v1/keys", put(keys::publish).get(keys::own_counts))
        .route("/v1/keys/claim", post(keys::claim))
        .route("/v1/users/{username}/keys", get(keys::user_keys))
        .route("/v1/groups", post(groups::create).get(groups::list))
        .route("/v1/groups/{id}", get(groups::get).patch(groups::update))
        .route("/v1/groups/{id}/members", post(groups::add_members))
        .route(
            "/v1/groups/{id}/members/{username}",
            delete(groups::remove_member),
        )
        .route("/v1/groups/{id}/leave", post(groups::leave))
        .route("/v1/groups/{id}/keys", get(keys::group_keys))
        .route(
            "/v1/groups/{id}/admins/{username}",
            put(groups::promote).delete(groups::demote),
        )
        .route("/v1/groups/{id}/messages/{seq}", get(groups::message_info))
        .merge(
            Router::new()
                .route(
                    "/v1/media/{id}",
                    get(media::get)
                        .head(media::head)
                        .put(media::put)
                        .delete(media::drop_ref),
                )
                .route("/v1/media/{id}/claim", post(media::claim))
                .merge(
                    Router::new()
                        .route(
                            "/v1/uploads",
                            options(uploads::options).post(uploads::create),
                        )
                        .route(
                            "/v1/uploads/{id}",
                            head(uploads::head)
                                .patch(uploads::patch)
                                .delete(uploads::terminate),
                        )
                        .layer(axum::middleware::from_fn(uploads::tus_headers)),
                )
                .layer(axum::middleware::from_fn(media::close_if_body_unread)),
        )
        .route("/v1/ws", get(crate::gateway::upgrade))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async {
            crate::error::ApiError::new(tern_proto::ErrorCode::NotFound, "no such endpoint")
        })
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, &'static str) {
    match state.store.ping().await {
        Ok(()) if !state.shutdown.is_cancelled() => (StatusCode::OK, "ready"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "not ready"),
    }
}

async fn metrics(State(state): State<AppState>) -> String {
    state.metrics.render()
}
