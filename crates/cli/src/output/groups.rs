//! Output of the group commands: group info (`{"type":"group", "group": ID, ...}`), the
//! list of my groups, leaving, and message info with per-member ticks.

use serde_json::json;
use tern_client::{GroupInfo, GroupSummary, MessageInfo, Tick};

use super::{Printer, format_time, tick_label};

impl Printer {
    /// A group's state: after `group info` and after every change.
    pub fn group(&self, g: &GroupInfo) {
        if self.json {
            let members: Vec<_> = g
                .members
                .iter()
                .map(|m| {
                    json!({
                        "username": m.username, "user_id": m.user_id,
                        "role": m.role.as_str(), "joined_seq": m.joined_seq,
                    })
                })
                .collect();
            self.line(&json!({
                "type": "group", "group": g.group_id, "name": g.name,
                "description": g.description, "members": members,
                "members_can_add": g.members_can_add, "created_at": g.created_at_ms,
                "last_seq": g.last_seq,
            }));
        } else {
            let who_adds = if g.members_can_add {
                "every member can add members"
            } else {
                "only admins can add members"
            };
            self.text(&format!(
                "group {}: {}  ({} members; {who_adds}; created {})",
                g.group_id,
                g.name,
                g.members.len(),
                format_time(g.created_at_ms)
            ));
            if !g.description.is_empty() {
                self.text(&format!("  {}", g.description.replace('\n', "\n  ")));
            }
            let width = g
                .members
                .iter()
                .map(|m| m.username.len())
                .max()
                .unwrap_or(0);
            for m in &g.members {
                self.text(&format!("  {:<width$}  {}", m.username, m.role.as_str()));
            }
        }
    }

    /// A new group: its id alone on stdout in human mode, so `id=$(tern group create ...)`
    /// works; the details go to stderr.
    pub fn group_created(&self, g: &GroupInfo) {
        if self.json {
            self.group(g);
        } else {
            self.text(&g.group_id.to_string());
            self.note(&format!(
                "created group {} ({}) with {} members",
                g.group_id,
                g.name,
                g.members.len()
            ));
        }
    }

    pub fn group_summary(&self, g: &GroupSummary) {
        if self.json {
            self.line(&json!({
                "type": "group_summary", "group": g.group_id, "name": g.name,
                "role": g.role.as_str(), "member_count": g.member_count,
            }));
        } else {
            self.text(&format!(
                "{:>6}  {}  ({}, {} members)",
                g.group_id,
                g.name,
                g.role.as_str(),
                g.member_count
            ));
        }
    }

    pub fn left_group(&self, group: u64) {
        if self.json {
            self.line(&json!({"type": "left", "group": group}));
        } else {
            self.text(&format!("left group {group}"));
        }
    }

    /// Says that a listing is empty (human mode only; JSON prints no lines).
    pub fn note_empty(&self, what: &str) {
        if !self.json {
            self.note(&format!("-- {what}"));
        }
    }

    /// WhatsApp's message info: each member's ticks, then the summary.
    pub fn message_info(&self, i: &MessageInfo) {
        if self.json {
            let members: Vec<_> = i
                .members
                .iter()
                .map(|m| {
                    json!({
                        "username": m.username, "user_id": m.user_id,
                        "delivered": m.delivered, "read": m.read,
                    })
                })
                .collect();
            self.line(&json!({
                "type": "message_info", "group": i.group_id, "seq": i.seq, "members": members,
                "delivered_to_all": i.delivered_to_all, "read_by_all": i.read_by_all,
            }));
        } else {
            self.text(&format!("message {}/{}", i.group_id, i.seq));
            let width = i
                .members
                .iter()
                .map(|m| m.username.len())
                .max()
                .unwrap_or(0);
            for m in &i.members {
                let tick = if m.read {
                    Tick::Read
                } else if m.delivered {
                    Tick::Delivered
                } else {
                    Tick::Sent
                };
                self.text(&format!("  {:<width$}  {}", m.username, tick_label(tick)));
            }
            let yes_no = |b: bool| if b { "yes" } else { "no" };
            self.text(&format!(
                "delivered to all: {}; read by all: {}",
                yes_no(i.delivered_to_all),
                yes_no(i.read_by_all)
            ));
        }
    }
}
