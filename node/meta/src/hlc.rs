//! Hybrid logical clocks (Kulkarni et al., "Logical Physical Clocks", 2014).
//!
//! A [`Timestamp`] is physical milliseconds plus a logical counter; it never
//! runs backwards on one node, stays close to wall time, and advances past
//! every timestamp the node has observed, so causally later changes get
//! larger timestamps. A [`Version`] adds the origin (the writing site's id)
//! as the final tie-break, giving a total order that is the same everywhere.
//!
//! The clock takes wall time as an argument (`wall_ms`, milliseconds since
//! the Unix epoch): it reads no clock itself. Remote timestamps more than
//! `max_drift_ms` ahead of local wall time are refused with
//! [`HlcError::TooFarAhead`], so one site with a broken clock cannot drag
//! every other clock into the future.

use thiserror::Error;

/// A hybrid logical clock reading: physical milliseconds, then a logical
/// counter that orders events within the same millisecond.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp {
    /// Physical component: milliseconds since the Unix epoch.
    pub wall_ms: u64,
    /// Logical component: events within the same `wall_ms`.
    pub logical: u32,
}

impl Timestamp {
    /// A timestamp at `wall_ms` with logical counter 0.
    pub const fn from_millis(wall_ms: u64) -> Self {
        Timestamp {
            wall_ms,
            logical: 0,
        }
    }

    /// The next timestamp after this one.
    fn successor(self) -> Self {
        match self.logical.checked_add(1) {
            Some(logical) => Timestamp {
                wall_ms: self.wall_ms,
                logical,
            },
            None => Timestamp {
                wall_ms: self.wall_ms.saturating_add(1),
                logical: 0,
            },
        }
    }
}

/// The version of one record change: an HLC timestamp and the id of the site
/// that made the change. Ordered by timestamp, then origin: a total order,
/// identical on every site.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Version {
    /// When the change was made.
    pub ts: Timestamp,
    /// Who made it (see [`origin_id`]).
    pub origin: u64,
}

/// A stable 64-bit origin id for a site name (BLAKE3 of the name).
pub fn origin_id(site_name: &str) -> u64 {
    let h = blake3::hash(site_name.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.as_bytes()[..8]);
    u64::from_le_bytes(b)
}

/// Why a remote timestamp was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HlcError {
    /// The remote timestamp is further ahead of local wall time than the
    /// accepted drift.
    #[error("remote clock {remote_ms} ms is {ahead_ms} ms ahead of local wall time (accepted drift {max_drift_ms} ms)")]
    TooFarAhead {
        /// The remote physical time.
        remote_ms: u64,
        /// How far ahead of local wall time it is.
        ahead_ms: u64,
        /// The accepted drift.
        max_drift_ms: u64,
    },
}

/// A hybrid logical clock owned by one site.
#[derive(Debug, Clone)]
pub struct Hlc {
    origin: u64,
    last: Timestamp,
    max_drift_ms: u64,
}

/// Default accepted drift of remote clocks: one minute.
pub const DEFAULT_MAX_DRIFT_MS: u64 = 60_000;

impl Hlc {
    /// A clock for site `origin` that refuses remote timestamps more than
    /// `max_drift_ms` ahead of local wall time.
    pub fn new(origin: u64, max_drift_ms: u64) -> Self {
        Hlc {
            origin,
            last: Timestamp::default(),
            max_drift_ms,
        }
    }

    /// The site id this clock stamps versions with.
    pub fn origin(&self) -> u64 {
        self.origin
    }

    /// The largest timestamp issued or observed so far (persist it, and
    /// [`restore`](Self::restore) it after a restart).
    pub fn last(&self) -> Timestamp {
        self.last
    }

    /// The accepted drift in milliseconds.
    pub fn max_drift_ms(&self) -> u64 {
        self.max_drift_ms
    }

    /// Raises the clock to at least `persisted` (after a restart, so a node
    /// whose wall clock stepped back still never reissues a timestamp).
    pub fn restore(&mut self, persisted: Timestamp) {
        self.last = self.last.max(persisted);
    }

    /// A new timestamp for a local event at wall time `wall_ms`: strictly
    /// greater than every timestamp issued or observed before.
    pub fn now(&mut self, wall_ms: u64) -> Timestamp {
        self.last = if wall_ms > self.last.wall_ms {
            Timestamp::from_millis(wall_ms)
        } else {
            self.last.successor()
        };
        self.last
    }

    /// A new [`Version`] for a local change at wall time `wall_ms`.
    pub fn version(&mut self, wall_ms: u64) -> Version {
        Version {
            ts: self.now(wall_ms),
            origin: self.origin,
        }
    }

    /// Checks that `remote` is within the accepted drift of `wall_ms`,
    /// without changing the clock.
    pub fn check(&self, remote: Timestamp, wall_ms: u64) -> Result<(), HlcError> {
        let ahead = remote.wall_ms.saturating_sub(wall_ms);
        if ahead > self.max_drift_ms {
            return Err(HlcError::TooFarAhead {
                remote_ms: remote.wall_ms,
                ahead_ms: ahead,
                max_drift_ms: self.max_drift_ms,
            });
        }
        Ok(())
    }

    /// Merges a timestamp received from another site (a receive event) at
    /// local wall time `wall_ms`, returning the new local timestamp, which is
    /// greater than both `remote` and every earlier local timestamp. A remote
    /// timestamp too far in the future is refused and leaves the clock as
    /// it was.
    pub fn observe(&mut self, remote: Timestamp, wall_ms: u64) -> Result<Timestamp, HlcError> {
        self.check(remote, wall_ms)?;
        let wall = wall_ms.max(self.last.wall_ms).max(remote.wall_ms);
        let next = if wall == self.last.wall_ms && wall == remote.wall_ms {
            Timestamp {
                wall_ms: wall,
                logical: self.last.logical.max(remote.logical),
            }
            .successor()
        } else if wall == self.last.wall_ms {
            self.last.successor()
        } else if wall == remote.wall_ms {
            remote.successor()
        } else {
            Timestamp::from_millis(wall)
        };
        self.last = next;
        Ok(next)
    }

    /// Like [`observe`](Self::observe), but a timestamp too far ahead is
    /// clamped to the accepted drift instead of refused.
    pub fn observe_clamped(&mut self, remote: Timestamp, wall_ms: u64) -> Timestamp {
        let limit = wall_ms.saturating_add(self.max_drift_ms);
        let remote = if remote.wall_ms > limit {
            Timestamp::from_millis(limit)
        } else {
            remote
        };
        match self.observe(remote, wall_ms) {
            Ok(ts) => ts,
            // Unreachable after clamping; fall back to a local tick.
            Err(_) => self.now(wall_ms),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Ev {
        Local { node: usize, wall: u64 },
        Send { from: usize, to: usize, wall: u64 },
    }

    fn ev() -> impl Strategy<Value = Ev> {
        prop_oneof![
            (0..3usize, 0..5_000u64).prop_map(|(node, wall)| Ev::Local { node, wall }),
            (0..3usize, 0..3usize, 0..5_000u64).prop_map(|(from, to, wall)| Ev::Send {
                from,
                to,
                wall
            }),
        ]
    }

    proptest! {
        /// Timestamps issued by one clock strictly increase whatever wall
        /// time does, and observing a remote timestamp moves past it.
        #[test]
        fn monotonic_and_causal(events in proptest::collection::vec(ev(), 1..200)) {
            let mut clocks: Vec<Hlc> = (0..3).map(|i| Hlc::new(i, u64::MAX)).collect();
            let mut last = [Timestamp::default(); 3];
            for e in events {
                match e {
                    Ev::Local { node, wall } => {
                        let t = clocks[node].now(wall);
                        prop_assert!(t > last[node]);
                        prop_assert!(t.wall_ms >= wall);
                        last[node] = t;
                    }
                    Ev::Send { from, to, wall } => {
                        let sent = clocks[from].now(wall);
                        prop_assert!(sent > last[from]);
                        last[from] = sent;
                        let got = clocks[to].observe(sent, wall).unwrap();
                        prop_assert!(got > sent, "receive must follow send");
                        prop_assert!(got > last[to]);
                        last[to] = got;
                    }
                }
            }
        }

        /// The physical component never exceeds the largest wall time seen.
        #[test]
        fn bounded_by_wall(walls in proptest::collection::vec(0..1_000u64, 1..100)) {
            let mut c = Hlc::new(1, 0);
            let mut max_wall = 0;
            for w in walls {
                max_wall = max_wall.max(w);
                let t = c.now(w);
                prop_assert!(t.wall_ms <= max_wall);
            }
        }
    }

    #[test]
    fn rejects_far_future() {
        let mut c = Hlc::new(1, 1_000);
        let before = c.now(10_000);
        let err = c
            .observe(Timestamp::from_millis(20_000), 10_000)
            .unwrap_err();
        assert!(matches!(
            err,
            HlcError::TooFarAhead {
                ahead_ms: 10_000,
                ..
            }
        ));
        assert_eq!(
            c.last(),
            before,
            "a refused timestamp leaves the clock alone"
        );
        assert!(c.observe(Timestamp::from_millis(10_900), 10_000).is_ok());
        let t = c.observe_clamped(Timestamp::from_millis(u64::MAX), 10_000);
        assert!(t.wall_ms <= 11_000);
    }

    #[test]
    fn logical_overflow_advances_wall() {
        let mut c = Hlc::new(1, 0);
        c.restore(Timestamp {
            wall_ms: 5,
            logical: u32::MAX,
        });
        let t = c.now(0);
        assert_eq!(t, Timestamp::from_millis(6));
    }

    #[test]
    fn version_order_breaks_ties_by_origin() {
        let ts = Timestamp::from_millis(7);
        let a = Version { ts, origin: 1 };
        let b = Version { ts, origin: 2 };
        assert!(a < b);
        assert_ne!(origin_id("a"), origin_id("b"));
    }
}
