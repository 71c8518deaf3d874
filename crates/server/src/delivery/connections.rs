//! The node-local connection table: which of this node's connections holds which device.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tern_store::{Delivery, DeviceId, UserId};

use super::directory::Held;
use super::outbox::{CloseReason, Outbox};

/// The devices connected to this node, each with its connection's outbox.
#[derive(Default)]
pub struct Connections {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    devices: HashMap<DeviceId, (UserId, Arc<Outbox>)>,
    /// Connected devices per user.
    online: HashMap<UserId, u32>,
}

impl Connections {
    /// Registers a connection for a device; an older connection of it here is closed
    /// ([`CloseReason::Replaced`]).
    pub fn register(&self, user: UserId, device: DeviceId, outbox: Arc<Outbox>) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        match inner.devices.insert(device, (user, outbox)) {
            Some((_, old)) => old.close(CloseReason::Replaced),
            None => *inner.online.entry(user).or_default() += 1,
        }
        metrics::gauge!("tern_connections").set(inner.devices.len() as f64);
    }

    /// Removes a connection if it is still the registered one; says whether it was.
    pub fn unregister(&self, user: UserId, device: DeviceId, outbox_id: u64) -> bool {
        let Ok(mut inner) = self.inner.lock() else {
            return false;
        };
        let current = inner
            .devices
            .get(&device)
            .is_some_and(|(_, o)| o.id() == outbox_id);
        if current {
            inner.devices.remove(&device);
            if let Some(n) = inner.online.get_mut(&user) {
                *n -= 1;
                if *n == 0 {
                    inner.online.remove(&user);
                }
            }
        }
        metrics::gauge!("tern_connections").set(inner.devices.len() as f64);
        current
    }

    /// Hands entries to the connections here that hold their devices; with `elsewhere`, adds
    /// the deliveries for devices not connected here to it.
    pub fn push<'a>(
        &self,
        deliveries: &'a [Delivery],
        mut elsewhere: Option<&mut Vec<&'a Delivery>>,
    ) {
        let Ok(inner) = self.inner.lock() else { return };
        for d in deliveries {
            match inner.devices.get(&d.device) {
                Some((_, outbox)) => outbox.push(d.entry.clone()),
                None => {
                    if let Some(rest) = elsewhere.as_deref_mut() {
                        rest.push(d);
                    }
                }
            }
        }
    }

    /// Tells the device's connection here, if any, that its mailbox holds entries up to `mseq`.
    pub fn wake(&self, device: DeviceId, mseq: u64) {
        let Ok(inner) = self.inner.lock() else { return };
        if let Some((_, outbox)) = inner.devices.get(&device) {
            outbox.wake(mseq);
        }
    }

    /// Has every connection here re-read its mailbox (after signals may have been lost).
    pub fn wake_all(&self) {
        let Ok(inner) = self.inner.lock() else { return };
        for (_, outbox) in inner.devices.values() {
            outbox.wake(u64::MAX);
        }
    }

    /// Every connection here.
    pub fn held(&self) -> Vec<Held> {
        let Ok(inner) = self.inner.lock() else {
            return Vec::new();
        };
        inner
            .devices
            .iter()
            .map(|(&device, (user, outbox))| Held {
                user: *user,
                device,
                conn: outbox.id(),
            })
            .collect()
    }

    /// Closes the device's connection here, if any (only `outbox_id`'s, when given).
    pub fn close(&self, device: DeviceId, outbox_id: Option<u64>, reason: CloseReason) {
        let Ok(inner) = self.inner.lock() else { return };
        if let Some((_, outbox)) = inner.devices.get(&device)
            && outbox_id.is_none_or(|id| id == outbox.id())
        {
            outbox.close(reason);
        }
    }

    /// Whether the device is connected here.
    pub fn holds(&self, device: DeviceId) -> bool {
        self.inner
            .lock()
            .map(|i| i.devices.contains_key(&device))
            .unwrap_or(false)
    }

    /// Whether any device of the user is connected here.
    pub fn is_online(&self, user: UserId) -> bool {
        self.inner
            .lock()
            .map(|i| i.online.contains_key(&user))
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn register_replaces_and_tracks_online() {
        let c = Connections::default();
        let (a, b) = (Outbox::new(4), Outbox::new(4));
        c.register(7, 70, a.clone());
        assert!(c.is_online(7));
        c.register(7, 70, b.clone());
        let mut v = Vec::new();
        assert_eq!(a.take(&mut v), Err(CloseReason::Replaced));
        assert!(
            !c.unregister(7, 70, a.id()),
            "a stale unregister must not remove the new connection"
        );
        assert!(c.is_online(7));
        c.close(70, Some(a.id()), CloseReason::Revoked);
        assert_eq!(b.take(&mut v), Ok(0), "only the named connection is closed");
        assert!(c.unregister(7, 70, b.id()));
        assert!(!c.is_online(7));
    }
}
