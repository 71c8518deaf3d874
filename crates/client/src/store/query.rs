//! Reading the local history. Ticks are not stored per message: a row is joined with its
//! conversation's watermarks and the tick derived ([`Tick::derive`]), so one receipt updates
//! one row however many messages it covers. System messages are decoded here, so their text
//! is always the current rendering of the stored event.

use rusqlite::{Connection, OptionalExtension, Row, params};

use super::{Conv, LocalStore, limit_param};

/// A conversation as apps name it: a peer's username, or a group id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ConvName<'a> {
    Direct(&'a str),
    Group(u64),
}
use crate::content;
use crate::error::Error;
use crate::group_event::GroupChange;
use crate::types::{StoredMessage, Tick};

const SELECT_MESSAGE: &str = "SELECT m.conv_kind, m.conv_id, m.conv_name, m.seq,
    m.sender_username, m.sender_user, m.outgoing, m.client_msg_id, m.body, m.server_ts_ms,
    m.failed IS NOT NULL, COALESCE(w.delivered_up_to, 0), COALESCE(w.read_up_to, 0), m.system,
    g.name, m.undecryptable
    FROM messages m
    LEFT JOIN watermarks w ON w.conv_kind = m.conv_kind AND w.conv_id = m.conv_id
    LEFT JOIN groups g ON m.conv_kind = 1 AND g.group_id = m.conv_id";

/// Newest first (pending ones first of all), as the LIMIT must keep the latest.
const NEWEST_FIRST: &str = "ORDER BY m.seq IS NULL DESC, m.seq DESC, m.id DESC LIMIT ?3";

impl LocalStore {
    /// The last `limit` messages of the direct conversation with `username`, oldest first
    /// (pending ones last).
    pub fn history(&self, username: &str, limit: usize) -> Result<Vec<StoredMessage>, Error> {
        let conn = self.lock();
        let sql =
            format!("{SELECT_MESSAGE} WHERE m.conv_kind = ?1 AND m.conv_name = ?2 {NEWEST_FIRST}");
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map(
            params![Conv::DIRECT, username, limit_param(limit)],
            message_from_row,
        )?;
        let mut out: Vec<StoredMessage> = rows.collect::<Result<_, _>>()?;
        out.reverse();
        Ok(out)
    }

    /// The last `limit` messages of a conversation, oldest first (pending ones last).
    pub fn conversation(&self, conv: Conv, limit: usize) -> Result<Vec<StoredMessage>, Error> {
        let conn = self.lock();
        let sql =
            format!("{SELECT_MESSAGE} WHERE m.conv_kind = ?1 AND m.conv_id = ?2 {NEWEST_FIRST}");
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map(
            params![conv.kind(), conv.id(), limit_param(limit)],
            message_from_row,
        )?;
        let mut out: Vec<StoredMessage> = rows.collect::<Result<_, _>>()?;
        out.reverse();
        Ok(out)
    }

    /// My last `limit` outgoing messages (from any of my devices, direct and group), oldest
    /// first, with ticks.
    pub fn sent_status(&self, limit: usize) -> Result<Vec<StoredMessage>, Error> {
        let conn = self.lock();
        let sql = format!("{SELECT_MESSAGE} WHERE m.outgoing = 1 ORDER BY m.id DESC LIMIT ?1");
        let mut stmt = conn.prepare(&sql)?;
        let rows = stmt.query_map(params![limit_param(limit)], message_from_row)?;
        let mut out: Vec<StoredMessage> = rows.collect::<Result<_, _>>()?;
        out.reverse();
        Ok(out)
    }

    /// One of my messages (from any of my devices) by its client_msg_id.
    pub fn sent_by_id(&self, client_msg_id: &str) -> Result<Option<StoredMessage>, Error> {
        let conn = self.lock();
        let sql = format!(
            "{SELECT_MESSAGE} WHERE m.client_msg_id = ?1 AND m.outgoing = 1
             ORDER BY m.id DESC LIMIT 1"
        );
        let mut stmt = conn.prepare(&sql)?;
        let mut rows = stmt.query_map([client_msg_id], message_from_row)?;
        Ok(rows.next().transpose()?)
    }

    /// The message with `seq` in a conversation, if it is stored here.
    pub fn message_at(&self, conv: ConvName<'_>, seq: u64) -> Result<Option<StoredMessage>, Error> {
        let conn = self.lock();
        let found = match conv {
            ConvName::Direct(username) => conn.query_row(
                &format!(
                    "{SELECT_MESSAGE} WHERE m.conv_kind = ?1 AND m.conv_name = ?2 AND m.seq = ?3"
                ),
                params![Conv::DIRECT, username, seq],
                message_from_row,
            ),
            ConvName::Group(id) => conn.query_row(
                &format!(
                    "{SELECT_MESSAGE} WHERE m.conv_kind = ?1 AND m.conv_id = ?2 AND m.seq = ?3"
                ),
                params![Conv::GROUP, id, seq],
                message_from_row,
            ),
        };
        Ok(found.optional()?)
    }

    /// The highest seq of a message not written by me (other people's and system messages),
    /// and how far I have read.
    pub fn read_position(&self, conv: Conv) -> Result<(Option<u64>, u64), Error> {
        let conn = self.lock();
        let latest: Option<u64> = conn.query_row(
            "SELECT MAX(seq) FROM messages WHERE conv_kind = ?1 AND conv_id = ?2 AND outgoing = 0",
            params![conv.kind(), conv.id()],
            |r| r.get(0),
        )?;
        let read: Option<u64> = conn.query_row(
            "SELECT MAX(my_read_up_to) FROM watermarks WHERE conv_kind = ?1 AND conv_id = ?2",
            params![conv.kind(), conv.id()],
            |r| r.get(0),
        )?;
        Ok((latest, read.unwrap_or(0)))
    }
}

pub(super) fn message_by_rowid(conn: &Connection, id: i64) -> rusqlite::Result<StoredMessage> {
    conn.query_row(
        &format!("{SELECT_MESSAGE} WHERE m.id = ?1"),
        [id],
        message_from_row,
    )
}

fn message_from_row(r: &Row<'_>) -> rusqlite::Result<StoredMessage> {
    let conv = Conv::from_row(r.get(0)?, r.get(1)?);
    let conv_name: String = r.get(2)?;
    let seq: Option<u64> = r.get(3)?;
    let outgoing: bool = r.get(6)?;
    let body: Vec<u8> = r.get(8)?;
    let failed: bool = r.get(10)?;
    let delivered: u64 = r.get(11)?;
    let read: u64 = r.get(12)?;
    let system: bool = r.get(13)?;
    let current_group_name: Option<String> = r.get(14)?;
    let status = outgoing.then(|| Tick::derive(seq, failed, delivered, read));
    let from: String = r.get(4)?;
    let sender_user: u64 = r.get(5)?;
    // A system body this SDK cannot decode still is a system message: an unknown change by
    // its sender, so apps never show server bytes as someone's text.
    let change = system.then(|| {
        GroupChange::decode(&body).unwrap_or_else(|| GroupChange::unknown(sender_user, &from))
    });
    let undecryptable: Option<String> = r.get(15)?;
    let text = match (&change, &undecryptable) {
        (Some(c), _) => c.describe(),
        (None, Some(why)) => format!("[could not decrypt this message: {why}]"),
        (None, None) => content::render(&body),
    };
    let (peer_user, group_name) = match conv {
        Conv::Direct(p) => (p, None),
        Conv::Group(_) => (
            0,
            current_group_name
                .or_else(|| Some(conv_name.clone()))
                .filter(|n| !n.is_empty()),
        ),
    };
    Ok(StoredMessage {
        conversation: conv.public_name(&conv_name),
        peer_user,
        group: conv.group(),
        group_name,
        seq,
        from,
        sender_user,
        outgoing,
        client_msg_id: r.get(7)?,
        text,
        system: change,
        body,
        sent_at_ms: r.get(9)?,
        status,
        undecryptable,
    })
}
