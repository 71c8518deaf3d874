//! Sending, acknowledging and reading: "store, then hand to the hub". A message is committed
//! with the mailbox entries of every addressed device before anyone hears of it; only then are
//! the entries handed to connected devices. A lost hand-off delays an entry until the device's
//! next drain; it never loses it.

use std::sync::Arc;

use tern_proto::frames::{self, peer};
use tern_proto::{ErrorCode, Limits, validate};
use tern_store::{
    AddressedDevice, DeviceAuth, MailboxLimit, NewMessage, PostOutcome, Store, Target,
};

use crate::delivery::Hub;
use crate::error::ApiError;
use crate::ratelimit::RateLimiter;
use crate::services::Clock;

pub struct Messaging {
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    clock: Arc<dyn Clock>,
    rate_limits: Arc<dyn RateLimiter>,
    limits: Limits,
    mailbox: MailboxLimit,
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
        hub: Arc<Hub>,
        clock: Arc<dyn Clock>,
        rate_limits: Arc<dyn RateLimiter>,
        limits: Limits,
        mailbox: MailboxLimit,
    ) -> Self {
        Messaging {
            store,
            hub,
            clock,
            rate_limits,
            limits,
            mailbox,
        }
    }

    /// Checks a `Send` against the limits and turns it into a post.
    fn validate(&self, who: &DeviceAuth, send: frames::Send) -> Result<NewMessage, ApiError> {
        validate::client_msg_id(&send.client_msg_id).map_err(ApiError::bad_request)?;
        let to = target(send.to.as_ref())?;
        let max = self.limits.max_body_bytes;
        let too_large = |n: usize| {
            ApiError::new(
                ErrorCode::TooLarge,
                format!("a body of {n} bytes exceeds the limit of {max}"),
            )
        };
        if send.body.len() > max {
            return Err(too_large(send.body.len()));
        }
        // A send addresses at most every device of two users.
        if send.devices.len() > 2 * self.limits.max_devices_per_user {
            return Err(ApiError::bad_request("too many devices addressed"));
        }
        let mut devices = Vec::with_capacity(send.devices.len());
        for d in send.devices {
            if let Some(b) = &d.body
                && b.len() > max
            {
                return Err(too_large(b.len()));
            }
            devices.push(AddressedDevice {
                device: d.device_id,
                body: d.body,
            });
        }
        Ok(NewMessage {
            sender: who.clone(),
            to,
            client_msg_id: send.client_msg_id,
            body: send.body,
            devices,
            now_ms: self.clock.now_ms(),
            mailbox: self.mailbox,
        })
    }

    /// Validates and stores several messages of one device, in order, in one store call (so
    /// they share one commit), then hands them to connected devices. One answer per message:
    /// a refused message does not affect the others — except the device's send rate: once
    /// one message is refused for it, the rest of the batch is too, so that a device's
    /// messages keep the order it sent them in when it retries.
    pub async fn send_many(
        &self,
        who: &DeviceAuth,
        sends: Vec<frames::Send>,
    ) -> Vec<Result<SendReceipt, ApiError>> {
        let mut answers: Vec<Option<Result<SendReceipt, ApiError>>> =
            Vec::with_capacity(sends.len());
        let mut posts = Vec::with_capacity(sends.len());
        let (allowed, wait) = self.rate_limits.sends(who.device_id, sends.len()).await;
        let throttled = wait.map(|wait| {
            ApiError::rate_limited("this device is sending too fast; retry later", wait)
        });
        for (i, send) in sends.into_iter().enumerate() {
            if i >= allowed
                && let Some(e) = &throttled
            {
                answers.push(Some(Err(e.clone())));
                continue;
            }
            match self.validate(who, send) {
                Ok(post) => {
                    posts.push(post);
                    answers.push(None);
                }
                Err(e) => answers.push(Some(Err(e))),
            }
        }
        let stored = if posts.is_empty() {
            Ok(Vec::new())
        } else {
            self.store.post_messages(posts).await
        };
        let mut outcomes = match stored {
            Ok(v) => v.into_iter(),
            Err(e) => {
                let e = ApiError::from(e);
                return answers
                    .into_iter()
                    .map(|a| a.unwrap_or_else(|| Err(e.clone())))
                    .collect();
            }
        };
        answers
            .into_iter()
            .map(|a| match a {
                Some(refused) => refused,
                None => match outcomes.next() {
                    Some(Ok(outcome)) => Ok(self.outcome(outcome)),
                    Some(Err(e)) => Err(e.into()),
                    None => Err(ApiError::new(
                        ErrorCode::Internal,
                        "internal error; retry later",
                    )),
                },
            })
            .collect()
    }

    fn outcome(&self, outcome: PostOutcome) -> SendReceipt {
        match outcome {
            PostOutcome::Stored {
                seq,
                server_ts_ms,
                deliveries,
            } => {
                metrics::counter!("tern_messages_stored_total").increment(1);
                self.hub.deliver(&deliveries);
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
        }
    }

    /// Acknowledges the device's mailbox up to `up_to`; delivered receipts go to the senders.
    pub async fn ack(&self, who: &DeviceAuth, up_to: u64) -> Result<(), ApiError> {
        let receipts = self
            .store
            .ack(who.clone(), up_to, self.clock.now_ms())
            .await?;
        self.hub.deliver(&receipts);
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
        self.hub.deliver(&receipts);
        Ok(())
    }
}
