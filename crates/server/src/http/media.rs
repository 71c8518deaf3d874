//! `/v1/media/{id}`: content-addressed objects (PROTOCOL.md §8.1). Downloads stream with
//! single-range and conditional requests; `PUT` streams the body to disk while hashing it.

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::time::Duration;
use tern_proto::ErrorCode;
use tern_proto::http::MediaObject;
use tern_store::MediaGrant;

use crate::app::AppState;
use crate::error::ApiError;
use crate::http::Authed;
use crate::media::parse_id;
use crate::media::range::{self, RangeOutcome};

/// Upload answers given without reading the whole body (a refusal, or a `PUT` of an object that
/// exists) close the connection: the unread rest of the body must not be taken for the next
/// request, and saying so keeps clients from reusing a connection the server is closing.
pub async fn close_if_body_unread(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let uploads = matches!(
        *req.method(),
        axum::http::Method::PUT | axum::http::Method::PATCH
    );
    let mut resp = next.run(req).await;
    let s = resp.status();
    if uploads && (s == StatusCode::OK || s.is_client_error() || s.is_server_error()) {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

fn etag(id: &str) -> HeaderValue {
    HeaderValue::from_str(&format!("\"{id}\"")).unwrap_or(HeaderValue::from_static("\"\""))
}

fn object_json(id: &str, g: &MediaGrant) -> MediaObject {
    MediaObject {
        id: id.to_owned(),
        size: g.size,
        expires_at_ms: g.expires_at_ms.max(0) as u64,
    }
}

/// Whether an `If-None-Match` / `If-Range` value names this entity tag (or `*`).
fn names_etag(value: Option<&HeaderValue>, tag: &HeaderValue, star: bool) -> bool {
    let Some(v) = value.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let tag = tag.to_str().unwrap_or_default();
    v.split(',')
        .map(str::trim)
        .any(|t| (star && t == "*") || t == tag || t.strip_prefix("W/").is_some_and(|t| t == tag))
}

fn object_headers(h: &mut HeaderMap, tag: HeaderValue) {
    h.insert(header::ETAG, tag);
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=31536000, immutable"),
    );
}

pub async fn head(
    State(state): State<AppState>,
    Authed(_): Authed,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let hash = parse_id(&id)?;
    let object = state.media.object(hash).await?;
    let mut resp = StatusCode::OK.into_response();
    object_headers(resp.headers_mut(), etag(&id.to_ascii_lowercase()));
    resp.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(object.size));
    Ok(resp)
}

pub async fn get(
    State(state): State<AppState>,
    Authed(_): Authed,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let hash = parse_id(&id)?;
    let object = state.media.object(hash).await?;
    let tag = etag(&id.to_ascii_lowercase());
    let size = object.size;
    if names_etag(headers.get(header::IF_NONE_MATCH), &tag, true) {
        let mut resp = StatusCode::NOT_MODIFIED.into_response();
        object_headers(resp.headers_mut(), tag);
        return Ok(resp);
    }
    let range_applies = headers.get(header::IF_RANGE).is_none()
        || names_etag(headers.get(header::IF_RANGE), &tag, false);
    let outcome = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        Some(r) if range_applies => range::parse(r, size),
        _ => RangeOutcome::Full,
    };
    let (status, bytes) = match outcome {
        RangeOutcome::Full => (StatusCode::OK, 0..size),
        RangeOutcome::Partial(r) => (StatusCode::PARTIAL_CONTENT, r),
        RangeOutcome::Unsatisfiable => {
            let mut resp = StatusCode::RANGE_NOT_SATISFIABLE.into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Ok(resp);
        }
    };
    let len = bytes.end - bytes.start;
    let content_range = format!(
        "bytes {}-{}/{size}",
        bytes.start,
        bytes.end.saturating_sub(1)
    );
    let stream = state.media.read(&hash, bytes).await?;
    let mut resp = Response::new(Body::from_stream(stream));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    object_headers(h, tag);
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if status == StatusCode::PARTIAL_CONTENT
        && let Ok(v) = HeaderValue::from_str(&content_range)
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    Ok(resp)
}

pub async fn put(
    State(state): State<AppState>,
    Authed(who): Authed,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let hash = parse_id(&id)?;
    let id = id.to_ascii_lowercase();
    let length = match req.headers().get(header::CONTENT_LENGTH) {
        // HTTP/1.1 framing: no Content-Length and no Transfer-Encoding is an empty body.
        None if !req.headers().contains_key(header::TRANSFER_ENCODING) => Some(0),
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or_else(|| ApiError::bad_request("invalid Content-Length"))?,
        ),
    };
    let body = super::body_stream(
        req.into_body(),
        Duration::from_secs(state.config.connections.body_idle_secs),
    );
    let grant = state.media.put(who.user_id, hash, length, body).await?;
    let status = if grant.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(object_json(&id, &grant))).into_response())
}

pub async fn claim(
    State(state): State<AppState>,
    Authed(who): Authed,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let hash = parse_id(&id)?;
    let grant = state
        .media
        .claim(who.user_id, hash)
        .await?
        .ok_or_else(|| ApiError::new(ErrorCode::NotFound, "media not found"))?;
    Ok(axum::Json(object_json(&id.to_ascii_lowercase(), &grant)).into_response())
}

pub async fn drop_ref(
    State(state): State<AppState>,
    Authed(who): Authed,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let hash = parse_id(&id)?;
    state.media.drop_ref(who.user_id, hash).await?;
    Ok(StatusCode::NO_CONTENT)
}
