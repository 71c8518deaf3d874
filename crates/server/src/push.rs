//! Sending pushes (PROTOCOL.md §10): a [`Provider`] delivers one content-free wake-up to one
//! subscription. [`WebPush`] speaks RFC 8030 to any Web Push service or UnifiedPush
//! distributor: the payload encrypted for the subscription (RFC 8291), the request signed
//! with the server's VAPID key (RFC 8292), retried with exponential backoff and jitter on 5xx,
//! 429 (honouring `Retry-After`) and network errors, within bounds. APNs or FCM would be other
//! providers behind the same trait.
//!
//! Requests go only to public addresses: endpoint URLs are checked when registered
//! ([`EndpointPolicy`]) and again here, and host names are resolved by a resolver that drops
//! loopback, private and link-local addresses (so a name cannot point the server at itself or
//! its network), unless the configuration allows loopback for a local push service.

use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::rt::TokioExecutor;
use tern_store::PushSubscription;
use tern_webpush::{Claims, Vapid};

use crate::config::PushConfig;

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

/// How urgent a push is (RFC 8030 §5.3): push services may hold back low urgency ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Urgency {
    Normal,
    High,
}

impl Urgency {
    fn as_str(self) -> &'static str {
        match self {
            Urgency::Normal => "normal",
            Urgency::High => "high",
        }
    }
}

/// One wake-up: what it says (encrypted before it leaves), how urgent it is, and the topic
/// under which the push service may replace an undelivered earlier one.
#[derive(Debug, Clone)]
pub struct Wake {
    pub payload: Vec<u8>,
    pub urgency: Urgency,
    /// At most 32 characters of the base64url alphabet (RFC 8030 §5.4).
    pub topic: Option<String>,
}

/// What became of a push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The push service took it (2xx).
    Delivered { attempts: u32 },
    /// The subscription is gone (404 or 410): forget it.
    Gone,
    /// Refused for good (another 4xx, or an endpoint or keys the sender cannot use:
    /// `permanent`), or still failing after every attempt.
    Failed {
        attempts: u32,
        permanent: bool,
        reason: String,
    },
}

#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// Delivers `wake` to `subscription`, retrying as the policy allows.
    async fn send(&self, subscription: &PushSubscription, wake: &Wake) -> Outcome;
}

/// Resolves host names to public addresses only.
#[derive(Clone)]
struct PublicResolver {
    allow_loopback: bool,
}

impl tower_service::Service<Name> for PublicResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future =
        Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send + 'static>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let allow_loopback = self.allow_loopback;
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), 0))
                .await?
                .filter(|a| {
                    !is_local(a.ip()) || (allow_loopback && a.ip().to_canonical().is_loopback())
                })
                .collect();
            if addrs.is_empty() {
                return Err(std::io::Error::other(
                    "the push endpoint resolves to no public address",
                ));
            }
            Ok(addrs.into_iter())
        })
    }
}

type Connector = hyper_rustls::HttpsConnector<HttpConnector<PublicResolver>>;

/// How long a VAPID token is valid (RFC 8292 allows at most 24 hours).
const TOKEN_SECS: u64 = 12 * 3600;
/// Push service origins whose tokens are kept (there are a few in practice; the cache is
/// emptied when a registration spree of distinct origins fills it).
const MAX_CACHED_TOKENS: usize = 1024;

/// Web Push over HTTP/1.1 (TLS with the system's roots).
pub struct WebPush {
    client: Client<Connector, Full<Bytes>>,
    vapid: Arc<Vapid>,
    policy: EndpointPolicy,
    config: PushConfig,
    /// Signed VAPID tokens by origin, with when they expire.
    tokens: std::sync::Mutex<std::collections::HashMap<String, (String, u64)>>,
}

fn tls_config() -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for e in &found.errors {
        tracing::warn!(error = %e, "cannot load a system root certificate");
    }
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        tracing::warn!("no system root certificates: pushes to https endpoints will fail");
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS: {e}"))?
    .with_root_certificates(roots)
    .with_no_client_auth())
}

impl WebPush {
    pub fn new(vapid: Arc<Vapid>, config: &PushConfig) -> Result<WebPush, String> {
        let policy = EndpointPolicy::new(config)?;
        let mut http = HttpConnector::new_with_resolver(PublicResolver {
            allow_loopback: config.allow_insecure_loopback,
        });
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_secs(config.request_timeout_secs)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls_config()?)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(4)
            .build(https);
        Ok(WebPush {
            client,
            vapid,
            policy,
            config: config.clone(),
            tokens: Default::default(),
        })
    }

    /// The wait before attempt `attempt + 1` (`attempt` ≥ 1): exponential with ±50 % jitter,
    /// or the push service's `Retry-After`, at most `retry_max_secs`.
    fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let max = Duration::from_secs(self.config.retry_max_secs);
        if let Some(wait) = retry_after {
            return wait.min(max);
        }
        let base = self
            .config
            .retry_base_ms
            .saturating_mul(1 << (attempt - 1).min(16));
        let jittered = base as f64 * (0.5 + rand::random::<f64>());
        Duration::from_millis(jittered as u64).min(max)
    }

    /// The VAPID `Authorization` for push service `origin`: a token valid 12 hours, signed
    /// once and reused until an hour before it expires (signing is most of a push's CPU).
    fn authorization(&self, origin: &str) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let Ok(mut cache) = self.tokens.lock() else {
            return self.sign(origin, now);
        };
        if let Some((token, exp)) = cache.get(origin)
            && *exp > now + 3600
        {
            return token.clone();
        }
        if cache.len() >= MAX_CACHED_TOKENS {
            cache.clear();
        }
        let token = self.sign(origin, now);
        cache.insert(origin.to_owned(), (token.clone(), now + TOKEN_SECS));
        token
    }

    fn sign(&self, origin: &str, now: u64) -> String {
        self.vapid.authorization(&Claims {
            aud: origin.to_owned(),
            exp: now + TOKEN_SECS,
            sub: (!self.config.subject.is_empty()).then(|| self.config.subject.clone()),
        })
    }

    async fn attempt(
        &self,
        subscription: &PushSubscription,
        origin: &str,
        body: &Bytes,
        wake: &Wake,
    ) -> Result<u16, (Option<Duration>, String)> {
        let authorization = self.authorization(origin);
        let mut request = hyper::Request::post(&subscription.endpoint)
            .header("TTL", self.config.ttl_secs.to_string())
            .header("Content-Encoding", "aes128gcm")
            .header("Content-Type", "application/octet-stream")
            .header("Urgency", wake.urgency.as_str())
            .header("Authorization", authorization);
        if let Some(topic) = &wake.topic {
            request = request.header("Topic", topic.as_str());
        }
        let request = request
            .body(Full::new(body.clone()))
            .map_err(|e| (None, format!("cannot build the request: {e}")))?;
        let timeout = Duration::from_secs(self.config.request_timeout_secs);
        let response = match tokio::time::timeout(timeout, self.client.request(request)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => return Err((None, format!("request failed: {e}"))),
            Err(_) => return Err((None, "request timed out".into())),
        };
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        // Read (a bounded part of) the answer so the connection can be reused.
        let _ = tokio::time::timeout(timeout, async {
            let mut body = response.into_body();
            let mut read = 0usize;
            while let Some(Ok(frame)) = body.frame().await {
                read += frame.data_ref().map_or(0, |d| d.len());
                if read > 64 * 1024 {
                    break;
                }
            }
        })
        .await;
        if status == 429 || status >= 500 {
            return Err((retry_after, format!("the push service answered {status}")));
        }
        Ok(status)
    }
}

#[async_trait]
impl Provider for WebPush {
    async fn send(&self, subscription: &PushSubscription, wake: &Wake) -> Outcome {
        let origin = match self.policy.check(&subscription.endpoint) {
            Ok(origin) => origin,
            Err(reason) => {
                return Outcome::Failed {
                    attempts: 0,
                    permanent: true,
                    reason,
                };
            }
        };
        let body =
            match tern_webpush::encrypt(&subscription.p256dh, &subscription.auth, &wake.payload) {
                Ok(b) => Bytes::from(b),
                Err(e) => {
                    return Outcome::Failed {
                        attempts: 0,
                        permanent: true,
                        reason: e.to_string(),
                    };
                }
            };
        let mut attempts = 0;
        loop {
            attempts += 1;
            let started = std::time::Instant::now();
            let result = self.attempt(subscription, &origin, &body, wake).await;
            metrics::histogram!("tern_push_request_seconds")
                .record(started.elapsed().as_secs_f64());
            let (retry_after, reason) = match result {
                Ok(status) if (200..300).contains(&status) => {
                    metrics::counter!("tern_push_sent_total").increment(1);
                    return Outcome::Delivered { attempts };
                }
                Ok(404 | 410) => {
                    metrics::counter!("tern_push_gone_total").increment(1);
                    return Outcome::Gone;
                }
                Ok(status) => {
                    metrics::counter!("tern_push_failed_total").increment(1);
                    return Outcome::Failed {
                        attempts,
                        permanent: true,
                        reason: format!("the push service refused it ({status})"),
                    };
                }
                Err(e) => e,
            };
            if attempts >= self.config.max_attempts {
                metrics::counter!("tern_push_failed_total").increment(1);
                return Outcome::Failed {
                    attempts,
                    permanent: false,
                    reason,
                };
            }
            metrics::counter!("tern_push_retried_total").increment(1);
            tokio::time::sleep(self.backoff(attempts, retry_after)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;
    use tower_service::Service;

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

    #[tokio::test]
    async fn names_resolve_to_public_addresses_only() {
        let name = || Name::from_str("localhost").expect("name");
        let mut strict = PublicResolver {
            allow_loopback: false,
        };
        assert!(strict.call(name()).await.is_err(), "loopback dropped");
        let mut local = PublicResolver {
            allow_loopback: true,
        };
        let addrs: Vec<SocketAddr> = local.call(name()).await.expect("resolves").collect();
        assert!(!addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback()));
    }

    #[test]
    fn backoff_doubles_with_jitter_and_honours_retry_after_within_the_cap() {
        let config = PushConfig {
            retry_base_ms: 100,
            retry_max_secs: 2,
            ..PushConfig::default()
        };
        let sender = WebPush::new(Arc::new(Vapid::generate()), &config).expect("sender");
        for attempt in 1..=4u32 {
            let base = 100u64 << (attempt - 1);
            let wait = sender.backoff(attempt, None).as_millis() as u64;
            assert!(
                (base / 2..=(base * 3 / 2).min(2000)).contains(&wait),
                "attempt {attempt}: {wait} ms"
            );
        }
        assert_eq!(sender.backoff(10, None), Duration::from_secs(2), "capped");
        assert_eq!(
            sender.backoff(1, Some(Duration::from_secs(1))),
            Duration::from_secs(1)
        );
        assert_eq!(
            sender.backoff(1, Some(Duration::from_secs(3600))),
            Duration::from_secs(2),
            "a Retry-After beyond the cap is cut to it"
        );
    }
}
