//! The one place where failures become protocol errors: [`ApiError`] carries an
//! [`ErrorCode`], a message for humans and, for device mismatches, the device ids. HTTP handlers
//! return it (it renders as `{"error": {...}}` with the code's status); the gateway turns it into
//! an `Error` frame.

use axum::Json;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tern_proto::ErrorCode;
use tern_proto::frames::{Error as ErrorFrame, ServerFrame, server_frame};
use tern_proto::http::{ErrorBody, ErrorDetail};
use tern_store::StoreError;

/// How long a sender is told to wait when a recipient's mailbox is full: the recipient has to
/// come back online and drain it first, which takes minutes or days, not milliseconds.
pub const MAILBOX_FULL_RETRY_SECS: u64 = 60;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    /// How long to wait before retrying: milliseconds in the socket's `Error` frame, whole
    /// seconds (rounded up) in HTTP's `Retry-After` and `retry_after_secs`.
    pub retry_after: Option<std::time::Duration>,
    pub missing_devices: Vec<u64>,
    pub extra_devices: Vec<u64>,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ApiError {
            code,
            message: message.into(),
            retry_after: None,
            missing_devices: Vec::new(),
            extra_devices: Vec::new(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiError::new(ErrorCode::BadRequest, message)
    }

    /// `rate_limited`, to be retried after `wait`.
    pub fn rate_limited(message: impl Into<String>, wait: std::time::Duration) -> Self {
        ApiError {
            retry_after: Some(wait.max(std::time::Duration::from_millis(1))),
            ..ApiError::new(ErrorCode::RateLimited, message)
        }
    }

    /// `unavailable`, to be retried after `secs`.
    pub fn busy(message: impl Into<String>, secs: u64) -> Self {
        ApiError {
            retry_after: Some(std::time::Duration::from_secs(secs.max(1))),
            ..ApiError::new(ErrorCode::Unavailable, message)
        }
    }

    /// The retry-after in whole seconds, rounded up (HTTP).
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after
            .map(|d| (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1))
    }

    pub fn unauthorized() -> Self {
        ApiError::new(
            ErrorCode::Unauthorized,
            "missing, invalid or revoked access token",
        )
    }

    pub fn to_frame(&self, request_id: u64) -> ServerFrame {
        ServerFrame {
            request_id,
            kind: Some(server_frame::Kind::Error(ErrorFrame {
                code: self.code as i32,
                message: self.message.clone(),
                missing_devices: self.missing_devices.clone(),
                extra_devices: self.extra_devices.clone(),
                retry_after_ms: self.retry_after.map_or(0, |d| {
                    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
                }),
            })),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::UsernameTaken => ApiError::new(ErrorCode::Conflict, "username is taken"),
            StoreError::NotFound(what) => {
                ApiError::new(ErrorCode::NotFound, format!("{what} not found"))
            }
            StoreError::DeviceLimit(n) => ApiError::new(
                ErrorCode::LimitReached,
                format!("the limit of {n} devices is reached"),
            ),
            StoreError::DeviceMismatch { missing, extra } => ApiError {
                missing_devices: missing,
                extra_devices: extra,
                ..ApiError::new(
                    ErrorCode::DeviceMismatch,
                    "the addressed devices are not the current devices; refresh and retry",
                )
            },
            StoreError::Invalid(m) => ApiError::bad_request(m),
            StoreError::Forbidden(m) => ApiError::new(ErrorCode::Forbidden, m),
            StoreError::GroupFull(n) => ApiError::new(
                ErrorCode::LimitReached,
                format!("the group is full ({n} members at most)"),
            ),
            StoreError::QuotaExceeded {
                used,
                wanted,
                quota,
            } => ApiError::new(
                ErrorCode::QuotaExceeded,
                format!(
                    "media quota exceeded: {used} of {quota} bytes in use, {wanted} more wanted"
                ),
            ),
            StoreError::UploadLimit(n) => ApiError::new(
                ErrorCode::LimitReached,
                format!("at most {n} incomplete uploads at once"),
            ),
            StoreError::IdentityKeysChanged => ApiError::new(
                ErrorCode::Conflict,
                "this device's identity keys are set and cannot change; a new identity is a new device",
            ),
            StoreError::KeyLimit(n) => ApiError::new(
                ErrorCode::LimitReached,
                format!("at most {n} unclaimed one-time keys per device"),
            ),
            StoreError::MailboxFull { user, .. } => ApiError {
                retry_after: Some(std::time::Duration::from_secs(MAILBOX_FULL_RETRY_SECS)),
                ..ApiError::new(
                    ErrorCode::MailboxFull,
                    format!(
                        "a device of user {user} has too much waiting for it (offline for long); retry later"
                    ),
                )
            },
            StoreError::Closed => {
                ApiError::new(ErrorCode::Unavailable, "the server is shutting down")
            }
            StoreError::Contended { backend } => {
                tracing::warn!(backend, "store writes kept conflicting");
                ApiError {
                    retry_after: Some(std::time::Duration::from_secs(1)),
                    ..ApiError::new(ErrorCode::Unavailable, "the server is busy; retry shortly")
                }
            }
            StoreError::Unavailable { backend, message } => {
                tracing::warn!(backend, error = %message, "store unavailable");
                ApiError {
                    retry_after: Some(std::time::Duration::from_secs(1)),
                    ..ApiError::new(
                        ErrorCode::Unavailable,
                        "the database is unavailable; retry shortly",
                    )
                }
            }
            StoreError::Database { message: m, .. } => {
                // Logged here once; the client only learns that it may retry.
                tracing::error!(error = %m, "store failure");
                ApiError::new(ErrorCode::Internal, "internal error; retry later")
            }
            other => {
                tracing::error!(error = %other, "store failure");
                ApiError::new(ErrorCode::Internal, "internal error; retry later")
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let retry = self.retry_after_secs();
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code,
                message: self.message,
                retry_after_secs: retry,
            },
        };
        let mut resp = (status, Json(body)).into_response();
        if let Some(secs) = retry
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            resp.headers_mut().insert("retry-after", v);
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_map_to_codes() {
        let cases = [
            (StoreError::UsernameTaken, ErrorCode::Conflict),
            (StoreError::NotFound("user"), ErrorCode::NotFound),
            (StoreError::DeviceLimit(3), ErrorCode::LimitReached),
            (StoreError::Invalid("x".into()), ErrorCode::BadRequest),
            (StoreError::Forbidden("x".into()), ErrorCode::Forbidden),
            (StoreError::GroupFull(3), ErrorCode::LimitReached),
            (StoreError::UploadLimit(3), ErrorCode::LimitReached),
            (
                StoreError::QuotaExceeded {
                    used: 1,
                    wanted: 2,
                    quota: 2,
                },
                ErrorCode::QuotaExceeded,
            ),
            (StoreError::Closed, ErrorCode::Unavailable),
            (
                StoreError::Database {
                    backend: "sqlite",
                    message: "disk".into(),
                },
                ErrorCode::Internal,
            ),
            (
                StoreError::Unavailable {
                    backend: "postgres",
                    message: "connection lost".into(),
                },
                ErrorCode::Unavailable,
            ),
        ];
        for (e, code) in cases {
            assert_eq!(ApiError::from(e).code, code);
        }
        let m = ApiError::from(StoreError::DeviceMismatch {
            missing: vec![1],
            extra: vec![2],
        });
        assert_eq!((m.missing_devices, m.extra_devices), (vec![1], vec![2]));
    }
}
