//! Site metadata in the node: the `cairn-meta` core wired to the store (for
//! persistence), the transport (for anti-entropy) and the API.
//!
//! - Every entry of the replicated map is persisted in the store's `meta`
//!   column family (key: the entry's encoded key; value: the encoded entry)
//!   and merged back into memory at start, so a restarted site resumes from
//!   its last state and its clock never goes back.
//! - Every `interval` the node runs one anti-entropy exchange with each of
//!   its parents and peers, over a `MetaSync` stream of the transport:
//!   digests first, then only what differs. A site cut off keeps answering
//!   from its own replica; exchanges resume when links come back.
//! - The site's own record (labels, parent, capacity, heartbeat, network
//!   coordinate) is rewritten every `heartbeat` (not every round: at
//!   thousands of sites each rewrite travels everywhere). Liveness follows
//!   the heartbeat counters seen, directly or through gossip: up, then
//!   suspect after `suspect_after` of silence, down after `down_after`.
//! - Each exchange feeds QUIC's RTT estimate for that peer into the site's
//!   Vivaldi coordinate, which estimates the RTT to sites never talked to.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use cairn_chunkstore::Store;
use cairn_meta::record::{Capacity, Heartbeat, Labels};
use cairn_meta::sync::frame_len;
use cairn_meta::{
    Entry, Hlc, Initiator, Key, Liveness, LivenessConfig, Message, Replica, Responder, SiteRecord,
    SiteState, Step, Vivaldi,
};
use cairn_transport::fetch::{Fetcher, PeerAddr};
use cairn_transport::server::{BoxFuture, HandedStream, StreamHandler};
use parking_lot::Mutex;
use prometheus::{Gauge, IntCounterVec, IntGaugeVec, Opts, Registry};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// `[meta]` settings.
#[derive(Debug, Clone)]
pub struct MetaSettings {
    /// Time between anti-entropy rounds (default 5 s).
    pub interval: Duration,
    /// Time between rewrites of the site's own record (default 30 s).
    pub heartbeat: Duration,
    /// Silence after which a site is suspect (default 90 s: three lost
    /// heartbeats).
    pub suspect_after: Duration,
    /// Silence after which a site is down (default 5 min).
    pub down_after: Duration,
    /// CPU offered to workloads, millicores (0: not offered).
    pub cpu_millis: u64,
    /// Memory offered to workloads, bytes (0: not offered).
    pub mem_bytes: u64,
    /// Where the site is, `(lat, lon)` in degrees.
    pub geo: Option<(f32, f32)>,
    /// The parent site's name, announced in the site record.
    pub parent: Option<String>,
}

impl Default for MetaSettings {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(5),
            heartbeat: Duration::from_secs(30),
            suspect_after: Duration::from_secs(90),
            down_after: Duration::from_secs(300),
            cpu_millis: 0,
            mem_bytes: 0,
            geo: None,
            parent: None,
        }
    }
}

/// Site-metadata metrics.
#[derive(Debug, Clone)]
struct MetaMetrics {
    sites: IntGaugeVec,
    exchanges: IntCounterVec,
    bytes: IntCounterVec,
    entries: IntCounterVec,
    coord_error: Gauge,
    rtt_estimate_error: Gauge,
}

impl MetaMetrics {
    fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            sites: IntGaugeVec::new(
                Opts::new(
                    "cairn_meta_sites",
                    "Known sites by state as seen from here: up, suspect, down.",
                ),
                &["state"],
            )?,
            exchanges: IntCounterVec::new(
                Opts::new(
                    "cairn_meta_exchanges_total",
                    "Anti-entropy exchanges by role (initiator, responder) and outcome (in_sync, synced, failed).",
                ),
                &["role", "outcome"],
            )?,
            bytes: IntCounterVec::new(
                Opts::new(
                    "cairn_meta_bytes_total",
                    "Anti-entropy bytes by direction (in, out).",
                ),
                &["dir"],
            )?,
            entries: IntCounterVec::new(
                Opts::new(
                    "cairn_meta_entries_total",
                    "Record entries received that changed the local replica (applied) or did not (stale).",
                ),
                &["outcome"],
            )?,
            rtt_estimate_error: Gauge::new(
                "cairn_meta_rtt_estimate_error",
                "Median relative error of the coordinate-estimated RTT against the measured RTT, over the peers this site talks to (estimated just before each measurement).",
            )?,
            coord_error: Gauge::new(
                "cairn_meta_coord_error",
                "This site's Vivaldi coordinate error estimate (relative; 1.0 before any sample).",
            )?,
        };
        registry.register(Box::new(m.sites.clone()))?;
        registry.register(Box::new(m.exchanges.clone()))?;
        registry.register(Box::new(m.bytes.clone()))?;
        registry.register(Box::new(m.entries.clone()))?;
        registry.register(Box::new(m.coord_error.clone()))?;
        registry.register(Box::new(m.rtt_estimate_error.clone()))?;
        Ok(m)
    }

    fn count_exchange(&self, role: &str, res: &Result<(), String>, in_sync: bool) {
        let outcome = match (res, in_sync) {
            (Err(_), _) => "failed",
            (Ok(()), true) => "in_sync",
            (Ok(()), false) => "synced",
        };
        self.exchanges.with_label_values(&[role, outcome]).inc();
    }
}

/// Errors of the metadata layer.
#[derive(Debug, thiserror::Error)]
pub enum MetaError {
    /// The store refused a read or write.
    #[error("metadata store: {0}")]
    Store(#[from] cairn_chunkstore::StoreError),
    /// A persisted or received record is bad.
    #[error("metadata record: {0}")]
    Record(String),
    /// Metrics could not be registered.
    #[error("metadata metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

struct State {
    replica: Replica,
    hlc: Hlc,
    viv: Vivaldi,
    live: Liveness<String>,
    /// Latest measured RTT (ms) to each peer we exchange with, by site.
    rtt: HashMap<String, f64>,
    /// Relative error of the estimate against each peer's latest
    /// measurement, taken before the measurement moved the coordinate.
    est_err: HashMap<String, f64>,
    heartbeat: u64,
}

struct Inner {
    site: String,
    labels: BTreeMap<String, String>,
    settings: MetaSettings,
    store: Arc<Store>,
    state: Mutex<State>,
    metrics: MetaMetrics,
}

/// The node's site metadata. Cheap to clone.
#[derive(Clone)]
pub struct Meta {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Meta {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Meta")
            .field("site", &self.inner.site)
            .finish()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn storage_key(key: &Key) -> Vec<u8> {
    let mut k = Vec::with_capacity(key.encoded_len());
    key.encode(&mut k);
    k
}

/// Largest first step an exchange may wait for before giving up on a peer.
const FRAME_TIMEOUT: Duration = Duration::from_secs(20);

impl Meta {
    /// Load the persisted replica from `store` and write this site's record
    /// (a new heartbeat).
    pub fn open(
        store: Arc<Store>,
        site: &str,
        labels: BTreeMap<String, String>,
        settings: MetaSettings,
        registry: &Registry,
    ) -> Result<Self, MetaError> {
        let live = Liveness::new(LivenessConfig {
            suspect_after_ms: settings.suspect_after.as_millis() as u64,
            down_after_ms: settings.down_after.as_millis() as u64,
        })
        .map_err(|e| MetaError::Record(e.to_string()))?;
        let mut replica = Replica::new();
        let mut hlc = Hlc::new(cairn_meta::hlc::origin_id(site), 60_000);
        let mut newest = cairn_meta::Timestamp::default();
        let mut bad = 0usize;
        for (_, v) in store.meta_scan()? {
            match Entry::decode(Bytes::from(v.into_vec())) {
                Ok(e) => {
                    newest = newest.max(e.version().ts);
                    replica.merge(e);
                }
                Err(_) => bad += 1,
            }
        }
        if bad > 0 {
            warn!(bad, "skipped undecodable persisted metadata entries");
        }
        hlc.restore(newest);
        let mut viv = Vivaldi::new(cairn_meta::hlc::origin_id(site));
        let mut heartbeat = 0;
        if let Some(Ok(own)) = replica
            .get(&Key::Site(site.to_owned()))
            .map(|b| SiteRecord::decode(&b[..]))
        {
            heartbeat = own.heartbeat.counter;
            if let Some(c) = own.coord {
                let _ = viv.restore(c);
            }
        }
        let meta = Self {
            inner: Arc::new(Inner {
                site: site.to_owned(),
                labels,
                settings,
                store,
                state: Mutex::new(State {
                    replica,
                    hlc,
                    viv,
                    live,
                    rtt: HashMap::new(),
                    est_err: HashMap::new(),
                    heartbeat,
                }),
                metrics: MetaMetrics::new(registry)?,
            }),
        };
        {
            // Everything known so far counts as heard at start.
            let now = now_ms();
            let mut st = meta.inner.state.lock();
            let seen: Vec<(String, u64)> = st
                .replica
                .sites()
                .filter_map(Result::ok)
                .filter(|r| r.name != site)
                .map(|r| (r.name, r.heartbeat.counter))
                .collect();
            for (name, counter) in seen {
                st.live.observe(name, counter, now);
            }
        }
        meta.beat()?;
        Ok(meta)
    }

    /// This site's name.
    pub fn site(&self) -> &str {
        &self.inner.site
    }

    /// The site record this node publishes now.
    fn own_record(&self, st: &State) -> SiteRecord {
        let mut labels = Labels::default();
        for (k, v) in &self.inner.labels {
            match k.as_str() {
                "region" => labels.region = v.clone(),
                "zone" => labels.zone = v.clone(),
                "kind" => labels.kind = v.clone(),
                _ => labels.extra.push((k.clone(), v.clone())),
            }
        }
        let s = &self.inner.settings;
        let summary = self.inner.store.summary();
        let (disk_total, disk_free) = disk_space(&summary.dir);
        SiteRecord {
            name: self.inner.site.clone(),
            labels,
            geo: s.geo.map(|(lat, lon)| cairn_meta::record::Geo { lat, lon }),
            parent: s.parent.clone(),
            capacity: Capacity {
                disk_total,
                disk_free,
                cache_budget: summary.budget_bytes.unwrap_or(0),
                cpu_millis: s.cpu_millis,
                mem_bytes: s.mem_bytes,
            },
            heartbeat: Heartbeat {
                counter: st.heartbeat,
                wall_ms: now_ms(),
            },
            // Published from the start (the origin, error 1.0): a site whose
            // peers had no coordinate yet could otherwise never take a sample.
            coord: Some(st.viv.coord()),
        }
    }

    /// Bump the heartbeat and rewrite this site's record (durable before
    /// it returns).
    pub fn beat(&self) -> Result<(), MetaError> {
        let entry = {
            let mut st = self.inner.state.lock();
            st.heartbeat += 1;
            let rec = self.own_record(&st);
            let value = rec.encode().map_err(|e| MetaError::Record(e.to_string()))?;
            let st = &mut *st;
            st.replica
                .put(
                    &mut st.hlc,
                    now_ms(),
                    Key::Site(self.inner.site.clone()),
                    value,
                )
                .map_err(|e| MetaError::Record(e.to_string()))?
        };
        self.persist(&[entry])
    }

    /// Write a record from this site (a multi-writer record such as a tag
    /// or a control-plane record; a site's own record is written by
    /// [`Meta::beat`]). Durable when this returns; spreads by anti-entropy.
    /// Concurrent writes elsewhere resolve last-writer-wins by version, the
    /// same way at every site.
    pub fn put(&self, key: Key, value: Bytes) -> Result<(), MetaError> {
        self.write(key, Some(value))
    }

    /// Delete a record (a tombstone that spreads like a write).
    pub fn delete(&self, key: Key) -> Result<(), MetaError> {
        self.write(key, None)
    }

    fn write(&self, key: Key, value: Option<Bytes>) -> Result<(), MetaError> {
        if matches!(&key, Key::Site(n) | Key::Inventory { site: n, .. } if n != &self.inner.site) {
            return Err(MetaError::Record(format!(
                "{key:?} belongs to another site"
            )));
        }
        let entry = {
            let mut st = self.inner.state.lock();
            let st = &mut *st;
            let now = now_ms();
            match value {
                Some(v) => st.replica.put(&mut st.hlc, now, key, v),
                None => st.replica.delete(&mut st.hlc, now, key),
            }
            .map_err(|e| MetaError::Record(e.to_string()))?
        };
        self.persist(&[entry])
    }

    /// The current value of a record here (`None`: unknown or deleted).
    pub fn get(&self, key: &Key) -> Option<Bytes> {
        self.inner.state.lock().replica.get(key).cloned()
    }

    /// Digest of everything this site holds: equal at two sites exactly
    /// when they hold the same records at the same versions.
    pub fn root_digest(&self) -> u128 {
        self.inner.state.lock().replica.root_digest()
    }

    fn persist(&self, entries: &[Arc<Entry>]) -> Result<(), MetaError> {
        let puts: Vec<(Vec<u8>, Vec<u8>)> = entries
            .iter()
            .map(|e| {
                let mut v = BytesMut::with_capacity(e.encoded_len());
                e.encode(&mut v);
                (storage_key(e.key()), v.to_vec())
            })
            .collect();
        self.inner.store.meta_write(&puts, &[])?;
        Ok(())
    }

    /// Merge what an exchange step brought and persist what changed.
    async fn apply(&self, step: &Step) -> Result<(), MetaError> {
        if step.apply.is_empty() && step.peer_clock.is_none() {
            return Ok(());
        }
        let now = now_ms();
        let changed: Vec<Arc<Entry>> = {
            let mut st = self.inner.state.lock();
            if let Some(c) = step.peer_clock {
                st.hlc.observe_clamped(c, now);
            }
            let mut changed = Vec::new();
            for e in &step.apply {
                if st.replica.merge_shared(e.clone()).changed() {
                    if let Key::Site(name) = e.key() {
                        if name != &self.inner.site {
                            if let Some(Ok(r)) = e.value().map(|v| SiteRecord::decode(&v[..])) {
                                st.live.observe(name.clone(), r.heartbeat.counter, now);
                            }
                        }
                    }
                    changed.push(e.clone());
                }
            }
            changed
        };
        let m = &self.inner.metrics;
        m.entries
            .with_label_values(&["applied"])
            .inc_by(changed.len() as u64);
        m.entries
            .with_label_values(&["stale"])
            .inc_by((step.apply.len() - changed.len()) as u64);
        if changed.is_empty() {
            return Ok(());
        }
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.persist(&changed))
            .await
            .map_err(|e| MetaError::Record(e.to_string()))?
    }

    /// The stream handler the transport server hands `MetaSync` to.
    pub fn stream_handler(&self) -> Arc<dyn StreamHandler> {
        Arc::new(Handler(self.clone()))
    }

    /// Run one exchange with `peer` as initiator.
    pub async fn sync_with(&self, fetcher: &Fetcher, peer: &PeerAddr) -> Result<(), String> {
        let (mut send, mut recv, rtt) = fetcher.open_meta_stream(peer).await?;
        let (mut ini, hello) = {
            let mut st = self.inner.state.lock();
            let clock = st.hlc.now(now_ms());
            Initiator::start(&st.replica, clock)
        };
        let m = &self.inner.metrics;
        let mut buf = BytesMut::new();
        let mut out = Some(hello);
        let mut in_sync = false;
        let res: Result<(), String> = async {
            loop {
                if let Some(msg) = out.take() {
                    write_msg(&mut send, &msg, m).await?;
                }
                let Some(msg) = read_msg(&mut recv, &mut buf, m).await? else {
                    return Err("peer ended the exchange early".into());
                };
                in_sync |= matches!(msg, Message::InSync { .. });
                let step = {
                    let st = self.inner.state.lock();
                    ini.handle(&st.replica, msg).map_err(|e| e.to_string())?
                };
                self.apply(&step).await.map_err(|e| e.to_string())?;
                out = step.send;
                if step.done {
                    if let Some(msg) = out.take() {
                        write_msg(&mut send, &msg, m).await?;
                    }
                    let _ = send.finish();
                    return Ok(());
                }
            }
        }
        .await;
        m.count_exchange("initiator", &res, in_sync);
        if res.is_ok() {
            self.observe_rtt(peer, rtt);
        }
        res
    }

    /// Feed a measured RTT to the peer into our coordinate. The peer's
    /// site record is looked up by its node name: a site's node is expected
    /// to carry the site's name (as `cairn cluster add-node SITE` makes it).
    fn observe_rtt(&self, peer: &PeerAddr, rtt: Duration) {
        let Some(name) = peer.name.clone() else {
            return;
        };
        let ms = rtt.as_secs_f64() * 1000.0;
        let mut st = self.inner.state.lock();
        st.rtt.insert(name.clone(), ms);
        let remote = st
            .replica
            .get(&Key::Site(name.clone()))
            .and_then(|b| SiteRecord::decode(b).ok())
            .and_then(|r| r.coord);
        let Some(c) = remote else {
            return;
        };
        if st.viv.samples() > 0 && ms > 0.0 {
            let est = cairn_meta::vivaldi::estimate_rtt(&st.viv.coord(), &c);
            st.est_err.insert(name, (est - ms).abs() / ms);
            let mut errs: Vec<f64> = st.est_err.values().copied().collect();
            errs.sort_by(f64::total_cmp);
            self.inner
                .metrics
                .rtt_estimate_error
                .set(errs[errs.len() / 2]);
        }
        if st.viv.observe(ms.max(0.01), &c).is_ok() {
            self.inner.metrics.coord_error.set(st.viv.error());
        }
    }

    async fn respond(&self, s: HandedStream) {
        let HandedStream {
            mut send,
            mut recv,
            leftover,
            from,
            rtt,
        } = s;
        let mut buf = leftover;
        let mut resp = Responder::new();
        let m = &self.inner.metrics;
        let mut in_sync = false;
        let res: Result<(), String> = async {
            loop {
                let Some(msg) = read_msg(&mut recv, &mut buf, m).await? else {
                    return if resp.is_done() {
                        Ok(())
                    } else {
                        Err("peer ended the exchange early".into())
                    };
                };
                let step = {
                    let mut st = self.inner.state.lock();
                    let clock = st.hlc.now(now_ms());
                    resp.handle(&st.replica, clock, msg)
                        .map_err(|e| e.to_string())?
                };
                self.apply(&step).await.map_err(|e| e.to_string())?;
                if let Some(msg) = &step.send {
                    in_sync |= matches!(msg, Message::InSync { .. });
                    write_msg(&mut send, msg, m).await?;
                }
                if step.done {
                    let _ = send.finish();
                    return Ok(());
                }
            }
        }
        .await;
        m.count_exchange("responder", &res, in_sync);
        match res {
            // Responders measure too: a site with no links of its own (the
            // top of the tree) still gets a coordinate.
            Ok(()) => self.observe_rtt(&from, rtt),
            Err(e) => debug!(peer = %from.addr, error = %e, "metadata exchange failed"),
        }
    }

    /// Run anti-entropy rounds with `links` and heartbeats until `cancel`.
    pub async fn run(self, fetcher: Fetcher, links: Vec<PeerAddr>, cancel: CancellationToken) {
        let s = self.inner.settings.clone();
        let mut round = tokio::time::interval(s.interval);
        round.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut beat = tokio::time::interval(s.heartbeat);
        beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        beat.tick().await; // `open` just beat
        info!(links = links.len(), "site metadata: anti-entropy running");
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = beat.tick() => {
                    let me = self.clone();
                    match tokio::task::spawn_blocking(move || me.beat()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => warn!(error = %e, "cannot write this site's record"),
                        Err(e) => warn!(error = %e, "heartbeat task failed"),
                    }
                }
                _ = round.tick() => {
                    for peer in &links {
                        let r = tokio::select! {
                            _ = cancel.cancelled() => return,
                            r = tokio::time::timeout(4 * FRAME_TIMEOUT, self.sync_with(&fetcher, peer)) => r,
                        };
                        match r {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => debug!(peer = %peer.addr, error = %e, "metadata exchange failed"),
                            Err(_) => debug!(peer = %peer.addr, "metadata exchange timed out"),
                        }
                    }
                    self.update_gauges();
                }
            }
        }
    }

    fn update_gauges(&self) {
        let st = self.inner.state.lock();
        let c = st.live.counts(now_ms());
        let g = &self.inner.metrics.sites;
        g.with_label_values(&["up"]).set(c.up as i64);
        g.with_label_values(&["suspect"]).set(c.suspect as i64);
        g.with_label_values(&["down"]).set(c.down as i64);
    }

    /// Every known site as the API shows it, sorted by name.
    pub fn sites(&self) -> SitesView {
        let now = now_ms();
        let st = self.inner.state.lock();
        let own_coord = (st.viv.samples() > 0).then(|| st.viv.coord());
        let mut inventory: HashMap<String, (u64, u64)> = HashMap::new();
        for e in st.replica.iter() {
            if let (Key::Inventory { site, .. }, Some(v)) = (e.key(), e.value()) {
                let n = inventory.entry(site.clone()).or_default();
                n.0 += 1;
                if cairn_meta::InventoryEntry::decode(&v[..]).is_ok_and(|i| i.is_complete()) {
                    n.1 += 1;
                }
            }
        }
        let mut sites: Vec<SiteView> = st
            .replica
            .sites()
            .filter_map(Result::ok)
            .map(|r| {
                let me = r.name == self.inner.site;
                let state = if me {
                    "self"
                } else {
                    match st.live.state(r.name.as_str(), now) {
                        Some(SiteState::Up) => "up",
                        Some(SiteState::Suspect) => "suspect",
                        Some(SiteState::Down) => "down",
                        None => "unknown",
                    }
                };
                let (objects, complete) = inventory.get(&r.name).copied().unwrap_or_default();
                let rtt_est_ms = match (&own_coord, &r.coord) {
                    (Some(a), Some(b)) if !me => Some(cairn_meta::vivaldi::estimate_rtt(a, b)),
                    _ => None,
                };
                SiteView {
                    state: state.into(),
                    labels: LabelsView {
                        region: r.labels.region.clone(),
                        zone: r.labels.zone.clone(),
                        kind: r.labels.kind.clone(),
                        extra: r.labels.extra.iter().cloned().collect(),
                    },
                    geo: r.geo.map(|g| GeoView {
                        lat: g.lat,
                        lon: g.lon,
                    }),
                    parent: r.parent.clone(),
                    capacity: CapacityView {
                        disk_total: r.capacity.disk_total,
                        disk_free: r.capacity.disk_free,
                        cache_budget: r.capacity.cache_budget,
                        cpu_millis: r.capacity.cpu_millis,
                        mem_bytes: r.capacity.mem_bytes,
                    },
                    heartbeat: HeartbeatView {
                        counter: r.heartbeat.counter,
                        wall_ms: r.heartbeat.wall_ms,
                    },
                    last_heard_ms_ago: (!me).then(|| now.saturating_sub(r.heartbeat.wall_ms)),
                    rtt_ms: st.rtt.get(&r.name).copied(),
                    rtt_est_ms,
                    objects,
                    complete,
                    name: r.name,
                }
            })
            .collect();
        sites.sort_by(|a, b| a.name.cmp(&b.name));
        SitesView {
            site: self.inner.site.clone(),
            sites,
        }
    }
}

#[derive(Debug)]
struct Handler(Meta);

impl StreamHandler for Handler {
    fn serve(&self, stream: HandedStream) -> BoxFuture<'static, ()> {
        let meta = self.0.clone();
        Box::pin(async move { meta.respond(stream).await })
    }
}

/// Encode `msg`, count it and send it.
async fn write_msg(
    send: &mut quinn::SendStream,
    msg: &Message,
    m: &MetaMetrics,
) -> Result<(), String> {
    let frame = msg.encode().map_err(|e| e.to_string())?;
    m.bytes
        .with_label_values(&["out"])
        .inc_by(frame.len() as u64);
    send.write_all(&frame).await.map_err(|e| e.to_string())
}

/// Read one metadata frame off `recv` (`None`: the stream ended cleanly
/// between frames).
async fn read_msg(
    recv: &mut quinn::RecvStream,
    buf: &mut BytesMut,
    m: &MetaMetrics,
) -> Result<Option<Message>, String> {
    loop {
        if let Some(n) = frame_len(buf).map_err(|e| e.to_string())? {
            if buf.len() >= n {
                m.bytes.with_label_values(&["in"]).inc_by(n as u64);
                let frame = buf.split_to(n).freeze();
                return Message::decode(frame).map(Some).map_err(|e| e.to_string());
            }
        }
        let chunk = tokio::time::timeout(FRAME_TIMEOUT, recv.read_chunk(1 << 20, true))
            .await
            .map_err(|_| "no metadata frame within 20 s".to_string())?
            .map_err(|e| e.to_string())?;
        match chunk {
            Some(c) => buf.extend_from_slice(&c.bytes),
            None if buf.is_empty() => return Ok(None),
            None => return Err(format!("stream ended inside a frame ({} bytes)", buf.len())),
        }
    }
}

/// Total and free bytes of the filesystem holding `dir` (0, 0 if unknown).
fn disk_space(dir: &std::path::Path) -> (u64, u64) {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return (0, 0);
    };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a writable
    // statvfs the call fills; nothing is kept after it returns.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return (0, 0);
    }
    let frag = st.f_frsize as u64;
    (st.f_blocks as u64 * frag, st.f_bavail as u64 * frag)
}

/// `GET /api/v1/sites`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct SitesView {
    /// This node's site.
    pub site: String,
    /// Every known site, by name.
    pub sites: Vec<SiteView>,
}

/// One site as the API shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[allow(missing_docs)]
pub struct SiteView {
    pub name: String,
    /// `self`, `up`, `suspect`, `down` or `unknown`.
    pub state: String,
    pub labels: LabelsView,
    pub geo: Option<GeoView>,
    pub parent: Option<String>,
    pub capacity: CapacityView,
    pub heartbeat: HeartbeatView,
    /// Age of the latest heartbeat (by the site's own clock).
    pub last_heard_ms_ago: Option<u64>,
    /// Measured RTT from here (QUIC's estimate), for sites we talk to.
    pub rtt_ms: Option<f64>,
    /// RTT estimated from network coordinates.
    pub rtt_est_ms: Option<f64>,
    /// Inventory entries the site holds, and how many are complete.
    pub objects: u64,
    pub complete: u64,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[allow(missing_docs)]
pub struct LabelsView {
    pub region: String,
    pub zone: String,
    pub kind: String,
    pub extra: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[allow(missing_docs)]
pub struct GeoView {
    pub lat: f32,
    pub lon: f32,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[allow(missing_docs)]
pub struct CapacityView {
    pub disk_total: u64,
    pub disk_free: u64,
    pub cache_budget: u64,
    pub cpu_millis: u64,
    pub mem_bytes: u64,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
#[allow(missing_docs)]
pub struct HeartbeatView {
    pub counter: u64,
    pub wall_ms: u64,
}

/// `GET /api/v1/sites` and `GET /api/v1/sites/{name}`.
pub fn routes(meta: Meta) -> axum::Router {
    use axum::extract::{Path, State};
    use axum::http::StatusCode;
    use axum::response::{IntoResponse, Response};
    use axum::routing::get;
    use axum::Json;

    async fn list(State(m): State<Meta>) -> Json<SitesView> {
        Json(m.sites())
    }
    async fn show(State(m): State<Meta>, Path(name): Path<String>) -> Response {
        match m.sites().sites.into_iter().find(|s| s.name == name) {
            Some(s) => Json(s).into_response(),
            None => (
                StatusCode::NOT_FOUND,
                Json(
                    serde_json::json!({ "error": format!("no site named {name:?} is known here") }),
                ),
            )
                .into_response(),
        }
    }
    axum::Router::new()
        .route("/api/v1/sites", get(list))
        .route("/api/v1/sites/{name}", get(show))
        .with_state(meta)
}
