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

use std::sync::Arc;
use std::time::Duration;

use common::push::PushService;

use tern_server::push::{Outcome, Provider, Urgency, Wake, WebPush};
use tern_store::PushSubscription;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_are_signed_encrypted_and_retried_as_the_policy_says() {
    let receiver = Receiver::generate();
    let (p256dh, auth) = (receiver.p256dh(), receiver.auth().to_vec());
    let vapid = Arc::new(tern_webpush::Vapid::generate());
    let service = PushService::start(vapid.public_key(), "mailto:ops@example.org").await;
    service.subscribe_with("abc", receiver);
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
        expires_ms: None,
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
        Outcome::Failed {
            attempts: 3,
            permanent: false,
            ..
        }
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
        Outcome::Failed {
            attempts: 1,
            permanent: true,
            ..
        }
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
    let service = PushService::start(vapid.public_key(), "mailto:ops@example.org").await;
    service.subscribe_with("abc", receiver);
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
            expires_ms: None,
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

// --- when the server pushes ---

use common::push::{SUBJECT, pushing, subscribe_device, vapid_key};
use tern_proto::frames::*;

async fn sent(raw: &mut Raw, rid: u64) -> u64 {
    match raw.answer(rid, &mut Vec::new()).await {
        server_frame::Kind::Sent(s) => s.seq,
        other => panic!("expected Sent, got {other:?}"),
    }
}

/// Sends `n` messages to `to`'s device, one after the other.
async fn burst(raw: &mut Raw, to: u64, device: u64, prefix: &str, n: usize) {
    for i in 0..n {
        let body = format!("secret body {prefix}{i}");
        let rid = raw
            .send_text_msg(to, &format!("{prefix}{i}"), body.as_bytes(), &[device])
            .await;
        sent(raw, rid).await;
    }
}

/// Acknowledges everything up to the newest of `events`.
async fn ack_all(raw: &mut Raw, events: &[Event]) {
    let up_to = events.iter().map(|e| e.mailbox_seq).max().expect("events");
    let rid = raw.request(client_frame::Kind::Ack(Ack { up_to })).await;
    assert!(matches!(
        raw.answer(rid, &mut Vec::new()).await,
        server_frame::Kind::Done(_)
    ));
}

/// Reads `n` events.
async fn events(raw: &mut Raw, n: usize) -> Vec<Event> {
    let mut got = Vec::new();
    while got.len() < n {
        if let Some(server_frame::Kind::Event(e)) = raw.recv().await.kind {
            got.push(e);
        }
    }
    got
}

/// Closes the socket and waits until the server has let the device go.
async fn leave(srv: &TestServer, mut raw: Raw, user: u64, device: u64) {
    let _ = raw.ws.close(None).await;
    for _ in 0..500 {
        if srv.state.hub.connected(&[(user, device)]).await == [false] {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the server still holds device {device}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_device_is_woken_once_per_burst_and_never_while_connected() {
    let srv = TestServer::start_with(pushing).await;
    let http = srv.http();
    let service = PushService::start(vapid_key(&http).await, SUBJECT).await;
    let (alice, alice_device, alice_token) = http.account("alice").await;
    let (bob, bob_device, bob_token) = http.account("bob").await;
    subscribe_device(&http, &service, bob_device, &bob_token, "bob").await;
    let (mut a, _, _) = Raw::connect(srv.addr, &alice_token).await;

    // Bob is connected nowhere: the burst wakes him once. Later messages, while that push is
    // unanswered, wake him no more, however long past the window.
    burst(&mut a, bob, bob_device, "m", 5).await;
    assert_eq!(service.wait_for("bob", 1, WAIT).await, 1);
    tokio::time::sleep(Duration::from_millis(700)).await;
    burst(&mut a, bob, bob_device, "n", 2).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let got = service.take();
    assert_eq!(
        got.len(),
        1,
        "one push for everything bob has not collected"
    );
    let push = &got[0];
    assert_eq!(push.urgency.as_deref(), Some("high"));
    assert_eq!(push.topic.as_deref(), Some("messages"));
    assert_eq!(push.ttl.as_deref(), Some("86400"));
    // What the push says: a count and a random id, nothing of who, where or what.
    let said: serde_json::Value = serde_json::from_slice(&push.plaintext).expect("JSON");
    let fields: Vec<&str> = said
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(fields, ["id", "n"], "{said}");
    assert!((1..=5).contains(&said["n"].as_u64().expect("n")), "{said}");
    assert_eq!(said["id"].as_str().map(str::len), Some(16));
    let text = String::from_utf8_lossy(&push.plaintext);
    // (The fields above are all there is: no user or device id either.)
    for secret in ["secret", "alice", "bob", "m0"] {
        assert!(!text.contains(secret), "the push names {secret}: {text}");
    }
    assert!(
        !push
            .body
            .windows(push.plaintext.len())
            .any(|w| w == push.plaintext),
        "the push service sees only ciphertext"
    );

    // Bob connects and collects everything: the push is answered. While he is connected,
    // nothing is pushed.
    let (mut b, _, pending) = Raw::connect(srv.addr, &bob_token).await;
    assert_eq!(pending.len(), 7);
    ack_all(&mut b, &pending).await;
    burst(&mut a, bob, bob_device, "o", 3).await;
    let live = events(&mut b, 3).await;
    ack_all(&mut b, &live).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(service.count("bob"), 0, "bob is connected");

    // Bob leaves: the next message wakes him again.
    leave(&srv, b, bob, bob_device).await;
    burst(&mut a, bob, bob_device, "p", 1).await;
    assert_eq!(service.wait_for("bob", 1, WAIT).await, 1);
    service.take();

    // Receipts alone wake nobody: alice subscribes and leaves; bob collects (delivered
    // receipts for alice) and reads (a read receipt).
    subscribe_device(&http, &service, alice_device, &alice_token, "alice").await;
    leave(&srv, a, alice, alice_device).await;
    let (mut b, _, pending) = Raw::connect(srv.addr, &bob_token).await;
    ack_all(&mut b, &pending).await;
    let last_seq = pending
        .iter()
        .filter_map(|e| match &e.kind {
            Some(event::Kind::Message(m)) => Some(m.seq),
            _ => None,
        })
        .max()
        .expect("a message");
    let rid = b
        .request(client_frame::Kind::Read(Read {
            conversation: Some(Peer::user(alice)),
            up_to_seq: last_seq,
        }))
        .await;
    assert!(matches!(
        b.answer(rid, &mut Vec::new()).await,
        server_frame::Kind::Done(_)
    ));
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(service.count("alice"), 0, "receipts do not push");
    assert!(
        !srv.state
            .store
            .mailbox_after(alice_device, 0, 10)
            .await
            .expect("mailbox")
            .is_empty(),
        "alice's receipts wait in her mailbox"
    );

    // The push service says bob's subscription is gone: it is removed, and nothing is sent
    // to it again.
    let (mut a, _, _) = Raw::connect(srv.addr, &alice_token).await;
    leave(&srv, b, bob, bob_device).await;
    service.script(&[(410, None)]);
    burst(&mut a, bob, bob_device, "q", 1).await;
    assert_eq!(service.wait_for("bob", 1, WAIT).await, 1);
    let store = &srv.state.store;
    for _ in 0..500 {
        if store
            .push_subscription(bob_device)
            .await
            .expect("read")
            .is_none()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        store.push_subscription(bob_device).await.expect("read"),
        None
    );
    assert!(service.refusals.lock().expect("lock").is_empty());

    // What an operator watches.
    let (_, metrics) = http.get_text("/metrics").await;
    for name in [
        "tern_push_sent_total",
        "tern_push_gone_total",
        "tern_push_delay_seconds",
        "tern_push_claims_total",
    ] {
        assert!(metrics.contains(name), "{name} missing from /metrics");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_still_owed_at_a_restart_is_sent_after_it() {
    // The first run's push service fails; its only look in the store comes after the test.
    let srv = TestServer::start_with(|c| {
        pushing(c);
        c.push.max_attempts = 1;
        c.push.coalesce_ms = 60_000;
    })
    .await;
    let http = srv.http();
    let service = PushService::start(vapid_key(&http).await, SUBJECT).await;
    let (_, _, alice_token) = http.account("alice").await;
    let (bob, bob_device, bob_token) = http.account("bob").await;
    subscribe_device(&http, &service, bob_device, &bob_token, "bob").await;
    service.script(&[(503, None)]);
    let (mut a, _, _) = Raw::connect(srv.addr, &alice_token).await;
    burst(&mut a, bob, bob_device, "m", 1).await;
    assert_eq!(
        service.wait_for("bob", 1, WAIT).await,
        1,
        "tried, and failed"
    );
    service.take();
    drop(a);
    // The failure is settled (the claim released: bob is owed a push again) before the stop.
    let rules = tern_server::services::pusher::rules(&srv.state.config.push);
    let mut owed = Vec::new();
    for _ in 0..500 {
        owed = srv
            .state
            .store
            .push_candidates(srv.state.clock.now_ms(), rules, 0, 10)
            .await
            .expect("candidates");
        if !owed.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(owed, [(bob, bob_device)]);
    let dir = srv.stop().await;

    // The next run finds bob still owed a push, one window after it starts.
    let srv = TestServer::start_in(dir, pushing).await;
    assert_eq!(service.wait_for("bob", 1, WAIT).await, 1);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(service.take().len(), 1, "once");
    drop(srv);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdk_registers_its_endpoint_and_decrypts_its_pushes() {
    use common::sdk;
    let srv = TestServer::start_with(pushing).await;
    let service = PushService::start(vapid_key(&srv.http()).await, SUBJECT).await;
    let alice = sdk::register(&srv.url(), "alice").await;
    let bob = sdk::register(&srv.url(), "bob").await;
    // Bob's keys are published once he has been online.
    sdk::online(&bob).await;
    bob.client.close().await;
    assert_eq!(bob.client.push_status().await.expect("status"), None);
    assert_eq!(
        bob.client.vapid_public_key().await.expect("vapid"),
        B64.encode(vapid_key(&srv.http()).await)
    );

    // The SDK makes the keys: the push service relays what it cannot read, bob's SDK reads it.
    let endpoint = service.subscribe_opaque("bob");
    let r = bob
        .client
        .register_push(&endpoint, None)
        .await
        .expect("register");
    assert_eq!(r.origin, service.origin);
    assert!(r.decrypts_here);
    assert_eq!(bob.client.push_status().await.expect("status"), Some(r));
    sdk::online(&alice).await;
    alice
        .client
        .send_text("bob", "the secret plan")
        .await
        .expect("send");
    assert_eq!(service.wait_for("bob", 1, WAIT).await, 1);
    let push = service.take().remove(0);
    let wake = bob.client.decrypt_push(&push.body).await.expect("decrypt");
    assert_eq!(wake.waiting, 1);
    assert_eq!(wake.id.len(), 16);
    let mut tampered = push.body.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    assert!(bob.client.decrypt_push(&tampered).await.is_err());
    assert!(
        matches!(
            bob.client.decrypt_push(&[0; 5000]).await,
            Err(tern_client::Error::Invalid(_))
        ),
        "bounded"
    );

    // Woken, bob connects and finds the message.
    sdk::online(&bob).await;
    let history = bob.client.history("alice", 10).expect("history");
    assert_eq!(history.len(), 1);
    bob.client.close().await;

    // Keys made elsewhere (a browser's, a distributor's): the server takes them, and the
    // SDK cannot decrypt.
    let other = Receiver::generate();
    let r = bob
        .client
        .register_push(
            &endpoint,
            Some(tern_client::PushKeys {
                p256dh: B64.encode(other.p256dh()),
                auth: B64.encode(other.auth()),
            }),
        )
        .await
        .expect("register");
    assert!(!r.decrypts_here);
    assert!(bob.client.decrypt_push(&push.body).await.is_err());
    let bad = bob
        .client
        .register_push(
            &endpoint,
            Some(tern_client::PushKeys {
                p256dh: "AAAA".into(),
                auth: B64.encode(other.auth()),
            }),
        )
        .await
        .expect_err("bad keys");
    assert_eq!(bad.code(), Some(tern_client::ErrorCode::BadRequest));

    assert!(bob.client.remove_push().await.expect("remove"));
    assert_eq!(bob.client.push_status().await.expect("status"), None);
    assert!(!bob.client.remove_push().await.expect("again"));
}
