//! Space and integrity: garbage collection, segment compaction, eviction
//! under a byte budget, `fsck` and per-object verification.
//!
//! GC is mark and sweep. Roots are pins and names. Mark and sweep run under
//! the exclusive commit lock, so no root can be committed in between; the
//! sweep deletes a chunk only while holding the `in_use` map and seeing the
//! chunk absent from it (see `store.rs`). Compaction then copies the live
//! chunks of mostly-dead segments into the active segment, syncs them,
//! repoints the index, and unlinks the old file. Readers that still hold the
//! old segment keep an open descriptor, so they finish unharmed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use rocksdb::{IteratorMode, WriteBatch};

use crate::error::{IoContext, Result, StoreError};
use crate::index::{self, ChunkMeta, Location};
use crate::recipe::Recipe;
use crate::segment;
use crate::store::{sync_write, Store};
use crate::{ChunkId, ObjectId};

/// What a GC run did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GcReport {
    /// Objects no root reached, whose recipes were removed.
    pub objects_removed: u64,
    /// Chunks removed from the index.
    pub chunks_removed: u64,
    /// Their bytes on disk.
    pub chunk_bytes_removed: u64,
    /// Segments rewritten or deleted.
    pub segments_compacted: u64,
    /// Live chunks copied by compaction.
    pub chunks_moved: u64,
    /// Segment bytes returned to the file system.
    pub bytes_reclaimed: u64,
}

/// What `fsck` found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FsckReport {
    /// Chunks read and verified.
    pub chunks_checked: u64,
    /// Bytes read and verified.
    pub bytes_checked: u64,
    /// Chunks whose bytes did not match (now quarantined).
    pub corrupt: Vec<String>,
    /// Index entries that could not be decoded or point nowhere.
    pub bad_entries: Vec<String>,
    /// Recipes checked.
    pub objects_checked: u64,
    /// (object, chunk) pairs whose chunk is absent.
    pub missing: Vec<(ObjectId, ChunkId)>,
    /// Names or pins pointing at objects that do not exist.
    pub dangling: Vec<String>,
    /// Segment bytes no index entry points at (compaction reclaims them).
    pub garbage_bytes: u64,
}

impl FsckReport {
    /// No corruption, no bad entries, nothing missing, nothing dangling.
    pub fn is_clean(&self) -> bool {
        self.corrupt.is_empty()
            && self.bad_entries.is_empty()
            && self.missing.is_empty()
            && self.dangling.is_empty()
    }
}

/// What verifying one object found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    /// The object.
    pub object: ObjectId,
    /// Bytes read.
    pub bytes: u64,
    /// sha256 recomputed from the chunks matches the one recorded at ingest.
    pub sha256_ok: bool,
}

impl Store {
    /// Every decodable `chunks` entry. Undecodable ones are skipped here;
    /// `fsck` walks the column family itself to report them.
    fn chunk_entries(&self) -> impl Iterator<Item = Result<(ChunkId, ChunkMeta)>> + '_ {
        self.inner
            .db
            .iterator_cf(self.cf(index::CF_CHUNKS), IteratorMode::Start)
            .filter_map(|kv| match kv {
                Err(e) => Some(Err(e.into())),
                Ok((k, v)) => {
                    let id = ChunkId::from_slice(&k)?;
                    ChunkMeta::decode(&id, &v).ok().map(|m| Ok((id, m)))
                }
            })
    }

    fn roots(&self) -> Result<(Vec<ObjectId>, Vec<ObjectId>)> {
        let pinned: Vec<_> = self.pins()?.into_iter().map(|(_, o)| o).collect();
        let named: Vec<_> = self.names()?.into_iter().map(|(_, e)| e.object).collect();
        Ok((pinned, named))
    }

    fn chunks_of(&self, objects: &[ObjectId], out: &mut HashSet<ChunkId>) -> Result<()> {
        for o in objects {
            match self.recipe(o) {
                Ok(r) => out.extend(r.chunks().iter().map(|c| c.id)),
                Err(StoreError::NoSuchObject(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Collect garbage: drop objects and chunks no pin or name reaches, then
    /// compact segments that are mostly dead.
    pub fn gc(&self) -> Result<GcReport> {
        let _g = self.inner.gc_lock.lock();
        let mut report = GcReport::default();
        let mut live_per_seg: HashMap<u32, u64> = HashMap::new();
        {
            let _c = self.inner.commit_lock.write();
            let (pinned, named) = self.roots()?;
            let live_objects: HashSet<ObjectId> =
                pinned.iter().chain(named.iter()).copied().collect();
            let mut live = HashSet::new();
            self.chunks_of(&pinned, &mut live)?;
            self.chunks_of(&named, &mut live)?;

            let mut batch = WriteBatch::default();
            for id in self.objects()? {
                if !live_objects.contains(&id) {
                    batch.delete_cf(self.cf(index::CF_RECIPES), id.as_bytes());
                    batch.delete_cf(self.cf(index::CF_OBJECTS), id.as_bytes());
                    if let Ok(info) = self.object_info(&id) {
                        batch.delete_cf(
                            self.cf(index::CF_DIGESTS),
                            format!("sha256:{}", info.sha256),
                        );
                        batch.delete_cf(
                            self.cf(index::CF_DIGESTS),
                            format!("blake3:{}", info.blake3),
                        );
                        if let Some(s) = info.sha512 {
                            batch.delete_cf(self.cf(index::CF_DIGESTS), format!("sha512:{s}"));
                        }
                    }
                    self.inner.recipes.remove(&id);
                    report.objects_removed += 1;
                }
            }
            let in_use = self.inner.in_use.lock();
            let mut dead = Vec::new();
            for kv in self
                .inner
                .db
                .iterator_cf(self.cf(index::CF_CHUNKS), IteratorMode::Start)
            {
                let (k, v) = kv?;
                let Some(id) = ChunkId::from_slice(&k) else {
                    batch.delete_cf(self.cf(index::CF_CHUNKS), &k);
                    continue;
                };
                let meta = ChunkMeta::decode(&id, &v);
                if live.contains(&id) || in_use.contains_key(&id) {
                    if let Ok(ChunkMeta {
                        loc:
                            Location::Segment {
                                seg, stored_len, ..
                            },
                        ..
                    }) = meta
                    {
                        *live_per_seg.entry(seg).or_default() +=
                            u64::from(stored_len) + segment::HEADER_LEN as u64;
                    }
                    continue;
                }
                report.chunks_removed += 1;
                report.chunk_bytes_removed += meta.map(|m| m.stored_len()).unwrap_or(0);
                batch.delete_cf(self.cf(index::CF_CHUNKS), id.as_bytes());
                dead.push(id);
            }
            self.inner.db.write_opt(batch, &sync_write())?;
            for id in &dead {
                self.inner.meta_cache.remove(id);
                self.inner.outboards.remove(id);
                self.uncache_chunk(id);
            }
            drop(in_use);
            self.inner.atime.lock().retain(|id, _| !dead.contains(id));
        }
        self.compact(&live_per_seg, &mut report)?;
        self.recount()?;
        self.inner.metrics.gc_runs.inc();
        self.inner
            .metrics
            .gc_chunks_reclaimed
            .inc_by(report.chunks_removed);
        self.inner
            .metrics
            .gc_bytes_reclaimed
            .inc_by(report.bytes_reclaimed);
        tracing::info!(?report, "gc done");
        Ok(report)
    }

    /// Rewrite or delete segments whose live fraction is below the threshold.
    fn compact(&self, live_per_seg: &HashMap<u32, u64>, report: &mut GcReport) -> Result<()> {
        let active_no = self.inner.active.lock().seg.no;
        let segs: Vec<_> = self.inner.segs.read().values().cloned().collect();
        for seg in segs {
            if seg.no == active_no || self.inner.seg_writers.lock().contains_key(&seg.no) {
                continue;
            }
            let size = seg.len()?;
            let live = live_per_seg.get(&seg.no).copied().unwrap_or(0);
            if size > 0 && live as f64 >= size as f64 * self.inner.cfg.compact_below {
                continue;
            }
            // Move every chunk whose entry points into this segment.
            let mut moved: Vec<(ChunkId, ChunkMeta)> = Vec::new();
            let mut touched = Vec::new();
            for entry in self.chunk_entries() {
                let (id, meta) = entry?;
                let Location::Segment { seg: s, .. } = meta.loc else {
                    continue;
                };
                if s != seg.no {
                    continue;
                }
                // Verify while moving: never copy corruption forward.
                let (stored, path, offset) = self.read_stored(&id, &meta)?;
                let ok = if meta.compressed {
                    zstd::bulk::decompress(&stored, meta.raw_len as usize)
                        .map(|d| ChunkId::of(&d) == id)
                        .unwrap_or(false)
                } else {
                    ChunkId::of(&stored) == id
                };
                if !ok {
                    let _ = self.quarantine(&id, &stored, path, offset);
                    continue;
                }
                let header = segment::encode_header(
                    &id,
                    if meta.compressed {
                        segment::FLAG_ZSTD
                    } else {
                        0
                    },
                    meta.raw_len,
                    stored.len() as u32,
                );
                let mut active = self.inner.active.lock();
                if active.len + (segment::HEADER_LEN + stored.len()) as u64
                    > self.inner.cfg.segment_bytes
                    && active.len > 0
                {
                    crate::ingest::roll(&self.inner, &mut active)?;
                }
                let off = active.append(self.inner.engine.as_ref(), &header, &stored)?;
                if !touched
                    .iter()
                    .any(|t: &Arc<segment::Segment>| Arc::ptr_eq(t, &active.seg))
                {
                    touched.push(active.seg.clone());
                }
                moved.push((
                    id,
                    ChunkMeta {
                        loc: Location::Segment {
                            seg: active.seg.no,
                            offset: off,
                            stored_len: stored.len() as u32,
                        },
                        ..meta
                    },
                ));
            }
            self.inner.active.lock().flush(self.inner.engine.as_ref())?;
            for t in &touched {
                self.inner
                    .engine
                    .sync_data(&t.file)
                    .ctx(|| format!("fdatasync {}", t.path.display()))?;
            }
            let mut batch = WriteBatch::default();
            for (id, m) in &moved {
                batch.put_cf(self.cf(index::CF_CHUNKS), id.as_bytes(), m.encode());
            }
            self.inner.db.write_opt(batch, &sync_write())?;
            for (id, m) in &moved {
                self.inner.meta_cache.insert(*id, Arc::new(m.clone()));
            }
            self.inner.segs.write().remove(&seg.no);
            std::fs::remove_file(&seg.path).ctx(|| format!("remove {}", seg.path.display()))?;
            segment::sync_dir(&self.inner.seg_dir)?;
            let moved_bytes: u64 = moved
                .iter()
                .map(|(_, m)| m.stored_len() + segment::HEADER_LEN as u64)
                .sum();
            self.inner
                .metrics
                .segment_bytes
                .sub(size as i64 - moved_bytes as i64);
            report.segments_compacted += 1;
            report.chunks_moved += moved.len() as u64;
            report.bytes_reclaimed += size.saturating_sub(moved_bytes);
        }
        Ok(())
    }

    /// Evict least recently used chunks of unpinned objects until physical
    /// bytes are at 90% of the budget, then compact. Evicted chunks read as
    /// missing; their objects stay listed as partial.
    pub fn evict_to_budget(&self) -> Result<u64> {
        let Some(budget) = self.inner.cfg.budget_bytes else {
            return Ok(0);
        };
        let _g = self.inner.gc_lock.lock();
        let target = budget / 10 * 9;
        let (pinned, _) = self.roots()?;
        let mut keep = HashSet::new();
        self.chunks_of(&pinned, &mut keep)?;
        let atime = self.inner.atime.lock().clone();
        let mut candidates = Vec::new();
        let mut live_per_seg: HashMap<u32, u64> = HashMap::new();
        for entry in self.chunk_entries() {
            let (id, meta) = entry?;
            if let Location::Segment {
                seg, stored_len, ..
            } = meta.loc
            {
                *live_per_seg.entry(seg).or_default() +=
                    u64::from(stored_len) + segment::HEADER_LEN as u64;
            }
            if !keep.contains(&id) {
                candidates.push((atime.get(&id).copied().unwrap_or(0), id, meta));
            }
        }
        candidates.sort_by_key(|c| c.0);
        let mut physical = self.inner.metrics.physical_bytes.get().max(0) as u64;
        let mut evicted = 0u64;
        {
            let in_use = self.inner.in_use.lock();
            let mut batch = WriteBatch::default();
            let mut gone = Vec::new();
            for (_, id, meta) in candidates {
                if physical <= target {
                    break;
                }
                if in_use.contains_key(&id) {
                    continue;
                }
                batch.delete_cf(self.cf(index::CF_CHUNKS), id.as_bytes());
                physical = physical.saturating_sub(meta.stored_len());
                evicted += meta.stored_len();
                if let Location::Segment {
                    seg, stored_len, ..
                } = meta.loc
                {
                    if let Some(l) = live_per_seg.get_mut(&seg) {
                        *l = l.saturating_sub(u64::from(stored_len) + segment::HEADER_LEN as u64);
                    }
                }
                gone.push(id);
            }
            self.inner.db.write_opt(batch, &sync_write())?;
            for id in &gone {
                self.inner.meta_cache.remove(id);
                self.inner.outboards.remove(id);
                self.uncache_chunk(id);
            }
            self.inner.metrics.evictions.inc_by(gone.len() as u64);
            self.inner.metrics.evicted_bytes.inc_by(evicted);
            self.inner.metrics.physical_bytes.set(physical as i64);
            self.inner.metrics.update_ratio();
            let mut at = self.inner.atime.lock();
            for id in &gone {
                at.remove(id);
            }
        }
        if physical > target {
            tracing::warn!(
                physical,
                budget,
                "byte budget exceeded by pinned or in-use chunks"
            );
        }
        let mut report = GcReport::default();
        self.compact(&live_per_seg, &mut report)?;
        tracing::info!(
            evicted,
            reclaimed = report.bytes_reclaimed,
            "evicted to budget"
        );
        Ok(evicted)
    }

    /// Walk everything: verify every chunk, decode every recipe, check that
    /// every referenced chunk is present and every root resolves. Corrupt
    /// chunks are quarantined as they are found.
    pub fn fsck(&self, mut progress: impl FnMut(u64)) -> Result<FsckReport> {
        let mut r = FsckReport::default();
        let mut live_per_seg: HashMap<u32, u64> = HashMap::new();
        let entries: Vec<_> = self
            .inner
            .db
            .iterator_cf(self.cf(index::CF_CHUNKS), IteratorMode::Start)
            .collect::<std::result::Result<_, _>>()?;
        for (k, v) in entries {
            let Some(id) = ChunkId::from_slice(&k) else {
                r.bad_entries
                    .push(format!("chunk key of {} bytes", k.len()));
                continue;
            };
            let meta = match ChunkMeta::decode(&id, &v) {
                Ok(m) => m,
                Err(e) => {
                    r.bad_entries.push(e.to_string());
                    continue;
                }
            };
            if let Location::Segment {
                seg, stored_len, ..
            } = meta.loc
            {
                *live_per_seg.entry(seg).or_default() +=
                    u64::from(stored_len) + segment::HEADER_LEN as u64;
            }
            match self.read_chunk_with(&id, &meta, true) {
                Ok(d) => {
                    r.chunks_checked += 1;
                    r.bytes_checked += d.len() as u64;
                    progress(d.len() as u64);
                }
                Err(e @ StoreError::Corrupt { .. }) => r.corrupt.push(e.to_string()),
                Err(e @ (StoreError::BadEntry { .. } | StoreError::Io { .. })) => {
                    r.bad_entries.push(e.to_string())
                }
                Err(e) => return Err(e),
            }
        }
        for kv in self
            .inner
            .db
            .iterator_cf(self.cf(index::CF_RECIPES), IteratorMode::Start)
        {
            let (k, v) = kv?;
            let Some(oid) = ObjectId::from_slice(&k) else {
                r.bad_entries.push("recipe key of wrong length".into());
                continue;
            };
            let recipe = match Recipe::decode(&v) {
                Ok(x) => x,
                Err(e) => {
                    r.bad_entries.push(format!("recipe {oid}: {e}"));
                    continue;
                }
            };
            if recipe.object_id() != oid {
                r.bad_entries
                    .push(format!("recipe {oid} hashes to {}", recipe.object_id()));
            }
            r.objects_checked += 1;
            let mut seen = HashSet::new();
            for c in recipe.chunks() {
                if seen.insert(c.id) && !self.has_chunk(&c.id)? {
                    r.missing.push((oid, c.id));
                }
            }
        }
        for (name, e) in self.names()? {
            if self.recipe(&e.object).is_err() {
                r.dangling.push(format!("name {name} -> {}", e.object));
            }
        }
        for (key, o) in self.pins()? {
            if self.recipe(&o).is_err() {
                r.dangling.push(format!("pin {key} -> {o}"));
            }
        }
        let active = self.inner.active.lock().seg.no;
        for s in self.inner.segs.read().values() {
            if s.no != active {
                r.garbage_bytes += s
                    .len()?
                    .saturating_sub(live_per_seg.get(&s.no).copied().unwrap_or(0));
            }
        }
        Ok(r)
    }

    /// Read a whole object, verifying every chunk, and compare its sha256
    /// with the one recorded at ingest.
    pub fn verify_object(
        &self,
        id: &ObjectId,
        mut progress: impl FnMut(u64),
    ) -> Result<VerifyReport> {
        use sha2::Digest;
        let h = self.open_object(id)?;
        let info = self.object_info(id)?;
        let mut sha = sha2::Sha256::new();
        let mut bytes = 0;
        for c in h.chunks() {
            let c = c?;
            sha.update(&c);
            bytes += c.len() as u64;
            progress(c.len() as u64);
        }
        Ok(VerifyReport {
            object: *id,
            bytes,
            sha256_ok: hex::encode(sha.finalize()) == info.sha256 && bytes == info.len,
        })
    }
}
