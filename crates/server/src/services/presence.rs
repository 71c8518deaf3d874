//! Last seen. Heartbeats update an in-memory map; a background task writes the changes in one
//! batch every `last_seen_flush_secs` (and once more at shutdown), so a heartbeat never costs a
//! database write. Reading applies the privacy rule in [`visible`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tern_proto::http::{LastSeenResponse, Visibility};
use tern_store::{DeviceId, LastSeenUpdate, Store, UserId, UserRecord};
use tokio_util::sync::CancellationToken;

use crate::delivery::Hub;
use crate::error::ApiError;
use crate::services::Clock;

/// Most pending updates kept between flushes; past it, a flush is due at once. One entry per
/// device, so this bounds memory by the number of connected devices anyway.
const MAX_PENDING: usize = 100_000;

/// Activity not yet written: per device (what the flush writes) and per user (what a last-seen
/// read needs, without scanning every device under the lock).
#[derive(Default)]
struct Pending {
    by_device: HashMap<DeviceId, LastSeenUpdate>,
    by_user: HashMap<UserId, i64>,
}

pub struct Presence {
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    clock: Arc<dyn Clock>,
    pending: Mutex<Pending>,
    flush_now: tokio::sync::Notify,
}

/// Whether `viewer` may see `target`'s last seen. WhatsApp's rule, reciprocal: the target's
/// setting must admit the viewer, and the viewer's own setting must admit the target (who does
/// not share, does not see). `contacts` means the two share a direct conversation.
pub fn visible(target: Visibility, viewer: Visibility, contacts: bool, same_user: bool) -> bool {
    if same_user {
        return true;
    }
    let admits = |v: Visibility| match v {
        Visibility::Everyone => true,
        Visibility::Contacts => contacts,
        Visibility::Nobody => false,
    };
    admits(target) && admits(viewer)
}

impl Presence {
    pub fn new(store: Arc<dyn Store>, hub: Arc<Hub>, clock: Arc<dyn Clock>) -> Self {
        Presence {
            store,
            hub,
            clock,
            pending: Mutex::new(Pending::default()),
            flush_now: tokio::sync::Notify::new(),
        }
    }

    /// Records activity of a device (connect, heartbeat, disconnect).
    pub fn touch(&self, user: UserId, device: DeviceId) {
        let at_ms = self.clock.now_ms();
        if let Ok(mut p) = self.pending.lock() {
            p.by_device.insert(
                device,
                LastSeenUpdate {
                    user,
                    device,
                    at_ms,
                },
            );
            p.by_user.insert(user, at_ms);
            if p.by_device.len() >= MAX_PENDING {
                self.flush_now.notify_one();
            }
        }
    }

    /// Writes pending updates in one batch.
    pub async fn flush(&self) {
        let batch: Vec<LastSeenUpdate> = match self.pending.lock() {
            Ok(mut p) => {
                p.by_user.clear();
                p.by_device.drain().map(|(_, u)| u).collect()
            }
            Err(_) => return,
        };
        let n = batch.len();
        if let Err(e) = self.store.save_last_seen(batch).await {
            tracing::warn!(error = %e, updates = n, "could not persist last seen");
        }
    }

    /// Flushes periodically until `shutdown`, then once more.
    pub async fn run_flusher(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.flush().await,
                _ = self.flush_now.notified() => self.flush().await,
                _ = shutdown.cancelled() => break,
            }
        }
    }

    fn pending_for(&self, user: UserId) -> Option<i64> {
        self.pending.lock().ok()?.by_user.get(&user).copied()
    }

    /// What `viewer` may know of `target`'s last seen.
    pub async fn last_seen(
        &self,
        viewer: &UserRecord,
        target: &UserRecord,
    ) -> Result<LastSeenResponse, ApiError> {
        let same = viewer.id == target.id;
        let contacts = if same {
            true
        } else {
            self.store.are_contacts(viewer.id, target.id).await?
        };
        if !visible(
            target.last_seen_privacy,
            viewer.last_seen_privacy,
            contacts,
            same,
        ) {
            return Ok(LastSeenResponse {
                username: target.username.clone(),
                visible: false,
                online: false,
                last_seen_ms: None,
            });
        }
        // Written here and not flushed yet, flushed by any node, or left on another node and
        // not flushed yet: the latest wins.
        let elsewhere = self.hub.presence(target.id).await;
        let latest = [
            target.last_seen_ms,
            self.pending_for(target.id),
            elsewhere.last_seen_ms,
        ]
        .into_iter()
        .flatten()
        .max();
        Ok(LastSeenResponse {
            username: target.username.clone(),
            visible: true,
            online: elsewhere.online,
            last_seen_ms: latest,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Visibility::*;

    #[test]
    fn visibility_table() {
        // (target, viewer, contacts, expected)
        let cases = [
            (Everyone, Everyone, false, true),
            (Everyone, Contacts, false, false), // reciprocal: viewer hides from non-contacts
            (Everyone, Contacts, true, true),
            (Everyone, Nobody, true, false), // reciprocal: viewer shares with nobody
            (Contacts, Everyone, false, false),
            (Contacts, Everyone, true, true),
            (Contacts, Contacts, true, true),
            (Nobody, Everyone, true, false),
        ];
        for (target, viewer, contacts, want) in cases {
            assert_eq!(
                visible(target, viewer, contacts, false),
                want,
                "{target:?} {viewer:?} {contacts}"
            );
        }
        assert!(
            visible(Nobody, Nobody, false, true),
            "one always sees oneself"
        );
    }
}
