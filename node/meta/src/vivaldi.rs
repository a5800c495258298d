//! Vivaldi network coordinates (Dabek, Cox, Kaashoek, Morris: "Vivaldi: A
//! Decentralized Network Coordinate System", SIGCOMM 2004).
//!
//! Each site keeps a coordinate in a [`DIMS`]-dimensional Euclidean space
//! plus a height (the access-link latency every path to the site pays), and
//! an error estimate. Each RTT measured to a peer moves the coordinate
//! towards (or away from) the peer's in proportion to the prediction error,
//! with the adaptive timestep `δ = cc · w`, `w = e_local / (e_local +
//! e_remote)`, so confident sites move less and learn less from unconfident
//! ones. The RTT between any two sites is then estimated from their
//! coordinates alone ([`estimate_rtt`]), without all-pairs probing.
//!
//! Units are milliseconds throughout.

use thiserror::Error;

/// Dimensions of the Euclidean part of a coordinate.
pub const DIMS: usize = 3;

/// A network coordinate: a point, a height and the owner's error estimate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Coord {
    /// The Euclidean part, in milliseconds.
    pub pos: [f64; DIMS],
    /// The height (access latency), in milliseconds, never negative.
    pub height: f64,
    /// The owner's relative error estimate (0 = certain).
    pub error: f64,
}

impl Coord {
    /// The origin with the given error.
    pub fn origin(error: f64) -> Self {
        Coord {
            pos: [0.0; DIMS],
            height: 0.0,
            error,
        }
    }

    fn euclid(&self, other: &Coord) -> f64 {
        self.pos
            .iter()
            .zip(other.pos.iter())
            .map(|(a, b)| (a - b) * (a - b))
            .sum::<f64>()
            .sqrt()
    }

    /// The estimated RTT to `other` in milliseconds: Euclidean distance plus
    /// both heights.
    pub fn distance(&self, other: &Coord) -> f64 {
        self.euclid(other) + self.height + other.height
    }

    fn is_valid(&self) -> bool {
        self.pos.iter().all(|x| x.is_finite())
            && self.height.is_finite()
            && self.height >= 0.0
            && self.error.is_finite()
            && self.error >= 0.0
    }
}

/// The estimated RTT between two coordinates, in milliseconds.
pub fn estimate_rtt(a: &Coord, b: &Coord) -> f64 {
    a.distance(b)
}

/// Tuning of the Vivaldi update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VivaldiConfig {
    /// Weight of a new sample in the error estimate (`ce`, paper: 0.25).
    pub ce: f64,
    /// Timestep constant (`cc`, paper: 0.25).
    pub cc: f64,
    /// Error estimate a new coordinate starts with, and the cap.
    pub max_error: f64,
    /// Smallest height, in milliseconds.
    pub min_height: f64,
    /// Largest RTT accepted, in milliseconds.
    pub max_rtt_ms: f64,
}

impl Default for VivaldiConfig {
    fn default() -> Self {
        VivaldiConfig {
            ce: 0.25,
            cc: 0.25,
            max_error: 1.5,
            min_height: 0.01,
            max_rtt_ms: 10_000.0,
        }
    }
}

/// Why a sample was refused.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum VivaldiError {
    /// The RTT is not finite, not positive, or above the limit.
    #[error("RTT {0} ms is not a usable sample")]
    BadRtt(f64),
    /// The remote coordinate is not finite or has a negative height/error.
    #[error("remote coordinate is invalid")]
    BadCoord,
}

/// One site's Vivaldi state.
#[derive(Debug, Clone)]
pub struct Vivaldi {
    coord: Coord,
    cfg: VivaldiConfig,
    rng: u64,
    samples: u64,
}

impl Vivaldi {
    /// A coordinate at the origin with maximal error. `seed` drives the
    /// random direction used when two coordinates coincide.
    pub fn new(seed: u64) -> Self {
        Vivaldi::with_config(seed, VivaldiConfig::default())
    }

    /// [`new`](Self::new) with explicit tuning.
    pub fn with_config(seed: u64, cfg: VivaldiConfig) -> Self {
        Vivaldi {
            coord: Coord::origin(cfg.max_error),
            cfg,
            rng: seed | 1,
            samples: 0,
        }
    }

    /// The current coordinate (with its error estimate).
    pub fn coord(&self) -> Coord {
        self.coord
    }

    /// The current relative error estimate.
    pub fn error(&self) -> f64 {
        self.coord.error
    }

    /// Samples applied so far.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// Resets to a persisted coordinate (e.g. after a restart).
    pub fn restore(&mut self, coord: Coord) -> Result<(), VivaldiError> {
        if !coord.is_valid() {
            return Err(VivaldiError::BadCoord);
        }
        self.coord = coord;
        Ok(())
    }

    fn next_rand(&mut self) -> f64 {
        // xorshift64*: only used to break symmetry.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        let x = self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (x >> 11) as f64 / (1u64 << 53) as f64 - 0.5
    }

    /// Applies one RTT measurement (`rtt_ms`) to a peer whose coordinate is
    /// `remote` (its `error` is the peer's own error estimate).
    pub fn observe(&mut self, rtt_ms: f64, remote: &Coord) -> Result<(), VivaldiError> {
        if !(rtt_ms.is_finite() && rtt_ms > 0.0 && rtt_ms <= self.cfg.max_rtt_ms) {
            return Err(VivaldiError::BadRtt(rtt_ms));
        }
        if !remote.is_valid() {
            return Err(VivaldiError::BadCoord);
        }
        let cfg = self.cfg;
        let local = self.coord;
        let dist = local.distance(remote);
        let total_err = (local.error + remote.error).max(1e-6);
        let w = local.error / total_err;
        let sample_err = (dist - rtt_ms).abs() / rtt_ms;
        let error = (sample_err * cfg.ce * w + local.error * (1.0 - cfg.ce * w)).min(cfg.max_error);
        let delta = cfg.cc * w;
        let force = delta * (rtt_ms - dist);
        // Unit vector from the remote towards us in the height-vector space:
        // [x_i - x_j, h_i + h_j] / (|x_i - x_j| + h_i + h_j).
        let mut dir = [0.0; DIMS];
        let mut euclid = 0.0;
        for (d, (a, b)) in dir.iter_mut().zip(local.pos.iter().zip(remote.pos.iter())) {
            *d = a - b;
            euclid += *d * *d;
        }
        euclid = euclid.sqrt();
        if euclid < 1e-9 {
            // Coincident points: push apart in a random direction.
            let mut norm = 0.0;
            for d in &mut dir {
                *d = self.next_rand();
                norm += *d * *d;
            }
            let norm = norm.sqrt().max(1e-9);
            for d in &mut dir {
                *d /= norm;
            }
            euclid = 1.0;
        } else {
            for d in &mut dir {
                *d /= euclid;
            }
        }
        let hsum = local.height + remote.height;
        let norm = (euclid + hsum).max(1e-9);
        let mut next = local;
        for (p, d) in next.pos.iter_mut().zip(dir.iter()) {
            *p += force * d * (euclid / norm);
        }
        next.height = (local.height + force * hsum / norm).max(cfg.min_height);
        next.error = error;
        if next.is_valid() {
            self.coord = next;
            self.samples += 1;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Nodes on a plane with access latencies; every node talks to a few
    /// fixed random neighbours. Coordinates should predict the RTT of pairs
    /// that never talked within a few percent.
    #[test]
    fn converges_on_a_synthetic_metric() {
        let mut rng = StdRng::seed_from_u64(7);
        let n = 200;
        let pts: Vec<(f64, f64, f64)> = (0..n)
            .map(|_| {
                (
                    rng.gen_range(0.0..150.0),
                    rng.gen_range(0.0..100.0),
                    rng.gen_range(1.0..10.0),
                )
            })
            .collect();
        let rtt = |a: usize, b: usize| {
            let (x1, y1, h1) = pts[a];
            let (x2, y2, h2) = pts[b];
            ((x1 - x2).powi(2) + (y1 - y2).powi(2)).sqrt() + h1 + h2
        };
        let neigh: Vec<Vec<usize>> = (0..n)
            .map(|i| {
                (0..8)
                    .map(|_| rng.gen_range(0..n))
                    .filter(|&j| j != i)
                    .collect()
            })
            .collect();
        let mut v: Vec<Vivaldi> = (0..n).map(|i| Vivaldi::new(i as u64 + 1)).collect();
        for _ in 0..200 {
            for i in 0..n {
                for &j in &neigh[i] {
                    let noisy = rtt(i, j) * rng.gen_range(0.95..1.05);
                    let remote = v[j].coord();
                    v[i].observe(noisy, &remote).unwrap();
                    let local = v[i].coord();
                    v[j].observe(noisy, &local).unwrap();
                }
            }
        }
        let mut errs: Vec<f64> = (0..2000)
            .map(|_| {
                let (a, b) = (rng.gen_range(0..n), rng.gen_range(0..n));
                if a == b {
                    return 0.0;
                }
                let est = estimate_rtt(&v[a].coord(), &v[b].coord());
                (est - rtt(a, b)).abs() / rtt(a, b)
            })
            .collect();
        errs.sort_by(f64::total_cmp);
        let median = errs[errs.len() / 2];
        let p90 = errs[errs.len() * 9 / 10];
        assert!(median < 0.1, "median {median}");
        assert!(p90 < 0.3, "p90 {p90}");
        assert!(v.iter().all(|x| x.error() < 0.5));
    }

    #[test]
    fn two_nodes_learn_their_distance() {
        let mut a = Vivaldi::new(1);
        let mut b = Vivaldi::new(2);
        for _ in 0..100 {
            let cb = b.coord();
            a.observe(50.0, &cb).unwrap();
            let ca = a.coord();
            b.observe(50.0, &ca).unwrap();
        }
        let est = estimate_rtt(&a.coord(), &b.coord());
        assert!((est - 50.0).abs() < 2.0, "{est}");
    }

    #[test]
    fn bad_samples_are_refused() {
        let mut a = Vivaldi::new(1);
        let c = Coord::origin(1.0);
        assert!(a.observe(f64::NAN, &c).is_err());
        assert!(a.observe(-1.0, &c).is_err());
        assert!(a.observe(0.0, &c).is_err());
        assert!(a.observe(1e9, &c).is_err());
        let mut bad = c;
        bad.pos[0] = f64::INFINITY;
        assert_eq!(a.observe(10.0, &bad), Err(VivaldiError::BadCoord));
        assert_eq!(a.samples(), 0);
    }
}
