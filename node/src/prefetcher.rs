//! Runs predictive prefetch for open image exports (issue 6/8); the
//! decisions are made by the sans-IO [`crate::prefetch::Planner`].
//!
//! When an NBD export of an image that lacks chunks opens, a task starts
//! for it:
//! 1. It builds the object's access **profile** and **successor model**
//!    from the traces recorded here (`trace/<OBJECT>/…`) and merges in the
//!    ones a parent or peer publishes (the object `prefetch/<OBJECT>`,
//!    fetched at background priority; missing is fine).
//! 2. It asks the planner for chunks and fetches them at prefetch priority
//!    (demand reads always go first on the wire, and a demand read of a
//!    chunk a prefetch has in flight fetches it again rather than wait), a
//!    few requests in flight, never more than the lead ahead of the reader.
//! 3. Every read of the export tells the planner where the reader is (and
//!    whether it had to wait for a demand fetch), which moves the window
//!    on, or switches to successor predictions when the reader leaves the
//!    recorded path.
//!
//! The task lives as long as the export is open (reads off the recorded
//! path can give it new work) and ends when the export closes or on node
//! shutdown; then what it fetched and nobody read counts as wasted. Each site publishes what it learned as
//! `prefetch/<OBJECT>` whenever a trace is stored, so sites that pull the
//! object later (from here) start with it.

use std::sync::Arc;

use cairn_chunkstore::{ObjectHandle, ObjectId, PutOptions, Store, StoreError};
use cairn_transport::wire::{ObjectKey, Priority};
use cairn_transport::{Fetcher, PeerAddr};
use prometheus::{IntCounterVec, IntGauge, Opts, Registry};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::prefetch::{Planner, PlannerStats, Profile, Successors};
use crate::trace::TraceEntry;

/// Store name prefix of published prefetch models.
pub const MODEL_PREFIX: &str = "prefetch/";
const MODEL_MAGIC: &[u8; 4] = b"CPM1";
/// Largest model object read back.
const MAX_MODEL_BYTES: u64 = 64 << 20;
/// Chunks per fetch call: small, so arrivals are reported promptly.
const CHUNKS_PER_CALL: usize = 8;

/// `[prefetch]` settings.
#[derive(Debug, Clone)]
pub struct PrefetchSettings {
    /// Prefetch for image exports that lack chunks (default true).
    pub enabled: bool,
    /// Bytes prefetch may run ahead of the reader (default 16 MiB: about
    /// ten round trips of a 100 Mbit/s × 100 ms link).
    pub lead_bytes: u64,
    /// Prefetched chunks in flight at most (default 32: about 2 MiB, a
    /// few bandwidth-delay products of a 100 Mbit/s × 50 ms link).
    pub max_inflight: usize,
    /// Follow access profiles (default true); false leaves only the
    /// successor model, which predicts after each read (for comparison).
    pub use_profile: bool,
}

impl Default for PrefetchSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            lead_bytes: 16 << 20,
            max_inflight: 32,
            use_profile: true,
        }
    }
}

/// Prefetch metrics.
#[derive(Debug, Clone)]
pub struct PrefetchMetrics {
    /// Chunks by outcome: `fetched`, `hit` (read after prefetch brought
    /// it), `wasted` (fetched, unread when the export closed), `failed`.
    pub chunks: IntCounterVec,
    /// Bytes by the same outcomes.
    pub bytes: IntCounterVec,
    /// Reads that found their chunks local thanks to prefetch (stalls
    /// avoided), and reads that still waited (`stalled`).
    pub reads: IntCounterVec,
    /// Exports prefetching now.
    pub active: IntGauge,
}

impl PrefetchMetrics {
    /// Register the metrics.
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            chunks: IntCounterVec::new(
                Opts::new(
                    "cairn_prefetch_chunks_total",
                    "Prefetched chunks by outcome: fetched, hit (read later), wasted (unread when the export closed), failed.",
                ),
                &["outcome"],
            )?,
            bytes: IntCounterVec::new(
                Opts::new(
                    "cairn_prefetch_bytes_total",
                    "Prefetched bytes by outcome: fetched, hit, wasted.",
                ),
                &["outcome"],
            )?,
            reads: IntCounterVec::new(
                Opts::new(
                    "cairn_prefetch_reads_total",
                    "Reads of prefetching exports: avoided (a stall avoided: the chunks were prefetched), stalled (waited for a demand fetch).",
                ),
                &["kind"],
            )?,
            active: IntGauge::new(
                "cairn_prefetch_active",
                "Image exports with a prefetch task running.",
            )?,
        };
        registry.register(Box::new(m.chunks.clone()))?;
        registry.register(Box::new(m.bytes.clone()))?;
        registry.register(Box::new(m.reads.clone()))?;
        registry.register(Box::new(m.active.clone()))?;
        Ok(m)
    }

    /// The hit ratio so far: hits / fetched (None before any fetch).
    pub fn hit_ratio(&self) -> Option<f64> {
        let f = self.chunks.with_label_values(&["fetched"]).get();
        (f > 0).then(|| self.chunks.with_label_values(&["hit"]).get() as f64 / f as f64)
    }
}

/// Objects with a prefetch task running, with how many tasks.
pub type Active = Arc<parking_lot::Mutex<std::collections::HashMap<ObjectId, usize>>>;

/// What runs a prefetch task needs.
#[derive(Clone)]
pub struct PrefetchEnv {
    /// The node's store.
    pub store: Arc<Store>,
    /// The node's fetcher (background priority is used).
    pub fetcher: Fetcher,
    /// Where chunks and models come from: parents first, then peers.
    pub sources: Vec<PeerAddr>,
    /// `[prefetch]`.
    pub settings: PrefetchSettings,
    /// Metrics.
    pub metrics: PrefetchMetrics,
    /// Tasks stop on it (the node's token or a child).
    pub cancel: CancellationToken,
    /// Where running tasks register (image status shows `prefetching`).
    pub active: Active,
}

impl std::fmt::Debug for PrefetchEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefetchEnv")
            .field("sources", &self.sources)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

struct Shared {
    planner: parking_lot::Mutex<Option<Planner>>,
    wake: Notify,
    cancel: CancellationToken,
    /// Stats already added to the metrics.
    reported: parking_lot::Mutex<PlannerStats>,
    metrics: PrefetchMetrics,
}

/// Held by an open export; stops the task when dropped.
pub struct PrefetchHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for PrefetchHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefetchHandle").finish_non_exhaustive()
    }
}

impl PrefetchHandle {
    /// The export read chunks `first..=last`; `stalled` = it waited for a
    /// demand fetch.
    pub fn on_read(&self, first: u32, last: u32, stalled: bool) {
        let mut g = self.shared.planner.lock();
        if let Some(p) = g.as_mut() {
            let before = p.stats().hits;
            p.on_read(first, last, stalled);
            let hit = p.stats().hits > before;
            drop(g);
            let m = &self.shared.metrics;
            if stalled {
                m.reads.with_label_values(&["stalled"]).inc();
            } else if hit {
                m.reads.with_label_values(&["avoided"]).inc();
            }
            self.shared.wake.notify_one();
        }
    }

    /// Whether the task is still running.
    pub fn active(&self) -> bool {
        !self.shared.cancel.is_cancelled()
    }
}

impl Drop for PrefetchHandle {
    fn drop(&mut self) {
        self.shared.cancel.cancel();
        self.shared.wake.notify_one();
    }
}

/// Start prefetching `object` (open as `handle`) for export `label`, if
/// it lacks chunks. Returns at once; the model is built in the task.
pub fn start(env: &PrefetchEnv, label: &str, handle: Arc<ObjectHandle>) -> Option<PrefetchHandle> {
    if !env.settings.enabled || env.sources.is_empty() {
        return None;
    }
    let shared = Arc::new(Shared {
        planner: parking_lot::Mutex::new(None),
        wake: Notify::new(),
        cancel: env.cancel.child_token(),
        reported: parking_lot::Mutex::new(PlannerStats::default()),
        metrics: env.metrics.clone(),
    });
    let (env2, sh, label) = (env.clone(), shared.clone(), label.to_owned());
    tokio::spawn(async move {
        env2.metrics.active.inc();
        let r = tokio::select! {
            _ = sh.cancel.cancelled() => Ok(()),
            r = run(&env2, &sh, &label, handle) => r,
        };
        if let Err(e) = r {
            warn!(export = %label, error = %e, "prefetch stopped");
        }
        report(&sh, true);
        sh.cancel.cancel();
        env2.metrics.active.dec();
    });
    Some(PrefetchHandle { shared })
}

async fn run(
    env: &PrefetchEnv,
    sh: &Arc<Shared>,
    label: &str,
    handle: Arc<ObjectHandle>,
) -> Result<(), String> {
    let object = handle.id();
    // What is here, and what we learned locally.
    let (store, h) = (env.store.clone(), handle.clone());
    let (local, lens, traces) = tokio::task::spawn_blocking(move || {
        let chunks = h.recipe().chunks();
        let missing: std::collections::HashSet<_> = store
            .missing_chunks(h.recipe())?
            .into_iter()
            .map(|c| c.id)
            .collect();
        let local: Vec<bool> = chunks.iter().map(|c| !missing.contains(&c.id)).collect();
        let lens: Vec<u32> = chunks.iter().map(|c| c.len).collect();
        let traces = crate::trace::load(&store, &object)?;
        Ok::<_, StoreError>((local, lens, traces))
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    if local.iter().all(|l| *l) {
        return Ok(());
    }
    let (mut profile, mut successors) = model_from_traces(&traces);
    // What the sources learned (their published model), merged in.
    match fetch_model(env, &object).await {
        Ok(Some((p, s))) => {
            profile = Some(match profile {
                Some(mine) => mine.merge(&p, Profile::MAX_ENTRIES),
                None => p,
            });
            successors = successors.merge(&s);
        }
        Ok(None) => {}
        Err(e) => debug!(export = %label, error = %e, "no prefetch model from the sources"),
    }
    let profile = profile.filter(|p| env.settings.use_profile && !p.is_empty());
    info!(
        export = %label,
        profile_chunks = profile.as_ref().map_or(0, |p| p.len()),
        missing = local.iter().filter(|l| !**l).count(),
        "prefetch started"
    );
    *sh.planner.lock() = Some(Planner::new(
        profile,
        Some(successors),
        lens,
        local,
        env.settings.lead_bytes,
        env.settings.max_inflight,
    ));
    let recipe = handle.recipe();
    let mut calls = tokio::task::JoinSet::new();
    // Registered as prefetching (image status) while there is work.
    let mut busy = Busy {
        active: &env.active,
        object,
        on: false,
    };
    loop {
        let notified = sh.wake.notified();
        let next = {
            let mut g = sh.planner.lock();
            let Some(p) = g.as_mut() else { return Ok(()) };
            // Done for now: wait for reads (a read off the recorded path
            // can bring new predictions) until the export closes.
            let next = p.next();
            busy.set(!(p.done() && calls.is_empty() && next.is_empty()));
            next
        };
        for group in next.chunks(CHUNKS_PER_CALL) {
            let want: Vec<_> = group
                .iter()
                .filter_map(|&i| recipe.chunks().get(i as usize).map(|c| (c.id, c.len)))
                .collect();
            let group = group.to_vec();
            let (fetcher, sources) = (env.fetcher.clone(), env.sources.clone());
            calls.spawn(async move {
                let r = fetcher
                    .fetch_chunks(&want, &sources, Priority::Prefetch)
                    .await;
                (group, r.is_ok())
            });
        }
        report(sh, false);
        tokio::select! {
            _ = notified => {}
            Some(done) = calls.join_next() => {
                if let Ok((group, ok)) = done {
                    let mut g = sh.planner.lock();
                    if let Some(p) = g.as_mut() {
                        for c in group {
                            if ok { p.on_fetched(c) } else { p.on_failed(c) }
                        }
                    }
                }
            }
        }
    }
}

/// Marks an object as prefetching in [`Active`] while `on`.
struct Busy<'a> {
    active: &'a Active,
    object: ObjectId,
    on: bool,
}

impl Busy<'_> {
    fn set(&mut self, on: bool) {
        if on == self.on {
            return;
        }
        self.on = on;
        let mut a = self.active.lock();
        if on {
            *a.entry(self.object).or_insert(0) += 1;
        } else if let Some(n) = a.get_mut(&self.object) {
            *n -= 1;
            if *n == 0 {
                a.remove(&self.object);
            }
        }
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.set(false);
    }
}

/// Add the planner's progress since the last report to the metrics; at
/// the end, what was fetched and never read counts as wasted.
fn report(sh: &Shared, end: bool) {
    let Some(now) = sh.planner.lock().as_ref().map(|p| p.stats()) else {
        return;
    };
    let mut last = sh.reported.lock();
    let m = &sh.metrics;
    let add = |c: &IntCounterVec, k: &str, now: u64, then: u64| {
        if now > then {
            c.with_label_values(&[k]).inc_by(now - then);
        }
    };
    add(&m.chunks, "fetched", now.prefetched, last.prefetched);
    add(
        &m.bytes,
        "fetched",
        now.prefetched_bytes,
        last.prefetched_bytes,
    );
    add(&m.chunks, "hit", now.hits, last.hits);
    add(&m.bytes, "hit", now.hit_bytes, last.hit_bytes);
    add(&m.chunks, "failed", now.failed, last.failed);
    if end {
        add(&m.chunks, "wasted", now.wasted, 0);
        add(&m.bytes, "wasted", now.wasted_bytes, 0);
    }
    *last = now;
}

/// Profile and successor model from local traces.
fn model_from_traces(traces: &[Vec<TraceEntry>]) -> (Option<Profile>, Successors) {
    let mut s = Successors::new();
    for t in traces {
        s.learn(t);
    }
    let p = (!traces.is_empty()).then(|| Profile::from_traces(traces, Profile::MAX_ENTRIES));
    (p, s)
}

/// Encode a model: magic, u32 profile length, profile, successors.
pub fn encode_model(p: &Profile, s: &Successors) -> Vec<u8> {
    let pb = p.encode();
    let mut out = Vec::with_capacity(8 + pb.len());
    out.extend_from_slice(MODEL_MAGIC);
    out.extend_from_slice(&(pb.len() as u32).to_le_bytes());
    out.extend_from_slice(&pb);
    out.extend_from_slice(&s.encode());
    out
}

/// Decode a model; `None` for anything malformed.
pub fn decode_model(b: &[u8]) -> Option<(Profile, Successors)> {
    let rest = b.strip_prefix(MODEL_MAGIC.as_slice())?;
    let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let pb = rest.get(4..4usize.checked_add(len)?)?;
    let sb = rest.get(4 + len..)?;
    Some((Profile::decode(pb).ok()?, Successors::decode(sb).ok()?))
}

fn model_name(object: &ObjectId) -> String {
    format!("{MODEL_PREFIX}{object}")
}

/// Publish what this site learned about `object` (from its own traces)
/// as `prefetch/<OBJECT>`, for sites that fetch from us. Blocking.
pub fn publish(store: &Store, object: &ObjectId) -> Result<(), StoreError> {
    let traces = crate::trace::load(store, object)?;
    let (Some(p), s) = model_from_traces(&traces) else {
        return Ok(());
    };
    store.put_bytes(
        &encode_model(&p, &s),
        &PutOptions {
            name: Some(model_name(object)),
            pin: false,
            ..Default::default()
        },
    )?;
    Ok(())
}

/// Fetch the sources' model of `object` (background priority).
async fn fetch_model(
    env: &PrefetchEnv,
    object: &ObjectId,
) -> Result<Option<(Profile, Successors)>, String> {
    let name = model_name(object);
    let (id, _) = match env
        .fetcher
        .fetch_object(&ObjectKey::Name(name), &env.sources, Priority::Background)
        .await
    {
        Ok(r) => r,
        Err(cairn_transport::FetchError::NotFound(_)) => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let (store, object) = (env.store.clone(), *object);
    tokio::task::spawn_blocking(move || {
        match crate::trace::read_small(&store, &id, MAX_MODEL_BYTES) {
            Ok(Some(b)) => Ok(decode_model(&b)),
            Ok(None) => Err(format!("model of {object} over {MAX_MODEL_BYTES} bytes")),
            Err(e) => Err(e.to_string()),
        }
    })
    .await
    .map_err(|e| e.to_string())?
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn traces() -> Vec<Vec<TraceEntry>> {
        let t = |v: &[(u32, u32)]| {
            v.iter()
                .map(|&(chunk, ms)| TraceEntry { chunk, ms })
                .collect::<Vec<_>>()
        };
        vec![
            t(&[(0, 0), (5, 3), (2, 9), (7, 12)]),
            t(&[(0, 0), (5, 4), (3, 8), (7, 11)]),
        ]
    }

    #[test]
    fn model_round_trips() {
        let (p, s) = model_from_traces(&traces());
        let p = p.unwrap();
        let b = encode_model(&p, &s);
        let (p2, s2) = decode_model(&b).unwrap();
        assert_eq!(p2.encode(), p.encode());
        assert_eq!(s2.encode(), s.encode());
        assert_eq!(p2.order()[..2], [0, 5]);
        // Every truncation is rejected, never a panic.
        for n in 0..b.len() {
            assert!(decode_model(&b[..n]).is_none(), "prefix of {n} bytes");
        }
    }

    #[test]
    fn no_traces_no_profile() {
        let (p, s) = model_from_traces(&[]);
        assert!(p.is_none());
        assert!(s.is_empty());
    }

    proptest! {
        #[test]
        fn model_decode_never_panics(b in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode_model(&b);
            let mut m = MODEL_MAGIC.to_vec();
            m.extend_from_slice(&b);
            let _ = decode_model(&m);
        }
    }
}
