//! Decision logic shared by every backend, free of I/O.

use std::collections::BTreeSet;

use tern_proto::frames::{GroupAction, GroupEvent, UserRef as WireUser};

use crate::{
    DeviceAuth, DeviceId, GroupOp, GroupRecord, MediaHash, MemberRecord, PushClaim, PushRules,
    PushState, PushSubscription, Role, StoreError, UploadRecord, UserId, UserRef, Visibility,
};

/// How every backend stores a last-seen visibility.
pub fn visibility_code(v: Visibility) -> i16 {
    match v {
        Visibility::Everyone => 0,
        Visibility::Contacts => 1,
        Visibility::Nobody => 2,
    }
}

pub fn visibility_from_code(code: i64) -> Visibility {
    match code {
        1 => Visibility::Contacts,
        2 => Visibility::Nobody,
        _ => Visibility::Everyone,
    }
}

/// How every backend stores a member's role.
pub fn role_code(r: Role) -> i16 {
    match r {
        Role::Owner => 2,
        Role::Admin => 1,
        Role::Member => 0,
    }
}

pub fn role_from_code(code: i64) -> Role {
    match code {
        2 => Role::Owner,
        1 => Role::Admin,
        _ => Role::Member,
    }
}

/// A group's name, description and settings: what every group event states after it.
#[derive(Debug, Clone)]
pub struct GroupSettings {
    pub name: String,
    pub description: String,
    pub members_can_add: bool,
}

impl GroupSettings {
    pub fn of(g: &GroupRecord) -> GroupSettings {
        GroupSettings {
            name: g.name.clone(),
            description: g.description.clone(),
            members_can_add: g.members_can_add,
        }
    }
}

/// The system message of a group change by `actor` (encoded, it is the message's body).
pub fn group_event(
    action: GroupAction,
    actor: &DeviceAuth,
    targets: &[UserRef],
    st: &GroupSettings,
) -> GroupEvent {
    let wire = |u: &UserRef| WireUser {
        user_id: u.id,
        username: u.username.clone(),
    };
    GroupEvent {
        action: action as i32,
        actor: Some(WireUser {
            user_id: actor.user_id,
            username: actor.username.clone(),
        }),
        targets: targets.iter().map(wire).collect(),
        name: st.name.clone(),
        members_can_add: st.members_can_add,
        description: st.description.clone(),
    }
}

/// The users an `Add` by a member really adds to `group` (sorted, each once, current members
/// left out): `Invalid` if that is nobody, `GroupFull` past `max` members.
pub fn members_to_add(
    group: &GroupRecord,
    named: &[UserId],
    max: usize,
) -> Result<Vec<UserId>, StoreError> {
    let mut ids = named.to_vec();
    ids.sort_unstable();
    ids.dedup();
    ids.retain(|u| group.role_of(*u).is_none());
    if ids.is_empty() {
        return Err(StoreError::Invalid(
            "everyone named is already a member".into(),
        ));
    }
    if group.members.len() + ids.len() > max {
        return Err(StoreError::GroupFull(max));
    }
    Ok(ids)
}

/// Who owns a group after its owner `leaving` leaves: the longest-standing admin, else the
/// longest-standing member; `None` if nobody is left.
pub fn heir(group: &GroupRecord, leaving: UserId) -> Option<&MemberRecord> {
    group
        .members
        .iter()
        .filter(|m| m.user.id != leaving)
        .min_by_key(|m| (m.role == Role::Member, m.joined_seq, m.user.id))
}

/// Whether an upload may complete as `media` with `size` bytes: not complete yet, of its
/// declared length, and hashing to its declared id if it declared one.
pub fn check_upload_completion(
    up: &UploadRecord,
    media: &MediaHash,
    size: u64,
) -> Result<(), StoreError> {
    if up.media.is_some() {
        return Err(StoreError::Invalid("the upload is already complete".into()));
    }
    if up.length != size {
        return Err(StoreError::Invalid(format!(
            "the upload is {} bytes, not {size}",
            up.length
        )));
    }
    if let Some(expected) = up.expected
        && expected != *media
    {
        return Err(StoreError::Invalid(
            "the upload did not hash to its declared id".into(),
        ));
    }
    Ok(())
}

/// The id of the direct conversation of two users, computed from the ordered pair so that
/// any node knows it without a lookup (and a sharded deployment can route by it): `lo << 32 |
/// hi`. User ids and group ids are below 2^32 and user ids start at 1, so a direct id is at
/// least 2^32 and never a group's. (Backends store it as a signed 64-bit integer: the same
/// bits.)
pub fn direct_conversation_id(a: UserId, b: UserId) -> u64 {
    let (lo, hi) = (a.min(b), a.max(b));
    (lo << 32) | (hi & 0xffff_ffff)
}

/// The most user ids (and group ids) there can be: ids stay below 2^32.
pub const MAX_ID: u64 = (1 << 32) - 1;

/// Whether a member with role `actor` may apply `op` to a member with role `target` (`None`:
/// not a member) in a group whose `members_can_add` setting is as given. The one place the
/// group permission rules live, for every backend.
pub fn authorize(
    op: &GroupOp,
    actor: Role,
    target: Option<Role>,
    members_can_add: bool,
) -> Result<(), StoreError> {
    let forbidden = |m: &str| Err(StoreError::Forbidden(m.to_owned()));
    let not_member = || Err(StoreError::NotFound("member"));
    match op {
        GroupOp::Add(_) if !actor.is_admin() && !members_can_add => {
            forbidden("only admins may add members to this group")
        }
        GroupOp::Add(_) | GroupOp::Leave => Ok(()),
        GroupOp::Update { .. } if !actor.is_admin() => {
            forbidden("only admins may change the group")
        }
        GroupOp::Update { .. } => Ok(()),
        GroupOp::Remove(_) | GroupOp::Promote(_) | GroupOp::Demote(_) if !actor.is_admin() => {
            forbidden("only admins may do this")
        }
        GroupOp::Remove(_) => match target {
            None => not_member(),
            Some(Role::Owner) => forbidden("the owner cannot be removed"),
            Some(_) => Ok(()),
        },
        GroupOp::Promote(_) => match target {
            None => not_member(),
            Some(Role::Member) => Ok(()),
            Some(_) => Err(StoreError::Invalid("already an admin".into())),
        },
        GroupOp::Demote(_) => match target {
            None => not_member(),
            Some(Role::Owner) => forbidden("the owner cannot be demoted"),
            Some(Role::Admin) => Ok(()),
            Some(Role::Member) => Err(StoreError::Invalid("not an admin".into())),
        },
    }
}

/// Compares the devices a post addresses with the devices it must address.
/// Returns `Ok(())` when they are the same set, [`StoreError::DeviceMismatch`] with sorted
/// `missing` and `extra` ids otherwise, and [`StoreError::Invalid`] if a device is addressed twice.
pub fn check_device_set(expected: &[DeviceId], addressed: &[DeviceId]) -> Result<(), StoreError> {
    let want: BTreeSet<DeviceId> = expected.iter().copied().collect();
    let mut got = BTreeSet::new();
    for d in addressed {
        if !got.insert(*d) {
            return Err(StoreError::Invalid(format!("device {d} addressed twice")));
        }
    }
    if want == got {
        return Ok(());
    }
    Err(StoreError::DeviceMismatch {
        missing: want.difference(&got).copied().collect(),
        extra: got.difference(&want).copied().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn direct_ids_are_symmetric_distinct_and_above_group_ids() {
        assert_eq!(direct_conversation_id(3, 7), direct_conversation_id(7, 3));
        assert_eq!(direct_conversation_id(1, 1), (1 << 32) | 1);
        assert_ne!(direct_conversation_id(1, 2), direct_conversation_id(2, 2));
        assert!(direct_conversation_id(1, 1) > MAX_ID);
        let top = direct_conversation_id(MAX_ID, MAX_ID);
        assert_eq!(top, u64::MAX);
    }

    #[test]
    fn group_permissions() {
        use Role::*;
        let add = GroupOp::Add(vec![9]);
        let upd = GroupOp::Update {
            description: None,
            name: Some("x".into()),
            members_can_add: None,
        };
        // (op, actor, target, members_can_add, allowed)
        let cases: Vec<(GroupOp, Role, Option<Role>, bool, bool)> = vec![
            (add.clone(), Member, None, false, false),
            (add.clone(), Member, None, true, true),
            (add.clone(), Admin, None, false, true),
            (GroupOp::Leave, Member, None, false, true),
            (GroupOp::Leave, Owner, None, false, true),
            (upd.clone(), Member, None, true, false),
            (upd.clone(), Admin, None, false, true),
            (GroupOp::Remove(2), Member, Some(Member), true, false),
            (GroupOp::Remove(2), Admin, Some(Member), false, true),
            (GroupOp::Remove(2), Admin, Some(Admin), false, true),
            (GroupOp::Remove(2), Admin, Some(Owner), false, false),
            (GroupOp::Remove(2), Owner, None, false, false),
            (GroupOp::Promote(2), Member, Some(Member), false, false),
            (GroupOp::Promote(2), Admin, Some(Member), false, true),
            (GroupOp::Promote(2), Admin, Some(Admin), false, false),
            (GroupOp::Demote(2), Admin, Some(Admin), false, true),
            (GroupOp::Demote(2), Owner, Some(Owner), false, false),
            (GroupOp::Demote(2), Admin, Some(Member), false, false),
        ];
        for (op, actor, target, mca, allowed) in cases {
            assert_eq!(
                authorize(&op, actor, target, mca).is_ok(),
                allowed,
                "{op:?} by {actor:?} on {target:?}"
            );
        }
    }

    type Case<'a> = (&'a [u64], &'a [u64], Result<(), StoreError>);

    #[test]
    fn table() {
        let cases: &[Case<'_>] = &[
            (&[1, 2], &[2, 1], Ok(())),
            (&[], &[], Ok(())),
            (
                &[1, 2],
                &[1, 3],
                Err(StoreError::DeviceMismatch {
                    missing: vec![2],
                    extra: vec![3],
                }),
            ),
            (
                &[1],
                &[],
                Err(StoreError::DeviceMismatch {
                    missing: vec![1],
                    extra: vec![],
                }),
            ),
            (
                &[1],
                &[1, 1],
                Err(StoreError::Invalid("device 1 addressed twice".into())),
            ),
        ];
        for (expected, addressed, want) in cases {
            assert_eq!(
                &check_device_set(expected, addressed),
                want,
                "{expected:?} vs {addressed:?}"
            );
        }
    }

    proptest! {
        #[test]
        fn mismatch_lists_exactly_the_difference(
            expected in proptest::collection::btree_set(0u64..20, 0..8),
            addressed in proptest::collection::btree_set(0u64..20, 0..8),
        ) {
            let e: Vec<_> = expected.iter().copied().collect();
            let a: Vec<_> = addressed.iter().copied().collect();
            match check_device_set(&e, &a) {
                Ok(()) => prop_assert_eq!(&expected, &addressed),
                Err(StoreError::DeviceMismatch { missing, extra }) => {
                    for m in &missing { prop_assert!(expected.contains(m) && !addressed.contains(m)); }
                    for x in &extra { prop_assert!(addressed.contains(x) && !expected.contains(x)); }
                    prop_assert_eq!(missing.len() + addressed.len(), expected.len() + extra.len());
                }
                Err(other) => prop_assert!(false, "unexpected {:?}", other),
            }
        }
    }
}

/// Whether a device may be pushed now, and what the push announces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushDecision {
    Nothing,
    NotBefore(i64),
    /// Announce the messages up to this mailbox entry.
    Send(u64),
}

/// The push rule (PROTOCOL.md §10), from a device's push state and its mailbox: `newest` is
/// its newest message entry, `oldest` its oldest entry of any kind. A push is *answered* once
/// the device has acknowledged every entry it announced (acknowledged entries leave the
/// mailbox); until then, or until it counts as lost, the device gets no other push.
pub fn push_decision(
    last: &PushState,
    newest: Option<u64>,
    oldest: Option<u64>,
    now_ms: i64,
    rules: &PushRules,
) -> PushDecision {
    let Some(newest) = newest else {
        return PushDecision::Nothing;
    };
    if let (Some(pushed), Some(at)) = (last.pushed_mseq, last.pushed_ms) {
        let unanswered = oldest.is_some_and(|o| o <= pushed);
        let lost_after = if last.confirmed {
            rules.unanswered_ms
        } else {
            rules.abandoned_ms
        };
        if unanswered && now_ms < at.saturating_add(lost_after) {
            return PushDecision::Nothing;
        }
    }
    if let Some(at) = last.pushed_ms
        && now_ms < at.saturating_add(rules.window_ms)
    {
        return PushDecision::NotBefore(at.saturating_add(rules.window_ms));
    }
    PushDecision::Send(newest)
}

/// The answer a decision gives, once a backend has recorded a [`PushDecision::Send`]:
/// `waiting` messages in the mailbox, the oldest not announced before from `since_ms`.
pub fn push_claim(
    decision: PushDecision,
    subscription: PushSubscription,
    waiting: i64,
    since_ms: Option<i64>,
) -> PushClaim {
    match decision {
        PushDecision::Nothing => PushClaim::Nothing,
        PushDecision::NotBefore(at_ms) => PushClaim::NotBefore { at_ms },
        PushDecision::Send(mseq) => PushClaim::Send {
            subscription,
            mseq,
            waiting: u32::try_from(waiting).unwrap_or(u32::MAX),
            since_ms,
        },
    }
}

#[cfg(test)]
mod push_tests {
    use super::*;

    const RULES: PushRules = PushRules {
        window_ms: 3_000,
        unanswered_ms: 86_400_000,
        abandoned_ms: 600_000,
    };

    fn pushed(mseq: u64, at: i64, confirmed: bool) -> PushState {
        PushState {
            pushed_mseq: Some(mseq),
            pushed_ms: Some(at),
            confirmed,
        }
    }

    #[test]
    fn the_push_rule() {
        use PushDecision::*;
        let never = PushState::default();
        assert_eq!(
            push_decision(&never, None, Some(1), 0, &RULES),
            Nothing,
            "receipts only"
        );
        assert_eq!(push_decision(&never, Some(4), Some(1), 0, &RULES), Send(4));
        // Unanswered (entry 2 of those announced up to 4 is still there): nothing, however
        // many messages follow, until it counts as lost.
        let last = pushed(4, 1_000, true);
        assert_eq!(
            push_decision(&last, Some(9), Some(2), 60_000, &RULES),
            Nothing
        );
        assert_eq!(
            push_decision(&last, Some(9), Some(2), 1_000 + 86_400_000, &RULES),
            Send(9)
        );
        // A claim never settled is abandoned sooner.
        let abandoned = pushed(4, 1_000, false);
        assert_eq!(
            push_decision(&abandoned, Some(4), Some(2), 60_000, &RULES),
            Nothing
        );
        assert_eq!(
            push_decision(&abandoned, Some(4), Some(2), 601_000, &RULES),
            Send(4)
        );
        // Answered (everything up to 4 acknowledged): the next message pushes, once the
        // window since the last push has passed.
        assert_eq!(
            push_decision(&last, Some(5), Some(5), 2_000, &RULES),
            NotBefore(4_000)
        );
        assert_eq!(
            push_decision(&last, Some(5), Some(5), 4_000, &RULES),
            Send(5)
        );
        // Released after a failure: the window still holds.
        let released = PushState {
            pushed_mseq: None,
            pushed_ms: Some(1_000),
            confirmed: false,
        };
        assert_eq!(
            push_decision(&released, Some(4), Some(1), 1_500, &RULES),
            NotBefore(4_000)
        );
    }
}
