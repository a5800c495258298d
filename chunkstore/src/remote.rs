//! Filling the store from elsewhere: recipes and chunks that arrive from
//! peers instead of from a local byte stream.
//!
//! A fetch records the object's recipe first (pinned, so GC keeps the chunks
//! that follow), then adds verified chunks in batches as they land. Each
//! batch is durable before `put_chunks` returns: segment data is
//! `fdatasync`ed, then one synced RocksDB batch adds the index entries.

use std::sync::Arc;

use rocksdb::WriteBatch;

use crate::error::{Result, StoreError};
use crate::index::{self, ChunkMeta, Location, ObjectInfo};
use crate::ingest::{append_chunk, seg_writers, sync_segments};
use crate::recipe::{ChunkRef, Recipe};
use crate::segment::Segment;
use crate::store::{sync_write, InUse, Store};
use crate::{ChunkId, ObjectId, VerifiedChunk};

/// What [`Store::put_chunks`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PutChunksResult {
    /// Chunks that were new to the store.
    pub new_chunks: u64,
    /// Their uncompressed bytes.
    pub new_bytes: u64,
    /// Bytes added on disk (after compression).
    pub stored_bytes: u64,
}

impl Store {
    /// Store chunks that came from elsewhere. Chunks already present are
    /// skipped. Durable when this returns.
    pub fn put_chunks(&self, chunks: &[VerifiedChunk]) -> Result<PutChunksResult> {
        let inner = &self.inner;
        let mut guard = InUse::new(inner, |i| &i.in_use);
        let mut seg_guard = seg_writers(inner);
        let mut touched: Vec<Arc<Segment>> = Vec::new();
        let mut metas: Vec<(ChunkId, ChunkMeta)> = Vec::new();
        let mut res = PutChunksResult::default();
        for c in chunks {
            let id = *c.id();
            // Register before looking, as ingest does: GC either ran before
            // (we see the chunk gone and write it) or sees it in use.
            guard.add(id);
            if self.has_chunk(&id)? || metas.iter().any(|(m, _)| *m == id) {
                continue;
            }
            let data = c.data();
            res.new_chunks += 1;
            res.new_bytes += data.len() as u64;
            if data.len() <= inner.cfg.inline_max {
                res.stored_bytes += data.len() as u64;
                metas.push((
                    id,
                    ChunkMeta {
                        raw_len: data.len() as u32,
                        compressed: false,
                        loc: Location::Inline(data.clone()),
                    },
                ));
                continue;
            }
            let (meta, stored) = append_chunk(
                inner,
                &mut touched,
                &mut seg_guard,
                &id,
                data,
                c.zstd().map(|z| &z[..]),
                &inner.remote_probe,
            )?;
            res.stored_bytes += stored;
            metas.push((id, meta));
        }
        if metas.is_empty() {
            return Ok(res);
        }
        sync_segments(inner, &touched)?;
        let mut batch = WriteBatch::default();
        for (id, m) in &metas {
            batch.put_cf(self.cf(index::CF_CHUNKS), id.as_bytes(), m.encode());
        }
        {
            let _c = inner.commit_lock.read();
            inner.db.write_opt(batch, &sync_write())?;
        }
        for (id, m) in &metas {
            inner.meta_cache.insert(*id, Arc::new(m.clone()));
            self.touch(id);
        }
        let m = &inner.metrics;
        m.chunks_written.inc_by(res.new_chunks);
        m.physical_bytes.add(res.stored_bytes as i64);
        m.update_ratio();
        drop(guard);
        drop(seg_guard);
        if let Some(budget) = inner.cfg.budget_bytes {
            if m.physical_bytes.get() as u64 > budget {
                self.evict_to_budget()?;
            }
        }
        Ok(res)
    }

    /// Record an object known by its recipe (from a peer) before its chunks
    /// are here, pinned under `pin` so GC keeps whatever chunks arrive.
    /// `sha256` is stored as information only; it is not indexed as a digest
    /// until someone has checked it against the bytes.
    pub fn put_recipe(&self, recipe: &Recipe, pin: Option<&str>) -> Result<ObjectId> {
        let object = recipe.object_id();
        if let Some(p) = pin {
            index::validate_name(p)?;
        }
        let inner = &self.inner;
        let _c = inner.commit_lock.read();
        let mut batch = WriteBatch::default();
        batch.put_cf(
            self.cf(index::CF_RECIPES),
            object.as_bytes(),
            recipe.encode(),
        );
        let existed = inner
            .db
            .get_pinned_cf(self.cf(index::CF_OBJECTS), object.as_bytes())?
            .is_some();
        if !existed {
            let info = ObjectInfo {
                len: recipe.total_len(),
                chunks: recipe.chunks().len() as u64,
                sha256: String::new(),
                sha512: None,
                blake3: String::new(),
                created: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|t| t.as_secs())
                    .unwrap_or(0),
            };
            let info = serde_json::to_vec(&info).map_err(|e| StoreError::Invalid(e.to_string()))?;
            batch.put_cf(self.cf(index::CF_OBJECTS), object.as_bytes(), info);
        }
        if let Some(p) = pin {
            batch.put_cf(self.cf(index::CF_PINS), p.as_bytes(), object.as_bytes());
        }
        inner.db.write_opt(batch, &sync_write())?;
        inner.recipes.insert(object, Arc::new(recipe.clone()));
        if !existed {
            inner.metrics.logical_bytes.add(recipe.total_len() as i64);
            inner.metrics.update_ratio();
        }
        Ok(object)
    }

    /// Record the sha256 (and optionally sha512) of an object whose bytes
    /// the caller has just hashed in full, e.g. after a fetch: the object's
    /// info gets the digests and the digest index points at it, so it can
    /// be found and served by digest like a local put.
    pub fn record_digests(
        &self,
        object: &ObjectId,
        sha256: &str,
        sha512: Option<&str>,
    ) -> Result<()> {
        let hex_ok = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex_ok(sha256, 64) || sha512.is_some_and(|s| !hex_ok(s, 128)) {
            return Err(StoreError::Invalid(
                "digest is not lowercase hex of the right length".into(),
            ));
        }
        let inner = &self.inner;
        let _c = inner.commit_lock.read();
        let mut info = self.object_info(object)?;
        info.sha256 = sha256.to_ascii_lowercase();
        if let Some(s) = sha512 {
            info.sha512 = Some(s.to_ascii_lowercase());
        }
        let mut batch = WriteBatch::default();
        let enc = serde_json::to_vec(&info).map_err(|e| StoreError::Invalid(e.to_string()))?;
        batch.put_cf(self.cf(index::CF_OBJECTS), object.as_bytes(), enc);
        batch.put_cf(
            self.cf(index::CF_DIGESTS),
            format!("sha256:{}", info.sha256),
            object.as_bytes(),
        );
        if let Some(s) = &info.sha512 {
            batch.put_cf(
                self.cf(index::CF_DIGESTS),
                format!("sha512:{s}"),
                object.as_bytes(),
            );
        }
        inner.db.write_opt(batch, &sync_write())?;
        Ok(())
    }

    /// The distinct chunks of `recipe` that are not in the store, in recipe
    /// order.
    pub fn missing_chunks(&self, recipe: &Recipe) -> Result<Vec<ChunkRef>> {
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for c in recipe.chunks() {
            if seen.insert(c.id) && !self.has_chunk(&c.id)? {
                out.push(*c);
            }
        }
        Ok(out)
    }

    /// Read the stored recipe of `id` if present (no error when absent).
    pub fn try_recipe(&self, id: &ObjectId) -> Result<Option<Arc<Recipe>>> {
        match self.recipe(id) {
            Ok(r) => Ok(Some(r)),
            Err(StoreError::NoSuchObject(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }
}
