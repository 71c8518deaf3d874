//! System messages of groups, decoded for apps.
//!
//! Every membership or settings change of a group is a message of its own (`kind: SYSTEM`) in
//! the group's sequence, whose body the server wrote as an encoded `GroupEvent` (PROTOCOL.md
//! §7). The local store keeps the raw body like any other; it is decoded when read, into a
//! [`GroupChange`] with a human sentence ("alice added bob, carol") that becomes the message's
//! `text`, so an app that only shows texts still shows something sensible.

use prost::Message as _;
use serde::Serialize;
use tern_proto::frames;

/// What happened to a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupAction {
    Created,
    Added,
    Removed,
    Left,
    Promoted,
    Demoted,
    Renamed,
    SettingsChanged,
    Described,
    /// An action this SDK does not know (a newer server).
    Unknown,
}

impl GroupAction {
    pub fn as_str(self) -> &'static str {
        match self {
            GroupAction::Created => "created",
            GroupAction::Added => "added",
            GroupAction::Removed => "removed",
            GroupAction::Left => "left",
            GroupAction::Promoted => "promoted",
            GroupAction::Demoted => "demoted",
            GroupAction::Renamed => "renamed",
            GroupAction::SettingsChanged => "settings_changed",
            GroupAction::Described => "described",
            GroupAction::Unknown => "unknown",
        }
    }

    fn from_wire(action: i32) -> GroupAction {
        match frames::GroupAction::try_from(action) {
            Ok(frames::GroupAction::Created) => GroupAction::Created,
            Ok(frames::GroupAction::Added) => GroupAction::Added,
            Ok(frames::GroupAction::Removed) => GroupAction::Removed,
            Ok(frames::GroupAction::Left) => GroupAction::Left,
            Ok(frames::GroupAction::Promoted) => GroupAction::Promoted,
            Ok(frames::GroupAction::Demoted) => GroupAction::Demoted,
            Ok(frames::GroupAction::Renamed) => GroupAction::Renamed,
            Ok(frames::GroupAction::SettingsChanged) => GroupAction::SettingsChanged,
            Ok(frames::GroupAction::Described) => GroupAction::Described,
            Ok(frames::GroupAction::Unspecified) | Err(_) => GroupAction::Unknown,
        }
    }
}

/// A user named in a group change.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct GroupUser {
    pub user_id: u64,
    pub username: String,
}

/// A decoded system message: who changed what in a group.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct GroupChange {
    pub action: GroupAction,
    /// Who did it (for `Left`, who left).
    pub actor: GroupUser,
    /// Who it was done to: added, removed, promoted or demoted members (the creator's first
    /// members for `Created`; the actor itself for `Left`).
    pub targets: Vec<GroupUser>,
    /// The group's name after the change.
    pub name: String,
    /// Whether every member may add members, after the change.
    pub members_can_add: bool,
    /// The group's description after the change.
    pub description: String,
}

impl GroupChange {
    /// Decodes a system message's body; `None` if it is not a `GroupEvent`.
    pub fn decode(body: &[u8]) -> Option<GroupChange> {
        let ev = frames::GroupEvent::decode(body).ok()?;
        Some(GroupChange::from_wire(&ev))
    }

    pub(crate) fn from_wire(ev: &frames::GroupEvent) -> GroupChange {
        let user = |u: &frames::UserRef| GroupUser {
            user_id: u.user_id,
            username: u.username.clone(),
        };
        GroupChange {
            action: GroupAction::from_wire(ev.action),
            actor: ev.actor.as_ref().map(user).unwrap_or(GroupUser {
                user_id: 0,
                username: String::new(),
            }),
            targets: ev.targets.iter().map(user).collect(),
            name: ev.name.clone(),
            members_can_add: ev.members_can_add,
            description: ev.description.clone(),
        }
    }

    /// A change this SDK cannot read (an undecodable body), attributed to the message's sender.
    pub(crate) fn unknown(user_id: u64, username: &str) -> GroupChange {
        GroupChange {
            action: GroupAction::Unknown,
            actor: GroupUser {
                user_id,
                username: username.to_owned(),
            },
            targets: Vec::new(),
            name: String::new(),
            members_can_add: false,
            description: String::new(),
        }
    }

    /// The change as a sentence, e.g. "alice added bob, carol" or "bob left".
    pub fn describe(&self) -> String {
        let actor = name_or_someone(&self.actor.username);
        let targets = self
            .targets
            .iter()
            .map(|t| name_or_someone(&t.username))
            .collect::<Vec<_>>()
            .join(", ");
        let targets = if targets.is_empty() {
            "nobody".to_owned()
        } else {
            targets
        };
        match self.action {
            GroupAction::Created if self.targets.is_empty() => {
                format!("{actor} created the group {}", self.name)
            }
            GroupAction::Created => {
                format!("{actor} created the group {} with {targets}", self.name)
            }
            GroupAction::Added => format!("{actor} added {targets}"),
            GroupAction::Removed => format!("{actor} removed {targets}"),
            GroupAction::Left => format!("{actor} left"),
            GroupAction::Promoted => format!("{actor} made {targets} admin"),
            GroupAction::Demoted => format!("{actor} dismissed {targets} as admin"),
            GroupAction::Renamed => format!("{actor} renamed the group to {}", self.name),
            GroupAction::Described if self.description.is_empty() => {
                format!("{actor} removed the group description")
            }
            GroupAction::Described => {
                format!(
                    "{actor} changed the group description to {:?}",
                    self.description
                )
            }
            GroupAction::SettingsChanged if self.members_can_add => {
                format!("{actor} allowed every member to add members")
            }
            GroupAction::SettingsChanged => {
                format!("{actor} allowed only admins to add members")
            }
            GroupAction::Unknown => format!("{actor} changed the group"),
        }
    }

    /// Whether `user` is among the targets.
    pub fn targets_user(&self, user: u64) -> bool {
        self.targets.iter().any(|t| t.user_id == user)
    }
}

fn name_or_someone(name: &str) -> &str {
    if name.is_empty() { "someone" } else { name }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(id: u64, name: &str) -> frames::UserRef {
        frames::UserRef {
            user_id: id,
            username: name.into(),
        }
    }

    fn event(action: frames::GroupAction, targets: &[(u64, &str)]) -> Vec<u8> {
        frames::GroupEvent {
            action: action as i32,
            actor: Some(user(1, "alice")),
            targets: targets.iter().map(|(i, n)| user(*i, n)).collect(),
            name: "Family".into(),
            members_can_add: false,
            description: "our family".into(),
        }
        .encode_to_vec()
    }

    #[test]
    fn system_messages_render_as_sentences() {
        use frames::GroupAction as A;
        let cases = [
            (A::Created, vec![], "alice created the group Family"),
            (
                A::Created,
                vec![(2, "bob")],
                "alice created the group Family with bob",
            ),
            (
                A::Added,
                vec![(2, "bob"), (3, "carol")],
                "alice added bob, carol",
            ),
            (A::Removed, vec![(2, "bob")], "alice removed bob"),
            (A::Left, vec![(1, "alice")], "alice left"),
            (A::Promoted, vec![(2, "bob")], "alice made bob admin"),
            (A::Demoted, vec![(2, "bob")], "alice dismissed bob as admin"),
            (A::Renamed, vec![], "alice renamed the group to Family"),
            (
                A::Described,
                vec![],
                "alice changed the group description to \"our family\"",
            ),
            (
                A::SettingsChanged,
                vec![],
                "alice allowed only admins to add members",
            ),
            (A::Unspecified, vec![], "alice changed the group"),
        ];
        for (action, targets, want) in cases {
            let change = GroupChange::decode(&event(action, &targets)).expect("decodes");
            assert_eq!(change.describe(), want, "{action:?}");
        }
        let change = GroupChange::decode(&event(A::Added, &[(2, "bob")])).expect("decodes");
        assert_eq!(change.action, GroupAction::Added);
        assert!(change.targets_user(2) && !change.targets_user(1));
    }

    #[test]
    fn garbage_is_not_a_group_change() {
        assert_eq!(GroupChange::decode(&[0xff, 0xff, 0xff]), None);
        // An empty body decodes as an empty event: an unknown change by someone.
        let empty = GroupChange::decode(&[]).expect("empty decodes");
        assert_eq!(empty.describe(), "someone changed the group");
    }
}
