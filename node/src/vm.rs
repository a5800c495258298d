//! VM images served over NBD, and the admin API that manages them.
//!
//! A VM image is a chunk-store object (content-defined chunks, like every
//! blob) named and pinned under the same key, `vmimage/<NAME>` (see
//! [`IMAGE_PREFIX`]): the name makes it resolvable (locally and, over the
//! transport, by other sites), the pin keeps GC and eviction off it.
//!
//! - [`VmImages`] imports, lists, resolves and removes images.
//! - [`ImageProvider`] is the NBD [`ExportProvider`]: export `image/<NAME>`
//!   is the image, read-only (`NBD_FLAG_READ_ONLY`), multi-conn safe,
//!   `base:allocation` says "all data". Reads go through
//!   [`ObjectHandle::read_at`] on a blocking thread.
//! - Lazy loading: at a site with parents or peers, opening `image/NAME`
//!   that is not known here resolves the name at the parents (then peers)
//!   over the transport and records the recipe only; a READ that meets a
//!   missing chunk fetches, at demand priority, just the chunks overlapping
//!   that read (the fetcher coalesces and verifies), then serves from the
//!   store.
//! - [`routes`] serves `PUT /api/v1/vm-images/NAME` (raw image as the body,
//!   streamed into the store), `GET /api/v1/vm-images`, `DELETE
//!   /api/v1/vm-images/NAME`.
//! - [`NbdMetrics`] holds the `cairn_nbd_*` metrics.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Json, Router};
use cairn_chunkstore::{ChunkId, ObjectHandle, ObjectId, PutOptions, Recipe, Store, StoreError};
use cairn_nbd::{BoxFuture, Export, ExportError, ExportProvider, Extent, OpenError, ServerStats};
use cairn_transport::wire::{ObjectKey, Priority};
use cairn_transport::{FetchError, Fetcher, PeerAddr};
use futures_util::TryStreamExt as _;
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts};
use serde::Serialize;
use tracing::{debug, info, warn};

/// Store name (and pin key) prefix of VM images: `vmimage/<NAME>`.
pub const IMAGE_PREFIX: &str = "vmimage/";
/// NBD export name prefix of VM images: `image/<NAME>`.
pub const EXPORT_PREFIX: &str = "image/";
/// Longest image name.
pub const MAX_NAME_LEN: usize = 128;
/// Largest image accepted by the API (the store caps a recipe near 1 TiB).
pub const MAX_IMAGE_BYTES: u64 = 1 << 40;

/// Why an image operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The name is not valid.
    #[error("invalid image name {0:?}: 1 to 128 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit")]
    BadName(String),
    /// No such image here (nor at the parents or peers).
    #[error("no such image: {0}")]
    NotFound(String),
    /// The request body was empty.
    #[error("the image is empty")]
    Empty,
    /// The body was larger than [`MAX_IMAGE_BYTES`].
    #[error("the image is larger than {MAX_IMAGE_BYTES} bytes")]
    TooLarge,
    /// The upload broke off.
    #[error("reading the upload: {0}")]
    Body(String),
    /// The chunk store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Fetching from another site failed.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// A blocking task failed.
    #[error("internal: {0}")]
    Internal(String),
}

impl VmError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            Self::BadName(_) | Self::Empty | Self::Body(_) => StatusCode::BAD_REQUEST,
            Self::NotFound(_) | Self::Store(StoreError::NoSuchObject(_)) => StatusCode::NOT_FOUND,
            Self::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Fetch(_) => StatusCode::BAD_GATEWAY,
            Self::Store(_) | Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// The admin API's error answer: `{"error": MESSAGE}` with `status`.
pub(crate) fn error_response(status: StatusCode, e: &dyn std::fmt::Display) -> Response {
    (status, Json(serde_json::json!({ "error": e.to_string() }))).into_response()
}

impl IntoResponse for VmError {
    fn into_response(self) -> Response {
        error_response(self.status(), &self)
    }
}

fn join_err(e: tokio::task::JoinError) -> VmError {
    VmError::Internal(e.to_string())
}

/// Check an image name: 1 to [`MAX_NAME_LEN`] bytes of `A-Z a-z 0-9 . _ -`,
/// the first a letter or digit.
pub fn validate_name(name: &str) -> Result<(), VmError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(VmError::BadName(name.chars().take(200).collect()))
    }
}

/// The store name (and pin key) of image `name`.
pub fn store_name(name: &str) -> String {
    format!("{IMAGE_PREFIX}{name}")
}

// ----- metrics -----

/// NBD metrics (`cairn_nbd_*`): the server's counters (from
/// [`ServerStats`], read at scrape time) and the image exports' own.
#[derive(Debug, Clone)]
pub struct NbdMetrics {
    /// Image reads by where the bytes came from: `local`, or `fetched`
    /// (the read waited for a demand fetch).
    pub image_reads: IntCounterVec,
    /// Time reads spent waiting on demand fetches.
    pub fetch_stall: Histogram,
    /// Bytes fetched on demand, per export.
    pub fetched_bytes: IntCounterVec,
    /// Chunks fetched on demand (including ones another fetch brought in
    /// that this one waited for).
    pub fetched_chunks: IntCounter,
    /// Reads that failed in the export (store or fetch errors).
    pub read_errors: IntCounter,
    /// Bytes fetched by background fills.
    pub fill_bytes: IntCounter,
}

impl NbdMetrics {
    /// Create and register the metrics (and a collector over `stats`).
    pub fn new(
        registry: &prometheus::Registry,
        stats: Arc<ServerStats>,
    ) -> Result<Self, prometheus::Error> {
        let m = Self {
            image_reads: IntCounterVec::new(
                Opts::new(
                    "cairn_nbd_image_reads_total",
                    "NBD reads of image exports by source: local, or fetched (waited for a demand fetch).",
                ),
                &["source"],
            )?,
            fetch_stall: Histogram::with_opts(
                HistogramOpts::new(
                    "cairn_nbd_demand_fetch_seconds",
                    "Time NBD reads waited for demand fetches of missing chunks.",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                ]),
            )?,
            fetched_bytes: IntCounterVec::new(
                Opts::new(
                    "cairn_nbd_fetched_bytes_total",
                    "Bytes fetched from other sites on demand for NBD reads, per export.",
                ),
                &["export"],
            )?,
            fetched_chunks: IntCounter::new(
                "cairn_nbd_fetched_chunks_total",
                "Chunks fetched (or waited for) on demand for NBD reads.",
            )?,
            read_errors: IntCounter::new(
                "cairn_nbd_image_read_errors_total",
                "NBD reads of image exports that failed.",
            )?,
            fill_bytes: IntCounter::new(
                "cairn_nbd_background_fill_bytes_total",
                "Bytes of partly local images fetched in the background (nbd.background_fill).",
            )?,
        };
        registry.register(Box::new(m.image_reads.clone()))?;
        registry.register(Box::new(m.fetch_stall.clone()))?;
        registry.register(Box::new(m.fetched_bytes.clone()))?;
        registry.register(Box::new(m.fetched_chunks.clone()))?;
        registry.register(Box::new(m.read_errors.clone()))?;
        registry.register(Box::new(m.fill_bytes.clone()))?;
        registry.register(Box::new(StatsCollector::new(stats)?))?;
        Ok(m)
    }
}

/// Exposes [`ServerStats`] at scrape time.
struct StatsCollector {
    stats: Arc<ServerStats>,
    lock: parking_lot::Mutex<()>,
    connections: IntCounter,
    rejected: IntCounter,
    active: IntGauge,
    handshake_failures: IntCounter,
    protocol_errors: IntCounter,
    requests: IntCounterVec,
    invalid: IntCounter,
    errors: IntCounter,
    read_bytes: IntCounter,
    written_bytes: IntCounter,
    descs: Vec<Desc>,
}

impl StatsCollector {
    fn new(stats: Arc<ServerStats>) -> Result<Self, prometheus::Error> {
        let mut c = Self {
            stats,
            lock: parking_lot::Mutex::new(()),
            connections: IntCounter::new(
                "cairn_nbd_connections_total",
                "NBD connections accepted.",
            )?,
            rejected: IntCounter::new(
                "cairn_nbd_connections_rejected_total",
                "NBD connections closed on accept because the connection limit was reached.",
            )?,
            active: IntGauge::new("cairn_nbd_connections_active", "NBD connections open now.")?,
            handshake_failures: IntCounter::new(
                "cairn_nbd_handshake_failures_total",
                "NBD handshakes that timed out or broke the protocol.",
            )?,
            protocol_errors: IntCounter::new(
                "cairn_nbd_protocol_errors_total",
                "NBD connections closed for a protocol violation.",
            )?,
            requests: IntCounterVec::new(
                Opts::new("cairn_nbd_requests_total", "NBD requests run, by command."),
                &["command"],
            )?,
            invalid: IntCounter::new(
                "cairn_nbd_requests_invalid_total",
                "NBD requests refused before running (bad range, flags, command, write to a read-only export).",
            )?,
            errors: IntCounter::new(
                "cairn_nbd_request_errors_total",
                "NBD requests the export failed.",
            )?,
            read_bytes: IntCounter::new(
                "cairn_nbd_read_bytes_total",
                "Bytes returned by successful NBD reads.",
            )?,
            written_bytes: IntCounter::new(
                "cairn_nbd_written_bytes_total",
                "Bytes stored by successful NBD writes.",
            )?,
            descs: Vec::new(),
        };
        let mut descs = Vec::new();
        for m in c.collectors() {
            descs.extend(m.desc().into_iter().cloned());
        }
        c.descs = descs;
        Ok(c)
    }

    fn collectors(&self) -> [&dyn Collector; 10] {
        [
            &self.connections,
            &self.rejected,
            &self.active,
            &self.handshake_failures,
            &self.protocol_errors,
            &self.requests,
            &self.invalid,
            &self.errors,
            &self.read_bytes,
            &self.written_bytes,
        ]
    }
}

impl Collector for StatsCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let _g = self.lock.lock();
        let s = self.stats.snapshot();
        let set = |c: &IntCounter, v: u64| {
            c.reset();
            c.inc_by(v);
        };
        set(&self.connections, s.connections_accepted);
        set(&self.rejected, s.connections_rejected);
        self.active
            .set(i64::try_from(s.connections_active).unwrap_or(i64::MAX));
        set(&self.handshake_failures, s.handshake_failures);
        set(&self.protocol_errors, s.protocol_errors);
        for (cmd, v) in [
            ("read", s.reads),
            ("write", s.writes),
            ("flush", s.flushes),
            ("trim", s.trims),
            ("cache", s.caches),
            ("write_zeroes", s.write_zeroes),
            ("block_status", s.block_status),
            ("disc", s.disconnects),
        ] {
            set(&self.requests.with_label_values(&[cmd]), v);
        }
        set(&self.invalid, s.requests_invalid);
        set(&self.errors, s.request_errors);
        set(&self.read_bytes, s.bytes_read);
        set(&self.written_bytes, s.bytes_written);
        self.collectors().iter().flat_map(|c| c.collect()).collect()
    }
}

// ----- images -----

/// One image, as listed.
#[derive(Debug, Clone, Serialize)]
pub struct ImageEntry {
    /// Image name.
    pub name: String,
    /// NBD export name.
    pub export: String,
    /// Size in bytes.
    pub size: u64,
    /// Object id.
    pub object: ObjectId,
    /// Chunks in its recipe.
    pub chunks: u64,
    /// Of those, present here.
    pub present_chunks: u64,
    /// `complete`; `prefetching` (partial, and an open export's prefetch
    /// task is fetching ahead of its reader); or `partial` (lazy: chunks
    /// are fetched when read).
    pub state: &'static str,
}

/// What an import did.
#[derive(Debug, Clone, Serialize)]
pub struct ImportResult {
    /// Image name.
    pub name: String,
    /// NBD export name.
    pub export: String,
    /// Object id.
    pub object: ObjectId,
    /// Size in bytes.
    pub size: u64,
    /// Chunks in the recipe.
    pub chunks: u64,
    /// Chunks that were new to the store.
    pub new_chunks: u64,
    /// sha256 of the image, hex.
    pub sha256: String,
}

struct Inner {
    store: Arc<Store>,
    fetcher: Option<Fetcher>,
    /// Parents first, then peers.
    sources: Vec<PeerAddr>,
    metrics: NbdMetrics,
    /// With background fill on: the node's token, which stops fills.
    fill: Option<tokio_util::sync::CancellationToken>,
    /// Objects being filled now.
    filling: parking_lot::Mutex<std::collections::HashSet<ObjectId>>,
    /// Called (blocking) when an image is imported or made here, to
    /// replicate it by policy.
    announce: std::sync::OnceLock<AnnounceHook>,
    /// Predictive prefetch for exports of partly local images.
    prefetch: std::sync::OnceLock<crate::prefetcher::PrefetchEnv>,
    /// Objects with a prefetch task running, and how many.
    prefetching: crate::prefetcher::Active,
}

/// Replicates a new image (name, object) by policy; returns how many
/// sites it was queued for.
pub type AnnounceHook = Arc<dyn Fn(&str, &ObjectId) -> Result<usize, String> + Send + Sync>;

/// VM images in the node's store; cheap to clone.
#[derive(Clone)]
pub struct VmImages {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for VmImages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmImages")
            .field("sources", &self.inner.sources.len())
            .finish()
    }
}

impl VmImages {
    /// Images in `store`; with a fetcher and sources, unknown names and
    /// missing chunks are fetched from the sources (parents first).
    pub fn new(
        store: Arc<Store>,
        fetcher: Option<Fetcher>,
        sources: Vec<PeerAddr>,
        metrics: NbdMetrics,
    ) -> Self {
        Self::build(store, fetcher, sources, metrics, None)
    }

    /// Like [`VmImages::new`], and opening an export of a partly local
    /// image also fetches the rest in the background (at background
    /// priority, a batch at a time) until done or `cancel` fires.
    pub fn with_background_fill(
        store: Arc<Store>,
        fetcher: Option<Fetcher>,
        sources: Vec<PeerAddr>,
        metrics: NbdMetrics,
        cancel: tokio_util::sync::CancellationToken,
    ) -> Self {
        Self::build(store, fetcher, sources, metrics, Some(cancel))
    }

    fn build(
        store: Arc<Store>,
        fetcher: Option<Fetcher>,
        sources: Vec<PeerAddr>,
        metrics: NbdMetrics,
        fill: Option<tokio_util::sync::CancellationToken>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                fetcher,
                sources,
                metrics,
                fill,
                filling: Default::default(),
                announce: std::sync::OnceLock::new(),
                prefetch: std::sync::OnceLock::new(),
                prefetching: Default::default(),
            }),
        }
    }

    /// Prefetch for exports of partly local images (set once, by the
    /// node; needs a fetcher). Tasks stop on `cancel`.
    pub fn set_prefetch(
        &self,
        settings: crate::prefetcher::PrefetchSettings,
        metrics: crate::prefetcher::PrefetchMetrics,
        cancel: tokio_util::sync::CancellationToken,
    ) {
        if let Some(fetcher) = &self.inner.fetcher {
            let _ = self.inner.prefetch.set(crate::prefetcher::PrefetchEnv {
                store: self.inner.store.clone(),
                fetcher: fetcher.clone(),
                sources: self.inner.sources.clone(),
                settings,
                metrics,
                cancel,
                active: self.inner.prefetching.clone(),
            });
        }
    }

    /// Replicate images made here through `hook` (set once, by the node).
    pub fn set_announce_hook(&self, hook: AnnounceHook) {
        let _ = self.inner.announce.set(hook);
    }

    /// Hand a new image to the announce hook, if any (blocking). A failure
    /// is logged: the image is here and stays; it is offered again only
    /// when it changes.
    pub(crate) fn announce(&self, name: &str, object: &ObjectId) {
        if let Some(h) = self.inner.announce.get() {
            match h(name, object) {
                Ok(0) => {}
                Ok(n) => debug!(image = name, sites = n, "VM image queued for replication"),
                Err(e) => {
                    warn!(image = name, error = %e, "queueing a VM image for replication failed")
                }
            }
        }
    }

    /// Start fetching whatever of `object` is not here, in the background,
    /// unless a fill of it runs already or fill is off.
    fn start_fill(&self, name: &str, object: ObjectId) {
        let (Some(cancel), Some(fetcher)) = (&self.inner.fill, &self.inner.fetcher) else {
            return;
        };
        if self.inner.sources.is_empty() || !self.inner.filling.lock().insert(object) {
            return;
        }
        let (cancel, fetcher, me, name) = (
            cancel.clone(),
            fetcher.clone(),
            self.clone(),
            name.to_owned(),
        );
        tokio::spawn(async move {
            let r = tokio::select! {
                () = cancel.cancelled() => Ok(0),
                r = me.fill(&fetcher, object) => r,
            };
            me.inner.filling.lock().remove(&object);
            match r {
                Ok(0) => {}
                Ok(bytes) => info!(image = %name, bytes, "background fill done"),
                Err(e) => warn!(image = %name, error = %e, "background fill stopped"),
            }
        });
    }

    async fn fill(&self, fetcher: &Fetcher, object: ObjectId) -> Result<u64, VmError> {
        /// Chunks asked for per round: small enough that demand reads
        /// interleave, large enough to keep the link busy.
        const BATCH: usize = 64;
        let store = self.inner.store.clone();
        let missing = tokio::task::spawn_blocking(move || -> Result<_, StoreError> {
            let recipe = store.recipe(&object)?;
            store.missing_chunks(&recipe)
        })
        .await
        .map_err(join_err)??;
        let mut total = 0;
        for batch in missing.chunks(BATCH) {
            let want: Vec<(ChunkId, u32)> = batch.iter().map(|c| (c.id, c.len)).collect();
            let report = fetcher
                .fetch_chunks(&want, &self.inner.sources, Priority::Background)
                .await?;
            self.inner.metrics.fill_bytes.inc_by(report.bytes);
            total += report.bytes;
        }
        Ok(total)
    }

    /// The metrics.
    pub fn metrics(&self) -> &NbdMetrics {
        &self.inner.metrics
    }

    /// Ingest an image from `reader` under `name` (replacing an image of
    /// that name), content-defined chunked, with bounded memory.
    pub async fn import<R>(&self, name: &str, reader: R) -> Result<ImportResult, VmError>
    where
        R: tokio::io::AsyncRead + Unpin,
    {
        validate_name(name)?;
        let key = store_name(name);
        // Named but not pinned by the put (its default pin key is
        // `obj:<id>`); the pin under the image's own key follows at once,
        // so removing the image drops exactly its roots.
        let opts = PutOptions {
            name: Some(key.clone()),
            pin: false,
            ..Default::default()
        };
        let put = self.inner.store.put_async(reader, opts).await?;
        let store = self.inner.store.clone();
        if put.len == 0 {
            let _ = tokio::task::spawn_blocking(move || store.remove(&key)).await;
            return Err(VmError::Empty);
        }
        let id = put.object;
        let me = self.clone();
        let n = name.to_owned();
        tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            store.pin(&key, &id)?;
            me.announce(&n, &id);
            Ok(())
        })
        .await
        .map_err(join_err)??;
        info!(image = name, object = %put.object.fmt_short(), size = put.len, new_chunks = put.new_chunks, "VM image imported");
        Ok(ImportResult {
            name: name.to_owned(),
            export: format!("{EXPORT_PREFIX}{name}"),
            object: put.object,
            size: put.len,
            chunks: put.chunks,
            new_chunks: put.new_chunks,
            sha256: put.sha256,
        })
    }

    /// Every image known here, sorted by name.
    pub async fn list(&self) -> Result<Vec<ImageEntry>, VmError> {
        let store = self.inner.store.clone();
        let prefetching = self.inner.prefetching.clone();
        tokio::task::spawn_blocking(move || -> Result<Vec<ImageEntry>, VmError> {
            let mut out = Vec::new();
            for (key, e) in store.names_with_prefix(IMAGE_PREFIX)? {
                let name = &key[IMAGE_PREFIX.len()..];
                let recipe = match store.recipe(&e.object) {
                    Ok(r) => r,
                    Err(StoreError::NoSuchObject(_)) => continue,
                    Err(e) => return Err(e.into()),
                };
                let missing = store.missing_chunks(&recipe)?;
                let missing_ids: std::collections::HashSet<ChunkId> =
                    missing.iter().map(|c| c.id).collect();
                let chunks = recipe.chunks().len() as u64;
                let present = recipe
                    .chunks()
                    .iter()
                    .filter(|c| !missing_ids.contains(&c.id))
                    .count() as u64;
                out.push(ImageEntry {
                    name: name.to_owned(),
                    export: format!("{EXPORT_PREFIX}{name}"),
                    size: recipe.total_len(),
                    object: e.object,
                    chunks,
                    present_chunks: present,
                    state: if present == chunks {
                        "complete"
                    } else if prefetching.lock().contains_key(&e.object) {
                        "prefetching"
                    } else {
                        "partial"
                    },
                });
            }
            Ok(out)
        })
        .await
        .map_err(join_err)?
    }

    /// Remove an image's name and pin (space comes back at the next GC).
    pub async fn remove(&self, name: &str) -> Result<(), VmError> {
        validate_name(name)?;
        let store = self.inner.store.clone();
        let key = store_name(name);
        match tokio::task::spawn_blocking(move || store.remove(&key))
            .await
            .map_err(join_err)?
        {
            Ok(_) => Ok(()),
            Err(StoreError::NoSuchObject(_)) => Err(VmError::NotFound(name.to_owned())),
            Err(e) => Err(e.into()),
        }
    }

    /// The image's object: the local name, else (with sources) the name
    /// resolved at the parents and peers, whose recipe (only) is then
    /// recorded here under the image's name and pin.
    pub async fn resolve(&self, name: &str) -> Result<ObjectId, VmError> {
        validate_name(name)?;
        let key = store_name(name);
        let store = self.inner.store.clone();
        let k = key.clone();
        match tokio::task::spawn_blocking(move || store.resolve(&k))
            .await
            .map_err(join_err)?
        {
            Ok(id) => return Ok(id),
            Err(StoreError::NoSuchObject(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let Some(fetcher) = &self.inner.fetcher else {
            return Err(VmError::NotFound(name.to_owned()));
        };
        if self.inner.sources.is_empty() {
            return Err(VmError::NotFound(name.to_owned()));
        }
        let (id, _recipe) = match fetcher
            .fetch_recipe(
                &ObjectKey::Name(key.clone()),
                &self.inner.sources,
                Priority::Demand,
            )
            .await
        {
            Ok(r) => r,
            Err(FetchError::NotFound(_)) => return Err(VmError::NotFound(name.to_owned())),
            Err(e) => return Err(e.into()),
        };
        let store = self.inner.store.clone();
        tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
            store.set_name(&key, &id)?;
            store.pin(&key, &id)
        })
        .await
        .map_err(join_err)??;
        info!(image = name, object = %id.fmt_short(), "VM image recipe fetched; chunks come on demand");
        Ok(id)
    }

    async fn open_export(&self, name: &str) -> Result<ImageExport, VmError> {
        let id = self.resolve(name).await?;
        let store = self.inner.store.clone();
        let handle = tokio::task::spawn_blocking(move || store.open_object(&id))
            .await
            .map_err(join_err)??;
        if handle.is_empty() {
            return Err(VmError::Empty);
        }
        let trace = crate::trace::TraceRecorder::new(handle.recipe().chunks().len());
        self.start_fill(name, id);
        let handle = Arc::new(handle);
        let prefetch = self
            .inner
            .prefetch
            .get()
            .and_then(|env| crate::prefetcher::start(env, name, handle.clone()));
        Ok(ImageExport {
            name: name.to_owned(),
            handle,
            images: self.clone(),
            trace,
            prefetch,
        })
    }
}

// ----- NBD -----

/// The NBD exports of a node: `image/<NAME>` for every VM image.
#[derive(Debug, Clone)]
pub struct ImageProvider {
    images: VmImages,
    volumes: Option<crate::volume::Volumes>,
}

impl ImageProvider {
    /// Exports over these images.
    pub fn new(images: VmImages) -> Self {
        Self {
            images,
            volumes: None,
        }
    }

    /// Also export these volumes, as `volume/<NAME>` (read-write).
    pub fn with_volumes(mut self, volumes: crate::volume::Volumes) -> Self {
        self.volumes = Some(volumes);
        self
    }
}

impl ExportProvider for ImageProvider {
    fn list(&self) -> Vec<String> {
        // Called from the handshake: range scans of the image names and
        // volume pins only.
        let store = &self.images.inner.store;
        let mut out: Vec<String> = match store.names_with_prefix(IMAGE_PREFIX) {
            Ok(names) => names
                .into_iter()
                .map(|(k, _)| format!("{EXPORT_PREFIX}{}", &k[IMAGE_PREFIX.len()..]))
                .collect(),
            Err(e) => {
                warn!(error = %e, "cannot list VM images for NBD");
                Vec::new()
            }
        };
        if self.volumes.is_some() {
            use crate::volume::{EXPORT_PREFIX as VOL_EXPORT, VOLUME_PREFIX};
            match store.pins_with_prefix(VOLUME_PREFIX) {
                Ok(pins) => out.extend(
                    pins.into_iter()
                        .map(|(k, _)| format!("{VOL_EXPORT}{}", &k[VOLUME_PREFIX.len()..])),
                ),
                Err(e) => warn!(error = %e, "cannot list volumes for NBD"),
            }
        }
        out
    }

    fn open<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Arc<dyn Export>, OpenError>> {
        Box::pin(async move {
            if let (Some(vol), Some(volumes)) = (
                name.strip_prefix(crate::volume::EXPORT_PREFIX),
                &self.volumes,
            ) {
                use crate::volume::VolumeError;
                return match volumes.open(vol).await {
                    Ok(v) => Ok(v as Arc<dyn Export>),
                    Err(VolumeError::NotFound(_) | VolumeError::BadName(_)) => {
                        Err(OpenError::Unknown)
                    }
                    Err(e) => {
                        warn!(export = name, error = %e, "cannot open NBD export");
                        Err(OpenError::Unavailable(e.to_string()))
                    }
                };
            }
            let Some(image) = name.strip_prefix(EXPORT_PREFIX) else {
                return Err(OpenError::Unknown);
            };
            match self.images.open_export(image).await {
                Ok(e) => Ok(Arc::new(e) as Arc<dyn Export>),
                Err(VmError::NotFound(_) | VmError::BadName(_)) => Err(OpenError::Unknown),
                Err(VmError::Store(StoreError::NoSuchObject(_))) => Err(OpenError::Unknown),
                Err(e) => {
                    warn!(export = name, error = %e, "cannot open NBD export");
                    Err(OpenError::Unavailable(e.to_string()))
                }
            }
        })
    }
}

/// One open image export: read-only, straight from the chunk store.
struct ImageExport {
    name: String,
    handle: Arc<ObjectHandle>,
    images: VmImages,
    trace: crate::trace::TraceRecorder,
    prefetch: Option<crate::prefetcher::PrefetchHandle>,
}

impl Drop for ImageExport {
    /// Store the connection's access trace with the object.
    fn drop(&mut self) {
        crate::trace::save_on_close(
            self.images.inner.store.clone(),
            self.handle.id(),
            self.trace.entries(),
        );
    }
}

/// The distinct chunks overlapping `[offset, offset + len)`.
fn overlapping(recipe: &Recipe, offset: u64, len: u64) -> Vec<(ChunkId, u32)> {
    let end = offset.saturating_add(len);
    let chunks = recipe.chunks();
    let Some(mut i) = recipe.chunk_at(offset) else {
        return Vec::new();
    };
    let mut out: Vec<(ChunkId, u32)> = Vec::new();
    while let Some(c) = chunks.get(i) {
        if c.offset >= end {
            break;
        }
        if !out.iter().any(|(id, _)| *id == c.id) {
            out.push((c.id, c.len));
        }
        i += 1;
    }
    out
}

/// `read_at` on a blocking thread: in place where the runtime allows it,
/// else through a buffer on the blocking pool.
async fn read_blocking(h: &Arc<ObjectHandle>, offset: u64, buf: &mut [u8]) -> Result<(), VmError> {
    use tokio::runtime::{Handle, RuntimeFlavor};
    if Handle::current().runtime_flavor() == RuntimeFlavor::MultiThread {
        return Ok(tokio::task::block_in_place(|| h.read_at(offset, buf))?);
    }
    let h = h.clone();
    let len = buf.len();
    let data = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, StoreError> {
        let mut v = vec![0u8; len];
        h.read_at(offset, &mut v)?;
        Ok(v)
    })
    .await
    .map_err(join_err)??;
    buf.copy_from_slice(&data);
    Ok(())
}

/// Whether chunk `id` of `len` bytes is all zeroes. The ids of zero runs
/// are computed once per length (a zero run is a handful of lengths: the
/// chunker's maximum, a volume's block size, a tail), up to a bound; beyond
/// it the answer is a conservative "no".
fn is_zero_chunk(id: &ChunkId, len: u32) -> bool {
    static ZERO_IDS: std::sync::OnceLock<
        parking_lot::Mutex<std::collections::HashMap<u32, ChunkId>>,
    > = std::sync::OnceLock::new();
    const MAX_LENGTHS: usize = 256;
    const MAX_LEN: u32 = 4 << 20;
    if len == 0 || len > MAX_LEN {
        return false;
    }
    let map = ZERO_IDS.get_or_init(Default::default);
    if let Some(z) = map.lock().get(&len) {
        return z == id;
    }
    if map.lock().len() >= MAX_LENGTHS {
        return false;
    }
    let z = ChunkId::of(&vec![0u8; len as usize]);
    map.lock().insert(len, z);
    z == *id
}

/// `base:allocation` extents of `recipe` over `[offset, offset + len)`:
/// chunks that are all zeroes are holes (they take no space: one chunk
/// serves every such run), the rest data; a range for which `dirty` says
/// true (unflushed writes of a volume) is data.
pub(crate) fn extents(
    recipe: &Recipe,
    offset: u64,
    len: u32,
    dirty: impl Fn(u64, u64) -> bool,
) -> Vec<Extent> {
    let end = offset
        .saturating_add(u64::from(len))
        .min(recipe.total_len());
    let chunks = recipe.chunks();
    let mut out = Vec::new();
    let Some(mut i) = recipe.chunk_at(offset) else {
        return vec![Extent::data(len)];
    };
    let mut pos = offset;
    while pos < end {
        let Some(c) = chunks.get(i) else { break };
        let ce = (c.offset + u64::from(c.len)).min(end);
        let n = (ce - pos) as u32;
        if !dirty(pos, ce) && is_zero_chunk(&c.id, c.len) {
            out.push(Extent::hole(n));
        } else {
            out.push(Extent::data(n));
        }
        pos = ce;
        i += 1;
        // Enough for one reply; the client asks again from where it ends.
        if out.len() >= 4096 {
            break;
        }
    }
    if out.is_empty() {
        out.push(Extent::data(len));
    }
    out
}

impl VmImages {
    /// Read `buf.len()` bytes of `handle`'s object at `offset`; chunks that
    /// are not here are fetched on demand from the parents and peers
    /// (coalesced and verified by the fetcher), counted against `label`.
    /// Returns whether the read had to wait for a fetch.
    pub(crate) async fn read_object(
        &self,
        label: &str,
        handle: &Arc<ObjectHandle>,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<bool, VmError> {
        let inner = &self.inner;
        let mut fetched = false;
        // A chunk can go missing again between the fetch and the read
        // (quarantined, evicted); a few rounds settle it.
        for _ in 0..3 {
            match read_blocking(handle, offset, buf).await {
                Ok(()) => return Ok(fetched),
                Err(VmError::Store(StoreError::ChunkMissing(_) | StoreError::Corrupt { .. })) => {
                    let Some(fetcher) = &inner.fetcher else {
                        return Err(VmError::Store(StoreError::ChunkMissing(missing_id(
                            handle,
                            offset,
                            buf.len() as u64,
                        ))));
                    };
                    if inner.sources.is_empty() {
                        return Err(VmError::NotFound(format!(
                            "chunks of {label} (no parents or peers to fetch them from)"
                        )));
                    }
                    let want = overlapping(handle.recipe(), offset, buf.len() as u64);
                    let t = Instant::now();
                    let report = fetcher
                        .fetch_chunks(&want, &inner.sources, Priority::Demand)
                        .await?;
                    inner.metrics.fetch_stall.observe(t.elapsed().as_secs_f64());
                    inner
                        .metrics
                        .fetched_bytes
                        .with_label_values(&[label])
                        .inc_by(report.bytes);
                    inner
                        .metrics
                        .fetched_chunks
                        .inc_by(report.fetched + report.coalesced);
                    debug!(export = %label, offset, len = buf.len(), fetched = report.fetched, coalesced = report.coalesced, "demand fetch");
                    fetched = true;
                }
                Err(e) => return Err(e),
            }
        }
        Err(VmError::Internal(format!(
            "chunks at offset {offset} of {label} kept going missing"
        )))
    }
}

fn missing_id(handle: &ObjectHandle, offset: u64, len: u64) -> ChunkId {
    overlapping(handle.recipe(), offset, len)
        .first()
        .map(|c| c.0)
        .unwrap_or(ChunkId::EMPTY)
}

impl ImageExport {
    async fn read_inner(&self, offset: u64, buf: &mut [u8]) -> Result<(), VmError> {
        self.trace
            .record(self.handle.recipe(), offset, buf.len() as u64);
        let fetched = self
            .images
            .read_object(&self.name, &self.handle, offset, buf)
            .await?;
        if let Some(p) = &self.prefetch {
            let recipe = self.handle.recipe();
            let last = offset.saturating_add(buf.len().max(1) as u64 - 1);
            if let (Some(a), Some(b)) = (recipe.chunk_at(offset), recipe.chunk_at(last)) {
                p.on_read(a as u32, b as u32, fetched);
            }
        }
        let source = if fetched { "fetched" } else { "local" };
        self.images
            .inner
            .metrics
            .image_reads
            .with_label_values(&[source])
            .inc();
        Ok(())
    }
}

impl Export for ImageExport {
    fn size(&self) -> u64 {
        self.handle.len()
    }

    fn read_only(&self) -> bool {
        true
    }

    fn can_multi_conn(&self) -> bool {
        // Read-only and no per-connection cache.
        true
    }

    fn description(&self) -> Option<String> {
        Some(format!(
            "cairn VM image {} (object {})",
            self.name,
            self.handle.id().fmt_short()
        ))
    }

    fn block_status(
        &self,
        offset: u64,
        len: u32,
    ) -> BoxFuture<'_, Result<Vec<Extent>, ExportError>> {
        Box::pin(async move { Ok(extents(self.handle.recipe(), offset, len, |_, _| false)) })
    }

    fn read<'a>(
        &'a self,
        offset: u64,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, Result<(), ExportError>> {
        Box::pin(async move {
            self.read_inner(offset, buf).await.map_err(|e| {
                self.images.inner.metrics.read_errors.inc();
                warn!(export = %self.name, offset, len = buf.len(), error = %e, "NBD read failed");
                ExportError::io(e.to_string())
            })
        })
    }
}

// ----- admin API -----

/// The admin API routes for VM images.
pub fn routes(images: VmImages) -> Router {
    Router::new()
        .route("/api/v1/vm-images", get(list_handler))
        .route(
            "/api/v1/vm-images/{name}",
            put(put_handler).delete(delete_handler),
        )
        .route("/api/v1/vm-images/{name}/traces", get(traces_handler))
        .with_state(images)
}

async fn list_handler(State(v): State<VmImages>) -> Result<Response, VmError> {
    let images = v.list().await?;
    Ok(Json(serde_json::json!({ "images": images })).into_response())
}

/// The stored access traces of an image (its current object), oldest
/// first: `{"object", "chunks", "traces": [[{"chunk", "ms"}, ...], ...]}`.
async fn traces_handler(
    State(v): State<VmImages>,
    Path(name): Path<String>,
) -> Result<Response, VmError> {
    validate_name(&name)?;
    let store = v.inner.store.clone();
    let key = store_name(&name);
    let (object, chunks, traces) = tokio::task::spawn_blocking(move || {
        let object = match store.resolve(&key) {
            Ok(id) => id,
            Err(StoreError::NoSuchObject(_)) => return Err(VmError::NotFound(name)),
            Err(e) => return Err(e.into()),
        };
        let chunks = store.recipe(&object)?.chunks().len();
        Ok((object, chunks, crate::trace::load(&store, &object)?))
    })
    .await
    .map_err(join_err)??;
    Ok(
        Json(serde_json::json!({ "object": object, "chunks": chunks, "traces": traces }))
            .into_response(),
    )
}

async fn delete_handler(
    State(v): State<VmImages>,
    Path(name): Path<String>,
) -> Result<Response, VmError> {
    v.remove(&name).await?;
    Ok(Json(serde_json::json!({ "removed": name })).into_response())
}

async fn put_handler(
    State(v): State<VmImages>,
    Path(name): Path<String>,
    req: Request,
) -> Result<Response, VmError> {
    validate_name(&name)?;
    if let Some(n) = req
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|h| h.to_str().ok())
        .and_then(|s| s.parse::<u64>().ok())
    {
        if n > MAX_IMAGE_BYTES {
            return Err(VmError::TooLarge);
        }
        if n == 0 {
            // Refused before the put, which would already replace the name.
            return Err(VmError::Empty);
        }
    }
    let total = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let t = total.clone();
    let stream = req
        .into_body()
        .into_data_stream()
        .map_err(std::io::Error::other)
        .and_then(move |b| {
            let n =
                t.fetch_add(b.len() as u64, std::sync::atomic::Ordering::Relaxed) + b.len() as u64;
            std::future::ready(if n > MAX_IMAGE_BYTES {
                Err(std::io::Error::other("too large"))
            } else {
                Ok(b)
            })
        });
    let res = v
        .import(&name, tokio_util::io::StreamReader::new(stream))
        .await;
    match res {
        Ok(r) => Ok((StatusCode::CREATED, Json(r)).into_response()),
        Err(_) if total.load(std::sync::atomic::Ordering::Relaxed) > MAX_IMAGE_BYTES => {
            Err(VmError::TooLarge)
        }
        Err(VmError::Store(StoreError::Io { what, source })) => {
            Err(VmError::Body(format!("{what}: {source}")))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["debian-12", "a", "Ubuntu_24.04", &"x".repeat(MAX_NAME_LEN)] {
            validate_name(ok).unwrap();
        }
        for bad in [
            "",
            ".hidden",
            "-x",
            "a/b",
            "a b",
            "a:b",
            "é",
            &"x".repeat(MAX_NAME_LEN + 1),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
        assert_eq!(store_name("d"), "vmimage/d");
    }

    #[test]
    fn overlapping_chunks() {
        let mut r = Recipe::new();
        let ids: Vec<ChunkId> = (0u8..4).map(|i| ChunkId::from_bytes([i; 32])).collect();
        for id in &ids {
            r.push(*id, 100);
        }
        let got =
            |o, l| -> Vec<ChunkId> { overlapping(&r, o, l).into_iter().map(|c| c.0).collect() };
        assert_eq!(got(0, 1), vec![ids[0]]);
        assert_eq!(got(99, 2), vec![ids[0], ids[1]]);
        assert_eq!(got(100, 100), vec![ids[1]]);
        assert_eq!(got(150, 200), vec![ids[1], ids[2], ids[3]]);
        assert!(got(400, 10).is_empty());
    }
}
