//! Calls (PROTOCOL.md §11): credentials for the TURN server that relays call media.
//!
//! The TURN REST API scheme, which coturn implements (`use-auth-secret`,
//! `static-auth-secret`): the server and the TURN server share a secret; credentials are
//! `username = "<expiry>:<user id>"` and `password = base64(HMAC-SHA1(secret, username))`, so
//! the TURN server checks them without asking anyone, and refuses them once `expiry` (Unix
//! seconds) has passed. Nothing is stored.

use std::sync::Arc;

use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use tern_proto::ErrorCode;
use tern_proto::http::TurnCredentials;
use tern_store::DeviceAuth;

use super::Clock;
use crate::config::CallsConfig;
use crate::error::ApiError;
use crate::ratelimit::RateLimiter;

pub struct Calls {
    config: CallsConfig,
    clock: Arc<dyn Clock>,
    rate_limits: Arc<dyn RateLimiter>,
}

/// The TURN REST API password for `username` (`None` never happens: HMAC takes keys of any
/// length).
pub fn turn_password(secret: &str, username: &str) -> Option<String> {
    let mut mac = <Hmac<sha1::Sha1> as KeyInit>::new_from_slice(secret.as_bytes()).ok()?;
    mac.update(username.as_bytes());
    Some(base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
}

impl Calls {
    pub fn new(
        config: CallsConfig,
        clock: Arc<dyn Clock>,
        rate_limits: Arc<dyn RateLimiter>,
    ) -> Calls {
        Calls {
            config,
            clock,
            rate_limits,
        }
    }

    /// Fresh TURN credentials for the calling user.
    pub async fn turn(&self, who: &DeviceAuth) -> Result<TurnCredentials, ApiError> {
        if self.config.turn_secret.is_empty() {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                "this server offers no TURN relay (calls.turn_secret is not set)",
            ));
        }
        if let Err(wait) = self.rate_limits.turn(who.user_id).await {
            return Err(ApiError::rate_limited(
                "too many TURN credentials asked for; retry later",
                wait,
            ));
        }
        let expiry = self.clock.now_ms() / 1000 + self.config.turn_ttl_secs as i64;
        let username = format!("{expiry}:{}", who.user_id);
        metrics::counter!("tern_turn_credentials_total").increment(1);
        let password = turn_password(&self.config.turn_secret, &username).ok_or_else(|| {
            ApiError::new(ErrorCode::Internal, "cannot compute the TURN password")
        })?;
        Ok(TurnCredentials {
            password,
            username,
            ttl: self.config.turn_ttl_secs,
            uris: self.config.turn_uris.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_the_turn_rest_api_hmac() {
        // openssl: printf '1796415619:42' | openssl dgst -sha1 -hmac s3cret -binary | base64
        assert_eq!(
            turn_password("s3cret", "1796415619:42").as_deref(),
            Some("2XzsAVcLS1uvEt6as8H9y1YNWy8=")
        );
    }
}
