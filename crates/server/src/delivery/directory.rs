//! The cluster-wide view of connections: which node holds a device, who is online, and when a
//! user was last seen leaving.
//!
//! Asynchronous because in a cluster it lives outside the process (Redis,
//! [`crate::cluster::redis`]). A node asks it only about what its own
//! [`Connections`](super::connections::Connections) table cannot answer, so the single-node
//! directory, [`SingleNode`], knows of no connection anywhere else.

use std::sync::Arc;

use async_trait::async_trait;
use tern_store::{DeviceId, UserId};

/// A connection on some node of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The node's id (`[cluster] node_id`).
    pub node: Arc<str>,
    /// The connection's id on that node.
    pub conn: u64,
}

/// A connection this node holds, as the directory records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held {
    pub user: UserId,
    pub device: DeviceId,
    pub conn: u64,
}

/// What a renewal found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Renewal {
    /// Connections another node holds now: to be closed here.
    pub lost: Vec<Held>,
    /// Connections whose entries the directory had lost (flushed, restarted) and that are
    /// written again: wake-ups for them may have gone nowhere meanwhile.
    pub restored: Vec<Held>,
}

/// What the directory knows of a user beyond this node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Elsewhere {
    /// A device of the user is connected to some node (this one included).
    pub online: bool,
    /// When a connection of the user last closed on any node, if recently.
    pub last_seen_ms: Option<i64>,
}

/// The directory could not be asked (its service is unreachable or answered nonsense). Callers
/// go on without it: the store still has every entry, so this delays, never loses.
#[derive(Debug, Clone, thiserror::Error)]
#[error("connection directory unavailable: {0}")]
pub struct DirectoryError(pub String);

#[async_trait]
pub trait Directory: Send + Sync + 'static {
    /// Records that this node's connection `conn` now holds `device`; returns the connection it
    /// takes over from on another node, if any (the caller has that one closed).
    async fn claim(&self, held: Held) -> Result<Option<Holder>, DirectoryError>;

    /// Forgets this node's connection, if it is still the recorded one, and notes `at_ms` as
    /// the user's last seen.
    async fn release(&self, held: Held, at_ms: i64) -> Result<(), DirectoryError>;

    /// Renews the entries of every connection this node holds (they expire otherwise, so that
    /// a crashed node's entries go by themselves), writing again those the directory lost.
    async fn refresh(&self, held: &[Held]) -> Result<Renewal, DirectoryError>;

    /// The holders of `(user, device)` pairs, in order; `None` for devices not connected.
    async fn locate(
        &self,
        devices: &[(UserId, DeviceId)],
    ) -> Result<Vec<Option<Holder>>, DirectoryError>;

    /// What other nodes know of the user's presence.
    async fn elsewhere(&self, user: UserId) -> Result<Elsewhere, DirectoryError>;

    /// Whether the directory answers (for readiness).
    async fn ping(&self) -> Result<(), DirectoryError>;
}

/// The directory of a node that is alone: no other node holds anything.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleNode;

#[async_trait]
impl Directory for SingleNode {
    async fn claim(&self, _: Held) -> Result<Option<Holder>, DirectoryError> {
        Ok(None)
    }

    async fn release(&self, _: Held, _: i64) -> Result<(), DirectoryError> {
        Ok(())
    }

    async fn refresh(&self, _: &[Held]) -> Result<Renewal, DirectoryError> {
        Ok(Renewal::default())
    }

    async fn locate(
        &self,
        devices: &[(UserId, DeviceId)],
    ) -> Result<Vec<Option<Holder>>, DirectoryError> {
        Ok(vec![None; devices.len()])
    }

    async fn elsewhere(&self, _: UserId) -> Result<Elsewhere, DirectoryError> {
        Ok(Elsewhere::default())
    }

    async fn ping(&self) -> Result<(), DirectoryError> {
        Ok(())
    }
}
