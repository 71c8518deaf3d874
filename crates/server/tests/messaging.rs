//! End-to-end messaging through the SDK against the real server: offline delivery, ticks,
//! multi-device fan-out, receipts reaching an offline sender, one order under concurrent
//! senders, client restarts, revoked devices, last-seen privacy.

mod common;

use std::time::Duration;

use common::TestServer;
use common::sdk::{PASSWORD, login, online, open, register, until};
use tern_client::{
    Client, ClientConfig, ConnectionState, ErrorCode, Event, ReceiptKind, Tick, Visibility,
};

const WAIT: Duration = Duration::from_secs(15);

/// Collects `n` message events (text, seq).
async fn messages(events: &mut tern_client::EventStream, n: usize) -> Vec<(String, u64, bool)> {
    let mut out = Vec::new();
    while out.len() < n {
        let m = until(events, |e| match e {
            Event::Message(m) => Some((m.text.clone(), m.seq.expect("seq"), m.outgoing)),
            _ => None,
        })
        .await;
        out.push(m);
    }
    out
}

async fn watermark(events: &mut tern_client::EventStream, kind: ReceiptKind, up_to: u64) {
    until(events, |e| match e {
        Event::Receipt(r) if r.kind == kind && r.up_to_seq >= up_to => Some(()),
        _ => None,
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_delivery_in_order_with_ticks() {
    let srv = TestServer::start().await;
    let alice = register(&srv.url(), "alice").await;
    let bob = register(&srv.url(), "bob").await;
    online(&alice).await;
    let mut a_events = alice.client.events();
    for (i, text) in ["one", "two", "three"].iter().enumerate() {
        let sent = alice.client.send_text("bob", text).await.expect("send");
        assert_eq!(sent.seq, i as u64 + 1);
    }
    let status: Vec<Tick> = alice
        .client
        .sent_status(10)
        .expect("status")
        .iter()
        .filter_map(|m| m.status)
        .collect();
    assert_eq!(status, vec![Tick::Sent; 3], "one tick while bob is offline");

    let mut b_events = bob.client.events();
    online(&bob).await;
    let got = messages(&mut b_events, 3).await;
    assert_eq!(
        got,
        vec![
            ("one".into(), 1, false),
            ("two".into(), 2, false),
            ("three".into(), 3, false)
        ]
    );
    watermark(&mut a_events, ReceiptKind::Delivered, 3).await;
    let status: Vec<Tick> = alice
        .client
        .sent_status(10)
        .expect("status")
        .iter()
        .filter_map(|m| m.status)
        .collect();
    assert_eq!(status, vec![Tick::Delivered; 3], "two ticks");

    assert_eq!(bob.client.mark_read("alice").await.expect("read"), Some(3));
    watermark(&mut a_events, ReceiptKind::Read, 3).await;
    let status: Vec<Tick> = alice
        .client
        .sent_status(10)
        .expect("status")
        .iter()
        .filter_map(|m| m.status)
        .collect();
    assert_eq!(status, vec![Tick::Read; 3], "blue ticks");
    let history: Vec<String> = bob
        .client
        .history("alice", 10)
        .expect("history")
        .into_iter()
        .map(|m| m.text)
        .collect();
    assert_eq!(history, vec!["one", "two", "three"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_device_fan_out_and_sync_copies() {
    let srv = TestServer::start().await;
    let alice1 = register(&srv.url(), "alice").await;
    let alice2 = login(&srv.url(), "alice").await;
    let bob1 = register(&srv.url(), "bob").await;
    let bob2 = login(&srv.url(), "bob").await;
    let mut streams = Vec::new();
    for d in [&alice1, &alice2, &bob1, &bob2] {
        streams.push(d.client.events());
        online(d).await;
    }
    alice1
        .client
        .send_text("bob", "hello both")
        .await
        .expect("send");
    for (i, stream) in streams.iter_mut().enumerate().skip(1) {
        let got = messages(stream, 1).await;
        let outgoing = i == 1; // alice's second device gets her own message as a sync copy
        assert_eq!(got, vec![("hello both".into(), 1, outgoing)], "device {i}");
    }
    // Bob answers from his second device; everyone else sees it.
    bob2.client
        .send_text("alice", "hi from bob2")
        .await
        .expect("send");
    for (i, stream) in streams.iter_mut().enumerate() {
        if i == 3 {
            continue;
        }
        let got = messages(stream, 1).await;
        assert_eq!(got, vec![("hi from bob2".into(), 2, i == 2)], "device {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_reach_an_offline_sender_later() {
    let srv = TestServer::start().await;
    let alice = register(&srv.url(), "alice").await;
    let bob = register(&srv.url(), "bob").await;
    online(&alice).await;
    alice
        .client
        .send_text("bob", "are you there?")
        .await
        .expect("send");
    alice.client.close().await;

    let mut b_events = bob.client.events();
    online(&bob).await;
    messages(&mut b_events, 1).await;
    bob.client.mark_read("alice").await.expect("read");

    let mut a_events = alice.client.events();
    alice.client.connect().await.expect("reconnect");
    watermark(&mut a_events, ReceiptKind::Read, 1).await;
    let status = alice.client.sent_status(1).expect("status");
    assert_eq!(status[0].status, Some(Tick::Read));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_senders_share_one_order_everywhere() {
    let srv = TestServer::start().await;
    let alice1 = register(&srv.url(), "alice").await;
    let alice2 = login(&srv.url(), "alice").await;
    let bob = register(&srv.url(), "bob").await;
    for d in [&alice1, &alice2, &bob] {
        online(d).await;
    }
    const EACH: usize = 15;
    let mut tasks = Vec::new();
    for (who, client, to) in [
        ("a1", alice1.client.clone(), "bob"),
        ("a2", alice2.client.clone(), "bob"),
        ("b", bob.client.clone(), "alice"),
    ] {
        tasks.push(tokio::spawn(async move {
            for i in 0..EACH {
                client
                    .send_text(to, &format!("{who}-{i}"))
                    .await
                    .expect("send");
            }
        }));
    }
    for t in tasks {
        t.await.expect("sender");
    }
    let total = 3 * EACH;
    let mut views = Vec::new();
    for (d, peer) in [(&alice1, "bob"), (&alice2, "bob"), (&bob, "alice")] {
        let view = tokio::time::timeout(WAIT, async {
            loop {
                let h = d.client.history(peer, 1000).expect("history");
                if h.iter().filter(|m| m.seq.is_some()).count() == total {
                    return h;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("every device has every message");
        let seqs: Vec<u64> = view.iter().filter_map(|m| m.seq).collect();
        assert_eq!(seqs, (1..=total as u64).collect::<Vec<_>>());
        views.push(
            view.into_iter()
                .map(|m| (m.seq, m.text))
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(views[0], views[1]);
    assert_eq!(views[0], views[2]);
    // Each sender's own messages are in the order it sent them.
    for who in ["a1", "a2", "b"] {
        let mine: Vec<String> = views[0]
            .iter()
            .filter(|(_, t)| t.starts_with(&format!("{who}-")))
            .map(|(_, t)| t.clone())
            .collect();
        assert_eq!(
            mine,
            (0..EACH).map(|i| format!("{who}-{i}")).collect::<Vec<_>>()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_client_keeps_its_state() {
    let srv = TestServer::start().await;
    let alice = register(&srv.url(), "alice").await;
    let bob = register(&srv.url(), "bob").await;
    online(&alice).await;
    alice
        .client
        .send_text("bob", "before restart")
        .await
        .expect("send");
    alice.client.close().await;
    let home = alice.home;
    let mut config = ClientConfig::new(srv.url(), home.path());
    config.reconnect_initial = Duration::from_millis(50);
    let again = Client::open(config).expect("reopen");
    let session = again.session().expect("session restored");
    assert_eq!(session.username, "alice");
    let h = again.history("bob", 10).expect("history");
    assert_eq!(
        (h.len(), h[0].text.as_str(), h[0].status),
        (1, "before restart", Some(Tick::Sent))
    );
    // Bob reads; the restarted client learns it.
    let mut b_events = bob.client.events();
    online(&bob).await;
    messages(&mut b_events, 1).await;
    bob.client.mark_read("alice").await.expect("read");
    let mut a_events = again.events();
    again.connect().await.expect("connect");
    watermark(&mut a_events, ReceiptKind::Read, 1).await;
    assert_eq!(
        again.sent_status(1).expect("status")[0].status,
        Some(Tick::Read)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_reach_the_app_typed() {
    let srv = TestServer::start().await;
    let alice = register(&srv.url(), "alice").await;
    let alice2 = login(&srv.url(), "alice").await;
    online(&alice).await;
    let err = alice
        .client
        .send_text("nobody", "hello")
        .await
        .expect_err("unknown recipient");
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    let err = open(&srv.url())
        .client
        .login("alice", "wrong horse")
        .await
        .expect_err("wrong password");
    assert_eq!(err.code(), Some(ErrorCode::Unauthorized));
    let err = open(&srv.url())
        .client
        .register("alice", PASSWORD)
        .await
        .expect_err("taken");
    assert_eq!(err.code(), Some(ErrorCode::Conflict));

    // Removing a device closes its connection for good.
    let mut events = alice2.client.events();
    online(&alice2).await;
    let id = alice2.client.session().expect("session").device_id;
    alice.client.remove_device(id).await.expect("remove");
    until(&mut events, |e| match e {
        Event::Connection(ConnectionState::Closed { .. }) => Some(()),
        _ => None,
    })
    .await;
    let err = alice2.client.devices().await.expect_err("revoked");
    assert_eq!(err.code(), Some(ErrorCode::Unauthorized));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_seen_follows_reciprocal_privacy() {
    let srv = TestServer::start().await;
    let alice = register(&srv.url(), "alice").await;
    let bob = register(&srv.url(), "bob").await;
    let carol = register(&srv.url(), "carol").await;
    online(&alice).await;
    online(&bob).await;
    alice
        .client
        .send_text("bob", "we are contacts now")
        .await
        .expect("send");

    let seen = bob.client.last_seen("alice").await.expect("last seen");
    assert!(seen.visible && seen.online, "{seen:?}");
    alice.client.close().await;
    // The server learns of the close a moment later; the last seen is written in batches, and
    // the answer is current either way.
    let seen = tokio::time::timeout(WAIT, async {
        loop {
            let seen = bob.client.last_seen("alice").await.expect("last seen");
            if !seen.online {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("alice goes offline");
    assert!(
        seen.visible && !seen.online && seen.last_seen_ms.is_some(),
        "{seen:?}"
    );

    alice
        .client
        .set_last_seen_privacy(Visibility::Contacts)
        .await
        .expect("privacy");
    assert!(
        bob.client.last_seen("alice").await.expect("bob").visible,
        "bob is a contact"
    );
    assert!(
        !carol
            .client
            .last_seen("alice")
            .await
            .expect("carol")
            .visible,
        "carol is not"
    );
    // Reciprocal: bob hides his own last seen, so he no longer sees alice's.
    bob.client
        .set_last_seen_privacy(Visibility::Nobody)
        .await
        .expect("privacy");
    let seen = bob.client.last_seen("alice").await.expect("bob");
    assert!(!seen.visible && seen.last_seen_ms.is_none());
    alice
        .client
        .set_last_seen_privacy(Visibility::Nobody)
        .await
        .expect("privacy");
    assert!(
        !carol
            .client
            .last_seen("alice")
            .await
            .expect("carol")
            .visible
    );
    assert!(
        alice.client.last_seen("alice").await.expect("self").visible,
        "one sees oneself"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_device_list_is_refreshed_without_user_action() {
    let srv = TestServer::start().await;
    let alice = register(&srv.url(), "alice").await;
    let bob1 = register(&srv.url(), "bob").await;
    online(&alice).await;
    alice.client.send_text("bob", "first").await.expect("send"); // caches bob's one device
    // Bob adds a device and alice adds one too: alice's cached lists are now stale both ways.
    let bob2 = login(&srv.url(), "bob").await;
    let alice2 = login(&srv.url(), "alice").await;
    let mut b2 = bob2.client.events();
    let mut a2 = alice2.client.events();
    online(&bob2).await;
    online(&alice2).await;
    let sent = alice
        .client
        .send_text("bob", "second")
        .await
        .expect("send after refresh");
    assert_eq!(sent.seq, 2);
    assert_eq!(
        messages(&mut b2, 1).await,
        vec![("second".into(), 2, false)]
    );
    assert_eq!(messages(&mut a2, 1).await, vec![("second".into(), 2, true)]);
    let mut b1 = bob1.client.events();
    online(&bob1).await;
    let got = messages(&mut b1, 2).await;
    assert_eq!(got.iter().map(|m| m.1).collect::<Vec<_>>(), vec![1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_through_the_sdk() {
    let srv = TestServer::start().await;
    let alice = register(&srv.url(), "alice").await;
    let bob = register(&srv.url(), "bob").await;
    let carol = register(&srv.url(), "carol").await;
    let mut b_events = bob.client.events();
    let mut c_events = carol.client.events();
    let mut a_events = alice.client.events();
    for d in [&alice, &bob, &carol] {
        online(d).await;
    }
    let info = alice
        .client
        .create_group("weekend", &["bob", "carol"], false)
        .await
        .expect("create");
    assert_eq!(info.members.len(), 3);
    let g = info.group_id;
    let sent = alice
        .client
        .send_group_text(g, "saturday?")
        .await
        .expect("send");
    assert_eq!(sent.seq, 2, "after the CREATED event");
    for events in [&mut b_events, &mut c_events] {
        let got = until(events, |e| match e {
            Event::Message(m) if !m.is_system() => Some((
                m.conversation.clone(),
                m.from.clone(),
                m.text.clone(),
                m.seq,
            )),
            _ => None,
        })
        .await;
        assert_eq!(
            got,
            (
                g.to_string(),
                "alice".to_owned(),
                "saturday?".to_owned(),
                Some(2)
            )
        );
    }
    bob.client.mark_group_read(g).await.expect("read");
    carol.client.mark_group_read(g).await.expect("read");
    until(&mut a_events, |e| match e {
        Event::Receipt(r) if r.group == Some(g) && r.all_read_up_to >= 2 => Some(()),
        _ => None,
    })
    .await;
    let info = alice.client.message_info(g, 2).await.expect("info");
    assert!(info.delivered_to_all && info.read_by_all, "{info:?}");
    let status = alice.client.sent_status(10).expect("status");
    let mine = status
        .iter()
        .find(|m| m.seq == Some(2) && m.group == Some(g))
        .expect("my group message");
    assert_eq!(mine.status, Some(Tick::Read));
    // Bob may not add members; carol leaves; the group list follows.
    let err = bob
        .client
        .add_members(g, &["alice"])
        .await
        .expect_err("not an admin");
    assert!(
        matches!(
            err.code(),
            Some(ErrorCode::Forbidden) | Some(ErrorCode::BadRequest)
        ),
        "{err:?}"
    );
    carol.client.leave_group(g).await.expect("leave");
    assert!(carol.client.groups().await.expect("groups").is_empty());
    assert_eq!(
        bob.client.group_info(g).await.expect("info").members.len(),
        2
    );
}
