//! The store: opening, lookups, reads, names and pins.
//!
//! Actors: any number of caller threads reading and ingesting at once; GC and
//! eviction, serialised by `gc_lock`. The invariants between them:
//! - ingest registers every chunk it references in `in_use` *before* it looks
//!   the chunk up, and releases it only after its commit is durable;
//! - GC and eviction delete a chunk only while holding `in_use` and seeing the
//!   chunk absent from it; readers register an object's chunks when they
//!   open it. So nothing being written or read is reclaimed under its user.
//! - commits take `commit_lock` shared; GC's mark and sweep take it
//!   exclusively, so a root committed during GC cannot be missed.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use prometheus::Registry;
use quick_cache::sync::Cache;
use rocksdb::{ColumnFamilyDescriptor, Options, WriteBatch, WriteOptions, DB};

use crate::chunker::ChunkerConfig;
use crate::compress::CompressProbe;
use crate::engine::{open_engine, EngineKind, IoEngine};
use crate::error::{IoContext, Result, StoreError};
use crate::index::{self, ChunkMeta, Location, NameEntry, ObjectInfo};
use crate::metrics::StoreMetrics;
use crate::outboard::{Outboard, GROUP_LEN};
use crate::recipe::Recipe;
use crate::segment::{self, ActiveSegment, Segment};
use crate::{ChunkId, ObjectId};

/// How a store is opened. Every field has a sane default.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// How new objects are chunked.
    pub chunker: ChunkerConfig,
    /// Which I/O engine reads and writes segments.
    pub engine: EngineKind,
    /// Check every chunk read from disk against its id. Turn off only for
    /// benchmarks that isolate I/O cost.
    pub verify_reads: bool,
    /// zstd-compress chunks that shrink by at least 10%.
    pub compress: bool,
    /// Byte budget for chunk payloads; past it, least recently used chunks of
    /// unpinned objects are evicted. `None`: no budget.
    pub budget_bytes: Option<u64>,
    /// Roll to a new segment file past this size.
    pub segment_bytes: u64,
    /// Chunks up to this size live inline in the index.
    pub inline_max: usize,
    /// Memory for cached outboards (random-read verification state).
    pub outboard_cache_bytes: u64,
    /// Memory for the verified chunk cache: whole chunks, uncompressed, whose
    /// BLAKE3 was checked against their id when they were read from disk.
    /// Random reads (`ObjectHandle::read_at`) that hit it copy from memory,
    /// with no I/O and no hashing. Filled only by random reads; streaming
    /// and whole-chunk reads neither fill nor consult it. 0 disables it; it
    /// is also off when `verify_reads` is off. Default 256 MiB.
    pub chunk_cache_bytes: u64,
    /// GC compacts a segment when less than this fraction of it is live.
    pub compact_below: f64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            chunker: ChunkerConfig::default(),
            engine: EngineKind::Auto,
            verify_reads: true,
            compress: false,
            budget_bytes: None,
            segment_bytes: 256 << 20,
            inline_max: 4096,
            outboard_cache_bytes: 64 << 20,
            // Room for a few VM images' random-read working sets (boot reads
            // a few hundred MiB at most) next to the 64 MiB outboard and
            // 64 MiB RocksDB block caches, on edge nodes with a few GiB.
            chunk_cache_bytes: 256 << 20,
            compact_below: 0.5,
        }
    }
}

/// A chunk store on a local directory. Cheap to clone; all clones share state.
#[derive(Debug, Clone)]
pub struct Store {
    pub(crate) inner: Arc<Inner>,
}

#[derive(Debug, Clone)]
pub(crate) struct OutboardWeighter;

impl quick_cache::Weighter<ChunkId, Arc<Outboard>> for OutboardWeighter {
    fn weight(&self, _k: &ChunkId, v: &Arc<Outboard>) -> u64 {
        v.mem_size() as u64 + 64
    }
}

/// What the chunk cache charges per entry beyond the chunk's bytes: the key,
/// the `Bytes` handle, its shared header and the cache's own slot.
const CHUNK_ENTRY_OVERHEAD: u64 = 128;

#[derive(Debug, Clone)]
pub(crate) struct ChunkWeighter;

impl quick_cache::Weighter<ChunkId, Bytes> for ChunkWeighter {
    fn weight(&self, _k: &ChunkId, v: &Bytes) -> u64 {
        v.len() as u64 + CHUNK_ENTRY_OVERHEAD
    }
}

/// Hands the chunks the cache pushes out back to the inserting caller, which
/// turns each into an outboard outside the cache's locks (see
/// `Store::cache_verified`).
#[derive(Debug, Clone)]
pub(crate) struct KeepEvicted;

impl quick_cache::Lifecycle<ChunkId, Bytes> for KeepEvicted {
    type RequestState = Vec<(ChunkId, Bytes)>;

    fn begin_request(&self) -> Self::RequestState {
        Vec::new()
    }

    fn on_evict(&self, state: &mut Self::RequestState, key: ChunkId, val: Bytes) {
        state.push((key, val));
    }
}

/// Whole chunks whose bytes were hashed and matched their id, by id. A
/// chunk's content never changes, so an entry never goes stale: compaction
/// moving the chunk leaves it valid. Readers still look the chunk up in the
/// index first, so a chunk that GC, eviction or quarantine removed reads as
/// missing even while its bytes linger here; those paths also drop the entry
/// to give the memory back.
pub(crate) type ChunkCache =
    Cache<ChunkId, Bytes, ChunkWeighter, quick_cache::DefaultHashBuilder, KeepEvicted>;

/// A random read that misses the chunk cache but finds the chunk's outboard
/// (the chunk was read whole before and has since left the chunk cache)
/// verifies only the 4 KiB groups it reads. One such read in this many
/// instead reads, hashes and caches the whole chunk, so chunks read again and
/// again come back into the cache, while random reads over far more data than
/// the cache holds pay a whole-chunk read on about 1 miss in this many only.
const PROMOTE_EVERY: u64 = 8;

/// When a random read finds its chunk's index entry missing from the entry
/// cache, the entries of this many neighbouring chunks of the same object
/// (an aligned window of the recipe) are loaded with it, in one batched
/// RocksDB lookup, instead of one point lookup per chunk on first touch.
const META_BATCH: usize = 64;

pub(crate) struct Inner {
    pub(crate) dir: PathBuf,
    pub(crate) seg_dir: PathBuf,
    pub(crate) quarantine_dir: PathBuf,
    pub(crate) cfg: StoreConfig,
    pub(crate) engine: Arc<dyn IoEngine>,
    pub(crate) db: DB,
    pub(crate) segs: RwLock<BTreeMap<u32, Arc<Segment>>>,
    pub(crate) active: Mutex<ActiveSegment>,
    pub(crate) meta_cache: Cache<ChunkId, Arc<ChunkMeta>>,
    pub(crate) outboards: Cache<ChunkId, Arc<Outboard>, OutboardWeighter>,
    /// `None` when `chunk_cache_bytes` is 0 or `verify_reads` is off.
    pub(crate) chunk_cache: Option<ChunkCache>,
    /// Counts chunk-cache misses that found an outboard (see `PROMOTE_EVERY`).
    pub(crate) promote_tick: AtomicU64,
    pub(crate) recipes: Cache<ObjectId, Arc<Recipe>>,
    pub(crate) in_use: Mutex<HashMap<ChunkId, u32>>,
    /// Segments holding chunks of ingests not yet committed; compaction
    /// leaves them alone, or it would delete bytes an index entry is about
    /// to point at.
    pub(crate) seg_writers: Mutex<HashMap<u32, u32>>,
    pub(crate) commit_lock: RwLock<()>,
    pub(crate) gc_lock: Mutex<()>,
    /// Serialises compare-and-set of versioned names.
    pub(crate) names_lock: Mutex<()>,
    pub(crate) atime: Mutex<HashMap<ChunkId, u64>>,
    pub(crate) clock: AtomicU64,
    pub(crate) metrics: StoreMetrics,
    /// Whether zstd pays for chunks stored by `put_chunks` (from peers and
    /// volume writes); each `put_reader` ingest has its own.
    pub(crate) remote_probe: CompressProbe,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .field("engine", &self.engine.name())
            .finish()
    }
}

/// A reference-counted registration in one of the store's "held" maps
/// (chunks in use, segments with uncommitted writes), released on drop.
pub(crate) struct Held<K: Copy + Eq + std::hash::Hash> {
    store: Arc<Inner>,
    map: fn(&Inner) -> &Mutex<HashMap<K, u32>>,
    keys: Vec<K>,
}

impl<K: Copy + Eq + std::hash::Hash> std::fmt::Debug for Held<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Held")
            .field("keys", &self.keys.len())
            .finish()
    }
}

impl<K: Copy + Eq + std::hash::Hash> Held<K> {
    pub(crate) fn new(store: &Arc<Inner>, map: fn(&Inner) -> &Mutex<HashMap<K, u32>>) -> Self {
        Self {
            store: store.clone(),
            map,
            keys: Vec::new(),
        }
    }

    pub(crate) fn add(&mut self, key: K) {
        self.add_all(std::iter::once(key));
    }

    pub(crate) fn add_all(&mut self, keys: impl Iterator<Item = K>) {
        let mut m = (self.map)(&self.store).lock();
        for k in keys {
            *m.entry(k).or_insert(0) += 1;
            self.keys.push(k);
        }
    }
}

impl<K: Copy + Eq + std::hash::Hash> Drop for Held<K> {
    fn drop(&mut self) {
        let mut m = (self.map)(&self.store).lock();
        for k in &self.keys {
            if let Some(n) = m.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    m.remove(k);
                }
            }
        }
    }
}

/// Chunks registered as in use until dropped.
pub(crate) type InUse = Held<ChunkId>;

impl InUse {
    pub(crate) fn chunks(store: &Arc<Inner>) -> Self {
        Held::new(store, |i| &i.in_use)
    }
}

/// Wall-clock milliseconds, for name update times.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) fn sync_write() -> WriteOptions {
    let mut w = WriteOptions::default();
    w.set_sync(true);
    w
}

impl Store {
    /// Open (or create) the store in `dir` with its own metrics registry.
    pub fn open(dir: impl AsRef<Path>, cfg: StoreConfig) -> Result<Self> {
        Self::open_with_registry(dir, cfg, &Registry::new())
    }

    /// Open (or create) the store in `dir`, registering metrics in `reg`.
    pub fn open_with_registry(
        dir: impl AsRef<Path>,
        cfg: StoreConfig,
        reg: &Registry,
    ) -> Result<Self> {
        cfg.chunker
            .validate()
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
        if cfg.segment_bytes < (1 << 20) {
            return Err(StoreError::Invalid(
                "segment_bytes must be at least 1 MiB".into(),
            ));
        }
        if !(0.0..=1.0).contains(&cfg.compact_below) {
            return Err(StoreError::Invalid(
                "compact_below must be within 0..=1".into(),
            ));
        }
        let dir = dir.as_ref().to_path_buf();
        let seg_dir = dir.join("segments");
        let quarantine_dir = dir.join("quarantine");
        for d in [&dir, &seg_dir, &quarantine_dir] {
            fs::create_dir_all(d).ctx(|| format!("create directory {}", d.display()))?;
        }
        let engine = open_engine(cfg.engine).ctx(|| format!("open I/O engine {:?}", cfg.engine))?;

        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        let mut block = rocksdb::BlockBasedOptions::default();
        block.set_bloom_filter(10.0, false);
        block.set_block_cache(&rocksdb::Cache::new_lru_cache(64 << 20));
        opts.set_block_based_table_factory(&block);
        let cfs = index::ALL_CFS
            .iter()
            .map(|n| ColumnFamilyDescriptor::new(*n, opts.clone()));
        let db_path = dir.join("index");
        let db = DB::open_cf_descriptors(&opts, &db_path, cfs).map_err(|e| {
            if e.to_string().contains("lock") {
                StoreError::Locked(dir.clone())
            } else {
                StoreError::Db(e)
            }
        })?;

        // Existing segments stay readable; appends always go to a fresh one,
        // so a torn tail from a crash is never appended after.
        let mut segs = BTreeMap::new();
        let mut seg_bytes = 0;
        for entry in fs::read_dir(&seg_dir).ctx(|| format!("list {}", seg_dir.display()))? {
            let entry = entry.ctx(|| format!("list {}", seg_dir.display()))?;
            if let Some(no) = entry.file_name().to_str().and_then(segment::parse_name) {
                let s = Segment::open(&seg_dir, no)?;
                seg_bytes += s.len()?;
                segs.insert(no, Arc::new(s));
            }
        }
        // An empty last segment (a previous open that wrote nothing) has no
        // tail to tear, so it is reused instead of piling up empty files.
        let reusable = match segs.iter().next_back() {
            Some((_, s)) if s.len()? == 0 => Some(s.clone()),
            _ => None,
        };
        let active_seg = match reusable {
            Some(s) => s,
            None => {
                let next = segs.keys().next_back().map_or(0, |n| n + 1);
                let s = Arc::new(Segment::create(&seg_dir, next)?);
                segs.insert(next, s.clone());
                s
            }
        };

        let metrics = StoreMetrics::new(reg);
        metrics.segment_bytes.set(seg_bytes as i64);
        let inner = Arc::new(Inner {
            seg_dir,
            quarantine_dir,
            engine,
            db,
            segs: RwLock::new(segs),
            active: Mutex::new(ActiveSegment::new(active_seg, 0)),
            meta_cache: Cache::new(1 << 18),
            outboards: Cache::with_weighter(
                (cfg.outboard_cache_bytes / 600).max(16) as usize,
                cfg.outboard_cache_bytes,
                OutboardWeighter,
            ),
            chunk_cache: (cfg.verify_reads && cfg.chunk_cache_bytes > 0).then(|| {
                Cache::with(
                    // Estimated entries: chunks of the default 64 KiB average.
                    (cfg.chunk_cache_bytes / (64 << 10)).max(16) as usize,
                    cfg.chunk_cache_bytes,
                    ChunkWeighter,
                    quick_cache::DefaultHashBuilder::default(),
                    KeepEvicted,
                )
            }),
            promote_tick: AtomicU64::new(0),
            recipes: Cache::new(4096),
            in_use: Mutex::new(HashMap::new()),
            seg_writers: Mutex::new(HashMap::new()),
            commit_lock: RwLock::new(()),
            gc_lock: Mutex::new(()),
            names_lock: Mutex::new(()),
            atime: Mutex::new(HashMap::new()),
            clock: AtomicU64::new(1),
            metrics,
            remote_probe: CompressProbe::new(),
            cfg,
            dir,
        });
        let store = Self { inner };
        store.recount()?;
        tracing::info!(dir = %store.inner.dir.display(), engine = store.engine_name(), "chunk store open");
        Ok(store)
    }

    /// Recompute the size gauges from the index.
    pub(crate) fn recount(&self) -> Result<()> {
        let db = &self.inner.db;
        let mut physical = 0u64;
        for kv in db.iterator_cf(self.cf(index::CF_CHUNKS), rocksdb::IteratorMode::Start) {
            let (k, v) = kv?;
            if let Some(id) = ChunkId::from_slice(&k) {
                if let Ok(m) = ChunkMeta::decode(&id, &v) {
                    physical += m.stored_len();
                }
            }
        }
        let mut logical = 0u64;
        for kv in db.iterator_cf(self.cf(index::CF_OBJECTS), rocksdb::IteratorMode::Start) {
            let (_, v) = kv?;
            if let Ok(info) = serde_json::from_slice::<ObjectInfo>(&v) {
                logical += info.len;
            }
        }
        let m = &self.inner.metrics;
        m.physical_bytes.set(physical as i64);
        m.logical_bytes.set(logical as i64);
        m.update_ratio();
        Ok(())
    }

    pub(crate) fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        // Every CF in ALL_CFS is created at open, so this lookup cannot fail
        // for the constants this crate passes.
        self.inner
            .db
            .cf_handle(name)
            .unwrap_or_else(|| unreachable_cf(name))
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The configuration in force.
    pub fn config(&self) -> &StoreConfig {
        &self.inner.cfg
    }

    /// `"uring"` or `"psync"`.
    pub fn engine_name(&self) -> &'static str {
        self.inner.engine.name()
    }

    /// The store's metrics.
    pub fn metrics(&self) -> &StoreMetrics {
        &self.inner.metrics
    }

    pub(crate) fn touch(&self, id: &ChunkId) {
        if self.inner.cfg.budget_bytes.is_some() {
            let t = self.inner.clock.fetch_add(1, Ordering::Relaxed);
            self.inner.atime.lock().insert(*id, t);
        }
    }

    /// The index entry of a chunk, if the chunk is present.
    pub fn chunk_meta(&self, id: &ChunkId) -> Result<Option<Arc<ChunkMeta>>> {
        if let Some(m) = self.inner.meta_cache.get(id) {
            return Ok(Some(m));
        }
        match self
            .inner
            .db
            .get_pinned_cf(self.cf(index::CF_CHUNKS), id.as_bytes())?
        {
            Some(v) => {
                let m = Arc::new(ChunkMeta::decode(id, &v)?);
                self.inner.meta_cache.insert(*id, m.clone());
                Ok(Some(m))
            }
            None => Ok(None),
        }
    }

    /// Load the index entries of those of `ids` not in the entry cache yet,
    /// in one batched RocksDB lookup. A best-effort warm-up: chunks absent
    /// from the index, entries that fail to decode and lookup errors are
    /// skipped, and the reader of such a chunk meets them (as typed errors)
    /// in its own [`Store::chunk_meta`] lookup.
    ///
    /// The entries go through the same cache as [`Store::chunk_meta`]'s, with
    /// the same staleness rules: compaction and GC update or drop cached
    /// entries after they change the index, and a reader that finds an entry
    /// pointing at a segment compaction removed looks in the index again.
    pub(crate) fn prefetch_metas(&self, ids: &[ChunkId]) {
        let want: Vec<&ChunkId> = ids
            .iter()
            .filter(|id| !self.inner.meta_cache.contains_key(*id))
            .collect();
        if want.is_empty() {
            return;
        }
        let got = self.inner.db.batched_multi_get_cf(
            self.cf(index::CF_CHUNKS),
            want.iter().map(|id| id.as_bytes()),
            false,
        );
        for (id, v) in want.into_iter().zip(got) {
            if let Ok(Some(v)) = v {
                if let Ok(m) = ChunkMeta::decode(id, &v) {
                    self.inner.meta_cache.insert(*id, Arc::new(m));
                }
            }
        }
    }

    /// Whether the chunk is present.
    pub fn has_chunk(&self, id: &ChunkId) -> Result<bool> {
        Ok(self.chunk_meta(id)?.is_some())
    }

    pub(crate) fn segment(&self, no: u32) -> Option<Arc<Segment>> {
        self.inner.segs.read().get(&no).cloned()
    }

    /// Read a chunk's stored bytes (maybe compressed), unverified.
    pub(crate) fn read_stored(
        &self,
        id: &ChunkId,
        meta: &ChunkMeta,
    ) -> Result<(Bytes, PathBuf, u64)> {
        match &meta.loc {
            Location::Inline(b) => Ok((b.clone(), self.inner.dir.join("index"), 0)),
            Location::Segment {
                seg,
                offset,
                stored_len,
            } => {
                let s = self.segment(*seg).ok_or_else(|| StoreError::BadEntry {
                    what: format!("chunk {id}"),
                    why: format!("points at segment {seg}, which does not exist"),
                })?;
                let mut buf = vec![0u8; *stored_len as usize];
                self.inner
                    .engine
                    .read_exact_at(&s.file, *offset, &mut buf)
                    .ctx(|| format!("read chunk {id} from {}:{offset}", s.path.display()))?;
                Ok((Bytes::from(buf), s.path.clone(), *offset))
            }
        }
    }

    /// Read a whole chunk and check it against its id; a mismatch quarantines it.
    pub fn read_chunk(&self, id: &ChunkId) -> Result<Bytes> {
        let meta = self.chunk_meta(id)?.ok_or(StoreError::ChunkMissing(*id))?;
        self.read_chunk_with(id, &meta, true)
    }

    /// Read a whole chunk without checking it against its id, for a reader
    /// that checks it itself (a peer fetching it verifies every chunk).
    /// Compressed chunks are still decompressed (a bad payload is
    /// quarantined and reads as [`StoreError::Corrupt`]).
    pub fn read_chunk_unverified(&self, id: &ChunkId) -> Result<Bytes> {
        let meta = self.chunk_meta(id)?.ok_or(StoreError::ChunkMissing(*id))?;
        self.read_chunk_with(id, &meta, false)
    }

    /// A chunk as it is stored, for a peer that checks it itself: the zstd
    /// frame when it is stored compressed and `accept_zstd`, else its bytes
    /// (decompressed as [`Store::read_chunk_unverified`] does). Saves the
    /// decompress-then-compress-again of serving compressible data.
    pub fn read_chunk_stored(&self, id: &ChunkId, accept_zstd: bool) -> Result<StoredChunk> {
        let meta = self.chunk_meta(id)?.ok_or(StoreError::ChunkMissing(*id))?;
        if !(meta.compressed && accept_zstd) {
            let data = self.read_chunk_with(id, &meta, false)?;
            return Ok(StoredChunk {
                raw_len: meta.raw_len,
                zstd: false,
                payload: data,
            });
        }
        let (payload, _, _) = match self.read_stored(id, &meta) {
            Ok(x) => x,
            // Moved by a compaction since `meta` was cached: look again.
            Err(StoreError::BadEntry { .. }) => {
                self.inner.meta_cache.remove(id);
                return self.read_chunk_unverified(id).map(|data| StoredChunk {
                    raw_len: data.len() as u32,
                    zstd: false,
                    payload: data,
                });
            }
            Err(e) => return Err(e),
        };
        self.inner.metrics.chunks_read.inc();
        self.touch(id);
        Ok(StoredChunk {
            raw_len: meta.raw_len,
            zstd: true,
            payload,
        })
    }

    pub(crate) fn read_chunk_with(
        &self,
        id: &ChunkId,
        meta: &ChunkMeta,
        verify: bool,
    ) -> Result<Bytes> {
        let (stored, path, offset) = match self.read_stored(id, meta) {
            Ok(x) => x,
            // A compaction may have moved the chunk since `meta` was cached:
            // look once more in the index itself.
            Err(e @ StoreError::BadEntry { .. }) => {
                self.inner.meta_cache.remove(id);
                let fresh = self.chunk_meta(id)?.ok_or(StoreError::ChunkMissing(*id))?;
                if *fresh == *meta {
                    return Err(e);
                }
                return self.read_chunk_with(id, &fresh, verify);
            }
            Err(e) => return Err(e),
        };
        self.inner.metrics.chunks_read.inc();
        self.touch(id);
        let data = if meta.compressed {
            match zstd::bulk::decompress(&stored, meta.raw_len as usize) {
                Ok(d) if d.len() == meta.raw_len as usize => Bytes::from(d),
                _ => return Err(self.quarantine(id, &stored, path, offset)),
            }
        } else {
            stored.clone()
        };
        if verify && (data.len() != meta.raw_len as usize || ChunkId::of(&data) != *id) {
            return Err(self.quarantine(id, &stored, path, offset));
        }
        Ok(data)
    }

    /// Move a corrupt chunk aside: copy its bytes to `quarantine/`, drop its
    /// index entry so it reads as missing, count and log it.
    pub(crate) fn quarantine(
        &self,
        id: &ChunkId,
        stored: &[u8],
        path: PathBuf,
        offset: u64,
    ) -> StoreError {
        let q = self.inner.quarantine_dir.join(format!(
            "{id}-{}-{offset}",
            path.file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("inline")
        ));
        if let Err(e) = fs::write(&q, stored) {
            tracing::error!(%id, error = %e, "could not copy corrupt chunk to quarantine");
        }
        let mut m = self.inner.in_use.lock();
        let stored_len = self
            .chunk_meta(id)
            .ok()
            .flatten()
            .map(|m| m.stored_len())
            .unwrap_or(0);
        if let Err(e) =
            self.inner
                .db
                .delete_cf_opt(self.cf(index::CF_CHUNKS), id.as_bytes(), &sync_write())
        {
            tracing::error!(%id, error = %e, "could not drop the index entry of a corrupt chunk");
        } else {
            self.inner.metrics.physical_bytes.sub(stored_len as i64);
        }
        self.inner.meta_cache.remove(id);
        self.inner.outboards.remove(id);
        self.uncache_chunk(id);
        m.remove(id);
        drop(m);
        self.inner.metrics.verify_failures.inc();
        tracing::error!(%id, path = %path.display(), offset, quarantine = %q.display(), "corrupt chunk moved aside");
        StoreError::Corrupt {
            id: *id,
            path,
            offset,
            quarantine: q,
        }
    }

    /// Keep a whole chunk whose bytes matched its id in the chunk cache.
    ///
    /// While a chunk is cached it needs no outboard, so a first read with
    /// the cache on only checks the chunk's id (one BLAKE3 pass, about twice
    /// as fast as building the outboard's per-group hashes). The outboard is
    /// built when the cache pushes the chunk out, from the verified bytes
    /// still in hand (no I/O), so later reads of it verify only the 4 KiB
    /// groups they touch.
    fn cache_verified(&self, id: &ChunkId, data: &Bytes) {
        let Some(c) = &self.inner.chunk_cache else {
            return;
        };
        let evicted = c.insert_with_lifecycle(*id, data.clone());
        self.inner.metrics.chunk_cache_bytes.set(c.weight() as i64);
        for (eid, bytes) in evicted {
            // Outboards serve plain segment chunks of more than one group
            // only; compressed chunks are read whole.
            let compressed = self
                .inner
                .meta_cache
                .peek(&eid)
                .is_some_and(|m| m.compressed);
            if bytes.len() <= GROUP_LEN || compressed || self.inner.outboards.contains_key(&eid) {
                continue;
            }
            if let (got, Some(ob)) = Outboard::compute(&bytes) {
                if got == eid {
                    self.inner.outboards.insert(eid, Arc::new(ob));
                }
            }
        }
    }

    /// Drop a chunk from the chunk cache: it was quarantined, collected or
    /// evicted. (Reads would report it missing anyway, since they look in
    /// the index first; this gives the memory back.)
    pub(crate) fn uncache_chunk(&self, id: &ChunkId) {
        if let Some(c) = &self.inner.chunk_cache {
            if c.remove(id).is_some() {
                self.inner.metrics.chunk_cache_bytes.set(c.weight() as i64);
            }
        }
    }

    /// Read `buf.len()` bytes of chunk `id` starting at `start` (the random
    /// read path), verified: from the chunk cache when the chunk is there;
    /// else, once the chunk's outboard is known, by reading and hashing only
    /// the 4 KiB groups the range covers; else by reading and hashing the
    /// whole chunk, which then goes into the chunk cache (or, with the cache
    /// off, leaves its outboard in the outboard cache).
    ///
    /// `meta` is the chunk's index entry, looked up by the caller just
    /// before: the index comes first, even for a cached chunk, so a chunk
    /// that GC, eviction or quarantine removed reads as missing.
    pub(crate) fn read_chunk_range(
        &self,
        id: &ChunkId,
        meta: &ChunkMeta,
        start: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let end = start + buf.len() as u64;
        if end > u64::from(meta.raw_len) {
            return Err(StoreError::BadEntry {
                what: format!("chunk {id}"),
                why: "shorter than its recipe says".into(),
            });
        }
        // Present only when verify_reads is on.
        let cache = self.inner.chunk_cache.as_ref();
        if let Some(cache) = cache {
            if let Some(data) = cache.get(id) {
                // Verified bytes are exactly `raw_len` long unless the index
                // entry lies; then fall through to the disk paths, which
                // report it.
                if let Some(src) = data.get(start as usize..end as usize) {
                    buf.copy_from_slice(src);
                    self.inner.metrics.chunk_cache_hits.inc();
                    self.touch(id);
                    return Ok(());
                }
            }
            self.inner.metrics.chunk_cache_misses.inc();
        }
        let plain_segment = match &meta.loc {
            Location::Segment { seg, offset, .. } if !meta.compressed => Some((*seg, *offset)),
            _ => None,
        };
        let seg = plain_segment
            .filter(|_| meta.raw_len as usize > GROUP_LEN)
            .and_then(|(seg_no, payload_off)| Some((self.segment(seg_no)?, payload_off)));
        // Inline, compressed or single-group chunks, or a segment compaction
        // removed (the slow path re-reads the index): read whole.
        let Some((seg, payload_off)) = seg else {
            let verify = self.inner.cfg.verify_reads;
            let data = self.read_chunk_with(id, meta, verify)?;
            buf.copy_from_slice(&data[start as usize..end as usize]);
            if verify {
                self.cache_verified(id, &data);
            }
            return Ok(());
        };
        if !self.inner.cfg.verify_reads {
            self.inner
                .engine
                .read_exact_at(&seg.file, payload_off + start, buf)
                .ctx(|| format!("read chunk {id} from {}", seg.path.display()))?;
            self.inner.metrics.chunks_read.inc();
            self.touch(id);
            return Ok(());
        }
        let ob = self.inner.outboards.get(id);
        let promote = cache.is_some()
            && ob.is_some()
            && self.inner.promote_tick.fetch_add(1, Ordering::Relaxed) % PROMOTE_EVERY
                == PROMOTE_EVERY - 1;
        let ob = match ob {
            Some(ob) if !promote => ob,
            _ => {
                // Whole chunk: read and hash it. With the chunk cache on
                // (a first read, or a promotion) only its id is checked and
                // its bytes are cached; the outboard is built if the chunk
                // leaves the cache. With the cache off the outboard is built
                // now, in the same pass.
                let stored = read_new(&seg.file, payload_off, meta.stored_len() as usize)
                    .ctx(|| format!("read chunk {id} from {}:{payload_off}", seg.path.display()))?;
                let (stored, path, offset) = (Bytes::from(stored), seg.path.clone(), payload_off);
                self.inner.metrics.chunks_read.inc();
                if cache.is_some() {
                    if ChunkId::of(&stored) != *id {
                        return Err(self.quarantine(id, &stored, path, offset));
                    }
                } else {
                    match Outboard::compute(&stored) {
                        (got, Some(ob)) if got == *id => {
                            self.inner.outboards.insert(*id, Arc::new(ob));
                        }
                        _ => return Err(self.quarantine(id, &stored, path, offset)),
                    }
                }
                buf.copy_from_slice(&stored[start as usize..end as usize]);
                self.cache_verified(id, &stored);
                self.touch(id);
                return Ok(());
            }
        };
        let (s, e) = ob.group_span(start, end);
        if s == start && e == end {
            // Group-aligned (the common NBD case): read straight into the
            // caller's buffer and verify it there, with no copy.
            self.inner
                .engine
                .read_exact_at(&seg.file, payload_off + s, buf)
                .ctx(|| format!("read chunk {id} from {}", seg.path.display()))?;
            self.inner.metrics.chunks_read.inc();
            if !ob.verify_span(s, buf) {
                buf.fill(0);
                let (stored, path, offset) = self.read_stored(id, meta)?;
                return Err(self.quarantine(id, &stored, path, offset));
            }
            self.touch(id);
            return Ok(());
        }
        let mut span = vec![0u8; (e - s) as usize];
        self.inner
            .engine
            .read_exact_at(&seg.file, payload_off + s, &mut span)
            .ctx(|| format!("read chunk {id} from {}", seg.path.display()))?;
        self.inner.metrics.chunks_read.inc();
        if !ob.verify_span(s, &span) {
            // Re-read it whole so the quarantine copy holds the full chunk.
            let (stored, path, offset) = self.read_stored(id, meta)?;
            return Err(self.quarantine(id, &stored, path, offset));
        }
        buf.copy_from_slice(&span[(start - s) as usize..(end - s) as usize]);
        self.touch(id);
        Ok(())
    }

    /// Look up a recipe.
    pub fn recipe(&self, id: &ObjectId) -> Result<Arc<Recipe>> {
        if let Some(r) = self.inner.recipes.get(id) {
            return Ok(r);
        }
        let v = self
            .inner
            .db
            .get_pinned_cf(self.cf(index::CF_RECIPES), id.as_bytes())?
            .ok_or_else(|| StoreError::NoSuchObject(id.to_string()))?;
        let r = Recipe::decode(&v).map_err(|e| StoreError::BadEntry {
            what: format!("recipe {id}"),
            why: e.to_string(),
        })?;
        let r = Arc::new(r);
        self.inner.recipes.insert(*id, r.clone());
        Ok(r)
    }

    /// What ingest recorded about an object.
    pub fn object_info(&self, id: &ObjectId) -> Result<ObjectInfo> {
        let v = self
            .inner
            .db
            .get_pinned_cf(self.cf(index::CF_OBJECTS), id.as_bytes())?
            .ok_or_else(|| StoreError::NoSuchObject(id.to_string()))?;
        serde_json::from_slice(&v).map_err(|e| StoreError::BadEntry {
            what: format!("object {id}"),
            why: e.to_string(),
        })
    }

    /// Resolve an object id (64 hex), a digest (`sha256:…`, `sha512:…`,
    /// `blake3:…`) or a name.
    pub fn resolve(&self, what: &str) -> Result<ObjectId> {
        if what.len() == 64 {
            if let Ok(id) = what.parse::<ObjectId>() {
                if self
                    .inner
                    .db
                    .get_pinned_cf(self.cf(index::CF_RECIPES), id.as_bytes())?
                    .is_some()
                {
                    return Ok(id);
                }
                return Err(StoreError::NoSuchObject(what.to_owned()));
            }
        }
        if what.contains(':') {
            if let Some(v) = self
                .inner
                .db
                .get_pinned_cf(self.cf(index::CF_DIGESTS), what.as_bytes())?
            {
                if let Some(id) = ObjectId::from_slice(&v) {
                    return Ok(id);
                }
            }
        }
        match self
            .inner
            .db
            .get_pinned_cf(self.cf(index::CF_NAMES), what.as_bytes())?
        {
            Some(v) => Ok(NameEntry::decode(what.as_bytes(), &v)?.object),
            None => Err(StoreError::NoSuchObject(what.to_owned())),
        }
    }

    /// Open an object for reading. While the handle lives, GC and eviction
    /// leave its chunks alone.
    pub fn open_object(&self, id: &ObjectId) -> Result<ObjectHandle> {
        let recipe = self.recipe(id)?;
        let mut guard = InUse::chunks(&self.inner);
        guard.add_all(recipe.chunks().iter().map(|c| c.id));
        // GC deletes an unreferenced recipe and its chunks in one batch while
        // holding `in_use`. Seeing the recipe still in the index after our
        // chunks are registered means that batch has not run, and the sweep
        // will now skip them.
        if self
            .inner
            .db
            .get_pinned_cf(self.cf(index::CF_RECIPES), id.as_bytes())?
            .is_none()
        {
            self.inner.recipes.remove(id);
            return Err(StoreError::NoSuchObject(id.to_string()));
        }
        Ok(ObjectHandle {
            store: self.clone(),
            id: *id,
            recipe,
            _guard: guard,
        })
    }

    /// Set `name` to point at `object`.
    pub fn set_name(&self, name: &str, object: &ObjectId) -> Result<()> {
        index::validate_name(name)?;
        self.recipe(object)?;
        let e = NameEntry {
            object: *object,
            updated_ms: now_ms(),
            version: 0,
        };
        let _c = self.inner.commit_lock.read();
        self.inner.db.put_cf_opt(
            self.cf(index::CF_NAMES),
            name.as_bytes(),
            e.encode(),
            &sync_write(),
        )?;
        Ok(())
    }

    /// Pin `object` under `key`: it is kept by GC and never evicted.
    pub fn pin(&self, key: &str, object: &ObjectId) -> Result<()> {
        index::validate_name(key).or_else(|e| {
            if key.starts_with("obj:") {
                Ok(())
            } else {
                Err(e)
            }
        })?;
        self.recipe(object)?;
        let _c = self.inner.commit_lock.read();
        self.inner.db.put_cf_opt(
            self.cf(index::CF_PINS),
            key.as_bytes(),
            object.as_bytes(),
            &sync_write(),
        )?;
        Ok(())
    }

    /// Remove a name, or a pin by key, or (given an object id) the object's
    /// default pin and every name pointing at it. Returns how many roots went.
    /// The space comes back at the next GC.
    pub fn remove(&self, what: &str) -> Result<usize> {
        let _c = self.inner.commit_lock.read();
        let db = &self.inner.db;
        let mut batch = WriteBatch::default();
        let mut n = 0;
        if db
            .get_pinned_cf(self.cf(index::CF_NAMES), what.as_bytes())?
            .is_some()
        {
            batch.delete_cf(self.cf(index::CF_NAMES), what.as_bytes());
            n += 1;
        }
        if db
            .get_pinned_cf(self.cf(index::CF_PINS), what.as_bytes())?
            .is_some()
        {
            batch.delete_cf(self.cf(index::CF_PINS), what.as_bytes());
            n += 1;
        }
        if n == 0 {
            if let Ok(id) = what.parse::<ObjectId>() {
                for (name, e) in self.names()? {
                    if e.object == id {
                        batch.delete_cf(self.cf(index::CF_NAMES), name.as_bytes());
                        n += 1;
                    }
                }
                for (key, obj) in self.pins()? {
                    if obj == id {
                        batch.delete_cf(self.cf(index::CF_PINS), key.as_bytes());
                        n += 1;
                    }
                }
            }
        }
        if n == 0 {
            return Err(StoreError::NoSuchObject(what.to_owned()));
        }
        db.write_opt(batch, &sync_write())?;
        Ok(n)
    }

    /// All names, sorted.
    pub fn names(&self) -> Result<Vec<(String, NameEntry)>> {
        self.names_with_prefix("")
    }

    /// The names that start with `prefix`, sorted: one range scan of the
    /// index, not a scan of every name.
    pub fn names_with_prefix(&self, prefix: &str) -> Result<Vec<(String, NameEntry)>> {
        let mut out = Vec::new();
        for kv in self.prefix_iter(index::CF_NAMES, prefix) {
            let (k, v) = kv?;
            if !k.starts_with(prefix.as_bytes()) {
                break;
            }
            out.push((
                String::from_utf8_lossy(&k).into_owned(),
                NameEntry::decode(&k, &v)?,
            ));
        }
        Ok(out)
    }

    fn prefix_iter<'a>(
        &'a self,
        cf: &str,
        prefix: &'a str,
    ) -> rocksdb::DBIteratorWithThreadMode<'a, rocksdb::DB> {
        self.inner.db.iterator_cf(
            self.cf(cf),
            rocksdb::IteratorMode::From(prefix.as_bytes(), rocksdb::Direction::Forward),
        )
    }

    /// All pins, sorted by key.
    pub fn pins(&self) -> Result<Vec<(String, ObjectId)>> {
        self.pins_with_prefix("")
    }

    /// The pins whose key starts with `prefix`, sorted (one range scan).
    pub fn pins_with_prefix(&self, prefix: &str) -> Result<Vec<(String, ObjectId)>> {
        let mut out = Vec::new();
        for kv in self.prefix_iter(index::CF_PINS, prefix) {
            let (k, v) = kv?;
            if !k.starts_with(prefix.as_bytes()) {
                break;
            }
            let id = ObjectId::from_slice(&v).ok_or_else(|| StoreError::BadEntry {
                what: format!("pin {}", String::from_utf8_lossy(&k)),
                why: "wrong length".into(),
            })?;
            out.push((String::from_utf8_lossy(&k).into_owned(), id));
        }
        Ok(out)
    }

    /// All object ids with a recipe.
    pub fn objects(&self) -> Result<Vec<ObjectId>> {
        let mut out = Vec::new();
        for kv in self
            .inner
            .db
            .iterator_cf(self.cf(index::CF_RECIPES), rocksdb::IteratorMode::Start)
        {
            let (k, _) = kv?;
            if let Some(id) = ObjectId::from_slice(&k) {
                out.push(id);
            }
        }
        Ok(out)
    }

    /// How much of an object is present locally.
    pub fn object_stat(&self, id: &ObjectId) -> Result<ObjectStat> {
        let recipe = self.recipe(id)?;
        let info = self.object_info(id).ok();
        let mut present_chunks = 0u64;
        let mut present_bytes = 0u64;
        let mut stored_bytes = 0u64;
        let mut seen = std::collections::HashSet::new();
        let mut unique_bytes = 0u64;
        for c in recipe.chunks() {
            let first = seen.insert(c.id);
            if first {
                unique_bytes += u64::from(c.len);
            }
            if let Some(m) = self.chunk_meta(&c.id)? {
                present_chunks += 1;
                present_bytes += u64::from(c.len);
                if first {
                    stored_bytes += m.stored_len();
                }
            }
        }
        let pinned = self.pins()?.iter().any(|(_, o)| o == id);
        let names = self
            .names()?
            .into_iter()
            .filter(|(_, e)| e.object == *id)
            .map(|(n, _)| n)
            .collect();
        Ok(ObjectStat {
            id: *id,
            len: recipe.total_len(),
            chunks: recipe.chunks().len() as u64,
            unique_chunks: seen.len() as u64,
            unique_bytes,
            present_chunks,
            present_bytes,
            stored_bytes,
            pinned,
            names,
            info,
        })
    }

    /// Store-wide totals.
    pub fn summary(&self) -> StoreSummary {
        let m = &self.inner.metrics;
        StoreSummary {
            dir: self.inner.dir.clone(),
            engine: self.engine_name(),
            logical_bytes: m.logical_bytes.get().max(0) as u64,
            physical_bytes: m.physical_bytes.get().max(0) as u64,
            segment_bytes: m.segment_bytes.get().max(0) as u64,
            segments: self.inner.segs.read().len(),
            budget_bytes: self.inner.cfg.budget_bytes,
        }
    }
}

/// Read exactly `len` bytes of `file` at `offset` into a new buffer, without
/// zeroing the buffer first: the first-touch path of random reads reads whole
/// chunks into buffers the chunk cache then keeps.
///
/// This is a plain `pread` whichever engine the store uses: it serves one
/// synchronous read a caller is waiting on, where io_uring gains nothing (one
/// submit-and-wait per read), and `IoEngine` takes initialised buffers only.
/// `pread` is always allowed where io_uring is (psync is the fallback).
fn read_new(file: &std::fs::File, offset: u64, len: usize) -> std::io::Result<Vec<u8>> {
    use std::os::fd::AsRawFd as _;
    let mut buf: Vec<u8> = Vec::with_capacity(len);
    while buf.len() < len {
        let at = offset
            .checked_add(buf.len() as u64)
            .and_then(|o| libc::off_t::try_from(o).ok())
            .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        let left = len - buf.len();
        let spare = &mut buf.spare_capacity_mut()[..left];
        // SAFETY: the kernel writes at most `spare.len()` bytes into the
        // spare capacity, which `buf` owns and nothing else references (it
        // is only ever seen as `MaybeUninit` until `set_len` below).
        let n =
            unsafe { libc::pread(file.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len(), at) };
        match n {
            n if n < 0 => {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            0 => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "failed to fill whole buffer",
                ))
            }
            n => {
                let n = (n as usize).min(left);
                // SAFETY: the kernel initialised the next `n` bytes.
                unsafe { buf.set_len(buf.len() + n) };
            }
        }
    }
    Ok(buf)
}

#[cold]
fn unreachable_cf(name: &str) -> ! {
    panic!("column family {name} was not created at open")
}

/// How much of an object is here.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ObjectStat {
    /// The object.
    pub id: ObjectId,
    /// Its length.
    pub len: u64,
    /// Chunks in its recipe.
    pub chunks: u64,
    /// Distinct chunks in its recipe.
    pub unique_chunks: u64,
    /// Bytes of its distinct chunks.
    pub unique_bytes: u64,
    /// Recipe entries whose chunk is present.
    pub present_chunks: u64,
    /// Object bytes whose chunk is present.
    pub present_bytes: u64,
    /// Disk bytes of its distinct present chunks (shared with other objects).
    pub stored_bytes: u64,
    /// Whether a pin holds it.
    pub pinned: bool,
    /// Names pointing at it.
    pub names: Vec<String>,
    /// Digests recorded at ingest.
    pub info: Option<ObjectInfo>,
}

impl ObjectStat {
    /// "complete", or "partial" when chunks are missing.
    pub fn state(&self) -> &'static str {
        if self.present_chunks == self.chunks {
            "complete"
        } else {
            "partial"
        }
    }
}

/// Store-wide totals.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StoreSummary {
    /// Data directory.
    pub dir: PathBuf,
    /// I/O engine in use.
    pub engine: &'static str,
    /// Bytes of all objects.
    pub logical_bytes: u64,
    /// Bytes of distinct chunks.
    pub physical_bytes: u64,
    /// Bytes of segment files.
    pub segment_bytes: u64,
    /// Number of segment files.
    pub segments: usize,
    /// Budget, if any.
    pub budget_bytes: Option<u64>,
}

/// A chunk as the store holds it (see [`Store::read_chunk_stored`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredChunk {
    /// Length of the chunk's bytes.
    pub raw_len: u32,
    /// `payload` is a zstd frame of `raw_len` bytes.
    pub zstd: bool,
    /// The frame, or the bytes themselves.
    pub payload: Bytes,
}

/// An open object: random access and sequential streaming.
#[derive(Debug)]
pub struct ObjectHandle {
    store: Store,
    id: ObjectId,
    recipe: Arc<Recipe>,
    _guard: InUse,
}

impl ObjectHandle {
    /// The object id.
    pub fn id(&self) -> ObjectId {
        self.id
    }

    /// The recipe.
    pub fn recipe(&self) -> &Recipe {
        &self.recipe
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.recipe.total_len()
    }

    /// True for an empty object.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fill `buf` from `offset`, reading only the parts of chunks needed
    /// (the NBD path). Fails with `OutOfRange` if the range passes the end.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.len());
        if end.is_none() {
            return Err(StoreError::OutOfRange {
                object: self.id,
                offset,
                len: self.len(),
            });
        }
        if buf.is_empty() {
            return Ok(());
        }
        let chunks = self.recipe.chunks();
        let mut i = self.recipe.chunk_at(offset).unwrap_or(chunks.len());
        let mut pos = offset;
        let mut done = 0;
        while done < buf.len() {
            let c = &chunks[i];
            // The chunk's index entry; on a miss in the entry cache, with
            // those of its neighbours in the recipe, in one batch.
            let meta = match self.store.inner.meta_cache.get(&c.id) {
                Some(m) => m,
                None => {
                    let w = i / META_BATCH * META_BATCH;
                    let ids: Vec<ChunkId> = chunks[w..(w + META_BATCH).min(chunks.len())]
                        .iter()
                        .map(|c| c.id)
                        .collect();
                    self.store.prefetch_metas(&ids);
                    self.store
                        .chunk_meta(&c.id)?
                        .ok_or(StoreError::ChunkMissing(c.id))?
                }
            };
            let in_chunk = pos - c.offset;
            let n = ((u64::from(c.len) - in_chunk) as usize).min(buf.len() - done);
            self.store
                .read_chunk_range(&c.id, &meta, in_chunk, &mut buf[done..done + n])?;
            done += n;
            pos += n as u64;
            i += 1;
        }
        Ok(())
    }

    /// The object's chunks in order, each read whole and verified (the OCI
    /// blob path).
    pub fn chunks(&self) -> impl Iterator<Item = Result<Bytes>> + '_ {
        let verify = self.store.inner.cfg.verify_reads;
        self.recipe.chunks().iter().map(move |c| {
            let meta = self
                .store
                .chunk_meta(&c.id)?
                .ok_or(StoreError::ChunkMissing(c.id))?;
            self.store.read_chunk_with(&c.id, &meta, verify)
        })
    }

    /// Stream the object on a tokio runtime: chunks are read on a blocking
    /// thread, up to `readahead` ahead of the consumer.
    pub fn stream(self, readahead: usize) -> tokio::sync::mpsc::Receiver<Result<Bytes>> {
        let (tx, rx) = tokio::sync::mpsc::channel(readahead.max(1));
        tokio::task::spawn_blocking(move || {
            for c in self.chunks() {
                let stop = c.is_err();
                if tx.blocking_send(c).is_err() || stop {
                    break;
                }
            }
        });
        rx
    }

    /// A `std::io::Read` over the whole object.
    pub fn reader(&self) -> ObjectReader<'_> {
        ObjectReader {
            handle: self,
            pos: 0,
        }
    }
}

/// Sequential reader over an [`ObjectHandle`].
#[derive(Debug)]
pub struct ObjectReader<'a> {
    handle: &'a ObjectHandle,
    pos: u64,
}

impl std::io::Read for ObjectReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.handle.len() - self.pos;
        let n = (buf.len() as u64).min(left) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.handle
            .read_at(self.pos, &mut buf[..n])
            .map_err(std::io::Error::other)?;
        self.pos += n as u64;
        Ok(n)
    }
}
