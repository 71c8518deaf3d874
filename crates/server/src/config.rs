//! The server's configuration: one typed struct with documented defaults. Sources, later ones
//! winning: built-in defaults, an optional TOML file (`--config`, `TERN_CONFIG`), then the
//! environment and flags for the common settings (`--listen`/`TERN_LISTEN`,
//! `--data-dir`/`TERN_DATA_DIR`). Unknown keys in the file are refused.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tern_proto::Limits;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to listen on; port 0 picks a free port (the log states the bound address).
    pub listen: SocketAddr,
    /// Directory for the database (`tern.db`) and, later, media.
    pub data_dir: PathBuf,
    /// Seconds between batched writes of last-seen times.
    pub last_seen_flush_secs: u64,
    /// Login attempts allowed per client address per minute (per username: see `limits`).
    pub login_attempts_per_minute_per_address: u32,
    /// Read connections of the SQLite store.
    pub sqlite_readers: usize,
    /// Every size and count limit.
    pub limits: Limits,
    /// argon2id cost of password hashes.
    pub password_hashing: crate::auth::PasswordCost,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            data_dir: PathBuf::from("tern-data"),
            last_seen_flush_secs: 5,
            login_attempts_per_minute_per_address: 100,
            sqlite_readers: 4,
            limits: Limits::default(),
            password_hashing: crate::auth::PasswordCost::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Reads a TOML file over the defaults.
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Applies `key=value` overrides, keys as dotted paths (`limits.max_frame_bytes`). Values
    /// are TOML (`5`, `"text"`, `true`); a bare word is taken as a string. Unknown keys and
    /// values of the wrong type are refused.
    pub fn with_overrides<'a>(
        self,
        overrides: impl IntoIterator<Item = (String, &'a str)>,
    ) -> Result<Config, ConfigError> {
        let mut root =
            toml::Value::try_from(&self).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        for (key, raw) in overrides {
            let mut node = &mut root;
            for part in key.split('.') {
                node = node
                    .get_mut(part)
                    .ok_or_else(|| ConfigError::Invalid(format!("unknown setting {key:?}")))?;
            }
            let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(raw.to_owned()));
            if std::mem::discriminant(node) != std::mem::discriminant(&value) {
                return Err(ConfigError::Invalid(format!(
                    "{key}: expected a {}, got {raw:?}",
                    node.type_str()
                )));
            }
            *node = value;
        }
        root.try_into()
            .map_err(|e: toml::de::Error| ConfigError::Invalid(e.to_string()))
    }

    /// Overrides from the environment: `TERN_SET_<KEY>` with `__` for a dot, e.g.
    /// `TERN_SET_LIMITS__MAX_FRAME_BYTES=131072`.
    pub fn env_overrides(vars: impl Iterator<Item = (String, String)>) -> Vec<(String, String)> {
        vars.filter_map(|(k, v)| {
            let key = k
                .strip_prefix("TERN_SET_")?
                .to_ascii_lowercase()
                .replace("__", ".");
            Some((key, v))
        })
        .collect()
    }

    /// Checks values that would make the server misbehave.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if l.max_frame_bytes < 1024 {
            return bad("limits.max_frame_bytes must be at least 1024");
        }
        if l.max_body_bytes == 0 || l.max_body_bytes >= l.max_frame_bytes {
            return bad("limits.max_body_bytes must be positive and below max_frame_bytes");
        }
        if l.max_devices_per_user == 0 || l.outbound_queue == 0 || l.max_group_members < 2 {
            return bad(
                "limits.max_devices_per_user and limits.outbound_queue must be positive, limits.max_group_members at least 2",
            );
        }
        if l.send_timeout_secs == 0 || l.handshake_timeout_secs == 0 {
            return bad(
                "limits.send_timeout_secs and limits.handshake_timeout_secs must be positive",
            );
        }
        if l.heartbeat_secs == 0 || l.idle_timeout_secs <= l.heartbeat_secs {
            return bad("limits.idle_timeout_secs must exceed limits.heartbeat_secs (> 0)");
        }
        if l.login_attempts_per_minute == 0 || self.login_attempts_per_minute_per_address == 0 {
            return bad("login attempt limits must be positive");
        }
        if let Err(e) = self.password_hashing.hasher() {
            return Err(ConfigError::Invalid(format!("password_hashing: {e}")));
        }
        if self.last_seen_flush_secs == 0 || self.sqlite_readers == 0 {
            return bad("last_seen_flush_secs and sqlite_readers must be positive");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_file_is_the_defaults() {
        let text = include_str!("../../../ternd.example.toml");
        assert_eq!(Config::from_toml(text).expect("parses"), Config::default());
        Config::default().validate().expect("defaults are valid");
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(Config::from_toml("listn = \"127.0.0.1:1\"").is_err());
        assert!(Config::from_toml("[limits]\nmax_frame = 5").is_err());
    }

    #[test]
    fn partial_file_keeps_other_defaults() {
        let c = Config::from_toml("[limits]\nmax_body_bytes = 1000").expect("parses");
        assert_eq!(c.limits.max_body_bytes, 1000);
        assert_eq!(c.listen, Config::default().listen);
    }

    #[test]
    fn overrides_by_dotted_key() {
        let c = Config::default()
            .with_overrides([
                ("limits.max_body_bytes".to_owned(), "1000"),
                ("listen".to_owned(), "\"127.0.0.1:9\""),
                ("data_dir".to_owned(), "/tmp/x"),
            ])
            .expect("applies");
        assert_eq!(c.limits.max_body_bytes, 1000);
        assert_eq!(c.listen.port(), 9);
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
        let bad = [
            ("limits.nope", "1"),
            ("limits.max_body_bytes", "lots"),
            ("nope", "1"),
        ];
        for (k, v) in bad {
            assert!(
                Config::default()
                    .with_overrides([(k.to_owned(), v)])
                    .is_err(),
                "{k}={v}"
            );
        }
        let env = Config::env_overrides(
            [
                ("TERN_SET_LIMITS__OUTBOUND_QUEUE".to_owned(), "9".to_owned()),
                ("TERN_LOG".to_owned(), "x".to_owned()),
            ]
            .into_iter(),
        );
        assert_eq!(
            env,
            vec![("limits.outbound_queue".to_owned(), "9".to_owned())]
        );
    }

    #[test]
    fn invalid_values_are_refused() {
        let mut c = Config::default();
        c.limits.max_body_bytes = c.limits.max_frame_bytes;
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.limits.idle_timeout_secs = 1;
        assert!(c.validate().is_err());
    }
}
