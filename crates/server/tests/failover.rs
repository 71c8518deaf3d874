//! Failover: three `ternd` processes on one PostgreSQL schema, the machine's Redis and NATS,
//! behind nginx (round robin, no stickiness); clients know only nginx's address. One node is
//! killed with SIGKILL while clients exchange 1:1 and group messages; its clients reconnect
//! through nginx to the others. Every acknowledged message must reach every recipient device
//! once (one seq, one client message id), in order, and sends keep working throughout.
//! Needs `TERN_TEST_POSTGRES`, `TERN_TEST_REDIS`, `TERN_TEST_NATS` and nginx (`.ci/run` has
//! them); skipped, saying so, without them.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::sdk::{online, register};
use common::*;

/// Connections a node holds now, from its `/metrics`.
async fn connections(addr: std::net::SocketAddr) -> u64 {
    let (_, text) = http_for(addr).get_text("/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix("tern_connections "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// What one device shows of a conversation: (seq, client message id, text) of the messages
/// from others, in seq order.
fn incoming(msgs: &[tern_client::StoredMessage]) -> Vec<(u64, String, String)> {
    msgs.iter()
        .filter(|m| !m.outgoing && !m.is_system())
        .map(|m| {
            (
                m.seq.expect("stored"),
                m.client_msg_id.clone(),
                m.text.clone(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_under_load_loses_nothing_and_its_clients_move_on() {
    if Nginx::binary().is_none() && ClusterEnv::from_env("failover").is_some() {
        panic!("nginx is not installed: .ci/run installs it");
    }
    let Some(mut cluster) = ProcessCluster::start("failover", 3, &["cluster.recheck_secs=5"])
    else {
        return;
    };
    let url = cluster.nginx.url();
    const USERS: usize = 6;
    const PER_USER: usize = 60;
    let names: Vec<String> = (0..USERS).map(|i| format!("user{i}")).collect();
    let mut devices = Vec::new();
    for name in &names {
        devices.push(Arc::new(register(&url, name).await));
    }
    for d in &devices {
        online(d).await;
    }
    let others: Vec<&str> = names[1..].iter().map(String::as_str).collect();
    let group = devices[0]
        .client
        .create_group("everyone", &others, false)
        .await
        .expect("group")
        .group_id;
    let mut before = Vec::new();
    for node in cluster.nodes.iter().flatten() {
        before.push(connections(node.addr).await);
    }
    assert_eq!(before.iter().sum::<u64>(), USERS as u64, "{before:?}");

    // Each user sends to the next one and, every third message, to the group; a send returns
    // at its Sent, retried by the SDK across reconnects.
    let acked: Arc<Mutex<Vec<(usize, bool, String)>>> = Arc::default();
    let mut tasks = Vec::new();
    for (i, d) in devices.iter().enumerate() {
        let (d, acked, next) = (d.clone(), acked.clone(), names[(i + 1) % USERS].clone());
        tasks.push(tokio::spawn(async move {
            for k in 0..PER_USER {
                let to_group = k % 3 == 0;
                let text = format!("u{i}-{k}");
                let send = async {
                    if to_group {
                        d.client.send_group_text(group, &text).await
                    } else {
                        d.client.send_text(&next, &text).await
                    }
                };
                let sent = tokio::time::timeout(Duration::from_secs(60), send)
                    .await
                    .unwrap_or_else(|_| panic!("u{i}: {text} not sent within 60 s"))
                    .unwrap_or_else(|e| panic!("u{i}: {text}: {e}"));
                acked
                    .lock()
                    .expect("lock")
                    .push((i, to_group, sent.client_msg_id));
            }
        }));
    }
    // Under load, kill the node holding the most clients.
    let started = Instant::now();
    while acked.lock().expect("lock").len() < USERS * PER_USER / 4 {
        assert!(started.elapsed() < Duration::from_secs(60), "traffic flows");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let victim = (0..before.len())
        .max_by_key(|&i| before[i])
        .expect("a node");
    cluster.kill(victim);
    let killed_at = acked.lock().expect("lock").len();
    eprintln!(
        "killed node {victim} holding {} of {USERS} clients ({before:?}) after {killed_at} acknowledged sends",
        before[victim]
    );
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .expect("senders finish")
            .expect("every send acknowledged");
    }
    assert!(
        killed_at < USERS * PER_USER,
        "the node died while messages were still being sent"
    );
    let mut after = 0;
    for node in cluster.nodes.iter().flatten() {
        after += connections(node.addr).await;
    }
    assert_eq!(
        after, USERS as u64,
        "every client reconnected to a survivor"
    );

    // What each sender had acknowledged, by conversation.
    let acked = acked.lock().expect("lock").clone();
    let mut direct: HashMap<usize, Vec<String>> = HashMap::new();
    let mut grouped: HashMap<usize, Vec<String>> = HashMap::new();
    for (i, to_group, id) in acked {
        let into = if to_group { &mut grouped } else { &mut direct };
        into.entry(i).or_default().push(id);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for (j, d) in devices.iter().enumerate() {
        let from = (j + USERS - 1) % USERS;
        loop {
            let dm = incoming(&d.client.history(&names[from], 1000).expect("history"));
            let gm = incoming(&d.client.group_history(group, 1000).expect("history"));
            let want_dm = &direct[&from];
            let want_gm: usize = (0..USERS)
                .filter(|&i| i != j)
                .map(|i| grouped[&i].len())
                .sum();
            if dm.len() < want_dm.len() || gm.len() < want_gm {
                assert!(
                    Instant::now() < deadline,
                    "u{j}: {} of {} direct, {} of {want_gm} group messages",
                    dm.len(),
                    want_dm.len(),
                    gm.len()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            // Direct: exactly the acknowledged ones, once each, in the order sent.
            let ids: Vec<&String> = dm.iter().map(|m| &m.1).collect();
            assert_eq!(ids, want_dm.iter().collect::<Vec<_>>(), "u{j} from u{from}");
            // Seqs only grow (the SDK's key-sharing messages take some seqs of the
            // conversation too, so they need not be consecutive here).
            assert!(dm.windows(2).all(|w| w[0].0 < w[1].0), "u{j}: in seq order");
            // Group: every sender's messages once, each sender's in its order.
            assert!(
                gm.windows(2).all(|w| w[0].0 < w[1].0),
                "u{j}: group seq order"
            );
            assert_eq!(gm.len(), want_gm, "u{j}: group messages once each");
            for i in (0..USERS).filter(|&i| i != j) {
                let theirs: Vec<&String> = gm
                    .iter()
                    .filter(|m| m.2.starts_with(&format!("u{i}-")))
                    .map(|m| &m.1)
                    .collect();
                assert_eq!(theirs, grouped[&i].iter().collect::<Vec<_>>(), "u{j}: u{i}");
            }
            break;
        }
    }
}

/// A node is killed in the middle of an upload: the client (which knows only nginx) finds
/// the offset through another node — every whole part the dead node had recorded — and
/// finishes there once the dead node's lease on the upload has expired (retrying its 409s,
/// as tus clients do); the object is whole, and any node serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_upload_the_upload_resumes_through_another() {
    use common::media::{Api, blob, id_of};
    use reqwest::StatusCode;
    if Nginx::binary().is_none() && ClusterEnv::from_env("failover").is_some() {
        panic!("nginx is not installed: .ci/run installs it");
    }
    let Some(mut cluster) = ProcessCluster::start("failover", 3, &[]) else {
        return;
    };
    let (_, _, token) = http_for(cluster.nginx.addr).account("alice").await;
    let api = Api {
        base: cluster.nginx.url(),
        token,
        http: client(),
    };
    let part = 5 << 20;
    let bytes = blob((12 << 20) + 77, 5);
    let id = id_of(&bytes);
    let path = api.create(bytes.len(), Some(&id)).await;

    // 7 MiB through nginx, and the request left open.
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Result<Vec<u8>, std::io::Error>>();
    for piece in bytes[..7 << 20].chunks(1 << 20) {
        tx.send(Ok(piece.to_vec())).expect("piece");
    }
    let open = {
        let body = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|piece| (piece, rx))
        });
        let req = api
            .tus(reqwest::Method::PATCH, &path)
            .header("Content-Type", "application/offset+octet-stream")
            .header("Upload-Offset", "0")
            .body(reqwest::Body::wrap_stream(body));
        tokio::spawn(async move { req.send().await })
    };
    // Its first part is recorded; the node writing it is the one to kill.
    let mut offset = 0;
    for _ in 0..500 {
        offset = api.offset(&path).await.1;
        if offset > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(offset, part as u64, "one whole part recorded");
    let mut writer = None;
    for (i, node) in cluster.nodes.iter().enumerate() {
        let addr = node.as_ref().expect("running").addr;
        let (_, text) = http_for(addr).get_text("/metrics").await;
        if text.lines().any(|l| l == "tern_media_upload_writers 1") {
            writer = Some(i);
        }
    }
    let writer = writer.expect("a node is writing the upload");
    cluster.kill(writer);
    drop(tx);
    let cut_off = open.await.expect("join");
    assert!(cut_off.is_err() || !cut_off.expect("answer").status().is_success());

    // Through nginx, to the survivors: the offset is the recorded part.
    let mut head = api.offset(&path).await;
    for _ in 0..10 {
        if head.0 != StatusCode::BAD_GATEWAY {
            break;
        }
        head = api.offset(&path).await;
    }
    assert_eq!(head, (StatusCode::OK, part as u64));
    let started = std::time::Instant::now();
    let done = loop {
        let r = api.patch(&path, part, bytes[part..].to_vec()).await;
        match r.status() {
            StatusCode::NO_CONTENT => break r,
            // The dead node's lease on the upload, until it expires; nginx answering 502 for
            // the dead node until it marks it failed. tus clients retry both.
            StatusCode::CONFLICT | StatusCode::BAD_GATEWAY
                if started.elapsed() < Duration::from_secs(60) =>
            {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            other => panic!("resume: {other} after {:?}", started.elapsed()),
        }
    };
    assert_eq!(done.headers()["tern-media-id"], id.as_str());
    eprintln!(
        "resumed {:?} after the kill (the lease's expiry)",
        started.elapsed()
    );
    for node in cluster.nodes.iter().flatten() {
        let got = api.at(format!("http://{}", node.addr)).get(&id, &[]).await;
        assert_eq!(got.status(), StatusCode::OK);
        assert!(got.bytes().await.expect("body").as_ref() == bytes.as_slice());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_nginx_the_limits_count_each_client_not_the_proxy() {
    let Some(cluster) = ProcessCluster::start(
        "failover",
        2,
        &["rate_limits.registrations_per_hour_per_address=2"],
    ) else {
        return;
    };
    let from = |x: u8| {
        reqwest::Client::builder()
            .local_address(std::net::IpAddr::from([127, 0, 0, x]))
            .build()
            .expect("client")
    };
    let url = cluster.nginx.url();
    let signup = |client: reqwest::Client, name: String| {
        let url = url.clone();
        async move {
            client
                .post(format!("{url}/v1/accounts"))
                .json(&serde_json::json!({"username": name, "password": "correct horse"}))
                .send()
                .await
                .expect("answer")
                .status()
                .as_u16()
        }
    };
    // Round robin over two nodes: the count is shared, and it is 127.0.0.2's, not nginx's.
    let mut seen = Vec::new();
    for i in 0..3 {
        seen.push(signup(from(2), format!("first{i}")).await);
    }
    assert_eq!(seen, [201, 201, 429]);
    let forged = from(2)
        .post(format!("{url}/v1/accounts"))
        .header("x-forwarded-for", "198.51.100.1")
        .json(&serde_json::json!({"username": "first3", "password": "correct horse"}))
        .send()
        .await
        .expect("answer");
    assert_eq!(forged.status(), 429, "a forged header does not help");
    assert_eq!(
        signup(from(3), "second0".into()).await,
        201,
        "another client"
    );
}
