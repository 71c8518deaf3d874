//! Groups: creation, membership and settings changes (each one a system message in the group's
//! sequence), reads of a group, a user's groups, and message info. A change locks the group's
//! conversation row before it reads the group, so changes and posts of one group are
//! serialised and each sees the membership the one before it left.

use deadpool_postgres::GenericClient;
use prost::Message as _;
use tern_proto::frames::GroupAction;

use super::accounts::user_ref;
use super::messaging::{KIND_GROUP, member_group, post_system};
use super::{RowExt, execute, id, query, query_one, query_opt};
use crate::logic::{
    GroupSettings, MAX_ID, authorize, group_event, heir, members_to_add, role_code, role_from_code,
};
use crate::*;

pub async fn group<C: GenericClient>(
    c: &C,
    group: GroupId,
) -> Result<Option<GroupRecord>, StoreError> {
    let conv = id(group);
    let Some(r) = query_opt(
        c,
        "SELECT g.name, g.members_can_add, g.created_at, c.next_seq, g.description FROM groups g
         JOIN conversations c ON c.id = g.conversation_id WHERE g.conversation_id = $1",
        &[&conv],
    )
    .await?
    else {
        return Ok(None);
    };
    let members = query(
        c,
        "SELECT m.user_id, u.username, m.role, m.joined_seq FROM members m
         JOIN users u ON u.id = m.user_id
         WHERE m.conversation_id = $1 ORDER BY m.joined_seq, m.user_id",
        &[&conv],
    )
    .await?
    .iter()
    .map(|m| {
        Ok(MemberRecord {
            user: UserRef {
                id: m.col::<i64>(0)? as UserId,
                username: m.col(1)?,
            },
            role: role_from_code(m.col::<i16>(2)?.into()),
            joined_seq: m.col::<i64>(3)? as u64,
        })
    })
    .collect::<Result<_, StoreError>>()?;
    Ok(Some(GroupRecord {
        id: group,
        name: r.col(0)?,
        description: r.col(4)?,
        members_can_add: r.col(1)?,
        created_at_ms: r.col(2)?,
        last_seq: (r.col::<i64>(3)? as u64).saturating_sub(1),
        members,
    }))
}

async fn users<C: GenericClient>(c: &C, ids: &[UserId]) -> Result<Vec<UserRef>, StoreError> {
    let mut out = Vec::with_capacity(ids.len());
    for u in ids {
        out.push(user_ref(c, *u).await?.ok_or(StoreError::NotFound("user"))?);
    }
    Ok(out)
}

async fn insert_members<C: GenericClient>(
    c: &C,
    conv: i64,
    users: &[UserId],
    role: Role,
    joined_seq: u64,
) -> Result<(), StoreError> {
    let ids: Vec<i64> = users.iter().map(|u| id(*u)).collect();
    execute(
        c,
        "INSERT INTO members (conversation_id, user_id, role, joined_seq)
         SELECT $1, u, $3, $4 FROM UNNEST($2::BIGINT[]) AS u",
        &[&conv, &ids, &role_code(role), &id(joined_seq)],
    )
    .await?;
    Ok(())
}

/// Everything one change wrote: the system messages' deliveries.
struct Events<'a> {
    conv: i64,
    actor: &'a DeviceAuth,
    now: i64,
    deliveries: Vec<Delivery>,
}

impl Events<'_> {
    /// Writes one event; returns its sequence number.
    async fn emit<C: GenericClient>(
        &mut self,
        c: &C,
        action: GroupAction,
        targets: &[UserRef],
        st: &GroupSettings,
    ) -> Result<u64, StoreError> {
        let event = group_event(action, self.actor, targets, st);
        let (seq, d) = post_system(
            c,
            self.conv,
            self.actor,
            &st.name,
            event.encode_to_vec(),
            self.now,
        )
        .await?;
        self.deliveries.extend(d);
        Ok(seq)
    }
}

pub async fn create_group<C: GenericClient>(
    c: &C,
    new: &NewGroup,
) -> Result<GroupChange, StoreError> {
    let creator = &new.creator;
    let max = new.max_members;
    let mut members = new.members.clone();
    members.sort_unstable();
    members.dedup();
    members.retain(|m| *m != creator.user_id);
    if members.len() + 1 > max {
        return Err(StoreError::GroupFull(max));
    }
    let targets = users(c, &members).await?;
    let conv: i64 = query_one(c, "SELECT nextval('group_ids')", &[])
        .await?
        .col(0)?;
    if conv as u64 > MAX_ID {
        return Err(StoreError::Invalid("no more group ids".into()));
    }
    execute(
        c,
        "INSERT INTO conversations (id, kind) VALUES ($1, $2)",
        &[&conv, &KIND_GROUP],
    )
    .await?;
    execute(
        c,
        "INSERT INTO groups (conversation_id, name, description, members_can_add, created_at)
         VALUES ($1, $2, $3, $4, $5)",
        &[
            &conv,
            &new.name,
            &new.description,
            &new.members_can_add,
            &new.now_ms,
        ],
    )
    .await?;
    // Members join at the CREATED event, which is seq 1.
    insert_members(c, conv, &[creator.user_id], Role::Owner, 1).await?;
    insert_members(c, conv, &members, Role::Member, 1).await?;
    let mut ev = Events {
        conv,
        actor: creator,
        now: new.now_ms,
        deliveries: Vec::new(),
    };
    let st = GroupSettings {
        name: new.name.clone(),
        description: new.description.clone(),
        members_can_add: new.members_can_add,
    };
    ev.emit(c, GroupAction::Created, &targets, &st).await?;
    let deliveries = ev.deliveries;
    let group = group(c, conv as GroupId)
        .await?
        .ok_or(StoreError::NotFound("group"))?;
    Ok(GroupChange { group, deliveries })
}

pub async fn change_group<C: GenericClient>(
    c: &C,
    actor: &DeviceAuth,
    group_id: GroupId,
    op: &GroupOp,
    max: usize,
    now: i64,
) -> Result<GroupChange, StoreError> {
    let conv = id(group_id);
    // The group's row first: what is read below is the group as the last change or post left
    // it, until this transaction commits.
    query_opt(
        c,
        "SELECT 1 FROM conversations WHERE id = $1 AND kind = $2 FOR UPDATE",
        &[&conv, &KIND_GROUP],
    )
    .await?
    .ok_or(StoreError::NotFound("group"))?;
    member_group(c, group_id, actor.user_id).await?;
    let before = group(c, group_id)
        .await?
        .ok_or(StoreError::NotFound("group"))?;
    let actor_role = before
        .role_of(actor.user_id)
        .ok_or(StoreError::NotFound("group"))?;
    let target_role = match op {
        GroupOp::Remove(u) | GroupOp::Promote(u) | GroupOp::Demote(u) => before.role_of(*u),
        _ => None,
    };
    authorize(op, actor_role, target_role, before.members_can_add)?;
    let mut st = GroupSettings::of(&before);
    let mut ev = Events {
        conv,
        actor,
        now,
        deliveries: Vec::new(),
    };
    let remove = async |user: UserId| -> Result<(), StoreError> {
        execute(
            c,
            "DELETE FROM members WHERE conversation_id = $1 AND user_id = $2",
            &[&conv, &id(user)],
        )
        .await
        .map(|_| ())
    };
    match op {
        GroupOp::Add(named) => {
            let ids = members_to_add(&before, named, max)?;
            let targets = users(c, &ids).await?;
            // The ADDED event is the new members' first message: insert them at its seq, and
            // emit it after they are members so that they receive it.
            insert_members(c, conv, &ids, Role::Member, before.last_seq + 1).await?;
            ev.emit(c, GroupAction::Added, &targets, &st).await?;
        }
        GroupOp::Remove(user) | GroupOp::Promote(user) | GroupOp::Demote(user)
            if *user == actor.user_id =>
        {
            return Err(StoreError::Invalid(
                "use leave to leave a group; admins cannot change their own role".into(),
            ));
        }
        GroupOp::Remove(user) => {
            let target = users(c, &[*user]).await?;
            // The removed member receives its own removal, and nothing after it.
            ev.emit(c, GroupAction::Removed, &target, &st).await?;
            remove(*user).await?;
        }
        GroupOp::Leave => {
            let me = users(c, &[actor.user_id]).await?;
            ev.emit(c, GroupAction::Left, &me, &st).await?;
            remove(actor.user_id).await?;
            if actor_role == Role::Owner {
                let heir = heir(&before, actor.user_id);
                if let Some(heir) = heir {
                    execute(
                        c,
                        "UPDATE members SET role = 2 WHERE conversation_id = $1 AND user_id = $2",
                        &[&conv, &id(heir.user.id)],
                    )
                    .await?;
                    ev.emit(
                        c,
                        GroupAction::Promoted,
                        std::slice::from_ref(&heir.user),
                        &st,
                    )
                    .await?;
                }
            }
        }
        GroupOp::Promote(user) | GroupOp::Demote(user) => {
            let promote = target_role == Some(Role::Member);
            let role: i16 = if promote { 1 } else { 0 };
            execute(
                c,
                "UPDATE members SET role = $3 WHERE conversation_id = $1 AND user_id = $2",
                &[&conv, &id(*user), &role],
            )
            .await?;
            let target = users(c, &[*user]).await?;
            let action = if promote {
                GroupAction::Promoted
            } else {
                GroupAction::Demoted
            };
            ev.emit(c, action, &target, &st).await?;
        }
        GroupOp::Update {
            name,
            description,
            members_can_add,
        } => {
            let rename = name.clone().filter(|n| *n != st.name);
            let describe = description.clone().filter(|d| *d != st.description);
            let setting = members_can_add.filter(|m| *m != st.members_can_add);
            if rename.is_none() && describe.is_none() && setting.is_none() {
                return Err(StoreError::Invalid("nothing to change".into()));
            }
            if let Some(n) = rename {
                st.name = n;
                execute(
                    c,
                    "UPDATE groups SET name = $2 WHERE conversation_id = $1",
                    &[&conv, &st.name],
                )
                .await?;
                ev.emit(c, GroupAction::Renamed, &[], &st).await?;
            }
            if let Some(d) = describe {
                st.description = d;
                execute(
                    c,
                    "UPDATE groups SET description = $2 WHERE conversation_id = $1",
                    &[&conv, &st.description],
                )
                .await?;
                ev.emit(c, GroupAction::Described, &[], &st).await?;
            }
            if let Some(m) = setting {
                st.members_can_add = m;
                execute(
                    c,
                    "UPDATE groups SET members_can_add = $2 WHERE conversation_id = $1",
                    &[&conv, &st.members_can_add],
                )
                .await?;
                ev.emit(c, GroupAction::SettingsChanged, &[], &st).await?;
            }
        }
    }
    let deliveries = ev.deliveries;
    let after = group(c, group_id)
        .await?
        .ok_or(StoreError::NotFound("group"))?;
    Ok(GroupChange {
        group: after,
        deliveries,
    })
}

pub async fn groups_of<C: GenericClient>(
    c: &C,
    user: UserId,
    limit: usize,
) -> Result<Vec<GroupSummaryRecord>, StoreError> {
    query(
        c,
        "SELECT g.conversation_id, g.name, m.role,
                (SELECT COUNT(*) FROM members x WHERE x.conversation_id = g.conversation_id)
         FROM members m JOIN groups g ON g.conversation_id = m.conversation_id
         WHERE m.user_id = $1 ORDER BY g.conversation_id LIMIT $2",
        &[&id(user), &(limit as i64)],
    )
    .await?
    .iter()
    .map(|r| {
        Ok(GroupSummaryRecord {
            id: r.col::<i64>(0)? as GroupId,
            name: r.col(1)?,
            role: role_from_code(r.col::<i16>(2)?.into()),
            member_count: r.col::<i64>(3)? as u64,
        })
    })
    .collect()
}

pub async fn message_info<C: GenericClient>(
    c: &C,
    group: GroupId,
    seq: u64,
) -> Result<Option<MessageInfoRecord>, StoreError> {
    let conv = id(group);
    let Some(sender) = query_opt(
        c,
        "SELECT m.sender_user FROM messages m JOIN groups g ON g.conversation_id = m.conversation_id
         WHERE m.conversation_id = $1 AND m.seq = $2 AND m.kind = 0",
        &[&conv, &id(seq)],
    )
    .await?
    else {
        return Ok(None);
    };
    let sender: i64 = sender.col(0)?;
    let members = query(
        c,
        "SELECT m.user_id, u.username, COALESCE(r.delivered_up_to, 0), COALESCE(r.read_up_to, 0)
         FROM members m JOIN users u ON u.id = m.user_id
         LEFT JOIN receipts r ON r.conversation_id = m.conversation_id AND r.reader = m.user_id
         WHERE m.conversation_id = $1 AND m.joined_seq < $2 AND m.user_id != $3
         ORDER BY u.username COLLATE \"C\"",
        &[&conv, &id(seq), &sender],
    )
    .await?
    .iter()
    .map(|r| {
        Ok(MemberReceiptRecord {
            user: UserRef {
                id: r.col::<i64>(0)? as UserId,
                username: r.col(1)?,
            },
            delivered: r.col::<i64>(2)? as u64 >= seq,
            read: r.col::<i64>(3)? as u64 >= seq,
        })
    })
    .collect::<Result<_, StoreError>>()?;
    Ok(Some(MessageInfoRecord {
        group,
        seq,
        sender: sender as UserId,
        members,
    }))
}
