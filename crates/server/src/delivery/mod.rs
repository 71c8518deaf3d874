//! Live delivery: who holds which device, and the hand-off of new mailbox entries.
//!
//! The store is the truth; delivery is only the fast path. Handing an entry to a connection
//! never blocks and never fails the sender: if the device is not connected, the entry simply
//! waits in its mailbox. The parts:
//!
//! - [`outbox`]: the bounded queue between the hub and one connection;
//! - [`connections`]: this node's table of connections (device → outbox);
//! - [`directory`]: the cluster-wide view (device → node, online, last seen), behind a trait;
//! - [`bus`]: wake-ups and closes between nodes, behind a trait;
//! - [`Hub`]: what services and the gateway use. It asks the local table first and the
//!   directory only for what that cannot answer, so services do not know whether the node is
//!   alone or one of a cluster.
//!
//! In a cluster, an entry for a device not connected here becomes a wake-up `(device, mseq)`:
//! queued (bounded) for a forwarder task that looks the devices up in the directory, in one
//! round trip per batch, and sends each node the wake-ups of its devices. The receiving
//! connection reads the entries from the store. No wake-up is ever needed for correctness: a
//! connection registers in the directory *before* it drains its mailbox, and an entry is
//! committed *before* its device is looked up, so an entry is either found by the drain or
//! its device is found by the look-up.

pub mod bus;
pub mod connections;
pub mod directory;
pub mod outbox;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tern_store::{Delivery, DeviceId, MailboxItem, UserId};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use bus::{Bus, Inbox, Signal};
use connections::Connections;
use directory::{Directory, Elsewhere, Held};
pub use outbox::{CloseReason, Outbox};

/// Wake-ups waiting for the forwarder; past this they are dropped (and counted): the devices'
/// nodes find the entries at their next re-check.
const FORWARD_QUEUE: usize = 65_536;
/// Most wake-ups the forwarder looks up at once.
const FORWARD_BATCH: usize = 1024;

/// How often a cluster node renews its directory entries and re-reads every mailbox.
#[derive(Debug, Clone, Copy)]
pub struct ClusterTimings {
    /// Entries expire after this without renewal; they are renewed every third of it.
    pub entry_ttl: Duration,
    /// Every connection re-reads its mailbox this often, for wake-ups lost on the way.
    pub recheck: Duration,
}

struct Cluster {
    node: Arc<str>,
    bus: Arc<dyn Bus>,
    /// `(user, device, mseq, whether the entry may wake the device)`.
    forward: mpsc::Sender<(UserId, DeviceId, u64, bool)>,
}

pub struct Hub {
    connections: Connections,
    directory: Arc<dyn Directory>,
    cluster: Option<Cluster>,
    /// Where message entries for devices connected nowhere are reported (the pusher).
    offline: OnceLock<mpsc::Sender<(UserId, DeviceId)>>,
}

/// Whether a mailbox entry may wake its device: messages do, receipts alone do not (PROTOCOL.md
/// §10).
fn wakes(d: &Delivery) -> bool {
    matches!(d.entry.item, MailboxItem::Message(_))
}

impl Hub {
    /// A hub for a node that is alone.
    pub fn single_node() -> Hub {
        Hub {
            connections: Connections::default(),
            directory: Arc::new(directory::SingleNode),
            cluster: None,
            offline: OnceLock::new(),
        }
    }

    /// A hub for node `node` of a cluster, and the tasks that keep it: the forwarder of
    /// wake-ups, the reader of `inbox` (what the bus brings), the directory's renewal and the
    /// periodic re-check. They stop with `shutdown`.
    pub fn cluster(
        node: Arc<str>,
        directory: Arc<dyn Directory>,
        bus: Arc<dyn Bus>,
        inbox: Inbox,
        timings: ClusterTimings,
        shutdown: CancellationToken,
    ) -> Arc<Hub> {
        let (forward, queue) = mpsc::channel(FORWARD_QUEUE);
        let hub = Arc::new(Hub {
            connections: Connections::default(),
            directory,
            cluster: Some(Cluster { node, bus, forward }),
            offline: OnceLock::new(),
        });
        let tasks = [
            tokio::spawn(hub.clone().forwarder(queue)),
            tokio::spawn(hub.clone().reader(inbox)),
            tokio::spawn(hub.clone().upkeep(timings)),
        ];
        tokio::spawn(async move {
            shutdown.cancelled().await;
            for t in tasks {
                t.abort();
            }
        });
        hub
    }

    /// Registers a connection for a device; an older connection of the device, here or on
    /// another node, is closed ([`CloseReason::Replaced`]). Returns once the directory has
    /// it, so that a drain after this finds every entry no wake-up will announce.
    pub async fn register(&self, user: UserId, device: DeviceId, outbox: Arc<Outbox>) {
        let conn = outbox.id();
        self.connections.register(user, device, outbox);
        let held = Held { user, device, conn };
        match self.directory.claim(held).await {
            Ok(None) => {}
            Ok(Some(older)) => {
                let close = Signal::Close {
                    device,
                    conn: older.conn,
                    reason: CloseReason::Replaced,
                };
                self.signal(&older.node, &[close]).await;
            }
            Err(e) => directory_failed("claim", &e),
        }
    }

    /// Removes a connection if it is still the registered one; `at_ms` is its user's last seen.
    pub async fn unregister(&self, user: UserId, device: DeviceId, conn: u64, at_ms: i64) {
        if self.connections.unregister(user, device, conn)
            && let Err(e) = self
                .directory
                .release(Held { user, device, conn }, at_ms)
                .await
        {
            directory_failed("release", &e);
        }
    }

    /// Has message entries for devices connected nowhere reported to `sink` (once; later
    /// calls change nothing). Reports are dropped, and counted, when it is full.
    pub fn report_offline(&self, sink: mpsc::Sender<(UserId, DeviceId)>) {
        let _ = self.offline.set(sink);
    }

    fn offline(&self, user: UserId, device: DeviceId) {
        if let Some(sink) = self.offline.get()
            && sink.try_send((user, device)).is_err()
        {
            metrics::counter!("tern_push_reports_dropped_total").increment(1);
        }
    }

    /// Hands new mailbox entries to the connections holding their devices (in a cluster, to
    /// the forwarder for devices connected elsewhere); messages for devices connected
    /// nowhere are reported offline. Never waits.
    pub fn deliver(&self, deliveries: &[Delivery]) {
        let report = self.offline.get().is_some();
        let Some(cluster) = &self.cluster else {
            if !report {
                self.connections.push(deliveries, None);
                return;
            }
            let mut elsewhere = Vec::new();
            self.connections.push(deliveries, Some(&mut elsewhere));
            for d in elsewhere.into_iter().filter(|d| wakes(d)) {
                self.offline(d.user, d.device);
            }
            return;
        };
        let mut elsewhere = Vec::new();
        self.connections.push(deliveries, Some(&mut elsewhere));
        for d in elsewhere {
            if cluster
                .forward
                .try_send((d.user, d.device, d.entry.mseq, wakes(d)))
                .is_err()
            {
                metrics::counter!("tern_bus_wakeups_dropped_total").increment(1);
            }
        }
    }

    /// Closes the device's connection, wherever it is.
    pub async fn disconnect(&self, user: UserId, device: DeviceId, reason: CloseReason) {
        self.connections.close(device, None, reason);
        if self.cluster.is_none() {
            return;
        }
        match self.directory.locate(&[(user, device)]).await {
            Ok(found) => {
                if let Some(Some(holder)) = found.into_iter().next() {
                    let close = Signal::Close {
                        device,
                        conn: holder.conn,
                        reason,
                    };
                    self.signal(&holder.node, &[close]).await;
                }
            }
            Err(e) => directory_failed("locate", &e),
        }
    }

    /// Whether any device of the user is connected (to any node), and when the user was last
    /// seen leaving another node.
    pub async fn presence(&self, user: UserId) -> Elsewhere {
        let here = self.connections.is_online(user);
        if self.cluster.is_none() {
            return Elsewhere {
                online: here,
                last_seen_ms: None,
            };
        }
        match self.directory.elsewhere(user).await {
            Ok(e) => Elsewhere {
                online: here || e.online,
                ..e
            },
            Err(e) => {
                directory_failed("presence", &e);
                Elsewhere {
                    online: here,
                    last_seen_ms: None,
                }
            }
        }
    }

    /// Which of `devices` are connected, here or (in a cluster) on another node. When the
    /// directory does not answer, only this node's are: a device woken needlessly costs less
    /// than one not woken.
    pub async fn connected(&self, devices: &[(UserId, DeviceId)]) -> Vec<bool> {
        let mut here: Vec<bool> = devices
            .iter()
            .map(|&(_, d)| self.connections.holds(d))
            .collect();
        if self.cluster.is_none() || here.iter().all(|&h| h) {
            return here;
        }
        match self.directory.locate(devices).await {
            Ok(found) => {
                for (h, holder) in here.iter_mut().zip(found) {
                    *h |= holder.is_some();
                }
            }
            Err(e) => directory_failed("locate", &e),
        }
        here
    }

    /// Whether any device of the user is connected (to any node).
    pub async fn is_online(&self, user: UserId) -> bool {
        self.presence(user).await.online
    }

    /// Whether the directory and the bus answer.
    pub async fn ready(&self) -> bool {
        let Some(cluster) = &self.cluster else {
            return true;
        };
        cluster.bus.is_connected() && self.directory.ping().await.is_ok()
    }

    /// Sends signals to a node: applied here when it is this one.
    async fn signal(&self, node: &str, signals: &[Signal]) {
        let Some(cluster) = &self.cluster else { return };
        if node == &*cluster.node {
            self.apply(signals);
        } else if let Err(e) = cluster.bus.send(node, signals).await {
            bus_failed(&e);
        }
    }

    fn apply(&self, signals: &[Signal]) {
        for s in signals {
            match *s {
                Signal::Wake { device, mseq } => self.connections.wake(device, mseq),
                Signal::Close {
                    device,
                    conn,
                    reason,
                } => self.connections.close(device, Some(conn), reason),
            }
        }
    }

    /// Looks up the nodes of queued wake-ups, a batch at a time, and signals them; reports
    /// the devices connected nowhere.
    async fn forwarder(self: Arc<Self>, mut queue: mpsc::Receiver<(UserId, DeviceId, u64, bool)>) {
        let Some(cluster) = &self.cluster else { return };
        let mut batch = Vec::with_capacity(FORWARD_BATCH);
        while queue.recv_many(&mut batch, FORWARD_BATCH).await > 0 {
            // The highest mseq per device is the only one that matters.
            let mut highest: HashMap<DeviceId, (UserId, u64, bool)> = HashMap::new();
            for (user, device, mseq, wakes) in batch.drain(..) {
                let e = highest.entry(device).or_insert((user, mseq, wakes));
                e.1 = e.1.max(mseq);
                e.2 |= wakes;
            }
            let devices: Vec<(UserId, DeviceId)> =
                highest.iter().map(|(&d, &(u, _, _))| (u, d)).collect();
            let wake = |device: DeviceId| Signal::Wake {
                device,
                mseq: highest[&device].1,
            };
            match self.directory.locate(&devices).await {
                Ok(holders) => {
                    let mut by_node: HashMap<Arc<str>, Vec<Signal>> = HashMap::new();
                    for (&(user, device), holder) in devices.iter().zip(holders) {
                        match holder {
                            // Connected here since: its drain reads the entry.
                            Some(h) if h.node == cluster.node => {}
                            Some(h) => by_node.entry(h.node).or_default().push(wake(device)),
                            None if highest[&device].2 => self.offline(user, device),
                            None => {}
                        }
                    }
                    for (node, signals) in by_node {
                        for chunk in signals.chunks(bus::MAX_BATCH) {
                            if let Err(e) = cluster.bus.send(&node, chunk).await {
                                bus_failed(&e);
                            }
                        }
                    }
                }
                Err(e) => {
                    // Without the directory, every node checks its own table.
                    directory_failed("locate", &e);
                    let signals: Vec<Signal> = devices.iter().map(|&(_, d)| wake(d)).collect();
                    for chunk in signals.chunks(bus::MAX_BATCH) {
                        if let Err(e) = cluster.bus.broadcast(chunk).await {
                            bus_failed(&e);
                        }
                    }
                }
            }
        }
    }

    /// Applies what the bus brings.
    async fn reader(self: Arc<Self>, mut inbox: Inbox) {
        loop {
            tokio::select! {
                signals = inbox.signals.recv() => match signals {
                    Some(signals) => self.apply(&signals),
                    None => return,
                },
                _ = inbox.maybe_lost.notified() => {
                    metrics::counter!("tern_bus_rechecks_total", "why" => "bus").increment(1);
                    self.connections.wake_all();
                }
            }
        }
    }

    /// Renews this node's directory entries (closing connections another node took over
    /// meanwhile, and having those whose entries the directory lost re-read their mailboxes)
    /// and has every connection re-read its mailbox now and then.
    async fn upkeep(self: Arc<Self>, timings: ClusterTimings) {
        let mut renew = tokio::time::interval(timings.entry_ttl / 3);
        let mut recheck = tokio::time::interval(timings.recheck);
        renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        recheck.tick().await;
        loop {
            tokio::select! {
                _ = renew.tick() => {
                    let held = self.connections.held();
                    match self.directory.refresh(&held).await {
                        Ok(renewal) => {
                            for h in renewal.lost {
                                self.connections.close(h.device, Some(h.conn), CloseReason::Replaced);
                            }
                            if !renewal.restored.is_empty() {
                                metrics::counter!("tern_bus_rechecks_total", "why" => "directory").increment(1);
                            }
                            for h in renewal.restored {
                                self.connections.wake(h.device, u64::MAX);
                            }
                        }
                        Err(e) => directory_failed("refresh", &e),
                    }
                }
                _ = recheck.tick() => {
                    metrics::counter!("tern_bus_rechecks_total", "why" => "interval").increment(1);
                    self.connections.wake_all();
                }
            }
        }
    }
}

fn directory_failed(op: &'static str, e: &directory::DirectoryError) {
    metrics::counter!("tern_directory_errors_total", "op" => op).increment(1);
    tracing::warn!(error = %e, op, "connection directory call failed");
}

fn bus_failed(e: &bus::BusError) {
    metrics::counter!("tern_bus_errors_total").increment(1);
    tracing::warn!(error = %e, "bus send failed");
}
