//! The fetch client: fills the local store with verified chunks from peers.
//!
//! - **Window.** Each peer gets up to `window` requests in flight, each on
//!   its own stream and each a batch of up to `batch_chunks` chunks /
//!   `batch_bytes` bytes, so a long fat link stays full (8 × 2 MiB = 16 MiB
//!   in flight per peer against a 3.75 MB bandwidth-delay product at
//!   100 Mbit/s × 300 ms).
//! - **Multi-source.** Workers of every peer pull batches from one queue, so
//!   a faster peer simply takes more. A peer's window shrinks with its
//!   measured throughput relative to the best peer. A chunk that a peer
//!   lacks, times out on, or sends corrupted goes back to the queue marked
//!   so that peer is not asked for it again; a peer that sent bad bytes is
//!   penalised and counted.
//! - **Verification.** Every chunk is hashed ([`VerifiedChunk`]) before it
//!   is stored, and only stored chunks are reported done.
//! - **Coalescing.** Concurrent fetches of one chunk cause one network fetch:
//!   the second caller waits for the first.
//! - **Priorities.** Demand requests use their own slots, so they never wait
//!   behind background or prefetch requests, and their streams carry a
//!   higher quinn priority on both sides.
//! - **Connection loss.** A peer's connection is re-established with
//!   exponential backoff; chunks already stored are never asked for again.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use cairn_chunkstore::{ChunkRef, FromZstdError, Recipe, Store, StoreError, VerifiedChunk};
use parking_lot::Mutex;
use tokio::sync::{watch, Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::identity::ANY_PEER;
use crate::metrics::TransportMetrics;
use crate::wire::{self, ErrorCode, Hello, ObjectKey, Priority, Request, Response, WireError};
use crate::{ChunkId, ObjectId};

/// A peer to fetch from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerAddr {
    /// Its QUIC address.
    pub addr: SocketAddr,
    /// Its node name, pinned in TLS when known; otherwise any certificate of
    /// the cluster is accepted.
    pub name: Option<String>,
}

impl PeerAddr {
    /// A peer known by address only.
    pub fn new(addr: SocketAddr) -> Self {
        Self { addr, name: None }
    }

    /// A peer known by address and node name.
    pub fn named(addr: SocketAddr, name: impl Into<String>) -> Self {
        Self {
            addr,
            name: Some(name.into()),
        }
    }
}

/// Fetch tuning.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// Most chunks per request.
    pub batch_chunks: usize,
    /// Most bytes per request (by recipe lengths).
    pub batch_bytes: u64,
    /// Requests in flight per peer, per class (demand / bulk).
    pub window: usize,
    /// Give up on a request when no frame arrives for this long.
    pub frame_timeout: Duration,
    /// Give up on a connection attempt after this long.
    pub connect_timeout: Duration,
    /// Tries per chunk across all peers before the fetch fails.
    pub max_attempts: u32,
    /// Accept zstd-compressed chunks.
    pub accept_zstd: bool,
    /// Longest backoff between reconnect attempts to one peer.
    pub max_backoff: Duration,
    /// Stop asking a peer that has been unreachable this long (a cut link
    /// shorter than this only delays the fetch).
    pub give_up_after: Duration,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            batch_chunks: 32,
            batch_bytes: 2 << 20,
            window: 8,
            frame_timeout: Duration::from_secs(20),
            connect_timeout: Duration::from_secs(5),
            max_attempts: 8,
            accept_zstd: true,
            max_backoff: Duration::from_secs(10),
            give_up_after: Duration::from_secs(60),
        }
    }
}

/// Why a fetch failed.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// No peers were given.
    #[error("no peers to fetch from")]
    NoPeers,
    /// No peer knows the object.
    #[error("no peer has object {0}")]
    NotFound(String),
    /// Some chunks could not be fetched from any peer.
    #[error("{} chunk(s) could not be fetched; first: {} ({})", .0.len(), .0[0].0, .0[0].1)]
    Unavailable(Vec<(ChunkId, String)>),
    /// A peer sent a recipe that does not match the object id.
    #[error("bad recipe from {peer}: {why}")]
    BadRecipe {
        /// Which peer.
        peer: SocketAddr,
        /// What was wrong.
        why: String,
    },
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The node is shutting down.
    #[error("fetch cancelled")]
    Cancelled,
}

/// What a fetch did.
#[derive(Debug, Clone, Default)]
pub struct FetchReport {
    /// Distinct chunks asked for.
    pub chunks: u64,
    /// Of those, already in the store.
    pub local: u64,
    /// Fetched over the network by this call.
    pub fetched: u64,
    /// Fetched by a concurrent call that this one waited for.
    pub coalesced: u64,
    /// Uncompressed bytes fetched by this call.
    pub bytes: u64,
    /// Chunks that failed verification (and were fetched again).
    pub verify_failures: u64,
    /// Requests that failed and were retried.
    pub retries: u64,
    /// Chunks fetched per peer.
    pub per_peer: HashMap<SocketAddr, u64>,
}

impl FetchReport {
    fn merge(&mut self, o: FetchReport) {
        self.fetched += o.fetched;
        self.coalesced += o.coalesced;
        self.bytes += o.bytes;
        self.verify_failures += o.verify_failures;
        self.retries += o.retries;
        for (k, v) in o.per_peer {
            *self.per_peer.entry(k).or_default() += v;
        }
    }
}

#[derive(Debug, Default)]
struct PeerState {
    /// Smoothed throughput, bytes/s, of completed batches.
    tput: f64,
    /// Consecutive failures (connect or request).
    failures: u32,
    /// Do not reconnect before this.
    retry_at: Option<Instant>,
    /// Unreachable since (cleared by a successful connect).
    down_since: Option<Instant>,
    /// Bad data penalty: throughput credit is divided by this.
    penalty: f64,
}

#[derive(Debug)]
struct Peer {
    addr: SocketAddr,
    server_name: String,
    label: String,
    conn: tokio::sync::Mutex<Option<quinn::Connection>>,
    state: Mutex<PeerState>,
    demand: Semaphore,
    bulk: Semaphore,
}

impl Peer {
    fn score(&self) -> f64 {
        let s = self.state.lock();
        let base = if s.tput > 0.0 { s.tput } else { 1.0 };
        base / (1.0 + s.failures as f64) / s.penalty.max(1.0)
    }
}

#[derive(Debug)]
struct Inflight {
    done: watch::Sender<Option<bool>>,
    /// The claiming call's priority: a demand call does not wait behind a
    /// prefetch claim, it fetches the chunk too.
    priority: Priority,
}

struct FetchInner {
    endpoint: quinn::Endpoint,
    store: Arc<Store>,
    cfg: FetchConfig,
    hello: Hello,
    metrics: TransportMetrics,
    peers: Mutex<HashMap<SocketAddr, Arc<Peer>>>,
    inflight: Mutex<HashMap<ChunkId, Arc<Inflight>>>,
    cancel: CancellationToken,
}

/// The fetch client. Cheap to clone; share one per node.
#[derive(Clone)]
pub struct Fetcher {
    inner: Arc<FetchInner>,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("peers", &self.inner.peers.lock().len())
            .finish()
    }
}

/// The work of one fetch call, shared by its workers.
struct Work {
    q: Mutex<Queue>,
    changed: Notify,
}

#[derive(Default)]
struct Queue {
    pending: VecDeque<Item>,
    /// Items taken by a worker and not yet stored or given back.
    outstanding: usize,
    failed: Vec<(ChunkId, String)>,
    report: FetchReport,
}

#[derive(Debug, Clone)]
struct Item {
    id: ChunkId,
    len: u32,
    /// Peers (by index) not to ask again.
    excluded: Vec<usize>,
    attempts: u32,
    last_error: String,
}

/// How a request ended.
enum Outcome {
    /// All items answered (chunks stored or given back as missing).
    Done,
    /// The peer misbehaved or failed; the rest were given back.
    Failed,
}

impl Fetcher {
    /// A fetcher dialing from `endpoint` into `store`. `hello` is what we say
    /// to peers on connect.
    pub fn new(
        endpoint: quinn::Endpoint,
        store: Arc<Store>,
        cfg: FetchConfig,
        hello: Hello,
        metrics: TransportMetrics,
        cancel: CancellationToken,
    ) -> Self {
        Self {
            inner: Arc::new(FetchInner {
                endpoint,
                store,
                cfg,
                hello,
                metrics,
                peers: Mutex::new(HashMap::new()),
                inflight: Mutex::new(HashMap::new()),
                cancel,
            }),
        }
    }

    /// The store this fetcher fills.
    pub fn store(&self) -> &Arc<Store> {
        &self.inner.store
    }

    fn peer(&self, p: &PeerAddr) -> Arc<Peer> {
        let w = self.inner.cfg.window.max(1);
        self.inner
            .peers
            .lock()
            .entry(p.addr)
            .or_insert_with(|| {
                Arc::new(Peer {
                    addr: p.addr,
                    server_name: p.name.clone().unwrap_or_else(|| ANY_PEER.to_owned()),
                    label: p.addr.to_string(),
                    conn: tokio::sync::Mutex::new(None),
                    state: Mutex::new(PeerState::default()),
                    demand: Semaphore::new(w),
                    bulk: Semaphore::new(w),
                })
            })
            .clone()
    }

    /// Ask `peer` which of `ids` it holds (`Have`, in batches of
    /// [`wire::MAX_BATCH`]). One bool per id, in order.
    pub async fn have(&self, peer: &PeerAddr, ids: &[ChunkId]) -> Result<Vec<bool>, String> {
        let p = self.peer(peer);
        let conn = self.connection(&p).await?;
        let mut out = Vec::with_capacity(ids.len());
        for batch in ids.chunks(wire::MAX_BATCH) {
            let frames = exchange(
                &conn,
                &Request::Have {
                    ids: batch.to_vec(),
                },
                2,
                Duration::from_secs(30),
            )
            .await?;
            match frames.first() {
                Some(Response::HaveBitmap { count, bits }) if *count as usize == batch.len() => {
                    for i in 0..batch.len() {
                        out.push(bits.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0));
                    }
                }
                other => return Err(format!("unexpected answer to Have: {other:?}")),
            }
        }
        Ok(out)
    }

    /// Open a stream to `peer` and send `MetaSync` on it: the caller then
    /// runs the site-metadata exchange over both halves. Also returns the
    /// connection's current RTT estimate (QUIC's own).
    pub async fn open_meta_stream(
        &self,
        peer: &PeerAddr,
    ) -> Result<(quinn::SendStream, quinn::RecvStream, Duration), String> {
        let p = self.peer(peer);
        let conn = self.connection(&p).await?;
        let (mut send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        let mut out = BytesMut::new();
        wire::encode_request(&Request::MetaSync, &mut out);
        send.write_all(&out).await.map_err(|e| e.to_string())?;
        Ok((send, recv, conn.rtt()))
    }

    /// Offer `peer` the manifest `digest` of `repo` (tagged `tag` at
    /// `version` when `tag` is not empty): the peer pulls what it lacks
    /// from us and answers with its tag state afterwards, `(digest,
    /// version)`. Waits up to `timeout` for the pull to finish.
    pub async fn offer(
        &self,
        peer: &PeerAddr,
        repo: &str,
        tag: &str,
        digest: &str,
        version: u64,
        timeout: Duration,
    ) -> Result<(String, u64), String> {
        let p = self.peer(peer);
        let conn = self.connection(&p).await?;
        let req = Request::Offer {
            repo: repo.to_owned(),
            tag: tag.to_owned(),
            digest: digest.to_owned(),
            version,
        };
        let frames = tokio::time::timeout(timeout, exchange(&conn, &req, 1, timeout))
            .await
            .map_err(|_| format!("no answer to the offer within {timeout:?}"))??;
        match frames.into_iter().next() {
            Some(Response::Offered { digest, version }) => Ok((digest, version)),
            Some(Response::Error { code, message }) => Err(format!("{code:?}: {message}")),
            other => Err(format!("unexpected answer to Offer: {other:?}")),
        }
    }

    /// Fetch an object's recipe from the first peer that has it (best peers
    /// first), check that it hashes to the id, and record it in the store
    /// pinned under `obj:<id>`. Returns the id and recipe.
    pub async fn fetch_recipe(
        &self,
        key: &ObjectKey,
        peers: &[PeerAddr],
        priority: Priority,
    ) -> Result<(ObjectId, Arc<Recipe>), FetchError> {
        if peers.is_empty() {
            return Err(FetchError::NoPeers);
        }
        if let ObjectKey::Id(id) = key {
            if let Some(r) = self.inner.store.try_recipe(id)? {
                return Ok((*id, r));
            }
        }
        let mut ps: Vec<Arc<Peer>> = peers.iter().map(|p| self.peer(p)).collect();
        ps.sort_by(|a, b| b.score().total_cmp(&a.score()));
        let mut last = String::new();
        for p in ps {
            match self.get_object(&p, key, priority).await {
                Ok(Some((id, recipe))) => {
                    let store = self.inner.store.clone();
                    let r = recipe.clone();
                    let pin = format!("obj:{id}");
                    tokio::task::spawn_blocking(move || store.put_recipe(&r, Some(&pin)))
                        .await
                        .map_err(|e| StoreError::Invalid(e.to_string()))??;
                    return Ok((id, Arc::new(recipe)));
                }
                Ok(None) => last = format!("{}: not found", p.addr),
                Err(FetchError::BadRecipe { peer, why }) => {
                    warn!(%peer, %why, "peer sent a bad recipe");
                    self.penalise(&p, "protocol");
                    last = format!("{peer}: {why}");
                }
                Err(FetchError::Cancelled) => return Err(FetchError::Cancelled),
                Err(e) => last = format!("{}: {e}", p.addr),
            }
        }
        Err(FetchError::NotFound(format!("{key:?} ({last})")))
    }

    /// Fetch a whole object: its recipe, then every chunk not already here.
    pub async fn fetch_object(
        &self,
        key: &ObjectKey,
        peers: &[PeerAddr],
        priority: Priority,
    ) -> Result<(ObjectId, FetchReport), FetchError> {
        let (id, recipe) = self.fetch_recipe(key, peers, priority).await?;
        let want: Vec<(ChunkId, u32)> = recipe.chunks().iter().map(|c| (c.id, c.len)).collect();
        let report = self.fetch_chunks(&want, peers, priority).await?;
        Ok((id, report))
    }

    /// Fetch these chunks (id and expected length, 0 if unknown) into the
    /// store. Chunks already local are skipped; chunks another call is
    /// fetching are waited for.
    pub async fn fetch_chunks(
        &self,
        want: &[(ChunkId, u32)],
        peers: &[PeerAddr],
        priority: Priority,
    ) -> Result<FetchReport, FetchError> {
        if peers.is_empty() && !want.is_empty() {
            return Err(FetchError::NoPeers);
        }
        let mut report = FetchReport::default();
        let mut seen = HashSet::new();
        let want: Vec<(ChunkId, u32)> = want
            .iter()
            .copied()
            .filter(|(id, _)| seen.insert(*id))
            .collect();
        report.chunks = want.len() as u64;
        let mut todo = want;
        // Two rounds: chunks we waited on in another call and that call
        // failed to get are fetched by us in the second.
        for round in 0..2 {
            let (own, registered, waits, local) = self.claim(&todo, priority)?;
            if round == 0 {
                report.local = local;
            }
            let mut guard = ClaimGuard {
                f: self,
                ids: registered,
            };
            let r = self.run(own, peers, priority).await;
            guard.release_all();
            let r = r?;
            report.merge(r);
            let mut retry = Vec::new();
            for (id, len, mut rx) in waits {
                let ok = tokio::select! {
                    _ = self.inner.cancel.cancelled() => return Err(FetchError::Cancelled),
                    r = rx.wait_for(|v| v.is_some()) => r.map(|v| *v == Some(true)).unwrap_or(false),
                };
                if ok || self.inner.store.has_chunk(&id)? {
                    report.coalesced += 1;
                } else {
                    retry.push((id, len));
                }
            }
            if retry.is_empty() {
                break;
            }
            todo = retry;
        }
        Ok(report)
    }

    /// Split `want` into chunks already local, chunks this call fetches
    /// (with the ones it registered as their fetcher), and chunks another
    /// call is fetching (with a receiver to wait on). A demand call does not
    /// wait for a chunk a prefetch call is fetching (a prefetch stream can
    /// sit behind every other stream): it fetches the chunk too, and
    /// whichever copy lands first is stored. A background claim is waited
    /// for: a streamed blob's reader asks at demand priority for chunks the
    /// blob's own background fetch has in flight, and fetching those twice
    /// would double the bytes.
    #[allow(clippy::type_complexity)]
    fn claim(
        &self,
        want: &[(ChunkId, u32)],
        priority: Priority,
    ) -> Result<
        (
            Vec<(ChunkId, u32)>,
            Vec<ChunkId>,
            Vec<(ChunkId, u32, watch::Receiver<Option<bool>>)>,
            u64,
        ),
        FetchError,
    > {
        let mut own = Vec::new();
        let mut registered = Vec::new();
        let mut waits = Vec::new();
        let mut local = 0;
        for &(id, len) in want {
            if self.inner.store.has_chunk(&id)? {
                local += 1;
                continue;
            }
            let mut m = self.inner.inflight.lock();
            if let Some(f) = m.get(&id) {
                if priority == Priority::Demand && f.priority == Priority::Prefetch {
                    drop(m);
                    self.inner.metrics.demand_overtakes.inc();
                    own.push((id, len));
                    continue;
                }
                waits.push((id, len, f.done.subscribe()));
                self.inner.metrics.coalesced.inc();
                continue;
            }
            let (tx, _) = watch::channel(None);
            m.insert(id, Arc::new(Inflight { done: tx, priority }));
            drop(m);
            // Stored between our first look and the claim: done already.
            if self.inner.store.has_chunk(&id)? {
                self.finish(&id, true);
                local += 1;
                continue;
            }
            own.push((id, len));
            registered.push(id);
        }
        Ok((own, registered, waits, local))
    }

    fn finish(&self, id: &ChunkId, ok: bool) {
        if let Some(f) = self.inner.inflight.lock().remove(id) {
            f.done.send_replace(Some(ok));
        }
    }

    fn penalise(&self, p: &Peer, kind: &str) {
        self.inner
            .metrics
            .errors
            .with_label_values(&[&p.label, kind])
            .inc();
        let mut s = p.state.lock();
        s.failures = s.failures.saturating_add(1);
    }

    /// Fetch `own` from `peers` with a window of workers per peer.
    async fn run(
        &self,
        own: Vec<(ChunkId, u32)>,
        peers: &[PeerAddr],
        priority: Priority,
    ) -> Result<FetchReport, FetchError> {
        if own.is_empty() {
            return Ok(FetchReport::default());
        }
        let mut ps: Vec<Arc<Peer>> = peers.iter().map(|p| self.peer(p)).collect();
        ps.sort_by(|a, b| b.score().total_cmp(&a.score()));
        let work = Arc::new(Work {
            q: Mutex::new(Queue {
                pending: own
                    .into_iter()
                    .map(|(id, len)| Item {
                        id,
                        len,
                        excluded: Vec::new(),
                        attempts: 0,
                        last_error: String::new(),
                    })
                    .collect(),
                ..Default::default()
            }),
            changed: Notify::new(),
        });
        let n_peers = ps.len();
        let ps = Arc::new(ps);
        let mut tasks = tokio::task::JoinSet::new();
        for k in 0..self.inner.cfg.window.max(1) {
            for i in 0..n_peers {
                let f = self.clone();
                let work = work.clone();
                let ps = ps.clone();
                tasks.spawn(async move { f.worker(work, ps, i, k, priority).await });
            }
        }
        let cancelled = tokio::select! {
            _ = self.inner.cancel.cancelled() => true,
            _ = async { while tasks.join_next().await.is_some() {} } => false,
        };
        if cancelled {
            tasks.abort_all();
            return Err(FetchError::Cancelled);
        }
        let mut q = work.q.lock();
        // Whatever is left had every peer excluded or ran out of attempts.
        let leftover: Vec<Item> = q.pending.drain(..).collect();
        for it in leftover {
            q.failed.push((it.id, it.last_error));
        }
        for (id, _) in &q.failed {
            self.finish(id, false);
        }
        if !q.failed.is_empty() {
            return Err(FetchError::Unavailable(std::mem::take(&mut q.failed)));
        }
        Ok(std::mem::take(&mut q.report))
    }

    /// Effective window of peer `i`: the full window for the best peer,
    /// shrinking with relative throughput, at least 1.
    fn window_of(&self, ps: &[Arc<Peer>], i: usize) -> usize {
        let w = self.inner.cfg.window.max(1);
        let best = ps.iter().map(|p| p.score()).fold(0.0, f64::max);
        let mine = ps[i].score();
        if best <= 0.0 {
            return w;
        }
        ((w as f64 * mine / best).ceil() as usize).clamp(1, w)
    }

    async fn worker(
        self,
        work: Arc<Work>,
        ps: Arc<Vec<Arc<Peer>>>,
        i: usize,
        k: usize,
        priority: Priority,
    ) {
        let peer = ps[i].clone();
        loop {
            let notified = work.changed.notified();
            let may_take = k < self.window_of(&ps, i);
            let batch = self.take(&work, i, ps.len(), may_take);
            let batch = match batch {
                Take::Batch(b) => b,
                Take::Finished => return,
                Take::Wait => {
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    }
                    continue;
                }
            };
            let sem = if priority == Priority::Demand {
                &peer.demand
            } else {
                &peer.bulk
            };
            let Ok(_permit) = sem.acquire().await else {
                self.give_back(&work, batch, None, "peer closed");
                return;
            };
            self.inner
                .metrics
                .inflight
                .with_label_values(&[&peer.label])
                .inc();
            let outcome = self.request(&work, &peer, i, batch, priority).await;
            self.inner
                .metrics
                .inflight
                .with_label_values(&[&peer.label])
                .dec();
            if let Outcome::Failed = outcome {
                // Let the backoff in `connection` pace the next try.
                tokio::task::yield_now().await;
            }
        }
    }

    /// Take a batch for peer `i` (when `may_take`), or say whether this
    /// worker is finished: nothing pending that it could ever be given.
    fn take(&self, work: &Work, i: usize, n_peers: usize, may_take: bool) -> Take {
        let cfg = &self.inner.cfg;
        let mut q = work.q.lock();
        let mut batch = Vec::new();
        let mut bytes = 0u64;
        let mut idx = 0;
        let mut blocked = 0;
        let limit = if may_take { cfg.batch_chunks.max(1) } else { 0 };
        while idx < q.pending.len() {
            let it = &q.pending[idx];
            if it.excluded.len() >= n_peers {
                // No peer left to ask: fail it.
                if let Some(it) = q.pending.remove(idx) {
                    q.failed.push((it.id, it.last_error));
                }
                continue;
            }
            if it.excluded.contains(&i) {
                blocked += 1;
                idx += 1;
                continue;
            }
            if batch.len() >= limit {
                if may_take || q.outstanding > 0 {
                    // Batch full, or nothing to decide: stop scanning.
                    break;
                }
                idx += 1;
                continue;
            }
            let len = if it.len == 0 {
                64 * 1024
            } else {
                u64::from(it.len)
            };
            if !batch.is_empty() && bytes + len > cfg.batch_bytes {
                break;
            }
            bytes += len;
            if let Some(it) = q.pending.remove(idx) {
                batch.push(it);
            }
        }
        if !batch.is_empty() {
            q.outstanding += batch.len();
            return Take::Batch(batch);
        }
        // Finished when nothing is in flight (nothing can come back) and all
        // that is pending is excluded for this peer.
        if q.outstanding == 0 && blocked == q.pending.len() {
            work.changed.notify_waiters();
            return Take::Finished;
        }
        Take::Wait
    }

    /// Return items to the queue after a failed try; `exclude` marks the
    /// peer that failed them.
    fn give_back(&self, work: &Work, items: Vec<Item>, exclude: Option<usize>, why: &str) {
        self.return_items(work, items, exclude, why, true)
    }

    fn return_items(
        &self,
        work: &Work,
        items: Vec<Item>,
        exclude: Option<usize>,
        why: &str,
        count_attempt: bool,
    ) {
        let max = self.inner.cfg.max_attempts;
        let mut q = work.q.lock();
        q.outstanding -= items.len();
        q.report.retries += 1;
        for mut it in items.into_iter().rev() {
            if count_attempt {
                it.attempts += 1;
            }
            it.last_error = why.to_owned();
            if let Some(i) = exclude {
                if !it.excluded.contains(&i) {
                    it.excluded.push(i);
                }
            }
            if it.attempts >= max {
                q.failed
                    .push((it.id, format!("{} attempts; last: {why}", it.attempts)));
            } else {
                q.pending.push_front(it);
            }
        }
        drop(q);
        work.changed.notify_waiters();
    }

    async fn connection(&self, peer: &Peer) -> Result<quinn::Connection, String> {
        let mut g = peer.conn.lock().await;
        if let Some(c) = g.as_ref() {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
            *g = None;
        }
        let wait = peer.state.lock().retry_at;
        if let Some(at) = wait {
            tokio::time::sleep_until(at.into()).await;
        }
        let res = self.connect(peer).await;
        let mut s = peer.state.lock();
        match res {
            Ok(c) => {
                s.failures = 0;
                s.retry_at = None;
                s.down_since = None;
                *g = Some(c.clone());
                self.inner
                    .metrics
                    .connections
                    .with_label_values(&["out"])
                    .inc();
                Ok(c)
            }
            Err(e) => {
                s.failures = s.failures.saturating_add(1);
                s.down_since.get_or_insert_with(Instant::now);
                let backoff = Duration::from_millis(100)
                    .saturating_mul(1 << s.failures.min(16))
                    .min(self.inner.cfg.max_backoff);
                s.retry_at = Some(Instant::now() + backoff);
                drop(s);
                self.inner
                    .metrics
                    .errors
                    .with_label_values(&[&peer.label, "connect"])
                    .inc();
                warn!(peer = %peer.addr, error = %e, ?backoff, "cannot connect");
                Err(e)
            }
        }
    }

    async fn connect(&self, peer: &Peer) -> Result<quinn::Connection, String> {
        let connecting = self
            .inner
            .endpoint
            .connect(peer.addr, &peer.server_name)
            .map_err(|e| e.to_string())?;
        let conn = tokio::time::timeout(self.inner.cfg.connect_timeout, connecting)
            .await
            .map_err(|_| "connect timed out".to_owned())?
            .map_err(|e| e.to_string())?;
        // Hello: learn who answered and check the version.
        let frames = tokio::time::timeout(
            self.inner.cfg.connect_timeout,
            exchange(
                &conn,
                &Request::Hello(self.inner.hello.clone()),
                4,
                Duration::from_secs(30),
            ),
        )
        .await
        .map_err(|_| "hello timed out".to_owned())??;
        match frames.first() {
            Some(Response::Hello(h)) => {
                debug!(peer = %peer.addr, node = %h.node, site = %h.site, version = h.version, "connected");
                Ok(conn)
            }
            Some(Response::Error { code, message }) => {
                conn.close(0u32.into(), b"hello refused");
                Err(format!("hello refused: {code:?} {message}"))
            }
            other => {
                conn.close(0u32.into(), b"bad hello");
                Err(format!("unexpected hello answer {other:?}"))
            }
        }
    }

    /// Ask `peer` for the object's recipe.
    async fn get_object(
        &self,
        peer: &Peer,
        key: &ObjectKey,
        priority: Priority,
    ) -> Result<Option<(ObjectId, Recipe)>, FetchError> {
        let conn = self.connection(peer).await.map_err(FetchError::NotFound)?;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| FetchError::NotFound(e.to_string()))?;
        send.set_priority(priority.stream_priority()).ok();
        let mut out = BytesMut::new();
        wire::encode_request(
            &Request::GetObject {
                key: key.clone(),
                priority,
            },
            &mut out,
        );
        send.write_all(&out)
            .await
            .map_err(|e| FetchError::NotFound(e.to_string()))?;
        let _ = send.finish();
        let bad = |why: String| FetchError::BadRecipe {
            peer: peer.addr,
            why,
        };
        let mut buf = BytesMut::new();
        let timeout = self.inner.cfg.frame_timeout;
        let first = next_frame(&mut recv, &mut buf, timeout)
            .await
            .map_err(|e| bad(e.to_string()))?;
        let (id, recipe_len) = match first {
            Some(Response::ObjectHeader { id, recipe_len, .. }) => (id, recipe_len),
            Some(Response::Error {
                code: ErrorCode::NotFound,
                ..
            }) => return Ok(None),
            Some(Response::Error { code, message }) => {
                return Err(FetchError::NotFound(format!("{code:?}: {message}")))
            }
            other => return Err(bad(format!("unexpected answer {other:?}"))),
        };
        if let ObjectKey::Id(want) = key {
            if *want != id {
                return Err(bad(format!("asked for {want}, got header for {id}")));
            }
        }
        let max = 17 + 36 * cairn_chunkstore::recipe::MAX_RECIPE_CHUNKS as u64;
        if recipe_len > max {
            return Err(bad(format!(
                "recipe of {recipe_len} bytes is over the limit"
            )));
        }
        let mut enc = Vec::with_capacity(recipe_len.min(16 << 20) as usize);
        loop {
            match next_frame(&mut recv, &mut buf, timeout)
                .await
                .map_err(|e| bad(e.to_string()))?
            {
                Some(Response::RecipePart(b)) => {
                    if enc.len() as u64 + b.len() as u64 > recipe_len {
                        return Err(bad("recipe longer than announced".into()));
                    }
                    enc.extend_from_slice(&b);
                }
                Some(Response::End) => break,
                other => return Err(bad(format!("unexpected frame in recipe: {other:?}"))),
            }
        }
        if enc.len() as u64 != recipe_len {
            return Err(bad(format!(
                "recipe {} bytes, announced {recipe_len}",
                enc.len()
            )));
        }
        let recipe = Recipe::decode(&enc).map_err(|e| bad(e.to_string()))?;
        if recipe.object_id() != id {
            return Err(bad(format!(
                "recipe hashes to {}, not {id}",
                recipe.object_id()
            )));
        }
        Ok(Some((id, recipe)))
    }

    /// One GetChunks request for `batch` to peer `i`.
    async fn request(
        &self,
        work: &Work,
        peer: &Peer,
        i: usize,
        batch: Vec<Item>,
        priority: Priority,
    ) -> Outcome {
        let conn = match self.connection(peer).await {
            Ok(c) => c,
            Err(e) => {
                // An unreachable peer is not the chunks' fault: no attempt is
                // counted. It is dropped for them once it has been down for
                // `give_up_after`; others may still have them.
                let down_for = peer.state.lock().down_since.map(|t| t.elapsed());
                let exclude = down_for
                    .is_some_and(|d| d >= self.inner.cfg.give_up_after)
                    .then_some(i);
                self.return_items(work, batch, exclude, &format!("connect: {e}"), false);
                return Outcome::Failed;
            }
        };
        let started = Instant::now();
        let mut pending: VecDeque<Item> = batch.into();
        let res = self
            .exchange_chunks(&conn, peer, &mut pending, work, priority)
            .await;
        let m = &self.inner.metrics;
        m.rtt_seconds
            .with_label_values(&[&peer.label])
            .set(conn.rtt().as_secs_f64());
        match res {
            Ok(bytes) => {
                let secs = started.elapsed().as_secs_f64().max(1e-6);
                let mut s = peer.state.lock();
                let rate = bytes as f64 / secs;
                s.tput = if s.tput == 0.0 {
                    rate
                } else {
                    0.7 * s.tput + 0.3 * rate
                };
                s.failures = 0;
                drop(s);
                // Anything the peer did not have goes back, excluding it.
                if !pending.is_empty() {
                    self.give_back(work, pending.into(), Some(i), "peer does not have it");
                }
                Outcome::Done
            }
            Err(Failure::BadData(why)) => {
                warn!(peer = %peer.addr, %why, "peer sent a corrupt chunk; asking others");
                {
                    let mut s = peer.state.lock();
                    s.penalty = (s.penalty.max(1.0)) * 4.0;
                }
                self.penalise(peer, "verify");
                self.give_back(work, pending.into(), Some(i), &why);
                Outcome::Failed
            }
            Err(Failure::Protocol(why)) => {
                warn!(peer = %peer.addr, %why, "protocol error");
                self.penalise(peer, "protocol");
                self.give_back(work, pending.into(), Some(i), &why);
                Outcome::Failed
            }
            Err(Failure::Remote(code, why)) => {
                self.penalise(peer, "remote");
                let exclude = matches!(code, ErrorCode::Internal | ErrorCode::Version).then_some(i);
                self.give_back(work, pending.into(), exclude, &why);
                Outcome::Failed
            }
            Err(Failure::Timeout) => {
                self.penalise(peer, "timeout");
                self.give_back(work, pending.into(), Some(i), "timed out");
                Outcome::Failed
            }
            Err(Failure::Link(why)) => {
                debug!(peer = %peer.addr, %why, "request failed; will reconnect");
                self.penalise(peer, "stream");
                self.give_back(work, pending.into(), None, &why);
                Outcome::Failed
            }
            Err(Failure::Store(why)) => {
                self.give_back(work, pending.into(), None, &why);
                Outcome::Failed
            }
        }
    }

    /// Send GetChunks for `pending` and store what comes back. Items leave
    /// `pending` as they are stored; `Missing` ones stay in `missing` order at
    /// the front... (they are collected and returned to `pending` at End).
    async fn exchange_chunks(
        &self,
        conn: &quinn::Connection,
        peer: &Peer,
        pending: &mut VecDeque<Item>,
        work: &Work,
        priority: Priority,
    ) -> Result<u64, Failure> {
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| Failure::Link(e.to_string()))?;
        send.set_priority(priority.stream_priority()).ok();
        let mut out = BytesMut::new();
        wire::encode_request(
            &Request::GetChunks {
                ids: pending.iter().map(|it| it.id).collect(),
                priority,
                accept_zstd: self.inner.cfg.accept_zstd,
            },
            &mut out,
        );
        send.write_all(&out)
            .await
            .map_err(|e| Failure::Link(e.to_string()))?;
        let _ = send.finish();
        let m = &self.inner.metrics;
        let bytes_in = m.bytes_in.with_label_values(&[&peer.label]);
        let fetched = m.chunks_fetched.with_label_values(&[&peer.label]);
        let mut buf = BytesMut::new();
        let mut verified: Vec<VerifiedChunk> = Vec::new();
        let mut verified_items: Vec<Item> = Vec::new();
        let mut missing: Vec<Item> = Vec::new();
        let mut total = 0u64;
        let timeout = self.inner.cfg.frame_timeout;
        let result = loop {
            let frame = match next_frame(&mut recv, &mut buf, timeout).await {
                Ok(f) => f,
                Err(e) => break Err(e),
            };
            match frame {
                Some(Response::Chunk {
                    id,
                    raw_len,
                    zstd,
                    payload,
                }) => {
                    let Some(front) = pending.front() else {
                        break Err(Failure::Protocol("more chunks than asked for".into()));
                    };
                    if front.id != id {
                        break Err(Failure::Protocol(format!(
                            "answered {} where {} was next",
                            id.fmt_short(),
                            front.id.fmt_short()
                        )));
                    }
                    bytes_in.inc_by(payload.len() as u64);
                    // A compressed chunk keeps its frame: the store writes
                    // it as it came instead of compressing the bytes again.
                    let checked = if zstd {
                        VerifiedChunk::from_zstd(id, payload, raw_len as usize)
                    } else {
                        VerifiedChunk::new(id, payload).map_err(FromZstdError::Verify)
                    };
                    match checked {
                        Ok(v) => {
                            total += v.len() as u64;
                            verified.push(v);
                            if let Some(it) = pending.pop_front() {
                                verified_items.push(it);
                            }
                        }
                        Err(e @ FromZstdError::Decompress(..)) => {
                            break Err(Failure::BadData(e.to_string()))
                        }
                        Err(FromZstdError::Verify(e)) => {
                            m.verify_failures.with_label_values(&[&peer.label]).inc();
                            work.q.lock().report.verify_failures += 1;
                            break Err(Failure::BadData(e.to_string()));
                        }
                    }
                }
                Some(Response::Missing { id }) => match pending.front() {
                    Some(f) if f.id == id => {
                        if let Some(it) = pending.pop_front() {
                            missing.push(it);
                        }
                    }
                    _ => break Err(Failure::Protocol("Missing out of order".into())),
                },
                Some(Response::End) => {
                    if pending.is_empty() {
                        break Ok(());
                    }
                    break Err(Failure::Protocol(format!(
                        "End with {} chunks unanswered",
                        pending.len()
                    )));
                }
                Some(Response::Error { code, message }) => {
                    break Err(Failure::Remote(code, format!("{code:?}: {message}")))
                }
                Some(other) => break Err(Failure::Protocol(format!("unexpected frame {other:?}"))),
                None => break Err(Failure::Link("stream ended without End".into())),
            }
        };
        if result.is_err() {
            let _ = recv.stop(0u32.into());
        }
        // Store what verified, whatever happened after: it is good data and
        // must not be fetched twice.
        if !verified.is_empty() {
            let n = verified.len() as u64;
            let store = self.inner.store.clone();
            let stored = tokio::task::spawn_blocking(move || store.put_chunks(&verified))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
            match stored {
                Ok(_) => {
                    fetched.inc_by(n);
                    {
                        let mut q = work.q.lock();
                        q.outstanding -= verified_items.len();
                        q.report.fetched += n;
                        q.report.bytes += total;
                        *q.report.per_peer.entry(peer.addr).or_default() += n;
                    }
                    for it in &verified_items {
                        self.finish(&it.id, true);
                    }
                    work.changed.notify_waiters();
                }
                Err(e) => {
                    warn!(error = %e, "cannot store fetched chunks");
                    // Put them back in front; they will be fetched again.
                    for it in verified_items.into_iter().rev() {
                        pending.push_front(it);
                    }
                    for it in missing.into_iter().rev() {
                        pending.push_front(it);
                    }
                    return Err(Failure::Store(e));
                }
            }
        }
        // Missing ones go back (excluding this peer) via the caller.
        for it in missing.into_iter().rev() {
            pending.push_front(it);
        }
        match result {
            Ok(()) => Ok(total),
            Err(f) => Err(f),
        }
    }
}

enum Take {
    Batch(Vec<Item>),
    Wait,
    Finished,
}

enum Failure {
    /// A chunk did not verify or decompress.
    BadData(String),
    /// The peer broke the protocol.
    Protocol(String),
    /// The peer answered with an error frame.
    Remote(ErrorCode, String),
    /// No frame within the frame timeout.
    Timeout,
    /// Stream or connection failed.
    Link(String),
    /// Our store failed.
    Store(String),
}

impl From<String> for Failure {
    fn from(s: String) -> Self {
        Failure::Link(s)
    }
}

/// Releases a call's claims on drop (also when its future is cancelled), so
/// waiters never hang on a fetch that went away.
struct ClaimGuard<'a> {
    f: &'a Fetcher,
    ids: Vec<ChunkId>,
}

impl ClaimGuard<'_> {
    fn release_all(&mut self) {
        for id in self.ids.drain(..) {
            // Stored chunks were released as they landed; these failed.
            self.f.finish(&id, false);
        }
    }
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        self.release_all();
    }
}

/// Read the next response frame; fail when it has not fully arrived within
/// `timeout` (one deadline per frame, not per read). Once the header is in,
/// the buffer is grown once to the frame's size, so a chunk frame is not
/// copied again by regrowth.
async fn next_frame(
    recv: &mut quinn::RecvStream,
    buf: &mut BytesMut,
    timeout: Duration,
) -> Result<Option<Response>, Failure> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match wire::decode_response(buf) {
            Ok(Some(r)) => return Ok(Some(r)),
            Ok(None) => {}
            Err(e) => return Err(wire_failure(e)),
        }
        if buf.len() >= 4 {
            // The decoder has already checked the length against MAX_FRAME.
            let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize + 4;
            if len > buf.len() {
                buf.reserve(len - buf.len());
            }
        }
        // Many received pieces per call: one lock of the connection per
        // batch of packets instead of per packet.
        let mut pieces: [Bytes; 32] = std::array::from_fn(|_| Bytes::new());
        let n = tokio::time::timeout_at(deadline, recv.read_chunks(&mut pieces))
            .await
            .map_err(|_| Failure::Timeout)?
            .map_err(|e| Failure::Link(e.to_string()))?;
        match n {
            Some(n) => {
                for p in &pieces[..n] {
                    buf.extend_from_slice(p);
                }
            }
            None if buf.is_empty() => return Ok(None),
            None => return Err(wire_failure(WireError::Truncated(buf.len()))),
        }
    }
}

fn wire_failure(e: WireError) -> Failure {
    Failure::Protocol(e.to_string())
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::BadData(s) | Failure::Protocol(s) | Failure::Link(s) | Failure::Store(s) => {
                f.write_str(s)
            }
            Failure::Remote(_, s) => f.write_str(s),
            Failure::Timeout => f.write_str("timed out"),
        }
    }
}

/// Send one request on a fresh stream and collect up to `max_frames` answer
/// frames until the stream ends (for small exchanges: Hello, Ping, Have).
pub async fn exchange(
    conn: &quinn::Connection,
    req: &Request,
    max_frames: usize,
    frame_timeout: Duration,
) -> Result<Vec<Response>, String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let mut out = BytesMut::new();
    wire::encode_request(req, &mut out);
    send.write_all(&out).await.map_err(|e| e.to_string())?;
    let _ = send.finish();
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    while frames.len() < max_frames {
        match next_frame(&mut recv, &mut buf, frame_timeout).await {
            Ok(Some(f)) => {
                let end = matches!(
                    f,
                    Response::End
                        | Response::Error { .. }
                        | Response::Hello(_)
                        | Response::Pong { .. }
                        | Response::HaveBitmap { .. }
                        | Response::Offered { .. }
                );
                frames.push(f);
                if end {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(frames)
}

/// Log a finished fetch.
pub fn log_report(what: &str, r: &FetchReport, elapsed: Duration) {
    info!(
        what,
        chunks = r.chunks,
        local = r.local,
        fetched = r.fetched,
        coalesced = r.coalesced,
        bytes = r.bytes,
        verify_failures = r.verify_failures,
        retries = r.retries,
        secs = elapsed.as_secs_f64(),
        "fetch done"
    );
}

#[allow(dead_code)]
fn _assert_send(f: Fetcher) {
    fn is_send<T: Send>(_: T) {}
    is_send(f.fetch_chunks(&[], &[], Priority::Demand));
}

#[allow(dead_code)]
fn _unused(_: ChunkRef) {}
