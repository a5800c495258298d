//! Ingest: a byte stream in, a durable object out.
//!
//! Three threads run as a pipeline so hashing, chunking and writing overlap
//! on our two cores:
//! - the caller's thread reads, cuts chunks (FastCDC) and hashes each chunk
//!   (BLAKE3), and checks which chunks are new;
//! - a digest thread computes the whole-object sha256 (and sha512 on
//!   request) and BLAKE3 over the same buffers, shared by reference count;
//! - a writer thread optionally compresses new chunks and appends them to the
//!   active segment, starting writeback early so the final `fdatasync` has
//!   little left to do.
//!
//! Commit order (invariant 2 of DESIGN.md): segment data is `fdatasync`ed,
//! then one synced RocksDB batch adds the chunk entries, the recipe, the
//! object info, digests, name and pin. A crash before the batch leaves only
//! unreferenced segment bytes; a crash after it leaves a complete object.

use std::collections::HashSet;
use std::io::Read;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use bytes::{Bytes, BytesMut};
use crossbeam_channel::{bounded, Receiver, Sender};
use rocksdb::WriteBatch;
use sha2::Digest;

use crate::chunker::Chunker;
use crate::compress::{self, CompressProbe};
use crate::error::{IoContext, Result, StoreError};
use crate::index::{self, ChunkMeta, Location, NameEntry, ObjectInfo};
use crate::recipe::Recipe;
use crate::segment::{self, ActiveSegment, Segment};
use crate::store::{now_ms, sync_write, InUse, Inner, Store};
use crate::{ChunkId, ObjectId};

/// Read buffer size for ingest.
const BLOCK: usize = 1 << 20;
/// Ask the kernel to start writeback every this many bytes.
const WRITEBACK_EVERY: u64 = 32 << 20;

/// Options for one put.
#[derive(Debug, Clone)]
pub struct PutOptions {
    /// Point this name at the object.
    pub name: Option<String>,
    /// Pin the object (key `obj:<id>`) so GC and eviction keep it. Default on.
    pub pin: bool,
    /// Also compute sha512.
    pub sha512: bool,
    /// Bytes consumed so far, for progress bars.
    pub progress: Option<Arc<AtomicU64>>,
    /// Override the store's chunker for this object.
    pub chunker: Option<crate::ChunkerConfig>,
}

impl Default for PutOptions {
    fn default() -> Self {
        Self {
            name: None,
            pin: true,
            sha512: false,
            progress: None,
            chunker: None,
        }
    }
}

/// What a put did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PutResult {
    /// The object id.
    pub object: ObjectId,
    /// Object length.
    pub len: u64,
    /// Chunks in the recipe.
    pub chunks: u64,
    /// Chunks that were not in the store before.
    pub new_chunks: u64,
    /// Uncompressed bytes of those new chunks.
    pub new_bytes: u64,
    /// Bytes this put added on disk (after compression).
    pub stored_bytes: u64,
    /// sha256 of the object, hex.
    pub sha256: String,
    /// sha512 of the object, hex, when asked for.
    pub sha512: Option<String>,
    /// BLAKE3 of the object bytes, hex.
    pub blake3: String,
}

impl PutResult {
    /// Fraction of the object's bytes that did not need storing (0..=1).
    pub fn dedup_saving(&self) -> f64 {
        if self.len == 0 {
            0.0
        } else {
            1.0 - self.new_bytes as f64 / self.len as f64
        }
    }
}

struct Digests {
    sha256: String,
    sha512: Option<String>,
    blake3: String,
}

fn spawn_digests(rx: Receiver<Bytes>, sha512: bool) -> JoinHandle<Digests> {
    std::thread::Builder::new()
        .name("cairn-digest".into())
        .spawn(move || {
            let mut s256 = sha2::Sha256::new();
            let mut s512 = sha512.then(sha2::Sha512::new);
            let mut b3 = blake3::Hasher::new();
            for block in rx {
                s256.update(&block);
                if let Some(h) = s512.as_mut() {
                    h.update(&block);
                }
                b3.update(&block);
            }
            Digests {
                sha256: hex::encode(s256.finalize()),
                sha512: s512.map(|h| hex::encode(h.finalize())),
                blake3: b3.finalize().to_hex().to_string(),
            }
        })
        .unwrap_or_else(|e| spawn_failed(e))
}

#[cold]
fn spawn_failed(e: std::io::Error) -> ! {
    // Thread creation fails only when the process is out of resources.
    panic!("cannot spawn an ingest thread: {e}")
}

struct Written {
    metas: Vec<(ChunkId, ChunkMeta)>,
    stored: u64,
    _segs: SegWriters,
}

/// Marks segments as holding uncommitted chunks until dropped (after commit).
pub(crate) type SegWriters = crate::store::Held<u32>;

pub(crate) fn seg_writers(inner: &Arc<Inner>) -> SegWriters {
    SegWriters::new(inner, |i| &i.seg_writers)
}

fn spawn_writer(inner: Arc<Inner>, rx: Receiver<(ChunkId, Bytes)>) -> JoinHandle<Result<Written>> {
    std::thread::Builder::new()
        .name("cairn-writer".into())
        .spawn(move || {
            let mut metas = Vec::new();
            let mut touched: Vec<Arc<Segment>> = Vec::new();
            let mut seg_guard = seg_writers(&inner);
            let mut stored = 0u64;
            let mut since_writeback = 0u64;
            // One probe per ingest: this object's bytes decide.
            let probe = CompressProbe::new();
            for (id, data) in rx {
                let (meta, payload_len) = append_chunk(
                    &inner,
                    &mut touched,
                    &mut seg_guard,
                    &id,
                    &data,
                    None,
                    &probe,
                )?;
                stored += payload_len;
                since_writeback += payload_len;
                if since_writeback >= WRITEBACK_EVERY {
                    since_writeback = 0;
                    if let Some(s) = touched.last() {
                        start_writeback(&s.file);
                    }
                }
                metas.push((id, meta));
            }
            sync_segments(&inner, &touched)?;
            Ok(Written {
                metas,
                stored,
                _segs: seg_guard,
            })
        })
        .unwrap_or_else(|e| spawn_failed(e))
}

/// Append one chunk (compressed when that pays) to the active segment,
/// rolling to a new segment when full. The segment is registered in
/// `seg_guard` so compaction leaves it alone until the caller commits.
/// Returns the chunk's index entry and the payload bytes written.
pub(crate) fn append_chunk(
    inner: &Arc<Inner>,
    touched: &mut Vec<Arc<Segment>>,
    seg_guard: &mut SegWriters,
    id: &ChunkId,
    data: &[u8],
    zstd_form: Option<&[u8]>,
    probe: &CompressProbe,
) -> Result<(ChunkMeta, u64)> {
    let engine = inner.engine.as_ref();
    // A frame the chunk arrived in is kept as it is (it was checked to
    // decompress to `data`); otherwise the probe decides whether to try.
    let fresh;
    let compressed: Option<&[u8]> = if !inner.cfg.compress {
        None
    } else if let Some(z) = zstd_form.filter(|z| compress::pays(z.len(), data.len())) {
        Some(z)
    } else {
        fresh = probe.compress(data);
        fresh.as_deref()
    };
    let (payload, flags): (&[u8], u8) = match compressed {
        Some(c) => (c, segment::FLAG_ZSTD),
        None => (data, 0),
    };
    let header = segment::encode_header(id, flags, data.len() as u32, payload.len() as u32);
    let (seg_no, offset) = {
        let mut active = inner.active.lock();
        if active.len + (segment::HEADER_LEN + payload.len()) as u64 > inner.cfg.segment_bytes
            && active.len > 0
        {
            roll(inner, &mut active)?;
        }
        let off = active.append(engine, &header, payload)?;
        if !touched.iter().any(|s| Arc::ptr_eq(s, &active.seg)) {
            // Registered under the active lock, while this is still the
            // active segment, so compaction sees it.
            seg_guard.add(active.seg.no);
            touched.push(active.seg.clone());
        }
        (active.seg.no, off)
    };
    inner
        .metrics
        .segment_bytes
        .add((segment::HEADER_LEN + payload.len()) as i64);
    let meta = ChunkMeta {
        raw_len: data.len() as u32,
        compressed: compressed.is_some(),
        loc: Location::Segment {
            seg: seg_no,
            offset,
            stored_len: payload.len() as u32,
        },
    };
    Ok((meta, payload.len() as u64))
}

/// Flush the active segment and fdatasync every segment in `touched`.
pub(crate) fn sync_segments(inner: &Inner, touched: &[Arc<Segment>]) -> Result<()> {
    let engine = inner.engine.as_ref();
    inner.active.lock().flush(engine)?;
    for s in touched {
        engine
            .sync_data(&s.file)
            .ctx(|| format!("fdatasync {}", s.path.display()))?;
    }
    Ok(())
}

/// Start (not wait for) writeback of a file's dirty pages, so that the
/// commit's fdatasync overlaps with hashing instead of following it.
fn start_writeback(file: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: plain syscall on a valid fd; no memory is passed.
    unsafe {
        libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

pub(crate) fn roll(inner: &Inner, active: &mut ActiveSegment) -> Result<()> {
    active.flush(inner.engine.as_ref())?;
    let next = inner.segs.read().keys().next_back().map_or(0, |n| n + 1);
    let seg = Arc::new(Segment::create(&inner.seg_dir, next)?);
    inner.segs.write().insert(next, seg.clone());
    *active = ActiveSegment::new(seg, 0);
    Ok(())
}

impl Store {
    /// Ingest everything `reader` yields as one object. Blocks; run it on a
    /// blocking thread in async code, or use [`Store::put_async`].
    pub fn put_reader<R: Read>(&self, mut reader: R, opts: &PutOptions) -> Result<PutResult> {
        if let Some(n) = &opts.name {
            index::validate_name(n)?;
        }
        let chunker_cfg = opts.chunker.unwrap_or(self.inner.cfg.chunker);
        let mut chunker =
            Chunker::new(chunker_cfg).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let (dtx, drx) = bounded::<Bytes>(16);
        let (wtx, wrx) = bounded::<(ChunkId, Bytes)>(64);
        let digests = spawn_digests(drx, opts.sha512);
        let writer = spawn_writer(self.inner.clone(), wrx);

        let mut state = Chunking {
            store: self,
            recipe: Recipe::new(),
            guard: InUse::chunks(&self.inner),
            seen: HashSet::new(),
            inline: Vec::new(),
            new_bytes: 0,
            wtx: Some(wtx),
        };
        let fed = (|| -> Result<()> {
            loop {
                let mut buf = BytesMut::zeroed(BLOCK);
                let mut filled = 0;
                while filled < BLOCK {
                    match reader.read(&mut buf[filled..]) {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            return Err(StoreError::Io {
                                what: "read input".into(),
                                source: e,
                            })
                        }
                    }
                }
                if filled == 0 {
                    break;
                }
                buf.truncate(filled);
                let block = buf.freeze();
                if let Some(p) = &opts.progress {
                    p.fetch_add(filled as u64, Ordering::Relaxed);
                }
                chunker.push(&block);
                // The digest thread only stops early if it panicked.
                let _ = dtx.send(block);
                while let Some(ch) = chunker.next_chunk() {
                    state.chunk(ch)?;
                }
                if filled < BLOCK {
                    break;
                }
            }
            chunker.finish();
            while let Some(ch) = chunker.next_chunk() {
                state.chunk(ch)?;
            }
            Ok(())
        })();
        drop(dtx);
        state.wtx = None;
        let written = writer
            .join()
            .unwrap_or_else(|_| Err(StoreError::Invalid("writer thread panicked".into())));
        let digests = digests
            .join()
            .map_err(|_| StoreError::Invalid("digest thread panicked".into()))?;
        fed?;
        let written = written?;
        self.commit(state, written, digests, opts)
    }

    /// Ingest an in-memory buffer.
    pub fn put_bytes(&self, data: &[u8], opts: &PutOptions) -> Result<PutResult> {
        self.put_reader(data, opts)
    }

    /// Ingest from an async reader. Reading happens on the caller's task;
    /// chunking, hashing and writing on blocking threads. If the future is
    /// dropped or the reader fails, nothing is committed.
    pub async fn put_async<R>(&self, mut reader: R, opts: PutOptions) -> Result<PutResult>
    where
        R: tokio::io::AsyncRead + Unpin,
    {
        use tokio::io::AsyncReadExt;
        let (tx, rx) = tokio::sync::mpsc::channel::<Feed>(8);
        let store = self.clone();
        let task = tokio::task::spawn_blocking(move || {
            store.put_reader(
                ChannelReader {
                    rx,
                    cur: Bytes::new(),
                    done: false,
                },
                &opts,
            )
        });
        let mut read_err = None;
        loop {
            let mut buf = BytesMut::with_capacity(BLOCK);
            let r = loop {
                match reader.read_buf(&mut buf).await {
                    Ok(0) => break Ok(()),
                    Ok(_) if buf.len() >= BLOCK => break Ok(()),
                    Ok(_) => {}
                    Err(e) => break Err(e),
                }
            };
            let last = buf.len() < BLOCK;
            if !buf.is_empty() && tx.send(Feed::Data(buf.freeze())).await.is_err() {
                break; // The ingest failed; its error is reported below.
            }
            match r {
                Err(e) => {
                    let msg = e.to_string();
                    read_err = Some(e);
                    let _ = tx.send(Feed::Fail(msg)).await;
                    break;
                }
                Ok(()) if last => {
                    let _ = tx.send(Feed::End).await;
                    break;
                }
                Ok(()) => {}
            }
        }
        drop(tx);
        let res = task
            .await
            .map_err(|e| StoreError::Invalid(format!("ingest task failed: {e}")))?;
        if let Some(e) = read_err {
            return Err(StoreError::Io {
                what: "read input".into(),
                source: e,
            });
        }
        res
    }

    fn commit(
        &self,
        state: Chunking<'_>,
        written: Written,
        d: Digests,
        opts: &PutOptions,
    ) -> Result<PutResult> {
        let Chunking {
            recipe,
            guard,
            inline,
            new_bytes,
            ..
        } = state;
        let seg_guard = written._segs;
        let object = recipe.object_id();
        let len = recipe.total_len();
        let db = &self.inner.db;
        let mut batch = WriteBatch::default();
        let mut stored = written.stored;
        let mut new_metas = written.metas;
        for (id, data) in inline {
            stored += data.len() as u64;
            new_metas.push((
                id,
                ChunkMeta {
                    raw_len: data.len() as u32,
                    compressed: false,
                    loc: Location::Inline(data),
                },
            ));
        }
        for (id, m) in &new_metas {
            batch.put_cf(self.cf(index::CF_CHUNKS), id.as_bytes(), m.encode());
        }
        let info = ObjectInfo {
            len,
            chunks: recipe.chunks().len() as u64,
            sha256: d.sha256.clone(),
            sha512: d.sha512.clone(),
            blake3: d.blake3.clone(),
            created: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|t| t.as_secs())
                .unwrap_or(0),
        };
        let _c = self.inner.commit_lock.read();
        let existed = db
            .get_pinned_cf(self.cf(index::CF_OBJECTS), object.as_bytes())?
            .is_some();
        batch.put_cf(
            self.cf(index::CF_RECIPES),
            object.as_bytes(),
            recipe.encode(),
        );
        if !existed || d.sha512.is_some() {
            let info = serde_json::to_vec(&info).map_err(|e| StoreError::Invalid(e.to_string()))?;
            batch.put_cf(self.cf(index::CF_OBJECTS), object.as_bytes(), info);
        }
        batch.put_cf(
            self.cf(index::CF_DIGESTS),
            format!("sha256:{}", d.sha256),
            object.as_bytes(),
        );
        batch.put_cf(
            self.cf(index::CF_DIGESTS),
            format!("blake3:{}", d.blake3),
            object.as_bytes(),
        );
        if let Some(s) = &d.sha512 {
            batch.put_cf(
                self.cf(index::CF_DIGESTS),
                format!("sha512:{s}"),
                object.as_bytes(),
            );
        }
        if let Some(n) = &opts.name {
            let e = NameEntry {
                object,
                updated_ms: now_ms(),
                version: 0,
            };
            batch.put_cf(self.cf(index::CF_NAMES), n.as_bytes(), e.encode());
        }
        if opts.pin {
            batch.put_cf(
                self.cf(index::CF_PINS),
                format!("obj:{object}"),
                object.as_bytes(),
            );
        }
        db.write_opt(batch, &sync_write())?;
        // Cache under the commit lock: GC drops cached recipes under the same
        // lock, so a stale entry can never outlive its GC.
        self.inner.recipes.insert(object, Arc::new(recipe.clone()));
        drop(_c);
        for (id, m) in new_metas.iter() {
            self.inner.meta_cache.insert(*id, Arc::new(m.clone()));
            self.touch(id);
        }
        let m = &self.inner.metrics;
        m.chunks_written.inc_by(new_metas.len() as u64);
        m.chunks_deduplicated
            .inc_by(recipe.chunks().len() as u64 - new_metas.len() as u64);
        m.ingested_bytes.inc_by(len);
        m.physical_bytes.add(stored as i64);
        if !existed {
            m.logical_bytes.add(len as i64);
        }
        m.update_ratio();
        drop(guard);
        drop(seg_guard);
        if let Some(budget) = self.inner.cfg.budget_bytes {
            if m.physical_bytes.get() as u64 > budget {
                self.evict_to_budget()?;
            }
        }
        Ok(PutResult {
            object,
            len,
            chunks: recipe.chunks().len() as u64,
            new_chunks: new_metas.len() as u64,
            new_bytes,
            stored_bytes: stored,
            sha256: d.sha256,
            sha512: d.sha512,
            blake3: d.blake3,
        })
    }
}

struct Chunking<'a> {
    store: &'a Store,
    recipe: Recipe,
    guard: InUse,
    seen: HashSet<ChunkId>,
    inline: Vec<(ChunkId, Bytes)>,
    new_bytes: u64,
    wtx: Option<Sender<(ChunkId, Bytes)>>,
}

impl Chunking<'_> {
    fn chunk(&mut self, data: Bytes) -> Result<()> {
        let id = ChunkId::of(&data);
        self.recipe.push(id, data.len() as u32);
        if !self.seen.insert(id) {
            return Ok(());
        }
        // Register before looking: GC either ran before (we see the chunk
        // gone and write it) or sees it in use and keeps it.
        self.guard.add(id);
        if self.store.has_chunk(&id)? {
            return Ok(());
        }
        self.new_bytes += data.len() as u64;
        if data.len() <= self.store.inner.cfg.inline_max {
            self.inline.push((id, data));
            return Ok(());
        }
        if let Some(tx) = &self.wtx {
            if tx.send((id, data)).is_err() {
                // The writer stopped: its error is reported by the join.
                return Err(StoreError::Invalid("segment writer stopped".into()));
            }
        }
        Ok(())
    }
}

enum Feed {
    Data(Bytes),
    End,
    Fail(String),
}

struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Feed>,
    cur: Bytes,
    done: bool,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            if self.done {
                return Ok(0);
            }
            match self.rx.blocking_recv() {
                Some(Feed::Data(b)) => self.cur = b,
                Some(Feed::End) => self.done = true,
                Some(Feed::Fail(m)) => return Err(std::io::Error::other(m)),
                None => {
                    return Err(std::io::Error::other(
                        "ingest cancelled before the end of the input",
                    ))
                }
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        self.cur = self.cur.slice(n..);
        Ok(n)
    }
}
