//! Leases on the store ([`Store::take_lease`]): what keeps two nodes (or two requests) from
//! writing one upload, publishing and collecting one object, or collecting garbage, at once.
//!
//! A lease is taken for [`TTL`] and renewed in the background every third of it while its
//! guard lives; dropping the guard gives it up. A node that dies holds its leases until they
//! expire, so a lease is as long as the work it covers may stall, and no longer.
//!
//! A holder counts its lease as lost ([`Lease::lost`]) when a renewal finds it taken, and also
//! when no renewal has succeeded for `TTL - MARGIN` by its own monotonic clock (the store
//! unreachable, the process stalled): it stops before another node can take the lease over,
//! with [`MARGIN`] to spare for clock skew between the nodes and work already in flight. The
//! nodes' clocks must agree within a few seconds (NTP).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::RngCore;
use tern_store::{Store, StoreError};

use crate::services::Clock;

/// How long a lease lasts without renewal.
pub const TTL: Duration = Duration::from_secs(15);

/// How long before its expiry a holder that could not renew stops counting on its lease.
pub const MARGIN: Duration = Duration::from_secs(5);

/// Takes leases on behalf of one process; holders are named `<process>-<n>`.
pub struct Leases {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    process: String,
    next: AtomicU64,
}

impl Leases {
    pub fn new(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Leases {
        let mut raw = [0u8; 8];
        rand::rng().fill_bytes(&mut raw);
        Leases {
            store,
            clock,
            process: hex::encode(raw),
            next: AtomicU64::new(0),
        }
    }

    /// Lease `name`, if nobody else holds it.
    pub async fn try_take(&self, name: String) -> Result<Option<Lease>, StoreError> {
        let holder = format!(
            "{}-{}",
            self.process,
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        let asked = Instant::now();
        let now = self.clock.now_ms();
        if !self
            .store
            .take_lease(&name, &holder, now, now + TTL.as_millis() as i64)
            .await?
        {
            return Ok(None);
        }
        let held = Arc::new(Held {
            lost: AtomicBool::new(false),
            renewed: Mutex::new(asked),
        });
        let renew = tokio::spawn(renew(
            self.store.clone(),
            self.clock.clone(),
            name.clone(),
            holder.clone(),
            held.clone(),
        ));
        Ok(Some(Lease {
            store: self.store.clone(),
            name,
            holder,
            held,
            renew,
        }))
    }

    /// Lease `name`, waiting up to `patience` for its holder to give it up.
    pub async fn take(
        &self,
        name: String,
        patience: Duration,
    ) -> Result<Option<Lease>, StoreError> {
        let deadline = tokio::time::Instant::now() + patience;
        let mut pause = Duration::from_millis(10);
        loop {
            if let Some(lease) = self.try_take(name.clone()).await? {
                return Ok(Some(lease));
            }
            if tokio::time::Instant::now() + pause > deadline {
                return Ok(None);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    /// Deletes the leases of holders that died, long expired.
    pub async fn forget_expired(&self) -> Result<usize, StoreError> {
        let long_ago = self.clock.now_ms() - 4 * TTL.as_millis() as i64;
        self.store.forget_expired_leases(long_ago).await
    }
}

/// What a lease's guard and its renewal task share.
struct Held {
    /// A renewal found the lease gone or taken.
    lost: AtomicBool,
    /// When the last successful take or renewal was asked for.
    renewed: Mutex<Instant>,
}

impl Held {
    fn lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
            || self
                .renewed
                .lock()
                .map_or(true, |at| at.elapsed() >= TTL - MARGIN)
    }
}

async fn renew(
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    name: String,
    holder: String,
    held: Arc<Held>,
) {
    let mut tick = tokio::time::interval(TTL / 3);
    tick.tick().await;
    loop {
        tick.tick().await;
        let asked = Instant::now();
        let now = clock.now_ms();
        match store
            .renew_lease(&name, &holder, now, now + TTL.as_millis() as i64)
            .await
        {
            Ok(true) => {
                if let Ok(mut at) = held.renewed.lock() {
                    *at = asked;
                }
            }
            Ok(false) => {
                tracing::warn!(lease = %name, "a lease expired or was taken over");
                held.lost.store(true, Ordering::Release);
                return;
            }
            // The lease may still run; the next tick tries again, and `lost` turns true by
            // itself once too long has passed without a renewal.
            Err(e) => tracing::warn!(lease = %name, error = %e, "cannot renew a lease"),
        }
    }
}

/// Whether a lease held elsewhere is still good ([`Lease::watch`]).
#[derive(Clone, Default)]
pub struct LeaseWatch(Option<Arc<Held>>);

impl LeaseWatch {
    /// [`Lease::lost`]; a watch made with `default()` covers work that needs no lease.
    pub fn lost(&self) -> bool {
        self.0.as_ref().is_some_and(|h| h.lost())
    }
}

/// A held lease; dropping it gives the lease up.
pub struct Lease {
    store: Arc<dyn Store>,
    name: String,
    holder: String,
    held: Arc<Held>,
    renew: tokio::task::JoinHandle<()>,
}

impl Lease {
    /// Whether the lease is gone, or may be about to go: taken over, or not renewed for
    /// `TTL - MARGIN`. The work it covers must stop before its next step.
    pub fn lost(&self) -> bool {
        self.held.lost()
    }

    /// A handle that answers [`Lease::lost`] for work done away from the guard.
    pub fn watch(&self) -> LeaseWatch {
        LeaseWatch(Some(self.held.clone()))
    }

    /// Gives the lease up now (dropping the guard does so in the background: a request that
    /// follows at once would still find it held).
    pub async fn release(mut self) {
        self.renew.abort();
        let (name, holder) = (
            std::mem::take(&mut self.name),
            std::mem::take(&mut self.holder),
        );
        if let Err(e) = self.store.release_lease(&name, &holder).await {
            tracing::debug!(lease = %name, error = %e, "cannot give a lease up");
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renew.abort();
        if self.holder.is_empty() {
            return;
        }
        let (store, name, holder) = (
            self.store.clone(),
            std::mem::take(&mut self.name),
            std::mem::take(&mut self.holder),
        );
        // Giving up is best effort: a lease not given up expires by itself.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = store.release_lease(&name, &holder).await {
                    tracing::debug!(lease = %name, error = %e, "cannot give a lease up");
                }
            });
        }
    }
}
