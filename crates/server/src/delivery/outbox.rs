//! Who holds which device, and the live hand-off of new mailbox entries.
//!
//! The store is the truth; the router is only the fast path. Handing an entry to a connection
//! never blocks and never fails the sender: if the device is not connected here, the entry
//! simply waits in its mailbox. Services depend on the [`Router`] trait, so a cluster router
//! (another node over a bus) plugs in without touching them.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tern_store::{Delivery, DeviceId, MailboxEntry, UserId};
use tokio::sync::Notify;

/// Why the server is closing a connection. Each maps to a WebSocket close code (PROTOCOL.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The outbound queue overflowed (4002).
    SlowConsumer,
    /// The device was removed or logged out (4001).
    Revoked,
    /// A newer connection of the same device took over (4006).
    Replaced,
}

/// The per-connection queue of live entries: bounded, never blocking the producer. When full,
/// the connection is marked for closing instead of dropping an entry silently; the client
/// reconnects and drains the mailbox, which still has everything.
pub struct Outbox {
    id: u64,
    cap: usize,
    inner: Mutex<OutboxInner>,
    notify: Notify,
    /// Woken only when the outbox is closed: a connection blocked writing to a client that
    /// stopped reading learns at once that it is a slow consumer.
    closing: Notify,
}

#[derive(Default)]
struct OutboxInner {
    queue: VecDeque<MailboxEntry>,
    closed: Option<CloseReason>,
}

static NEXT_OUTBOX: AtomicU64 = AtomicU64::new(1);

impl Outbox {
    pub fn new(cap: usize) -> Arc<Outbox> {
        Arc::new(Outbox {
            id: NEXT_OUTBOX.fetch_add(1, Ordering::Relaxed),
            cap,
            inner: Mutex::new(OutboxInner::default()),
            notify: Notify::new(),
            closing: Notify::new(),
        })
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// Queues an entry; on overflow marks the outbox closed as a slow consumer.
    pub fn push(&self, entry: MailboxEntry) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        if inner.closed.is_some() {
            return;
        }
        let overflow = inner.queue.len() >= self.cap;
        if overflow {
            inner.closed = Some(CloseReason::SlowConsumer);
            inner.queue.clear();
            metrics::counter!("tern_slow_consumer_disconnects_total").increment(1);
        } else {
            inner.queue.push_back(entry);
        }
        drop(inner);
        self.notify.notify_one();
        if overflow {
            self.closing.notify_waiters();
        }
    }

    pub fn close(&self, reason: CloseReason) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.closed.get_or_insert(reason);
            inner.queue.clear();
        }
        self.notify.notify_one();
        self.closing.notify_waiters();
    }

    /// Resolves when the outbox is closed, with the reason. Does not take the wake-up that
    /// [`Outbox::wait`] waits for.
    pub async fn closed(&self) -> CloseReason {
        loop {
            let notified = self.closing.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            match self.inner.lock() {
                Ok(inner) => {
                    if let Some(reason) = inner.closed {
                        return reason;
                    }
                }
                Err(_) => return CloseReason::SlowConsumer,
            }
            notified.await;
        }
    }

    /// Waits until something was pushed or the outbox was closed.
    pub async fn wait(&self) {
        self.notify.notified().await
    }

    /// Takes everything queued, or the close reason.
    pub fn take(&self, into: &mut Vec<MailboxEntry>) -> Option<CloseReason> {
        let Ok(mut inner) = self.inner.lock() else {
            return Some(CloseReason::SlowConsumer);
        };
        if let Some(reason) = inner.closed {
            return Some(reason);
        }
        into.extend(inner.queue.drain(..));
        None
    }
}

/// Routes mailbox entries to connected devices.
pub trait Router: Send + Sync + 'static {
    /// Registers a connection for a device, replacing (and closing) an older one.
    fn register(&self, user: UserId, device: DeviceId, outbox: Arc<Outbox>);
    /// Removes a connection if it is still the registered one.
    fn unregister(&self, user: UserId, device: DeviceId, outbox_id: u64);
    /// Hands new entries to the connections holding their devices.
    fn deliver(&self, deliveries: &[Delivery]);
    /// Closes the device's connection, if any.
    fn disconnect(&self, device: DeviceId, reason: CloseReason);
    /// Whether any device of the user is connected.
    fn is_online(&self, user: UserId) -> bool;
}

/// The single-node router: a map from device to its connection's outbox.
#[derive(Default)]
pub struct LocalRouter {
    inner: Mutex<LocalInner>,
}

#[derive(Default)]
struct LocalInner {
    devices: HashMap<DeviceId, Arc<Outbox>>,
    online: HashMap<UserId, u32>,
}

impl Router for LocalRouter {
    fn register(&self, user: UserId, device: DeviceId, outbox: Arc<Outbox>) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        match inner.devices.insert(device, outbox) {
            Some(old) => old.close(CloseReason::Replaced),
            None => *inner.online.entry(user).or_default() += 1,
        }
        metrics::gauge!("tern_connections").set(inner.devices.len() as f64);
    }

    fn unregister(&self, user: UserId, device: DeviceId, outbox_id: u64) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        if inner
            .devices
            .get(&device)
            .is_some_and(|o| o.id() == outbox_id)
        {
            inner.devices.remove(&device);
            if let Some(n) = inner.online.get_mut(&user) {
                *n -= 1;
                if *n == 0 {
                    inner.online.remove(&user);
                }
            }
        }
        metrics::gauge!("tern_connections").set(inner.devices.len() as f64);
    }

    fn deliver(&self, deliveries: &[Delivery]) {
        let Ok(inner) = self.inner.lock() else { return };
        for d in deliveries {
            if let Some(outbox) = inner.devices.get(&d.device) {
                outbox.push(d.entry.clone());
            }
        }
    }

    fn disconnect(&self, device: DeviceId, reason: CloseReason) {
        let Ok(inner) = self.inner.lock() else { return };
        if let Some(outbox) = inner.devices.get(&device) {
            outbox.close(reason);
        }
    }

    fn is_online(&self, user: UserId) -> bool {
        self.inner
            .lock()
            .map(|i| i.online.contains_key(&user))
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc as StdArc;
    use tern_store::{Conversation, MailboxItem, ReceiptKind, ReceiptRecord, UserRef};

    fn entry(mseq: u64) -> MailboxEntry {
        let u = UserRef {
            id: 1,
            username: "a".into(),
        };
        MailboxEntry {
            mseq,
            item: MailboxItem::Receipt(StdArc::new(ReceiptRecord {
                conversation: Conversation::Direct {
                    lo: u.clone(),
                    hi: u,
                },
                reader: 1,
                reader_username: "a".into(),
                kind: ReceiptKind::Read,
                up_to_seq: 1,
                all_delivered_up_to: 1,
                all_read_up_to: 1,
                ts_ms: 0,
            })),
        }
    }

    #[test]
    fn overflow_closes_instead_of_dropping() {
        let o = Outbox::new(2);
        o.push(entry(1));
        o.push(entry(2));
        let mut got = Vec::new();
        assert_eq!(o.take(&mut got), None);
        assert_eq!(got.len(), 2);
        o.push(entry(3));
        o.push(entry(4));
        o.push(entry(5));
        assert_eq!(o.take(&mut got), Some(CloseReason::SlowConsumer));
    }

    #[tokio::test]
    async fn closing_wakes_a_blocked_writer_without_taking_the_queue_wakeup() {
        let o = Outbox::new(1);
        let waiter = tokio::spawn({
            let o = o.clone();
            async move { o.closed().await }
        });
        tokio::task::yield_now().await;
        o.push(entry(1));
        o.push(entry(2)); // overflow
        let reason = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("join");
        assert_eq!(reason, CloseReason::SlowConsumer);
        // The main loop's wake-up is still there.
        tokio::time::timeout(std::time::Duration::from_secs(5), o.wait())
            .await
            .expect("queue wake-up kept");
    }

    #[test]
    fn register_replaces_and_tracks_online() {
        let r = LocalRouter::default();
        let (a, b) = (Outbox::new(4), Outbox::new(4));
        r.register(7, 70, a.clone());
        assert!(r.is_online(7));
        r.register(7, 70, b.clone());
        let mut v = Vec::new();
        assert_eq!(a.take(&mut v), Some(CloseReason::Replaced));
        r.unregister(7, 70, a.id());
        assert!(
            r.is_online(7),
            "stale unregister must not remove the new connection"
        );
        r.unregister(7, 70, b.id());
        assert!(!r.is_online(7));
    }
}
