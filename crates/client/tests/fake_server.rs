//! The SDK's connection logic against a scripted fake server (HTTP + WebSocket on one port):
//! drain, de-duplication after a reconnect, acknowledgement after storage, send retry with the
//! same client_msg_id across `device_mismatch` and a dropped connection, receipts to ticks,
//! and a refused token ending the connection task. The real server is tested end to end in
//! `crates/server/tests`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use tern_client::{Client, ClientConfig, CloseReason, ConnectionState, ErrorCode, Event, Tick};
use tern_proto::content::Content;
use tern_proto::frames::{self, ClientFrame, ServerFrame, client_frame, event, server_frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;

const ALICE: u64 = 1;
const BOB: u64 = 2;

#[derive(Clone, Copy, PartialEq)]
enum Script {
    /// Drain, reconnect, send with retries (see `happy_connection`).
    Messaging,
    /// Refuse every Hello as unauthorized.
    RefuseToken,
    /// A group: system message, send without devices, all_* receipts, read (see `groups`).
    Groups,
}

async fn start(script: Script) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let connections = Arc::new(AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let connections = connections.clone();
            tokio::spawn(async move {
                if is_websocket(&stream).await {
                    let ws = tokio_tungstenite::accept_async(stream)
                        .await
                        .expect("ws accept");
                    let n = connections.fetch_add(1, Ordering::SeqCst);
                    match script {
                        Script::Messaging => messaging(ws, n).await,
                        Script::RefuseToken => refuse(ws).await,
                        Script::Groups => groups(ws).await,
                    }
                } else {
                    http(stream).await;
                }
            });
        }
    });
    format!("http://{addr}")
}

async fn is_websocket(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 16];
    loop {
        let n = stream.peek(&mut buf).await.expect("peek");
        if n >= 10 || n == 0 {
            return buf[..n].starts_with(b"GET /v1/ws");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// A minimal HTTP/1.1 responder for the calls the SDK makes here.
async fn http(mut stream: TcpStream) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = stream.read(&mut chunk).await.expect("read");
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap_or(0))
        })
        .unwrap_or(0);
    while buf.len() < head_end + len {
        let n = stream.read(&mut chunk).await.expect("read body");
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let request_line = head.lines().next().unwrap_or_default().to_owned();
    let (status, body) = match request_line.split(' ').take(2).collect::<Vec<_>>()[..] {
        ["POST", "/v1/sessions"] => (
            "201 Created",
            r#"{"user_id":1,"username":"alice","device_id":10,"token":"tok"}"#.to_owned(),
        ),
        // Devices that have published no keys: the SDK must still never send plaintext.
        ["GET", "/v1/users/bob/keys"] => (
            "200 OK",
            r#"{"user_id":2,"username":"bob","devices":[{"device_id":20,"identity":null}]}"#
                .to_owned(),
        ),
        ["GET", "/v1/users/alice/keys"] => (
            "200 OK",
            r#"{"user_id":1,"username":"alice","devices":[{"device_id":10,"identity":null},
                {"device_id":11,"identity":null}]}"#
                .to_owned(),
        ),
        ["GET", "/v1/groups/7/keys"] => (
            "200 OK",
            r#"{"group_id":7,"members":[
                {"user_id":1,"username":"alice","devices":[{"device_id":10,"identity":null},{"device_id":11,"identity":null}]},
                {"user_id":2,"username":"bob","devices":[{"device_id":20,"identity":null}]}]}"#
                .to_owned(),
        ),
        ["GET", "/v1/keys"] => (
            "200 OK",
            r#"{"one_time_keys":0,"fallback_key_used":false}"#.to_owned(),
        ),
        ["PUT", "/v1/keys"] => {
            let body = String::from_utf8_lossy(&buf[head_end..]);
            assert!(body.contains(r#""identity""#), "{body}");
            (
                "200 OK",
                r#"{"one_time_keys":50,"fallback_key_used":false}"#.to_owned(),
            )
        }
        ["POST", "/v1/keys/claim"] => ("200 OK", r#"{"keys":[]}"#.to_owned()),
        ["GET", "/v1/devices"] => (
            "200 OK",
            r#"{"devices":[{"device_id":10,"name":"a","created_at_ms":1,"last_seen_ms":null,"current":true},
                {"device_id":11,"name":"b","created_at_ms":1,"last_seen_ms":null,"current":false}]}"#
                .to_owned(),
        ),
        ["POST", "/v1/groups"] => {
            let body = String::from_utf8_lossy(&buf[head_end..]);
            assert!(body.contains(r#""members":["bob"]"#), "{body}");
            ("201 Created", GROUP_INFO.to_owned())
        }
        ["GET", "/v1/groups/7/messages/2"] => (
            "200 OK",
            r#"{"group_id":7,"seq":2,"members":[{"user_id":2,"username":"bob","delivered":true,"read":true}],
                "delivered_to_all":true,"read_by_all":true}"#
                .to_owned(),
        ),
        _ => (
            "404 Not Found",
            r#"{"error":{"code":"not_found","message":"no such thing"}}"#.to_owned(),
        ),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(resp.as_bytes()).await;
}

const GROUP: u64 = 7;
const GROUP_INFO: &str = r#"{"group_id":7,"name":"Family","members_can_add":false,"created_at_ms":1,
    "last_seq":1,"members":[{"user_id":1,"username":"alice","role":"owner","joined_seq":1},
    {"user_id":2,"username":"bob","role":"member","joined_seq":1}]}"#;

type Ws = WebSocketStream<TcpStream>;

async fn send(ws: &mut Ws, request_id: u64, kind: server_frame::Kind) {
    let f = ServerFrame {
        request_id,
        kind: Some(kind),
    };
    ws.send(WsMessage::Binary(f.encode_to_vec().into()))
        .await
        .expect("server send");
}

/// The next client frame that is not a Ping.
async fn recv(ws: &mut Ws) -> ClientFrame {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("client frame in time")
            .expect("open")
            .expect("read");
        if let WsMessage::Binary(b) = msg {
            let f = ClientFrame::decode(&b[..]).expect("decode");
            if !matches!(f.kind, Some(client_frame::Kind::Ping(_))) {
                return f;
            }
        }
    }
}

async fn hello(ws: &mut Ws) -> frames::Hello {
    match recv(ws).await.kind {
        Some(client_frame::Kind::Hello(h)) => h,
        other => panic!("expected Hello, got {other:?}"),
    }
}

fn welcome() -> server_frame::Kind {
    server_frame::Kind::Welcome(frames::Welcome {
        protocol_version: 1,
        user_id: ALICE,
        username: "alice".into(),
        device_id: 10,
        server_time_ms: 0,
        heartbeat_secs: 25,
        max_frame_bytes: 65536,
        max_body_bytes: 16384,
    })
}

fn message(mailbox_seq: u64, seq: u64) -> server_frame::Kind {
    server_frame::Kind::Event(frames::Event {
        mailbox_seq,
        kind: Some(event::Kind::Message(frames::Message {
            conversation: Some(frames::Peer::user(BOB)),
            peer_username: "bob".into(),
            seq,
            sender_user: BOB,
            sender_username: "bob".into(),
            sender_device: 20,
            client_msg_id: format!("b{seq}"),
            server_ts_ms: 100 + seq as i64,
            body: Content::text(format!("hello {seq}")).encode_body(),
            ..Default::default()
        })),
    })
}

fn expect_ack(f: &ClientFrame, up_to: u64) {
    match &f.kind {
        Some(client_frame::Kind::Ack(a)) => assert_eq!(a.up_to, up_to),
        other => panic!("expected Ack{{{up_to}}}, got {other:?}"),
    }
}

/// No body of the send (shared or per device) contains the text in the clear.
fn assert_no_plaintext(s: &frames::Send, text: &str) {
    let bodies = std::iter::once(&s.body).chain(s.devices.iter().filter_map(|d| d.body.as_ref()));
    for b in bodies {
        assert!(
            !b.windows(text.len()).any(|w| w == text.as_bytes()),
            "plaintext on the wire"
        );
    }
}

fn expect_send(f: &ClientFrame) -> frames::Send {
    match &f.kind {
        Some(client_frame::Kind::Send(s)) => s.clone(),
        other => panic!("expected Send, got {other:?}"),
    }
}

async fn messaging(mut ws: Ws, connection: usize) {
    assert_eq!(hello(&mut ws).await.token, "tok");
    send(&mut ws, 0, welcome()).await;
    if connection == 0 {
        send(&mut ws, 0, message(1, 1)).await;
        send(&mut ws, 0, message(2, 2)).await;
        send(
            &mut ws,
            0,
            server_frame::Kind::Synced(frames::Synced { up_to: 2 }),
        )
        .await;
        // Events may be acknowledged in one or two batches; the last covers both.
        let mut f = recv(&mut ws).await;
        if matches!(&f.kind, Some(client_frame::Kind::Ack(a)) if a.up_to == 1) {
            f = recv(&mut ws).await;
        }
        expect_ack(&f, 2);
        // First Send: claim a device mismatch.
        let f = recv(&mut ws).await;
        let s = expect_send(&f);
        let mut devices: Vec<_> = s.devices.iter().map(|d| d.device_id).collect();
        devices.sort_unstable();
        assert_eq!(
            devices,
            [11, 20],
            "recipient's devices plus my other device"
        );
        assert_no_plaintext(&s, "hi bob");
        assert!(s.body.is_empty(), "every device has a body of its own");
        let mismatch = frames::Error {
            code: ErrorCode::DeviceMismatch as i32,
            message: "mismatch".into(),
            missing_devices: vec![],
            extra_devices: vec![],
            retry_after_ms: 0,
        };
        send(&mut ws, f.request_id, server_frame::Kind::Error(mismatch)).await;
        // The retry carries the same id; drop the connection instead of answering.
        let retry = expect_send(&recv(&mut ws).await);
        assert_eq!(retry.client_msg_id, s.client_msg_id);
        drop(ws);
    } else {
        // Redeliver the unacknowledged... and one acknowledged duplicate, plus a new one.
        send(&mut ws, 0, message(2, 2)).await;
        send(&mut ws, 0, message(3, 3)).await;
        send(
            &mut ws,
            0,
            server_frame::Kind::Synced(frames::Synced { up_to: 3 }),
        )
        .await;
        let mut sent_answered = false;
        loop {
            let f = recv(&mut ws).await;
            match f.kind {
                Some(client_frame::Kind::Ack(a)) if a.up_to == 4 => return, // after the receipt
                Some(client_frame::Kind::Ack(_)) => {}
                Some(client_frame::Kind::Send(s)) if !sent_answered => {
                    sent_answered = true;
                    let sent = frames::Sent {
                        client_msg_id: s.client_msg_id,
                        seq: 4,
                        server_ts_ms: 500,
                    };
                    send(&mut ws, f.request_id, server_frame::Kind::Sent(sent)).await;
                    let receipt = frames::Receipt {
                        conversation: Some(frames::Peer::user(BOB)),
                        peer_username: "bob".into(),
                        reader_user: BOB,
                        reader_username: "bob".into(),
                        kind: frames::ReceiptKind::Read as i32,
                        up_to_seq: 4,
                        server_ts_ms: 600,
                        ..Default::default()
                    };
                    let ev = frames::Event {
                        mailbox_seq: 4,
                        kind: Some(event::Kind::Receipt(receipt)),
                    };
                    send(&mut ws, 0, server_frame::Kind::Event(ev)).await;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

/// One connection: the group's CREATED event, then a group Send (no devices) answered with
/// Sent and an all-read receipt, then a Read of the group.
async fn groups(mut ws: Ws) {
    hello(&mut ws).await;
    send(&mut ws, 0, welcome()).await;
    let created = frames::GroupEvent {
        action: frames::GroupAction::Created as i32,
        actor: Some(frames::UserRef {
            user_id: ALICE,
            username: "alice".into(),
        }),
        targets: vec![frames::UserRef {
            user_id: BOB,
            username: "bob".into(),
        }],
        name: "Family".into(),
        members_can_add: false,
        description: String::new(),
    };
    let system = frames::Message {
        conversation: Some(frames::Peer::group(GROUP)),
        seq: 1,
        sender_user: ALICE,
        sender_username: "alice".into(),
        server_ts_ms: 50,
        body: created.encode_to_vec(),
        kind: frames::MessageKind::System as i32,
        group_name: "Family".into(),
        ..Default::default()
    };
    let ev = frames::Event {
        mailbox_seq: 1,
        kind: Some(event::Kind::Message(system)),
    };
    send(&mut ws, 0, server_frame::Kind::Event(ev)).await;
    send(
        &mut ws,
        0,
        server_frame::Kind::Synced(frames::Synced { up_to: 1 }),
    )
    .await;
    expect_ack(&recv(&mut ws).await, 1);

    let f = recv(&mut ws).await;
    let s = expect_send(&f);
    assert_eq!(s.to, Some(frames::Peer::group(GROUP)));
    let mut devices: Vec<_> = s.devices.iter().map(|d| d.device_id).collect();
    devices.sort_unstable();
    assert_eq!(devices, [11, 20], "every member device but mine");
    assert!(
        s.devices.iter().all(|d| d.body.is_none()),
        "one shared body"
    );
    assert_no_plaintext(&s, "hi group");
    let env = tern_proto::e2ee::Envelope::decode(s.body.as_slice()).expect("envelope");
    assert!(matches!(
        env.kind,
        Some(tern_proto::e2ee::envelope::Kind::Megolm(_))
    ));
    let sent = frames::Sent {
        client_msg_id: s.client_msg_id,
        seq: 2,
        server_ts_ms: 60,
    };
    send(&mut ws, f.request_id, server_frame::Kind::Sent(sent)).await;
    let receipt = frames::Receipt {
        conversation: Some(frames::Peer::group(GROUP)),
        reader_user: BOB,
        reader_username: "bob".into(),
        kind: frames::ReceiptKind::Read as i32,
        up_to_seq: 2,
        server_ts_ms: 70,
        all_delivered_up_to: 2,
        all_read_up_to: 2,
        ..Default::default()
    };
    let ev = frames::Event {
        mailbox_seq: 2,
        kind: Some(event::Kind::Receipt(receipt)),
    };
    send(&mut ws, 0, server_frame::Kind::Event(ev)).await;
    expect_ack(&recv(&mut ws).await, 2);

    let f = recv(&mut ws).await;
    match &f.kind {
        Some(client_frame::Kind::Read(r)) => {
            assert_eq!(r.conversation, Some(frames::Peer::group(GROUP)));
            assert_eq!(r.up_to_seq, 1, "up to the latest message not mine");
        }
        other => panic!("expected Read, got {other:?}"),
    }
    send(
        &mut ws,
        f.request_id,
        server_frame::Kind::Done(frames::Done {}),
    )
    .await;
    // Stay until the client closes.
    while let Some(Ok(m)) = ws.next().await {
        if m.is_close() {
            return;
        }
    }
}

async fn refuse(mut ws: Ws) {
    hello(&mut ws).await;
    let err = ServerFrame::error(0, ErrorCode::Unauthorized, "bad token");
    let _ = ws.send(WsMessage::Binary(err.encode_to_vec().into())).await;
    let _ = ws.close(None).await;
}

fn config(server: &str, home: &std::path::Path) -> ClientConfig {
    let mut c = ClientConfig::new(server, home);
    c.reconnect_initial = Duration::from_millis(10);
    c.reconnect_max = Duration::from_millis(50);
    c
}

async fn next_interesting(events: &mut tern_client::EventStream) -> Event {
    loop {
        let e = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("event in time")
            .expect("stream open");
        // The scripted server's bodies are not encrypted: each message is also reported as
        // undecryptable, which these connection tests do not look at.
        if !matches!(e, Event::Connection(_) | Event::DecryptionFailed(_)) {
            return e;
        }
    }
}

#[tokio::test]
async fn drains_dedups_reconnects_and_retries_a_send_until_sent() {
    let server = start(Script::Messaging).await;
    let home = tempfile::tempdir().expect("tempdir");
    let client = Client::open(config(&server, home.path())).expect("open");
    client.login("alice", "password123").await.expect("login");
    let mut events = client.events();
    client.connect().await.expect("connect");
    client.wait_synced().await.expect("synced");

    let send = tokio::spawn({
        let client = client.clone();
        async move { client.send_text("bob", "hi bob").await }
    });
    let sent = tokio::time::timeout(Duration::from_secs(10), send)
        .await
        .expect("sent in time")
        .expect("join")
        .expect("send");
    assert_eq!(sent.seq, 4);
    assert_eq!(sent.conversation, "bob");

    // Events, without connection noise: seq 1, 2, Synced, (reconnect) seq 3 only, Synced,
    // Sent, Receipt — in whatever order Sent and the second Synced interleave.
    let mut seen = Vec::new();
    while seen.len() < 7 {
        let e = next_interesting(&mut events).await;
        seen.push(match e {
            Event::Message(m) => format!("message {}", m.seq.unwrap_or(0)),
            Event::Synced => "synced".into(),
            Event::Sent(s) => format!("sent {}", s.seq),
            Event::Receipt(r) => format!("receipt {} {}", r.kind.as_str(), r.up_to_seq),
            other => format!("{other:?}"),
        });
    }
    assert_eq!(seen[..4], ["message 1", "message 2", "synced", "message 3"]);
    let mut rest = seen[4..].to_vec();
    rest.sort();
    assert_eq!(rest, ["receipt read 4", "sent 4", "synced"]);

    let history = client.history("bob", 10).expect("history");
    let seqs: Vec<_> = history.iter().map(|m| (m.seq, m.outgoing)).collect();
    assert_eq!(
        seqs,
        [
            (Some(1), false),
            (Some(2), false),
            (Some(3), false),
            (Some(4), true)
        ]
    );
    // Received bodies that are not end-to-end encrypted are kept but never shown as text.
    assert!(history[..3].iter().all(|m| m.undecryptable.is_some()));
    assert_eq!(history[3].text, "hi bob");
    assert_eq!(history[3].status, Some(Tick::Read));
    assert_eq!(
        client.sent_status(10).expect("status")[0].status,
        Some(Tick::Read)
    );

    client.close().await;
    assert_eq!(
        client.connection_state(),
        ConnectionState::Closed {
            reason: CloseReason::ClientClosed
        }
    );
    assert!(client.mailbox_cursor().expect("cursor") >= 3);
    // The session survives a restart.
    drop(client);
    let reopened = Client::open(config(&server, home.path())).expect("reopen");
    assert_eq!(reopened.session().map(|s| s.device_id), Some(10));
}

#[tokio::test]
async fn a_refused_token_ends_the_connection_task() {
    let server = start(Script::RefuseToken).await;
    let home = tempfile::tempdir().expect("tempdir");
    let client = Client::open(config(&server, home.path())).expect("open");
    client.login("alice", "password123").await.expect("login");
    let err = client.connect().await.expect_err("refused");
    assert_eq!(err.code(), Some(ErrorCode::Unauthorized));
    assert_eq!(
        client.connection_state(),
        ConnectionState::Closed {
            reason: CloseReason::Unauthorized
        }
    );
    assert!(client.wait_synced().await.is_err());
    assert!(matches!(
        client.send_text("bob", "x").await,
        Err(tern_client::Error::Closed(CloseReason::Unauthorized))
    ));
    assert!(
        client.sent_status(10).expect("status").is_empty(),
        "nothing queued"
    );
}

#[tokio::test]
async fn groups_send_without_devices_and_tick_from_all_watermarks() {
    let server = start(Script::Groups).await;
    let home = tempfile::tempdir().expect("tempdir");
    let client = Client::open(config(&server, home.path())).expect("open");
    client.login("alice", "password123").await.expect("login");
    let info = client
        .create_group("Family", &["Bob", "bob"], false)
        .await
        .expect("create");
    assert_eq!(info.group_id, GROUP);

    let mut events = client.events();
    client.connect().await.expect("connect");
    client.wait_synced().await.expect("synced");
    match next_interesting(&mut events).await {
        Event::Message(m) => {
            assert_eq!(m.conversation, "7");
            assert_eq!(m.group, Some(GROUP));
            assert_eq!(m.text, "alice created the group Family with bob");
            assert!(m.is_system() && !m.outgoing);
        }
        other => panic!("unexpected {other:?}"),
    }

    let sent = client
        .send_group_text(GROUP, "hi group")
        .await
        .expect("send");
    assert_eq!(
        (sent.conversation.as_str(), sent.group, sent.seq),
        ("7", Some(GROUP), 2)
    );
    let receipt = loop {
        if let Event::Receipt(r) = next_interesting(&mut events).await {
            break r;
        }
    };
    assert_eq!((receipt.group, receipt.all_read_up_to), (Some(GROUP), 2));
    let status = client.sent_status(10).expect("status");
    assert_eq!(status.len(), 1, "system messages are not mine to tick");
    assert_eq!(status[0].status, Some(Tick::Read));
    assert_eq!(status[0].group_name.as_deref(), Some("Family"));
    let mine = client
        .sent_message(&sent.client_msg_id)
        .expect("lookup")
        .expect("found");
    assert_eq!(mine.seq, Some(2));

    assert_eq!(client.mark_group_read(GROUP).await.expect("read"), Some(1));
    assert_eq!(client.mark_group_read(GROUP).await.expect("read"), None);
    let history = client.group_history(GROUP, 10).expect("history");
    let texts: Vec<_> = history.iter().map(|m| m.text.as_str()).collect();
    assert_eq!(
        texts,
        ["alice created the group Family with bob", "hi group"]
    );
    assert!(client.history("bob", 10).expect("direct").is_empty());

    let mi = client.message_info(GROUP, 2).await.expect("info");
    assert!(mi.read_by_all && mi.members[0].username == "bob");
    client.close().await;
}
