//! Devices driven through the SDK against a test server: each a `Client` with its own profile
//! directory, reconnecting quickly.

use std::time::Duration;

use tern_client::{Client, ClientConfig, Event, EventStream};

pub const PASSWORD: &str = "correct horse";
/// Bound on reaching `Synced`, and on waiting for an event.
const SYNC_WAIT: Duration = Duration::from_secs(20);

pub struct Device {
    pub client: Client,
    pub home: tempfile::TempDir,
}

/// A fresh profile for the server at `url` (not logged in).
pub fn open(url: &str) -> Device {
    let home = tempfile::tempdir().expect("home");
    let mut config = ClientConfig::new(url, home.path());
    config.reconnect_initial = Duration::from_millis(50);
    config.reconnect_max = Duration::from_millis(500);
    Device {
        client: Client::open(config).expect("open"),
        home,
    }
}

/// A new account's first device.
pub async fn register(url: &str, name: &str) -> Device {
    let d = open(url);
    d.client.register(name, PASSWORD).await.expect("register");
    d
}

/// Another device of an existing account.
pub async fn login(url: &str, name: &str) -> Device {
    let d = open(url);
    d.client.login(name, PASSWORD).await.expect("login");
    d
}

/// Connects and waits until the mailbox is drained.
pub async fn online(d: &Device) {
    d.client.connect().await.expect("connect");
    tokio::time::timeout(SYNC_WAIT, d.client.wait_synced())
        .await
        .expect("synced in time")
        .expect("synced");
}

/// Waits (bounded) for the first event `f` accepts.
pub async fn until<T>(events: &mut EventStream, mut f: impl FnMut(&Event) -> Option<T>) -> T {
    tokio::time::timeout(SYNC_WAIT, async {
        loop {
            let e = events.next().await.expect("event stream open");
            if let Some(t) = f(&e) {
                return t;
            }
        }
    })
    .await
    .expect("event in time")
}
