//! The writer thread's cache of group fan-out lists: for each group, its members and their
//! devices. A busy group's messages do not read the member list from the database each time.
//!
//! It is exact, not eventually consistent: every change that could make an entry stale
//! (membership, a device added or removed) goes through the same single writer thread and drops
//! the affected entries before the next write runs; a failed commit drops everything.

use std::collections::HashMap;
use std::sync::Arc;

use rusqlite::Connection;

use crate::{DeviceId, StoreError, UserId};

/// Groups cached at most; past it the cache starts over (a simple, strict bound).
const MAX_GROUPS: usize = 4096;

/// A group's members (sorted by user id) with their devices.
#[derive(Debug, Default)]
pub struct Fanout {
    pub members: Vec<(UserId, Vec<DeviceId>)>,
}

impl Fanout {
    pub fn is_member(&self, user: UserId) -> bool {
        self.members
            .binary_search_by_key(&user, |(u, _)| *u)
            .is_ok()
    }

    pub fn devices(&self) -> impl Iterator<Item = (UserId, DeviceId)> + '_ {
        self.members
            .iter()
            .flat_map(|(u, ds)| ds.iter().map(move |d| (*u, *d)))
    }
}

#[derive(Default)]
pub struct WriterCache {
    groups: HashMap<i64, Arc<Fanout>>,
}

impl WriterCache {
    /// The fan-out list of a group conversation, loaded on a miss.
    pub fn fanout(&mut self, c: &Connection, conv: i64) -> Result<Arc<Fanout>, StoreError> {
        if let Some(f) = self.groups.get(&conv) {
            return Ok(f.clone());
        }
        let mut st = c.prepare_cached(
            "SELECT m.user_id, d.id FROM members m LEFT JOIN devices d ON d.user_id = m.user_id
             WHERE m.conversation_id = ?1 ORDER BY m.user_id, d.id",
        )?;
        let rows = st.query_map([conv], |r| {
            Ok((r.get::<_, i64>(0)? as UserId, r.get::<_, Option<i64>>(1)?))
        })?;
        let mut fanout = Fanout::default();
        for row in rows {
            let (user, device) = row?;
            if fanout.members.last().map(|(u, _)| *u) != Some(user) {
                fanout.members.push((user, Vec::new()));
            }
            if let (Some(d), Some((_, ds))) = (device, fanout.members.last_mut()) {
                ds.push(d as DeviceId);
            }
        }
        if self.groups.len() >= MAX_GROUPS {
            self.groups.clear();
        }
        let fanout = Arc::new(fanout);
        self.groups.insert(conv, fanout.clone());
        Ok(fanout)
    }

    /// A group's membership changed.
    pub fn invalidate(&mut self, conv: i64) {
        self.groups.remove(&conv);
    }

    /// A device was added or removed (rare): any group may be affected.
    pub fn clear(&mut self) {
        self.groups.clear();
    }
}
