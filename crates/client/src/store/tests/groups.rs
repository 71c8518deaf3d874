//! Group conversations in the local store: de-duplication per (group, seq) beside direct
//! conversations, ticks from the receipts' all_* watermarks, system messages.

use prost::Message as _;
use tern_proto::frames::{self, event};

use super::{BOB, ME, open, session, text_body};
use crate::group_event::GroupAction;
use crate::store::{Conv, LocalStore, OutboxItem};
use crate::types::{Event, SentMessage, StoredMessage, Tick};

/// The same number as BOB's user id on purpose: group 2 and the chat with user 2 must not mix.
const GROUP: u64 = 2;
const CAROL: u64 = 3;

fn username(id: u64) -> &'static str {
    match id {
        ME => "alice",
        BOB => "bob",
        CAROL => "carol",
        _ => "someone",
    }
}

fn group_message(mailbox_seq: u64, seq: u64, sender: u64, text: &str) -> frames::Event {
    frames::Event {
        mailbox_seq,
        kind: Some(event::Kind::Message(frames::Message {
            conversation: Some(frames::Peer::group(GROUP)),
            seq,
            sender_user: sender,
            sender_username: username(sender).into(),
            sender_device: sender * 10,
            client_msg_id: format!("g{seq}"),
            server_ts_ms: 1000 + seq as i64,
            body: text_body(text),
            group_name: "Family".into(),
            ..Default::default()
        })),
    }
}

fn system_message(
    mailbox_seq: u64,
    seq: u64,
    action: frames::GroupAction,
    actor: u64,
    targets: &[u64],
    name: &str,
) -> frames::Event {
    let user = |id: u64| frames::UserRef {
        user_id: id,
        username: username(id).into(),
    };
    let body = frames::GroupEvent {
        action: action as i32,
        actor: Some(user(actor)),
        targets: targets.iter().copied().map(user).collect(),
        name: name.into(),
        members_can_add: false,
        description: String::new(),
    }
    .encode_to_vec();
    frames::Event {
        mailbox_seq,
        kind: Some(event::Kind::Message(frames::Message {
            conversation: Some(frames::Peer::group(GROUP)),
            seq,
            sender_user: actor,
            sender_username: username(actor).into(),
            client_msg_id: format!("sys{seq}"),
            server_ts_ms: 1000 + seq as i64,
            body,
            kind: frames::MessageKind::System as i32,
            group_name: name.into(),
            ..Default::default()
        })),
    }
}

fn group_receipt(
    mailbox_seq: u64,
    reader: u64,
    kind: frames::ReceiptKind,
    up_to: u64,
    all: (u64, u64),
) -> frames::Event {
    frames::Event {
        mailbox_seq,
        kind: Some(event::Kind::Receipt(frames::Receipt {
            conversation: Some(frames::Peer::group(GROUP)),
            reader_user: reader,
            reader_username: username(reader).into(),
            kind: kind as i32,
            up_to_seq: up_to,
            server_ts_ms: 5000,
            all_delivered_up_to: all.0,
            all_read_up_to: all.1,
            ..Default::default()
        })),
    }
}

fn messages(events: &[Event]) -> Vec<StoredMessage> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some((**m).clone()),
            _ => None,
        })
        .collect()
}

fn send_to_group(store: &LocalStore, id: &str, seq: u64) {
    let me = session();
    let item = OutboxItem {
        conv: Conv::Group(GROUP),
        conv_name: "Family".into(),
        client_msg_id: id.into(),
        body: text_body("mine"),
    };
    store.enqueue(&me, &item, 0).expect("enqueue");
    let sent = SentMessage {
        conversation: GROUP.to_string(),
        group: Some(GROUP),
        client_msg_id: id.into(),
        seq,
        server_ts_ms: 9,
    };
    store
        .mark_sent(me.device_id, &sent, Conv::Group(GROUP))
        .expect("mark sent");
}

fn group_ticks(store: &LocalStore) -> Vec<Tick> {
    store
        .sent_status(10)
        .expect("status")
        .iter()
        .filter(|m| m.group == Some(GROUP))
        .filter_map(|m| m.status)
        .collect()
}

#[test]
fn group_messages_are_deduplicated_apart_from_direct_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let a = store
        .apply_events(
            ME,
            &[
                group_message(1, 1, BOB, "hi all"),
                super::message(2, 1, BOB, "hi alice"),
                group_message(3, 2, CAROL, "hello"),
            ],
        )
        .expect("apply");
    assert_eq!(
        messages(&a.events).len(),
        3,
        "group seq 1 and direct seq 1 are different messages"
    );

    // Redelivered after a reconnect, plus one new.
    let again = store
        .apply_events(
            ME,
            &[
                group_message(1, 1, BOB, "hi all"),
                group_message(3, 2, CAROL, "hello"),
                group_message(4, 3, BOB, "new"),
            ],
        )
        .expect("apply again");
    let new = messages(&again.events);
    assert_eq!(new.len(), 1);
    let m = &new[0];
    assert_eq!(m.conversation, "2");
    assert_eq!(m.group, Some(GROUP));
    assert_eq!(m.group_name.as_deref(), Some("Family"));
    // Bodies that are not end-to-end encrypted envelopes are never shown as text.
    assert_eq!(m.from, "bob");
    assert!(m.undecryptable.is_some(), "{m:?}");
    assert!(m.text.starts_with("[could not decrypt"), "{}", m.text);
    assert_eq!(m.peer_user, 0);
    assert!(!m.outgoing && m.status.is_none() && m.system.is_none());

    let group = store.conversation(Conv::Group(GROUP), 10).expect("group");
    let seqs: Vec<_> = group.iter().map(|m| m.seq).collect();
    assert_eq!(seqs, [Some(1), Some(2), Some(3)]);
    let direct = store.history("bob", 10).expect("direct");
    assert_eq!(direct.len(), 1);
    assert!(direct[0].undecryptable.is_some());
    assert_eq!(direct[0].group, None);
    assert_eq!(
        store.conversation(Conv::Direct(BOB), 10).expect("direct"),
        direct
    );
}

#[test]
fn my_group_ticks_follow_the_all_watermarks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    send_to_group(&store, "c1", 1);
    send_to_group(&store, "c2", 2);
    assert_eq!(group_ticks(&store), [Tick::Sent, Tick::Sent]);
    let sent = store.sent_by_id("c2").expect("lookup").expect("found");
    assert_eq!((sent.group, sent.seq), (Some(GROUP), Some(2)));

    use frames::ReceiptKind::{Delivered, Read};
    // Bob has read both, carol has nothing yet: bob's receipt is news, my ticks do not move.
    let a = store
        .apply_events(ME, &[group_receipt(1, BOB, Read, 2, (0, 0))])
        .expect("apply");
    assert_eq!(a.events.len(), 1);
    match &a.events[0] {
        Event::Receipt(r) => {
            assert_eq!(r.conversation, "2");
            assert_eq!(r.group, Some(GROUP));
            assert_eq!(r.peer_user, 0);
            assert_eq!((r.reader.as_str(), r.up_to_seq), ("bob", 2));
            assert_eq!((r.all_delivered_up_to, r.all_read_up_to), (0, 0));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(group_ticks(&store), [Tick::Sent, Tick::Sent]);

    // Carol's device got message 1: delivered to all up to 1.
    store
        .apply_events(ME, &[group_receipt(2, CAROL, Delivered, 1, (1, 0))])
        .expect("apply");
    assert_eq!(group_ticks(&store), [Tick::Delivered, Tick::Sent]);

    // Carol read both: read by all.
    let a = store
        .apply_events(
            ME,
            &[
                group_receipt(3, CAROL, Read, 2, (2, 2)),
                // Stale and repeated: nothing to report, nothing lowered.
                group_receipt(4, CAROL, Delivered, 1, (1, 0)),
                group_receipt(5, BOB, Read, 2, (2, 2)),
            ],
        )
        .expect("apply");
    assert_eq!(a.events.len(), 1);
    assert_eq!(group_ticks(&store), [Tick::Read, Tick::Read]);

    // The direct conversation with user 2 is untouched by group 2's watermarks.
    store
        .enqueue(&session(), &super::outbox_item("d1", "direct"), 0)
        .expect("enqueue");
    let d = SentMessage {
        conversation: "bob".into(),
        group: None,
        client_msg_id: "d1".into(),
        seq: 1,
        server_ts_ms: 9,
    };
    store
        .mark_sent(10, &d, Conv::Direct(BOB))
        .expect("mark sent");
    let direct = store.sent_by_id("d1").expect("lookup").expect("found");
    assert_eq!(direct.status, Some(Tick::Sent));
}

#[test]
fn direct_ticks_also_come_from_the_all_watermarks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let me = session();
    store
        .enqueue(&me, &super::outbox_item("c1", "x"), 0)
        .expect("enqueue");
    let sent = SentMessage {
        conversation: "bob".into(),
        group: None,
        client_msg_id: "c1".into(),
        seq: 4,
        server_ts_ms: 9,
    };
    store
        .mark_sent(me.device_id, &sent, Conv::Direct(BOB))
        .expect("mark sent");
    // A receipt about my own other device's reading still carries bob's watermarks.
    let mut ev = super::receipt(1, ME, frames::ReceiptKind::Read, 3);
    if let Some(event::Kind::Receipt(r)) = &mut ev.kind {
        r.all_delivered_up_to = 4;
        r.all_read_up_to = 4;
    }
    store.apply_events(ME, &[ev]).expect("apply");
    let m = store.sent_by_id("c1").expect("lookup").expect("found");
    assert_eq!(m.status, Some(Tick::Read));
    assert_eq!(
        store.read_position(Conv::Direct(BOB)).expect("pos"),
        (None, 3),
        "my read position moved too"
    );
}

#[test]
fn system_messages_are_stored_rendered_and_never_mine() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    use frames::GroupAction as A;
    let a = store
        .apply_events(
            ME,
            &[
                system_message(1, 1, A::Created, ME, &[BOB], "Family"),
                system_message(2, 2, A::Added, ME, &[CAROL], "Family"),
                group_message(3, 3, BOB, "hi"),
                system_message(4, 4, A::Renamed, BOB, &[], "Friends"),
                system_message(5, 5, A::Left, CAROL, &[CAROL], "Friends"),
            ],
        )
        .expect("apply");
    let ms = messages(&a.events);
    let texts: Vec<_> = ms.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(
        texts,
        [
            "alice created the group Family with bob",
            "alice added carol",
            "[could not decrypt this message: encryption: the sending device's keys are unknown]",
            "bob renamed the group to Friends",
            "carol left",
        ]
    );
    let created = &ms[0];
    assert!(created.is_system() && !created.outgoing && created.status.is_none());
    assert_eq!(
        created.system.as_ref().map(|c| c.action),
        Some(GroupAction::Created)
    );
    assert_eq!(created.from, "alice");
    // System messages I caused have no ticks and are not among my sent messages.
    assert!(store.sent_status(10).expect("status").is_empty());

    // The rename applies to the whole history, and the name is remembered.
    let history = store.conversation(Conv::Group(GROUP), 10).expect("history");
    assert!(
        history
            .iter()
            .all(|m| m.group_name.as_deref() == Some("Friends"))
    );
    assert_eq!(
        store.group_name(GROUP).expect("name").as_deref(),
        Some("Friends")
    );
    // A stale answer (as of seq 3) does not bring the old name back; a newer one wins.
    store
        .remember_group(GROUP, "Family", 3, &[(CAROL, "carol")])
        .expect("remember");
    assert_eq!(
        store.group_name(GROUP).expect("name").as_deref(),
        Some("Friends")
    );
    store
        .remember_group(GROUP, "Cousins", 6, &[])
        .expect("remember");
    assert_eq!(
        store.group_name(GROUP).expect("name").as_deref(),
        Some("Cousins")
    );

    // Reading covers everything not mine, system messages included.
    assert_eq!(
        store.read_position(Conv::Group(GROUP)).expect("pos"),
        (Some(5), 0)
    );
    store.set_my_read(Conv::Group(GROUP), 5).expect("read");
    assert_eq!(
        store.read_position(Conv::Group(GROUP)).expect("pos"),
        (Some(5), 5)
    );

    // An undecodable system body is kept (it holds a seq) and says so.
    let mut broken = system_message(6, 6, A::Added, BOB, &[], "Cousins");
    if let Some(event::Kind::Message(m)) = &mut broken.kind {
        m.body = vec![0xff, 0xff, 0xff];
    }
    let a = store.apply_events(ME, &[broken]).expect("apply");
    let m = &messages(&a.events)[0];
    assert_eq!(
        m.system.as_ref().map(|c| c.action),
        Some(GroupAction::Unknown)
    );
    assert_eq!(m.text, "bob changed the group");
}

#[test]
fn outbox_keeps_group_messages_apart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = open(&dir);
    let me = session();
    let item = OutboxItem {
        conv: Conv::Group(GROUP),
        conv_name: String::new(),
        client_msg_id: "g-pending".into(),
        body: text_body("later"),
    };
    let pending = store.enqueue(&me, &item, 0).expect("enqueue");
    assert_eq!(pending.conversation, "2");
    assert_eq!(pending.status, Some(Tick::Pending));
    assert_eq!(store.outbox(me.device_id).expect("outbox"), vec![item]);
    // Marking it sent in the direct conversation with user 2 must not match it.
    let sent = SentMessage {
        conversation: "bob".into(),
        group: None,
        client_msg_id: "g-pending".into(),
        seq: 1,
        server_ts_ms: 1,
    };
    assert!(
        store
            .mark_sent(me.device_id, &sent, Conv::Direct(BOB))
            .is_err()
    );
}
