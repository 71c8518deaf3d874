//! When a device is woken by a push (PROTOCOL.md §10): the hub reports message entries for
//! devices connected nowhere; the pusher claims a push in the store, which decides by one rule
//! for every node ([`tern_store::logic::push_decision`]: one push per burst, none while the
//! last is unanswered, at most one per coalescing window) and sends it through the
//! [`Provider`].
//!
//! Nothing here is needed for a push to be sent eventually: reports are a fast path, dropped
//! when the queue is full. The store is the truth: every node looks there for devices owed a
//! push (at start, after one window, and every `scan_secs`), so a push still goes out after a
//! restart, a full queue or a push service that was down. A claim its sender never settles
//! (the node died mid-way) counts as abandoned after the longest a send can take.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use tern_store::{DeviceId, PushClaim, PushRules, PushSubscription, Store, UserId};
use tokio::sync::{Semaphore, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Clock;
use crate::config::PushConfig;
use crate::delivery::Hub;
use crate::push::{Outcome, Provider, Urgency, Wake};

/// Reports waiting for the pusher; past this they are dropped (the scan finds them).
pub const REPORT_QUEUE: usize = 65_536;
/// Devices scheduled at once; past this, reports are dropped (the scan finds them).
const MAX_SCHEDULED: usize = 262_144;
/// Devices decided in one store call.
const BATCH: usize = 256;
/// Candidates read from the store per page of a scan.
const SCAN_PAGE: usize = 1_000;
/// Settled claims are written in batches, at most this often: a batch is one commit instead
/// of one per push. Settles lost in a crash only make their claims count as abandoned sooner.
const SETTLE_EVERY: Duration = Duration::from_millis(200);
/// Most settles written at once.
const SETTLE_BATCH: usize = 4096;
/// The RFC 8030 topic of message wake-ups: a push service holding an undelivered one
/// replaces it with the next.
const TOPIC: &str = "messages";

/// The rule's times, from the configuration.
pub fn rules(config: &PushConfig) -> PushRules {
    // The longest one send can take: every attempt timing out, every wait at its longest.
    let attempts = u64::from(config.max_attempts);
    let longest_send =
        attempts * config.request_timeout_secs + attempts.saturating_sub(1) * config.retry_max_secs;
    PushRules {
        window_ms: config.coalesce_ms as i64,
        unanswered_ms: (config.ttl_secs * 1000) as i64,
        abandoned_ms: ((longest_send + 60) * 1000) as i64,
    }
}

/// Starts the pusher; the hub reports to it from now on. It stops with `shutdown`.
pub fn start(
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    clock: Arc<dyn Clock>,
    provider: Arc<dyn Provider>,
    config: &PushConfig,
    shutdown: CancellationToken,
) {
    let (sink, reports) = mpsc::channel(REPORT_QUEUE);
    hub.report_offline(sink);
    let (settle, settles) = mpsc::channel(SETTLE_BATCH);
    // Runs until every sender is gone: the pusher's and its sends' in flight.
    tokio::spawn(settler(store.clone(), settles));
    let pusher = Pusher {
        settle,
        store,
        hub,
        clock,
        provider,
        rules: rules(config),
        scan_every: Duration::from_secs(config.scan_secs),
        first_scan: Duration::from_millis(config.coalesce_ms),
        in_flight: Arc::new(Semaphore::new(config.concurrency)),
        scheduled: HashMap::new(),
        due: BTreeSet::new(),
    };
    tokio::spawn(async move {
        tokio::select! {
            _ = pusher.run(reports) => {}
            _ = shutdown.cancelled() => {}
        }
    });
}

struct Pusher {
    settle: mpsc::Sender<(DeviceId, u64, bool)>,
    store: Arc<dyn Store>,
    hub: Arc<Hub>,
    clock: Arc<dyn Clock>,
    provider: Arc<dyn Provider>,
    rules: PushRules,
    scan_every: Duration,
    first_scan: Duration,
    in_flight: Arc<Semaphore>,
    /// Devices waiting for their turn, with when it is.
    scheduled: HashMap<DeviceId, (UserId, Instant)>,
    due: BTreeSet<(Instant, DeviceId)>,
}

impl Pusher {
    async fn run(mut self, mut reports: mpsc::Receiver<(UserId, DeviceId)>) {
        let mut scan = tokio::time::interval_at(Instant::now() + self.first_scan, self.scan_every);
        scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut received = Vec::with_capacity(BATCH);
        loop {
            let next = self.due.first().map(|&(at, _)| at);
            tokio::select! {
                n = reports.recv_many(&mut received, BATCH) => {
                    if n == 0 {
                        return;
                    }
                    let now = Instant::now();
                    for (user, device) in received.drain(..) {
                        self.schedule(user, device, now);
                    }
                }
                _ = sleep_until(next) => self.decide().await,
                _ = scan.tick() => self.scan().await,
            }
        }
    }

    /// Schedules a device at `at`, unless it is scheduled already (its turn comes).
    fn schedule(&mut self, user: UserId, device: DeviceId, at: Instant) {
        if self.scheduled.contains_key(&device) {
            return;
        }
        if self.scheduled.len() >= MAX_SCHEDULED {
            metrics::counter!("tern_push_reports_dropped_total").increment(1);
            return;
        }
        self.scheduled.insert(device, (user, at));
        self.due.insert((at, device));
    }

    /// Decides the devices whose turn has come: those connected after all are skipped, the
    /// others' pushes claimed in one store call, and the claimed ones sent.
    async fn decide(&mut self) {
        let now = Instant::now();
        let mut batch = Vec::with_capacity(BATCH);
        while batch.len() < BATCH
            && let Some(&(at, device)) = self.due.first()
            && at <= now
        {
            self.due.pop_first();
            if let Some((user, _)) = self.scheduled.remove(&device) {
                batch.push((user, device));
            }
        }
        if batch.is_empty() {
            return;
        }
        let connected = self.hub.connected(&batch).await;
        let offline: Vec<(UserId, DeviceId)> = batch
            .into_iter()
            .zip(connected)
            .filter_map(|(d, c)| (!c).then_some(d))
            .collect();
        if offline.is_empty() {
            return;
        }
        let devices = offline.iter().map(|&(_, d)| d).collect();
        let claims = match self
            .store
            .claim_pushes(devices, self.clock.now_ms(), self.rules)
            .await
        {
            Ok(claims) => claims,
            Err(e) => {
                // The scan asks again.
                tracing::warn!(error = %e, "cannot claim pushes");
                return;
            }
        };
        for ((user, device), claim) in offline.into_iter().zip(claims) {
            match claim {
                PushClaim::Nothing => {
                    metrics::counter!("tern_push_claims_total", "outcome" => "nothing")
                        .increment(1);
                }
                PushClaim::NotBefore { at_ms } => {
                    metrics::counter!("tern_push_claims_total", "outcome" => "later").increment(1);
                    let wait = (at_ms - self.clock.now_ms()).max(0) as u64;
                    self.schedule(user, device, now + Duration::from_millis(wait));
                }
                PushClaim::Send {
                    subscription,
                    mseq,
                    waiting,
                    since_ms,
                } => {
                    metrics::counter!("tern_push_claims_total", "outcome" => "send").increment(1);
                    // Waits while `concurrency` pushes are in flight: reports queue meanwhile.
                    let Ok(permit) = self.in_flight.clone().acquire_owned().await else {
                        return;
                    };
                    let (store, provider, clock, settle) = (
                        self.store.clone(),
                        self.provider.clone(),
                        self.clock.clone(),
                        self.settle.clone(),
                    );
                    tokio::spawn(async move {
                        let claim = Claim {
                            device,
                            subscription,
                            mseq,
                            waiting,
                        };
                        let settled = send(&*store, &*provider, claim).await;
                        if let Some((_, _, true)) = settled
                            && let Some(since) = since_ms
                        {
                            let delay = (clock.now_ms() - since).max(0) as f64 / 1000.0;
                            metrics::histogram!("tern_push_delay_seconds").record(delay);
                        }
                        drop(permit);
                        if let Some(s) = settled {
                            let _ = settle.send(s).await;
                        }
                    });
                }
            }
        }
    }

    /// Schedules every device the store says may be owed a push.
    async fn scan(&mut self) {
        let now_ms = self.clock.now_ms();
        let mut after = 0;
        let mut found = 0usize;
        loop {
            let page = match self
                .store
                .push_candidates(now_ms, self.rules, after, SCAN_PAGE)
                .await
            {
                Ok(page) => page,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot look for devices owed a push");
                    return;
                }
            };
            let now = Instant::now();
            for &(user, device) in &page {
                self.schedule(user, device, now);
            }
            found += page.len();
            match page.last() {
                Some(&(_, last)) if page.len() == SCAN_PAGE => after = last,
                _ => break,
            }
        }
        if found > 0 {
            metrics::counter!("tern_push_scan_found_total").increment(found as u64);
            tracing::debug!(found, "devices owed a push");
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The wake-up: how many messages wait and a random id, nothing else (no sender, no
/// conversation, no content). Encrypted for the device before it leaves.
fn wake(waiting: u32) -> Wake {
    let id: [u8; 8] = rand::random();
    Wake {
        payload: format!(r#"{{"n":{waiting},"id":"{}"}}"#, hex::encode(id)).into_bytes(),
        urgency: Urgency::High,
        topic: Some(TOPIC.to_owned()),
    }
}

/// A push claimed in the store.
struct Claim {
    device: DeviceId,
    subscription: PushSubscription,
    mseq: u64,
    waiting: u32,
}

/// Sends one claimed push; how to settle the claim by what became of it (`(device, mseq,
/// sent)`; `None` once the subscription is gone and removed, claim and all).
async fn send(
    store: &dyn Store,
    provider: &dyn Provider,
    claim: Claim,
) -> Option<(DeviceId, u64, bool)> {
    let Claim {
        device,
        subscription,
        mseq,
        waiting,
    } = claim;
    match provider.send(&subscription, &wake(waiting)).await {
        Outcome::Delivered { .. } => Some((device, mseq, true)),
        Outcome::Gone => {
            tracing::info!(device, "push subscription gone; removed");
            if let Err(e) = store
                .remove_push_subscription(device, Some(&subscription.endpoint))
                .await
            {
                tracing::warn!(device, error = %e, "cannot remove a gone push subscription");
            }
            None
        }
        Outcome::Failed {
            permanent, reason, ..
        } => {
            tracing::warn!(device, permanent, %reason, "push failed");
            // Refused for good: retrying would be refused again, so the claim stands (until
            // it counts as lost). Failing for now: released, for the next message or scan.
            Some((device, mseq, permanent))
        }
    }
}

/// Writes settled claims in batches, at most every [`SETTLE_EVERY`].
async fn settler(store: Arc<dyn Store>, mut settles: mpsc::Receiver<(DeviceId, u64, bool)>) {
    let mut batch = Vec::with_capacity(SETTLE_BATCH);
    while settles.recv_many(&mut batch, SETTLE_BATCH).await > 0 {
        let n = batch.len();
        if let Err(e) = store.settle_pushes(std::mem::take(&mut batch)).await {
            // The claims stay unsettled: they count as abandoned after their time.
            tracing::warn!(error = %e, settles = n, "cannot settle pushes");
        }
        tokio::time::sleep(SETTLE_EVERY).await;
    }
}
