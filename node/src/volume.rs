//! Writable volumes over NBD: copy-on-write block overlays over VM images.
//!
//! A volume's durable state is one chunk-store object, pinned under
//! `volume/<NAME>` ([`VOLUME_PREFIX`]): its recipe covers every byte of the
//! volume. A new volume's recipe is its base image's recipe (content-defined
//! chunks, shared with the image, nothing copied), padded with zero blocks
//! up to the volume's size; an empty volume is all zero blocks. A 64 KiB
//! zero block is one chunk however often it appears, so zeroes cost nothing.
//!
//! Writes land in memory first, whole blocks at a time (the block size is
//! fixed per volume, 64 KiB by default): the first write to a block reads
//! the block's current bytes, later writes patch them. A FLUSH (or a write
//! with FUA, or [`MAX_DIRTY_BYTES`] of dirty blocks) makes them durable:
//!
//! 1. every dirty block becomes a chunk of its own, block-aligned; where a
//!    block cuts through an older chunk (an image chunk, say), the older
//!    chunk's untouched remainder becomes a fragment chunk;
//! 2. those chunks are stored (segment data `fdatasync`ed, index entries in
//!    a synced RocksDB batch);
//! 3. the new recipe is stored and the `volume/<NAME>` pin moves to it in
//!    one synced batch.
//!
//! So a write acknowledged after a FLUSH, or sent with FUA, survives
//! `kill -9`; a crash between the steps leaves the previous state whole (the
//! orphan chunks go at the next GC). Chunks are content-addressed, so a
//! block written twice with the same bytes is stored once.
//!
//! A snapshot ([`Volumes::snapshot`]) flushes and then names and pins the
//! current recipe as a VM image: it is exported read-only as `image/<SNAP>`
//! and other sites pull it like any image. Two snapshots of one volume share
//! every chunk outside the blocks written between them, so shipping the
//! later one moves only those.
//!
//! Every connection to `volume/<NAME>` shares one [`Volume`] (one dirty map,
//! one lock), so a FLUSH on one connection covers writes from all of them
//! and the export advertises multi-conn.
//!
//! Known cost: a flush rewrites the whole recipe (about 36 bytes per 64 KiB
//! block, so 9 MiB for a 16 GiB volume), which is why volumes are capped at
//! [`MAX_VOLUME_BYTES`]. A write-ahead journal of block updates would make
//! flushes proportional to what changed.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Weak};
use std::time::Instant;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use cairn_chunkstore::{
    ChunkId, ObjectHandle, ObjectId, PutOptions, Recipe, Store, StoreError, VerifiedChunk,
};
use cairn_nbd::{BoxFuture, Export, ExportError, Extent};
use prometheus::{Histogram, HistogramOpts, IntCounter, IntGauge};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::vm::{self, VmError, VmImages};

/// Pin key prefix of a volume's current state: `volume/<NAME>`.
pub const VOLUME_PREFIX: &str = "volume/";
/// Name and pin prefix of a volume's metadata object: `volmeta/<NAME>`.
pub const META_PREFIX: &str = "volmeta/";
/// NBD export name prefix of volumes: `volume/<NAME>`.
pub const EXPORT_PREFIX: &str = "volume/";
/// Default block size: the copy-on-write unit.
pub const DEFAULT_BLOCK_SIZE: u32 = 64 << 10;
/// Smallest block size a volume may have.
pub const MIN_BLOCK_SIZE: u32 = 4 << 10;
/// Largest block size a volume may have.
pub const MAX_BLOCK_SIZE: u32 = 1 << 20;
/// Largest volume (a flush rewrites the recipe; see the module docs).
pub const MAX_VOLUME_BYTES: u64 = 16 << 30;
/// Dirty bytes held in memory per volume before a write flushes them.
pub const MAX_DIRTY_BYTES: usize = 64 << 20;
/// Longest fragment chunk cut from an older chunk's untouched remainder.
const MAX_FRAGMENT: usize = 256 << 10;

/// Why a volume operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// Not a valid volume name.
    #[error("invalid volume name {0:?}: 1 to 128 characters from A-Z a-z 0-9 . _ -, starting with a letter or digit")]
    BadName(String),
    /// No such volume.
    #[error("no such volume: {0}")]
    NotFound(String),
    /// A volume (or snapshot image) of that name exists.
    #[error("{0} already exists")]
    Exists(String),
    /// The size asked for cannot be used.
    #[error("bad volume size: {0}")]
    BadSize(String),
    /// The volume is exported to a client now.
    #[error("volume {0} is in use by an NBD client; disconnect it first")]
    Busy(String),
    /// The base image, or a demand fetch of its chunks, failed.
    #[error(transparent)]
    Image(#[from] VmError),
    /// The chunk store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Something that should not happen.
    #[error("internal: {0}")]
    Internal(String),
}

impl VolumeError {
    fn status(&self) -> StatusCode {
        match self {
            Self::BadName(_) | Self::BadSize(_) => StatusCode::BAD_REQUEST,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Exists(_) | Self::Busy(_) => StatusCode::CONFLICT,
            Self::Image(e) => e.status(),
            Self::Store(_) | Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for VolumeError {
    fn into_response(self) -> Response {
        vm::error_response(self.status(), &self)
    }
}

fn join_err(e: tokio::task::JoinError) -> VolumeError {
    VolumeError::Internal(e.to_string())
}

fn validate_name(name: &str) -> Result<(), VolumeError> {
    vm::validate_name(name).map_err(|_| VolumeError::BadName(name.chars().take(200).collect()))
}

/// What a volume is, stored as a small JSON object `volmeta/<NAME>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VolumeMeta {
    /// Volume name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Copy-on-write block size.
    pub block_size: u32,
    /// The image it was created from.
    pub base_image: Option<String>,
    /// That image's object id then.
    pub base_object: Option<String>,
    /// Creation time, seconds since the epoch.
    pub created: u64,
}

/// One volume, as listed.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeEntry {
    /// Volume name.
    pub name: String,
    /// NBD export name.
    pub export: String,
    /// Size in bytes.
    pub size: u64,
    /// Copy-on-write block size.
    pub block_size: u32,
    /// The image it was created from.
    pub base_image: Option<String>,
    /// The object holding its last flushed state.
    pub object: ObjectId,
    /// Chunks in that state's recipe.
    pub chunks: u64,
    /// Whether an NBD client has it open.
    pub open: bool,
    /// Written bytes not yet flushed (whole blocks).
    pub dirty_bytes: u64,
}

/// What a snapshot made.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotResult {
    /// The volume.
    pub volume: String,
    /// The new image's name.
    pub image: String,
    /// Its NBD export.
    pub export: String,
    /// Its object id.
    pub object: ObjectId,
    /// Size in bytes.
    pub size: u64,
    /// Chunks in its recipe.
    pub chunks: u64,
}

/// Volume metrics (`cairn_volume_*`).
#[derive(Debug, Clone)]
pub struct VolumeMetrics {
    writes: IntCounter,
    written_bytes: IntCounter,
    flushes: IntCounter,
    flush_seconds: Histogram,
    flushed_blocks: IntCounter,
    new_chunks: IntCounter,
    dirty_bytes: IntGauge,
}

impl VolumeMetrics {
    /// Create and register the metrics.
    pub fn new(registry: &prometheus::Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            writes: IntCounter::new(
                "cairn_volume_writes_total",
                "Writes, write-zeroes and trims applied to volumes.",
            )?,
            written_bytes: IntCounter::new(
                "cairn_volume_written_bytes_total",
                "Bytes written (or zeroed) on volumes.",
            )?,
            flushes: IntCounter::new(
                "cairn_volume_flushes_total",
                "Volume flushes that persisted dirty blocks.",
            )?,
            flush_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "cairn_volume_flush_seconds",
                    "Time to persist a volume's dirty blocks (chunks, recipe, pin).",
                )
                .buckets(vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ]),
            )?,
            flushed_blocks: IntCounter::new(
                "cairn_volume_flushed_blocks_total",
                "Dirty blocks persisted by flushes.",
            )?,
            new_chunks: IntCounter::new(
                "cairn_volume_new_chunks_total",
                "Chunks volume flushes added to the store (blocks and fragments not already there).",
            )?,
            dirty_bytes: IntGauge::new(
                "cairn_volume_dirty_bytes",
                "Written bytes held in memory, not yet flushed, over all volumes.",
            )?,
        };
        registry.register(Box::new(m.writes.clone()))?;
        registry.register(Box::new(m.written_bytes.clone()))?;
        registry.register(Box::new(m.flushes.clone()))?;
        registry.register(Box::new(m.flush_seconds.clone()))?;
        registry.register(Box::new(m.flushed_blocks.clone()))?;
        registry.register(Box::new(m.new_chunks.clone()))?;
        registry.register(Box::new(m.dirty_bytes.clone()))?;
        Ok(m)
    }
}

struct Inner {
    store: Arc<Store>,
    images: VmImages,
    metrics: VolumeMetrics,
    /// Open volumes: every export of one name shares one [`Volume`].
    open: parking_lot::Mutex<HashMap<String, Weak<Volume>>>,
    /// Serializes create, load, remove and snapshot naming.
    admin: tokio::sync::Mutex<()>,
}

/// The node's volumes; cheap to clone.
#[derive(Clone)]
pub struct Volumes {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Volumes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volumes")
            .field("open", &self.inner.open.lock().len())
            .finish()
    }
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn blocking<T, F>(f: F) -> Result<T, VolumeError>
where
    F: FnOnce() -> Result<T, VolumeError> + Send + 'static,
    T: Send + 'static,
{
    tokio::task::spawn_blocking(f).await.map_err(join_err)?
}

fn pin_key(name: &str) -> String {
    format!("{VOLUME_PREFIX}{name}")
}

fn meta_key(name: &str) -> String {
    format!("{META_PREFIX}{name}")
}

fn read_meta(store: &Store, name: &str) -> Result<VolumeMeta, VolumeError> {
    let id = match store.resolve(&meta_key(name)) {
        Ok(id) => id,
        Err(StoreError::NoSuchObject(_)) => return Err(VolumeError::NotFound(name.to_owned())),
        Err(e) => return Err(e.into()),
    };
    let h = store.open_object(&id)?;
    if h.len() > 64 << 10 {
        return Err(VolumeError::Internal(format!(
            "metadata of volume {name} is {} bytes",
            h.len()
        )));
    }
    let mut buf = vec![0u8; h.len() as usize];
    h.read_at(0, &mut buf)?;
    serde_json::from_slice(&buf)
        .map_err(|e| VolumeError::Internal(format!("metadata of volume {name}: {e}")))
}

impl Volumes {
    /// Volumes in `store`, over the images of `images`.
    pub fn new(store: Arc<Store>, images: VmImages, metrics: VolumeMetrics) -> Self {
        Self {
            inner: Arc::new(Inner {
                store,
                images,
                metrics,
                open: parking_lot::Mutex::new(HashMap::new()),
                admin: tokio::sync::Mutex::new(()),
            }),
        }
    }

    fn open_now(&self, name: &str) -> Option<Arc<Volume>> {
        self.inner.open.lock().get(name).and_then(Weak::upgrade)
    }

    /// Create volume `name`: a copy-on-write overlay of image `from`
    /// (`size` defaults to the image's and may only grow it), or, without
    /// `from`, `size` bytes of zeroes.
    ///
    /// `block_size` (default [`DEFAULT_BLOCK_SIZE`]) is the copy-on-write
    /// unit: a power of two from 4 KiB to 1 MiB. Small blocks make small
    /// random writes cheaper (a 4 KiB write dirties one block) at the price
    /// of a longer recipe, which a flush rewrites.
    pub async fn create(
        &self,
        name: &str,
        from: Option<&str>,
        size: Option<u64>,
        block_size: Option<u32>,
    ) -> Result<VolumeEntry, VolumeError> {
        validate_name(name)?;
        let block_size = block_size.unwrap_or(DEFAULT_BLOCK_SIZE);
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(VolumeError::BadSize(format!(
                "block size {block_size}: must be a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}"
            )));
        }
        let _admin = self.inner.admin.lock().await;
        let store = self.inner.store.clone();
        let pin = pin_key(name);
        let p = pin.clone();
        let s = store.clone();
        if blocking(move || Ok(s.pin_target(&p)?)).await?.is_some() {
            return Err(VolumeError::Exists(format!("volume {name}")));
        }
        let (mut recipe, base) = match from {
            Some(image) => {
                let id = self.inner.images.resolve(image).await?;
                let s = store.clone();
                let r = blocking(move || Ok(s.recipe(&id)?)).await?;
                ((*r).clone(), Some((image.to_owned(), id)))
            }
            None => (Recipe::new(), None),
        };
        let base_len = recipe.total_len();
        let size = match size {
            Some(s) => s,
            None if base.is_some() => base_len,
            None => {
                return Err(VolumeError::BadSize(
                    "an empty volume needs a size".to_owned(),
                ))
            }
        };
        if size == 0 || size % 512 != 0 {
            return Err(VolumeError::BadSize(format!(
                "{size} bytes: must be a positive multiple of 512"
            )));
        }
        if size > MAX_VOLUME_BYTES {
            return Err(VolumeError::BadSize(format!(
                "{size} bytes: the limit is {MAX_VOLUME_BYTES} bytes (16 GiB)"
            )));
        }
        if size < base_len {
            return Err(VolumeError::BadSize(format!(
                "{size} bytes is smaller than image {} ({base_len} bytes); volumes only grow",
                from.unwrap_or_default()
            )));
        }
        let bs = u64::from(block_size);
        let mut zeroes: HashMap<u64, VerifiedChunk> = HashMap::new();
        let mut pos = base_len;
        while pos < size {
            let next = ((pos / bs + 1) * bs).min(size);
            let len = next - pos;
            let z = zeroes
                .entry(len)
                .or_insert_with(|| VerifiedChunk::hash(Bytes::from(vec![0u8; len as usize])));
            recipe.push(*z.id(), len as u32);
            pos = next;
        }
        let meta = VolumeMeta {
            name: name.to_owned(),
            size,
            block_size,
            base_image: base.as_ref().map(|b| b.0.clone()),
            base_object: base.as_ref().map(|b| b.1.to_string()),
            created: now_secs(),
        };
        let json = serde_json::to_vec(&meta).map_err(|e| VolumeError::Internal(e.to_string()))?;
        let mkey = meta_key(name);
        let object = blocking(move || {
            let zs: Vec<VerifiedChunk> = zeroes.into_values().collect();
            store.put_chunks(&zs)?;
            // The metadata first: a volume is listed by its state pin, so
            // a crash before that pin leaves no half-made volume.
            let put = store.put_bytes(
                &json,
                &PutOptions {
                    name: Some(mkey.clone()),
                    pin: false,
                    ..Default::default()
                },
            )?;
            store.pin(&mkey, &put.object)?;
            Ok(store.put_recipe(&recipe, Some(&pin))?)
        })
        .await?;
        info!(volume = name, size, base = ?meta.base_image, object = %object.fmt_short(), "volume created");
        self.entry(name).await
    }

    /// Every volume, sorted by name.
    pub async fn list(&self) -> Result<Vec<VolumeEntry>, VolumeError> {
        let store = self.inner.store.clone();
        let names = blocking(move || {
            Ok(store
                .pins_with_prefix(VOLUME_PREFIX)?
                .into_iter()
                .map(|(k, _)| k[VOLUME_PREFIX.len()..].to_owned())
                .collect::<Vec<_>>())
        })
        .await?;
        let mut out = Vec::with_capacity(names.len());
        for n in names {
            match self.entry(&n).await {
                Ok(e) => out.push(e),
                Err(VolumeError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    async fn entry(&self, name: &str) -> Result<VolumeEntry, VolumeError> {
        let store = self.inner.store.clone();
        let n = name.to_owned();
        let (meta, object, chunks) = blocking(move || {
            let meta = read_meta(&store, &n)?;
            let object = store
                .pin_target(&pin_key(&n))?
                .ok_or_else(|| VolumeError::NotFound(n.clone()))?;
            let chunks = store.recipe(&object)?.chunks().len() as u64;
            Ok((meta, object, chunks))
        })
        .await?;
        let open = self.open_now(name);
        let (object, chunks, dirty) = match &open {
            Some(v) => {
                let st = v.state.read().await;
                (
                    st.handle.id(),
                    st.handle.recipe().chunks().len() as u64,
                    st.dirty_bytes as u64,
                )
            }
            None => (object, chunks, 0),
        };
        Ok(VolumeEntry {
            name: name.to_owned(),
            export: format!("{EXPORT_PREFIX}{name}"),
            size: meta.size,
            block_size: meta.block_size,
            base_image: meta.base_image,
            object,
            chunks,
            open: open.is_some_and(|v| Arc::strong_count(&v) > 1),
            dirty_bytes: dirty,
        })
    }

    /// The open volume `name`, loading it if no connection has it.
    pub async fn open(&self, name: &str) -> Result<Arc<Volume>, VolumeError> {
        validate_name(name)?;
        if let Some(v) = self.open_now(name) {
            return Ok(v);
        }
        let _admin = self.inner.admin.lock().await;
        if let Some(v) = self.open_now(name) {
            return Ok(v);
        }
        let store = self.inner.store.clone();
        let n = name.to_owned();
        let (meta, handle) = blocking(move || {
            let meta = read_meta(&store, &n)?;
            let object = store
                .pin_target(&pin_key(&n))?
                .ok_or_else(|| VolumeError::NotFound(n.clone()))?;
            let handle = store.open_object(&object)?;
            if handle.len() != meta.size {
                return Err(VolumeError::Internal(format!(
                    "volume {n}: state object {} holds {} bytes, metadata says {}",
                    object.fmt_short(),
                    handle.len(),
                    meta.size
                )));
            }
            Ok((meta, handle))
        })
        .await?;
        if meta.block_size == 0 || meta.block_size > 4 << 20 {
            return Err(VolumeError::Internal(format!(
                "volume {name}: block size {} in its metadata",
                meta.block_size
            )));
        }
        let handle = Arc::new(handle);
        let v = Arc::new(Volume {
            trace: crate::trace::TraceRecorder::new(handle.recipe().chunks().len()),
            traced: handle.clone(),
            label: format!("{EXPORT_PREFIX}{name}"),
            name: name.to_owned(),
            meta,
            store: self.inner.store.clone(),
            images: self.inner.images.clone(),
            metrics: self.inner.metrics.clone(),
            state: tokio::sync::RwLock::new(VolState {
                handle,
                dirty: BTreeMap::new(),
                dirty_bytes: 0,
            }),
        });
        self.inner
            .open
            .lock()
            .insert(name.to_owned(), Arc::downgrade(&v));
        debug!(volume = name, "volume opened");
        Ok(v)
    }

    /// Remove volume `name` (space comes back at the next GC). Refused
    /// while a client has it open.
    pub async fn remove(&self, name: &str) -> Result<(), VolumeError> {
        validate_name(name)?;
        let _admin = self.inner.admin.lock().await;
        if self.open_now(name).is_some() {
            return Err(VolumeError::Busy(name.to_owned()));
        }
        let store = self.inner.store.clone();
        let n = name.to_owned();
        blocking(move || {
            match store.remove(&pin_key(&n)) {
                Ok(_) => {}
                Err(StoreError::NoSuchObject(_)) => return Err(VolumeError::NotFound(n)),
                Err(e) => return Err(e.into()),
            }
            match store.remove(&meta_key(&n)) {
                Ok(_) | Err(StoreError::NoSuchObject(_)) => Ok(()),
                Err(e) => Err(e.into()),
            }
        })
        .await?;
        self.inner.open.lock().remove(name);
        info!(volume = name, "volume removed");
        Ok(())
    }

    /// Flush volume `name` and name its state as the VM image `image`
    /// (exported read-only as `image/<IMAGE>`, pullable by other sites).
    pub async fn snapshot(&self, name: &str, image: &str) -> Result<SnapshotResult, VolumeError> {
        validate_name(name)?;
        vm::validate_name(image)?;
        let v = self.open(name).await?;
        let object = {
            let mut st = v.state.write().await;
            v.flush_locked(&mut st).await?;
            st.handle.id()
        };
        let size = v.meta.size;
        drop(v);
        let _admin = self.inner.admin.lock().await;
        let store = self.inner.store.clone();
        let key = vm::store_name(image);
        let img = image.to_owned();
        let images = self.inner.images.clone();
        let chunks = blocking(move || {
            match store.resolve(&key) {
                Ok(_) => return Err(VolumeError::Exists(format!("image {img}"))),
                Err(StoreError::NoSuchObject(_)) => {}
                Err(e) => return Err(e.into()),
            }
            store.set_name(&key, &object)?;
            store.pin(&key, &object)?;
            images.announce(&img, &object);
            Ok(store.recipe(&object)?.chunks().len() as u64)
        })
        .await?;
        info!(volume = name, image, object = %object.fmt_short(), "volume snapshot");
        Ok(SnapshotResult {
            volume: name.to_owned(),
            image: image.to_owned(),
            export: format!("{}{image}", vm::EXPORT_PREFIX),
            object,
            size,
            chunks,
        })
    }

    /// Flush every open volume (at shutdown).
    pub async fn flush_all(&self) {
        let open: Vec<Arc<Volume>> = self
            .inner
            .open
            .lock()
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        for v in open {
            let mut st = v.state.write().await;
            if let Err(e) = v.flush_locked(&mut st).await {
                warn!(volume = %v.name, error = %e, "flush at shutdown failed");
            }
        }
    }
}

struct VolState {
    /// The last flushed state.
    handle: Arc<ObjectHandle>,
    /// Written blocks not yet flushed, by block number.
    dirty: BTreeMap<u64, Block>,
    /// Bytes held by `Block::Data` entries.
    dirty_bytes: usize,
}

/// A written, unflushed block.
enum Block {
    /// The whole block (the last block of the volume may be short).
    Data(Vec<u8>),
    /// All zeroes (write-zeroes or trim of the whole block): no memory, so a
    /// trim of the whole volume costs a map entry per block.
    Zero,
}

/// One open volume, shared by every connection that exports it.
pub struct Volume {
    name: String,
    label: String,
    meta: VolumeMeta,
    store: Arc<Store>,
    images: VmImages,
    metrics: VolumeMetrics,
    state: tokio::sync::RwLock<VolState>,
    /// First touches of reads, against the state the volume was opened at
    /// (stored with that object when the volume closes).
    trace: crate::trace::TraceRecorder,
    traced: Arc<ObjectHandle>,
}

impl std::fmt::Debug for Volume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Volume")
            .field("name", &self.name)
            .field("size", &self.meta.size)
            .finish()
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        // Unflushed writes are lost when the last client goes without a
        // FLUSH, as on a disk that loses power; say so.
        let st = self.state.get_mut();
        if st.dirty_bytes > 0 {
            warn!(volume = %self.name, dirty_bytes = st.dirty_bytes, "volume closed with unflushed writes; they are dropped");
            self.metrics.dirty_bytes.sub(st.dirty_bytes as i64);
        }
        crate::trace::save_on_close(self.store.clone(), self.traced.id(), self.trace.entries());
    }
}

/// What a write puts in the range.
#[derive(Clone, Copy)]
enum Source<'a> {
    Data(&'a [u8]),
    Zeroes,
}

impl Volume {
    fn block_range(&self, b: u64) -> (u64, u64) {
        let bs = u64::from(self.meta.block_size);
        let s = b * bs;
        (s, (s + bs).min(self.meta.size))
    }

    async fn read_inner(&self, offset: u64, buf: &mut [u8]) -> Result<(), VolumeError> {
        self.trace
            .record(self.traced.recipe(), offset, buf.len() as u64);
        let st = self.state.read().await;
        let bs = u64::from(self.meta.block_size);
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let b = pos / bs;
            let (s, e) = self.block_range(b);
            let take = e.min(end);
            let at = (pos - offset) as usize..(take - offset) as usize;
            if let Some(blk) = st.dirty.get(&b) {
                match blk {
                    Block::Data(d) => {
                        buf[at].copy_from_slice(&d[(pos - s) as usize..(take - s) as usize]);
                    }
                    Block::Zero => buf[at].fill(0),
                }
                pos = take;
                continue;
            }
            // A run of clean blocks: one read of the flushed state.
            let mut run_end = take;
            while run_end < end && !st.dirty.contains_key(&(run_end / bs)) {
                run_end = self.block_range(run_end / bs).1.min(end);
            }
            let at = (pos - offset) as usize..(run_end - offset) as usize;
            self.images
                .read_object(&self.label, &st.handle, pos, &mut buf[at])
                .await?;
            pos = run_end;
        }
        Ok(())
    }

    async fn write_inner(
        &self,
        offset: u64,
        len: u64,
        src: Source<'_>,
        fua: bool,
    ) -> Result<(), VolumeError> {
        let mut st = self.state.write().await;
        let bs = u64::from(self.meta.block_size);
        let end = offset + len;
        let handle = st.handle.clone();
        let mut pos = offset;
        let (mut added, mut freed) = (0usize, 0usize);
        while pos < end {
            let b = pos / bs;
            let (s, e) = self.block_range(b);
            let take = e.min(end);
            let whole = pos == s && take == e;
            if whole && matches!(src, Source::Zeroes) {
                if let Some(Block::Data(d)) = st.dirty.insert(b, Block::Zero) {
                    freed += d.len();
                }
                pos = take;
                continue;
            }
            let entry = match st.dirty.entry(b) {
                std::collections::btree_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::btree_map::Entry::Vacant(v) => {
                    let mut blk = vec![0u8; (e - s) as usize];
                    if !whole {
                        // Partly written: start from its current bytes.
                        self.images
                            .read_object(&self.label, &handle, s, &mut blk)
                            .await?;
                    }
                    added += blk.len();
                    v.insert(Block::Data(blk))
                }
            };
            if matches!(entry, Block::Zero) {
                added += (e - s) as usize;
                *entry = Block::Data(vec![0u8; (e - s) as usize]);
            }
            let Block::Data(block) = entry else {
                return Err(VolumeError::Internal("block is not data".into()));
            };
            let at = (pos - s) as usize..(take - s) as usize;
            match src {
                Source::Data(d) => {
                    block[at].copy_from_slice(&d[(pos - offset) as usize..(take - offset) as usize])
                }
                Source::Zeroes => block[at].fill(0),
            }
            pos = take;
        }
        st.dirty_bytes = st.dirty_bytes + added - freed;
        self.metrics.dirty_bytes.add(added as i64 - freed as i64);
        self.metrics.writes.inc();
        self.metrics.written_bytes.inc_by(len);
        if fua || st.dirty_bytes > MAX_DIRTY_BYTES {
            self.flush_locked(&mut st).await?;
        }
        Ok(())
    }

    /// Persist the dirty blocks: chunks, then the new recipe and its pin
    /// (see the module docs). Holding the state lock keeps reads and writes
    /// out meanwhile.
    async fn flush_locked(&self, st: &mut VolState) -> Result<(), VolumeError> {
        if st.dirty.is_empty() {
            return Ok(());
        }
        let t = Instant::now();
        let handle = st.handle.clone();
        let old = handle.recipe();
        let chunks = old.chunks();
        let blocks: Vec<(u64, u64, Option<&[u8]>)> = st
            .dirty
            .iter()
            .map(|(b, d)| {
                let (s, e) = self.block_range(*b);
                let data = match d {
                    Block::Data(v) => Some(v.as_slice()),
                    Block::Zero => None,
                };
                (s, e, data)
            })
            .collect();
        let mut zeroes: HashMap<u64, ChunkId> = HashMap::new();
        let mut recipe = Recipe::new();
        let mut pieces: Vec<VerifiedChunk> = Vec::new();
        let mut zero_pieces: Vec<VerifiedChunk> = Vec::new();
        let mut emit = |recipe: &mut Recipe, data: &[u8]| {
            for part in data.chunks(MAX_FRAGMENT) {
                let c = VerifiedChunk::hash(Bytes::copy_from_slice(part));
                recipe.push(*c.id(), part.len() as u32);
                pieces.push(c);
            }
        };
        let (mut i, mut d) = (0usize, 0usize);
        while let Some(c) = chunks.get(i) {
            let (cs, ce) = (c.offset, c.offset + u64::from(c.len));
            if blocks.get(d).map_or(true, |b| b.0 >= ce) {
                recipe.push(c.id, c.len);
                i += 1;
                continue;
            }
            // A run of old chunks [a, run_end) that dirty blocks d..k touch;
            // each block lies wholly inside it.
            let a = cs;
            let (mut j, mut run_end, mut k) = (i, ce, d);
            while let Some(&(bs, be, _)) = blocks.get(k) {
                if bs >= run_end {
                    break;
                }
                while run_end < be {
                    j += 1;
                    let next = chunks.get(j).ok_or_else(|| {
                        VolumeError::Internal(format!(
                            "volume {}: block at {bs} runs past the recipe",
                            self.name
                        ))
                    })?;
                    run_end += u64::from(next.len);
                }
                k += 1;
            }
            let run = &blocks[d..k];
            let covered: u64 = run.iter().map(|b| b.1 - b.0).sum();
            let mut bytes = vec![0u8; (run_end - a) as usize];
            if covered < run_end - a {
                // Untouched bytes of the old chunks stay: read them.
                self.images
                    .read_object(&self.label, &handle, a, &mut bytes)
                    .await?;
            }
            let mut cursor = a;
            for &(bs, be, data) in run {
                if bs > cursor {
                    emit(
                        &mut recipe,
                        &bytes[(cursor - a) as usize..(bs - a) as usize],
                    );
                }
                match data {
                    Some(data) => emit(&mut recipe, data),
                    None => {
                        let len = be - bs;
                        let id = match zeroes.get(&len) {
                            Some(id) => *id,
                            None => {
                                let z = VerifiedChunk::hash(Bytes::from(vec![0u8; len as usize]));
                                let id = *z.id();
                                zeroes.insert(len, id);
                                zero_pieces.push(z);
                                id
                            }
                        };
                        recipe.push(id, len as u32);
                    }
                }
                cursor = be;
            }
            if cursor < run_end {
                emit(&mut recipe, &bytes[(cursor - a) as usize..]);
            }
            i = j + 1;
            d = k;
        }
        if recipe.total_len() != old.total_len() || d != blocks.len() {
            return Err(VolumeError::Internal(format!(
                "volume {}: flush built {} bytes for {} (blocks placed {d} of {})",
                self.name,
                recipe.total_len(),
                old.total_len(),
                blocks.len()
            )));
        }
        let nblocks = blocks.len();
        pieces.extend(zero_pieces);
        let store = self.store.clone();
        let pin = pin_key(&self.name);
        let (new_handle, new_chunks) = blocking(move || {
            let r = store.put_chunks(&pieces)?;
            store.put_recipe(&recipe, Some(&pin))?;
            let h = store.open_object(&recipe.object_id())?;
            Ok((h, r.new_chunks))
        })
        .await?;
        st.handle = Arc::new(new_handle);
        self.metrics.dirty_bytes.sub(st.dirty_bytes as i64);
        st.dirty.clear();
        st.dirty_bytes = 0;
        let m = &self.metrics;
        m.flushes.inc();
        m.flushed_blocks.inc_by(nblocks as u64);
        m.new_chunks.inc_by(new_chunks);
        m.flush_seconds.observe(t.elapsed().as_secs_f64());
        debug!(volume = %self.name, blocks = nblocks, new_chunks, object = %st.handle.id().fmt_short(), "volume flushed");
        Ok(())
    }

    fn fail(&self, what: &str, offset: u64, len: u64, e: VolumeError) -> ExportError {
        warn!(volume = %self.name, what, offset, len, error = %e, "volume request failed");
        match e {
            VolumeError::Store(StoreError::Io { source, .. }) => ExportError::from(source),
            e => ExportError::io(e.to_string()),
        }
    }
}

impl Export for Volume {
    fn size(&self) -> u64 {
        self.meta.size
    }

    fn read_only(&self) -> bool {
        false
    }

    fn can_multi_conn(&self) -> bool {
        // One shared Volume per name: a flush covers every connection.
        true
    }

    fn description(&self) -> Option<String> {
        Some(match &self.meta.base_image {
            Some(b) => format!("cairn volume {} (over image {b})", self.name),
            None => format!("cairn volume {}", self.name),
        })
    }

    fn read<'a>(
        &'a self,
        offset: u64,
        buf: &'a mut [u8],
    ) -> BoxFuture<'a, Result<(), ExportError>> {
        Box::pin(async move {
            let len = buf.len() as u64;
            self.read_inner(offset, buf)
                .await
                .map_err(|e| self.fail("read", offset, len, e))
        })
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> BoxFuture<'_, Result<(), ExportError>> {
        Box::pin(async move {
            let len = data.len() as u64;
            self.write_inner(offset, len, Source::Data(&data), fua)
                .await
                .map_err(|e| self.fail("write", offset, len, e))
        })
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), ExportError>> {
        Box::pin(async move {
            let mut st = self.state.write().await;
            self.flush_locked(&mut st)
                .await
                .map_err(|e| self.fail("flush", 0, 0, e))
        })
    }

    fn trim(&self, offset: u64, len: u32, fua: bool) -> BoxFuture<'_, Result<(), ExportError>> {
        // Trimmed bytes read back as zeroes, and zero blocks are free.
        self.write_zeroes(offset, len, fua, false)
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
        _no_hole: bool,
    ) -> BoxFuture<'_, Result<(), ExportError>> {
        Box::pin(async move {
            let len = u64::from(len);
            self.write_inner(offset, len, Source::Zeroes, fua)
                .await
                .map_err(|e| self.fail("write_zeroes", offset, len, e))
        })
    }

    fn block_status(
        &self,
        offset: u64,
        len: u32,
    ) -> BoxFuture<'_, Result<Vec<Extent>, ExportError>> {
        Box::pin(async move {
            let st = self.state.read().await;
            let bs = u64::from(self.meta.block_size);
            // Zeroed blocks report what the old chunk under them says: a
            // hole if it was zeroes too, else data (always a correct answer).
            let dirty = |s: u64, e: u64| {
                st.dirty
                    .range(s / bs..e.div_ceil(bs))
                    .any(|(_, b)| matches!(b, Block::Data(_)))
            };
            Ok(vm::extents(st.handle.recipe(), offset, len, dirty))
        })
    }
}

// ----- admin API -----

#[derive(Debug, Deserialize)]
struct CreateBody {
    name: String,
    from: Option<String>,
    size: Option<u64>,
    block_size: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct SnapshotBody {
    image: String,
}

/// The admin API routes for volumes: `GET/POST /api/v1/volumes`,
/// `DELETE /api/v1/volumes/NAME`, `POST /api/v1/volumes/NAME/snapshot`.
pub fn routes(volumes: Volumes) -> Router {
    Router::new()
        .route("/api/v1/volumes", get(list_handler).post(create_handler))
        .route(
            "/api/v1/volumes/{name}",
            axum::routing::delete(delete_handler),
        )
        .route("/api/v1/volumes/{name}/snapshot", post(snapshot_handler))
        .with_state(volumes)
}

async fn list_handler(State(v): State<Volumes>) -> Result<Response, VolumeError> {
    Ok(Json(serde_json::json!({ "volumes": v.list().await? })).into_response())
}

async fn create_handler(
    State(v): State<Volumes>,
    Json(b): Json<CreateBody>,
) -> Result<Response, VolumeError> {
    let e = v
        .create(&b.name, b.from.as_deref(), b.size, b.block_size)
        .await?;
    Ok((StatusCode::CREATED, Json(e)).into_response())
}

async fn delete_handler(
    State(v): State<Volumes>,
    Path(name): Path<String>,
) -> Result<Response, VolumeError> {
    v.remove(&name).await?;
    Ok(Json(serde_json::json!({ "removed": name })).into_response())
}

async fn snapshot_handler(
    State(v): State<Volumes>,
    Path(name): Path<String>,
    Json(b): Json<SnapshotBody>,
) -> Result<Response, VolumeError> {
    let r = v.snapshot(&name, &b.image).await?;
    Ok((StatusCode::CREATED, Json(r)).into_response())
}
