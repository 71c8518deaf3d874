//! A Web Push service played by the test, on 127.0.0.1: it checks every request as a real one
//! would (the VAPID signature and claims: the key it expects, `aud` its own origin, `exp`
//! within 24 hours, `sub`; `Content-Encoding: aes128gcm`), decrypts the body with the
//! subscriber's private key (when the test has it), and answers as scripted (201 once the
//! script is done).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use tern_webpush::Receiver;

/// The push service's next answers: a status, and a `Retry-After` in seconds.
type Script = Arc<Mutex<VecDeque<(u16, Option<u64>)>>>;

/// What the push service saw of one request that checked out.
#[derive(Debug, Clone)]
pub struct Received {
    /// The subscriber (the last segment of the endpoint's path).
    pub to: String,
    pub at: Instant,
    /// The body as it travelled (encrypted).
    pub body: Vec<u8>,
    pub plaintext: Vec<u8>,
    pub urgency: Option<String>,
    pub topic: Option<String>,
    pub ttl: Option<String>,
}

pub struct PushService {
    pub origin: String,
    received: Arc<Mutex<Vec<Received>>>,
    script: Script,
    pub refusals: Arc<Mutex<Vec<String>>>,
    /// Each subscriber's keys; `None`: keys the service does not know (as a real one does
    /// not: it relays what it cannot read).
    subscribers: Arc<Mutex<HashMap<String, Option<Arc<Receiver>>>>>,
}

impl PushService {
    /// A push service that takes requests signed with the VAPID public key `vapid_key` and the
    /// `sub` claim `subject`.
    pub async fn start(vapid_key: Vec<u8>, subject: &'static str) -> PushService {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let origin = format!("http://{}", listener.local_addr().expect("addr"));
        let service = PushService {
            origin: origin.clone(),
            received: Arc::default(),
            script: Arc::default(),
            refusals: Arc::default(),
            subscribers: Arc::default(),
        };
        let (r, s, f, subs) = (
            service.received.clone(),
            service.script.clone(),
            service.refusals.clone(),
            service.subscribers.clone(),
        );
        let vapid_key = Arc::new(vapid_key);
        let app = axum::Router::new().route(
            "/push/{id}",
            axum::routing::post(
                move |axum::extract::Path(id): axum::extract::Path<String>,
                      headers: axum::http::HeaderMap,
                      body: axum::body::Bytes| {
                    let (r, s, f, subs, o, key) = (
                        r.clone(),
                        s.clone(),
                        f.clone(),
                        subs.clone(),
                        origin.clone(),
                        vapid_key.clone(),
                    );
                    async move {
                        let header = |n: &str| {
                            headers
                                .get(n)
                                .and_then(|v| v.to_str().ok())
                                .map(str::to_owned)
                        };
                        let check = || -> Result<Vec<u8>, String> {
                            let receiver = subs
                                .lock()
                                .expect("lock")
                                .get(&id)
                                .cloned()
                                .ok_or("no such subscriber")?;
                            let auth = header("authorization").ok_or("no Authorization")?;
                            let (k, claims) =
                                tern_webpush::verify_vapid(&auth).map_err(|e| e.to_string())?;
                            let now = std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .expect("clock")
                                .as_secs();
                            if k != *key {
                                return Err("another VAPID key".into());
                            }
                            if claims.aud != o {
                                return Err(format!("aud {} is not {o}", claims.aud));
                            }
                            if claims.exp <= now || claims.exp > now + 86_400 {
                                return Err("exp".into());
                            }
                            if claims.sub.as_deref() != Some(subject) {
                                return Err("sub".into());
                            }
                            if header("content-encoding").as_deref() != Some("aes128gcm") {
                                return Err("Content-Encoding".into());
                            }
                            match receiver {
                                Some(r) => r.decrypt(&body).map_err(|e| e.to_string()),
                                None => Ok(Vec::new()),
                            }
                        };
                        let plaintext = match check() {
                            Ok(p) => p,
                            Err(e) => {
                                f.lock().expect("lock").push(e);
                                return (
                                    axum::http::StatusCode::UNAUTHORIZED,
                                    axum::http::HeaderMap::new(),
                                );
                            }
                        };
                        r.lock().expect("lock").push(Received {
                            to: id,
                            at: Instant::now(),
                            body: body.to_vec(),
                            plaintext,
                            urgency: header("urgency"),
                            topic: header("topic"),
                            ttl: header("ttl"),
                        });
                        let (status, retry) =
                            s.lock().expect("lock").pop_front().unwrap_or((201, None));
                        let mut h = axum::http::HeaderMap::new();
                        if let Some(secs) = retry {
                            h.insert("retry-after", secs.to_string().parse().expect("header"));
                        }
                        (axum::http::StatusCode::from_u16(status).expect("status"), h)
                    }
                },
            ),
        );
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        service
    }

    /// A new subscriber `id`: its endpoint on this service and keys of its own; returns them
    /// as a browser's `PushSubscription.toJSON()` has them (the body of `PUT .../push`).
    pub fn subscribe(&self, id: &str) -> serde_json::Value {
        let receiver = Receiver::generate();
        let json = serde_json::json!({
            "endpoint": self.endpoint(id),
            "expirationTime": null,
            "keys": {"p256dh": B64.encode(receiver.p256dh()), "auth": B64.encode(receiver.auth())},
        });
        self.subscribers
            .lock()
            .expect("lock")
            .insert(id.to_owned(), Some(Arc::new(receiver)));
        json
    }

    /// Subscriber `id` whose keys the service does not know: its pushes are recorded as they
    /// travel, `plaintext` empty.
    pub fn subscribe_opaque(&self, id: &str) -> String {
        self.subscribers
            .lock()
            .expect("lock")
            .insert(id.to_owned(), None);
        self.endpoint(id)
    }

    /// Subscriber `id` with the given keys.
    pub fn subscribe_with(&self, id: &str, receiver: Receiver) {
        self.subscribers
            .lock()
            .expect("lock")
            .insert(id.to_owned(), Some(Arc::new(receiver)));
    }

    pub fn endpoint(&self, id: &str) -> String {
        format!("{}/push/{id}", self.origin)
    }

    pub fn script(&self, answers: &[(u16, Option<u64>)]) {
        self.script
            .lock()
            .expect("lock")
            .extend(answers.iter().copied());
    }

    /// What arrived since the last call.
    pub fn take(&self) -> Vec<Received> {
        std::mem::take(&mut *self.received.lock().expect("lock"))
    }

    /// How many pushes have arrived for `to`, without taking them.
    pub fn count(&self, to: &str) -> usize {
        self.received
            .lock()
            .expect("lock")
            .iter()
            .filter(|r| r.to == to)
            .count()
    }

    /// Waits until `n` pushes have arrived for `to` (at most `within`); how many did.
    pub async fn wait_for(&self, to: &str, n: usize, within: std::time::Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            let got = self.count(to);
            if got >= n || Instant::now() >= deadline {
                return got;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

/// The VAPID `sub` claim the servers of these tests send.
pub const SUBJECT: &str = "mailto:ops@example.org";

/// A server that pushes to a push service on this machine, quickly: a coalescing window of
/// 300 ms, and short retries.
pub fn pushing(c: &mut tern_server::Config) {
    c.push.subject = SUBJECT.into();
    c.push.allow_insecure_loopback = true;
    c.push.coalesce_ms = 300;
    c.push.max_attempts = 2;
    c.push.retry_base_ms = 10;
    c.push.request_timeout_secs = 2;
}

/// The server's VAPID public key (`GET /v1/push/vapid`).
pub async fn vapid_key(http: &super::Http) -> Vec<u8> {
    let (s, v) = http.get("/v1/push/vapid", None).await;
    assert_eq!(s, 200, "{v}");
    B64.decode(v["public_key"].as_str().expect("key"))
        .expect("base64url")
}

/// Makes subscriber `id` of `service` the push subscription of `device` (its `token`).
pub async fn subscribe_device(
    http: &super::Http,
    service: &PushService,
    device: u64,
    token: &str,
    id: &str,
) {
    let (s, v) = http
        .put_json(
            &format!("/v1/devices/{device}/push"),
            service.subscribe(id),
            Some(token),
        )
        .await;
    assert_eq!(s, 200, "{v}");
}
