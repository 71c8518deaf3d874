//! The store conformance suite: the behaviour every backend must have, written once against the
//! [`Store`] trait. `conformance!` instantiates it for a backend: SQLite always, PostgreSQL when
//! `TERN_TEST_POSTGRES` holds a URL (each test in a schema of its own, dropped at its end).

use std::sync::Arc;

use tern_store::*;

struct Fixture {
    store: Arc<dyn Store>,
    _keep: Box<dyn Send>,
}

async fn sqlite() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let store =
        sqlite::SqliteStore::open(&dir.path().join("t.db"), sqlite::SqliteOptions::default())
            .expect("open");
    Fixture {
        store: Arc::new(store),
        _keep: Box::new(dir),
    }
}

/// The PostgreSQL URL tests run against, if any.
fn postgres_url() -> Option<String> {
    std::env::var("TERN_TEST_POSTGRES")
        .ok()
        .filter(|u| !u.is_empty())
}

/// A schema of one test, dropped when the test ends (on a thread of its own: drop is not async).
struct PgSchema {
    url: String,
    name: String,
}

impl PgSchema {
    fn new(url: &str) -> PgSchema {
        use std::hash::BuildHasher;
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let h = std::collections::hash_map::RandomState::new().hash_one((
            nanos,
            N.fetch_add(1, Ordering::Relaxed),
            std::process::id(),
        ));
        PgSchema {
            url: url.to_owned(),
            name: format!("t_{h:016x}"),
        }
    }

    fn options(&self) -> postgres::PgOptions {
        postgres::PgOptions {
            pool_size: 4,
            schema: Some(self.name.clone()),
            ..postgres::PgOptions::new(&self.url)
        }
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let (url, name) = (self.url.clone(), self.name.clone());
        let dropped = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .expect("connect to drop the test schema");
                tokio::spawn(conn);
                client
                    .batch_execute(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
                    .await
                    .expect("drop the test schema");
            })
        })
        .join();
        if dropped.is_err() && !std::thread::panicking() {
            panic!("the test schema {} was not dropped", self.name);
        }
    }
}

/// A fresh PostgreSQL store, or `None` (the test is skipped) without `TERN_TEST_POSTGRES`.
async fn postgres() -> Option<Fixture> {
    let Some(url) = postgres_url() else {
        eprintln!("skipped: TERN_TEST_POSTGRES is not set");
        return None;
    };
    let schema = PgSchema::new(&url);
    let store = postgres::PgStore::open(schema.options())
        .await
        .expect("open PostgreSQL (TERN_TEST_POSTGRES)");
    Some(Fixture {
        store: Arc::new(store),
        _keep: Box::new(schema),
    })
}

/// A user with `n` devices; returns the auth of each device.
async fn user(s: &dyn Store, name: &str, n: usize) -> Vec<DeviceAuth> {
    let id = s.create_user(name, "hash", 1).await.expect("user");
    let mut out = Vec::new();
    for i in 0..n {
        let token = format!("{name}-{i}");
        let d = s
            .create_device(id, "dev", token.as_bytes(), 16, 1)
            .await
            .expect("device");
        out.push(DeviceAuth {
            device_id: d,
            user_id: id,
            username: name.into(),
        });
    }
    out
}

fn to(sender: &DeviceAuth, recipient: UserId, id: &str, devices: &[DeviceId]) -> NewMessage {
    NewMessage {
        sender: sender.clone(),
        to: Target::User(recipient),
        client_msg_id: id.into(),
        body: format!("body {id}").into_bytes(),
        devices: devices
            .iter()
            .map(|d| AddressedDevice {
                device: *d,
                body: None,
            })
            .collect(),
        now_ms: 1000,
        mailbox: MailboxLimit::UNLIMITED,
    }
}

fn ids(devs: &[DeviceAuth]) -> Vec<DeviceId> {
    devs.iter().map(|d| d.device_id).collect()
}

fn stored_seq(o: &PostOutcome) -> u64 {
    match o {
        PostOutcome::Stored { seq, .. } | PostOutcome::Duplicate { seq, .. } => *seq,
    }
}

async fn messages_of(s: &dyn Store, device: DeviceId) -> Vec<(u64, u64, Vec<u8>)> {
    s.mailbox_after(device, 0, 1000)
        .await
        .expect("mailbox")
        .into_iter()
        .filter_map(|e| match e.item {
            MailboxItem::Message(m) => Some((e.mseq, m.seq, m.body.to_vec())),
            MailboxItem::Receipt(_) => None,
        })
        .collect()
}

async fn receipts_of(s: &dyn Store, device: DeviceId) -> Vec<(ReceiptKind, UserId, u64)> {
    s.mailbox_after(device, 0, 1000)
        .await
        .expect("mailbox")
        .into_iter()
        .filter_map(|e| match e.item {
            MailboxItem::Receipt(r) => Some((r.kind, r.reader, r.up_to_seq)),
            MailboxItem::Message(_) => None,
        })
        .collect()
}

async fn accounts_and_devices(f: Fixture) {
    let s = &*f.store;
    let a = s.create_user("alice", "h", 1).await.expect("create");
    assert_eq!(
        s.create_user("alice", "h2", 2).await,
        Err(StoreError::UsernameTaken)
    );
    let rec = s.user_by_name("alice").await.expect("get").expect("exists");
    assert_eq!((rec.id, rec.password_hash.as_str()), (a, "h"));
    assert_eq!(s.user_by_name("nobody").await.expect("get"), None);

    let d1 = s.create_device(a, "one", b"t1", 2, 5).await.expect("d1");
    let d2 = s.create_device(a, "two", b"t2", 2, 6).await.expect("d2");
    assert_eq!(
        s.create_device(a, "three", b"t3", 2, 7).await,
        Err(StoreError::DeviceLimit(2))
    );
    let auth = s
        .device_by_token(b"t1")
        .await
        .expect("auth")
        .expect("found");
    assert_eq!(
        (auth.device_id, auth.user_id, auth.username.as_str()),
        (d1, a, "alice")
    );
    assert_eq!(s.device_by_token(b"nope").await.expect("auth"), None);
    let list: Vec<_> = s
        .list_devices(a)
        .await
        .expect("list")
        .into_iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(list, vec![d1, d2]);

    let b = s.create_user("bob", "h", 1).await.expect("bob");
    assert_eq!(
        s.remove_device(b, d1).await,
        Err(StoreError::NotFound("device")),
        "not bob's device"
    );
    s.remove_device(a, d1).await.expect("remove");
    assert_eq!(
        s.device_by_token(b"t1").await.expect("auth"),
        None,
        "token revoked"
    );
    assert_eq!(s.list_devices(a).await.expect("list").len(), 1);
}

async fn post_assigns_consecutive_seqs_and_is_idempotent(f: Fixture) {
    let s = &*f.store;
    let alice = user(s, "alice", 2).await;
    let bob = user(s, "bob", 2).await;
    let mut devices = ids(&bob);
    devices.push(alice[1].device_id);
    for i in 1..=5u64 {
        let out = s
            .post_message(to(&alice[0], bob[0].user_id, &format!("m{i}"), &devices))
            .await
            .expect("post");
        assert!(matches!(out, PostOutcome::Stored { seq, .. } if seq == i));
    }
    // A retry answers the original seq and stores nothing.
    let again = s
        .post_message(to(&alice[0], bob[0].user_id, "m3", &devices))
        .await
        .expect("retry");
    assert!(matches!(
        again,
        PostOutcome::Duplicate {
            seq: 3,
            server_ts_ms: 1000
        }
    ));
    // Bob answers in the same conversation: the sequence continues.
    let mut back = ids(&alice);
    back.push(bob[1].device_id);
    let out = s
        .post_message(to(&bob[0], alice[0].user_id, "r1", &back))
        .await
        .expect("reply");
    assert_eq!(stored_seq(&out), 6);

    for d in [bob[0].device_id, bob[1].device_id, alice[1].device_id] {
        let got = messages_of(s, d).await;
        let seqs: Vec<u64> = got.iter().map(|m| m.1).collect();
        let expect: Vec<u64> = if d == bob[0].device_id {
            (1..=5).collect()
        } else {
            (1..=6).collect()
        };
        assert_eq!(seqs, expect, "device {d}");
        let mseqs: Vec<u64> = got.iter().map(|m| m.0).collect();
        assert_eq!(
            mseqs,
            (1..=expect.len() as u64).collect::<Vec<_>>(),
            "mailbox seqs are consecutive"
        );
    }
    assert!(
        messages_of(s, alice[0].device_id)
            .await
            .iter()
            .all(|m| m.1 == 6),
        "sender gets no copy of its own"
    );
    assert!(
        s.are_contacts(alice[0].user_id, bob[0].user_id)
            .await
            .expect("contacts")
    );
}

async fn device_mismatch_stores_nothing(f: Fixture) {
    let s = &*f.store;
    let alice = user(s, "alice", 2).await;
    let bob = user(s, "bob", 2).await;
    let only_one_bob = vec![bob[0].device_id, alice[1].device_id];
    let err = s
        .post_message(to(&alice[0], bob[0].user_id, "x", &only_one_bob))
        .await;
    assert_eq!(
        err,
        Err(StoreError::DeviceMismatch {
            missing: vec![bob[1].device_id],
            extra: vec![]
        })
    );
    let with_self = vec![
        bob[0].device_id,
        bob[1].device_id,
        alice[1].device_id,
        alice[0].device_id,
    ];
    let err = s
        .post_message(to(&alice[0], bob[0].user_id, "x", &with_self))
        .await;
    assert_eq!(
        err,
        Err(StoreError::DeviceMismatch {
            missing: vec![],
            extra: vec![alice[0].device_id]
        })
    );
    assert!(messages_of(s, bob[0].device_id).await.is_empty());
    assert!(
        !s.are_contacts(alice[0].user_id, bob[0].user_id)
            .await
            .expect("contacts"),
        "no conversation was created"
    );
    let ok = s
        .post_message(to(
            &alice[0],
            bob[0].user_id,
            "x",
            &[bob[0].device_id, bob[1].device_id, alice[1].device_id],
        ))
        .await
        .expect("post");
    assert_eq!(
        stored_seq(&ok),
        1,
        "the failed attempts used no sequence number"
    );
    assert_eq!(
        s.post_message(to(&alice[0], 999, "y", &[])).await,
        Err(StoreError::NotFound("recipient"))
    );
}

async fn per_device_bodies(f: Fixture) {
    let s = &*f.store;
    let alice = user(s, "alice", 1).await;
    let bob = user(s, "bob", 2).await;
    let mut post = to(&alice[0], bob[0].user_id, "e", &ids(&bob));
    post.devices[0].body = Some(b"for device one".to_vec());
    s.post_message(post).await.expect("post");
    assert_eq!(
        messages_of(s, bob[0].device_id).await[0].2,
        b"for device one"
    );
    assert_eq!(messages_of(s, bob[1].device_id).await[0].2, b"body e");
}

async fn ack_removes_and_produces_delivered_receipts(f: Fixture) {
    let s = &*f.store;
    let alice = user(s, "alice", 2).await;
    let bob = user(s, "bob", 1).await;
    let devices = vec![bob[0].device_id, alice[1].device_id];
    for i in 1..=3 {
        s.post_message(to(&alice[0], bob[0].user_id, &format!("m{i}"), &devices))
            .await
            .expect("post");
    }
    let receipts = s.ack(bob[0].clone(), 2, 2000).await.expect("ack");
    let targets: Vec<DeviceId> = receipts.iter().map(|d| d.device).collect();
    assert_eq!(
        targets,
        ids(&alice),
        "every device of the sender gets the receipt"
    );
    for d in &receipts {
        assert_eq!(d.user, alice[0].user_id);
    }
    assert_eq!(
        messages_of(s, bob[0].device_id)
            .await
            .iter()
            .map(|m| m.1)
            .collect::<Vec<_>>(),
        vec![3]
    );
    assert_eq!(
        receipts_of(s, alice[0].device_id).await,
        vec![(ReceiptKind::Delivered, bob[0].user_id, 2)]
    );
    // Acking the same range again, or nothing new, produces no receipt.
    assert!(
        s.ack(bob[0].clone(), 2, 2001)
            .await
            .expect("ack")
            .is_empty()
    );
    // Alice's other device acking her own copies produces no receipt either.
    assert!(
        s.ack(alice[1].clone(), 3, 2002)
            .await
            .expect("ack")
            .is_empty()
    );
    let r = s.ack(bob[0].clone(), 3, 2003).await.expect("ack");
    assert_eq!(r.len(), 2);
    assert_eq!(
        receipts_of(s, alice[0].device_id).await,
        vec![
            (ReceiptKind::Delivered, bob[0].user_id, 2),
            (ReceiptKind::Delivered, bob[0].user_id, 3)
        ]
    );
}

async fn read_receipts_are_watermarks(f: Fixture) {
    let s = &*f.store;
    let alice = user(s, "alice", 1).await;
    let bob = user(s, "bob", 2).await;
    let mut devices = ids(&bob);
    devices.sort();
    for i in 1..=4 {
        s.post_message(to(&alice[0], bob[0].user_id, &format!("m{i}"), &devices))
            .await
            .expect("post");
    }
    let r = s
        .mark_read(bob[0].clone(), Target::User(alice[0].user_id), 3, 5)
        .await
        .expect("read");
    let mut targets: Vec<DeviceId> = r.iter().map(|d| d.device).collect();
    targets.sort();
    assert_eq!(
        targets,
        vec![alice[0].device_id, bob[1].device_id],
        "the peer and the reader's other devices"
    );
    assert!(
        s.mark_read(bob[1].clone(), Target::User(alice[0].user_id), 2, 6)
            .await
            .expect("read")
            .is_empty(),
        "lower watermark: nothing"
    );
    assert_eq!(
        s.mark_read(bob[0].clone(), Target::User(alice[0].user_id), 9, 7)
            .await,
        Err(StoreError::Invalid(
            "up_to_seq 9 is beyond the last message (4)".into()
        ))
    );
    assert_eq!(
        s.mark_read(bob[0].clone(), Target::User(999), 1, 7).await,
        Err(StoreError::NotFound("conversation"))
    );
    assert_eq!(
        receipts_of(s, alice[0].device_id).await,
        vec![(ReceiptKind::Read, bob[0].user_id, 3)]
    );
}

async fn removing_a_device_empties_its_mailbox(f: Fixture) {
    let s = &*f.store;
    let alice = user(s, "alice", 1).await;
    let bob = user(s, "bob", 2).await;
    s.post_message(to(&alice[0], bob[0].user_id, "m", &ids(&bob)))
        .await
        .expect("post");
    s.remove_device(bob[1].user_id, bob[1].device_id)
        .await
        .expect("remove");
    assert!(
        s.mailbox_after(bob[1].device_id, 0, 10)
            .await
            .expect("mailbox")
            .is_empty()
    );
    assert_eq!(
        s.post_message(to(&alice[0], bob[0].user_id, "n", &ids(&bob)))
            .await,
        Err(StoreError::DeviceMismatch {
            missing: vec![],
            extra: vec![bob[1].device_id]
        })
    );
}

async fn concurrent_posts_share_one_order(f: Fixture) {
    let alice = user(&*f.store, "alice", 1).await;
    let bob = user(&*f.store, "bob", 1).await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let (s, a, b) = (f.store.clone(), alice[0].clone(), bob[0].clone());
        tasks.push(tokio::spawn(async move {
            stored_seq(
                &s.post_message(to(&a, b.user_id, &format!("c{i}"), &[b.device_id]))
                    .await
                    .expect("post"),
            )
        }));
    }
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(t.await.expect("task"));
    }
    seqs.sort();
    assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
    let got: Vec<u64> = messages_of(&*f.store, bob[0].device_id)
        .await
        .iter()
        .map(|m| m.1)
        .collect();
    assert_eq!(got, (1..=200).collect::<Vec<_>>());
}

/// Many calls at once, each mixing posts that are stored, repeated and refused, with
/// acknowledgements running beside them: every call gets the answers it would get alone (a
/// backend may write the calls together), a refused post takes no seq, and a conversation
/// whose only post was refused does not make its users contacts.
async fn concurrent_calls_are_answered_as_if_alone(f: Fixture) {
    let s = f.store.clone();
    let (alice, bob, carol, gid) = three_in_a_group(&*s).await;
    let bob2 = s
        .create_device(bob[0].user_id, "second", b"bob-second", 16, 1)
        .await
        .expect("device");
    let dave = user(&*s, "dave", 1).await;
    let bobs = vec![bob[0].device_id, bob2];
    let calls = 30u64;
    let mut tasks = Vec::new();
    for i in 0..calls {
        let (s, a, b, d, bobs) = (
            s.clone(),
            alice[0].clone(),
            bob[0].user_id,
            dave[0].clone(),
            bobs.clone(),
        );
        tasks.push(tokio::spawn(async move {
            s.post_messages(vec![
                to(&a, b, &format!("d{i}"), &bobs),
                to(&a, b, &format!("d{i}"), &bobs),
                to(&a, b, &format!("m{i}"), &bobs[..1]),
                group_post(&a, gid, &format!("g{i}")),
                group_post(&d, gid, &format!("x{i}")),
                to(&d, a.user_id, &format!("c{i}"), &bobs),
            ])
            .await
            .expect("call")
        }));
    }
    let acker = {
        let (s, b) = (s.clone(), bob[0].clone());
        tokio::spawn(async move {
            for _ in 0..20 {
                s.ack(b.clone(), u64::MAX >> 1, 5).await.expect("ack");
                tokio::task::yield_now().await;
            }
        })
    };
    let (mut direct, mut grouped) = (Vec::new(), Vec::new());
    for t in tasks {
        let answers = t.await.expect("task");
        assert_eq!(answers.len(), 6);
        let first = match &answers[0] {
            Ok(PostOutcome::Stored { seq, .. }) => *seq,
            other => panic!("stored expected: {other:?}"),
        };
        assert!(
            matches!(&answers[1], Ok(PostOutcome::Duplicate { seq, .. }) if *seq == first),
            "{:?}",
            answers[1]
        );
        assert!(
            matches!(&answers[2], Err(StoreError::DeviceMismatch { missing, .. }) if missing == &vec![bob2]),
            "{:?}",
            answers[2]
        );
        match &answers[3] {
            Ok(PostOutcome::Stored { seq, .. }) => grouped.push(*seq),
            other => panic!("stored expected: {other:?}"),
        }
        assert!(
            matches!(&answers[4], Err(StoreError::NotFound("group"))),
            "{:?}",
            answers[4]
        );
        assert!(
            matches!(&answers[5], Err(StoreError::DeviceMismatch { .. })),
            "{:?}",
            answers[5]
        );
        direct.push(first);
    }
    acker.await.expect("acker");
    direct.sort();
    grouped.sort();
    assert_eq!(direct, (1..=calls).collect::<Vec<_>>());
    // seq 1 of the group is its CREATED event.
    assert_eq!(grouped, (2..=calls + 1).collect::<Vec<_>>());
    // bob's second device has everything, each conversation in seq order.
    let got = messages_of(&*s, bob2).await;
    let in_order = |conv_seqs: Vec<u64>| conv_seqs.windows(2).all(|w| w[0] < w[1]);
    let direct_seen: Vec<u64> = got
        .iter()
        .filter(|m| m.2.starts_with(b"body d"))
        .map(|m| m.1)
        .collect();
    let group_seen: Vec<u64> = got
        .iter()
        .filter(|m| m.2.starts_with(b"body g"))
        .map(|m| m.1)
        .collect();
    assert_eq!(direct_seen.len() as u64, calls);
    assert_eq!(group_seen.len() as u64, calls);
    assert!(in_order(direct_seen) && in_order(group_seen), "{got:?}");
    // Refused posts left nothing: no message, no conversation between dave and alice.
    assert!(
        !s.are_contacts(alice[0].user_id, dave[0].user_id)
            .await
            .expect("contacts")
    );
    assert!(
        messages_of(&*s, carol[0].device_id)
            .await
            .iter()
            .all(|m| !m.2.starts_with(b"body x") && !m.2.starts_with(b"body c"))
    );
    // What bob's first device acknowledged reaches alice as one growing watermark.
    s.ack(bob[0].clone(), u64::MAX >> 1, 6).await.expect("ack");
    let delivered: Vec<u64> = s
        .mailbox_after(alice[0].device_id, 0, 1000)
        .await
        .expect("mailbox")
        .into_iter()
        .filter_map(|e| match e.item {
            MailboxItem::Receipt(r)
                if r.kind == ReceiptKind::Delivered
                    && matches!(r.conversation, Conversation::Direct { .. }) =>
            {
                Some(r.up_to_seq)
            }
            _ => None,
        })
        .collect();
    assert!(delivered.windows(2).all(|w| w[0] < w[1]), "{delivered:?}");
    assert_eq!(delivered.last(), Some(&calls));

    // A full mailbox refuses the posts past its bound within one call, and the next post
    // takes the next seq.
    let answers = s
        .post_messages(vec![
            bounded(
                to(&dave[0], carol[0].user_id, "f1", &[carol[0].device_id]),
                calls + 2,
                u64::MAX,
            ),
            bounded(
                to(&dave[0], carol[0].user_id, "f2", &[carol[0].device_id]),
                calls + 2,
                u64::MAX,
            ),
            to(&dave[0], carol[0].user_id, "f3", &[carol[0].device_id]),
        ])
        .await
        .expect("call");
    assert!(
        matches!(&answers[0], Ok(PostOutcome::Stored { seq: 1, .. })),
        "{answers:?}"
    );
    assert!(
        matches!(&answers[1], Err(StoreError::MailboxFull { .. })),
        "{answers:?}"
    );
    assert!(
        matches!(&answers[2], Ok(PostOutcome::Stored { seq: 2, .. })),
        "{answers:?}"
    );
}

async fn last_seen_and_privacy(f: Fixture) {
    let s = &*f.store;
    let alice = user(s, "alice", 1).await;
    let d = alice[0].device_id;
    let u = alice[0].user_id;
    s.save_last_seen(vec![
        LastSeenUpdate {
            user: u,
            device: d,
            at_ms: 50,
        },
        LastSeenUpdate {
            user: u,
            device: d,
            at_ms: 40,
        },
    ])
    .await
    .expect("save");
    s.save_last_seen(vec![LastSeenUpdate {
        user: u,
        device: d,
        at_ms: 30,
    }])
    .await
    .expect("older");
    assert_eq!(
        s.user_by_name("alice")
            .await
            .expect("get")
            .expect("user")
            .last_seen_ms,
        Some(50)
    );
    assert_eq!(
        s.list_devices(u).await.expect("devices")[0].last_seen_ms,
        Some(50)
    );
    s.set_last_seen_privacy(u, Visibility::Nobody)
        .await
        .expect("privacy");
    assert_eq!(
        s.user_by_name("alice")
            .await
            .expect("get")
            .expect("user")
            .last_seen_privacy,
        Visibility::Nobody
    );
}

fn new_group(creator: &DeviceAuth, members: &[UserId]) -> NewGroup {
    NewGroup {
        creator: creator.clone(),
        name: "friends".into(),
        description: String::new(),
        members: members.to_vec(),
        members_can_add: false,
        max_members: 5,
        now_ms: 10,
    }
}

/// alice (the owner), bob and carol, one device each, in a new group (seq 1: CREATED).
async fn three_in_a_group(
    s: &dyn Store,
) -> (Vec<DeviceAuth>, Vec<DeviceAuth>, Vec<DeviceAuth>, GroupId) {
    let alice = user(s, "alice", 1).await;
    let bob = user(s, "bob", 1).await;
    let carol = user(s, "carol", 1).await;
    let gid = s
        .create_group(new_group(&alice[0], &[bob[0].user_id, carol[0].user_id]))
        .await
        .expect("create")
        .group
        .id;
    (alice, bob, carol, gid)
}

fn group_post(sender: &DeviceAuth, group: GroupId, id: &str) -> NewMessage {
    NewMessage {
        sender: sender.clone(),
        to: Target::Group(group),
        client_msg_id: id.into(),
        body: format!("body {id}").into_bytes(),
        devices: Vec::new(),
        now_ms: 20,
        mailbox: MailboxLimit::UNLIMITED,
    }
}

/// (seq, kind) of the messages in a device's mailbox.
async fn kinds_of(s: &dyn Store, device: DeviceId) -> Vec<(u64, MessageKind)> {
    s.mailbox_after(device, 0, 1000)
        .await
        .expect("mailbox")
        .into_iter()
        .filter_map(|e| match e.item {
            MailboxItem::Message(m) => Some((m.seq, m.kind)),
            MailboxItem::Receipt(_) => None,
        })
        .collect()
}

async fn groups_fan_out_one_body_in_one_order(f: Fixture) {
    let s = &*f.store;
    let alice = user(s, "alice", 2).await;
    let bob = user(s, "bob", 1).await;
    let carol = user(s, "carol", 1).await;
    let g = s
        .create_group(new_group(&alice[0], &[bob[0].user_id, carol[0].user_id]))
        .await
        .expect("create");
    let gid = g.group.id;
    assert_eq!(g.group.last_seq, 1);
    assert_eq!(g.group.role_of(alice[0].user_id), Some(Role::Owner));
    assert_eq!(
        g.deliveries.len(),
        4,
        "the CREATED event reaches every member device"
    );
    let out = s
        .post_message(group_post(&bob[0], gid, "hi"))
        .await
        .expect("post");
    let PostOutcome::Stored {
        seq: 2, deliveries, ..
    } = out
    else {
        panic!("{out:?}")
    };
    let mut targets: Vec<DeviceId> = deliveries.iter().map(|d| d.device).collect();
    targets.sort();
    assert_eq!(
        targets,
        vec![alice[0].device_id, alice[1].device_id, carol[0].device_id],
        "all but the sending device"
    );
    let bodies: Vec<*const u8> = deliveries
        .iter()
        .map(|d| match &d.entry.item {
            MailboxItem::Message(m) => m.body.as_ptr(),
            MailboxItem::Receipt(_) => std::ptr::null(),
        })
        .collect();
    assert!(
        bodies.windows(2).all(|w| w[0] == w[1]),
        "one body shared by every delivery"
    );
    assert_eq!(
        kinds_of(s, carol[0].device_id).await,
        vec![(1, MessageKind::System), (2, MessageKind::User)]
    );
    // A partial set of addressed devices, or non-members posting: refused, nothing stored.
    let mut bad = group_post(&bob[0], gid, "x");
    bad.devices.push(AddressedDevice {
        device: carol[0].device_id,
        body: None,
    });
    assert_eq!(
        s.post_message(bad).await,
        Err(StoreError::DeviceMismatch {
            missing: ids(&alice),
            extra: vec![],
        })
    );
    let dave = user(s, "dave", 1).await;
    assert_eq!(
        s.post_message(group_post(&dave[0], gid, "x")).await,
        Err(StoreError::NotFound("group"))
    );
    assert_eq!(
        s.group(gid).await.expect("group").expect("exists").last_seq,
        2
    );
    // Idempotent like direct messages.
    let again = s
        .post_message(group_post(&bob[0], gid, "hi"))
        .await
        .expect("retry");
    assert!(matches!(again, PostOutcome::Duplicate { seq: 2, .. }));
}

async fn membership_bounds_what_members_see(f: Fixture) {
    let s = &*f.store;
    let alice = user(s, "alice", 1).await;
    let bob = user(s, "bob", 1).await;
    let carol = user(s, "carol", 1).await;
    let gid = s
        .create_group(new_group(&alice[0], &[bob[0].user_id]))
        .await
        .expect("create")
        .group
        .id;
    s.post_message(group_post(&alice[0], gid, "before carol"))
        .await
        .expect("post"); // 2
    let added = s
        .change_group(
            alice[0].clone(),
            gid,
            GroupOp::Add(vec![carol[0].user_id]),
            5,
            30,
        )
        .await
        .expect("add"); // 3
    assert_eq!(
        added
            .group
            .members
            .iter()
            .find(|m| m.user.id == carol[0].user_id)
            .map(|m| m.joined_seq),
        Some(3)
    );
    s.post_message(group_post(&alice[0], gid, "with carol"))
        .await
        .expect("post"); // 4
    s.change_group(
        alice[0].clone(),
        gid,
        GroupOp::Remove(bob[0].user_id),
        5,
        40,
    )
    .await
    .expect("remove"); // 5
    s.post_message(group_post(&alice[0], gid, "after bob"))
        .await
        .expect("post"); // 6
    let seqs = |v: Vec<(u64, MessageKind)>| v.into_iter().map(|(s, _)| s).collect::<Vec<_>>();
    assert_eq!(
        seqs(kinds_of(s, carol[0].device_id).await),
        vec![3, 4, 5, 6],
        "nothing before joining"
    );
    assert_eq!(
        seqs(kinds_of(s, bob[0].device_id).await),
        vec![1, 2, 3, 4, 5],
        "its own removal, nothing after"
    );
    // A removed member can no longer post, read or change anything.
    assert_eq!(
        s.post_message(group_post(&bob[0], gid, "x")).await,
        Err(StoreError::NotFound("group"))
    );
    assert_eq!(
        s.mark_read(bob[0].clone(), Target::Group(gid), 2, 1).await,
        Err(StoreError::NotFound("group"))
    );
    assert_eq!(
        s.change_group(
            bob[0].clone(),
            gid,
            GroupOp::Add(vec![bob[0].user_id]),
            5,
            1
        )
        .await,
        Err(StoreError::NotFound("group"))
    );
    // A new device of a member receives group messages from then on.
    let carol2 = s
        .create_device(carol[0].user_id, "two", b"carol-2", 16, 50)
        .await
        .expect("device");
    s.post_message(group_post(&alice[0], gid, "to both carols"))
        .await
        .expect("post"); // 7
    assert_eq!(seqs(kinds_of(s, carol2).await), vec![7]);
}

async fn group_rights_and_limits(f: Fixture) {
    let s = &*f.store;
    let alice = user(s, "alice", 1).await;
    let bob = user(s, "bob", 1).await;
    let carol = user(s, "carol", 1).await;
    let others: Vec<DeviceAuth> = [
        user(s, "d1", 1).await,
        user(s, "d2", 1).await,
        user(s, "d3", 1).await,
    ]
    .into_iter()
    .flatten()
    .collect();
    let gid = s
        .create_group(new_group(&alice[0], &[bob[0].user_id]))
        .await
        .expect("create")
        .group
        .id;
    let last = || async { s.group(gid).await.expect("group").expect("exists").last_seq };
    let before = last().await;
    let refused = [
        (bob[0].clone(), GroupOp::Add(vec![carol[0].user_id])),
        (
            bob[0].clone(),
            GroupOp::Update {
                description: None,
                name: Some("mine".into()),
                members_can_add: None,
            },
        ),
        (bob[0].clone(), GroupOp::Promote(bob[0].user_id)),
        (bob[0].clone(), GroupOp::Remove(alice[0].user_id)),
    ];
    for (who, op) in refused {
        let r = s.change_group(who, gid, op.clone(), 5, 1).await;
        assert!(
            matches!(
                r,
                Err(StoreError::Forbidden(_)) | Err(StoreError::Invalid(_))
            ),
            "{op:?}: {r:?}"
        );
    }
    assert_eq!(last().await, before, "refusals change nothing");
    // Letting members add.
    s.change_group(
        alice[0].clone(),
        gid,
        GroupOp::Update {
            description: None,
            name: None,
            members_can_add: Some(true),
        },
        5,
        1,
    )
    .await
    .expect("setting");
    s.change_group(
        bob[0].clone(),
        gid,
        GroupOp::Add(vec![carol[0].user_id]),
        5,
        1,
    )
    .await
    .expect("member adds");
    // The limit of 5 members: 3 now, adding 3 more is refused whole.
    let three: Vec<UserId> = others.iter().map(|d| d.user_id).collect();
    assert_eq!(
        s.change_group(alice[0].clone(), gid, GroupOp::Add(three.clone()), 5, 1)
            .await,
        Err(StoreError::GroupFull(5))
    );
    assert_eq!(
        s.group(gid)
            .await
            .expect("group")
            .expect("exists")
            .members
            .len(),
        3
    );
    s.change_group(
        alice[0].clone(),
        gid,
        GroupOp::Add(three[..2].to_vec()),
        5,
        1,
    )
    .await
    .expect("fits");
    // Promote, demote, owner protections, owner leaving hands over.
    s.change_group(
        alice[0].clone(),
        gid,
        GroupOp::Promote(bob[0].user_id),
        5,
        1,
    )
    .await
    .expect("promote");
    assert!(matches!(
        s.change_group(bob[0].clone(), gid, GroupOp::Demote(alice[0].user_id), 5, 1)
            .await,
        Err(StoreError::Forbidden(_))
    ));
    s.change_group(bob[0].clone(), gid, GroupOp::Remove(carol[0].user_id), 5, 1)
        .await
        .expect("admin removes");
    let left = s
        .change_group(alice[0].clone(), gid, GroupOp::Leave, 5, 1)
        .await
        .expect("leave");
    assert_eq!(
        left.group.role_of(bob[0].user_id),
        Some(Role::Owner),
        "the longest-standing admin inherits"
    );
    assert_eq!(left.group.role_of(alice[0].user_id), None);
    let names: Vec<GroupId> = s
        .groups_of(bob[0].user_id, 10)
        .await
        .expect("groups")
        .iter()
        .map(|g| g.id)
        .collect();
    assert_eq!(names, vec![gid]);
    assert!(
        s.groups_of(alice[0].user_id, 10)
            .await
            .expect("groups")
            .is_empty()
    );
}

async fn group_receipts_and_message_info(f: Fixture) {
    let s = &*f.store;
    let (alice, bob, carol, gid) = three_in_a_group(s).await;
    s.post_message(group_post(&alice[0], gid, "m"))
        .await
        .expect("post"); // seq 2
    let info = s.message_info(gid, 2).await.expect("info").expect("exists");
    assert_eq!(info.sender, alice[0].user_id);
    assert!(info.members.iter().all(|m| !m.delivered && !m.read) && info.members.len() == 2);
    // Bob's device acknowledges: alice hears "bob delivered 2", but not yet "all delivered".
    let r = s.ack(bob[0].clone(), 2, 5).await.expect("ack");
    let rec = match &r[..] {
        [d] if d.device == alice[0].device_id => match &d.entry.item {
            MailboxItem::Receipt(r) => r.clone(),
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    };
    assert_eq!(
        (rec.reader, rec.up_to_seq, rec.all_delivered_up_to),
        (bob[0].user_id, 2, 0)
    );
    let r = s.ack(carol[0].clone(), 2, 6).await.expect("ack");
    let all = r.iter().find_map(|d| match &d.entry.item {
        MailboxItem::Receipt(r) => Some(r.all_delivered_up_to),
        _ => None,
    });
    assert_eq!(all, Some(2), "delivered to all");
    let r = s
        .mark_read(bob[0].clone(), Target::Group(gid), 2, 7)
        .await
        .expect("read");
    assert!(r.iter().any(|d| d.device == alice[0].device_id));
    let info = s.message_info(gid, 2).await.expect("info").expect("exists");
    let bob_state = info
        .members
        .iter()
        .find(|m| m.user.id == bob[0].user_id)
        .expect("bob");
    assert!(bob_state.delivered && bob_state.read);
    let carol_state = info
        .members
        .iter()
        .find(|m| m.user.id == carol[0].user_id)
        .expect("carol");
    assert!(carol_state.delivered && !carol_state.read);
    assert_eq!(
        s.message_info(gid, 1).await.expect("info"),
        None,
        "system messages have no info"
    );
}

const LIMITS: MediaLimits = MediaLimits {
    quota_bytes: 1000,
    max_uploads: 2,
};

fn new_upload(id: &str, user: UserId, length: u64, expected: Option<MediaHash>) -> NewUpload {
    NewUpload {
        id: id.into(),
        user,
        length,
        expected,
        now_ms: 100,
        expires_at_ms: 1_000,
    }
}

async fn media_uploads_quota_and_references(f: Fixture) {
    let s = &*f.store;
    let alice = user(s, "alice", 1).await[0].user_id;
    let bob = user(s, "bob", 1).await[0].user_id;
    let h1 = [1u8; 32];

    // Quota and count are checked when the upload is created, before any byte.
    s.create_upload(new_upload("u1", alice, 600, Some(h1)), LIMITS)
        .await
        .expect("u1");
    assert_eq!(
        s.create_upload(new_upload("u2", alice, 401, None), LIMITS)
            .await,
        Err(StoreError::QuotaExceeded {
            used: 600,
            wanted: 401,
            quota: 1000
        })
    );
    assert_eq!(
        s.upload("u2").await.expect("read"),
        None,
        "a refusal stores nothing"
    );
    s.create_upload(new_upload("u2", alice, 100, None), LIMITS)
        .await
        .expect("u2");
    assert_eq!(
        s.create_upload(new_upload("u3", alice, 1, None), LIMITS)
            .await,
        Err(StoreError::UploadLimit(2))
    );
    let up = s.upload("u1").await.expect("read").expect("u1");
    assert_eq!(
        (up.user, up.length, up.expected, up.media),
        (alice, 600, Some(h1), None)
    );

    // Finishing checks the declared hash and size, and turns the reservation into a reference.
    assert!(matches!(
        s.finish_upload("u1", [9; 32], 600, 5_000, 200).await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        s.finish_upload("u1", h1, 599, 5_000, 200).await,
        Err(StoreError::Invalid(_))
    ));
    let grant = s
        .finish_upload("u1", h1, 600, 5_000, 200)
        .await
        .expect("finish");
    assert_eq!(
        (grant.size, grant.expires_at_ms, grant.created),
        (600, 5_000, true)
    );
    assert_eq!(
        s.upload("u1").await.expect("read").expect("u1").media,
        Some(h1)
    );
    assert!(matches!(
        s.finish_upload("u1", h1, 600, 5_000, 200).await,
        Err(StoreError::Invalid(_))
    ));
    let m = s.media(h1).await.expect("read").expect("object");
    assert_eq!((m.size, m.created_at_ms), (600, 200));
    // Completed uploads do not count as incomplete: a third upload fits in count (not quota).
    assert!(matches!(
        s.create_upload(new_upload("u3", alice, 301, None), LIMITS)
            .await,
        Err(StoreError::QuotaExceeded { used: 700, .. })
    ));

    // Claims: charge the quota of a user without a live reference; renew without shrinking.
    let tight = MediaLimits {
        quota_bytes: 599,
        max_uploads: 2,
    };
    assert!(matches!(
        s.claim_media(h1, bob, 9_000, 300, tight).await,
        Err(StoreError::QuotaExceeded { .. })
    ));
    let g = s
        .claim_media(h1, bob, 9_000, 300, LIMITS)
        .await
        .expect("claim")
        .expect("exists");
    assert_eq!((g.size, g.expires_at_ms, g.created), (600, 9_000, false));
    let g = s
        .claim_media(h1, bob, 8_000, 300, tight)
        .await
        .expect("renewal is not charged again")
        .expect("exists");
    assert_eq!(g.expires_at_ms, 9_000, "a reference never shrinks");
    assert_eq!(
        s.claim_media([7; 32], bob, 9_000, 300, LIMITS).await,
        Ok(None)
    );

    // A second upload of the same bytes finds the object and only adds a reference.
    s.create_upload(new_upload("b1", bob, 600, None), LIMITS)
        .await
        .expect_err("bob holds 600 of 1000 already");
    assert!(s.drop_media_ref(h1, bob).await.expect("drop"));
    assert!(!s.drop_media_ref(h1, bob).await.expect("drop again"));
    s.create_upload(new_upload("b1", bob, 600, None), LIMITS)
        .await
        .expect("b1");
    let g = s
        .finish_upload("b1", h1, 600, 6_000, 400)
        .await
        .expect("finish");
    assert!(!g.created);
    assert!(s.delete_upload("u2").await.expect("delete"));
    assert!(!s.delete_upload("u2").await.expect("delete again"));
    assert_eq!(s.upload("u2").await.expect("read"), None);
}

/// An upload staged outside the node records its progress in the store, moved only from the
/// offset the writer started at; leases exclude other holders until they expire.
async fn upload_progress_and_leases(f: Fixture) {
    let s = f.store.clone();
    let alice = user(&*s, "alice", 1).await[0].user_id;
    s.create_upload(new_upload("u1", alice, 600, None), LIMITS)
        .await
        .expect("u1");
    let up = s.upload("u1").await.expect("read").expect("u1");
    assert_eq!((up.received, up.staging), (0, None));
    assert!(
        s.advance_upload("u1", 0, 100, b"s1".to_vec())
            .await
            .expect("advance")
    );
    // A writer that started from a stale offset moves nothing.
    assert!(
        !s.advance_upload("u1", 0, 200, b"s2".to_vec())
            .await
            .expect("stale")
    );
    assert!(
        !s.advance_upload("nope", 0, 1, Vec::new())
            .await
            .expect("unknown")
    );
    let up = s.upload("u1").await.expect("read").expect("u1");
    assert_eq!((up.received, up.staging), (100, Some(b"s1".to_vec())));
    s.finish_upload("u1", [7; 32], 600, 5_000, 200)
        .await
        .expect("finish");
    assert!(
        !s.advance_upload("u1", 100, 600, Vec::new())
            .await
            .expect("complete"),
        "a complete upload does not move"
    );

    assert!(s.take_lease("gc", "a", 1_000, 2_000).await.expect("take"));
    assert!(!s.take_lease("gc", "b", 1_500, 2_500).await.expect("held"));
    assert!(s.take_lease("gc", "a", 1_500, 3_000).await.expect("renew"));
    assert!(
        s.take_lease("gc", "b", 3_000, 4_000)
            .await
            .expect("expired")
    );
    s.release_lease("gc", "a").await.expect("not a's");
    assert!(!s.take_lease("gc", "a", 3_500, 4_500).await.expect("b's"));
    s.release_lease("gc", "b").await.expect("release");
    assert!(s.take_lease("gc", "a", 3_500, 4_500).await.expect("free"));
    assert!(
        s.take_lease("other", "a", 3_500, 9_000)
            .await
            .expect("other")
    );
    assert_eq!(s.forget_expired_leases(5_000).await.expect("forget"), 1);
    assert!(
        !s.take_lease("other", "b", 5_000, 6_000)
            .await
            .expect("kept")
    );

    // Renewal extends only a lease its holder still holds.
    assert!(
        s.take_lease("renew", "a", 1_000, 2_000)
            .await
            .expect("take")
    );
    assert!(
        s.renew_lease("renew", "a", 1_500, 3_000)
            .await
            .expect("renew")
    );
    assert!(
        !s.renew_lease("renew", "b", 1_500, 3_000)
            .await
            .expect("not b's")
    );
    assert!(
        !s.renew_lease("renew", "a", 3_000, 4_000)
            .await
            .expect("late"),
        "an expired lease is not renewed"
    );
    assert!(
        s.take_lease("renew", "b", 3_000, 4_000)
            .await
            .expect("b takes")
    );
    s.release_lease("renew", "b").await.expect("release");
    assert!(
        !s.renew_lease("renew", "a", 3_500, 5_000)
            .await
            .expect("gone"),
        "a renewal never takes a free lease"
    );
    assert!(
        !s.renew_lease("never", "a", 0, 1_000).await.expect("never"),
        "nor one never taken"
    );

    // Many takers of one free lease at once: exactly one holds it.
    let takers: Vec<_> = (0..16)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                s.take_lease("race", &format!("h{i}"), 10_000, 20_000)
                    .await
                    .expect("take")
            })
        })
        .collect();
    let mut held = 0;
    for t in takers {
        held += usize::from(t.await.expect("join"));
    }
    assert_eq!(held, 1);
}

async fn push_subscriptions_and_server_secrets(f: Fixture) {
    let s = &*f.store;
    let alice = user(s, "alice", 2).await;
    let (d0, d1) = (alice[0].device_id, alice[1].device_id);
    let sub = |endpoint: &str, at: i64| PushSubscription {
        endpoint: endpoint.into(),
        p256dh: vec![4; 65],
        auth: vec![7; 16],
        updated_ms: at,
        expires_ms: None,
    };
    assert_eq!(s.push_subscription(d0).await.expect("read"), None);
    s.set_push_subscription(d0, sub("https://push.example/a", 1))
        .await
        .expect("set");
    assert_eq!(
        s.push_subscription(d0).await.expect("read"),
        Some(sub("https://push.example/a", 1))
    );
    assert_eq!(
        s.push_subscription(d1).await.expect("read"),
        None,
        "per device"
    );
    // Replaced, not added.
    s.set_push_subscription(d0, sub("https://push.example/b", 2))
        .await
        .expect("replace");
    assert_eq!(
        s.push_subscription(d0).await.expect("read"),
        Some(sub("https://push.example/b", 2))
    );
    assert!(matches!(
        s.set_push_subscription(999_999, sub("https://push.example/c", 3))
            .await,
        Err(StoreError::NotFound(_))
    ));
    // Removal by a push service's answer names the endpoint it answered for.
    assert!(
        !s.remove_push_subscription(d0, Some("https://push.example/a"))
            .await
            .expect("stale")
    );
    assert!(s.push_subscription(d0).await.expect("read").is_some());
    assert!(
        s.remove_push_subscription(d0, Some("https://push.example/b"))
            .await
            .expect("remove")
    );
    assert!(!s.remove_push_subscription(d0, None).await.expect("again"));
    // A removed device takes its subscription with it.
    s.set_push_subscription(d1, sub("https://push.example/d", 4))
        .await
        .expect("set");
    s.remove_device(alice[1].user_id, d1)
        .await
        .expect("remove device");
    assert_eq!(s.push_subscription(d1).await.expect("read"), None);

    // A secret is made once: the first candidate wins, for every caller.
    let first = s.server_secret("vapid", vec![1, 2, 3]).await.expect("make");
    assert_eq!(first, vec![1, 2, 3]);
    assert_eq!(
        s.server_secret("vapid", vec![9, 9]).await.expect("kept"),
        vec![1, 2, 3]
    );
    let racers: Vec<_> = (0..8u8)
        .map(|i| {
            let s = f.store.clone();
            tokio::spawn(async move { s.server_secret("race", vec![i]).await.expect("race") })
        })
        .collect();
    let mut seen = std::collections::BTreeSet::new();
    for r in racers {
        seen.insert(r.await.expect("join"));
    }
    assert_eq!(seen.len(), 1, "one value for everyone: {seen:?}");
}

async fn push_claims_announce_each_burst_once(f: Fixture) {
    let s = &*f.store;
    let alice = user(s, "alice", 1).await;
    let bob = user(s, "bob", 1).await;
    let (b, bu) = (bob[0].device_id, bob[0].user_id);
    let rules = PushRules {
        window_ms: 3_000,
        unanswered_ms: 100_000,
        abandoned_ms: 50_000,
    };
    let sub = |endpoint: &str| PushSubscription {
        endpoint: endpoint.into(),
        p256dh: vec![4; 65],
        auth: vec![7; 16],
        updated_ms: 1,
        expires_ms: None,
    };
    let post = |id: &'static str| s.post_message(to(&alice[0], bu, id, &[b]));
    let claim = |now: i64| async move {
        s.claim_pushes(vec![b], now, rules)
            .await
            .map(|mut claims| claims.remove(0))
    };
    let candidates = |now: i64| s.push_candidates(now, rules, 0, 100);
    // Claims compared without when the messages arrived (the posts' clock is not ours).
    let claim = |now: i64| async move {
        claim(now).await.map(|c| match c {
            PushClaim::Send {
                subscription,
                mseq,
                waiting,
                since_ms,
            } => {
                assert!(since_ms.is_none_or(|t| t == 1000), "every post is at 1000");
                PushClaim::Send {
                    subscription,
                    mseq,
                    waiting,
                    since_ms: None,
                }
            }
            other => other,
        })
    };
    let send = |mseq: u64, waiting: u32| PushClaim::Send {
        subscription: sub("https://push.example/a"),
        mseq,
        waiting,
        since_ms: None,
    };

    post("m1").await.expect("post");
    assert_eq!(
        claim(10).await.expect("claim"),
        PushClaim::Nothing,
        "no subscription"
    );
    s.set_push_subscription(b, sub("https://push.example/a"))
        .await
        .expect("subscribe");
    post("m2").await.expect("post");
    assert_eq!(candidates(10).await.expect("scan"), vec![(bu, b)]);
    assert_eq!(claim(10).await.expect("claim"), send(2, 2));
    // Claimed: nobody else gets it, and later messages wait for an answer.
    assert_eq!(claim(11).await.expect("claim"), PushClaim::Nothing);
    assert!(candidates(11).await.expect("scan").is_empty());
    s.settle_pushes(vec![(b, 2, true)]).await.expect("sent");
    post("m3").await.expect("post");
    assert_eq!(
        claim(5_000).await.expect("claim"),
        PushClaim::Nothing,
        "unanswered"
    );
    assert!(candidates(5_000).await.expect("scan").is_empty());
    // Answered: the device collected everything; the next message pushes after the window.
    s.ack(bob[0].clone(), 3, 20).await.expect("ack");
    post("m4").await.expect("post");
    assert_eq!(
        claim(1_000).await.expect("claim"),
        PushClaim::NotBefore { at_ms: 3_010 }
    );
    assert_eq!(candidates(1_000).await.expect("scan"), vec![(bu, b)]);
    assert_eq!(claim(3_010).await.expect("claim"), send(4, 1));
    // A failed push is released: claimed again once the window has passed.
    s.settle_pushes(vec![(b, 4, false)]).await.expect("release");
    assert_eq!(candidates(3_011).await.expect("scan"), vec![(bu, b)]);
    assert_eq!(
        claim(3_011).await.expect("claim"),
        PushClaim::NotBefore { at_ms: 6_010 }
    );
    assert_eq!(claim(6_010).await.expect("claim"), send(4, 1));
    // A claim never settled is abandoned after its time; a sent one unanswered, after its.
    assert!(candidates(6_010 + 49_999).await.expect("scan").is_empty());
    assert_eq!(
        candidates(6_010 + 50_000).await.expect("scan"),
        vec![(bu, b)]
    );
    assert_eq!(claim(6_010 + 50_000).await.expect("claim"), send(4, 1));
    s.settle_pushes(vec![(b, 4, true)]).await.expect("sent");
    s.settle_pushes(vec![(b, 3, false)])
        .await
        .expect("a stale settle changes nothing");
    assert!(candidates(56_010 + 99_999).await.expect("scan").is_empty());
    assert_eq!(claim(56_010 + 100_000).await.expect("claim"), send(4, 1));
    // A new endpoint has heard nothing: it is pushed, unanswered or not.
    s.set_push_subscription(b, sub("https://push.example/z"))
        .await
        .expect("resubscribe");
    assert!(matches!(
        claim(200_000).await.expect("claim"),
        PushClaim::Send { mseq: 4, .. }
    ));
    // Receipts alone never push: alice's mailbox holds only bob's delivered receipt.
    s.set_push_subscription(alice[0].device_id, sub("https://push.example/alice"))
        .await
        .expect("subscribe");
    assert!(!receipts_of(s, alice[0].device_id).await.is_empty());
    assert_eq!(
        s.claim_pushes(vec![alice[0].device_id], 300_000, rules)
            .await
            .expect("claim"),
        vec![PushClaim::Nothing]
    );
    // Several processes claiming at once: one push.
    s.ack(bob[0].clone(), 4, 300_000).await.expect("ack");
    post("m5").await.expect("post");
    let a = alice[0].device_id;
    let racers: Vec<_> = (0..8)
        .map(|_| {
            let s = f.store.clone();
            tokio::spawn(async move {
                s.claim_pushes(vec![a, b], 400_000, rules)
                    .await
                    .expect("race")
            })
        })
        .collect();
    let mut sends = 0;
    for r in racers {
        let claims = r.await.expect("join");
        assert_eq!(claims[0], PushClaim::Nothing, "answers in the order asked");
        sends += matches!(claims[1], PushClaim::Send { .. }) as u32;
    }
    assert_eq!(sends, 1);
    assert!(candidates(400_001).await.expect("scan").is_empty());
    // Paging: after the last candidate, nothing.
    s.settle_pushes(vec![(b, 5, false)]).await.expect("release");
    assert!(
        s.push_candidates(500_000, rules, b, 100)
            .await
            .expect("scan")
            .is_empty()
    );
    // A subscription past its expirationTime is pushed no more.
    let mut lapsing = sub("https://push.example/lapsing");
    lapsing.expires_ms = Some(700_000);
    s.set_push_subscription(b, lapsing.clone())
        .await
        .expect("subscribe");
    assert_eq!(
        s.push_subscription(b).await.expect("read"),
        Some(lapsing),
        "kept with its expiry"
    );
    assert!(candidates(700_000).await.expect("scan").is_empty());
    assert_eq!(claim(700_000).await.expect("claim"), PushClaim::Nothing);
    assert_eq!(candidates(699_999).await.expect("scan"), vec![(bu, b)]);
    assert!(matches!(
        claim(699_999).await.expect("claim"),
        PushClaim::Send { mseq: 5, .. }
    ));
}

async fn media_garbage_is_expired_uploads_and_unreferenced_objects(f: Fixture) {
    let s = &*f.store;
    let alice = user(s, "alice", 1).await[0].user_id;
    let bob = user(s, "bob", 1).await[0].user_id;
    let (h1, h2) = ([1u8; 32], [2u8; 32]);
    for (id, h, exp) in [("a", h1, 5_000), ("b", h2, 3_000)] {
        s.create_upload(new_upload(id, alice, 10, None), LIMITS)
            .await
            .expect("upload");
        s.finish_upload(id, h, 10, exp, 200).await.expect("finish");
    }
    s.create_upload(new_upload("open", alice, 10, None), LIMITS)
        .await
        .expect("upload");
    s.claim_media(h1, bob, 8_000, 300, LIMITS)
        .await
        .expect("claim")
        .expect("exists");

    let g = s.media_garbage(999, 10).await.expect("garbage");
    assert_eq!(g, MediaGarbage::default(), "nothing has expired yet");
    let g = s.media_garbage(1_000, 10).await.expect("garbage");
    assert_eq!(g.expired_uploads.len(), 3, "every upload row expires");
    assert!(g.unreferenced.is_empty());
    let g = s.media_garbage(4_000, 10).await.expect("garbage");
    assert_eq!(g.unreferenced, vec![h2]);
    let g = s.media_garbage(6_000, 10).await.expect("garbage");
    assert_eq!(g.unreferenced, vec![h2], "bob still holds h1");
    let g = s.media_garbage(6_000, 1).await.expect("garbage");
    assert_eq!(g.expired_uploads.len(), 1, "bounded by the limit");

    // Forgetting rechecks: a reference taken since the listing keeps the object.
    s.claim_media(h2, bob, 10_000, 4_000, LIMITS)
        .await
        .expect("claim")
        .expect("exists");
    assert!(!s.forget_media(h2, 4_000).await.expect("forget"));
    assert!(s.media(h2).await.expect("read").is_some());
    assert!(s.forget_media(h2, 10_000).await.expect("forget"));
    assert_eq!(s.media(h2).await.expect("read"), None);
    assert_eq!(
        s.claim_media(h2, alice, 20_000, 10_000, LIMITS).await,
        Ok(None),
        "a forgotten object cannot be claimed"
    );
}

fn key(id: &str) -> SignedKeyRecord {
    SignedKeyRecord {
        id: id.into(),
        key: format!("key-{id}"),
        signature: format!("sig-{id}"),
    }
}

fn identity(n: u8) -> IdentityKeysRecord {
    IdentityKeysRecord {
        curve25519: format!("curve-{n}"),
        ed25519: format!("ed-{n}"),
        signature: format!("sig-{n}"),
    }
}

async fn key_directory_publish_list_and_claim(f: Fixture) {
    let s = &*f.store;
    let alice = user(s, "alice", 2).await;
    let bob = user(s, "bob", 1).await;
    let (a0, a1, b0) = (alice[0].device_id, alice[1].device_id, bob[0].device_id);

    // One-time keys need identity keys first; nothing is stored by a refused upload.
    let otks = KeyUpload {
        one_time_keys: vec![key("k1")],
        ..KeyUpload::default()
    };
    assert!(matches!(
        s.publish_keys(a0, otks.clone(), 3).await,
        Err(StoreError::Invalid(_))
    ));
    let up = KeyUpload {
        identity: Some(identity(0)),
        one_time_keys: vec![key("k1"), key("k2")],
        fallback_key: Some(key("f1")),
    };
    let c = s.publish_keys(a0, up.clone(), 3).await.expect("publish");
    assert_eq!((c.one_time_keys, c.fallback_key_used), (2, false));
    // Idempotent retry: same identity, same key ids.
    assert_eq!(
        s.publish_keys(a0, up, 3)
            .await
            .expect("again")
            .one_time_keys,
        2
    );
    // Identity keys never change; the limit counts unclaimed keys; both refusals store nothing.
    let changed = KeyUpload {
        identity: Some(identity(9)),
        one_time_keys: vec![key("k3")],
        ..KeyUpload::default()
    };
    assert_eq!(
        s.publish_keys(a0, changed, 3).await,
        Err(StoreError::IdentityKeysChanged)
    );
    let too_many = KeyUpload {
        one_time_keys: vec![key("k3"), key("k4")],
        ..KeyUpload::default()
    };
    assert_eq!(
        s.publish_keys(a0, too_many, 3).await,
        Err(StoreError::KeyLimit(3))
    );
    assert_eq!(s.key_counts(a0).await.expect("counts").one_time_keys, 2);
    assert_eq!(
        s.publish_keys(999, KeyUpload::default(), 3).await,
        Err(StoreError::NotFound("device"))
    );

    // The listing has every device, with keys where published.
    s.publish_keys(
        b0,
        KeyUpload {
            identity: Some(identity(2)),
            ..KeyUpload::default()
        },
        3,
    )
    .await
    .expect("bob");
    let listed = s.device_keys(alice[0].user_id).await.expect("list");
    assert_eq!(
        listed,
        vec![
            DeviceKeysRecord {
                device: a0,
                identity: Some(identity(0))
            },
            DeviceKeysRecord {
                device: a1,
                identity: None
            },
        ]
    );

    // Claims: each one-time key once, then the fallback key (kept, marked used); devices
    // without keys (a1: none; b0: no one-time or fallback key) and unknown ones are left out.
    let mut handed = Vec::new();
    for _ in 0..2 {
        let got = s.claim_keys(vec![a0, a1, b0, 999]).await.expect("claim");
        assert_eq!(got.len(), 1);
        assert_eq!(
            (got[0].user, got[0].device, got[0].fallback),
            (alice[0].user_id, a0, false)
        );
        handed.push(got[0].key.id.clone());
    }
    handed.sort();
    assert_eq!(handed, vec!["k1", "k2"], "never the same key twice");
    let c = s.key_counts(a0).await.expect("counts");
    assert_eq!((c.one_time_keys, c.fallback_key_used), (0, false));
    for _ in 0..2 {
        let got = s.claim_keys(vec![a0]).await.expect("claim");
        assert_eq!((got[0].key.id.as_str(), got[0].fallback), ("f1", true));
    }
    assert!(s.key_counts(a0).await.expect("counts").fallback_key_used);
    // Replenishing: new keys and a new fallback key reset the flag.
    let refill = KeyUpload {
        one_time_keys: vec![key("k5")],
        fallback_key: Some(key("f2")),
        ..KeyUpload::default()
    };
    let c = s.publish_keys(a0, refill, 3).await.expect("refill");
    assert_eq!((c.one_time_keys, c.fallback_key_used), (1, false));

    // Concurrent claims of the last key: exactly one gets it, the others the fallback.
    let claims = (0..8).map(|_| s.claim_keys(vec![a0]));
    let results = futures_util::future::join_all(claims).await;
    let otk = results
        .iter()
        .filter(|r| !r.as_ref().expect("claim")[0].fallback)
        .count();
    assert_eq!(otk, 1);

    // A removed device's keys go with it.
    s.remove_device(alice[0].user_id, a0).await.expect("remove");
    assert!(s.claim_keys(vec![a0]).await.expect("claim").is_empty());
    assert_eq!(
        s.device_keys(alice[0].user_id).await.expect("list").len(),
        1
    );
}

/// End-to-end encrypted groups address every member device but the sender's, exactly, and may
/// give some of them a body of their own (the others get the shared one).
async fn addressed_group_messages(f: Fixture) {
    let s = &*f.store;
    let alice = user(s, "alice", 2).await;
    let bob = user(s, "bob", 2).await;
    let g = s
        .create_group(new_group(&alice[0], &[bob[0].user_id]))
        .await
        .expect("create");
    let gid = g.group.id;
    let addressed = |own: &[(DeviceId, &str)], devs: &[DeviceId]| {
        devs.iter()
            .map(|d| AddressedDevice {
                device: *d,
                body: own
                    .iter()
                    .find(|(o, _)| o == d)
                    .map(|(_, b)| b.as_bytes().to_vec()),
            })
            .collect::<Vec<_>>()
    };
    // The sender's own device in the set is extra; a member device left out is missing.
    let mut wrong = group_post(&alice[0], gid, "w");
    wrong.devices = addressed(
        &[],
        &[alice[0].device_id, bob[0].device_id, bob[1].device_id],
    );
    assert_eq!(
        s.post_message(wrong).await,
        Err(StoreError::DeviceMismatch {
            missing: vec![alice[1].device_id],
            extra: vec![alice[0].device_id],
        })
    );
    assert_eq!(s.group(gid).await.expect("g").expect("exists").last_seq, 1);

    let mut ok = group_post(&alice[0], gid, "m");
    ok.devices = addressed(
        &[(bob[1].device_id, "key for bob 1")],
        &[alice[1].device_id, bob[0].device_id, bob[1].device_id],
    );
    let out = s.post_message(ok).await.expect("post");
    let PostOutcome::Stored {
        seq: 2, deliveries, ..
    } = out
    else {
        panic!("{out:?}")
    };
    let mut got: Vec<(DeviceId, Vec<u8>)> = deliveries
        .iter()
        .map(|d| match &d.entry.item {
            MailboxItem::Message(m) => (d.device, m.body.to_vec()),
            MailboxItem::Receipt(_) => panic!("a receipt"),
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            (alice[1].device_id, b"body m".to_vec()),
            (bob[0].device_id, b"body m".to_vec()),
            (bob[1].device_id, b"key for bob 1".to_vec()),
        ]
    );
    // What waits in the mailbox is the same as what was handed out live.
    let waiting = s
        .mailbox_after(bob[1].device_id, 0, 10)
        .await
        .expect("mailbox");
    let last = waiting.last().expect("entries");
    let MailboxItem::Message(m) = &last.item else {
        panic!("{last:?}")
    };
    assert_eq!(&m.body[..], b"key for bob 1");
}

/// `post` with a mailbox bound of `max_entries` entries and `max_bytes` bytes per device.
fn bounded(mut post: NewMessage, max_entries: u64, max_bytes: u64) -> NewMessage {
    post.mailbox = MailboxLimit {
        max_entries,
        max_bytes,
    };
    post
}

/// A direct post whose shared body is `len` bytes.
fn sized(
    sender: &DeviceAuth,
    recipient: UserId,
    id: &str,
    devices: &[DeviceId],
    len: usize,
) -> NewMessage {
    let mut post = to(sender, recipient, id, devices);
    post.body = vec![b'x'; len];
    post
}

async fn mailbox_entry_bound_refuses_and_stores_nothing(f: Fixture) {
    let s = &*f.store;
    let alice = user(s, "alice", 1).await;
    let bob = user(s, "bob", 1).await;
    let b = bob[0].device_id;
    let send = |id: &str| bounded(to(&alice[0], bob[0].user_id, id, &[b]), 2, u64::MAX);
    for (i, id) in ["m1", "m2"].into_iter().enumerate() {
        let out = s.post_message(send(id)).await.expect("fits");
        assert_eq!(stored_seq(&out), i as u64 + 1);
    }
    let before = s.mailbox_after(b, 0, 100).await.expect("mailbox");
    let full = Err(StoreError::MailboxFull {
        user: bob[0].user_id,
        device: b,
    });
    assert_eq!(s.post_message(send("m3")).await, full);
    assert_eq!(
        s.mailbox_after(b, 0, 100).await.expect("mailbox"),
        before,
        "the refused post left nothing in the mailbox"
    );
    // Acknowledging one entry makes room for one.
    s.ack(bob[0].clone(), 1, 2000).await.expect("ack");
    let out = s.post_message(send("m3")).await.expect("room for one");
    assert!(
        matches!(out, PostOutcome::Stored { seq: 3, .. }),
        "the refusal stored nothing, not even a seq: {out:?}"
    );
    assert_eq!(s.post_message(send("m4")).await, full);
    s.ack(bob[0].clone(), 3, 2001).await.expect("ack");
    let out = s.post_message(send("m4")).await.expect("room again");
    assert_eq!(stored_seq(&out), 4);
    let got = messages_of(s, b).await;
    assert_eq!(
        got.iter().map(|m| (m.0, m.1)).collect::<Vec<_>>(),
        vec![(4, 4)],
        "mseq and seq stayed consecutive through the refusals"
    );
}

async fn mailbox_byte_bound_refuses_and_stores_nothing(f: Fixture) {
    let s = &*f.store;
    let alice = user(s, "alice", 1).await;
    let bob = user(s, "bob", 1).await;
    let b = bob[0].device_id;
    let send =
        |id: &str, len: usize| bounded(sized(&alice[0], bob[0].user_id, id, &[b], len), 100, 100);
    s.post_message(send("m1", 40)).await.expect("40 of 100");
    s.post_message(send("m2", 40)).await.expect("80 of 100");
    let full = Err(StoreError::MailboxFull {
        user: bob[0].user_id,
        device: b,
    });
    assert_eq!(s.post_message(send("m3", 40)).await, full, "120 of 100");
    assert_eq!(messages_of(s, b).await.len(), 2);
    let out = s.post_message(send("m3", 20)).await.expect("exactly 100");
    assert_eq!(stored_seq(&out), 3);
    assert_eq!(s.post_message(send("m4", 1)).await, full);
    s.ack(bob[0].clone(), 1, 2000).await.expect("ack");
    let out = s
        .post_message(send("m4", 40))
        .await
        .expect("40 bytes freed");
    assert_eq!(stored_seq(&out), 4);
}

async fn group_send_to_a_full_mailbox_is_refused_whole(f: Fixture) {
    let s = &*f.store;
    let (alice, bob, carol, gid) = three_in_a_group(s).await;
    let send = |id: &str| bounded(group_post(&alice[0], gid, id), 2, u64::MAX);
    s.post_message(send("g1")).await.expect("post"); // seq 2
    // Bob's device empties its mailbox; carol's holds the CREATED event and g1: full at 2.
    s.ack(bob[0].clone(), 2, 30).await.expect("ack");
    assert_eq!(
        s.post_message(send("g2")).await,
        Err(StoreError::MailboxFull {
            user: carol[0].user_id,
            device: carol[0].device_id,
        })
    );
    assert!(
        kinds_of(s, bob[0].device_id).await.is_empty(),
        "no member got the refused message"
    );
    assert_eq!(kinds_of(s, carol[0].device_id).await.len(), 2);
    assert_eq!(s.group(gid).await.expect("g").expect("exists").last_seq, 2);
    // The end-to-end encrypted form, addressed device by device, is bounded the same way.
    let mut addressed = send("g2");
    addressed.devices = [bob[0].device_id, carol[0].device_id]
        .iter()
        .map(|d| AddressedDevice {
            device: *d,
            body: Some(b"own".to_vec()),
        })
        .collect();
    assert!(matches!(
        s.post_message(addressed).await,
        Err(StoreError::MailboxFull { .. })
    ));
    s.ack(carol[0].clone(), 1, 31).await.expect("ack");
    let out = s.post_message(send("g2")).await.expect("room");
    assert_eq!(stored_seq(&out), 3);
    assert_eq!(
        kinds_of(s, bob[0].device_id).await,
        vec![(3, MessageKind::User)]
    );
}

async fn receipts_and_group_events_reach_full_mailboxes(f: Fixture) {
    let s = &*f.store;
    let alice = user(s, "alice", 1).await;
    let bob = user(s, "bob", 1).await;
    let a = alice[0].device_id;
    s.post_message(to(&alice[0], bob[0].user_id, "a1", &[bob[0].device_id]))
        .await
        .expect("post"); // seq 1
    let to_alice = |id: &str| bounded(to(&bob[0], alice[0].user_id, id, &[a]), 1, u64::MAX);
    s.post_message(to_alice("b1")).await.expect("fills alice"); // seq 2
    let full = Err(StoreError::MailboxFull {
        user: alice[0].user_id,
        device: a,
    });
    assert_eq!(s.post_message(to_alice("b2")).await, full);
    // Bob's delivered and read receipts of a1, and the event of a group bob creates, still reach
    // alice's full mailbox.
    let r = s.ack(bob[0].clone(), 1, 2000).await.expect("ack");
    assert_eq!(r.iter().map(|d| d.device).collect::<Vec<_>>(), vec![a]);
    let r = s
        .mark_read(bob[0].clone(), Target::User(alice[0].user_id), 1, 2001)
        .await
        .expect("read");
    assert!(r.iter().any(|d| d.device == a));
    let g = s
        .create_group(new_group(&bob[0], &[alice[0].user_id]))
        .await
        .expect("create");
    assert!(g.deliveries.iter().any(|d| d.device == a));
    assert_eq!(
        receipts_of(s, a).await,
        vec![
            (ReceiptKind::Delivered, bob[0].user_id, 1),
            (ReceiptKind::Read, bob[0].user_id, 1)
        ]
    );
    assert_eq!(
        kinds_of(s, a).await,
        vec![(2, MessageKind::User), (1, MessageKind::System)]
    );
    // Everything counted was taken off again: once alice acknowledges it all, her mailbox holds
    // exactly one message of exactly its size again.
    let last = s.mailbox_after(a, 0, 100).await.expect("mailbox");
    let up_to = last.last().expect("entries").mseq;
    s.ack(alice[0].clone(), up_to, 2002).await.expect("ack");
    let exact = bounded(to(&bob[0], alice[0].user_id, "b2", &[a]), 1, 7);
    assert_eq!(exact.body.len(), 7);
    let out = s.post_message(exact).await.expect("counters are exact");
    assert_eq!(stored_seq(&out), 3);
    assert_eq!(s.post_message(to_alice("b3")).await, full);
}

async fn mailbox_bounds_count_own_bodies_and_follow_device_removal(f: Fixture) {
    let s = &*f.store;
    let alice = user(s, "alice", 1).await;
    let bob = user(s, "bob", 2).await;
    let (b0, b1) = (bob[0].device_id, bob[1].device_id);
    // A shared body of `shared` bytes; per-device bodies of the given sizes for bob's devices.
    let send = |id: &str, shared: usize, own: [Option<usize>; 2], devices: [DeviceId; 2]| {
        let mut post = bounded(
            sized(&alice[0], bob[0].user_id, id, &devices, shared),
            u64::MAX,
            45,
        );
        for (d, n) in post.devices.iter_mut().zip(own) {
            d.body = n.map(|n| vec![b'o'; n]);
        }
        post
    };
    // b0 counts its own 40 bytes, b1 the shared 30.
    s.post_message(send("p1", 30, [Some(40), None], [b0, b1]))
        .await
        .expect("p1");
    let b0_full = Err(StoreError::MailboxFull {
        user: bob[0].user_id,
        device: b0,
    });
    let b1_full = Err(StoreError::MailboxFull {
        user: bob[0].user_id,
        device: b1,
    });
    assert_eq!(
        s.post_message(send("p2", 1, [Some(5), Some(16)], [b0, b1]))
            .await,
        b1_full,
        "b1 counted the shared body"
    );
    assert_eq!(
        s.post_message(send("p2", 1, [Some(6), Some(15)], [b0, b1]))
            .await,
        b0_full,
        "b0 counted its own body, not the shared one"
    );
    assert_eq!(messages_of(s, b0).await.len(), 1, "refused whole");
    assert_eq!(messages_of(s, b1).await.len(), 1, "refused whole");
    s.post_message(send("p2", 1, [Some(5), Some(15)], [b0, b1]))
        .await
        .expect("exactly 45 each");
    // Removing a device takes its mailbox with it; a new device of bob starts empty, and b0's
    // acknowledged bytes are free again.
    s.ack(bob[0].clone(), 2, 3000).await.expect("ack");
    s.remove_device(bob[0].user_id, b1).await.expect("remove");
    let b2 = s
        .create_device(bob[0].user_id, "new", b"bob-new", 16, 3001)
        .await
        .expect("device");
    let out = s
        .post_message(send("p3", 45, [None, Some(45)], [b0, b2]))
        .await
        .expect("both empty");
    assert_eq!(stored_seq(&out), 3);
    assert_eq!(
        s.post_message(send("p4", 1, [None, None], [b0, b2])).await,
        b0_full
    );
}

/// Many writers append to the same two mailboxes at once (direct posts from four senders,
/// posts to a group of all five) while a reader follows one mailbox with a cursor, as the
/// gateway does: every read must continue exactly where the last one ended. An entry visible
/// before one below it would be skipped for good by the cursor.
async fn concurrent_writers_never_show_a_hole(f: Fixture) {
    let s = f.store.clone();
    let bob = user(&*s, "bob", 2).await;
    let mut senders = Vec::new();
    for name in ["alice", "carol", "dave", "erin"] {
        senders.push(user(&*s, name, 1).await.remove(0));
    }
    let members: Vec<UserId> = std::iter::once(bob[0].user_id)
        .chain(senders[1..].iter().map(|d| d.user_id))
        .collect();
    let gid = s
        .create_group(new_group(&senders[0], &members))
        .await
        .expect("group")
        .group
        .id;
    let (direct, grouped) = (40u64, 10u64);
    let mut tasks = Vec::new();
    for (n, sender) in senders.iter().enumerate() {
        let (s, a, bob_id, to_bob) = (s.clone(), sender.clone(), bob[0].user_id, ids(&bob));
        tasks.push(tokio::spawn(async move {
            for i in 0..direct {
                s.post_message(to(&a, bob_id, &format!("d{n}-{i}"), &to_bob))
                    .await
                    .expect("direct post");
                if i % 4 == 0 {
                    s.post_message(group_post(&a, gid, &format!("g{n}-{i}")))
                        .await
                        .expect("group post");
                }
            }
        }));
    }
    // The CREATED event, then every post.
    let expected = 1 + senders.len() as u64 * (direct + grouped);
    let reader = {
        let (s, device) = (s.clone(), bob[0].device_id);
        tokio::spawn(async move {
            let mut cursor = 0u64;
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
            while cursor < expected {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "reader stalled at {cursor}"
                );
                let batch = s.mailbox_after(device, cursor, 7).await.expect("read");
                for e in &batch {
                    assert_eq!(e.mseq, cursor + 1, "a hole after mseq {cursor}");
                    cursor = e.mseq;
                }
                if batch.is_empty() {
                    tokio::task::yield_now().await;
                }
            }
            cursor
        })
    };
    for t in tasks {
        t.await.expect("writer");
    }
    assert_eq!(reader.await.expect("reader"), expected);
    for d in &bob {
        let got = s.mailbox_after(d.device_id, 0, 10_000).await.expect("all");
        let mseqs: Vec<u64> = got.iter().map(|e| e.mseq).collect();
        assert_eq!(
            mseqs,
            (1..=expected).collect::<Vec<_>>(),
            "device {}",
            d.device_id
        );
    }
}

/// Claims racing for one device's one-time keys: each key goes to one claimer only, and the
/// claimers past the last key get the fallback key.
async fn concurrent_claims_never_share_a_key(f: Fixture) {
    let s = f.store.clone();
    let alice = user(&*s, "alice", 1).await;
    let device = alice[0].device_id;
    let upload = KeyUpload {
        identity: Some(identity(1)),
        one_time_keys: (0..20).map(|i| key(&format!("k{i:02}"))).collect(),
        fallback_key: Some(key("fb")),
    };
    s.publish_keys(device, upload, 100).await.expect("publish");
    let mut tasks = Vec::new();
    for _ in 0..24 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            s.claim_keys(vec![device]).await.expect("claim")
        }));
    }
    let mut one_time = Vec::new();
    let mut fallbacks = 0;
    for t in tasks {
        let claimed = t.await.expect("task");
        assert_eq!(claimed.len(), 1, "one key per claim");
        if claimed[0].fallback {
            assert_eq!(claimed[0].key.id, "fb");
            fallbacks += 1;
        } else {
            one_time.push(claimed[0].key.id.clone());
        }
    }
    one_time.sort();
    let all: Vec<String> = (0..20).map(|i| format!("k{i:02}")).collect();
    assert_eq!(one_time, all, "every one-time key handed out exactly once");
    assert_eq!(fallbacks, 4);
}

/// A member removed while another posts to the group receives every message before its
/// removal and none after it, however the two interleave.
async fn removal_racing_with_posts_leaks_nothing_later(f: Fixture) {
    let s = f.store.clone();
    let (alice, bob, carol, gid) = three_in_a_group(&*s).await;
    let poster = {
        let (s, c) = (s.clone(), carol[0].clone());
        tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..60 {
                let out = s
                    .post_message(group_post(&c, gid, &format!("r{i}")))
                    .await
                    .expect("post");
                seqs.push(stored_seq(&out));
            }
            seqs
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    let change = s
        .change_group(
            alice[0].clone(),
            gid,
            GroupOp::Remove(bob[0].user_id),
            16,
            2000,
        )
        .await
        .expect("remove");
    let removed_at = change
        .deliveries
        .iter()
        .find(|d| d.device == bob[0].device_id)
        .map(|d| match &d.entry.item {
            MailboxItem::Message(m) => m.seq,
            MailboxItem::Receipt(_) => panic!("a receipt"),
        })
        .expect("bob hears of his removal");
    let posted = poster.await.expect("poster");
    let got: Vec<u64> = messages_of(&*s, bob[0].device_id)
        .await
        .iter()
        .map(|m| m.1)
        .collect();
    assert!(
        got.iter().all(|seq| *seq <= removed_at),
        "{got:?} after {removed_at}"
    );
    for seq in posted.iter().filter(|seq| **seq < removed_at) {
        assert!(
            got.contains(seq),
            "bob missed {seq} (removed at {removed_at})"
        );
    }
    assert_eq!(got.last(), Some(&removed_at));
}

macro_rules! conformance {
    ($backend:ident, $make:expr) => {
        mod $backend {
            use super::*;
            conformance!(@tests $make;
                accounts_and_devices,
                post_assigns_consecutive_seqs_and_is_idempotent,
                device_mismatch_stores_nothing,
                per_device_bodies,
                ack_removes_and_produces_delivered_receipts,
                read_receipts_are_watermarks,
                removing_a_device_empties_its_mailbox,
                concurrent_posts_share_one_order,
                concurrent_calls_are_answered_as_if_alone,
                last_seen_and_privacy,
                groups_fan_out_one_body_in_one_order,
                addressed_group_messages,
                membership_bounds_what_members_see,
                group_rights_and_limits,
                group_receipts_and_message_info,
                media_uploads_quota_and_references,
                media_garbage_is_expired_uploads_and_unreferenced_objects,
                upload_progress_and_leases,
                push_subscriptions_and_server_secrets,
                push_claims_announce_each_burst_once,
                key_directory_publish_list_and_claim,
                mailbox_entry_bound_refuses_and_stores_nothing,
                mailbox_byte_bound_refuses_and_stores_nothing,
                group_send_to_a_full_mailbox_is_refused_whole,
                receipts_and_group_events_reach_full_mailboxes,
                mailbox_bounds_count_own_bodies_and_follow_device_removal,
                concurrent_writers_never_show_a_hole,
                concurrent_claims_never_share_a_key,
                removal_racing_with_posts_leaks_nothing_later);
        }
    };
    (@tests $make:expr; $($name:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                if let Some(fixture) = $make.await {
                    super::$name(fixture).await;
                }
            }
        )*
    };
}

conformance!(sqlite_backend, async { Some(sqlite().await) });
conformance!(postgres_backend, postgres());

/// PostgreSQL keeps no per-message countdown: the acknowledgement that removes a message's
/// last mailbox entry releases its body. Two nodes (two stores on one schema) acknowledging
/// the last two entries of each message at the same moment must still release every body,
/// and no body may go while an entry still refers to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_racing_acks_release_every_body() {
    let Some(url) = postgres_url() else {
        eprintln!("skipped: TERN_TEST_POSTGRES is not set");
        return;
    };
    let schema = PgSchema::new(&url);
    let open = || async {
        Arc::new(
            postgres::PgStore::open(schema.options())
                .await
                .expect("open PostgreSQL (TERN_TEST_POSTGRES)"),
        ) as Arc<dyn Store>
    };
    let (node_a, node_b) = (open().await, open().await);
    let owner = user(&*node_a, "owner", 1).await.remove(0);
    let mut members = Vec::new();
    for i in 0..4 {
        members.push(user(&*node_a, &format!("m{i}"), 1).await.remove(0));
    }
    let ids: Vec<UserId> = members.iter().map(|m| m.user_id).collect();
    let gid = node_a
        .create_group(new_group(&owner, &ids))
        .await
        .expect("group")
        .group
        .id;
    let messages = 40usize;
    for i in 0..messages {
        node_a
            .post_message(group_post(&owner, gid, &format!("p{i}")))
            .await
            .expect("post");
    }
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let sql = format!(
        "SELECT count(*) FROM {}.messages WHERE body IS NOT NULL AND kind = 0",
        schema.name
    );
    let kept = || async {
        client
            .query_one(&sql, &[])
            .await
            .expect("count")
            .get::<_, i64>(0)
    };
    // Two members acknowledge everything: the other two still hold every body.
    for m in &members[..2] {
        node_a.ack(m.clone(), u64::MAX >> 1, 30).await.expect("ack");
    }
    assert_eq!(
        kept().await,
        messages as i64,
        "a body went while entries referred to it"
    );
    // The last two at the same time, one on each node, entry by entry: each message's last
    // two entries go in two concurrent transactions.
    let step = Arc::new(tokio::sync::Barrier::new(2));
    let mut tasks = Vec::new();
    for (m, s) in members[2..].iter().zip([node_a.clone(), node_b.clone()]) {
        let (m, step) = (m.clone(), step.clone());
        tasks.push(tokio::spawn(async move {
            let entries = s
                .mailbox_after(m.device_id, 0, 1000)
                .await
                .expect("mailbox");
            for e in entries {
                step.wait().await;
                s.ack(m.clone(), e.mseq, 40).await.expect("ack");
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    assert_eq!(
        kept().await,
        0,
        "bodies left behind after every entry was acknowledged"
    );
}

#[tokio::test]
async fn sqlite_state_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("t.db");
    {
        let s = sqlite::SqliteStore::open(&path, sqlite::SqliteOptions::default()).expect("open");
        let alice = user(&s, "alice", 1).await;
        let bob = user(&s, "bob", 1).await;
        s.post_message(to(&alice[0], bob[0].user_id, "m", &ids(&bob)))
            .await
            .expect("post");
        s.close().await;
        assert_eq!(s.ping().await, Err(StoreError::Closed));
    }
    let s = sqlite::SqliteStore::open(&path, sqlite::SqliteOptions::default()).expect("reopen");
    let bob = s
        .device_by_token(b"bob-0")
        .await
        .expect("auth")
        .expect("bob");
    assert_eq!(messages_of(&s, bob.device_id).await.len(), 1);
}

/// Migration 4 back-fills the mailbox totals of a database written before it: it is taken back
/// to version 3 (the columns dropped) and opened again.
#[tokio::test]
async fn sqlite_migration_backfills_mailbox_totals() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("t.db");
    let (a0, b0, b1, bob_id, alice) = {
        let s = sqlite::SqliteStore::open(&path, sqlite::SqliteOptions::default()).expect("open");
        let alice = user(&s, "alice", 1).await;
        let bob = user(&s, "bob", 2).await;
        let (b0, b1) = (bob[0].device_id, bob[1].device_id);
        // m1: b0 has its own 40 bytes, b1 the shared body ("body m1", 7 bytes).
        let mut m1 = to(&alice[0], bob[0].user_id, "m1", &[b0, b1]);
        m1.devices[0].body = Some(vec![b'o'; 40]);
        s.post_message(m1).await.expect("m1");
        // m2: own bodies only (no shared body is stored).
        let mut m2 = to(&alice[0], bob[0].user_id, "m2", &[b0, b1]);
        m2.devices[0].body = Some(vec![b'o'; 3]);
        m2.devices[1].body = Some(vec![b'o'; 4]);
        s.post_message(m2).await.expect("m2");
        // b0 acknowledges m1: alice's device gets a delivered receipt (0 bytes).
        s.ack(bob[0].clone(), 1, 2000).await.expect("ack");
        s.close().await;
        (alice[0].device_id, b0, b1, bob[0].user_id, alice)
    };
    {
        let c = rusqlite::Connection::open(&path).expect("raw open");
        c.execute_batch(
            "ALTER TABLE mailbox DROP COLUMN size;
             ALTER TABLE devices DROP COLUMN mailbox_entries;
             ALTER TABLE devices DROP COLUMN mailbox_bytes;
             ALTER TABLE uploads DROP COLUMN received;
             ALTER TABLE uploads DROP COLUMN staging;
             DROP TABLE leases;
             DROP TABLE push_subscriptions;
             DROP TABLE server_secrets;
             PRAGMA user_version = 3;",
        )
        .expect("back to version 3");
    }
    let s = sqlite::SqliteStore::open(&path, sqlite::SqliteOptions::default()).expect("migrate");
    s.close().await;
    {
        let c = rusqlite::Connection::open(&path).expect("raw open");
        let version: i64 = c
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .expect("version");
        assert_eq!(version, 7);
        let totals: Vec<(u64, i64, i64)> = c
            .prepare("SELECT id, mailbox_entries, mailbox_bytes FROM devices ORDER BY id")
            .expect("prepare")
            .query_map([], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get(1)?, r.get(2)?))
            })
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert_eq!(totals, vec![(a0, 1, 0), (b0, 1, 3), (b1, 2, 11)]);
    }
    // The store bounds mailboxes by the back-filled totals.
    let s = sqlite::SqliteStore::open(&path, sqlite::SqliteOptions::default()).expect("reopen");
    let post = bounded(to(&alice[0], bob_id, "m3", &[b0, b1]), 2, u64::MAX);
    assert_eq!(
        s.post_message(post).await,
        Err(StoreError::MailboxFull {
            user: bob_id,
            device: b1
        })
    );
    let post = bounded(to(&alice[0], bob_id, "m3", &[b0, b1]), 3, 11 + 7);
    assert_eq!(stored_seq(&s.post_message(post).await.expect("fits")), 3);
}

/// Migration 5 renumbers the direct conversations of an older database to the ids computed from
/// their users (`logic::direct_conversation_id`), in every table: the history, the mailboxes and
/// the receipt watermarks follow, groups keep theirs, and the conversation goes on.
#[tokio::test]
async fn sqlite_migration_renumbers_direct_conversations() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("t.db");
    let (alice, bob, gid) = {
        let s = sqlite::SqliteStore::open(&path, sqlite::SqliteOptions::default()).expect("open");
        let alice = user(&s, "alice", 1).await;
        let bob = user(&s, "bob", 1).await;
        let gid = s
            .create_group(new_group(&alice[0], &[bob[0].user_id]))
            .await
            .expect("group")
            .group
            .id;
        for id in ["m1", "m2"] {
            s.post_message(to(&alice[0], bob[0].user_id, id, &ids(&bob)))
                .await
                .expect("post");
        }
        s.post_message(group_post(&alice[0], gid, "g1"))
            .await
            .expect("group post");
        // bob's mailbox: CREATED (1), m1 (2), m2 (3), g1 (4); he acknowledges m1.
        s.ack(bob[0].clone(), 2, 2000).await.expect("ack");
        s.close().await;
        (alice, bob, gid)
    };
    let direct = logic::direct_conversation_id(alice[0].user_id, bob[0].user_id) as i64;
    {
        // Back to version 4, as a server before migration 5 wrote it: the direct conversation
        // had the next free rowid.
        let c = rusqlite::Connection::open(&path).expect("raw open");
        c.execute_batch(&format!(
            "UPDATE messages SET conversation_id = 100 WHERE conversation_id = {direct};
             UPDATE mailbox SET conversation_id = 100 WHERE conversation_id = {direct};
             UPDATE receipts SET conversation_id = 100 WHERE conversation_id = {direct};
             UPDATE conversations SET id = 100 WHERE id = {direct};
             ALTER TABLE uploads DROP COLUMN received;
             ALTER TABLE uploads DROP COLUMN staging;
             DROP TABLE leases;
             DROP TABLE push_subscriptions;
             DROP TABLE server_secrets;
             PRAGMA user_version = 4;"
        ))
        .expect("back to version 4");
    }
    let s = sqlite::SqliteStore::open(&path, sqlite::SqliteOptions::default()).expect("migrate");
    {
        let c = rusqlite::Connection::open(&path).expect("raw open");
        let convs: Vec<i64> = c
            .prepare("SELECT id FROM conversations ORDER BY id")
            .expect("prepare")
            .query_map([], |r| r.get(0))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        assert_eq!(convs, vec![gid as i64, direct]);
        let stale: i64 = c
            .query_row(
                "SELECT (SELECT COUNT(*) FROM messages WHERE conversation_id = 100)
                      + (SELECT COUNT(*) FROM mailbox WHERE conversation_id = 100)
                      + (SELECT COUNT(*) FROM receipts WHERE conversation_id = 100)",
                [],
                |r| r.get(0),
            )
            .expect("count");
        assert_eq!(stale, 0, "nothing refers to the old id");
    }
    assert_eq!(
        messages_of(&s, bob[0].device_id)
            .await
            .iter()
            .map(|m| m.1)
            .collect::<Vec<_>>(),
        vec![2, 2],
        "m2 (direct seq 2) and g1 (group seq 2) wait for bob"
    );
    assert!(
        s.are_contacts(alice[0].user_id, bob[0].user_id)
            .await
            .expect("contacts")
    );
    let out = s
        .post_message(to(&alice[0], bob[0].user_id, "m3", &ids(&bob)))
        .await
        .expect("post after the migration");
    assert_eq!(stored_seq(&out), 3, "the conversation goes on");
    // The delivered watermark moved with it: marking m3 read grows it from 1 to 3.
    let receipts = s
        .mark_read(bob[0].clone(), Target::User(alice[0].user_id), 3, 3000)
        .await
        .expect("read");
    assert!(!receipts.is_empty());
    let next_group = s
        .create_group(new_group(&alice[0], &[bob[0].user_id]))
        .await
        .expect("another group")
        .group
        .id;
    assert_eq!(next_group, gid + 1, "group ids stay small");
}
