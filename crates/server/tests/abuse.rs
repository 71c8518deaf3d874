//! The abuse limits (SECURITY.md, "Abuse"): what one host without an account, or one
//! account, can make the server spend. Every test runs the real server and attacks it on
//! loopback, from 127.0.0.1, while other clients use it from other loopback addresses.

mod common;

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use common::sdk::{online, register, until};
use common::*;
use serde_json::json;
use tern_client::Event;
use tern_proto::ErrorCode;
use tern_proto::frames::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// 127.0.0.x: every address of 127.0.0.0/8 reaches the loopback interface.
fn lo(x: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, x))
}

/// (peak, current) resident memory of a process in bytes, from /proc.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .expect("field")
            * 1024
    };
    (field("VmHWM:"), field("VmRSS:"))
}

fn code(v: &serde_json::Value) -> Option<&str> {
    v["error"]["code"].as_str()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_concurrent_signups_stay_within_the_hashing_bound() {
    let data = tempfile::tempdir().expect("data");
    let logs = tempfile::tempdir().expect("logs");
    let log = logs.path().join("ternd.log");
    // The production argon2 cost (19 MiB each) and pool; only the per-address limits are
    // lifted, since every request comes from 127.0.0.1.
    let ternd = spawn_ternd_with(
        data.path(),
        "info",
        Some(&log),
        &[
            "rate_limits.registrations_per_hour_per_address=0",
            "connections.max_per_address=0",
        ],
    );
    let pid = ternd.child.id();
    let (_, rss_before) = memory(pid);
    let http = http_for(ternd.addr);
    const N: usize = 300;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..N {
        let (client, base) = (http.client.clone(), http.base.clone());
        tasks.spawn(async move {
            let r = client
                .post(format!("{base}/v1/accounts"))
                .json(&json!({"username": format!("user{i}"), "password": "correct horse"}))
                .send()
                .await
                .expect("every request gets an answer");
            let status = r.status().as_u16();
            let retry = r.headers().get("retry-after").cloned();
            let body: serde_json::Value = r.json().await.expect("json");
            (i, status, retry, body)
        });
    }
    let mut created = Vec::new();
    let mut busy = Vec::new();
    while let Some(r) = tasks.join_next().await {
        let (i, status, retry, body) = r.expect("join");
        match status {
            201 => created.push(i),
            503 => {
                assert_eq!(code(&body), Some("unavailable"), "{body}");
                assert!(retry.is_some(), "a refusal says when to retry");
                busy.push(i);
            }
            other => panic!("unexpected answer {other}: {body}"),
        }
    }
    let elapsed = started.elapsed();
    let (peak, _) = memory(pid);
    let bound = tern_server::auth::PasswordHashing::default().memory_bound_bytes();
    let grew = peak.saturating_sub(rss_before);
    eprintln!(
        "{N} concurrent sign-ups in {elapsed:?}: {} created, {} refused; RSS {} MiB before, peak {} MiB (+{} MiB; hashing bound {} MiB)",
        created.len(),
        busy.len(),
        rss_before >> 20,
        peak >> 20,
        grew >> 20,
        bound >> 20
    );
    assert_eq!(created.len() + busy.len(), N);
    assert!(!created.is_empty() && !busy.is_empty(), "the queue filled");
    // Without the pool, 16 concurrent sign-ups alone took 504 MiB. Allow 64 MiB beyond the
    // workers' buffers for connections, request bodies and the runtime.
    assert!(
        grew <= bound + (64 << 20),
        "peak RSS grew by {} MiB; bound {} MiB + 64",
        grew >> 20,
        bound >> 20
    );
    // The refused ones come back when told and get in; logins work.
    for i in busy {
        let mut tries = 0;
        loop {
            let (s, v) = http
                .post(
                    "/v1/accounts",
                    json!({"username": format!("user{i}"), "password": "correct horse"}),
                    None,
                )
                .await;
            match s {
                201 => break,
                503 if tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                _ => panic!("retry of user{i}: {s} {v}"),
            }
        }
    }
    http.login("user0").await;
    let (s, _) = http
        .post(
            "/v1/sessions",
            json!({"username": "user1", "password": "wrong horse"}),
            None,
        )
        .await;
    assert_eq!(s, 401);
    let text = std::fs::read_to_string(&log).expect("log");
    assert!(
        text.contains("connection limits") && text.contains("descriptors="),
        "the descriptor limit is logged at start:\n{text}"
    );
    assert!(text.contains("password hashing pool"), "{text}");
}

/// What happened to one attacking connection.
#[derive(Debug, PartialEq, Eq)]
enum Fate {
    /// Refused at once with a 503.
    Refused,
    /// Accepted, then closed by the server after `Duration`.
    Shed(Duration),
    /// Still open at the end of the test.
    Held { got: usize },
}

/// Holds a connection from 127.0.0.1, sending `drip` one byte every 500 ms (nothing if
/// empty), until the server ends it or `limit` passes.
async fn attacker(addr: std::net::SocketAddr, drip: &'static [u8], limit: Duration) -> Fate {
    let Ok(mut tcp) = TcpStream::connect(addr).await else {
        return Fate::Refused;
    };
    let opened = Instant::now();
    let mut buf = [0u8; 512];
    let mut got = Vec::new();
    let mut next = 0;
    loop {
        tokio::select! {
            r = tcp.read(&mut buf) => match r {
                Ok(0) | Err(_) => {
                    return if got.starts_with(b"HTTP/1.1 503") {
                        Fate::Refused
                    } else {
                        Fate::Shed(opened.elapsed())
                    };
                }
                Ok(n) => got.extend_from_slice(&buf[..n]),
            },
            _ = tokio::time::sleep(Duration::from_millis(500)), if !drip.is_empty() => {
                if tcp.write_all(&drip[next % drip.len()..][..1]).await.is_err() {
                    return Fate::Shed(opened.elapsed());
                }
                next += 1;
            }
            _ = tokio::time::sleep_until((opened + limit).into()) => return Fate::Held { got: got.len() },
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_and_dripping_connections_are_shed_while_others_chat() {
    const HEADER_TIMEOUT: u64 = 2;
    let srv = TestServer::start_with(|c| {
        c.connections.max_per_address = 50;
        c.connections.header_timeout_secs = HEADER_TIMEOUT;
    })
    .await;
    let addr = srv.addr;
    let limit = Duration::from_secs(HEADER_TIMEOUT + 8);
    // The server's own count of open connections, sampled throughout.
    let limits = srv.state.connection_limits.clone();
    let sampling = tokio_util::sync::CancellationToken::new();
    let sampler = tokio::spawn({
        let (limits, stop) = (limits.clone(), sampling.clone());
        async move {
            let mut most = 0;
            while !stop.is_cancelled() {
                most = most.max(limits.open_from(lo(1)));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            most
        }
    });
    let mut attack = tokio::task::JoinSet::new();
    for i in 0..3000 {
        let drip: &'static [u8] = if i % 3 == 0 {
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: "
        } else {
            b""
        };
        attack.spawn(attacker(addr, drip, limit));
        if i % 200 == 199 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Meanwhile, from another address: sign up, connect and chat.
    let during = Instant::now();
    let http = srv.http_from(lo(2));
    let (s, _) = http.get("/healthz", None).await;
    assert_eq!(s, 200);
    let (_, _, ta) = http.account("alice").await;
    let (bob, bd, tb) = http.account("bob").await;
    let (mut a, _, _) = Raw::greet(Raw::open_from(addr, lo(2)).await, &ta).await;
    let (mut b, _, _) = Raw::greet(Raw::open_from(addr, lo(2)).await, &tb).await;
    for i in 0..20 {
        let rid = a
            .send_text_msg(bob, &format!("m{i}"), b"hello", &[bd])
            .await;
        assert!(matches!(
            a.answer(rid, &mut Vec::new()).await,
            server_frame::Kind::Sent(_)
        ));
        match b.recv().await.kind {
            Some(server_frame::Kind::Event(e)) => {
                assert!(matches!(e.kind, Some(event::Kind::Message(_))));
            }
            other => panic!("bob expected a message, got {other:?}"),
        }
    }
    let chatted = during.elapsed();
    let mut refused = 0;
    let mut shed = Vec::new();
    let mut held = 0;
    while let Some(f) = attack.join_next().await {
        match f.expect("join") {
            Fate::Refused => refused += 1,
            Fate::Shed(d) => shed.push(d),
            Fate::Held { got } => {
                assert_eq!(got, 0, "nothing was ever answered on it");
                held += 1;
            }
        }
    }
    sampling.cancel();
    let most_open = sampler.await.expect("sampler");
    // A connection the client believes open but that the server never accepted (its accept
    // queue overflowed in the burst) costs the server no descriptor; every one it accepted
    // was refused or shed. (One the client gave up on may be accepted just then and closed
    // at once.)
    let mut open_now = limits.open_from(lo(1));
    for _ in 0..100 {
        if open_now == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
        open_now = limits.open_from(lo(1));
    }
    eprintln!(
        "server side: at most {most_open} connections from the attacker open; {open_now} at the end; {held} never accepted"
    );
    assert!(most_open <= 50, "the per-address bound held: {most_open}");
    assert_eq!(open_now, 0, "every attacking connection is gone");
    let slowest = shed.iter().max().copied().unwrap_or_default();
    eprintln!(
        "3000 attacking connections: {refused} refused at once, {} shed (slowest after {slowest:?}); sign-up, 2 connects and 20 messages from another address took {chatted:?}",
        shed.len()
    );
    assert!(
        refused >= 2000,
        "most are over the per-address bound: {refused}"
    );
    assert!(
        slowest <= Duration::from_secs(HEADER_TIMEOUT + 4),
        "shed within the header timeout: {slowest:?}"
    );
    let (_, metrics) = srv.http_from(lo(2)).get_text("/metrics").await;
    assert!(
        metrics.contains("tern_connections_refused_total{reason=\"per_address\"}"),
        "refusals are counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_server_backs_off_and_keeps_serving() {
    let data = tempfile::tempdir().expect("data");
    let logs = tempfile::tempdir().expect("logs");
    let log = logs.path().join("ternd.log");
    // A process limit of 128 descriptors and a connection bound above it: accept() fails
    // with EMFILE long before the bound refuses anything.
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", "ulimit -n 128 && exec \"$0\" \"$@\""])
        .arg(env!("CARGO_BIN_EXE_ternd"));
    ternd_args(
        &mut cmd,
        data.path(),
        &[
            "connections.max_total=1000",
            "connections.max_per_address=0",
            "connections.header_timeout_secs=2",
            "password_hashing.memory_kib=64",
            "password_hashing.iterations=1",
        ],
    );
    let ternd = spawn_ternd_command(cmd, "info", Some(&log));
    let http = http_for(ternd.addr);
    let (_, _, token) = http.account("alice").await;
    let (mut ws, _, _) = Raw::connect(ternd.addr, &token).await;
    // 400 silent connections: far more than the descriptors left.
    let mut attack = tokio::task::JoinSet::new();
    for _ in 0..400 {
        attack.spawn(attacker(ternd.addr, b"", Duration::from_secs(15)));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The connection the server has goes on working while it cannot accept.
    for _ in 0..5 {
        let rid = ws
            .request(client_frame::Kind::Ping(Ping { client_time_ms: 0 }))
            .await;
        assert!(matches!(
            ws.answer(rid, &mut Vec::new()).await,
            server_frame::Kind::Pong(_)
        ));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Attackers are accepted as descriptors come free and shed by the header timeout; none
    // is ever answered anything but a close.
    let (mut shed, mut held) = (0, 0);
    while let Some(f) = attack.join_next().await {
        match f.expect("join") {
            Fate::Shed(_) => shed += 1,
            Fate::Held { got } => {
                assert_eq!(got, 0);
                held += 1;
            }
            Fate::Refused => panic!("the connection bound is above the descriptor limit"),
        }
    }
    eprintln!(
        "400 silent connections against 128 descriptors: {shed} accepted and shed, {held} still waiting in the kernel's queue after 15 s"
    );
    assert!(
        shed > 100,
        "accepting resumed after descriptors came free: {shed}"
    );
    // And the server accepts again.
    let (s, _) = http.get("/healthz", None).await;
    assert_eq!(s, 200);
    let (_, metrics) = http.get_text("/metrics").await;
    assert!(
        metrics.contains("tern_accept_errors_total{reason=\"descriptors\"}"),
        "{metrics}"
    );
    let text = std::fs::read_to_string(&log).expect("log");
    let lines = text.matches("out of file descriptors").count();
    assert!(
        (1..=5).contains(&lines),
        "logged once per episode, not per failure: {lines} lines"
    );
}

#[tokio::test]
async fn signups_are_limited_per_address() {
    let srv =
        TestServer::start_with(|c| c.rate_limits.registrations_per_hour_per_address = 3).await;
    let http = srv.http();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..400 {
        let (client, base) = (http.client.clone(), http.base.clone());
        tasks.spawn(async move {
            let r = client
                .post(format!("{base}/v1/accounts"))
                .json(&json!({"username": format!("spam{i}"), "password": "correct horse"}))
                .send()
                .await
                .expect("answer");
            let retry = r
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            (r.status().as_u16(), retry)
        });
    }
    let mut created = 0;
    while let Some(r) = tasks.join_next().await {
        match r.expect("join") {
            (201, _) => created += 1,
            (429, Some(secs)) => assert!((1..=3600).contains(&secs), "{secs}"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(created, 3, "three an hour from one address");
    // Another address is not affected.
    let (s, v) = srv
        .http_from(lo(2))
        .post(
            "/v1/accounts",
            json!({"username": "honest", "password": "correct horse"}),
            None,
        )
        .await;
    assert_eq!(s, 201, "{v}");
}

#[tokio::test]
async fn behind_a_trusted_proxy_signups_are_limited_per_forwarded_client() {
    // 127.0.0.1 plays the proxy; 127.0.0.2 is a client reaching the node directly.
    let srv = TestServer::start_with(|c| {
        c.rate_limits.registrations_per_hour_per_address = 2;
        c.connections.trusted_proxies = vec!["127.0.0.1".into()];
    })
    .await;
    let proxy = srv.http_from(lo(1));
    let signup = |http: &Http, name: String, forwarded: &'static str| {
        let request = http
            .client
            .post(format!("{}/v1/accounts", http.base))
            .header("x-forwarded-for", forwarded)
            .json(&json!({"username": name, "password": "correct horse"}));
        async move { request.send().await.expect("answer").status().as_u16() }
    };
    let mut seen = Vec::new();
    for i in 0..3 {
        seen.push(signup(&proxy, format!("first{i}"), "203.0.113.5").await);
    }
    assert_eq!(
        seen,
        [201, 201, 429],
        "two an hour for the forwarded client"
    );
    // Another client behind the same proxy, even one claiming the first's address to the
    // left of its own (the proxy appends the address it saw).
    assert_eq!(
        signup(&proxy, "second0".into(), "203.0.113.5, 203.0.113.6").await,
        201
    );
    assert_eq!(signup(&proxy, "second1".into(), "203.0.113.6").await, 201);
    assert_eq!(signup(&proxy, "second2".into(), "203.0.113.6").await, 429);
    // A peer that is not a trusted proxy cannot pick its address: its header is ignored.
    let direct = srv.http_from(lo(2));
    let mut seen = Vec::new();
    for (i, forwarded) in ["198.51.100.1", "198.51.100.2", "198.51.100.3"]
        .into_iter()
        .enumerate()
    {
        seen.push(signup(&direct, format!("direct{i}"), forwarded).await);
    }
    assert_eq!(seen, [201, 201, 429], "counted against 127.0.0.2 itself");
}

#[tokio::test]
async fn failing_on_purpose_does_not_lock_a_user_out() {
    let srv = TestServer::start_with(|c| {
        c.rate_limits.logins_per_minute_per_user_and_address = 3;
        c.rate_limits.logins_per_minute_per_address = 30;
        c.rate_limits.logins_per_hour_per_user = 5;
    })
    .await;
    let home = srv.http_from(lo(2));
    home.account("alice").await; // one successful login from home
    home.account("bob").await;
    let login = |from: u8, user: &'static str, password: &'static str| {
        let http = srv.http_from(lo(from));
        async move {
            http.post(
                "/v1/sessions",
                json!({"username": user, "password": password}),
                None,
            )
            .await
        }
    };
    // An attacker guesses alice's password from ten addresses, three times each.
    let mut wrong = 0;
    let mut limited = 0;
    for from in 10..20 {
        for _ in 0..3 {
            match login(from, "alice", "wrong horse").await {
                (401, _) => wrong += 1,
                (429, v) => {
                    assert_eq!(code(&v), Some("rate_limited"));
                    limited += 1;
                }
                other => panic!("{other:?}"),
            }
        }
    }
    // alice's budget for unknown places is 5 an hour; home spent one before it was known.
    assert_eq!((wrong, limited), (4, 26));
    // alice still logs in from home: a known address never draws on that budget.
    let (s, v) = login(2, "alice", "correct horse").await;
    assert_eq!(s, 201, "the user is not locked out: {v}");
    // A new place must wait (the documented trade-off), and says so.
    let (s, v) = login(30, "alice", "correct horse").await;
    assert_eq!((s, code(&v)), (429, Some("rate_limited")));
    // Other users are not affected by the attack on alice, even from the attacking address.
    let (s, v) = login(10, "bob", "correct horse").await;
    assert_eq!(s, 201, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_are_limited_per_device_and_the_sdk_waits() {
    let srv = TestServer::start_with(|c| {
        c.rate_limits.sends_per_second = 4;
        c.rate_limits.send_burst = 5;
    })
    .await;
    let http = srv.http();
    let (_, _, ta) = http.account("alice").await;
    let (bob, bd, _) = http.account("bob").await;
    let (mut a, _, _) = Raw::connect(srv.addr, &ta).await;
    // 20 pipelined sends: the burst is stored, the rest refused with a retry-after.
    let mut rids = Vec::new();
    for i in 0..20 {
        rids.push(a.send_text_msg(bob, &format!("m{i}"), b"x", &[bd]).await);
    }
    let mut sent = Vec::new();
    let mut refused = 0;
    for rid in rids {
        match a.answer(rid, &mut Vec::new()).await {
            server_frame::Kind::Sent(s) => {
                assert_eq!(refused, 0, "nothing is stored after a refusal in the batch");
                sent.push(s.seq);
            }
            server_frame::Kind::Error(e) => {
                assert_eq!(ErrorCode::from_i32(e.code), Some(ErrorCode::RateLimited));
                assert!(
                    (1..=1000).contains(&e.retry_after_ms),
                    "{}",
                    e.retry_after_ms
                );
                refused += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(sent, vec![1, 2, 3, 4, 5]);
    // Through the SDK, a device sending faster than allowed waits as told: every message
    // arrives, in order.
    let carol = register(&srv.url(), "carol").await;
    let dave = register(&srv.url(), "dave").await;
    online(&carol).await;
    online(&dave).await;
    let mut events = dave.client.events();
    let started = Instant::now();
    for i in 0..15 {
        carol
            .client
            .send_text("dave", &format!("c{i}"))
            .await
            .expect("sent in the end");
    }
    let took = started.elapsed();
    let mut got = Vec::new();
    while got.len() < 15 {
        got.push(
            until(&mut events, |e| match e {
                Event::Message(m) if !m.outgoing => Some(m.text.clone()),
                _ => None,
            })
            .await,
        );
    }
    assert_eq!(got, (0..15).map(|i| format!("c{i}")).collect::<Vec<_>>());
    // 5 at once, then 4 a second: the last of 15 cannot be sent before 2.5 s.
    assert!(took >= Duration::from_millis(2000), "{took:?}");
}

#[tokio::test]
async fn a_full_mailbox_refuses_sends_until_it_drains() {
    let srv = TestServer::start_with(|c| c.mailbox.max_entries = 3).await;
    let http = srv.http();
    let (_, _, ta) = http.account("alice").await;
    let (bob, bd, tb) = http.account("bob").await;
    let (mut a, _, _) = Raw::connect(srv.addr, &ta).await;
    for id in ["m1", "m2", "m3"] {
        let rid = a
            .send_text_msg(bob, id, b"while you were away", &[bd])
            .await;
        assert!(matches!(
            a.answer(rid, &mut Vec::new()).await,
            server_frame::Kind::Sent(_)
        ));
    }
    let rid = a
        .send_text_msg(bob, "m4", b"while you were away", &[bd])
        .await;
    match a.answer(rid, &mut Vec::new()).await {
        server_frame::Kind::Error(e) => {
            assert_eq!(ErrorCode::from_i32(e.code), Some(ErrorCode::MailboxFull));
            assert_eq!(e.retry_after_ms, 60_000);
        }
        other => panic!("{other:?}"),
    }
    // Bob comes back: he gets the three (nothing was dropped), acknowledges them, and the
    // retried message goes through with the next seq.
    let (mut b, _, events) = Raw::connect(srv.addr, &tb).await;
    assert_eq!(events.len(), 3);
    let up_to = events.last().expect("events").mailbox_seq;
    let rid = b.request(client_frame::Kind::Ack(Ack { up_to })).await;
    assert!(matches!(
        b.answer(rid, &mut Vec::new()).await,
        server_frame::Kind::Done(_)
    ));
    let rid = a
        .send_text_msg(bob, "m4", b"while you were away", &[bd])
        .await;
    match a.answer(rid, &mut Vec::new()).await {
        server_frame::Kind::Sent(s) => assert_eq!(s.seq, 4),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_at_once_and_loses_nothing() {
    // A write timeout of a minute: only the overflow can end bob's connection quickly.
    let srv = TestServer::start_with(|c| {
        c.limits.outbound_queue = 8;
        c.limits.send_timeout_secs = 60;
    })
    .await;
    let http = srv.http();
    let (_, _, ta) = http.account("alice").await;
    let (bob, bd, tb) = http.account("bob").await;
    let (mut stalled, _, _) = Raw::greet(Raw::open_small_buffer(srv.addr).await, &tb).await;
    let (mut a, _, _) = Raw::connect(srv.addr, &ta).await;
    // Far more than the kernel buffers hold (up to 4 MiB on the server's side of loopback).
    const N: usize = 600;
    let body = vec![7u8; 15 * 1024];
    for i in 0..N {
        let rid = a.send_text_msg(bob, &format!("m{i}"), &body, &[bd]).await;
        assert!(matches!(
            a.answer(rid, &mut Vec::new()).await,
            server_frame::Kind::Sent(_)
        ));
    }
    let sent = Instant::now();
    while srv.state.hub.is_online(bob).await {
        assert!(
            sent.elapsed() < Duration::from_secs(5),
            "the slow consumer is still connected"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("slow consumer cut {:?} after the last send", sent.elapsed());
    // Bob sees a 4002 close, or (its buffers being full) a reset; either way, not a hang.
    let code = stalled.closed().await;
    assert!(matches!(code, Some(4002) | None), "{code:?}");
    let (_, _, events) = Raw::connect(srv.addr, &tb).await;
    assert_eq!(events.len(), N, "nothing lost");
}

/// Reads from `tcp` until the server closes it (bounded); returns what it said.
async fn read_to_close(tcp: &mut TcpStream, within: Duration) -> String {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(within, tcp.read_to_end(&mut got))
        .await
        .expect("the server ends the request in time");
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_are_cut_and_an_upload_keeps_what_arrived() {
    let srv = TestServer::start_with(|c| {
        c.connections.request_timeout_secs = 1;
        c.connections.body_idle_secs = 1;
    })
    .await;
    // A JSON body dripped a byte at a time: 408 within the request timeout, then closed.
    let mut tcp = TcpStream::connect(srv.addr).await.expect("connect");
    tcp.write_all(
        b"POST /v1/accounts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n{",
    )
    .await
    .expect("head");
    let dripping = tokio::spawn(async move {
        for b in b"\"username\": \"slowpoke\", " {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if tcp.write_all(&[*b]).await.is_err() {
                break;
            }
        }
        tcp
    });
    let started = Instant::now();
    let mut tcp = dripping.await.expect("drip");
    let answer = read_to_close(&mut tcp, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(6));

    // A media upload whose body stalls: cut after the idle time, keeping what arrived.
    let http = srv.http();
    let (_, _, token) = http.account("alice").await;
    let created = http
        .client
        .post(format!("{}/v1/uploads", srv.url()))
        .bearer_auth(&token)
        .header("Tus-Resumable", "1.0.0")
        .header("Upload-Length", "1000")
        .send()
        .await
        .expect("create");
    assert_eq!(created.status().as_u16(), 201);
    let path = created.headers()["location"]
        .to_str()
        .expect("location")
        .to_owned();
    let mut tcp = TcpStream::connect(srv.addr).await.expect("connect");
    let head = format!(
        "PATCH {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nTus-Resumable: 1.0.0\r\nContent-Type: application/offset+octet-stream\r\nUpload-Offset: 0\r\nContent-Length: 1000\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.expect("head");
    tcp.write_all(&[1u8; 400]).await.expect("400 bytes");
    let stalled = Instant::now();
    let answer = read_to_close(&mut tcp, Duration::from_secs(5)).await;
    eprintln!(
        "stalled upload ended after {:?}: {}",
        stalled.elapsed(),
        answer.lines().next().unwrap_or("(closed)")
    );
    let offset = http
        .client
        .head(format!("{}{path}", srv.url()))
        .bearer_auth(&token)
        .header("Tus-Resumable", "1.0.0")
        .send()
        .await
        .expect("head");
    assert_eq!(
        offset.headers()["upload-offset"].to_str().expect("offset"),
        "400",
        "resume where it stalled"
    );
}
