//! `ternd` on PostgreSQL when the database fails: unreachable at start (a clear error naming
//! the URL with its password hidden, a non-zero exit), and connections lost while running
//! (requests fail as `unavailable`, nothing acknowledged is lost, the pool reconnects).

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;
use tern_proto::frames::*;

/// Runs `ternd <args>` against a PostgreSQL URL where nothing listens; returns (exit status,
/// stderr).
fn ternd_against_nothing(subcommand: &str) -> (std::process::ExitStatus, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_ternd"))
        .arg(subcommand)
        .args(["--data-dir", &dir.path().display().to_string()])
        .args(["--listen", "127.0.0.1:0"])
        .args(["--set", "storage.backend=postgres"])
        // Port 1 on loopback: refused at once.
        .args([
            "--set",
            "storage.postgres.url=postgres://tern:s3cret-pw@127.0.0.1:1/tern",
        ])
        .args(["--set", "storage.postgres.connect_timeout_secs=2"])
        .env("TERN_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run ternd");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn an_unreachable_database_stops_serve_and_migrate_with_the_url_redacted() {
    for subcommand in ["serve", "migrate"] {
        let (status, stderr) = ternd_against_nothing(subcommand);
        assert!(!status.success(), "{subcommand} must fail: {stderr}");
        assert!(
            stderr.contains("postgres://tern:***@127.0.0.1:1/tern"),
            "{subcommand}: the error names the database: {stderr}"
        );
        assert!(
            !stderr.contains("s3cret-pw"),
            "{subcommand}: the password never appears: {stderr}"
        );
    }
}

/// The backend connections of the server under test are terminated again and again while a
/// sender pipelines messages. Sends caught in flight fail with `unavailable` and the sender
/// retries them with the same client message id; every message is then stored exactly once, in
/// order, each under the seq its `Sent` said, and the server keeps serving on the connections
/// the pool opens anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_connections_lose_nothing_acknowledged() {
    let Some(url) = postgres_url() else {
        eprintln!("skipped: TERN_TEST_POSTGRES is not set");
        return;
    };
    let server = TestServer::start().await;
    let http = server.http();
    let (bob, bob_dev, bob_token) = http.account("bob").await;
    let (_alice, _, alice_token) = http.account("alice").await;
    let app = server
        .state
        .config
        .storage
        .postgres
        .application_name
        .clone();
    let (mut raw, _, _) = Raw::connect(server.addr, &alice_token).await;

    // A terminator kills the server's backend connections every 20 ms while the sender
    // pipelines; the sender goes on until some sends were caught in flight (and answered
    // `unavailable`), at most 3,000 messages.
    let stop = Arc::new(AtomicBool::new(false));
    let terminator = {
        let (stop, url, app) = (stop.clone(), url.clone(), app.clone());
        tokio::spawn(async move {
            let mut terminated = 0;
            while !stop.load(Ordering::Relaxed) {
                terminated += terminate_backends(&url, &app).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            terminated
        })
    };
    let mut acked: HashMap<String, u64> = HashMap::new();
    let mut unavailable = 0;
    let mut next = 0;
    let mut retry: Vec<String> = Vec::new();
    loop {
        let enough = acked.len() >= 300 && unavailable > 0;
        if (enough || next >= 3000) && retry.is_empty() {
            break;
        }
        // Four in flight at a time: retries first, then new ids.
        let mut pending = HashMap::new();
        while pending.len() < 4 {
            let id = match retry.pop() {
                Some(id) => id,
                None if !enough && next < 3000 => {
                    next += 1;
                    format!("m{next:04}")
                }
                None => break,
            };
            let rid = raw.send_text_msg(bob, &id, id.as_bytes(), &[bob_dev]).await;
            pending.insert(rid, id);
        }
        while !pending.is_empty() {
            let f = raw.recv().await;
            let Some(id) = pending.remove(&f.request_id) else {
                continue;
            };
            match f.kind {
                Some(server_frame::Kind::Sent(s)) => {
                    acked.insert(id, s.seq);
                }
                Some(server_frame::Kind::Error(e)) => {
                    assert_eq!(
                        e.code,
                        tern_proto::ErrorCode::Unavailable as i32,
                        "a lost connection is `unavailable`: {e:?}"
                    );
                    unavailable += 1;
                    retry.push(id);
                }
                other => panic!("unexpected answer {other:?}"),
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let terminated = terminator.await.expect("terminator");
    eprintln!(
        "{next} messages, {terminated} connections terminated, {unavailable} sends answered unavailable"
    );
    assert!(
        unavailable > 0,
        "no send was caught by a terminated connection in {next} messages"
    );
    let total = next;

    let (_raw, _, events) = Raw::connect(server.addr, &bob_token).await;
    let got: Vec<(u64, String)> = events
        .iter()
        .filter_map(|e| match &e.kind {
            Some(event::Kind::Message(m)) => Some((m.seq, m.client_msg_id.clone())),
            _ => None,
        })
        .collect();
    let seqs: Vec<u64> = got.iter().map(|g| g.0).collect();
    assert_eq!(
        seqs,
        (1..=got.len() as u64).collect::<Vec<_>>(),
        "once, in order"
    );
    assert_eq!(got.len(), total, "every message stored exactly once");
    for (seq, id) in &got {
        assert_eq!(acked.get(id), Some(seq), "{id}");
    }
}

/// Terminates the PostgreSQL backends whose application name is `app`; how many.
async fn terminate_backends(url: &str, app: &str) -> usize {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let rows = client
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE application_name = $1 AND pid <> pg_backend_pid()",
            &[&app],
        )
        .await
        .expect("terminate");
    tokio::time::sleep(Duration::from_millis(50)).await;
    rows.len()
}
