//! Unit tests of the local store: de-duplication, ticks from watermarks, persistence.

use tern_proto::frames::{self, event};

use super::*;
use crate::types::Tick;

mod e2ee;
mod groups;
mod migration;
mod uploads;

pub(super) const ME: u64 = 1;
pub(super) const BOB: u64 = 2;

pub(super) fn session() -> SavedSession {
    SavedSession {
        server: "http://127.0.0.1:1".into(),
        user_id: ME,
        username: "alice".into(),
        device_id: 10,
        token: "secret".into(),
    }
}

pub(super) fn open(dir: &tempfile::TempDir) -> LocalStore {
    let store = LocalStore::open(dir.path()).expect("open store");
    store.save_session(&session()).expect("save session");
    store
}

/// A message body as the SDK writes it.
pub(super) fn text_body(text: &str) -> Vec<u8> {
    tern_proto::content::Content::text(text).encode_body()
}

fn message(mailbox_seq: u64, seq: u64, sender: u64, text: &str) -> frames::Event {
    let sender_username = if sender == ME { "alice" } else { "bob" };
    frames::Event {
        mailbox_seq,
        kind: Some(event::Kind::Message(frames::Message {
            conversation: Some(frames::Peer::user(BOB)),
            peer_username: "bob".into(),
            seq,
            sender_user: sender,
            sender_username: sender_username.into(),
            sender_device: if sender == ME { 11 } else { 20 },
            client_msg_id: format!("m{seq}"),
            server_ts_ms: 1000 + seq as i64,
            body: text_body(text),
            ..Default::default()
        })),
    }
}

fn receipt(mailbox_seq: u64, reader: u64, kind: frames::ReceiptKind, up_to: u64) -> frames::Event {
    frames::Event {
        mailbox_seq,
        kind: Some(event::Kind::Receipt(frames::Receipt {
            conversation: Some(frames::Peer::user(BOB)),
            peer_username: "bob".into(),
            reader_user: reader,
            reader_username: if reader == ME { "alice" } else { "bob" }.into(),
            kind: kind as i32,
            up_to_seq: up_to,
            server_ts_ms: 5000,
            ..Default::default()
        })),
    }
}

fn outbox_item(id: &str, text: &str) -> OutboxItem {
    OutboxItem {
        conv: Conv::Direct(BOB),
        conv_name: "bob".into(),
        client_msg_id: id.into(),
        body: text_body(text),
    }
}

#[test]
fn messages_are_stored_once_per_conversation_and_seq() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let first = store
        .apply_events(ME, &[message(1, 1, BOB, "hi"), message(2, 2, BOB, "there")])
        .expect("apply");
    // Stored, and reported undecryptable: these bodies are not end-to-end encrypted.
    assert_eq!(first.events.len(), 4);
    assert!(
        first
            .events
            .iter()
            .all(|e| matches!(e, Event::Message(_) | Event::DecryptionFailed(_)))
    );
    assert_eq!(first.ack_up_to, 2);

    // The same events again (a reconnect before the ack arrived), plus one new one.
    let again = store
        .apply_events(
            ME,
            &[
                message(1, 1, BOB, "hi"),
                message(2, 2, BOB, "there"),
                message(3, 3, BOB, "new"),
            ],
        )
        .expect("apply again");
    assert_eq!(again.ack_up_to, 3, "duplicates are still acknowledged");
    let seqs: Vec<_> = again
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some(m.seq),
            Event::DecryptionFailed(_) => None,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(seqs, [Some(3)]);

    let history = store.history("bob", 10).expect("history");
    let seqs: Vec<_> = history.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, [Some(1), Some(2), Some(3)]);
    assert!(
        history
            .iter()
            .all(|m| !m.outgoing && m.status.is_none() && m.from == "bob")
    );
    assert_eq!(store.mailbox_cursor().expect("cursor"), 3);
}

#[test]
fn history_limit_keeps_the_latest_and_pending_last() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let events: Vec<_> = (1..=5)
        .map(|s| message(s, s, BOB, &format!("t{s}")))
        .collect();
    store.apply_events(ME, &events).expect("apply");
    store
        .enqueue(&session(), &outbox_item("p1", "pending"), 0)
        .expect("enqueue");
    let h = store.history("bob", 3).expect("history");
    let seqs: Vec<_> = h.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, [Some(4), Some(5), None]);
    assert!(store.history("nobody", 3).expect("history").is_empty());
}

#[test]
fn ticks_follow_receipts_and_only_rising_receipts_are_emitted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let me = session();
    for i in 1..=3 {
        store
            .enqueue(&me, &outbox_item(&format!("c{i}"), "x"), 0)
            .expect("enqueue");
    }
    let status = |store: &LocalStore| -> Vec<Tick> {
        store
            .sent_status(10)
            .expect("status")
            .iter()
            .filter_map(|m| m.status)
            .collect()
    };
    assert_eq!(status(&store), [Tick::Pending; 3]);

    for (i, seq) in [(1, 1), (2, 2)] {
        let sent = SentMessage {
            conversation: "bob".into(),
            group: None,
            client_msg_id: format!("c{i}"),
            seq,
            server_ts_ms: 7,
        };
        store
            .mark_sent(me.device_id, &sent, Conv::Direct(BOB))
            .expect("mark sent");
        // Idempotent.
        store
            .mark_sent(me.device_id, &sent, Conv::Direct(BOB))
            .expect("mark sent again");
    }
    assert_eq!(status(&store), [Tick::Sent, Tick::Sent, Tick::Pending]);

    let a = store
        .apply_events(ME, &[receipt(1, BOB, frames::ReceiptKind::Delivered, 2)])
        .expect("apply");
    assert_eq!(a.events.len(), 1);
    assert_eq!(
        status(&store),
        [Tick::Delivered, Tick::Delivered, Tick::Pending]
    );

    let a = store
        .apply_events(
            ME,
            &[
                receipt(2, BOB, frames::ReceiptKind::Read, 1),
                // Stale: lower than what we have, emits nothing and lowers nothing.
                receipt(3, BOB, frames::ReceiptKind::Delivered, 1),
                // Repeated.
                receipt(4, BOB, frames::ReceiptKind::Read, 1),
            ],
        )
        .expect("apply");
    assert_eq!(a.events.len(), 1);
    assert_eq!(a.ack_up_to, 4);
    assert_eq!(status(&store), [Tick::Read, Tick::Delivered, Tick::Pending]);

    store
        .mark_failed(me.device_id, "c3", "forbidden")
        .expect("fail");
    assert_eq!(status(&store), [Tick::Read, Tick::Delivered, Tick::Failed]);
    assert!(store.outbox(me.device_id).expect("outbox").is_empty());
}

#[test]
fn sync_copies_are_outgoing_and_my_reads_move_my_read_position() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let a = store
        .apply_events(
            ME,
            &[
                message(1, 1, BOB, "hey"),
                message(2, 2, ME, "from my phone"),
            ],
        )
        .expect("apply");
    let copy = a
        .events
        .iter()
        .rfind(|e| matches!(e, Event::Message(_)))
        .expect("a message");
    match copy {
        Event::Message(m) => {
            assert!(m.outgoing);
            assert_eq!(m.status, Some(Tick::Sent));
            assert_eq!(m.from, "alice");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(
        store.read_position(Conv::Direct(BOB)).expect("pos"),
        (Some(1), 0)
    );
    // My other device read the conversation: only my read position moves, not bob's ticks.
    let a = store
        .apply_events(ME, &[receipt(3, ME, frames::ReceiptKind::Read, 1)])
        .expect("apply");
    assert_eq!(a.events.len(), 1);
    assert_eq!(
        store.read_position(Conv::Direct(BOB)).expect("pos"),
        (Some(1), 1)
    );
    assert_eq!(
        store.sent_status(10).expect("status")[0].status,
        Some(Tick::Sent)
    );
}

#[test]
fn outbox_and_session_survive_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = open(&dir);
        store
            .enqueue(&session(), &outbox_item("keep-me", "later"), 1)
            .expect("enqueue");
        store
            .apply_events(ME, &[message(7, 1, BOB, "hi")])
            .expect("apply");
    }
    let store = LocalStore::open(dir.path()).expect("reopen");
    assert_eq!(store.load_session().expect("load"), Some(session()));
    assert_eq!(
        store.outbox(10).expect("outbox"),
        vec![outbox_item("keep-me", "later")]
    );
    assert_eq!(store.mailbox_cursor().expect("cursor"), 7);
    assert_eq!(store.peer_id("bob").expect("peer"), Some(BOB));
    // Enqueuing the same client_msg_id twice is refused (it is the idempotency key).
    assert!(
        store
            .enqueue(&session(), &outbox_item("keep-me", "again"), 1)
            .is_err()
    );
}

#[test]
fn logout_fails_the_outbox_and_another_account_starts_clean() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    store
        .enqueue(&session(), &outbox_item("x", "unsent"), 1)
        .expect("enqueue");
    store
        .apply_events(ME, &[message(1, 1, BOB, "hi")])
        .expect("apply");
    store.clear_session().expect("clear");
    assert_eq!(store.load_session().expect("load"), None);
    assert!(store.outbox(10).expect("outbox").is_empty());
    assert_eq!(
        store.history("bob", 10).expect("history").len(),
        2,
        "same account keeps history"
    );

    let other = SavedSession {
        user_id: 99,
        username: "carol".into(),
        device_id: 50,
        ..session()
    };
    store.save_session(&other).expect("save");
    assert!(store.history("bob", 10).expect("history").is_empty());
    assert_eq!(store.mailbox_cursor().expect("cursor"), 0);
}

#[test]
fn receipts_that_cover_only_hidden_messages_are_not_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let me = session();
    // Seq 1 was a group key share to bob (hidden): his delivered receipt says nothing to show.
    let a = store
        .apply_events(ME, &[receipt(1, BOB, frames::ReceiptKind::Delivered, 1)])
        .expect("apply");
    assert!(a.events.is_empty(), "{:?}", a.events);
    // A message of mine at seq 2: its receipt is reported, and the tick follows.
    store
        .enqueue(&me, &outbox_item("c2", "hello"), 1)
        .expect("enqueue");
    let sent = SentMessage {
        conversation: "bob".into(),
        group: None,
        client_msg_id: "c2".into(),
        seq: 2,
        server_ts_ms: 7,
    };
    store
        .mark_sent(me.device_id, &sent, Conv::Direct(BOB))
        .expect("mark sent");
    let a = store
        .apply_events(ME, &[receipt(2, BOB, frames::ReceiptKind::Delivered, 2)])
        .expect("apply");
    assert_eq!(a.events.len(), 1);
    let status: Vec<_> = store
        .sent_status(10)
        .expect("status")
        .iter()
        .filter_map(|m| m.status)
        .collect();
    assert_eq!(status, [Tick::Delivered]);
}
