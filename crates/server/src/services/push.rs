//! Push notifications (PROTOCOL.md §10): the server's VAPID key, and each device's Web Push
//! subscription, registered, replaced and removed by the device itself.
//!
//! A subscription names a URL the server will post to: it must pass the sender's
//! [`EndpointPolicy`], so the server is no relay to arbitrary hosts.

use std::sync::Arc;

use base64::Engine;
use tern_proto::http::{PushSubscriptionRequest, PushSubscriptionResponse};
use tern_store::{DeviceAuth, PushSubscription, Store, StoreError};
use tern_webpush::Vapid;

use super::Clock;
use crate::config::PushConfig;
use crate::error::ApiError;
use crate::push::EndpointPolicy;

/// Name of the VAPID key among the store's secrets.
const VAPID_SECRET: &str = "vapid";

/// Decodes base64url, padded or not (browsers give it unpadded; some libraries pad).
fn base64url(what: &str, s: &str) -> Result<Vec<u8>, ApiError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .map_err(|_| ApiError::bad_request(format!("keys.{what} is not base64url")))
}

pub struct Push {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    vapid: Arc<Vapid>,
    policy: EndpointPolicy,
}

impl Push {
    /// Loads the VAPID key (from the configuration, or the store's, made by the first node to
    /// start).
    pub async fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        config: &PushConfig,
    ) -> Result<Push, PushSetupError> {
        let policy = EndpointPolicy::new(config).map_err(PushSetupError::Config)?;
        let vapid = if config.vapid_private_key.is_empty() {
            let candidate = Vapid::generate().secret_bytes();
            let kept = store.server_secret(VAPID_SECRET, candidate).await?;
            Vapid::from_bytes(&kept).map_err(|_| PushSetupError::BadKey("the stored"))?
        } else {
            let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(config.vapid_private_key.trim_end_matches('='))
                .map_err(|_| PushSetupError::BadKey("push.vapid_private_key"))?;
            Vapid::from_bytes(&raw).map_err(|_| PushSetupError::BadKey("push.vapid_private_key"))?
        };
        Ok(Push {
            store,
            clock,
            vapid: Arc::new(vapid),
            policy,
        })
    }

    /// The VAPID key pair, for the sender.
    pub fn vapid(&self) -> Arc<Vapid> {
        self.vapid.clone()
    }

    /// The VAPID public key, unpadded base64url.
    pub fn vapid_public_key(&self) -> String {
        self.vapid.public_key_b64()
    }

    fn own(who: &DeviceAuth, device: u64) -> Result<(), ApiError> {
        if who.device_id != device {
            return Err(ApiError::new(
                tern_proto::ErrorCode::Forbidden,
                "a device manages only its own push subscription",
            ));
        }
        Ok(())
    }

    /// Sets or replaces the subscription of the calling device.
    pub async fn register(
        &self,
        who: &DeviceAuth,
        device: u64,
        req: PushSubscriptionRequest,
    ) -> Result<PushSubscriptionResponse, ApiError> {
        Self::own(who, device)?;
        let origin = self
            .policy
            .check(&req.endpoint)
            .map_err(ApiError::bad_request)?;
        let p256dh = base64url("p256dh", &req.keys.p256dh)?;
        let auth = base64url("auth", &req.keys.auth)?;
        tern_webpush::check_keys(&p256dh, &auth)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let now = self.clock.now_ms();
        if let Some(expires) = req.expiration_time
            && i64::try_from(expires).is_ok_and(|e| e <= now)
        {
            return Err(ApiError::bad_request("the subscription has expired"));
        }
        self.store
            .set_push_subscription(
                device,
                PushSubscription {
                    endpoint: req.endpoint,
                    p256dh,
                    auth,
                    updated_ms: now,
                    expires_ms: req
                        .expiration_time
                        .map(|t| i64::try_from(t).unwrap_or(i64::MAX)),
                },
            )
            .await?;
        metrics::counter!("tern_push_subscriptions_set_total").increment(1);
        Ok(PushSubscriptionResponse {
            origin,
            updated_at_ms: now,
        })
    }

    /// What the server keeps of the calling device's subscription.
    pub async fn status(
        &self,
        who: &DeviceAuth,
        device: u64,
    ) -> Result<PushSubscriptionResponse, ApiError> {
        Self::own(who, device)?;
        let s = self.store.push_subscription(device).await?.ok_or_else(|| {
            ApiError::new(tern_proto::ErrorCode::NotFound, "no push subscription")
        })?;
        Ok(PushSubscriptionResponse {
            origin: url::Url::parse(&s.endpoint)
                .map(|u| u.origin().ascii_serialization())
                .unwrap_or_default(),
            updated_at_ms: s.updated_ms,
        })
    }

    /// Removes the calling device's subscription.
    pub async fn unregister(&self, who: &DeviceAuth, device: u64) -> Result<(), ApiError> {
        Self::own(who, device)?;
        if !self.store.remove_push_subscription(device, None).await? {
            return Err(ApiError::new(
                tern_proto::ErrorCode::NotFound,
                "no push subscription",
            ));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PushSetupError {
    #[error("push: {0}")]
    Config(String),
    #[error("push: {0} VAPID key is not 32 bytes of a P-256 private key in base64url")]
    BadKey(&'static str),
    #[error("push: cannot keep the VAPID key: {0}")]
    Store(#[from] StoreError),
}
