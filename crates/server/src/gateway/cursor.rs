//! The ordering rule of a connection, free of I/O.
//!
//! A device's mailbox entries are numbered 1, 2, 3, … in commit order (consecutive, per device).
//! Live hand-offs can reach a connection out of order or not at all (two commits racing to the
//! hub, a lost bus message in a cluster); the store cannot. So the connection remembers the
//! last mailbox sequence it sent and, for each live entry, decides:
//!
//! - `mseq <= sent`: already sent (by the drain or a gap fill): skip it;
//! - `mseq == sent + 1`: the next one: send it;
//! - `mseq > sent + 1`: entries are missing in between: read them from the store first.
//!   Commits are ordered, so everything below a committed entry is committed too.
//!
//! Subscribe-then-drain is the same rule: the connection registers for live entries first, then
//! drains from the store starting at `sent = 0` (acknowledged entries are gone from the store).

/// What to do with a live entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    Skip,
    Send,
    /// Read the store's entries with `after < mseq`, then continue.
    FillGap {
        after: u64,
    },
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    sent: u64,
}

impl Cursor {
    pub fn sent(&self) -> u64 {
        self.sent
    }

    pub fn classify(&self, mseq: u64) -> Next {
        if mseq <= self.sent {
            Next::Skip
        } else if mseq == self.sent + 1 {
            Next::Send
        } else {
            Next::FillGap { after: self.sent }
        }
    }

    /// Records that `mseq` was sent. Entries are sent in increasing order only.
    pub fn sent_up_to(&mut self, mseq: u64) {
        debug_assert!(mseq > self.sent, "entries are sent in order");
        self.sent = self.sent.max(mseq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Plays one connection: `committed` entries exist in the store when the drain runs after
    /// `drained_at` of them; live pushes arrive in the order `arrivals` (any order, some lost).
    fn play(total: u64, drained_at: u64, arrivals: &[u64]) -> Vec<u64> {
        let mut out = Vec::new();
        let mut cur = Cursor::default();
        // The drain: everything committed so far, in order.
        for m in 1..=drained_at {
            out.push(m);
            cur.sent_up_to(m);
        }
        for &m in arrivals {
            match cur.classify(m) {
                Next::Skip => {}
                Next::Send => {
                    out.push(m);
                    cur.sent_up_to(m);
                }
                Next::FillGap { after } => {
                    // The store holds every entry up to the newest commit, which is >= m.
                    for g in after + 1..=m {
                        out.push(g);
                        cur.sent_up_to(g);
                    }
                }
            }
        }
        // A final resync (the next connection or the next live entry) reaches the end.
        for m in cur.sent() + 1..=total {
            out.push(m);
        }
        out
    }

    proptest! {
        #[test]
        fn every_entry_once_and_in_order(
            total in 0u64..60,
            drained_frac in 0.0f64..1.0,
            order in proptest::collection::vec(any::<u64>(), 0..60),
            lost in proptest::collection::vec(any::<bool>(), 60),
        ) {
            let drained_at = (total as f64 * drained_frac) as u64;
            // Live pushes: every entry, shuffled by `order`, some lost.
            let mut arrivals: Vec<u64> = (1..=total).filter(|m| !lost[*m as usize % 60]).collect();
            for (i, k) in order.iter().enumerate() {
                if arrivals.len() > 1 {
                    let (a, b) = (i % arrivals.len(), (*k as usize) % arrivals.len());
                    arrivals.swap(a, b);
                }
            }
            let out = play(total, drained_at, &arrivals);
            prop_assert_eq!(out, (1..=total).collect::<Vec<_>>());
        }
    }

    #[test]
    fn table() {
        let mut c = Cursor::default();
        assert_eq!(c.classify(1), Next::Send);
        assert_eq!(c.classify(3), Next::FillGap { after: 0 });
        c.sent_up_to(3);
        assert_eq!(c.classify(2), Next::Skip);
        assert_eq!(c.classify(4), Next::Send);
    }
}
