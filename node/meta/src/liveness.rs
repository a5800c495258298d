//! Site liveness from heartbeats: up → suspect → down, and back to up.
//!
//! Each site bumps a heartbeat counter in its own
//! [`SiteRecord`](crate::record::SiteRecord) and that record spreads by
//! anti-entropy, so a
//! site is also learned alive indirectly: any newer counter, however it
//! arrived, refreshes the site. Time is the observer's own clock (`now_ms`,
//! passed in), never the remote site's wall time, so clock skew does not
//! matter. A site turns suspect after `suspect_after_ms` without a newer
//! counter and down after `down_after_ms`; a short link drop therefore
//! causes at most suspicion.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;

use thiserror::Error;

/// What an observer believes about a site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SiteState {
    /// A newer heartbeat arrived recently.
    Up,
    /// No newer heartbeat for `suspect_after_ms`.
    Suspect,
    /// No newer heartbeat for `down_after_ms`.
    Down,
}

/// Liveness timeouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LivenessConfig {
    /// Silence after which a site is suspect, in milliseconds.
    pub suspect_after_ms: u64,
    /// Silence after which a site is down, in milliseconds.
    pub down_after_ms: u64,
}

impl Default for LivenessConfig {
    /// Suspect after 15 s, down after 60 s: tolerates a few lost 5 s
    /// heartbeats.
    fn default() -> Self {
        LivenessConfig {
            suspect_after_ms: 15_000,
            down_after_ms: 60_000,
        }
    }
}

/// A refused configuration.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LivenessError {
    /// The timeouts are zero or out of order.
    #[error("need 0 < suspect_after_ms ({suspect}) < down_after_ms ({down})")]
    BadTimeouts {
        /// The suspect timeout.
        suspect: u64,
        /// The down timeout.
        down: u64,
    },
}

/// A change of a site's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition<K> {
    /// The site.
    pub site: K,
    /// Its state before.
    pub from: SiteState,
    /// Its state now.
    pub to: SiteState,
}

#[derive(Debug, Clone, Copy)]
struct Track {
    counter: u64,
    last_ms: u64,
    state: SiteState,
}

/// Counts of sites by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateCounts {
    /// Sites up.
    pub up: usize,
    /// Sites suspect.
    pub suspect: usize,
    /// Sites down.
    pub down: usize,
}

/// Heartbeat tracker of one observer, keyed by site (`K`, e.g. the name).
#[derive(Debug, Clone)]
pub struct Liveness<K> {
    cfg: LivenessConfig,
    sites: HashMap<K, Track>,
}

impl<K: Hash + Eq + Clone> Liveness<K> {
    /// A tracker with the given timeouts.
    pub fn new(cfg: LivenessConfig) -> Result<Self, LivenessError> {
        if cfg.suspect_after_ms == 0 || cfg.suspect_after_ms >= cfg.down_after_ms {
            return Err(LivenessError::BadTimeouts {
                suspect: cfg.suspect_after_ms,
                down: cfg.down_after_ms,
            });
        }
        Ok(Liveness {
            cfg,
            sites: HashMap::new(),
        })
    }

    /// The timeouts.
    pub fn config(&self) -> LivenessConfig {
        self.cfg
    }

    /// Records heartbeat `counter` of `site`, seen at `now_ms` (directly or
    /// through gossip). Only a counter newer than the last one refreshes the
    /// site; a stale one is ignored. Returns the transition back to up, if
    /// the site was suspect or down.
    pub fn observe(&mut self, site: K, counter: u64, now_ms: u64) -> Option<Transition<K>> {
        match self.sites.get_mut(&site) {
            Some(t) => {
                if counter <= t.counter {
                    return None;
                }
                t.counter = counter;
                t.last_ms = t.last_ms.max(now_ms);
                let from = t.state;
                t.state = SiteState::Up;
                (from != SiteState::Up).then_some(Transition {
                    site,
                    from,
                    to: SiteState::Up,
                })
            }
            None => {
                self.sites.insert(
                    site,
                    Track {
                        counter,
                        last_ms: now_ms,
                        state: SiteState::Up,
                    },
                );
                None
            }
        }
    }

    fn state_at(&self, t: &Track, now_ms: u64) -> SiteState {
        let silent = now_ms.saturating_sub(t.last_ms);
        if silent >= self.cfg.down_after_ms {
            SiteState::Down
        } else if silent >= self.cfg.suspect_after_ms {
            SiteState::Suspect
        } else {
            SiteState::Up
        }
    }

    /// The state of `site` at `now_ms` (`None` if never heard of).
    pub fn state<Q>(&self, site: &Q, now_ms: u64) -> Option<SiteState>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.sites.get(site).map(|t| self.state_at(t, now_ms))
    }

    /// The last heartbeat counter seen from `site`.
    pub fn counter<Q>(&self, site: &Q) -> Option<u64>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.sites.get(site).map(|t| t.counter)
    }

    /// Advances every site to its state at `now_ms` and returns the
    /// transitions (to suspect or down) since the last tick.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Transition<K>> {
        let cfg = self.cfg;
        let mut out = Vec::new();
        for (k, t) in &mut self.sites {
            let silent = now_ms.saturating_sub(t.last_ms);
            let to = if silent >= cfg.down_after_ms {
                SiteState::Down
            } else if silent >= cfg.suspect_after_ms {
                SiteState::Suspect
            } else {
                SiteState::Up
            };
            if to != t.state {
                out.push(Transition {
                    site: k.clone(),
                    from: t.state,
                    to,
                });
                t.state = to;
            }
        }
        out
    }

    /// Sites by state at `now_ms` (for metrics).
    pub fn counts(&self, now_ms: u64) -> StateCounts {
        let mut c = StateCounts::default();
        for t in self.sites.values() {
            match self.state_at(t, now_ms) {
                SiteState::Up => c.up += 1,
                SiteState::Suspect => c.suspect += 1,
                SiteState::Down => c.down += 1,
            }
        }
        c
    }

    /// Stops tracking `site` (e.g. decommissioned).
    pub fn forget<Q>(&mut self, site: &Q)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.sites.remove(site);
    }

    /// Sites tracked.
    pub fn len(&self) -> usize {
        self.sites.len()
    }

    /// Whether no site is tracked.
    pub fn is_empty(&self) -> bool {
        self.sites.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker() -> Liveness<String> {
        Liveness::new(LivenessConfig {
            suspect_after_ms: 3_000,
            down_after_ms: 10_000,
        })
        .unwrap()
    }

    #[test]
    fn up_suspect_down_up() {
        let mut l = tracker();
        assert!(l.observe("a".into(), 1, 0).is_none());
        assert_eq!(l.state("a", 2_999), Some(SiteState::Up));
        assert!(l.tick(2_999).is_empty());
        let t = l.tick(3_000);
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].to, SiteState::Suspect);
        let t = l.tick(10_000);
        assert_eq!((t[0].from, t[0].to), (SiteState::Suspect, SiteState::Down));
        assert_eq!(l.counts(10_000).down, 1);
        let back = l.observe("a".into(), 2, 11_000).unwrap();
        assert_eq!((back.from, back.to), (SiteState::Down, SiteState::Up));
        assert_eq!(l.state("a", 11_000), Some(SiteState::Up));
    }

    #[test]
    fn short_drop_is_tolerated() {
        let mut l = tracker();
        // Heartbeats every second, then a 2.5 s drop: never suspect.
        let mut now = 0;
        for c in 1..=5 {
            l.observe("a".to_string(), c, now);
            now += 1_000;
        }
        now += 1_500;
        assert!(l.tick(now).is_empty());
        l.observe("a".to_string(), 6, now);
        assert_eq!(l.state("a", now), Some(SiteState::Up));
    }

    #[test]
    fn stale_gossip_does_not_revive() {
        let mut l = tracker();
        l.observe("a".to_string(), 5, 0);
        l.tick(20_000);
        // An old counter arriving late through gossip changes nothing.
        assert!(l.observe("a".to_string(), 5, 20_000).is_none());
        assert!(l.observe("a".to_string(), 4, 20_000).is_none());
        assert_eq!(l.state("a", 20_000), Some(SiteState::Down));
        // A newer counter learned indirectly does.
        assert!(l.observe("a".to_string(), 6, 20_001).is_some());
        assert_eq!(l.counts(20_001).up, 1);
        l.forget("a");
        assert!(l.is_empty());
    }

    #[test]
    fn bad_config() {
        assert!(Liveness::<u32>::new(LivenessConfig {
            suspect_after_ms: 5,
            down_after_ms: 5
        })
        .is_err());
        assert!(Liveness::<u32>::new(LivenessConfig {
            suspect_after_ms: 0,
            down_after_ms: 5
        })
        .is_err());
    }
}
