//! Sending, acknowledging and reading: "store, then hand to the router". A message is committed
//! with the mailbox entries of every addressed device before anyone hears of it; only then are
//! the entries handed to connected devices. A lost hand-off delays an entry until the device's
//! next drain; it never loses it.

use std::sync::Arc;

use tern_proto::frames::{self, peer};
use tern_proto::{ErrorCode, Limits, validate};
use tern_store::{AddressedDevice, DeviceAuth, NewMessage, PostOutcome, Store, Target};

use crate::error::ApiError;
use crate::router::Router;
use crate::services::Clock;

pub struct Messaging {
    store: Arc<dyn Store>,
    router: Arc<dyn Router>,
    clock: Arc<dyn Clock>,
    limits: Limits,
}

/// The answer to a successful send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendReceipt {
    pub seq: u64,
    pub server_ts_ms: i64,
    pub duplicate: bool,
}

fn target(p: Option<&frames::Peer>) -> Result<Target, ApiError> {
    match p.and_then(|p| p.kind) {
        Some(peer::Kind::User(id)) => Ok(Target::User(id)),
        Some(peer::Kind::Group(id)) => Ok(Target::Group(id)),
        None => Err(ApiError::bad_request("a conversation (peer) is required")),
    }
}

impl Messaging {
    pub fn new(
        store: Arc<dyn Store>,
        router: Arc<dyn Router>,
        clock: Arc<dyn Clock>,
        limits: Limits,
    ) -> Self {
        Messaging {
            store,
            router,
            clock,
            limits,
        }
    }

    /// Validates and stores a message, then hands it to connected devices.
    pub async fn send(
        &self,
        who: &DeviceAuth,
        send: frames::Send,
    ) -> Result<SendReceipt, ApiError> {
        validate::client_msg_id(&send.client_msg_id).map_err(ApiError::bad_request)?;
        let to = target(send.to.as_ref())?;
        let too_large = |n: usize| {
            ApiError::new(
                ErrorCode::TooLarge,
                format!(
                    "a body of {n} bytes exceeds the limit of {}",
                    self.limits.max_body_bytes
                ),
            )
        };
        if send.body.len() > self.limits.max_body_bytes {
            return Err(too_large(send.body.len()));
        }
        // A send addresses at most every device of two users.
        if send.devices.len() > 2 * self.limits.max_devices_per_user {
            return Err(ApiError::bad_request("too many devices addressed"));
        }
        let mut devices = Vec::with_capacity(send.devices.len());
        for d in send.devices {
            if let Some(b) = &d.body
                && b.len() > self.limits.max_body_bytes
            {
                return Err(too_large(b.len()));
            }
            devices.push(AddressedDevice {
                device: d.device_id,
                body: d.body,
            });
        }
        let outcome = self
            .store
            .post_message(NewMessage {
                sender: who.clone(),
                to,
                client_msg_id: send.client_msg_id,
                body: send.body,
                devices,
                now_ms: self.clock.now_ms(),
            })
            .await?;
        Ok(match outcome {
            PostOutcome::Stored {
                seq,
                server_ts_ms,
                deliveries,
            } => {
                metrics::counter!("tern_messages_stored_total").increment(1);
                self.router.deliver(&deliveries);
                SendReceipt {
                    seq,
                    server_ts_ms,
                    duplicate: false,
                }
            }
            PostOutcome::Duplicate { seq, server_ts_ms } => {
                metrics::counter!("tern_messages_duplicate_total").increment(1);
                SendReceipt {
                    seq,
                    server_ts_ms,
                    duplicate: true,
                }
            }
        })
    }

    /// Acknowledges the device's mailbox up to `up_to`; delivered receipts go to the senders.
    pub async fn ack(&self, who: &DeviceAuth, up_to: u64) -> Result<(), ApiError> {
        let receipts = self
            .store
            .ack(who.clone(), up_to, self.clock.now_ms())
            .await?;
        self.router.deliver(&receipts);
        Ok(())
    }

    /// Marks the conversation read up to `up_to_seq`; read receipts go to the peer's devices and
    /// the reader's other devices.
    pub async fn read(&self, who: &DeviceAuth, read: frames::Read) -> Result<(), ApiError> {
        let conversation = target(read.conversation.as_ref())?;
        if read.up_to_seq == 0 {
            return Err(ApiError::bad_request("up_to_seq must be at least 1"));
        }
        let receipts = self
            .store
            .mark_read(
                who.clone(),
                conversation,
                read.up_to_seq,
                self.clock.now_ms(),
            )
            .await?;
        self.router.deliver(&receipts);
        Ok(())
    }
}
