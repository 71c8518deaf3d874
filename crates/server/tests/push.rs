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
