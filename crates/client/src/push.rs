//! Push (PROTOCOL.md §10) on the [`Client`]: registering this device's Web Push or
//! UnifiedPush endpoint with the server, and reading the wake-ups it receives.
//!
//! A push says only that messages wait (a count and a random id, encrypted for this device
//! with RFC 8291): the app's answer is to connect, or to [`Client::sync`], which fetches and
//! decrypts them. When the SDK makes the subscription's keys, it keeps them sealed with the
//! profile's key and can decrypt the pushes; keys made elsewhere (a browser, a distributor's
//! app) stay there, and so does the decryption.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde::Deserialize;
use tern_proto::http::{PushKeys, PushSubscriptionRequest, PushSubscriptionResponse};
use tern_webpush::Receiver;

use crate::client::Client;
use crate::error::Error;

/// The largest push body taken (a wake-up is about a hundred bytes; push services cap
/// payloads at 4 KiB).
pub const MAX_PUSH_BODY: usize = 4096;

/// What the server keeps of this device's push subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushRegistration {
    /// The push service's origin (`scheme://host[:port]`); the endpoint itself is not repeated.
    pub origin: String,
    pub updated_at_ms: i64,
    /// Whether this profile made the subscription's keys, and so decrypts its pushes.
    pub decrypts_here: bool,
}

/// One wake-up: messages wait in this device's mailbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushWake {
    /// How many messages waited when the push was sent.
    pub waiting: u32,
    /// Random, different for every push (for an app to tell repeats apart).
    pub id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WakeBody {
    n: u32,
    id: String,
}

impl Client {
    /// Registers `endpoint` (replacing any earlier one) as where the server sends this
    /// device's wake-ups. Without `keys`, the SDK makes the subscription's keys and keeps
    /// them (so [`Client::decrypt_push`] works); with them (unpadded base64url, as a browser's
    /// `PushSubscription` or a UnifiedPush distributor gives them), whoever made them
    /// decrypts.
    pub async fn register_push(
        &self,
        endpoint: &str,
        keys: Option<PushKeys>,
    ) -> Result<PushRegistration, Error> {
        let s = self.saved_session()?;
        let (made, keys) = match keys {
            Some(k) => (None, k),
            None => {
                let r = Receiver::generate();
                let k = PushKeys {
                    p256dh: B64.encode(r.p256dh()),
                    auth: B64.encode(r.auth()),
                };
                (Some(r), k)
            }
        };
        let req = PushSubscriptionRequest {
            endpoint: endpoint.to_owned(),
            expiration_time: None,
            keys,
        };
        let r = self
            .inner
            .http
            .set_push(&s.token, s.device_id, &req)
            .await?;
        let decrypts_here = made.is_some();
        self.inner
            .store
            .run(move |st| st.set_push_receiver(made.as_ref()))
            .await?;
        Ok(registration(r, decrypts_here))
    }

    /// This device's subscription as the server keeps it; `None` if it has none.
    pub async fn push_status(&self) -> Result<Option<PushRegistration>, Error> {
        let s = self.saved_session()?;
        let Some(r) = self.inner.http.push(&s.token, s.device_id).await? else {
            return Ok(None);
        };
        let here = self
            .inner
            .store
            .run(|st| st.push_receiver().map(|r| r.is_some()))
            .await?;
        Ok(Some(registration(r, here)))
    }

    /// Removes this device's subscription (no more pushes); whether it had one.
    pub async fn remove_push(&self) -> Result<bool, Error> {
        let s = self.saved_session()?;
        let removed = self.inner.http.remove_push(&s.token, s.device_id).await?;
        self.inner
            .store
            .run(|st| st.set_push_receiver(None))
            .await?;
        Ok(removed)
    }

    /// The server's VAPID public key (unpadded base64url), for subscribing with a browser's
    /// `applicationServerKey`.
    pub async fn vapid_public_key(&self) -> Result<String, Error> {
        Ok(self.inner.http.vapid().await?.public_key)
    }

    /// Decrypts a push this device received (the body as the push service delivered it,
    /// `aes128gcm`), with the keys [`Client::register_push`] made.
    pub async fn decrypt_push(&self, body: &[u8]) -> Result<PushWake, Error> {
        if body.len() > MAX_PUSH_BODY {
            return Err(Error::Invalid(format!(
                "a push is at most {MAX_PUSH_BODY} bytes"
            )));
        }
        let receiver = self
            .inner
            .store
            .run(|st| st.push_receiver())
            .await?
            .ok_or_else(|| {
                Error::Invalid("this profile holds no push keys (tern push register)".into())
            })?;
        let plain = receiver
            .decrypt(body)
            .map_err(|e| Error::Crypto(format!("cannot decrypt the push: {e}")))?;
        let w: WakeBody = serde_json::from_slice(&plain)
            .map_err(|e| Error::Crypto(format!("not a tern wake-up: {e}")))?;
        Ok(PushWake {
            waiting: w.n,
            id: w.id,
        })
    }
}

fn registration(r: PushSubscriptionResponse, decrypts_here: bool) -> PushRegistration {
    PushRegistration {
        origin: r.origin,
        updated_at_ms: r.updated_at_ms,
        decrypts_here,
    }
}
