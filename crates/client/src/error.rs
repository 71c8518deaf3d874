//! The SDK's one error type. Server refusals keep their protocol [`ErrorCode`] so that apps can
//! react to `rate_limited`, `conflict`, `unauthorized` … without parsing messages.

use tern_proto::ErrorCode;

use crate::media::MediaError;
use crate::types::CloseReason;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server refused the request (HTTP error body or socket `Error` frame).
    #[error("{code}: {message}")]
    Server {
        code: ErrorCode,
        message: String,
        /// Seconds to wait before retrying, with `rate_limited`, `unavailable` and
        /// `mailbox_full` (rounded up from the socket's milliseconds).
        retry_after_secs: Option<u64>,
    },
    /// The call needs a session: `register` or `login` first.
    #[error("not logged in")]
    NotLoggedIn,
    /// The call needs the connection: `connect` first.
    #[error("not connected")]
    NotConnected,
    /// The connection task has ended for good (closed, logged out, unauthorized).
    #[error("connection closed: {0}")]
    Closed(CloseReason),
    /// Bad input, caught before anything was sent.
    #[error("invalid input: {0}")]
    Invalid(String),
    /// The server could not be reached or the transfer failed; retrying may help.
    #[error("network error: {0}")]
    Network(String),
    /// The server answered something this client does not understand.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The local state (SQLite or the profile directory) failed.
    #[error("local store error: {0}")]
    Store(String),
    /// A file could not be sent or downloaded: unreadable, changed, or (downloading) not what
    /// the message names — see [`MediaError`].
    #[error(transparent)]
    Media(#[from] MediaError),
    /// End-to-end encryption failed: keys missing or refused, state unreadable (wrong
    /// passphrase or key file), a ciphertext that does not decrypt.
    #[error("encryption: {0}")]
    Crypto(String),
}

impl Error {
    /// The protocol error code, when the server refused the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            Error::Server { code, .. } => Some(*code),
            Error::Closed(CloseReason::Unauthorized) => Some(ErrorCode::Unauthorized),
            Error::Closed(CloseReason::UnsupportedVersion) => Some(ErrorCode::UnsupportedVersion),
            _ => None,
        }
    }

    /// A stable snake_case name for scripts: the protocol code for server refusals, else the
    /// kind of local failure.
    pub fn code_str(&self) -> &'static str {
        if let Some(code) = self.code() {
            return code.as_str();
        }
        match self {
            Error::NotLoggedIn => "not_logged_in",
            Error::NotConnected => "not_connected",
            Error::Closed(_) => "closed",
            Error::Invalid(_) => "invalid_input",
            Error::Network(_) => "network",
            Error::Protocol(_) => "protocol",
            Error::Store(_) => "store",
            Error::Media(m) => m.code_str(),
            Error::Crypto(_) => "crypto",
            Error::Server { code, .. } => code.as_str(),
        }
    }

    pub(crate) fn server(code: ErrorCode, message: impl Into<String>) -> Error {
        Error::Server {
            code,
            message: message.into(),
            retry_after_secs: None,
        }
    }

    /// A socket `Error` frame, with its retry-after.
    pub(crate) fn from_frame(e: &tern_proto::frames::Error) -> Error {
        Error::Server {
            code: ErrorCode::from_i32(e.code).unwrap_or(ErrorCode::Internal),
            message: e.message.clone(),
            retry_after_secs: (e.retry_after_ms > 0).then(|| e.retry_after_ms.div_ceil(1000)),
        }
    }

    /// Whether retrying the same request later may succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Network(_) | Error::NotConnected => true,
            Error::Server { code, .. } => matches!(
                code,
                ErrorCode::Internal
                    | ErrorCode::Unavailable
                    | ErrorCode::RateLimited
                    | ErrorCode::MailboxFull
                    | ErrorCode::RequestTimeout
            ),
            _ => false,
        }
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::Store(e.to_string())
    }
}

impl From<reqwest::Error> for Error {
    fn from(e: reqwest::Error) -> Self {
        if e.is_decode() {
            Error::Protocol(e.to_string())
        } else {
            Error::Network(e.to_string())
        }
    }
}
