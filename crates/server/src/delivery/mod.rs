//! Live delivery: who holds which device, and the hand-off of new mailbox entries.
//!
//! The store is the truth; delivery is only the fast path. Handing an entry to a connection
//! never blocks and never fails the sender: if the device is not connected, the entry simply
//! waits in its mailbox. The parts:
//!
//! - [`outbox`]: the bounded queue between the hub and one connection;
//! - [`connections`]: this node's table of connections (device → outbox);
//! - [`directory`]: the cluster-wide view (device → node, online), behind a trait;
//! - [`Hub`]: what services and the gateway use; it asks the local table first and the
//!   directory only for what that cannot answer, so services do not know whether the node is
//!   alone or one of a cluster.

pub mod connections;
pub mod directory;
pub mod outbox;

use std::sync::Arc;

use tern_store::{Delivery, DeviceId, UserId};

use connections::Connections;
use directory::Directory;
pub use outbox::{CloseReason, Outbox};

pub struct Hub {
    connections: Connections,
    directory: Arc<dyn Directory>,
}

impl Hub {
    pub fn new(directory: Arc<dyn Directory>) -> Hub {
        Hub {
            connections: Connections::default(),
            directory,
        }
    }

    /// A hub for a node that is alone.
    pub fn single_node() -> Hub {
        Hub::new(Arc::new(directory::SingleNode))
    }

    /// Registers a connection for a device; an older connection of the device here is closed
    /// ([`CloseReason::Replaced`]).
    pub async fn register(&self, user: UserId, device: DeviceId, outbox: Arc<Outbox>) {
        let conn = outbox.id();
        self.connections.register(user, device, outbox);
        if let Err(e) = self.directory.claim(user, device, conn).await {
            directory_failed("claim", &e);
        }
    }

    /// Removes a connection if it is still the registered one.
    pub async fn unregister(&self, user: UserId, device: DeviceId, conn: u64) {
        if self.connections.unregister(user, device, conn)
            && let Err(e) = self.directory.release(user, device, conn).await
        {
            directory_failed("release", &e);
        }
    }

    /// Hands new mailbox entries to the connections holding their devices.
    pub fn deliver(&self, deliveries: &[Delivery]) {
        self.connections.push(deliveries);
    }

    /// Closes the device's connection, if any.
    pub fn disconnect(&self, device: DeviceId, reason: CloseReason) {
        self.connections.close(device, None, reason);
    }

    /// Whether any device of the user is connected (to any node).
    pub async fn is_online(&self, user: UserId) -> bool {
        if self.connections.is_online(user) {
            return true;
        }
        self.directory
            .is_online_elsewhere(user)
            .await
            .unwrap_or_else(|e| {
                directory_failed("online", &e);
                false
            })
    }
}

fn directory_failed(op: &'static str, e: &directory::DirectoryError) {
    metrics::counter!("tern_directory_errors_total", "op" => op).increment(1);
    tracing::warn!(error = %e, op, "connection directory call failed");
}
