//! The error codes of the protocol: one list for the socket (`Error.code`) and HTTP
//! (`{"error": {"code": "..."}}`), each with a fixed HTTP status.

use serde::{Deserialize, Serialize};

/// A typed protocol error code. The numeric value is what the socket carries; the snake_case
/// name is what HTTP carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
#[repr(i32)]
pub enum ErrorCode {
    /// Malformed frame or body, invalid field, a request out of place.
    BadRequest = 1,
    /// No, a wrong, a revoked or an expired token; wrong username or password.
    Unauthorized = 2,
    /// Authenticated, but not allowed to do this.
    Forbidden = 3,
    /// The user, device or conversation does not exist.
    NotFound = 4,
    /// The username is taken.
    Conflict = 5,
    /// The addressed devices are not the recipient's current devices; see `missing_devices` and
    /// `extra_devices`, refresh and retry.
    DeviceMismatch = 6,
    /// A size limit was exceeded.
    TooLarge = 7,
    /// Too many attempts; retry later.
    RateLimited = 8,
    /// The `Hello` named a protocol version this server does not speak.
    UnsupportedVersion = 9,
    /// The server failed; the request may be retried.
    Internal = 10,
    /// The server is shutting down or overloaded; reconnect and retry.
    Unavailable = 11,
    /// Some limit on how many of a thing one may have was reached (e.g. devices per user).
    LimitReached = 12,
    /// The bytes received do not hash to what was declared (media id, tus `Upload-Checksum`).
    ChecksumMismatch = 13,
    /// The user's media quota would be exceeded.
    QuotaExceeded = 14,
    /// A streamed upload without `Content-Length`.
    LengthRequired = 15,
    /// A required precondition header is missing or unsupported (`Tus-Resumable`).
    PreconditionFailed = 16,
    /// A recipient device's mailbox is full (it has been offline long); retry later.
    MailboxFull = 17,
    /// The request took longer than the server allows (a body sent too slowly).
    RequestTimeout = 18,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 18] = [
        ErrorCode::BadRequest,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::NotFound,
        ErrorCode::Conflict,
        ErrorCode::DeviceMismatch,
        ErrorCode::TooLarge,
        ErrorCode::RateLimited,
        ErrorCode::UnsupportedVersion,
        ErrorCode::Internal,
        ErrorCode::Unavailable,
        ErrorCode::LimitReached,
        ErrorCode::ChecksumMismatch,
        ErrorCode::QuotaExceeded,
        ErrorCode::LengthRequired,
        ErrorCode::PreconditionFailed,
        ErrorCode::MailboxFull,
        ErrorCode::RequestTimeout,
    ];

    /// The HTTP status that carries this code.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::BadRequest | ErrorCode::UnsupportedVersion => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict | ErrorCode::DeviceMismatch | ErrorCode::LimitReached => 409,
            ErrorCode::TooLarge | ErrorCode::QuotaExceeded => 413,
            ErrorCode::LengthRequired => 411,
            ErrorCode::PreconditionFailed => 412,
            ErrorCode::RequestTimeout => 408,
            ErrorCode::MailboxFull => 507,
            // tus' "checksum mismatch".
            ErrorCode::ChecksumMismatch => 460,
            ErrorCode::RateLimited => 429,
            ErrorCode::Internal => 500,
            ErrorCode::Unavailable => 503,
        }
    }

    /// The snake_case name used in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Conflict => "conflict",
            ErrorCode::DeviceMismatch => "device_mismatch",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::Internal => "internal",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::LimitReached => "limit_reached",
            ErrorCode::ChecksumMismatch => "checksum_mismatch",
            ErrorCode::QuotaExceeded => "quota_exceeded",
            ErrorCode::LengthRequired => "length_required",
            ErrorCode::PreconditionFailed => "precondition_failed",
            ErrorCode::MailboxFull => "mailbox_full",
            ErrorCode::RequestTimeout => "request_timeout",
        }
    }

    /// Decodes the numeric form carried on the socket.
    pub fn from_i32(v: i32) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| *c as i32 == v)
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_as_number_and_name() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_i32(code as i32), Some(code));
            let json = serde_json::to_string(&code).expect("serialize");
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert!((400..600).contains(&code.http_status()));
        }
        assert_eq!(ErrorCode::from_i32(0), None);
        assert_eq!(ErrorCode::from_i32(999), None);
    }
}
