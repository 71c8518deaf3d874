//! End-to-end encryption through the SDK against the real server (PROTOCOL.md §9,
//! SECURITY.md): several devices per user, offline recipients, groups with a removed member and
//! a new device, one-time key exhaustion and the fallback key, a ciphertext tampered with on the
//! server, safety numbers and key-change warnings, passphrase-protected profiles, and the
//! blindness test: after a scripted conversation neither the server's files nor its log hold a
//! byte of plaintext.

mod common;

use std::path::Path;
use std::time::Duration;

use common::TestServer;
use common::sdk::{Device, PASSWORD, login, online, register, until};
use tern_client::{Client, ClientConfig, Event, Recipient, StoredMessage};

const WAIT: Duration = Duration::from_secs(20);

/// The next message event.
async fn next_message(events: &mut tern_client::EventStream) -> StoredMessage {
    until(events, |e| match e {
        Event::Message(m) => Some((**m).clone()),
        _ => None,
    })
    .await
}

/// The next received user message (system messages skipped) must be `text`, decrypted.
async fn expect_text(events: &mut tern_client::EventStream, text: &str) -> StoredMessage {
    let mut m = next_message(events).await;
    while m.is_system() {
        m = next_message(events).await;
    }
    assert_eq!(m.undecryptable, None, "{m:?}");
    assert_eq!(m.text, text);
    m
}

/// No message arrives within a short while.
async fn quiet(events: &mut tern_client::EventStream) {
    let r = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            if let Event::Message(m) = events.next().await.expect("events") {
                return *m;
            }
        }
    })
    .await;
    assert!(r.is_err(), "unexpected message {r:?}");
}

/// Every regular file under `dir`, read whole, with its path.
fn files_under(dir: &Path, out: &mut Vec<(std::path::PathBuf, Vec<u8>)>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            files_under(&p, out);
        } else if let Ok(b) = std::fs::read(&p) {
            out.push((p, b));
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_messages_reach_every_device_and_nobody_else() {
    let srv = TestServer::start().await;
    let url = srv.url();
    let a1 = register(&url, "alice").await;
    let a2 = login(&url, "alice").await;
    let b1 = register(&url, "bob").await;
    let b2 = login(&url, "bob").await;
    let b3 = login(&url, "bob").await; // stays offline for now
    for d in [&a1, &a2, &b1, &b2] {
        online(d).await;
    }
    let (mut ea2, mut eb1, mut eb2) = (a2.client.events(), b1.client.events(), b2.client.events());

    a1.client
        .send_text("bob", "first words")
        .await
        .expect("send");
    for e in [&mut eb1, &mut eb2] {
        let m = expect_text(e, "first words").await;
        assert!(!m.outgoing);
    }
    let copy = expect_text(&mut ea2, "first words").await;
    assert!(copy.outgoing, "a sync copy for my other device");

    // Replies and more in a row: established sessions, both directions.
    let mut ea1 = a1.client.events();
    b2.client
        .send_text("alice", "hello back")
        .await
        .expect("reply");
    expect_text(&mut ea1, "hello back").await;
    expect_text(&mut ea2, "hello back").await;
    expect_text(&mut eb1, "hello back").await;
    for i in 0..5 {
        a1.client
            .send_text("bob", &format!("more {i}"))
            .await
            .expect("send");
    }
    for i in 0..5 {
        expect_text(&mut eb1, &format!("more {i}")).await;
        expect_text(&mut ea2, &format!("more {i}")).await;
    }

    // The offline device gets everything, decrypted, when it comes online.
    let mut eb3 = b3.client.events();
    online(&b3).await;
    expect_text(&mut eb3, "first words").await;
    expect_text(&mut eb3, "hello back").await;
    let h = b3.client.history("alice", 20).expect("history");
    assert_eq!(h.len(), 7);
    assert!(h.iter().all(|m| m.undecryptable.is_none()), "{h:?}");

    // A note to self reaches my other device only.
    a1.client.send_text("alice", "note").await.expect("note");
    expect_text(&mut ea2, "note").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_rotate_when_a_member_goes_and_late_devices_read_only_what_follows() {
    let srv = TestServer::start().await;
    let url = srv.url();
    let a1 = register(&url, "alice").await;
    let a2 = login(&url, "alice").await;
    let b1 = register(&url, "bob").await;
    let c1 = register(&url, "carol").await;
    for d in [&a1, &a2, &b1, &c1] {
        online(d).await;
    }
    let (mut ea2, mut eb1, mut ec1) = (a2.client.events(), b1.client.events(), c1.client.events());
    let g = a1
        .client
        .create_group("Friends", &["bob", "carol"], false)
        .await
        .expect("group")
        .group_id;
    // The CREATED system message.
    for e in [&mut ea2, &mut eb1, &mut ec1] {
        assert!(next_message(e).await.is_system());
    }

    a1.client.send_group_text(g, "g1").await.expect("g1");
    for e in [&mut ea2, &mut eb1, &mut ec1] {
        expect_text(e, "g1").await;
    }
    let mut ea1 = a1.client.events();
    b1.client.send_group_text(g, "g2").await.expect("g2");
    for e in [&mut ea1, &mut ea2, &mut ec1] {
        expect_text(e, "g2").await;
    }

    // Carol is removed: alice's next message uses a new session carol never gets.
    a1.client.remove_member(g, "carol").await.expect("remove");
    for e in [&mut ea2, &mut eb1, &mut ec1] {
        assert!(next_message(e).await.is_system());
    }
    a1.client.send_group_text(g, "g3").await.expect("g3");
    expect_text(&mut eb1, "g3").await;
    expect_text(&mut ea2, "g3").await;
    quiet(&mut ec1).await;
    let g3 = b1.client.group_history(g, 1).expect("history")[0]
        .seq
        .expect("seq");
    let g1 = 2; // after the CREATED event
    assert_ne!(
        session_of(&b1, g, g3),
        session_of(&b1, g, g1),
        "rotated after the removal"
    );
    assert!(
        !has_session(&c1, &session_of(&b1, g, g3)),
        "carol never got the new key"
    );
    assert!(has_session(&c1, &session_of(&b1, g, g1)));

    // A new device of bob's receives the key when it exists, and only what follows.
    let b2 = login(&url, "bob").await;
    let mut eb2 = b2.client.events();
    online(&b2).await;
    a1.client.send_group_text(g, "g4").await.expect("g4");
    expect_text(&mut eb2, "g4").await;
    expect_text(&mut eb1, "g4").await;
    let h = b2.client.group_history(g, 20).expect("history");
    let texts: Vec<&str> = h
        .iter()
        .filter(|m| !m.is_system())
        .map(|m| m.text.as_str())
        .collect();
    assert_eq!(texts, ["g4"]);
    assert!(h.iter().all(|m| m.undecryptable.is_none()));

    // Carol leaving on her own is the same for bob's session.
    let d = register(&url, "dave").await;
    online(&d).await;
    let mut ed = d.client.events();
    a1.client.add_members(g, &["dave"]).await.expect("add");
    assert!(next_message(&mut ed).await.is_system());
    b1.client.send_group_text(g, "g5").await.expect("g5");
    expect_text(&mut ed, "g5").await;
    d.client.leave_group(g).await.expect("leave");
    b1.client.send_group_text(g, "g6").await.expect("g6");
    expect_text(&mut eb2, "g5").await;
    expect_text(&mut eb2, "g6").await;
    let h = b2.client.group_history(g, 20).expect("history");
    let seq_of = |t: &str| h.iter().find(|m| m.text == t).and_then(|m| m.seq).expect(t);
    let (g5, g6) = (seq_of("g5"), seq_of("g6"));
    assert_ne!(
        session_of(&b2, g, g5),
        session_of(&b2, g, g6),
        "bob rotated after dave left"
    );
    assert!(!has_session(&d, &session_of(&b2, g, g6)));
    assert!(has_session(&d, &session_of(&b2, g, g5)));

    // Bob removes his second device: the next group message is in a session it never gets.
    let b2_device = b2.client.session().expect("session").device_id;
    b1.client
        .remove_device(b2_device)
        .await
        .expect("remove device");
    a1.client.send_group_text(g, "g7").await.expect("g7");
    let mut t = next_message(&mut eb1).await;
    while t.text != "g7" {
        t = next_message(&mut eb1).await;
    }
    assert_eq!(t.undecryptable, None);
    let g7 = t.seq.expect("seq");
    assert_ne!(session_of(&b1, g, g7), session_of(&b1, g, g4_seq(&b1, g)));
    assert!(!has_session(&b2, &session_of(&b1, g, g7)));
}

fn g4_seq(d: &Device, g: u64) -> u64 {
    d.client
        .group_history(g, 50)
        .expect("history")
        .iter()
        .find(|m| m.text == "g4")
        .and_then(|m| m.seq)
        .expect("g4")
}

fn state(d: &Device) -> rusqlite::Connection {
    rusqlite::Connection::open(d.home.path().join("state.db")).expect("db")
}

/// The Megolm session a device decrypted group message `seq` with.
fn session_of(d: &Device, group: u64, seq: u64) -> String {
    state(d)
        .query_row(
            "SELECT session_id FROM megolm_seen WHERE conv_id = ?1 AND seq = ?2",
            [group, seq],
            |r| r.get(0),
        )
        .expect("a decrypted group message")
}

fn has_session(d: &Device, session_id: &str) -> bool {
    state(d)
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM megolm_inbound WHERE session_id = ?1)",
            [session_id],
            |r| r.get(0),
        )
        .expect("query")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_one_time_keys_fall_back_and_are_replenished() {
    let srv = TestServer::start().await;
    let url = srv.url();
    let http = srv.http();
    let b = register(&url, "bob").await;
    let bob_device = b.client.session().expect("session").device_id;
    let (_, _, eve) = http.account("eve").await;
    // Eve claims every one-time key bob published; then only his fallback key is left.
    for i in 0..=tern_client::ONE_TIME_KEY_TARGET {
        let (s, v) = http
            .post(
                "/v1/keys/claim",
                serde_json::json!({"devices": [bob_device]}),
                Some(&eve),
            )
            .await;
        assert_eq!(s, 200, "{v}");
        let fallback = v["keys"][0]["fallback"].as_bool().expect("fallback flag");
        assert_eq!(fallback, i == tern_client::ONE_TIME_KEY_TARGET, "claim {i}");
    }

    let a = register(&url, "alice").await;
    online(&a).await;
    a.client
        .send_text("bob", "over the fallback key")
        .await
        .expect("send");
    let mut eb = b.client.events();
    online(&b).await;
    expect_text(&mut eb, "over the fallback key").await;

    // Bob noticed, published fresh one-time keys and a new fallback key.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, v) = http
            .post(
                "/v1/keys/claim",
                serde_json::json!({"devices": [bob_device]}),
                Some(&eve),
            )
            .await;
        if v["keys"][0]["fallback"] == false {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "keys replenished");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And the conversation goes on.
    let mut ea = a.client.events();
    b.client.send_text("alice", "got it").await.expect("reply");
    expect_text(&mut ea, "got it").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_ciphertext_is_reported_and_the_conversation_recovers() {
    let srv = TestServer::start().await;
    let url = srv.url();
    let a = register(&url, "alice").await;
    let b = register(&url, "bob").await;
    online(&a).await;
    a.client
        .send_text("bob", "tamper with me")
        .await
        .expect("send");

    // The server (or anyone with its disk) flips the last byte of bob's copy.
    match common::postgres_url() {
        None => {
            let db = rusqlite::Connection::open(srv.dir.path().join("tern.db")).expect("db");
            db.busy_timeout(Duration::from_secs(5)).expect("timeout");
            let (device, mseq, mut body): (i64, i64, Vec<u8>) = db
                .query_row(
                    "SELECT device_id, mseq, body FROM mailbox WHERE body IS NOT NULL",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )
                .expect("bob's mailbox entry");
            let last = body.len() - 1;
            body[last] ^= 0x01;
            db.execute(
                "UPDATE mailbox SET body = ?1 WHERE device_id = ?2 AND mseq = ?3",
                rusqlite::params![body, device, mseq],
            )
            .expect("tamper");
        }
        Some(url) => {
            let schema = std::fs::read_to_string(srv.dir.path().join("postgres-schema"))
                .expect("the data directory names its schema");
            let (db, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .expect("connect");
            tokio::spawn(conn);
            db.batch_execute(&format!("SET search_path = {}", schema.trim()))
                .await
                .expect("schema");
            let row = db
                .query_one(
                    "SELECT device_id, mseq, body FROM mailbox WHERE body IS NOT NULL",
                    &[],
                )
                .await
                .expect("bob's mailbox entry");
            let (device, mseq, mut body): (i64, i64, Vec<u8>) =
                (row.get(0), row.get(1), row.get(2));
            let last = body.len() - 1;
            body[last] ^= 0x01;
            db.execute(
                "UPDATE mailbox SET body = $1 WHERE device_id = $2 AND mseq = $3",
                &[&body, &device, &mseq],
            )
            .await
            .expect("tamper");
        }
    }

    let mut eb = b.client.events();
    b.client.connect().await.expect("connect");
    let failure = until(&mut eb, |e| match e {
        Event::DecryptionFailed(f) => Some(f.clone()),
        _ => None,
    })
    .await;
    assert_eq!((failure.from.as_str(), failure.seq), ("alice", 1));
    let stored = next_message(&mut eb).await;
    assert_eq!(stored.seq, Some(1));
    assert!(stored.undecryptable.is_some());
    let h = b.client.history("alice", 10).expect("history");
    assert_eq!(h.len(), 1);
    assert!(h[0].undecryptable.is_some());
    assert!(!h[0].text.contains("tamper with me"));

    // Nothing is wedged: both directions work afterwards.
    a.client.send_text("bob", "second try").await.expect("send");
    expect_text(&mut eb, "second try").await;
    let mut ea = a.client.events();
    b.client
        .send_text("alice", "all good")
        .await
        .expect("reply");
    expect_text(&mut ea, "all good").await;
    a.client.send_text("bob", "and again").await.expect("send");
    expect_text(&mut eb, "and again").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safety_numbers_match_and_key_changes_are_flagged() {
    let srv = TestServer::start().await;
    let url = srv.url();
    let a = register(&url, "alice").await;
    let b = register(&url, "bob").await;
    online(&a).await;
    online(&b).await;
    let from_alice = a.client.safety_number("bob").await.expect("number");
    let from_bob = b.client.safety_number("alice").await.expect("number");
    assert_eq!(
        from_alice.number, from_bob.number,
        "both sides see the same"
    );
    assert_eq!(from_alice.number.len(), 71);
    assert!(!from_alice.verified);
    assert!(
        a.client
            .mark_verified("bob")
            .await
            .expect("verify")
            .verified
    );
    assert!(a.client.safety_number("bob").await.expect("n").verified);

    // Bob adds a device: alice is warned loudly when she next writes, the mark is gone, and
    // the new number differs.
    let mut ea = a.client.events();
    let b2 = login(&url, "bob").await;
    online(&b2).await;
    a.client.send_text("bob", "still you?").await.expect("send");
    let change = until(&mut ea, |e| match e {
        Event::KeysChanged(k) => Some(k.clone()),
        _ => None,
    })
    .await;
    assert_eq!(change.username, "bob");
    assert!(change.was_verified);
    let now = a.client.safety_number("bob").await.expect("number");
    assert!(!now.verified);
    assert_ne!(now.number, from_alice.number);
    assert_eq!(now.their_devices, 2);
    assert_eq!(
        now.number,
        b2.client.safety_number("alice").await.expect("n").number
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passphrase_protects_the_keys_at_rest() {
    let srv = TestServer::start().await;
    let home = tempfile::tempdir().expect("home");
    let config = |p: Option<&str>| {
        let mut c = ClientConfig::new(srv.url(), home.path());
        c.passphrase = p.map(str::to_owned);
        c
    };
    {
        let c = Client::open(config(Some("open sesame"))).expect("open");
        c.register("alice", PASSWORD).await.expect("register");
    }
    assert!(
        !home.path().join("store.key").exists(),
        "no key file with a passphrase"
    );
    let wrong = Client::open(config(Some("open says me"))).expect_err("wrong passphrase");
    assert_eq!(wrong.code_str(), "crypto");
    let none = Client::open(config(None)).expect_err("passphrase needed");
    assert_eq!(none.code_str(), "crypto");
    let c = Client::open(config(Some("open sesame"))).expect("right passphrase");
    assert!(c.session().is_some());

    // Without a passphrase the key file protects the profile; it is the owner's only.
    let other = tempfile::tempdir().expect("home");
    let c = Client::open(ClientConfig::new(srv.url(), other.path())).expect("open");
    c.register("bob", PASSWORD).await.expect("register");
    let key = other.path().join("store.key");
    assert_eq!(std::fs::read(&key).expect("key file").len(), 32);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&key).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_is_blind() {
    let data = tempfile::tempdir().expect("data");
    let logs = tempfile::tempdir().expect("logs");
    let log = logs.path().join("ternd.log");
    // Pushes go to a push service on this machine: their bodies are searched too.
    let settings: Vec<&str> = common::LIFTED
        .iter()
        .copied()
        .chain([
            "push.allow_insecure_loopback=true",
            "push.subject=\"mailto:ops@example.org\"",
        ])
        .collect();
    let ternd = common::spawn_ternd_with(data.path(), "trace", Some(&log), &settings);
    let url = format!("http://{}", ternd.addr);
    let a1 = register(&url, "alice").await;
    let a2 = login(&url, "alice").await;
    let b = register(&url, "bob").await;
    let c = register(&url, "carol").await;
    for d in [&a1, &a2, &b, &c] {
        online(d).await;
    }
    let secrets = [
        "PLAINTEXT-direct-7f3a",
        "PLAINTEXT-reply-91bc",
        "PLAINTEXT-group-c2d4",
        "PLAINTEXT-caption-55e1",
        "PLAINTEXT-filebody-0a9e",
        "PLAINTEXT-pushed-3e7f",
    ];
    let mut files = Vec::new();
    let (mut eb, mut ec) = (b.client.events(), c.client.events());
    a1.client.send_text("bob", secrets[0]).await.expect("send");
    expect_text(&mut eb, secrets[0]).await;
    let mut ea = a1.client.events();
    b.client
        .send_text("alice", secrets[1])
        .await
        .expect("reply");
    expect_text(&mut ea, secrets[1]).await;
    let g = a1
        .client
        .create_group("Secret club", &["bob", "carol"], false)
        .await
        .expect("group")
        .group_id;
    assert!(next_message(&mut eb).await.is_system());
    assert!(next_message(&mut ec).await.is_system());
    a1.client
        .send_group_text(g, secrets[2])
        .await
        .expect("group");
    expect_text(&mut eb, secrets[2]).await;
    expect_text(&mut ec, secrets[2]).await;
    let file = logs.path().join("notes.txt");
    std::fs::write(&file, secrets[4].repeat(1000)).expect("file");
    a1.client
        .send_file(&Recipient::Group(g), &file, Some(secrets[3]), |_| {})
        .await
        .expect("send file");
    let m = until(&mut ec, |e| match e {
        Event::Message(m) if m.media().is_some() => Some((**m).clone()),
        _ => None,
    })
    .await;
    assert!(m.text.contains(secrets[3]));
    let got = c
        .client
        .download(&m, &logs.path().join("got.txt"), |_| {})
        .await
        .expect("download");
    assert_eq!(
        std::fs::read(&got.path).expect("read"),
        secrets[4].repeat(1000).into_bytes()
    );

    // Carol registers for push and goes offline; a direct message and a group message wake
    // her. Her push service relays ciphertext; what her SDK decrypts names nothing.
    let service = common::push::PushService::start(
        common::push::vapid_key(&common::http_for(ternd.addr)).await,
        common::push::SUBJECT,
    )
    .await;
    let endpoint = service.subscribe_opaque("carol");
    c.client
        .register_push(&endpoint, None)
        .await
        .expect("register push");
    c.client.close().await;
    a1.client
        .send_text("carol", secrets[5])
        .await
        .expect("send");
    a1.client
        .send_group_text(g, secrets[5])
        .await
        .expect("group");
    assert_eq!(service.wait_for("carol", 1, common::WAIT).await, 1);
    let push = service.take().remove(0);
    let wake = c.client.decrypt_push(&push.body).await.expect("decrypt");
    assert!(wake.waiting >= 1);
    // The SDK takes exactly `n` and `id` (unknown fields are refused): a count, random hex.
    assert!(wake.id.chars().all(|ch| ch.is_ascii_hexdigit()), "{wake:?}");
    files.push((logs.path().join("push body"), push.body.clone()));

    // Everything the server wrote: database (and WAL), media blobs, log, and the push.
    drop(ternd);
    files_under(data.path(), &mut files);
    files.push((log.clone(), std::fs::read(&log).expect("log")));
    assert!(
        files.len() >= 3,
        "{:?}",
        files.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    let log_text = String::from_utf8_lossy(&files.last().expect("log").1).into_owned();
    assert!(log_text.contains("group created"), "the log was captured");
    for s in secrets {
        for (path, bytes) in &files {
            assert!(
                !contains(bytes, s.as_bytes()),
                "{s} found in {}",
                path.display()
            );
        }
    }
    // The search does find plaintext where it is: the receivers' own stores.
    let mut client_files = Vec::new();
    files_under(c.home.path(), &mut client_files);
    assert!(
        client_files
            .iter()
            .any(|(_, b)| contains(b, secrets[2].as_bytes())),
        "the search works"
    );
}
