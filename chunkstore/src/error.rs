//! Errors of the chunk store.

use std::path::PathBuf;

use crate::{ChunkId, ObjectId};

/// Everything a store operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O call failed; `what` says on which file and for what.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, with the path.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// RocksDB refused an operation.
    #[error("index database: {0}")]
    Db(#[from] rocksdb::Error),
    /// No object with this id, name or digest.
    #[error("no such object: {0}")]
    NoSuchObject(String),
    /// A chunk the object needs is not in the store (evicted, quarantined or
    /// never fetched). It can be fetched again by its id.
    #[error("chunk {0} is missing from the store")]
    ChunkMissing(ChunkId),
    /// Bytes on disk do not hash to the chunk's id. The chunk was moved aside
    /// to `quarantine` and now counts as missing.
    #[error("chunk {id} is corrupt at {path}:{offset} (moved aside to {quarantine})", path = path.display(), quarantine = quarantine.display())]
    Corrupt {
        /// The chunk.
        id: ChunkId,
        /// Segment file (or the index, for inline chunks) that held it.
        path: PathBuf,
        /// Offset of the payload in that file.
        offset: u64,
        /// Where the bad bytes were copied.
        quarantine: PathBuf,
    },
    /// An index entry could not be decoded.
    #[error("corrupt index entry for {what}: {why}")]
    BadEntry {
        /// Which key.
        what: String,
        /// What is wrong.
        why: String,
    },
    /// A read beyond the end of an object.
    #[error("read at {offset} is past the end of object {object} ({len} bytes)")]
    OutOfRange {
        /// The object.
        object: ObjectId,
        /// Requested offset.
        offset: u64,
        /// Object length.
        len: u64,
    },
    /// The caller passed something invalid (a bad name, config or size).
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// The data directory is locked by another process.
    #[error("store at {0} is in use by another process")]
    Locked(PathBuf),
}

/// Shorthand.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

pub(crate) trait IoContext<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| StoreError::Io {
            what: what(),
            source,
        })
    }
}
