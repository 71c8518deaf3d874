//! Reconnect delays: exponential growth with "full jitter" (a uniformly random delay between 0
//! and the current ceiling), so that thousands of clients dropped by one server restart do not
//! come back in lockstep. Pure apart from the random source, which tests can seed.

use std::time::Duration;

use rand::Rng;

#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        let initial = initial.max(Duration::from_millis(1));
        Backoff {
            initial,
            max: max.max(initial),
            attempt: 0,
        }
    }

    /// The ceiling for the current attempt: `initial * 2^attempt`, capped at `max`.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The next delay, drawn from `[0, ceiling]`, with `rng`.
    pub fn next_with<R: Rng + ?Sized>(&mut self, rng: &mut R) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rng.random_range(0..=ms))
    }

    pub fn next_delay(&mut self) -> Duration {
        self.next_with(&mut rand::rng())
    }

    /// The next delay, but never less than what the server asked for (`retry_after_ms` of an
    /// `Error` frame; 0: it said nothing).
    pub fn next_honouring(&mut self, retry_after_ms: u64) -> Duration {
        self.next_delay().max(Duration::from_millis(retry_after_ms))
    }

    /// After a connection that worked, start again from `initial`.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    use super::*;

    #[test]
    fn ceiling_doubles_up_to_the_max_and_delays_stay_below_it() {
        let mut b = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
        let mut rng = StdRng::seed_from_u64(7);
        let mut ceilings = Vec::new();
        for _ in 0..10 {
            let c = b.ceiling();
            ceilings.push(c.as_millis());
            let d = b.next_with(&mut rng);
            assert!(d <= c, "{d:?} > {c:?}");
        }
        assert_eq!(
            ceilings,
            [250, 500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        for _ in 0..100 {
            b.next_with(&mut rng);
        }
        assert_eq!(
            b.ceiling(),
            Duration::from_secs(30),
            "no overflow after many attempts"
        );
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(250));
    }

    #[test]
    fn jitter_spreads_the_delays() {
        let mut rng = StdRng::seed_from_u64(1);
        let delays: std::collections::HashSet<_> = (0..20)
            .map(|_| {
                Backoff::new(Duration::from_secs(1), Duration::from_secs(1)).next_with(&mut rng)
            })
            .collect();
        assert!(delays.len() > 10, "{delays:?}");
    }
}
