//! The HTTP API under `/v1` (JSON), health, readiness and metrics. Handlers take [`AppState`]
//! and return `Result<_, ApiError>`, so every failure has a typed code and status.

mod accounts;
mod calls;
pub mod extract;
mod groups;
mod keys;
mod media;
mod push;
mod uploads;
mod users;

use axum::Router;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{delete, get, head, options, post, put};
use std::time::Duration;

use crate::app::AppState;

pub use extract::{ApiJson, Authed};

/// A media body as the media service reads it: each chunk must arrive within `idle`, or the
/// stream ends with an error (the service keeps what arrived, which is the tus resume point).
pub fn body_stream(
    body: axum::body::Body,
    idle: Duration,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Unpin {
    let stream = body.into_data_stream();
    Box::pin(futures_util::stream::unfold(
        Some(stream),
        move |stream| async move {
            let mut stream = stream?;
            match tokio::time::timeout(idle, futures_util::StreamExt::next(&mut stream)).await {
                Ok(Some(Ok(chunk))) => Some((Ok(chunk), Some(stream))),
                Ok(Some(Err(e))) => Some((Err(std::io::Error::other(e)), None)),
                Ok(None) => None,
                Err(_) => {
                    metrics::counter!("tern_http_timeouts_total", "what" => "body").increment(1);
                    Some((
                        Err(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "the body stalled",
                        )),
                        None,
                    ))
                }
            }
        },
    ))
}

/// Ends an API request that takes longer than `connections.request_timeout_secs`, body
/// included, with `request_timeout` (a client dripping its body cannot hold a handler).
async fn request_timeout(
    State(state): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let limit = Duration::from_secs(state.config.connections.request_timeout_secs);
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => {
            metrics::counter!("tern_http_timeouts_total", "what" => "request").increment(1);
            let mut resp = crate::error::ApiError::new(
                tern_proto::ErrorCode::RequestTimeout,
                "the request took too long",
            )
            .into_response();
            // The rest of a slow body must not be read as the next request.
            resp.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
            resp
        }
    }
}

pub fn router(state: AppState) -> Router {
    let body_limit = state.config.limits.max_http_body_bytes;
    let api = Router::new()
        .route("/v1/accounts", post(accounts::register))
        .route("/v1/sessions", post(accounts::login))
        .route("/v1/sessions/current", delete(accounts::logout))
        .route("/v1/devices", get(accounts::list_devices))
        .route("/v1/devices/{id}", delete(accounts::remove_device))
        .route(
            "/v1/devices/{id}/push",
            put(push::register)
                .get(push::status)
                .delete(push::unregister),
        )
        .route("/v1/push/vapid", get(push::vapid))
        .route("/v1/calls/turn", get(calls::turn))
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
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            request_timeout,
        ));
    Router::new()
        .merge(api)
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
    let store = state.store.ping().await.is_ok();
    if store && state.hub.ready().await && !state.shutdown.is_cancelled() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn metrics(State(state): State<AppState>) -> String {
    state.metrics.render()
}
