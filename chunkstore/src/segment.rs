//! Append-only segment files holding chunk payloads.
//!
//! A record is a 48-byte header followed by the stored (possibly
//! zstd-compressed) payload:
//! ```text
//! magic "CSG1" | flags u8 | pad [3] | raw_len u32 | stored_len u32 | chunk id [32]
//! ```
//! The index, not the segment, is the source of truth: a record is live only
//! while an index entry points at it. Headers make segments self-describing
//! for debugging and for rebuilding tools. Bytes past the last synced record
//! (a crash mid-append) are garbage that compaction drops.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::engine::IoEngine;
use crate::error::{IoContext, Result};
use crate::ChunkId;

/// Record header length.
pub const HEADER_LEN: usize = 48;
const MAGIC: &[u8; 4] = b"CSG1";
/// Record flag: the payload is zstd-compressed.
pub const FLAG_ZSTD: u8 = 1;

/// One open segment file.
#[derive(Debug)]
pub struct Segment {
    /// Segment number; files are named `NNNNNNNN.seg`.
    pub no: u32,
    /// Path of the file.
    pub path: PathBuf,
    /// The open file. Kept open while any reader holds this `Arc`, so a
    /// compacted (unlinked) segment stays readable under in-flight reads.
    pub file: File,
}

/// File name of segment `no`.
pub fn file_name(no: u32) -> String {
    format!("{no:08}.seg")
}

/// Parse a segment file name.
pub fn parse_name(name: &str) -> Option<u32> {
    name.strip_suffix(".seg")
        .filter(|s| s.len() == 8)
        .and_then(|s| s.parse().ok())
}

impl Segment {
    /// Open an existing segment for reading and appending.
    pub fn open(dir: &Path, no: u32) -> Result<Self> {
        let path = dir.join(file_name(no));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .ctx(|| format!("open segment {}", path.display()))?;
        Ok(Self { no, path, file })
    }

    /// Create a new, empty segment and make its directory entry durable.
    pub fn create(dir: &Path, no: u32) -> Result<Self> {
        let path = dir.join(file_name(no));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .ctx(|| format!("create segment {}", path.display()))?;
        sync_dir(dir)?;
        Ok(Self { no, path, file })
    }

    /// Current file length.
    pub fn len(&self) -> Result<u64> {
        Ok(self
            .file
            .metadata()
            .ctx(|| format!("stat {}", self.path.display()))?
            .len())
    }

    /// Always false for a usable segment; here for clippy's sake.
    pub fn is_empty(&self) -> Result<bool> {
        Ok(self.len()? == 0)
    }
}

/// fsync a directory so entries created or removed in it are durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx(|| format!("fsync directory {}", dir.display()))
}

/// Encode a record header.
pub fn encode_header(id: &ChunkId, flags: u8, raw_len: u32, stored_len: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(MAGIC);
    h[4] = flags;
    h[8..12].copy_from_slice(&raw_len.to_le_bytes());
    h[12..16].copy_from_slice(&stored_len.to_le_bytes());
    h[16..48].copy_from_slice(id.as_bytes());
    h
}

/// The segment being appended to, with a staging buffer so many small chunk
/// records become few large writes.
#[derive(Debug)]
pub struct ActiveSegment {
    /// The segment.
    pub seg: Arc<Segment>,
    /// Logical end: file bytes plus staged bytes.
    pub len: u64,
    staging: Vec<u8>,
    staging_start: u64,
}

/// Flush the staging buffer when it grows past this.
const STAGING_FLUSH: usize = 4 << 20;

impl ActiveSegment {
    /// Append at the end of `seg`, whose file is `len` bytes long.
    pub fn new(seg: Arc<Segment>, len: u64) -> Self {
        Self {
            seg,
            len,
            staging: Vec::with_capacity(STAGING_FLUSH + (256 << 10)),
            staging_start: len,
        }
    }

    /// Stage a record; returns the payload's offset in the file.
    pub fn append(
        &mut self,
        engine: &dyn IoEngine,
        header: &[u8; HEADER_LEN],
        payload: &[u8],
    ) -> Result<u64> {
        let payload_off = self.len + HEADER_LEN as u64;
        self.staging.extend_from_slice(header);
        self.staging.extend_from_slice(payload);
        self.len += (HEADER_LEN + payload.len()) as u64;
        if self.staging.len() >= STAGING_FLUSH {
            self.flush(engine)?;
        }
        Ok(payload_off)
    }

    /// Write staged bytes to the file (not yet durable: see `IoEngine::sync_data`).
    pub fn flush(&mut self, engine: &dyn IoEngine) -> Result<()> {
        if self.staging.is_empty() {
            return Ok(());
        }
        engine
            .write_all_at(&self.seg.file, self.staging_start, &self.staging)
            .ctx(|| format!("write segment {}", self.seg.path.display()))?;
        self.staging_start += self.staging.len() as u64;
        self.staging.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(parse_name(&file_name(42)), Some(42));
        assert_eq!(parse_name("42.seg"), None);
        assert_eq!(parse_name("0000004x.seg"), None);
    }
}
