//! Groups end to end with raw frames and HTTP: one order for concurrent senders, membership
//! bounding what each member receives (also when a removal races with sends), rights, limits,
//! per-member receipts and message info, and a 1,000-member group with every member online.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use prost::Message as _;
use serde_json::json;
use tern_proto::ErrorCode;
use tern_proto::frames::*;

struct Member {
    token: String,
}

async fn members(http: &Http, names: &[&str]) -> Vec<Member> {
    let mut out = Vec::new();
    for n in names {
        let (_, _, token) = http.account(n).await;
        out.push(Member { token });
    }
    out
}

async fn create(http: &Http, owner: &Member, name: &str, others: &[&str]) -> u64 {
    let (s, v) = http
        .post(
            "/v1/groups",
            json!({"name": name, "members": others}),
            Some(&owner.token),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    v["group_id"].as_u64().expect("group id")
}

async fn send_group(raw: &mut Raw, group: u64, id: &str) -> Result<u64, ErrorCode> {
    let rid = raw
        .request(client_frame::Kind::Send(Send {
            client_msg_id: id.into(),
            to: Some(Peer::group(group)),
            body: id.as_bytes().to_vec(),
            devices: vec![],
        }))
        .await;
    match raw.answer(rid, &mut Vec::new()).await {
        server_frame::Kind::Sent(s) => Ok(s.seq),
        server_frame::Kind::Error(e) => Err(ErrorCode::from_i32(e.code).expect("code")),
        other => panic!("{other:?}"),
    }
}

/// (seq, kind, body) of the messages among `events`.
fn messages(events: &[Event]) -> Vec<(u64, i32, Vec<u8>)> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(event::Kind::Message(m)) => Some((m.seq, m.kind, m.body.clone())),
            _ => None,
        })
        .collect()
}

/// Connects and drains: every message waiting for the device.
async fn inbox(srv: &TestServer, token: &str) -> Vec<(u64, i32, Vec<u8>)> {
    let (_, _, events) = Raw::connect(srv.addr, token).await;
    messages(&events)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_senders_keep_one_order_for_every_member() {
    let srv = TestServer::start().await;
    let http = srv.http();
    let m = members(&http, &["alice", "bob", "carol"]).await;
    let g = create(&http, &m[0], "trio", &["bob", "carol"]).await;
    let mut tasks = Vec::new();
    for (i, who) in m.iter().enumerate() {
        let (addr, token) = (srv.addr, who.token.clone());
        tasks.push(tokio::spawn(async move {
            let (mut raw, _, _) = Raw::connect(addr, &token).await;
            for n in 0..20 {
                send_group(&mut raw, g, &format!("{i}-{n}"))
                    .await
                    .expect("sent");
            }
        }));
    }
    for t in tasks {
        t.await.expect("sender");
    }
    // Everyone sees seq 1 (CREATED) .. 61, the same messages at the same seqs (minus their own).
    let mut by_seq: HashMap<u64, Vec<u8>> = HashMap::new();
    for (i, who) in m.iter().enumerate() {
        let got = inbox(&srv, &who.token).await;
        let mine = format!("{i}-");
        for (seq, _, body) in &got {
            if let Some(prev) = by_seq.insert(*seq, body.clone()) {
                assert_eq!(&prev, body, "seq {seq} differs between members");
            }
        }
        let seqs: Vec<u64> = got.iter().map(|(s, _, _)| *s).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "in order");
        assert_eq!(got.len(), 1 + 40, "member {i}: CREATED plus the others' 40");
        assert!(got.iter().all(|(_, _, b)| !b.starts_with(mine.as_bytes())));
    }
    assert_eq!(by_seq.len(), 61);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_racing_with_sends_leaks_nothing_later() {
    let srv = TestServer::start().await;
    let http = srv.http();
    let m = members(&http, &["alice", "bob", "carol"]).await;
    let g = create(&http, &m[0], "race", &["bob", "carol"]).await;
    let (addr, token) = (srv.addr, m[2].token.clone());
    let sender = tokio::spawn(async move {
        let (mut raw, _, _) = Raw::connect(addr, &token).await;
        for n in 0..150 {
            send_group(&mut raw, g, &format!("c{n}"))
                .await
                .expect("sent");
        }
    });
    tokio::time::sleep(Duration::from_millis(30)).await;
    let (s, info) = http
        .delete(&format!("/v1/groups/{g}/members/bob"), Some(&m[0].token))
        .await;
    assert_eq!(s, 200, "{info}");
    sender.await.expect("sender");
    let got = inbox(&srv, &m[1].token).await;
    let removal = got
        .iter()
        .find(|(_, kind, body)| {
            *kind == MessageKind::System as i32
                && GroupEvent::decode(&body[..])
                    .map(|e| e.action == GroupAction::Removed as i32)
                    .unwrap_or(false)
        })
        .map(|(seq, _, _)| *seq)
        .expect("bob receives his own removal");
    assert!(
        got.iter().all(|(seq, _, _)| *seq <= removal),
        "nothing after the removal reaches bob"
    );
    assert_eq!(got.last().map(|(s, _, _)| *s), Some(removal));
    // Alice sees every message, and the removal at the same seq.
    let alice = inbox(&srv, &m[0].token).await;
    assert_eq!(alice.len(), 152, "CREATED + 150 + REMOVED");
    assert!(
        alice
            .iter()
            .any(|(seq, kind, _)| *seq == removal && *kind == MessageKind::System as i32)
    );
    // The race really happened: carol kept sending after bob's removal.
    assert!(
        alice.iter().any(|(seq, _, _)| *seq > removal),
        "the removal landed after every send"
    );
}

#[tokio::test]
async fn non_members_are_refused_everything() {
    let srv = TestServer::start().await;
    let http = srv.http();
    let m = members(&http, &["alice", "bob", "mallory"]).await;
    let g = create(&http, &m[0], "private", &["bob"]).await;
    let mallory = &m[2].token;
    let (mut raw, _, _) = Raw::connect(srv.addr, mallory).await;
    assert_eq!(send_group(&mut raw, g, "x").await, Err(ErrorCode::NotFound));
    let rid = raw
        .request(client_frame::Kind::Read(Read {
            conversation: Some(Peer::group(g)),
            up_to_seq: 1,
        }))
        .await;
    assert!(matches!(
        raw.answer(rid, &mut Vec::new()).await,
        server_frame::Kind::Error(_)
    ));
    let attempts = [
        http.get(&format!("/v1/groups/{g}"), Some(mallory)).await,
        http.post(
            &format!("/v1/groups/{g}/members"),
            json!({"members": ["mallory"]}),
            Some(mallory),
        )
        .await,
        http.post(&format!("/v1/groups/{g}/leave"), json!({}), Some(mallory))
            .await,
        http.patch(
            &format!("/v1/groups/{g}"),
            json!({"name": "mine"}),
            Some(mallory),
        )
        .await,
        http.get(&format!("/v1/groups/{g}/messages/1"), Some(mallory))
            .await,
        http.get(&format!("/v1/groups/{g}"), None).await,
    ];
    for (s, v) in attempts {
        assert!(s == 404 || s == 401, "{s} {v}");
    }
    let (_, list) = http.get("/v1/groups", Some(mallory)).await;
    assert_eq!(list["groups"], json!([]));
    let (_, info) = http
        .get(&format!("/v1/groups/{g}"), Some(&m[0].token))
        .await;
    assert_eq!(info["members"].as_array().map(Vec::len), Some(2));
    assert_eq!(info["last_seq"], 1, "nothing was written");
}

#[tokio::test]
async fn admin_rights_and_limits() {
    let srv = TestServer::start_with(|c| c.limits.max_group_members = 4).await;
    let http = srv.http();
    let m = members(&http, &["alice", "bob", "carol", "dave", "erin"]).await;
    let (alice, bob) = (&m[0].token, &m[1].token);
    // Limits at creation: too many members, bad names, unknown users.
    let bad = [
        (
            json!({"name": "big", "members": ["bob", "carol", "dave", "erin"]}),
            409,
            "limit_reached",
        ),
        (json!({"name": "", "members": []}), 400, "bad_request"),
        (
            json!({"name": "x".repeat(101), "members": []}),
            400,
            "bad_request",
        ),
        (
            json!({"name": "ok", "members": ["nobody"]}),
            404,
            "not_found",
        ),
    ];
    for (body, status, code) in bad {
        let (s, v) = http.post("/v1/groups", body.clone(), Some(alice)).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (status, Some(code)),
            "{body}"
        );
    }
    let (_, list) = http.get("/v1/groups", Some(alice)).await;
    assert_eq!(
        list["groups"],
        json!([]),
        "failed creations created nothing"
    );

    let g = create(&http, &m[0], "club", &["bob", "carol"]).await;
    let member_attempts = [
        http.post(
            &format!("/v1/groups/{g}/members"),
            json!({"members": ["dave"]}),
            Some(bob),
        )
        .await,
        http.patch(
            &format!("/v1/groups/{g}"),
            json!({"name": "bob's"}),
            Some(bob),
        )
        .await,
        http.delete(&format!("/v1/groups/{g}/members/carol"), Some(bob))
            .await,
        http.put(&format!("/v1/groups/{g}/admins/carol"), Some(bob))
            .await,
        http.delete(&format!("/v1/groups/{g}/admins/alice"), Some(bob))
            .await,
    ];
    for (s, v) in member_attempts {
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (403, Some("forbidden")),
            "{v}"
        );
    }
    let (_, info) = http.get(&format!("/v1/groups/{g}"), Some(bob)).await;
    assert_eq!(
        (info["name"].as_str(), info["last_seq"].as_u64()),
        (Some("club"), Some(1)),
        "refusals changed nothing"
    );

    // The owner promotes bob; bob may now add, but not past the limit, and not remove the owner.
    let (s, _) = http
        .put(&format!("/v1/groups/{g}/admins/bob"), Some(alice))
        .await;
    assert_eq!(s, 200);
    let (s, v) = http
        .post(
            &format!("/v1/groups/{g}/members"),
            json!({"members": ["dave", "erin"]}),
            Some(bob),
        )
        .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("limit_reached"))
    );
    let (s, v) = http
        .post(
            &format!("/v1/groups/{g}/members"),
            json!({"members": ["dave"]}),
            Some(bob),
        )
        .await;
    assert_eq!((s, v["members"].as_array().map(Vec::len)), (200, Some(4)));
    let (s, _) = http
        .delete(&format!("/v1/groups/{g}/members/alice"), Some(bob))
        .await;
    assert_eq!(s, 403);
    let (s, v) = http
        .patch(
            &format!("/v1/groups/{g}"),
            json!({"name": "the club", "description": "Saturdays at ten", "members_can_add": true}),
            Some(bob),
        )
        .await;
    assert_eq!(
        (s, v["name"].as_str(), v["members_can_add"].as_bool()),
        (200, Some("the club"), Some(true))
    );
    // Every change is a system message in the group's sequence: created, promoted, added,
    // renamed, settings.
    let carol = inbox(&srv, &m[2].token).await;
    let actions: Vec<i32> = carol
        .iter()
        .map(|(_, kind, body)| {
            assert_eq!(*kind, MessageKind::System as i32);
            GroupEvent::decode(&body[..]).expect("event").action
        })
        .collect();
    let expected = [
        GroupAction::Created,
        GroupAction::Promoted,
        GroupAction::Added,
        GroupAction::Renamed,
        GroupAction::Described,
        GroupAction::SettingsChanged,
    ];
    assert_eq!(actions, expected.map(|a| a as i32).to_vec());
    // The owner leaves: the admin inherits.
    let (s, _) = http
        .post(&format!("/v1/groups/{g}/leave"), json!({}), Some(alice))
        .await;
    assert_eq!(s, 204);
    let (_, info) = http.get(&format!("/v1/groups/{g}"), Some(bob)).await;
    let roles: HashMap<&str, &str> = info["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| {
            (
                m["username"].as_str().unwrap_or(""),
                m["role"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(roles.get("bob"), Some(&"owner"));
    assert!(!roles.contains_key("alice"));
}

#[tokio::test]
async fn per_member_receipts_and_message_info() {
    let srv = TestServer::start().await;
    let http = srv.http();
    let m = members(&http, &["alice", "bob", "carol"]).await;
    let g = create(&http, &m[0], "ticks", &["bob", "carol"]).await;
    let (mut a, _, _) = Raw::connect(srv.addr, &m[0].token).await;
    let seq = send_group(&mut a, g, "hello").await.expect("sent");
    let info_path = format!("/v1/groups/{g}/messages/{seq}");
    let (s, v) = http.get(&info_path, Some(&m[1].token)).await;
    assert_eq!(s, 403, "only the sender sees message info: {v}");

    // Bob receives and acknowledges: alice gets bob's delivered receipt, not yet "all".
    let (mut b, _, events) = Raw::connect(srv.addr, &m[1].token).await;
    let last = events.last().map(|e| e.mailbox_seq).expect("events");
    let rid = b
        .request(client_frame::Kind::Ack(Ack { up_to: last }))
        .await;
    assert!(matches!(
        b.answer(rid, &mut Vec::new()).await,
        server_frame::Kind::Done(_)
    ));
    let receipt = |f: ServerFrame| match f.kind {
        Some(server_frame::Kind::Event(Event {
            kind: Some(event::Kind::Receipt(r)),
            ..
        })) => r,
        other => panic!("{other:?}"),
    };
    let r = receipt(a.recv().await);
    assert_eq!(
        (r.reader_username.as_str(), r.kind, r.up_to_seq),
        ("bob", ReceiptKind::Delivered as i32, seq)
    );
    assert!(r.all_delivered_up_to < seq);
    let (_, v) = http.get(&info_path, Some(&m[0].token)).await;
    assert_eq!(
        (v["delivered_to_all"].as_bool(), v["read_by_all"].as_bool()),
        (Some(false), Some(false))
    );

    // Carol receives and reads: delivered to all; read by carol only.
    let (mut c, _, events) = Raw::connect(srv.addr, &m[2].token).await;
    let last = events.last().map(|e| e.mailbox_seq).expect("events");
    let rid = c
        .request(client_frame::Kind::Ack(Ack { up_to: last }))
        .await;
    c.answer(rid, &mut Vec::new()).await;
    let r = receipt(a.recv().await);
    assert_eq!(
        (r.reader_username.as_str(), r.all_delivered_up_to),
        ("carol", seq)
    );
    let rid = c
        .request(client_frame::Kind::Read(Read {
            conversation: Some(Peer::group(g)),
            up_to_seq: seq,
        }))
        .await;
    assert!(matches!(
        c.answer(rid, &mut Vec::new()).await,
        server_frame::Kind::Done(_)
    ));
    let r = receipt(a.recv().await);
    assert_eq!(r.kind, ReceiptKind::Read as i32);
    assert!(r.all_read_up_to < seq, "bob has not read it yet");
    let (_, v) = http.get(&info_path, Some(&m[0].token)).await;
    assert_eq!(
        (v["delivered_to_all"].as_bool(), v["read_by_all"].as_bool()),
        (Some(true), Some(false))
    );
    let members = v["members"].as_array().expect("members");
    let carol = members
        .iter()
        .find(|x| x["username"] == "carol")
        .expect("carol");
    assert_eq!(
        (carol["delivered"].as_bool(), carol["read"].as_bool()),
        (Some(true), Some(true))
    );
    // Bob reads too: read by all.
    let rid = b
        .request(client_frame::Kind::Read(Read {
            conversation: Some(Peer::group(g)),
            up_to_seq: seq,
        }))
        .await;
    b.answer(rid, &mut Vec::new()).await;
    let r = receipt(a.recv().await);
    assert_eq!(r.all_read_up_to, seq);
    let (_, v) = http.get(&info_path, Some(&m[0].token)).await;
    assert_eq!(v["read_by_all"].as_bool(), Some(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_online_members_all_receive_a_message() {
    const N: usize = 1000;
    let srv =
        TestServer::start_with(|c| c.rate_limits.logins_per_minute_per_address = 10 * N as u32)
            .await;
    let http = srv.http();
    // Accounts, created concurrently.
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..N {
        let base = http.base.clone();
        tasks.push(tokio::spawn(async move {
            let http = Http {
                base,
                client: reqwest::Client::new(),
            };
            let (_, _, token) = http.account(&format!("member{i:04}")).await;
            token
        }));
    }
    let mut tokens = Vec::new();
    for t in tasks {
        tokens.push(t.await.expect("account"));
    }
    eprintln!("{N} accounts after {:?}", started.elapsed());
    let names: Vec<String> = (1..N).map(|i| format!("member{i:04}")).collect();
    let (s, v) = http
        .post(
            "/v1/groups",
            json!({"name": "everyone", "members": names}),
            Some(&tokens[0]),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let g = v["group_id"].as_u64().expect("id");
    assert_eq!(v["members"].as_array().map(Vec::len), Some(N));
    // Every member online (they drain the CREATED event on connecting).
    let mut conns = Vec::new();
    for token in &tokens {
        conns.push(Raw::connect(srv.addr, token).await.0);
    }
    eprintln!("{N} members online after {:?}", started.elapsed());
    let seq = send_group(&mut conns[0], g, "to-everyone")
        .await
        .expect("sent");
    let mut waiting = Vec::new();
    for mut raw in conns.drain(1..) {
        waiting.push(tokio::spawn(async move {
            match raw.recv().await.kind {
                Some(server_frame::Kind::Event(Event {
                    kind: Some(event::Kind::Message(m)),
                    ..
                })) => (m.seq, m.body),
                other => panic!("{other:?}"),
            }
        }));
    }
    for w in waiting {
        assert_eq!(w.await.expect("member"), (seq, b"to-everyone".to_vec()));
    }
    eprintln!("fan-out checked after {:?}", started.elapsed());
}
