//! Group management: the HTTP calls of PROTOCOL.md §7 on the [`Client`], plus the local group
//! history.
//!
//! Every call that returns a [`GroupInfo`] also records the group's name (as of its
//! `last_seq`) and its members' usernames in the local store, so history can name the group
//! and its people offline. The membership itself is not cached: the server is the truth, and
//! changes reach this device anyway as system messages in the group's history.
//!
//! Sending to a group and marking it read live in `outbox.rs` beside their direct versions.

use tern_proto::http::{
    CreateGroupRequest, GroupInfo, GroupSummary, MessageInfo, UpdateGroupRequest,
};

use crate::client::{Client, normalize_username};
use crate::error::Error;
use crate::store::Conv;
use crate::types::StoredMessage;

impl Client {
    /// Creates a group with me as its owner and `members` (usernames) as its first members.
    pub async fn create_group(
        &self,
        name: &str,
        members: &[&str],
        members_can_add: bool,
    ) -> Result<GroupInfo, Error> {
        let s = self.saved_session()?;
        tern_proto::validate::group_name(name).map_err(Error::Invalid)?;
        let members = normalize_all(members)?;
        let req = CreateGroupRequest {
            name: name.to_owned(),
            description: String::new(),
            members,
            members_can_add,
        };
        let info = self.inner.http.create_group(&s.token, &req).await?;
        self.remember(info).await
    }

    /// The groups I am a member of, with my role in each.
    pub async fn groups(&self) -> Result<Vec<GroupSummary>, Error> {
        let s = self.saved_session()?;
        self.inner.http.groups(&s.token).await
    }

    /// A group's name, settings and members (`not_found` if I am not a member).
    pub async fn group_info(&self, group_id: u64) -> Result<GroupInfo, Error> {
        let s = self.saved_session()?;
        let info = self.inner.http.group(&s.token, group_id).await?;
        self.remember(info).await
    }

    /// Renames a group (admins only).
    pub async fn rename_group(&self, group_id: u64, name: &str) -> Result<GroupInfo, Error> {
        tern_proto::validate::group_name(name).map_err(Error::Invalid)?;
        self.update_group(
            group_id,
            UpdateGroupRequest {
                name: Some(name.to_owned()),
                description: None,
                members_can_add: None,
            },
        )
        .await
    }

    /// Sets the group's description; an empty text removes it (admins only).
    pub async fn describe_group(
        &self,
        group_id: u64,
        description: &str,
    ) -> Result<GroupInfo, Error> {
        tern_proto::validate::group_description(description).map_err(Error::Invalid)?;
        self.update_group(
            group_id,
            UpdateGroupRequest {
                name: None,
                description: Some(description.to_owned()),
                members_can_add: None,
            },
        )
        .await
    }

    /// Lets every member add members, or only admins (admins only).
    pub async fn set_members_can_add(
        &self,
        group_id: u64,
        members_can_add: bool,
    ) -> Result<GroupInfo, Error> {
        self.update_group(
            group_id,
            UpdateGroupRequest {
                name: None,
                description: None,
                members_can_add: Some(members_can_add),
            },
        )
        .await
    }

    async fn update_group(
        &self,
        group_id: u64,
        req: UpdateGroupRequest,
    ) -> Result<GroupInfo, Error> {
        let s = self.saved_session()?;
        let info = self
            .inner
            .http
            .update_group(&s.token, group_id, &req)
            .await?;
        self.remember(info).await
    }

    /// Adds members (admins, or every member if the group allows it).
    pub async fn add_members(&self, group_id: u64, usernames: &[&str]) -> Result<GroupInfo, Error> {
        let s = self.saved_session()?;
        let members = normalize_all(usernames)?;
        if members.is_empty() {
            return Err(Error::Invalid("no members to add".into()));
        }
        let info = self
            .inner
            .http
            .add_members(&s.token, group_id, members)
            .await?;
        self.remember(info).await
    }

    /// Removes a member (admins only; never the owner).
    pub async fn remove_member(&self, group_id: u64, username: &str) -> Result<GroupInfo, Error> {
        let s = self.saved_session()?;
        let username = normalize_username(username)?;
        let info = self
            .inner
            .http
            .remove_member(&s.token, group_id, &username)
            .await?;
        self.remember(info).await
    }

    /// Leaves a group. Its history stays in the local store; nothing new arrives after my own
    /// `left` event.
    pub async fn leave_group(&self, group_id: u64) -> Result<(), Error> {
        let s = self.saved_session()?;
        self.inner.http.leave_group(&s.token, group_id).await
    }

    /// Makes a member an admin (admins only).
    pub async fn promote(&self, group_id: u64, username: &str) -> Result<GroupInfo, Error> {
        self.set_admin(group_id, username, true).await
    }

    /// Makes an admin a plain member again (admins only; never the owner).
    pub async fn demote(&self, group_id: u64, username: &str) -> Result<GroupInfo, Error> {
        self.set_admin(group_id, username, false).await
    }

    async fn set_admin(
        &self,
        group_id: u64,
        username: &str,
        admin: bool,
    ) -> Result<GroupInfo, Error> {
        let s = self.saved_session()?;
        let username = normalize_username(username)?;
        let info = self
            .inner
            .http
            .set_admin(&s.token, group_id, &username, admin)
            .await?;
        self.remember(info).await
    }

    /// Who has delivered and read one of my group messages (sender only: `forbidden`
    /// otherwise). Use [`sent_message`](Client::sent_message) to find a message's seq from
    /// its client_msg_id.
    pub async fn message_info(&self, group_id: u64, seq: u64) -> Result<MessageInfo, Error> {
        let s = self.saved_session()?;
        self.inner.http.message_info(&s.token, group_id, seq).await
    }

    /// The last `limit` messages of a group (system messages included), ordered by seq
    /// (pending ones last). Local.
    pub fn group_history(&self, group_id: u64, limit: usize) -> Result<Vec<StoredMessage>, Error> {
        self.inner.store.conversation(Conv::Group(group_id), limit)
    }

    /// One of my messages (sent from any of my devices, direct or group) by its
    /// client_msg_id, with its tick. Local.
    pub fn sent_message(&self, client_msg_id: &str) -> Result<Option<StoredMessage>, Error> {
        self.inner.store.sent_by_id(client_msg_id)
    }

    /// Records what a `GroupInfo` tells about names, then hands it back.
    async fn remember(&self, info: GroupInfo) -> Result<GroupInfo, Error> {
        let to_store = info.clone();
        self.inner
            .store
            .run(move |s| {
                let members: Vec<(u64, &str)> = to_store
                    .members
                    .iter()
                    .map(|m| (m.user_id, m.username.as_str()))
                    .collect();
                s.remember_group(
                    to_store.group_id,
                    &to_store.name,
                    to_store.last_seq,
                    &members,
                )
            })
            .await?;
        Ok(info)
    }
}

/// Lowercases and checks usernames (they go into bodies and paths), dropping repeats.
fn normalize_all(usernames: &[&str]) -> Result<Vec<String>, Error> {
    let mut out: Vec<String> = Vec::with_capacity(usernames.len());
    for u in usernames {
        let u = normalize_username(u)?;
        if !out.contains(&u) {
            out.push(u);
        }
    }
    Ok(out)
}
