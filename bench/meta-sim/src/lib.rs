//! Scale simulation of Cairn's site-metadata layer.
//!
//! N sites (default 10,000) run in one process on the real `cairn-meta`
//! code: every anti-entropy exchange goes through the real
//! [`Initiator`](cairn_meta::sync::Initiator) and
//! [`Responder`](cairn_meta::sync::Responder) state machines and the real
//! frame encoder and decoder; every write is stamped by the site's own
//! [`Hlc`]; every exchange feeds both sites' [`Vivaldi`] coordinates a noisy
//! RTT sample.
//!
//! **World.** Sites sit in ten geographic regions (real city coordinates,
//! sites spread with σ ≈ 3.5° around the centre). The RTT between two sites
//! is computed from their positions, never stored: great-circle distance ×
//! 1.5 (fibre detour) × 2 (round trip) / 200 km/ms, plus both sites' access
//! latencies (core 0.5 ms, regional 1 ms, edge 2–15 ms). A measured sample
//! adds jitter: × U(1, 1.1) + U(0, 1) ms.
//!
//! **Topology.** One core site; per region `max(1, N / 2500)` regional sites
//! whose parent is the core; every edge site's parent is the nearest regional
//! site of its region. Each site also initiates exchanges with `peers` random
//! peers: all but one in its own region, one anywhere.
//!
//! **Round.** Every site, in a fresh random order, runs one exchange with
//! its parent and one with each of its peers (skipping links the partition
//! cuts). Exchanges run one after another, each seeing what earlier ones
//! merged, as in a deployment where every site syncs once per period. One
//! round stands for 5 s of simulated time.
//!
//! **Memory.** Entries are interned by their 128-bit hash, so identical
//! entries (and their value bytes) are shared between the simulated
//! replicas; each replica still has its own buckets, digests and entry
//! slots. "Metadata memory per site" is one replica's own accounting
//! ([`Replica::held_bytes`], as if unshared) divided by the number of sites.

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use cairn_meta::hlc::{origin_id, Hlc, DEFAULT_MAX_DRIFT_MS};
use cairn_meta::record::{
    Capacity, Entry, Geo, Heartbeat, InventoryEntry, Key, Labels, ObjectId, ObjectKind, Replica,
    SiteRecord, COMPLETE_PPM,
};
use cairn_meta::sync::run_exchange_with;
use cairn_meta::vivaldi::{estimate_rtt, Vivaldi};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// What to simulate.
#[derive(Debug, Clone)]
pub struct Config {
    /// Number of sites.
    pub sites: usize,
    /// Sites cut off during the partition.
    pub partitioned: usize,
    /// RNG seed.
    pub seed: u64,
    /// Peers each site initiates exchanges with.
    pub peers: usize,
    /// Vivaldi-only probe rounds before coordinates are published.
    pub probe_rounds: usize,
    /// Multi-writer tags written concurrently on both sides.
    pub tags: usize,
    /// Round cap per phase.
    pub max_rounds: usize,
    /// Fraction of sites that update their record in the converge and
    /// partition phases.
    pub update_fraction: f64,
    /// Print progress to stderr.
    pub progress: bool,
}

const REGIONS: [(&str, f64, f64); 10] = [
    ("eu-central", 50.1, 8.7),
    ("eu-west", 51.5, -0.1),
    ("us-east", 38.9, -77.0),
    ("us-west", 45.5, -122.7),
    ("sa-east", -23.5, -46.6),
    ("ap-northeast", 35.7, 139.7),
    ("ap-southeast", 1.35, 103.8),
    ("au-east", -33.9, 151.2),
    ("ap-south", 19.1, 72.9),
    ("af-south", -26.2, 28.0),
];
const ROUND_MS: u64 = 5_000;
const START_MS: u64 = 1_764_633_600_000; // 2025-12-02T00:00:00Z
const OBJECTS_PER_SITE: usize = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Core,
    Regional,
    Edge,
}

#[derive(Debug)]
struct Site {
    name: String,
    region: usize,
    kind: Kind,
    lat: f64,
    lon: f64,
    access_ms: f64,
    parent: Option<usize>,
    peers: Vec<usize>,
    skew_ms: i64,
    hlc: Hlc,
    viv: Vivaldi,
    heartbeat: u64,
    objects: Vec<ObjectId>,
    disk_free: u64,
    publish_coord: bool,
}

/// A hasher for keys that are already uniformly random (entry hashes).
#[derive(Debug, Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u128(&mut self, v: u128) {
        self.0 = v as u64;
    }
}

type IdMap<V> = HashMap<u128, V, BuildHasherDefault<IdHasher>>;

/// Shares identical entries (and their value bytes) between replicas.
#[derive(Debug, Default)]
struct Interner {
    map: IdMap<Arc<Entry>>,
}

impl Interner {
    fn intern(&mut self, e: Arc<Entry>) -> Arc<Entry> {
        if let Some(a) = self.map.get(&e.hash()) {
            return Arc::clone(a);
        }
        // Detach the value from the frame buffer it was decoded from.
        let owned = match e.value() {
            Some(v) => Entry::new(
                e.key().clone(),
                e.version(),
                Some(Bytes::copy_from_slice(v)),
            )
            .map_or(e, Arc::new),
            None => e,
        };
        self.map.insert(owned.hash(), Arc::clone(&owned));
        owned
    }

    fn add(&mut self, a: &Arc<Entry>) {
        self.map.entry(a.hash()).or_insert_with(|| Arc::clone(a));
    }

    /// Drops entries no replica holds any more.
    fn prune(&mut self) {
        self.map.retain(|_, a| Arc::strong_count(a) > 1);
    }
}

/// Figures of one sync round.
#[derive(Debug, Clone, Copy, Default)]
pub struct RoundStats {
    /// Exchanges run.
    pub exchanges: u64,
    /// Exchanges that went past the root digest.
    pub differing: u64,
    /// Frame bytes, both directions.
    pub bytes: u64,
    /// Frames.
    pub frames: u64,
    /// Entries merged (transferred).
    pub applied: u64,
    /// Wall time of the round, seconds.
    pub secs: f64,
    /// Sites whose root digest equals the reference after the round.
    pub converged_sites: usize,
}

/// One phase's convergence.
#[derive(Debug, Clone, Default)]
pub struct Phase {
    /// Name.
    pub name: String,
    /// Writes made before the rounds.
    pub writes: u64,
    /// Rounds until every site holds the reference state (`None`: not
    /// within the cap).
    pub rounds: Option<usize>,
    /// Per-round figures.
    pub per_round: Vec<RoundStats>,
}

impl Phase {
    fn bytes(&self) -> u64 {
        self.per_round.iter().map(|r| r.bytes).sum()
    }
    fn applied(&self) -> u64 {
        self.per_round.iter().map(|r| r.applied).sum()
    }
    fn secs(&self) -> f64 {
        self.per_round.iter().map(|r| r.secs).sum()
    }
}

/// Everything the simulation measured.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The configuration.
    pub sites: usize,
    /// Sites partitioned.
    pub partitioned: usize,
    /// Seed.
    pub seed: u64,
    /// Peers per site.
    pub peers: usize,
    /// Regional sites.
    pub regionals: usize,
    /// Entries per replica at the end.
    pub entries: usize,
    /// Bootstrap, converge, partition and heal phases.
    pub phases: Vec<Phase>,
    /// Concurrently written tags checked after healing.
    pub tags_checked: usize,
    /// Sites holding the expected winner of every concurrent tag.
    pub tag_sites_ok: usize,
    /// Concurrent tag writes made.
    pub tag_writes: usize,
    /// Tags whose winner came from the partitioned side.
    pub tags_won_by_partition: usize,
    /// Pairs sampled for coordinate error.
    pub vivaldi_pairs: usize,
    /// Median relative error, live coordinates.
    pub vivaldi_median: f64,
    /// p90 relative error, live coordinates.
    pub vivaldi_p90: f64,
    /// Median relative error, coordinates as replicated to site 0.
    pub vivaldi_published_median: f64,
    /// p90 relative error, coordinates as replicated to site 0.
    pub vivaldi_published_p90: f64,
    /// Vivaldi samples applied in total.
    pub vivaldi_samples: u64,
    /// One replica's held bytes.
    pub replica_bytes: usize,
    /// Process RSS at the end, bytes.
    pub rss_bytes: u64,
    /// Peak process RSS, bytes.
    pub peak_rss_bytes: u64,
    /// Total wall time, seconds.
    pub total_secs: f64,
    /// Mean wall time of a round with nothing to sync, seconds.
    pub idle_round_secs: f64,
}

struct Sim {
    cfg: Config,
    rng: StdRng,
    sites: Vec<Site>,
    reps: Vec<Replica>,
    interner: Interner,
    oracle: Replica,
    now_ms: u64,
    /// `true` for the partitioned side.
    side: Vec<bool>,
    cut: bool,
    regionals: usize,
}

fn haversine_km(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = p2 - p1;
    let dl = (lon2 - lon1).to_radians();
    let a = (dp / 2.0).sin().powi(2) + p1.cos() * p2.cos() * (dl / 2.0).sin().powi(2);
    2.0 * 6371.0 * a.sqrt().min(1.0).asin()
}

fn pair_mut<T>(v: &mut [T], a: usize, b: usize) -> (&mut T, &mut T) {
    if a < b {
        let (l, r) = v.split_at_mut(b);
        (&mut l[a], &mut r[0])
    } else {
        let (l, r) = v.split_at_mut(a);
        (&mut r[0], &mut l[b])
    }
}

fn gauss(rng: &mut StdRng) -> f64 {
    // Box-Muller.
    let u1: f64 = rng.gen_range(f64::EPSILON..1.0);
    let u2: f64 = rng.gen_range(0.0..1.0);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

impl Sim {
    fn new(cfg: &Config) -> Result<Sim> {
        if cfg.sites < 20 {
            bail!("need at least 20 sites");
        }
        if cfg.partitioned >= cfg.sites {
            bail!("--partitioned must be below --sites");
        }
        let mut rng = StdRng::seed_from_u64(cfg.seed);
        let n = cfg.sites;
        let per_region = (n / 2500).max(1);
        let mut sites = Vec::with_capacity(n);
        let mk = |name: String, region: usize, kind: Kind, lat: f64, lon: f64, access: f64| {
            let origin = origin_id(&name);
            Site {
                hlc: Hlc::new(origin, DEFAULT_MAX_DRIFT_MS),
                viv: Vivaldi::new(origin),
                name,
                region,
                kind,
                lat,
                lon,
                access_ms: access,
                parent: None,
                peers: Vec::new(),
                skew_ms: 0,
                heartbeat: 0,
                objects: Vec::new(),
                disk_free: 0,
                publish_coord: false,
            }
        };
        let (_, lat0, lon0) = REGIONS[0];
        sites.push(mk("core-0".into(), 0, Kind::Core, lat0, lon0, 0.5));
        let mut regional_of: Vec<Vec<usize>> = vec![Vec::new(); REGIONS.len()];
        for (r, (rname, lat, lon)) in REGIONS.iter().enumerate() {
            for j in 0..per_region {
                let mut s = mk(
                    format!("regional-{rname}-{j}"),
                    r,
                    Kind::Regional,
                    lat + gauss(&mut rng) * 1.5,
                    lon + gauss(&mut rng) * 1.5,
                    1.0,
                );
                s.parent = Some(0);
                regional_of[r].push(sites.len());
                sites.push(s);
            }
        }
        let regionals = per_region * REGIONS.len();
        let mut i = 0usize;
        while sites.len() < n {
            let r = i % REGIONS.len();
            let (rname, lat, lon) = REGIONS[r];
            let lat = (lat + gauss(&mut rng) * 3.5).clamp(-89.0, 89.0);
            let lon = lon + gauss(&mut rng) * 3.5;
            let access = rng.gen_range(2.0..15.0);
            let mut s = mk(
                format!("edge-{rname}-{i:05}"),
                r,
                Kind::Edge,
                lat,
                lon,
                access,
            );
            let parent = regional_of[r]
                .iter()
                .copied()
                .min_by(|&a, &b| {
                    let da = haversine_km(lat, lon, sites[a].lat, sites[a].lon);
                    let db = haversine_km(lat, lon, sites[b].lat, sites[b].lon);
                    da.total_cmp(&db)
                })
                .context("region without a regional site")?;
            s.parent = Some(parent);
            sites.push(s);
            i += 1;
        }
        let mut by_region: Vec<Vec<usize>> = vec![Vec::new(); REGIONS.len()];
        for (idx, s) in sites.iter().enumerate() {
            by_region[s.region].push(idx);
        }
        for (idx, site) in sites.iter_mut().enumerate() {
            let r = site.region;
            let mut peers = Vec::new();
            let mut guard = 0;
            while peers.len() < cfg.peers && guard < 100 {
                guard += 1;
                let p = if peers.len() + 1 == cfg.peers {
                    rng.gen_range(0..n)
                } else {
                    by_region[r][rng.gen_range(0..by_region[r].len())]
                };
                if p != idx && Some(p) != site.parent && !peers.contains(&p) {
                    peers.push(p);
                }
            }
            site.peers = peers;
            site.skew_ms = rng.gen_range(-200..=200);
            site.disk_free = rng.gen_range(1u64 << 38..1u64 << 41);
        }
        // The partitioned side: whole regions from the last one; if the
        // count ends inside a region, edge sites of that region (its
        // regional sites stay with the majority).
        let mut side = vec![false; n];
        let mut left = cfg.partitioned;
        for r in (0..REGIONS.len()).rev() {
            if left == 0 {
                break;
            }
            let members: Vec<usize> = by_region[r].iter().copied().filter(|&x| x != 0).collect();
            let take: Vec<usize> = if members.len() <= left {
                members
            } else {
                members
                    .into_iter()
                    .filter(|&x| sites[x].kind == Kind::Edge)
                    .take(left)
                    .collect()
            };
            left -= take.len();
            for x in take {
                side[x] = true;
            }
        }
        Ok(Sim {
            cfg: cfg.clone(),
            rng,
            sites,
            reps: Vec::new(),
            interner: Interner::default(),
            oracle: Replica::new(),
            now_ms: START_MS,
            side,
            cut: false,
            regionals,
        })
    }

    fn base_rtt(&self, a: usize, b: usize) -> f64 {
        let (x, y) = (&self.sites[a], &self.sites[b]);
        haversine_km(x.lat, x.lon, y.lat, y.lon) * 1.5 * 2.0 / 200.0 + x.access_ms + y.access_ms
    }

    fn measured_rtt(&mut self, a: usize, b: usize) -> f64 {
        self.base_rtt(a, b) * self.rng.gen_range(1.0..1.1) + self.rng.gen_range(0.0..1.0)
    }

    fn wall(&self, s: usize) -> u64 {
        self.now_ms.saturating_add_signed(self.sites[s].skew_ms)
    }

    fn site_record(&self, s: usize) -> Result<Bytes> {
        let site = &self.sites[s];
        let rec = SiteRecord {
            name: site.name.clone(),
            labels: Labels {
                region: REGIONS[site.region].0.into(),
                zone: format!("{}-{}", REGIONS[site.region].0, s % 3),
                kind: match site.kind {
                    Kind::Core => "core",
                    Kind::Regional => "regional",
                    Kind::Edge => "edge",
                }
                .into(),
                extra: Vec::new(),
            },
            geo: Some(Geo {
                lat: site.lat as f32,
                lon: (((site.lon + 180.0).rem_euclid(360.0)) - 180.0) as f32,
            }),
            parent: site.parent.map(|p| self.sites[p].name.clone()),
            capacity: Capacity {
                disk_total: 1 << 42,
                disk_free: site.disk_free,
                cache_budget: 1 << 40,
                cpu_millis: 32_000,
                mem_bytes: 128 << 30,
            },
            heartbeat: Heartbeat {
                counter: site.heartbeat,
                wall_ms: self.wall(s),
            },
            coord: site.publish_coord.then(|| site.viv.coord()),
        };
        Ok(rec.encode()?)
    }

    /// A local write at site `s` (into its own replica), recorded in the
    /// oracle (the merge of every write ever made).
    fn write(&mut self, s: usize, key: Key, value: Option<Bytes>) -> Result<Arc<Entry>> {
        let wall = self.wall(s);
        let site = &mut self.sites[s];
        let e = match value {
            Some(v) => self.reps[s].put(&mut site.hlc, wall, key, v)?,
            None => self.reps[s].delete(&mut site.hlc, wall, key)?,
        };
        self.interner.add(&e);
        self.oracle.merge_shared(Arc::clone(&e));
        Ok(e)
    }

    fn write_site(&mut self, s: usize) -> Result<()> {
        self.sites[s].heartbeat += 1;
        let v = self.site_record(s)?;
        let k = Key::Site(self.sites[s].name.clone());
        self.write(s, k, Some(v))?;
        Ok(())
    }

    fn add_object(&mut self, s: usize) -> Result<()> {
        let mut id = [0u8; 32];
        self.rng.fill(&mut id[..]);
        let kinds = [
            ObjectKind::Image,
            ObjectKind::Blob,
            ObjectKind::Volume,
            ObjectKind::Snapshot,
        ];
        let inv = InventoryEntry {
            kind: kinds[self.rng.gen_range(0..4)],
            size_bytes: self.rng.gen_range(1u64 << 20..1u64 << 34),
            held_ppm: if self.rng.gen_bool(0.7) {
                COMPLETE_PPM
            } else {
                self.rng.gen_range(0..COMPLETE_PPM)
            },
        };
        let key = Key::Inventory {
            site: self.sites[s].name.clone(),
            object: id,
        };
        self.sites[s].objects.push(id);
        self.write(s, key, Some(inv.encode()?))?;
        Ok(())
    }

    fn tag_key(t: usize) -> Key {
        Key::Tag {
            repo: format!("apps/service-{}", t % 17),
            tag: format!("release-{t}"),
        }
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        !self.cut || self.side[a] == self.side[b]
    }

    fn probe(&mut self, a: usize, b: usize) {
        let rtt = self.measured_rtt(a, b);
        let cb = self.sites[b].viv.coord();
        let _ = self.sites[a].viv.observe(rtt, &cb);
        let rtt = self.measured_rtt(a, b);
        let ca = self.sites[a].viv.coord();
        let _ = self.sites[b].viv.observe(rtt, &ca);
    }

    fn round(&mut self, sync: bool) -> Result<RoundStats> {
        let start = Instant::now();
        let n = self.sites.len();
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut self.rng);
        let mut st = RoundStats::default();
        for s in order {
            let targets: Vec<usize> = self.sites[s]
                .parent
                .into_iter()
                .chain(self.sites[s].peers.iter().copied())
                .collect();
            for t in targets {
                if !self.reachable(s, t) {
                    continue;
                }
                self.probe(s, t);
                if sync {
                    self.exchange(s, t, &mut st)?;
                }
            }
        }
        self.now_ms += ROUND_MS;
        st.secs = start.elapsed().as_secs_f64();
        Ok(st)
    }

    fn exchange(&mut self, s: usize, t: usize, st: &mut RoundStats) -> Result<()> {
        let (ws, wt) = (self.wall(s), self.wall(t));
        let (cs, ct) = (self.sites[s].hlc.now(ws), self.sites[t].hlc.now(wt));
        let (a, b) = pair_mut(&mut self.reps, s, t);
        let interner = &mut self.interner;
        let x = run_exchange_with(a, b, cs, ct, |rep, e| {
            rep.merge_shared(interner.intern(e));
        })
        .with_context(|| format!("exchange {s} -> {t}"))?;
        if let Some(c) = x.clock_at_initiator {
            self.sites[s].hlc.observe(c, ws)?;
        }
        if let Some(c) = x.clock_at_responder {
            self.sites[t].hlc.observe(c, wt)?;
        }
        st.exchanges += 1;
        st.differing += u64::from(x.responder_frames + x.initiator_frames > 2);
        st.bytes += x.bytes();
        st.frames += x.initiator_frames + x.responder_frames;
        st.applied += x.initiator_applied + x.responder_applied;
        Ok(())
    }

    /// Rounds until every site's root digest equals the reference of its
    /// side (the oracle when not cut; each side's own agreement when cut).
    fn converge(&mut self, name: &str, writes: u64) -> Result<Phase> {
        let mut phase = Phase {
            name: name.into(),
            writes,
            ..Phase::default()
        };
        for round in 1..=self.cfg.max_rounds {
            let mut st = self.round(true)?;
            let (ok, total) = self.converged();
            st.converged_sites = ok;
            phase.per_round.push(st);
            if self.cfg.progress {
                eprintln!(
                    "  {name} round {round}: {ok}/{total} sites converged, {} exchanges ({} differing), {:.1} MB, {} entries, {:.2} s",
                    st.exchanges,
                    st.differing,
                    st.bytes as f64 / 1e6,
                    st.applied,
                    st.secs
                );
            }
            if !self.cut && ok == total {
                phase.rounds = Some(round);
                break;
            }
            if self.cut && st.differing == 0 {
                // Quiescent: every connected part of each side agrees.
                phase.rounds = Some(round - 1);
                break;
            }
        }
        self.interner.prune();
        Ok(phase)
    }

    fn converged(&self) -> (usize, usize) {
        let n = self.reps.len();
        if !self.cut {
            let root = self.oracle.root_digest();
            let ok = self.reps.iter().filter(|r| r.root_digest() == root).count();
            return (ok, n);
        }
        // Under the cut, count the sites that agree with the most common
        // state of their side (a site whose every link is cut stays apart).
        let mut ok = 0;
        for side in [false, true] {
            let mut counts: HashMap<u128, usize> = HashMap::new();
            for (i, r) in self.reps.iter().enumerate() {
                if self.side[i] == side {
                    *counts.entry(r.root_digest()).or_default() += 1;
                }
            }
            ok += counts.values().copied().max().unwrap_or(0);
        }
        (ok, n)
    }

    fn vivaldi_error(&mut self, published: Option<&Replica>) -> Result<(usize, f64, f64)> {
        let n = self.sites.len();
        let mut talked: HashSet<(usize, usize)> = HashSet::new();
        for (i, s) in self.sites.iter().enumerate() {
            for p in s.parent.iter().chain(s.peers.iter()) {
                talked.insert((i.min(*p), i.max(*p)));
            }
        }
        let coords: Vec<cairn_meta::vivaldi::Coord> = match published {
            None => self.sites.iter().map(|s| s.viv.coord()).collect(),
            Some(rep) => {
                let mut by_name = HashMap::new();
                for rec in rep.sites() {
                    let rec = rec?;
                    if let Some(c) = rec.coord {
                        by_name.insert(rec.name, c);
                    }
                }
                self.sites
                    .iter()
                    .map(|s| {
                        by_name
                            .get(&s.name)
                            .copied()
                            .context("site without a published coordinate")
                    })
                    .collect::<Result<_>>()?
            }
        };
        let mut errs = Vec::new();
        let mut rng = StdRng::seed_from_u64(self.cfg.seed ^ 0x5eed);
        while errs.len() < 20_000.min(n * (n - 1) / 4) {
            let (a, b) = (rng.gen_range(0..n), rng.gen_range(0..n));
            if a == b || talked.contains(&(a.min(b), a.max(b))) {
                continue;
            }
            let truth = self.base_rtt(a, b);
            let est = estimate_rtt(&coords[a], &coords[b]);
            errs.push((est - truth).abs() / truth);
        }
        errs.sort_by(f64::total_cmp);
        let q = |p: f64| errs[((errs.len() as f64 * p) as usize).min(errs.len() - 1)];
        Ok((errs.len(), q(0.5), q(0.9)))
    }
}

fn proc_status(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .map_or(0, |kb: u64| kb * 1024)
}

/// Runs the whole scenario.
pub fn run(cfg: &Config) -> Result<Report> {
    let t0 = Instant::now();
    let mut sim = Sim::new(cfg)?;
    let n = cfg.sites;
    let log = |m: &str| {
        if cfg.progress {
            eprintln!("[{:7.1} s] {m}", t0.elapsed().as_secs_f64());
        }
    };
    log(&format!(
        "{n} sites, {} regional, {} partitioned",
        sim.regionals, cfg.partitioned
    ));

    // Vivaldi warm-up: RTT samples only (QUIC RTT estimates and pings).
    for r in 0..cfg.probe_rounds {
        let st = sim.round(false)?;
        if r == 0 {
            log(&format!("probe round: {:.2} s", st.secs));
        }
    }
    log("probe rounds done");
    for site in sim.sites.iter_mut() {
        site.publish_coord = true;
    }
    // Bootstrap: every site writes its record (with its coordinate) and
    // inventory, a few tags exist; every replica starts from the merged snapshot (as a new site
    // would from a bulk snapshot of its parent).
    sim.reps = vec![Replica::new(); n];
    let mut writes = 0u64;
    for s in 0..n {
        sim.write_site(s)?;
        for _ in 0..OBJECTS_PER_SITE {
            sim.add_object(s)?;
        }
        writes += 1 + OBJECTS_PER_SITE as u64;
    }
    for t in 0..cfg.tags {
        let s = sim.rng.gen_range(0..n);
        let mut v = [0u8; 32];
        sim.rng.fill(&mut v[..]);
        sim.write(s, Sim::tag_key(t), Some(Bytes::copy_from_slice(&v)))?;
        writes += 1;
    }
    let snapshot = sim.oracle.clone();
    for r in sim.reps.iter_mut() {
        *r = snapshot.clone();
    }
    drop(snapshot);
    let mut report = Report {
        sites: n,
        partitioned: cfg.partitioned,
        seed: cfg.seed,
        peers: cfg.peers,
        regionals: sim.regionals,
        phases: vec![Phase {
            name: "bootstrap (snapshot)".into(),
            writes,
            rounds: Some(0),
            per_round: Vec::new(),
        }],
        ..Report::default()
    };
    log(&format!(
        "bootstrap: {} entries per replica",
        sim.oracle.len()
    ));

    // An idle sync round: everyone in sync, measures the digest fast path.
    let mut idle = Vec::new();
    for _ in 0..2 {
        let st = sim.round(true)?;
        if st.differing != 0 {
            bail!("idle round found differences");
        }
        idle.push(st.secs);
    }
    report.idle_round_secs = idle.iter().sum::<f64>() / idle.len() as f64;

    // Converge: a fraction of the sites update their record (heartbeat,
    // coordinate, free disk).
    let mut writes = 0u64;
    for s in 0..n {
        if sim.rng.gen_bool(cfg.update_fraction) {
            sim.write_site(s)?;
            writes += 1;
        }
    }
    log(&format!(
        "converge phase: {writes} sites updated their record"
    ));
    let p = sim.converge("converge (sites update their records)", writes)?;
    report.phases.push(p);

    // Partition and update both sides.
    sim.cut = true;
    let mut writes = 0u64;
    for s in 0..n {
        if sim.rng.gen_bool(cfg.update_fraction) {
            sim.sites[s].disk_free = sim.rng.gen_range(1u64 << 38..1u64 << 41);
            sim.write_site(s)?;
            writes += 1;
        }
        if sim.rng.gen_bool(0.05) {
            sim.add_object(s)?;
            writes += 1;
        }
        if sim.rng.gen_bool(0.01) {
            if let Some(obj) = sim.sites[s].objects.pop() {
                let k = Key::Inventory {
                    site: sim.sites[s].name.clone(),
                    object: obj,
                };
                sim.write(s, k, None)?;
                writes += 1;
            }
        }
    }
    let minority: Vec<usize> = (0..n).filter(|&i| sim.side[i]).collect();
    let majority: Vec<usize> = (0..n).filter(|&i| !sim.side[i]).collect();
    let mut tag_writes: Vec<Vec<Arc<Entry>>> = Vec::new();
    for t in 0..cfg.tags {
        let mut ws = Vec::new();
        for group in [&minority, &majority] {
            for _ in 0..2 {
                let s = group[sim.rng.gen_range(0..group.len())];
                let mut v = [0u8; 32];
                sim.rng.fill(&mut v[..]);
                ws.push(sim.write(s, Sim::tag_key(t), Some(Bytes::copy_from_slice(&v)))?);
                writes += 1;
            }
        }
        tag_writes.push(ws);
    }
    report.tag_writes = tag_writes.iter().map(Vec::len).sum();
    log(&format!("partition: {writes} writes on both sides"));
    let p = sim.converge("partitioned (both sides update, until quiescent)", writes)?;
    report.phases.push(p);

    // Heal.
    sim.cut = false;
    log("healed");
    let p = sim.converge("healed (until every site holds identical state)", 0)?;
    report.phases.push(p);

    // Concurrent tags: one winner, everywhere, the greatest version.
    let mut tags_ok_sites = 0;
    for rep in &sim.reps {
        let mut ok = true;
        for (t, ws) in tag_writes.iter().enumerate() {
            let expected = ws
                .iter()
                .max_by(|a, b| {
                    if a.wins_over(b) {
                        std::cmp::Ordering::Greater
                    } else {
                        std::cmp::Ordering::Less
                    }
                })
                .context("no writes")?;
            let held = rep.entry(&Sim::tag_key(t));
            ok &= held.is_some_and(|h| h.hash() == expected.hash());
        }
        tags_ok_sites += usize::from(ok);
    }
    report.tags_checked = tag_writes.len();
    report.tag_sites_ok = tags_ok_sites;
    report.tags_won_by_partition = tag_writes
        .iter()
        .filter(|ws| {
            let best = ws.iter().enumerate().fold(
                0,
                |bi, (i, w)| {
                    if w.wins_over(&ws[bi]) {
                        i
                    } else {
                        bi
                    }
                },
            );
            best < 2
        })
        .count();

    let (pairs, med, p90) = sim.vivaldi_error(None)?;
    report.vivaldi_pairs = pairs;
    report.vivaldi_median = med;
    report.vivaldi_p90 = p90;
    let rep0 = sim.reps[0].clone();
    let (_, pm, p9) = sim.vivaldi_error(Some(&rep0))?;
    report.vivaldi_published_median = pm;
    report.vivaldi_published_p90 = p9;
    report.vivaldi_samples = sim.sites.iter().map(|s| s.viv.samples()).sum();
    report.entries = sim.reps[0].len();
    report.replica_bytes = sim.reps[0].held_bytes();
    report.rss_bytes = proc_status("VmRSS:");
    report.peak_rss_bytes = proc_status("VmHWM:");
    report.total_secs = t0.elapsed().as_secs_f64();
    log("done");
    Ok(report)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|x| x.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse::<u64>().ok())
                })
        })
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpu}, {cores} cores available, {:.1} GiB RAM, Linux {}; single-threaded simulation, release build",
        mem as f64 / (1 << 20) as f64,
        kernel.trim()
    )
}

/// Heal-convergence target, rounds.
pub const TARGET_ROUNDS: usize = 10;
/// Median coordinate error target.
pub const TARGET_MEDIAN_ERR: f64 = 0.15;
/// Metadata memory target per site, bytes.
pub const TARGET_BYTES_PER_SITE: f64 = 4096.0;

fn pf(ok: bool) -> &'static str {
    if ok {
        "PASS"
    } else {
        "FAIL"
    }
}

impl Report {
    /// The healed phase.
    pub fn heal(&self) -> Option<&Phase> {
        self.phases.iter().find(|p| p.name.starts_with("healed"))
    }

    /// Rounds to converge after healing.
    pub fn heal_rounds(&self) -> Option<usize> {
        self.heal().and_then(|p| p.rounds)
    }

    /// Metadata bytes per site.
    pub fn bytes_per_site(&self) -> f64 {
        self.replica_bytes as f64 / self.sites.max(1) as f64
    }

    /// Whether the concurrent tags resolved to the same winner everywhere.
    pub fn tags_ok(&self) -> bool {
        self.tag_sites_ok == self.sites
    }

    fn checks(&self) -> [(String, bool); 4] {
        let rounds = self.heal_rounds();
        [
            (
                format!(
                    "convergence after healing: {} rounds (target ≤ {TARGET_ROUNDS})",
                    rounds.map_or("not converged".into(), |r| r.to_string())
                ),
                rounds.is_some_and(|r| r <= TARGET_ROUNDS),
            ),
            (
                format!(
                    "concurrent tag writes: {}/{} sites hold the same winner of all {} tags \
                     ({} writes, 2 per side per tag; {} tags won by the partitioned side)",
                    self.tag_sites_ok,
                    self.sites,
                    self.tags_checked,
                    self.tag_writes,
                    self.tags_won_by_partition
                ),
                self.tags_ok(),
            ),
            (
                format!(
                    "median RTT estimation error: {:.1}% (target ≤ {:.0}%)",
                    self.vivaldi_median * 100.0,
                    TARGET_MEDIAN_ERR * 100.0
                ),
                self.vivaldi_median <= TARGET_MEDIAN_ERR,
            ),
            (
                format!(
                    "metadata memory per site: {:.0} B (target ≤ {:.0} B)",
                    self.bytes_per_site(),
                    TARGET_BYTES_PER_SITE
                ),
                self.bytes_per_site() <= TARGET_BYTES_PER_SITE,
            ),
        ]
    }

    /// Whether every target is met.
    pub fn all_pass(&self) -> bool {
        self.checks().iter().all(|(_, ok)| *ok)
    }

    /// One line for the terminal.
    pub fn verdict_line(&self) -> String {
        self.checks()
            .iter()
            .map(|(m, ok)| format!("{}: {m}", pf(*ok)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The markdown report.
    pub fn markdown(&self, command: &str) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# Site-metadata scale simulation ({} sites)\n",
            self.sites
        );
        let _ = writeln!(s, "Command:\n\n```\n{command}\n```\n");
        let _ = writeln!(s, "Machine: {}\n", machine());
        let _ = writeln!(
            s,
            "{} sites (1 core, {} regional, {} edge) in 10 regions; every site runs one exchange per \
             round with its parent and {} peers ({} in-region, 1 anywhere); {} sites partitioned \
             (whole regions from the last one, with their regional sites; a remainder is \
             made of edge sites of the next region). Every exchange runs the real cairn-meta \
             state machines and frame codec; entries per replica at the end: {}. One round = 5 s \
             simulated.\n",
            self.sites,
            self.regionals,
            self.sites - 1 - self.regionals,
            self.peers,
            self.peers.saturating_sub(1),
            self.partitioned,
            self.entries
        );
        let _ = writeln!(s, "## Targets\n");
        let _ = writeln!(s, "| result | check |\n|---|---|");
        for (m, ok) in self.checks() {
            let _ = writeln!(s, "| {} | {m} |", pf(ok));
        }
        let _ = writeln!(s, "\n## Phases\n");
        let _ = writeln!(
            s,
            "| phase | writes | rounds to converge | bytes | entries transferred | wall time |\n|---|---:|---:|---:|---:|---:|"
        );
        for p in &self.phases {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.1} MB | {} | {} |",
                p.name,
                p.writes,
                p.rounds.map_or("not converged".into(), |r| r.to_string()),
                p.bytes() as f64 / 1e6,
                p.applied(),
                if p.per_round.is_empty() {
                    "—".to_string()
                } else {
                    format!("{:.1} s", p.secs())
                }
            );
        }
        for p in &self.phases {
            if p.per_round.is_empty() {
                continue;
            }
            let _ = writeln!(s, "\n### {}\n", p.name);
            let _ = writeln!(
                s,
                "| round | exchanges | past root digest | frames | bytes | bytes/site | entries | sites converged | wall time |\n|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
            );
            for (i, r) in p.per_round.iter().enumerate() {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {:.1} MB | {:.1} KB | {} | {} | {:.2} s |",
                    i + 1,
                    r.exchanges,
                    r.differing,
                    r.frames,
                    r.bytes as f64 / 1e6,
                    r.bytes as f64 / self.sites as f64 / 1e3,
                    r.applied,
                    r.converged_sites,
                    r.secs
                );
            }
        }
        let _ = writeln!(s, "\n## Latency map (Vivaldi, 3 dimensions + height)\n");
        let _ = writeln!(
            s,
            "Relative error |estimated − true| / true over {} random pairs of sites that never \
             exchanged a probe; {} samples applied in total.\n",
            self.vivaldi_pairs, self.vivaldi_samples
        );
        let _ = writeln!(s, "| coordinates | median | p90 |\n|---|---:|---:|");
        let _ = writeln!(
            s,
            "| live (each site's own state) | {:.1}% | {:.1}% |",
            self.vivaldi_median * 100.0,
            self.vivaldi_p90 * 100.0
        );
        let _ = writeln!(
            s,
            "| as replicated in site records, read at core-0 | {:.1}% | {:.1}% |",
            self.vivaldi_published_median * 100.0,
            self.vivaldi_published_p90 * 100.0
        );
        let _ = writeln!(s, "\n## Memory and time\n");
        let _ = writeln!(s, "| figure | value |\n|---|---:|");
        let _ = writeln!(
            s,
            "| one replica's metadata (held bytes) | {:.2} MiB |",
            self.replica_bytes as f64 / (1 << 20) as f64
        );
        let _ = writeln!(
            s,
            "| metadata memory per site (replica ÷ sites) | {:.0} B |",
            self.bytes_per_site()
        );
        let _ = writeln!(
            s,
            "| process RSS at the end ({} replicas, entries shared) | {:.2} GiB |",
            self.sites,
            self.rss_bytes as f64 / (1u64 << 30) as f64
        );
        let _ = writeln!(
            s,
            "| peak process RSS | {:.2} GiB |",
            self.peak_rss_bytes as f64 / (1u64 << 30) as f64
        );
        let _ = writeln!(
            s,
            "| time per round, all in sync ({} exchanges) | {:.2} s |",
            self.phases
                .iter()
                .flat_map(|p| p.per_round.first())
                .map(|r| r.exchanges)
                .next()
                .unwrap_or(0),
            self.idle_round_secs
        );
        if let Some(h) = self.heal() {
            let n = h.per_round.len().max(1);
            let _ = writeln!(
                s,
                "| time per round after healing (mean of {n}) | {:.2} s |",
                h.secs() / n as f64
            );
        }
        let _ = writeln!(s, "| total wall time | {:.1} s |", self.total_secs);
        let _ = writeln!(s, "\n## Notes\n");
        for note in [
            "Bootstrap is a snapshot: every replica starts from the merge of every site's first \
             writes (as a new site would from a bulk copy of its parent's replica), so the \
             initial N² flood is not simulated. Coordinates in it come from the Vivaldi probe \
             rounds that run first (RTT samples only, as QUIC RTT estimates and pings give).",
            "Within a round exchanges run one after another in a random order, each seeing what \
             earlier ones merged (a deployment where every site syncs once per period). \
             Vivaldi samples continue in every round, on every link used.",
            "Writes: in the converge and partition phases a random fraction of the sites update \
             their record (heartbeat, free disk, coordinate); during the partition 5% of the \
             sites also add an inventory entry, 1% delete one (tombstones), and every \
             concurrent tag is written by two sites on each side of the cut in the same \
             simulated millisecond with skewed clocks (±200 ms).",
            "Bytes are whole frames (headers included) in both directions. A differing \
             exchange lists the fingerprints of every bucket whose digest differs, and an \
             entry whose key both sides hold in different versions travels both ways (the \
             older one is discarded on arrival), so a bulk change of ~1,000 records costs \
             several times its payload; an exchange between replicas in sync costs two \
             frames of about 30 bytes.",
        ] {
            let _ = writeln!(s, "- {note}");
        }
        s
    }

    /// The figures as JSON.
    pub fn json(&self) -> serde_json::Value {
        let phases: Vec<serde_json::Value> = self
            .phases
            .iter()
            .map(|p| {
                serde_json::json!({
                    "name": p.name,
                    "writes": p.writes,
                    "rounds": p.rounds,
                    "bytes": p.bytes(),
                    "entries_transferred": p.applied(),
                    "secs": p.secs(),
                    "per_round": p.per_round.iter().map(|r| serde_json::json!({
                        "exchanges": r.exchanges, "differing": r.differing, "frames": r.frames,
                        "bytes": r.bytes, "applied": r.applied, "secs": r.secs,
                        "converged_sites": r.converged_sites,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        serde_json::json!({
            "sites": self.sites,
            "partitioned": self.partitioned,
            "seed": self.seed,
            "peers": self.peers,
            "entries_per_replica": self.entries,
            "phases": phases,
            "heal_rounds": self.heal_rounds(),
            "tags_checked": self.tags_checked,
            "tag_sites_ok": self.tag_sites_ok,
            "vivaldi_median": self.vivaldi_median,
            "vivaldi_p90": self.vivaldi_p90,
            "vivaldi_published_median": self.vivaldi_published_median,
            "vivaldi_published_p90": self.vivaldi_published_p90,
            "replica_bytes": self.replica_bytes,
            "bytes_per_site": self.bytes_per_site(),
            "rss_bytes": self.rss_bytes,
            "peak_rss_bytes": self.peak_rss_bytes,
            "idle_round_secs": self.idle_round_secs,
            "total_secs": self.total_secs,
            "all_pass": self.all_pass(),
        })
    }
}
