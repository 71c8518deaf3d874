//! The cluster-wide view of connections: which node holds a device, and who is online.
//!
//! Asynchronous because in a cluster it lives outside the process (Redis). A node asks it only
//! about what its own [`Connections`](super::connections::Connections) table cannot answer, so
//! the single-node directory, [`SingleNode`], knows of no connection anywhere else.

use async_trait::async_trait;
use tern_store::{DeviceId, UserId};

/// The directory could not be asked (its service is unreachable or answered nonsense). Callers
/// go on without it: the store still has every entry, so this delays, never loses.
#[derive(Debug, Clone, thiserror::Error)]
#[error("connection directory unavailable: {0}")]
pub struct DirectoryError(pub String);

#[async_trait]
pub trait Directory: Send + Sync + 'static {
    /// Records that this node's connection `conn` now holds `device`.
    async fn claim(&self, user: UserId, device: DeviceId, conn: u64) -> Result<(), DirectoryError>;

    /// Forgets this node's connection `conn` of `device`, if it is still the recorded one.
    async fn release(
        &self,
        user: UserId,
        device: DeviceId,
        conn: u64,
    ) -> Result<(), DirectoryError>;

    /// Whether a device of the user is connected to another node.
    async fn is_online_elsewhere(&self, user: UserId) -> Result<bool, DirectoryError>;
}

/// The directory of a node that is alone: no other node holds anything.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleNode;

#[async_trait]
impl Directory for SingleNode {
    async fn claim(&self, _: UserId, _: DeviceId, _: u64) -> Result<(), DirectoryError> {
        Ok(())
    }

    async fn release(&self, _: UserId, _: DeviceId, _: u64) -> Result<(), DirectoryError> {
        Ok(())
    }

    async fn is_online_elsewhere(&self, _: UserId) -> Result<bool, DirectoryError> {
        Ok(false)
    }
}
