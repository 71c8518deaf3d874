//! Protocol-level tests with raw HTTP and WebSocket frames: authentication and authorization
//! negatives, malformed input, device-set checks, idempotency. Bad input gets a typed error and
//! changes nothing; the server and other connections carry on.

mod common;

use common::*;
use futures_util::SinkExt;
use serde_json::json;
use tern_proto::ErrorCode;
use tern_proto::frames::*;

fn error_code(kind: &server_frame::Kind) -> Option<ErrorCode> {
    match kind {
        server_frame::Kind::Error(e) => ErrorCode::from_i32(e.code),
        _ => None,
    }
}

#[tokio::test]
async fn accounts_errors_are_typed_and_change_nothing() {
    let srv = TestServer::start().await;
    let http = srv.http();
    let cases = [
        (
            json!({"username": "ab", "password": "correct horse"}),
            400,
            "bad_request",
        ),
        (
            json!({"username": "Bad Name", "password": "correct horse"}),
            400,
            "bad_request",
        ),
        (
            json!({"username": "carol", "password": "short"}),
            400,
            "bad_request",
        ),
        (
            json!({"username": "carol", "password": "aaaaaaaaaaaa"}),
            400,
            "bad_request",
        ),
        (
            json!({"username": "carol", "password": "correct horse", "admin": true}),
            400,
            "bad_request",
        ),
        (json!({"username": "carol"}), 400, "bad_request"),
    ];
    for (body, status, code) in cases {
        let (s, v) = http.post("/v1/accounts", body.clone(), None).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}"
        );
    }
    let (s, _) = http
        .post(
            "/v1/accounts",
            json!({"username": "Carol", "password": "correct horse"}),
            None,
        )
        .await;
    assert_eq!(s, 201);
    let (s, v) = http
        .post(
            "/v1/accounts",
            json!({"username": "carol", "password": "other horse"}),
            None,
        )
        .await;
    assert_eq!((s, v["error"]["code"].as_str()), (409, Some("conflict")));
    // The original password still works: the conflicting attempt changed nothing.
    http.login("carol").await;

    let (s, v) = http
        .post(
            "/v1/sessions",
            json!({"username": "carol", "password": "wrong horse"}),
            None,
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let (s2, v2) = http
        .post(
            "/v1/sessions",
            json!({"username": "nobody", "password": "wrong horse"}),
            None,
        )
        .await;
    assert_eq!(
        (s2, &v2["error"]["message"]),
        (401, &v["error"]["message"]),
        "unknown user looks like a wrong password"
    );
    let big = "x".repeat(100 * 1024);
    let (s, v) = http
        .post(
            "/v1/accounts",
            json!({"username": "dave", "password": big}),
            None,
        )
        .await;
    assert_eq!((s, v["error"]["code"].as_str()), (413, Some("too_large")));
    let (s, _) = http.get("/v1/nope", None).await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn login_attempts_are_rate_limited() {
    let srv =
        TestServer::start_with(|c| c.rate_limits.logins_per_minute_per_user_and_address = 3).await;
    let http = srv.http();
    http.account("erin").await; // one attempt
    for _ in 0..2 {
        let (s, _) = http
            .post(
                "/v1/sessions",
                json!({"username": "erin", "password": "wrong horse"}),
                None,
            )
            .await;
        assert_eq!(s, 401);
    }
    let (s, v) = http
        .post(
            "/v1/sessions",
            json!({"username": "erin", "password": "correct horse"}),
            None,
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (429, Some("rate_limited"))
    );
    assert!(v["error"]["retry_after_secs"].as_u64().unwrap_or(0) >= 1);
    // Other usernames are not affected.
    http.account("frank").await;
}

#[tokio::test]
async fn tokens_devices_and_authorization() {
    let srv = TestServer::start().await;
    let http = srv.http();
    let (_alice, a1, t1) = http.account("alice").await;
    let (_, a2, t2) = http.login("alice").await;
    let (_, b1, tb) = http.account("bob").await;

    for token in [None, Some("nope"), Some("")] {
        let (s, v) = http.get("/v1/devices", token).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (401, Some("unauthorized")),
            "{token:?}"
        );
    }
    let (s, v) = http.get("/v1/devices", Some(&t1)).await;
    assert_eq!(s, 200);
    let devs = v["devices"].as_array().expect("devices");
    assert_eq!(devs.len(), 2);
    assert_eq!(devs.iter().filter(|d| d["current"] == true).count(), 1);

    // Bob can neither remove nor see Alice's devices as his own.
    let (s, _) = http.delete(&format!("/v1/devices/{a2}"), Some(&tb)).await;
    assert_eq!(s, 404);
    let (_, v) = http.get("/v1/devices", Some(&tb)).await;
    assert_eq!(v["devices"].as_array().map(Vec::len), Some(1));
    let (s, v) = http.get("/v1/users/alice/devices", Some(&tb)).await;
    assert_eq!((s, v["devices"].clone()), (200, json!([a1, a2])));
    let (s, _) = http.get("/v1/users/nobody/devices", Some(&tb)).await;
    assert_eq!(s, 404);

    // A connected device that is removed is disconnected (4001) and its token stops working.
    let (mut ws2, _, _) = Raw::connect(srv.addr, &t2).await;
    let (s, _) = http.delete(&format!("/v1/devices/{a2}"), Some(&t1)).await;
    assert_eq!(s, 204);
    assert_eq!(ws2.closed().await, Some(4001));
    let (s, _) = http.get("/v1/devices", Some(&t2)).await;
    assert_eq!(s, 401);
    let mut raw = Raw::open(srv.addr).await;
    let rid = raw
        .request(client_frame::Kind::Hello(Hello {
            protocol_version: 1,
            token: t2.clone(),
        }))
        .await;
    assert_eq!(
        error_code(&raw.answer(rid, &mut Vec::new()).await),
        Some(ErrorCode::Unauthorized)
    );
    assert_eq!(raw.closed().await, Some(4001));

    // Logout removes the calling device.
    let (s, _) = http.delete("/v1/sessions/current", Some(&tb)).await;
    assert_eq!(s, 204);
    let (s, _) = http.get("/v1/devices", Some(&tb)).await;
    assert_eq!(s, 401);
    let _ = b1;
}

#[tokio::test]
async fn handshake_rules() {
    let srv = TestServer::start().await;
    let (_, _, token) = srv.http().account("alice").await;

    let mut raw = Raw::open(srv.addr).await;
    let rid = raw
        .request(client_frame::Kind::Hello(Hello {
            protocol_version: 99,
            token: token.clone(),
        }))
        .await;
    assert_eq!(
        error_code(&raw.answer(rid, &mut Vec::new()).await),
        Some(ErrorCode::UnsupportedVersion)
    );
    assert_eq!(raw.closed().await, Some(4004));

    let mut raw = Raw::open(srv.addr).await;
    raw.request(client_frame::Kind::Ping(Ping { client_time_ms: 1 }))
        .await;
    assert!(matches!(
        raw.recv().await.kind,
        Some(server_frame::Kind::Error(_))
    ));
    assert_eq!(raw.closed().await, Some(4005));

    let (mut ok, welcome, events) = Raw::connect(srv.addr, &token).await;
    assert_eq!(
        (welcome.protocol_version, welcome.username.as_str()),
        (1, "alice")
    );
    assert!(events.is_empty());
    let rid = ok
        .request(client_frame::Kind::Ping(Ping { client_time_ms: 1 }))
        .await;
    assert!(matches!(
        ok.answer(rid, &mut Vec::new()).await,
        server_frame::Kind::Pong(_)
    ));
}

#[tokio::test]
async fn malformed_frames_get_errors_and_hurt_no_one() {
    let srv = TestServer::start().await;
    let http = srv.http();
    let (_, _, ta) = http.account("alice").await;
    let (bob, bd, tb) = http.account("bob").await;
    let (mut a, _, _) = Raw::connect(srv.addr, &ta).await;
    let (mut b, _, _) = Raw::connect(srv.addr, &tb).await;

    for garbage in [vec![0xff, 0xff, 0xff], vec![0x0a, 0x80], Vec::new()] {
        a.send_bytes(garbage).await;
        let f = a.recv().await;
        assert_eq!(
            (f.request_id, f.kind.as_ref().and_then(error_code)),
            (0, Some(ErrorCode::BadRequest))
        );
    }
    a.ws.send(tokio_tungstenite::tungstenite::Message::Text(
        "hello".into(),
    ))
    .await
    .expect("text");
    assert_eq!(
        a.recv().await.kind.as_ref().and_then(error_code),
        Some(ErrorCode::BadRequest)
    );
    // Request without an id, a second Hello, invalid sends: typed errors, nothing stored.
    a.send_bytes(prost::Message::encode_to_vec(&ClientFrame {
        request_id: 0,
        kind: Some(client_frame::Kind::Ack(Ack { up_to: 1 })),
    }))
    .await;
    assert_eq!(
        a.recv().await.kind.as_ref().and_then(error_code),
        Some(ErrorCode::BadRequest)
    );
    let bad_sends = [
        (
            Send {
                client_msg_id: "".into(),
                to: Some(Peer::user(bob)),
                body: b"x".to_vec(),
                devices: vec![],
            },
            ErrorCode::BadRequest,
        ),
        (
            Send {
                client_msg_id: "m1".into(),
                to: None,
                body: b"x".to_vec(),
                devices: vec![],
            },
            ErrorCode::BadRequest,
        ),
        (
            Send {
                client_msg_id: "m1".into(),
                to: Some(Peer::user(9999)),
                body: b"x".to_vec(),
                devices: vec![],
            },
            ErrorCode::NotFound,
        ),
        (
            Send {
                client_msg_id: "m1".into(),
                to: Some(Peer::user(bob)),
                body: vec![0; 17 * 1024],
                devices: vec![DeviceBody {
                    device_id: bd,
                    body: None,
                }],
            },
            ErrorCode::TooLarge,
        ),
    ];
    for (send, code) in bad_sends {
        let rid = a.request(client_frame::Kind::Send(send)).await;
        assert_eq!(
            error_code(&a.answer(rid, &mut Vec::new()).await),
            Some(code)
        );
    }
    let rid = a
        .request(client_frame::Kind::Read(Read {
            conversation: Some(Peer::user(bob)),
            up_to_seq: 1,
        }))
        .await;
    assert_eq!(
        error_code(&a.answer(rid, &mut Vec::new()).await),
        Some(ErrorCode::NotFound),
        "no conversation yet"
    );

    // An oversized frame closes only that connection.
    a.send_bytes(vec![0u8; 70 * 1024]).await;
    assert!(matches!(a.closed().await, Some(1009) | None));
    let rid = b
        .request(client_frame::Kind::Ping(Ping { client_time_ms: 1 }))
        .await;
    assert!(matches!(
        b.answer(rid, &mut Vec::new()).await,
        server_frame::Kind::Pong(_)
    ));
    // Bob received nothing from all of that.
    let (_, _, events) = Raw::connect(srv.addr, &http.login("bob").await.2).await;
    assert!(events.is_empty());
}

#[tokio::test]
async fn stale_device_list_is_rejected_with_the_difference() {
    let srv = TestServer::start().await;
    let http = srv.http();
    let (_, a1, ta) = http.account("alice").await;
    let (_, a2, _) = http.login("alice").await;
    let (bob, b1, _) = http.account("bob").await;
    let (mut a, _, _) = Raw::connect(srv.addr, &ta).await;

    // Alice only knows bob's first device, and forgot her own second one.
    let (_, b2, _) = http.login("bob").await;
    let rid = a.send_text_msg(bob, "m1", b"hi", &[b1, a1]).await;
    match a.answer(rid, &mut Vec::new()).await {
        server_frame::Kind::Error(e) => {
            assert_eq!(ErrorCode::from_i32(e.code), Some(ErrorCode::DeviceMismatch));
            assert_eq!(e.missing_devices, {
                let mut m = vec![a2, b2];
                m.sort();
                m
            });
            assert_eq!(
                e.extra_devices,
                vec![a1],
                "the sending device must not address itself"
            );
        }
        other => panic!("expected a device mismatch, got {other:?}"),
    }
    // Retry with the right set and the same id: stored as seq 1.
    let rid = a.send_text_msg(bob, "m1", b"hi", &[b1, b2, a2]).await;
    assert!(matches!(
        a.answer(rid, &mut Vec::new()).await,
        server_frame::Kind::Sent(Sent { seq: 1, .. })
    ));
}

#[tokio::test]
async fn retried_send_is_idempotent() {
    let srv = TestServer::start().await;
    let http = srv.http();
    let (_, _, ta) = http.account("alice").await;
    let (bob, b1, tb) = http.account("bob").await;
    let (mut a, _, _) = Raw::connect(srv.addr, &ta).await;
    let mut answers = Vec::new();
    for _ in 0..3 {
        let rid = a.send_text_msg(bob, "same-id", b"once", &[b1]).await;
        match a.answer(rid, &mut Vec::new()).await {
            server_frame::Kind::Sent(s) => answers.push((s.seq, s.server_ts_ms)),
            other => panic!("{other:?}"),
        }
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");
    // Also across a reconnect.
    drop(a);
    let (mut a, _, _) = Raw::connect(srv.addr, &ta).await;
    let rid = a.send_text_msg(bob, "same-id", b"once", &[b1]).await;
    assert!(matches!(
        a.answer(rid, &mut Vec::new()).await,
        server_frame::Kind::Sent(Sent { seq: 1, .. })
    ));
    let (_, _, events) = Raw::connect(srv.addr, &tb).await;
    assert_eq!(events.len(), 1, "stored once");
}

#[tokio::test]
async fn silent_connections_are_closed_after_the_idle_timeout() {
    let srv = TestServer::start_with(|c| {
        c.limits.heartbeat_secs = 1;
        c.limits.idle_timeout_secs = 2;
    })
    .await;
    let (_, _, token) = srv.http().account("alice").await;
    let (mut raw, welcome, _) = Raw::connect(srv.addr, &token).await;
    assert_eq!(welcome.heartbeat_secs, 1);
    assert_eq!(raw.closed().await, Some(4003));
}
