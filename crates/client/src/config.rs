//! Client configuration: one typed struct with documented defaults, so callers (the CLI, tests,
//! apps) never pass loose booleans or magic numbers into the SDK.

use std::path::PathBuf;
use std::time::Duration;

/// How to reach the server and where to keep local state.
#[derive(Clone)]
pub struct ClientConfig {
    /// Base URL of the server's HTTP API, e.g. `http://127.0.0.1:7070`. The WebSocket URL is
    /// derived from it (`ws://127.0.0.1:7070/v1/ws`).
    pub server: String,
    /// The profile directory. Local state lives in `home/state.db`; it is created if missing.
    pub home: PathBuf,
    /// The name given to a device created by `register`/`login` (default `tern-sdk`).
    pub device_name: String,
    /// First reconnect delay (default 250 ms); doubled after every failed attempt.
    pub reconnect_initial: Duration,
    /// Upper bound of the reconnect delay (default 30 s).
    pub reconnect_max: Duration,
    /// Bound on each HTTP request and on the WebSocket handshake (default 15 s).
    pub request_timeout: Duration,
    /// Protects the profile's encryption keys at rest (argon2id). Without one (the default),
    /// a random key in `home/store.key` does; a profile keeps the protection it was created
    /// with.
    pub passphrase: Option<String>,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("server", &self.server)
            .field("home", &self.home)
            .field("device_name", &self.device_name)
            .field("reconnect_initial", &self.reconnect_initial)
            .field("reconnect_max", &self.reconnect_max)
            .field("request_timeout", &self.request_timeout)
            .field("passphrase", &self.passphrase.as_ref().map(|_| "<secret>"))
            .finish()
    }
}

impl ClientConfig {
    pub fn new(server: impl Into<String>, home: impl Into<PathBuf>) -> Self {
        ClientConfig {
            server: server.into(),
            home: home.into(),
            device_name: "tern-sdk".to_owned(),
            reconnect_initial: Duration::from_millis(250),
            reconnect_max: Duration::from_secs(30),
            request_timeout: Duration::from_secs(15),
            passphrase: None,
        }
    }

    /// The server URL without a trailing slash.
    pub(crate) fn base_url(&self) -> &str {
        self.server.trim_end_matches('/')
    }

    /// `http://h:p` → `ws://h:p/v1/ws` (and `https` → `wss`).
    pub(crate) fn ws_url(&self) -> String {
        let base = self.base_url();
        if let Some(rest) = base.strip_prefix("https://") {
            format!("wss://{rest}/v1/ws")
        } else if let Some(rest) = base.strip_prefix("http://") {
            format!("ws://{rest}/v1/ws")
        } else {
            format!("ws://{base}/v1/ws")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_url_is_derived_from_the_http_url() {
        let cases = [
            ("http://127.0.0.1:7070", "ws://127.0.0.1:7070/v1/ws"),
            ("http://127.0.0.1:7070/", "ws://127.0.0.1:7070/v1/ws"),
            ("https://chat.example", "wss://chat.example/v1/ws"),
            ("localhost:1", "ws://localhost:1/v1/ws"),
        ];
        for (server, want) in cases {
            assert_eq!(ClientConfig::new(server, "/tmp").ws_url(), want, "{server}");
        }
    }
}
