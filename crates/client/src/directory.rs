//! Which devices a `Send` must address, with their identity keys (PROTOCOL.md §4.1, §7, §9):
//! for a user, every current device of the recipient plus my own other devices; for a group,
//! every member device but mine. Lists are fetched over HTTP (`/v1/users/{name}/keys`,
//! `/v1/groups/{id}/keys`) and cached in memory; a `device_mismatch` answer invalidates them,
//! so the next attempt fetches fresh ones. The server checks the set on every send, so a stale
//! cache costs one retry, never a device left out.

use std::collections::HashMap;

use tern_proto::http::UserKeys;

/// Users (and groups) whose device lists are cached at most; past this the cache starts over.
const MAX_CACHED: usize = 1024;

#[derive(Debug, Default)]
pub(crate) struct Directory {
    users: HashMap<u64, UserKeys>,
    groups: HashMap<u64, Vec<UserKeys>>,
}

impl Directory {
    pub fn user_by_name(&self, username: &str) -> Option<UserKeys> {
        self.users
            .values()
            .find(|k| k.username == username)
            .cloned()
    }

    pub fn put_user(&mut self, keys: UserKeys) {
        if self.users.len() >= MAX_CACHED && !self.users.contains_key(&keys.user_id) {
            self.users.clear();
        }
        self.users.insert(keys.user_id, keys);
    }

    pub fn group(&self, group_id: u64) -> Option<Vec<UserKeys>> {
        self.groups.get(&group_id).cloned()
    }

    pub fn put_group(&mut self, group_id: u64, members: Vec<UserKeys>) {
        if self.groups.len() >= MAX_CACHED && !self.groups.contains_key(&group_id) {
            self.groups.clear();
        }
        self.groups.insert(group_id, members);
    }

    /// Forgets a user's devices (and mine: either side may have changed).
    pub fn invalidate(&mut self, user_id: u64, me: u64) {
        self.users.remove(&user_id);
        self.users.remove(&me);
    }

    pub fn invalidate_group(&mut self, group_id: u64) {
        self.groups.remove(&group_id);
    }

    /// My own device list changed: every list that includes my devices is stale.
    pub fn invalidate_own(&mut self) {
        self.clear();
    }

    pub fn clear(&mut self) {
        *self = Directory::default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(user_id: u64) -> UserKeys {
        UserKeys {
            user_id,
            username: format!("u{user_id}"),
            devices: Vec::new(),
        }
    }

    #[test]
    fn invalidation_forgets_the_user_and_me() {
        let mut d = Directory::default();
        d.put_user(keys(9));
        d.put_user(keys(1));
        d.put_user(keys(5));
        d.invalidate(9, 1);
        assert!(d.user_by_name("u9").is_none());
        assert!(d.user_by_name("u1").is_none());
        assert!(d.user_by_name("u5").is_some());
        d.put_group(3, vec![keys(9)]);
        d.invalidate_own();
        assert!(d.group(3).is_none());
    }
}
