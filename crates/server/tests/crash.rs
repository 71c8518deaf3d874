//! Durability under `kill -9`: the real `ternd` binary is killed while sends are in flight and
//! restarted on the same data directory. Every message whose `Sent` reached its sender must be
//! delivered, exactly once and in order. Also: SIGTERM shuts down gracefully (close code 1001,
//! exit status 0).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tern_proto::frames::*;

/// Per sender user: the (seq, client_msg_id) of every `Sent` it received.
type Acked = HashMap<u64, Vec<(u64, String)>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_sigkill_exactly_once_in_order() {
    // With TERN_TEST_POSTGRES, the directory's schema outlives the killed server.
    let dir = DataDir::new();
    let mut server = spawn_ternd(dir.path());
    let http = http_for(server.addr);
    let (bob, bob_dev, bob_token) = http.account("bob").await;
    const SENDERS: usize = 4;
    let mut tokens = Vec::new();
    for i in 0..SENDERS {
        tokens.push(http.account(&format!("sender{i}")).await);
    }

    // Each sender pipelines a few sends at a time and records every Sent it receives.
    let acked: Arc<Mutex<Acked>> = Arc::default();
    let mut tasks = Vec::new();
    for (uid, _dev, token) in tokens.clone() {
        let acked = acked.clone();
        let addr = server.addr;
        tasks.push(tokio::spawn(async move {
            let (mut raw, _, _) = Raw::connect(addr, &token).await;
            let mut n = 0u64;
            loop {
                let mut pending = HashMap::new();
                for _ in 0..4 {
                    n += 1;
                    let id = format!("u{uid}-{n}");
                    let Some(rid) = raw
                        .try_send_text_msg(bob, &id, id.as_bytes(), &[bob_dev])
                        .await
                    else {
                        return; // the server is gone
                    };
                    pending.insert(rid, id);
                }
                while !pending.is_empty() {
                    let next = tokio::time::timeout(
                        Duration::from_secs(5),
                        futures_util::StreamExt::next(&mut raw.ws),
                    )
                    .await;
                    let Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Binary(b)))) = next
                    else {
                        return; // the server is gone
                    };
                    let f: ServerFrame = prost::Message::decode(&b[..]).expect("frame");
                    if let (Some(id), Some(server_frame::Kind::Sent(s))) =
                        (pending.remove(&f.request_id), f.kind)
                    {
                        assert_eq!(s.client_msg_id, id);
                        acked
                            .lock()
                            .expect("lock")
                            .entry(uid)
                            .or_default()
                            .push((s.seq, id));
                    }
                }
            }
        }));
    }
    // Let traffic flow, then kill -9 in the middle of it.
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let total: usize = acked.lock().expect("lock").values().map(Vec::len).sum();
        if total >= 200 {
            break;
        }
    }
    server.child.kill().expect("SIGKILL");
    server.child.wait().expect("reaped");
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(20), t)
            .await
            .expect("sender ends")
            .expect("sender ok");
    }
    let acked = acked.lock().expect("lock").clone();
    let total: usize = acked.values().map(Vec::len).sum();
    assert!(total >= 200, "traffic was flowing ({total} acknowledged)");

    // Restart on the same data and drain Bob's mailbox.
    let server = spawn_ternd(dir.path());
    let (mut raw, _, events) = Raw::connect(server.addr, &bob_token).await;
    let mut by_conv: BTreeMap<u64, Vec<(u64, String)>> = BTreeMap::new();
    let mut last_mseq = 0;
    for e in &events {
        assert!(e.mailbox_seq > last_mseq, "mailbox order");
        last_mseq = e.mailbox_seq;
        if let Some(event::Kind::Message(m)) = &e.kind {
            let Some(peer::Kind::User(from)) = m.conversation.as_ref().and_then(|p| p.kind) else {
                panic!("peer")
            };
            assert_eq!(from, m.sender_user);
            by_conv
                .entry(from)
                .or_default()
                .push((m.seq, m.client_msg_id.clone()));
        }
    }
    for (uid, sent) in &acked {
        let got = by_conv.get(uid).cloned().unwrap_or_default();
        let seqs: Vec<u64> = got.iter().map(|(s, _)| *s).collect();
        assert_eq!(
            seqs,
            (1..=got.len() as u64).collect::<Vec<_>>(),
            "sender {uid}: consecutive, in order, once"
        );
        let delivered: HashMap<u64, &String> = got.iter().map(|(s, id)| (*s, id)).collect();
        for (seq, id) in sent {
            assert_eq!(
                delivered.get(seq),
                Some(&id),
                "sender {uid}: acknowledged {id} (seq {seq}) was lost"
            );
        }
    }
    // After Bob acknowledges, nothing is delivered again.
    let rid = raw
        .request(client_frame::Kind::Ack(Ack { up_to: last_mseq }))
        .await;
    assert!(matches!(
        raw.answer(rid, &mut Vec::new()).await,
        server_frame::Kind::Done(_)
    ));
    drop(raw);
    let (_, _, again) = Raw::connect(server.addr, &bob_token).await;
    assert!(
        again
            .iter()
            .all(|e| matches!(e.kind, Some(event::Kind::Receipt(_)))),
        "no message twice"
    );
}

#[tokio::test]
async fn sigterm_closes_sockets_with_going_away_and_exits_cleanly() {
    let dir = DataDir::new();
    let mut server = spawn_ternd(dir.path());
    let (_, _, token) = http_for(server.addr).account("alice").await;
    let (mut raw, _, _) = Raw::connect(server.addr, &token).await;
    let status = Command::new("kill")
        .args(["-TERM", &server.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    assert_eq!(raw.closed().await, Some(1001));
    let exit = tokio::task::spawn_blocking(move || server.child.wait().expect("wait"))
        .await
        .expect("join");
    assert!(exit.success(), "ternd exits 0 after SIGTERM: {exit:?}");
}
