//! Encryption against the local store between two profiles, without a server: sessions from a
//! claimed key, ciphertexts out of order and duplicated, a room key then group messages out of
//! order, a replayed group message, device keys that do not verify, key changes.

use tern_proto::content::Content;
use tern_proto::e2ee::olm_payload;
use tern_proto::frames::{self, event};
use tern_proto::http::{DeviceKeys, KeyCounts, UserKeys};

use super::super::crypto::{Claimed, Target};
use super::*;

const ALICE: u64 = 1;
const ALICE_DEV: u64 = 10;
const BOB_DEV: u64 = 20;
const GROUP: u64 = 7;

struct Profile {
    _dir: tempfile::TempDir,
    store: LocalStore,
    keys: UserKeys,
    /// One-time keys as published.
    otks: Vec<tern_crypto::olm::PublicKey>,
    fallback: tern_crypto::olm::PublicKey,
}

fn profile(user_id: u64, username: &str, device_id: u64) -> Profile {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = LocalStore::open(dir.path()).expect("open");
    store
        .save_session(&SavedSession {
            server: "http://127.0.0.1:1".into(),
            user_id,
            username: username.into(),
            device_id,
            token: "t".into(),
        })
        .expect("session");
    store.ensure_account(user_id, device_id).expect("account");
    let up = store
        .keys_to_publish(
            KeyCounts {
                one_time_keys: 0,
                fallback_key_used: false,
            },
            5,
        )
        .expect("keys")
        .expect("something to publish");
    store.mark_keys_published().expect("published");
    let id = up.identity.expect("identity");
    let fb = up.fallback_key.expect("a fallback key");
    Profile {
        _dir: dir,
        store,
        keys: UserKeys {
            user_id,
            username: username.into(),
            devices: vec![DeviceKeys {
                device_id,
                identity: Some(id),
            }],
        },
        otks: up
            .one_time_keys
            .into_iter()
            .map(|k| tern_crypto::olm::PublicKey {
                id: k.id,
                key: k.key,
                signature: k.signature,
            })
            .collect(),
        fallback: tern_crypto::olm::PublicKey {
            id: fb.id,
            key: fb.key,
            signature: fb.signature,
        },
    }
}

/// Alice and Bob, each knowing the other's device keys.
fn pair() -> (Profile, Profile) {
    let alice = profile(ALICE, "alice", ALICE_DEV);
    let bob = profile(BOB, "bob", BOB_DEV);
    alice
        .store
        .record_devices(std::slice::from_ref(&bob.keys))
        .expect("alice learns bob");
    bob.store
        .record_devices(std::slice::from_ref(&alice.keys))
        .expect("bob learns alice");
    (alice, bob)
}

fn targets(store: &LocalStore, keys: &UserKeys) -> Vec<Target> {
    store
        .record_devices(std::slice::from_ref(keys))
        .expect("record")
        .0
}

/// `from`'s body for `to`'s one device, a session made from `key` if there is none.
fn encrypt_to(
    from: &Profile,
    to: &Profile,
    key: &tern_crypto::olm::PublicKey,
    body: olm_payload::Body,
) -> Vec<u8> {
    let t = targets(&from.store, &to.keys);
    let mut claimed = Claimed::new();
    claimed.insert(t[0].device_id, key.clone());
    from.store
        .encrypt_olm(&t, &claimed, to.keys.user_id, |_| Some(body.clone()))
        .expect("encrypt")
        .0[0]
        .body
        .clone()
        .expect("a body")
}

fn direct(from: &Profile, to: &Profile, text: &str) -> Vec<u8> {
    encrypt_to(
        from,
        to,
        &to.otks[0],
        olm_payload::Body::Content(Content::text(text)),
    )
}

/// Alice's group session plan for `targets`.
fn plan_for(alice: &Profile, targets: &[Target], rotate: bool) -> super::super::e2ee::GroupPlan {
    alice
        .store
        .plan_group(GROUP, targets, rotate, Default::default())
        .expect("plan")
}

fn event(mseq: u64, conv: &frames::Peer, seq: u64, from: &Profile, body: Vec<u8>) -> frames::Event {
    frames::Event {
        mailbox_seq: mseq,
        kind: Some(event::Kind::Message(frames::Message {
            conversation: Some(conv.clone()),
            peer_username: from.keys.username.clone(),
            seq,
            sender_user: from.keys.user_id,
            sender_username: from.keys.username.clone(),
            sender_device: from.keys.devices[0].device_id,
            client_msg_id: format!("c{seq}"),
            server_ts_ms: 1,
            body,
            group_name: "G".into(),
            ..Default::default()
        })),
    }
}

fn texts(a: &Applied) -> Vec<String> {
    a.events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some(m.undecryptable.clone().unwrap_or_else(|| m.text.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn direct_ciphertexts_out_of_order_and_duplicated() {
    let (alice, bob) = pair();
    let bodies: Vec<Vec<u8>> = (1..=4)
        .map(|i| direct(&alice, &bob, &format!("m{i}")))
        .collect();
    let peer = frames::Peer::user(ALICE);
    // Arrive 3, 1, 4, then 2 with a duplicate of 1 (under the same seq: ignored).
    let a = bob
        .store
        .apply_events(
            BOB,
            &[
                event(1, &peer, 3, &alice, bodies[2].clone()),
                event(2, &peer, 1, &alice, bodies[0].clone()),
                event(3, &peer, 4, &alice, bodies[3].clone()),
            ],
        )
        .expect("apply");
    assert_eq!(texts(&a), ["m3", "m1", "m4"]);
    assert!(a.one_time_key_used);
    let a = bob
        .store
        .apply_events(
            BOB,
            &[
                event(4, &peer, 2, &alice, bodies[1].clone()),
                event(5, &peer, 1, &alice, bodies[0].clone()),
            ],
        )
        .expect("apply");
    assert_eq!(texts(&a), ["m2"]);

    // The same ciphertext again under a new seq does not decrypt twice.
    let a = bob
        .store
        .apply_events(BOB, &[event(6, &peer, 5, &alice, bodies[1].clone())])
        .expect("apply");
    let t = texts(&a);
    assert_eq!(t.len(), 1);
    assert_ne!(t[0], "m2", "a replayed Olm message is refused");

    // The failure made bob start a new session with alice's device for his answer (from a
    // claimed key), which alice reads.
    let t = targets(&bob.store, &alice.keys);
    assert_eq!(bob.store.need_sessions(&t).expect("need"), [ALICE_DEV]);
    let back = direct(&bob, &alice, "pong");
    let a = alice
        .store
        .apply_events(ALICE, &[event(1, &frames::Peer::user(BOB), 6, &bob, back)])
        .expect("apply");
    assert_eq!(texts(&a), ["pong"]);
}

#[test]
fn group_messages_out_of_order_and_a_replay() {
    let (alice, bob) = pair();
    let t = targets(&alice.store, &bob.keys);
    let plan = plan_for(&alice, &t, false);
    assert_eq!(plan.needy, [BOB_DEV]);
    let room_key = alice
        .store
        .room_key(GROUP, &plan.session_id)
        .expect("key")
        .expect("current session");
    let share = encrypt_to(
        &alice,
        &bob,
        &bob.otks[1],
        olm_payload::Body::RoomKey(room_key),
    );
    alice
        .store
        .mark_shared(GROUP, &plan.session_id, &[BOB_DEV])
        .expect("shared");
    let group: Vec<Vec<u8>> = (1..=3)
        .map(|i| {
            alice
                .store
                .encrypt_group(GROUP, &plan.session_id, Content::text(format!("g{i}")))
                .expect("encrypt")
                .expect("current session")
        })
        .collect();
    let again = plan_for(&alice, &t, false);
    assert_eq!(again.session_id, plan.session_id);
    assert!(again.needy.is_empty(), "shared already");

    let g = frames::Peer::group(GROUP);
    let a = bob
        .store
        .apply_events(
            BOB,
            &[
                event(1, &frames::Peer::user(ALICE), 1, &alice, share),
                event(2, &g, 12, &alice, group[1].clone()),
                event(3, &g, 13, &alice, group[2].clone()),
                event(4, &g, 11, &alice, group[0].clone()),
            ],
        )
        .expect("apply");
    assert_eq!(texts(&a), ["g2", "g3", "g1"], "the key share is not shown");
    assert!(bob.store.history("alice", 10).expect("history").is_empty());

    // The server replays a group message under a new seq: refused.
    let a = bob
        .store
        .apply_events(BOB, &[event(5, &g, 14, &alice, group[1].clone())])
        .expect("apply");
    let t = texts(&a);
    assert!(t[0].contains("replayed"), "{t:?}");

    // A rotation makes a new session that needs sharing again.
    let rotated = plan_for(&alice, &targets(&alice.store, &bob.keys), true);
    assert_ne!(rotated.session_id, plan.session_id);
    assert_eq!(rotated.needy, [BOB_DEV]);
    // Encrypting with the replaced session is refused (the caller plans again).
    assert_eq!(
        alice
            .store
            .encrypt_group(GROUP, &plan.session_id, Content::text("late"))
            .expect("encrypt"),
        None
    );
}

#[test]
fn device_keys_must_verify_and_changes_are_reported() {
    let alice = profile(ALICE, "alice", ALICE_DEV);
    let bob = profile(BOB, "bob", BOB_DEV);
    let (t, changes) = alice
        .store
        .record_devices(std::slice::from_ref(&bob.keys))
        .expect("record");
    assert!(t[0].device.is_some());
    assert!(changes.is_empty(), "first sight is trusted");

    // Keys signed for another device id do not verify: treated as no keys.
    let mut forged = bob.keys.clone();
    forged.devices[0].device_id = 21;
    let (t, changes) = alice.store.record_devices(&[forged]).expect("record");
    assert!(t[0].device.is_none());
    assert_eq!(changes.len(), 1, "bob's keys changed");
    assert!(!changes[0].was_verified);

    // Back to the real device, verified, then a device is added: a loud change.
    alice
        .store
        .record_devices(std::slice::from_ref(&bob.keys))
        .expect("record");
    assert!(alice.store.mark_verified(BOB).expect("verify"));
    assert!(alice.store.user_keys(BOB).expect("keys").1);
    let second = profile(BOB, "bob", 22);
    let mut two = bob.keys.clone();
    two.devices.extend(second.keys.devices.clone());
    let (_, changes) = alice.store.record_devices(&[two]).expect("record");
    assert_eq!(changes.len(), 1);
    assert!(changes[0].was_verified);
    let (keys, verified) = alice.store.user_keys(BOB).expect("keys");
    assert_eq!(keys.len(), 2);
    assert!(!verified, "the mark does not carry over to new keys");
}

#[test]
fn a_replayed_pre_key_message_over_the_fallback_key_is_refused() {
    let (alice, bob) = pair();
    let body = encrypt_to(
        &alice,
        &bob,
        &bob.fallback,
        olm_payload::Body::Content(Content::text("over the fallback")),
    );
    let peer = frames::Peer::user(ALICE);
    let a = bob
        .store
        .apply_events(BOB, &[event(1, &peer, 1, &alice, body.clone())])
        .expect("apply");
    assert_eq!(texts(&a), ["over the fallback"]);
    // The fallback key is still there (it is not used up): the same pre-key message under a
    // new seq would start the session again. It must not.
    let a = bob
        .store
        .apply_events(BOB, &[event(2, &peer, 2, &alice, body)])
        .expect("apply");
    let t = texts(&a);
    assert!(t[0].contains("replayed"), "{t:?}");
}

#[test]
fn a_direct_message_filed_under_another_conversation_is_refused() {
    let (alice, bob) = pair();
    let body = direct(&alice, &bob, "for bob's eyes");
    // The server files alice's message to bob as if it were in bob's chat with carol.
    let a = bob
        .store
        .apply_events(BOB, &[event(1, &frames::Peer::user(3), 1, &alice, body)])
        .expect("apply");
    let t = texts(&a);
    assert!(t[0].contains("another conversation"), "{t:?}");
}

#[test]
fn a_departed_device_makes_the_group_session_rotate() {
    let (alice, bob) = pair();
    let t = targets(&alice.store, &bob.keys);
    let plan = plan_for(&alice, &t, false);
    alice
        .store
        .mark_shared(GROUP, &plan.session_id, &[BOB_DEV])
        .expect("shared");
    let same = plan_for(&alice, &t, false);
    assert_eq!(same.session_id, plan.session_id);
    // Bob's device is no longer a target (removed, or bob left): a new session.
    let alone = plan_for(&alice, &[], false);
    assert_ne!(alone.session_id, plan.session_id);
}
