//! The media HTTP calls (PROTOCOL.md §8.1, §8.2): object `HEAD`/`GET`/claim and tus uploads.
//!
//! A client of its own: bodies stream for minutes, so there is no bound on a whole request,
//! only on connecting and on every read (`request_timeout`). Small calls get
//! `request_timeout` as a whole; a `PATCH` gets time in proportion to its length.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use futures_util::StreamExt as _;
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use tern_proto::ErrorCode;
use tern_proto::http::MediaObject;
use tokio::io::{AsyncReadExt as _, AsyncSeekExt as _};

use crate::error::Error;
use crate::http::checked;

const TUS_RESUMABLE: &str = "1.0.0";
/// Bytes per read when streaming a file into a request body.
const BODY_READ: usize = 64 * 1024;
/// The slowest upload rate a `PATCH` is given time for, past its fixed allowance.
const MIN_UPLOAD_RATE: u64 = 16 * 1024;

/// Where a tus upload stands (`HEAD /v1/uploads/{upload}`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UploadState {
    pub offset: u64,
    pub length: u64,
    /// Set once the upload is complete: the object it became.
    pub media_id: Option<String>,
}

/// What a `PATCH` achieved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Patched {
    pub offset: u64,
    pub media_id: Option<String>,
}

#[derive(Clone)]
pub(crate) struct MediaHttp {
    client: reqwest::Client,
    base: String,
    timeout: Duration,
}

impl MediaHttp {
    pub fn new(base: &str, timeout: Duration) -> Result<MediaHttp, Error> {
        let client = reqwest::Client::builder()
            .connect_timeout(timeout)
            // Below the server's header timeout (10 s by default), which closes idle
            // keep-alive connections: a request must not go out on one being closed.
            .pool_idle_timeout(Duration::from_secs(5))
            .read_timeout(timeout)
            .build()
            .map_err(|e| Error::Network(format!("cannot build HTTP client: {e}")))?;
        Ok(MediaHttp {
            client,
            base: base.to_owned(),
            timeout,
        })
    }

    fn request(&self, method: Method, url: &str, token: &str) -> RequestBuilder {
        self.client.request(method, url).bearer_auth(token)
    }

    /// A `HEAD`: `None` if the server does not have the thing, else the checked answer.
    async fn head(&self, rb: RequestBuilder) -> Result<Option<reqwest::Response>, Error> {
        let resp = rb.timeout(self.timeout).send().await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        Ok(Some(checked(resp).await?))
    }

    fn object_url(&self, id: &str) -> String {
        format!("{}/v1/media/{id}", self.base)
    }

    fn tus(&self, method: Method, url: &str, token: &str) -> RequestBuilder {
        self.request(method, url, token)
            .header("Tus-Resumable", TUS_RESUMABLE)
    }

    /// The object's size if it exists. `id` must be validated (it goes into the path).
    pub async fn head_media(&self, token: &str, id: &str) -> Result<Option<u64>, Error> {
        let rb = self.request(Method::HEAD, &self.object_url(id), token);
        let Some(resp) = self.head(rb).await? else {
            return Ok(None);
        };
        Ok(Some(header_u64(&resp, "content-length")?))
    }

    /// Takes (or renews) a reference to an existing object.
    pub async fn claim(&self, token: &str, id: &str) -> Result<MediaObject, Error> {
        let url = format!("{}/claim", self.object_url(id));
        let resp = self
            .request(Method::POST, &url, token)
            .timeout(self.timeout)
            .send()
            .await?;
        Ok(checked(resp).await?.json().await?)
    }

    /// Creates a tus upload of `length` bytes that must hash to `id`; returns its URL.
    pub async fn create_upload(&self, token: &str, length: u64, id: &str) -> Result<String, Error> {
        let url = format!("{}/v1/uploads", self.base);
        let resp = self
            .tus(Method::POST, &url, token)
            .header("Upload-Length", length)
            .header("Upload-Metadata", format!("sha256 {}", B64.encode(id)))
            .timeout(self.timeout)
            .send()
            .await?;
        let resp = checked(resp).await?;
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Error::Protocol("upload created without a Location".into()))?;
        self.upload_url(location)
    }

    /// The absolute URL of an upload from its `Location`, which must be on this server (the
    /// bearer token goes wherever it points).
    fn upload_url(&self, location: &str) -> Result<String, Error> {
        let url = if location.starts_with('/') {
            format!("{}{location}", self.base)
        } else {
            location.to_owned()
        };
        let prefix = format!("{}/v1/uploads/", self.base);
        match url.strip_prefix(&prefix) {
            Some(rest) if !rest.is_empty() && !rest.contains(['/', '?', '#']) => Ok(url),
            _ => Err(Error::Protocol(format!(
                "upload location {location:?} is not an upload of this server"
            ))),
        }
    }

    /// Where an upload stands; `None` if the server does not know it (expired, or another
    /// account's).
    pub async fn upload_state(&self, token: &str, url: &str) -> Result<Option<UploadState>, Error> {
        let Some(resp) = self.head(self.tus(Method::HEAD, url, token)).await? else {
            return Ok(None);
        };
        Ok(Some(UploadState {
            offset: header_u64(&resp, "upload-offset")?,
            length: header_u64(&resp, "upload-length")?,
            media_id: header_str(&resp, "tern-media-id"),
        }))
    }

    /// Appends `len` bytes of `file` from `offset` (the upload's current offset), streamed
    /// from disk, with their SHA-256 as `Upload-Checksum`. `sent` counts the bytes handed to
    /// the connection, for progress.
    #[allow(clippy::too_many_arguments)]
    pub async fn patch(
        &self,
        token: &str,
        url: &str,
        file: &Path,
        offset: u64,
        len: u64,
        sha256: &[u8; 32],
        sent: Arc<AtomicU64>,
    ) -> Result<Patched, Error> {
        let mut f = tokio::fs::File::open(file)
            .await
            .map_err(|e| Error::Store(format!("cannot read {}: {e}", file.display())))?;
        f.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(|e| Error::Store(format!("cannot read {}: {e}", file.display())))?;
        let body =
            tokio_util::io::ReaderStream::with_capacity(f.take(len), BODY_READ).map(move |chunk| {
                if let Ok(c) = &chunk {
                    sent.fetch_add(c.len() as u64, Ordering::Relaxed);
                }
                chunk
            });
        let allowance = self.timeout + Duration::from_secs(len / MIN_UPLOAD_RATE);
        let resp = self
            .tus(Method::PATCH, url, token)
            .header("Content-Type", "application/offset+octet-stream")
            .header("Content-Length", len)
            .header("Upload-Offset", offset)
            .header("Upload-Checksum", format!("sha256 {}", B64.encode(sha256)))
            .body(reqwest::Body::wrap_stream(body))
            .timeout(allowance)
            .send()
            .await?;
        let resp = checked(resp).await?;
        Ok(Patched {
            offset: header_u64(&resp, "upload-offset")?,
            media_id: header_str(&resp, "tern-media-id"),
        })
    }

    /// Abandons an upload (its bytes stop counting against the quota).
    pub async fn delete_upload(&self, token: &str, url: &str) -> Result<(), Error> {
        let resp = self
            .tus(Method::DELETE, url, token)
            .timeout(self.timeout)
            .send()
            .await?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(());
        }
        checked(resp).await?;
        Ok(())
    }

    /// `GET` of an object from byte `from` on. `200`, `206` and `416` come back as they are
    /// for the caller to interpret; other failures are errors.
    pub async fn get(&self, token: &str, id: &str, from: u64) -> Result<Response, Error> {
        let mut rb = self.request(Method::GET, &self.object_url(id), token);
        if from > 0 {
            rb = rb.header("Range", format!("bytes={from}-"));
        }
        let resp = rb.send().await?;
        match resp.status() {
            StatusCode::OK | StatusCode::PARTIAL_CONTENT | StatusCode::RANGE_NOT_SATISFIABLE => {
                Ok(resp)
            }
            _ => checked(resp).await,
        }
    }
}

fn header_str(resp: &Response, name: &str) -> Option<String> {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_owned())
}

fn header_u64(resp: &Response, name: &str) -> Result<u64, Error> {
    header_str(resp, name)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::Protocol(format!("missing or invalid {name} header")))
}

/// The start of a `206`'s `Content-Range: bytes a-b/n`.
pub(crate) fn range_start(resp: &Response) -> Option<u64> {
    let v = header_str(resp, "content-range")?;
    let range = v.strip_prefix("bytes ")?;
    range.split_once('-')?.0.trim().parse().ok()
}

/// Whether a failed upload request may be retried after asking the server where it stands.
pub(crate) fn retryable(e: &Error) -> bool {
    e.is_transient()
        || matches!(
            e.code(),
            // 409: the offset moved, or another request is writing; 460: the chunk was
            // damaged on the way and discarded.
            Some(ErrorCode::Conflict | ErrorCode::ChecksumMismatch)
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_locations_must_stay_on_the_server() {
        let h = MediaHttp::new("http://127.0.0.1:7070", Duration::from_secs(1)).expect("client");
        assert_eq!(
            h.upload_url("/v1/uploads/abc").expect("relative"),
            "http://127.0.0.1:7070/v1/uploads/abc"
        );
        assert_eq!(
            h.upload_url("http://127.0.0.1:7070/v1/uploads/abc")
                .expect("absolute"),
            "http://127.0.0.1:7070/v1/uploads/abc"
        );
        for bad in [
            "http://evil.example/v1/uploads/abc",
            "/v1/uploads/",
            "/v1/uploads/a/../../accounts",
            "/v1/media/abc",
            "//evil.example/v1/uploads/abc",
            "http://127.0.0.1:70700/v1/uploads/abc",
        ] {
            assert!(h.upload_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn retryable_upload_errors() {
        assert!(retryable(&Error::Network("reset".into())));
        assert!(retryable(&Error::server(ErrorCode::Conflict, "offset")));
        assert!(retryable(&Error::server(ErrorCode::ChecksumMismatch, "x")));
        assert!(retryable(&Error::server(ErrorCode::Unavailable, "x")));
        assert!(!retryable(&Error::server(ErrorCode::QuotaExceeded, "x")));
        assert!(!retryable(&Error::server(ErrorCode::TooLarge, "x")));
        assert!(!retryable(&Error::server(ErrorCode::LimitReached, "x")));
        assert!(!retryable(&Error::server(ErrorCode::Unauthorized, "x")));
    }
}
