//! The sans-IO link model: no clocks, no sockets, no threads.
//!
//! Time is a [`Duration`] since an arbitrary origin chosen by the caller
//! (the forwarder uses the instant the WAN started). Randomness comes from a
//! seeded RNG, so a given seed and a given sequence of `offer` calls always
//! yield the same verdicts.
//!
//! One [`LinkDir`] models one direction of a link as a bottleneck line:
//!
//! 1. a **cut** link drops everything;
//! 2. a **rate limiter** serialises packets at `rate_bps` behind a FIFO
//!    **queue** with tail drop (its limit is in bytes; [`QueueLimit`] can
//!    also express it as time at the link rate). This is a token bucket whose
//!    depth is one packet: a real bottleneck link, which never bursts above
//!    its rate;
//! 3. random **loss** (Bernoulli, per packet) hits packets that already used
//!    the wire, as a lossy radio or a bad cable does;
//! 4. the **one-way delay** is added, plus **jitter** drawn uniformly from
//!    `[0, jitter]` (so `delay` is the minimum, like propagation delay).
//!    Unless reordering is asked for, a packet never leaves before the one
//!    admitted ahead of it (jitter then stretches gaps but keeps order);
//! 5. with probability `reorder`, a packet is held back by an extra
//!    `(0, max(jitter, 1 ms)]` and exempt from the ordering rule, so packets
//!    behind it may overtake it.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Errors from validating a [`LinkSpec`].
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SpecError {
    /// A probability was outside `[0, 1]` or not finite.
    #[error("{field} must be a probability in [0, 1], got {value}")]
    Probability {
        /// Which field.
        field: &'static str,
        /// The offending value.
        value: f64,
    },
    /// A queue limit of zero would drop every packet.
    #[error("queue limit must be positive")]
    EmptyQueue,
}

/// How long the queue in front of the rate limiter may grow before tail drop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum QueueLimit {
    /// One bandwidth-delay product of the base RTT (2 × delay), and never
    /// less than 50 ms worth of the rate.
    #[default]
    Auto,
    /// A fixed number of bytes.
    Bytes(u64),
    /// As many bytes as the link sends in this many milliseconds.
    Millis(u64),
}

/// The settings of one direction of a link (a [`crate::Wan`] link applies
/// the same spec to both directions unless built asymmetric).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LinkSpec {
    /// One-way delay (the minimum; jitter only adds).
    #[serde(with = "millis")]
    pub delay: Duration,
    /// Extra delay drawn uniformly from `[0, jitter]` per packet.
    #[serde(with = "millis")]
    pub jitter: Duration,
    /// Bottleneck rate in bits per second of IP packet bytes; 0 = unlimited.
    pub rate_bps: u64,
    /// Probability in `[0, 1]` that a packet is lost.
    pub loss: f64,
    /// Probability in `[0, 1]` that a packet is held back and overtaken.
    pub reorder: f64,
    /// The queue in front of the rate limiter.
    pub queue: QueueLimit,
}

impl Default for LinkSpec {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            rate_bps: 0,
            loss: 0.0,
            reorder: 0.0,
            queue: QueueLimit::Auto,
        }
    }
}

mod millis {
    //! Durations as (fractional) milliseconds in config files.
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64() * 1e3)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let ms = f64::deserialize(d)?;
        Duration::try_from_secs_f64(ms / 1e3).map_err(serde::de::Error::custom)
    }
}

impl LinkSpec {
    /// Checks probabilities and the queue limit.
    pub fn validate(&self) -> Result<(), SpecError> {
        for (field, value) in [("loss", self.loss), ("reorder", self.reorder)] {
            if !(0.0..=1.0).contains(&value) {
                return Err(SpecError::Probability { field, value });
            }
        }
        if matches!(self.queue, QueueLimit::Bytes(0) | QueueLimit::Millis(0)) {
            return Err(SpecError::EmptyQueue);
        }
        Ok(())
    }

    /// The queue limit in bytes, or `None` when the rate is unlimited (no
    /// queue builds up then).
    pub fn queue_bytes(&self) -> Option<u64> {
        if self.rate_bps == 0 {
            return None;
        }
        let bytes_per_ms = |ms: u128| -> u64 {
            u64::try_from(u128::from(self.rate_bps) * ms / 8_000).unwrap_or(u64::MAX)
        };
        Some(match self.queue {
            QueueLimit::Bytes(b) => b,
            QueueLimit::Millis(ms) => bytes_per_ms(u128::from(ms)),
            QueueLimit::Auto => {
                let rtt_ms = (self.delay * 2).as_millis().max(50);
                bytes_per_ms(rtt_ms)
            }
        })
    }
}

/// Why a packet was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DropReason {
    /// The link is cut.
    Cut,
    /// The queue in front of the rate limiter is full (tail drop).
    QueueFull,
    /// Random loss.
    Loss,
}

/// What happens to an offered packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Deliver the packet at this time (same origin as `now`).
    Deliver {
        /// Departure time from the link, i.e. arrival at the far end.
        at: Duration,
    },
    /// Drop the packet.
    Drop(DropReason),
}

/// Counters of one link direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DirStats {
    /// Packets offered.
    pub offered: u64,
    /// Packets given a delivery time.
    pub delivered: u64,
    /// Bytes given a delivery time.
    pub delivered_bytes: u64,
    /// Dropped because the link was cut.
    pub dropped_cut: u64,
    /// Dropped by tail drop.
    pub dropped_queue: u64,
    /// Dropped by random loss.
    pub dropped_loss: u64,
    /// Delivered packets exempted from ordering by the reorder draw.
    pub reordered: u64,
}

/// One direction of a link. See the module docs for the model.
#[derive(Debug)]
pub struct LinkDir {
    spec: LinkSpec,
    queue_bytes: Option<u64>,
    rng: StdRng,
    cut: bool,
    /// When the rate limiter finishes serialising everything admitted.
    busy_until: Duration,
    /// Latest departure of an in-order packet (the ordering floor).
    last_departure: Duration,
    stats: DirStats,
}

impl LinkDir {
    /// A direction with this spec and RNG seed.
    pub fn new(spec: LinkSpec, seed: u64) -> Result<Self, SpecError> {
        spec.validate()?;
        Ok(Self {
            queue_bytes: spec.queue_bytes(),
            spec,
            rng: StdRng::seed_from_u64(seed),
            cut: false,
            busy_until: Duration::ZERO,
            last_departure: Duration::ZERO,
            stats: DirStats::default(),
        })
    }

    /// The spec.
    pub fn spec(&self) -> &LinkSpec {
        &self.spec
    }

    /// Counters so far.
    pub fn stats(&self) -> DirStats {
        self.stats
    }

    /// Whether the direction is cut.
    pub fn is_cut(&self) -> bool {
        self.cut
    }

    /// Cuts (`true`) or restores (`false`) the direction. Packets already
    /// given a delivery time are the caller's to drop (the forwarder does).
    pub fn set_cut(&mut self, cut: bool) {
        self.cut = cut;
    }

    /// Time to serialise `len` bytes at the link rate.
    fn serialisation(&self, len: usize) -> Duration {
        if self.spec.rate_bps == 0 {
            return Duration::ZERO;
        }
        // Rounded up, so the line never runs faster than its rate.
        let nanos = ((len as u128) * 8 * 1_000_000_000).div_ceil(u128::from(self.spec.rate_bps));
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// Bytes waiting in the queue (including the one being serialised) at `now`.
    pub fn backlog_bytes(&self, now: Duration) -> u64 {
        let pending = self.busy_until.saturating_sub(now);
        let bits = pending.as_nanos() * u128::from(self.spec.rate_bps) / 1_000_000_000;
        u64::try_from(bits / 8).unwrap_or(u64::MAX)
    }

    fn draw(&mut self, p: f64) -> bool {
        p > 0.0 && self.rng.gen_bool(p)
    }

    fn uniform(&mut self, max: Duration) -> Duration {
        if max.is_zero() {
            return Duration::ZERO;
        }
        Duration::from_nanos(
            self.rng
                .gen_range(0..=u64::try_from(max.as_nanos()).unwrap_or(u64::MAX)),
        )
    }

    /// Offers a packet of `len` IP bytes at time `now`. Calls must come with
    /// non-decreasing `now`.
    pub fn offer(&mut self, now: Duration, len: usize) -> Verdict {
        self.stats.offered += 1;
        if self.cut {
            self.stats.dropped_cut += 1;
            return Verdict::Drop(DropReason::Cut);
        }
        // Rate limiter and queue.
        let ser = self.serialisation(len);
        let start = self.busy_until.max(now);
        if let Some(limit) = self.queue_bytes {
            // Never drop into an empty queue, however small its limit.
            let backlog = self.backlog_bytes(now);
            if backlog > 0 && backlog.saturating_add(len as u64) > limit {
                self.stats.dropped_queue += 1;
                return Verdict::Drop(DropReason::QueueFull);
            }
        }
        let sent = start + ser;
        self.busy_until = sent;
        // Loss on the wire.
        if self.draw(self.spec.loss) {
            self.stats.dropped_loss += 1;
            return Verdict::Drop(DropReason::Loss);
        }
        // Delay, jitter, reordering.
        let mut at = sent + self.spec.delay + self.uniform(self.spec.jitter);
        if self.draw(self.spec.reorder) {
            let hold = self.spec.jitter.max(Duration::from_millis(1));
            at += self.uniform(hold).max(Duration::from_nanos(1));
            self.stats.reordered += 1;
        } else {
            at = at.max(self.last_departure);
            self.last_departure = at;
        }
        self.stats.delivered += 1;
        self.stats.delivered_bytes += len as u64;
        Verdict::Deliver { at }
    }
}

/// Items waiting for their departure time, released in time order (ties in
/// insertion order).
#[derive(Debug)]
pub struct DelayLine<T> {
    heap: BinaryHeap<Reverse<Entry<T>>>,
    seq: u64,
}

#[derive(Debug)]
struct Entry<T> {
    at: Duration,
    seq: u64,
    item: T,
}

impl<T> PartialEq for Entry<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl<T> Eq for Entry<T> {}
impl<T> PartialOrd for Entry<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl<T> Ord for Entry<T> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(other.at, other.seq))
    }
}

impl<T> Default for DelayLine<T> {
    fn default() -> Self {
        Self {
            heap: BinaryHeap::new(),
            seq: 0,
        }
    }
}

impl<T> DelayLine<T> {
    /// An empty line.
    pub fn new() -> Self {
        Self::default()
    }

    /// Schedules `item` to leave at `at`.
    pub fn push(&mut self, at: Duration, item: T) {
        self.seq += 1;
        self.heap.push(Reverse(Entry {
            at,
            seq: self.seq,
            item,
        }));
    }

    /// The earliest departure time waiting, if any.
    pub fn next_due(&self) -> Option<Duration> {
        self.heap.peek().map(|Reverse(e)| e.at)
    }

    /// Removes and returns the earliest item if its time has come.
    pub fn pop_due(&mut self, now: Duration) -> Option<(Duration, T)> {
        if self.next_due()? > now {
            return None;
        }
        self.heap.pop().map(|Reverse(e)| (e.at, e.item))
    }

    /// Items waiting.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn spec(rate_mbit: u64) -> LinkSpec {
        LinkSpec {
            delay: ms(20),
            rate_bps: rate_mbit * 1_000_000,
            ..LinkSpec::default()
        }
    }

    #[test]
    fn validation() {
        let bad = LinkSpec {
            loss: 1.5,
            ..LinkSpec::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(SpecError::Probability { field: "loss", .. })
        ));
        let nan = LinkSpec {
            reorder: f64::NAN,
            ..LinkSpec::default()
        };
        assert!(nan.validate().is_err());
        let q = LinkSpec {
            rate_bps: 1,
            queue: QueueLimit::Bytes(0),
            ..LinkSpec::default()
        };
        assert_eq!(q.validate(), Err(SpecError::EmptyQueue));
    }

    #[test]
    fn auto_queue_is_one_bdp_at_least_50ms() {
        // 100 Mbit/s, 25 ms one way: 50 ms RTT -> 625 kB.
        let s = LinkSpec {
            delay: ms(25),
            rate_bps: 100_000_000,
            ..LinkSpec::default()
        };
        assert_eq!(s.queue_bytes(), Some(625_000));
        // 5 ms one way: floor of 50 ms.
        let s = LinkSpec { delay: ms(5), ..s };
        assert_eq!(s.queue_bytes(), Some(625_000));
        let s = LinkSpec { delay: ms(75), ..s };
        assert_eq!(s.queue_bytes(), Some(1_875_000));
        assert_eq!(LinkSpec::default().queue_bytes(), None);
    }

    #[test]
    fn idle_link_delivers_after_delay_plus_serialisation() {
        let mut d = LinkDir::new(spec(100), 1).unwrap();
        // 1250 bytes at 100 Mbit/s = 100 us.
        assert_eq!(
            d.offer(ms(1), 1250),
            Verdict::Deliver {
                at: ms(21) + Duration::from_micros(100)
            }
        );
    }

    #[test]
    fn queue_tail_drops_when_full() {
        let s = LinkSpec {
            queue: QueueLimit::Bytes(10_000),
            ..spec(10)
        };
        let mut d = LinkDir::new(s, 1).unwrap();
        let verdicts: Vec<_> = (0..20).map(|_| d.offer(ms(0), 1000)).collect();
        let delivered = verdicts
            .iter()
            .filter(|v| matches!(v, Verdict::Deliver { .. }))
            .count();
        assert_eq!(delivered, 10);
        assert!(verdicts[10..]
            .iter()
            .all(|v| *v == Verdict::Drop(DropReason::QueueFull)));
        assert_eq!(d.stats().dropped_queue, 10);
        // Once drained, it accepts again: 10 kB at 10 Mbit/s = 8 ms.
        assert!(matches!(d.offer(ms(8), 1000), Verdict::Deliver { .. }));
    }

    #[test]
    fn cut_drops_all_and_restore_recovers() {
        let mut d = LinkDir::new(spec(100), 7).unwrap();
        d.set_cut(true);
        for i in 0..1000 {
            assert_eq!(d.offer(ms(i), 1500), Verdict::Drop(DropReason::Cut));
        }
        d.set_cut(false);
        assert!(matches!(d.offer(ms(1000), 1500), Verdict::Deliver { .. }));
        assert_eq!(d.stats().dropped_cut, 1000);
    }

    #[test]
    fn same_seed_same_verdicts() {
        let s = LinkSpec {
            jitter: ms(5),
            loss: 0.1,
            reorder: 0.1,
            ..spec(50)
        };
        let run = |seed| {
            let mut d = LinkDir::new(s, seed).unwrap();
            (0..500u64)
                .map(|i| d.offer(Duration::from_micros(i * 100), 1200))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(3), run(3));
        assert_ne!(run(3), run(4));
    }

    #[test]
    fn reordering_happens_when_asked() {
        let s = LinkSpec {
            reorder: 0.05,
            ..spec(100)
        };
        let mut d = LinkDir::new(s, 11).unwrap();
        let ats: Vec<_> = (0..10_000u64)
            .filter_map(|i| match d.offer(Duration::from_micros(i * 200), 1000) {
                Verdict::Deliver { at } => Some(at),
                Verdict::Drop(_) => None,
            })
            .collect();
        let inversions = ats.windows(2).filter(|w| w[1] < w[0]).count();
        assert!(inversions > 100, "{inversions}");
    }

    #[test]
    fn delay_line_releases_in_time_order() {
        let mut l = DelayLine::new();
        l.push(ms(5), "b");
        l.push(ms(1), "a");
        l.push(ms(5), "c");
        assert_eq!(l.next_due(), Some(ms(1)));
        assert_eq!(l.pop_due(ms(0)), None);
        assert_eq!(l.pop_due(ms(10)), Some((ms(1), "a")));
        assert_eq!(l.pop_due(ms(10)), Some((ms(5), "b")));
        assert_eq!(l.pop_due(ms(10)), Some((ms(5), "c")));
        assert!(l.is_empty());
    }

    fn arbitrary_spec() -> impl Strategy<Value = LinkSpec> {
        (
            0u64..100,
            0u64..20,
            1u64..2000,
            0.0f64..0.2,
            prop_oneof![
                Just(QueueLimit::Auto),
                (1u64..200).prop_map(QueueLimit::Millis)
            ],
        )
            .prop_map(|(delay, jitter, mbit, loss, queue)| LinkSpec {
                delay: ms(delay),
                jitter: ms(jitter),
                rate_bps: mbit * 1_000_000,
                loss,
                reorder: 0.0,
                queue,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Bytes leaving over any window never exceed rate × window plus
        /// one packet; delay is never below the setting; no reordering.
        #[test]
        fn rate_delay_order_hold(
            s in arbitrary_spec(),
            seed in any::<u64>(),
            gaps in proptest::collection::vec((0u64..2_000, 40usize..1500), 1..2000),
        ) {
            let mut d = LinkDir::new(s, seed).unwrap();
            let mut now = Duration::ZERO;
            let mut out = Vec::new();
            for (gap_us, len) in gaps {
                now += Duration::from_micros(gap_us);
                if let Verdict::Deliver { at } = d.offer(now, len) {
                    prop_assert!(at >= now + s.delay, "delay {:?} < {:?}", at - now, s.delay);
                    prop_assert!(at <= now + s.delay + s.jitter + Duration::from_secs(10));
                    if let Some(&(last, _)) = out.last() {
                        prop_assert!(at >= last, "reordered");
                    }
                    out.push((at, len));
                }
            }
            // Throughput: departures minus propagation give the line's send
            // times only when jitter is zero; with jitter the bound is on
            // admission, so check the serialiser via busy time instead.
            if s.jitter.is_zero() {
                let rate = s.rate_bps as f64 / 8.0;
                for i in 0..out.len() {
                    let mut bytes = 0usize;
                    for j in i..out.len() {
                        bytes += out[j].1;
                        let window = (out[j].0 - out[i].0).as_secs_f64();
                        // First packet's bytes left before the window opened.
                        let inside = (bytes - out[i].1) as f64;
                        prop_assert!(inside <= rate * window + 1.0,
                            "{inside} bytes in {window}s at {rate} B/s");
                        if j - i > 50 { break; }
                    }
                }
            }
        }

        /// Loss over many packets is within tolerance of the setting.
        #[test]
        fn loss_rate_within_tolerance(loss in 0.0f64..0.3, seed in any::<u64>()) {
            let s = LinkSpec { loss, ..LinkSpec::default() };
            let mut d = LinkDir::new(s, seed).unwrap();
            let n = 20_000u64;
            for i in 0..n {
                let _ = d.offer(Duration::from_micros(i), 1000);
            }
            let measured = d.stats().dropped_loss as f64 / n as f64;
            let sigma = (loss * (1.0 - loss) / n as f64).sqrt();
            prop_assert!((measured - loss).abs() <= 5.0 * sigma + 1e-9,
                "measured {measured} set {loss}");
        }

        /// A cut direction drops everything, whatever the spec.
        #[test]
        fn cut_drops_everything(s in arbitrary_spec(), seed in any::<u64>()) {
            let mut d = LinkDir::new(s, seed).unwrap();
            d.set_cut(true);
            for i in 0..500u64 {
                prop_assert_eq!(d.offer(Duration::from_micros(i * 10), 1500), Verdict::Drop(DropReason::Cut));
            }
        }
    }

    #[test]
    fn long_run_throughput_matches_rate() {
        // Offer 2x the rate for 2 s: what leaves is the rate.
        let s = spec(100);
        let mut d = LinkDir::new(s, 5).unwrap();
        let mut last = Duration::ZERO;
        let mut bytes = 0u64;
        // 1500 B every 60 us = 200 Mbit/s offered.
        for i in 0..33_333u64 {
            if let Verdict::Deliver { at } = d.offer(Duration::from_micros(i * 60), 1500) {
                bytes += 1500;
                last = at;
            }
        }
        let secs = (last - s.delay).as_secs_f64();
        let mbit = bytes as f64 * 8.0 / secs / 1e6;
        assert!((99.0..=100.1).contains(&mbit), "{mbit}");
        assert!(d.stats().dropped_queue > 10_000);
    }
}
