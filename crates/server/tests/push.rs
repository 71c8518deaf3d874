//! Push registration (PROTOCOL.md §10) against the real server: the VAPID key (made once,
//! kept across restarts), and a device's subscription set, replaced, read and removed by the
//! device alone; bad input refused with a typed error and nothing stored.

mod common;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use common::*;
use serde_json::json;
use tern_webpush::Receiver;

fn subscription(endpoint: &str, r: &Receiver) -> serde_json::Value {
    json!({
        "endpoint": endpoint,
        "expirationTime": null,
        "keys": {"p256dh": B64.encode(r.p256dh()), "auth": B64.encode(r.auth())},
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vapid_key_is_made_once_and_kept() {
    let srv = TestServer::start().await;
    let (s, v) = srv.http().get("/v1/push/vapid", None).await;
    assert_eq!(s, 200, "{v}");
    let key = v["public_key"].as_str().expect("key").to_owned();
    let raw = B64.decode(&key).expect("base64url");
    assert_eq!((raw.len(), raw[0]), (65, 4), "an uncompressed P-256 point");
    let dir = srv.stop().await;
    let srv = TestServer::start_in(dir, |_| {}).await;
    let (_, v) = srv.http().get("/v1/push/vapid", None).await;
    assert_eq!(
        v["public_key"].as_str(),
        Some(key.as_str()),
        "the same after a restart"
    );

    // Given in the configuration, it is that one.
    let vapid = tern_webpush::Vapid::generate();
    let configured = TestServer::start_with(|c| {
        c.push.vapid_private_key = B64.encode(vapid.secret_bytes());
    })
    .await;
    let (_, v) = configured.http().get("/v1/push/vapid", None).await;
    assert_eq!(
        v["public_key"].as_str(),
        Some(vapid.public_key_b64().as_str())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_registers_replaces_and_removes_its_own_subscription() {
    let srv = TestServer::start().await;
    let http = srv.http();
    let (_, device, token) = http.account("alice").await;
    let (_, other_device, other_token) = http.login("alice").await;
    let path = format!("/v1/devices/{device}/push");
    let r = Receiver::generate();

    let (s, v) = http.get(&path, Some(&token)).await;
    assert_eq!((s, v["error"]["code"].as_str()), (404, Some("not_found")));
    let (s, v) = http
        .put_json(
            &path,
            subscription("https://push.example/wpush/abc", &r),
            Some(&token),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["origin"], "https://push.example");
    let (s, v) = http.get(&path, Some(&token)).await;
    assert_eq!(
        (s, v["origin"].as_str()),
        (200, Some("https://push.example"))
    );

    // Bad input: a typed error, and the subscription stays as it was.
    let good = subscription("https://push.example/wpush/abc", &r);
    let mut bad_inputs = vec![
        subscription("http://push.example/abc", &r),
        subscription("https://127.0.0.1/abc", &r),
        subscription("https://10.0.0.1/abc", &r),
        subscription("https://user:pw@push.example/abc", &r),
        subscription(&format!("https://push.example/{}", "a".repeat(1100)), &r),
        json!({"endpoint": "https://push.example/a", "keys": {"p256dh": "!!", "auth": "AAAA"}}),
        json!({"endpoint": "https://push.example/a", "keys": {"auth": B64.encode(r.auth())}}),
        json!({"endpoint": "https://push.example/a", "keys": {"p256dh": B64.encode(r.p256dh()), "auth": B64.encode([1u8; 15])}}),
        json!({"endpoint": "https://push.example/a", "keys": {"p256dh": B64.encode([4u8; 65]), "auth": B64.encode(r.auth())}}),
        json!({"endpoint": "https://push.example/a", "expirationTime": 1, "keys": good["keys"]}),
    ];
    let mut unknown = good.clone();
    unknown["extra"] = json!(1);
    bad_inputs.push(unknown);
    for bad in bad_inputs {
        let (s, v) = http.put_json(&path, bad.clone(), Some(&token)).await;
        assert_eq!(s, 400, "{bad}: {v}");
        assert_eq!(v["error"]["code"], "bad_request", "{bad}");
    }
    let (_, v) = http.get(&path, Some(&token)).await;
    assert_eq!(v["origin"], "https://push.example", "unchanged");

    // Another device (even of the same user) sees and changes nothing of it.
    for (s, _) in [
        http.get(&path, Some(&other_token)).await,
        http.put_json(&path, good.clone(), Some(&other_token)).await,
        http.delete(&path, Some(&other_token)).await,
    ] {
        assert_eq!(s, 403);
    }
    let (s, _) = http.get(&path, None).await;
    assert_eq!(s, 401);
    let other_path = format!("/v1/devices/{other_device}/push");
    let (s, _) = http.get(&other_path, Some(&other_token)).await;
    assert_eq!(s, 404, "its own has none");

    // Replaced by a new one, then removed.
    let r2 = Receiver::generate();
    let (s, v) = http
        .put_json(
            &path,
            subscription("https://other.example:8443/x", &r2),
            Some(&token),
        )
        .await;
    assert_eq!(
        (s, v["origin"].as_str()),
        (200, Some("https://other.example:8443"))
    );
    let (s, _) = http.delete(&path, Some(&token)).await;
    assert_eq!(s, 204);
    let (s, _) = http.delete(&path, Some(&token)).await;
    assert_eq!(s, 404);

    // Logging out removes the device and its subscription with it.
    let (s, _) = http
        .put_json(&other_path, good.clone(), Some(&other_token))
        .await;
    assert_eq!(s, 200);
    let (s, _) = http
        .delete("/v1/sessions/current", Some(&other_token))
        .await;
    assert_eq!(s, 204);
    let store = &srv.state.store;
    assert_eq!(
        store.push_subscription(other_device).await.expect("read"),
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allowed_origins_and_loopback_are_configured() {
    let r = Receiver::generate();
    for (tweak, cases) in [
        (
            (vec!["https://*.push.example".to_owned()], false),
            vec![
                ("https://eu.push.example/a", 200),
                ("https://push.example/a", 400),
                ("https://elsewhere.example/a", 400),
                ("http://127.0.0.1:9/a", 400),
            ],
        ),
        (
            (Vec::new(), true),
            vec![
                // A push service on this machine, over http: allowed, and only on loopback.
                ("http://127.0.0.1:9/a", 200),
                ("http://localhost:9/a", 200),
                ("http://10.0.0.1/a", 400),
                ("https://push.example/a", 200),
            ],
        ),
    ] {
        let srv = TestServer::start_with(|c| {
            c.push.allowed_origins = tweak.0.clone();
            c.push.allow_insecure_loopback = tweak.1;
        })
        .await;
        let http = srv.http();
        let (_, device, token) = http.account("bob").await;
        let path = format!("/v1/devices/{device}/push");
        for (endpoint, want) in cases {
            let (s, v) = http
                .put_json(&path, subscription(endpoint, &r), Some(&token))
                .await;
            assert_eq!(s, want, "{endpoint}: {v}");
        }
    }
}

// --- sending: a push service played by the test ---

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tern_server::push::{Outcome, Provider, Urgency, Wake, WebPush};
use tern_store::PushSubscription;

/// The push service's next answers: a status, and a `Retry-After` in seconds.
type Script = Arc<Mutex<VecDeque<(u16, Option<u64>)>>>;

/// What the push service saw of one request, after checking it as a real one would.
#[derive(Debug, Clone)]
struct Received {
    at: Instant,
    plaintext: Vec<u8>,
    urgency: Option<String>,
    topic: Option<String>,
    ttl: Option<String>,
}

/// A Web Push service on 127.0.0.1: checks the VAPID signature and claims (the key it
/// expects, `aud` its own origin, `exp` within 24 hours, `sub`), decrypts the body with the
/// subscription's private key, and answers as scripted (201 once the script is done).
struct PushService {
    origin: String,
    received: Arc<Mutex<Vec<Received>>>,
    script: Script,
    refusals: Arc<Mutex<Vec<String>>>,
}

impl PushService {
    async fn start(receiver: Receiver, vapid_key: Vec<u8>, subject: &'static str) -> PushService {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let origin = format!("http://{}", listener.local_addr().expect("addr"));
        let received = Arc::new(Mutex::new(Vec::new()));
        let script: Script = Arc::new(Mutex::new(VecDeque::new()));
        let refusals = Arc::new(Mutex::new(Vec::new()));
        let receiver = Arc::new(receiver);
        let (r, s, f, o) = (
            received.clone(),
            script.clone(),
            refusals.clone(),
            origin.clone(),
        );
        let app = axum::Router::new().route(
            "/push/{id}",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                    let (r, s, f, o, receiver, key) = (
                        r.clone(),
                        s.clone(),
                        f.clone(),
                        o.clone(),
                        receiver.clone(),
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
                            let auth = header("authorization").ok_or("no Authorization")?;
                            let (k, claims) =
                                tern_webpush::verify_vapid(&auth).map_err(|e| e.to_string())?;
                            let now = std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .expect("clock")
                                .as_secs();
                            if k != key {
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
                            receiver.decrypt(&body).map_err(|e| e.to_string())
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
                            at: Instant::now(),
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
        PushService {
            origin,
            received,
            script,
            refusals,
        }
    }

    fn script(&self, answers: &[(u16, Option<u64>)]) {
        self.script
            .lock()
            .expect("lock")
            .extend(answers.iter().copied());
    }

    fn take(&self) -> Vec<Received> {
        std::mem::take(&mut *self.received.lock().expect("lock"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_are_signed_encrypted_and_retried_as_the_policy_says() {
    let receiver = Receiver::generate();
    let (p256dh, auth) = (receiver.p256dh(), receiver.auth().to_vec());
    let vapid = Arc::new(tern_webpush::Vapid::generate());
    let service = PushService::start(receiver, vapid.public_key(), "mailto:ops@example.org").await;
    let config = tern_server::config::PushConfig {
        subject: "mailto:ops@example.org".into(),
        allow_insecure_loopback: true,
        max_attempts: 3,
        retry_base_ms: 10,
        retry_max_secs: 2,
        ..Default::default()
    };
    let sender = WebPush::new(vapid.clone(), &config).expect("sender");
    let subscription = PushSubscription {
        endpoint: format!("{}/push/abc", service.origin),
        p256dh,
        auth,
        updated_ms: 0,
    };
    let wake = Wake {
        payload: br#"{"n":3}"#.to_vec(),
        urgency: Urgency::High,
        topic: Some("tern".into()),
    };

    assert_eq!(
        sender.send(&subscription, &wake).await,
        Outcome::Delivered { attempts: 1 }
    );
    let got = service.take();
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].plaintext, br#"{"n":3}"#,
        "decrypted by the subscription's key"
    );
    assert_eq!(got[0].urgency.as_deref(), Some("high"));
    assert_eq!(got[0].topic.as_deref(), Some("tern"));
    assert_eq!(got[0].ttl.as_deref(), Some("86400"));

    // 500, then 429 with Retry-After: 1, then accepted: three attempts, the wait honoured.
    service.script(&[(500, None), (429, Some(1)), (201, None)]);
    assert_eq!(
        sender.send(&subscription, &wake).await,
        Outcome::Delivered { attempts: 3 }
    );
    let got = service.take();
    assert_eq!(got.len(), 3);
    assert!(
        got[2].at - got[1].at >= Duration::from_millis(950),
        "Retry-After waited out"
    );

    // Failing on every attempt: given up after max_attempts.
    service.script(&[(503, None), (502, None), (500, None)]);
    assert!(matches!(
        sender.send(&subscription, &wake).await,
        Outcome::Failed { attempts: 3, .. }
    ));
    assert_eq!(service.take().len(), 3);

    // Gone (404/410): the caller forgets the subscription; another 4xx is not retried.
    service.script(&[(410, None)]);
    assert_eq!(sender.send(&subscription, &wake).await, Outcome::Gone);
    service.script(&[(404, None)]);
    assert_eq!(sender.send(&subscription, &wake).await, Outcome::Gone);
    service.script(&[(400, None)]);
    assert!(matches!(
        sender.send(&subscription, &wake).await,
        Outcome::Failed { attempts: 1, .. }
    ));
    assert_eq!(service.take().len(), 3);
    assert!(
        service.refusals.lock().expect("lock").is_empty(),
        "every request checked out"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_never_reach_this_machine_or_a_private_network_unless_allowed() {
    let receiver = Receiver::generate();
    let (p256dh, auth) = (receiver.p256dh(), receiver.auth().to_vec());
    let vapid = Arc::new(tern_webpush::Vapid::generate());
    let service = PushService::start(receiver, vapid.public_key(), "mailto:ops@example.org").await;
    let config = tern_server::config::PushConfig {
        max_attempts: 2,
        retry_base_ms: 10,
        request_timeout_secs: 2,
        ..Default::default()
    };
    let sender = WebPush::new(vapid, &config).expect("sender");
    let port = service.origin.rsplit(':').next().expect("port").to_owned();
    for endpoint in [
        // Refused by the endpoint policy before any request.
        format!("{}/push/abc", service.origin),
        format!("https://127.0.0.1:{port}/push/abc"),
        // A name: allowed by the policy, but it resolves to loopback only, which the resolver
        // drops, so no connection is made.
        format!("https://localhost:{port}/push/abc"),
    ] {
        let subscription = PushSubscription {
            endpoint: endpoint.clone(),
            p256dh: p256dh.clone(),
            auth: auth.clone(),
            updated_ms: 0,
        };
        let wake = Wake {
            payload: b"{}".to_vec(),
            urgency: Urgency::Normal,
            topic: None,
        };
        assert!(
            matches!(
                sender.send(&subscription, &wake).await,
                Outcome::Failed { .. }
            ),
            "{endpoint}"
        );
    }
    assert!(
        service.take().is_empty(),
        "nothing reached the local service"
    );
    assert!(service.refusals.lock().expect("lock").is_empty());
}
