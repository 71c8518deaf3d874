//! The queue between the hub and one connection.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tern_store::MailboxEntry;
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
///
/// Besides entries it carries a wake-up: "the mailbox holds entries up to `mseq`" without the
/// entries themselves (they were committed on another node); the connection reads them from
/// the store.
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
    /// The highest mailbox sequence woken for and not yet taken (0: none).
    woken: u64,
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

    /// Says that the mailbox holds entries up to `mseq`; never overflows (one number).
    pub fn wake(&self, mseq: u64) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        if inner.closed.is_some() || mseq <= inner.woken {
            return;
        }
        inner.woken = mseq;
        drop(inner);
        self.notify.notify_one();
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

    /// Takes everything queued and the highest mailbox sequence woken for (0: none), or the
    /// close reason.
    pub fn take(&self, into: &mut Vec<MailboxEntry>) -> Result<u64, CloseReason> {
        let Ok(mut inner) = self.inner.lock() else {
            return Err(CloseReason::SlowConsumer);
        };
        if let Some(reason) = inner.closed {
            return Err(reason);
        }
        into.extend(inner.queue.drain(..));
        Ok(std::mem::take(&mut inner.woken))
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
        assert_eq!(o.take(&mut got), Ok(0));
        assert_eq!(got.len(), 2);
        o.push(entry(3));
        o.push(entry(4));
        o.push(entry(5));
        assert_eq!(o.take(&mut got), Err(CloseReason::SlowConsumer));
    }

    #[test]
    fn a_wake_up_keeps_the_highest_sequence_until_taken() {
        let o = Outbox::new(2);
        o.wake(5);
        o.wake(3);
        let mut got = Vec::new();
        assert_eq!(o.take(&mut got), Ok(5));
        assert_eq!(o.take(&mut got), Ok(0), "taken once");
        o.wake(9);
        o.close(CloseReason::Replaced);
        assert_eq!(o.take(&mut got), Err(CloseReason::Replaced));
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
}
