//! Cluster mode: several in-process nodes on one PostgreSQL schema, the machine's Redis and
//! NATS (`TERN_TEST_POSTGRES`, `TERN_TEST_REDIS`, `TERN_TEST_NATS`; skipped, saying so,
//! without them). Each test has its own schema, key prefix and subject prefix.
//!
//! The periodic re-check and the directory's renewal are an hour apart here, so what arrives
//! in seconds came over the bus.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tern_proto::frames::*;

/// No periodic re-read and no renewal within a test: what happens came over the bus.
fn quiet_recheck(c: &mut tern_server::Config) {
    c.cluster.recheck_secs = 3600;
    c.cluster.directory_ttl_secs = 3600;
}

async fn sent(raw: &mut Raw, rid: u64) -> u64 {
    match raw.answer(rid, &mut Vec::new()).await {
        server_frame::Kind::Sent(s) => s.seq,
        other => panic!("expected Sent, got {other:?}"),
    }
}

/// The next event, within a few seconds (far below the re-check interval).
async fn event(raw: &mut Raw) -> Event {
    match raw.recv().await.kind {
        Some(server_frame::Kind::Event(e)) => e,
        other => panic!("expected an event, got {other:?}"),
    }
}

fn message(e: &Event) -> &Message {
    match &e.kind {
        Some(event::Kind::Message(m)) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}

#[tokio::test]
async fn messages_and_receipts_cross_nodes_live_in_order() {
    let Some(cluster) = TestCluster::start("cluster", 2, quiet_recheck).await else {
        return;
    };
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let (_alice, _, ta) = a.http().account("alice").await;
    let (bob, b1, tb) = a.http().account("bob").await;
    let (mut alice_ws, _, _) = Raw::connect(a.addr, &ta).await;
    let (mut bob_ws, _, _) = Raw::connect(b.addr, &tb).await;

    let started = Instant::now();
    let mut seqs = Vec::new();
    for i in 0..20 {
        let rid = alice_ws
            .send_text_msg(
                bob,
                &format!("m{i}"),
                format!("hello {i}").as_bytes(),
                &[b1],
            )
            .await;
        seqs.push(sent(&mut alice_ws, rid).await);
    }
    let mut got = Vec::new();
    let mut last_mseq = 0;
    while got.len() < 20 {
        let e = event(&mut bob_ws).await;
        assert!(e.mailbox_seq > last_mseq, "in mailbox order");
        last_mseq = e.mailbox_seq;
        got.push(message(&e).seq);
    }
    assert_eq!(got, seqs, "every message once, in order");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "delivered live, not by the hourly re-check"
    );

    // Bob acknowledges on node b; alice, on node a, sees the delivered tick live.
    let rid = bob_ws
        .request(client_frame::Kind::Ack(Ack { up_to: last_mseq }))
        .await;
    assert!(matches!(
        bob_ws.answer(rid, &mut Vec::new()).await,
        server_frame::Kind::Done(_)
    ));
    let receipt = loop {
        if let Some(event::Kind::Receipt(r)) = event(&mut alice_ws).await.kind {
            break r;
        }
    };
    assert_eq!(receipt.up_to_seq, *seqs.last().expect("sent"));
}

#[tokio::test]
async fn a_group_message_reaches_members_on_every_node() {
    let Some(cluster) = TestCluster::start("cluster", 3, quiet_recheck).await else {
        return;
    };
    let http = cluster.nodes[0].http();
    let mut members = Vec::new();
    for name in ["ann", "ben", "cal"] {
        members.push(http.account(name).await);
    }
    let (s, v) = http
        .post(
            "/v1/groups",
            serde_json::json!({"name": "trio", "members": ["ben", "cal"]}),
            Some(&members[0].2),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let group = v["group_id"].as_u64().expect("group id");
    // ann on node a, ben on b, cal on c.
    let mut sockets = Vec::new();
    for (i, (_, _, token)) in members.iter().enumerate() {
        let (ws, _, _) = Raw::connect(cluster.nodes[i].addr, token).await;
        sockets.push(ws);
    }
    // A group's devices are the server's to find: no device list.
    let rid = sockets[0]
        .request(client_frame::Kind::Send(Send {
            client_msg_id: "g1".into(),
            to: Some(Peer::group(group)),
            body: b"to all".to_vec(),
            devices: vec![],
        }))
        .await;
    let seq = sent(&mut sockets[0], rid).await;
    for ws in &mut sockets[1..] {
        let m = loop {
            let e = event(ws).await;
            if let Some(event::Kind::Message(m)) = e.kind
                && m.seq == seq
            {
                break m;
            }
        };
        assert_eq!(m.body, b"to all");
    }
}

#[tokio::test]
async fn a_device_connecting_to_a_second_node_closes_its_first_connection() {
    let Some(cluster) = TestCluster::start("cluster", 2, quiet_recheck).await else {
        return;
    };
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let (_, _, tb) = a.http().account("bob").await;
    let (mut first, _, _) = Raw::connect(a.addr, &tb).await;
    let (mut second, _, _) = Raw::connect(b.addr, &tb).await;
    assert_eq!(first.closed().await, Some(4006), "replaced across nodes");
    // The newer one stays.
    let rid = second
        .request(client_frame::Kind::Ping(Ping { client_time_ms: 0 }))
        .await;
    assert!(matches!(
        second.answer(rid, &mut Vec::new()).await,
        server_frame::Kind::Pong(_)
    ));
}

#[tokio::test]
async fn removing_a_device_on_one_node_disconnects_it_on_another() {
    let Some(cluster) = TestCluster::start("cluster", 2, quiet_recheck).await else {
        return;
    };
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let (_, _, t1) = a.http().account("alice").await;
    let (_, d2, t2) = a.http().login("alice").await;
    let (mut ws2, _, _) = Raw::connect(b.addr, &t2).await;
    let (s, _) = a
        .http()
        .delete(&format!("/v1/devices/{d2}"), Some(&t1))
        .await;
    assert_eq!(s, 204);
    assert_eq!(ws2.closed().await, Some(4001));
}

#[tokio::test]
async fn online_and_last_seen_are_cluster_wide() {
    // Last seen is written to the database every hour here: what node a knows of a
    // disconnect on node b came through the directory.
    let Some(cluster) = TestCluster::start("cluster", 2, |c| {
        quiet_recheck(c);
        c.last_seen_flush_secs = 3600;
    })
    .await
    else {
        return;
    };
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let (_, _, ta) = a.http().account("alice").await;
    let (_, _, tb) = a.http().account("bob").await;
    for token in [&ta, &tb] {
        let (s, _) = a
            .http()
            .put_json(
                "/v1/settings/privacy",
                serde_json::json!({"last_seen": "everyone"}),
                Some(token),
            )
            .await;
        assert_eq!(s, 200);
    }
    let (bob_ws, _, _) = Raw::connect(b.addr, &tb).await;
    let (s, v) = a.http().get("/v1/users/bob/last-seen", Some(&ta)).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["online"], true, "bob is online on node b: {v}");
    let before = now_ms();
    drop(bob_ws);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, v) = a.http().get("/v1/users/bob/last-seen", Some(&ta)).await;
        if v["online"] == false {
            let seen = v["last_seen_ms"].as_i64().expect("last seen");
            assert!(seen >= before - 1000, "the disconnect on node b: {v}");
            break;
        }
        assert!(Instant::now() < deadline, "still online: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as i64
}

/// The database stays the truth: NATS killed and restarted, Redis flushed, then killed and
/// restarted, while one user sends to another on a second node. Sends never stop working.
/// After each step the sender pauses and everything sent so far must reach the recipient,
/// exactly once and in order, by the mechanism meant for that failure (there is no periodic
/// re-check to help: it is an hour): the re-read after the bus reconnects, the renewal that
/// writes lost directory entries again, the broadcast used while Redis is away. The services
/// are this test's own, so that stopping them disturbs no other test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_and_redis_failing_delay_delivery_but_lose_nothing() {
    let mut redis = Service::start(ServiceKind::Redis);
    let mut nats = Service::start(ServiceKind::Nats);
    let Some(env) = ClusterEnv::private("cluster", &redis, &nats) else {
        return;
    };
    let redis_url = env.redis.clone();
    let cluster = TestCluster::start_on(env, 2, |c| {
        c.cluster.recheck_secs = 3600;
        c.cluster.directory_ttl_secs = 3;
    })
    .await;
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let (_, _, ta) = a.http().account("alice").await;
    let (bob, b1, tb) = a.http().account("bob").await;
    let (mut alice_ws, _, _) = Raw::connect(a.addr, &ta).await;
    let (bob_ws, _, _) = Raw::connect(b.addr, &tb).await;

    // Bob's messages, as they come (no frame for a while is no failure here).
    let (got_tx, mut got) = tokio::sync::mpsc::unbounded_channel();
    let reader = tokio::spawn(async move {
        use futures_util::StreamExt;
        use prost::Message as _;
        let mut ws = bob_ws.ws;
        while let Some(Ok(msg)) = ws.next().await {
            let tokio_tungstenite::tungstenite::Message::Binary(bytes) = msg else {
                continue;
            };
            let frame = ServerFrame::decode(&bytes[..]).expect("decodes");
            if let Some(server_frame::Kind::Event(e)) = frame.kind
                && got_tx.send(message(&e).seq).is_err()
            {
                return;
            }
        }
    });
    let mut sent_seqs = Vec::new();
    let mut received = Vec::new();
    let mut send = async |n: usize, sent_seqs: &mut Vec<u64>| {
        for _ in 0..n {
            let i = sent_seqs.len();
            let rid = alice_ws
                .send_text_msg(bob, &format!("m{i}"), b"through it all", &[b1])
                .await;
            sent_seqs.push(sent(&mut alice_ws, rid).await);
        }
    };
    // Everything sent so far reaches bob within 15 s, in order, once.
    async fn caught_up(
        got: &mut tokio::sync::mpsc::UnboundedReceiver<u64>,
        received: &mut Vec<u64>,
        sent: &[u64],
        step: &str,
    ) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        while received.len() < sent.len() {
            match tokio::time::timeout_at(deadline, got.recv()).await {
                Ok(Some(seq)) => received.push(seq),
                _ => panic!("{step}: bob has {} of {}", received.len(), sent.len()),
            }
        }
        assert_eq!(received, sent, "{step}: exactly once, in order");
    }
    let ready = |srv: &TestServer| {
        let http = srv.http();
        async move { http.get_text("/readyz").await.0 }
    };

    send(20, &mut sent_seqs).await;
    caught_up(&mut got, &mut received, &sent_seqs, "before any failure").await;

    nats.kill();
    wait_for(|| ready(b), 503).await;
    send(20, &mut sent_seqs).await;
    nats.restart();
    wait_for(|| ready(b), 200).await;
    caught_up(&mut got, &mut received, &sent_seqs, "NATS restarted").await;

    let url = redis_url.clone();
    tokio::task::spawn_blocking(move || {
        let mut conn = redis::Client::open(url)?.get_connection()?;
        redis::cmd("FLUSHALL").query::<()>(&mut conn)
    })
    .await
    .expect("join")
    .expect("FLUSHALL");
    send(20, &mut sent_seqs).await;
    caught_up(&mut got, &mut received, &sent_seqs, "Redis flushed").await;

    redis.kill();
    wait_for(|| ready(b), 503).await;
    send(20, &mut sent_seqs).await;
    caught_up(&mut got, &mut received, &sent_seqs, "Redis down").await;

    redis.restart();
    wait_for(|| ready(b), 200).await;
    send(20, &mut sent_seqs).await;
    caught_up(&mut got, &mut received, &sent_seqs, "Redis restarted").await;
    reader.abort();
}

/// Polls `probe` until it answers `want` (within 15 s).
async fn wait_for<F, Fut>(probe: F, want: u16)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = u16>,
{
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let got = probe().await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "readiness {got}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn rate_limits_are_shared_by_the_nodes() {
    let Some(cluster) = TestCluster::start("cluster", 2, |c| {
        c.rate_limits.registrations_per_hour_per_address = 2;
    })
    .await
    else {
        return;
    };
    let (a, b) = (cluster.nodes[0].http(), cluster.nodes[1].http());
    let register = |http: &Http, name: &str| {
        let body = serde_json::json!({"username": name, "password": "correct horse"});
        let http = Http {
            base: http.base.clone(),
            client: http.client.clone(),
        };
        async move { http.post("/v1/accounts", body, None).await }
    };
    assert_eq!(register(&a, "first").await.0, 201);
    assert_eq!(register(&b, "second").await.0, 201);
    let (s, v) = register(&a, "third").await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (429, Some("rate_limited")),
        "two an hour from one address, whichever node: {v}"
    );
    assert_eq!(register(&b, "fourth").await.0, 429);
}

/// Media in a cluster: an upload begun through one node resumes through the other, whose
/// offset it sees (the staged parts, the tail and the running hash are in the bucket and the
/// upload's row, not in a node); both nodes serve the object; one writer at a time whichever
/// node it reached; garbage collection runs on one node at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_resumes_through_another_node_and_gc_runs_once() {
    use common::media::{Api, blob, id_of};
    use reqwest::StatusCode;
    let Some(cluster) = TestCluster::start("cluster", 2, quiet_recheck).await else {
        return;
    };
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[1]);
    let on_a = Api::new(a, "alice").await;
    let on_b = on_a.at(b.url());
    // Two whole parts and a tail.
    let bytes = blob((11 << 20) + 123, 9);
    let id = id_of(&bytes);
    let path = on_a.create(bytes.len(), Some(&id)).await;

    // Node a takes 6 MiB (a part and a tail), then a request cut off after 1 MiB more.
    let first = 6 << 20;
    assert_eq!(
        on_a.patch(&path, 0, bytes[..first].to_vec()).await.status(),
        StatusCode::NO_CONTENT
    );
    let cut = first + (1 << 20);
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![
        Ok(bytes[first..cut].to_vec()),
        Err(std::io::Error::other("the node's client went away")),
    ];
    let r = on_a
        .tus(reqwest::Method::PATCH, &path)
        .header("Content-Type", "application/offset+octet-stream")
        .header("Upload-Offset", first.to_string())
        .header("Content-Length", (bytes.len() - first).to_string())
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await;
    assert!(r.is_err() || !r.expect("response").status().is_success());
    let mut offset = 0;
    for _ in 0..100 {
        offset = on_b.offset(&path).await.1;
        if offset == cut as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(offset, cut as u64, "node b sees what node a received");

    // While a request holds the upload on node a, node b refuses a second writer. (First, the
    // cut-off request's lease is given up: it is released just after its offset is recorded.)
    let lease = format!("u:{}", path.rsplit('/').next().expect("upload id"));
    // Whether nobody holds `name`: the probe takes it already expired, so that it never
    // stands in anyone's way.
    let lease_is_free = |name: &str| {
        let (store, name) = (a.state.store.clone(), name.to_owned());
        async move {
            let now = tern_server::services::Clock::now_ms(&tern_server::services::SystemClock);
            store
                .take_lease(&name, "probe", now, now - 60_000)
                .await
                .expect("probe")
        }
    };
    for _ in 0..250 {
        if lease_is_free(&lease).await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<Vec<u8>, std::io::Error>>();
    tx.send(Ok(bytes[cut..cut + 1000].to_vec()))
        .expect("first piece");
    let slow = {
        let body = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|piece| (piece, rx))
        });
        let req = on_a
            .tus(reqwest::Method::PATCH, &path)
            .header("Content-Type", "application/offset+octet-stream")
            .header("Upload-Offset", cut.to_string())
            .body(reqwest::Body::wrap_stream(body));
        tokio::spawn(async move { req.send().await })
    };
    let mut held = false;
    for _ in 0..250 {
        if !lease_is_free(&lease).await {
            held = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(held, "node a's request took the upload");
    let r = on_b.patch(&path, cut, bytes[cut..cut + 10].to_vec()).await;
    assert_eq!(
        r.status(),
        StatusCode::CONFLICT,
        "a second writer, on node b"
    );
    drop(tx);
    let r = slow.await.expect("join").expect("slow patch");
    let status = r.status();
    assert_eq!(status, StatusCode::NO_CONTENT, "{:?}", r.text().await);
    let offset = on_b.offset(&path).await.1 as usize;
    assert_eq!(offset, cut + 1000);

    // Node b finishes it; both nodes serve the object.
    for _ in 0..250 {
        if lease_is_free(&lease).await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = on_b.patch(&path, offset, bytes[offset..].to_vec()).await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(r.headers()["tern-media-id"], id.as_str());
    for api in [&on_a, &on_b] {
        let got = api.get(&id, &[]).await;
        assert_eq!(got.status(), StatusCode::OK);
        assert!(got.bytes().await.expect("body").as_ref() == bytes.as_slice());
    }

    // Garbage collection: while a holds the lease, b's pass does nothing.
    let store = &a.state.store;
    let now = tern_server::services::Clock::now_ms(&tern_server::services::SystemClock);
    assert!(
        store
            .take_lease("gc", "test", now, now + 60_000)
            .await
            .expect("lease")
    );
    let later = now + 31 * 86_400_000;
    let report = b.state.media.collect_garbage(later).await.expect("gc");
    assert!(report.skipped && report.objects == 0, "{report:?}");
    store.release_lease("gc", "test").await.expect("release");
    let report = b.state.media.collect_garbage(later).await.expect("gc");
    assert_eq!((report.skipped, report.objects), (false, 1));
    assert_eq!(on_a.head(&id).await, StatusCode::NOT_FOUND);
}

/// Every node signs pushes with the one VAPID key the first made, and sees the subscriptions
/// registered through the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_keys_and_subscriptions_are_cluster_wide() {
    use base64::Engine;
    let Some(cluster) = TestCluster::start("cluster", 2, quiet_recheck).await else {
        return;
    };
    let (a, b) = (cluster.nodes[0].http(), cluster.nodes[1].http());
    let (_, va) = a.get("/v1/push/vapid", None).await;
    let (_, vb) = b.get("/v1/push/vapid", None).await;
    assert!(va["public_key"].is_string());
    assert_eq!(va, vb, "one key for the cluster");
    let (_, device, token) = a.account("alice").await;
    let r = tern_webpush::Receiver::generate();
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let path = format!("/v1/devices/{device}/push");
    let (s, _) = a
        .put_json(
            &path,
            serde_json::json!({
                "endpoint": "https://push.example/abc",
                "keys": {"p256dh": b64.encode(r.p256dh()), "auth": b64.encode(r.auth())},
            }),
            Some(&token),
        )
        .await;
    assert_eq!(s, 200);
    let (s, v) = b.get(&path, Some(&token)).await;
    assert_eq!(
        (s, v["origin"].as_str()),
        (200, Some("https://push.example"))
    );
}

#[tokio::test]
async fn a_device_connected_nowhere_is_woken_once_by_the_cluster() {
    use common::push::{PushService, SUBJECT, pushing, subscribe_device, vapid_key};
    // Both nodes look in the store every second besides: still one push.
    let Some(cluster) = TestCluster::start("cluster", 2, |c| {
        quiet_recheck(c);
        pushing(c);
        c.push.scan_secs = 1;
    })
    .await
    else {
        return;
    };
    let (a, b) = (cluster.nodes[0].http(), cluster.nodes[1].http());
    let service = PushService::start(vapid_key(&a).await, SUBJECT).await;
    let (_, _, alice_token) = a.account("alice").await;
    let (bob, b1, bob_token) = b.account("bob").await;
    subscribe_device(&b, &service, b1, &bob_token, "bob").await;
    let (mut alice_ws, _, _) = Raw::connect(cluster.nodes[0].addr, &alice_token).await;
    let (mut bob_ws, _, _) = Raw::connect(cluster.nodes[1].addr, &bob_token).await;

    // Bob is connected to the other node: no push, whichever node looks.
    let mut last = 0;
    for i in 0..3 {
        let rid = alice_ws
            .send_text_msg(bob, &format!("m{i}"), b"hello", &[b1])
            .await;
        sent(&mut alice_ws, rid).await;
        last = event(&mut bob_ws).await.mailbox_seq;
    }
    let rid = bob_ws
        .request(client_frame::Kind::Ack(Ack { up_to: last }))
        .await;
    bob_ws.answer(rid, &mut Vec::new()).await;
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(service.count("bob"), 0, "bob is connected to node b");

    // Bob leaves: a burst from node a wakes him once, though both nodes scan.
    let _ = bob_ws.ws.close(None).await;
    for _ in 0..500 {
        if cluster.nodes[0].state.hub.connected(&[(bob, b1)]).await == [false] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for i in 0..5 {
        let rid = alice_ws
            .send_text_msg(bob, &format!("n{i}"), b"hello", &[b1])
            .await;
        sent(&mut alice_ws, rid).await;
    }
    assert_eq!(service.wait_for("bob", 1, WAIT).await, 1);
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(service.count("bob"), 1, "one push, from one node");
    assert!(service.refusals.lock().expect("lock").is_empty());
}
