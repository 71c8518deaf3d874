//! Which devices a `Send` must address: every current device of the recipient plus my own
//! other devices (PROTOCOL.md §4.1). Lists are fetched over HTTP and cached in memory; a
//! `device_mismatch` answer invalidates them, so the next attempt fetches fresh ones.

use std::collections::{BTreeSet, HashMap};

use crate::error::Error;
use crate::http::Http;

/// Recipients whose device lists are cached at most; past this the cache starts over.
const MAX_CACHED_USERS: usize = 1024;

#[derive(Debug, Default)]
pub(crate) struct Directory {
    users: HashMap<u64, Vec<u64>>,
    own: Option<Vec<u64>>,
}

impl Directory {
    pub fn cached(&self, peer_user: u64) -> Option<(Vec<u64>, Vec<u64>)> {
        Some((self.users.get(&peer_user)?.clone(), self.own.clone()?))
    }

    pub fn put_user(&mut self, user_id: u64, devices: Vec<u64>) {
        if self.users.len() >= MAX_CACHED_USERS && !self.users.contains_key(&user_id) {
            self.users.clear();
        }
        self.users.insert(user_id, devices);
    }

    pub fn put_own(&mut self, devices: Vec<u64>) {
        self.own = Some(devices);
    }

    pub fn invalidate(&mut self, peer_user: u64) {
        self.users.remove(&peer_user);
        self.own = None;
    }

    pub fn invalidate_own(&mut self) {
        self.own = None;
    }

    pub fn clear(&mut self) {
        *self = Directory::default();
    }
}

/// The set to address: recipient's devices ∪ my devices, minus the sending device.
pub(crate) fn addressed(recipient: &[u64], own: &[u64], my_device: u64) -> Vec<u64> {
    let set: BTreeSet<u64> = recipient
        .iter()
        .chain(own)
        .copied()
        .filter(|d| *d != my_device)
        .collect();
    set.into_iter().collect()
}

/// Fetches both lists; the recipient's user id comes back too, to check it still is the peer.
pub(crate) async fn fetch(
    http: &Http,
    token: &str,
    peer_username: &str,
) -> Result<(u64, Vec<u64>, Vec<u64>), Error> {
    let (peer, own) = tokio::join!(http.user_devices(token, peer_username), http.devices(token));
    let peer = peer?;
    let own = own?.into_iter().map(|d| d.device_id).collect();
    Ok((peer.user_id, peer.devices, own))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_recipient_and_own_other_devices() {
        assert_eq!(addressed(&[5, 6], &[1, 2], 1), [2, 5, 6]);
        // Note to self: recipient devices are my own devices.
        assert_eq!(addressed(&[1, 2, 3], &[1, 2, 3], 2), [1, 3]);
        // A lone device writing to itself addresses nobody.
        assert!(addressed(&[1], &[1], 1).is_empty());
    }

    #[test]
    fn invalidation_forgets_both_lists() {
        let mut d = Directory::default();
        d.put_user(9, vec![90]);
        d.put_own(vec![1]);
        assert_eq!(d.cached(9), Some((vec![90], vec![1])));
        d.invalidate(9);
        assert_eq!(d.cached(9), None);
    }
}
