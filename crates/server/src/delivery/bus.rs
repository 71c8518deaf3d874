//! Signals between nodes: "device D's mailbox holds entries up to mseq M" and "close this
//! connection". A signal never carries a message: the receiving connection reads the entries
//! from the store, so a lost signal only delays (a node re-reads every connection's mailbox
//! when its bus reconnects or reports an overflow, and every `[cluster] recheck_secs`).
//!
//! The wire form is a protobuf batch ([`encode`], [`decode`]); the transport is NATS
//! ([`crate::cluster::nats`]).

use async_trait::async_trait;
use prost::Message;
use tern_store::DeviceId;

use super::outbox::CloseReason;

/// One signal for a node's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// The device's mailbox holds entries up to `mseq`.
    Wake { device: DeviceId, mseq: u64 },
    /// Close the device's connection `conn` (only that one: a newer one may be there already).
    Close {
        device: DeviceId,
        conn: u64,
        reason: CloseReason,
    },
}

/// What a node's bus hands to its hub: the signals for this node, and a notice, kept until
/// taken, that signals may have been lost (the bus reconnected, or this node read too slowly),
/// after which every connection here re-reads its mailbox.
pub struct Inbox {
    pub signals: tokio::sync::mpsc::Receiver<Vec<Signal>>,
    pub maybe_lost: std::sync::Arc<tokio::sync::Notify>,
}

/// The bus could not take a signal. Delivery goes on without it (module docs).
#[derive(Debug, Clone, thiserror::Error)]
#[error("bus unavailable: {0}")]
pub struct BusError(pub String);

#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Sends signals to one node.
    async fn send(&self, node: &str, signals: &[Signal]) -> Result<(), BusError>;
    /// Sends signals to every node (when the directory cannot say which holds a device).
    async fn broadcast(&self, signals: &[Signal]) -> Result<(), BusError>;
    /// Whether the bus is connected now (for readiness).
    fn is_connected(&self) -> bool;
}

#[derive(Clone, PartialEq, prost::Message)]
struct WireBatch {
    #[prost(message, repeated, tag = "1")]
    signals: Vec<WireSignal>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct WireSignal {
    #[prost(uint64, tag = "1")]
    device: u64,
    /// Wake: the mailbox sequence.
    #[prost(uint64, tag = "2")]
    mseq: u64,
    /// Close: the connection.
    #[prost(uint64, tag = "3")]
    conn: u64,
    /// 0: wake; else a close, by reason (1 slow consumer, 2 revoked, 3 replaced).
    #[prost(uint32, tag = "4")]
    close: u32,
}

/// Most signals in one bus message: a batch is split beyond it.
pub const MAX_BATCH: usize = 4096;

pub fn encode(signals: &[Signal]) -> Vec<u8> {
    let signals = signals
        .iter()
        .map(|s| match *s {
            Signal::Wake { device, mseq } => WireSignal {
                device,
                mseq,
                ..Default::default()
            },
            Signal::Close {
                device,
                conn,
                reason,
            } => WireSignal {
                device,
                conn,
                close: match reason {
                    CloseReason::SlowConsumer => 1,
                    CloseReason::Revoked => 2,
                    CloseReason::Replaced => 3,
                },
                ..Default::default()
            },
        })
        .collect();
    WireBatch { signals }.encode_to_vec()
}

/// Decodes a batch; `None` for bytes that are not one (or hold more than [`MAX_BATCH`]).
pub fn decode(bytes: &[u8]) -> Option<Vec<Signal>> {
    let batch = WireBatch::decode(bytes).ok()?;
    if batch.signals.len() > MAX_BATCH {
        return None;
    }
    batch
        .signals
        .into_iter()
        .map(|w| {
            let reason = match w.close {
                0 => {
                    return Some(Signal::Wake {
                        device: w.device,
                        mseq: w.mseq,
                    });
                }
                1 => CloseReason::SlowConsumer,
                2 => CloseReason::Revoked,
                3 => CloseReason::Replaced,
                _ => return None,
            };
            Some(Signal::Close {
                device: w.device,
                conn: w.conn,
                reason,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_round_trip_and_garbage_is_refused() {
        let signals = vec![
            Signal::Wake { device: 7, mseq: 9 },
            Signal::Close {
                device: 8,
                conn: 3,
                reason: CloseReason::Replaced,
            },
            Signal::Close {
                device: 1,
                conn: 2,
                reason: CloseReason::Revoked,
            },
        ];
        assert_eq!(decode(&encode(&signals)), Some(signals));
        assert_eq!(decode(&[0xff, 0xff, 0xff]), None);
        let unknown = WireBatch {
            signals: vec![WireSignal {
                close: 99,
                ..Default::default()
            }],
        };
        assert_eq!(decode(&unknown.encode_to_vec()), None);
    }
}
