//! The key directory over HTTP (PROTOCOL.md §9): publishing, listing, atomic claims of one-time
//! keys (never the same key twice, even under concurrent claims), the fallback key, limits.

mod common;

use common::*;
use serde_json::json;

fn otk(i: usize) -> serde_json::Value {
    json!({"id": format!("AAAA{i:03}"), "key": format!("otk{i:03}key"), "signature": "c2ln"})
}

fn identity(n: &str) -> serde_json::Value {
    json!({"curve25519": format!("curve{n}"), "ed25519": format!("ed{n}"), "signature": "c2lnbmF0dXJl"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_list_claim_and_fallback() {
    let server = TestServer::start_with(|c| c.limits.max_one_time_keys = 20).await;
    let http = server.http();
    let (_, alice_dev, alice) = http.account("alice").await;
    let (_, _, bob) = http.account("bob").await;

    // Bad input changes nothing.
    let (s, _) = http
        .put_json("/v1/keys", json!({"one_time_keys": [otk(1)]}), Some(&alice))
        .await;
    assert_eq!(s, 400, "identity keys come first");
    let (s, _) = http
        .put_json(
            "/v1/keys",
            json!({"identity": {"curve25519": "not base64!", "ed25519": "x", "signature": "y"}}),
            Some(&alice),
        )
        .await;
    assert_eq!(s, 400);
    let too_many: Vec<_> = (0..21).map(otk).collect();
    let (s, _) = http
        .put_json(
            "/v1/keys",
            json!({"identity": identity("A"), "one_time_keys": too_many}),
            Some(&alice),
        )
        .await;
    assert_eq!(s, 413);
    let (s, v) = http.get("/v1/users/alice/keys", Some(&bob)).await;
    assert_eq!(s, 200);
    assert_eq!(v["devices"][0]["identity"], serde_json::Value::Null);
    let (s, _) = http.put_json("/v1/keys", json!({}), None).await;
    assert_eq!(s, 401);

    let keys: Vec<_> = (0..10).map(otk).collect();
    let (s, v) = http
        .put_json(
            "/v1/keys",
            json!({"identity": identity("A"), "one_time_keys": keys, "fallback_key": {"id": "FB1", "key": "fallbackkey", "signature": "c2ln"}}),
            Some(&alice),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v, json!({"one_time_keys": 10, "fallback_key_used": false}));
    let (s, _) = http
        .put_json("/v1/keys", json!({"identity": identity("B")}), Some(&alice))
        .await;
    assert_eq!(s, 409, "identity keys never change");
    let (_, v) = http.get("/v1/users/alice/keys", Some(&bob)).await;
    assert_eq!(v["devices"][0]["device_id"], alice_dev);
    assert_eq!(v["devices"][0]["identity"], identity("A"));

    // Twelve concurrent claims: ten distinct one-time keys, then the fallback key twice.
    let claims = (0..12).map(|_| {
        let http = server.http();
        let bob = bob.clone();
        async move {
            http.post(
                "/v1/keys/claim",
                json!({"devices": [alice_dev, 424242]}),
                Some(&bob),
            )
            .await
        }
    });
    let mut otks = Vec::new();
    let mut fallbacks = 0;
    for (s, v) in futures_util::future::join_all(claims).await {
        assert_eq!(s, 200, "{v}");
        let keys = v["keys"].as_array().expect("keys");
        assert_eq!(keys.len(), 1, "the unknown device is left out");
        if keys[0]["fallback"] == true {
            assert_eq!(keys[0]["key"]["id"], "FB1");
            fallbacks += 1;
        } else {
            otks.push(keys[0]["key"]["id"].as_str().expect("id").to_owned());
        }
    }
    otks.sort();
    otks.dedup();
    assert_eq!(
        (otks.len(), fallbacks),
        (10, 2),
        "each one-time key exactly once"
    );

    // The owner sees that it must replenish, and does.
    let (_, v) = http.get("/v1/keys", Some(&alice)).await;
    assert_eq!(v, json!({"one_time_keys": 0, "fallback_key_used": true}));
    let (_, v) = http
        .put_json(
            "/v1/keys",
            json!({"one_time_keys": [otk(50)], "fallback_key": {"id": "FB2", "key": "fallbackkey2", "signature": "c2ln"}}),
            Some(&alice),
        )
        .await;
    assert_eq!(v, json!({"one_time_keys": 1, "fallback_key_used": false}));
    let big: Vec<u64> = (0..257).collect();
    let (s, _) = http
        .post("/v1/keys/claim", json!({"devices": big}), Some(&bob))
        .await;
    assert_eq!(s, 413);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_members_keys_for_members_only() {
    let server = TestServer::start().await;
    let http = server.http();
    let (_, alice_dev, alice) = http.account("alice").await;
    let (bob_id, _, bob) = http.account("bob").await;
    let (_, _, eve) = http.account("eve").await;
    let (s, _) = http
        .put_json("/v1/keys", json!({"identity": identity("A")}), Some(&alice))
        .await;
    assert_eq!(s, 200);
    let (s, g) = http
        .post(
            "/v1/groups",
            json!({"name": "g", "members": ["bob"]}),
            Some(&alice),
        )
        .await;
    assert_eq!(s, 201, "{g}");
    let path = format!("/v1/groups/{}/keys", g["group_id"]);
    let (s, v) = http.get(&path, Some(&bob)).await;
    assert_eq!(s, 200, "{v}");
    let members = v["members"].as_array().expect("members");
    assert_eq!(members.len(), 2);
    let a = members
        .iter()
        .find(|m| m["username"] == "alice")
        .expect("alice");
    assert_eq!(a["devices"][0]["device_id"], alice_dev);
    assert_eq!(a["devices"][0]["identity"], identity("A"));
    let b = members
        .iter()
        .find(|m| m["username"] == "bob")
        .expect("bob");
    assert_eq!(b["user_id"], bob_id);
    assert_eq!(b["devices"][0]["identity"], serde_json::Value::Null);
    let (s, _) = http.get(&path, Some(&eve)).await;
    assert_eq!(s, 404, "not a member: the group does not exist for eve");
    let (s, _) = http.get("/v1/groups/x/keys", Some(&bob)).await;
    assert_eq!(s, 400);
}
