//! All output of the CLI, in one place: human text, or with `--json` one JSON object per line
//! (every object has a `type`). Results go to stdout; in human mode, progress (connection
//! state) and errors go to stderr so that stdout stays the data. Write errors (a closed pipe)
//! are ignored rather than turned into panics.
//!
//! Conversations print as the peer's username, or for groups as the group id (the SDK's
//! `conversation` string) with the id again as a number in `group`; a message's author is
//! always `from`. Group-only output (group info, lists, message info) is in `output/groups.rs`.

mod groups;
mod media;

use std::io::Write;

use serde_json::{Value, json};
use tern_client::{
    ConnectionState, DeviceInfo, Event, KeysChanged, LastSeenResponse, PushRegistration, PushWake,
    ReceiptEvent, SafetyNumber, SentMessage, Session, StoredMessage, Tick,
};

/// An error with a fixed code for scripts, raised by the CLI itself (not the SDK).
#[derive(Debug)]
pub struct CliError {
    pub code: &'static str,
    pub message: String,
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for CliError {}

pub fn cli_error(code: &'static str, message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(CliError {
        code,
        message: message.into(),
    })
}

pub struct Printer {
    json: bool,
}

impl Printer {
    pub fn new(json: bool) -> Printer {
        Printer { json }
    }

    fn line(&self, v: &Value) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{v}");
    }

    fn text(&self, s: &str) {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{s}");
    }

    fn note(&self, s: &str) {
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{s}");
    }

    pub fn error(&self, e: &anyhow::Error) {
        let code = error_code(e);
        // The chain ("context: cause") in one line.
        let message = format!("{e:#}");
        if self.json {
            self.line(&json!({"type": "error", "code": code, "message": message}));
        } else {
            self.note(&format!("error: {message}"));
        }
    }

    pub fn session(&self, s: &Session) {
        if self.json {
            self.line(&json!({
                "type": "session", "user_id": s.user_id, "username": s.username,
                "device_id": s.device_id, "server": s.server,
            }));
        } else {
            self.text(&format!(
                "logged in as {} (user {}, device {}) on {}",
                s.username, s.user_id, s.device_id, s.server
            ));
        }
    }

    pub fn logged_out(&self, username: &str) {
        if self.json {
            self.line(&json!({"type": "logged_out", "username": username}));
        } else {
            self.text(&format!("logged out {username}; this device is removed"));
        }
    }

    pub fn message(&self, m: &StoredMessage) {
        if self.json {
            let mut v = json!({
                "type": "message", "conversation": m.conversation, "seq": m.seq, "from": m.from,
                "text": m.text, "sent_at": m.sent_at_ms, "outgoing": m.outgoing,
                "client_msg_id": m.client_msg_id, "system": m.is_system(),
            });
            if let Some(status) = m.status {
                v["status"] = json!(status.as_str());
            }
            if let Some(g) = m.group {
                v["group"] = json!(g);
                v["group_name"] = json!(m.group_name);
            }
            if let Some(change) = &m.system {
                v["event"] = serde_json::to_value(change).unwrap_or_else(|_| json!({}));
            }
            if let Some(media) = m.media() {
                v["media"] = media::media_json(&media);
            }
            self.line(&v);
        } else if m.is_system() {
            let seq = m.seq.map_or_else(|| "-".to_owned(), |s| format!("#{s}"));
            let when = m.sent_at_ms.map_or_else(String::new, format_time);
            self.text(&format!("[{} {seq} {when}] * {}", conv_label(m), m.text));
        } else {
            let seq = m.seq.map_or_else(|| "-".to_owned(), |s| format!("#{s}"));
            let when = m
                .sent_at_ms
                .map_or_else(|| "not yet sent".to_owned(), format_time);
            let tick = m
                .status
                .map(|t| format!("  {}", tick_label(t)))
                .unwrap_or_default();
            // How to fetch a file: `tern download CONVERSATION/SEQ`.
            let fetch = match (m.media(), m.seq) {
                (Some(_), Some(s)) => format!("  (tern download {}/{s})", m.conversation),
                _ => String::new(),
            };
            self.text(&format!(
                "[{} {seq} {when}] {}: {}{tick}{fetch}",
                conv_label(m),
                m.from,
                m.text
            ));
        }
    }

    pub fn receipt(&self, r: &ReceiptEvent) {
        if self.json {
            let mut v = json!({
                "type": "receipt", "conversation": r.conversation, "reader": r.reader,
                "kind": r.kind.as_str(), "seq": r.up_to_seq, "sent_at": r.server_ts_ms,
                "all_delivered_up_to": r.all_delivered_up_to, "all_read_up_to": r.all_read_up_to,
            });
            if let Some(g) = r.group {
                v["group"] = json!(g);
            }
            self.line(&v);
        } else if r.group.is_some() {
            self.text(&format!(
                "[group {}] {} {} up to #{}; delivered to all up to #{}, read by all up to #{}",
                r.conversation,
                r.reader,
                r.kind.as_str(),
                r.up_to_seq,
                r.all_delivered_up_to,
                r.all_read_up_to
            ));
        } else {
            let tick = match r.kind {
                tern_client::ReceiptKind::Delivered => tick_label(Tick::Delivered),
                tern_client::ReceiptKind::Read => tick_label(Tick::Read),
            };
            self.text(&format!(
                "[{}] {} up to #{} by {}: {tick}",
                r.conversation,
                r.kind.as_str(),
                r.up_to_seq,
                r.reader
            ));
        }
    }

    pub fn sent(&self, s: &SentMessage) {
        if self.json {
            self.line(&sent_json(s));
        } else {
            self.text(&sent_line(s, ""));
        }
    }

    pub fn read(&self, conversation: &str, group: Option<u64>, seq: Option<u64>) {
        if self.json {
            let mut v = json!({"type": "read", "conversation": conversation, "seq": seq});
            if let Some(g) = group {
                v["group"] = json!(g);
            }
            self.line(&v);
        } else {
            match seq {
                Some(s) => self.text(&format!("[{conversation}] marked read up to #{s}")),
                None => self.text(&format!("[{conversation}] nothing new to mark read")),
            }
        }
    }

    pub fn connection(&self, state: &ConnectionState) {
        if self.json {
            let mut v = serde_json::to_value(state).unwrap_or_else(|_| json!({}));
            v["type"] = json!("connection");
            self.line(&v);
        } else {
            let s = match state {
                ConnectionState::Connecting => "connecting…".to_owned(),
                ConnectionState::Connected => "connected".to_owned(),
                ConnectionState::Disconnected { retry_in } => {
                    format!("disconnected; retrying in {:.1}s", retry_in.as_secs_f64())
                }
                ConnectionState::Closed { reason } => format!("closed: {reason}"),
            };
            self.note(&format!("-- {s}"));
        }
    }

    pub fn synced(&self, new_events: u64) {
        if self.json {
            self.line(&json!({"type": "synced", "new": new_events}));
        } else {
            self.note(&format!("-- synced ({new_events} new)"));
        }
    }

    pub fn warning(&self, message: &str) {
        if self.json {
            self.line(&json!({"type": "warning", "message": message}));
        } else {
            self.note(&format!("warning: {message}"));
        }
    }

    /// Prints an SDK event; returns whether it counts as a message or receipt.
    pub fn event(&self, e: &Event) -> bool {
        match e {
            Event::Message(m) => self.message(m),
            Event::Receipt(r) => self.receipt(r),
            Event::Sent(s) => self.sent(s),
            Event::Connection(c) => self.connection(c),
            Event::Synced => self.synced(0),
            Event::Lagged(n) => self.warning(&format!("missed {n} events; see `tern history`")),
            Event::Error(m) => self.warning(m),
            Event::KeysChanged(k) => self.keys_changed(k),
            // The message itself is printed too, saying it could not be decrypted.
            Event::DecryptionFailed(_) => {}
        }
        matches!(e, Event::Message(_) | Event::Receipt(_))
    }

    /// A contact's keys changed: a warning, loud if the contact had been verified.
    pub fn keys_changed(&self, k: &KeysChanged) {
        if self.json {
            self.line(&json!({
                "type": "keys_changed", "username": k.username, "user_id": k.user_id,
                "was_verified": k.was_verified,
            }));
        } else if k.was_verified {
            self.note(&format!(
                "!!! WARNING: the keys of {} CHANGED since you verified them. Compare safety \
                 numbers again (`tern verify {}`) before trusting this conversation.",
                k.username, k.username
            ));
        } else {
            self.note(&format!(
                "-- {}'s security code changed (a device was added or removed); `tern verify {}` \
                 to compare",
                k.username, k.username
            ));
        }
    }

    pub fn safety_number(&self, s: &SafetyNumber) {
        if self.json {
            self.line(&json!({
                "type": "safety_number", "username": s.username, "user_id": s.user_id,
                "number": s.number, "devices": s.their_devices, "verified": s.verified,
            }));
        } else {
            let groups: Vec<&str> = s.number.split(' ').collect();
            let mut out = format!("safety number with {}:\n", s.username);
            for row in groups.chunks(4) {
                out.push_str(&format!("    {}\n", row.join(" ")));
            }
            out.push_str(&format!(
                "covers {} device(s) of {}; {}",
                s.their_devices,
                s.username,
                if s.verified {
                    "VERIFIED".to_owned()
                } else {
                    format!(
                        "not verified: compare with {} in person, then `tern verify {} --confirm`",
                        s.username, s.username
                    )
                }
            ));
            self.text(&out);
        }
    }

    pub fn device(&self, d: &DeviceInfo) {
        if self.json {
            self.line(&json!({
                "type": "device", "device_id": d.device_id, "name": d.name,
                "created_at": d.created_at_ms, "last_seen": d.last_seen_ms, "current": d.current,
            }));
        } else {
            let last = d
                .last_seen_ms
                .map_or_else(|| "never".to_owned(), format_time);
            let current = if d.current { "  (this device)" } else { "" };
            self.text(&format!(
                "{:>6}  {:<20}  added {}  last seen {last}{current}",
                d.device_id,
                d.name,
                format_time(d.created_at_ms)
            ));
        }
    }

    pub fn device_removed(&self, id: u64) {
        if self.json {
            self.line(&json!({"type": "device_removed", "device_id": id}));
        } else {
            self.text(&format!("device {id} removed"));
        }
    }

    pub fn last_seen(&self, l: &LastSeenResponse) {
        if self.json {
            self.line(&json!({
                "type": "last_seen", "username": l.username, "visible": l.visible,
                "online": l.online, "last_seen": l.last_seen_ms,
            }));
        } else if !l.visible {
            self.text(&format!("{}: last seen hidden", l.username));
        } else if l.online {
            self.text(&format!("{}: online", l.username));
        } else {
            let when = l
                .last_seen_ms
                .map_or_else(|| "never".to_owned(), format_time);
            self.text(&format!("{}: last seen {when}", l.username));
        }
    }

    /// A push subscription (`None`: none, or just removed).
    pub fn push_registration(&self, r: Option<&PushRegistration>) {
        match (self.json, r) {
            (true, Some(r)) => self.line(&json!({
                "type": "push", "origin": r.origin, "updated_at": r.updated_at_ms,
                "decrypts_here": r.decrypts_here,
            })),
            (true, None) => self.line(&json!({"type": "push", "origin": null})),
            (false, Some(r)) => {
                let keys = if r.decrypts_here {
                    "keys kept here"
                } else {
                    "keys held by the subscriber"
                };
                self.text(&format!(
                    "pushes go to {} (registered {}; {keys})",
                    r.origin,
                    format_time(r.updated_at_ms)
                ));
            }
            (false, None) => self.text("no push subscription"),
        }
    }

    pub fn push_wake(&self, w: &PushWake) {
        if self.json {
            self.line(&json!({"type": "push_wake", "waiting": w.waiting, "id": w.id}));
        } else {
            let s = if w.waiting == 1 { "" } else { "s" };
            self.text(&format!("{} new message{s} waiting", w.waiting));
        }
    }

    pub fn vapid(&self, key: &str) {
        if self.json {
            self.line(&json!({"type": "vapid", "public_key": key}));
        } else {
            self.text(key);
        }
    }

    pub fn privacy(&self, last_seen: &str) {
        if self.json {
            self.line(&json!({"type": "privacy", "last_seen": last_seen}));
        } else {
            self.text(&format!("last seen visible to: {last_seen}"));
        }
    }
}

/// `{"type": "sent", ...}` for a message's tick (text and files alike).
pub(crate) fn sent_json(s: &SentMessage) -> serde_json::Value {
    let mut v = json!({
        "type": "sent", "conversation": s.conversation, "seq": s.seq,
        "client_msg_id": s.client_msg_id, "sent_at": s.server_ts_ms, "status": "sent",
    });
    if let Some(g) = s.group {
        v["group"] = json!(g);
    }
    v
}

/// `[bob #4 2026-…] ✓ sent`, with `what` (e.g. a file's name and size) before the tick.
pub(crate) fn sent_line(s: &SentMessage, what: &str) -> String {
    let conversation = match s.group {
        Some(id) => format!("group {id}"),
        None => s.conversation.clone(),
    };
    format!(
        "[{conversation} #{} {}]{what} {}",
        s.seq,
        format_time(s.server_ts_ms),
        tick_label(Tick::Sent)
    )
}

/// The code a script sees in `{"type":"error","code":...}`.
fn error_code(e: &anyhow::Error) -> &'static str {
    if let Some(c) = e.downcast_ref::<CliError>() {
        return c.code;
    }
    if let Some(c) = e.downcast_ref::<tern_client::Error>() {
        return c.code_str();
    }
    "error"
}

/// How a message's conversation is shown to people: the peer, or `Name (id)` for a group.
fn conv_label(m: &StoredMessage) -> String {
    match (m.group, m.group_name.as_deref()) {
        (Some(id), Some(name)) if !name.is_empty() => format!("{name} ({id})"),
        (Some(id), _) => format!("group {id}"),
        (None, _) => m.conversation.clone(),
    }
}

fn tick_label(t: Tick) -> &'static str {
    match t {
        Tick::Pending => "🕓 pending",
        Tick::Sent => "✓ sent",
        Tick::Delivered => "✓✓ delivered",
        Tick::Read => "✓✓ read",
        Tick::Failed => "✗ failed",
    }
}

/// `2026-11-28 17:20:01Z` from Unix milliseconds (UTC; no time-zone database needed).
pub fn format_time(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_format_in_utc() {
        assert_eq!(format_time(0), "1970-01-01 00:00:00Z");
        assert_eq!(format_time(951_782_400_000), "2000-02-29 00:00:00Z");
        assert_eq!(format_time(1_795_886_401_000), "2026-11-28 17:20:01Z");
    }

    #[test]
    fn error_codes_come_from_the_sdk_or_the_cli() {
        let e = anyhow::Error::new(tern_client::Error::NotLoggedIn);
        assert_eq!(error_code(&e), "not_logged_in");
        assert_eq!(error_code(&cli_error("timeout", "slow")), "timeout");
        assert_eq!(error_code(&anyhow::anyhow!("other")), "error");
    }
}
