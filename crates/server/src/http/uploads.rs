//! `/v1/uploads`: resumable uploads with the tus 1.0.0 protocol (core, creation, termination,
//! checksum, expiration; PROTOCOL.md §8.2), so that existing tus clients can upload media.

use std::time::{Duration, UNIX_EPOCH};

use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use tern_proto::ErrorCode;
use tern_store::{MediaHash, UploadRecord};

use crate::app::AppState;
use crate::error::ApiError;
use crate::http::Authed;
use crate::media::{Checksum, parse_id};

const TUS_VERSION: &str = "1.0.0";
const EXTENSIONS: &str = "creation,termination,checksum,expiration";
static TUS_RESUMABLE: HeaderName = HeaderName::from_static("tus-resumable");
static UPLOAD_OFFSET: HeaderName = HeaderName::from_static("upload-offset");
static UPLOAD_LENGTH: HeaderName = HeaderName::from_static("upload-length");
static UPLOAD_EXPIRES: HeaderName = HeaderName::from_static("upload-expires");
static MEDIA_ID: HeaderName = HeaderName::from_static("tern-media-id");

/// Every answer says `Tus-Resumable`; every request but `OPTIONS` must say it too.
pub async fn tus_headers(req: Request, next: Next) -> Response {
    let spoken = req
        .headers()
        .get(&TUS_RESUMABLE)
        .is_some_and(|v| v == TUS_VERSION);
    let mut resp = if req.method() != Method::OPTIONS && !spoken {
        let mut r = ApiError::new(
            ErrorCode::PreconditionFailed,
            format!("this endpoint speaks tus: send Tus-Resumable: {TUS_VERSION}"),
        )
        .into_response();
        r.headers_mut()
            .insert("tus-version", HeaderValue::from_static(TUS_VERSION));
        r
    } else {
        next.run(req).await
    };
    resp.headers_mut()
        .insert(TUS_RESUMABLE.clone(), HeaderValue::from_static(TUS_VERSION));
    resp
}

pub async fn options(State(state): State<AppState>) -> Response {
    let mut resp = StatusCode::NO_CONTENT.into_response();
    let h = resp.headers_mut();
    h.insert("tus-version", HeaderValue::from_static(TUS_VERSION));
    h.insert("tus-extension", HeaderValue::from_static(EXTENSIONS));
    h.insert(
        "tus-max-size",
        HeaderValue::from(state.media.config().max_object_bytes),
    );
    h.insert(
        "tus-checksum-algorithm",
        HeaderValue::from_static("sha1,sha256"),
    );
    resp
}

fn header_u64(h: &HeaderMap, name: &HeaderName) -> Result<Option<u64>, ApiError> {
    match h.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse().ok())
            .map(Some)
            .ok_or_else(|| ApiError::bad_request(format!("invalid {name}"))),
    }
}

/// The `sha256` entry of `Upload-Metadata` (`key base64,key base64,…`), if any.
fn expected_hash(h: &HeaderMap) -> Result<Option<MediaHash>, ApiError> {
    let Some(meta) = h.get("upload-metadata") else {
        return Ok(None);
    };
    let meta = meta
        .to_str()
        .map_err(|_| ApiError::bad_request("Upload-Metadata is not ASCII"))?;
    for pair in meta.split(',') {
        let mut parts = pair.trim().splitn(2, ' ');
        if parts.next() != Some("sha256") {
            continue;
        }
        let value = B64
            .decode(parts.next().unwrap_or_default().trim())
            .ok()
            .and_then(|v| String::from_utf8(v).ok())
            .ok_or_else(|| ApiError::bad_request("Upload-Metadata sha256 is not base64 text"))?;
        return parse_id(&value).map(Some);
    }
    Ok(None)
}

fn checksum(h: &HeaderMap) -> Result<Option<Checksum>, ApiError> {
    let Some(v) = h.get("upload-checksum") else {
        return Ok(None);
    };
    let bad = || ApiError::bad_request("Upload-Checksum must be `sha1|sha256 <base64 digest>`");
    let (alg, digest) = v
        .to_str()
        .ok()
        .and_then(|s| s.trim().split_once(' '))
        .ok_or_else(bad)?;
    let digest = B64.decode(digest.trim()).map_err(|_| bad())?;
    match (alg, digest.len()) {
        ("sha1", 20) => Ok(Some(Checksum::Sha1(digest))),
        ("sha256", 32) => Ok(Some(Checksum::Sha256(digest))),
        _ => Err(bad()),
    }
}

fn expires(up: &UploadRecord) -> Option<HeaderValue> {
    let at = UNIX_EPOCH + Duration::from_millis(up.expires_at_ms.max(0) as u64);
    HeaderValue::from_str(&httpdate::fmt_http_date(at)).ok()
}

pub async fn create(
    State(state): State<AppState>,
    Authed(who): Authed,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if headers.contains_key("upload-defer-length") {
        return Err(ApiError::bad_request(
            "deferred length is not supported: send Upload-Length",
        ));
    }
    let length = header_u64(&headers, &UPLOAD_LENGTH)?
        .ok_or_else(|| ApiError::bad_request("Upload-Length is required"))?;
    let expected = expected_hash(&headers)?;
    let up = state
        .media
        .create_upload(who.user_id, length, expected)
        .await?;
    let mut resp = StatusCode::CREATED.into_response();
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/uploads/{}", up.id)) {
        h.insert(header::LOCATION, v);
    }
    if let Some(v) = expires(&up) {
        h.insert(UPLOAD_EXPIRES.clone(), v);
    }
    Ok(resp)
}

pub async fn head(
    State(state): State<AppState>,
    Authed(who): Authed,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (up, offset) = state.media.upload(who.user_id, &id).await?;
    let mut resp = StatusCode::OK.into_response();
    let h = resp.headers_mut();
    h.insert(UPLOAD_OFFSET.clone(), HeaderValue::from(offset));
    h.insert(UPLOAD_LENGTH.clone(), HeaderValue::from(up.length));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(v) = expires(&up) {
        h.insert(UPLOAD_EXPIRES.clone(), v);
    }
    if let Some(m) = up.media
        && let Ok(v) = HeaderValue::from_str(&hex::encode(m))
    {
        h.insert(MEDIA_ID.clone(), v);
    }
    Ok(resp)
}

pub async fn patch(
    State(state): State<AppState>,
    Authed(who): Authed,
    Path(id): Path<String>,
    req: Request,
) -> Result<Response, ApiError> {
    let headers = req.headers();
    if headers
        .get(header::CONTENT_TYPE)
        .is_none_or(|v| v != "application/offset+octet-stream")
    {
        let mut r = ApiError::bad_request("Content-Type must be application/offset+octet-stream")
            .into_response();
        *r.status_mut() = StatusCode::UNSUPPORTED_MEDIA_TYPE;
        return Ok(r);
    }
    let offset = header_u64(headers, &UPLOAD_OFFSET)?
        .ok_or_else(|| ApiError::bad_request("Upload-Offset is required"))?;
    let checksum = checksum(headers)?;
    let body = super::body_stream(
        req.into_body(),
        Duration::from_secs(state.config.connections.body_idle_secs),
    );
    let done = state
        .media
        .append(who.user_id, &id, offset, body, checksum)
        .await?;
    let mut resp = StatusCode::NO_CONTENT.into_response();
    let h = resp.headers_mut();
    h.insert(UPLOAD_OFFSET.clone(), HeaderValue::from(done.offset));
    if let Some(g) = done.completed
        && let Ok(v) = HeaderValue::from_str(&hex::encode(g.id))
    {
        h.insert(MEDIA_ID.clone(), v);
    }
    Ok(resp)
}

pub async fn terminate(
    State(state): State<AppState>,
    Authed(who): Authed,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.media.terminate(who.user_id, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
