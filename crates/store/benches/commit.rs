//! The store's batched commit: posting N messages as one device's pipelined batch
//! (`post_messages`, one transaction, one fsync) against N separate concurrent posts (which group
//! commit batches as well), on a real SQLite file with `synchronous=FULL`.

use std::sync::Arc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use tern_store::sqlite::{SqliteOptions, SqliteStore};
use tern_store::*;

struct Fixture {
    store: Arc<SqliteStore>,
    alice: DeviceAuth,
    bob: DeviceAuth,
    _dir: tempfile::TempDir,
}

async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let store =
        SqliteStore::open(&dir.path().join("bench.db"), SqliteOptions::default()).expect("open");
    let mut devs = Vec::new();
    for name in ["alice", "bob"] {
        let user = store.create_user(name, "hash", 0).await.expect("user");
        let device = store
            .create_device(user, "d", name.as_bytes(), 16, 0)
            .await
            .expect("device");
        devs.push(DeviceAuth {
            device_id: device,
            user_id: user,
            username: name.into(),
        });
    }
    let bob = devs.pop().expect("bob");
    let alice = devs.pop().expect("alice");
    Fixture {
        store: Arc::new(store),
        alice,
        bob,
        _dir: dir,
    }
}

fn post(f: &Fixture, id: u64) -> NewMessage {
    NewMessage {
        sender: f.alice.clone(),
        to: Target::User(f.bob.user_id),
        client_msg_id: format!("m{id}"),
        body: vec![7; 64],
        devices: vec![AddressedDevice {
            device: f.bob.device_id,
            body: None,
        }],
        now_ms: 1,
        mailbox: MailboxLimit::UNLIMITED,
    }
}

fn commit(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let f = rt.block_on(fixture());
    let mut next = 0u64;
    let mut g = c.benchmark_group("store commit");
    g.sample_size(20);
    for n in [1u64, 64, 512] {
        g.throughput(Throughput::Elements(n));
        g.bench_function(format!("post_messages batch of {n}"), |b| {
            b.iter_batched(
                || {
                    let posts: Vec<_> = (0..n).map(|i| post(&f, next + i)).collect();
                    next += n;
                    posts
                },
                |posts| rt.block_on(f.store.post_messages(posts)).expect("stored"),
                BatchSize::SmallInput,
            )
        });
        g.bench_function(format!("{n} concurrent post_message"), |b| {
            b.iter_batched(
                || {
                    let posts: Vec<_> = (0..n).map(|i| post(&f, next + i)).collect();
                    next += n;
                    posts
                },
                |posts| {
                    rt.block_on(async {
                        let tasks: Vec<_> = posts
                            .into_iter()
                            .map(|p| {
                                let s = f.store.clone();
                                tokio::spawn(async move { s.post_message(p).await })
                            })
                            .collect();
                        for t in tasks {
                            t.await.expect("task").expect("stored");
                        }
                    })
                },
                BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, commit);
criterion_main!(benches);
