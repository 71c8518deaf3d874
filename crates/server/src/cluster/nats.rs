//! The bus between nodes on NATS core (publish/subscribe, at most once): each node listens on
//! `<prefix>.node.<node id>` for its own signals and on `<prefix>.all` for broadcasts. Losing a
//! signal only delays (see [`crate::delivery::bus`]), so nothing here needs JetStream: when
//! the connection comes back, or NATS says this node read too slowly, the hub is told that
//! signals may have been lost and every connection re-reads its mailbox.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::{ConnectOptions, Event};
use async_trait::async_trait;
use futures_util::StreamExt;
use tokio::sync::{Notify, mpsc};

use crate::delivery::bus::{self, Bus, BusError, Inbox, Signal};

/// Events waiting for the hub; the subscription (and NATS's slow-consumer report) pushes
/// back beyond it.
const INBOX: usize = 1024;

pub struct NatsBus {
    client: async_nats::Client,
    prefix: String,
    connected: Arc<AtomicBool>,
}

fn failed(e: impl std::fmt::Display) -> BusError {
    BusError(e.to_string())
}

impl NatsBus {
    /// Connects and subscribes node `node`'s subjects; what arrives goes to the returned
    /// receiver. Fails if NATS does not answer within `timeout`; once connected, the client
    /// reconnects by itself for ever.
    pub async fn connect(
        url: &str,
        node: &str,
        prefix: &str,
        timeout: Duration,
    ) -> Result<(NatsBus, Inbox), BusError> {
        let (tx, rx) = mpsc::channel(INBOX);
        let maybe_lost = Arc::new(Notify::new());
        let connected = Arc::new(AtomicBool::new(false));
        let events = {
            let (lost, connected) = (maybe_lost.clone(), connected.clone());
            move |event: Event| {
                let (lost, connected) = (lost.clone(), connected.clone());
                async move {
                    match event {
                        Event::Connected => {
                            // The first connect too: harmless, nothing is connected yet.
                            connected.store(true, Ordering::Relaxed);
                            metrics::gauge!("tern_bus_connected").set(1.0);
                            lost.notify_one();
                        }
                        Event::Disconnected | Event::Closed => {
                            connected.store(false, Ordering::Relaxed);
                            metrics::gauge!("tern_bus_connected").set(0.0);
                            tracing::warn!("bus (NATS) disconnected");
                        }
                        Event::SlowConsumer(_) => {
                            metrics::counter!("tern_bus_slow_consumer_total").increment(1);
                            lost.notify_one();
                        }
                        other => tracing::info!(event = %other, "bus (NATS)"),
                    }
                }
            }
        };
        let client = ConnectOptions::new()
            .name(format!("ternd {node}"))
            .connection_timeout(timeout)
            .max_reconnects(None)
            .event_callback(events)
            .connect(url)
            .await
            .map_err(failed)?;
        connected.store(true, Ordering::Relaxed);
        metrics::gauge!("tern_bus_connected").set(1.0);
        for subject in [format!("{prefix}.node.{node}"), format!("{prefix}.all")] {
            let mut sub = client.subscribe(subject).await.map_err(failed)?;
            let tx = tx.clone();
            tokio::spawn(async move {
                while let Some(msg) = sub.next().await {
                    let Some(signals) = bus::decode(&msg.payload) else {
                        metrics::counter!("tern_bus_malformed_total").increment(1);
                        continue;
                    };
                    if tx.send(signals).await.is_err() {
                        return;
                    }
                }
            });
        }
        let bus = NatsBus {
            client,
            prefix: prefix.to_owned(),
            connected,
        };
        Ok((
            bus,
            Inbox {
                signals: rx,
                maybe_lost,
            },
        ))
    }

    async fn publish(&self, subject: String, signals: &[Signal]) -> Result<(), BusError> {
        if !self.is_connected() {
            // Queued in the client until it reconnects otherwise; the receivers re-read their
            // mailboxes when it does anyway.
            return Err(BusError("not connected".into()));
        }
        self.client
            .publish(subject, bus::encode(signals).into())
            .await
            .map_err(failed)?;
        metrics::counter!("tern_bus_signals_sent_total").increment(signals.len() as u64);
        Ok(())
    }
}

#[async_trait]
impl Bus for NatsBus {
    async fn send(&self, node: &str, signals: &[Signal]) -> Result<(), BusError> {
        self.publish(format!("{}.node.{node}", self.prefix), signals)
            .await
    }

    async fn broadcast(&self, signals: &[Signal]) -> Result<(), BusError> {
        self.publish(format!("{}.all", self.prefix), signals).await
    }

    fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
}
