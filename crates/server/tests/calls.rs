//! Calls (PROTOCOL.md §11) against the real server: TURN credentials, checked by a real coturn
//! started by the test (`common/turn.rs`).

mod common;

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use common::turn::Coturn;
use common::*;
use tern_server::services::calls::turn_password;

const SECRET: &str = "a secret shared with coturn";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs() as i64
}

/// `coturn.allocates(..)` off the runtime's threads (it waits for a process).
async fn allocates(turn: &Arc<Coturn>, username: &str, password: &str) -> bool {
    let (turn, u, p) = (turn.clone(), username.to_owned(), password.to_owned());
    tokio::task::spawn_blocking(move || turn.allocates(&u, &p))
        .await
        .expect("join")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turn_credentials_from_ternd_allocate_a_relay_on_coturn() {
    let Some(turn) = Coturn::start(SECRET) else {
        return;
    };
    let turn = Arc::new(turn);
    let uri = format!("turn:127.0.0.1:{}?transport=udp", turn.port);
    let srv = TestServer::start_with(|c| {
        c.calls.turn_secret = SECRET.into();
        c.calls.turn_uris = vec![uri.clone()];
        c.calls.turn_ttl_secs = 600;
        c.rate_limits.turn_per_hour_per_user = 3;
    })
    .await;
    let http = srv.http();
    let (user, _, token) = http.account("alice").await;

    let (s, v) = http.get("/v1/calls/turn", None).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let (s, v) = http.get("/v1/calls/turn", Some(&token)).await;
    assert_eq!(s, 200, "{v}");
    let username = v["username"].as_str().expect("username").to_owned();
    let password = v["password"].as_str().expect("password").to_owned();
    assert_eq!(v["ttl"], 600);
    assert_eq!(v["uris"], serde_json::json!([uri]));
    let (expiry, id) = username.split_once(':').expect("expiry:user");
    assert_eq!(id, user.to_string());
    let expiry: i64 = expiry.parse().expect("a timestamp");
    assert!((now() + 590..=now() + 610).contains(&expiry), "{expiry}");

    // coturn takes them (retrying while it starts).
    let ready = {
        let (turn, u, p) = (turn.clone(), username.clone(), password.clone());
        tokio::task::spawn_blocking(move || turn.ready_with(&u, &p))
            .await
            .expect("join")
    };
    assert!(ready, "coturn refused ternd's credentials:\n{}", turn.log());
    // Forged, another user's name with this password, expired: refused.
    assert!(!allocates(&turn, &username, "bm90IHRoZSBwYXNzd29yZA==").await);
    assert!(!allocates(&turn, &format!("{expiry}:{}", user + 1), &password).await);
    let expired = format!("{}:{user}", now() - 5);
    let expired_password = turn_password(SECRET, &expired).expect("hmac");
    assert!(!allocates(&turn, &expired, &expired_password).await);
    // The same scheme with a later expiry is taken: what refused the last one was its age.
    let later = format!("{}:{user}", now() + 60);
    let later_password = turn_password(SECRET, &later).expect("hmac");
    assert!(allocates(&turn, &later, &later_password).await);

    // Rate-limited per user: 3 an hour here.
    for _ in 0..2 {
        let (s, _) = http.get("/v1/calls/turn", Some(&token)).await;
        assert_eq!(s, 200);
    }
    let (s, v) = http.get("/v1/calls/turn", Some(&token)).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (429, Some("rate_limited"))
    );
    assert!(
        v["error"]["retry_after_secs"]
            .as_u64()
            .is_some_and(|w| w > 60)
    );
    // Through the SDK, as an app fills a peer connection's iceServers.
    let bob = common::sdk::register(&srv.url(), "bob").await;
    let creds = bob
        .client
        .turn_credentials()
        .await
        .expect("another user is not limited");
    assert_eq!(creds.uris, [uri]);
    assert!(allocates(&turn, &creds.username, &creds.password).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_turn_secret_there_are_no_credentials() {
    let srv = TestServer::start().await;
    let http = srv.http();
    let (_, _, token) = http.account("alice").await;
    let (s, v) = http.get("/v1/calls/turn", Some(&token)).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (404, Some("not_found")),
        "{v}"
    );
    let bob = common::sdk::register(&srv.url(), "bob").await;
    let e = bob.client.turn_credentials().await.expect_err("none");
    assert_eq!(e.code(), Some(tern_client::ErrorCode::NotFound));
}
