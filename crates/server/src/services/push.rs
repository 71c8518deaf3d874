//! Push notifications (PROTOCOL.md §10): the server's VAPID key, and each device's Web Push
//! subscription, registered, replaced and removed by the device itself.
//!
//! A subscription names a URL the server will post to: an [`EndpointPolicy`] keeps the server
//! from being made a relay to arbitrary hosts (only `https`, no credentials in the URL, no IP
//! literal of this machine or a private network, and the configured origins if there is a
//! list). Names that resolve to private addresses are refused when a push is sent.

use std::net::IpAddr;
use std::sync::Arc;

use base64::Engine;
use tern_proto::http::{PushSubscriptionRequest, PushSubscriptionResponse};
use tern_store::{DeviceAuth, PushSubscription, Store, StoreError};
use tern_webpush::Vapid;

use super::Clock;
use crate::config::PushConfig;
use crate::error::ApiError;

/// Name of the VAPID key among the store's secrets.
const VAPID_SECRET: &str = "vapid";
/// The longest endpoint URL taken (push services use a few hundred bytes).
pub const MAX_ENDPOINT_BYTES: usize = 1024;

/// Which endpoint URLs a subscription may name.
#[derive(Debug, Clone)]
pub struct EndpointPolicy {
    /// `(scheme, host, port)`; a host starting with `*.` stands for its subdomains.
    allowed: Vec<(String, String, u16)>,
    insecure_loopback: bool,
}

/// Whether `ip` is this machine's, or a private, link-local, shared or special network's.
pub fn is_local(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                // 0.0.0.0/8 ("this network"), 100.64.0.0/10 (carrier-grade NAT) and
                // 198.18.0.0/15 (benchmarking).
                || v4.octets()[0] == 0
                || (v4.octets()[0] == 100 && (v4.octets()[1] & 0xc0) == 64)
                || (v4.octets()[0] == 198 && (v4.octets()[1] & 0xfe) == 18)
        }
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || v6.is_unique_local()
                || v6.is_unicast_link_local()
        }
    }
}

fn host_ip(host: &url::Host<&str>) -> Option<IpAddr> {
    match host {
        url::Host::Ipv4(v4) => Some(IpAddr::V4(*v4)),
        url::Host::Ipv6(v6) => Some(IpAddr::V6(*v6)),
        url::Host::Domain(_) => None,
    }
}

impl EndpointPolicy {
    pub fn new(config: &PushConfig) -> Result<EndpointPolicy, String> {
        let mut allowed = Vec::new();
        for origin in &config.allowed_origins {
            let wild = origin.contains("://*.");
            let parsed = url::Url::parse(&origin.replacen("://*.", "://", 1))
                .map_err(|e| format!("allowed_origins: {origin:?} is not an origin: {e}"))?;
            let (Some(host), Some(port)) = (parsed.host_str(), parsed.port_or_known_default())
            else {
                return Err(format!("allowed_origins: {origin:?} has no host"));
            };
            if parsed.path() != "/" || parsed.query().is_some() || !parsed.username().is_empty() {
                return Err(format!(
                    "allowed_origins: {origin:?} is more than an origin"
                ));
            }
            let host = if wild {
                format!("*.{host}")
            } else {
                host.to_owned()
            };
            allowed.push((parsed.scheme().to_owned(), host, port));
        }
        Ok(EndpointPolicy {
            allowed,
            insecure_loopback: config.allow_insecure_loopback,
        })
    }

    /// The endpoint's origin (`scheme://host[:port]`, the VAPID audience) if it may be used.
    pub fn check(&self, endpoint: &str) -> Result<String, String> {
        if endpoint.len() > MAX_ENDPOINT_BYTES {
            return Err(format!(
                "the endpoint is longer than {MAX_ENDPOINT_BYTES} bytes"
            ));
        }
        let url =
            url::Url::parse(endpoint).map_err(|e| format!("the endpoint is not a URL: {e}"))?;
        let host = url
            .host()
            .ok_or_else(|| "the endpoint has no host".to_owned())?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err("the endpoint must not carry credentials".into());
        }
        if url.fragment().is_some() {
            return Err("the endpoint must not have a fragment".into());
        }
        let loopback = match host_ip(&host) {
            Some(ip) => ip.to_canonical().is_loopback(),
            None => url.host_str() == Some("localhost"),
        };
        let insecure_ok = self.insecure_loopback && loopback;
        match url.scheme() {
            "https" => {}
            "http" if insecure_ok => {}
            _ => return Err("the endpoint must be an https URL".into()),
        }
        if let Some(ip) = host_ip(&host)
            && is_local(ip)
            && !insecure_ok
        {
            return Err("the endpoint names a local or private address".into());
        }
        let host_str = url.host_str().unwrap_or_default().to_ascii_lowercase();
        let port = url.port_or_known_default().unwrap_or(0);
        if !self.allowed.is_empty()
            && !self.allowed.iter().any(|(scheme, allowed, p)| {
                scheme == url.scheme()
                    && *p == port
                    && match allowed.strip_prefix("*.") {
                        Some(parent) => host_str.ends_with(&format!(".{parent}")),
                        None => *allowed == host_str,
                    }
            })
        {
            return Err("the endpoint's origin is not one this server pushes to".into());
        }
        Ok(url.origin().ascii_serialization())
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(origins: &[&str], loopback: bool) -> EndpointPolicy {
        EndpointPolicy::new(&PushConfig {
            allowed_origins: origins.iter().map(|s| s.to_string()).collect(),
            allow_insecure_loopback: loopback,
            ..PushConfig::default()
        })
        .expect("policy")
    }

    #[test]
    fn endpoints_the_server_pushes_to() {
        let any = policy(&[], false);
        assert_eq!(
            any.check("https://push.example/wpush/v2/abc?x=1")
                .as_deref(),
            Ok("https://push.example")
        );
        assert_eq!(
            any.check("https://push.example:8443/abc").as_deref(),
            Ok("https://push.example:8443")
        );
        for bad in [
            "http://push.example/abc",
            "ftp://push.example/abc",
            "https://user:pw@push.example/abc",
            "https://push.example/abc#frag",
            "https://127.0.0.1/abc",
            "https://10.1.2.3/abc",
            "https://192.168.0.1/abc",
            "https://169.254.169.254/latest",
            "https://[::1]/abc",
            "https://[fd00::1]/abc",
            "https://[::ffff:127.0.0.1]/abc",
            "https://100.64.0.1/abc",
            "https://0.1.2.3/abc",
            "https://198.19.0.1/abc",
            "http://127.0.0.1:8080/abc",
            "not a url",
            "",
        ] {
            assert!(any.check(bad).is_err(), "{bad}");
        }
        assert!(
            any.check(&format!("https://push.example/{}", "a".repeat(1024)))
                .is_err()
        );

        let tests = policy(&[], true);
        assert!(tests.check("http://127.0.0.1:8080/abc").is_ok());
        assert!(tests.check("http://localhost:8080/abc").is_ok());
        assert!(tests.check("http://10.1.2.3/abc").is_err(), "loopback only");

        let listed = policy(
            &["https://push.example", "https://*.ntfy.example:8443"],
            false,
        );
        assert!(listed.check("https://push.example/abc").is_ok());
        assert!(listed.check("https://up.ntfy.example:8443/abc").is_ok());
        assert!(
            listed.check("https://ntfy.example:8443/abc").is_err(),
            "subdomains only"
        );
        assert!(
            listed.check("https://up.ntfy.example/abc").is_err(),
            "another port"
        );
        assert!(listed.check("https://other.example/abc").is_err());
        assert!(listed.check("https://push.example.evil/abc").is_err());

        assert!(
            EndpointPolicy::new(&PushConfig {
                allowed_origins: vec!["https://push.example/path".into()],
                ..PushConfig::default()
            })
            .is_err()
        );
    }
}
