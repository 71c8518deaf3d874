//! Groups: creating, changing and reading them. Names and usernames are checked and resolved
//! here; rights and limits are decided by the store inside the same transaction as the change
//! (`tern_store::logic::authorize`), so a change racing with another cannot slip past them.
//! Every change is a system message in the group's sequence, handed to connected members like
//! any other message.

use std::sync::Arc;

use tern_proto::http::{
    CreateGroupRequest, GroupInfo, GroupMember, GroupSummary, MemberReceipt, MessageInfo,
    UpdateGroupRequest,
};
use tern_proto::{ErrorCode, Limits, validate};
use tern_store::{DeviceAuth, GroupChange, GroupId, GroupOp, GroupRecord, NewGroup, Store, UserId};

use crate::delivery::Hub;
use crate::error::ApiError;
use crate::services::Clock;

/// Most groups listed for one user.
const MAX_LISTED_GROUPS: usize = 5000;

pub struct Groups {
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    clock: Arc<dyn Clock>,
    limits: Limits,
}

fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "group not found")
}

pub fn info(g: GroupRecord) -> GroupInfo {
    GroupInfo {
        group_id: g.id,
        name: g.name,
        description: g.description,
        members_can_add: g.members_can_add,
        created_at_ms: g.created_at_ms,
        last_seq: g.last_seq,
        members: g
            .members
            .into_iter()
            .map(|m| GroupMember {
                user_id: m.user.id,
                username: m.user.username,
                role: m.role,
                joined_seq: m.joined_seq,
            })
            .collect(),
    }
}

impl Groups {
    pub fn new(
        store: Arc<dyn Store>,
        hub: Arc<Hub>,
        clock: Arc<dyn Clock>,
        limits: Limits,
    ) -> Self {
        Groups {
            store,
            hub,
            clock,
            limits,
        }
    }

    /// Resolves usernames to user ids; an unknown one is `not_found` naming it.
    async fn resolve(&self, names: &[String]) -> Result<Vec<UserId>, ApiError> {
        if names.len() > self.limits.max_group_members {
            return Err(ApiError::new(
                ErrorCode::LimitReached,
                format!(
                    "a group has at most {} members",
                    self.limits.max_group_members
                ),
            ));
        }
        let mut ids = Vec::with_capacity(names.len());
        for name in names {
            let name = name.trim().to_ascii_lowercase();
            let user = if name.len() <= tern_proto::limits::USERNAME_MAX {
                self.store.user_by_name(&name).await?
            } else {
                None
            };
            ids.push(
                user.ok_or_else(|| {
                    ApiError::new(ErrorCode::NotFound, format!("user {name:?} not found"))
                })?
                .id,
            );
        }
        Ok(ids)
    }

    fn deliver(&self, change: GroupChange) -> GroupInfo {
        self.hub.deliver(&change.deliveries);
        info(change.group)
    }

    pub async fn create(
        &self,
        who: &DeviceAuth,
        req: CreateGroupRequest,
    ) -> Result<GroupInfo, ApiError> {
        validate::group_name(&req.name).map_err(ApiError::bad_request)?;
        validate::group_description(&req.description).map_err(ApiError::bad_request)?;
        let members = self.resolve(&req.members).await?;
        let change = self
            .store
            .create_group(NewGroup {
                creator: who.clone(),
                name: req.name.trim().to_owned(),
                description: req.description.trim().to_owned(),
                members,
                members_can_add: req.members_can_add,
                max_members: self.limits.max_group_members,
                now_ms: self.clock.now_ms(),
            })
            .await?;
        tracing::info!(
            group_id = change.group.id,
            members = change.group.members.len(),
            "group created"
        );
        Ok(self.deliver(change))
    }

    async fn change(
        &self,
        who: &DeviceAuth,
        group: GroupId,
        op: GroupOp,
    ) -> Result<GroupInfo, ApiError> {
        let change = self
            .store
            .change_group(
                who.clone(),
                group,
                op,
                self.limits.max_group_members,
                self.clock.now_ms(),
            )
            .await
            .map_err(|e| match e {
                tern_store::StoreError::NotFound("group") => not_found(),
                other => other.into(),
            })?;
        Ok(self.deliver(change))
    }

    pub async fn update(
        &self,
        who: &DeviceAuth,
        group: GroupId,
        req: UpdateGroupRequest,
    ) -> Result<GroupInfo, ApiError> {
        if let Some(n) = &req.name {
            validate::group_name(n).map_err(ApiError::bad_request)?;
        }
        if let Some(d) = &req.description {
            validate::group_description(d).map_err(ApiError::bad_request)?;
        }
        let op = GroupOp::Update {
            name: req.name.map(|n| n.trim().to_owned()),
            description: req.description.map(|d| d.trim().to_owned()),
            members_can_add: req.members_can_add,
        };
        self.change(who, group, op).await
    }

    pub async fn add(
        &self,
        who: &DeviceAuth,
        group: GroupId,
        members: &[String],
    ) -> Result<GroupInfo, ApiError> {
        if members.is_empty() {
            return Err(ApiError::bad_request("name at least one member to add"));
        }
        let ids = self.resolve(members).await?;
        self.change(who, group, GroupOp::Add(ids)).await
    }

    /// Remove, promote or demote one member, named by username.
    pub async fn on_member(
        &self,
        who: &DeviceAuth,
        group: GroupId,
        username: &str,
        op: fn(UserId) -> GroupOp,
    ) -> Result<GroupInfo, ApiError> {
        let id = self.resolve(&[username.to_owned()]).await?[0];
        self.change(who, group, op(id)).await
    }

    pub async fn leave(&self, who: &DeviceAuth, group: GroupId) -> Result<(), ApiError> {
        self.change(who, group, GroupOp::Leave).await.map(|_| ())
    }

    /// A group's details, for its members only.
    pub async fn get(&self, who: &DeviceAuth, group: GroupId) -> Result<GroupInfo, ApiError> {
        let g = self.store.group(group).await?.ok_or_else(not_found)?;
        if g.role_of(who.user_id).is_none() {
            return Err(not_found());
        }
        Ok(info(g))
    }

    pub async fn list(&self, who: &DeviceAuth) -> Result<Vec<GroupSummary>, ApiError> {
        Ok(self
            .store
            .groups_of(who.user_id, MAX_LISTED_GROUPS)
            .await?
            .into_iter()
            .map(|g| GroupSummary {
                group_id: g.id,
                name: g.name,
                role: g.role,
                member_count: g.member_count,
            })
            .collect())
    }

    /// Who has a message, for its sender (WhatsApp's info screen).
    pub async fn message_info(
        &self,
        who: &DeviceAuth,
        group: GroupId,
        seq: u64,
    ) -> Result<MessageInfo, ApiError> {
        self.get(who, group).await?;
        let info = self
            .store
            .message_info(group, seq)
            .await?
            .ok_or_else(|| ApiError::new(ErrorCode::NotFound, "message not found"))?;
        if info.sender != who.user_id {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                "only the sender may see a message's info",
            ));
        }
        let members: Vec<MemberReceipt> = info
            .members
            .into_iter()
            .map(|m| MemberReceipt {
                user_id: m.user.id,
                username: m.user.username,
                delivered: m.delivered,
                read: m.read,
            })
            .collect();
        Ok(MessageInfo {
            group_id: group,
            seq,
            delivered_to_all: members.iter().all(|m| m.delivered),
            read_by_all: members.iter().all(|m| m.read),
            members,
        })
    }
}
